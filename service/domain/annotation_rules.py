"""Rules for annotation content (`datasetd.v1.Data` in its protobuf JSON mapping):
limits, concepts, regions, frames and nested data, plus the summary statistics
are built from.

The JSON-mapping quirks the rules respect are described in annotation_fields; the
geometry of a single region is checked by annotation_geometry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from service.domain.annotation_fields import (
    UINT32_MAX,
    UINT64_MAX,
    UNSUPPORTED,
    MediaContext,
    as_list,
    json_number,
    json_uint,
    present,
    shown,
)
from service.domain.annotation_geometry import REGION_KINDS, GeometryChecker, geometry_kind
from service.domain.errors import Violations
from service.domain.validation import check_id, check_metadata

MAX_ANNOTATIONS_PER_INPUT: Final = 1000
MAX_CONCEPTS: Final = 200
MAX_CONCEPT_ID_CHARS: Final = 256
MAX_CONCEPT_NAME_CHARS: Final = 256
MAX_REGIONS: Final = 10_000
MAX_FRAMES: Final = 100_000
MAX_TRACK_ID_CHARS: Final = 64
MAX_VIOLATIONS_PER_ANNOTATION: Final = 50

_DATA_KEYS: Final = frozenset({"concepts", "regions", "frames", "metadata"})
_REGION_KEYS: Final = frozenset({"id", "region_info", "data", "value", "track_id"})
_FRAME_KEYS: Final = frozenset({"frame_info", "data", "id"})
_FRAME_INFO_KEYS: Final = frozenset({"index", "time", "number"})
_CONCEPT_KEYS: Final = frozenset({"id", "name", "value", "created_at", "app_id"})


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
    return not any(present(data, key) and data[key] != {} for key in _DATA_KEYS)


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
        for concept in as_list(node.get("concepts")):
            if isinstance(concept, dict) and isinstance(concept.get("id"), str):
                value = json_number(concept.get("value", 0))
                if value is not None and value > 0:
                    positives.add(concept["id"])
        for region in as_list(node.get("regions")):
            if not isinstance(region, dict):
                continue
            has_regions = True
            kind = geometry_kind(region.get("region_info"))
            if kind is not None:
                counts[kind] += 1
            visit(region.get("data"), with_frames=False)
        if with_frames:
            for frame in as_list(node.get("frames")):
                if isinstance(frame, dict):
                    visit(frame.get("data"), with_frames=False)

    visit(data, with_frames=True)
    return AnnotationSummary(
        positive_concepts=frozenset(positives),
        region_counts=counts,
        frame_count=len(as_list(data.get("frames"))),
        has_regions=has_regions,
    )


class _Checker(GeometryChecker):
    def __init__(self, violations: Violations, media: MediaContext) -> None:
        super().__init__(violations, media)
        # Region ids must be unique across the whole annotation, frames included,
        # because clients use them to address regions in later updates.
        self.ids: dict[str, dict[str, str]] = {"region": {}, "frame": {}}
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
            self.regions(f"{path}.regions", data["regions"])
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
            self.regions(f"{path}.regions", data["regions"])
        if "metadata" in data:
            check_metadata(self.v, f"{path}.metadata", data["metadata"])

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
                        f"duplicate concept id {shown(concept_id)} "
                        f"(also {path}[{first_seen[concept_id]}])",
                    )
                else:
                    first_seen[concept_id] = i

    # -- regions ------------------------------------------------------------

    def regions(self, path: str, value: Any) -> None:
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
            self.region(f"{path}[{i}]", region)

    def region(self, path: str, value: Any) -> None:
        obj = self._item(path, value, "region", _REGION_KEYS, self.region_info)
        if obj is None:
            return
        self._unit(path, obj, "value")
        if "track_id" in obj:
            self._string(
                f"{path}.track_id", obj["track_id"], min_chars=0, max_chars=MAX_TRACK_ID_CHARS
            )

    def _item(
        self,
        path: str,
        value: Any,
        kind: str,
        keys: frozenset[str],
        check_info: Callable[[str, Any], None],
    ) -> dict[str, Any] | None:
        """What regions and frames share: an optional id unique among its `kind`, a
        required `<kind>_info` and optional nested data. Returns the item's object."""
        obj = self._keyed(path, value, keys)
        if obj is None:
            return None
        if "id" in obj:
            self._unique_id(f"{path}.id", obj["id"], self.ids[kind], kind)
        info = f"{kind}_info"
        if info in obj:
            check_info(f"{path}.{info}", obj[info])
        else:
            self.v.add(f"{path}.{info}", "is required")
        if "data" in obj:
            # Frame data may hold regions; region data may not nest any further.
            self._nested_data(f"{path}.data", obj["data"], in_frame=kind == "frame")
        return obj

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

    # -- frames -------------------------------------------------------------

    def frames(self, path: str, value: Any) -> None:
        media = self.media.media_type
        if media not in ("video", "audio"):
            self.v.add(path, f"frames are only allowed on video and audio inputs, this is {media}")
            return
        for i, frame in enumerate(self._bounded_list(path, value, MAX_FRAMES, "frames")):
            self.frame(f"{path}[{i}]", frame)

    def frame(self, path: str, value: Any) -> None:
        self._item(path, value, "frame", _FRAME_KEYS, self.frame_info)

    def frame_info(self, path: str, value: Any) -> None:
        obj = self._keyed(path, value, _FRAME_INFO_KEYS)
        if obj is None:
            return
        self._unsigned(path, obj, "index", UINT32_MAX)
        if self.media.media_type == "audio":
            # Audio has no frames of its own: an audio "frame" is a point in time.
            if json_uint(obj.get("number", 0), UINT32_MAX) != 0:
                self.v.add(f"{path}.number", "audio frames are positioned by time, not number")
        else:
            number = self._unsigned(path, obj, "number", UINT32_MAX)
            count = self.media.frame_count
            if number is not None and count is not None and number >= count:
                self.v.add(
                    f"{path}.number",
                    f"must be less than the frame count of the video ({count}), got {number}",
                )
        time = self._unsigned(path, obj, "time", UINT64_MAX)
        duration = self.media.duration_ms
        if time is not None and duration is not None and time > duration:
            self.v.add(
                f"{path}.time",
                f"must be at most the duration of the media ({duration} ms), got {time}",
            )
