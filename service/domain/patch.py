"""JSON patch semantics of the MERGE, OVERWRITE and REMOVE actions.

The same rules apply to every patchable JSON value (dataset metadata today,
input and annotation metadata later), so they live here once.
"""

from __future__ import annotations

import copy
import enum
from typing import Any

from service.domain.errors import InvalidArgument, Violations


class PatchAction(enum.Enum):
    MERGE = "merge"
    OVERWRITE = "overwrite"
    REMOVE = "remove"


def _is_id_keyed(items: list[Any]) -> bool:
    return bool(items) and all(
        isinstance(item, dict) and isinstance(item.get("id"), str) for item in items
    )


def merge_json(base: Any, patch: Any) -> Any:
    """Deep merge: objects key by key; id-keyed lists item by id; other lists appended."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = merge_json(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list):
        if _is_id_keyed(base) and _is_id_keyed(patch):
            result = list(base)
            position = {item["id"]: i for i, item in enumerate(result)}
            for item in patch:
                if item["id"] in position:
                    index = position[item["id"]]
                    result[index] = merge_json(result[index], item)
                else:
                    position[item["id"]] = len(result)
                    result.append(copy.deepcopy(item))
            return result
        return [*base, *copy.deepcopy(patch)]
    return copy.deepcopy(patch)


def remove_json(base: dict[str, Any], patch: dict[str, Any], path: str) -> dict[str, Any]:
    """Delete keys given as `true`; recurse into objects; drop list items by id.

    Anything else in the patch is a caller's mistake and names its path, because
    silently ignoring it would leave data the caller believes is gone.
    """
    result = dict(base)
    for key, value in patch.items():
        where = f"{path}.{key}"
        if value is True:
            result.pop(key, None)
        elif isinstance(value, dict):
            current = result.get(key)
            if isinstance(current, dict):
                result[key] = remove_json(current, value, where)
        elif isinstance(value, list):
            ids = _ids_to_remove(value, where)
            current = result.get(key)
            if isinstance(current, list):
                result[key] = [
                    item
                    for item in current
                    if not (isinstance(item, dict) and item.get("id") in ids)
                ]
        else:
            raise InvalidArgument.field(
                where,
                "REMOVE takes `true` to delete a key, an object to recurse into, or a list of "
                f'{{"id": ...}} items to delete by id; got {value!r}',
            )
    return result


def _ids_to_remove(items: list[Any], path: str) -> set[str]:
    ids: set[str] = set()
    for index, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            ids.add(item["id"])
        elif isinstance(item, str):
            ids.add(item)
        else:
            raise InvalidArgument.field(
                f"{path}[{index}]", 'REMOVE of list items takes {"id": "..."} objects or id strings'
            )
    return ids


def apply_json(action: PatchAction, base: dict[str, Any], patch: dict[str, Any], path: str) -> Any:
    if action is PatchAction.MERGE:
        return merge_json(base, patch)
    if action is PatchAction.OVERWRITE:
        return copy.deepcopy(patch)
    return remove_json(base, patch, path)


class UpdateMask:
    """The fields an update names in its mask or, with an empty mask, those the caller
    set; a path outside `allowed` is a violation naming its index."""

    def __init__(
        self,
        paths: list[str],
        allowed: tuple[str, ...],
        violations: Violations,
        *,
        adjective: str = "patchable",
    ) -> None:
        self.paths = paths
        for index, path in enumerate(paths):
            if path not in allowed:
                violations.add(
                    f"update_mask.paths[{index}]",
                    f"{path!r} is not {adjective}; allowed: {', '.join(allowed)}",
                )

    def given(self, name: str, is_set: bool) -> bool:
        """Whether the update changes `name` (`is_set`: the caller set it)."""
        return name in self.paths if self.paths else is_set
