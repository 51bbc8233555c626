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

from service.app import Running
from service.storage.blobs import ContentAddressedBlobStore, content_key
from service.storage.db import Database
from service.storage.objectstore import ObjectStore
from tests.conftest import Caller, Stack, object_store
from tests.e2e.test_inputs import image_input, text_input
from tests.faults.ledger import staged_uploads
from tests.faults.test_storm import noise_png

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


@dataclass(frozen=True)
class Case:
    table: str
    # Makes the call with the given deadline; returns after its outcome.
    call: Callable[[grpc.aio.Channel, Caller, str, float], Awaitable[object]]
    # Whether the call's writes are visible, after the fact (None: the call writes nothing).
    written: Callable[[Database, Caller, str], Awaitable[bool]] | None = None
    # Whether the call sends media (media_of(tag)).
    stores_media: bool = False


async def _list_inputs(
    channel: grpc.aio.Channel, caller: Caller, tag: str, deadline: float
) -> object:
    stub = input_service_pb2_grpc.InputServiceStub(channel)
    return await stub.ListInputs(
        api.ListInputsRequest(app_id=caller.app_id),
        metadata=caller.metadata,
        timeout=deadline,
    )


async def _get_input(
    channel: grpc.aio.Channel, caller: Caller, tag: str, deadline: float
) -> object:
    stub = input_service_pb2_grpc.InputServiceStub(channel)
    return await stub.GetInput(
        api.GetInputRequest(app_id=caller.app_id, input_id="seed"),
        metadata=caller.metadata,
        timeout=deadline,
    )


async def _download_input(
    channel: grpc.aio.Channel, caller: Caller, tag: str, deadline: float
) -> object:
    stub = input_service_pb2_grpc.InputServiceStub(channel)
    call = stub.DownloadInput(
        api.DownloadInputRequest(app_id=caller.app_id, input_id="seed"),
        metadata=caller.metadata,
        timeout=deadline,
    )
    return [m async for m in call]


async def _create_inputs(
    channel: grpc.aio.Channel, caller: Caller, tag: str, deadline: float
) -> object:
    stub = input_service_pb2_grpc.InputServiceStub(channel)
    return await stub.CreateInputs(
        api.CreateInputsRequest(
            app_id=caller.app_id,
            request_id=f"deadline-{tag}",
            inputs=[
                text_input(f"late-{tag}", "too late"),
                input_pb2.Input(
                    id=f"late-img-{tag}",
                    data=data_pb2.Data(image=data_pb2.Image(base64=media_of(tag))),
                ),
            ],
        ),
        metadata=caller.metadata,
        timeout=deadline,
    )


async def _upload_input(
    channel: grpc.aio.Channel, caller: Caller, tag: str, deadline: float
) -> object:
    stub = input_service_pb2_grpc.InputServiceStub(channel)
    media = media_of(tag)
    header = api.UploadInputHeader(
        app_id=caller.app_id,
        input=input_pb2.Input(id=f"late-up-{tag}", data=data_pb2.Data(image=data_pb2.Image())),
        content_length=len(media),
        sha256=hashlib.sha256(media).hexdigest(),
        request_id=f"deadline-up-{tag}",
    )
    messages = [
        api.UploadInputRequest(header=header),
        api.UploadInputRequest(chunk=media[:100]),
        api.UploadInputRequest(chunk=media[100:]),
    ]
    return await stub.UploadInput(iter(messages), metadata=caller.metadata, timeout=deadline)


async def _input_written(db: Database, caller: Caller, tag: str) -> bool:
    found = await db.fetchval(
        "SELECT count(*) FROM inputs WHERE app_id = $1 AND id LIKE $2",
        caller.app_id,
        f"late-%{tag}",
    )
    return bool(found)


async def _create_dataset(
    channel: grpc.aio.Channel, caller: Caller, tag: str, deadline: float
) -> object:
    stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    return await stub.CreateDataset(
        dapi.CreateDatasetRequest(
            app_id=caller.app_id,
            request_id=f"deadline-{tag}",
            dataset=dataset_pb2.Dataset(id=f"late-{tag}"),
        ),
        metadata=caller.metadata,
        timeout=deadline,
    )


async def _dataset_written(db: Database, caller: Caller, tag: str) -> bool:
    found = await db.fetchval(
        "SELECT count(*) FROM datasets WHERE app_id = $1 AND id = $2", caller.app_id, f"late-{tag}"
    )
    return bool(found)


async def _list_datasets(
    channel: grpc.aio.Channel, caller: Caller, tag: str, deadline: float
) -> object:
    stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    return await stub.ListDatasets(
        dapi.ListDatasetsRequest(app_id=caller.app_id), metadata=caller.metadata, timeout=deadline
    )


CASES = {
    "ListInputs": Case("inputs", _list_inputs),
    "GetInput": Case("inputs", _get_input),
    "DownloadInput": Case("inputs", _download_input),
    "CreateInputs": Case("inputs", _create_inputs, _input_written, stores_media=True),
    "UploadInput": Case("inputs", _upload_input, _input_written, stores_media=True),
    "CreateDataset": Case("datasets", _create_dataset, _dataset_written),
    "ListDatasets": Case("datasets", _list_datasets),
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
    async with table_locked(db, case.table) as holder:
        started = asyncio.get_running_loop().time()
        call = asyncio.ensure_future(case.call(channel, caller, tag, DEADLINE_SECONDS))
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
        assert not await case.written(db, caller, tag)
    # The server is still fine: the same call answers once the table is free.
    await case.call(channel, caller, tag + "b", 10.0)
