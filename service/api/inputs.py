"""InputService: decode, call the domain, encode."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from datasetd.v1 import input_service_pb2

from service.api.idempotency import idempotency_key, run_once
from service.api.interceptors import current_principal
from service.api.links import DownloadLinks
from service.api.outcomes import OUTCOMES, count_outcomes, field_errors
from service.api.pagination import PageTokens
from service.api.rpc import Context, download, mutation, patch_request
from service.api.streams import chunks, header_message
from service.domain.errors import Violations
from service.domain.idempotency import Idempotency
from service.domain.input_drafts import InputOutcome, Outcome
from service.domain.inputs import PATCHABLE_FIELDS, InputService
from service.domain.models import Principal
from service.domain.patch import UpdateMask
from service.domain.transfers import InputTransfers, UploadHeader
from service.observability import metrics
from service.wire.inputs import input_draft, input_filter_query, input_to_proto
from service.wire.struct import struct_to_dict


def _result(outcome: InputOutcome) -> input_service_pb2.InputResult:
    result = input_service_pb2.InputResult(
        index=outcome.index,
        input_id=outcome.input_id,
        outcome=OUTCOMES[outcome.outcome],
        errors=field_errors(outcome.violations),
    )
    if outcome.view is not None:
        result.input.CopyFrom(input_to_proto(outcome.view))
    return result


def _count_ingest(outcomes: list[InputOutcome]) -> None:
    created = [o.view.input for o in outcomes if o.outcome is Outcome.CREATED and o.view]
    metrics.ingested(len(created), sum(i.blob.size for i in created if i.blob is not None))


def _patches(
    request: input_service_pb2.UpdateInputsRequest, violations: Violations
) -> list[tuple[str, dict[str, Any]]]:
    """Per input, the fields it patches: those named in update_mask, or else those set."""
    mask = UpdateMask(list(request.update_mask.paths), PATCHABLE_FIELDS, violations)
    patches = []
    for message in request.inputs:
        draft = input_draft(message)
        given: dict[str, Any] = {}
        if mask.given("metadata", message.data.HasField("metadata")):
            given["metadata"] = struct_to_dict(message.data.metadata)
        if mask.given("concepts", bool(draft.concepts)):
            given["concepts"] = draft.concepts
        if mask.given("geo", draft.geo is not None):
            # None (named in the mask but not given) clears the geo point.
            given["geo"] = draft.geo
        if mask.given("title", bool(message.title)):
            given["title"] = message.title
        if mask.given("embeddings", bool(draft.embeddings)):
            given["embeddings"] = draft.embeddings
        patches.append((message.id, given))
    return patches


@dataclass(frozen=True)
class InputRpcs:
    inputs: InputService
    idempotency: Idempotency
    tokens: PageTokens
    transfers: InputTransfers
    # GetInputDownloadUrl answers a link of the HTTP port with DATASETD_PUBLIC_URL set.
    links: DownloadLinks

    @mutation()
    async def CreateInputs(
        self, request: input_service_pb2.CreateInputsRequest, principal: Principal
    ) -> input_service_pb2.CreateInputsResponse:
        outcomes = await self.inputs.create_batch(
            principal,
            request.app_id,
            [input_draft(i) for i in request.inputs],
            atomic=request.atomic,
        )
        response = input_service_pb2.CreateInputsResponse(results=[_result(o) for o in outcomes])
        count_outcomes(response, outcomes)
        _count_ingest(outcomes)
        return response

    async def GetInput(
        self, request: input_service_pb2.GetInputRequest, context: Context
    ) -> input_service_pb2.GetInputResponse:
        view = await self.inputs.get(current_principal(), request.app_id, request.input_id)
        return input_service_pb2.GetInputResponse(input=input_to_proto(view))

    async def ListInputs(
        self, request: input_service_pb2.ListInputsRequest, context: Context
    ) -> input_service_pb2.ListInputsResponse:
        ids = list(request.ids)
        query = input_filter_query(
            request.app_id,
            request.filter if request.HasField("filter") else None,
            ids=ids or None,
            dataset_id=request.dataset_id or None,
        )
        serialized = request.filter.SerializeToString(deterministic=True)
        page = self.tokens.page(
            "ListInputs",
            request,
            ids=ids,
            dataset_id=request.dataset_id,
            filter=hashlib.sha256(serialized).hexdigest(),
        )
        views, last = await self.inputs.list_inputs(
            current_principal(), query, page.after, page.limit
        )
        return input_service_pb2.ListInputsResponse(
            inputs=[input_to_proto(v) for v in views],
            next_page_token=page.next_token(last),
        )

    @mutation()
    async def UpdateInputs(
        self, request: input_service_pb2.UpdateInputsRequest, principal: Principal
    ) -> input_service_pb2.UpdateInputsResponse:
        action, patches = patch_request(request.action, lambda v: _patches(request, v))
        views = await self.inputs.update(principal, request.app_id, action, patches)
        return input_service_pb2.UpdateInputsResponse(inputs=[input_to_proto(v) for v in views])

    @mutation()
    async def DeleteInputs(
        self, request: input_service_pb2.DeleteInputsRequest, principal: Principal
    ) -> input_service_pb2.DeleteInputsResponse:
        deleted, unknown = await self.inputs.delete(principal, request.app_id, list(request.ids))
        return input_service_pb2.DeleteInputsResponse(deleted_count=deleted, unknown_ids=unknown)

    async def GetInputDownloadUrl(
        self, request: input_service_pb2.GetInputDownloadUrlRequest, context: Context
    ) -> input_service_pb2.GetInputDownloadUrlResponse:
        found, blob = await self.inputs.stored_media(
            current_principal(), request.app_id, request.input_id
        )
        if self.links.public:
            url = self.links.media_url(found.app_id, found.id)
        else:
            url = await self.inputs.download_url(blob)
        response = input_service_pb2.GetInputDownloadUrlResponse(url=url)
        response.expire_time.FromDatetime(datetime.now(UTC) + self.inputs.download_url_ttl)
        return response

    async def UploadInput(
        self,
        request_iterator: AsyncIterator[input_service_pb2.UploadInputRequest],
        context: Context,
    ) -> input_service_pb2.UploadInputResponse:
        principal = current_principal()
        first = await header_message(
            request_iterator, rpc="UploadInput", follows="the chunks", reason="INVALID_UPLOAD"
        )
        message = first.header
        # Checked before the bytes flow; run_once would only see a bad id after them.
        idempotency_key("UploadInput", message)
        header = UploadHeader(
            app_id=message.app_id,
            draft=input_draft(message.input),
            content_length=message.content_length,
            sha256=message.sha256,
            request_id=message.request_id,
        )
        media = await self.transfers.receive(
            principal, header, chunks(request_iterator, reason="INVALID_UPLOAD")
        )
        # The request is the header and the bytes: a retry with the same header and bytes
        # replays, other bytes under the same request id are refused. The optional checks
        # are recorded as the values they must have had, so sending them or not is the same.
        fingerprint = input_service_pb2.UploadInputHeader()
        fingerprint.CopyFrom(message)
        fingerprint.sha256 = media.blob.sha256
        fingerprint.content_length = media.blob.size

        async def create() -> input_service_pb2.UploadInputResponse:
            view = await self.transfers.create(principal, header, media)
            metrics.ingested(1, media.blob.size)
            return input_service_pb2.UploadInputResponse(input=input_to_proto(view))

        return await run_once(
            self.idempotency,
            "UploadInput",
            fingerprint,
            input_service_pb2.UploadInputResponse,
            create,
        )

    async def DownloadInput(
        self, request: input_service_pb2.DownloadInputRequest, context: Context
    ) -> AsyncIterator[input_service_pb2.DownloadInputResponse]:
        blob, stream = await self.transfers.download(
            current_principal(), request.app_id, request.input_id
        )
        first = input_service_pb2.DownloadInputResponse(
            total_size=blob.size, content_type=blob.content_type, sha256=blob.sha256
        )
        async for message in download(
            first, stream, lambda chunk: input_service_pb2.DownloadInputResponse(chunk=chunk)
        ):
            yield message
