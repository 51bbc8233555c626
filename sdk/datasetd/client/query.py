"""The filter language of `bulk_delete_assets`, compiled into the server's input filters.

A filter is a JSON object (or its text) whose keys are field paths, all of which must hold:

* `status`: "annotated", "unannotated", "uploaded" (every input) or "error" (no input:
  datasetd stores an input only once it was read and checked, so none is ever in error);
* `metadata.annotations.total`: `0` or `{"$lt": 1}` (unannotated), `{"$gt": 0}` or
  `{"$gte": 1}` (annotated); other counts are not filters the server has;
* `metadata.<key>[.<key>...]`: the input metadata holds that value at that path (JSON
  containment, so objects match when they contain the given keys);
* `tags`: the input is labelled with that concept id;
* `media_type`: "image", "video", "audio" or "text".

A value is the value itself, `{"$eq": value}` or `{"$in": [values]}` (any of them; for
`metadata`, `tags` and `status` one server call per value, their union deleted). With
`strict_query=True` any other key, an unknown operator and an empty filter are refused;
without it a key of no known field reads as a metadata key (`{"camera": "a"}` is
`{"metadata.camera": "a"}`), so a lenient filter never deletes more than it says.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any

Criteria = dict[str, Any]
_STATUSES: dict[str, list[Criteria]] = {
    "annotated": [{"annotated": True}],
    "unannotated": [{"annotated": False}],
    "uploaded": [{}],
    "error": [],
}
_MEDIA_TYPES = ("image", "video", "audio", "text")
_TOTAL = "metadata.annotations.total"


def parse(filter_criteria: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if filter_criteria is None:
        return {}
    if isinstance(filter_criteria, str):
        try:
            parsed = json.loads(filter_criteria) if filter_criteria.strip() else {}
        except ValueError as error:
            raise ValueError(f"filter_criteria is not JSON: {error}") from None
    else:
        parsed = filter_criteria
    if not isinstance(parsed, Mapping):
        raise ValueError(f"filter_criteria must be a JSON object, not {parsed!r}")
    return dict(parsed)


def _values(key: str, value: Any) -> list[Any]:
    """The alternatives a value stands for: [value], or the list of `$in`."""
    if isinstance(value, Mapping) and any(str(k).startswith("$") for k in value):
        if len(value) != 1:
            raise ValueError(f"{key}: one operator per field, not {sorted(value)}")
        ((operator, operand),) = value.items()
        if operator == "$eq":
            return [operand]
        if operator == "$in":
            if not isinstance(operand, list) or not operand:
                raise ValueError(f"{key}: $in needs a non-empty list, not {operand!r}")
            return list(operand)
        raise ValueError(
            f"{key}: operator {operator} is not one of $eq, $in (or $gt, $lt on {_TOTAL})"
        )
    return [value]


def _total(value: Any) -> list[Criteria]:
    """`metadata.annotations.total` conditions: only zero or non-zero are server filters."""
    if isinstance(value, Mapping) and len(value) == 1:
        ((operator, operand),) = value.items()
        if (operator, operand) in (("$gt", 0), ("$gte", 1), ("$ne", 0)):
            return [{"annotated": True}]
        if (operator, operand) in (("$lt", 1), ("$lte", 0), ("$eq", 0)):
            return [{"annotated": False}]
    elif value == 0 and not isinstance(value, bool):
        return [{"annotated": False}]
    raise ValueError(
        f"{_TOTAL}: the server filters annotated or unannotated inputs only: use 0, "
        f'{{"$lt": 1}}, {{"$gt": 0}} or {{"$gte": 1}}, not {value!r}'
    )


def _nested(path: list[str], value: Any) -> dict[str, Any]:
    for key in reversed(path):
        value = {key: value}
    result: dict[str, Any] = value
    return result


def _field(key: str, value: Any, strict: bool) -> list[Criteria]:
    """The alternatives one field allows."""
    if key == _TOTAL:
        return _total(value)
    if key == "status":
        alternatives: list[Criteria] = []
        for status in _values(key, value):
            if status not in _STATUSES:
                raise ValueError(f"status {status!r} is not one of {', '.join(_STATUSES)}")
            alternatives += _STATUSES[status]
        return alternatives
    if key == "tags":
        tags = _values(key, value)
        if not all(isinstance(tag, str) and tag for tag in tags):
            raise ValueError(f"tags: concept ids are non-empty strings, not {value!r}")
        return [{"concepts": [tag]} for tag in tags]
    if key == "media_type":
        kinds = _values(key, value)
        unknown = [kind for kind in kinds if kind not in _MEDIA_TYPES]
        if unknown:
            raise ValueError(f"media_type {unknown[0]!r} is not one of {', '.join(_MEDIA_TYPES)}")
        return [{"media_types": kinds}]
    path = key.split(".")
    if path[0] == "metadata" and len(path) > 1 and all(path[1:]):
        return [{"metadata": _nested(path[1:], v)} for v in _values(key, value)]
    if strict:
        raise ValueError(
            f"unknown filter field {key!r}; fields: status, tags, media_type, {_TOTAL}, "
            "metadata.<key> (strict_query=False reads other keys as metadata keys)"
        )
    return _field(f"metadata.{key}", value, strict)


def _merge(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {**a, **{k: _merge(a[k], v) if k in a else v for k, v in b.items()}}
    if a != b:
        raise _Contradiction
    return a


class _Contradiction(Exception):
    """Two conditions no input meets together (a metadata key with two values)."""


def _combine(parts: tuple[Criteria, ...]) -> Criteria | None:
    combined: Criteria = {}
    for part in parts:
        for key, value in part.items():
            if key == "concepts":
                combined["concepts"] = [*combined.get("concepts", []), *value]
            elif key == "media_types" and key in combined:
                combined[key] = [k for k in combined[key] if k in value]
                if not combined[key]:
                    return None
            elif key in combined:
                try:
                    combined[key] = _merge(combined[key], value)
                except _Contradiction:
                    return None
            else:
                combined[key] = value
    return combined


MAX_CALLS = 100


def compile_filter(filter_criteria: str | Mapping[str, Any] | None, strict: bool) -> list[Criteria]:
    """The server filters (as `service.client`'s criteria) whose union the filter means;
    [] when no input can match. ValueError says what is wrong."""
    parsed = parse(filter_criteria)
    if strict and not parsed:
        raise ValueError(
            "strict_query=True refuses an empty filter, which would match every asset; "
            'give one, or {"status": "uploaded"} to delete them all'
        )
    per_field = [_field(str(key), value, strict) for key, value in parsed.items()]
    combinations = 1
    for alternatives in per_field:
        combinations *= len(alternatives)
    if combinations > MAX_CALLS:
        raise ValueError(f"the filter needs {combinations} server calls, more than {MAX_CALLS}")
    result: list[Criteria] = []
    for parts in itertools.product(*per_field):
        combined = _combine(parts)
        if combined is not None and combined not in result:
            result.append(combined)
    return result
