"""The object store: an async facade over the synchronous minio client."""

from __future__ import annotations

import asyncio
import io
import itertools
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import BinaryIO, ParamSpec, TypeVar, cast

import urllib3
from minio import Minio
from minio.commonconfig import ComposeSource
from minio.error import S3Error, ServerError
from urllib3 import BaseHTTPResponse

from service.domain.errors import Unavailable
from service.observability import metrics, tracing
from service.storage.objectstore.writer import ObjectWriter, Readable

T = TypeVar("T")
P = ParamSpec("P")

DEFAULT_TIMEOUT_SECONDS = 10.0
# Threads and pooled connections: as many as an export's media read-ahead keeps in flight
# (service.formats.media_reads.MAX_READS), since small objects cost a round trip each.
MAX_CONCURRENT_CALLS = 32
# S3 error codes that say the store, not the request, is at fault.
_STORE_BUSY = frozenset(
    {"ServiceUnavailable", "SlowDown", "InternalError", "RequestTimeout", "RequestTimeTooSkewed"}
)


def _store_unreachable(exc: Exception) -> bool:
    """Whether `exc` from minio means the object store cannot be reached or served nothing:
    urllib3's connection errors (refused, reset, timed out, MaxRetryError after its
    retries, a body cut short) and socket errors, a 5xx answer (ServerError), or an S3
    error code that blames the store."""
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError | ServerError):
        return True
    return isinstance(exc, S3Error) and exc.code in _STORE_BUSY


def object_store_unavailable(exc: Exception) -> Unavailable:
    """The error for the caller (raised `from exc`, so the log keeps minio's own)."""
    return Unavailable(
        f"the object store is unavailable ({type(exc).__name__}); retry later",
        reason="OBJECT_STORE_UNAVAILABLE",
    )


def _translated(
    fn: Callable[P, T], operation: str, bucket: str, parent: tracing.Parent | None
) -> Callable[P, T]:
    """`fn`, raising Unavailable where minio failed to reach the store; timed, counted and
    traced (under `parent`, the caller's span context: `fn` runs on a worker thread) as
    `operation`."""
    series = metrics.object_store_series(operation)

    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        started = time.perf_counter()
        try:
            with tracing.object_store_span(operation, bucket, parent):
                return fn(*args, **kwargs)
        except Exception as exc:
            series.errors.inc()
            if _store_unreachable(exc):
                raise object_store_unavailable(exc) from exc
            raise
        finally:
            series.duration.observe(time.perf_counter() - started)

    return call


# A signed URL is handed out again during this share of its validity, so a client always
# gets at least 3/4 of the TTL.
PRESIGN_REUSE = 0.25
PRESIGN_CACHE_SIZE = 100_000


