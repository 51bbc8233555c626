"""AnnotationService: decode, call the domain, encode."""

from __future__ import annotations

from typing import Literal

from datasetd.v1 import annotation_pb2, annotation_service_pb2_grpc, errors_pb2
from datasetd.v1 import annotation_service_pb2 as api

from service.api.convert import (
    annotation_draft,
    annotation_to_proto,
    data_to_json,
    struct_to_dict,
)
from service.api.datasets import Context, patch_action
from service.api.idempotency import run_once
from service.api.inputs import OUTCOMES
from service.api.interceptors import current_principal
from service.api.pagination import PageTokens, page_size
from service.domain.annotations import AnnotationOutcome, AnnotationPatch, AnnotationService
from service.domain.auth import Permission, authorize
from service.domain.errors import Violations
from service.domain.idempotency import Idempotency
from service.domain.inputs import Outcome

PATCHABLE = ("data", "annotation_info")


def _result(outcome: AnnotationOutcome) -> api.AnnotationResult:
    result = api.AnnotationResult(
        index=outcome.index,
        annotation_id=outcome.annotation_id,
        outcome=OUTCOMES[outcome.outcome],
        errors=[
            errors_pb2.FieldError(field=v.field, description=v.description)
            for v in outcome.violations
        ],
    )
    if outcome.annotation is not None:
        result.annotation.CopyFrom(annotation_to_proto(outcome.annotation))
    return result


def _patches(
    request: api.UpdateAnnotationsRequest, violations: Violations
) -> list[AnnotationPatch]:
    """The fields each annotation patches: those named in update_mask, or else those set."""
    paths = list(request.update_mask.paths)
    for index, path in enumerate(paths):
        if path not in PATCHABLE:
            violations.add(
                f"update_mask.paths[{index}]",
                f"{path!r} is not patchable; allowed: {', '.join(PATCHABLE)}",
            )

    def given(message: annotation_pb2.Annotation, name: Literal["data", "annotation_info"]) -> bool:
        return name in paths if paths else message.HasField(name)

    return [
        AnnotationPatch(
            id=message.id,
            data=data_to_json(message.data) if given(message, "data") else None,
            annotation_info=(
                struct_to_dict(message.annotation_info)
                if given(message, "annotation_info")
                else None
            ),
        )
        for message in request.annotations
    ]


class AnnotationServicer(annotation_service_pb2_grpc.AnnotationServiceServicer):
    def __init__(
        self, annotations: AnnotationService, idempotency: Idempotency, tokens: PageTokens
    ) -> None:
        self._annotations = annotations
        self._idempotency = idempotency
        self._tokens = tokens

    async def CreateAnnotations(
        self, request: api.CreateAnnotationsRequest, context: Context
    ) -> api.CreateAnnotationsResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def create() -> api.CreateAnnotationsResponse:
            outcomes = await self._annotations.create_batch(
                principal,
                request.app_id,
                [annotation_draft(a) for a in request.annotations],
                atomic=request.atomic,
            )
            created = sum(o.outcome is Outcome.CREATED for o in outcomes)
            return api.CreateAnnotationsResponse(
                results=[_result(o) for o in outcomes],
                created_count=created,
                failed_count=len(outcomes) - created,
            )

        return await run_once(
            self._idempotency, "CreateAnnotations", request, api.CreateAnnotationsResponse, create
        )

    async def GetAnnotation(
        self, request: api.GetAnnotationRequest, context: Context
    ) -> api.GetAnnotationResponse:
        annotation = await self._annotations.get(
            current_principal(), request.app_id, request.annotation_id
        )
        return api.GetAnnotationResponse(annotation=annotation_to_proto(annotation))

    async def ListAnnotations(
        self, request: api.ListAnnotationsRequest, context: Context
    ) -> api.ListAnnotationsResponse:
        limit = page_size(request.page_size)
        scope = {
            "method": "ListAnnotations",
            "app_id": request.app_id,
            "input_ids": list(request.input_ids),
            "dataset_id": request.dataset_id,
        }
        annotations, last = await self._annotations.list_annotations(
            current_principal(),
            request.app_id,
            input_ids=list(request.input_ids) or None,
            dataset_id=request.dataset_id or None,
            after_seq=self._tokens.decode_seq(request.page_token, scope),
            limit=limit,
        )
        response = api.ListAnnotationsResponse(
            annotations=[annotation_to_proto(a) for a in annotations]
        )
        if last is not None:
            response.next_page_token = self._tokens.encode(scope, [last])
        return response

    async def UpdateAnnotations(
        self, request: api.UpdateAnnotationsRequest, context: Context
    ) -> api.UpdateAnnotationsResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def update() -> api.UpdateAnnotationsResponse:
            violations = Violations()
            action = patch_action(violations, request.action)
            patches = _patches(request, violations)
            violations.raise_if_any()
            assert action is not None
            updated, deleted = await self._annotations.update(
                principal, request.app_id, action, patches, delete_if_empty=request.delete_if_empty
            )
            return api.UpdateAnnotationsResponse(
                annotations=[annotation_to_proto(a) for a in updated], deleted_ids=deleted
            )

        return await run_once(
            self._idempotency, "UpdateAnnotations", request, api.UpdateAnnotationsResponse, update
        )

    async def DeleteAnnotations(
        self, request: api.DeleteAnnotationsRequest, context: Context
    ) -> api.DeleteAnnotationsResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def delete() -> api.DeleteAnnotationsResponse:
            deleted = await self._annotations.delete(
                principal, request.app_id, ids=list(request.ids), input_ids=list(request.input_ids)
            )
            return api.DeleteAnnotationsResponse(deleted_count=deleted)

        return await run_once(
            self._idempotency, "DeleteAnnotations", request, api.DeleteAnnotationsResponse, delete
        )
