"""Clarifai ↔ native messages (service/api/clarifai/convert.py) and in-band statuses."""

from __future__ import annotations

import pytest
from clarifai_grpc.grpc.api import resources_pb2
from clarifai_grpc.grpc.api.status import status_code_pb2
from datasetd.v1 import dataset_pb2, input_pb2

from service.api.clarifai import status
from service.api.clarifai.convert import clarifai, native, native_one, unsupported
from service.domain.errors import AlreadyExists, InvalidArgument, NotFound, Violations


def test_a_resource_crosses_over_with_every_field_datasetd_has() -> None:
    sent = resources_pb2.Input(id="a")
    sent.data.image.url = "https://example.com/a.png"
    sent.data.concepts.add(id="cat", name="cat", value=1.0)
    sent.data.metadata.update({"k": [1, "x"]})
    sent.data.geo.geo_point.longitude = -122.5
    converted = native_one(sent, input_pb2.Input, "inputs[0]")
    assert converted.data.image.url == sent.data.image.url
    assert converted.data.concepts[0].id == "cat"
    assert converted.data.metadata["k"] == [1, "x"]
    assert clarifai(converted, resources_pb2.Input) == sent


def test_fields_datasetd_does_not_model_are_named_by_path() -> None:
    sent = resources_pb2.Input(id="a")
    sent.data.regions.add().data.clusters.add(id="c")
    sent.data.int_value = 3
    assert sorted(unsupported(sent, input_pb2.Input.DESCRIPTOR, "")) == [
        "data.int_value",
        "data.regions[0].data.clusters",
    ]
    violations = Violations()
    native(sent, input_pb2.Input, "inputs[2]", violations)
    with pytest.raises(InvalidArgument) as refused:
        violations.raise_if_any()
    assert {v.field for v in refused.value.violations} == {
        "inputs[2].data.int_value",
        "inputs[2].data.regions[0].data.clusters",
    }


def test_ignored_fields_are_cleared_not_refused() -> None:
    sent = resources_pb2.Dataset(id="d", user_id="me", star_count=3, description="x")
    converted = native_one(sent, dataset_pb2.Dataset, "dataset", {"user_id", "star_count"})
    assert converted.description == "x"
    assert (
        converted.SerializeToString()
        == dataset_pb2.Dataset(id="d", description="x").SerializeToString()
    )


def test_native_only_fields_do_not_reach_a_clarifai_client() -> None:
    own = dataset_pb2.Dataset(id="d", display_name="Dogs", locked=True)
    back = clarifai(own, resources_pb2.Dataset)
    assert back.SerializeToString() == resources_pb2.Dataset(id="d").SerializeToString()


def test_statuses_of_domain_errors() -> None:
    assert (
        status.of_error(NotFound.in_app("input", "app", "x")).code
        == status_code_pb2.CONN_DOES_NOT_EXIST
    )
    duplicate = status.of_error(AlreadyExists("input x exists", reason="INPUT_EXISTS"))
    assert duplicate.code == status_code_pb2.INPUT_DUPLICATE
    assert duplicate.details == "Input has a duplicate ID."
    refused = status.of_error(
        InvalidArgument.field("inputs[0].data.image.url", "must be http(s)"),
        invalid=status.INPUT_INVALID_ARGUMENT,
    )
    assert refused.code == status_code_pb2.INPUT_INVALID_ARGUMENT
    assert "inputs[0].data.image.url" in refused.details
    assert status.of_error(RuntimeError("boom")).code == status_code_pb2.INTERNAL_SERVER_ISSUE
    assert status.of_error(RuntimeError("boom")).http_status_code == 500


def test_batch_summary() -> None:
    good, bad = status_code_pb2.INPUT_DOWNLOAD_SUCCESS, status_code_pb2.INPUT_DUPLICATE
    assert status.summary([good, good]).code == status_code_pb2.SUCCESS
    assert status.summary([good, bad]).code == status_code_pb2.MIXED_STATUS
    assert status.summary([bad]).code == status_code_pb2.FAILURE
