"""Writing VI_JSONL and VI_FULL archives (layout in service/formats/vi/__init__.py).

A split's lines are appended to a temporary file as pages are written, and copied into
the archive at the end (media entries of every split come in between), so neither the
lines nor the media are held in memory. VI_FULL reads the media ahead of the archive
(service.formats.media_reads).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import mimetypes
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import IO, Any

from datasetd.v1 import data_pb2

from service.domain.models import FidelityReport, StoredBlob, VersionMember, VersionOntology
from service.domain.ports import ByteSink, MediaStreams
from service.formats.clarifai.writer import display_names
from service.formats.media_reads import READ_AHEAD, ReadAhead, add_media_entries
from service.formats.snapshot import labels_of, parse
from service.formats.vi import VI_FULL_NAME, VI_JSONL_NAME
from service.formats.zipstream import MEDIA_CHUNK_BYTES, ZipStream
from service.wire.inputs import medium_of
from service.wire.struct import message_to_json

_NORMALIZED_DECIMALS = 6
_PIXEL_DECIMALS = 2
_VISIBILITY = {
    data_pb2.Point.VISIBILITY_VISIBLE: "VISIBLE",
    data_pb2.Point.VISIBILITY_NOT_VISIBLE: "NOT_VISIBLE",
    data_pb2.Point.VISIBILITY_NOT_PRESENT: "NOT_PRESENT",
}
# Where a split's lines wait for the end of the archive.
_temporary_file: Callable[[], IO[bytes]] = tempfile.TemporaryFile
# What mimetypes guesses oddly or not at all.
_EXTENSIONS = {"image/jpeg": ".jpg", "image/tiff": ".tif", "audio/mpeg": ".mp3"}


def extension(content_type: str) -> str:
    return _EXTENSIONS.get(content_type) or mimetypes.guess_extension(content_type) or ""


class _Scale:
    """Converts normalized coordinates to those the export asked for."""

    def __init__(self, pixels: bool, width: int, height: int) -> None:
        self.pixels = pixels
        self.known = not pixels or (width > 0 and height > 0)
        self._width, self._height = (width, height) if pixels else (1, 1)
        self._decimals = _PIXEL_DECIMALS if pixels else _NORMALIZED_DECIMALS

    def x(self, value: float) -> float:
        return round(value * self._width, self._decimals)

    def y(self, value: float) -> float:
        return round(value * self._height, self._decimals)


class ViWriter:
    """An ArchiveWriter of VI_FULL (`full`: with the media files) and VI_JSONL archives."""

    needs_census = False

    def __init__(
        self,
        full: bool,
        pixel_coordinates: bool,
        splits: list[str],
        sink: ByteSink,
        modified: datetime,
        streams: MediaStreams,
        ontology: VersionOntology | None = None,
        reads: ReadAhead = READ_AHEAD,
    ) -> None:
        self._full = full
        self._pixels = pixel_coordinates
        # Closed (and so removed) by finish().
        self._files = contextlib.ExitStack()
        self._lines: dict[str, IO[bytes]] = {
            name: self._files.enter_context(_temporary_file()) for name in splits
        }
        self._written = dict.fromkeys(splits, 0)
        self._zip = ZipStream(sink, modified)
        self._streams = streams
        self._reads = reads
        self._names = display_names(ontology)
        self._assets = self._tags = self._annotations = 0
        self._dropped: Counter[str] = Counter()

    async def observe(self, members: list[VersionMember]) -> list[frozenset[str]]:
        return await self.labels(members)

    async def labels(self, members: list[VersionMember]) -> list[frozenset[str]]:
        return await asyncio.to_thread(labels_of, [m.data for m in members])

    async def write(self, split: str, members: list[VersionMember]) -> int:
        target = self._lines[split]
        media = await asyncio.to_thread(lambda: [self._line(target, split, m) for m in members])
        files = [item for item in media if item is not None]
        await add_media_entries(self._zip, self._streams, files, self._reads)
        self._written[split] += len(members)
        # Every medium has a place in the format: each member is written.
        return len(members)

    async def finish(self) -> FidelityReport:
        try:
            for split, lines in self._lines.items():
                size = lines.tell()
                lines.seek(0)
                async with self._zip.open(
                    f"annotations/{split}.jsonl", size=size, compress=True
                ) as entry:
                    while chunk := await asyncio.to_thread(lines.read, MEDIA_CHUNK_BYTES):
                        await entry.write(chunk)
            summary = {
                "format": VI_FULL_NAME if self._full else VI_JSONL_NAME,
                "coordinates": "pixels" if self._pixels else "normalized",
                "splits": self._written,
                "assets": self._assets,
                "tags": self._tags,
                "annotations": self._annotations,
            }
            await self._zip.add("metadata.json", _json(summary) + b"\n", compress=True)
            await self._zip.close()
        finally:
            self._files.close()
        return FidelityReport(dict(sorted(self._dropped.items())), self._notes())

    def _line(
        self, target: IO[bytes], split: str, member: VersionMember
    ) -> tuple[str, StoredBlob] | None:
        """Appends the member's line to its split; returns the archive path and original
        of a media file to add."""
        message = parse(member.data)
        data = message.data
        medium = medium_of(data)
        line: dict[str, Any] = {
            "asset_id": message.id,
            "split": split,
            "media_type": medium or "",
        }
        if message.title:
            line["title"] = message.title
        asset = None
        width = height = 0
        if medium in ("image", "video"):
            info = data.image.image_info if medium == "image" else data.video.video_info
            width, height = info.width, info.height
        if medium == "text":
            line["text"] = data.text.raw
        elif medium is not None:
            if self._full and member.blob is not None:
                asset = f"assets/{split}/{message.id}{extension(member.blob.content_type)}"
                line["file_name"] = asset
            else:
                line["url"] = getattr(data, medium).url
                if self._full:
                    self._dropped["media_not_embedded"] += 1
        if width > 0 and height > 0:
            line["width"], line["height"] = width, height
        if data.HasField("geo"):
            point = data.geo.geo_point
            line["geo"] = {"latitude": point.latitude, "longitude": point.longitude}
        line["metadata"] = message_to_json(data.metadata) if data.metadata.fields else {}
        if data.embeddings:
            self._dropped["embeddings"] += len(data.embeddings)
        scale = _Scale(self._pixels, width, height)
        line["tags"] = self._concepts(data.concepts)
        self._tags += len(data.concepts)
        line["annotations"] = self._regions(data.regions, scale)
        if data.frames:
            line["frames"] = [
                {
                    "index": frame.frame_info.index,
                    "time_ms": frame.frame_info.time,
                    "number": frame.frame_info.number,
                    "tags": self._concepts(frame.data.concepts),
                    "annotations": self._regions(frame.data.regions, scale),
                }
                for frame in data.frames
            ]
        target.write(_json(line) + b"\n")
        if asset is not None and member.blob is not None:
            self._assets += 1
            return asset, member.blob
        return None

    def _concepts(self, concepts: Iterable[data_pb2.Concept]) -> list[dict[str, Any]]:
        return [
            {
                "id": c.id,
                "name": c.name or self._names.get(c.id) or c.id,
                "value": 1 if c.value > 0 else 0,
            }
            for c in concepts
        ]

    def _regions(self, regions: Iterable[data_pb2.Region], scale: _Scale) -> list[dict[str, Any]]:
        written = []
        for region in regions:
            geometry = self._geometry(region.region_info, scale)
            if geometry is None:
                continue
            entry: dict[str, Any] = {"id": region.id, "type": geometry[0]}
            entry[geometry[0]] = geometry[1]
            entry["concepts"] = self._concepts(region.data.concepts)
            if region.value:
                entry["confidence"] = round(region.value, _NORMALIZED_DECIMALS)
            if region.track_id:
                entry["track_id"] = region.track_id
            written.append(entry)
        self._annotations += len(written)
        return written

    def _geometry(self, info: data_pb2.RegionInfo, scale: _Scale) -> tuple[str, Any] | None:
        """The region's type and geometry, or None (counted) for one that cannot be written."""
        if info.HasField("span"):
            span: dict[str, Any] = {"start": info.span.char_start, "end": info.span.char_end}
            if info.span.raw_text:
                span["text"] = info.span.raw_text
            return "span", span
        if info.HasField("mask"):
            image = info.mask.image
            if image.base64:
                return "mask", {"png_base64": base64.b64encode(image.base64).decode("ascii")}
            return "mask", {"url": image.url}
        spatial = (
            info.HasField("bounding_box")
            or info.HasField("polygon")
            or info.HasField("point")
            or bool(info.keypoint_locations)
        )
        if not spatial:
            self._dropped["regions_without_geometry"] += 1
            return None
        if not scale.known:
            self._dropped["regions_without_image_size"] += 1
            return None
        if info.HasField("bounding_box"):
            box = info.bounding_box
            return "bounding_box", {
                "x_min": scale.x(box.left_col),
                "y_min": scale.y(box.top_row),
                "x_max": scale.x(box.right_col),
                "y_max": scale.y(box.bottom_row),
            }
        if info.HasField("polygon"):
            return "polygon", [[scale.x(p.col), scale.y(p.row)] for p in info.polygon.points]
        if info.HasField("point"):
            return "point", {"x": scale.x(info.point.col), "y": scale.y(info.point.row)}
        keypoints = []
        for point in info.keypoint_locations:
            keypoint: dict[str, Any] = {"x": scale.x(point.col), "y": scale.y(point.row)}
            if point.visibility in _VISIBILITY:
                keypoint["visibility"] = _VISIBILITY[point.visibility]
            keypoints.append(keypoint)
        return "keypoints", keypoints

    def _notes(self) -> list[str]:
        coordinates = (
            "pixels (x times the width, y times the height, 2 decimals)"
            if self._pixels
            else "normalized to 0..1 (6 decimals)"
        )
        notes = [
            "annotations/<split>.jsonl: one JSON object per input, in version order",
            f"coordinates are {coordinates}; x from the left, y from the top",
            "metadata.json counts the inputs per split, media files, tags and annotations",
        ]
        if self._full:
            notes.append("media files are under assets/<split>/<input id><ext>")
        return notes


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
