"""Crash safety: SIGKILL the server in the middle of a batch upload, several times.

Every acknowledged input must be present with bytes matching their hash, a
retry with the same request id must not duplicate anything, and after the
orphan sweeper runs no unreferenced blob may remain. A server killed while it creates a
version leaves no trace of it or all of it, READY.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import secrets
import signal
from datetime import timedelta
from typing import TYPE_CHECKING, Any

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
from tests.e2e.test_versions import READY, get_version, metrics_of, table_locked
from tests.processes import ServerProcess, clean_env, run_server, stub_for

if TYPE_CHECKING:
    from datasetd.v1.dataset_version_service_pb2_grpc import DatasetVersionServiceAsyncStub

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
# The statement CreateDatasetVersion runs after it recorded the members (the ontology
# governing the dataset, storage/ontologies.py GOVERNING): a kill while it waits finds the
# version's row and its 1,500 references written, uncommitted.
GOVERNING_READ = "%FROM project_datasets pd%"
SETTLE_SECONDS = 30.0

# Per version of "big": its row, its references and whether each one's content is there
# and is what its hash says.
VERSION_ROWS = """
SELECT v.id, v.status, v.percent, v.input_count, count(vi.position) AS members,
       count(vi.position) FILTER (WHERE c.hash IS NULL OR sha256(c.data) <> c.hash) AS broken
FROM dataset_versions v
LEFT JOIN version_inputs vi
    ON (vi.app_id, vi.dataset_id, vi.version_id) = (v.app_id, v.dataset_id, v.id)
LEFT JOIN input_contents c ON c.hash = vi.content_hash
WHERE v.app_id = $1 AND v.dataset_id = 'big'
GROUP BY v.id, v.status, v.percent, v.input_count
"""
ORPHAN_MEMBERS = """
SELECT count(*) FROM version_inputs vi
WHERE vi.app_id = $1 AND NOT EXISTS (
    SELECT 1 FROM dataset_versions v
    WHERE (v.app_id, v.dataset_id, v.id) = (vi.app_id, vi.dataset_id, vi.version_id))
"""


async def _versions(db: Database, app: str) -> dict[str, tuple[str, int, int, int, int]]:
    """(status, percent, input_count, members, members without intact content) by version."""
    async with db.connection() as conn:
        rows = await conn.fetch(VERSION_ROWS, app)
        assert await conn.fetchval(ORPHAN_MEMBERS, app) == 0
    return {
        r["id"]: (r["status"], r["percent"], r["input_count"], r["members"], r["broken"])
        for r in rows
    }


def _complete(state: tuple[str, int, int, int, int]) -> bool:
    return state == ("ready", 100, VERSION_INPUTS, VERSION_INPUTS, 0)


async def _create_inputs(server: ServerProcess, caller: Caller) -> None:
    """1,500 text inputs in dataset "big"."""
    app = caller.app_id
    async with grpc.aio.insecure_channel(server.address) as channel:
        datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        stub = input_service_pb2_grpc.InputServiceStub(channel)
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


def version_stub(channel: grpc.aio.Channel) -> DatasetVersionServiceAsyncStub:
    return dataset_version_service_pb2_grpc.DatasetVersionServiceStub(channel)


async def _create(
    versions: DatasetVersionServiceAsyncStub,
    caller: Caller,
    version_id: str,
) -> vapi.CreateDatasetVersionResponse:
    version = dataset_version_pb2.DatasetVersion(id=version_id)
    response: vapi.CreateDatasetVersionResponse = await versions.CreateDatasetVersion(
        vapi.CreateDatasetVersionRequest(app_id=caller.app_id, dataset_id="big", version=version),
        metadata=caller.metadata,
    )
    return response


async def _backend_waiting(db: Database, pattern: str) -> int:
    """The server's backend blocked on a lock in a statement matching `pattern`."""
    deadline = asyncio.get_running_loop().time() + SETTLE_SECONDS
    while True:
        async with db.connection() as conn:
            pid = await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE $1 AND pid <> pg_backend_pid()",
                pattern,
            )
        if pid is not None:
            return int(pid)
        assert asyncio.get_running_loop().time() < deadline, "the creation never got there"
        await asyncio.sleep(0.02)


