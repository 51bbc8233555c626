"""Dataset messages <-> the domain's datasets."""

from __future__ import annotations

from datasetd.v1 import dataset_pb2
from google.protobuf import json_format

from service.domain.datasets import CoverImageInput, DatasetFields
from service.domain.errors import Violations
from service.domain.models import DatasetView, Visibility
from service.wire.struct import message_to_json, struct_to_dict
from service.wire.timestamps import set_times, set_timestamp

PATCHABLE_DATASET_FIELDS = (
    "description",
    "notes",
    "metadata",
    "visibility",
    "image",
    "default_filter",
    "display_name",
    "locked",
    "read_only",
    "hidden",
)


def _visibility(violations: Violations, field: str, gettable: int) -> Visibility:
    if gettable == 0:
        return Visibility.PRIVATE
    try:
        return Visibility(gettable)
    except ValueError:
        allowed = ", ".join(f"{v.name} ({v.value})" for v in Visibility)
        violations.add(field, f"must be one of {allowed}, got {gettable}")
        return Visibility.PRIVATE


def _given_fields(
    message: dataset_pb2.Dataset, paths: list[str] | None, violations: Violations
) -> set[str]:
    if paths:
        for index, path in enumerate(paths):
            if path not in PATCHABLE_DATASET_FIELDS:
                violations.add(
                    f"update_mask.paths[{index}]",
                    f"{path!r} is not patchable; allowed: {', '.join(PATCHABLE_DATASET_FIELDS)}",
                )
        return set(paths)
    return {
        name
        for name, is_set in (
            ("description", bool(message.description)),
            ("notes", bool(message.notes)),
            ("metadata", message.HasField("metadata")),
            ("visibility", message.HasField("visibility")),
            ("image", message.HasField("image")),
            ("default_filter", message.HasField("default_filter")),
            ("display_name", bool(message.display_name)),
            ("locked", message.locked),
            ("read_only", message.read_only),
            ("hidden", message.hidden),
        )
        if is_set
    }


def dataset_fields(
    message: dataset_pb2.Dataset, paths: list[str] | None, violations: Violations
) -> DatasetFields:
    """The fields a caller gave: those in `paths`, or else those set to a non-default value."""
    given = _given_fields(message, paths, violations)
    return DatasetFields(
        description=message.description if "description" in given else None,
        notes=message.notes if "notes" in given else None,
        metadata=struct_to_dict(message.metadata) if "metadata" in given else None,
        visibility=(
            _visibility(violations, "dataset.visibility.gettable", message.visibility.gettable)
            if "visibility" in given
            else None
        ),
        cover=(
            CoverImageInput(data=message.image.base64, url=message.image.url)
            if "image" in given
            else None
        ),
        default_filter=(
            message_to_json(message.default_filter) if "default_filter" in given else None
        ),
        display_name=message.display_name if "display_name" in given else None,
        locked=message.locked if "locked" in given else None,
        read_only=message.read_only if "read_only" in given else None,
        hidden=message.hidden if "hidden" in given else None,
    )


def dataset_to_proto(view: DatasetView) -> dataset_pb2.Dataset:
    dataset = view.dataset
    message = dataset_pb2.Dataset(
        id=dataset.id,
        app_id=dataset.app_id,
        description=dataset.description,
        notes=dataset.notes,
        etag=dataset.etag,
        project_ids=dataset.project_ids,
        display_name=dataset.display_name,
        locked=dataset.locked,
        read_only=dataset.read_only,
        hidden=dataset.hidden,
    )
    set_times(message, dataset.created_at, dataset.modified_at)
    if dataset.last_accessed_at is not None:
        set_timestamp(message.last_accessed_at, dataset.last_accessed_at)
    message.metadata.update(dataset.metadata)
    message.visibility.gettable = int(dataset.visibility)  # type: ignore[assignment]
    cover = dataset.cover
    if cover is not None:
        message.image.url = view.cover_download_url or cover.url
        if cover.blob is not None:
            message.image.image_info.width = cover.width
            message.image.image_info.height = cover.height
            message.image.image_info.format = cover.format
            message.image.image_info.color_mode = cover.color_mode
    if dataset.default_filter:
        json_format.ParseDict(dataset.default_filter, message.default_filter)
    if view.statistics is not None:
        stats = view.statistics
        message.statistics.SetInParent()
        message.statistics.inputs_count = stats.inputs_count
        message.statistics.annotated_inputs_count = stats.annotated_inputs_count
        message.statistics.annotations_count = stats.annotations_count
        message.statistics.concept_counts.update(stats.concept_counts)
    return message
