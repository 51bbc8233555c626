"""Reading a version member's content (one serialized datasetd.v1.Input, see encode.py)
for the export writers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Literal

from datasetd.v1 import data_pb2, input_pb2

from service.domain.models import StoredBlob
from service.domain.ports import MediaStreams

Medium = Literal["image", "video", "audio", "text"]
MEDIA: tuple[Medium, ...] = ("image", "video", "audio", "text")
MEDIA_CHUNK_BYTES = 1024 * 1024


def parse(data: bytes) -> input_pb2.Input:
    return input_pb2.Input.FromString(data)


def medium_of(data: data_pb2.Data) -> Medium | None:
    return next((medium for medium in MEDIA if data.HasField(medium)), None)


def all_regions(data: data_pb2.Data) -> Iterator[data_pb2.Region]:
    """The input's regions, then those of its frames."""
    yield from data.regions
    for frame in data.frames:
        yield from frame.data.regions


def positive_concepts(message: input_pb2.Input) -> frozenset[str]:
    """Every concept the input is labelled with: its own, its regions' and its frames'. A
    concept with value 0 says the input is not that concept: it labels nothing."""
    data = message.data
    found = {c.id for c in data.concepts if c.value > 0}
    found.update(c.id for frame in data.frames for c in frame.data.concepts if c.value > 0)
    found.update(c.id for region in all_regions(data) for c in region.data.concepts if c.value > 0)
    return frozenset(found)


def labels_of(members_data: list[bytes]) -> list[frozenset[str]]:
    return [positive_concepts(parse(data)) for data in members_data]


async def media_chunks(streams: MediaStreams, blob: StoredBlob) -> AsyncIterator[bytes]:
    """The stored original in chunks; fails if it does not have the recorded size, so that
    the length already written before it in the archive is never wrong unnoticed."""
    async with contextlib.aclosing(streams.stream(blob, MEDIA_CHUNK_BYTES)) as chunks:
        async for chunk in chunks:
            yield chunk
