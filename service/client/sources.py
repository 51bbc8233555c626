"""Readers that turn a folder, a CSV file or a COCO dataset into upload items.

They only describe what to upload (paths, URLs, texts, labels): media files are
read later, by the upload workers, so memory stays bounded whatever the size of
the source. Problems with one row or file are returned as `Failure`s next to the
good items, so one bad row never stops the others.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

MediaKind = Literal["image", "video", "audio", "text"]
MEDIA_KINDS: tuple[MediaKind, ...] = ("image", "video", "audio", "text")

# Mirrors the server's id rule (service/domain/validation.py); the client may not import it.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ID_RULE = "must be 1..64 characters of [A-Za-z0-9_-]"
ID_MAX_CHARS = 64

EXTENSIONS: dict[MediaKind, frozenset[str]] = {
    "image": frozenset({".jpg", ".jpeg", ".png", ".webp", ".tiff", ".tif", ".bmp", ".gif"}),
    "video": frozenset({".mp4", ".mov", ".3gp", ".webm", ".mkv", ".avi", ".ts", ".mpg", ".flv"}),
    "audio": frozenset({".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac"}),
    "text": frozenset({".txt"}),
}

CSV_COLUMNS = ("inputid", "input", "concepts", "metadata", "geopoints")
CSV_TYPES = ("url", "file_path", "raw")
# csv refuses fields over 128 KB by default, which a raw text or a logged item
# easily exceeds; the limit is a C long, 32 bits on Windows.
CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)

# Codes of the failure log; `retry` decides by them what to upload again.
BAD_SOURCE = "bad_source"  # the row/file itself is wrong: fix the source, then upload again
UNREADABLE = "unreadable"  # the file could not be read: retryable once fixed
INVALID = "invalid"  # the server rejected the item
DUPLICATE = "duplicate"  # the id already exists (or repeats in one request)
CALL_FAILED = "call_failed"  # the whole call failed (network, server error)
NOT_ATTEMPTED = "not_attempted"  # e.g. an annotation whose image was not uploaded


@dataclass(frozen=True)
class UploadItem:
    """One input to upload: exactly one of `path`, `url`, `text` or `data` carries the media.

    `source` says where it came from (a file, `data.csv:12`), for the failure log.
    """

    input_id: str
    kind: MediaKind = "image"
    path: str | None = None
    url: str | None = None
    text: str | None = None
    data: bytes | None = None
    concepts: tuple[str, ...] = ()
    metadata: dict[str, Any] | None = None
    geo: tuple[float, float] | None = None  # (longitude, latitude)
    title: str = ""
    source: str = ""
    # Vectors by embedding model id (data.embeddings): what search ranks the input by.
    embeddings: dict[str, tuple[float, ...]] | None = None

    def __post_init__(self) -> None:
        if self.kind not in MEDIA_KINDS:
            raise ValueError(f"kind must be one of {', '.join(MEDIA_KINDS)}, not {self.kind!r}")
        media = [m for m in (self.path, self.url, self.text, self.data) if m is not None]
        if len(media) != 1:
            raise ValueError(f"item {self.input_id!r} needs exactly one of path, url, text or data")
        if self.text is not None and self.kind != "text":
            raise ValueError(f"item {self.input_id!r}: raw text needs kind 'text'")

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe form for the failure log; bytes become hex so the log stays text."""
        value = asdict(self)
        value["concepts"] = list(self.concepts)
        value["geo"] = list(self.geo) if self.geo is not None else None
        value["data"] = self.data.hex() if self.data is not None else None
        return value

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> UploadItem:
        fields = dict(value)
        fields["concepts"] = tuple(fields.get("concepts") or ())
        geo = fields.get("geo")
        fields["geo"] = (float(geo[0]), float(geo[1])) if geo else None
        data = fields.get("data")
        fields["data"] = bytes.fromhex(data) if data is not None else None
        embeddings = fields.get("embeddings")
        fields["embeddings"] = (
            {model: tuple(vector) for model, vector in embeddings.items()} if embeddings else None
        )
        return cls(**fields)


@dataclass(frozen=True)
class Box:
    """A bounding box with edges normalised to 0..1 (fractions of the image size)."""

    concept: str
    left: float
    top: float
    right: float
    bottom: float


@dataclass(frozen=True)
class AnnotationItem:
    """Annotations of one input: input-level concepts and/or bounding boxes.

    An empty `annotation_id` gets a deterministic one derived from the content,
    so uploading the same annotation twice is reported as a duplicate instead
    of creating it again.
    """

    input_id: str
    concepts: tuple[str, ...] = ()
    boxes: tuple[Box, ...] = ()
    annotation_id: str = ""
    metadata: dict[str, Any] | None = None
    source: str = ""


