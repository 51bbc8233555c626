"""Annotation content rules, fed with what the API layer really produces.

Inputs are built as `datasetd.v1.Data` messages and converted with
`json_format.MessageToDict(..., preserving_proto_field_name=True)`, so the JSON
mapping's quirks (omitted zeros, "NaN" strings, uint64 as strings, base64 bytes,
enum names) reach the rules exactly as they will in production.
"""

from __future__ import annotations

from typing import Any

import pytest
from datasetd.v1 import data_pb2
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain.annotation_fields import MediaContext
from service.domain.annotation_rules import (
    MAX_ANNOTATIONS_PER_INPUT,
    MAX_VIOLATIONS_PER_ANNOTATION,
    AnnotationSummary,
    check_annotation_data,
    summarize,
)
from service.domain.errors import Violations

PATH = "annotations[3].data"
IMAGE = MediaContext("image")
VIDEO = MediaContext("video", frame_count=100, duration_ms=10_000)
AUDIO = MediaContext("audio", duration_ms=5_000)
TEXT = MediaContext("text", text_length=20)
NAN = float("nan")
INF = float("inf")
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def to_dict(data: data_pb2.Data) -> dict[str, Any]:
    return json_format.MessageToDict(data, preserving_proto_field_name=True)


def problems(data: data_pb2.Data | dict[str, Any], media: MediaContext = IMAGE) -> dict[str, str]:
    raw = data if isinstance(data, dict) else to_dict(data)
    violations = Violations()
    check_annotation_data(violations, PATH, raw, media)
    found = {v.field: v.description for v in violations.items}
    # Two problems on one field would hide each other in a dict; rules must not do that.
    assert len(found) == len(violations.items), violations.items
    return found


def only(data: data_pb2.Data | dict[str, Any], media: MediaContext = IMAGE) -> tuple[str, str]:
    found = problems(data, media)
    assert len(found) == 1, found
    ((field, description),) = found.items()
    return field, description


def box(top: float, left: float, bottom: float, right: float) -> data_pb2.Data:
    data = data_pb2.Data()
    data.regions.add().region_info.bounding_box.CopyFrom(
        data_pb2.BoundingBox(top_row=top, left_col=left, bottom_row=bottom, right_col=right)
    )
    return data


def with_region(**geometry: Any) -> data_pb2.Data:
    data = data_pb2.Data()
    data.regions.add(region_info=data_pb2.RegionInfo(**geometry))
    return data


def point(row: float = 0.5, col: float = 0.5, **extra: Any) -> data_pb2.Point:
    return data_pb2.Point(row=row, col=col, **extra)


def concepts(*items: tuple[str, float]) -> data_pb2.Data:
    return data_pb2.Data(concepts=[data_pb2.Concept(id=i, value=v) for i, v in items])


def frame(number: int = 0, time: int = 0, **data: Any) -> data_pb2.Frame:
    return data_pb2.Frame(
        frame_info=data_pb2.FrameInfo(number=number, time=time), data=data_pb2.Data(**data)
    )


def span(start: int, end: int) -> data_pb2.Data:
    return with_region(span=data_pb2.Span(char_start=start, char_end=end))


def with_metadata(metadata: dict[str, Any]) -> data_pb2.Data:
    data = data_pb2.Data()
    data.metadata.update(metadata)
    return data


def region_path(i: int = 0) -> str:
    return f"{PATH}.regions[{i}]"


BOX_PATH = f"{PATH}.regions[0].region_info.bounding_box"


# -- the JSON mapping really has the quirks the rules must handle ---------------


def test_json_mapping_quirks_are_exercised() -> None:
    data = box(0.0, 0.0, 0.5, 0.5)
    data.regions[0].value = NAN
    data.frames.append(frame(number=3, time=1000))
    raw = to_dict(data)
    assert "top_row" not in raw["regions"][0]["region_info"]["bounding_box"]
    assert raw["regions"][0]["value"] == "NaN"
    assert raw["frames"][0]["frame_info"]["time"] == "1000"
    assert MAX_ANNOTATIONS_PER_INPUT == 1000


# -- emptiness and top-level keys ----------------------------------------------


def test_empty_annotation_is_refused() -> None:
    field, description = only(data_pb2.Data())
    assert field == PATH
    assert "annotation is empty" in description
    empty_metadata = data_pb2.Data()
    empty_metadata.metadata.SetInParent()
    assert "annotation is empty" in only(empty_metadata)[1]


