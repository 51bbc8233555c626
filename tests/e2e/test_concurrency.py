"""Concurrent uploads into a dataset while it is deleted: consistent, clear codes."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from datasetd.v1 import data_pb2, dataset_pb2, errors_pb2, input_pb2
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import input_service_pb2 as api

from service.storage.db import Database
from tests.conftest import Caller
from tests.helpers import png_bytes

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

# Codes a caller may see when its dataset disappears under it; never INTERNAL.
CLEAR = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION}


@pytest.mark.parametrize("force", [False, True])
async def test_uploads_racing_a_dataset_delete_stay_consistent(
    inputs: Inputs, datasets: Datasets, caller: Caller, db: Database, force: bool
) -> None:
    await datasets.CreateDataset(
        dapi.CreateDatasetRequest(app_id=caller.app_id, dataset=dataset_pb2.Dataset(id="busy")),
        metadata=caller.metadata,
    )

    def batch(worker: int) -> api.CreateInputsRequest:
        return api.CreateInputsRequest(
            app_id=caller.app_id,
            inputs=[
                input_pb2.Input(
                    id=f"w{worker}-{i}",
                    data=data_pb2.Data(
                        image=data_pb2.Image(base64=png_bytes(8, 8, (worker, i, 0)))
                    ),
                    dataset_ids=["busy"],
                )
                for i in range(16)
            ],
        )

    async def delete_soon() -> Any:
        await asyncio.sleep(0.1)
        return await datasets.DeleteDataset(
            dapi.DeleteDatasetRequest(app_id=caller.app_id, dataset_id="busy", force=force),
            metadata=caller.metadata,
        )

    async def upload(worker: int) -> api.CreateInputsResponse:
        # Staggered, so that some batches finish before the delete and some after.
        await asyncio.sleep(worker * 0.03)
        response: api.CreateInputsResponse = await inputs.CreateInputs(
            batch(worker), metadata=caller.metadata
        )
        return response

    results = await asyncio.gather(
        *(upload(w) for w in range(8)), delete_soon(), return_exceptions=True
    )
    for result in results:
        if isinstance(result, grpc.aio.AioRpcError):
            assert result.code() in CLEAR, result
        else:
            assert not isinstance(result, BaseException), result
    created = {
        r.input_id
        for result in results[:-1]
        if isinstance(result, api.CreateInputsResponse)
        for r in result.results
        if r.outcome == errors_pb2.ITEM_OUTCOME_CREATED
    }
    async with db.connection() as conn:
        stored = {
            r["id"]
            for r in await conn.fetch("SELECT id FROM inputs WHERE app_id = $1", caller.app_id)
        }
        members = await conn.fetch(
            "SELECT m.input_id, d.deleted_at FROM dataset_inputs m JOIN datasets d"
            " ON d.app_id = m.app_id AND d.id = m.dataset_id WHERE m.app_id = $1",
            caller.app_id,
        )
        dataset = await conn.fetchrow(
            "SELECT deleted_at FROM datasets WHERE app_id = $1 AND id = 'busy'", caller.app_id
        )
    # What was acknowledged is stored; nothing else is.
    assert stored == created
    if force:
        assert dataset is None and members == []
    else:
        assert dataset is not None and dataset["deleted_at"] is not None
        # Inputs added before the delete keep their membership (undelete restores them).
        assert {m["input_id"] for m in members} <= created
