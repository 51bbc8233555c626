"""The VI_FULL writer's media entries, read ahead (service/formats/media_reads.py) from an
in-memory object store: in archive order, small files read whole, large ones streamed."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import UTC, datetime

from datasetd.v1 import data_pb2, input_pb2

from service.domain.models import ExportFormat, ExportOptions, StoredBlob, VersionMember
from service.formats.archives import Archives
from service.formats.media_reads import ReadAhead
from tests.unit.test_media_reads import Streams, content

LIMITS = ReadAhead(reads=3, whole_bytes=100, ahead_bytes=200)


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    async def write(self, chunk: bytes) -> None:
        self.data += chunk


def member(position: int, size: int) -> VersionMember:
    message = input_pb2.Input(
        id=f"in-{position}",
        data=data_pb2.Data(
            image=data_pb2.Image(image_info=data_pb2.ImageInfo(width=4, height=3, format="PNG"))
        ),
    )
    blob = StoredBlob(f"k{position}", "0" * 64, size, "image/png")
    return VersionMember(position, message.id, message.SerializeToString(), blob)


async def test_media_files_are_written_in_order_small_ones_read_ahead_large_ones_streamed() -> None:
    streams = Streams()
    # A large file between small ones, and one over the chunk size the store streams in.
    sizes = [10] * 20 + [LIMITS.whole_bytes + 1] + [10] * 5 + [3 * 1024 * 1024 + 5]
    members = [member(n, size) for n, size in enumerate(sizes)]
    sink = Sink()
    writer = Archives(streams, LIMITS).writer(
        ExportFormat.VI_FULL, ExportOptions(embed_media=True), ["all"], sink, datetime.now(UTC)
    )
    assert await writer.write("all", members) == len(members)
    await writer.finish()
    with zipfile.ZipFile(io.BytesIO(sink.data)) as archive:
        assets = [name for name in archive.namelist() if name.startswith("assets/")]
        assert assets == [f"assets/all/in-{n}.png" for n in range(len(sizes))]
        for name, written in zip(assets, members, strict=True):
            assert written.blob is not None
            assert archive.read(name) == content(written.blob)
        lines = archive.read("annotations/all.jsonl").decode().splitlines()
        assert [json.loads(line)["file_name"] for line in lines] == assets
    assert 1 < streams.most <= LIMITS.reads
    assert streams.running == 0
