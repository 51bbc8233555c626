"""Streamed writes to the object store, and the removal of uploads a crash left behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import Iterator
from datetime import timedelta

import pytest

from service.storage.blobs import UPLOADS_PREFIX, ContentAddressedBlobStore, content_key
from service.storage.db import Database
from service.storage.objectstore import MIN_PART_BYTES, ObjectStore, part_size_for
from tests.conftest import Stack, object_store

MIB = 1024 * 1024


@pytest.fixture
def objects(stack: Stack) -> Iterator[ObjectStore]:
    store = object_store(stack)
    yield store
    store.close()


async def multipart_uploads(objects: ObjectStore, prefix: str) -> list[str]:
    listing = await asyncio.to_thread(
        objects._client._list_multipart_uploads, objects.bucket, prefix=prefix
    )
    return [u.object_name for u in listing.uploads if u.object_name is not None]


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def test_part_size_fits_any_cap_in_10000_parts() -> None:
    assert part_size_for(2 * 1024**3) == 8 * MIB
    assert part_size_for(5 * 1024**4) * 10_000 >= 5 * 1024**4
    assert part_size_for(5 * 1024**4) % MIB == 0


@pytest.mark.parametrize(
    "size",
    [1, 3 * MIB, MIN_PART_BYTES, 2 * MIN_PART_BYTES, 2 * MIN_PART_BYTES + 1, 12 * MIB + 7],
)
async def test_writer_stores_what_was_written(objects: ObjectStore, size: int) -> None:
    """Single PUTs and multipart uploads, ending on a part boundary or not, written in
    chunks that do not divide the part size."""
    data = os.urandom(size)
    writer = objects.writer(f"test/{secrets.token_hex(6)}", "video/mp4", MIN_PART_BYTES)
    for piece in pieces(data, 700 * 1024):
        await writer.write(piece)
    await writer.finish()
    assert (writer.size, writer.sha256) == (size, hashlib.sha256(data).hexdigest())
    assert await objects.get(writer.key) == data
    await writer.abort()  # after finish: removes the object
    assert not await objects.exists(writer.key)


async def test_abort_leaves_nothing(objects: ObjectStore) -> None:
    prefix = f"test/{secrets.token_hex(6)}/"
    writer = objects.writer(prefix + "x", "video/mp4", MIN_PART_BYTES)
    for piece in pieces(os.urandom(2 * MIN_PART_BYTES + MIB), MIB):
        await writer.write(piece)
    # Parts go out on the writer's own thread: wait until those written have.
    await writer.drain()
    assert await multipart_uploads(objects, prefix) == [prefix + "x"]
    await writer.abort()
    await writer.abort()  # idempotent
    assert await multipart_uploads(objects, prefix) == []
    assert await objects.list_keys(prefix) == []


async def test_staged_upload_is_published_once_under_its_content_address(
    db: Database, objects: ObjectStore
) -> None:
    blobs = ContentAddressedBlobStore(db, objects)
    data = os.urandom(6 * MIB)
    published = []
    for _ in range(2):
        staged = blobs.stage(6 * MIB)
        for piece in pieces(data, MIB):
            await staged.write(piece)
        assert await staged.finish() == hashlib.sha256(data).hexdigest()
        published.append(await staged.publish("video/mp4"))
        assert not await objects.exists(staged.key)
        await staged.discard()  # after publishing: the published blob stays
    first, second = published
    assert first == second and first.key == content_key(first.sha256)
    assert await objects.get(first.key) == data
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM blobs WHERE key = $1", first.key) == 1


async def test_abandoned_uploads_are_collected_once_idle(
    db: Database, objects: ObjectStore
) -> None:
    blobs = ContentAddressedBlobStore(db, objects)
    # What crashes leave: a completed temporary object, and a multipart upload with parts.
    completed = f"{UPLOADS_PREFIX}{secrets.token_hex(8)}"
    await objects.put(completed, b"left behind", "application/octet-stream")
    unfinished = objects.writer(
        f"{UPLOADS_PREFIX}{secrets.token_hex(8)}", "video/mp4", MIN_PART_BYTES
    )
    await unfinished.write(os.urandom(MIN_PART_BYTES + 1))
    # And a slow upload, started as long ago but still receiving parts.
    slow = objects.writer(f"{UPLOADS_PREFIX}{secrets.token_hex(8)}", "video/mp4", MIN_PART_BYTES)
    await slow.write(os.urandom(MIN_PART_BYTES + 1))
    await unfinished.drain()
    await slow.drain()

    # Within the grace period nothing is touched.
    await blobs.collect_orphans(timedelta(hours=1), limit=1000)
    assert completed in await objects.list_keys(UPLOADS_PREFIX)
    assert len(await multipart_uploads(objects, UPLOADS_PREFIX)) == 2

    # S3 times have whole seconds: wait until all three are more than 2 s old, then let
    # the slow upload send another part.
    await asyncio.sleep(3.1)
    await slow.write(os.urandom(MIN_PART_BYTES))
    await slow.drain()
    collected = await blobs.collect_orphans(timedelta(seconds=2), limit=1000)
    assert collected >= 2
    assert await objects.list_keys(UPLOADS_PREFIX) == []
    assert await multipart_uploads(objects, UPLOADS_PREFIX) == [slow.key]

    await asyncio.sleep(3.1)
    await blobs.collect_orphans(timedelta(seconds=2), limit=1000)
    assert await multipart_uploads(objects, UPLOADS_PREFIX) == []
    await unfinished.abort()
    await slow.abort()
