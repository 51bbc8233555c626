from __future__ import annotations

from datasetd.v1 import dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc

from tests.conftest import Caller


async def test_create_and_get(
    datasets: dataset_service_pb2_grpc.DatasetServiceStub, caller: Caller
) -> None:
    created = await datasets.CreateDataset(
        dataset_service_pb2.CreateDatasetRequest(
            app_id=caller.app_id, dataset=dataset_pb2.Dataset(id="ds1", description="first")
        ),
        metadata=caller.metadata,
    )
    assert created.dataset.id == "ds1"
    got = await datasets.GetDataset(
        dataset_service_pb2.GetDatasetRequest(app_id=caller.app_id, dataset_id="ds1"),
        metadata=caller.metadata,
    )
    assert got.dataset.description == "first"
