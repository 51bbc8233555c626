"""A ZIP archive written front to back into an async sink, never whole in memory.

zipfile writes into a buffer that cannot seek, so every entry gets a data descriptor
(its CRC and sizes follow its data, as in any streamed ZIP) instead of a header
rewritten afterwards; the buffer is handed to the sink after every step, so it holds at
most one step's output. Only the central directory, one small record per entry, stays
in memory until the end. Compression runs in a worker thread, so the event loop keeps
serving calls while a large entry is deflated. Stored media are copied into entries
chunk by chunk from the object store.
"""

from __future__ import annotations

import asyncio
import contextlib
import zipfile
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import IO, cast

from service.domain.models import StoredBlob
from service.domain.ports import ByteSink, MediaStreams

MEDIA_CHUNK_BYTES = 1024 * 1024
# Small writes into an entry are gathered up to this size before they are compressed.
WRITE_BUFFER_BYTES = 1024 * 1024
# Stored (not deflated) entries up to this size are written without a worker thread.
INLINE_STORED_BYTES = 64 * 1024
# Regular file, rw-r--r--.
_FILE_ATTRIBUTES = 0o100644 << 16


class _Buffer:
    """What zipfile writes into: append-only, with neither tell() nor seek()."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        taken = bytes(self.data)
        self.data.clear()
        return taken


class ZipStream:
    def __init__(self, sink: ByteSink, modified: datetime) -> None:
        self._sink = sink
        self._buffer = _Buffer()
        self._zip = zipfile.ZipFile(cast(IO[bytes], self._buffer), "w", allowZip64=True)
        stamp = modified.astimezone(UTC)
        self._date_time = (
            stamp.year,
            stamp.month,
            stamp.day,
            stamp.hour,
            stamp.minute,
            stamp.second,
        )

    def _info(self, name: str, size: int, compress: bool) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name, self._date_time)
        info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        info.external_attr = _FILE_ATTRIBUTES
        # zipfile picks ZIP64 headers from the expected size.
        info.file_size = size
        return info

    async def add(self, name: str, data: bytes, *, compress: bool) -> None:
        """An entry whose bytes are all at hand."""
        info = self._info(name, len(data), compress)
        if compress or len(data) > INLINE_STORED_BYTES:
            await asyncio.to_thread(self._zip.writestr, info, data)
        else:
            # A small stored entry is a CRC and a copy: cheaper than the trip to a thread.
            self._zip.writestr(info, data)
        await self._drain()

    @asynccontextmanager
    async def open(self, name: str, *, size: int, compress: bool) -> AsyncIterator[ZipEntry]:
        """An entry written piece by piece; `size` is its expected size (an estimate
        above the real size is fine)."""
        handle = self._zip.open(self._info(name, size, compress), "w")
        entry = ZipEntry(handle, self._drain)
        try:
            yield entry
            await entry.flush()
        finally:
            await asyncio.to_thread(handle.close)
            await self._drain()

    async def close(self) -> None:
        """Writes the central directory."""
        self._zip.close()
        await self._drain()

    async def _drain(self) -> None:
        if self._buffer.data:
            await self._sink.write(self._buffer.take())


class ZipEntry:
    def __init__(self, handle: IO[bytes], drain: Callable[[], Awaitable[None]]) -> None:
        self._handle = handle
        self._drain = drain
        self._pending = bytearray()

    async def write(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) >= WRITE_BUFFER_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            await asyncio.to_thread(self._handle.write, data)
            await self._drain()


async def media_chunks(streams: MediaStreams, blob: StoredBlob) -> AsyncGenerator[bytes, None]:
    """The stored original in chunks; fails if it does not have the recorded size, so that
    the length already written before it in the archive is never wrong unnoticed."""
    async with contextlib.aclosing(streams.stream(blob, MEDIA_CHUNK_BYTES)) as chunks:
        async for chunk in chunks:
            yield chunk
