"""Streaming one object into S3 from chunks as they arrive, with minio's public API only.

minio's put_object takes a blocking reader of unknown length and turns it into a
multipart upload (or a single PUT when the stream ends within the first part). An
ObjectWriter runs it on a thread of its own and feeds it through a bounded pipe from
the event loop: the loop only hands over references to the chunks it was given, and
the thread reads whole parts, hashes them and sends them, so a part is on its way
while the caller keeps writing the next one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger(__name__)

# S3 multipart rules: every part but the last has at least 5 MiB, and there are at most
# 10,000 parts.
MIN_PART_BYTES = 5 * 1024 * 1024
MAX_PARTS = 10_000
DEFAULT_PART_BYTES = 8 * 1024 * 1024
_MIB = 1024 * 1024
# How long an aborted upload waits for the removal of what it wrote (see ObjectWriter.abort).
ABORT_REMOVE_SECONDS = 2.0


def part_size_for(max_size: int) -> int:
    """8 MiB, or the smallest whole number of MiB that fits `max_size` in 10,000 parts."""
    needed = -(-max_size // MAX_PARTS)
    return max(DEFAULT_PART_BYTES, -(-needed // _MIB) * _MIB)


class Readable(Protocol):
    """The part of a binary file that minio's put_object reads from."""

    def read(self, size: int = -1) -> bytes: ...


class UploadAborted(Exception):
    """Raised inside the upload thread so that minio aborts its multipart upload."""


