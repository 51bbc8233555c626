"""Wire compatibility of the datasetd.v1 data model with the Clarifai reference model.

The data messages of datasetd (Input, Data, media, Annotation, region geometry, Dataset,
DatasetVersion, InputBatch, Status) must be wire-compatible with `clarifai.api` as published in
`clarifai-grpc`: bytes written by one side parse with the other, field by field. This module proves
it in two ways:

1. Descriptor comparison: every field of every datasetd message that has a reference counterpart
   is checked against the reference descriptor (number, scalar type, repeated-ness, map-ness,
   message and enum counterparts, enum numbers). Fields numbered 100 and up are datasetd's own
   extensions and must not exist in the reference.
2. Round trips with real values, in both directions, including fields one side does not know
   (they must survive a parse -> serialize round trip as unknown fields), plus a hypothesis
   property test over random boxes, concepts, frames and metadata.
"""

from __future__ import annotations

import struct
import warnings
from typing import Any

import pytest
from clarifai_grpc.grpc.api import resources_pb2
from clarifai_grpc.grpc.api.status import status_code_pb2
from clarifai_grpc.grpc.api.status import status_pb2 as ref_status_pb2
from datasetd.v1 import (
    annotation_pb2,
    common_pb2,
    data_pb2,
    dataset_pb2,
    dataset_version_pb2,
    input_pb2,
    status_pb2,
)
from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.descriptor_pb2 import FieldDescriptorProto, FileDescriptorProto
from google.protobuf.json_format import MessageToDict, MessageToJson
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.unknown_fields import UnknownFieldSet
from google.protobuf.wrappers_pb2 import UInt64Value
from hypothesis import given, settings
from hypothesis import strategies as st

# ---------------------------------------------------------------------------------------------
# Name mapping between the two models
# ---------------------------------------------------------------------------------------------

OUR_PACKAGE = "datasetd.v1"
REF_PACKAGE = "clarifai.api"

# Our messages whose reference counterpart has the same name in `clarifai.api`.
SAME_NAME_MESSAGES = (
    "Input",
    "InputBatch",
    "Data",
    "Image",
    "Video",
    "Audio",
    "Text",
    "HostedURL",
    "ImageInfo",
    "VideoInfo",
    "AudioInfo",
    "TextInfo",
    "Annotation",
    "Region",
    "RegionInfo",
    "BoundingBox",
    "Polygon",
    "Point",
    "Mask",
    "Span",
    "Frame",
    "FrameInfo",
    "Concept",
    "Geo",
    "GeoPoint",
    "Embedding",
    "Dataset",
    "Visibility",
    "DatasetVersion",
    "DatasetVersionMetrics",
    "DatasetVersionExport",
    "DatasetVersionExportInfo",
)

# Full name of our message -> full name of its reference counterpart.
MESSAGE_COUNTERPARTS: dict[str, str] = {
    **{f"{OUR_PACKAGE}.{name}": f"{REF_PACKAGE}.{name}" for name in SAME_NAME_MESSAGES},
    f"{OUR_PACKAGE}.Status": f"{REF_PACKAGE}.status.Status",
}

# Full name of our enum -> (full name of the reference enum, prefix of our value names).
# Our value names are the reference names with this prefix; zero values are *_UNSPECIFIED.
ENUM_COUNTERPARTS: dict[str, tuple[str, str]] = {
    f"{OUR_PACKAGE}.StatusCode": (f"{REF_PACKAGE}.status.StatusCode", "STATUS_CODE_"),
    f"{OUR_PACKAGE}.Point.Visibility": (f"{REF_PACKAGE}.Point.Visibility", "VISIBILITY_"),
    f"{OUR_PACKAGE}.Visibility.Gettable": (f"{REF_PACKAGE}.Visibility.Gettable", "GETTABLE_"),
    f"{OUR_PACKAGE}.ExportFormat": (
        f"{REF_PACKAGE}.DatasetVersionExportFormat",
        "EXPORT_FORMAT_",
    ),
}

# Enums that must define exactly the same numbers on both sides (StatusCode is a subset).
SAME_NUMBER_ENUMS = (
    f"{OUR_PACKAGE}.Point.Visibility",
    f"{OUR_PACKAGE}.Visibility.Gettable",
    f"{OUR_PACKAGE}.ExportFormat",
)

# Field numbers from here on are datasetd's own extensions.
FIRST_EXTENSION_NUMBER = 100

_TYPE_NAMES: dict[int, str] = {
    getattr(FieldDescriptor, name): name[len("TYPE_") :].lower()
    for name in dir(FieldDescriptor)
    if name.startswith("TYPE_")
}


def _pool() -> descriptor_pool.DescriptorPool:
    # Importing the generated modules (above) registers both models in the default pool.
    return descriptor_pool.Default()


def _message(full_name: str) -> Descriptor:
    return _pool().FindMessageTypeByName(full_name)


def _enum(full_name: str) -> EnumDescriptor:
    return _pool().FindEnumTypeByName(full_name)


def _is_map(descriptor: Descriptor | None) -> bool:
    return descriptor is not None and descriptor.GetOptions().map_entry


