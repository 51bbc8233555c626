"""Conversion between protobuf messages and domain records."""

from __future__ import annotations

import calendar
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal

from datasetd.v1 import annotation_pb2, common_pb2, data_pb2, dataset_pb2, input_pb2, status_pb2
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from service.domain.annotations import AnnotationDraft
from service.domain.datasets import CoverImageInput, DatasetFields
from service.domain.errors import Violations
from service.domain.inputs import InputDraft
from service.domain.models import (
    Annotation,
    DatasetView,
    GeoPoint,
    InputQuery,
    InputView,
    MediaType,
    Visibility,
)

PATCHABLE_DATASET_FIELDS = (
    "description",
    "notes",
    "metadata",
    "visibility",
    "image",
    "default_filter",
)


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(value)
    return result


def _visibility(violations: Violations, field: str, gettable: int) -> Visibility:
    if gettable == 0:
        return Visibility.PRIVATE
    try:
        return Visibility(gettable)
    except ValueError:
        allowed = ", ".join(f"{v.name} ({v.value})" for v in Visibility)
        violations.add(field, f"must be one of {allowed}, got {gettable}")
        return Visibility.PRIVATE


def dataset_fields(
    message: dataset_pb2.Dataset, paths: list[str] | None, violations: Violations
) -> DatasetFields:
    """The fields a caller gave: those in `paths`, or else those set to a non-default value."""
    if paths:
        given = set()
        for index, path in enumerate(paths):
            if path not in PATCHABLE_DATASET_FIELDS:
                violations.add(
                    f"update_mask.paths[{index}]",
                    f"{path!r} is not patchable; allowed: {', '.join(PATCHABLE_DATASET_FIELDS)}",
                )
            given.add(path)
    else:
        given = {
            name
            for name, is_set in (
                ("description", bool(message.description)),
                ("notes", bool(message.notes)),
                ("metadata", message.HasField("metadata")),
                ("visibility", message.HasField("visibility")),
                ("image", message.HasField("image")),
                ("default_filter", message.HasField("default_filter")),
            )
            if is_set
        }
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
            json_format.MessageToDict(message.default_filter, preserving_proto_field_name=True)
            if "default_filter" in given
            else None
        ),
    )


def _set_timestamp(target: timestamp_pb2.Timestamp, value: datetime) -> None:
    # Four times cheaper than Timestamp.FromDatetime, which dominates list pages.
    target.seconds = calendar.timegm(value.utctimetuple())
    target.nanos = value.microsecond * 1000


def dataset_to_proto(view: DatasetView) -> dataset_pb2.Dataset:
    dataset = view.dataset
    message = dataset_pb2.Dataset(
        id=dataset.id,
        app_id=dataset.app_id,
        description=dataset.description,
        notes=dataset.notes,
        etag=dataset.etag,
    )
    if dataset.created_at is not None:
        _set_timestamp(message.created_at, dataset.created_at)
    if dataset.modified_at is not None:
        _set_timestamp(message.modified_at, dataset.modified_at)
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


_MEDIA_FIELDS: tuple[tuple[Literal["image", "video", "audio", "text"], MediaType], ...] = (
    ("image", MediaType.IMAGE),
    ("video", MediaType.VIDEO),
    ("audio", MediaType.AUDIO),
    ("text", MediaType.TEXT),
)
_CONCEPT_FIELDS = ("id", "name", "value")


def concepts_to_json(concepts: Iterable[data_pb2.Concept]) -> list[dict[str, Any]]:
    """Caller-settable concept fields in the JSON form the domain keeps."""
    result = []
    for concept in concepts:
        as_dict = json_format.MessageToDict(concept, preserving_proto_field_name=True)
        result.append({k: v for k, v in as_dict.items() if k in _CONCEPT_FIELDS})
    return result


def input_draft(message: input_pb2.Input) -> InputDraft:
    data = message.data
    media = tuple(kind for name, kind in _MEDIA_FIELDS if data.HasField(name))
    payload, url, text = b"", "", None
    if media:
        medium = getattr(data, media[0].value)
        url = medium.url
        if media[0] is MediaType.TEXT:
            text = medium.raw
        else:
            payload = medium.base64
    geo = None
    if data.HasField("geo") and data.geo.HasField("geo_point"):
        geo = GeoPoint(data.geo.geo_point.longitude, data.geo.geo_point.latitude)
    return InputDraft(
        id=message.id,
        media=media,
        data=payload,
        url=url,
        text=text,
        metadata=struct_to_dict(data.metadata) if data.HasField("metadata") else None,
        concepts=concepts_to_json(data.concepts),
        geo=geo,
        title=message.title,
        dataset_ids=list(message.dataset_ids),
    )