async def _backend_gone(db: Database, pid: int) -> None:
    deadline = asyncio.get_running_loop().time() + SETTLE_SECONDS
    while True:
        async with db.connection() as conn:
            if not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                return
        assert asyncio.get_running_loop().time() < deadline, f"backend {pid} still there"
        await asyncio.sleep(0.05)


async def _kill(server: ServerProcess, call: asyncio.Future[Any]) -> str:
    server.process.send_signal(signal.SIGKILL)
    await server.process.wait()
    try:
        await call
        return "acknowledged"
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        return "lost"


async def test_sigkill_during_version_creation_leaves_no_version_or_a_complete_ready_one(
    stack: Stack, db: Database
) -> None:
    """A version is READY when CreateDatasetVersion returns, in one transaction: a server
    killed at any moment of it leaves either no trace of the version or all of it (every
    member with its content, the metrics), never a partial or a building one."""
    caller = await new_caller(db)
    app = caller.app_id
    env = {
        **clean_env(),
        **{k: v for k, v in stack_env(stack).items() if k.startswith("DATASETD_")},
        "DATASETD_MAINTENANCE_INTERVAL": "1h",
        "DATASETD_LOG_LEVEL": "WARNING",
    }
    async with run_server(env) as server:
        await _create_inputs(server, caller)

    # Killed while the creation waits, its members recorded: nothing of v1 remains.
    async with run_server(env) as server, grpc.aio.insecure_channel(server.address) as channel:
        versions = version_stub(channel)
        async with table_locked(db, "project_datasets"):
            call = asyncio.ensure_future(_create(versions, caller, "v1"))
            backend = await _backend_waiting(db, GOVERNING_READ)
            # It has written the members (uncommitted, invisible here).
            async with db.connection() as conn:
                assert await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE pid = $1 AND mode = 'RowExclusiveLock'"
                    " AND relation = 'version_inputs'::regclass",
                    backend,
                )
            assert await _kill(server, call) == "lost"
        # Its transaction ends (rolled back) once it finds its client gone.
        await _backend_gone(db, backend)
    assert await _versions(db, app) == {}

    # Kills at moments of the creation's course the test does not choose.
    outcomes: list[str] = []
    for round_, delay in enumerate((0.05, 0.15, 0.3, 0.5, 0.8, 1.5, 4.0)):
        async with run_server(env) as server, grpc.aio.insecure_channel(server.address) as channel:
            versions = version_stub(channel)
            call = asyncio.ensure_future(_create(versions, caller, f"r{round_}"))
            await asyncio.sleep(delay)
            outcomes.append(await _kill(server, call))
        await asyncio.sleep(0.5)
        found = await _versions(db, app)
        assert set(found) <= {f"r{n}" for n in range(round_ + 1)}, found
        assert all(_complete(state) for state in found.values()), found
        if outcomes[-1] == "acknowledged":
            assert f"r{round_}" in found
    print(f"creations killed: {outcomes}")

    # A creation that nothing interrupts, and the retry of v1: READY, complete.
    async with run_server(env) as server, grpc.aio.insecure_channel(server.address) as channel:
        versions = version_stub(channel)
        created = await _create(versions, caller, "v1")
        assert created.version.status.code == READY
        assert metrics_of(created.version)["inputs_count"] == VERSION_INPUTS
        assert await get_version(versions, caller, "big", "v1") is not None
    found = await _versions(db, app)
    assert _complete(found["v1"]) and all(_complete(state) for state in found.values()), found
    async with db.connection() as conn:
        members = await conn.fetch(
            "SELECT vi.input_id, c.data FROM version_inputs vi"
            " JOIN input_contents c ON c.hash = vi.content_hash"
            " WHERE vi.app_id = $1 AND vi.dataset_id = 'big' AND vi.version_id = 'v1'",
            app,
        )
        builds = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE app_id = $1 AND kind = 'build_version'", app
        )
    assert sorted(r["input_id"] for r in members) == sorted(f"t{i}" for i in range(VERSION_INPUTS))
    for row in members:
        assert input_pb2.Input.FromString(row["data"]).id == row["input_id"]
    # No build in the background: nothing was left to finish after the kills.
    assert builds == 0