def _type_name(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return field.message_type.full_name
    if field.enum_type is not None:
        return field.enum_type.full_name
    return _TYPE_NAMES[field.type]


# ---------------------------------------------------------------------------------------------
# Descriptor comparison
# ---------------------------------------------------------------------------------------------


def _enum_problems(ours: EnumDescriptor, ref: EnumDescriptor, where: str) -> list[str]:
    expected = ENUM_COUNTERPARTS.get(ours.full_name)
    if expected is None:
        return [f"{where}: enum {ours.full_name} has no known reference counterpart"]
    ref_name, prefix = expected
    if ref.full_name != ref_name:
        return [f"{where}: enum {ours.full_name} maps to {ref_name}, reference has {ref.full_name}"]
    problems = []
    for value in ours.values:
        ref_value = ref.values_by_number.get(value.number)
        if ref_value is None:
            # From 100 on, a number the reference does not use is datasetd's own value
            # (e.g. its own export formats), which the reference reads as unknown.
            if value.number < FIRST_EXTENSION_NUMBER:
                problems.append(f"{where}: {value.name} = {value.number} is not in {ref.full_name}")
        elif value.number != 0 and value.name != prefix + ref_value.name:
            problems.append(
                f"{where}: {value.name} = {value.number} means {ref_value.name} in the reference"
            )
    return problems


def _field_problems(ours: FieldDescriptor, ref: FieldDescriptor, where: str) -> list[str]:
    """Wire-level differences between two fields with the same number (empty when compatible)."""
    problems = []
    if ours.type != ref.type:
        problems.append(
            f"{where}: type {_TYPE_NAMES[ours.type]} != reference {_TYPE_NAMES[ref.type]}"
        )
        return problems
    if ours.is_repeated != ref.is_repeated:
        problems.append(
            f"{where}: repeated={ours.is_repeated} != reference repeated={ref.is_repeated}"
        )
    if ours.is_repeated and ours.is_packed != ref.is_packed:
        problems.append(f"{where}: packed={ours.is_packed} != reference packed={ref.is_packed}")
    if ours.message_type is not None and ref.message_type is not None:
        our_map, ref_map = _is_map(ours.message_type), _is_map(ref.message_type)
        if our_map != ref_map:
            problems.append(f"{where}: map={our_map} != reference map={ref_map}")
        elif our_map:
            for entry_field in ("key", "value"):
                problems += _field_problems(
                    ours.message_type.fields_by_name[entry_field],
                    ref.message_type.fields_by_name[entry_field],
                    f"{where}[{entry_field}]",
                )
        else:
            our_type = ours.message_type.full_name
            expected = (
                our_type
                if our_type.startswith("google.protobuf.")
                else MESSAGE_COUNTERPARTS.get(our_type)
            )
            if expected is None:
                problems.append(f"{where}: message {our_type} has no known reference counterpart")
            elif expected != ref.message_type.full_name:
                problems.append(
                    f"{where}: message {our_type} (= {expected}) "
                    f"!= reference {ref.message_type.full_name}"
                )
    if ours.enum_type is not None and ref.enum_type is not None:
        problems += _enum_problems(ours.enum_type, ref.enum_type, where)
    return problems


def _message_problems(
    ours: Descriptor, ref: Descriptor, name_differences: list[str] | None = None
) -> list[str]:
    """Every incompatibility of `ours` with `ref`; field name differences go to name_differences."""
    problems = []
    for field in ours.fields:
        where = f"{ours.full_name}.{field.name} (#{field.number})"
        ref_field = ref.fields_by_number.get(field.number)
        if field.number >= FIRST_EXTENSION_NUMBER:
            if ref_field is not None:
                problems.append(
                    f"{where}: extension number is used by reference field {ref_field.full_name} "
                    f"({_type_name(ref_field)})"
                )
            continue
        if ref_field is None:
            problems.append(f"{where}: no field with this number in {ref.full_name}")
            continue
        if ref_field.name != field.name and name_differences is not None:
            name_differences.append(f"{where}: named {ref_field.name!r} in {ref.full_name}")
        problems += _field_problems(field, ref_field, where)
    return problems


@pytest.mark.parametrize("our_name", sorted(MESSAGE_COUNTERPARTS))
def test_message_descriptor_matches_reference(our_name: str) -> None:
    ours = _message(our_name)
    ref = _message(MESSAGE_COUNTERPARTS[our_name])
    name_differences: list[str] = []
    problems = _message_problems(ours, ref, name_differences)
    for difference in name_differences:  # reported, not an incompatibility
        warnings.warn(f"field name differs: {difference}", UserWarning, stacklevel=1)
    assert not problems, "\n".join(problems)


def test_counterpart_list_covers_every_compatible_message() -> None:
    """Every message reachable from the compatible ones through fields < 100 is checked too."""
    seen: set[str] = set()
    pending = list(MESSAGE_COUNTERPARTS)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for field in _message(name).fields:
            target = field.message_type
            if field.number >= FIRST_EXTENSION_NUMBER or target is None:
                continue
            if _is_map(target):
                target = target.fields_by_name["value"].message_type
            if target is not None and not target.full_name.startswith("google.protobuf."):
                assert target.full_name in MESSAGE_COUNTERPARTS, (
                    f"{field.full_name} uses {target.full_name}, which has no counterpart"
                )
                pending.append(target.full_name)
    assert seen == set(MESSAGE_COUNTERPARTS)


def test_descriptor_check_detects_incompatibilities() -> None:
    """The checker itself is not vacuous: it flags wrong types, labels and missing numbers."""
    # Span {1 uint32, 2 uint32, 3 string} against FrameInfo {1 uint32, 2 uint64, 3 uint32}.
    problems = _message_problems(data_pb2.Span.DESCRIPTOR, resources_pb2.FrameInfo.DESCRIPTOR)
    assert any("char_end (#2): type uint32 != reference uint64" in p for p in problems)
    assert any("raw_text (#3): type string != reference uint32" in p for p in problems)
    # Polygon {1 repeated Point} against Mask {2 Image}: number 1 does not exist there.
    problems = _message_problems(data_pb2.Polygon.DESCRIPTOR, resources_pb2.Mask.DESCRIPTOR)
    assert any("no field with this number" in p for p in problems)
    # Region.data (Data) against Frame.data (Data) is fine; against Region.region_info it is not.
    problems = _field_problems(
        data_pb2.Region.DESCRIPTOR.fields_by_name["data"],
        resources_pb2.Region.DESCRIPTOR.fields_by_name["region_info"],
        "Region.data",
    )
    assert problems == [
        "Region.data: message datasetd.v1.Data (= clarifai.api.Data) "
        "!= reference clarifai.api.RegionInfo"
    ]
    # Repeated against singular.
    problems = _field_problems(
        data_pb2.RegionInfo.DESCRIPTOR.fields_by_name["keypoint_locations"],
        resources_pb2.RegionInfo.DESCRIPTOR.fields_by_name["point"],
        "kp",
    )
    assert problems == ["kp: repeated=True != reference repeated=False"]
    # No reference message uses numbers >= 100, so the extension rule is checked on a
    # synthetic pair: {1 id, 2 label, 100 etag} against {1 name, 100 int32}.
    string, int32 = FieldDescriptorProto.TYPE_STRING, FieldDescriptorProto.TYPE_INT32
    ours, ref = _synthetic_pair(
        [("id", 1, string), ("label", 2, string), ("etag", 100, string)],
        [("name", 1, string), ("count", 100, int32)],
    )
    name_differences: list[str] = []
    problems = _message_problems(ours, ref, name_differences)
    assert problems == [
        "selftest.Ours.label (#2): no field with this number in selftest.Ref",
        "selftest.Ours.etag (#100): extension number is used by reference field "
        "selftest.Ref.count (int32)",
    ]
    assert name_differences == ["selftest.Ours.id (#1): named 'name' in selftest.Ref"]
    # Extensions that the reference does not use are fine.
    ours, ref = _synthetic_pair([("etag", 100, string)], [("name", 1, string)])
    assert _message_problems(ours, ref) == []


def _synthetic_pair(
    ours: list[tuple[str, int, FieldDescriptorProto.Type.ValueType]],
    ref: list[tuple[str, int, FieldDescriptorProto.Type.ValueType]],
) -> tuple[Descriptor, Descriptor]:
    """Messages `selftest.Ours` and `selftest.Ref` with the given (name, number, type) fields."""
    file = FileDescriptorProto(name="selftest.proto", package="selftest", syntax="proto3")
    for message_name, fields in (("Ours", ours), ("Ref", ref)):
        message = file.message_type.add(name=message_name)
        for name, number, type_ in fields:
            message.field.add(
                name=name, number=number, type=type_, label=FieldDescriptorProto.LABEL_OPTIONAL
            )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return pool.FindMessageTypeByName("selftest.Ours"), pool.FindMessageTypeByName("selftest.Ref")


def test_status_codes_match_reference() -> None:
    ours = status_pb2.StatusCode.DESCRIPTOR
    ref = status_code_pb2.StatusCode.DESCRIPTOR
    assert _enum_problems(ours, ref, "StatusCode") == []
    assert ours.values_by_number[0].name == "STATUS_CODE_UNSPECIFIED"
    for value in ours.values:
        if value.number != 0:
            assert status_code_pb2.StatusCode.Name(value.number) == value.name.removeprefix(
                "STATUS_CODE_"
            )
    # The codes the data model documents are all defined, with the reference numbers.
    documented = {
        "SUCCESS": 10000,
        "MIXED_STATUS": 10010,
        "FAILURE": 10020,
        "INPUT_SUCCESS": 30000,
        "INPUT_PENDING": 30001,
        "INPUT_FAILED": 30002,
        "INPUT_IN_PROGRESS": 30003,
        "INPUT_DUPLICATE": 30100,
        "DATASET_VERSION_PENDING": 64005,
        "DATASET_VERSION_IN_PROGRESS": 64010,
        "DATASET_VERSION_READY": 64015,
        "DATASET_VERSION_FAILURE": 64020,
        "DATASET_VERSION_EXPORT_SUCCESS": 64200,
        "DATASET_VERSION_EXPORT_PENDING": 64201,
        "DATASET_VERSION_EXPORT_FAILED": 64202,
        "DATASET_VERSION_EXPORT_IN_PROGRESS": 64203,
        "DATASET_VERSION_EXPORT_UNEXPECTED_ERROR": 64204,
        "CONN_DOES_NOT_EXIST": 11101,
        "ANNOTATION_SUCCESS": 24150,
    }
    for name, number in documented.items():
        assert status_pb2.StatusCode.Value(f"STATUS_CODE_{name}") == number
        assert status_code_pb2.StatusCode.Value(name) == number


@pytest.mark.parametrize("our_name", SAME_NUMBER_ENUMS)
def test_enum_numbers_match_reference(our_name: str) -> None:
    ours = _enum(our_name)
    ref_name, prefix = ENUM_COUNTERPARTS[our_name]
    ref = _enum(ref_name)
    shared = [
        n for n in ours.values_by_number if n < FIRST_EXTENSION_NUMBER or n in ref.values_by_number
    ]
    assert sorted(shared) == sorted(ref.values_by_number)
    assert _enum_problems(ours, ref, our_name) == []
    zero = ours.values_by_number[0].name
    assert zero == f"{prefix}UNSPECIFIED"


# ---------------------------------------------------------------------------------------------
# Shared values and field-by-field comparison
# ---------------------------------------------------------------------------------------------

IMAGE_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
VIDEO_BYTES = b"\x00\x00\x00\x18ftypmp42" + bytes(range(255, -1, -1))
AUDIO_BYTES = b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(64)
MASK_BYTES = b"\x89PNG\r\n\x1a\nmask" + bytes([0, 255]) * 50

CREATED = (1_700_000_000, 123_456_789)
MODIFIED = (1_700_000_500, 5)

BOX = (0.1, 0.2, 0.55, 0.6)
FRAME_BOX = (0.25, 0.125, 0.75, 0.875)
POLYGON = ((0.1, 0.1), (0.1, 0.9), (0.8, 0.5), (0.333, 0.777))
GEO = (13.404954, 52.520008)  # (longitude, latitude)
EMBEDDING = (0.1, -0.2, 0.3, 1e-7)
TEXT = "Hello wörld ✓ from datasetd"
SPAN = (6, 11)  # "wörld"
METADATA: dict[str, Any] = {
    "source": {"camera": "A7", "lens": {"focal_mm": 35, "aperture": 1.8}},
    "tags": ["outdoor", 3, None, True, {"nested": [1.5, "x", []]}],
    "score": 0.25,
    "reviewed": False,
    "nothing": None,
    "unicode": "ünïcödé ✓",
}
FRAMES = ((0, 12, 400), (1, 30, 1001))  # (index, number, time in ms)
TRACK_ID = "track-7"
EXPORT_SIZE = 5_000_000_123  # does not fit 32 bits


def _f32(value: float) -> float:
    """The value as stored in a protobuf float field."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def _struct(value: dict[str, Any]) -> Struct:
    result = Struct()
    result.update(value)
    return result


def _ts(seconds_nanos: tuple[int, int]) -> Timestamp:
    return Timestamp(seconds=seconds_nanos[0], nanos=seconds_nanos[1])


def _check_presence(ours: Message, ref: Any, *names: str) -> None:
    for name in names:
        assert ours.HasField(name) == ref.HasField(name), f"presence of {name}"


def _check_timestamp(ours: Timestamp, ref: Any) -> None:
    assert (ours.seconds, ours.nanos) == (ref.seconds, ref.nanos)


def _check_struct(ours: Struct, ref: Any) -> None:
    assert MessageToDict(ours) == MessageToDict(ref)


def _check_status(ours: status_pb2.Status, ref: Any) -> None:
    assert int(ours.code) == int(ref.code)
    assert ours.description == ref.description
    assert ours.details == ref.details
    assert ours.percent_completed == ref.percent_completed
    assert ours.time_remaining == ref.time_remaining
    assert ours.req_id == ref.req_id


def _check_hosted(ours: data_pb2.HostedURL, ref: Any) -> None:
    assert ours.prefix == ref.prefix
    assert ours.suffix == ref.suffix
    assert list(ours.sizes) == list(ref.sizes)


def _check_image(ours: data_pb2.Image, ref: Any) -> None:
    _check_presence(ours, ref, "hosted", "image_info")
    assert ours.url == ref.url
    assert ours.base64 == ref.base64
    _check_hosted(ours.hosted, ref.hosted)
    info, ref_info = ours.image_info, ref.image_info
    assert (info.width, info.height, info.format, info.color_mode) == (
        ref_info.width,
        ref_info.height,
        ref_info.format,
        ref_info.color_mode,
    )


def _check_video(ours: data_pb2.Video, ref: Any) -> None:
    _check_presence(ours, ref, "hosted", "video_info")
    assert ours.url == ref.url
    assert ours.base64 == ref.base64
    _check_hosted(ours.hosted, ref.hosted)
    for name in data_pb2.VideoInfo.DESCRIPTOR.fields_by_name:
        assert getattr(ours.video_info, name) == getattr(ref.video_info, name), name


def _check_audio(ours: data_pb2.Audio, ref: Any) -> None:
    _check_presence(ours, ref, "hosted", "audio_info")
    assert ours.url == ref.url
    assert ours.base64 == ref.base64
    _check_hosted(ours.hosted, ref.hosted)
    for name in data_pb2.AudioInfo.DESCRIPTOR.fields_by_name:
        assert getattr(ours.audio_info, name) == getattr(ref.audio_info, name), name


def _check_text(ours: data_pb2.Text, ref: Any) -> None:
    _check_presence(ours, ref, "hosted", "text_info")
    assert ours.raw == ref.raw
    assert ours.url == ref.url
    _check_hosted(ours.hosted, ref.hosted)
    assert ours.text_info.char_count == ref.text_info.char_count
    assert ours.text_info.encoding == ref.text_info.encoding


def _check_concepts(ours: Any, ref: Any) -> None:
    assert len(ours) == len(ref)
    for concept, ref_concept in zip(ours, ref, strict=True):
        _check_presence(concept, ref_concept, "created_at")
        assert concept.id == ref_concept.id
        assert concept.name == ref_concept.name
        assert concept.value == ref_concept.value
        assert concept.app_id == ref_concept.app_id
        _check_timestamp(concept.created_at, ref_concept.created_at)


def _check_point(ours: data_pb2.Point, ref: Any) -> None:
    assert (ours.row, ours.col, ours.z) == (ref.row, ref.col, ref.z)
    assert int(ours.visibility) == int(ref.visibility)


def _check_region_info(ours: data_pb2.RegionInfo, ref: Any) -> None:
    _check_presence(ours, ref, "bounding_box", "mask", "polygon", "point", "span")
    box, ref_box = ours.bounding_box, ref.bounding_box
    assert (box.top_row, box.left_col, box.bottom_row, box.right_col) == (
        ref_box.top_row,
        ref_box.left_col,
        ref_box.bottom_row,
        ref_box.right_col,
    )
    assert len(ours.polygon.points) == len(ref.polygon.points)
    for point, ref_point in zip(ours.polygon.points, ref.polygon.points, strict=True):
        _check_point(point, ref_point)
    _check_point(ours.point, ref.point)
    _check_presence(ours.mask, ref.mask, "image")
    _check_image(ours.mask.image, ref.mask.image)
    span, ref_span = ours.span, ref.span
    assert (span.char_start, span.char_end, span.raw_text) == (
        ref_span.char_start,
        ref_span.char_end,
        ref_span.raw_text,
    )
    assert len(ours.keypoint_locations) == len(ref.keypoint_locations)
    for point, ref_point in zip(ours.keypoint_locations, ref.keypoint_locations, strict=True):
        _check_point(point, ref_point)


def _check_regions(ours: Any, ref: Any) -> None:
    assert len(ours) == len(ref)
    for region, ref_region in zip(ours, ref, strict=True):
        _check_presence(region, ref_region, "region_info", "data")
        assert region.id == ref_region.id
        assert region.value == ref_region.value
        assert region.track_id == ref_region.track_id
        _check_region_info(region.region_info, ref_region.region_info)
        _check_data(region.data, ref_region.data)


def _check_frames(ours: Any, ref: Any) -> None:
    assert len(ours) == len(ref)
    for frame, ref_frame in zip(ours, ref, strict=True):
        _check_presence(frame, ref_frame, "frame_info", "data")
        assert frame.id == ref_frame.id
        info, ref_info = frame.frame_info, ref_frame.frame_info
        assert (info.index, info.number, info.time) == (
            ref_info.index,
            ref_info.number,
            ref_info.time,
        )
        _check_data(frame.data, ref_frame.data)


def _check_data(ours: data_pb2.Data, ref: Any) -> None:
    _check_presence(ours, ref, "image", "video", "metadata", "geo", "text", "audio")
    _check_image(ours.image, ref.image)
    _check_video(ours.video, ref.video)
    _check_audio(ours.audio, ref.audio)
    _check_text(ours.text, ref.text)
    _check_concepts(ours.concepts, ref.concepts)
    _check_struct(ours.metadata, ref.metadata)
    _check_presence(ours.geo, ref.geo, "geo_point")
    assert (ours.geo.geo_point.longitude, ours.geo.geo_point.latitude) == (
        ref.geo.geo_point.longitude,
        ref.geo.geo_point.latitude,
    )
    assert len(ours.embeddings) == len(ref.embeddings)
    for embedding, ref_embedding in zip(ours.embeddings, ref.embeddings, strict=True):
        assert list(embedding.vector) == list(ref_embedding.vector)
        assert embedding.num_dimensions == ref_embedding.num_dimensions
    _check_regions(ours.regions, ref.regions)
    _check_frames(ours.frames, ref.frames)


def _check_input(ours: input_pb2.Input, ref: Any) -> None:
    _check_presence(ours, ref, "data", "created_at", "modified_at", "status")
    assert ours.id == ref.id
    assert list(ours.dataset_ids) == list(ref.dataset_ids)
    _check_timestamp(ours.created_at, ref.created_at)
    _check_timestamp(ours.modified_at, ref.modified_at)
    _check_status(ours.status, ref.status)
    _check_data(ours.data, ref.data)


def _check_batch(ours: input_pb2.InputBatch, ref: Any) -> None:
    assert len(ours.inputs) == len(ref.inputs)
    for item, ref_item in zip(ours.inputs, ref.inputs, strict=True):
        _check_input(item, ref_item)


def _check_annotation(ours: annotation_pb2.Annotation, ref: Any) -> None:
    _check_presence(ours, ref, "data", "status", "created_at", "modified_at", "annotation_info")
    assert (ours.id, ours.input_id, ours.input_level) == (ref.id, ref.input_id, ref.input_level)
    _check_data(ours.data, ref.data)
    _check_status(ours.status, ref.status)
    _check_timestamp(ours.created_at, ref.created_at)
    _check_timestamp(ours.modified_at, ref.modified_at)
    _check_struct(ours.annotation_info, ref.annotation_info)


def _check_export(ours: dataset_version_pb2.DatasetVersionExport, ref: Any) -> None:
    _check_presence(ours, ref, "status")
    assert int(ours.format) == int(ref.format)
    _check_status(ours.status, ref.status)
    assert (ours.url, ours.size) == (ref.url, ref.size)


def _check_dataset_version(ours: dataset_version_pb2.DatasetVersion, ref: Any) -> None:
    _check_presence(ours, ref, "created_at", "modified_at", "status", "metadata", "export_info")
    assert (ours.id, ours.app_id, ours.dataset_id, ours.description) == (
        ref.id,
        ref.app_id,
        ref.dataset_id,
        ref.description,
    )
    _check_timestamp(ours.created_at, ref.created_at)
    _check_timestamp(ours.modified_at, ref.modified_at)
    _check_status(ours.status, ref.status)
    _check_struct(ours.metadata, ref.metadata)
    assert sorted(ours.metrics) == sorted(ref.metrics)
    for key, metrics in ours.metrics.items():
        ref_metrics = ref.metrics[key]
        for field in metrics.DESCRIPTOR.fields:
            _check_presence(metrics, ref_metrics, field.name)
            assert getattr(metrics, field.name).value == getattr(ref_metrics, field.name).value
    for name in ("clarifai_data_protobuf", "coco", "clarifai_data_json"):
        _check_presence(ours.export_info, ref.export_info, name)
        _check_export(getattr(ours.export_info, name), getattr(ref.export_info, name))


def _check_dataset(ours: dataset_pb2.Dataset, ref: Any) -> None:
    _check_presence(
        ours, ref, "created_at", "modified_at", "metadata", "visibility", "version", "image"
    )
    assert (ours.id, ours.app_id, ours.description, ours.notes) == (
        ref.id,
        ref.app_id,
        ref.description,
        ref.notes,
    )
    _check_timestamp(ours.created_at, ref.created_at)
    _check_timestamp(ours.modified_at, ref.modified_at)
    _check_struct(ours.metadata, ref.metadata)
    assert int(ours.visibility.gettable) == int(ref.visibility.gettable)
    _check_dataset_version(ours.version, ref.version)
    _check_image(ours.image, ref.image)


def _unknown_numbers(message: Message) -> set[int]:
    return {UnknownFieldSet(message)[i].field_number for i in range(len(UnknownFieldSet(message)))}


# ---------------------------------------------------------------------------------------------
# InputBatch: builders
# ---------------------------------------------------------------------------------------------


def _our_input_batch() -> input_pb2.InputBatch:
    our = data_pb2
    success = status_pb2.Status(
        code=status_pb2.STATUS_CODE_INPUT_SUCCESS, description="Input stored", req_id="req-1"
    )
    image_input = input_pb2.Input(
        id="img-1",
        dataset_ids=["ds-a", "ds-b"],
        created_at=_ts(CREATED),
        modified_at=_ts(MODIFIED),
        status=success,
        data=our.Data(
            image=our.Image(
                url="https://s3.example/app/inputs/img-1?sig=abc",
                base64=IMAGE_BYTES,
                hosted=our.HostedURL(
                    prefix="https://s3.example/app/inputs", suffix="img-1", sizes=["orig", "small"]
                ),
                image_info=our.ImageInfo(width=640, height=480, format="PNG", color_mode="RGB"),
            ),
            concepts=[
                our.Concept(id="cat", name="Cat", value=1.0, created_at=_ts(CREATED), app_id="a"),
                our.Concept(id="dog", name="Dog", value=0.0),
            ],
            metadata=_struct(METADATA),
            geo=our.Geo(geo_point=our.GeoPoint(longitude=GEO[0], latitude=GEO[1])),
            embeddings=[our.Embedding(vector=EMBEDDING, num_dimensions=len(EMBEDDING))],
            regions=[
                our.Region(
                    id="box-1",
                    value=0.9,
                    region_info=our.RegionInfo(
                        bounding_box=our.BoundingBox(
                            top_row=BOX[0], left_col=BOX[1], bottom_row=BOX[2], right_col=BOX[3]
                        )
                    ),
                    data=our.Data(concepts=[our.Concept(id="cat", value=1.0)]),
                ),
                our.Region(
                    id="poly-1",
                    region_info=our.RegionInfo(
                        polygon=our.Polygon(points=[our.Point(row=r, col=c) for r, c in POLYGON])
                    ),
                    data=our.Data(concepts=[our.Concept(id="dog", value=0.0)]),
                ),
                our.Region(
                    id="point-1",
                    region_info=our.RegionInfo(
                        point=our.Point(
                            row=0.3, col=0.4, z=0.5, visibility=our.Point.VISIBILITY_VISIBLE
                        )
                    ),
                ),
                our.Region(
                    id="mask-1",
                    region_info=our.RegionInfo(
                        mask=our.Mask(
                            image=our.Image(base64=MASK_BYTES, url="https://s3.example/m.png")
                        )
                    ),
                    data=our.Data(concepts=[our.Concept(id="cat", value=1.0)]),
                ),
                our.Region(
                    id="kp-1",
                    region_info=our.RegionInfo(
                        keypoint_locations=[
                            our.Point(row=0.2, col=0.3, visibility=our.Point.VISIBILITY_VISIBLE),
                            our.Point(
                                row=0.4, col=0.5, visibility=our.Point.VISIBILITY_NOT_VISIBLE
                            ),
                            our.Point(visibility=our.Point.VISIBILITY_NOT_PRESENT),
                        ]
                    ),
                    data=our.Data(concepts=[our.Concept(id="person", value=1.0)]),
                ),
            ],
        ),
    )
    video_input = input_pb2.Input(
        id="vid-1",
        status=status_pb2.Status(
            code=status_pb2.STATUS_CODE_INPUT_SUCCESS, percent_completed=100, time_remaining=0
        ),
        data=our.Data(
            video=our.Video(
                url="https://example.com/v.mp4",
                base64=VIDEO_BYTES,
                hosted=our.HostedURL(prefix="https://s3.example/v", suffix="vid-1", sizes=["orig"]),
                video_info=our.VideoInfo(
                    width=1920,
                    height=1080,
                    fps=29.97,
                    video_format="mp4",
                    bit_rate=4_000_000,
                    frame_count=300,
                    duration_seconds=10.01,
                ),
            ),
            frames=[
                our.Frame(
                    id=f"frame-{index}",
                    frame_info=our.FrameInfo(index=index, number=number, time=time_ms),
                    data=our.Data(
                        regions=[
                            our.Region(
                                id=f"fr-{index}",
                                track_id=TRACK_ID,
                                region_info=our.RegionInfo(
                                    bounding_box=our.BoundingBox(
                                        top_row=FRAME_BOX[0],
                                        left_col=FRAME_BOX[1],
                                        bottom_row=FRAME_BOX[2],
                                        right_col=FRAME_BOX[3],
                                    )
                                ),
                                data=our.Data(concepts=[our.Concept(id="car", value=1.0)]),
                            )
                        ]
                    ),
                )
                for index, number, time_ms in FRAMES
            ],
        ),
    )
    text_input = input_pb2.Input(
        id="txt-1",
        status=success,
        data=our.Data(
            text=our.Text(
                raw=TEXT,
                url="https://example.com/t.txt",
                text_info=our.TextInfo(char_count=len(TEXT), encoding="UTF-8"),
            ),
            concepts=[our.Concept(id="greeting", value=1.0)],
            regions=[
                our.Region(
                    id="span-1",
                    region_info=our.RegionInfo(
                        span=our.Span(
                            char_start=SPAN[0], char_end=SPAN[1], raw_text=TEXT[SPAN[0] : SPAN[1]]
                        )
                    ),
                    data=our.Data(concepts=[our.Concept(id="place", value=1.0)]),
                )
            ],
        ),
    )
    audio_input = input_pb2.Input(
        id="aud-1",
        status=success,
        data=our.Data(
            audio=our.Audio(
                url="https://example.com/a.wav",
                base64=AUDIO_BYTES,
                hosted=our.HostedURL(prefix="https://s3.example/a", suffix="aud-1", sizes=["orig"]),
                audio_info=our.AudioInfo(
                    audio_format="wav", sample_rate=44_100, duration_seconds=2.5, bit_rate=1_411_200
                ),
            ),
            concepts=[our.Concept(id="speech", value=1.0), our.Concept(id="music", value=0.0)],
        ),
    )
    return input_pb2.InputBatch(inputs=[image_input, video_input, text_input, audio_input])


def _ref_input_batch() -> Any:
    """The same batch as _our_input_batch, built with the reference classes."""
    ref = resources_pb2
    success = ref_status_pb2.Status(
        code=status_code_pb2.INPUT_SUCCESS, description="Input stored", req_id="req-1"
    )
    image_input = ref.Input(
        id="img-1",
        dataset_ids=["ds-a", "ds-b"],
        created_at=_ts(CREATED),
        modified_at=_ts(MODIFIED),
        status=success,
        data=ref.Data(
            image=ref.Image(
                url="https://s3.example/app/inputs/img-1?sig=abc",
                base64=IMAGE_BYTES,
                hosted=ref.HostedURL(
                    prefix="https://s3.example/app/inputs", suffix="img-1", sizes=["orig", "small"]
                ),
                image_info=ref.ImageInfo(width=640, height=480, format="PNG", color_mode="RGB"),
            ),
            concepts=[
                ref.Concept(id="cat", name="Cat", value=1.0, created_at=_ts(CREATED), app_id="a"),
                ref.Concept(id="dog", name="Dog", value=0.0),
            ],
            metadata=_struct(METADATA),
            geo=ref.Geo(geo_point=ref.GeoPoint(longitude=GEO[0], latitude=GEO[1])),
            embeddings=[ref.Embedding(vector=EMBEDDING, num_dimensions=len(EMBEDDING))],
            regions=[
                ref.Region(
                    id="box-1",
                    value=0.9,
                    region_info=ref.RegionInfo(
                        bounding_box=ref.BoundingBox(
                            top_row=BOX[0], left_col=BOX[1], bottom_row=BOX[2], right_col=BOX[3]
                        )
                    ),
                    data=ref.Data(concepts=[ref.Concept(id="cat", value=1.0)]),
                ),
                ref.Region(
                    id="poly-1",
                    region_info=ref.RegionInfo(
                        polygon=ref.Polygon(points=[ref.Point(row=r, col=c) for r, c in POLYGON])
                    ),
                    data=ref.Data(concepts=[ref.Concept(id="dog", value=0.0)]),
                ),
                ref.Region(
                    id="point-1",
                    region_info=ref.RegionInfo(
                        point=ref.Point(row=0.3, col=0.4, z=0.5, visibility=ref.Point.VISIBLE)
                    ),
                ),
                ref.Region(
                    id="mask-1",
                    region_info=ref.RegionInfo(
                        mask=ref.Mask(
                            image=ref.Image(base64=MASK_BYTES, url="https://s3.example/m.png")
                        )
                    ),
                    data=ref.Data(concepts=[ref.Concept(id="cat", value=1.0)]),
                ),
                ref.Region(
                    id="kp-1",
                    region_info=ref.RegionInfo(
                        keypoint_locations=[
                            ref.Point(row=0.2, col=0.3, visibility=ref.Point.VISIBLE),
                            ref.Point(row=0.4, col=0.5, visibility=ref.Point.NOT_VISIBLE),
                            ref.Point(visibility=ref.Point.NOT_PRESENT),
                        ]
                    ),
                    data=ref.Data(concepts=[ref.Concept(id="person", value=1.0)]),
                ),
            ],
        ),
    )
    video_input = ref.Input(
        id="vid-1",
        status=ref_status_pb2.Status(
            code=status_code_pb2.INPUT_SUCCESS, percent_completed=100, time_remaining=0
        ),
        data=ref.Data(
            video=ref.Video(
                url="https://example.com/v.mp4",
                base64=VIDEO_BYTES,
                hosted=ref.HostedURL(prefix="https://s3.example/v", suffix="vid-1", sizes=["orig"]),
                video_info=ref.VideoInfo(
                    width=1920,
                    height=1080,
                    fps=29.97,
                    video_format="mp4",
                    bit_rate=4_000_000,
                    frame_count=300,
                    duration_seconds=10.01,
                ),
            ),
            frames=[
                ref.Frame(
                    id=f"frame-{index}",
                    frame_info=ref.FrameInfo(index=index, number=number, time=time_ms),
                    data=ref.Data(
                        regions=[
                            ref.Region(
                                id=f"fr-{index}",
                                track_id=TRACK_ID,
                                region_info=ref.RegionInfo(
                                    bounding_box=ref.BoundingBox(
                                        top_row=FRAME_BOX[0],
                                        left_col=FRAME_BOX[1],
                                        bottom_row=FRAME_BOX[2],
                                        right_col=FRAME_BOX[3],
                                    )
                                ),
                                data=ref.Data(concepts=[ref.Concept(id="car", value=1.0)]),
                            )
                        ]
                    ),
                )
                for index, number, time_ms in FRAMES
            ],
        ),
    )
    text_input = ref.Input(
        id="txt-1",
        status=success,
        data=ref.Data(
            text=ref.Text(
                raw=TEXT,
                url="https://example.com/t.txt",
                text_info=ref.TextInfo(char_count=len(TEXT), encoding="UTF-8"),
            ),
            concepts=[ref.Concept(id="greeting", value=1.0)],
            regions=[
                ref.Region(
                    id="span-1",
                    region_info=ref.RegionInfo(
                        span=ref.Span(
                            char_start=SPAN[0], char_end=SPAN[1], raw_text=TEXT[SPAN[0] : SPAN[1]]
                        )
                    ),
                    data=ref.Data(concepts=[ref.Concept(id="place", value=1.0)]),
                )
            ],
        ),
    )
    audio_input = ref.Input(
        id="aud-1",
        status=success,
        data=ref.Data(
            audio=ref.Audio(
                url="https://example.com/a.wav",
                base64=AUDIO_BYTES,
                hosted=ref.HostedURL(prefix="https://s3.example/a", suffix="aud-1", sizes=["orig"]),
                audio_info=ref.AudioInfo(
                    audio_format="wav", sample_rate=44_100, duration_seconds=2.5, bit_rate=1_411_200
                ),
            ),
            concepts=[ref.Concept(id="speech", value=1.0), ref.Concept(id="music", value=0.0)],
        ),
    )
    return ref.InputBatch(inputs=[image_input, video_input, text_input, audio_input])


def _assert_batch_values(batch: Any) -> None:
    """Spot checks against the literal values (either model), so equality is never vacuous."""
    image, video, text, audio = batch.inputs
    assert [i.id for i in batch.inputs] == ["img-1", "vid-1", "txt-1", "aud-1"]
    assert list(image.dataset_ids) == ["ds-a", "ds-b"]
    assert (image.created_at.seconds, image.created_at.nanos) == CREATED
    assert {i.status.code for i in batch.inputs} == {status_code_pb2.INPUT_SUCCESS}
    assert image.status.code == 30000
    assert image.status.req_id == "req-1"

    data = image.data
    assert data.image.base64 == IMAGE_BYTES
    assert data.image.url == "https://s3.example/app/inputs/img-1?sig=abc"
    assert list(data.image.hosted.sizes) == ["orig", "small"]
    assert (data.image.image_info.width, data.image.image_info.height) == (640, 480)
    assert [(c.id, c.name, c.value) for c in data.concepts] == [
        ("cat", "Cat", 1.0),
        ("dog", "Dog", 0.0),
    ]
    assert MessageToDict(data.metadata) == METADATA
    assert (data.geo.geo_point.longitude, data.geo.geo_point.latitude) == (
        _f32(GEO[0]),
        _f32(GEO[1]),
    )
    assert list(data.embeddings[0].vector) == [_f32(v) for v in EMBEDDING]

    box_region, poly_region, point_region, mask_region, kp_region = data.regions
    box = box_region.region_info.bounding_box
    assert (box.top_row, box.left_col, box.bottom_row, box.right_col) == tuple(map(_f32, BOX))
    assert box_region.value == _f32(0.9)
    assert [c.id for c in box_region.data.concepts] == ["cat"]
    assert [(p.row, p.col) for p in poly_region.region_info.polygon.points] == [
        (_f32(r), _f32(c)) for r, c in POLYGON
    ]
    point = point_region.region_info.point
    assert (point.row, point.col, point.z) == (_f32(0.3), _f32(0.4), _f32(0.5))
    assert point.visibility == resources_pb2.Point.VISIBLE == 1
    assert mask_region.region_info.mask.image.base64 == MASK_BYTES
    assert [int(p.visibility) for p in kp_region.region_info.keypoint_locations] == [1, 2, 3]

    assert video.data.video.base64 == VIDEO_BYTES
    assert video.data.video.video_info.fps == _f32(29.97)
    assert video.data.video.video_info.frame_count == 300
    frames = [
        (f.frame_info.index, f.frame_info.number, f.frame_info.time) for f in video.data.frames
    ]
    assert frames == list(FRAMES)
    assert [r.track_id for f in video.data.frames for r in f.data.regions] == [TRACK_ID] * 2
    frame_box = video.data.frames[1].data.regions[0].region_info.bounding_box
    assert frame_box.right_col == _f32(FRAME_BOX[3])

    assert text.data.text.raw == TEXT
    span = text.data.regions[0].region_info.span
    assert (span.char_start, span.char_end, span.raw_text) == (*SPAN, "wörld")
    assert text.data.regions[0].data.concepts[0].id == "place"

    assert audio.data.audio.base64 == AUDIO_BYTES
    info = audio.data.audio.audio_info
    assert (info.audio_format, info.sample_rate, info.duration_seconds, info.bit_rate) == (
        "wav",
        44_100,
        2.5,
        1_411_200,
    )
    assert [(c.id, c.value) for c in audio.data.concepts] == [("speech", 1.0), ("music", 0.0)]


# ---------------------------------------------------------------------------------------------
# InputBatch: round trips
# ---------------------------------------------------------------------------------------------


def test_input_batch_ours_to_reference() -> None:
    ours = _our_input_batch()
    ref = resources_pb2.InputBatch.FromString(ours.SerializeToString())
    _assert_batch_values(ours)
    _assert_batch_values(ref)
    _check_batch(ours, ref)
    assert ref == _ref_input_batch()
    assert not _unknown_numbers(ref)  # everything we write is known to the reference


def test_input_batch_reference_to_ours() -> None:
    ref = _ref_input_batch()
    ours = input_pb2.InputBatch.FromString(ref.SerializeToString())
    _assert_batch_values(ref)
    _assert_batch_values(ours)
    _check_batch(ours, ref)
    assert ours == _our_input_batch()
    # Our bytes and the reference bytes are the same encoding of the same content.
    assert input_pb2.InputBatch.FromString(ours.SerializeToString()) == ours
    assert ours.SerializeToString(deterministic=True) == ref.SerializeToString(deterministic=True)


def test_input_batch_json_mapping_needs_integer_enums() -> None:
    """Not wire, but the Clarifai-Data-JSON export: field names match, enum value names do not.

    Our enum values are prefixed (STATUS_CODE_INPUT_SUCCESS, VISIBILITY_VISIBLE), the reference's
    are not (INPUT_SUCCESS, VISIBLE), so JSON must carry enums as numbers to be readable both ways.
    """
    ours = _our_input_batch()
    ref = _ref_input_batch()
    our_json = MessageToJson(ours, use_integers_for_enums=True)
    assert json_format.Parse(our_json, resources_pb2.InputBatch()) == ref
    ref_json = MessageToJson(ref, use_integers_for_enums=True)
    assert json_format.Parse(ref_json, input_pb2.InputBatch()) == ours
    with pytest.raises(json_format.ParseError):
        json_format.Parse(MessageToJson(ours), resources_pb2.InputBatch())


def test_input_batch_unsupported_reference_fields_survive() -> None:
    ref = _ref_input_batch()
    image_input = ref.inputs[0]
    image_input.settings.sample_rate_ms = 500
    image_input.settings.pinned_concepts.add(id="pinned", value=1.0)
    image_input.status.stack_trace.extend(["frame 1", "frame 2"])
    image_input.status.internal_details = "internal"
    image_input.status.http_status_code = 200
    data = image_input.data
    data.colors.add(raw_hex="#ff0000", value=0.5, w3c=resources_pb2.W3C(hex="#f00", name="Red"))
    data.tracks.add(id="t1", time_info=resources_pb2.TimeInfo(num_frames=3, begin_time=0.5))
    data.int_value = -42
    data.string_value = "extra"
    data.image.allow_duplicate_url = True
    data.image.decoded_bytes = b"\x01\x02"
    data.image.hosted.crossorigin = "anonymous"
    data.image.image_info.mode = "RGBA"
    data.image.hosted_image_info["small"].width = 32
    data.concepts[0].language = "en"
    data.concepts[0].visibility.gettable = resources_pb2.Visibility.PUBLIC
    data.geo.geo_limit.type = "withinKilometers"
    data.geo.geo_limit.value = 5.0
    data.regions[0].region_info.token.raw_text = "tok"
    ref.inputs[1].data.video.thumbnail_url = "https://example.com/thumb.jpg"
    ref.inputs[2].data.text.allow_duplicate_url = True

    ours = input_pb2.InputBatch.FromString(ref.SerializeToString())
    _check_batch(ours, ref)  # the supported fields parse as usual
    assert _unknown_numbers(ours.inputs[0]) == {8}  # settings
    assert _unknown_numbers(ours.inputs[0].status) == {4, 8, 11}
    assert _unknown_numbers(ours.inputs[0].data) == {7, 15, 21, 25}
    assert _unknown_numbers(ours.inputs[0].data.image) == {4, 7, 8}
    assert _unknown_numbers(ours.inputs[0].data.regions[0].region_info) == {8}

    again = resources_pb2.InputBatch.FromString(ours.SerializeToString())
    assert again == ref
    again_image = again.inputs[0]
    assert again_image.settings.sample_rate_ms == 500
    assert again_image.settings.pinned_concepts[0].id == "pinned"
    assert list(again_image.status.stack_trace) == ["frame 1", "frame 2"]
    assert again_image.data.colors[0].raw_hex == "#ff0000"
    assert again_image.data.colors[0].w3c.name == "Red"
    assert again_image.data.tracks[0].time_info.num_frames == 3
    assert again_image.data.int_value == -42
    assert again_image.data.image.hosted_image_info["small"].width == 32
    assert again_image.data.concepts[0].visibility.gettable == resources_pb2.Visibility.PUBLIC
    assert again_image.data.regions[0].region_info.token.raw_text == "tok"
    assert again.inputs[1].data.video.thumbnail_url == "https://example.com/thumb.jpg"


# ---------------------------------------------------------------------------------------------
# Annotation
# ---------------------------------------------------------------------------------------------

ANNOTATION_INFO: dict[str, Any] = {"annotator": "alice", "tool": {"name": "cvat", "v": 2}}


def _our_annotation() -> annotation_pb2.Annotation:
    our = data_pb2
    return annotation_pb2.Annotation(
        id="ann-1",
        input_id="img-1",
        input_level=True,
        status=status_pb2.Status(code=status_pb2.STATUS_CODE_ANNOTATION_SUCCESS),
        created_at=_ts(CREATED),
        modified_at=_ts(MODIFIED),
        annotation_info=_struct(ANNOTATION_INFO),
        data=our.Data(
            concepts=[our.Concept(id="cat", value=1.0), our.Concept(id="dog", value=0.0)],
            regions=[
                our.Region(
                    id="r1",
                    track_id="t-1",
                    region_info=our.RegionInfo(
                        bounding_box=our.BoundingBox(
                            top_row=BOX[0], left_col=BOX[1], bottom_row=BOX[2], right_col=BOX[3]
                        )
                    ),
                    data=our.Data(concepts=[our.Concept(id="cat", value=1.0)]),
                )
            ],
            frames=[
                our.Frame(
                    frame_info=our.FrameInfo(index=0, number=7, time=233),
                    data=our.Data(concepts=[our.Concept(id="cat", value=1.0)]),
                )
            ],
        ),
    )


def _ref_annotation() -> Any:
    ref = resources_pb2
    return ref.Annotation(
        id="ann-1",
        input_id="img-1",
        input_level=True,
        status=ref_status_pb2.Status(code=status_code_pb2.ANNOTATION_SUCCESS),
        created_at=_ts(CREATED),
        modified_at=_ts(MODIFIED),
        annotation_info=_struct(ANNOTATION_INFO),
        data=ref.Data(
            concepts=[ref.Concept(id="cat", value=1.0), ref.Concept(id="dog", value=0.0)],
            regions=[
                ref.Region(
                    id="r1",
                    track_id="t-1",
                    region_info=ref.RegionInfo(
                        bounding_box=ref.BoundingBox(
                            top_row=BOX[0], left_col=BOX[1], bottom_row=BOX[2], right_col=BOX[3]
                        )
                    ),
                    data=ref.Data(concepts=[ref.Concept(id="cat", value=1.0)]),
                )
            ],
            frames=[
                ref.Frame(
                    frame_info=ref.FrameInfo(index=0, number=7, time=233),
                    data=ref.Data(concepts=[ref.Concept(id="cat", value=1.0)]),
                )
            ],
        ),
    )


def test_annotation_round_trips() -> None:
    ours = _our_annotation()
    ref = resources_pb2.Annotation.FromString(ours.SerializeToString())
    _check_annotation(ours, ref)
    assert ref == _ref_annotation()
    assert ref.status.code == status_code_pb2.ANNOTATION_SUCCESS == 24150
    assert ref.input_level is True
    assert MessageToDict(ref.annotation_info) == ANNOTATION_INFO
    assert ref.data.regions[0].track_id == "t-1"
    assert ref.data.frames[0].frame_info.number == 7

    back = annotation_pb2.Annotation.FromString(_ref_annotation().SerializeToString())
    _check_annotation(back, _ref_annotation())
    assert back == ours


def test_annotation_unsupported_reference_fields_survive() -> None:
    ref = _ref_annotation()
    ref.trusted = True
    ref.user_id = "bob"
    ref.model_version_id = "mv-1"
    ref.embed_model_version_id = "emv-1"
    ref.task_id = "task-9"
    ref.consensus_info.update({"agree": 3})
    ref.worker.user.id = "bob"
    ours = annotation_pb2.Annotation.FromString(ref.SerializeToString())
    _check_annotation(ours, ref)
    assert _unknown_numbers(ours) == {10, 14, 15, 16, 18, 19, 21}
    again = resources_pb2.Annotation.FromString(ours.SerializeToString())
    assert again == ref
    assert (again.trusted, again.user_id, again.task_id) == (True, "bob", "task-9")
    assert MessageToDict(again.consensus_info) == {"agree": 3}
    assert again.worker.user.id == "bob"


# ---------------------------------------------------------------------------------------------
# DatasetVersion and Dataset
# ---------------------------------------------------------------------------------------------

METRIC_VALUES = {
    "inputs_count": 12,
    "unlabeled_inputs_count": 0,  # present with value 0: presence must survive
    "regions_count": 40,
    "bounding_boxes_count": 30,
    "polygons_count": 5,
    "points_count": 4,
    "masks_count": 1,
    "frames_count": 2,
    "positive_input_tags_count": 9,
    "frame_inputs_count": 1,
    "inputs_with_geo_count": 2**40,
}
EXPORT_URL = "https://s3.example/exports/v1.zip?sig=xyz"


def _our_dataset_version() -> dataset_version_pb2.DatasetVersion:
    dv = dataset_version_pb2
    metrics = dv.DatasetVersionMetrics()
    for name, value in METRIC_VALUES.items():
        getattr(metrics, name).CopyFrom(UInt64Value(value=value))
    return dv.DatasetVersion(
        id="v1",
        created_at=_ts(CREATED),
        modified_at=_ts(MODIFIED),
        app_id="app",
        dataset_id="ds-a",
        status=status_pb2.Status(
            code=status_pb2.STATUS_CODE_DATASET_VERSION_READY, description="Ready"
        ),
        description="first version",
        metadata=_struct({"split": "train"}),
        metrics={"/": metrics, "concept/cat": dv.DatasetVersionMetrics(inputs_count=UInt64Value())},
        export_info=dv.DatasetVersionExportInfo(
            clarifai_data_protobuf=dv.DatasetVersionExport(
                format=dv.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF,
                status=status_pb2.Status(
                    code=status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_SUCCESS
                ),
                url=EXPORT_URL,
                size=EXPORT_SIZE,
            ),
            coco=dv.DatasetVersionExport(
                format=dv.EXPORT_FORMAT_COCO,
                status=status_pb2.Status(
                    code=status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_IN_PROGRESS,
                    percent_completed=30,
                ),
            ),
            clarifai_data_json=dv.DatasetVersionExport(
                format=dv.EXPORT_FORMAT_CLARIFAI_DATA_JSON,
                status=status_pb2.Status(
                    code=status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_PENDING
                ),
            ),
        ),
    )


def _ref_dataset_version() -> Any:
    ref = resources_pb2
    metrics = ref.DatasetVersionMetrics()
    for name, value in METRIC_VALUES.items():
        getattr(metrics, name).CopyFrom(UInt64Value(value=value))
    return ref.DatasetVersion(
        id="v1",
        created_at=_ts(CREATED),
        modified_at=_ts(MODIFIED),
        app_id="app",
        dataset_id="ds-a",
        status=ref_status_pb2.Status(
            code=status_code_pb2.DATASET_VERSION_READY, description="Ready"
        ),
        description="first version",
        metadata=_struct({"split": "train"}),
        metrics={
            "/": metrics,
            "concept/cat": ref.DatasetVersionMetrics(inputs_count=UInt64Value()),
        },
        export_info=ref.DatasetVersionExportInfo(
            clarifai_data_protobuf=ref.DatasetVersionExport(
                format=ref.CLARIFAI_DATA_PROTOBUF,
                status=ref_status_pb2.Status(code=status_code_pb2.DATASET_VERSION_EXPORT_SUCCESS),
                url=EXPORT_URL,
                size=EXPORT_SIZE,
            ),
            coco=ref.DatasetVersionExport(
                format=ref.COCO,
                status=ref_status_pb2.Status(
                    code=status_code_pb2.DATASET_VERSION_EXPORT_IN_PROGRESS, percent_completed=30
                ),
            ),
            clarifai_data_json=ref.DatasetVersionExport(
                format=ref.CLARIFAI_DATA_JSON,
                status=ref_status_pb2.Status(code=status_code_pb2.DATASET_VERSION_EXPORT_PENDING),
            ),
        ),
    )


def test_dataset_version_round_trips() -> None:
    ours = _our_dataset_version()
    ref = resources_pb2.DatasetVersion.FromString(ours.SerializeToString())
    _check_dataset_version(ours, ref)
    assert ref == _ref_dataset_version()
    assert ref.status.code == status_code_pb2.DATASET_VERSION_READY == 64015
    whole = ref.metrics["/"]
    for name, value in METRIC_VALUES.items():
        assert whole.HasField(name)
        assert getattr(whole, name).value == value
    assert not whole.HasField("embeddings_count")
    assert ref.metrics["concept/cat"].HasField("inputs_count")
    export = ref.export_info.clarifai_data_protobuf
    assert (export.format, export.url, export.size) == (
        resources_pb2.CLARIFAI_DATA_PROTOBUF,
        EXPORT_URL,
        EXPORT_SIZE,
    )
    assert export.status.code == status_code_pb2.DATASET_VERSION_EXPORT_SUCCESS
    assert ref.export_info.coco.format == resources_pb2.COCO == 2
    assert ref.export_info.coco.status.percent_completed == 30
    assert ref.export_info.clarifai_data_json.format == resources_pb2.CLARIFAI_DATA_JSON == 3

    back = dataset_version_pb2.DatasetVersion.FromString(_ref_dataset_version().SerializeToString())
    _check_dataset_version(back, _ref_dataset_version())
    assert back == ours


def test_dataset_version_unsupported_reference_fields_survive() -> None:
    ref = _ref_dataset_version()
    ref.user_id = "bob"
    ref.visibility.gettable = resources_pb2.Visibility.ORG
    ref.embed_model_version_ids.extend(["emv-1", "emv-2"])
    ref.annotation_filter_config.ignore_empty_inputs = True
    ref.request_origin = resources_pb2.TRAINING
    ref.status.developer_notes = "notes"
    ref.export_info.clarifai_data_protobuf.include_embeddings = True
    ref.metrics["/"].region_location_matrix.n_cols = 2
    ref.metrics["/"].region_location_matrix.data.extend([1, 2, 3, 4])
    ours = dataset_version_pb2.DatasetVersion.FromString(ref.SerializeToString())
    _check_dataset_version(ours, ref)
    assert _unknown_numbers(ours) == {5, 13, 14, 15, 20}
    assert _unknown_numbers(ours.metrics["/"]) == {21}
    assert _unknown_numbers(ours.export_info.clarifai_data_protobuf) == {5}
    again = resources_pb2.DatasetVersion.FromString(ours.SerializeToString())
    assert again == ref
    assert again.visibility.gettable == resources_pb2.Visibility.ORG
    assert list(again.embed_model_version_ids) == ["emv-1", "emv-2"]
    assert again.annotation_filter_config.ignore_empty_inputs is True
    assert again.request_origin == resources_pb2.TRAINING
    assert again.export_info.clarifai_data_protobuf.include_embeddings is True
    assert list(again.metrics["/"].region_location_matrix.data) == [1, 2, 3, 4]


DATASET_METADATA: dict[str, Any] = {"owner": {"team": "vision", "ids": [1, 2]}, "public": True}


def _our_dataset(with_extensions: bool = False) -> dataset_pb2.Dataset:
    our = data_pb2
    dataset = dataset_pb2.Dataset(
        id="ds-a",
        created_at=_ts(CREATED),
        modified_at=_ts(MODIFIED),
        app_id="app",
        description="Street scenes",
        metadata=_struct(DATASET_METADATA),
        visibility=dataset_pb2.Visibility(gettable=dataset_pb2.Visibility.GETTABLE_PUBLIC),
        notes="# Notes\nCollected in 2024.",
        version=_our_dataset_version(),
        image=our.Image(
            url="https://s3.example/covers/ds-a?sig=1",
            hosted=our.HostedURL(prefix="https://s3.example/covers", suffix="ds-a", sizes=["orig"]),
            image_info=our.ImageInfo(width=200, height=100, format="JPEG", color_mode="RGB"),
        ),
    )
    if with_extensions:
        dataset.default_filter.CopyFrom(
            common_pb2.InputFilter(
                concept_ids=["cat"],
                media_types=[common_pb2.MEDIA_TYPE_IMAGE],
                annotation_state=common_pb2.ANNOTATION_STATE_ANNOTATED,
            )
        )
        dataset.statistics.CopyFrom(
            dataset_pb2.DatasetStatistics(
                inputs_count=12, annotated_inputs_count=10, concept_counts={"cat": 7}
            )
        )
        dataset.etag = "etag-123"
    return dataset


def _ref_dataset() -> Any:
    ref = resources_pb2
    return ref.Dataset(
        id="ds-a",
        created_at=_ts(CREATED),
        modified_at=_ts(MODIFIED),
        app_id="app",
        description="Street scenes",
        metadata=_struct(DATASET_METADATA),
        visibility=ref.Visibility(gettable=ref.Visibility.PUBLIC),
        notes="# Notes\nCollected in 2024.",
        version=_ref_dataset_version(),
        image=ref.Image(
            url="https://s3.example/covers/ds-a?sig=1",
            hosted=ref.HostedURL(prefix="https://s3.example/covers", suffix="ds-a", sizes=["orig"]),
            image_info=ref.ImageInfo(width=200, height=100, format="JPEG", color_mode="RGB"),
        ),
    )


def test_dataset_round_trips() -> None:
    ours = _our_dataset()
    ref = resources_pb2.Dataset.FromString(ours.SerializeToString())
    _check_dataset(ours, ref)
    assert ref == _ref_dataset()
    assert ref.visibility.gettable == resources_pb2.Visibility.PUBLIC == 50
    assert ref.image.image_info.format == "JPEG"
    assert ref.version.export_info.clarifai_data_protobuf.size == EXPORT_SIZE
    assert MessageToDict(ref.metadata) == DATASET_METADATA

    back = dataset_pb2.Dataset.FromString(_ref_dataset().SerializeToString())
    _check_dataset(back, _ref_dataset())
    assert back == ours


def test_dataset_extensions_are_unknown_to_the_reference_and_survive_it() -> None:
    ours = _our_dataset(with_extensions=True)
    ref = resources_pb2.Dataset.FromString(ours.SerializeToString())
    _check_dataset(ours, ref)
    assert _unknown_numbers(ref) == {100, 101, 102}
    back = dataset_pb2.Dataset.FromString(ref.SerializeToString())
    assert back == ours
    assert back.etag == "etag-123"
    assert back.statistics.concept_counts["cat"] == 7
    assert list(back.default_filter.concept_ids) == ["cat"]


def test_dataset_unsupported_reference_fields_survive() -> None:
    ref = _ref_dataset()
    ref.user_id = "bob"
    ref.is_starred = True
    ref.star_count = 3
    ref.bookmark_origin.id = "orig-ds"
    ref.default_annotation_filter.id = "filter-1"
    ref.image.allow_duplicate_url = True
    ours = dataset_pb2.Dataset.FromString(ref.SerializeToString())
    _check_dataset(ours, ref)
    assert _unknown_numbers(ours) == {5, 12, 14, 15, 17}
    assert not ours.HasField("default_filter")  # reference fields never land in our extensions
    again = resources_pb2.Dataset.FromString(ours.SerializeToString())
    assert again == ref
    assert (again.user_id, again.is_starred, again.star_count) == ("bob", True, 3)
    assert again.bookmark_origin.id == "orig-ds"
    assert again.image.allow_duplicate_url is True


# ---------------------------------------------------------------------------------------------
# Property test
# ---------------------------------------------------------------------------------------------

_unit_f32 = st.floats(min_value=0.0, max_value=1.0, width=32)
_json_scalars = (
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.text(max_size=10)
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
_metadata = st.dictionaries(st.text(max_size=8), _json_values, max_size=4)
_concepts = st.lists(
    st.tuples(st.text(min_size=1, max_size=16), st.sampled_from([0.0, 1.0]) | _unit_f32),
    max_size=5,
)
_boxes = st.lists(st.tuples(_unit_f32, _unit_f32, _unit_f32, _unit_f32), max_size=4)
_frames = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=2**32 - 1),  # number
        st.integers(min_value=0, max_value=2**64 - 1),  # time in ms
        st.text(max_size=12),  # track id
    ),
    max_size=3,
)
_status_codes = st.sampled_from([v.number for v in status_pb2.StatusCode.DESCRIPTOR.values])


@settings(max_examples=50, deadline=None, database=None)
@given(
    concepts=_concepts,
    boxes=_boxes,
    frames=_frames,
    metadata=_metadata,
    code=_status_codes,
)
def test_random_inputs_round_trip_both_ways(
    concepts: list[tuple[str, float]],
    boxes: list[tuple[float, float, float, float]],
    frames: list[tuple[int, int, str]],
    metadata: dict[str, Any],
    code: int,
) -> None:
    def fill(data: Any, concept_cls: Any, region_cls: Any, frame_cls: Any) -> None:
        for concept_id, value in concepts:
            data.concepts.append(concept_cls(id=concept_id, value=value))
        for top, left, bottom, right in boxes:
            region = region_cls(track_id="t")
            box = region.region_info.bounding_box
            box.top_row, box.left_col, box.bottom_row, box.right_col = top, left, bottom, right
            data.regions.append(region)
        for index, (number, time_ms, track_id) in enumerate(frames):
            frame = frame_cls()
            frame.frame_info.index, frame.frame_info.number = index, number
            frame.frame_info.time = time_ms
            frame.data.regions.add(track_id=track_id)
            data.frames.append(frame)
        data.metadata.update(metadata)

    our_code = status_pb2.StatusCode.ValueType(code)
    ours = input_pb2.Input(id="x", status=status_pb2.Status(code=our_code))
    fill(ours.data, data_pb2.Concept, data_pb2.Region, data_pb2.Frame)
    ref = resources_pb2.Input(id="x", status=ref_status_pb2.Status(code=code))
    fill(ref.data, resources_pb2.Concept, resources_pb2.Region, resources_pb2.Frame)

    # ours -> reference
    parsed_ref = resources_pb2.Input.FromString(ours.SerializeToString())
    _check_input(ours, parsed_ref)
    assert parsed_ref == ref
    assert [(c.id, c.value) for c in parsed_ref.data.concepts] == concepts
    assert [
        (
            r.region_info.bounding_box.top_row,
            r.region_info.bounding_box.left_col,
            r.region_info.bounding_box.bottom_row,
            r.region_info.bounding_box.right_col,
        )
        for r in parsed_ref.data.regions
    ] == boxes
    assert [
        (f.frame_info.number, f.frame_info.time, f.data.regions[0].track_id)
        for f in parsed_ref.data.frames
    ] == frames
    assert MessageToDict(parsed_ref.data.metadata) == metadata
    assert parsed_ref.status.code == code

    # reference -> ours
    parsed_ours = input_pb2.Input.FromString(ref.SerializeToString())
    _check_input(parsed_ours, ref)
    assert parsed_ours == ours
    assert not _unknown_numbers(parsed_ours)
