"""Unpacking a downloaded export archive into a directory of media files and annotations.

Layout written under the target directory, one directory per split (`all` when the
export has no split):

* `<split>/images/`, `<split>/videos/`, `<split>/audio/`, `<split>/texts/`: one file per
  input, named after the cleaned input id plus the extension of its format (`.txt` for
  texts, UTF-8). Nothing is written there with `annotations_only`.
* Clarifai formats: `<split>/annotations.jsonl`, one line per input:
  `{"input_id": ..., "file": "images/<name>.png" | null, "title": ... (when set),
  "input": {...}}` where `input` is the Input in the protobuf JSON mapping (proto field
  names) with its annotations folded in as in the archive (`data.concepts`,
  `data.regions`, `data.frames`, metadata, geo), minus the embedded media bytes (they are
  in `file`) and minus its title (beside it: the reference `clarifai.api.Input` has no
  title, and parses `input` as it is).
* COCO: `<split>/annotations.json`, the archive's instances file with each image's
  `file_name` set to the name of its file under `<split>/images/`.

The Datature Vi formats keep the archive's own layout (README "Export formats"):
`metadata.json`, `annotations/<split>.jsonl` and, for "vi_full", `assets/<split>/<file>`.

The archive is treated as untrusted: entry names are only compared with expected
patterns, never used as paths; file names are built from cleaned input ids.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from datasetd.v1 import data_pb2, input_pb2
from google.protobuf import json_format

from service.client.progress import NO_PROGRESS, Progress

MIMETYPES = {
    "clarifai_data_protobuf": b"application/x.clarifai-data+protobuf",
    "clarifai_data_json": b"application/x.clarifai-data+json",
}
SPLIT = re.compile(r"^[a-z0-9_-]{1,32}$")
_BATCH = re.compile(r"^([a-z0-9_-]{1,32})/batch-\d{1,12}_n\d{1,12}$")
_INSTANCES = re.compile(r"^annotations/instances_([a-z0-9_-]{1,32})\.json$")
_VI_LINES = re.compile(r"^annotations/([a-z0-9_-]{1,32})\.jsonl$")
_VI_ASSET = re.compile(r"^assets/[a-z0-9_-]{1,32}/[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_ENTRIES = 1_000_000
# Batches and instances files are JSON or protobuf: they deflate well, but not by more
# than this unless the archive was crafted to exhaust memory or disk.
MAX_RATIO = 200
COPY_CHUNK = 1024 * 1024
# Progress is told every this many entries: a display's update costs more than a file.
PROGRESS_EVERY = 512
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_LOCAL_MAGIC = b"PK\x03\x04"
_LOCAL_NAME_LENGTH, _LOCAL_EXTRA_LENGTH = 10, 11
_UTF8_NAMES = 0x800
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
_NEW_FILE |= getattr(os, "O_CLOEXEC", 0)
# What one write(2) takes at most on Linux; larger media are written in pieces.
_MAX_WRITE = 1 << 30
MEDIA_DIRS = {"image": "images", "video": "videos", "audio": "audio", "text": "texts"}
_EXTENSIONS = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "MP4": ".mp4",
    "MOV": ".mov",
    "3GP": ".3gp",
    "WEBM": ".webm",
    "MATROSKA": ".mkv",
    "AVI": ".avi",
    "MPEG-TS": ".ts",
    "MPEG-PS": ".mpg",
    "FLV": ".flv",
    "OGG": ".ogg",
    "WAV": ".wav",
    "MP3": ".mp3",
    "FLAC": ".flac",
    "OPUS": ".opus",
    "M4A": ".m4a",
    "AAC": ".aac",
}


class ArchiveError(ValueError):
    """The archive does not have the layout of its format (or looks hostile)."""


@dataclass
class UnpackStats:
    """What an unpack wrote."""

    splits: dict[str, int] = field(default_factory=dict)
    assets_count: int = 0
    annotations_count: int = 0
    media_files: int = 0
    # Inputs whose media the archive only references (e.g. created from a URL).
    media_missing: list[str] = field(default_factory=list)


def clean_name(input_id: str) -> str:
    """A file name stem from an input id: safe characters only, never hidden or empty."""
    name = _UNSAFE.sub("_", input_id).lstrip(".")[:120]
    return name or "input"


class _Names:
    """Unique file names in one directory, also on case-insensitive file systems."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def take(self, stem: str, extension: str) -> str:
        name, n = stem + extension, 1
        while name.lower() in self._taken:
            n += 1
            name = f"{stem}-{n}{extension}"
        self._taken.add(name.lower())
        return name


