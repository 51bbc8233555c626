"""Rules for identifiers, text fields and JSON metadata shared by every resource."""

from __future__ import annotations

import json
import re
from typing import Any

from service.domain.errors import InvalidArgument, Violations

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ID_RULE = "must be 1..64 characters of [A-Za-z0-9_-]"
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
REQUEST_ID_RULE = "must be 1..128 characters of [A-Za-z0-9_.:-]"
METADATA_MAX_BYTES = 64 * 1024
METADATA_MAX_DEPTH = 8
FILTER_MAX_CONCEPTS = 100
CONCEPT_ID_MAX_CHARS = 256


def check_id(violations: Violations, field: str, value: str, *, required: bool = True) -> None:
    if not value:
        if required:
            violations.add(field, f"is required and {ID_RULE}")
        return
    if not ID_PATTERN.match(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        violations.add(field, f"{ID_RULE}, got {shown!r} ({len(value)} characters)")


def check_request_id(violations: Violations, value: str) -> None:
    if value and not REQUEST_ID_PATTERN.match(value):
        violations.add("request_id", REQUEST_ID_RULE)


def check_text(violations: Violations, field: str, value: str, max_chars: int) -> None:
    if len(value) > max_chars:
        violations.add(field, f"must be at most {max_chars} characters, got {len(value)}")
    if "\x00" in value:
        violations.add(field, "must not contain NUL characters")


def check_concept_ids(violations: Violations, field: str, value: Any) -> None:
    """The concept ids of an input filter: a dataset's default filter or a query's."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        violations.add(field, "must be a list of concept ids")
        return
    if len(value) > FILTER_MAX_CONCEPTS:
        violations.add(field, f"must have at most {FILTER_MAX_CONCEPTS} ids, got {len(value)}")
    for index, concept in enumerate(value):
        if not 1 <= len(concept) <= CONCEPT_ID_MAX_CHARS:
            violations.add(f"{field}[{index}]", f"must be 1..{CONCEPT_ID_MAX_CHARS} characters")
        elif "\x00" in concept:
            # PostgreSQL text and jsonb reject NUL: the query would fail as INTERNAL.
            violations.add(f"{field}[{index}]", "must not contain NUL characters")


def json_depth(value: Any) -> int:
    """Nesting depth: a scalar is 0, `{}` is 1, `{"a": []}` is 2."""
    if isinstance(value, dict):
        return 1 + max((json_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((json_depth(v) for v in value), default=0)
    return 0


def check_metadata(violations: Violations, field: str, value: Any) -> None:
    if not isinstance(value, dict):
        violations.add(field, "must be a JSON object")
        return
    depth = json_depth(value)
    if depth > METADATA_MAX_DEPTH:
        violations.add(field, f"nesting depth must be at most {METADATA_MAX_DEPTH}, got {depth}")
        return
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    if size > METADATA_MAX_BYTES:
        violations.add(
            field, f"must be at most {METADATA_MAX_BYTES} bytes as JSON, got {size} bytes"
        )
    if "\\u0000" in json.dumps(value):
        violations.add(field, "must not contain NUL characters (PostgreSQL jsonb rejects them)")


def checked_ids(*fields: tuple[str, str]) -> Violations:
    """The violations of required ids, given as (field, value) pairs, for other checks to
    add to before raising."""
    violations = Violations()
    for field, value in fields:
        check_id(violations, field, value)
    return violations


def require_ids(*fields: tuple[str, str]) -> None:
    """Raises InvalidArgument naming every required id, of the (field, value) pairs, that
    is missing or malformed."""
    checked_ids(*fields).raise_if_any()


def check_batch_size(field: str, item: str, count: int, maximum: int, hint: str = "") -> None:
    """Refuses an empty batch, and one of more than `maximum` items (`hint` says what to
    do instead); `field` names the list, `item` one of its items."""
    if not count:
        raise InvalidArgument.field(field, f"must contain at least one {item}")
    if count > maximum:
        raise InvalidArgument.field(
            field,
            f"at most {maximum} {field} per call, got {count}{hint}",
            reason="BATCH_TOO_LARGE",
        )
