"""The export RPCs of DatasetVersionService: decode, call the domain, encode.
DatasetVersionServicer delegates to ExportRpcs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from datasetd.v1 import dataset_version_pb2, status_pb2
from datasetd.v1 import dataset_version_service_pb2 as api

from service.api.idempotency import run_once
from service.api.interceptors import current_principal
from service.api.pagination import PageTokens, page_size
from service.domain.auth import Permission, authorize
from service.domain.exports import ExportService
from service.domain.idempotency import Idempotency
from service.domain.models import (
    ExportFormat,
    ExportOptions,
    ExportStatus,
    ExportView,
    Principal,
    SplitOptions,
)

FORMATS = {
    ExportFormat.CLARIFAI_DATA_PROTOBUF: dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF,
    ExportFormat.CLARIFAI_DATA_JSON: dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_JSON,
    ExportFormat.COCO: dataset_version_pb2.EXPORT_FORMAT_COCO,
}
_FORMATS_BY_NUMBER = {number: export_format for export_format, number in FORMATS.items()}
# The field of each format in DatasetVersion.export_info.
EXPORT_INFO_FIELDS = {
    ExportFormat.CLARIFAI_DATA_PROTOBUF: "clarifai_data_protobuf",
    ExportFormat.CLARIFAI_DATA_JSON: "clarifai_data_json",
    ExportFormat.COCO: "coco",
}
_STATUS = {
    ExportStatus.PENDING: (
        status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_PENDING,
        "Export is queued",
    ),
    ExportStatus.IN_PROGRESS: (
        status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_IN_PROGRESS,
        "Export is being written",
    ),
    ExportStatus.SUCCEEDED: (
        status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_SUCCESS,
        "Export is ready to download",
    ),
    ExportStatus.FAILED: (status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_FAILED, "Export failed"),
}


def _options(message: api.ExportOptions) -> ExportOptions:
    split = None
    if message.HasField("split"):
        split = SplitOptions(dict(message.split.ratios), message.split.seed)
    return ExportOptions(split=split, embed_media=message.embed_media)


def _status(view: ExportView) -> status_pb2.Status:
    export = view.export
    code, description = _STATUS[export.status]
    return status_pb2.Status(
        code=code,
        description=description,
        details=export.details,
        percent_completed=export.percent,
    )


def export_to_proto(view: ExportView) -> api.Export:
    export = view.export
    message = api.Export(
        id=export.id,
        dataset_id=export.dataset_id,
        version_id=export.version_id,
        format=FORMATS[export.format],
        status=_status(view),
        size=export.blob.size if export.blob is not None else 0,
        url=view.url,
        split_counts=export.split_counts,
        fidelity=api.FidelityReport(dropped=export.fidelity.dropped, notes=export.fidelity.notes),
    )
    message.options.embed_media = export.options.embed_media
    if export.options.split is not None:
        message.options.split.ratios.update(export.options.split.ratios)
        message.options.split.seed = export.options.split.seed
    if view.url_expires_at is not None:
        message.url_expire_time.FromDatetime(view.url_expires_at)
    if export.created_at is not None:
        message.created_at.FromDatetime(export.created_at)
    if export.modified_at is not None:
        message.modified_at.FromDatetime(export.modified_at)
    return message


class ExportRpcs:
    def __init__(
        self,
        exports: ExportService,
        idempotency: Idempotency,
        tokens: PageTokens,
        *,
        jobs_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self._exports = exports
        self._idempotency = idempotency
        self._tokens = tokens
        # Wakes the job runner, which otherwise finds a new export at its next poll.
        self._jobs_queued = jobs_queued

    async def export(
        self, request: api.ExportDatasetVersionRequest
    ) -> api.ExportDatasetVersionResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def create() -> api.ExportDatasetVersionResponse:
            view = await self._exports.create(
                principal,
                request.app_id,
                request.dataset_id,
                request.version_id,
                _FORMATS_BY_NUMBER.get(request.format),
                _options(request.options),
            )
            return api.ExportDatasetVersionResponse(export=export_to_proto(view))

        response = await run_once(
            self._idempotency,
            "ExportDatasetVersion",
            request,
            api.ExportDatasetVersionResponse,
            create,
        )
        # Only now: run_once commits the enqueueing transaction on its way out.
        self._jobs_queued()
        return response

    async def get(self, request: api.GetExportRequest) -> api.GetExportResponse:
        view = await self._exports.get(
            current_principal(),
            request.app_id,
            request.dataset_id,
            request.version_id,
            request.export_id,
        )
        return api.GetExportResponse(export=export_to_proto(view))

    async def list(self, request: api.ListExportsRequest) -> api.ListExportsResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.READ)
        limit = page_size(request.page_size)
        scope = {
            "method": "ListExports",
            "app_id": request.app_id,
            "dataset_id": request.dataset_id,
            "version_id": request.version_id,
        }
        after = self._tokens.decode_seq(request.page_token, scope)
        views, last = await self._exports.page(
            principal, request.app_id, request.dataset_id, request.version_id, after, limit
        )
        response = api.ListExportsResponse(exports=[export_to_proto(view) for view in views])
        if last is not None:
            response.next_page_token = self._tokens.encode(scope, [last])
        return response

    async def download(
        self, request: api.DownloadExportRequest
    ) -> AsyncIterator[api.DownloadExportResponse]:
        blob, stream = await self._exports.download(
            current_principal(),
            request.app_id,
            request.dataset_id,
            request.version_id,
            request.export_id,
        )
        first: api.DownloadExportResponse | None = api.DownloadExportResponse(
            total_size=blob.size, sha256=blob.sha256
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
                    yield api.DownloadExportResponse(chunk=chunk)
        if first is not None:
            yield first

    async def export_info(
        self, principal: Principal, app_id: str, dataset_id: str, version_id: str
    ) -> dataset_version_pb2.DatasetVersionExportInfo:
        """The most recently requested export of each format, for GetDatasetVersion."""
        info = dataset_version_pb2.DatasetVersionExportInfo()
        for view in await self._exports.latest_by_format(principal, app_id, dataset_id, version_id):
            export = view.export
            getattr(info, EXPORT_INFO_FIELDS[export.format]).CopyFrom(
                dataset_version_pb2.DatasetVersionExport(
                    format=FORMATS[export.format],
                    status=_status(view),
                    url=view.url,
                    size=export.blob.size if export.blob is not None else 0,
                )
            )
        return info