@pytest.mark.parametrize(
    "data",
    [
        concepts(("cat", 1.0)),
        concepts(("cat", 0.0)),  # a negative label is content too
        box(0.1, 0.1, 0.2, 0.2),
        with_metadata({"source": "import"}),
    ],
)
def test_any_kind_of_content_is_enough(data: data_pb2.Data) -> None:
    assert problems(data) == {}


def test_media_fields_are_not_annotation_content() -> None:
    data = concepts(("cat", 1.0))
    data.image.url = "https://example.com/a.jpg"
    assert only(data) == (f"{PATH}.image", "unsupported field")


def test_data_must_be_an_object() -> None:
    violations = Violations()
    check_annotation_data(violations, PATH, [], IMAGE)  # type: ignore[arg-type]
    assert [v.field for v in violations.items] == [PATH]


# -- concepts --------------------------------------------------------------------


def test_concept_count_limit() -> None:
    assert problems(concepts(*((f"c{i}", 1.0) for i in range(200)))) == {}
    field, description = only(concepts(*((f"c{i}", 1.0) for i in range(201))))
    assert field == f"{PATH}.concepts"
    assert "200" in description


def test_concept_id_is_required_and_bounded() -> None:
    assert problems(concepts(("x" * 256, 1.0))) == {}
    assert only(concepts(("", 1.0)))[0] == f"{PATH}.concepts[0].id"
    assert only(concepts(("ok", 1.0), ("x" * 257, 1.0)))[0] == f"{PATH}.concepts[1].id"
    assert only(concepts(("a\x00b", 1.0)))[0] == f"{PATH}.concepts[0].id"


def test_concept_name_is_bounded() -> None:
    data = data_pb2.Data(concepts=[data_pb2.Concept(id="cat", name="n" * 256, value=1)])
    assert problems(data) == {}
    data.concepts[0].name = "n" * 257
    assert only(data)[0] == f"{PATH}.concepts[0].name"


@pytest.mark.parametrize("value", [0.0, 0.25, 1.0])
def test_concept_values_in_unit_range_pass(value: float) -> None:
    assert problems(concepts(("cat", value))) == {}


@pytest.mark.parametrize("value", [NAN, INF, -INF, 1.5, -0.1])
def test_concept_values_outside_unit_range_fail(value: float) -> None:
    assert only(concepts(("cat", value)))[0] == f"{PATH}.concepts[0].value"


def test_duplicate_concept_ids_in_one_list_are_refused() -> None:
    field, description = only(concepts(("cat", 1.0), ("dog", 1.0), ("cat", 0.0)))
    assert field == f"{PATH}.concepts[2].id"
    assert f"{PATH}.concepts[0]" in description


def test_the_same_concept_in_different_lists_is_fine() -> None:
    data = concepts(("cat", 1.0))
    data.regions.add(
        region_info=data_pb2.RegionInfo(point=point()),
        data=data_pb2.Data(concepts=[data_pb2.Concept(id="cat", value=1)]),
    )
    assert problems(data) == {}


# -- regions ---------------------------------------------------------------------


def test_region_count_limit() -> None:
    data = data_pb2.Data()
    for _ in range(10_000):
        data.regions.add(region_info=data_pb2.RegionInfo(point=point()))
    assert problems(data) == {}
    data.regions.add(region_info=data_pb2.RegionInfo(point=point()))
    field, description = only(data)
    assert field == f"{PATH}.regions"
    assert "10000" in description


def test_region_count_limit_includes_frames() -> None:
    data = data_pb2.Data()
    for _ in range(9_999):
        data.regions.add(region_info=data_pb2.RegionInfo(point=point()))
    regions = [data_pb2.Region(region_info=data_pb2.RegionInfo(point=point()))] * 2
    data.frames.append(frame(number=1, regions=regions))
    assert only(data, VIDEO)[0] == f"{PATH}.frames[0].data.regions"


@pytest.mark.parametrize("good", ["r1", "A-z_09", "x" * 64])
def test_valid_region_ids(good: str) -> None:
    data = with_region(point=point())
    data.regions[0].id = good
    assert problems(data) == {}


@pytest.mark.parametrize("bad", ["x" * 65, "a b", "a.b", "ä"])
def test_invalid_region_ids(bad: str) -> None:
    data = with_region(point=point())
    data.regions[0].id = bad
    assert only(data)[0] == f"{region_path()}.id"


def test_region_ids_are_unique_within_the_annotation() -> None:
    data = with_region(point=point())
    data.regions[0].id = "r1"
    data.regions.add(id="r2", region_info=data_pb2.RegionInfo(point=point()))
    assert problems(data) == {}
    data.regions.add(id="r1", region_info=data_pb2.RegionInfo(point=point()))
    field, description = only(data)
    assert field == f"{region_path(2)}.id"
    assert f"{region_path(0)}.id" in description


