"""The media read-ahead of the export writers against the real object store: objects
streamed in order with the right bytes, a small object read in one call to the store's
pool, and a stream abandoned while it opens leaves its connection released."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from service.formats.media_reads import ReadAhead, chunks_of, read_ahead
from service.storage.blobs import ContentAddressedBlobStore
from service.storage.db import Database
from service.storage.objectstore import ObjectStore
from tests.conftest import Stack, object_store

CHUNK = 64 * 1024


@pytest.fixture
def objects(stack: Stack) -> Iterator[ObjectStore]:
    store = object_store(stack)
    yield store
    store.close()


def counted(objects: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The operations the store runs on its pool from now on."""
    operations: list[str] = []
    run = objects._run

    async def counting(operation: str, fn: Callable[[], Any]) -> Any:
        operations.append(operation)
        return await run(operation, fn)

    monkeypatch.setattr(objects, "_run", counting)
    return operations


@pytest.mark.parametrize("size", [0, 10, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
async def test_an_object_streams_whole_in_chunks(
    objects: ObjectStore, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    key = f"test/media-reads/{secrets.token_hex(8)}"
    data = secrets.token_bytes(size)
    await objects.put(key, data, "application/octet-stream")
    operations = counted(objects, monkeypatch)
    chunks = [chunk async for chunk in objects.stream(key, CHUNK)]
    assert b"".join(chunks) == data
    assert all(0 < len(chunk) <= CHUNK for chunk in chunks)
    if size < CHUNK:
        # Opened, read and released in one call: a small object is one round trip.
        assert operations == ["get_stream"]


async def test_a_stream_abandoned_while_it_opens_releases_its_connection(
    objects: ObjectStore, stack: Stack
) -> None:
    key = f"test/media-reads/{secrets.token_hex(8)}"
    await objects.put(key, secrets.token_bytes(3 * CHUNK), "application/octet-stream")
    for _ in range(5):
        reader = asyncio.ensure_future(anext(objects.stream(key, CHUNK)))
        await asyncio.sleep(0)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    await asyncio.sleep(0.5)
    pool = objects._client._http.connection_from_url(f"http://{stack.s3.endpoint}")
    # Every connection is back in the pool (which holds `maxsize` slots when none is
    # taken): none is left with an abandoned response.
    assert pool.pool is not None
    assert pool.pool.qsize() == pool.pool.maxsize


async def test_media_read_ahead_from_the_blob_store(db: Database, objects: ObjectStore) -> None:
    blobs = ContentAddressedBlobStore(db, objects)
    sizes = [secrets.randbelow(4000) + 1 for _ in range(60)] + [2 * 1024 * 1024 + 3]
    contents = [secrets.token_bytes(size) for size in sizes]
    stored = await blobs.put_many([(data, "image/png") for data in contents])
    limits = ReadAhead(reads=8, whole_bytes=1024 * 1024, ahead_bytes=4 * 1024 * 1024)
    got = []
    async for index, blob, content in read_ahead(blobs, enumerate(stored), limits):
        got.append((index, b"".join([c async for c in chunks_of(blobs, blob, content)])))
    assert got == list(enumerate(contents))
