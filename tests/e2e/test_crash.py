"""Crash safety: SIGKILL the server in the middle of a batch upload, several times.

Every acknowledged input must be present with bytes matching their hash, a
retry with the same request id must not duplicate anything, and after the
orphan sweeper runs no unreferenced blob may remain.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import secrets
import signal
from datetime import timedelta

import grpc
from datasetd.v1 import data_pb2, dataset_pb2, errors_pb2, input_pb2, input_service_pb2_grpc
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import input_service_pb2 as api
from PIL import Image

from service.storage.blobs import REFERENCED, ContentAddressedBlobStore
from service.storage.db import Database
from tests.conftest import Stack, object_store, stack_env
from tests.processes import clean_env, run_server, stub_for

BATCH = 128


def noise_png(seed: int) -> bytes:
    """A ~100 KB PNG that does not compress, different for every seed."""
    pixels = hashlib.shake_256(seed.to_bytes(4, "big")).digest(180 * 180 * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (180, 180), pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


async def test_sigkill_during_batch_upload_loses_and_duplicates_nothing(
    stack: Stack, db: Database
) -> None:
    app = "crash-" + secrets.token_hex(4)
    key = "crash-test-key-" + secrets.token_hex(8)
    env = {
        **clean_env(),
        **{k: v for k, v in stack_env(stack).items() if k.startswith("DATASETD_")},
        "DATASETD_BOOTSTRAP_KEY": key,
        "DATASETD_BOOTSTRAP_APP": app,
        "DATASETD_MAINTENANCE_INTERVAL": "1h",
        "DATASETD_LOG_LEVEL": "WARNING",
    }
    metadata = (("authorization", f"Key {key}"),)
    images = [noise_png(i) for i in range(BATCH)]
    request = api.CreateInputsRequest(
        app_id=app,
        request_id="crash-batch-1",
        # Server-generated ids: a retry that ran twice would show up as extra inputs.
        inputs=[
            input_pb2.Input(
                title=f"img-{i}.png",
                data=data_pb2.Data(image=data_pb2.Image(base64=image)),
                dataset_ids=["crashes"],
            )
            for i, image in enumerate(images)
        ],
    )
    async with run_server(env) as server, stub_for(server.address) as datasets:
        await datasets.CreateDataset(
            dapi.CreateDatasetRequest(app_id=app, dataset=dataset_pb2.Dataset(id="crashes")),
            metadata=metadata,
        )
    outcomes = []
    # Kills land while images are probed, while blobs are PUT, around the commit,
    # and after the acknowledgement (then the retries below are replays).
    for delay in (0.05, 0.25, 0.45, 0.65, 1.5):
        async with run_server(env) as server, grpc.aio.insecure_channel(server.address) as channel:
            stub = input_service_pb2_grpc.InputServiceStub(channel)
            call = asyncio.ensure_future(stub.CreateInputs(request, metadata=metadata))
            await asyncio.sleep(delay)
            server.process.send_signal(signal.SIGKILL)
            await server.process.wait()
            try:
                await call
                outcomes.append("acknowledged")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                outcomes.append("lost")
        async with db.connection() as conn:
            stored = await conn.fetchval("SELECT count(*) FROM inputs WHERE app_id = $1", app)
        # The batch commits in one transaction: all of it or nothing, never a part.
        assert stored in (0, BATCH), (delay, stored)
        if outcomes[-1] == "acknowledged":
            assert stored == BATCH
    assert "lost" in outcomes, "no kill interrupted the batch; the test proved nothing"
    async with run_server(env) as server, grpc.aio.insecure_channel(server.address) as channel:
        stub = input_service_pb2_grpc.InputServiceStub(channel)
        response = await stub.CreateInputs(request, metadata=metadata)
        again = await stub.CreateInputs(request, metadata=metadata)
    assert again == response
    assert [r.outcome for r in response.results] == [errors_pb2.ITEM_OUTCOME_CREATED] * BATCH

    await _check_every_input_intact(db, stack, app, images, response)
    await _check_no_orphans_after_sweep(db, stack)


async def _check_every_input_intact(
    db: Database, stack: Stack, app: str, images: list[bytes], response: api.CreateInputsResponse
) -> None:
    async with db.connection() as conn:
        rows = await conn.fetch(
            "SELECT i.id, i.title, b.key, b.sha256 FROM inputs i JOIN blobs b ON b.key = i.blob_key"
            " WHERE i.app_id = $1",
            app,
        )
        members = await conn.fetchval(
            "SELECT count(*) FROM dataset_inputs WHERE app_id = $1 AND dataset_id = 'crashes'", app
        )
    assert len(rows) == BATCH
    assert sorted(r["title"] for r in rows) == sorted(f"img-{i}.png" for i in range(BATCH))
    assert {r["id"] for r in rows} == {r.input_id for r in response.results}
    assert members == BATCH
    objects = object_store(stack)
    for row in rows:
        index = int(row["title"].removeprefix("img-").removesuffix(".png"))
        stored = await objects.get(row["key"])
        assert hashlib.sha256(stored).hexdigest() == row["sha256"]
        assert stored == images[index]
    objects.close()


async def _check_no_orphans_after_sweep(db: Database, stack: Stack) -> None:
    objects = object_store(stack)
    blobs = ContentAddressedBlobStore(db, objects)
    await blobs.collect_orphans(timedelta(0), limit=100_000)
    async with db.connection() as conn:
        unreferenced = await conn.fetchval(f"SELECT count(*) FROM blobs b WHERE NOT {REFERENCED}")
        known = {r["key"] for r in await conn.fetch("SELECT key FROM blobs")}
    assert unreferenced == 0
    stored_keys = await objects.list_keys("blobs/")
    assert set(stored_keys) <= known, set(stored_keys) - known
    objects.close()
