"""Rules for annotation content, checked on the protobuf JSON mapping of `datasetd.v1.Data`.

The domain layer must not import protobuf, so annotation content arrives as what
`json_format.MessageToDict(data, preserving_proto_field_name=True)` produces. That
mapping has quirks every rule here has to respect:

* zero values are omitted, so a missing number means 0 (a box with `top_row` 0.0
  has no `top_row` key) and a set-but-all-zero message is `{}`;
* non-finite floats are the strings "NaN", "Infinity" and "-Infinity";
* 64-bit integers (`FrameInfo.time`) are decimal strings;
* bytes are base64 strings and enums are their value names.

The same dicts may also come from stored JSON or hand-written callers, so every
value is type-checked instead of trusted: a wrong type is a violation, never an
exception.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from service.domain.errors import Violations
from service.domain.validation import check_id, check_metadata

MAX_ANNOTATIONS_PER_INPUT: Final = 1000
MAX_CONCEPTS: Final = 200
MAX_CONCEPT_ID_CHARS: Final = 256
MAX_CONCEPT_NAME_CHARS: Final = 256
MAX_REGIONS: Final = 10_000
MAX_POLYGON_POINTS: Final = 10_000
MIN_POLYGON_POINTS: Final = 3
MAX_KEYPOINTS: Final = 1_000
MAX_FRAMES: Final = 100_000
MAX_TRACK_ID_CHARS: Final = 64
MAX_URL_CHARS: Final = 2048
MAX_VIOLATIONS_PER_ANNOTATION: Final = 50

MEDIA_TYPES: Final = frozenset({"image", "video", "audio", "text"})
GEOMETRIES: Final = (
    "bounding_box",
    "polygon",
    "point",
    "mask",
    "span",
    "keypoint_locations",
)
# Summary keys: "keypoints" is friendlier than the proto field name in statistics.
REGION_KINDS: Final = ("bounding_box", "polygon", "point", "mask", "span", "keypoints")

_UINT32_MAX: Final = 2**32 - 1
_UINT64_MAX: Final = 2**64 - 1
_NON_FINITE: Final = frozenset({"NaN", "Infinity", "-Infinity"})
_VISIBILITIES: Final = frozenset(
    {
        "VISIBILITY_UNSPECIFIED",
        "VISIBILITY_VISIBLE",
        "VISIBILITY_NOT_VISIBLE",
        "VISIBILITY_NOT_PRESENT",
    }
)
_BOX_EDGES: Final = ("top_row", "left_col", "bottom_row", "right_col")
_PIXEL_GEOMETRIES: Final = frozenset({"bounding_box", "polygon", "point", "mask"})
_POINT_GEOMETRIES: Final = frozenset({"point", "keypoint_locations"})

_DATA_KEYS: Final = frozenset({"concepts", "regions", "frames", "metadata"})
_REGION_KEYS: Final = frozenset({"id", "region_info", "data", "value", "track_id"})
_FRAME_KEYS: Final = frozenset({"frame_info", "data", "id"})
_FRAME_INFO_KEYS: Final = frozenset({"index", "time", "number"})
_CONCEPT_KEYS: Final = frozenset({"id", "name", "value", "created_at", "app_id"})
_POINT_KEYS: Final = frozenset({"row", "col", "z", "visibility"})
_SPAN_KEYS: Final = frozenset({"char_start", "char_end", "raw_text"})
_MASK_IMAGE_KEYS: Final = frozenset({"base64", "url"})

UNSUPPORTED = "unsupported field"


@dataclass(frozen=True)
class MediaContext:
    """What the annotated input is, as far as the rules need to know.

    `frame_count` and `duration_ms` are only known once the video or audio has
    been probed; when they are None, frame positions are checked for type only.
    """

    media_type: str
    text_length: int | None = None
    frame_count: int | None = None
    duration_ms: int | None = None

    def __post_init__(self) -> None:
        # A wrong media type is a programming error in the caller, not a client mistake.
        if self.media_type not in MEDIA_TYPES:
            raise ValueError(f"unknown media type {self.media_type!r}")


@dataclass(frozen=True)
class AnnotationSummary:
    positive_concepts: frozenset[str]
    # Excluded from the hash so the frozen dataclass stays hashable despite the dict.
    region_counts: dict[str, int] = field(hash=False)
    frame_count: int
    has_regions: bool


class _Overflow(Exception):
    """Stops the walk once enough problems are known: the rest is noise and CPU."""


class _CappedViolations(Violations):
    def __init__(self, cap: int) -> None:
        super().__init__()
        self._cap = cap

    def add(self, field: str, description: str) -> None:
        if len(self.items) >= self._cap:
            raise _Overflow
        super().add(field, description)


def check_annotation_data(
    violations: Violations, path: str, data: dict[str, Any], media: MediaContext
) -> None:
    """Adds a violation for every problem of one annotation's `data` under `path`.

    At most `MAX_VIOLATIONS_PER_ANNOTATION` problems are reported, followed by one
    "... and more" entry, so a garbage annotation cannot produce a huge error.
    """
    local = _CappedViolations(MAX_VIOLATIONS_PER_ANNOTATION)
    try:
        _Checker(local, media).data(path, data)
    except _Overflow:
        violations.items.extend(local.items)
        violations.add(
            path,
            f"... and more: only the first {MAX_VIOLATIONS_PER_ANNOTATION} problems "
            "of this annotation are reported",
        )
        return
    violations.items.extend(local.items)


def is_empty(data: Mapping[str, Any]) -> bool:
    """Whether annotation data carries nothing: no concepts, regions, frames or metadata."""
    return not any(_present(data, key) and data[key] != {} for key in _DATA_KEYS)


def summarize(data: dict[str, Any]) -> AnnotationSummary:
    """Labels and geometry counts of validated annotation data.

    Frame-level concepts count as positive too: a label on one frame of a video
    says the concept is present in the input.
    """
    positives: set[str] = set()
    counts = dict.fromkeys(REGION_KINDS, 0)
    has_regions = False

    def visit(node: Any, *, with_frames: bool) -> None:
        nonlocal has_regions
        if not isinstance(node, dict):
            return
        for concept in _list(node.get("concepts")):
            if isinstance(concept, dict) and isinstance(concept.get("id"), str):
                value = _number(concept.get("value", 0))
                if value is not None and value > 0:
                    positives.add(concept["id"])
        for region in _list(node.get("regions")):
            if not isinstance(region, dict):
                continue
            has_regions = True
            kind = _geometry_kind(region.get("region_info"))
            if kind is not None:
                counts[kind] += 1
            visit(region.get("data"), with_frames=False)
        if with_frames:
            for frame in _list(node.get("frames")):
                if isinstance(frame, dict):
                    visit(frame.get("data"), with_frames=False)

    visit(data, with_frames=True)
    return AnnotationSummary(
        positive_concepts=frozenset(positives),
        region_counts=counts,
        frame_count=len(_list(data.get("frames"))),
        has_regions=has_regions,
    )


def _geometry_kind(region_info: Any) -> str | None:
    if not isinstance(region_info, dict):
        return None
    for name in GEOMETRIES:
        if _present(region_info, name):
            return "keypoints" if name == "keypoint_locations" else name
    return None


def _present(obj: Mapping[str, Any], key: str) -> bool:
    # An empty list is how a hand-built dict says "unset" for a repeated field;
    # an empty dict is a set message whose fields are all zero, so it counts.
    value = obj.get(key)
    return value is not None and value != []


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _number(value: Any) -> float | None:
    """The float of a JSON-mapped proto float, NaN for the non-finite spellings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    # Unhashable garbage (lists, dicts) must not reach the set lookup.
    if isinstance(value, str) and value in _NON_FINITE:
        return math.nan
    return None