@dataclass(frozen=True)
class Failure:
    """One item that was not uploaded, and why: a row of the failure log."""

    index: int
    input_id: str
    reason: str
    source: str
    code: str
    kind: Literal["input", "annotation"] = "input"
    # What `retry` uploads again (an UploadItem or an annotation as JSON); None
    # when the source itself must be fixed.
    item: dict[str, Any] | None = None


@dataclass
class Scan:
    """What a reader found: items to upload, problems, and files it ignored."""

    items: list[UploadItem] = field(default_factory=list)
    # Each item's index in its source: CSV line, position in the folder or JSON.
    indexes: list[int] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    skipped: int = 0
    annotations: list[tuple[int, AnnotationItem]] = field(default_factory=list)

    def add(self, index: int, item: UploadItem) -> None:
        self.indexes.append(index)
        self.items.append(item)


def clean_id(text: str) -> str:
    """A valid input id from a name: other characters become `_`, cut to 64 characters."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", text.strip())[:ID_MAX_CHARS]
    return cleaned or "_"


def hashed_id(prefix: str, *parts: str) -> str:
    """A deterministic id from content, so that re-runs produce the same id."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return f"{prefix}{digest[: ID_MAX_CHARS - len(prefix)]}"


def _claim(scan: Scan, first: dict[str, str], input_id: str, index: int, source: str) -> bool:
    """True for the first file of an id; a later one is a failure naming that first file."""
    if input_id not in first:
        first[input_id] = source
        return True
    reason = f"input id {input_id!r} is also the id of {first[input_id]}"
    scan.failures.append(Failure(index, input_id, reason, source, BAD_SOURCE))
    return False


def _check_kind(input_type: str) -> MediaKind:
    for kind in MEDIA_KINDS:
        if kind == input_type:
            return kind
    raise ValueError(f"input_type must be one of {', '.join(MEDIA_KINDS)}, not {input_type!r}")


# --- folders --------------------------------------------------------------------------------


def scan_folder(folder: str | Path, input_type: str = "image", labels: bool = False) -> Scan:
    """Every media file under `folder`, recursively, in sorted relative-path order.

    With `labels`, a file's concept is the name of the folder that directly
    contains it (the top folder's own name for files at the top). Files of
    other types are counted in `skipped`. Two files whose stems clean to the
    same id: the first (in sorted order) is uploaded, the later ones are failures.
    """
    kind = _check_kind(input_type)
    root = Path(folder).resolve()
    if not root.is_dir():
        raise ValueError(f"{folder} is not a folder")
    scan = Scan()
    first: dict[str, str] = {}
    files = sorted(
        (p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).parts
    )
    index = 0
    for path in files:
        relative = path.relative_to(root).as_posix()
        if path.suffix.lower() not in EXTENSIONS[kind] or path.name.startswith("."):
            scan.skipped += 1
            continue
        index += 1
        input_id = clean_id(path.stem)
        if not _claim(scan, first, input_id, index, relative):
            continue
        concepts = (path.parent.name,) if labels else ()
        scan.add(
            index,
            UploadItem(
                input_id,
                kind,
                path=str(path),
                concepts=concepts,
                title=path.name,
                source=relative,
            ),
        )
    return scan


# --- CSV ------------------------------------------------------------------------------------


def parse_metadata(text: str) -> dict[str, Any]:
    """A JSON object, or the single-quoted Python dict style (`{'a': "it's"}`).

    The fallback is `ast.literal_eval`, a real parser, rather than swapping
    quotes, which would break apostrophes inside values.
    """
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(
                "metadata is neither a JSON object nor a Python dict literal"
            ) from None
    if not isinstance(value, dict):
        raise ValueError(f"metadata must be an object, got {type(value).__name__}")
    try:
        # Literals such as tuples, sets or bytes would not survive the trip to the server.
        normal: dict[str, Any] = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata is not JSON-compatible: {error}") from None
    if normal != value:
        raise ValueError("metadata has values JSON cannot represent (e.g. tuples or int keys)")
    return normal


def parse_geopoint(text: str) -> tuple[float, float]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise ValueError(f"geopoints must be 'longitude,latitude', got {text!r}")
    try:
        longitude, latitude = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(
            f"geopoints must be two numbers 'longitude,latitude', got {text!r}"
        ) from None
    if not (math.isfinite(longitude) and -180 <= longitude <= 180):
        raise ValueError(f"longitude must be -180..180, got {parts[0]}")
    if not (math.isfinite(latitude) and -90 <= latitude <= 90):
        raise ValueError(f"latitude must be -90..90, got {parts[1]}")
    return longitude, latitude


def parse_concepts(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))


