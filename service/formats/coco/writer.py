"""Writing COCO archives (export-formats.md §3): `annotations/instances_<split>.json` in the
standard detection layout and, with embed_media, the image files under `images/<split>/`.

Mapping (also stated in the export's fidelity notes):

* One COCO image per image input: `id` is the input's position in the version + 1,
  `datasetd_input_id` its id, `file_name` `<input id>.<ext>`; without embedded media,
  `coco_url` references the stored original. Videos, texts and audio are left out.
* Categories, without an ontology: the concepts found on the version's images, sorted
  by concept id, with ids 1, 2, ... in that order (the same for every export of the
  version) and the concept id as `name` (what identifies a concept here, and what
  importers read back).
* Categories, when the version captured an ontology (see service.domain.versions): every
  class of it (`classes` and `input_classifications`, sub-classes included, archived ones
  too) with `id` the class's category number, which the class keeps in every revision
  (the same class has the same id in every export of every version), `name` the class id
  (the concept id annotations carry), `supercategory` the parent class's id ("" at the
  top) and the class's `display_name` in an extra key. Concepts of the images that are
  not classes of it (labelled before the dataset was attached) follow, sorted by concept
  id, numbered from the ontology's highest category number + 1: nothing is dropped.
* Input-level concepts are kept on the image in the extra field `datasetd_concepts`:
  `{"concept_id", "category_id", "value"}` (value 0 is a negative label).
* Each positive concept of a region becomes an annotation (`datasetd_region_id` holds
  the region id): boxes give `bbox` and `area`; polygons `segmentation` `[[x1, y1, ...]]`
  with their bounding box and shoelace area; masks an uncompressed RLE (`counts` in
  column-major order from a background run, `size` [height, width]) with the pixel count
  as area. A mask pixel is foreground unless it is black (or, with alpha, transparent).
  Coordinates are pixels: normalised values times the image's width or height.
* Points, keypoints, spans, frames, metadata, geo points and embeddings have no place in
  COCO detection and are counted in the fidelity report.

Images and annotations are appended to temporary files per split as pages are written,
and each split's JSON is assembled from them into the archive at the end, so neither is
held in memory. The archive is written in one pass over the version: category ids are
only known once every image was seen (they are numbered in concept id order), so records
carry a provisional `"category_id":-N` (the N-th concept seen), replaced by the final id
as the split's JSON is assembled, a record (one per line) at a time.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any

from datasetd.v1 import data_pb2

from service.domain.models import (
    FidelityReport,
    OntologyClass,
    StoredBlob,
    VersionMember,
    VersionOntology,
)
from service.domain.ports import ByteSink, MediaStreams
from service.formats.coco.rle import mask_rle
from service.formats.media_reads import READ_AHEAD, ReadAhead, add_media_entries
from service.formats.snapshot import labels_of, parse, positive_concepts
from service.formats.zipstream import MEDIA_CHUNK_BYTES, ZipStream
from service.wire.inputs import medium_of

_EXTENSIONS = {"JPEG": ".jpg", "TIFF": ".tif"}
_DECIMALS = 2


@dataclass
class _SplitFiles:
    """A split's images and annotations so far, as comma-separated JSON objects; a page's
    records are encoded together when it is flushed (one encoder call per page, not per
    record: a third of the conversion's time)."""

    images: IO[bytes] = field(default_factory=tempfile.TemporaryFile)
    annotations: IO[bytes] = field(default_factory=tempfile.TemporaryFile)
    image_count: int = 0
    annotation_count: int = 0
    _images: list[dict[str, Any]] = field(default_factory=list)
    _annotations: list[dict[str, Any]] = field(default_factory=list)

    def add_image(self, record: dict[str, Any]) -> None:
        self._images.append(record)
        self.image_count += 1

    def add_annotation(self, record: dict[str, Any]) -> None:
        self._annotations.append(record)
        self.annotation_count += 1

    def flush(self) -> None:
        _append(self.images, self.image_count - len(self._images), self._images)
        _append(self.annotations, self.annotation_count - len(self._annotations), self._annotations)
        self._images.clear()
        self._annotations.clear()

    def close(self) -> None:
        self.images.close()
        self.annotations.close()


def _append(target: IO[bytes], before: int, records: list[dict[str, Any]]) -> None:
    """Appends `records` after the `before` ones already in `target`, one per line (JSON
    strings escape their newlines, so a line break is always between two records)."""
    if not records:
        return
    if before:
        target.write(b",\n")
    encoded = json.dumps(records, ensure_ascii=False, separators=(",", ":"))
    target.write(encoded[1:-1].replace("},{", "},\n{").encode())


# A provisional category id as _append wrote it; a string value cannot hold it (its
# quotes would be escaped).
_PROVISIONAL = re.compile(rb'"category_id":-(\d+)')
# Lines of the temporary files remapped per step.
_REMAP_CHUNK = 1 << 20


def _remap(source: IO[bytes], final: list[int]) -> IO[bytes]:
    """A temporary file with `source`'s records, each provisional category id replaced
    by its final one (`final[n - 1]` for -n)."""

    def replace(match: re.Match[bytes]) -> bytes:
        return b'"category_id":%d' % final[int(match.group(1)) - 1]

    # Returned open: the caller closes it once the archive holds it.
    target = tempfile.TemporaryFile()  # noqa: SIM115
    source.seek(0)
    rest = b""
    while chunk := source.read(_REMAP_CHUNK):
        chunk = rest + chunk
        cut = chunk.rfind(b"\n") + 1
        rest = chunk[cut:]
        target.write(_PROVISIONAL.sub(replace, chunk[:cut]))
    target.write(_PROVISIONAL.sub(replace, rest))
    return target


def _pixels(value: float) -> float:
    return round(value, _DECIMALS)


def ontology_categories(ontology: VersionOntology) -> list[dict[str, Any]]:
    """The COCO categories of an ontology's classes, in tree order."""
    found: list[dict[str, Any]] = []

    def add(classes: tuple[OntologyClass, ...], parent: str) -> None:
        for item in classes:
            found.append(
                {
                    "id": item.category_id,
                    "name": item.id,
                    "supercategory": parent,
                    "display_name": item.display_name,
                }
            )
            add(item.sub_classes, item.id)

    add(ontology.classes, "")
    add(ontology.input_classifications, "")
    return found


def _shoelace(xs: list[float], ys: list[float]) -> float:
    total = 0.0
    for i in range(len(xs)):
        j = (i + 1) % len(xs)
        total += xs[i] * ys[j] - xs[j] * ys[i]
    return abs(total) / 2


class CocoWriter:
    """An ArchiveWriter of COCO archives."""

    # One pass: categories are fixed at the end (provisional ids meanwhile).
    needs_census = False

    def __init__(
        self,
        embed_media: bool,
        splits: list[str],
        sink: ByteSink,
        modified: datetime,
        streams: MediaStreams,
        description: str,
        ontology: VersionOntology | None = None,
        reads: ReadAhead = READ_AHEAD,
    ) -> None:
        self._embed = embed_media
        self._ontology = ontology
        self._splits = {name: _SplitFiles() for name in splits}
        self._zip = ZipStream(sink, modified)
        self._streams = streams
        self._reads = reads
        self._info = {
            "description": description,
            "version": "1.0",
            "year": modified.year,
            "date_created": modified.isoformat(),
        }
        # The concepts of the images, in the order first seen (the index + 1 is the
        # provisional category id); the categories are fixed once all were seen.
        self._concepts: dict[str, int] = {}
        self._categories: dict[str, int] | None = None
        self._category_records: list[dict[str, Any]] = []
        self._next_annotation = 1
        self._dropped: Counter[str] = Counter()

    async def observe(self, members: list[VersionMember]) -> list[frozenset[str]]:
        return await asyncio.to_thread(self._observe, [m.data for m in members])

    async def labels(self, members: list[VersionMember]) -> list[frozenset[str]]:
        return await asyncio.to_thread(labels_of, [m.data for m in members])

    async def write(self, split: str, members: list[VersionMember]) -> int:
        files = self._splits[split]
        # Only images have a place in COCO: the split counts what was written.
        images_before = files.image_count
        embedded = await asyncio.to_thread(self._convert_page, files, members)
        images = [(f"images/{split}/{name}", blob) for name, blob in filter(None, embedded)]
        await add_media_entries(self._zip, self._streams, images, self._reads)
        return files.image_count - images_before

    async def finish(self) -> FidelityReport:
        try:
            self._fix_categories()
            for split, files in self._splits.items():
                await self._write_instances(split, files)
            await self._zip.close()
        finally:
            for files in self._splits.values():
                files.close()
        return FidelityReport(dict(sorted(self._dropped.items())), self._notes())

    def _fix_categories(self) -> None:
        """The categories: the ontology's classes, if any, then the concepts of the images
        that are not among them, numbered on from the ontology's highest number."""
        records = ontology_categories(self._ontology) if self._ontology is not None else []
        known = {record["name"] for record in records}
        first = self._ontology.last_category_id + 1 if self._ontology is not None else 1
        records += [
            {"id": number, "name": concept_id, "supercategory": ""}
            for number, concept_id in enumerate(sorted(self._concepts.keys() - known), start=first)
        ]
        records.sort(key=lambda record: int(record["id"]))
        self._category_records = records
        self._categories = {record["name"]: record["id"] for record in records}

    def _observe(self, members_data: list[bytes]) -> list[frozenset[str]]:
        """The labels of every member (for a split's census)."""
        return [positive_concepts(parse(data)) for data in members_data]

    def _note_concepts(self, data: data_pb2.Data) -> None:
        """Every concept of an image gets a category, the region's negative ones too."""
        for concept in data.concepts:
            self._provisional(concept.id)
        for region in data.regions:
            for concept in region.data.concepts:
                self._provisional(concept.id)

    def _convert_page(
        self, files: _SplitFiles, members: list[VersionMember]
    ) -> list[tuple[str, StoredBlob] | None]:
        embedded = [self._convert(files, member) for member in members]
        files.flush()
        return embedded

    def _convert(self, files: _SplitFiles, member: VersionMember) -> tuple[str, StoredBlob] | None:
        """Appends the member's image and annotations to its split; returns the file name
        and original of an image to embed."""
        message = parse(member.data)
        data = message.data
        medium = medium_of(data)
        if medium != "image":
            self._drop_input(medium, data)
            return None
        self._note_concepts(data)
        info = data.image.image_info
        file_name = message.id + _EXTENSIONS.get(info.format, f".{info.format.lower()}")
        image_id = member.position + 1
        record: dict[str, Any] = {
            "id": image_id,
            "file_name": file_name if info.format else message.id,
            "width": info.width,
            "height": info.height,
            "datasetd_input_id": message.id,
        }
        embed = self._embed and member.blob is not None
        if not embed:
            record["coco_url"] = data.image.url
            if self._embed:
                self._dropped["media_not_embedded"] += 1
        if data.concepts:
            record["datasetd_concepts"] = [
                {"concept_id": c.id, "category_id": self._provisional(c.id), "value": c.value}
                for c in data.concepts
            ]
        for kind, present in (
            ("metadata", bool(data.metadata.fields)),
            ("geo", data.HasField("geo")),
            ("embeddings", bool(data.embeddings)),
        ):
            if present:
                self._dropped[kind] += 1
        files.add_image(record)
        for region in data.regions:
            for annotation in self._annotations(region, image_id, info.width, info.height):
                files.add_annotation(annotation)
        if embed and member.blob is not None:
            return record["file_name"], member.blob
        return None

    def _drop_input(self, medium: str | None, data: data_pb2.Data) -> None:
        self._dropped[f"{medium or 'empty'}_inputs"] += 1
        if data.frames:
            self._dropped["video_frames"] += len(data.frames)
        spans = sum(1 for r in data.regions if r.region_info.HasField("span"))
        if spans:
            self._dropped["text_spans"] += spans

    def _annotations(
        self, region: data_pb2.Region, image_id: int, width: int, height: int
    ) -> list[dict[str, Any]]:
        geometry = self._geometry(region.region_info, width, height)
        positives = [c for c in region.data.concepts if c.value > 0]
        negatives = len(region.data.concepts) - len(positives)
        if negatives:
            self._dropped["negative_region_concepts"] += negatives
        if geometry is None:
            return []
        if not positives:
            self._dropped["regions_without_concepts"] += 1
            return []
        bbox, area, segmentation = geometry
        annotations = []
        for concept in positives:
            annotations.append(
                {
                    "id": self._next_annotation,
                    "image_id": image_id,
                    "category_id": self._provisional(concept.id),
                    "bbox": bbox,
                    "area": area,
                    "segmentation": segmentation,
                    "iscrowd": 0,
                    "datasetd_region_id": region.id,
                }
            )
            self._next_annotation += 1
        return annotations

    def _geometry(
        self, info: data_pb2.RegionInfo, width: int, height: int
    ) -> tuple[list[float], float, Any] | None:
        """(bbox, area, segmentation) in pixels, or None (counted) for what COCO cannot hold."""
        for kind in ("point", "span"):
            if info.HasField(kind):
                self._dropped["text_spans" if kind == "span" else "points"] += 1
                return None
        if info.keypoint_locations:
            self._dropped["keypoints"] += 1
            return None
        if not (info.HasField("bounding_box") or info.HasField("polygon") or info.HasField("mask")):
            self._dropped["regions_without_geometry"] += 1
            return None
        if width <= 0 or height <= 0:
            self._dropped["regions_without_image_size"] += 1
            return None
        if info.HasField("bounding_box"):
            box = info.bounding_box
            x, y = box.left_col * width, box.top_row * height
            w, h = (box.right_col - box.left_col) * width, (box.bottom_row - box.top_row) * height
            return [_pixels(x), _pixels(y), _pixels(w), _pixels(h)], _pixels(w * h), []
        if info.HasField("polygon"):
            xs = [p.col * width for p in info.polygon.points]
            ys = [p.row * height for p in info.polygon.points]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            flat = [_pixels(v) for point in zip(xs, ys, strict=True) for v in point]
            return [_pixels(v) for v in bbox], _pixels(_shoelace(xs, ys)), [flat]
        converted = (
            mask_rle(info.mask.image.base64, width, height) if info.mask.image.base64 else None
        )
        if converted is None:
            self._dropped["masks"] += 1
            return None
        rle, area, mask_box = converted
        return [float(v) for v in mask_box], float(area), rle

    def _provisional(self, concept_id: str) -> int:
        """The concept's provisional category id: -n for the n-th concept seen."""
        number = self._concepts.get(concept_id)
        if number is None:
            number = self._concepts[concept_id] = len(self._concepts) + 1
        return -number

    async def _write_instances(self, split: str, files: _SplitFiles) -> None:
        assert self._categories is not None
        final = [self._categories[concept_id] for concept_id in self._concepts]
        images = await asyncio.to_thread(_remap, files.images, final)
        annotations = await asyncio.to_thread(_remap, files.annotations, final)
        try:
            await self._write_json(split, images, annotations)
        finally:
            images.close()
            annotations.close()

    async def _write_json(self, split: str, images: IO[bytes], annotations: IO[bytes]) -> None:
        head = json.dumps(
            {"info": self._info, "licenses": [], "categories": self._category_records},
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()
        # The object is reopened to append the two arrays streamed from the files.
        parts: list[bytes | IO[bytes]] = [
            head[:-1] + b',"images":[',
            images,
            b'],"annotations":[',
            annotations,
            b"]}",
        ]
        size = sum(len(p) if isinstance(p, bytes) else p.tell() for p in parts)
        name = f"annotations/instances_{split}.json"
        async with self._zip.open(name, size=size, compress=True) as entry:
            for part in parts:
                if isinstance(part, bytes):
                    await entry.write(part)
                    continue
                part.seek(0)
                while chunk := await asyncio.to_thread(part.read, MEDIA_CHUNK_BYTES):
                    await entry.write(chunk)

    def _categories_note(self) -> str:
        if self._ontology is None:
            return (
                "categories are the concepts of the images sorted by concept id (ids from 1), "
                "named by concept id"
            )
        return (
            f"categories are the classes of ontology {self._ontology.ontology_id!r} "
            f"(revision {self._ontology.revision}), named by class id, with the class's "
            "category number as id (stable across exports and versions), the parent class "
            "as supercategory and display_name; concepts of the images outside the "
            f"ontology follow from id {self._ontology.last_category_id + 1}, sorted by "
            "concept id"
        )

    def _notes(self) -> list[str]:
        notes = [
            "one COCO image per image input (id = position in the version + 1, "
            "datasetd_input_id = input id); videos, texts and audio are left out",
            self._categories_note(),
            "input-level concepts are kept on each image in datasetd_concepts "
            "(concept_id, category_id, value; value 0 is a negative label)",
            "each positive concept of a region becomes one annotation (datasetd_region_id "
            "holds the region id); masks become uncompressed RLE",
        ]
        if self._embed:
            notes.append("image files are under images/<split>/<file_name>")
        else:
            notes.append(
                "images are referenced by coco_url (the stored original in this deployment's "
                "bucket); file_name is the name they have in an export with embed_media"
            )
        return notes
