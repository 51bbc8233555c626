"""The boundary walk on messages alone: which values it refuses and how it names them."""

from __future__ import annotations

import math
from typing import Any

import pytest
from datasetd.v1 import common_pb2, data_pb2, input_pb2
from datasetd.v1 import dataset_version_service_pb2 as vapi
from datasetd.v1 import input_service_pb2 as api
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api.boundary import MAX_REPORTED, check_request
from service.domain.errors import InvalidArgument


def violations(message: object) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as raised:
        check_request(message)  # type: ignore[arg-type]
    return {v.field: v.description for v in raised.value.violations}


def export_request(ratios: dict[str, float]) -> vapi.ExportDatasetVersionRequest:
    split = vapi.SplitOptions(ratios=ratios)
    return vapi.ExportDatasetVersionRequest(
        app_id="a", dataset_id="d", version_id="v", options=vapi.ExportOptions(split=split)
    )


def test_valid_requests_pass() -> None:
    item = input_pb2.Input(
        id="i",
        data=data_pb2.Data(
            geo=data_pb2.Geo(geo_point=data_pb2.GeoPoint(longitude=1.5, latitude=-2))
        ),
    )
    item.data.metadata.update({"a": [1, 2.5, {"b": None}], "c": "x"})
    check_request(api.CreateInputsRequest(app_id="a", inputs=[item]))
    check_request(export_request({"train": 0.8, "val": 0.2}))


def test_a_map_value_is_named_by_its_key() -> None:
    found = violations(export_request({"train": 0.8, 'we"ird': math.inf}))
    assert found == {'options.split.ratios["we\\"ird"]': "must be a finite number, not inf"}


def test_float_fields_of_nested_messages_are_checked() -> None:
    concept = data_pb2.Concept(id="cat", value=math.nan)
    item = input_pb2.Input(id="i", data=data_pb2.Data(concepts=[concept, concept]))
    found = violations(api.CreateInputsRequest(app_id="a", inputs=[item]))
    assert set(found) == {"inputs[0].data.concepts[0].value", "inputs[0].data.concepts[1].value"}


def test_json_paths_follow_structs_lists_and_nested_values() -> None:
    item = input_pb2.Input(id="i")
    item.data.metadata.update({"outer": {"list": [0, [1, -math.inf]]}, "n": math.nan})
    found = violations(api.CreateInputsRequest(app_id="a", inputs=[item]))
    assert set(found) == {
        'inputs[0].data.metadata["outer"]["list"][1][1]',
        'inputs[0].data.metadata["n"]',
    }


def test_repeated_enums_name_the_index_and_list_the_allowed_values() -> None:
    hostile = common_pb2.InputFilter(
        media_types=[common_pb2.MEDIA_TYPE_TEXT, common_pb2.MediaType.ValueType(-5)]
    )
    found = violations(api.ListInputsRequest(app_id="a", filter=hostile))
    description = found["filter.media_types[1]"]
    assert description.startswith("unknown MediaType value -5; allowed: ")
    for value in common_pb2.MediaType.values():
        assert f"({value})" in description


def test_the_report_is_capped_but_says_there_is_more() -> None:
    items = [
        input_pb2.Input(id=f"i{n}", data=data_pb2.Data(concepts=[data_pb2.Concept(value=math.nan)]))
        for n in range(MAX_REPORTED * 3)
    ]
    with pytest.raises(InvalidArgument) as raised:
        check_request(api.CreateInputsRequest(app_id="a", inputs=items))
    assert len(raised.value.violations) == MAX_REPORTED
    assert raised.value.message.endswith(f"(only the first {MAX_REPORTED} are listed)")


def test_a_refused_field_is_not_walked_into() -> None:
    # Regions in an input patch are refused as a whole: the NaN inside is not reported
    # on top.
    region = data_pb2.Region(
        region_info=data_pb2.RegionInfo(bounding_box=data_pb2.BoundingBox(top_row=math.nan))
    )
    item = input_pb2.Input(id="i", data=data_pb2.Data(regions=[region]))
    found = violations(api.UpdateInputsRequest(app_id="a", inputs=[item]))
    assert list(found) == ["inputs[0].data.regions"]
    assert "CreateAnnotations" in found["inputs[0].data.regions"]
    # CreateInputs takes them (as the input's annotation): the NaN is found by its path.
    found = violations(api.CreateInputsRequest(app_id="a", inputs=[item]))
    assert list(found) == ["inputs[0].data.regions[0].region_info.bounding_box.top_row"]


json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True),
    # Strings holding the byte pattern of a non-finite double (the scan's false positives).
    st.sampled_from(["\x11abcdef\xf0\x7f", "\x11\x00\x00\x00\x00\x00\x00\xf8\x7f"]),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


def _non_finite(value: object) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


@settings(max_examples=300, derandomize=True, database=None)
@given(st.dictionaries(st.text(max_size=5), json_values, max_size=5))
def test_metadata_is_refused_exactly_when_it_holds_a_non_finite_number(
    metadata: dict[str, Any],
) -> None:
    item = input_pb2.Input(id="i")
    item.data.metadata.update(metadata)
    request = api.CreateInputsRequest(app_id="a", inputs=[item])
    if _non_finite(metadata):
        found = violations(request)
        assert found and all(p.startswith("inputs[0].data.metadata[") for p in found)
    else:
        check_request(request)
