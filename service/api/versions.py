"""DatasetVersionService: decode, call the domain, encode."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable

from datasetd.v1 import dataset_version_pb2, dataset_version_service_pb2_grpc, status_pb2
from datasetd.v1 import dataset_version_service_pb2 as api

from service.api.convert import struct_to_dict
from service.api.datasets import Context
from service.api.diffs import DiffRpcs
from service.api.exports import ExportRpcs
from service.api.idempotency import run_once
from service.api.interceptors import current_principal
from service.api.pagination import PageTokens, page_size
from service.domain.auth import Permission, authorize
from service.domain.errors import Violations
from service.domain.idempotency import Idempotency
from service.domain.models import DatasetVersion, VersionStatus
from service.domain.versions import VersionFields, VersionService

PATCHABLE = ("description", "metadata")
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
    if version.created_at is not None:
        message.created_at.FromDatetime(version.created_at)
    if version.modified_at is not None:
        message.modified_at.FromDatetime(version.modified_at)
    if version.metadata:
        message.metadata.update(version.metadata)
    if version.metrics is not None:
        metrics = message.metrics[WHOLE_VERSION]
        # VersionMetrics is named field for field after DatasetVersionMetrics.
        for field in dataclasses.fields(version.metrics):
            getattr(metrics, field.name).value = getattr(version.metrics, field.name)
    return message


def _update_fields(
    request: api.UpdateDatasetVersionRequest, violations: Violations
) -> VersionFields:
    """The fields named in update_mask, or else those set to a non-default value."""
    paths = list(request.update_mask.paths)
    for index, path in enumerate(paths):
        if path not in PATCHABLE:
            violations.add(
                f"update_mask.paths[{index}]",
                f"{path!r} is not updatable; allowed: {', '.join(PATCHABLE)}",
            )
    given = request.version
    with_description = "description" in paths if paths else bool(given.description)
    with_metadata = "metadata" in paths if paths else given.HasField("metadata")
    return VersionFields(
        description=given.description if with_description else None,
        metadata=struct_to_dict(given.metadata) if with_metadata else None,
    )


class DatasetVersionServicer(dataset_version_service_pb2_grpc.DatasetVersionServiceServicer):
    def __init__(
        self,
        versions: VersionService,
        idempotency: Idempotency,
        tokens: PageTokens,
        *,
        exports: ExportRpcs,
        diffs: DiffRpcs,
        jobs_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self._versions = versions
        self._idempotency = idempotency
        self._tokens = tokens
        self._exports = exports
        self._diffs = diffs
        # Wakes the job runner, which otherwise finds a new build at its next poll.
        self._jobs_queued = jobs_queued

    async def CreateDatasetVersion(
        self, request: api.CreateDatasetVersionRequest, context: Context
    ) -> api.CreateDatasetVersionResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def create() -> api.CreateDatasetVersionResponse:
            given = request.version
            fields = VersionFields(
                description=given.description,
                metadata=struct_to_dict(given.metadata) if given.HasField("metadata") else None,
            )
            version = await self._versions.create(
                principal, request.app_id, request.dataset_id, given.id, fields
            )
            return api.CreateDatasetVersionResponse(version=version_to_proto(version))

        response = await run_once(
            self._idempotency,
            "CreateDatasetVersion",
            request,
            api.CreateDatasetVersionResponse,
            create,
        )
        # Only now: run_once commits the enqueueing transaction on its way out.
        self._jobs_queued()
        return response

    async def GetDatasetVersion(
        self, request: api.GetDatasetVersionRequest, context: Context
    ) -> api.GetDatasetVersionResponse:
        principal = current_principal()
        version = await self._versions.get(
            principal, request.app_id, request.dataset_id, request.version_id
        )
        message = version_to_proto(version)
        message.export_info.CopyFrom(
            await self._exports.export_info(
                principal, request.app_id, request.dataset_id, request.version_id
            )
        )
        return api.GetDatasetVersionResponse(version=message)

    async def ListDatasetVersions(
        self, request: api.ListDatasetVersionsRequest, context: Context
    ) -> api.ListDatasetVersionsResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.READ)
        limit = page_size(request.page_size)
        scope = {
            "method": "ListDatasetVersions",
            "app_id": request.app_id,
            "dataset_id": request.dataset_id,
        }
        before = self._tokens.decode_seq(request.page_token, scope)
        versions, last = await self._versions.list(
            principal, request.app_id, request.dataset_id, before, limit
        )
        response = api.ListDatasetVersionsResponse(
            versions=[version_to_proto(version) for version in versions]
        )
        if last is not None:
            response.next_page_token = self._tokens.encode(scope, [last])
        return response

    async def UpdateDatasetVersion(
        self, request: api.UpdateDatasetVersionRequest, context: Context
    ) -> api.UpdateDatasetVersionResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def update() -> api.UpdateDatasetVersionResponse:
            violations = Violations()
            fields = _update_fields(request, violations)
            violations.raise_if_any()
            version = await self._versions.update(
                principal, request.app_id, request.dataset_id, request.version.id, fields
            )
            return api.UpdateDatasetVersionResponse(version=version_to_proto(version))

        return await run_once(
            self._idempotency,
            "UpdateDatasetVersion",
            request,
            api.UpdateDatasetVersionResponse,
            update,
        )

    async def DeleteDatasetVersion(
        self, request: api.DeleteDatasetVersionRequest, context: Context
    ) -> api.DeleteDatasetVersionResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def delete() -> api.DeleteDatasetVersionResponse:
            await self._versions.delete(
                principal, request.app_id, request.dataset_id, request.version_id
            )
            return api.DeleteDatasetVersionResponse()

        return await run_once(
            self._idempotency,
            "DeleteDatasetVersion",
            request,
            api.DeleteDatasetVersionResponse,
            delete,
        )

    async def CancelDatasetVersionBuild(
        self, request: api.CancelDatasetVersionBuildRequest, context: Context
    ) -> api.CancelDatasetVersionBuildResponse:
        version = await self._versions.cancel(
            current_principal(), request.app_id, request.dataset_id, request.version_id
        )
        return api.CancelDatasetVersionBuildResponse(version=version_to_proto(version))

    async def ExportDatasetVersion(
        self, request: api.ExportDatasetVersionRequest, context: Context
    ) -> api.ExportDatasetVersionResponse:
        return await self._exports.export(request)

    async def GetExport(
        self, request: api.GetExportRequest, context: Context
    ) -> api.GetExportResponse:
        return await self._exports.get(request)

    async def ListExports(
        self, request: api.ListExportsRequest, context: Context
    ) -> api.ListExportsResponse:
        return await self._exports.list(request)

    async def DownloadExport(
        self, request: api.DownloadExportRequest, context: Context
    ) -> AsyncIterator[api.DownloadExportResponse]:
        async for message in self._exports.download(request):
            yield message

    async def DiffDatasetVersions(
        self, request: api.DiffDatasetVersionsRequest, context: Context
    ) -> AsyncIterator[api.DiffDatasetVersionsResponse]:
        async for message in self._diffs.diff(request):
            yield message