def test_region_ids_are_unique_across_frames() -> None:
    data = with_region(point=point())
    data.regions[0].id = "r1"
    data.frames.append(
        frame(
            number=1,
            regions=[data_pb2.Region(id="r1", region_info=data_pb2.RegionInfo(point=point()))],
        )
    )
    assert only(data, VIDEO)[0] == f"{PATH}.frames[0].data.regions[0].id"


def test_region_info_is_required() -> None:
    data = data_pb2.Data()
    data.regions.add(value=1.0)
    assert only(data) == (f"{region_path()}.region_info", "is required")


def test_region_needs_a_geometry() -> None:
    data = data_pb2.Data()
    data.regions.add().region_info.SetInParent()
    field, description = only(data)
    assert field == f"{region_path()}.region_info"
    assert "exactly one" in description


def test_region_needs_exactly_one_geometry() -> None:
    data = with_region(point=point(), bounding_box=data_pb2.BoundingBox(bottom_row=1, right_col=1))
    field, description = only(data)
    assert field == f"{region_path()}.region_info"
    assert "bounding_box, point" in description


def test_empty_keypoint_list_is_no_geometry() -> None:
    raw = to_dict(with_region(point=point()))
    raw["regions"][0]["region_info"] = {"keypoint_locations": []}
    assert only(raw)[0] == f"{region_path()}.region_info"


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_region_value_in_unit_range_passes(value: float) -> None:
    data = with_region(point=point())
    data.regions[0].value = value
    assert problems(data) == {}


@pytest.mark.parametrize("value", [NAN, -INF, 1.01])
def test_region_value_outside_unit_range_fails(value: float) -> None:
    data = with_region(point=point())
    data.regions[0].value = value
    assert only(data)[0] == f"{region_path()}.value"


def test_track_id_length() -> None:
    data = with_region(point=point())
    data.regions[0].track_id = "t" * 64
    assert problems(data) == {}
    data.regions[0].track_id = "t" * 65
    assert only(data)[0] == f"{region_path()}.track_id"


def test_region_data_concepts_follow_the_concept_rules() -> None:
    data = with_region(point=point())
    data.regions[0].data.concepts.add(id="cat", value=1)
    assert problems(data) == {}
    data.regions[0].data.concepts.add(id="dog", value=NAN)
    assert only(data)[0] == f"{region_path()}.data.concepts[1].value"


def test_nested_regions_in_region_data_are_refused() -> None:
    data = with_region(point=point())
    data.regions[0].data.regions.add(region_info=data_pb2.RegionInfo(point=point()))
    field, description = only(data)
    assert field == f"{region_path()}.data.regions"
    assert "nested" in description


def test_region_data_allows_only_concepts_and_metadata() -> None:
    data = with_region(point=point())
    data.regions[0].data.metadata.update({"note": "x"})
    assert problems(data) == {}
    data.regions[0].data.image.url = "https://example.com/a.jpg"
    assert only(data) == (f"{region_path()}.data.image", "unsupported field")


def test_nested_frames_are_refused() -> None:
    data = data_pb2.Data(frames=[frame(number=1)])
    data.frames[0].data.frames.append(frame(number=2))
    assert only(data, VIDEO)[0] == f"{PATH}.frames[0].data.frames"


# -- boxes -----------------------------------------------------------------------


def test_box_with_zero_edges_is_valid_even_though_they_are_omitted() -> None:
    data = box(0.0, 0.0, 1.0, 1.0)
    assert to_dict(data)["regions"][0]["region_info"]["bounding_box"] == {
        "bottom_row": 1.0,
        "right_col": 1.0,
    }
    assert problems(data) == {}


def test_all_zero_box_is_present_but_inverted() -> None:
    data = box(0.0, 0.0, 0.0, 0.0)
    assert to_dict(data)["regions"][0]["region_info"] == {"bounding_box": {}}
    assert set(problems(data)) == {f"{BOX_PATH}.bottom_row", f"{BOX_PATH}.right_col"}


@pytest.mark.parametrize("edge", ["top_row", "left_col", "bottom_row", "right_col"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF, -0.5, 1.5])
def test_box_edge_outside_unit_range(edge: str, bad: float) -> None:
    data = box(0.1, 0.2, 0.5, 0.6)
    setattr(data.regions[0].region_info.bounding_box, edge, bad)
    assert only(data)[0] == f"{BOX_PATH}.{edge}"


