"""Field-level reading and checking of annotation content in its protobuf JSON mapping.

The domain layer must not import protobuf, so annotation content arrives as what
`json_format.MessageToDict(data, preserving_proto_field_name=True)` produces. That
mapping has quirks every rule has to respect:

* zero values are omitted, so a missing number means 0 (a box with `top_row` 0.0
  has no `top_row` key) and a set-but-all-zero message is `{}`;
* non-finite floats are the strings "NaN", "Infinity" and "-Infinity";
* 64-bit integers (`FrameInfo.time`) are decimal strings;
* bytes are base64 strings and enums are their value names.

The same dicts may also come from stored JSON or hand-written callers, so every
value is type-checked instead of trusted: a wrong type is a violation, never an
exception. The readers here and `FieldChecker` hold that discipline in one place;
the geometry and data-kind rules build on them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from service.domain.errors import Violations

MEDIA_TYPES: Final = frozenset({"image", "video", "audio", "text"})
UINT32_MAX: Final = 2**32 - 1
UINT64_MAX: Final = 2**64 - 1
UNSUPPORTED: Final = "unsupported field"

_NON_FINITE: Final = frozenset({"NaN", "Infinity", "-Infinity"})


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


def present(obj: Mapping[str, Any], key: str) -> bool:
    """Whether a message field is set in the JSON mapping."""
    # An empty list is how a hand-built dict says "unset" for a repeated field;
    # an empty dict is a set message whose fields are all zero, so it counts.
    value = obj.get(key)
    return value is not None and value != []


def as_list(value: Any) -> list[Any]:
    """A repeated field's items; anything that is not a list has none."""
    return value if isinstance(value, list) else []


def json_number(value: Any) -> float | None:
    """The float of a JSON-mapped proto float, NaN for the non-finite spellings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    # Unhashable garbage (lists, dicts) must not reach the set lookup.
    if isinstance(value, str) and value in _NON_FINITE:
        return math.nan
    return None


def json_uint(value: Any, maximum: int) -> int | None:
    """A JSON-mapped unsigned integer; 64-bit ones arrive as decimal strings."""
    if isinstance(value, bool):
        return None
    # The length cap keeps int() clear of its 4300-digit limit, which raises.
    if isinstance(value, str) and len(value) <= 20 and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= maximum:
        return value
    return None


def shown(value: Any) -> str:
    """A value as an error message quotes it, short enough for any garbage."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class FieldChecker:
    """Checks of single JSON-mapped fields, each adding violations under a path.

    Every check that yields a value returns None when the value is unusable, so the
    caller can skip comparisons that would only repeat the error.
    """

    def __init__(self, violations: Violations, media: MediaContext) -> None:
        self.v = violations
        self.media = media

    def _unknown_keys(self, path: str, obj: Mapping[str, Any], allowed: frozenset[str]) -> None:
        for key in obj:
            if key not in allowed:
                self.v.add(f"{path}.{key}", UNSUPPORTED)

    def _object(self, path: str, value: Any) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.v.add(path, "must be an object")
        return None

    def _keyed(self, path: str, value: Any, allowed: frozenset[str]) -> dict[str, Any] | None:
        """The object at `path`, its keys other than `allowed` reported as unsupported;
        None (and a violation) when it is no object."""
        obj = self._object(path, value)
        if obj is not None:
            self._unknown_keys(path, obj, allowed)
        return obj

    def _bounded_list(self, path: str, value: Any, maximum: int, what: str) -> list[Any]:
        """The items worth checking: past the limit they would only repeat the error."""
        if not isinstance(value, list):
            self.v.add(path, "must be a list")
            return []
        if len(value) > maximum:
            self.v.add(path, f"must have at most {maximum} {what}, got {len(value)}")
            return value[:maximum]
        return value

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
        value = json_number(raw)
        if value is None:
            self.v.add(f"{path}.{key}", f"must be a number, got {shown(raw)}")
            return None
        if not math.isfinite(value):
            self.v.add(f"{path}.{key}", f"must be a finite number, got {shown(raw)}")
            return None
        if not 0.0 <= value <= 1.0:
            self.v.add(f"{path}.{key}", f"must be between 0 and 1, got {value:g}")
            return None
        return value

    def _unsigned(self, path: str, obj: Mapping[str, Any], key: str, maximum: int) -> int | None:
        raw = obj.get(key, 0)
        value = json_uint(raw, maximum)
        if value is None:
            self.v.add(f"{path}.{key}", f"must be an integer in 0..{maximum}, got {shown(raw)}")
        return value
