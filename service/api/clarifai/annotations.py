"""V2 annotation RPCs on AnnotationService's native part: PostAnnotations, ListAnnotations,
GetAnnotation, PatchAnnotations, DeleteAnnotation, DeleteAnnotations.

Every stored annotation is a person's (datasetd runs no models), so each is listed with
or without `list_all_annotations`, and each has the status ANNOTATION_SUCCESS. Mask images
are returned as stored (bytes): datasetd has no URL for them. A frame's `time` is
returned as given (a 64-bit integer, as on the real API)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import cast

from clarifai_grpc.grpc.api import resources_pb2, service_pb2
from clarifai_grpc.grpc.api.status import status_code_pb2, status_pb2
from datasetd.v1 import annotation_pb2, errors_pb2
from datasetd.v1 import annotation_service_pb2 as api

from service.api.annotations import AnnotationRpcs
from service.api.clarifai import status
from service.api.clarifai.convert import clarifai, native
from service.api.clarifai.datasets import patch_action
from service.api.clarifai.inputs import item_status, name_concepts, refusal
from service.api.clarifai.paging import PageCursors, page_request
from service.api.clarifai.parts import NativeParts
from service.api.clarifai.scope import app_of
from service.api.interceptors import Context, current_principal
from service.domain.errors import InvalidArgument, NotFound, Violations
from service.observability import REQUEST_ID

# The author of an annotation is output-only on the real API (the caller).
_IGNORED_ANNOTATION_FIELDS = frozenset({"user_id"})
# Output-only fields a caller may echo from a listing: cleared, never sent on.
_OUTPUT_ONLY = ("status", "created_at", "modified_at", "input_level")
_ANNOTATION_SUCCESS = status_code_pb2.ANNOTATION_SUCCESS
_MAX_IDS = 1000
# Filters of ListAnnotations about who or what made an annotation: datasetd records
# neither users nor models per annotation.
_UNSUPPORTED_LIST_FILTERS = (
    "user_ids",
    "model_version_ids",
    "workflow_version_ids",
    "task_id",
    "return_model_output",
)


def annotation_out(annotation: annotation_pb2.Annotation) -> resources_pb2.Annotation:
    converted = clarifai(annotation, resources_pb2.Annotation)
    name_concepts(converted.data)
    return converted


def _decode(
    given: resources_pb2.Annotation, index: int, violations: Violations
) -> annotation_pb2.Annotation:
    copy = resources_pb2.Annotation()
    copy.CopyFrom(given)
    for name in _OUTPUT_ONLY:
        copy.ClearField(name)
    name_concepts(copy.data)
    return native(
        copy,
        annotation_pb2.Annotation,
        f"annotations[{index}]",
        violations,
        _IGNORED_ANNOTATION_FIELDS,
    )


@dataclass
class ClarifaiAnnotations:
    parts: NativeParts
    cursors: PageCursors[annotation_pb2.Annotation] = field(default_factory=PageCursors)

    @property
    def native(self) -> AnnotationRpcs:
        return self.parts.annotations

    async def PostAnnotations(
        self, request: service_pb2.PostAnnotationsRequest, context: Context | None
    ) -> service_pb2.MultiAnnotationResponse:
        """Not atomic: each annotation is stored or refused on its own (per-annotation
        status; SUCCESS, MIXED_STATUS or FAILURE on top)."""
        app_id = app_of(request)
        if not request.annotations:
            raise InvalidArgument.field(
                "annotations", "must hold at least one annotation (at most 128)"
            )
        answers: list[resources_pb2.Annotation | None] = []
        sent: list[annotation_pb2.Annotation] = []
        for index, given in enumerate(request.annotations):
            violations = Violations()
            converted = _decode(given, index, violations)
            if violations.items:
                refused = resources_pb2.Annotation(id=given.id, input_id=given.input_id)
                problems = ((v.field, v.description) for v in violations.items)
                refused.status.CopyFrom(
                    item_status(refusal(problems), status.ANNOTATION_INVALID_ARGUMENT)
                )
                answers.append(refused)
            else:
                answers.append(None)
                sent.append(converted)
        results: list[api.AnnotationResult] = []
        if sent:
            created = await self.native.CreateAnnotations(
                api.CreateAnnotationsRequest(app_id=app_id, annotations=sent),
                cast(Context, context),
            )
            results = list(created.results)
        outcomes = iter(results)
        annotations = [
            answer if answer is not None else self._post_result(next(outcomes), index, sent)
            for index, answer in enumerate(answers)
        ]
        return service_pb2.MultiAnnotationResponse(
            status=status.summary((a.status.code for a in annotations), REQUEST_ID.get()),
            annotations=annotations,
        )

    @staticmethod
    def _post_result(
        result: api.AnnotationResult, index: int, sent: list[annotation_pb2.Annotation]
    ) -> resources_pb2.Annotation:
        if result.outcome == errors_pb2.ITEM_OUTCOME_CREATED:
            return annotation_out(result.annotation)
        answer = resources_pb2.Annotation(
            id=result.annotation_id, input_id=sent[result.index].input_id
        )
        if result.outcome == errors_pb2.ITEM_OUTCOME_DUPLICATE_ID:
            problems = [(f"annotations[{index}].id", "an annotation with this id exists")]
        else:
            # Native paths count among the annotations sent on: renumber as requested.
            native_prefix = f"annotations[{result.index}]"
            problems = [
                (e.field.replace(native_prefix, f"annotations[{index}]", 1), e.description)
                for e in result.errors
            ] or [(f"annotations[{index}]", "was not stored")]
        answer.status.CopyFrom(item_status(refusal(problems), status.ANNOTATION_INVALID_ARGUMENT))
        return answer

    async def GetAnnotation(
        self, request: service_pb2.GetAnnotationRequest, context: Context | None
    ) -> service_pb2.SingleAnnotationResponse:
        app_id = app_of(request)
        found = await self._get(app_id, request.annotation_id, request.input_id, context)
        if found is None:
            raise NotFound.in_app("annotation", app_id, request.annotation_id)
        return service_pb2.SingleAnnotationResponse(
            status=status.ok(REQUEST_ID.get()), annotation=annotation_out(found)
        )

    async def _get(
        self, app_id: str, annotation_id: str, input_id: str, context: Context | None
    ) -> annotation_pb2.Annotation | None:
        """The annotation, None when it does not exist or is not on `input_id` (if set)."""
        if not annotation_id:
            raise InvalidArgument.field("annotation_id", "must name the annotation")
        try:
            response = await self.native.GetAnnotation(
                api.GetAnnotationRequest(app_id=app_id, annotation_id=annotation_id),
                cast(Context, context),
            )
        except NotFound:
            return None
        if input_id and response.annotation.input_id != input_id:
            return None
        return response.annotation

    async def ListAnnotations(
        self, request: service_pb2.ListAnnotationsRequest, context: Context | None
    ) -> service_pb2.MultiAnnotationResponse:
        app_id = app_of(request)
        page = page_request(request.page, request.per_page)
        violations = Violations()
        for name in _UNSUPPORTED_LIST_FILTERS:
            if getattr(request, name):
                violations.add(
                    name, "is not supported: datasetd records no users or models per annotation"
                )
        ids, input_ids = list(request.ids), list(request.input_ids)
        if ids and input_ids and len(ids) != len(input_ids):
            violations.add(
                "input_ids",
                f"must be parallel to ids (one input per annotation id): got {len(input_ids)} "
                f"input ids for {len(ids)} ids",
            )
        if len(ids) > _MAX_IDS:
            violations.add("ids", f"at most {_MAX_IDS} ids, got {len(ids)}")
        violations.raise_if_any()
        codes = {s.code for s in request.statuses}
        if codes and not codes & {_ANNOTATION_SUCCESS, status.SUCCESS}:
            # Every stored annotation is ANNOTATION_SUCCESS.
            return service_pb2.MultiAnnotationResponse(status=status.ok(REQUEST_ID.get()))
        if ids:
            pairs = zip(ids, input_ids or [""] * len(ids), strict=True)
            found = [await self._get(app_id, a, i, context) for a, i in pairs]
            present = [a for a in found if a is not None]
            start = (page.page - 1) * page.per_page
            items = present[start : start + page.per_page]
        else:

            async def fetch(size: int, token: str) -> tuple[list[annotation_pb2.Annotation], str]:
                listed = await self.native.ListAnnotations(
                    api.ListAnnotationsRequest(
                        app_id=app_id, input_ids=input_ids, page_size=size, page_token=token
                    ),
                    cast(Context, context),
                )
                return list(listed.annotations), listed.next_page_token

            digest = hashlib.sha256("\n".join(input_ids).encode()).hexdigest()
            key = f"ListAnnotations|{current_principal().key_id}|{app_id}|{digest}"
            items = await self.cursors.page(key, page, fetch)
        return service_pb2.MultiAnnotationResponse(
            status=status.ok(REQUEST_ID.get()), annotations=[annotation_out(a) for a in items]
        )

    async def PatchAnnotations(
        self, request: service_pb2.PatchAnnotationsRequest, context: Context | None
    ) -> service_pb2.MultiAnnotationResponse:
        """All or nothing. With `delete_if_empty_data`, a `remove` that leaves an
        annotation empty deletes it (it is then absent from the answer)."""
        app_id = app_of(request)
        action = patch_action(request.action)
        violations = Violations()
        annotations = [_decode(a, i, violations) for i, a in enumerate(request.annotations)]
        for index, annotation in enumerate(annotations):
            if not annotation.id:
                violations.add(f"annotations[{index}].id", "is required to patch an annotation")
        if not annotations:
            violations.add("annotations", "must hold at least one annotation")
        violations.raise_if_any()
        response = await self.native.UpdateAnnotations(
            api.UpdateAnnotationsRequest(
                app_id=app_id,
                annotations=annotations,
                action=action,
                delete_if_empty=request.delete_if_empty_data,
            ),
            cast(Context, context),
        )
        return service_pb2.MultiAnnotationResponse(
            status=status.ok(REQUEST_ID.get()),
            annotations=[annotation_out(a) for a in response.annotations],
        )

    async def DeleteAnnotation(
        self, request: service_pb2.DeleteAnnotationRequest, context: Context | None
    ) -> status_pb2.BaseResponse:
        app_id = app_of(request)
        if await self._get(app_id, request.annotation_id, request.input_id, context) is None:
            raise NotFound.in_app("annotation", app_id, request.annotation_id)
        await self.native.DeleteAnnotations(
            api.DeleteAnnotationsRequest(app_id=app_id, ids=[request.annotation_id]),
            cast(Context, context),
        )
        return status_pb2.BaseResponse(status=status.ok(REQUEST_ID.get()))

    async def DeleteAnnotations(
        self, request: service_pb2.DeleteAnnotationsRequest, context: Context | None
    ) -> status_pb2.BaseResponse:
        """`ids` with parallel `input_ids` delete those annotations (each must be on its
        input); `input_ids` alone delete every annotation of those inputs."""
        app_id = app_of(request)
        ids, input_ids = list(request.ids), list(request.input_ids)
        if not input_ids:
            raise InvalidArgument.field("input_ids", "must name at least one input")
        if not ids:
            await self.native.DeleteAnnotations(
                api.DeleteAnnotationsRequest(app_id=app_id, input_ids=input_ids),
                cast(Context, context),
            )
            return status_pb2.BaseResponse(status=status.ok(REQUEST_ID.get()))
        if len(ids) != len(input_ids):
            raise InvalidArgument.field(
                "input_ids",
                f"must be parallel to ids (the input of each annotation): got "
                f"{len(input_ids)} input ids for {len(ids)} ids",
            )
        if len(ids) > _MAX_IDS:
            raise InvalidArgument.field("ids", f"at most {_MAX_IDS} ids, got {len(ids)}")
        # Checked before anything is deleted, so a wrong pair deletes nothing.
        for annotation_id, input_id in zip(ids, input_ids, strict=True):
            if await self._get(app_id, annotation_id, input_id, context) is None:
                raise NotFound(
                    f"annotation {annotation_id!r} not found on input {input_id!r} "
                    f"in app {app_id!r}",
                    reason="ANNOTATION_NOT_FOUND",
                )
        await self.native.DeleteAnnotations(
            api.DeleteAnnotationsRequest(app_id=app_id, ids=ids), cast(Context, context)
        )
        return status_pb2.BaseResponse(status=status.ok(REQUEST_ID.get()))
