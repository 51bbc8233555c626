"""V2 dataset input RPCs: PostDatasetInputs (by ids, or by a search naming whole datasets:
the SDK's merge_dataset), ListDatasetInputs, GetDatasetInput, DeleteDatasetInputs, on
DatasetService's native membership part."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from clarifai_grpc.grpc.api import resources_pb2, service_pb2
from clarifai_grpc.grpc.api.status import status_code_pb2, status_pb2
from datasetd.v1 import dataset_pb2, dataset_service_pb2
from google.protobuf.message import Message

from service.api.clarifai import status
from service.api.clarifai.convert import clarifai
from service.api.clarifai.inputs import input_out
from service.api.clarifai.paging import PageCursors, page_request
from service.api.clarifai.parts import NativeParts
from service.api.clarifai.scope import app_of
from service.api.interceptors import Context, current_principal
from service.api.membership import MembershipRpcs
from service.domain.errors import InvalidArgument
from service.observability import REQUEST_ID

# What one native membership call takes (AddDatasetInputs, RemoveDatasetInputs).
NATIVE_BATCH = 1000
# The only search PostDatasetInputs accepts: the one the SDK's merge_dataset sends.
MERGE_SEARCH = "search.query.filters[0].input.dataset_ids"


def dataset_input_out(member: dataset_pb2.DatasetInput) -> resources_pb2.DatasetInput:
    converted = clarifai(member, resources_pb2.DatasetInput)
    converted.input.CopyFrom(input_out(member.input))
    return converted


def _only(message: Message, allowed: str, path: str) -> None:
    """Refuses every field set in `message` but `allowed`, naming it."""
    for descriptor, _ in message.ListFields():
        if descriptor.name != allowed:
            raise InvalidArgument.field(
                f"{path}.{descriptor.name}",
                f"is not supported: the only search accepted is {MERGE_SEARCH} "
                "(every input of those datasets is added)",
            )


def merge_sources(search: resources_pb2.Search) -> list[str]:
    """The datasets whose inputs a PostDatasetInputs search adds; any other search shape
    is refused, naming the field datasetd cannot evaluate."""
    _only(search, "query", "search")
    _only(search.query, "filters", "search.query")
    filters = search.query.filters
    if len(filters) != 1:
        raise InvalidArgument.field(
            "search.query.filters", f"must hold exactly one filter, got {len(filters)}"
        )
    _only(filters[0], "input", "search.query.filters[0]")
    _only(filters[0].input, "dataset_ids", "search.query.filters[0].input")
    sources = list(dict.fromkeys(filters[0].input.dataset_ids))
    if not sources:
        raise InvalidArgument.field(MERGE_SEARCH, "must name at least one dataset")
    return sources


def _item_failure(code: int, description: str, details: str) -> status_pb2.Status:
    return status.make(code, description, details, REQUEST_ID.get())


@dataclass
class ClarifaiDatasetInputs:
    parts: NativeParts
    cursors: PageCursors[dataset_pb2.DatasetInput] = field(default_factory=PageCursors)

    @property
    def native(self) -> MembershipRpcs:
        return self.parts.membership

    async def PostDatasetInputs(
        self, request: service_pb2.PostDatasetInputsRequest, context: Context | None
    ) -> service_pb2.MultiDatasetInputResponse:
        app_id = app_of(request)
        if request.HasField("search"):
            if request.dataset_inputs:
                raise InvalidArgument.field(
                    "dataset_inputs", "must be empty when search is set (send one or the other)"
                )
            return await self._merge(app_id, request, context)
        if not request.dataset_inputs:
            raise InvalidArgument.field(
                "dataset_inputs", "must name at least one input (or set search)"
            )
        # Not atomic, as the real API: each item gets its own status and the others
        # are added whatever happens to it.
        items: list[resources_pb2.DatasetInput] = []
        wanted: list[str] = []
        for index, given in enumerate(request.dataset_inputs):
            item = resources_pb2.DatasetInput()
            item.input.id = given.input.id
            problem = self._refusal(index, given)
            if problem is not None:
                item.input.status.CopyFrom(problem)
            else:
                wanted.append(given.input.id)
            items.append(item)
        unknown: set[str] = set()
        distinct = list(dict.fromkeys(wanted))
        for start in range(0, len(distinct), NATIVE_BATCH):
            added = await self.native.AddDatasetInputs(
                dataset_service_pb2.AddDatasetInputsRequest(
                    app_id=app_id,
                    dataset_id=request.dataset_id,
                    input_ids=distinct[start : start + NATIVE_BATCH],
                ),
                cast(Context, context),
            )
            unknown.update(added.unknown_input_ids)
        for item in items:
            if item.input.HasField("status"):
                continue
            if item.input.id in unknown:
                item.input.status.CopyFrom(
                    _item_failure(
                        status.DOES_NOT_EXIST,
                        status.NOT_FOUND_DESCRIPTION,
                        f"input {item.input.id!r} does not exist in app {app_id!r}",
                    )
                )
            else:
                item.input.status.CopyFrom(
                    status.make(
                        status_code_pb2.DATASET_INPUT_SUCCESS,
                        "Dataset input added",
                        req_id=REQUEST_ID.get(),
                    )
                )
        return service_pb2.MultiDatasetInputResponse(
            status=status.summary((i.input.status.code for i in items), REQUEST_ID.get()),
            dataset_inputs=items,
        )

    @staticmethod
    def _refusal(index: int, given: resources_pb2.DatasetInput) -> status_pb2.Status | None:
        """Why item `index` cannot be added, or None: only an existing input's id is read
        (inputs are created by PostInputs)."""
        path = f"dataset_inputs[{index}]"
        if not given.input.id:
            return _item_failure(
                status.INPUT_INVALID_ARGUMENT,
                "Invalid request",
                f"{path}.input.id: is required (the id of an existing input of the app)",
            )
        extra = [d.name for d, _ in given.input.ListFields() if d.name != "id"]
        extra += [d.name for d, _ in given.ListFields() if d.name != "input"]
        if extra:
            where = ", ".join(
                f"{path}.{name}" if name == "created_at" else f"{path}.input.{name}"
                for name in extra
            )
            return _item_failure(
                status.INPUT_INVALID_ARGUMENT,
                "Invalid request",
                f"{where}: not read by PostDatasetInputs, which adds existing inputs by "
                "input.id only (create inputs with PostInputs and their dataset_ids)",
            )
        return None

    async def _merge(
        self,
        app_id: str,
        request: service_pb2.PostDatasetInputsRequest,
        context: Context | None,
    ) -> service_pb2.MultiDatasetInputResponse:
        added = present = 0
        for source in merge_sources(request.search):
            merged = await self.native.MergeDataset(
                dataset_service_pb2.MergeDatasetRequest(
                    app_id=app_id,
                    source_dataset_id=source,
                    destination_dataset_id=request.dataset_id,
                ),
                cast(Context, context),
            )
            added += merged.added_count
            present += merged.already_present_count
        answer = status.ok(REQUEST_ID.get())
        answer.details = (
            f"{added} inputs added, {present} already in dataset {request.dataset_id!r}"
        )
        # No dataset_inputs: a merge may move any number of inputs; ListDatasetInputs
        # shows them.
        return service_pb2.MultiDatasetInputResponse(status=answer)

    async def ListDatasetInputs(
        self, request: service_pb2.ListDatasetInputsRequest, context: Context | None
    ) -> service_pb2.MultiDatasetInputResponse:
        app_id = app_of(request)
        page = page_request(request.page, request.per_page)

        async def fetch(size: int, token: str) -> tuple[list[dataset_pb2.DatasetInput], str]:
            listed = await self.native.ListDatasetInputs(
                dataset_service_pb2.ListDatasetInputsRequest(
                    app_id=app_id,
                    dataset_id=request.dataset_id,
                    page_size=size,
                    page_token=token,
                ),
                cast(Context, context),
            )
            return list(listed.dataset_inputs), listed.next_page_token

        key = f"ListDatasetInputs|{current_principal().key_id}|{app_id}|{request.dataset_id}"
        items = await self.cursors.page(key, page, fetch)
        return service_pb2.MultiDatasetInputResponse(
            status=status.ok(REQUEST_ID.get()),
            dataset_inputs=[dataset_input_out(item) for item in items],
        )

    async def GetDatasetInput(
        self, request: service_pb2.GetDatasetInputRequest, context: Context | None
    ) -> service_pb2.SingleDatasetInputResponse:
        got = await self.native.GetDatasetInput(
            dataset_service_pb2.GetDatasetInputRequest(
                app_id=app_of(request), dataset_id=request.dataset_id, input_id=request.input_id
            ),
            cast(Context, context),
        )
        return service_pb2.SingleDatasetInputResponse(
            status=status.ok(REQUEST_ID.get()), dataset_input=dataset_input_out(got.dataset_input)
        )

    async def DeleteDatasetInputs(
        self, request: service_pb2.DeleteDatasetInputsRequest, context: Context | None
    ) -> status_pb2.BaseResponse:
        """Unlinks the inputs from the dataset; they stay in the app."""
        app_id = app_of(request)
        if not request.input_ids:
            raise InvalidArgument.field("input_ids", "must name at least one input")
        ids = list(dict.fromkeys(request.input_ids))
        removed = 0
        for start in range(0, len(ids), NATIVE_BATCH):
            response = await self.native.RemoveDatasetInputs(
                dataset_service_pb2.RemoveDatasetInputsRequest(
                    app_id=app_id,
                    dataset_id=request.dataset_id,
                    input_ids=ids[start : start + NATIVE_BATCH],
                ),
                cast(Context, context),
            )
            removed += response.removed_count
        answer = status.ok(REQUEST_ID.get())
        answer.details = f"{removed} inputs removed from dataset {request.dataset_id!r}"
        return status_pb2.BaseResponse(status=answer)
