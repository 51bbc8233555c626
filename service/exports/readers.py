"""Reading import archives: Clarifai-Data-Protobuf and COCO (export-formats.md §5).

Archives come from anyone, so a ZIP is read defensively:

* entry names are only ever compared with other strings, never used as paths; names with
  "..", absolute names, backslashes and control characters are refused all the same, as
  a sign of a hostile archive;
* the entry count and the size of the central directory are read from its end record
  and checked before zipfile builds its list of entries (whose memory they decide);
* every entry's declared size and compression ratio are checked before it is read, and
  the bytes actually inflated are counted while it is read (per entry and in total), so
  that a lying header cannot get past the caps either;
* only stored and deflated, unencrypted entries are read.

Problems raise InvalidArgument naming the entry (`archive["all/batch-000000_n3"]`) and,
within it, the input, image or annotation.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Generator, Iterator
from typing import Any, BinaryIO, cast

from datasetd.v1 import data_pb2, input_pb2
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError
from PIL import Image

from service.api.convert import data_to_json, input_draft
from service.domain.errors import InvalidArgument, Violations
from service.domain.imports import (
    ARCHIVE_FIELD,
    ArchiveLimits,
    ImportedAnnotation,
    ImportedInput,
    ImportFormat,
)
from service.domain.inputs import InputDraft
from service.domain.models import MediaType
from service.domain.validation import ID_PATTERN

_MIB = 1024 * 1024
MIMETYPE_ENTRY = "mimetype"
PROTOBUF_MIMETYPE = b"application/x.clarifai-data+protobuf"
JSON_MIMETYPE = b"application/x.clarifai-data+json"
READ_CHUNK_BYTES = _MIB
# COCO images per batch handed to the importer.
COCO_BATCH_IMAGES = 100
# A central directory record is 46 bytes plus name, extra field and comment; this
# allows ordinary names and extras while bounding what a directory of N entries costs.
_DIRECTORY_BYTES_PER_ENTRY = 1024
_MAX_NAME_CHARS = 1024
_MAX_MIMETYPE_BYTES = 256
_SHOWN_NAME_CHARS = 200
# Pixel coordinates written from normalised float32 values may overshoot an edge by a
# rounding error.
_EDGE_TOLERANCE_PX = 1e-3
_READABLE_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}

_COUNT_SUFFIX = re.compile(r"_n(\d+)$")
_INSTANCES = re.compile(r"^annotations/instances_([^/]+)\.json$")
_DRIVE = re.compile(r"^[A-Za-z]:")

# End of central directory records (APPNOTE.TXT 4.3.14-16).
_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"


def entry_path(name: str) -> str:
    """How errors name an entry: JSON-quoted, so that any name reads unambiguously."""
    shown = name if len(name) <= _SHOWN_NAME_CHARS else name[: _SHOWN_NAME_CHARS - 3] + "..."
    return f"archive[{json.dumps(shown)}]"


def _invalid(field: str, description: str, reason: str = "INVALID_ARCHIVE") -> InvalidArgument:
    return InvalidArgument.field(field, description, reason=reason)


def _too_large(field: str, description: str) -> InvalidArgument:
    return _invalid(field, description, "ARCHIVE_TOO_LARGE")


def _directory_size(file: BinaryIO) -> tuple[int, int] | None:
    """(entries, central directory bytes) from the end records; None when there are none."""
    file.seek(0, io.SEEK_END)
    size = file.tell()
    tail_size = min(size, _EOCD.size + 0xFFFF)
    file.seek(size - tail_size)
    tail = file.read(tail_size)
    at = tail.rfind(_EOCD_SIGNATURE)
    if at < 0 or len(tail) - at < _EOCD.size:
        return None
    _, _, _, _, entries, directory, _, _ = _EOCD.unpack_from(tail, at)
    if entries != 0xFFFF and directory != 0xFFFFFFFF:
        return entries, directory
    # ZIP64: the real numbers are in a record the locator before the end record points at.
    locator_at = size - tail_size + at - _ZIP64_LOCATOR.size
    if locator_at < 0:
        return None
    file.seek(locator_at)
    signature, _, record_at, _ = _ZIP64_LOCATOR.unpack(file.read(_ZIP64_LOCATOR.size))
    if signature != _ZIP64_LOCATOR_SIGNATURE or record_at > size - _ZIP64_EOCD.size:
        return None
    file.seek(record_at)
    record = _ZIP64_EOCD.unpack(file.read(_ZIP64_EOCD.size))
    if record[0] != _ZIP64_EOCD_SIGNATURE:
        return None
    return record[7], record[8]


def _name_problem(info: zipfile.ZipInfo) -> str | None:
    # orig_filename: zipfile cuts `filename` at a NUL, which would hide one.
    name = info.orig_filename
    if not name:
        return "has an empty name"
    if len(name) > _MAX_NAME_CHARS:
        return f"has a name of {len(name)} characters; at most {_MAX_NAME_CHARS} are allowed"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "has control characters in its name"
    if "\\" in name:
        return "has a backslash in its name; ZIP names separate directories with '/'"
    if name.startswith("/") or _DRIVE.match(name):
        return "has an absolute name; names in an archive are relative"
    if ".." in name.split("/"):
        return "has a '..' component in its name"
    return None


class SafeZip:
    """A ZIP archive read within limits (see the module documentation)."""

    def __init__(self, file: BinaryIO, limits: ArchiveLimits) -> None:
        self._limits = limits
        self._inflated = 0
        found = _directory_size(file)
        if found is None:
            raise _invalid(
                ARCHIVE_FIELD, "is not a ZIP archive (it has no end of central directory)"
            )
        entries, directory = found
        self._check_count(entries)
        if directory > limits.max_entries * _DIRECTORY_BYTES_PER_ENTRY:
            raise _too_large(
                ARCHIVE_FIELD,
                f"has a central directory of {directory} bytes, more than "
                f"{_DIRECTORY_BYTES_PER_ENTRY} bytes for each of at most "
                f"{limits.max_entries} entries",
            )
        try:
            self._zip = zipfile.ZipFile(file)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, struct.error) as exc:
            raise _invalid(ARCHIVE_FIELD, f"is not a readable ZIP archive ({exc})") from exc
        infos = self._zip.infolist()
        # The end record may understate the count; zipfile's list is what is read.
        self._check_count(len(infos))
        self._entries = self._checked(infos)
        self._by_name = {info.filename: info for info in self._entries}

    @property
    def entries(self) -> list[zipfile.ZipInfo]:
        """The file entries (not directories), in archive order."""
        return self._entries

    def find(self, name: str) -> zipfile.ZipInfo | None:
        return self._by_name.get(name)

    def close(self) -> None:
        self._zip.close()

    def _check_count(self, count: int) -> None:
        if count > self._limits.max_entries:
            raise _too_large(
                ARCHIVE_FIELD,
                f"has {count} entries; at most {self._limits.max_entries} are allowed",
            )

    def _checked(self, infos: list[zipfile.ZipInfo]) -> list[zipfile.ZipInfo]:
        limits = self._limits
        seen: set[str] = set()
        files: list[zipfile.ZipInfo] = []
        declared = 0
        for info in infos:
            name = info.orig_filename
            where = entry_path(name)
            problem = _name_problem(info)
            if problem is not None:
                raise _invalid(where, problem)
            if name in seen:
                raise _invalid(where, "appears more than once in the archive")
            seen.add(name)
            if info.flag_bits & 0x1:
                raise _invalid(where, "is encrypted; encrypted entries cannot be imported")
            if info.is_dir():
                if info.file_size:
                    raise _invalid(where, "is a directory entry with content")
                continue
            if info.compress_type not in _READABLE_METHODS:
                raise _invalid(
                    where,
                    f"uses ZIP compression method {info.compress_type}; only stored and "
                    "deflate entries can be imported",
                )
            self._check_size(where, info, info.file_size)
            declared += info.file_size
            if declared > limits.max_total_bytes:
                raise _too_large(
                    ARCHIVE_FIELD,
                    f"declares more than {limits.max_total_bytes} bytes uncompressed in total "
                    f"(reached at {where}); at most {limits.max_total_bytes} are allowed",
                )
            files.append(info)
        return files

    def _check_size(self, where: str, info: zipfile.ZipInfo, size: int) -> None:
        """`size` uncompressed bytes of the entry (declared, or inflated so far)."""
        limits = self._limits
        if size > limits.max_entry_bytes:
            raise _too_large(
                where,
                f"is more than {limits.max_entry_bytes} bytes uncompressed; entries may be at "
                f"most {limits.max_entry_bytes} bytes",
            )
        if size > limits.ratio_floor_bytes and size > limits.max_ratio * max(info.compress_size, 1):
            raise _too_large(
                where,
                f"inflates {info.compress_size} compressed bytes to {size} or more "
                f"(over {limits.max_ratio}:1); entries over {limits.ratio_floor_bytes} bytes "
                f"may compress at most {limits.max_ratio}:1",
            )

    def read(self, info: zipfile.ZipInfo) -> bytearray:
        """The entry's bytes, counted as they are inflated."""
        where = entry_path(info.orig_filename)
        content = bytearray()
        try:
            with self._zip.open(info) as stream:
                while chunk := stream.read(READ_CHUNK_BYTES):
                    content += chunk
                    if len(content) > info.file_size:
                        raise _invalid(
                            where, f"holds more than the {info.file_size} bytes it declares"
                        )
                    self._check_size(where, info, len(content))
                    self._inflated += len(chunk)
                    if self._inflated > self._limits.max_total_bytes:
                        raise _too_large(
                            ARCHIVE_FIELD,
                            f"inflates to more than {self._limits.max_total_bytes} bytes in "
                            f"total (reached at {where})",
                        )
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
            raise _invalid(where, f"is corrupt ({exc})") from exc
        if len(content) != info.file_size:
            raise _invalid(where, f"holds {len(content)} bytes but declares {info.file_size}")
        return content


