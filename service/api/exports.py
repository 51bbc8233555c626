"""The export RPCs of DatasetVersionService: decode, call the domain, encode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from datasetd.v1 import dataset_version_service_pb2 as api

from service.api.export_messages import FORMATS_BY_NUMBER, export_options, export_to_proto
from service.api.interceptors import current_principal
from service.api.links import DownloadLinks
from service.api.pagination import PageTokens
from service.api.rpc import Context, download, mutation
from service.domain.exports import ExportService
from service.domain.idempotency import Idempotency
from service.domain.models import Principal


@dataclass(frozen=True)
class ExportRpcs:
    exports: ExportService
    idempotency: Idempotency
    tokens: PageTokens
    # Export URLs are links of the HTTP port with DATASETD_PUBLIC_URL set.
    links: DownloadLinks

    @mutation()
    async def ExportDatasetVersion(
        self, request: api.ExportDatasetVersionRequest, principal: Principal
    ) -> api.ExportDatasetVersionResponse:
        view = await self.exports.create(
            principal,
            request.app_id,
            request.dataset_id,
            request.version_id,
            FORMATS_BY_NUMBER.get(request.format),
            export_options(request.options),
        )
        return api.ExportDatasetVersionResponse(
            export=export_to_proto(self.links.export_view(view))
        )

    async def GetExport(
        self, request: api.GetExportRequest, context: Context
    ) -> api.GetExportResponse:
        view = await self.exports.get(
            current_principal(),
            request.app_id,
            request.dataset_id,
            request.version_id,
            request.export_id,
        )
        return api.GetExportResponse(export=export_to_proto(self.links.export_view(view)))

    async def ListExports(
        self, request: api.ListExportsRequest, context: Context
    ) -> api.ListExportsResponse:
        principal = current_principal()
        page = self.tokens.page(
            "ListExports", request, dataset_id=request.dataset_id, version_id=request.version_id
        )
        views, last = await self.exports.page(
            principal,
            request.app_id,
            request.dataset_id,
            request.version_id,
            page.after,
            page.limit,
        )
        return api.ListExportsResponse(
            exports=[export_to_proto(self.links.export_view(view)) for view in views],
            next_page_token=page.next_token(last),
        )

    async def DownloadExport(
        self, request: api.DownloadExportRequest, context: Context
    ) -> AsyncIterator[api.DownloadExportResponse]:
        blob, stream = await self.exports.download(
            current_principal(),
            request.app_id,
            request.dataset_id,
            request.version_id,
            request.export_id,
        )
        first = api.DownloadExportResponse(total_size=blob.size, sha256=blob.sha256)
        async for message in download(
            first, stream, lambda chunk: api.DownloadExportResponse(chunk=chunk)
        ):
            yield message
