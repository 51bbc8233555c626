"""Client deadlines are honoured: a call whose deadline passes stops its database work.

The test holds a table the call needs in ACCESS EXCLUSIVE mode from its own connection,
so the server's statement waits on the lock; the call is made with a short deadline. Once
the client has DEADLINE_EXCEEDED, no statement may still be waiting for (or holding) that
table for a caller that has gone: nothing waits on a lock a moment later, and once the
lock is released nothing the call would have written appears.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import grpc
import pytest
from datasetd.v1 import (
    data_pb2,
    dataset_pb2,
    dataset_service_pb2_grpc,
    input_pb2,
    input_service_pb2_grpc,
)
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import input_service_pb2 as api

from service.app import MAINTENANCE_LOCK_ID, Running
from service.domain.jobs import JobKind
from service.storage.blobs import ContentAddressedBlobStore, content_key
from service.storage.db import Database
from service.storage.objectstore import ObjectStore
from tests.conftest import Caller, Stack, object_store
from tests.e2e.test_inputs import image_input, text_input
from tests.faults.harness import noise_png
from tests.faults.ledger import staged_uploads

DEADLINE_SECONDS = 0.5
# How long a cancelled statement may take to leave pg_stat_activity.
SETTLE_SECONDS = 2.0

WAITING = """
SELECT a.pid, a.state, a.wait_event_type, left(a.query, 200) AS query
FROM pg_stat_activity a
WHERE a.pid <> pg_backend_pid() AND a.pid <> $1 AND a.datname = current_database()
  AND a.state <> 'idle'
  AND (a.wait_event_type = 'Lock'
       OR EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted))
"""


@asynccontextmanager
async def table_locked(db: Database, table: str) -> AsyncIterator[int]:
    """Holds `table` locked against any access; yields the holder's backend pid."""
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        pid: int = await conn.fetchval("SELECT pg_backend_pid()")
        yield pid


@asynccontextmanager
async def maintenance_held(db: Database) -> AsyncIterator[None]:
    """Holds the server's maintenance lock, so that its rounds skip: their statements
    (the orphan collector reads inputs and datasets) would wait on the locked table too,
    and be taken for a statement the cancelled call left behind."""
    while True:
        async with db.exclusive(MAINTENANCE_LOCK_ID) as mine:
            if mine:
                yield
                return
        # A round is running: it ends soon.
        await asyncio.sleep(0.05)


async def embedding_idle(db: Database) -> None:
    """Waits until no embedding job is queued or running: one runs after every upload
    (the seed's too) and reads inputs, so its statement would wait on the locked table and
    be taken for one the cancelled call left behind. A cancelled call queues none."""
    deadline = asyncio.get_running_loop().time() + 60
    while await db.fetchval(EMBEDDING_JOBS):
        assert asyncio.get_running_loop().time() < deadline, "embedding jobs never ended"
        await asyncio.sleep(0.05)


EMBEDDING_JOBS = (
    f"SELECT count(*) FROM jobs WHERE kind = '{JobKind.EMBED_INPUTS.value}'"
    " AND status IN ('pending', 'running')"
)


async def waiting(db: Database, holder: int) -> list[str]:
    """Statements other than the holder's that wait on a lock."""
    async with db.pool.acquire() as conn:
        rows = await conn.fetch(WAITING, holder)
    return [f"pid {r['pid']} {r['state']} ({r['wait_event_type']}): {r['query']}" for r in rows]


async def still_waiting(db: Database, holder: int) -> list[str]:
    """The statements still waiting on a lock after SETTLE_SECONDS at most."""
    deadline = asyncio.get_running_loop().time() + SETTLE_SECONDS
    while True:
        rows = await waiting(db, holder)
        if not rows or asyncio.get_running_loop().time() > deadline:
            return rows
        await asyncio.sleep(0.05)


def media_of(tag: str) -> bytes:
    """Bytes no other call stored: whether their object has a row shows this call's work."""
    return noise_png(f"deadline/{tag}".encode(), 24)


async def unregistered(db: Database, objects: ObjectStore, media: bytes) -> bool:
    """Whether `media` are stored without the blobs row that the orphan collector goes by."""
    key = content_key(hashlib.sha256(media).hexdigest())
    row = await db.fetchval("SELECT count(*) FROM blobs WHERE key = $1", key)
    return not row and await objects.exists(key)


R = TypeVar("R")
S = TypeVar("S")


@dataclass(frozen=True)
class Run:
    """One run of a case's call: the stubs on the test's channel, the caller, a tag naming
    what the run writes, and the deadline."""

    inputs: input_service_pb2_grpc.InputServiceAsyncStub
    datasets: dataset_service_pb2_grpc.DatasetServiceAsyncStub
    caller: Caller
    tag: str
    deadline: float

    @classmethod
    def on(cls, channel: grpc.aio.Channel, caller: Caller, tag: str, deadline: float) -> Run:
        return cls(
            input_service_pb2_grpc.InputServiceStub(channel),
            dataset_service_pb2_grpc.DatasetServiceStub(channel),
            caller,
            tag,
            deadline,
        )

    @property
    def app(self) -> str:
        return self.caller.app_id

    async def unary(self, rpc: grpc.aio.UnaryUnaryMultiCallable[R, S], request: R) -> S:
        return await rpc(request, metadata=self.caller.metadata, timeout=self.deadline)


@dataclass(frozen=True)
class Case:
    table: str
    # Makes the call; returns after its outcome.
    call: Callable[[Run], Awaitable[object]]
    # Counts the call's writes, after the fact: $1 the app, $2 the run's tag (None: the
    # call writes nothing).
    written: str | None = None
    # Whether the call sends media (media_of(tag)).
    stores_media: bool = False


