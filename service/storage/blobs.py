"""The object store: a thin async adapter over the minio client, and the
content-addressed blob store built on it and on the `blobs` table."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import threading
import uuid
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TypeVar, cast

import urllib3
from minio import Minio
from minio.commonconfig import ComposeSource
from minio.datatypes import Part
from minio.error import S3Error
from minio.helpers import DictType

from service.domain.models import StoredBlob
from service.storage.db import Database

log = logging.getLogger(__name__)
T = TypeVar("T")


class ObjectStore:
    """Async facade over the synchronous minio client.

    Calls run on a bounded thread pool so the event loop never blocks on S3 and
    a burst of uploads cannot open an unbounded number of connections.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        secure: bool = False,
        region: str | None = None,
        max_workers: int = 16,
    ) -> None:
        http = urllib3.PoolManager(
            maxsize=max_workers,
            timeout=urllib3.Timeout(connect=5, read=60),
            retries=urllib3.Retry(
                total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        self.bucket = bucket
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="s3")

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def ensure_bucket(self) -> None:
        def create() -> None:
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket)

        await self._run(create)

    async def ping(self) -> None:
        """Raises unless the bucket is reachable with our credentials."""
        exists = await self._run(lambda: self._client.bucket_exists(self.bucket))
        if not exists:
            raise RuntimeError(f"bucket {self.bucket!r} does not exist")

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        await self._run(
            lambda: self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            )
        )

    async def get(self, key: str) -> bytes:
        def read() -> bytes:
            response = self._client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return await self._run(read)

    async def exists(self, key: str) -> bool:
        def stat() -> bool:
            try:
                self._client.stat_object(self.bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    return False
                raise
            return True

        return await self._run(stat)

    async def delete(self, key: str) -> None:
        await self._run(lambda: self._client.remove_object(self.bucket, key))

    async def list_keys(self, prefix: str) -> list[str]:
        return await self._run(
            lambda: [
                o.object_name
                for o in self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
                if o.object_name is not None
            ]
        )

    def writer(self, key: str, content_type: str, part_size: int) -> ObjectWriter:
        """Writes `key` from chunks as they arrive (see ObjectWriter)."""
        return ObjectWriter(self, key, content_type, part_size)

    async def stream(self, key: str, chunk_size: int) -> AsyncGenerator[bytes, None]:
        """The object in chunks of at most `chunk_size` bytes. Each read is its own job on
        the pool, so a slow consumer holds one connection but no thread."""
        response = await self._run(lambda: self._client.get_object(self.bucket, key))
        # A read still running on a worker when the consumer goes away must finish
        # before the connection is closed under it.
        lock = threading.Lock()

        def read() -> bytes:
            with lock:
                data: bytes = response.read(chunk_size)
                return data

        def close() -> None:
            with lock:
                response.close()
                response.release_conn()

        try:
            while chunk := await self._run(read):
                yield chunk
        finally:
            await self._run(close)

    async def copy(self, source: str, destination: str, content_type: str) -> None:
        """Server-side copy: no bytes pass through this process. compose_object turns a
        source over 5 GiB (the limit of one CopyObject) into part copies."""
        await self._run(
            lambda: self._client.compose_object(
                self.bucket,
                destination,
                [ComposeSource(self.bucket, source)],
                metadata={"Content-Type": content_type},
            )
        )

    async def remove_stale(self, prefix: str, idle_since: datetime, limit: int) -> int:
        """Deletes objects under `prefix` last written before `idle_since` and aborts
        multipart uploads under it that have received no part since then; at most `limit`
        of each. Returns how many were removed."""

        def last_activity(object_name: str, upload_id: str, initiated: datetime) -> datetime:
            # A slow upload started long ago is still alive while parts keep arriving.
            parts = self._client._list_parts(self.bucket, object_name, upload_id).parts
            return max([initiated, *(p.last_modified for p in parts if p.last_modified)])

        def sweep() -> int:
            removed = 0
            for found in self._client.list_objects(self.bucket, prefix=prefix, recursive=True):
                if removed >= limit:
                    break
                name, modified = found.object_name, found.last_modified
                if name is not None and modified is not None and modified < idle_since:
                    self._client.remove_object(self.bucket, name)
                    removed += 1
            aborted = 0
            listing = self._client._list_multipart_uploads(
                self.bucket, prefix=prefix, max_uploads=limit
            )
            for upload in listing.uploads:
                name, upload_id, initiated = (
                    upload.object_name,
                    upload.upload_id,
                    upload.initiated_time,
                )
                if name is None or upload_id is None or initiated is None:
                    continue
                if initiated < idle_since and last_activity(name, upload_id, initiated) < (
                    idle_since
                ):
                    self._client._abort_multipart_upload(self.bucket, name, upload_id)
                    aborted += 1
            return removed + aborted

        return await self._run(sweep)

    async def presign_get(self, key: str, ttl: timedelta) -> str:
        return await self._run(lambda: self._client.presigned_get_object(self.bucket, key, ttl))

    async def presign_many(self, keys: list[str], ttl: timedelta) -> list[str]:
        # Signing is local computation: one executor hop for the whole page.
        if not keys:
            return []
        return await self._run(
            lambda: [self._client.presigned_get_object(self.bucket, k, ttl) for k in keys]
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)


# S3 multipart rules: every part but the last has at least 5 MiB, and there are at most
# 10,000 parts.
MIN_PART_BYTES = 5 * 1024 * 1024
MAX_PARTS = 10_000
DEFAULT_PART_BYTES = 8 * 1024 * 1024
_MIB = 1024 * 1024


def part_size_for(max_size: int) -> int:
    """8 MiB, or the smallest whole number of MiB that fits `max_size` in 10,000 parts."""
    needed = -(-max_size // MAX_PARTS)
    return max(DEFAULT_PART_BYTES, -(-needed // _MIB) * _MIB)


class ObjectWriter:
    """Writes one object from chunks as they arrive, as an S3 multipart upload.

    Two part buffers take turns: one is filled while the other is sent, and once the
    first two parts exist nothing more is allocated, however long the stream (a fresh
    buffer per part would leave the allocator's heap fragmented). Each part goes out as
    its own short job on the store's pool, so a slow client costs two parts of memory but
    never holds a thread. An object smaller than one part is sent with a single PUT by
    finish(). The SHA-256 is updated inside the sending job, and a part is sent only
    after the previous one has been, so the hash sees the bytes in order while the event
    loop only copies them.

    minio-py offers multipart uploads only inside put_object, which pulls data from a
    blocking reader on one thread for the whole upload and keeps up to four parts in
    memory; the calls used here are the ones put_object is built on (unchanged across
    the 7.x releases that pyproject.toml allows).
    """

    def __init__(self, store: ObjectStore, key: str, content_type: str, part_size: int) -> None:
        if part_size < MIN_PART_BYTES:
            raise ValueError(f"part size {part_size} is below the S3 minimum {MIN_PART_BYTES}")
        self.key = key
        self.size = 0
        self._store = store
        self._content_type = content_type
        self._part_size = part_size
        # The part being filled: bytes [0, _filled) of _buffer. A buffer grows to a part
        # once, then is overwritten in place.
        self._buffer = bytearray()
        self._filled = 0
        # The buffer of the part being sent, reused when that part is through.
        self._spare = bytearray()
        self._digest = hashlib.sha256()
        self._upload_id: str | None = None
        self._parts: list[Part] = []
        self._sending: Future[Part] | None = None
        self._finished = False

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of everything written; complete once finish() has returned."""
        return self._digest.hexdigest()

    async def write(self, chunk: bytes) -> None:
        if self._finished:
            raise RuntimeError(f"upload {self.key} is already finished")
        view = memoryview(chunk)
        while view:
            count = min(self._part_size - self._filled, len(view))
            end = self._filled + count
            if len(self._buffer) >= end:
                self._buffer[self._filled : end] = view[:count]
            else:
                self._buffer += view[:count]
            self._filled = end
            view = view[count:]
            if self._filled == self._part_size:
                await self._send_part()
        self.size += len(chunk)

    async def finish(self) -> None:
        """Completes the object; it exists under `key` afterwards."""
        client, bucket, key = self._store._client, self._store.bucket, self.key
        if self._upload_id is None:
            data = memoryview(self._buffer)[: self._filled]
            headers: DictType = {"Content-Type": self._content_type}

            def put() -> None:
                with data:
                    self._digest.update(data)
                    client._put_object(bucket, key, _body(data), headers)

            await self._store._run(put)
        else:
            if self._filled:
                await self._send_part()
            await self._wait_sending()
            upload_id, parts = self._upload_id, list(self._parts)
            await self._store._run(
                lambda: client._complete_multipart_upload(bucket, key, upload_id, parts)
            )
        self._finished = True

    async def abort(self) -> None:
        """Removes whatever was written, finished or not. Never raises: it runs on error
        paths, and whatever a failure here leaves behind is removed by remove_stale."""
        client, bucket, key = self._store._client, self._store.bucket, self.key
        try:
            sending = self._sending
            if sending is not None and not sending.cancelled():
                # The part may still be on its way; aborting first could leave it stored.
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(sending)
            upload_id = self._upload_id
            if upload_id is not None and not self._finished:
                await self._store._run(
                    lambda: client._abort_multipart_upload(bucket, key, upload_id)
                )
            await self._store.delete(key)
        except Exception:
            log.warning("could not remove upload %s; it is removed once stale", key, exc_info=True)

    async def _send_part(self) -> None:
        part = memoryview(self._buffer)[: self._filled]
        await self._wait_sending()
        self._buffer, self._spare, self._filled = self._spare, self._buffer, 0
        client, bucket, key = self._store._client, self._store.bucket, self.key
        upload_id = self._upload_id
        if upload_id is None:
            headers: DictType = {"Content-Type": self._content_type}
            upload_id = await self._store._run(
                lambda: client._create_multipart_upload(bucket, key, headers)
            )
            self._upload_id = upload_id
        number = len(self._parts) + 1

        def send() -> Part:
            # Released when sent, so the buffer is free to be filled again.
            with part:
                self._digest.update(part)
                etag = client._upload_part(bucket, key, _body(part), None, upload_id, number)
            return Part(number, etag)

        self._sending = self._store._executor.submit(send)

    async def _wait_sending(self) -> None:
        if self._sending is not None:
            part = await asyncio.wrap_future(self._sending)
            self._sending = None
            self._parts.append(part)


def _body(buffer: memoryview) -> bytes:
    # minio annotates request bodies as bytes but only takes their length, hashes them and
    # hands them to urllib3, which sends any buffer; bytes(buffer) would copy a whole part.
    return cast(bytes, buffer)


# Keys follow the HostedURL convention `prefix/size/suffix` with size "orig",
# so `s3://bucket/blobs` + "orig" + the suffix names the object itself.
HOSTED_PREFIX = "blobs"
HOSTED_SIZE = "orig"


def content_suffix(sha256_hex: str) -> str:
    return f"sha256/{sha256_hex[:2]}/{sha256_hex[2:4]}/{sha256_hex}"


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


class ContentAddressedBlobStore:
    """Stores bytes under `blobs/orig/sha256/<hash>` and keeps a `blobs` row per object.

    Ordering keeps data safe against the orphan collector: the row is touched
    (last_seen = now) before the PUT, and the collector deletes only rows last
    seen before the grace period, locking the row and removing the object before
    its own commit. An upload that races with a collection therefore either
    waits for it and re-creates both, or makes the collector skip the blob.
    """

    def __init__(self, db: Database, objects: ObjectStore) -> None:
        self._db = db
        self._objects = objects

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
        async with asyncio.TaskGroup() as group:
            for blob, (data, _) in zip(blobs, items, strict=True):
                if blob.key not in stored:
                    stored[blob.key] = group.create_task(store(blob, data))
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

    async def stream(self, blob: StoredBlob, chunk_size: int) -> AsyncGenerator[bytes, None]:
        sent = 0
        async with contextlib.aclosing(self._objects.stream(blob.key, chunk_size)) as chunks:
            async for chunk in chunks:
                sent += len(chunk)
                yield chunk
        if sent != blob.size:
            # The consumer has already had some bytes: failing is the only honest end.
            raise RuntimeError(
                f"object {blob.key} has {sent} bytes; its blobs row says {blob.size}"
            )

    async def download_url(self, blob: StoredBlob, ttl: timedelta) -> str:
        return await self._objects.presign_get(blob.key, ttl)

    async def download_urls(self, blobs: list[StoredBlob], ttl: timedelta) -> list[str]:
        return await self._objects.presign_many([b.key for b in blobs], ttl)

    def hosted(self, blob: StoredBlob) -> tuple[str, str]:
        prefix = f"s3://{self._objects.bucket}/{HOSTED_PREFIX}"
        return prefix, blob.key.removeprefix(f"{HOSTED_PREFIX}/{HOSTED_SIZE}/")

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
        if collected:
            log.info("collected %d orphan blobs", collected)
        # Server time of S3 against ours: the grace period dwarfs any sane clock skew.
        abandoned = await self._objects.remove_stale(
            UPLOADS_PREFIX, datetime.now(UTC) - older_than, limit
        )
        if abandoned:
            log.info("removed %d abandoned uploads", abandoned)
        return collected + abandoned


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
