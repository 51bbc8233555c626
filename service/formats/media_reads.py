"""Reading the media an archive embeds, ahead of the archive: the one read-ahead of every
writer that carries media (VI_FULL, COCO and the Clarifai formats with embed_media).

A dataset mostly holds small media, and reading one object costs a round trip to the
object store: read one after the other, they bound an export at a few hundred files a
second. read_ahead keeps up to `reads` of them in flight and hands them over in archive
order; files over `whole_bytes` are not read ahead but streamed by the caller when their
turn comes, so the bytes read ahead never exceed `ahead_bytes`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from typing import TypeVar

from service.domain.models import StoredBlob
from service.domain.ports import MediaStreams
from service.formats.zipstream import ZipStream, media_chunks

K = TypeVar("K")

# As many as the object store serves at once (its threads and pooled connections,
# storage.objectstore.store.MAX_CONCURRENT_CALLS): more would only queue for them.
MAX_READS = 32
MAX_WHOLE_BYTES = 1024 * 1024
MAX_AHEAD_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ReadAhead:
    """How far the media are read ahead of the archive."""

    reads: int = MAX_READS
    whole_bytes: int = MAX_WHOLE_BYTES
    ahead_bytes: int = MAX_AHEAD_BYTES

    def __post_init__(self) -> None:
        if self.reads < 1 or self.whole_bytes < 0 or self.ahead_bytes < self.whole_bytes:
            raise ValueError(f"read-ahead limits out of range: {self}")


READ_AHEAD = ReadAhead()


async def _read(streams: MediaStreams, blob: StoredBlob) -> bytes:
    return b"".join([chunk async for chunk in media_chunks(streams, blob)])


async def read_ahead(
    streams: MediaStreams, files: Iterable[tuple[K, StoredBlob]], limits: ReadAhead
) -> AsyncGenerator[tuple[K, StoredBlob, bytes | None], None]:
    """Each of `files` in order with its bytes, read ahead; None instead of the bytes of a
    file over `limits.whole_bytes`, which the caller streams (chunks_of). A failed read
    fails the generator at that file; closing it early (aclosing), or its failure,
    cancels the reads still running and waits for them."""
    window: deque[tuple[K, StoredBlob, asyncio.Task[bytes] | None]] = deque()
    held = 0
    remaining = iter(files)
    following = next(remaining, None)
    try:
        while following is not None or window:
            while following is not None:
                key, blob = following
                whole = blob.size <= limits.whole_bytes
                if window and (
                    len(window) >= limits.reads or (whole and held + blob.size > limits.ahead_bytes)
                ):
                    break
                task = asyncio.create_task(_read(streams, blob)) if whole else None
                held += blob.size if whole else 0
                window.append((key, blob, task))
                following = next(remaining, None)
            key, blob, task = window[0]
            content = await task if task is not None else None
            window.popleft()
            held -= blob.size if task is not None else 0
            yield key, blob, content
    finally:
        for _, _, task in window:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for _, _, t in window if t is not None), return_exceptions=True)


async def chunks_of(
    streams: MediaStreams, blob: StoredBlob, content: bytes | None
) -> AsyncGenerator[bytes, None]:
    """The file read_ahead handed over: its bytes, or streamed when it was too large."""
    if content is not None:
        yield content
        return
    async with contextlib.aclosing(media_chunks(streams, blob)) as chunks:
        async for chunk in chunks:
            yield chunk


async def add_media_entries(
    archive: ZipStream,
    streams: MediaStreams,
    files: list[tuple[str, StoredBlob]],
    limits: ReadAhead,
) -> None:
    """Adds each (path, original) as an entry of the archive, in order. Stored, not
    deflated: media are mostly compressed formats already."""
    async with contextlib.aclosing(read_ahead(streams, files, limits)) as ready:
        async for path, blob, content in ready:
            if content is not None:
                await archive.add(path, content, compress=False)
                continue
            async with archive.open(path, size=blob.size, compress=False) as entry:
                async for chunk in chunks_of(streams, blob, None):
                    await entry.write(chunk)