class ZipArchiveReader:
    """The domain's ArchiveReader."""

    def read(
        self, archive: BinaryIO, archive_format: ImportFormat, limits: ArchiveLimits
    ) -> Generator[list[ImportedInput], None, None]:
        archive_zip = SafeZip(archive, limits)
        try:
            if archive_format is ImportFormat.CLARIFAI_DATA_PROTOBUF:
                yield from _protobuf_batches(archive_zip)
            else:
                yield from _coco_batches(archive_zip)
        finally:
            archive_zip.close()


# --- Clarifai-Data-Protobuf ------------------------------------------------------------------


def _protobuf_batches(archive: SafeZip) -> Iterator[list[ImportedInput]]:
    mimetype = archive.find(MIMETYPE_ENTRY)
    if mimetype is None:
        raise _invalid(
            ARCHIVE_FIELD,
            'has no "mimetype" entry; a Clarifai-Data-Protobuf archive has one holding '
            f"exactly {PROTOBUF_MIMETYPE.decode()}",
        )
    expected = f"a Clarifai-Data-Protobuf archive has exactly {PROTOBUF_MIMETYPE.decode()}"
    # Not read when large: anything longer than a media type is wrong anyway.
    if mimetype.file_size > _MAX_MIMETYPE_BYTES:
        raise _invalid(entry_path(MIMETYPE_ENTRY), f"is {mimetype.file_size} bytes; {expected}")
    value = bytes(archive.read(mimetype))
    if value != PROTOBUF_MIMETYPE:
        hint = " (a Clarifai-Data-JSON archive: import its protobuf export instead)"
        raise _invalid(
            entry_path(MIMETYPE_ENTRY),
            f"is {value!r}{hint if value == JSON_MIMETYPE else ''}; {expected}",
        )
    for info in archive.entries:
        if info.filename == MIMETYPE_ENTRY:
            continue
        where = entry_path(info.orig_filename)
        batch = _input_batch(where, archive.read(info))
        named = _COUNT_SUFFIX.search(info.filename)
        if named is not None and int(named.group(1)) != len(batch.inputs):
            raise _invalid(
                where,
                f"is named for {int(named.group(1))} inputs but holds {len(batch.inputs)}",
            )
        yield [
            _imported_input(f"{where}.inputs[{index}]", message)
            for index, message in enumerate(batch.inputs)
        ]


