"""The Vi writer's read-ahead of media files, against an in-memory object store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from service.domain.models import StoredBlob
from service.domain.ports import StagedUpload
from service.formats.vi.writer import PREFETCH_FILES, PREFETCH_MAX_BYTES, _prefetched


class Streams:
    """Each object's bytes are its key repeated; records how many reads run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0

    def stage(self, max_size: int) -> StagedUpload:
        raise NotImplementedError

    async def stream(self, blob: StoredBlob, chunk_size: int) -> AsyncGenerator[bytes, None]:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.001)
            yield (blob.key.encode() * blob.size)[: blob.size]
        finally:
            self.running -= 1


def blob(key: str, size: int) -> StoredBlob:
    return StoredBlob(key, "0" * 64, size, "image/png")


async def test_files_come_in_order_small_ones_read_ahead_large_ones_left_to_stream() -> None:
    streams = Streams()
    sizes = [10] * 20 + [PREFETCH_MAX_BYTES + 1] + [10] * 5
    files = [(f"assets/all/{n}.png", blob(f"k{n}", size)) for n, size in enumerate(sizes)]
    seen = [item async for item in _prefetched(streams, files)]
    assert [(path, b) for path, b, _ in seen] == files
    for (_, stored, content), size in zip(seen, sizes, strict=True):
        if size > PREFETCH_MAX_BYTES:
            assert content is None
        else:
            assert content == (stored.key.encode() * size)[:size]
    assert 1 < streams.most <= PREFETCH_FILES + 1


async def test_an_abandoned_read_ahead_leaves_no_read_running() -> None:
    streams = Streams()
    files = [(f"{n}.png", blob(f"k{n}", 10)) for n in range(50)]
    reader = _prefetched(streams, files)
    await anext(reader)
    await reader.aclose()
    await asyncio.sleep(0.01)
    assert streams.running == 0