def _check_entries(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    entries = archive.infolist()
    if len(entries) > MAX_ENTRIES:
        raise ArchiveError(f"the archive has {len(entries)} entries, more than {MAX_ENTRIES}")
    for entry in entries:
        if entry.flag_bits & 0x1:
            raise ArchiveError(f"archive entry {entry.filename!r} is encrypted")
        if entry.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ArchiveError(f"archive entry {entry.filename!r} uses an unknown compression")
        if entry.file_size > MAX_RATIO * max(entry.compress_size, 1024 * 1024):
            raise ArchiveError(f"archive entry {entry.filename!r} has a suspicious ratio")
    return entries


def write_file(path: str, data: bytes | memoryview) -> None:
    """Creates (or truncates) the file `path` holding `data`: with the plain system calls,
    as a file object per file would cost as much as the file itself."""
    descriptor = os.open(path, _NEW_FILE, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view[:_MAX_WRITE]) :]
    finally:
        os.close(descriptor)


class Archive:
    """A ZIP archive file being unpacked: zipfile reads the central directory; the bytes
    of STORED entries are slices of a memory map, checked like zipfile checks them (local
    header, name, CRC-32), which spares the per-entry file object and copies that would
    cost more than writing an archive of small files. Entries must not overlap: an
    archive cannot make its STORED bytes be written more than once."""

    def __init__(self, path: Path) -> None:
        self.zip = zipfile.ZipFile(path)
        self._map: mmap.mmap | None = None
        try:
            self.entries = _check_entries(self.zip)
            self._ends = self._extents()
            with path.open("rb") as file:
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self.close()
            raise

    def _extents(self) -> dict[int, int]:
        """Where the bytes at each entry's header offset may end at most: the next
        entry's header, or the central directory."""
        offsets = sorted(entry.header_offset for entry in self.entries)
        if len(set(offsets)) != len(offsets):
            raise ArchiveError("two archive entries share their bytes")
        return dict(zip(offsets, [*offsets[1:], self.zip.start_dir], strict=True))

    def __enter__(self) -> Archive:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self.zip.close()

    def _stored(self, entry: zipfile.ZipInfo) -> memoryview | None:
        """The bytes of a STORED entry, checked; None for a compressed one."""
        if entry.compress_type != zipfile.ZIP_STORED:
            return None
        assert self._map is not None
        start, name = entry.header_offset, entry.filename
        try:
            header = _LOCAL_HEADER.unpack_from(self._map, start)
        except struct.error:
            raise ArchiveError(f"archive entry {name!r} has no local header") from None
        begin = start + _LOCAL_HEADER.size
        named = begin + header[_LOCAL_NAME_LENGTH]
        data = named + header[_LOCAL_EXTRA_LENGTH]
        end = data + entry.compress_size
        if header[0] != _LOCAL_MAGIC or end > self._ends[start]:
            raise ArchiveError(f"archive entry {name!r} has a bad local header or overlaps")
        encoding = "utf-8" if entry.flag_bits & _UTF8_NAMES else "cp437"
        if self._map[begin:named].decode(encoding, "replace") != entry.orig_filename:
            raise ArchiveError(f"archive entry {name!r} has another name in its local header")
        content = memoryview(self._map)[data:end]
        if entry.file_size != entry.compress_size or zlib.crc32(content) != entry.CRC:
            content.release()
            raise ArchiveError(f"archive entry {name!r} is damaged (size or CRC-32)")
        return content

    def read(self, entry: zipfile.ZipInfo) -> bytes:
        content = self._stored(entry)
        if content is None:
            return self.zip.read(entry)
        # A copy: a view still held would keep the map from closing.
        with content:
            return content.tobytes()

    def extract(self, entry: zipfile.ZipInfo, path: str) -> None:
        """Writes the entry into the file `path`; compressed ones are streamed."""
        content = self._stored(entry)
        if content is not None:
            with content:
                write_file(path, content)
            return
        with self.zip.open(entry) as source, open(path, "wb") as sink:
            shutil.copyfileobj(source, sink, COPY_CHUNK)


