"""V2 input RPCs on InputService's native part: PostInputs, ListInputs, GetInput,
PatchInputs, DeleteInput(s), StreamInputs, GetInputCount and the InputsAddJob RPCs.

Media in responses: a stored original is served by datasetd's HTTP port, so
`data.<medium>.url` is its download link there (byte uploads get one too, as on the real
API), and `hosted` is left out: natively it names the object store (`s3://…`), which no
Clarifai client can fetch; the SDK's download_inputs reads only `url`, and its export
reader reads `hosted` from the export archive, never from these responses. Bytes are
never echoed (the SDK rebuilds listed inputs from MessageToDict, where bytes break).

Inputs are stored while PostInputs runs, so an inputs-add job is complete when PostInputs
answers. Its counts (inputs stored, inputs refused) are kept in this process's memory, a
bounded record per app and job id: enough for the SDK, which polls the job right after
posting. A job id this process has no record of (another replica, a restart, a job never
posted) still answers SUCCESS with nothing pending, and with zero counts."""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from clarifai_grpc.grpc.api import resources_pb2, service_pb2
from clarifai_grpc.grpc.api.status import status_code_pb2, status_pb2
from datasetd.v1 import errors_pb2, input_pb2, input_service_pb2
from google.protobuf.message import Message

from service.api.clarifai import status
from service.api.clarifai.convert import clarifai, native
from service.api.clarifai.datasets import patch_action
from service.api.clarifai.paging import PageCursors, page_request
from service.api.clarifai.parts import NativeParts
from service.api.clarifai.scope import app_of
from service.api.inputs import InputRpcs
from service.api.interceptors import Context, current_principal
from service.domain.errors import (
    DomainError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Violations,
)
from service.observability import REQUEST_ID

MEDIA = ("image", "video", "audio", "text")
# The real API's duplicate-url switch: datasetd always accepts the same url (or bytes)
# again, so either value asks for what happens anyway. Output-only fields of the media
# that datasetd has no field for (the SDK echoes what it listed) are ignored as well.
_IGNORED_INPUT_FIELDS = frozenset(
    {f"data.{medium}.allow_duplicate_url" for medium in MEDIA}
    | {"data.image.hosted_image_info", "data.video.thumbnail_url", "data.video.hosted_thumbnail"}
)
# Output-only fields a caller may echo from a listing: cleared, never sent on.
_OUTPUT_ONLY = ("status", "created_at", "modified_at")
# The native page size used to walk every input of an app (counts, stream cursors).
_WALK_PAGE = 1000
_STREAM_PER_PAGE = 20
_REMEMBERED_JOBS = 4096
_INPUT_SUCCESS = status_code_pb2.INPUT_DOWNLOAD_SUCCESS


def clear_output_only(message: Message) -> None:
    for name in _OUTPUT_ONLY:
        message.ClearField(name)


def name_concepts(data: resources_pb2.Data) -> None:
    """A concept's name defaults to its id, as on the real API (stored so)."""
    for concept in data.concepts:
        concept.name = concept.name or concept.id
    for region in data.regions:
        name_concepts(region.data)
    for frame in data.frames:
        name_concepts(frame.data)


def medium_of(data: resources_pb2.Data) -> str | None:
    return next((medium for medium in MEDIA if data.HasField(medium)), None)


def item_status(error: DomainError, invalid: int) -> status_pb2.Status:
    return status.of_error(error, REQUEST_ID.get(), invalid=invalid)


def refusal(problems: Iterable[tuple[str, str]]) -> InvalidArgument:
    """The refusal of one item of a batch, naming each bad field."""
    items = [FieldViolation(path, description) for path, description in problems]
    summary = "; ".join(f"{v.field}: {v.description}" for v in items)
    return InvalidArgument(summary, reason="INVALID_FIELD", violations=items)


def input_out(stored_input: input_pb2.Input) -> resources_pb2.Input:
    """A stored input as Clarifai clients read it: url of the stored original on the
    HTTP port, no object-store location, no bytes."""
    converted = clarifai(stored_input, resources_pb2.Input)
    name_concepts(converted.data)
    medium = medium_of(converted.data)
    if medium is not None:
        # The url is already the link (V2 calls run under DownloadLinks.wanted()).
        getattr(converted.data, medium).ClearField("hosted")
    return converted


@dataclass
class _Job:
    """What was posted under one inputs-add job id."""

    id: str
    created_at: datetime
    modified_at: datetime
    success: int = 0
    failed: int = 0