def read_csv(
    path: str | Path,
    dataset_id: str,
    input_type: str = "image",
    csv_type: str = "url",
    labels: bool = True,
) -> Scan:
    """Upload items from a CSV file with a header row; bad rows become failures.

    Raises ValueError for problems of the whole file (no header, unknown or
    missing columns, `raw` with a non-text input type). Failure indexes are the
    physical line where the row starts (the header is line 1).
    """
    kind = _check_kind(input_type)
    if csv_type not in CSV_TYPES:
        raise ValueError(f"csv_type must be one of {', '.join(CSV_TYPES)}, not {csv_type!r}")
    if csv_type == "raw" and kind != "text":
        raise ValueError(f"csv_type 'raw' is for text inputs only, not input_type {kind!r}")
    csv_path = Path(path).resolve()
    scan = Scan()
    first: dict[str, int] = {}
    csv.field_size_limit(CSV_FIELD_LIMIT)
    # utf-8-sig: spreadsheets often prepend a byte-order mark to the header.
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        names = _csv_header(next(reader, None), path)
        for line, row in _csv_rows(reader, names, scan, csv_path.name):
            source = f"{csv_path.name}:{line}"
            given_id = row.get("inputid", "").strip()
            try:
                item = _csv_item(
                    row, given_id, dataset_id, kind, csv_type, labels, csv_path.parent, source
                )
            except ValueError as error:
                scan.failures.append(Failure(line, given_id, str(error), source, BAD_SOURCE))
                continue
            if item.input_id in first:
                reason = f"input id {item.input_id!r} repeats line {first[item.input_id]}"
                scan.failures.append(Failure(line, item.input_id, reason, source, BAD_SOURCE))
                continue
            first[item.input_id] = line
            scan.add(line, item)
    return scan


def _csv_header(header: list[str] | None, path: str | Path) -> list[str]:
    """The column names, lowercased; ValueError for a header the upload cannot use."""
    if header is None or not any(h.strip() for h in header):
        raise ValueError(f"{path}: a header row is required ({', '.join(CSV_COLUMNS)})")
    names = [h.strip().lower() for h in header]
    unknown = [h for h in names if h not in CSV_COLUMNS]
    if unknown:
        raise ValueError(
            f"{path}: unknown column(s) {', '.join(repr(u) for u in unknown)}; "
            f"allowed: {', '.join(CSV_COLUMNS)}"
        )
    repeated = sorted({h for h in names if names.count(h) > 1})
    if repeated:
        raise ValueError(f"{path}: column(s) {', '.join(repeated)} appear more than once")
    if "input" not in names:
        raise ValueError(f"{path}: the 'input' column is required")
    return names


def _csv_rows(
    reader: Any, names: list[str], scan: Scan, file_name: str
) -> Iterator[tuple[int, dict[str, str]]]:
    """(line where the row starts, row by column) for every non-blank row; rows with too
    many fields become failures."""
    end = reader.line_num
    for cells in reader:
        # A quoted field may span lines: the row starts after the previous one ended.
        line, end = end + 1, reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(names):
            reason = f"row has {len(cells)} fields, the header has {len(names)}"
            scan.failures.append(Failure(line, "", reason, f"{file_name}:{line}", BAD_SOURCE))
            continue
        yield line, dict(zip(names, [*cells, *[""] * (len(names) - len(cells))], strict=True))


def _csv_item(
    row: dict[str, str],
    given_id: str,
    dataset_id: str,
    kind: MediaKind,
    csv_type: str,
    labels: bool,
    folder: Path,
    source: str,
) -> UploadItem:
    value = row["input"].strip() if csv_type != "raw" else row["input"]
    if not value.strip():
        raise ValueError("input is empty")
    if given_id and not ID_PATTERN.match(given_id):
        raise ValueError(f"inputid {given_id!r} {ID_RULE}")
    concepts = parse_concepts(row.get("concepts", "")) if labels else ()
    metadata_text = row.get("metadata", "").strip()
    metadata = parse_metadata(metadata_text) if metadata_text else None
    geo_text = row.get("geopoints", "").strip()
    geo = parse_geopoint(geo_text) if geo_text else None
    # Ids of unnamed rows come from the dataset and the row content, so a re-run
    # of the same file names every row the same way.
    input_id = given_id or hashed_id(
        "csv-",
        dataset_id,
        kind,
        csv_type,
        value,
        ",".join(concepts),
        json.dumps(metadata, sort_keys=True),
        repr(geo),
    )
    common: dict[str, Any] = {
        "concepts": concepts,
        "metadata": metadata,
        "geo": geo,
        "source": source,
    }
    if csv_type == "url":
        if not re.match(r"^https?://", value, re.IGNORECASE):
            raise ValueError(f"input must be an http(s) URL with csv_type 'url', got {value!r}")
        return UploadItem(input_id, kind, url=value, **common)
    if csv_type == "file_path":
        file = Path(value).expanduser()
        file = file if file.is_absolute() else folder / file
        return UploadItem(input_id, kind, path=str(file), title=file.name, **common)
    return UploadItem(input_id, kind, text=value, **common)