class _Ticker:
    """Counts unpacked entries into a Progress, a batch at a time."""

    def __init__(self, progress: Progress, total: int) -> None:
        self._progress = progress
        self._pending = 0
        progress.start("unpacking", total, "files")

    def tick(self) -> None:
        self._pending += 1
        if self._pending >= PROGRESS_EVERY:
            self._progress.advance(self._pending)
            self._pending = 0

    def finish(self) -> None:
        if self._pending:
            self._progress.advance(self._pending)
        self._progress.finish()


def _varint(stream: IO[bytes]) -> int | None:
    """The next varint, or None at the end of the stream."""
    result, shift = 0, 0
    while True:
        byte = stream.read(1)
        if not byte:
            if shift:
                raise ArchiveError("truncated varint in a batch entry")
            return None
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ArchiveError("malformed varint in a batch entry")


def _protobuf_inputs(stream: IO[bytes], name: str) -> Iterator[input_pb2.Input]:
    """The inputs of an InputBatch entry, one at a time (a batch may hold large media)."""
    while (tag := _varint(stream)) is not None:
        if tag != (1 << 3 | 2):
            raise ArchiveError(f"archive entry {name!r} is not an InputBatch (tag {tag})")
        length = _varint(stream)
        if length is None:
            raise ArchiveError(f"archive entry {name!r} ends inside an input")
        data = stream.read(length)
        if len(data) != length:
            raise ArchiveError(f"archive entry {name!r} ends inside an input")
        yield input_pb2.Input.FromString(data)


def _json_inputs(stream: IO[bytes], name: str) -> Iterator[input_pb2.Input]:
    try:
        document = json.load(stream)
        items = document["inputs"] if isinstance(document, dict) else None
        if not isinstance(items, list):
            raise ArchiveError(f"archive entry {name!r} has no list of inputs")
        for item in items:
            yield json_format.ParseDict(item, input_pb2.Input(), ignore_unknown_fields=True)
    except (ValueError, json_format.ParseError) as error:
        if isinstance(error, ArchiveError):
            raise
        raise ArchiveError(f"archive entry {name!r} is not an InputBatch: {error}") from None


def medium_of(data: data_pb2.Data) -> str | None:
    return next((m for m in MEDIA_DIRS if data.HasField(m)), None)  # type: ignore[arg-type]


def _dimensions(data: data_pb2.Data, medium: str | None) -> tuple[int, int]:
    if medium == "image":
        return data.image.image_info.width, data.image.image_info.height
    if medium == "video":
        return data.video.video_info.width, data.video.video_info.height
    return 0, 0


def _to_pixels(regions: Any, width: int, height: int, input_id: str) -> None:
    for region in regions:
        info = region.region_info
        geometric = (
            info.HasField("bounding_box")
            or info.HasField("polygon")
            or info.HasField("point")
            or bool(info.keypoint_locations)
        )
        if not geometric:
            continue
        if width <= 0 or height <= 0:
            raise ValueError(
                f"normalized=False needs the image size, but the archive carries none for "
                f"input {input_id!r}: use normalized=None (normalized coordinates) instead"
            )
        if info.HasField("bounding_box"):
            box = info.bounding_box
            box.top_row *= height
            box.bottom_row *= height
            box.left_col *= width
            box.right_col *= width
        points = [*info.polygon.points, *info.keypoint_locations]
        if info.HasField("point"):
            points.append(info.point)
        for point in points:
            point.row *= height
            point.col *= width


