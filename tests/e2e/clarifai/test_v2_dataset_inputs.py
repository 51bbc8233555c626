"""clarifai.api.V2 dataset input RPCs through clarifai-grpc's own stub on a real channel,
and the SDK's merge_dataset; membership is read back through the native API."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import input_service_pb2 as iapi

from service.app import Running
from tests.conftest import Caller
from tests.e2e.clarifai.v2 import scope
from tests.e2e.test_inputs import create, image_input, new_dataset, text_input

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

SUCCESS = status_code_pb2.SUCCESS
ADDED = status_code_pb2.DATASET_INPUT_SUCCESS
MISSING = status_code_pb2.CONN_DOES_NOT_EXIST
INVALID = status_code_pb2.CONN_INVALID_REQUEST


def by_id(*ids: str) -> list[resources_pb2.DatasetInput]:
    return [resources_pb2.DatasetInput(input=resources_pb2.Input(id=i)) for i in ids]


async def members(stub: Datasets, caller: Caller, dataset_id: str) -> list[str]:
    """The dataset's input ids, read through the native API."""
    listed = await stub.ListDatasetInputs(
        dapi.ListDatasetInputsRequest(app_id=caller.app_id, dataset_id=dataset_id, page_size=1000),
        metadata=caller.metadata,
    )
    return [m.input.id for m in listed.dataset_inputs]


async def setup(inputs: Inputs, datasets: Datasets, caller: Caller, *dataset_ids: str) -> None:
    for dataset_id in dataset_ids:
        await new_dataset(datasets, caller, dataset_id)
    made = await create(
        inputs,
        caller,
        [
            image_input("i1"),
            image_input("i2", (1, 2, 3)),
            text_input("i3", "x"),
            text_input("i4", "y"),
        ],
    )
    assert made.created_count == 4, made


