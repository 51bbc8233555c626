"""The ingest path's message -> JSON (service/wire/fast_json.py) gives what json_format
gives, value for value and type for type, over every kind of field of Data."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from datasetd.v1 import data_pb2
from google.protobuf import json_format, struct_pb2

from service.wire.fast_json import message_json, struct_json


def typed(value: Any) -> Any:
    """`value` with the type of every leaf, so that 1 and 1.0 differ."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    return (type(value).__name__, value)


def same_as_json_format(message: Any) -> None:
    expected = json_format.MessageToDict(message, preserving_proto_field_name=True)
    got = message_json(message)
    assert typed(got) == typed(expected)
    # Key order too: stored JSON text (and hashes of it) stay the same.
    assert json.dumps(got) == json.dumps(expected)


def test_regions_frames_and_concepts() -> None:
    rng = random.Random(7)
    data = data_pb2.Data()
    for n in range(40):
        region = data.regions.add(id=f"r{n}", track_id="t" if n % 3 else "", value=rng.random())
        edges = sorted(rng.random() for _ in range(4))
        box = region.region_info.bounding_box
        box.top_row, box.left_col, box.bottom_row, box.right_col = edges
        region.data.concepts.add(id="cat", name="Cat", value=[0.0, 1.0, 0.1, 0.3][n % 4])
    polygon = data.regions.add(id="poly")
    for n in range(5):
        polygon.region_info.polygon.points.add(
            row=n / 7, col=1 / 3, z=0.0, visibility=data_pb2.Point.VISIBILITY_VISIBLE
        )
    data.regions.add().region_info.mask.image.base64 = bytes(range(256))
    data.regions.add().region_info.span.SetInParent()
    span = data.regions.add().region_info.span
    span.char_start, span.char_end, span.raw_text = 3, 9, "héllo"
    data.regions.add().region_info.keypoint_locations.add(row=0.5, col=0.25)
    frame = data.frames.add(id="f")
    frame.frame_info.number, frame.frame_info.time = 12, 2**40
    frame.data.regions.add(id="fr").region_info.point.row = 0.75
    data.concepts.add(id="x", value=0.0)
    same_as_json_format(data)
    for region in data.regions:
        same_as_json_format(region)
    for concept in data.concepts:
        same_as_json_format(concept)


def test_well_known_types_and_odd_values_go_to_json_format() -> None:
    region = data_pb2.Region(id="r")
    region.data.metadata.update({"a": [1, None, {"b": True}]})
    same_as_json_format(region)
    concept = data_pb2.Concept(id="c")
    concept.created_at.FromSeconds(5)
    same_as_json_format(concept)
    # Undeclared enum numbers and non-finite floats: json_format's output or error.
    point = data_pb2.Point(visibility=7)  # type: ignore[arg-type]
    same_as_json_format(point)
    infinite = data_pb2.Point(row=float("inf"))
    same_as_json_format(infinite)


def test_structs() -> None:
    value = struct_pb2.Struct()
    value.update(
        {
            "source": "bench",
            "n": 3,
            "f": 0.1,
            "tags": ["a", 2, None, True, {"deep": [[]]}],
            "empty": {},
            "none": None,
        }
    )
    expected = json_format.MessageToDict(value)
    assert typed(struct_json(value)) == typed(expected)
    assert json.dumps(struct_json(value)) == json.dumps(expected)
    value.update({"bad": float("nan")})
    with pytest.raises(ValueError, match="NaN"):
        struct_json(value)