def _uint(value: Any, maximum: int) -> int | None:
    """A JSON-mapped unsigned integer; 64-bit ones arrive as decimal strings."""
    if isinstance(value, bool):
        return None
    # The length cap keeps int() clear of its 4300-digit limit, which raises.
    if isinstance(value, str) and len(value) <= 20 and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= maximum:
        return value
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Checker:
    def __init__(self, violations: Violations, media: MediaContext) -> None:
        self.v = violations
        self.media = media
        # Region ids must be unique across the whole annotation, frames included,
        # because clients use them to address regions in later updates.
        self.region_ids: dict[str, str] = {}
        self.frame_ids: dict[str, str] = {}
        self.region_total = 0
        self.region_total_reported = False

    # -- containers ---------------------------------------------------------

    def data(self, path: str, data: Any) -> None:
        if not isinstance(data, dict):
            self.v.add(path, "must be an object")
            return
        self._unknown_keys(path, data, _DATA_KEYS)
        if is_empty(data):
            self.v.add(path, "annotation is empty: set concepts, regions, frames or metadata")
            return
        if "concepts" in data:
            self.concepts(f"{path}.concepts", data["concepts"])
        if "regions" in data:
            self.regions(f"{path}.regions", data["regions"], in_frame=False)
        if "frames" in data:
            self.frames(f"{path}.frames", data["frames"])
        if "metadata" in data:
            check_metadata(self.v, f"{path}.metadata", data["metadata"])

    def _nested_data(self, path: str, data: Any, *, in_frame: bool) -> None:
        if not isinstance(data, dict):
            self.v.add(path, "must be an object")
            return
        for key in data:
            if key == "frames":
                self.v.add(f"{path}.frames", "nested frames are not allowed")
            elif key == "regions" and not in_frame:
                self.v.add(f"{path}.regions", "nested regions are not allowed in region data")
            elif key not in _DATA_KEYS:
                self.v.add(f"{path}.{key}", UNSUPPORTED)
        if "concepts" in data:
            self.concepts(f"{path}.concepts", data["concepts"])
        if in_frame and "regions" in data:
            self.regions(f"{path}.regions", data["regions"], in_frame=True)
        if "metadata" in data:
            check_metadata(self.v, f"{path}.metadata", data["metadata"])

    def _unknown_keys(self, path: str, obj: Mapping[str, Any], allowed: frozenset[str]) -> None:
        for key in obj:
            if key not in allowed:
                self.v.add(f"{path}.{key}", UNSUPPORTED)

    def _object(self, path: str, value: Any) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.v.add(path, "must be an object")
        return None

    def _bounded_list(self, path: str, value: Any, maximum: int, what: str) -> list[Any]:
        """The items worth checking: past the limit they would only repeat the error."""
        if not isinstance(value, list):
            self.v.add(path, "must be a list")
            return []
        if len(value) > maximum:
            self.v.add(path, f"must have at most {maximum} {what}, got {len(value)}")
            return value[:maximum]
        return value

    # -- scalars ------------------------------------------------------------

    def _string(self, path: str, value: Any, *, min_chars: int, max_chars: int) -> str | None:
        if not isinstance(value, str):
            self.v.add(path, "must be a string")
            return None
        if not min_chars <= len(value) <= max_chars:
            self.v.add(path, f"must be {min_chars}..{max_chars} characters, got {len(value)}")
        # PostgreSQL text and jsonb both reject NUL, which would surface as a 500.
        if "\x00" in value:
            self.v.add(path, "must not contain NUL characters")
        return value

    def _unit(self, path: str, obj: Mapping[str, Any], key: str) -> float | None:
        """A 0..1 float; an omitted key is the proto default 0."""
        raw = obj.get(key, 0)
        value = _number(raw)
        if value is None:
            self.v.add(f"{path}.{key}", f"must be a number, got {_shown(raw)}")
            return None
        if not math.isfinite(value):
            self.v.add(f"{path}.{key}", f"must be a finite number, got {_shown(raw)}")
            return None
        if not 0.0 <= value <= 1.0:
            self.v.add(f"{path}.{key}", f"must be between 0 and 1, got {value:g}")
            return None
        return value

    def _unsigned(self, path: str, obj: Mapping[str, Any], key: str, maximum: int) -> int | None:
        raw = obj.get(key, 0)
        value = _uint(raw, maximum)
        if value is None:
            self.v.add(f"{path}.{key}", f"must be an integer in 0..{maximum}, got {_shown(raw)}")
        return value

    # -- concepts -----------------------------------------------------------

    def concepts(self, path: str, value: Any) -> None:
        first_seen: dict[str, int] = {}
        for i, concept in enumerate(self._bounded_list(path, value, MAX_CONCEPTS, "concepts")):
            item = f"{path}[{i}]"
            obj = self._object(item, concept)
            if obj is None:
                continue
            # created_at and app_id are output only; echoing a read concept back is harmless.
            self._unknown_keys(item, obj, _CONCEPT_KEYS)
            concept_id = self._string(
                f"{item}.id", obj.get("id", ""), min_chars=1, max_chars=MAX_CONCEPT_ID_CHARS
            )
            if "name" in obj:
                self._string(
                    f"{item}.name", obj["name"], min_chars=0, max_chars=MAX_CONCEPT_NAME_CHARS
                )
            self._unit(item, obj, "value")
            if concept_id:
                if concept_id in first_seen:
                    self.v.add(
                        f"{item}.id",
                        f"duplicate concept id {_shown(concept_id)} "
                        f"(also {path}[{first_seen[concept_id]}])",
                    )
                else:
                    first_seen[concept_id] = i

    # -- regions ------------------------------------------------------------

    def regions(self, path: str, value: Any, *, in_frame: bool) -> None:
        if self.media.media_type == "audio":
            self.v.add(path, "regions are not allowed on audio inputs")
            return
        items = self._bounded_list(path, value, MAX_REGIONS, "regions per annotation")
        for i, region in enumerate(items):
            if self.region_total >= MAX_REGIONS:
                if not self.region_total_reported:
                    self.region_total_reported = True
                    self.v.add(
                        path, f"the annotation must have at most {MAX_REGIONS} regions in total"
                    )
                return
            self.region_total += 1
            self.region(f"{path}[{i}]", region, in_frame=in_frame)

    def region(self, path: str, value: Any, *, in_frame: bool) -> None:
        obj = self._object(path, value)
        if obj is None:
            return
        self._unknown_keys(path, obj, _REGION_KEYS)
        if "id" in obj:
            self._unique_id(f"{path}.id", obj["id"], self.region_ids, "region")
        if "region_info" in obj:
            self.region_info(f"{path}.region_info", obj["region_info"])
        else:
            self.v.add(f"{path}.region_info", "is required")
        if "data" in obj:
            self._nested_data(f"{path}.data", obj["data"], in_frame=False)
        self._unit(path, obj, "value")
        if "track_id" in obj:
            self._string(
                f"{path}.track_id", obj["track_id"], min_chars=0, max_chars=MAX_TRACK_ID_CHARS
            )

    def _unique_id(self, path: str, value: Any, seen: dict[str, str], what: str) -> None:
        if not isinstance(value, str):
            self.v.add(path, "must be a string")
            return
        before = len(self.v.items)
        check_id(self.v, path, value, required=False)
        if not value or len(self.v.items) != before:
            return
        if value in seen:
            self.v.add(path, f"duplicate {what} id {value!r} (also {seen[value]})")
        else:
            seen[value] = path

    def region_info(self, path: str, value: Any) -> None:
        obj = self._object(path, value)
        if obj is None:
            return
        self._unknown_keys(path, obj, frozenset(GEOMETRIES))
        set_geometries = [name for name in GEOMETRIES if _present(obj, name)]
        if len(set_geometries) != 1:
            got = ", ".join(set_geometries) or "none"
            self.v.add(path, f"must set exactly one of {', '.join(GEOMETRIES)}; got {got}")
            return
        (name,) = set_geometries
        where = f"{path}.{name}"
        media = self.media.media_type
        if name == "span" and media != "text":
            self.v.add(where, f"spans are only allowed on text inputs, this input is {media}")
            return
        if (name in _PIXEL_GEOMETRIES or name in _POINT_GEOMETRIES) and media in (
            "text",
            "audio",
        ):
            self.v.add(where, f"{name} regions are not allowed on {media} inputs")
            return
        if name == "bounding_box":
            self.bounding_box(where, obj[name])
        elif name == "polygon":
            self.polygon(where, obj[name])
        elif name == "point":
            self.point(where, obj[name])
        elif name == "mask":
            self.mask(where, obj[name])
        elif name == "span":
            self.span(where, obj[name])
        else:
            self.keypoints(where, obj[name])

    # -- geometry -----------------------------------------------------------

    def bounding_box(self, path: str, value: Any) -> None:
        obj = self._object(path, value)
        if obj is None:
            return
        self._unknown_keys(path, obj, frozenset(_BOX_EDGES))
        top, left, bottom, right = (self._unit(path, obj, edge) for edge in _BOX_EDGES)
        # Only compare edges that are valid themselves, so one bad edge is one error.
        if top is not None and bottom is not None and not top < bottom:
            self.v.add(
                f"{path}.bottom_row",
                f"must be greater than top_row ({top:g}), got {bottom:g}",
            )
        if left is not None and right is not None and not left < right:
            self.v.add(
                f"{path}.right_col",
                f"must be greater than left_col ({left:g}), got {right:g}",
            )

    def point(self, path: str, value: Any) -> None:
        obj = self._object(path, value)
        if obj is None:
            return
        self._unknown_keys(path, obj, _POINT_KEYS)
        self._unit(path, obj, "row")
        self._unit(path, obj, "col")
        if "z" in obj:
            z = _number(obj["z"])
            if z is None or not math.isfinite(z):
                self.v.add(f"{path}.z", f"must be a finite number, got {_shown(obj['z'])}")
        if "visibility" in obj:
            visibility = obj["visibility"]
            # The JSON mapping writes names, but also accepts the numbers on parse.
            known = (isinstance(visibility, str) and visibility in _VISIBILITIES) or (
                isinstance(visibility, int)
                and not isinstance(visibility, bool)
                and 0 <= visibility <= 3
            )
            if not known:
                self.v.add(
                    f"{path}.visibility",
                    f"must be one of {', '.join(sorted(_VISIBILITIES))}, got {_shown(visibility)}",
                )

    def polygon(self, path: str, value: Any) -> None:
        obj = self._object(path, value)
        if obj is None:
            return
        self._unknown_keys(path, obj, frozenset({"points"}))
        points = obj.get("points", [])
        where = f"{path}.points"
        if not isinstance(points, list):
            self.v.add(where, "must be a list")
            return
        if not MIN_POLYGON_POINTS <= len(points) <= MAX_POLYGON_POINTS:
            self.v.add(
                where,
                f"must have {MIN_POLYGON_POINTS}..{MAX_POLYGON_POINTS} points, got {len(points)}",
            )
        for i, point in enumerate(points[:MAX_POLYGON_POINTS]):
            self.point(f"{where}[{i}]", point)

    def keypoints(self, path: str, value: Any) -> None:
        for i, point in enumerate(self._bounded_list(path, value, MAX_KEYPOINTS, "keypoints")):
            self.point(f"{path}[{i}]", point)

    def mask(self, path: str, value: Any) -> None:
        obj = self._object(path, value)
        if obj is None:
            return
        self._unknown_keys(path, obj, frozenset({"image"}))
        where = f"{path}.image"
        if "image" not in obj:
            self.v.add(where, "is required")
            return
        image = self._object(where, obj["image"])
        if image is None:
            return
        self._unknown_keys(where, image, _MASK_IMAGE_KEYS)
        has_bytes = _present(image, "base64") and image["base64"] != ""
        has_url = _present(image, "url") and image["url"] != ""
        if has_bytes == has_url:
            self.v.add(where, "must set exactly one of base64 (non-empty) or url")
            return
        if has_bytes:
            self._base64(f"{where}.base64", image["base64"])
        else:
            self._url(f"{where}.url", image["url"])

    def _base64(self, path: str, value: Any) -> None:
        if not isinstance(value, str):
            self.v.add(path, "must be a base64 string")
            return
        try:
            # The JSON mapping may use either alphabet, with or without padding.
            normalized = value.replace("-", "+").replace("_", "/")
            decoded = base64.b64decode(normalized + "=" * (-len(normalized) % 4), validate=True)
        except (binascii.Error, ValueError):
            self.v.add(path, "must be valid base64")
            return
        if not decoded:
            self.v.add(path, "must not be empty")

    def _url(self, path: str, value: Any) -> None:
        url = self._string(path, value, min_chars=1, max_chars=MAX_URL_CHARS)
        if url is None:
            return
        try:
            parts = urlsplit(url)
        except ValueError:
            parts = None
        if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            self.v.add(path, f"must be an http or https URL, got {_shown(url)}")

    def span(self, path: str, value: Any) -> None:
        obj = self._object(path, value)
        if obj is None:
            return
        self._unknown_keys(path, obj, _SPAN_KEYS)
        start = self._unsigned(path, obj, "char_start", _UINT32_MAX)
        end = self._unsigned(path, obj, "char_end", _UINT32_MAX)
        if "raw_text" in obj:
            self._string(f"{path}.raw_text", obj["raw_text"], min_chars=0, max_chars=_UINT32_MAX)
        if start is None or end is None:
            return
        if not start < end:
            self.v.add(f"{path}.char_end", f"must be greater than char_start ({start}), got {end}")
        length = self.media.text_length
        if length is not None and end > length:
            self.v.add(
                f"{path}.char_end",
                f"must be at most the text length ({length} characters), got {end}",
            )

    # -- frames -------------------------------------------------------------

    def frames(self, path: str, value: Any) -> None:
        media = self.media.media_type
        if media not in ("video", "audio"):
            self.v.add(path, f"frames are only allowed on video and audio inputs, this is {media}")
            return
        for i, frame in enumerate(self._bounded_list(path, value, MAX_FRAMES, "frames")):
            self.frame(f"{path}[{i}]", frame)

    def frame(self, path: str, value: Any) -> None:
        obj = self._object(path, value)
        if obj is None:
            return
        self._unknown_keys(path, obj, _FRAME_KEYS)
        if "id" in obj:
            self._unique_id(f"{path}.id", obj["id"], self.frame_ids, "frame")
        if "frame_info" in obj:
            self.frame_info(f"{path}.frame_info", obj["frame_info"])
        else:
            self.v.add(f"{path}.frame_info", "is required")
        if "data" in obj:
            self._nested_data(f"{path}.data", obj["data"], in_frame=True)

    def frame_info(self, path: str, value: Any) -> None:
        obj = self._object(path, value)
        if obj is None:
            return
        self._unknown_keys(path, obj, _FRAME_INFO_KEYS)
        self._unsigned(path, obj, "index", _UINT32_MAX)
        if self.media.media_type == "audio":
            # Audio has no frames of its own: an audio "frame" is a point in time.
            if _uint(obj.get("number", 0), _UINT32_MAX) != 0:
                self.v.add(f"{path}.number", "audio frames are positioned by time, not number")
        else:
            number = self._unsigned(path, obj, "number", _UINT32_MAX)
            count = self.media.frame_count
            if number is not None and count is not None and number >= count:
                self.v.add(
                    f"{path}.number",
                    f"must be less than the frame count of the video ({count}), got {number}",
                )
        time = self._unsigned(path, obj, "time", _UINT64_MAX)
        duration = self.media.duration_ms
        if time is not None and duration is not None and time > duration:
            self.v.add(
                f"{path}.time",
                f"must be at most the duration of the media ({duration} ms), got {time}",
            )