def test_box_must_not_be_inverted() -> None:
    assert only(box(0.5, 0.1, 0.2, 0.6))[0] == f"{BOX_PATH}.bottom_row"
    assert only(box(0.1, 0.6, 0.5, 0.2))[0] == f"{BOX_PATH}.right_col"
    assert only(box(0.5, 0.1, 0.5, 0.6))[0] == f"{BOX_PATH}.bottom_row"


def test_box_coordinates_must_be_numbers() -> None:
    raw = to_dict(box(0.1, 0.2, 0.5, 0.6))
    raw["regions"][0]["region_info"]["bounding_box"]["top_row"] = "0.1x"
    assert only(raw)[0] == f"{BOX_PATH}.top_row"
    raw["regions"][0]["region_info"]["bounding_box"]["top_row"] = True
    assert only(raw)[0] == f"{BOX_PATH}.top_row"


# -- points, polygons, keypoints -------------------------------------------------


def test_point() -> None:
    assert problems(with_region(point=point(0.0, 1.0))) == {}
    path = f"{region_path()}.region_info.point"
    assert only(with_region(point=point(1.2, 0.5)))[0] == f"{path}.row"
    assert only(with_region(point=point(0.5, NAN)))[0] == f"{path}.col"
    assert only(with_region(point=point(z=INF)))[0] == f"{path}.z"


def test_point_visibility_names() -> None:
    visible = point(visibility=data_pb2.Point.VISIBILITY_VISIBLE)
    assert to_dict(with_region(point=visible))["regions"][0]["region_info"]["point"][
        "visibility"
    ] == ("VISIBILITY_VISIBLE")
    assert problems(with_region(point=visible)) == {}
    raw = to_dict(with_region(point=visible))
    raw["regions"][0]["region_info"]["point"]["visibility"] = "SHINY"
    assert only(raw)[0] == f"{region_path()}.region_info.point.visibility"


def test_polygon_point_count() -> None:
    path = f"{region_path()}.region_info.polygon.points"
    triangle = [point(0.1, 0.1), point(0.1, 0.9), point(0.9, 0.5)]
    assert problems(with_region(polygon=data_pb2.Polygon(points=triangle))) == {}
    assert only(with_region(polygon=data_pb2.Polygon(points=triangle[:2])))[0] == path
    many = [point(0.5, 0.5)] * 10_000
    assert problems(with_region(polygon=data_pb2.Polygon(points=many))) == {}
    assert only(with_region(polygon=data_pb2.Polygon(points=[*many, point()])))[0] == path


def test_polygon_points_are_checked() -> None:
    triangle = [point(0.1, 0.1), point(0.1, -0.2), point(0.9, 0.5)]
    field = only(with_region(polygon=data_pb2.Polygon(points=triangle)))[0]
    assert field == f"{region_path()}.region_info.polygon.points[1].col"


def test_keypoints() -> None:
    path = f"{region_path()}.region_info.keypoint_locations"
    assert problems(with_region(keypoint_locations=[point()] * 1_000)) == {}
    assert only(with_region(keypoint_locations=[point()] * 1_001))[0] == path
    bad = [point(), point(), point(row=NAN)]
    assert only(with_region(keypoint_locations=bad))[0] == f"{path}[2].row"


# -- masks -----------------------------------------------------------------------


MASK_PATH = f"{PATH}.regions[0].region_info.mask.image"


def mask(image: data_pb2.Image | None) -> data_pb2.Data:
    data = data_pb2.Data()
    info = data.regions.add().region_info
    info.mask.SetInParent()
    if image is not None:
        info.mask.image.CopyFrom(image)
    return data


@pytest.mark.parametrize(
    "image",
    [
        data_pb2.Image(base64=PNG_BYTES),
        data_pb2.Image(url="https://example.com/mask.png"),
        data_pb2.Image(url="http://example.com/mask.png"),
    ],
)
def test_valid_masks(image: data_pb2.Image) -> None:
    assert problems(mask(image)) == {}


def test_mask_needs_an_image() -> None:
    assert only(mask(None)) == (MASK_PATH, "is required")


@pytest.mark.parametrize(
    "image",
    [
        data_pb2.Image(),
        data_pb2.Image(base64=PNG_BYTES, url="https://example.com/mask.png"),
    ],
)
def test_mask_needs_exactly_one_source(image: data_pb2.Image) -> None:
    raw = to_dict(mask(image))
    assert "image" in raw["regions"][0]["region_info"]["mask"]
    assert only(raw)[0] == MASK_PATH


