"""Patch semantics of MERGE, OVERWRITE and REMOVE on JSON values."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.domain.errors import InvalidArgument
from service.domain.patch import PatchAction, apply_json, merge_json, remove_json

json_scalars = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=5)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=10,
)
json_objects = st.dictionaries(st.text(max_size=3), json_values, max_size=4)


def test_merge_objects_recursively_and_replaces_scalars() -> None:
    base = {"a": {"x": 1, "y": {"deep": 1}}, "s": "old", "n": 1}
    patch = {"a": {"y": {"other": 2}, "z": 3}, "s": "new", "added": [1]}
    assert merge_json(base, patch) == {
        "a": {"x": 1, "y": {"deep": 1, "other": 2}, "z": 3},
        "s": "new",
        "n": 1,
        "added": [1],
    }


def test_merge_id_keyed_lists_by_id_and_appends_other_lists() -> None:
    base = {"people": [{"id": "a", "age": 1}, {"id": "b"}], "tags": ["x"]}
    patch = {"people": [{"id": "b", "age": 2}, {"id": "c"}], "tags": ["x", "y"]}
    assert merge_json(base, patch) == {
        "people": [{"id": "a", "age": 1}, {"id": "b", "age": 2}, {"id": "c"}],
        "tags": ["x", "x", "y"],
    }


def test_merge_mixed_lists_are_appended() -> None:
    assert merge_json([{"id": "a"}], [{"name": "no id"}]) == [{"id": "a"}, {"name": "no id"}]


def test_merge_type_change_replaces() -> None:
    assert merge_json({"a": {"x": 1}}, {"a": [1]}) == {"a": [1]}
    assert merge_json({"a": [1]}, {"a": {"x": 1}}) == {"a": {"x": 1}}


def test_merge_does_not_alias_the_patch() -> None:
    patch: dict[str, Any] = {"new": {"inner": [1]}}
    merged = merge_json({}, patch)
    patch["new"]["inner"].append(2)
    assert merged == {"new": {"inner": [1]}}


def test_remove_keys_nested_keys_and_items_by_id() -> None:
    base = {"a": {"x": 1, "y": 2}, "b": 1, "items": [{"id": "1"}, {"id": "2"}, "plain"]}
    patch = {"a": {"x": True}, "b": True, "items": [{"id": "2"}, "1"], "missing": True}
    assert remove_json(base, patch, "m") == {"a": {"y": 2}, "items": ["plain"]}


@pytest.mark.parametrize("bad", [{"a": False}, {"a": 3}, {"a": "x"}, {"a": [5]}])
def test_remove_rejects_values_it_cannot_apply(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument) as raised:
        remove_json({"a": 1}, bad, "dataset.metadata")
    assert raised.value.violations[0].field.startswith("dataset.metadata.a")


def test_overwrite_replaces_whole_value() -> None:
    assert apply_json(PatchAction.OVERWRITE, {"a": 1}, {"b": 2}, "m") == {"b": 2}


@given(json_objects)
def test_merge_with_empty_is_identity(value: dict[str, Any]) -> None:
    assert merge_json(value, {}) == value
    assert merge_json({}, value) == value


@given(json_objects, json_objects)
def test_merge_keeps_every_key_and_patch_scalars_win(
    base: dict[str, Any], patch: dict[str, Any]
) -> None:
    merged = merge_json(base, patch)
    assert set(merged) == set(base) | set(patch)
    for key, value in patch.items():
        if not isinstance(value, dict | list):
            assert merged[key] == value


@given(json_objects)
def test_removing_every_key_leaves_nothing(value: dict[str, Any]) -> None:
    assert remove_json(value, dict.fromkeys(value, True), "m") == {}
