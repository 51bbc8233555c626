"""Every request value is checked at the boundary: NaN/±inf and unknown enum numbers are
INVALID_ARGUMENT naming the field, in every RPC, and nothing is written."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from datasetd.v1 import common_pb2, data_pb2, dataset_pb2, dataset_version_pb2, input_pb2
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import dataset_version_service_pb2 as vapi
from datasetd.v1 import input_service_pb2 as api
from google.protobuf import struct_pb2

from tests.conftest import Caller
from tests.e2e.test_inputs import create, image_input, list_ids, new_dataset
from tests.helpers import call_error

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

NON_FINITE = [math.nan, math.inf, -math.inf]


def hostile_struct(number: float) -> struct_pb2.Struct:
    """A non-finite number two levels down, inside a list, beside valid values."""
    value = struct_pb2.Struct()
    value.update({"ok": 1, "deep": {"list": [1, "x", number]}})
    return value


HOSTILE_PATH = '["deep"]["list"][2]'


class Stubs:
    def __init__(self, datasets: Datasets, inputs: Inputs, versions: Versions) -> None:
        self.datasets, self.inputs, self.versions = datasets, inputs, versions


Call = Callable[[Stubs, Caller, struct_pb2.Struct], Awaitable[Any]]


async def _create_dataset(s: Stubs, c: Caller, meta: struct_pb2.Struct) -> Any:
    dataset = dataset_pb2.Dataset(id="hostile", metadata=meta)
    return await s.datasets.CreateDataset(
        dapi.CreateDatasetRequest(app_id=c.app_id, dataset=dataset), metadata=c.metadata
    )


async def _update_dataset(s: Stubs, c: Caller, meta: struct_pb2.Struct) -> Any:
    return await s.datasets.UpdateDataset(
        dapi.UpdateDatasetRequest(
            app_id=c.app_id,
            dataset=dataset_pb2.Dataset(id="ds", metadata=meta),
            action=common_pb2.PATCH_ACTION_MERGE,
        ),
        metadata=c.metadata,
    )


async def _create_version(s: Stubs, c: Caller, meta: struct_pb2.Struct) -> Any:
    return await s.versions.CreateDatasetVersion(
        vapi.CreateDatasetVersionRequest(
            app_id=c.app_id,
            dataset_id="ds",
            version=dataset_version_pb2.DatasetVersion(id="v-hostile", metadata=meta),
        ),
        metadata=c.metadata,
    )


async def _create_inputs(s: Stubs, c: Caller, meta: struct_pb2.Struct) -> Any:
    items = [image_input("fine"), image_input("hostile", color=(1, 2, 3), metadata=meta)]
    return await create(s.inputs, c, items)


async def _update_inputs(s: Stubs, c: Caller, meta: struct_pb2.Struct) -> Any:
    item = input_pb2.Input(id="in-1", data=data_pb2.Data(metadata=meta))
    return await s.inputs.UpdateInputs(
        api.UpdateInputsRequest(
            app_id=c.app_id, inputs=[item], action=common_pb2.PATCH_ACTION_MERGE
        ),
        metadata=c.metadata,
    )


async def _delete_by_filter(s: Stubs, c: Caller, meta: struct_pb2.Struct) -> Any:
    return await s.datasets.DeleteDatasetInputsByFilter(
        dapi.DeleteDatasetInputsByFilterRequest(
            app_id=c.app_id, dataset_id="ds", filter=common_pb2.InputFilter(metadata=meta)
        ),
        metadata=c.metadata,
    )


async def _list_inputs(s: Stubs, c: Caller, meta: struct_pb2.Struct) -> Any:
    return await s.inputs.ListInputs(
        api.ListInputsRequest(app_id=c.app_id, filter=common_pb2.InputFilter(metadata=meta)),
        metadata=c.metadata,
    )


# (the RPC, the path of the Struct in its request)
STRUCT_CALLS: list[tuple[Call, str]] = [
    (_create_dataset, "dataset.metadata"),
    (_update_dataset, "dataset.metadata"),
    (_create_version, "version.metadata"),
    (_create_inputs, "inputs[1].data.metadata"),
    (_update_inputs, "inputs[0].data.metadata"),
    (_delete_by_filter, "filter.metadata"),
    (_list_inputs, "filter.metadata"),
]


@pytest.fixture
async def stubs(datasets: Datasets, inputs: Inputs, versions: Versions, caller: Caller) -> Stubs:
    s = Stubs(datasets, inputs, versions)
    await new_dataset(datasets, caller, "ds")
    await create(inputs, caller, [image_input("in-1")])
    await datasets.AddDatasetInputs(
        dapi.AddDatasetInputsRequest(app_id=caller.app_id, dataset_id="ds", input_ids=["in-1"]),
        metadata=caller.metadata,
    )
    return s


@pytest.mark.parametrize("number", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("call", "path"), STRUCT_CALLS, ids=lambda v: getattr(v, "__name__", v))
async def test_non_finite_numbers_in_json_metadata_name_the_path(
    stubs: Stubs, caller: Caller, call: Call, path: str, number: float
) -> None:
    error = await call_error(call(stubs, caller, hostile_struct(number)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert list(error.fields) == [path + HOSTILE_PATH], error
    assert "finite" in error.fields[path + HOSTILE_PATH]
    # Nothing was written: no dataset, version or input, the input's metadata unchanged,
    # the dataset's member still there.
    ids = await list_ids(stubs.inputs, caller)
    assert ids == ["in-1"], ids
    got = await stubs.datasets.GetDataset(
        dapi.GetDatasetRequest(app_id=caller.app_id, dataset_id="ds"), metadata=caller.metadata
    )
    assert not got.dataset.metadata.fields
    listed = await stubs.datasets.ListDatasets(
        dapi.ListDatasetsRequest(app_id=caller.app_id), metadata=caller.metadata
    )
    assert [d.id for d in listed.datasets] == ["ds"]
    versions = await stubs.versions.ListDatasetVersions(
        vapi.ListDatasetVersionsRequest(app_id=caller.app_id, dataset_id="ds"),
        metadata=caller.metadata,
    )
    assert not versions.versions
    stored = await stubs.inputs.GetInput(
        api.GetInputRequest(app_id=caller.app_id, input_id="in-1"), metadata=caller.metadata
    )
    assert not stored.input.data.metadata.fields


@pytest.mark.parametrize("number", [999, -1, 2**31 - 1])
async def test_unknown_enum_numbers_name_the_field_and_the_allowed_values(
    stubs: Stubs, caller: Caller, number: int
) -> None:
    hostile = common_pb2.InputFilter(
        media_types=[common_pb2.MEDIA_TYPE_IMAGE, common_pb2.MediaType.ValueType(number)]
    )
    listing = await call_error(
        stubs.inputs.ListInputs(
            api.ListInputsRequest(app_id=caller.app_id, filter=hostile), metadata=caller.metadata
        )
    )
    deleting = await call_error(
        stubs.datasets.DeleteDatasetInputsByFilter(
            dapi.DeleteDatasetInputsByFilterRequest(
                app_id=caller.app_id, dataset_id="ds", filter=hostile
            ),
            metadata=caller.metadata,
        )
    )
    for error in (listing, deleting):
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
        description = error.fields["filter.media_types[1]"]
        assert f"value {number}" in description
        assert "MEDIA_TYPE_IMAGE (" in description, description
    assert await list_ids(stubs.inputs, caller, dataset_id="ds") == ["in-1"]


async def test_an_unknown_patch_action_is_refused_before_the_domain(
    stubs: Stubs, caller: Caller
) -> None:
    error = await call_error(
        stubs.datasets.UpdateDataset(
            dapi.UpdateDatasetRequest(
                app_id=caller.app_id,
                dataset=dataset_pb2.Dataset(id="ds", description="x"),
                action=77,  # type: ignore[arg-type]
            ),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "value 77" in error.fields["action"]


async def test_a_streamed_upload_header_is_checked_like_a_unary_request(
    stubs: Stubs, caller: Caller
) -> None:
    header = api.UploadInputHeader(
        app_id=caller.app_id,
        input=input_pb2.Input(id="streamed", data=data_pb2.Data(metadata=hostile_struct(math.nan))),
    )

    async def messages() -> Any:
        yield api.UploadInputRequest(header=header)

    error = await call_error(stubs.inputs.UploadInput(messages(), metadata=caller.metadata))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert list(error.fields) == ["header.input.data.metadata" + HOSTILE_PATH]
    assert await list_ids(stubs.inputs, caller) == ["in-1"]