def _annotation_count(data: data_pb2.Data) -> int:
    """Positive input-level concepts plus regions (the input's and its frames')."""
    concepts = sum(1 for c in data.concepts if c.value > 0)
    return concepts + len(data.regions) + sum(len(f.data.regions) for f in data.frames)


class _Split:
    """The files of one split being written."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root / name
        self.root.mkdir()
        self.names: dict[str, _Names] = {}
        self.count = 0
        self._lines: IO[str] | None = None

    def media_path(self, medium: str, input_id: str, extension: str) -> tuple[Path, str]:
        directory = MEDIA_DIRS[medium]
        name = self.names.setdefault(directory, _Names()).take(clean_name(input_id), extension)
        return self.root / directory / name, f"{directory}/{name}"

    def write_line(self, record: dict[str, Any]) -> None:
        if self._lines is None:
            self._lines = (self.root / "annotations.jsonl").open("w", encoding="utf-8")
        self._lines.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._lines is not None:
            self._lines.close()


def unpack_clarifai(
    archive_path: Path,
    target: Path,
    export_format: str,
    normalized: bool | None,
    annotations_only: bool,
    progress: Progress = NO_PROGRESS,
) -> UnpackStats:
    """Unpacks a Clarifai-Data-Protobuf or -JSON archive (see the module docstring)."""
    stats = UnpackStats()
    splits: dict[str, _Split] = {}
    with Archive(archive_path) as archive:
        entries = archive.entries
        if not entries or entries[0].filename != "mimetype":
            raise ArchiveError("the archive does not start with a mimetype entry")
        if archive.read(entries[0]) != MIMETYPES[export_format]:
            raise ArchiveError(f"the archive is not a {export_format} archive")
        ticker = _Ticker(progress, len(entries) - 1)
        try:
            for entry in entries[1:]:
                ticker.tick()
                match = _BATCH.match(entry.filename)
                if match is None:
                    raise ArchiveError(f"unexpected archive entry {entry.filename!r}")
                split = splits.get(match.group(1))
                if split is None:
                    split = splits[match.group(1)] = _Split(target, match.group(1))
                # Streamed: a batch may hold large media.
                with archive.zip.open(entry) as stream:
                    reader = (
                        _protobuf_inputs(stream, entry.filename)
                        if export_format == "clarifai_data_protobuf"
                        else _json_inputs(stream, entry.filename)
                    )
                    for message in reader:
                        _write_input(split, message, normalized, annotations_only, stats)
        finally:
            ticker.finish()
            for split in splits.values():
                split.close()
    stats.splits = {name: split.count for name, split in splits.items()}
    return stats


def _write_input(
    split: _Split,
    message: input_pb2.Input,
    normalized: bool | None,
    annotations_only: bool,
    stats: UnpackStats,
) -> None:
    data = message.data
    medium = medium_of(data)
    content: bytes | None = None
    extension = ""
    if medium == "text":
        if data.text.raw:
            content, extension = data.text.raw.encode(), ".txt"
    elif medium is not None:
        media = getattr(data, medium)
        if media.base64:
            content = media.base64
            info = getattr(media, f"{medium}_info")
            kind = info.format if medium == "image" else getattr(info, f"{medium}_format")
            extension = _EXTENSIONS.get(kind, ".bin")
            media.ClearField("base64")
    file: str | None = None
    if content is None:
        if medium is not None:
            stats.media_missing.append(message.id)
    elif not annotations_only:
        path, file = split.media_path(medium or "", message.id, extension)
        path.parent.mkdir(exist_ok=True)
        write_file(str(path), content)
        stats.media_files += 1
    if normalized is False:
        width, height = _dimensions(data, medium)
        _to_pixels(data.regions, width, height, message.id)
        for frame in data.frames:
            _to_pixels(frame.data.regions, width, height, message.id)
    stats.annotations_count += _annotation_count(data)
    stats.assets_count += 1
    split.count += 1
    record: dict[str, Any] = {"input_id": message.id, "file": file}
    # The reference `clarifai.api.Input` has no title: it moves beside the input, so that
    # the reference classes parse `input` as it is.
    if message.title:
        record["title"] = message.title
        message.ClearField("title")
    record["input"] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    split.write_line(record)


def unpack_coco(
    archive_path: Path,
    target: Path,
    normalized: bool | None,
    annotations_only: bool,
    progress: Progress = NO_PROGRESS,
) -> UnpackStats:
    """Unpacks a COCO archive (see the module docstring)."""
    stats = UnpackStats()
    with Archive(archive_path) as archive:
        entries = {entry.filename: entry for entry in archive.entries}
        ticker = _Ticker(progress, len(entries))
        try:
            for name, entry in entries.items():
                match = _INSTANCES.match(name)
                if match is not None:
                    ticker.tick()
                    _coco_split(
                        archive,
                        entries,
                        entry,
                        match.group(1),
                        target,
                        normalized,
                        annotations_only,
                        stats,
                        ticker,
                    )
                elif not name.startswith("images/"):
                    raise ArchiveError(f"unexpected archive entry {name!r}")
        finally:
            ticker.finish()
    return stats


def _coco_split(
    archive: Archive,
    entries: dict[str, zipfile.ZipInfo],
    instances: zipfile.ZipInfo,
    split_name: str,
    target: Path,
    normalized: bool | None,
    annotations_only: bool,
    stats: UnpackStats,
    ticker: _Ticker,
) -> None:
    content = archive.read(instances)
    try:
        document = json.loads(content)
    except ValueError as error:
        raise ArchiveError(f"{instances.filename!r} is not JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise ArchiveError(f"{instances.filename!r} is not a COCO instances file")
    split = _Split(target, split_name)
    sizes: dict[Any, tuple[float, float]] = {}
    for image in document["images"]:
        input_id = str(image.get("datasetd_input_id") or image.get("id"))
        original = str(image.get("file_name", ""))
        suffix = Path(original).suffix.lower()
        extension = suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""
        path, _ = split.media_path("image", input_id, extension)
        image["file_name"] = path.name
        sizes[image.get("id")] = (float(image.get("width") or 0), float(image.get("height") or 0))
        # Compared as a string, never opened as a path.
        entry = entries.get(f"images/{split_name}/{original}")
        if entry is None:
            stats.media_missing.append(input_id)
        elif not annotations_only:
            ticker.tick()
            path.parent.mkdir(exist_ok=True)
            archive.extract(entry, str(path))
            stats.media_files += 1
        concepts = image.get("datasetd_concepts") or []
        stats.annotations_count += sum(1 for c in concepts if c.get("value", 0) > 0)
        split.count += 1
    annotations = document.get("annotations") or []
    if normalized:
        for annotation in annotations:
            _normalize(annotation, *sizes.get(annotation.get("image_id"), (0.0, 0.0)))
        document.setdefault("info", {})["datasetd_normalized"] = True
    stats.annotations_count += len(annotations)
    stats.assets_count += split.count
    stats.splits[split_name] = split.count
    # One string, one write: json.dump would write it in tens of thousands of pieces.
    encoded = json.dumps(document, ensure_ascii=False)
    with (split.root / "annotations.json").open("w", encoding="utf-8") as out:
        out.write(encoded)


def _normalize(annotation: dict[str, Any], width: float, height: float) -> None:
    """Pixel coordinates to [0, 1]; RLE masks are rasters and stay as they are."""
    if width <= 0 or height <= 0:
        raise ValueError(
            f"normalized=True needs the image size, but image {annotation.get('image_id')} "
            "of the COCO file has none"
        )
    x, y, w, h = annotation["bbox"]
    annotation["bbox"] = [x / width, y / height, w / width, h / height]
    annotation["area"] = float(annotation.get("area", 0)) / (width * height)
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, list):
        annotation["segmentation"] = [
            [v / (width if i % 2 == 0 else height) for i, v in enumerate(polygon)]
            for polygon in segmentation
        ]


def vi_annotation_count(line: dict[str, Any]) -> int:
    """Positive tags plus annotations of a Vi JSONL line, its frames' included."""
    parts = [line, *(line.get("frames") or [])]
    return sum(
        sum(1 for tag in part.get("tags") or [] if tag.get("value", 1) > 0)
        + len(part.get("annotations") or [])
        for part in parts
    )


