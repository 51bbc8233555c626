"""InputService: decode, call the domain, encode."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
from datasetd.v1 import errors_pb2, input_service_pb2, input_service_pb2_grpc

from service.api.convert import input_draft, input_filter_query, input_to_proto, struct_to_dict
from service.api.datasets import patch_action
from service.api.idempotency import idempotency_key, run_once
from service.api.interceptors import current_principal
from service.api.pagination import PageTokens, page_size
from service.api.streams import chunks, header_message
from service.domain.auth import Permission, authorize
from service.domain.errors import Violations
from service.domain.idempotency import Idempotency
from service.domain.inputs import InputOutcome, InputService, Outcome
from service.domain.models import GeoPoint
from service.domain.transfers import InputTransfers, UploadHeader

Context = grpc.aio.ServicerContext[Any, Any]

OUTCOMES = {
    Outcome.CREATED: errors_pb2.ITEM_OUTCOME_CREATED,
    Outcome.DUPLICATE_ID: errors_pb2.ITEM_OUTCOME_DUPLICATE_ID,
    Outcome.INVALID: errors_pb2.ITEM_OUTCOME_INVALID,
    Outcome.NOT_ATTEMPTED: errors_pb2.ITEM_OUTCOME_NOT_ATTEMPTED,
}
PATCHABLE = ("metadata", "concepts", "geo", "title")


def _result(outcome: InputOutcome) -> input_service_pb2.InputResult:
    result = input_service_pb2.InputResult(
        index=outcome.index,
        input_id=outcome.input_id,
        outcome=OUTCOMES[outcome.outcome],
        errors=[
            errors_pb2.FieldError(field=v.field, description=v.description)
            for v in outcome.violations
        ],
    )
    if outcome.view is not None:
        result.input.CopyFrom(input_to_proto(outcome.view))
    return result


class InputServicer(input_service_pb2_grpc.InputServiceServicer):
    def __init__(
        self,
        inputs: InputService,
        idempotency: Idempotency,
        tokens: PageTokens,
        transfers: InputTransfers,
    ) -> None:
        self._inputs = inputs
        self._idempotency = idempotency
        self._tokens = tokens
        self._transfers = transfers

    async def CreateInputs(
        self, request: input_service_pb2.CreateInputsRequest, context: Context
    ) -> input_service_pb2.CreateInputsResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def create() -> input_service_pb2.CreateInputsResponse:
            outcomes = await self._inputs.create_batch(
                principal,
                request.app_id,
                [input_draft(i) for i in request.inputs],
                atomic=request.atomic,
            )
            created = sum(o.outcome is Outcome.CREATED for o in outcomes)
            return input_service_pb2.CreateInputsResponse(
                results=[_result(o) for o in outcomes],
                created_count=created,
                failed_count=len(outcomes) - created,
            )

        return await run_once(
            self._idempotency,
            "CreateInputs",
            request,
            input_service_pb2.CreateInputsResponse,
            create,
        )

    async def GetInput(
        self, request: input_service_pb2.GetInputRequest, context: Context
    ) -> input_service_pb2.GetInputResponse:
        view = await self._inputs.get(current_principal(), request.app_id, request.input_id)
        return input_service_pb2.GetInputResponse(input=input_to_proto(view))

    async def ListInputs(
        self, request: input_service_pb2.ListInputsRequest, context: Context
    ) -> input_service_pb2.ListInputsResponse:
        limit = page_size(request.page_size)
        query = input_filter_query(
            request.app_id,
            request.filter if request.HasField("filter") else None,
            ids=list(request.ids) or None,
            dataset_id=request.dataset_id or None,
        )
        scope = {
            "method": "ListInputs",
            "app_id": request.app_id,
            "ids": list(request.ids),
            "dataset_id": request.dataset_id,
            "filter": hashlib.sha256(
                request.filter.SerializeToString(deterministic=True)
            ).hexdigest(),
        }
        views, last = await self._inputs.list_inputs(
            current_principal(), query, self._tokens.decode_seq(request.page_token, scope), limit
        )
        response = input_service_pb2.ListInputsResponse(inputs=[input_to_proto(v) for v in views])
        if last is not None:
            response.next_page_token = self._tokens.encode(scope, [last])
        return response

    async def UpdateInputs(
        self, request: input_service_pb2.UpdateInputsRequest, context: Context
    ) -> input_service_pb2.UpdateInputsResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def update() -> input_service_pb2.UpdateInputsResponse:
            violations = Violations()
            action = patch_action(violations, request.action)
            paths = list(request.update_mask.paths)
            for index, path in enumerate(paths):
                if path not in PATCHABLE:
                    violations.add(
                        f"update_mask.paths[{index}]",
                        f"{path!r} is not patchable; allowed: {', '.join(PATCHABLE)}",
                    )
            violations.raise_if_any()
            assert action is not None
            patches = []
            for message in request.inputs:
                draft = input_draft(message)
                data = message.data
                given: dict[str, Any] = {}
                if "metadata" in paths or (not paths and data.HasField("metadata")):
                    given["metadata"] = struct_to_dict(data.metadata)
                if "concepts" in paths or (not paths and draft.concepts):
                    given["concepts"] = draft.concepts
                if "geo" in paths or (not paths and draft.geo is not None):
                    given["geo"] = draft.geo if draft.geo is not None else GeoPoint(0.0, 0.0)
                    if "geo" in paths and draft.geo is None:
                        given["geo"] = None
                if "title" in paths or (not paths and message.title):
                    given["title"] = message.title
                patches.append((message.id, given))
            views = await self._inputs.update(principal, request.app_id, action, patches)
            return input_service_pb2.UpdateInputsResponse(inputs=[input_to_proto(v) for v in views])

        return await run_once(
            self._idempotency,
            "UpdateInputs",
            request,
            input_service_pb2.UpdateInputsResponse,
            update,
        )

    async def DeleteInputs(
        self, request: input_service_pb2.DeleteInputsRequest, context: Context
    ) -> input_service_pb2.DeleteInputsResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def delete() -> input_service_pb2.DeleteInputsResponse:
            deleted, unknown = await self._inputs.delete(
                principal, request.app_id, list(request.ids)
            )
            return input_service_pb2.DeleteInputsResponse(
                deleted_count=deleted, unknown_ids=unknown
            )

        return await run_once(
            self._idempotency,
            "DeleteInputs",
            request,
            input_service_pb2.DeleteInputsResponse,
            delete,
        )

    async def GetInputDownloadUrl(
        self, request: input_service_pb2.GetInputDownloadUrlRequest, context: Context
    ) -> input_service_pb2.GetInputDownloadUrlResponse:
        _, blob = await self._inputs.stored_media(
            current_principal(), request.app_id, request.input_id
        )
        response = input_service_pb2.GetInputDownloadUrlResponse(
            url=await self._inputs.download_url(blob)
        )
        response.expire_time.FromDatetime(datetime.now(UTC) + self._inputs.download_url_ttl)
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
        media = await self._transfers.receive(
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
            view = await self._transfers.create(principal, header, media)
            return input_service_pb2.UploadInputResponse(input=input_to_proto(view))

        return await run_once(
            self._idempotency,
            "UploadInput",
            fingerprint,
            input_service_pb2.UploadInputResponse,
            create,
        )

    async def DownloadInput(
        self, request: input_service_pb2.DownloadInputRequest, context: Context
    ) -> AsyncIterator[input_service_pb2.DownloadInputResponse]:
        blob, stream = await self._transfers.download(
            current_principal(), request.app_id, request.input_id
        )
        first: input_service_pb2.DownloadInputResponse | None = (
            input_service_pb2.DownloadInputResponse(
                total_size=blob.size, content_type=blob.content_type, sha256=blob.sha256
            )
        )
        # Closed explicitly so the object store connection is released as soon as the
        # client goes away, not when the generator is garbage-collected.
        async with contextlib.aclosing(stream) as chunks:
            async for chunk in chunks:
                if first is not None:
                    first.chunk = chunk
                    yield first
                    first = None
                else:
                    yield input_service_pb2.DownloadInputResponse(chunk=chunk)
        if first is not None:
            yield first
