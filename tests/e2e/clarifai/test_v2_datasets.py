"""clarifai.api.V2 dataset RPCs through clarifai-grpc's own stub on a real channel."""

from __future__ import annotations

from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2

from tests.conftest import Caller
from tests.e2e.clarifai.v2 import scope

SUCCESS = status_code_pb2.SUCCESS


async def test_datasets_roundtrip_and_pages(v2: service_pb2_grpc.V2Stub, caller: Caller) -> None:
    made = await v2.PostDatasets(
        service_pb2.PostDatasetsRequest(
            user_app_id=scope(caller),
            datasets=[
                resources_pb2.Dataset(id=f"d{i}", description=f"number {i}") for i in range(5)
            ],
        ),
        metadata=caller.metadata,
    )
    assert made.status.code == SUCCESS, made.status
    assert [d.id for d in made.datasets] == [f"d{i}" for i in range(5)]
    got = await v2.GetDataset(
        service_pb2.GetDatasetRequest(user_app_id=scope(caller), dataset_id="d3"),
        metadata=caller.metadata,
    )
    assert got.status.code == SUCCESS and got.dataset.description == "number 3"
    seen: list[str] = []
    for page in range(1, 5):
        listed = await v2.ListDatasets(
            service_pb2.ListDatasetsRequest(
                user_app_id=scope(caller),
                page=page,
                per_page=2,
                sort_by_id=True,
                sort_ascending=True,
            ),
            metadata=caller.metadata,
        )
        assert listed.status.code == SUCCESS
        seen += [d.id for d in listed.datasets]
    assert seen == [f"d{i}" for i in range(5)]


async def test_errors_are_in_band(v2: service_pb2_grpc.V2Stub, caller: Caller) -> None:
    missing = await v2.GetDataset(
        service_pb2.GetDatasetRequest(user_app_id=scope(caller), dataset_id="nope"),
        metadata=caller.metadata,
    )
    assert missing.status.code == status_code_pb2.CONN_DOES_NOT_EXIST, missing.status
    bad_key = await v2.GetDataset(
        service_pb2.GetDatasetRequest(user_app_id=scope(caller), dataset_id="nope"),
        metadata=(("authorization", "Key not-a-key-at-all-1234"),),
    )
    assert bad_key.status.code == status_code_pb2.CONN_KEY_INVALID, bad_key.status
    other = await v2.ListModels(
        service_pb2.ListModelsRequest(user_app_id=scope(caller)), metadata=caller.metadata
    )
    assert other.status.code == status_code_pb2.NOT_IMPLEMENTED
    assert "not supported by datasetd" in other.status.description.lower()
