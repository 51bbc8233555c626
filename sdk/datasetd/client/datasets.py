"""`client.datasets`: the Vi SDK's dataset methods over datasetd's API (through
`service.client` and the protos; README "For Datature Vi users" maps every field)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from datasetd.client import query
from datasetd.client.pagination import PaginatedResponse, chunked
from datasetd.client.types import (
    AssetStatusDetail,
    BulkAssetDeletionSession,
    BulkAssetDeletionSpec,
    BulkAssetDeletionStatus,
    Dataset,
    DatasetAccess,
    DatasetContent,
    DatasetDownloadResult,
    DatasetExport,
    DatasetExportDownloadUrl,
    DatasetExportFormat,
    DatasetExportOptions,
    DatasetExportSettings,
    DatasetExportSpec,
    DatasetExportStatus,
    DatasetStatistic,
    DatasetType,
    DeletedDataset,
    DeletedDatasetStatus,
    PaginationParams,
    ResourceCondition,
    ResourceMetadata,
)
from datasetd.v1 import dataset_pb2, dataset_service_pb2
from service.client import Client as NativeClient
from service.client import FailedPreconditionError
from service.client.exports import ExportInfo, ExportSettings
from service.client.versions import READY

# The statuses `bulk_delete_assets` filters by (datasetd keeps no per-dataset list).
ASSET_STATUSES = {
    "annotated": AssetStatusDetail("has at least one annotation", "#2e7d32"),
    "unannotated": AssetStatusDetail("has no annotation", "#9e9e9e"),
    "uploaded": AssetStatusDetail("stored and checked (every asset of the dataset)", "#1565c0"),
    "error": AssetStatusDetail("failed processing (never stored by datasetd)", "#c62828"),
}
SNAPSHOT_METADATA = {"created_by": "datasetd.client create_export"}


def _ms(value: datetime | None) -> int | None:
    return int(value.timestamp() * 1000) if value else None


def _proto_ms(message: Any, name: str) -> int | None:
    if not message.HasField(name):
        return None
    return int(getattr(message, name).ToMilliseconds())


def _statistic(message: dataset_pb2.Dataset) -> DatasetStatistic:
    stats = message.statistics
    return DatasetStatistic(
        asset_total=stats.inputs_count,
        annotation_total=stats.annotations_count,
        asset_annotated=stats.annotated_inputs_count,
        tags_count=dict(stats.concept_counts),
    )


def _declared(metadata: Mapping[str, Any], key: str, kind: type[Any]) -> Any:
    """`metadata.vi.<key>` as an enum member, None when absent or not one of its values."""
    vi = metadata.get("vi")
    value = vi.get(key) if isinstance(vi, Mapping) else None
    try:
        return kind(value) if value is not None else None
    except ValueError:
        return None


class ViDatasets:
    """The datasets of the client's app (Vi's organization), as `client.datasets`."""

    def __init__(self, native: NativeClient) -> None:
        self._native = native
        self._rpc = native.rpc
        self._app = native.app

    # --- datasets -----------------------------------------------------------------------

    def _link(self, dataset_id: str) -> str:
        return f"apps/{self._app}/datasets/{dataset_id}"

    def _dataset(self, message: dataset_pb2.Dataset, listed: bool) -> Dataset:
        metadata: dict[str, Any] = json_format.MessageToDict(message.metadata)
        dataset_id = message.id
        return Dataset(
            dataset_id=dataset_id,
            name=message.display_name or dataset_id,
            owner=message.app_id,
            organization_id=message.app_id,
            type=_declared(metadata, "type", DatasetType),
            content=_declared(metadata, "content", DatasetContent),
            create_date=_proto_ms(message, "created_at") or 0,
            users={},
            tags=dict(message.statistics.concept_counts),
            status=message.version.status.code if message.HasField("version") else 0,
            last_accessed=_proto_ms(message, "last_accessed_at"),
            is_locked=message.locked,
            access=DatasetAccess(
                is_public=message.visibility.gettable == dataset_pb2.Visibility.GETTABLE_PUBLIC,
                is_read_only=message.read_only,
                is_hidden=message.hidden,
            ),
            asset_statuses=dict(ASSET_STATUSES),
            self_link=self._link(dataset_id),
            etag=message.etag,
            description=message.description or None,
            loaded_statistic=None if listed else _statistic(message),
            load_statistic=(lambda: _statistic(self._get(dataset_id))) if listed else None,
        )

    def _get(self, dataset_id: str) -> dataset_pb2.Dataset:
        response = self._rpc.app_call(
            self._rpc.datasets.GetDataset,
            dataset_service_pb2.GetDatasetRequest,
            dataset_id=dataset_id,
        )
        return response.dataset

    def get(self, dataset_id: str) -> Dataset:
        return self._dataset(self._get(dataset_id), listed=False)

    def list(self, pagination: PaginationParams | None = None) -> PaginatedResponse[Dataset]:
        """The app's datasets but hidden ones, newest first; a listed dataset fetches its
        statistics when `statistic` is first read (ListDatasets carries none)."""
        size = (pagination or PaginationParams()).page_size
        pages = self._rpc.app_pages(
            self._rpc.datasets.ListDatasets, dataset_service_pb2.ListDatasetsRequest, size
        )
        return PaginatedResponse(
            [self._dataset(d, listed=True) for d in response.datasets] for response in pages
        )

    def delete(self, dataset_id: str) -> DeletedDataset:
        """Deletes the dataset: recoverable until its purge time (`service.client`'s
        `undelete`), which the condition's message gives."""
        before = self._get(dataset_id)
        deleted = self._native.datasets.delete(dataset_id)
        now = int(datetime.now(UTC).timestamp() * 1000)
        until = deleted.purge_time.isoformat() if deleted.purge_time else "?"
        message = "purged" if deleted.purged else f"recoverable until {until}"
        condition = "Purged" if deleted.purged else "Deleted"
        return DeletedDataset(
            kind="Dataset",
            user=self._app,
            organization_id=self._app,
            dataset_id=dataset_id,
            self_link=self._link(dataset_id),
            etag=before.etag,
            metadata=ResourceMetadata(
                time_created=_proto_ms(before, "created_at"),
                last_updated=_proto_ms(before, "modified_at"),
            ),
            status=DeletedDatasetStatus(
                [ResourceCondition(condition, "Reached", now, None, message)]
            ),
        )

    # --- exports ------------------------------------------------------------------------

    def _export(self, info: ExportInfo) -> DatasetExport:
        ratios = info.split_ratio
        split = ratios.get("train") if ratios and set(ratios) <= {"train", "validation"} else None
        url = (
            DatasetExportDownloadUrl(info.url, _ms(info.url_expires_at) or 0)
            if info.succeeded and info.url
            else None
        )
        modified = _ms(info.modified_at)
        fingerprint = f"{info.id}/{info.status}/{info.percent_completed}/{modified}"
        return DatasetExport(
            organization_id=self._app,
            dataset_id=info.dataset_id,
            dataset_export_id=info.id,
            spec=DatasetExportSpec(
                format=DatasetExportFormat(info.format),
                options=DatasetExportOptions(
                    normalized=not info.pixel_coordinates, split_ratio=split
                ),
            ),
            status=DatasetExportStatus(
                conditions=[
                    ResourceCondition(info.status, "Reached", modified, None, info.details or None)
                ],
                download_url=url,
            ),
            metadata=ResourceMetadata(
                time_created=_ms(info.created_at),
                last_updated=modified,
                attributes={"version_id": info.version_id},
            ),
            self_link=f"{self._link(info.dataset_id)}/versions/{info.version_id}/exports/{info.id}",
            etag=hashlib.sha256(fingerprint.encode()).hexdigest()[:16],
            version_id=info.version_id,
        )

    def _snapshot(self, dataset_id: str) -> str:
        """A new READY version of the dataset as it is now; a locked dataset (which cannot
        change, nor take a version) exports its newest READY version."""
        dataset = self._native.dataset(dataset_id)
        try:
            return dataset.create_version(metadata=SNAPSHOT_METADATA).id
        except FailedPreconditionError as error:
            latest = dataset.latest_version() if error.reason == "DATASET_LOCKED" else None
            if latest is None:
                raise
            return latest.id

    def create_export(
        self,
        dataset_id: str,
        export_settings: DatasetExportSettings | None = None,
        version_id: str | None = None,
    ) -> DatasetExport:
        """Snapshots the dataset as a new version (unless `version_id` names one) and
        exports it; returns at once, the export may still be processing."""
        settings = native_settings(export_settings or DatasetExportSettings())
        version = version_id or self._snapshot(dataset_id)
        info = self._native.datasets.create_export(dataset_id, settings, version_id=version)
        return self._export(info)

    def get_export(self, dataset_id: str, dataset_export_id: str) -> DatasetExport:
        return self._export(self._native.datasets.get_export(dataset_id, dataset_export_id))

    def _all_exports(self, dataset_id: str) -> Iterator[DatasetExport]:
        for version in self._native.dataset(dataset_id).list_versions():
            if version.status == READY:
                for info in self._native.datasets.list_exports(dataset_id, version.id):
                    yield self._export(info)

    def list_exports(
        self, dataset_id: str, pagination: PaginationParams | None = None
    ) -> PaginatedResponse[DatasetExport]:
        """The exports of every READY version of the dataset, newest version first."""
        size = (pagination or PaginationParams()).page_size
        return PaginatedResponse(chunked(self._all_exports(dataset_id), size))

    def download(
        self,
        dataset_id: str,
        dataset_export_id: str | None = None,
        export_settings: DatasetExportSettings | None = None,
        annotations_only: bool = False,
        save_dir: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        show_progress: bool = True,
    ) -> DatasetDownloadResult:
        """Downloads the export `dataset_export_id`, or else a new export of the dataset as
        it is now (`create_export`; VI_FULL with `annotations_only` exports VI_JSONL, the
        same annotations without media), into `save_dir` (default ./datasets/<id>)."""
        target = Path(save_dir) if save_dir is not None else Path("datasets", dataset_id)
        settings = export_settings or DatasetExportSettings()
        if annotations_only and settings.format == DatasetExportFormat.VI_FULL:
            settings = DatasetExportSettings(DatasetExportFormat.VI_JSONL, settings.options)
        export_id, version_id = dataset_export_id, None
        if export_id is None:
            created = self.create_export(dataset_id, settings)
            export_id, version_id = created.dataset_export_id, created.version_id
        result = self._native.datasets.download(
            dataset_id,
            target,
            export_settings=native_settings(settings),
            annotations_only=annotations_only,
            overwrite=overwrite,
            show_progress=show_progress,
            version_id=version_id,
            export_id=export_id,
        )
        return DatasetDownloadResult(
            save_dir=result.save_dir,
            size_mb=result.size_mb,
            splits=list(result.splits),
            assets_count=result.assets_count,
            annotations_count=result.annotations_count,
            format=result.format,
            dataset_export_id=result.export_id,
            version_id=result.version_id,
            split_counts=dict(result.splits),
        )

    # --- assets -------------------------------------------------------------------------

    def bulk_delete_assets(
        self,
        dataset_id: str,
        filter_criteria: str | Mapping[str, Any] | None = None,
        strict_query: bool = False,
    ) -> BulkAssetDeletionSession:
        """Deletes the dataset's assets (inputs, from the app, with their annotations) the
        filter matches (the language: datasetd.client.query); finished when it returns."""
        filters = query.compile_filter(filter_criteria, strict_query)
        session = uuid.uuid4().hex
        started = int(datetime.now(UTC).timestamp() * 1000)
        matched = deleted = 0
        for index, criteria in enumerate(filters):
            outcome = self._native.datasets.bulk_delete_assets(
                dataset_id, criteria, request_id=f"vi-bulk-delete-{session}-{index}"
            )
            matched += outcome.matched
            deleted += outcome.deleted
        finished = int(datetime.now(UTC).timestamp() * 1000)
        metadata_query = [c["metadata"] for c in filters if "metadata" in c]
        return BulkAssetDeletionSession(
            kind="DeleteManyAssetsSession",
            organization_id=self._app,
            dataset_id=dataset_id,
            delete_many_assets_session_id=session,
            self_link=f"{self._link(dataset_id)}/deleteManyAssetsSessions/{session}",
            etag=session[:16],
            metadata=ResourceMetadata(time_created=started, last_updated=finished),
            spec=BulkAssetDeletionSpec(
                filter=filter_criteria
                if isinstance(filter_criteria, str | None)
                else dict(filter_criteria),
                metadata_query=json.dumps(metadata_query) if metadata_query else None,
                rule_query=None,
                strict_query=strict_query,
            ),
            status=BulkAssetDeletionStatus(
                conditions=[
                    ResourceCondition(
                        "Finished", "Reached", finished, None, f"{deleted} of {matched} deleted"
                    )
                ],
                matched=matched,
                deleted=deleted,
            ),
        )


def native_settings(settings: DatasetExportSettings) -> ExportSettings:
    """Vi's settings as `service.client`'s: split_ratio r is train r, validation 1 - r
    (r = 1: everything in train); `normalized` picks the coordinates, on the server for
    the Vi formats, when unpacking for the native ones."""
    options = settings.options
    ratio = options.split_ratio
    split = None
    if ratio is not None:
        split = {"train": 1.0} if ratio == 1 else {"train": ratio, "validation": 1 - ratio}
    vi = settings.format in (DatasetExportFormat.VI_FULL, DatasetExportFormat.VI_JSONL)
    return ExportSettings(
        format=settings.format.value,
        split_ratio=split,
        pixel_coordinates=vi and not options.normalized,
        normalized=None if vi else options.normalized,
    )