async def _download_input(run: Run) -> object:
    call = run.inputs.DownloadInput(
        api.DownloadInputRequest(app_id=run.app, input_id="seed"),
        metadata=run.caller.metadata,
        timeout=run.deadline,
    )
    return [m async for m in call]


async def _create_inputs(run: Run) -> object:
    return await run.unary(
        run.inputs.CreateInputs,
        api.CreateInputsRequest(
            app_id=run.app,
            request_id=f"deadline-{run.tag}",
            inputs=[
                text_input(f"late-{run.tag}", "too late"),
                input_pb2.Input(
                    id=f"late-img-{run.tag}",
                    data=data_pb2.Data(image=data_pb2.Image(base64=media_of(run.tag))),
                ),
            ],
        ),
    )


async def _upload_input(run: Run) -> object:
    media = media_of(run.tag)
    header = api.UploadInputHeader(
        app_id=run.app,
        input=input_pb2.Input(id=f"late-up-{run.tag}", data=data_pb2.Data(image=data_pb2.Image())),
        content_length=len(media),
        sha256=hashlib.sha256(media).hexdigest(),
        request_id=f"deadline-up-{run.tag}",
    )
    messages = [
        api.UploadInputRequest(header=header),
        api.UploadInputRequest(chunk=media[:100]),
        api.UploadInputRequest(chunk=media[100:]),
    ]
    return await run.inputs.UploadInput(
        iter(messages), metadata=run.caller.metadata, timeout=run.deadline
    )


async def _create_dataset(run: Run) -> object:
    return await run.unary(
        run.datasets.CreateDataset,
        dapi.CreateDatasetRequest(
            app_id=run.app,
            request_id=f"deadline-{run.tag}",
            dataset=dataset_pb2.Dataset(id=f"late-{run.tag}"),
        ),
    )


INPUTS_WRITTEN = "SELECT count(*) FROM inputs WHERE app_id = $1 AND id LIKE 'late-%' || $2::text"
DATASETS_WRITTEN = "SELECT count(*) FROM datasets WHERE app_id = $1 AND id = 'late-' || $2::text"

CASES = {
    "ListInputs": Case(
        "inputs",
        lambda run: run.unary(run.inputs.ListInputs, api.ListInputsRequest(app_id=run.app)),
    ),
    "GetInput": Case(
        "inputs",
        lambda run: run.unary(
            run.inputs.GetInput, api.GetInputRequest(app_id=run.app, input_id="seed")
        ),
    ),
    "DownloadInput": Case("inputs", _download_input),
    "CreateInputs": Case("inputs", _create_inputs, INPUTS_WRITTEN, stores_media=True),
    "UploadInput": Case("inputs", _upload_input, INPUTS_WRITTEN, stores_media=True),
    "CreateDataset": Case("datasets", _create_dataset, DATASETS_WRITTEN),
    "ListDatasets": Case(
        "datasets",
        lambda run: run.unary(run.datasets.ListDatasets, dapi.ListDatasetsRequest(app_id=run.app)),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_a_call_past_its_deadline_leaves_no_query_behind(
    name: str,
    stack: Stack,
    server: Running,
    db: Database,
    caller: Caller,
    channel: grpc.aio.Channel,
) -> None:
    case = CASES[name]
    objects = object_store(stack)
    staged_before = set(await staged_uploads(objects))
    tag = secrets.token_hex(4)
    inputs = input_service_pb2_grpc.InputServiceStub(channel)
    await inputs.CreateInputs(
        api.CreateInputsRequest(app_id=caller.app_id, inputs=[image_input("seed")]),
        metadata=caller.metadata,
    )
    await embedding_idle(db)
    async with maintenance_held(db), table_locked(db, case.table) as holder:
        started = asyncio.get_running_loop().time()
        call = asyncio.ensure_future(case.call(Run.on(channel, caller, tag, DEADLINE_SECONDS)))
        # The call reaches the table: its statement waits on the lock (else the test
        # would prove nothing about cancelling it).
        while True:
            assert not call.done(), "the call ended before it reached the locked table"
            if await waiting(db, holder):
                break
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        elapsed = asyncio.get_running_loop().time() - started
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, raised.value
        assert elapsed < DEADLINE_SECONDS + 1.0, elapsed
        # The statement the call was waiting in must be gone while the lock is still held:
        # a cancelled call must not wait for the lock to finish its work.
        leftover = await still_waiting(db, holder)
        assert not leftover, leftover
    # A streamed upload that was cut short removes its staged bytes itself (the orphan
    # collector is for crashes only).
    staged = set(await staged_uploads(objects)) - staged_before
    assert not staged, staged
    # Media the call stored before it was abandoned lost their blobs row with its
    # transaction; the orphan collector must still find them (with the default grace
    # period, so that nothing else of the session is touched): an object without a row
    # would otherwise stay in S3 forever.
    if case.stores_media:
        await ContentAddressedBlobStore(db, objects).collect_orphans(timedelta(hours=1), 1000)
        assert not await unregistered(db, objects, media_of(tag))
    objects.close()
    if case.written is not None:
        # Nothing of the abandoned call commits once the table is free again.
        await asyncio.sleep(0.3)
        assert not await db.fetchval(case.written, caller.app_id, tag)
    # The server is still fine: the same call answers once the table is free.
    await case.call(Run.on(channel, caller, tag + "b", 10.0))