class ObjectStore:
    """Async facade over the synchronous minio client.

    Calls run on a bounded thread pool so the event loop never blocks on S3 and
    a burst of uploads cannot open an unbounded number of connections. A store that
    cannot be reached raises Unavailable. `timeout` bounds connecting and each wait for
    the store's next bytes: a store that accepts connections but answers nothing (a
    network partition) fails a call after at most two attempts of `timeout` each,
    instead of urllib3's default of waiting forever.
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
        max_workers: int = MAX_CONCURRENT_CALLS,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        http = urllib3.PoolManager(
            maxsize=max_workers,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            retries=urllib3.Retry(
                total=3,
                # One retry of a read: a pooled connection the store closed while idle
                # fails its first use; more would only multiply the wait on a silent store.
                read=1,
                backoff_factor=0.2,
                status_forcelist=[500, 502, 503, 504],
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
        # Set whenever the store could not be reached (see Database.unreachable).
        self.unreachable = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="s3")
        # Signed URLs by (key, ttl): (URL, monotonic time it was signed).
        self._signed: dict[tuple[str, timedelta], tuple[str, float]] = {}

    async def _run(self, operation: str, fn: Callable[[], T]) -> T:
        call = _translated(fn, operation, self.bucket, tracing.current_context())
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except Unavailable:
            self.unreachable.set()
            raise

    async def ensure_bucket(self) -> None:
        def create() -> None:
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as exc:
                # Replicas starting together on a new bucket: another one made it between
                # our check and our request, which is what we wanted.
                if exc.code != "BucketAlreadyOwnedByYou":
                    raise

        await self._run("ensure_bucket", create)

    async def ping(self) -> None:
        """Raises unless the bucket is reachable with our credentials."""
        exists = await self._run("bucket_exists", lambda: self._client.bucket_exists(self.bucket))
        if not exists:
            raise RuntimeError(f"bucket {self.bucket!r} does not exist")

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        await self._run(
            "put",
            lambda: self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            ),
        )

    async def get(self, key: str) -> bytes:
        def read() -> bytes:
            response = self._client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return await self._run("get", read)

    async def exists(self, key: str) -> bool:
        def stat() -> bool:
            try:
                self._client.stat_object(self.bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    return False
                raise
            return True

        return await self._run("stat", stat)

    async def delete(self, key: str) -> None:
        await self._run("delete", lambda: self._client.remove_object(self.bucket, key))

    async def list_keys(
        self, prefix: str, start_after: str = "", limit: int | None = None
    ) -> list[str]:
        """Keys under `prefix` in key order, after `start_after`, at most `limit` of them."""

        def names() -> list[str]:
            listing = self._client.list_objects(
                self.bucket, prefix=prefix, recursive=True, start_after=start_after or None
            )
            found = (o.object_name for o in listing if o.object_name is not None)
            return list(itertools.islice(found, limit))

        return await self._run("list", names)

    def writer(self, key: str, content_type: str, part_size: int) -> ObjectWriter:
        """Writes `key` from chunks as they arrive (see ObjectWriter)."""

        def upload(stream: Readable) -> None:
            # Parts one at a time: the writer's pipe already overlaps sending a part with
            # receiving the next, and parallel parts would each hold a part of memory.
            self._client.put_object(
                self.bucket,
                key,
                # put_object only calls read().
                cast(BinaryIO, stream),
                -1,
                content_type=content_type,
                part_size=part_size,
                num_parallel_uploads=1,
            )

        return ObjectWriter(
            key,
            part_size,
            upload=_translated(upload, "put_stream", self.bucket, tracing.current_context()),
            remove=lambda: self.delete(key),
        )

    async def stream(
        self, key: str, chunk_size: int, offset: int = 0, length: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The object from `offset` on (`length` bytes of it, the rest when None) in
        chunks of at most `chunk_size` bytes: a ranged GET, so the bytes before `offset`
        are never sent. Each read is its own job on
        the pool, so a slow consumer holds one connection but no thread. The first job
        also reads the first chunk and, when that was all, releases the connection: an
        object that fits in a chunk (most media) costs one job, not four."""
        # A read still running on a worker when the consumer goes away must finish
        # before the connection is closed under it.
        lock = threading.Lock()

        def close(response: BaseHTTPResponse) -> None:
            with lock:
                response.close()
                response.release_conn()

        def first() -> tuple[BaseHTTPResponse | None, bytes]:
            # minio reads length 0 as "to the end".
            response = self._client.get_object(self.bucket, key, offset=offset, length=length or 0)
            try:
                data: bytes = response.read(chunk_size)
                if len(data) == chunk_size:
                    return response, data
                # Short: the end of the object, unless its body came in pieces.
                more: bytes = response.read(chunk_size - len(data))
                if more:
                    return response, data + more
            except BaseException:
                close(response)
                raise
            close(response)
            return None, data

        def close_unread(opened: asyncio.Future[tuple[BaseHTTPResponse | None, bytes]]) -> None:
            if not opened.cancelled() and opened.exception() is None:
                response, _ = opened.result()
                if response is not None:
                    close(response)

        opening = asyncio.ensure_future(self._run("get_stream", first))
        try:
            # Shielded: a consumer gone while a worker opens the object must not leave the
            # connection it opened behind.
            response, data = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(close_unread)
            raise
        if response is None:
            if data:
                yield data
            return
        opened = response

        def read() -> bytes:
            with lock:
                chunk: bytes = opened.read(chunk_size)
                return chunk

        try:
            while data:
                yield data
                data = await self._run("read_chunk", read)
        finally:
            await self._run("close_stream", lambda: close(opened))

    async def copy(self, source: str, destination: str, content_type: str) -> None:
        """Server-side copy: no bytes pass through this process. compose_object turns a
        source over 5 GiB (the limit of one CopyObject) into part copies."""
        await self._run(
            "copy",
            lambda: self._client.compose_object(
                self.bucket,
                destination,
                [ComposeSource(self.bucket, source)],
                metadata={"Content-Type": content_type},
            ),
        )

    async def remove_stale(self, prefix: str, idle_since: datetime, limit: int) -> int:
        """Deletes objects under `prefix` last written before `idle_since` and aborts
        multipart uploads under it that have received no part since then; at most `limit`
        of each. Returns how many were removed."""
        return await self._run(
            "remove_stale",
            lambda: (
                self._remove_idle_objects(prefix, idle_since, limit)
                + self._abort_idle_uploads(prefix, idle_since, limit)
            ),
        )

    def _remove_idle_objects(self, prefix: str, idle_since: datetime, limit: int) -> int:
        removed = 0
        for found in self._client.list_objects(self.bucket, prefix=prefix, recursive=True):
            if removed >= limit:
                break
            name, modified = found.object_name, found.last_modified
            if name is not None and modified is not None and modified < idle_since:
                self._client.remove_object(self.bucket, name)
                removed += 1
        return removed

    def _abort_idle_uploads(self, prefix: str, idle_since: datetime, limit: int) -> int:
        # minio 7 has no public calls for unfinished multipart uploads (a crash leaves
        # them behind); these are the ones its own put_object is built on.
        listing = self._client._list_multipart_uploads(
            self.bucket, prefix=prefix, max_uploads=limit
        )
        aborted = 0
        for upload in listing.uploads:
            name, upload_id = upload.object_name, upload.upload_id
            initiated = upload.initiated_time
            if name is None or upload_id is None or initiated is None or initiated >= idle_since:
                continue
            # A slow upload started long ago is still alive while parts keep arriving.
            parts = self._client._list_parts(self.bucket, name, upload_id).parts
            if all(p.last_modified is None or p.last_modified < idle_since for p in parts):
                self._client._abort_multipart_upload(self.bucket, name, upload_id)
                aborted += 1
        return aborted

    async def presign_get(self, key: str, ttl: timedelta) -> str:
        return await self._run(
            "presign", lambda: self._client.presigned_get_object(self.bucket, key, ttl)
        )

    async def presign_many(self, keys: list[str], ttl: timedelta) -> list[str]:
        """URLs valid for at least `ttl * (1 - PRESIGN_REUSE)`: a URL signed less than
        `PRESIGN_REUSE` of its TTL ago is handed out again. Signing costs about 0.1 ms a
        key, which on a page of hits was a large part of a read."""
        if not keys:
            return []
        now = time.monotonic()
        fresh_for = ttl.total_seconds() * PRESIGN_REUSE
        urls: dict[str, str] = {}
        for key in keys:
            cached = self._signed.get((key, ttl))
            if cached is not None and now - cached[1] < fresh_for:
                urls[key] = cached[0]
        missing = list(dict.fromkeys(k for k in keys if k not in urls))
        if missing:
            # Signing is local computation: one executor hop for the whole page.
            signed = await self._run(
                "presign",
                lambda: [self._client.presigned_get_object(self.bucket, k, ttl) for k in missing],
            )
            if len(self._signed) > PRESIGN_CACHE_SIZE:
                self._signed.clear()
            for key, url in zip(missing, signed, strict=True):
                urls[key] = url
                self._signed[(key, ttl)] = (url, now)
        return [urls[k] for k in keys]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
