"""Rules for the geometry of annotation regions (`RegionInfo`): boxes, polygons,
points, masks, text spans and keypoints, and which media each one may annotate.

Coordinates are relative (0..1) like the protobuf API defines them, so they are
checked without knowing the pixel size of the input.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

from service.domain.annotation_fields import UINT32_MAX, FieldChecker, json_number, present, shown

MAX_POLYGON_POINTS: Final = 10_000
MIN_POLYGON_POINTS: Final = 3
MAX_KEYPOINTS: Final = 1_000
MAX_URL_CHARS: Final = 2048

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
_POINT_KEYS: Final = frozenset({"row", "col", "z", "visibility"})
_SPAN_KEYS: Final = frozenset({"char_start", "char_end", "raw_text"})
_MASK_IMAGE_KEYS: Final = frozenset({"base64", "url"})


def geometry_kind(region_info: Any) -> str | None:
    """The `REGION_KINDS` key of the geometry a region sets, None for none."""
    if not isinstance(region_info, dict):
        return None
    for name in GEOMETRIES:
        if present(region_info, name):
            return "keypoints" if name == "keypoint_locations" else name
    return None


class GeometryChecker(FieldChecker):
    """Checks one region's `region_info` against the media it annotates."""

    def region_info(self, path: str, value: Any) -> None:
        obj = self._keyed(path, value, frozenset(GEOMETRIES))
        if obj is None:
            return
        set_geometries = [name for name in GEOMETRIES if present(obj, name)]
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
        checks: dict[str, Callable[[str, Any], None]] = {
            "bounding_box": self.bounding_box,
            "polygon": self.polygon,
            "point": self.point,
            "mask": self.mask,
            "span": self.span,
            "keypoint_locations": self.keypoints,
        }
        checks[name](where, obj[name])

    def bounding_box(self, path: str, value: Any) -> None:
        obj = self._keyed(path, value, frozenset(_BOX_EDGES))
        if obj is None:
            return
        top, left, bottom, right = (self._unit(path, obj, edge) for edge in _BOX_EDGES)
        # Only compare edges that are valid themselves, so one bad edge is one error.
        for (low_edge, low), (high_edge, high) in (
            (("top_row", top), ("bottom_row", bottom)),
            (("left_col", left), ("right_col", right)),
        ):
            if low is not None and high is not None and not low < high:
                self.v.add(
                    f"{path}.{high_edge}",
                    f"must be greater than {low_edge} ({low:g}), got {high:g}",
                )

    def point(self, path: str, value: Any) -> None:
        obj = self._keyed(path, value, _POINT_KEYS)
        if obj is None:
            return
        self._unit(path, obj, "row")
        self._unit(path, obj, "col")
        if "z" in obj:
            z = json_number(obj["z"])
            if z is None or not math.isfinite(z):
                self.v.add(f"{path}.z", f"must be a finite number, got {shown(obj['z'])}")
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
                    f"must be one of {', '.join(sorted(_VISIBILITIES))}, got {shown(visibility)}",
                )

    def polygon(self, path: str, value: Any) -> None:
        obj = self._keyed(path, value, frozenset({"points"}))
        if obj is None:
            return
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
        obj = self._keyed(path, value, frozenset({"image"}))
        if obj is None:
            return
        where = f"{path}.image"
        if "image" not in obj:
            self.v.add(where, "is required")
            return
        image = self._object(where, obj["image"])
        if image is None:
            return
        self._unknown_keys(where, image, _MASK_IMAGE_KEYS)
        has_bytes = present(image, "base64") and image["base64"] != ""
        has_url = present(image, "url") and image["url"] != ""
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
            self.v.add(path, f"must be an http or https URL, got {shown(url)}")

    def span(self, path: str, value: Any) -> None:
        obj = self._keyed(path, value, _SPAN_KEYS)
        if obj is None:
            return
        start = self._unsigned(path, obj, "char_start", UINT32_MAX)
        end = self._unsigned(path, obj, "char_end", UINT32_MAX)
        if "raw_text" in obj:
            self._string(f"{path}.raw_text", obj["raw_text"], min_chars=0, max_chars=UINT32_MAX)
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
