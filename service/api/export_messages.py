"""The messages of exports (Export, DatasetVersionExportInfo), shared by the export RPCs
and GetDatasetVersion."""

from __future__ import annotations

from datasetd.v1 import dataset_version_pb2, status_pb2
from datasetd.v1 import dataset_version_service_pb2 as api

from service.domain.models import (
    ExportFormat,
    ExportOptions,
    ExportStatus,
    ExportView,
    SplitOptions,
)
from service.wire.timestamps import set_times

FORMATS = {
    ExportFormat.CLARIFAI_DATA_PROTOBUF: dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF,
    ExportFormat.CLARIFAI_DATA_JSON: dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_JSON,
    ExportFormat.COCO: dataset_version_pb2.EXPORT_FORMAT_COCO,
    ExportFormat.VI_FULL: dataset_version_pb2.EXPORT_FORMAT_VI_FULL,
    ExportFormat.VI_JSONL: dataset_version_pb2.EXPORT_FORMAT_VI_JSONL,
}
FORMATS_BY_NUMBER = {number: export_format for export_format, number in FORMATS.items()}
# The field of each format in DatasetVersion.export_info.
EXPORT_INFO_FIELDS = {
    ExportFormat.CLARIFAI_DATA_PROTOBUF: "clarifai_data_protobuf",
    ExportFormat.CLARIFAI_DATA_JSON: "clarifai_data_json",
    ExportFormat.COCO: "coco",
    ExportFormat.VI_FULL: "vi_full",
    ExportFormat.VI_JSONL: "vi_jsonl",
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


def export_options(message: api.ExportOptions) -> ExportOptions:
    split = None
    if message.HasField("split"):
        split = SplitOptions(dict(message.split.ratios), message.split.seed)
    return ExportOptions(
        split=split,
        embed_media=message.embed_media,
        pixel_coordinates=message.pixel_coordinates,
    )


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
    message.options.pixel_coordinates = export.options.pixel_coordinates
    if export.options.split is not None:
        message.options.split.ratios.update(export.options.split.ratios)
        message.options.split.seed = export.options.split.seed
    if view.url_expires_at is not None:
        message.url_expire_time.FromDatetime(view.url_expires_at)
    set_times(message, export.created_at, export.modified_at)
    return message


def export_info(views: list[ExportView]) -> dataset_version_pb2.DatasetVersionExportInfo:
    """The most recently requested export of each format, for GetDatasetVersion."""
    info = dataset_version_pb2.DatasetVersionExportInfo()
    for view in views:
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