# --- COCO -----------------------------------------------------------------------------------


def read_coco(
    images_dir: str | Path, annotations_json: str | Path, dataset_id: str, labels: bool = True
) -> Scan:
    """Images and bounding boxes of a COCO detection dataset (an instances JSON file).

    Boxes (`[x, y, width, height]` in pixels) are normalised with the image's
    width and height from the JSON; a box that overshoots the image by at most a
    pixel (rounding) is clipped, anything else is a failure. Each COCO
    annotation becomes one annotation with one box; its id is derived from
    the dataset, image and COCO annotation id, so re-runs create nothing twice.
    """
    root = Path(images_dir).resolve()
    with Path(annotations_json).open(encoding="utf-8") as handle:
        document = json.load(handle)
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise ValueError(f"{annotations_json}: not a COCO instances file (no 'images' list)")
    name = Path(annotations_json).name
    scan = Scan()
    categories = {
        c["id"]: str(c.get("name", c["id"]))
        for c in document.get("categories") or []
        if isinstance(c, dict) and "id" in c
    }
    images = _coco_images(document["images"], root, name, scan)
    if not labels:
        return scan
    for index, entry in enumerate(document.get("annotations") or [], start=1):
        source = f"{name}:annotations[{index - 1}]"
        try:
            scan.annotations.append(
                (index, _coco_box(entry, images, categories, dataset_id, source))
            )
        except ValueError as error:
            image = images.get(entry.get("image_id")) if isinstance(entry, dict) else None
            scan.failures.append(
                Failure(
                    index, image[0] if image else "", str(error), source, BAD_SOURCE, "annotation"
                )
            )
    return scan


def _coco_images(
    entries: list[Any], root: Path, name: str, scan: Scan
) -> dict[Any, tuple[str, float, float]]:
    """Adds the images to `scan`; returns (input id, width, height) by COCO image id."""
    images: dict[Any, tuple[str, float, float]] = {}
    first: dict[str, str] = {}
    for index, image in enumerate(entries, start=1):
        source = f"{name}:images[{index - 1}]"
        if not isinstance(image, dict) or "id" not in image or not image.get("file_name"):
            reason = "image needs 'id' and 'file_name'"
            scan.failures.append(Failure(index, "", reason, source, BAD_SOURCE))
            continue
        file_name = str(image["file_name"])
        # The JSON may come from anywhere: never read a file outside images_dir.
        if not (root / file_name).resolve().is_relative_to(root):
            reason = f"file_name {file_name!r} is outside the images folder"
            scan.failures.append(Failure(index, "", reason, source, BAD_SOURCE))
            continue
        input_id = clean_id(Path(file_name).stem)
        if not _claim(scan, first, input_id, index, file_name):
            continue
        images[image["id"]] = (input_id, _number(image.get("width")), _number(image.get("height")))
        path, title = str(root / file_name), Path(file_name).name
        scan.add(index, UploadItem(input_id, "image", path=path, title=title, source=file_name))
    return images


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return math.nan
    return float(value)


def _coco_box(
    entry: Any,
    images: dict[Any, tuple[str, float, float]],
    categories: dict[Any, str],
    dataset_id: str,
    source: str,
) -> AnnotationItem:
    if not isinstance(entry, dict):
        raise ValueError("annotation is not an object")
    if entry.get("image_id") not in images:
        raise ValueError(f"unknown (or rejected) image_id {entry.get('image_id')!r}")
    if entry.get("category_id") not in categories:
        raise ValueError(f"unknown category_id {entry.get('category_id')!r}")
    input_id, width, height = images[entry["image_id"]]
    if not (width > 0 and height > 0):
        raise ValueError(f"image of {input_id!r} has no positive width and height in the JSON")
    bbox = entry.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise ValueError(f"bbox must be [x, y, width, height], got {bbox!r}")
    x, y, w, h = (_number(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise ValueError(f"bbox must be finite with positive width and height, got {bbox!r}")
    # Exporters round to whole pixels; tolerate that much overshoot, not more.
    if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
        raise ValueError(f"bbox {bbox!r} lies outside the {width:g}x{height:g} image")
    left, top = max(x, 0.0) / width, max(y, 0.0) / height
    right, bottom = min(x + w, width) / width, min(y + h, height) / height
    concept = clean_id(categories[entry["category_id"]])
    return AnnotationItem(
        input_id,
        boxes=(Box(concept, left, top, right, bottom),),
        annotation_id=hashed_id(
            "coco-", dataset_id, input_id, str(entry.get("id", "")), json.dumps(bbox)
        ),
        source=source,
    )
