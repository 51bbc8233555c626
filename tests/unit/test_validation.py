from __future__ import annotations

from typing import Any

import pytest

from service.domain.errors import InvalidArgument, Violations
from service.domain.validation import (
    METADATA_MAX_BYTES,
    check_id,
    check_metadata,
    check_request_id,
    json_depth,
)


def problems(check: Any, *args: Any) -> dict[str, str]:
    violations = Violations()
    check(violations, *args)
    return {v.field: v.description for v in violations.items}


@pytest.mark.parametrize("good", ["a", "A-z_09", "x" * 64])
def test_valid_ids(good: str) -> None:
    assert problems(check_id, "id", good) == {}


@pytest.mark.parametrize("bad", ["", "x" * 65, "a b", "ä", "a.b", "a/b", "a\x00"])
def test_invalid_ids_name_the_field_and_the_rule(bad: str) -> None:
    found = problems(check_id, "dataset.id", bad)
    assert "[A-Za-z0-9_-]" in found["dataset.id"]


def test_optional_id_may_be_empty() -> None:
    violations = Violations()
    check_id(violations, "id", "", required=False)
    assert not violations.items


def test_request_id_rules() -> None:
    assert problems(check_request_id, "retry:2024-01-01.a_b") == {}
    assert "request_id" in problems(check_request_id, "has space")
    assert "request_id" in problems(check_request_id, "x" * 129)


def test_depth() -> None:
    assert json_depth(1) == 0
    assert json_depth({}) == 1
    assert json_depth({"a": [{"b": 1}]}) == 3


def test_metadata_limits() -> None:
    assert problems(check_metadata, "m", {"a": 1}) == {}
    assert "JSON object" in problems(check_metadata, "m", [1])["m"]
    too_big = {"a": "x" * METADATA_MAX_BYTES}
    assert "bytes" in problems(check_metadata, "m", too_big)["m"]
    nested: dict[str, Any] = {}
    for _ in range(9):
        nested = {"n": nested}
    assert "depth" in problems(check_metadata, "m", nested)["m"]
    assert "NUL" in problems(check_metadata, "m", {"a": "x\x00"})["m"]


def test_violations_collects_all_problems() -> None:
    violations = Violations()
    violations.add("a", "bad")
    violations.add("b", "worse")
    with pytest.raises(InvalidArgument) as raised:
        violations.raise_if_any()
    assert [v.field for v in raised.value.violations] == ["a", "b"]
    assert "a: bad" in raised.value.message and "b: worse" in raised.value.message