class _Pipe:
    """Chunks handed from the event loop to the upload thread.

    The thread blocks in read() until it can have the whole part it asks for (or the
    stream ends), so minio receives each part as one bytes object instead of growing
    it piece by piece. The loop's put() waits, without blocking the loop, while
    `capacity` bytes or more are held; `capacity` must be at least the largest read
    (a part and one byte), or both sides would wait for each other.
    """

    def __init__(
        self, capacity: int, loop: asyncio.AbstractEventLoop, digest: hashlib._Hash
    ) -> None:
        self._capacity = capacity
        self._loop = loop
        self._digest = digest
        self._lock = threading.Lock()
        self._readable = threading.Condition(self._lock)
        self._chunks: deque[memoryview] = deque()
        self._held = 0
        # How many bytes the thread waits for, while it waits in read().
        self._wanted: int | None = None
        self._ended = False  # the writer has written everything
        self._aborted = False
        self._closed = False  # the thread reads no more
        self._waiter: asyncio.Future[None] | None = None

    # --- the upload thread --------------------------------------------------------------

    def read(self, size: int = -1) -> bytes:
        with self._readable:
            wanted = size if size >= 0 else self._capacity
            self._wanted = wanted
            self._wake_loop()
            while self._held < wanted and not self._ended and not self._aborted:
                self._readable.wait()
            self._wanted = None
            if self._aborted:
                raise UploadAborted
            pieces = self._take(wanted)
            self._wake_loop()
        data = b"".join(pieces)
        # Here rather than on the loop: hashing is the expensive part, and reads come in
        # stream order.
        self._digest.update(data)
        return data

    def close_reading(self) -> None:
        """The thread is done, however it ended: the loop must stop waiting for it."""
        with self._lock:
            self._closed = True
            self._chunks.clear()
            self._held = 0
            self._wake_loop()

    def _take(self, size: int) -> list[memoryview]:
        pieces = []
        while size and self._chunks:
            chunk = self._chunks.popleft()
            if len(chunk) > size:
                self._chunks.appendleft(chunk[size:])
                chunk = chunk[:size]
            pieces.append(chunk)
            size -= len(chunk)
            self._held -= len(chunk)
        return pieces

    def _wake_loop(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            # The loop may be gone when an abandoned upload's thread ends.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_resolve, waiter)

    # --- the event loop -----------------------------------------------------------------

    async def put(self, chunk: bytes) -> bool:
        """Hands `chunk` over once there is room; False if the thread reads no more."""
        return await self._when(lambda: self._held < self._capacity, lambda: self._add(chunk))

    async def drained(self) -> bool:
        """True once the thread waits for more than is held: every whole part written
        so far has been sent. False if the thread reads no more."""
        return await self._when(
            lambda: self._wanted is not None and self._held < self._wanted, lambda: None
        )

    def end(self) -> None:
        with self._readable:
            self._ended = True
            self._readable.notify()

    def abort(self) -> None:
        with self._readable:
            self._aborted = True
            self._readable.notify()

    def _add(self, chunk: bytes) -> None:
        self._chunks.append(memoryview(chunk))
        self._held += len(chunk)
        self._readable.notify()

    async def _when(self, ready: Callable[[], bool], then: Callable[[], None]) -> bool:
        while True:
            with self._lock:
                if self._closed:
                    return False
                if ready():
                    then()
                    return True
                if self._waiter is None:
                    self._waiter = self._loop.create_future()
                waiter = self._waiter
            # Shielded: a cancelled caller must not cancel a waiter the thread resolves.
            await asyncio.shield(waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class ObjectWriter:
    """Writes one object from chunks as they arrive.

    Memory stays bounded by a few parts however long the stream: the pipe holds at most
    a part (and one chunk) while minio holds the part it sends. The upload holds a
    thread from the first write until it ends, since put_object pulls from a blocking
    reader; an object smaller than one part is sent with a single PUT by finish().
    """

    def __init__(
        self,
        key: str,
        part_size: int,
        *,
        upload: Callable[[Readable], None],
        remove: Callable[[], Awaitable[None]],
    ) -> None:
        """`upload` sends the whole stream under `key` in parts of `part_size` bytes,
        blocking; `remove` deletes the object."""
        if part_size < MIN_PART_BYTES:
            raise ValueError(f"part size {part_size} is below the S3 minimum {MIN_PART_BYTES}")
        self.key = key
        self.size = 0
        self._part_size = part_size
        self._upload = upload
        self._remove = remove
        self._digest = hashlib.sha256()
        self._pipe: _Pipe | None = None
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._finished = False

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of everything written; complete once finish() has returned."""
        return self._digest.hexdigest()

    async def write(self, chunk: bytes) -> None:
        if self._finished:
            raise RuntimeError(f"upload {self.key} is already finished")
        # bytes() copies only a buffer the caller could still change.
        if not await self._started().put(bytes(chunk)):
            await self._failure()
        self.size += len(chunk)

    async def drain(self) -> None:
        """Waits until every whole part written so far has been sent."""
        if self._pipe is not None and not await self._pipe.drained():
            await self._failure()

    async def finish(self) -> None:
        """Completes the object; it exists under `key` afterwards."""
        self._started().end()
        await asyncio.wrap_future(self._done)
        self._finished = True

    async def abort(self) -> None:
        """Removes whatever was written, finished or not. Never raises: it runs on error
        paths, and whatever a failure here leaves behind is removed by remove_stale.

        The removal is waited for at most ABORT_REMOVE_SECONDS: on a store that does not
        answer (the usual reason to abort) it would take as long again as the failure that
        led here, and the caller's error, due now, would reach it after its deadline."""
        try:
            if self._pipe is not None:
                # The thread fails its next read, and minio aborts the multipart upload.
                self._pipe.abort()
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(self._done)
            await asyncio.wait_for(self._remove(), ABORT_REMOVE_SECONDS)
        except Exception:
            log.warning(
                "could not remove upload %s; it is removed once stale", self.key, exc_info=True
            )

    def _started(self) -> _Pipe:
        if self._pipe is None:
            self._pipe = _Pipe(self._part_size + 1, asyncio.get_running_loop(), self._digest)
            # Running from the start, so that no cancelled waiter can cancel it.
            self._done.set_running_or_notify_cancel()
            threading.Thread(
                target=self._run, args=(self._pipe,), name="s3-upload", daemon=True
            ).start()
        return self._pipe

    def _run(self, pipe: _Pipe) -> None:
        try:
            try:
                self._upload(pipe)
            finally:
                pipe.close_reading()
        except BaseException as exc:  # handed to whoever awaits the upload
            self._done.set_exception(exc)
        else:
            self._done.set_result(None)

    async def _failure(self) -> None:
        """Raises why the upload ended before the stream did."""
        await asyncio.wrap_future(self._done)
        raise RuntimeError(f"upload {self.key} ended before its stream")