def _input_batch(where: str, content: bytearray) -> input_pb2.InputBatch:
    problem = "is not a serialized InputBatch; every entry but mimetype must be one"
    try:
        # Parsing takes any buffer; the annotation says bytes.
        batch = input_pb2.InputBatch.FromString(cast(bytes, content))
    except DecodeError as exc:
        raise _invalid(where, f"{problem} ({exc})") from exc
    if len(unknown_fields.UnknownFieldSet(batch)):
        raise _invalid(where, f"{problem} (it has fields an InputBatch does not)")
    return batch


def _imported_input(path: str, message: input_pb2.Input) -> ImportedInput:
    draft = input_draft(message)
    # Embedded bytes win over a reference: an export with embedded media may keep the
    # URL it was made from. Memberships of the source deployment mean nothing here.
    url = "" if draft.data or draft.text else draft.url
    draft = dataclasses.replace(draft, url=url, dataset_ids=[])
    data = message.data
    # One annotation per region, as annotation tools make them, and one for all video
    # frames (a track); a version folds them back into the same `data`.
    annotations = [
        ImportedAnnotation(
            f"{path}.data.regions[{index}]",
            data_to_json(data_pb2.Data(regions=[region])),
            root=".regions[0]",
        )
        for index, region in enumerate(data.regions)
    ]
    if data.frames:
        annotations.append(
            ImportedAnnotation(f"{path}.data", data_to_json(data_pb2.Data(frames=data.frames)))
        )
    return ImportedInput(path, draft, tuple(annotations))