@pytest.mark.parametrize(
    "url", ["ftp://example.com/m.png", "file:///etc/passwd", "mask.png", "http://[::1/m.png"]
)
def test_mask_url_must_be_http(url: str) -> None:
    assert only(mask(data_pb2.Image(url=url)))[0] == f"{MASK_PATH}.url"


def test_mask_bytes_must_be_base64() -> None:
    raw = to_dict(mask(data_pb2.Image(base64=PNG_BYTES)))
    assert isinstance(raw["regions"][0]["region_info"]["mask"]["image"]["base64"], str)
    raw["regions"][0]["region_info"]["mask"]["image"]["base64"] = "not base64!"
    assert only(raw)[0] == f"{MASK_PATH}.base64"


def test_mask_image_output_fields_are_unsupported() -> None:
    raw = to_dict(mask(data_pb2.Image(url="https://example.com/mask.png")))
    raw["regions"][0]["region_info"]["mask"]["image"]["hosted"] = {"prefix": "x"}
    assert only(raw)[0] == f"{MASK_PATH}.hosted"


# -- spans -----------------------------------------------------------------------

SPAN_PATH = f"{PATH}.regions[0].region_info.span"


@pytest.mark.parametrize(("start", "end"), [(0, 1), (0, 20), (19, 20), (5, 6)])
def test_valid_spans(start: int, end: int) -> None:
    assert problems(span(start, end), TEXT) == {}


@pytest.mark.parametrize(("start", "end"), [(0, 0), (5, 5), (6, 5), (0, 21), (25, 30)])
def test_invalid_spans_blame_char_end(start: int, end: int) -> None:
    assert set(problems(span(start, end), TEXT)) == {f"{SPAN_PATH}.char_end"}


def test_span_without_known_text_length_checks_order_only() -> None:
    assert problems(span(100, 200), MediaContext("text")) == {}


@pytest.mark.parametrize("media", [IMAGE, VIDEO])
def test_spans_only_on_text(media: MediaContext) -> None:
    field, description = only(span(0, 1), media)
    assert field == SPAN_PATH
    assert "text" in description


def test_span_raw_text() -> None:
    data = span(0, 3)
    data.regions[0].region_info.span.raw_text = "abc"
    assert problems(data, TEXT) == {}
    data.regions[0].region_info.span.raw_text = "a\x00c"
    assert only(data, TEXT)[0] == f"{SPAN_PATH}.raw_text"


def test_span_offsets_must_be_unsigned_integers() -> None:
    raw = to_dict(span(1, 2))
    raw["regions"][0]["region_info"]["span"]["char_start"] = -1
    assert only(raw, TEXT)[0] == f"{SPAN_PATH}.char_start"


# -- geometry versus media -------------------------------------------------------


@pytest.mark.parametrize(
    ("geometry", "value"),
    [
        ("bounding_box", data_pb2.BoundingBox(bottom_row=1, right_col=1)),
        ("point", point()),
        ("polygon", data_pb2.Polygon(points=[point(), point(), point()])),
        ("mask", data_pb2.Mask(image=data_pb2.Image(url="https://example.com/m.png"))),
        ("keypoint_locations", [point()]),
    ],
)
def test_pixel_geometry_is_refused_on_text(geometry: str, value: Any) -> None:
    data = with_region(**{geometry: value})
    assert problems(data, IMAGE) == {}
    assert problems(data, VIDEO) == {}
    assert only(data, TEXT)[0] == f"{region_path()}.region_info.{geometry}"


def test_regions_are_refused_on_audio() -> None:
    field, description = only(with_region(point=point()), AUDIO)
    assert field == f"{PATH}.regions"
    assert "audio" in description


def test_audio_allows_concepts_metadata_and_timed_frames() -> None:
    data = concepts(("speech", 1.0))
    data.metadata.update({"speaker": "a"})
    data.frames.append(frame(time=0, concepts=[data_pb2.Concept(id="music", value=1)]))
    data.frames.append(frame(time=4_000, concepts=[data_pb2.Concept(id="speech", value=1)]))
    assert problems(data, AUDIO) == {}


def test_audio_frames_have_no_numbers_and_no_regions() -> None:
    data = data_pb2.Data(frames=[frame(number=3, time=100)])
    assert only(data, AUDIO)[0] == f"{PATH}.frames[0].frame_info.number"
    data = data_pb2.Data(
        frames=[
            frame(
                time=100, regions=[data_pb2.Region(region_info=data_pb2.RegionInfo(point=point()))]
            )
        ]
    )
    assert only(data, AUDIO)[0] == f"{PATH}.frames[0].data.regions"


# -- frames ----------------------------------------------------------------------

FRAME_INFO = f"{PATH}.frames[0].frame_info"


