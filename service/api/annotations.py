"""AnnotationService: decode, call the domain, encode."""

from __future__ import annotations

from dataclasses import dataclass

from datasetd.v1 import annotation_service_pb2 as api

from service.api.interceptors import current_principal
from service.api.outcomes import OUTCOMES, count_outcomes, field_errors
from service.api.pagination import PageTokens
from service.api.rpc import Context, mutation, patch_request
from service.domain.annotations import (
    PATCHABLE_FIELDS,
    AnnotationOutcome,
    AnnotationPatch,
    AnnotationService,
)
from service.domain.errors import Violations
from service.domain.idempotency import Idempotency
from service.domain.models import Principal
from service.domain.patch import UpdateMask
from service.wire.annotations import annotation_draft, annotation_to_proto, data_to_json
from service.wire.struct import struct_to_dict


def _result(outcome: AnnotationOutcome) -> api.AnnotationResult:
    result = api.AnnotationResult(
        index=outcome.index,
        annotation_id=outcome.annotation_id,
        outcome=OUTCOMES[outcome.outcome],
        errors=field_errors(outcome.violations),
    )
    if outcome.annotation is not None:
        result.annotation.CopyFrom(annotation_to_proto(outcome.annotation))
    return result


def _patches(
    request: api.UpdateAnnotationsRequest, violations: Violations
) -> list[AnnotationPatch]:
    """The fields each annotation patches: those named in update_mask, or else those set."""
    mask = UpdateMask(list(request.update_mask.paths), PATCHABLE_FIELDS, violations)
    return [
        AnnotationPatch(
            id=message.id,
            input_id=message.input_id,
            data=data_to_json(message.data)
            if mask.given("data", message.HasField("data"))
            else None,
            annotation_info=(
                struct_to_dict(message.annotation_info)
                if mask.given("annotation_info", message.HasField("annotation_info"))
                else None
            ),
        )
        for message in request.annotations
    ]


@dataclass(frozen=True)
class AnnotationRpcs:
    annotations: AnnotationService
    idempotency: Idempotency
    tokens: PageTokens

    @mutation()
    async def CreateAnnotations(
        self, request: api.CreateAnnotationsRequest, principal: Principal
    ) -> api.CreateAnnotationsResponse:
        outcomes = await self.annotations.create_batch(
            principal,
            request.app_id,
            [annotation_draft(a) for a in request.annotations],
            atomic=request.atomic,
        )
        response = api.CreateAnnotationsResponse(results=[_result(o) for o in outcomes])
        count_outcomes(response, outcomes)
        return response

    async def GetAnnotation(
        self, request: api.GetAnnotationRequest, context: Context
    ) -> api.GetAnnotationResponse:
        annotation = await self.annotations.get(
            current_principal(), request.app_id, request.annotation_id
        )
        return api.GetAnnotationResponse(annotation=annotation_to_proto(annotation))

    async def ListAnnotations(
        self, request: api.ListAnnotationsRequest, context: Context
    ) -> api.ListAnnotationsResponse:
        input_ids = list(request.input_ids)
        page = self.tokens.page(
            "ListAnnotations", request, input_ids=input_ids, dataset_id=request.dataset_id
        )
        annotations, last = await self.annotations.list_annotations(
            current_principal(),
            request.app_id,
            input_ids=input_ids or None,
            dataset_id=request.dataset_id or None,
            after_seq=page.after,
            limit=page.limit,
        )
        return api.ListAnnotationsResponse(
            annotations=[annotation_to_proto(a) for a in annotations],
            next_page_token=page.next_token(last),
        )

    @mutation()
    async def UpdateAnnotations(
        self, request: api.UpdateAnnotationsRequest, principal: Principal
    ) -> api.UpdateAnnotationsResponse:
        action, patches = patch_request(request.action, lambda v: _patches(request, v))
        updated, deleted = await self.annotations.update(
            principal, request.app_id, action, patches, delete_if_empty=request.delete_if_empty
        )
        return api.UpdateAnnotationsResponse(
            annotations=[annotation_to_proto(a) for a in updated], deleted_ids=deleted
        )

    @mutation()
    async def DeleteAnnotations(
        self, request: api.DeleteAnnotationsRequest, principal: Principal
    ) -> api.DeleteAnnotationsResponse:
        deleted = await self.annotations.delete(
            principal, request.app_id, ids=list(request.ids), input_ids=list(request.input_ids)
        )
        return api.DeleteAnnotationsResponse(deleted_count=deleted)