# --- COCO ------------------------------------------------------------------------------------


def _coco_batches(archive: SafeZip) -> Iterator[list[ImportedInput]]:
    documents = [info for info in archive.entries if _INSTANCES.match(info.filename)]
    if not documents:
        raise _invalid(
            ARCHIVE_FIELD,
            'has no "annotations/instances_<split>.json"; a COCO archive has one per split '
            "and the images under images/",
        )
    for info in documents:
        where = entry_path(info.orig_filename)
        try:
            document = json.loads(archive.read(info))
        except (ValueError, RecursionError) as exc:
            raise _invalid(where, f"is not valid JSON ({exc})") from exc
        split = _INSTANCES.match(info.filename)
        assert split is not None
        yield from _CocoDocument(archive, where, split.group(1), document).batches()


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _key(value: Any) -> int | str | None:
    """A COCO id: an integer or a string (some tools write strings)."""
    if isinstance(value, int | str) and not isinstance(value, bool):
        return value
    return None


@dataclasses.dataclass(frozen=True)
class _Image:
    index: int
    id: int | str
    file_name: str
    width: int
    height: int
    url: str
    input_id: str
    concepts: list[dict[str, Any]]


class _CocoDocument:
    """One annotations/instances_<split>.json with the images it names."""

    def __init__(self, archive: SafeZip, where: str, split: str, document: Any) -> None:
        self._archive = archive
        self._where = where
        self._split = split
        self._problems = Violations()
        if not isinstance(document, dict):
            raise _invalid(where, "must be a JSON object with images, annotations and categories")
        self._categories = self._read_categories(self._list(document, "categories"))
        self._images = self._read_images(self._list(document, "images"))
        self._regions = self._read_annotations(self._list(document, "annotations"))
        if self._problems.items:
            raise InvalidArgument(
                f"{where} has {len(self._problems.items)} problem(s); nothing was imported: "
                + "; ".join(f"{v.field}: {v.description}" for v in self._problems.items[:10]),
                reason="INVALID_ARCHIVE",
                violations=self._problems.items[:100],
            )

    def batches(self) -> Iterator[list[ImportedInput]]:
        images = list(self._images.values())
        for start in range(0, len(images), COCO_BATCH_IMAGES):
            yield [self._input(image) for image in images[start : start + COCO_BATCH_IMAGES]]

    def _list(self, document: dict[str, Any], key: str) -> list[Any]:
        value = document.get(key, [])
        if not isinstance(value, list):
            self._problems.add(f"{self._where}.{key}", "must be a list")
            return []
        return value

    def _read_categories(self, items: list[Any]) -> dict[int | str, str]:
        found: dict[int | str, str] = {}
        for index, item in enumerate(items):
            field = f"{self._where}.categories[{index}]"
            key = _key(item.get("id")) if isinstance(item, dict) else None
            name = item.get("name") if isinstance(item, dict) else None
            if key is None or not isinstance(name, str) or not name:
                self._problems.add(field, "must be an object with an id and a non-empty name")
            elif key in found:
                self._problems.add(f"{field}.id", f"category id {key!r} repeats")
            else:
                found[key] = name
        return found

    def _read_images(self, items: list[Any]) -> dict[int | str, _Image]:
        found: dict[int | str, _Image] = {}
        for index, item in enumerate(items):
            field = f"{self._where}.images[{index}]"
            if not isinstance(item, dict):
                self._problems.add(field, "must be an object")
                continue
            key = _key(item.get("id"))
            file_name = item.get("file_name")
            width, height = _positive_int(item.get("width")), _positive_int(item.get("height"))
            if key is None:
                self._problems.add(f"{field}.id", "must be an integer or a string")
            elif key in found:
                self._problems.add(f"{field}.id", f"image id {key!r} repeats")
            if not isinstance(file_name, str) or not file_name:
                self._problems.add(f"{field}.file_name", "must be a non-empty string")
            if width is None or height is None:
                self._problems.add(field, "must have a positive integer width and height")
            if key is None or key in found or not isinstance(file_name, str) or not file_name:
                continue
            if width is None or height is None:
                continue
            # Any scheme: a URL that cannot be referenced is reported as a CreateInputs
            # input's would be.
            url = next(
                (v for v in (item.get("coco_url"), item.get("flickr_url")) if isinstance(v, str)),
                "",
            )
            found[key] = _Image(
                index,
                key,
                file_name,
                width,
                height,
                url,
                _input_id(item.get("datasetd_input_id"), file_name),
                self._input_concepts(f"{field}.datasetd_concepts", item.get("datasetd_concepts")),
            )
        return found

    def _input_concepts(self, field: str, value: Any) -> list[dict[str, Any]]:
        """Input-level concepts, where a datasetd export keeps them."""
        if value is None:
            return []
        concepts = []
        for index, item in enumerate(value if isinstance(value, list) else [None]):
            concept_id = item.get("concept_id") if isinstance(item, dict) else None
            number = _number(item.get("value", 1.0)) if isinstance(item, dict) else None
            if not isinstance(concept_id, str) or number is None:
                self._problems.add(
                    f"{field}[{index}]", "must be an object with a concept_id and a numeric value"
                )
                continue
            concepts.append({"id": concept_id, "value": number})
        return concepts

    def _read_annotations(self, items: list[Any]) -> dict[int | str, list[ImportedAnnotation]]:
        found: dict[int | str, list[ImportedAnnotation]] = {}
        for index, item in enumerate(items):
            field = f"{self._where}.annotations[{index}]"
            if not isinstance(item, dict):
                self._problems.add(field, "must be an object")
                continue
            annotation_id = item.get("id")
            named = f"annotation {annotation_id!r}" if _key(annotation_id) is not None else field
            image_key, category_key = _key(item.get("image_id")), _key(item.get("category_id"))
            image = None if image_key is None else self._images.get(image_key)
            category = None if category_key is None else self._categories.get(category_key)
            if image is None:
                self._problems.add(
                    f"{field}.image_id", f"{named}: no image with id {item.get('image_id')!r}"
                )
                continue
            if category is None:
                self._problems.add(
                    f"{field}.category_id",
                    f"{named}: no category with id {item.get('category_id')!r}",
                )
                continue
            regions = self._regions_of(field, named, item, image)
            if not regions:
                continue
            concept = {"id": category, "name": category, "value": 1.0}
            # The region's own id where a datasetd export kept it, else the annotation's.
            named_region = item.get("datasetd_region_id")
            base_id = named_region if isinstance(named_region, str) else annotation_id
            for number, region in enumerate(regions):
                region["data"] = {"concepts": [concept]}
                if _key(base_id) is not None:
                    suffix = "" if len(regions) == 1 else f"-{number}"
                    region_id = f"{base_id}{suffix}"
                    if ID_PATTERN.match(region_id):
                        region["id"] = region_id
            found.setdefault(image.id, []).append(ImportedAnnotation(field, {"regions": regions}))
        return found

    def _regions_of(
        self, field: str, named: str, item: dict[str, Any], image: _Image
    ) -> list[dict[str, Any]]:
        """The annotation's regions, normalised: its polygons or RLE mask when it has a
        segmentation (the box is derived from it), else its box."""
        segmentation = item.get("segmentation")
        if isinstance(segmentation, dict):
            mask = self._mask(f"{field}.segmentation", named, segmentation, image)
            return [] if mask is None else [{"region_info": {"mask": mask}}]
        if isinstance(segmentation, list) and segmentation:
            polygons = []
            for ring_index, ring in enumerate(segmentation):
                polygon = self._polygon(f"{field}.segmentation[{ring_index}]", named, ring, image)
                if polygon is None:
                    return []
                polygons.append({"region_info": {"polygon": polygon}})
            return polygons
        if segmentation not in (None, []):
            self._problems.add(
                f"{field}.segmentation", f"{named}: must be a list of polygons or an RLE object"
            )
            return []
        box = self._box(f"{field}.bbox", named, item.get("bbox"), image)
        return [] if box is None else [{"region_info": {"bounding_box": box}}]

    def _box(self, field: str, named: str, value: Any, image: _Image) -> dict[str, float] | None:
        numbers = [_number(v) for v in value] if isinstance(value, list) else []
        if len(numbers) != 4 or any(n is None for n in numbers):
            self._problems.add(
                field, f"{named}: must be [x, y, width, height] in pixels, got {value!r}"[:300]
            )
            return None
        x, y, width, height = cast(list[float], numbers)
        tolerance = _EDGE_TOLERANCE_PX
        if width <= 0 or height <= 0:
            self._problems.add(field, f"{named}: the box {value!r} has no area")
            return None
        if (
            x < -tolerance
            or y < -tolerance
            or x + width > image.width + tolerance
            or y + height > image.height + tolerance
        ):
            self._problems.add(
                field,
                f"{named}: the box {value!r} lies outside its {image.width}x{image.height} "
                f"image {image.id!r}",
            )
            return None
        return {
            "top_row": _unit(y / image.height),
            "left_col": _unit(x / image.width),
            "bottom_row": _unit((y + height) / image.height),
            "right_col": _unit((x + width) / image.width),
        }

    def _polygon(self, field: str, named: str, ring: Any, image: _Image) -> dict[str, Any] | None:
        numbers = [_number(v) for v in ring] if isinstance(ring, list) else []
        if len(numbers) < 6 or len(numbers) % 2 or any(n is None for n in numbers):
            self._problems.add(
                field, f"{named}: a polygon is [x1, y1, x2, y2, ...] with at least 3 points"
            )
            return None
        coordinates = cast(list[float], numbers)
        points = []
        for x, y in zip(coordinates[::2], coordinates[1::2], strict=True):
            tolerance = _EDGE_TOLERANCE_PX
            if not (
                -tolerance <= x <= image.width + tolerance
                and -tolerance <= y <= image.height + tolerance
            ):
                self._problems.add(
                    field,
                    f"{named}: the point ({x:g}, {y:g}) lies outside its "
                    f"{image.width}x{image.height} image {image.id!r}",
                )
                return None
            points.append({"row": _unit(y / image.height), "col": _unit(x / image.width)})
        return {"points": points}

    def _mask(
        self, field: str, named: str, rle: dict[str, Any], image: _Image
    ) -> dict[str, Any] | None:
        size = rle.get("size")
        if size != [image.height, image.width]:
            self._problems.add(
                f"{field}.size",
                f"{named}: must be [{image.height}, {image.width}], the image's height and "
                f"width, got {size!r}"[:300],
            )
            return None
        try:
            png = _rle_png(rle.get("counts"), image.height, image.width)
        except ValueError as exc:
            self._problems.add(f"{field}.counts", f"{named}: {exc}")
            return None
        return {"image": {"base64": base64.b64encode(png).decode()}}

    def _input(self, image: _Image) -> ImportedInput:
        path = f"{self._where}.images[{image.index}]"
        data = self._image_bytes(image)
        if data is None and not image.url:
            raise _invalid(
                f"{path}.file_name",
                f"image {image.id!r}: {image.file_name!r} is neither under "
                f"images/{self._split}/ nor under images/ in the archive, and the image has "
                "no coco_url",
            )
        draft = InputDraft(
            id=image.input_id,
            media=(MediaType.IMAGE,),
            data=data or b"",
            url="" if data is not None else image.url,
            concepts=image.concepts,
            title=image.file_name.rsplit("/", 1)[-1],
        )
        return ImportedInput(
            path,
            draft,
            tuple(self._regions.get(image.id, ())),
            declared_size=(image.width, image.height) if data is not None else None,
        )

    def _image_bytes(self, image: _Image) -> bytes | None:
        for name in (
            f"images/{self._split}/{image.file_name}",
            f"images/{image.file_name}",
            image.file_name,
        ):
            info = self._archive.find(name)
            if info is not None:
                return bytes(self._archive.read(info))
        return None


