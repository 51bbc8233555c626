"""The read-ahead of embedded media (service/formats/media_reads.py) against an in-memory
object store that counts the reads in flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from service.domain.models import ExportFormat, ExportOptions, StoredBlob
from service.domain.ports import StagedUpload
from service.formats.archives import Archives
from service.formats.media_reads import ReadAhead, chunks_of, read_ahead
from tests.unit.test_export_writers import MODIFIED, Sink, image_member

LIMITS = ReadAhead(reads=4, whole_bytes=100, ahead_bytes=200)


class Streams:
    """Each object's bytes are its key repeated, in chunks of `chunk_size`; records how
    many reads run at once. A key in `failing` fails its read."""

    def __init__(self, failing: frozenset[str] = frozenset()) -> None:
        self.failing = failing
        self.running = 0
        self.most = 0
        self.started: list[str] = []

    def stage(self, max_size: int) -> StagedUpload:
        raise AssertionError("the read-ahead never stages uploads")

    async def stream(
        self, blob: StoredBlob, chunk_size: int, offset: int = 0, length: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        self.running += 1
        self.most = max(self.most, self.running)
        self.started.append(blob.key)
        try:
            await asyncio.sleep(0.001)
            if blob.key in self.failing:
                raise RuntimeError(f"object {blob.key} is unreadable")
            data = content(blob)
            for start in range(0, len(data), chunk_size):
                yield data[start : start + chunk_size]
                await asyncio.sleep(0)
        finally:
            self.running -= 1


def content(blob: StoredBlob) -> bytes:
    return (blob.key.encode() * blob.size)[: blob.size]


def blob(key: str, size: int) -> StoredBlob:
    return StoredBlob(key, "0" * 64, size, "image/png")


def files(sizes: list[int]) -> list[tuple[str, StoredBlob]]:
    return [(f"assets/{n}.png", blob(f"k{n}", size)) for n, size in enumerate(sizes)]


async def test_files_come_in_order_with_their_bytes_and_large_ones_are_left_to_stream() -> None:
    streams = Streams()
    wanted = files([10] * 20 + [LIMITS.whole_bytes + 1] + [10] * 5)
    seen = [item async for item in read_ahead(streams, wanted, LIMITS)]
    assert [(path, stored) for path, stored, _ in seen] == wanted
    for _, stored, read in seen:
        assert read == (None if stored.size > LIMITS.whole_bytes else content(stored))


async def test_reads_overlap_up_to_the_limit_and_no_further() -> None:
    streams = Streams()
    async for _ in read_ahead(streams, files([10] * 40), LIMITS):
        # A slow consumer: the reads behind it have every chance to pile up.
        await asyncio.sleep(0.002)
    assert streams.most == LIMITS.reads


async def test_the_bytes_held_ahead_stay_within_the_memory_bound() -> None:
    streams = Streams()
    # Two files of 90 bytes fit the 200 bytes held ahead, three do not.
    async for _ in read_ahead(streams, files([90] * 12), LIMITS):
        await asyncio.sleep(0.002)
    assert streams.most == 2


async def test_a_failing_read_fails_at_its_file_and_cancels_the_reads_behind() -> None:
    streams = Streams(failing=frozenset({"k5"}))
    got = []
    with pytest.raises(RuntimeError, match="k5 is unreadable"):
        async for path, _, _ in read_ahead(streams, files([10] * 30), LIMITS):
            got.append(path)
    assert got == [f"assets/{n}.png" for n in range(5)]
    assert streams.running == 0
    # Nothing past the window of the failed file was started.
    assert len(streams.started) <= 5 + LIMITS.reads


async def test_an_abandoned_read_ahead_leaves_no_read_running() -> None:
    streams = Streams()
    reader = read_ahead(streams, files([10] * 50), LIMITS)
    await anext(reader)
    # The second file was read with the first: the reads behind it start now.
    await anext(reader)
    await asyncio.sleep(0)
    assert streams.running > 0
    await reader.aclose()
    assert streams.running == 0


async def test_a_large_file_is_streamed_in_chunks() -> None:
    streams = Streams()
    large = blob("large", 5 * 1024 * 1024 + 7)
    [(_, stored, read)] = [item async for item in read_ahead(streams, [("a", large)], LIMITS)]
    assert read is None
    chunks = [chunk async for chunk in chunks_of(streams, stored, read)]
    assert len(chunks) > 1
    assert b"".join(chunks) == content(large)


def test_limits_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        ReadAhead(reads=0)
    with pytest.raises(ValueError, match="out of range"):
        ReadAhead(whole_bytes=10, ahead_bytes=5)


@pytest.mark.parametrize(
    "export_format", [ExportFormat.VI_FULL, ExportFormat.COCO, ExportFormat.CLARIFAI_DATA_PROTOBUF]
)
async def test_a_failing_read_fails_the_export_of_every_format_with_media(
    export_format: ExportFormat,
) -> None:
    members = [image_member(n, b"x" * 10) for n in range(30)]
    keys = [m.blob.key for m in members if m.blob is not None]
    streams = Streams(failing=frozenset({keys[7]}))
    writer = Archives(streams, LIMITS).writer(
        export_format, ExportOptions(embed_media=True), ["all"], Sink(), MODIFIED
    )
    if writer.needs_census:
        await writer.observe(members)
    with pytest.raises(RuntimeError, match=f"{keys[7]} is unreadable"):
        # The Clarifai writers read a batch's media when it is flushed, at the end.
        await writer.write("all", members)
        await writer.finish()
    assert streams.running == 0
    assert streams.most <= LIMITS.reads