@pytest.mark.parametrize("media", [IMAGE, TEXT])
def test_frames_only_on_video_and_audio(media: MediaContext) -> None:
    data = data_pb2.Data(frames=[frame(number=1)])
    assert only(data, media)[0] == f"{PATH}.frames"
    assert problems(data, VIDEO) == {}


def test_frame_number_within_frame_count() -> None:
    assert problems(data_pb2.Data(frames=[frame(number=0)]), VIDEO) == {}
    assert problems(data_pb2.Data(frames=[frame(number=99)]), VIDEO) == {}
    assert only(data_pb2.Data(frames=[frame(number=100)]), VIDEO)[0] == f"{FRAME_INFO}.number"
    unknown_length = MediaContext("video")
    assert problems(data_pb2.Data(frames=[frame(number=10**6)]), unknown_length) == {}


def test_frame_time_is_a_uint64_string_within_the_duration() -> None:
    ok = data_pb2.Data(frames=[frame(time=10_000)])
    assert to_dict(ok)["frames"][0]["frame_info"]["time"] == "10000"
    assert problems(ok, VIDEO) == {}
    late = data_pb2.Data(frames=[frame(time=10_001)])
    assert only(late, VIDEO)[0] == f"{FRAME_INFO}.time"
    # Beyond 2**53 a float would lose precision; the string must be read exactly.
    huge = data_pb2.Data(frames=[frame(time=2**64 - 1)])
    assert to_dict(huge)["frames"][0]["frame_info"]["time"] == str(2**64 - 1)
    assert problems(huge, MediaContext("video")) == {}
    assert only(huge, VIDEO)[0] == f"{FRAME_INFO}.time"
    assert only(data_pb2.Data(frames=[frame(time=6_000)]), AUDIO)[0] == f"{FRAME_INFO}.time"


def test_frame_time_must_be_a_decimal_integer() -> None:
    raw = to_dict(data_pb2.Data(frames=[frame(time=5)]))
    raw["frames"][0]["frame_info"]["time"] = "5ms"
    assert only(raw, VIDEO)[0] == f"{FRAME_INFO}.time"


def test_frame_ids_are_valid_and_unique() -> None:
    data = data_pb2.Data(frames=[frame(number=1), frame(number=2)])
    data.frames[0].id = "f1"
    data.frames[1].id = "f2"
    assert problems(data, VIDEO) == {}
    data.frames[1].id = "f1"
    field, description = only(data, VIDEO)
    assert field == f"{PATH}.frames[1].id"
    assert "duplicate" in description
    data.frames[1].id = "f 2"
    assert only(data, VIDEO)[0] == f"{PATH}.frames[1].id"


def test_frame_info_is_required() -> None:
    data = data_pb2.Data(frames=[data_pb2.Frame(data=concepts(("cat", 1.0)))])
    assert only(data, VIDEO) == (FRAME_INFO, "is required")


def test_frame_count_limit() -> None:
    raw = {"frames": [{"frame_info": {"time": "1"}}] * 100_000}
    assert problems(raw, MediaContext("video")) == {}
    raw = {"frames": [{"frame_info": {"time": "1"}}] * 100_001}
    assert only(raw, MediaContext("video"))[0] == f"{PATH}.frames"


def test_frame_regions_are_checked() -> None:
    bad = data_pb2.Region(
        region_info=data_pb2.RegionInfo(bounding_box=data_pb2.BoundingBox(bottom_row=2))
    )
    data = data_pb2.Data(frames=[frame(number=1), frame(number=2, regions=[bad])])
    assert set(problems(data, VIDEO)) == {
        f"{PATH}.frames[1].data.regions[0].region_info.bounding_box.bottom_row",
        f"{PATH}.frames[1].data.regions[0].region_info.bounding_box.right_col",
    }


# -- metadata and unknown fields --------------------------------------------------


def test_metadata_uses_the_shared_rules() -> None:
    nested: dict[str, Any] = {"leaf": 1}
    for _ in range(9):
        nested = {"n": nested}
    data = data_pb2.Data()
    data.metadata.update(nested)
    assert only(data)[0] == f"{PATH}.metadata"
    region_meta = with_region(point=point())
    region_meta.regions[0].data.metadata.update(nested)
    assert only(region_meta)[0] == f"{region_path()}.data.metadata"


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (lambda raw: raw["regions"][0]["region_info"], "regions[0].region_info.circle"),
        (lambda raw: raw["regions"][0], "regions[0].circle"),
        (lambda raw: raw["frames"][0], "frames[0].circle"),
        (lambda raw: raw["frames"][0]["frame_info"], "frames[0].frame_info.circle"),
        (
            lambda raw: raw["regions"][0]["region_info"]["point"],
            "regions[0].region_info.point.circle",
        ),
    ],
)
def test_unknown_fields_are_refused(where: Any, expected: str) -> None:
    data = with_region(point=point())
    data.frames.append(frame(number=1))
    assert problems(data, VIDEO) == {}
    raw = to_dict(data)
    where(raw)["circle"] = {"r": 1}
    assert only(raw, VIDEO) == (f"{PATH}.{expected}", "unsupported field")