def _input_id(given: Any, file_name: str) -> str:
    """The id a datasetd export recorded, else the file's stem (as folder uploads name
    inputs); empty (generated) when neither is a valid id."""
    base_name = file_name.rsplit("/", 1)[-1]
    stem = base_name.rsplit(".", 1)[0] if "." in base_name else base_name
    for candidate in (given, stem):
        if isinstance(candidate, str) and ID_PATTERN.match(candidate):
            return candidate
    return ""


def _unit(value: float) -> float:
    """Clamped to 0..1: within the edge tolerance, a coordinate may overshoot."""
    return min(1.0, max(0.0, value))


def _rle_counts(counts: Any) -> list[int]:
    """The run lengths of a COCO RLE: a list of integers, or pycocotools' compressed
    string (6-bit groups offset by 48; runs after the second are deltas of the run two
    before)."""
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError("RLE counts must be non-negative integers")
        return counts
    if not isinstance(counts, str):
        raise ValueError("RLE counts must be a list of integers or a compressed string")
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value = shift = 0
        more = True
        while more:
            if position >= len(counts):
                raise ValueError("the compressed RLE string ends inside a number")
            group = ord(counts[position]) - 48
            if not 0 <= group < 64:
                raise ValueError("the compressed RLE string has a character outside its alphabet")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError("the compressed RLE string decodes to a negative run")
        runs.append(value)
    return runs


def _rle_png(counts: Any, height: int, width: int) -> bytes:
    """A COCO RLE mask (column-major runs, starting with background) as a PNG."""
    runs = _rle_counts(counts)
    if sum(runs) != height * width:
        raise ValueError(f"the RLE runs cover {sum(runs)} pixels, not the image's {height}x{width}")
    pixels = bytearray(height * width)
    position = 0
    for index, run in enumerate(runs):
        if index % 2:
            pixels[position : position + run] = b"\xff" * run
        position += run
    # Column-major: read as an image `height` wide, then transposed.
    mask = Image.frombytes("L", (height, width), bytes(pixels)).transpose(Image.Transpose.TRANSPOSE)
    buffer = io.BytesIO()
    mask.convert("1").save(buffer, format="PNG")
    return buffer.getvalue()