def _vi_lines(source: IO[bytes], sink: IO[bytes], name: str, stats: UnpackStats) -> int:
    """Copies the lines (inputs) of a Vi JSONL entry into `sink`, counting them into
    `stats`; returns their number."""
    count = 0
    for raw in source:
        sink.write(raw)
        try:
            line = json.loads(raw)
        except ValueError as error:
            raise ArchiveError(f"line {count + 1} of {name!r}: {error}") from None
        count += 1
        stats.annotations_count += vi_annotation_count(line)
        if line.get("media_type") != "text" and not line.get("file_name"):
            stats.media_missing.append(str(line.get("asset_id")))
    return count


def unpack_vi(
    archive_path: Path, target: Path, annotations_only: bool, progress: Progress = NO_PROGRESS
) -> UnpackStats:
    """Unpacks a Vi archive into its own layout; entry names are checked against the
    layout's patterns before they name a file."""
    stats = UnpackStats()
    # Creating thousands of small files is the cost here: each folder is made once, and
    # paths are joined as strings.
    made: set[str] = set()
    root = str(target)
    with Archive(archive_path) as archive:
        ticker = _Ticker(progress, len(archive.entries))
        try:
            for entry in archive.entries:
                ticker.tick()
                name = entry.filename
                lines = _VI_LINES.match(name)
                if _VI_ASSET.match(name):
                    if annotations_only:
                        continue
                    stats.media_files += 1
                elif lines is None and name != "metadata.json":
                    raise ArchiveError(f"unexpected archive entry {name!r}")
                folder, _, _ = name.rpartition("/")
                if folder not in made:
                    os.makedirs(f"{root}/{folder}", exist_ok=True)
                    made.add(folder)
                path = f"{root}/{name}"
                if lines is None:
                    archive.extract(entry, path)
                    continue
                with archive.zip.open(entry) as source, open(path, "wb") as sink:
                    count = _vi_lines(source, sink, name, stats)
                stats.splits[lines.group(1)] = count
                stats.assets_count += count
        finally:
            ticker.finish()
    return stats


def unpack(
    archive_path: Path,
    target: Path,
    export_format: str,
    normalized: bool | None = None,
    annotations_only: bool = False,
    progress: Progress = NO_PROGRESS,
) -> UnpackStats:
    """Unpacks an export archive of `export_format` into the existing, empty `target`;
    `progress` counts the archive's entries."""
    if export_format == "coco":
        return unpack_coco(archive_path, target, normalized, annotations_only, progress)
    if export_format in ("vi_full", "vi_jsonl"):
        # The server wrote the coordinates the export asked for (pixel_coordinates).
        return unpack_vi(archive_path, target, annotations_only, progress)
    if export_format in MIMETYPES:
        return unpack_clarifai(
            archive_path, target, export_format, normalized, annotations_only, progress
        )
    raise ValueError(f"unknown export format {export_format!r}")