def _job_message(job: _Job) -> resources_pb2.InputsAddJob:
    message = resources_pb2.InputsAddJob(
        id=job.id,
        progress=resources_pb2.InputsAddJobProgress(
            pending_count=0,
            in_progress_count=0,
            success_count=job.success,
            failed_count=job.failed,
        ),
        status=status.make(status_code_pb2.JOB_COMPLETED, "Job completed"),
    )
    message.created_at.FromDatetime(job.created_at)
    message.modified_at.FromDatetime(job.modified_at)
    return message


@dataclass
class ClarifaiInputs:
    parts: NativeParts
    cursors: PageCursors[input_pb2.Input] = field(default_factory=PageCursors)
    jobs: collections.OrderedDict[tuple[str, str], _Job] = field(
        default_factory=collections.OrderedDict
    )

    @property
    def native(self) -> InputRpcs:
        return self.parts.inputs

    # --- PostInputs and its jobs ------------------------------------------------------

    async def PostInputs(
        self, request: service_pb2.PostInputsRequest, context: Context | None
    ) -> service_pb2.MultiInputResponse:
        app_id = app_of(request)
        if not request.inputs:
            raise InvalidArgument.field("inputs", "must hold at least one input (at most 128)")
        if request.input_id_conflict_resolution:
            raise InvalidArgument.field(
                "input_id_conflict_resolution",
                "is not supported by datasetd: a repeated id is reported as INPUT_DUPLICATE",
            )
        # Per input, not per request: an input with a field datasetd does not model is
        # refused on its own, as an invalid one is, and the others are stored.
        answers: list[resources_pb2.Input | None] = []
        sent: list[input_pb2.Input] = []
        for index, given in enumerate(request.inputs):
            violations = Violations()
            copy = resources_pb2.Input()
            copy.CopyFrom(given)
            clear_output_only(copy)
            name_concepts(copy.data)
            converted = native(
                copy, input_pb2.Input, f"inputs[{index}]", violations, _IGNORED_INPUT_FIELDS
            )
            if violations.items:
                refused = resources_pb2.Input(id=given.id)
                problems = ((v.field, v.description) for v in violations.items)
                refused.status.CopyFrom(
                    item_status(refusal(problems), status.INPUT_INVALID_ARGUMENT)
                )
                answers.append(refused)
            else:
                answers.append(None)
                sent.append(converted)
        results: list[input_service_pb2.InputResult] = []
        if sent:
            created = await self.native.CreateInputs(
                input_service_pb2.CreateInputsRequest(app_id=app_id, inputs=sent),
                cast(Context, context),
            )
            results = list(created.results)
        outcomes = iter(results)
        inputs = [
            answer if answer is not None else self._post_result(next(outcomes), index, app_id)
            for index, answer in enumerate(answers)
        ]
        if request.inputs_add_job_id:
            self._record_job(app_id, request.inputs_add_job_id, inputs)
        return service_pb2.MultiInputResponse(
            status=status.summary((i.status.code for i in inputs), REQUEST_ID.get()),
            inputs=inputs,
        )

    def _post_result(
        self, result: input_service_pb2.InputResult, index: int, app_id: str
    ) -> resources_pb2.Input:
        if result.outcome == errors_pb2.ITEM_OUTCOME_CREATED:
            return input_out(result.input)
        answer = resources_pb2.Input(id=result.input_id)
        if result.outcome == errors_pb2.ITEM_OUTCOME_DUPLICATE_ID:
            answer.status.CopyFrom(
                status.make(
                    status.INPUT_DUPLICATE,
                    "Input duplicate",
                    status.DUPLICATE_INPUT_DETAILS,
                    REQUEST_ID.get(),
                )
            )
            return answer
        # The native paths count positions among the inputs sent on, which skip the
        # ones refused here: name the field by its place in this request instead.
        native_prefix = f"inputs[{result.index}]"
        problems = [
            (e.field.replace(native_prefix, f"inputs[{index}]", 1), e.description)
            for e in result.errors
        ] or [(f"inputs[{index}]", "was not stored")]
        answer.status.CopyFrom(item_status(refusal(problems), status.INPUT_INVALID_ARGUMENT))
        return answer

    def _record_job(self, app_id: str, job_id: str, inputs: list[resources_pb2.Input]) -> None:
        now = datetime.now(UTC)
        key = (app_id, job_id)
        job = self.jobs.get(key) or _Job(job_id, now, now)
        job.success += sum(1 for i in inputs if i.status.code == _INPUT_SUCCESS)
        job.failed += sum(1 for i in inputs if i.status.code != _INPUT_SUCCESS)
        job.modified_at = now
        self.jobs[key] = job
        self.jobs.move_to_end(key)
        while len(self.jobs) > _REMEMBERED_JOBS:
            self.jobs.popitem(last=False)

    def _job(self, request: Any) -> _Job:
        app_id = app_of(request)
        if not request.id:
            raise InvalidArgument.field("id", "must name the inputs-add job")
        known = self.jobs.get((app_id, request.id))
        if known is not None:
            return known
        now = datetime.now(UTC)
        return _Job(request.id, now, now)

    async def GetInputsAddJob(
        self, request: service_pb2.GetInputsAddJobRequest, context: Context | None
    ) -> service_pb2.SingleInputsAddJobResponse:
        return service_pb2.SingleInputsAddJobResponse(
            status=status.ok(REQUEST_ID.get()), inputs_add_job=_job_message(self._job(request))
        )

    async def CancelInputsAddJob(
        self, request: service_pb2.CancelInputsAddJobRequest, context: Context | None
    ) -> service_pb2.SingleInputsAddJobResponse:
        answer = status.ok(REQUEST_ID.get())
        answer.details = (
            "nothing was cancelled: datasetd stores inputs while PostInputs runs, "
            "so the job was complete when PostInputs answered"
        )
        return service_pb2.SingleInputsAddJobResponse(
            status=answer, inputs_add_job=_job_message(self._job(request))
        )

    async def ListInputsAddJobs(
        self, request: service_pb2.ListInputsAddJobsRequest, context: Context | None
    ) -> service_pb2.MultiInputsAddJobResponse:
        app_id = app_of(request)
        page = page_request(request.page, request.per_page)
        newest_first = [job for (app, _), job in reversed(self.jobs.items()) if app == app_id]
        start = (page.page - 1) * page.per_page
        return service_pb2.MultiInputsAddJobResponse(
            status=status.ok(REQUEST_ID.get()),
            inputs_add_jobs=[_job_message(j) for j in newest_first[start : start + page.per_page]],
        )

    # --- reads ------------------------------------------------------------------------

    async def GetInput(
        self, request: service_pb2.GetInputRequest, context: Context | None
    ) -> service_pb2.SingleInputResponse:
        app_id = app_of(request)
        response = await self.native.GetInput(
            input_service_pb2.GetInputRequest(app_id=app_id, input_id=request.input_id),
            cast(Context, context),
        )
        return service_pb2.SingleInputResponse(
            status=status.ok(REQUEST_ID.get()), input=input_out(response.input)
        )

    async def _native_page(
        self, app_id: str, ids: list[str], size: int, token: str, context: Context | None
    ) -> tuple[list[input_pb2.Input], str]:
        listed = await self.native.ListInputs(
            input_service_pb2.ListInputsRequest(
                app_id=app_id, ids=ids, page_size=size, page_token=token
            ),
            cast(Context, context),
        )
        return list(listed.inputs), listed.next_page_token

    async def ListInputs(
        self, request: service_pb2.ListInputsRequest, context: Context | None
    ) -> service_pb2.MultiInputResponse:
        app_id = app_of(request)
        page = page_request(request.page, request.per_page)
        ids = list(request.ids)
        # Every listed input is stored (INPUT_SUCCESS): a status filter either keeps them
        # all or none. The SDK lists a chunk's ids with 30000 and deletes what is missing.
        wanted = request.status.code if request.HasField("status") else 0
        if wanted not in (0, _INPUT_SUCCESS, status.SUCCESS):
            return service_pb2.MultiInputResponse(status=status.ok(REQUEST_ID.get()))

        async def fetch(size: int, token: str) -> tuple[list[input_pb2.Input], str]:
            return await self._native_page(app_id, ids, size, token, context)

        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()
        key = f"ListInputs|{current_principal().key_id}|{app_id}|{digest}"
        items = await self.cursors.page(key, page, fetch)
        return service_pb2.MultiInputResponse(
            status=status.ok(REQUEST_ID.get()), inputs=[input_out(i) for i in items]
        )

    async def StreamInputs(
        self, request: service_pb2.StreamInputsRequest, context: Context | None
    ) -> service_pb2.MultiInputResponse:
        """Inputs in the order they were added, oldest first, after `last_id`."""
        app_id = app_of(request)
        violations = Violations()
        # datasetd's native listing has one order (the order inputs were added); sorting
        # by id or newest first would read the whole app per call.
        if request.descending:
            violations.add("descending", "is not supported: inputs stream oldest first")
        if request.order_by_id:
            violations.add(
                "order_by_id", "is not supported: inputs stream in the order they were added"
            )
        if request.per_page > _WALK_PAGE:
            violations.add("per_page", f"must be at most {_WALK_PAGE}, got {request.per_page}")
        violations.raise_if_any()
        per_page = request.per_page or _STREAM_PER_PAGE
        rest: list[input_pb2.Input] = []
        token, more = "", True
        if request.last_id:
            # Walk native pages to the one holding last_id; what follows it starts ours.
            while True:
                items, token = await self._native_page(app_id, [], _WALK_PAGE, token, context)
                ids = [item.id for item in items]
                if request.last_id in ids:
                    rest = items[ids.index(request.last_id) + 1 :]
                    break
                if not token:
                    raise NotFound.in_app("input", app_id, request.last_id)
            more = bool(token)
        while more and len(rest) < per_page:
            items, token = await self._native_page(app_id, [], per_page - len(rest), token, context)
            rest += items
            more = bool(token)
        return service_pb2.MultiInputResponse(
            status=status.ok(REQUEST_ID.get()),
            inputs=[input_out(i) for i in rest[:per_page]],
        )

    async def GetInputCount(
        self, request: service_pb2.GetInputCountRequest, context: Context | None
    ) -> service_pb2.SingleInputCountResponse:
        """Every input is processed once stored: all of them count as `processed`."""
        app_id = app_of(request)
        total, token = 0, ""
        while True:
            items, token = await self._native_page(app_id, [], _WALK_PAGE, token, context)
            total += len(items)
            if not token:
                break
        return service_pb2.SingleInputCountResponse(
            status=status.ok(REQUEST_ID.get()), counts=resources_pb2.InputCount(processed=total)
        )

    # --- writes -----------------------------------------------------------------------

    async def PatchInputs(
        self, request: service_pb2.PatchInputsRequest, context: Context | None
    ) -> service_pb2.MultiInputResponse:
        """Patches `data` (concepts, metadata, geo) of inputs named by id, all or nothing.
        `overwrite` replaces all three with what was sent; media sent are ignored (the
        stored ones stay), as on the real API."""
        app_id = app_of(request)
        action = patch_action(request.action)
        violations = Violations()
        inputs = []
        for index, given in enumerate(request.inputs):
            copy = resources_pb2.Input()
            copy.CopyFrom(given)
            clear_output_only(copy)
            name_concepts(copy.data)
            # Membership is not patched by PatchInputs on the real API, and its media are
            # kept (its docs patch with Get-modify-overwrite, which sends them back).
            copy.ClearField("dataset_ids")
            for medium in MEDIA:
                copy.data.ClearField(medium)
            converted = native(
                copy, input_pb2.Input, f"inputs[{index}]", violations, _IGNORED_INPUT_FIELDS
            )
            if not converted.id:
                violations.add(f"inputs[{index}].id", "is required to patch an input")
            inputs.append(converted)
        if not inputs:
            violations.add("inputs", "must hold at least one input")
        violations.raise_if_any()
        native_request = input_service_pb2.UpdateInputsRequest(
            app_id=app_id, inputs=inputs, action=action
        )
        if request.action == "overwrite":
            native_request.update_mask.paths.extend(["metadata", "concepts", "geo"])
        response = await self.native.UpdateInputs(native_request, cast(Context, context))
        return service_pb2.MultiInputResponse(
            status=status.ok(REQUEST_ID.get()),
            inputs=[input_out(i) for i in response.inputs],
        )

    async def DeleteInput(
        self, request: service_pb2.DeleteInputRequest, context: Context | None
    ) -> status_pb2.BaseResponse:
        app_id = app_of(request)
        if not request.input_id:
            raise InvalidArgument.field("input_id", "must name the input to delete")
        response = await self.native.DeleteInputs(
            input_service_pb2.DeleteInputsRequest(app_id=app_id, ids=[request.input_id]),
            cast(Context, context),
        )
        if response.unknown_ids:
            raise NotFound.in_app("input", app_id, request.input_id)
        return status_pb2.BaseResponse(status=status.ok(REQUEST_ID.get()))

    async def DeleteInputs(
        self, request: service_pb2.DeleteInputsRequest, context: Context | None
    ) -> status_pb2.BaseResponse:
        """SUCCESS once none of the ids exists: the SDK deletes the ids of failed uploads,
        which were never stored, and an empty list after a clean chunk."""
        app_id = app_of(request)
        answer = status.ok(REQUEST_ID.get())
        ids = list(dict.fromkeys(request.ids))
        unknown: list[str] = []
        for start in range(0, len(ids), _WALK_PAGE):
            response = await self.native.DeleteInputs(
                input_service_pb2.DeleteInputsRequest(
                    app_id=app_id, ids=ids[start : start + _WALK_PAGE]
                ),
                cast(Context, context),
            )
            unknown += response.unknown_ids
        if unknown:
            shown = ", ".join(unknown[:20]) + (" …" if len(unknown) > 20 else "")
            answer.details = f"{len(unknown)} of the ids did not exist: {shown}"
        return status_pb2.BaseResponse(status=answer)
