"""DatasetVersionService: decode, call the domain, encode."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from datasetd.v1 import dataset_version_pb2, status_pb2
from datasetd.v1 import dataset_version_service_pb2 as api

from service.api.export_messages import export_info
from service.api.interceptors import current_principal
from service.api.links import DownloadLinks
from service.api.pagination import PageTokens
from service.api.rpc import Context, decoded, mutation
from service.domain.errors import Violations
from service.domain.exports import ExportService
from service.domain.idempotency import Idempotency
from service.domain.models import DatasetVersion, Principal, VersionStatus
from service.domain.patch import UpdateMask
from service.domain.versions import UPDATABLE_FIELDS, VersionFields, VersionService
from service.wire.ontologies import version_ontology_to_proto
from service.wire.struct import struct_to_dict
from service.wire.timestamps import set_times

# The key of the whole version in DatasetVersion.metrics.
WHOLE_VERSION = "/"

_STATUS = {
    VersionStatus.PENDING: (
        status_pb2.STATUS_CODE_DATASET_VERSION_PENDING,
        "Dataset version is queued for building",
    ),
    VersionStatus.IN_PROGRESS: (
        status_pb2.STATUS_CODE_DATASET_VERSION_IN_PROGRESS,
        "Dataset version is being built",
    ),
    VersionStatus.READY: (status_pb2.STATUS_CODE_DATASET_VERSION_READY, "Dataset version is ready"),
    VersionStatus.FAILED: (
        status_pb2.STATUS_CODE_DATASET_VERSION_FAILURE,
        "Dataset version build failed",
    ),
}


def version_to_proto(version: DatasetVersion) -> dataset_version_pb2.DatasetVersion:
    code, description = _STATUS[version.status]
    message = dataset_version_pb2.DatasetVersion(
        id=version.id,
        app_id=version.app_id,
        dataset_id=version.dataset_id,
        description=version.description,
        status=status_pb2.Status(
            code=code,
            description=description,
            details=version.details,
            percent_completed=version.percent,
        ),
    )
    set_times(message, version.created_at, version.modified_at)
    if version.metadata:
        message.metadata.update(version.metadata)
    if version.metrics is not None:
        metrics = message.metrics[WHOLE_VERSION]
        # VersionMetrics is named field for field after DatasetVersionMetrics.
        for field in dataclasses.fields(version.metrics):
            getattr(metrics, field.name).value = getattr(version.metrics, field.name)
    if version.ontology is not None:
        message.ontology.CopyFrom(version_ontology_to_proto(version.ontology))
    return message


def _update_fields(
    request: api.UpdateDatasetVersionRequest, violations: Violations
) -> VersionFields:
    mask = UpdateMask(
        list(request.update_mask.paths), UPDATABLE_FIELDS, violations, adjective="updatable"
    )
    given = request.version
    with_metadata = mask.given("metadata", given.HasField("metadata"))
    return VersionFields(
        description=given.description
        if mask.given("description", bool(given.description))
        else None,
        metadata=struct_to_dict(given.metadata) if with_metadata else None,
    )


@dataclass(frozen=True)
class VersionRpcs:
    versions: VersionService
    exports: ExportService
    idempotency: Idempotency
    tokens: PageTokens
    # Export URLs are links of the HTTP port with DATASETD_PUBLIC_URL set.
    links: DownloadLinks

    @mutation()
    async def CreateDatasetVersion(
        self, request: api.CreateDatasetVersionRequest, principal: Principal
    ) -> api.CreateDatasetVersionResponse:
        given = request.version
        fields = VersionFields(
            description=given.description,
            metadata=struct_to_dict(given.metadata) if given.HasField("metadata") else None,
        )
        version = await self.versions.create(
            principal, request.app_id, request.dataset_id, given.id, fields
        )
        return api.CreateDatasetVersionResponse(version=version_to_proto(version))

    async def GetDatasetVersion(
        self, request: api.GetDatasetVersionRequest, context: Context
    ) -> api.GetDatasetVersionResponse:
        principal = current_principal()
        at = (principal, request.app_id, request.dataset_id, request.version_id)
        message = version_to_proto(await self.versions.get(*at))
        latest = await self.exports.latest_by_format(*at)
        message.export_info.CopyFrom(export_info([self.links.export_view(v) for v in latest]))
        return api.GetDatasetVersionResponse(version=message)

    async def ListDatasetVersions(
        self, request: api.ListDatasetVersionsRequest, context: Context
    ) -> api.ListDatasetVersionsResponse:
        principal = current_principal()
        page = self.tokens.page("ListDatasetVersions", request, dataset_id=request.dataset_id)
        versions, last = await self.versions.list(
            principal, request.app_id, request.dataset_id, page.after, page.limit
        )
        return api.ListDatasetVersionsResponse(
            versions=[version_to_proto(version) for version in versions],
            next_page_token=page.next_token(last),
        )

    @mutation()
    async def UpdateDatasetVersion(
        self, request: api.UpdateDatasetVersionRequest, principal: Principal
    ) -> api.UpdateDatasetVersionResponse:
        fields = decoded(lambda violations: _update_fields(request, violations))
        version = await self.versions.update(
            principal, request.app_id, request.dataset_id, request.version.id, fields
        )
        return api.UpdateDatasetVersionResponse(version=version_to_proto(version))

    @mutation()
    async def DeleteDatasetVersion(
        self, request: api.DeleteDatasetVersionRequest, principal: Principal
    ) -> api.DeleteDatasetVersionResponse:
        await self.versions.delete(
            principal, request.app_id, request.dataset_id, request.version_id
        )
        return api.DeleteDatasetVersionResponse()

    async def CancelDatasetVersionBuild(
        self, request: api.CancelDatasetVersionBuildRequest, context: Context
    ) -> api.CancelDatasetVersionBuildResponse:
        version = await self.versions.cancel(
            current_principal(), request.app_id, request.dataset_id, request.version_id
        )
        return api.CancelDatasetVersionBuildResponse(version=version_to_proto(version))