@pytest.mark.parametrize(
    "garbage",
    [
        {"concepts": "cat"},
        {"concepts": [1, None, {"id": 5}]},
        {"regions": [None, [], {"region_info": "box"}]},
        {"regions": [{"region_info": {"bounding_box": [0.1]}}]},
        {"regions": [{"region_info": {"polygon": {"points": "abc"}}}]},
        {"frames": [{"frame_info": {"time": -1, "number": "x"}}]},
        {"frames": [{"frame_info": None, "data": []}]},
        {"metadata": [1]},
        {"regions": [{"region_info": {"point": {"row": [0.1], "visibility": {}}}}]},
        {"frames": [{"frame_info": {"time": "9" * 5000}}]},
        {"concepts": [{"id": "cat", "value": {"v": 1}}]},
    ],
)
def test_wrong_types_are_violations_not_crashes(garbage: dict[str, Any]) -> None:
    assert problems(garbage, VIDEO)


def test_violations_per_annotation_are_capped() -> None:
    data = data_pb2.Data()
    for _ in range(1_000):
        data.regions.add().region_info.bounding_box.top_row = 2.0
    violations = Violations()
    violations.add("earlier", "kept")
    check_annotation_data(violations, PATH, to_dict(data), IMAGE)
    assert len(violations.items) == 1 + MAX_VIOLATIONS_PER_ANNOTATION + 1
    assert violations.items[0].field == "earlier"
    last = violations.items[-1]
    assert last.field == PATH
    assert "and more" in last.description


# -- summarize -------------------------------------------------------------------


def test_summary_of_a_video_annotation() -> None:
    data = concepts(("cat", 1.0), ("dog", 0.0))
    data.regions.add(
        region_info=data_pb2.RegionInfo(bounding_box=data_pb2.BoundingBox(bottom_row=1)),
        data=concepts(("bird", 0.7), ("fish", 0.0)),
    )
    data.frames.append(
        frame(
            number=1,
            concepts=[data_pb2.Concept(id="sky", value=1)],
            regions=[
                data_pb2.Region(
                    region_info=data_pb2.RegionInfo(keypoint_locations=[point()]),
                    data=concepts(("horse", 1.0)),
                ),
                data_pb2.Region(region_info=data_pb2.RegionInfo(point=point())),
            ],
        )
    )
    data.frames.append(frame(number=2))
    summary = summarize(to_dict(data))
    assert summary == AnnotationSummary(
        positive_concepts=frozenset({"cat", "bird", "sky", "horse"}),
        region_counts={
            "bounding_box": 1,
            "polygon": 0,
            "point": 1,
            "mask": 0,
            "span": 0,
            "keypoints": 1,
        },
        frame_count=2,
        has_regions=True,
    )
    hash(summary)


def test_summary_of_concepts_only() -> None:
    summary = summarize(to_dict(concepts(("cat", 1.0), ("dog", 0.0))))
    assert summary.positive_concepts == {"cat"}
    assert not summary.has_regions
    assert summary.frame_count == 0
    assert set(summary.region_counts.values()) == {0}


# -- properties ------------------------------------------------------------------

unit = st.floats(min_value=0.0, max_value=1.0, width=32)
outside_unit = st.one_of(
    st.floats(min_value=1.0, exclude_min=True, width=32),
    # -0.0 compares equal to 0 and is a valid edge, so only strictly negative values.
    st.floats(max_value=0.0, exclude_max=True, width=32).filter(lambda x: x < 0),
    st.sampled_from([NAN, INF, -INF]),
)


@st.composite
def valid_edges(draw: st.DrawFn) -> tuple[float, float, float, float]:
    top, bottom = sorted(draw(st.lists(unit, min_size=2, max_size=2, unique=True)))
    left, right = sorted(draw(st.lists(unit, min_size=2, max_size=2, unique=True)))
    return top, left, bottom, right


@settings(max_examples=100, deadline=None)
@given(valid_edges())
def test_random_valid_boxes_pass(edges: tuple[float, float, float, float]) -> None:
    assert problems(box(*edges)) == {}


