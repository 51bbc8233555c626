"""ImportDataset of DatasetService: decode, call the domain, encode."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from datasetd.v1 import dataset_service_pb2 as api

from service.api.idempotency import idempotency_key
from service.api.interceptors import current_principal
from service.api.rpc import Context
from service.api.streams import chunks, header_message
from service.domain.idempotency import Idempotency
from service.domain.imported import ImportFormat, ImportRequest
from service.domain.imports import ImportService
from service.observability import metrics

_FORMATS = {
    api.IMPORT_FORMAT_CLARIFAI_DATA_PROTOBUF: ImportFormat.CLARIFAI_DATA_PROTOBUF,
    api.IMPORT_FORMAT_COCO: ImportFormat.COCO,
}
METHOD = "ImportDataset"
_STREAM_PROBLEM = "INVALID_IMPORT_STREAM"


@dataclass(frozen=True)
class ImportRpcs:
    imports: ImportService
    idempotency: Idempotency

    async def ImportDataset(
        self, messages: AsyncIterator[api.ImportDatasetRequest], context: Context
    ) -> api.ImportDatasetResponse:
        principal = current_principal()
        first = await header_message(
            messages, rpc=METHOD, follows="the archive's chunks", reason=_STREAM_PROBLEM
        )
        header = first.header
        # Checked before the bytes flow.
        key = idempotency_key(METHOD, header)
        request = ImportRequest(header.app_id, header.dataset_id, _FORMATS.get(header.format))
        received = self.imports.receive(
            principal, request, chunks(messages, reason=_STREAM_PROBLEM)
        )
        async with received as archive:
            # The request is the header and the archive: a retry with both the same
            # replays, another archive under the same request id is refused.
            if key is not None:
                digest = hashlib.sha256(key.fingerprint + bytes.fromhex(archive.sha256))
                key = dataclasses.replace(key, fingerprint=digest.digest())
            # Outside the request id's transaction: check() stores media, which must be
            # committed before anything refers to them (see service.domain.imports).
            checked = await self.imports.check(principal, request, archive)

            async def write() -> bytes:
                result = await self.imports.write(principal, request, checked)
                # Not on a replay: write() runs once per request id.
                metrics.ingested(result.inputs_created, archive.size)
                return api.ImportDatasetResponse(
                    inputs_created=result.inputs_created,
                    annotations_created=result.annotations_created,
                ).SerializeToString()

            return api.ImportDatasetResponse.FromString(await self.idempotency.run(key, write))
