"""The archive writers on their own: batching, streamed media framing, mask RLE."""

from __future__ import annotations

import io
import zipfile
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from clarifai_grpc.grpc.api import resources_pb2
from datasetd.v1 import data_pb2, input_pb2
from google.protobuf import json_format
from PIL import Image
from pycocotools import mask as coco_mask

from service.domain.models import (
    ExportFormat,
    ExportOptions,
    FidelityReport,
    StoredBlob,
    VersionMember,
)
from service.domain.ports import StagedUpload
from service.formats.archives import Archives
from service.formats.coco.rle import mask_rle

# pycocotools' own use of numpy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
MODIFIED = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    async def write(self, chunk: bytes) -> None:
        self.data += chunk


class Media:
    """Stored originals by key, streamed in chunks of an odd size."""

    def __init__(self, originals: dict[str, bytes]) -> None:
        self.originals = originals

    def stage(self, max_size: int) -> StagedUpload:
        raise NotImplementedError

    async def stream(
        self, blob: StoredBlob, chunk_size: int, offset: int = 0, length: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        data = self.originals[blob.key]
        step = min(chunk_size, 7777)
        for start in range(0, len(data), step):
            yield data[start : start + step]


def image_member(position: int, media: bytes | None = None) -> VersionMember:
    message = input_pb2.Input(
        id=f"in-{position}",
        title=f"photo {position}.png",
        data=data_pb2.Data(
            image=data_pb2.Image(
                url=f"s3://bucket/blobs/orig/{position}",
                hosted=data_pb2.HostedURL(prefix="s3://bucket/blobs", suffix=str(position)),
                image_info=data_pb2.ImageInfo(width=4, height=3, format="PNG"),
            ),
            concepts=[data_pb2.Concept(id="cat", value=1.0)],
        ),
    )
    blob = None
    if media is not None:
        blob = StoredBlob(f"key-{position}", "0" * 64, len(media), "image/png")
    return VersionMember(position, message.id, message.SerializeToString(), blob)


async def archive(
    export_format: ExportFormat,
    members: list[VersionMember],
    originals: dict[str, bytes] | None = None,
    *,
    embed: bool = False,
    page: int = 500,
) -> tuple[bytes, FidelityReport]:
    sink = Sink()
    writer = Archives(Media(originals or {})).writer(
        export_format, ExportOptions(embed_media=embed), ["all"], sink, MODIFIED
    )
    if writer.needs_census:
        await writer.observe(members)
    for start in range(0, len(members), page):
        await writer.write("all", members[start : start + page])
    fidelity = await writer.finish()
    return bytes(sink.data), fidelity


def read_batches(data: bytes, export_format: ExportFormat) -> list[tuple[str, list[Any]]]:
    with zipfile.ZipFile(io.BytesIO(data)) as opened:
        assert opened.testzip() is None
        names = opened.namelist()
        assert names[0] == "mimetype"
        found = []
        for name in names[1:]:
            raw = opened.read(name)
            if export_format is ExportFormat.CLARIFAI_DATA_PROTOBUF:
                batch = resources_pb2.InputBatch.FromString(raw)
            else:
                batch = json_format.Parse(raw, resources_pb2.InputBatch())
            found.append((name, list(batch.inputs)))
        return found


@pytest.mark.parametrize(
    "export_format", [ExportFormat.CLARIFAI_DATA_PROTOBUF, ExportFormat.CLARIFAI_DATA_JSON]
)
async def test_batches_hold_at_most_a_thousand_inputs(export_format: ExportFormat) -> None:
    members = [image_member(n) for n in range(2500)]
    data, fidelity = await archive(export_format, members, page=300)
    found = read_batches(data, export_format)
    assert [name for name, _ in found] == [
        "all/batch-000000_n1000",
        "all/batch-000001_n1000",
        "all/batch-000002_n500",
    ]
    assert [i.id for _, inputs in found for i in inputs] == [m.input_id for m in members]
    # The title is datasetd's own field: kept in binary, where readers skip it; left out of
    # JSON, where the reference parser would refuse it.
    if export_format is ExportFormat.CLARIFAI_DATA_JSON:
        assert fidelity.dropped == {"titles": 2500}
    else:
        assert not fidelity.dropped
        assert input_pb2.Input.FromString(found[0][1][0].SerializeToString()).title == "photo 0.png"


@pytest.mark.parametrize(
    "export_format", [ExportFormat.CLARIFAI_DATA_PROTOBUF, ExportFormat.CLARIFAI_DATA_JSON]
)
async def test_streamed_media_land_in_base64(export_format: ExportFormat) -> None:
    # Sizes around the varint boundaries of the lengths written before the bytes.
    sizes = [1, 2, 3, 127, 128, 16383, 16384, 3 * 1024 * 1024 + 1]
    originals = {f"key-{n}": bytes([n % 251]) * size for n, size in enumerate(sizes)}
    members = [image_member(n, originals[f"key-{n}"]) for n in range(len(sizes))]
    members.append(image_member(len(sizes)))
    data, fidelity = await archive(export_format, members, originals, embed=True)
    assert fidelity.dropped["media_not_embedded"] == 1
    inputs = [i for _, batch in read_batches(data, export_format) for i in batch]
    assert len(inputs) == len(members)
    for n, item in enumerate(inputs[:-1]):
        image = item.data.image
        assert image.base64 == originals[f"key-{n}"]
        assert not image.url and not image.HasField("hosted")
        assert (image.image_info.width, item.data.concepts[0].id) == (4, "cat")
    # Only referenced by URL: kept as it is.
    assert inputs[-1].data.image.url and not inputs[-1].data.image.base64


def test_mask_rle_matches_pycocotools() -> None:
    pixels = np.zeros((30, 40), dtype=np.uint8)
    pixels[5:20, 10:35] = 255
    pixels[0, 0] = 255
    pixels[29, 39] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    converted = mask_rle(buffer.getvalue(), 40, 30)
    assert converted is not None
    rle, area, bbox = converted
    compressed = coco_mask.frPyObjects(rle, 30, 40)
    decoded = coco_mask.decode(compressed)
    assert (decoded == (pixels > 0)).all()
    assert area == int((pixels > 0).sum()) == int(coco_mask.area(compressed))
    assert bbox == [0, 0, 40, 30]
    # A mask of another size is scaled to the image's.
    doubled = mask_rle(buffer.getvalue(), 80, 60)
    assert doubled is not None and doubled[1] == 4 * area
    blank = io.BytesIO()
    Image.new("L", (4, 4)).save(blank, format="PNG")
    assert mask_rle(blank.getvalue(), 4, 4) is None
    assert mask_rle(b"not a png", 4, 4) is None