@settings(max_examples=100, deadline=None)
@given(
    valid_edges(), st.sampled_from(["top_row", "left_col", "bottom_row", "right_col"]), outside_unit
)
def test_random_boxes_with_an_edge_outside_the_unit_range_fail(
    edges: tuple[float, float, float, float], edge: str, bad: float
) -> None:
    data = box(*edges)
    setattr(data.regions[0].region_info.bounding_box, edge, bad)
    fields = set(problems(data))
    assert fields == {f"{BOX_PATH}.{edge}"}


@settings(max_examples=100, deadline=None)
@given(valid_edges(), st.booleans(), st.booleans())
def test_random_inverted_boxes_fail(
    edges: tuple[float, float, float, float], flip_rows: bool, flip_cols: bool
) -> None:
    top, left, bottom, right = edges
    if not flip_rows and not flip_cols:
        flip_rows = True
    if flip_rows:
        top, bottom = bottom, top
    if flip_cols:
        left, right = right, left
    expected = set()
    if flip_rows:
        expected.add(f"{BOX_PATH}.bottom_row")
    if flip_cols:
        expected.add(f"{BOX_PATH}.right_col")
    assert set(problems(box(top, left, bottom, right))) == expected


KINDS = ["bounding_box", "polygon", "point", "mask", "keypoints"]


def region_of(kind: str, concept: str | None) -> data_pb2.Region:
    geometries: dict[str, dict[str, Any]] = {
        "bounding_box": {"bounding_box": data_pb2.BoundingBox(bottom_row=0.5, right_col=0.5)},
        "polygon": {"polygon": data_pb2.Polygon(points=[point(0, 0), point(0, 1), point(1, 1)])},
        "point": {"point": point()},
        "mask": {"mask": data_pb2.Mask(image=data_pb2.Image(base64=PNG_BYTES))},
        "keypoints": {"keypoint_locations": [point(), point(0.2, 0.3)]},
    }
    region = data_pb2.Region(region_info=data_pb2.RegionInfo(**geometries[kind]))
    if concept is not None:
        region.data.concepts.add(id=concept, value=1.0)
    return region


concept_ids = st.sampled_from(["cat", "dog", "bird", "car"])
labelled_regions = st.lists(st.tuples(st.sampled_from(KINDS), st.none() | concept_ids), max_size=8)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(concept_ids, st.sampled_from([0.0, 0.5, 1.0]), max_size=4),
    labelled_regions,
    st.lists(labelled_regions, max_size=4),
)
def test_summary_counts_match_what_was_built(
    top_concepts: dict[str, float],
    top_regions: list[tuple[str, str | None]],
    frames: list[list[tuple[str, str | None]]],
) -> None:
    data = concepts(*top_concepts.items())
    data.regions.extend(region_of(kind, concept) for kind, concept in top_regions)
    for number, frame_regions in enumerate(frames):
        data.frames.append(
            frame(number=number, regions=[region_of(k, c) for k, c in frame_regions])
        )
    raw = to_dict(data)
    if top_concepts or top_regions or frames:
        assert problems(raw, VIDEO) == {}

    summary = summarize(raw)

    every_region = top_regions + [r for f in frames for r in f]
    expected_counts = dict.fromkeys(
        ["bounding_box", "polygon", "point", "mask", "span", "keypoints"], 0
    )
    for kind, _ in every_region:
        expected_counts[kind] += 1
    assert summary.region_counts == expected_counts
    assert summary.frame_count == len(frames)
    assert summary.has_regions == bool(every_region)
    expected_positive = {c for c, v in top_concepts.items() if v > 0} | {
        c for _, c in every_region if c is not None
    }
    assert summary.positive_concepts == expected_positive


def test_media_context_refuses_unknown_media_types() -> None:
    with pytest.raises(ValueError, match="media type"):
        MediaContext("hologram")


KEYS = [
    "concepts", "regions", "frames", "metadata", "id", "value", "region_info", "data",
    "bounding_box", "top_row", "bottom_row", "point", "row", "polygon", "points", "mask",
    "image", "base64", "url", "span", "char_end", "keypoint_locations", "frame_info", "time",
    "number", "visibility", "track_id",
]  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=4),
    st.sampled_from(["image", "video", "audio", "text"]),
)
def test_arbitrary_json_never_crashes(raw: dict[str, Any], media_type: str) -> None:
    violations = Violations()
    check_annotation_data(violations, PATH, raw, MediaContext(media_type, 10, 10, 10))
    assert len(violations.items) <= MAX_VIOLATIONS_PER_ANNOTATION + 1
    summarize(raw)