async def test_post_dataset_inputs_reports_each_item(
    v2: service_pb2_grpc.V2Stub, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await setup(inputs, datasets, caller, "a")
    with_data = resources_pb2.DatasetInput(
        input=resources_pb2.Input(
            id="i3", data=resources_pb2.Data(text=resources_pb2.Text(raw="new"))
        )
    )
    mixed = await v2.PostDatasetInputs(
        service_pb2.PostDatasetInputsRequest(
            user_app_id=scope(caller),
            dataset_id="a",
            dataset_inputs=[*by_id("i1", "i2", "ghost", ""), with_data],
        ),
        metadata=caller.metadata,
    )
    assert mixed.status.code == status_code_pb2.MIXED_STATUS, mixed.status
    codes = [item.input.status.code for item in mixed.dataset_inputs]
    assert codes == [ADDED, ADDED, MISSING, *[status_code_pb2.INPUT_INVALID_ARGUMENT] * 2]
    assert [item.input.id for item in mixed.dataset_inputs] == ["i1", "i2", "ghost", "", "i3"]
    assert "'ghost'" in mixed.dataset_inputs[2].input.status.details
    assert "dataset_inputs[3].input.id" in mixed.dataset_inputs[3].input.status.details
    assert "dataset_inputs[4].input.data" in mixed.dataset_inputs[4].input.status.details
    assert await members(datasets, caller, "a") == ["i1", "i2"]

    none = await v2.PostDatasetInputs(
        service_pb2.PostDatasetInputsRequest(
            user_app_id=scope(caller), dataset_id="a", dataset_inputs=by_id("ghost")
        ),
        metadata=caller.metadata,
    )
    assert none.status.code == status_code_pb2.FAILURE, none.status
    again = await v2.PostDatasetInputs(
        service_pb2.PostDatasetInputsRequest(
            user_app_id=scope(caller), dataset_id="a", dataset_inputs=by_id("i2", "i4")
        ),
        metadata=caller.metadata,
    )
    assert again.status.code == SUCCESS, again.status
    assert [item.input.status.code for item in again.dataset_inputs] == [ADDED, ADDED]
    assert await members(datasets, caller, "a") == ["i1", "i2", "i4"]


async def test_list_get_delete_dataset_inputs(
    v2: service_pb2_grpc.V2Stub, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await setup(inputs, datasets, caller, "a")
    await datasets.AddDatasetInputs(
        dapi.AddDatasetInputsRequest(
            app_id=caller.app_id, dataset_id="a", input_ids=["i3", "i1", "i2"]
        ),
        metadata=caller.metadata,
    )
    pages: list[list[str]] = []
    for page in range(1, 5):
        listed = await v2.ListDatasetInputs(
            service_pb2.ListDatasetInputsRequest(
                user_app_id=scope(caller), dataset_id="a", page=page, per_page=2
            ),
            metadata=caller.metadata,
        )
        assert listed.status.code == SUCCESS, listed.status
        pages.append([m.input.id for m in listed.dataset_inputs])
    # Oldest member first, as the native listing; past the end, an empty page.
    native_order = await members(datasets, caller, "a")
    assert pages == [native_order[:2], native_order[2:], [], []]
    listed = await v2.ListDatasetInputs(
        service_pb2.ListDatasetInputsRequest(user_app_id=scope(caller), dataset_id="a"),
        metadata=caller.metadata,
    )
    first = listed.dataset_inputs[0]
    assert first.created_at.seconds > 0
    # Media are served by reference, never as bytes (the SDK rebuilds inputs from dicts).
    image = next(m.input for m in listed.dataset_inputs if m.input.id == "i1").data.image
    assert image.url and not image.base64

    got = await v2.GetDatasetInput(
        service_pb2.GetDatasetInputRequest(
            user_app_id=scope(caller), dataset_id="a", input_id="i3"
        ),
        metadata=caller.metadata,
    )
    assert got.status.code == SUCCESS, got.status
    assert got.dataset_input.input.id == "i3"
    assert got.dataset_input.input.data.text.url
    not_member = await v2.GetDatasetInput(
        service_pb2.GetDatasetInputRequest(
            user_app_id=scope(caller), dataset_id="a", input_id="i4"
        ),
        metadata=caller.metadata,
    )
    assert not_member.status.code == MISSING, not_member.status

    deleted = await v2.DeleteDatasetInputs(
        service_pb2.DeleteDatasetInputsRequest(
            user_app_id=scope(caller), dataset_id="a", input_ids=["i1", "i4"]
        ),
        metadata=caller.metadata,
    )
    assert deleted.status.code == SUCCESS, deleted.status
    assert sorted(await members(datasets, caller, "a")) == ["i2", "i3"]
    # Unlinked only: the input is still in the app.
    still = await inputs.GetInput(
        iapi.GetInputRequest(app_id=caller.app_id, input_id="i1"), metadata=caller.metadata
    )
    assert still.input.id == "i1"

    empty = await v2.DeleteDatasetInputs(
        service_pb2.DeleteDatasetInputsRequest(user_app_id=scope(caller), dataset_id="a"),
        metadata=caller.metadata,
    )
    assert empty.status.code == INVALID and "input_ids" in empty.status.details, empty.status


async def test_unknown_dataset_is_does_not_exist(
    v2: service_pb2_grpc.V2Stub, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await setup(inputs, datasets, caller)
    meta = caller.metadata
    answers = [
        await v2.PostDatasetInputs(
            service_pb2.PostDatasetInputsRequest(
                user_app_id=scope(caller), dataset_id="nope", dataset_inputs=by_id("i1")
            ),
            metadata=meta,
        ),
        await v2.ListDatasetInputs(
            service_pb2.ListDatasetInputsRequest(user_app_id=scope(caller), dataset_id="nope"),
            metadata=meta,
        ),
        await v2.GetDatasetInput(
            service_pb2.GetDatasetInputRequest(
                user_app_id=scope(caller), dataset_id="nope", input_id="i1"
            ),
            metadata=meta,
        ),
        await v2.DeleteDatasetInputs(
            service_pb2.DeleteDatasetInputsRequest(
                user_app_id=scope(caller), dataset_id="nope", input_ids=["i1"]
            ),
            metadata=meta,
        ),
    ]
    assert [a.status.code for a in answers] == [MISSING] * 4, [a.status for a in answers]


def merge_search(*filters: resources_pb2.Filter) -> resources_pb2.Search:
    return resources_pb2.Search(query=resources_pb2.Query(filters=filters))


def of_datasets(*ids: str) -> resources_pb2.Filter:
    return resources_pb2.Filter(input=resources_pb2.Input(dataset_ids=ids))


async def test_merge_by_search_and_refused_searches(
    v2: service_pb2_grpc.V2Stub, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await setup(inputs, datasets, caller, "dst", "src1", "src2")
    for dataset_id, ids in (("dst", ["i1"]), ("src1", ["i1", "i2"]), ("src2", ["i3"])):
        await datasets.AddDatasetInputs(
            dapi.AddDatasetInputsRequest(
                app_id=caller.app_id, dataset_id=dataset_id, input_ids=ids
            ),
            metadata=caller.metadata,
        )
    merged = await v2.PostDatasetInputs(
        service_pb2.PostDatasetInputsRequest(
            user_app_id=scope(caller),
            dataset_id="dst",
            search=merge_search(of_datasets("src1", "src2")),
        ),
        metadata=caller.metadata,
    )
    assert merged.status.code == SUCCESS, merged.status
    assert not merged.dataset_inputs and not merged.HasField("bulk_operation")
    assert sorted(await members(datasets, caller, "dst")) == ["i1", "i2", "i3"]
    assert sorted(await members(datasets, caller, "src1")) == ["i1", "i2"]

    refused = {
        "search.query.filters[0].input.id": merge_search(
            resources_pb2.Filter(input=resources_pb2.Input(id="i1", dataset_ids=["src1"]))
        ),
        "search.query.filters[0].annotation": merge_search(
            resources_pb2.Filter(annotation=resources_pb2.Annotation(input_id="i1"))
        ),
        "search.query.ranks": resources_pb2.Search(
            query=resources_pb2.Query(
                filters=[of_datasets("src1")], ranks=[resources_pb2.Rank(negate=True)]
            )
        ),
        "search.query.filters": merge_search(of_datasets("src1"), of_datasets("src2")),
        "search.query.filters[0].input.dataset_ids": merge_search(
            resources_pb2.Filter(input=resources_pb2.Input(), negate=False)
        ),
        "search.id": resources_pb2.Search(id="saved"),
    }
    for field_name, search in refused.items():
        answer = await v2.PostDatasetInputs(
            service_pb2.PostDatasetInputsRequest(
                user_app_id=scope(caller), dataset_id="dst", search=search
            ),
            metadata=caller.metadata,
        )
        assert answer.status.code == INVALID, (field_name, answer.status)
        assert field_name in answer.status.details, (field_name, answer.status)
    both = await v2.PostDatasetInputs(
        service_pb2.PostDatasetInputsRequest(
            user_app_id=scope(caller),
            dataset_id="dst",
            dataset_inputs=by_id("i4"),
            search=merge_search(of_datasets("src1")),
        ),
        metadata=caller.metadata,
    )
    assert both.status.code == INVALID and "dataset_inputs" in both.status.details
    unknown = await v2.PostDatasetInputs(
        service_pb2.PostDatasetInputsRequest(
            user_app_id=scope(caller), dataset_id="dst", search=merge_search(of_datasets("nope"))
        ),
        metadata=caller.metadata,
    )
    assert unknown.status.code == MISSING, unknown.status
    assert sorted(await members(datasets, caller, "dst")) == ["i1", "i2", "i3"]


async def test_sdk_merge_dataset(
    server: Running,
    inputs: Inputs,
    datasets: Datasets,
    caller: Caller,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    await setup(inputs, datasets, caller, "dst", "src")
    await datasets.AddDatasetInputs(
        dapi.AddDatasetInputsRequest(
            app_id=caller.app_id, dataset_id="src", input_ids=["i2", "i4"]
        ),
        metadata=caller.metadata,
    )
    home = tmp_path_factory.mktemp("home")

    def merge() -> None:
        # The SDK is synchronous and the server runs in this event loop: in a thread.
        from clarifai.client.dataset import Dataset

        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HOME", str(home))
            Dataset(
                dataset_id="dst",
                user_id="me",
                app_id=caller.app_id,
                pat=caller.key,
                base_url=f"http://127.0.0.1:{server.port}",
            ).merge_dataset(merge_dataset_id="src")

    await asyncio.to_thread(merge)
    assert sorted(await members(datasets, caller, "dst")) == ["i2", "i4"]