def input_to_proto(view: InputView) -> input_pb2.Input:
    stored = view.input
    message = input_pb2.Input(
        id=stored.id,
        title=stored.title,
        dataset_ids=stored.dataset_ids,
        status=status_pb2.Status(
            code=status_pb2.STATUS_CODE_INPUT_SUCCESS, description="Input stored"
        ),
    )
    if stored.created_at is not None:
        _set_timestamp(message.created_at, stored.created_at)
    if stored.modified_at is not None:
        _set_timestamp(message.modified_at, stored.modified_at)
    data = message.data
    info = stored.media_info
    medium = getattr(data, stored.media_type.value)
    medium.SetInParent()
    medium.url = view.download_url
    if view.hosted is not None:
        medium.hosted.prefix, medium.hosted.suffix = view.hosted
        medium.hosted.sizes.append("orig")
    if stored.media_type is MediaType.IMAGE and info:
        data.image.image_info.width = info.get("width", 0)
        data.image.image_info.height = info.get("height", 0)
        data.image.image_info.format = info.get("format", "")
        data.image.image_info.color_mode = info.get("color_mode", "")
    elif stored.media_type is MediaType.VIDEO and info:
        video = data.video.video_info
        video.width, video.height = info.get("width", 0), info.get("height", 0)
        video.fps, video.frame_count = info.get("fps", 0.0), info.get("frame_count", 0)
        video.video_format = info.get("format", "")
        video.duration_seconds = info.get("duration_seconds", 0.0)
    elif stored.media_type is MediaType.AUDIO and info:
        audio = data.audio.audio_info
        audio.audio_format, audio.sample_rate = info.get("format", ""), info.get("sample_rate", 0)
        audio.duration_seconds = info.get("duration_seconds", 0.0)
        audio.bit_rate = info.get("bit_rate", 0)
    elif stored.media_type is MediaType.TEXT and info:
        data.text.text_info.char_count = info.get("char_count", 0)
        data.text.text_info.encoding = info.get("encoding", "UTF-8")
    for concept in stored.concepts:
        json_format.ParseDict(concept, data.concepts.add(), ignore_unknown_fields=True)
    if stored.metadata:
        data.metadata.update(stored.metadata)
    if stored.geo is not None:
        data.geo.geo_point.longitude = stored.geo.longitude
        data.geo.geo_point.latitude = stored.geo.latitude
    return message


def input_filter_query(
    app_id: str,
    message: common_pb2.InputFilter | None,
    *,
    ids: list[str] | None = None,
    dataset_id: str | None = None,
) -> InputQuery:
    if message is None:
        return InputQuery(app_id=app_id, ids=tuple(ids) if ids else None, dataset_id=dataset_id)
    states = {
        common_pb2.ANNOTATION_STATE_ANNOTATED: True,
        common_pb2.ANNOTATION_STATE_UNANNOTATED: False,
    }
    kinds = {kind.value: kind for _, kind in _MEDIA_FIELDS}
    media_types = tuple(
        kinds[common_pb2.MediaType.Name(m).removeprefix("MEDIA_TYPE_").lower()]
        for m in message.media_types
        if m != common_pb2.MEDIA_TYPE_UNSPECIFIED
    )
    return InputQuery(
        app_id=app_id,
        ids=tuple(ids) if ids else None,
        dataset_id=dataset_id,
        media_types=media_types or None,
        metadata=struct_to_dict(message.metadata) if message.HasField("metadata") else None,
        concept_ids=tuple(message.concept_ids) or None,
        negative_concept_ids=tuple(message.negative_concept_ids) or None,
        annotated=states.get(message.annotation_state),
    )


def data_to_json(message: data_pb2.Data) -> dict[str, Any]:
    """The JSON form annotation rules check and storage keeps (proto field names)."""
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def annotation_draft(message: annotation_pb2.Annotation) -> AnnotationDraft:
    return AnnotationDraft(
        id=message.id,
        input_id=message.input_id,
        data=data_to_json(message.data),
        annotation_info=(
            struct_to_dict(message.annotation_info) if message.HasField("annotation_info") else None
        ),
    )


def annotation_to_proto(annotation: Annotation) -> annotation_pb2.Annotation:
    message = annotation_pb2.Annotation(
        id=annotation.id,
        input_id=annotation.input_id,
        input_level=annotation.input_level,
        status=status_pb2.Status(
            code=status_pb2.STATUS_CODE_ANNOTATION_SUCCESS, description="Annotation stored"
        ),
    )
    # Unknown fields are skipped, not fatal: a stored row must stay readable even if a
    # later release drops a field it holds.
    json_format.ParseDict(annotation.data, message.data, ignore_unknown_fields=True)
    if annotation.annotation_info:
        message.annotation_info.update(annotation.annotation_info)
    if annotation.created_at is not None:
        _set_timestamp(message.created_at, annotation.created_at)
    if annotation.modified_at is not None:
        _set_timestamp(message.modified_at, annotation.modified_at)
    return message
