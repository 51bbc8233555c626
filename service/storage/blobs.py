"""The object store: a thin async adapter over the minio client, and the
content-addressed blob store built on it and on the `blobs` table."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TypeVar

import urllib3
from minio import Minio
from minio.error import S3Error

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


# Keys follow the HostedURL convention `prefix/size/suffix` with size "orig",
# so `s3://bucket/blobs` + "orig" + the suffix names the object itself.
HOSTED_PREFIX = "blobs"
HOSTED_SIZE = "orig"


def content_suffix(sha256_hex: str) -> str:
    return f"sha256/{sha256_hex[:2]}/{sha256_hex[2:4]}/{sha256_hex}"


def content_key(sha256_hex: str) -> str:
    return f"{HOSTED_PREFIX}/{HOSTED_SIZE}/{content_suffix(sha256_hex)}"


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
    " OR EXISTS (SELECT 1 FROM inputs WHERE blob_key = b.key))"
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
        return collected
