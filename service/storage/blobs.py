"""The content-addressed blob store: bytes in S3 under their SHA-256, each object with a
row in the `blobs` table that the orphan collector goes by."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncGenerator
from datetime import UTC, datetime, timedelta

import asyncpg

from service.domain.models import StoredBlob
from service.storage.db import Database
from service.storage.objectstore import ObjectStore, ObjectWriter, part_size_for

log = logging.getLogger(__name__)


# Keys follow the HostedURL convention `prefix/size/suffix` with size "orig",
# so `s3://bucket/blobs` + "orig" + the suffix names the object itself.
HOSTED_PREFIX = "blobs"
HOSTED_SIZE = "orig"


def content_suffix(sha256_hex: str) -> str:
    return f"sha256/{sha256_hex[:2]}/{sha256_hex[2:4]}/{sha256_hex}"


_CONTENT_SUFFIX = re.compile(
    r"sha256/(?P<a>[0-9a-f]{2})/(?P<b>[0-9a-f]{2})/(?P<digest>[0-9a-f]{64})", re.ASCII
)


def content_key(sha256_hex: str) -> str:
    return f"{HOSTED_PREFIX}/{HOSTED_SIZE}/{content_suffix(sha256_hex)}"


# Streamed uploads land here before their hash is known. Nothing references these keys:
# a live upload removes its own, and collect_orphans removes those a crash left behind.
UPLOADS_PREFIX = "uploads/"


TOUCH_MANY = """
INSERT INTO blobs (key, sha256, size, content_type)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[])
ON CONFLICT (key) DO UPDATE SET last_seen = now()
RETURNING key, (xmax = 0) AS inserted
"""
TOUCH = """
INSERT INTO blobs (key, sha256, size, content_type) VALUES ($1, $2, $3, $4)
ON CONFLICT (key) DO UPDATE SET last_seen = now()
"""
# Every table with a column that references blobs.key is listed here, so the
# collector never deletes a referenced object.
REFERENCED = (
    "(EXISTS (SELECT 1 FROM datasets WHERE cover_blob = b.key)"
    " OR EXISTS (SELECT 1 FROM inputs WHERE blob_key = b.key)"
    " OR EXISTS (SELECT 1 FROM version_inputs WHERE blob_key = b.key)"
    " OR EXISTS (SELECT 1 FROM exports WHERE blob_key = b.key))"
)
ORPHAN_CANDIDATES = f"""
SELECT b.key FROM blobs b
WHERE b.last_seen < now() - $1::interval AND NOT {REFERENCED}
ORDER BY b.last_seen LIMIT $2
"""
LOCK_ORPHAN = f"""
SELECT b.key FROM blobs b
WHERE b.key = $1 AND b.last_seen < now() - $2::interval AND NOT {REFERENCED}
FOR UPDATE SKIP LOCKED
"""
DELETE_BLOB = "DELETE FROM blobs WHERE key = $1"
UNREGISTERED = """
SELECT k FROM unnest($1::text[]) AS k WHERE NOT EXISTS (SELECT 1 FROM blobs WHERE key = k)
"""
# A placeholder row, inserted and deleted in the collector's own transaction (never seen by
# anyone else): it waits for a writer whose uncommitted touch inserted the same key, and
# makes a writer that touches the key meanwhile wait until the object is gone.
CLAIM_UNREGISTERED = """
INSERT INTO blobs (key, sha256, size, content_type) VALUES ($1, '', 0, '')
ON CONFLICT (key) DO NOTHING RETURNING key
"""
# Objects looked at per collection pass for a missing row (one listing page costs 1,000).
UNREGISTERED_SCAN = 10_000
# How long the collector waits for a writer that holds the key; it skips the key after.
CLAIM_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '1s'"


class ContentAddressedBlobStore:
    """Stores bytes under `blobs/orig/sha256/<hash>` and keeps a `blobs` row per object.

    Ordering keeps data safe against the orphan collector: the row is touched
    (last_seen = now) before the PUT, and the collector deletes only rows last
    seen before the grace period, locking the row and removing the object before
    its own commit. An upload that races with a collection therefore either
    waits for it and re-creates both, or makes the collector skip the blob.

    Inside a caller's transaction (a mutation with a request id) the touch commits with
    that transaction, after the PUT: a rollback or a crash leaves the object without
    its row. The collector finds those objects too (`_collect_unregistered`).
    """

    def __init__(self, db: Database, objects: ObjectStore) -> None:
        self._db = db
        self._objects = objects
        # Where the next scan for unregistered objects starts (in this process).
        self._scan_after = ""

    async def put(self, data: bytes, content_type: str) -> StoredBlob:
        digest = hashlib.sha256(data).hexdigest()
        blob = StoredBlob(content_key(digest), digest, len(data), content_type)
        async with self._db.connection() as conn:
            await conn.execute(TOUCH, blob.key, blob.sha256, blob.size, blob.content_type)
        await self._objects.put(blob.key, data, content_type)
        return blob

    async def put_many(self, items: list[tuple[bytes, str]]) -> list[StoredBlob]:
        """Touches every row in one statement, then PUTs concurrently. Bytes whose row
        already existed are only checked (HEAD): the touch keeps the collector away
        from them, and the check covers an object lost without its row."""
        if not items:
            return []
        blobs = []
        for data, content_type in items:
            digest = hashlib.sha256(data).hexdigest()
            blobs.append(StoredBlob(content_key(digest), digest, len(data), content_type))
        # One row per key: ON CONFLICT cannot touch the same row twice in a statement.
        unique = list({b.key: b for b in blobs}.values())
        async with self._db.connection() as conn:
            rows = await conn.fetch(
                TOUCH_MANY,
                [b.key for b in unique],
                [b.sha256 for b in unique],
                [b.size for b in unique],
                [b.content_type for b in unique],
            )
        known = {r["key"] for r in rows if not r["inserted"]}

        async def store(blob: StoredBlob, data: bytes) -> None:
            if blob.key in known and await self._objects.exists(blob.key):
                return
            await self._objects.put(blob.key, data, blob.content_type)

        stored: dict[str, asyncio.Task[None]] = {}
        try:
            async with asyncio.TaskGroup() as group:
                for blob, (data, _) in zip(blobs, items, strict=True):
                    if blob.key not in stored:
                        stored[blob.key] = group.create_task(store(blob, data))
        except ExceptionGroup as failed:
            # The first failed PUT cancels the others; the caller gets its error itself, not
            # a group (the store being unavailable must reach it as Unavailable).
            raise failed.exceptions[0] from failed
        return blobs

    async def read(self, blob: StoredBlob) -> bytes:
        return await self._objects.get(blob.key)

    def stage(self, max_size: int) -> StagedObject:
        writer = self._objects.writer(
            f"{UPLOADS_PREFIX}{uuid.uuid4().hex}",
            "application/octet-stream",
            part_size_for(max_size),
        )
        return StagedObject(self._db, self._objects, writer)

    async def stream(
        self, blob: StoredBlob, chunk_size: int, offset: int = 0, length: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        # A negative offset counts from the end (an HTTP suffix range); the window is
        # clamped to the object, and an empty one reads nothing.
        start = max(blob.size + offset, 0) if offset < 0 else min(offset, blob.size)
        rest = blob.size - start
        expected = rest if length is None else max(min(length, rest), 0)
        if expected == 0:
            return
        sent = 0
        objects = self._objects.stream(blob.key, chunk_size, start, expected)
        async with contextlib.aclosing(objects) as chunks:
            async for chunk in chunks:
                sent += len(chunk)
                yield chunk
        if sent != expected:
            # The consumer has already had some bytes: failing is the only honest end.
            raise RuntimeError(
                f"object {blob.key} has {start + sent} bytes; its blobs row says {blob.size}"
            )

    async def download_url(self, blob: StoredBlob, ttl: timedelta) -> str:
        return await self._objects.presign_get(blob.key, ttl)

    async def download_urls(self, blobs: list[StoredBlob], ttl: timedelta) -> list[str]:
        return await self._objects.presign_many([b.key for b in blobs], ttl)

    def hosted(self, blob: StoredBlob) -> tuple[str, str]:
        prefix = f"s3://{self._objects.bucket}/{HOSTED_PREFIX}"
        return prefix, blob.key.removeprefix(f"{HOSTED_PREFIX}/{HOSTED_SIZE}/")

    def hosted_key(self, suffix: str) -> str | None:
        # Exactly content_suffix()'s shape: nothing else (no `..`, no other prefix) maps
        # to a key.
        match = _CONTENT_SUFFIX.fullmatch(suffix)
        if match is None or match["digest"][:4] != match["a"] + match["b"]:
            return None
        return content_key(match["digest"])

    async def collect_orphans(self, older_than: timedelta, limit: int) -> int:
        async with self._db.connection() as conn:
            keys = [r["key"] for r in await conn.fetch(ORPHAN_CANDIDATES, older_than, limit)]
        collected = 0
        for key in keys:
            async with self._db.transaction(), self._db.connection() as conn:
                if await conn.fetchval(LOCK_ORPHAN, key, older_than) is None:
                    continue
                await self._objects.delete(key)
                await conn.execute(DELETE_BLOB, key)
                collected += 1
        collected += await self._collect_unregistered(limit)
        if collected:
            log.info("collected %d orphan blobs", collected)
        # Server time of S3 against ours: the grace period dwarfs any sane clock skew.
        abandoned = await self._objects.remove_stale(
            UPLOADS_PREFIX, datetime.now(UTC) - older_than, limit
        )
        if abandoned:
            log.info("removed %d abandoned uploads", abandoned)
        return collected + abandoned

    async def _collect_unregistered(self, limit: int) -> int:
        """Deletes objects under the content-addressed prefix that have no blobs row: their
        row was rolled back with the transaction that touched it (or its process died), so
        no row references them and the row-based pass above never sees them.

        No grace period is needed: every writer touches the row before it writes the object,
        and the claim below conflicts with a touch not yet committed (waiting for it, up to
        CLAIM_LOCK_TIMEOUT) and holds off touches that come after it until the object is
        gone, which the writer then writes again.

        Each pass looks at UNREGISTERED_SCAN keys, going on where the previous pass stopped
        and wrapping around, so a pass costs the same whatever the size of the bucket."""
        prefix = f"{HOSTED_PREFIX}/{HOSTED_SIZE}/"
        after = self._scan_after
        keys = await self._objects.list_keys(prefix, after, UNREGISTERED_SCAN)
        if len(keys) < UNREGISTERED_SCAN:  # the end of the bucket: wrap around
            if after:
                head = await self._objects.list_keys(prefix, "", UNREGISTERED_SCAN - len(keys))
                keys += [k for k in head if k <= after]
            self._scan_after = ""
        else:
            self._scan_after = keys[-1]
        async with self._db.connection() as conn:
            missing = [r["k"] for r in await conn.fetch(UNREGISTERED, keys)]
        collected = 0
        for key in missing[:limit]:
            try:
                async with self._db.transaction(), self._db.connection() as conn:
                    await conn.execute(CLAIM_LOCK_TIMEOUT)
                    if await conn.fetchval(CLAIM_UNREGISTERED, key) is None:
                        continue
                    await self._objects.delete(key)
                    await conn.execute(DELETE_BLOB, key)
                    collected += 1
            except asyncpg.LockNotAvailableError:
                continue  # a transaction that touched the key is still open: not an orphan yet
        return collected


class StagedObject:
    """A streamed upload under a temporary key, published under its content address once
    its hash is known, or discarded."""

    def __init__(self, db: Database, objects: ObjectStore, writer: ObjectWriter) -> None:
        self._db = db
        self._objects = objects
        self._writer = writer

    @property
    def key(self) -> str:
        return self._writer.key

    async def write(self, chunk: bytes) -> None:
        await self._writer.write(chunk)

    async def finish(self) -> str:
        await self._writer.finish()
        return self._writer.sha256

    async def read(self) -> bytes:
        return await self._objects.get(self._writer.key)

    async def publish(self, content_type: str) -> StoredBlob:
        digest = self._writer.sha256
        blob = StoredBlob(content_key(digest), digest, self._writer.size, content_type)
        # As in put(): the row is touched before the object appears, so the collector
        # never deletes an object that a row is about to reference.
        async with self._db.connection() as conn:
            await conn.execute(TOUCH, blob.key, blob.sha256, blob.size, blob.content_type)
        if not await self._objects.exists(blob.key):
            await self._objects.copy(self._writer.key, blob.key, content_type)
        await self._objects.delete(self._writer.key)
        return blob

    async def discard(self) -> None:
        await self._writer.abort()
