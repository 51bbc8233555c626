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
from datasetd.v1 import (
    data_pb2,
    dataset_pb2,
    dataset_service_pb2_grpc,
    dataset_version_pb2,
    dataset_version_service_pb2_grpc,
    errors_pb2,
    input_pb2,
    input_service_pb2_grpc,
)
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import dataset_version_service_pb2 as vapi
from datasetd.v1 import input_service_pb2 as api
from PIL import Image

from service.storage.blobs import REFERENCED, ContentAddressedBlobStore
from service.storage.db import Database
from tests.conftest import Caller, Stack, new_caller, object_store, stack_env
from tests.e2e.test_versions import IN_PROGRESS, READY, get_version, metrics_of, table_locked
from tests.processes import ServerProcess, clean_env, run_server, stub_for

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


VERSION_INPUTS = 1500
TAKEOVER_TIMEOUT_SECONDS = 60.0


async def _version_state(db: Database, app: str, version_id: str) -> tuple[str, int, int, int]:
    """(status, percent, members, members without content) of the version."""
    async with db.connection() as conn:
        row = await conn.fetchrow(
            "SELECT v.status, v.percent, count(vi.position) AS members,"
            " count(vi.position) FILTER (WHERE vi.data IS NULL) AS unbuilt"
            " FROM dataset_versions v LEFT JOIN version_inputs vi"
            " ON (vi.app_id, vi.dataset_id, vi.version_id) = (v.app_id, v.dataset_id, v.id)"
            " WHERE v.app_id = $1 AND v.dataset_id = 'big' AND v.id = $2"
            " GROUP BY v.status, v.percent",
            app,
            version_id,
        )
    assert row is not None
    return row["status"], row["percent"], row["members"], row["unbuilt"]


async def _kill(server: ServerProcess, db: Database, app: str) -> None:
    server.process.send_signal(signal.SIGKILL)
    await server.process.wait()
    status, _, members, unbuilt = await _version_state(db, app, "v1")
    assert members == VERSION_INPUTS
    # Pages commit one by one, but READY comes only with every member captured.
    assert not (status == "ready" and unbuilt), (status, unbuilt)


async def _create_inputs_and_version(server: ServerProcess, db: Database, caller: Caller) -> None:
    """1,500 text inputs in "big", then version v1, killed while its build is IN_PROGRESS."""
    app = caller.app_id
    async with grpc.aio.insecure_channel(server.address) as channel:
        datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        stub = input_service_pb2_grpc.InputServiceStub(channel)
        versions = dataset_version_service_pb2_grpc.DatasetVersionServiceStub(channel)
        await datasets.CreateDataset(
            dapi.CreateDatasetRequest(app_id=app, dataset=dataset_pb2.Dataset(id="big")),
            metadata=caller.metadata,
        )
        for start in range(0, VERSION_INPUTS, BATCH):
            items = [
                input_pb2.Input(
                    id=f"t{i}",
                    data=data_pb2.Data(text=data_pb2.Text(raw=f"text number {i}")),
                    dataset_ids=["big"],
                )
                for i in range(start, min(start + BATCH, VERSION_INPUTS))
            ]
            await stub.CreateInputs(
                api.CreateInputsRequest(app_id=app, inputs=items), metadata=caller.metadata
            )
        # The build stops at its first read of annotations: IN_PROGRESS, no page stored.
        async with table_locked(db, "annotations"):
            version = dataset_version_pb2.DatasetVersion(id="v1")
            await versions.CreateDatasetVersion(
                vapi.CreateDatasetVersionRequest(app_id=app, dataset_id="big", version=version),
                metadata=caller.metadata,
            )
            deadline = asyncio.get_running_loop().time() + 30
            while (await get_version(versions, caller, "big", "v1")).status.code != IN_PROGRESS:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
            await _kill(server, db, app)


async def _restart_until_ready(
    env: dict[str, str], db: Database, caller: Caller, job_id: int, kills: list[str]
) -> dataset_version_pb2.DatasetVersion:
    """Restarts the server until v1 is READY. The job is taken over once the dead process's
    lease expires (by the new process, or by the test's in-process server, whichever claims
    first). While the new process holds it, it is killed once more, after a page was stored,
    if that moment is seen before the build ends."""
    deadline = asyncio.get_running_loop().time() + TAKEOVER_TIMEOUT_SECONDS
    while True:
        async with run_server(env) as server, grpc.aio.insecure_channel(server.address) as channel:
            versions = dataset_version_service_pb2_grpc.DatasetVersionServiceStub(channel)
            while True:
                version = await get_version(versions, caller, "big", "v1")
                if version.status.code == READY:
                    return version
                assert asyncio.get_running_loop().time() < deadline, version.status
                async with db.connection() as conn:
                    holder = await conn.fetchval("SELECT locked_by FROM jobs WHERE id = $1", job_id)
                mine = holder is not None and f":{server.pid}:" in holder
                if len(kills) < 2 and mine and version.status.percent_completed > 0:
                    await _kill(server, db, caller.app_id)
                    kills.append(f"at {version.status.percent_completed}%")
                    break
                await asyncio.sleep(0.01)


async def test_sigkill_during_version_build_never_leaves_a_partial_ready_version(
    stack: Stack, db: Database
) -> None:
    caller = await new_caller(db)
    app = caller.app_id
    env = {
        **clean_env(),
        **{k: v for k, v in stack_env(stack).items() if k.startswith("DATASETD_")},
        "DATASETD_JOB_LEASE": "2s",
        "DATASETD_MAINTENANCE_INTERVAL": "1h",
        "DATASETD_LOG_LEVEL": "WARNING",
    }
    async with run_server(env) as server:
        await _create_inputs_and_version(server, db, caller)
    kills = ["before the first page"]
    async with db.connection() as conn:
        job_id = await conn.fetchval(
            "SELECT job_id FROM dataset_versions WHERE app_id = $1 AND id = 'v1'", app
        )
    version = await _restart_until_ready(env, db, caller, job_id, kills)

    print(f"build killed {kills}")
    assert metrics_of(version)["inputs_count"] == VERSION_INPUTS
    assert await _version_state(db, app, "v1") == ("ready", 100, VERSION_INPUTS, 0)
    async with db.connection() as conn:
        rows = await conn.fetch(
            "SELECT input_id, data, content_hash FROM version_inputs"
            " WHERE app_id = $1 AND dataset_id = 'big' AND version_id = 'v1'",
            app,
        )
        input_count = await conn.fetchval(
            "SELECT input_count FROM dataset_versions WHERE app_id = $1 AND id = 'v1'", app
        )
        job = await conn.fetchrow("SELECT status, attempts FROM jobs WHERE id = $1", job_id)
    assert input_count == VERSION_INPUTS
    assert sorted(r["input_id"] for r in rows) == sorted(f"t{i}" for i in range(VERSION_INPUTS))
    for row in rows:
        assert row["data"] is not None
        assert row["content_hash"] == hashlib.sha256(row["data"]).digest()
    # Claimed by each killed process, then once more after the last lease expired.
    assert job is not None
    assert job["status"] == "succeeded"
    assert job["attempts"] >= len(kills) + 1, (job["attempts"], kills)
