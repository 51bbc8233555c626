"""Which fields of a resource a create or an update gives."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from service.domain.errors import Violations


def given_fields(
    paths: Sequence[str] | None,
    updatable: Sequence[str],
    is_set: Mapping[str, bool],
    violations: Violations,
) -> set[str]:
    """Every one of `updatable` on a create (`paths` None); on an update, those its mask
    names (a path outside `updatable` is a violation of `update_mask.paths[i]`), or with an
    empty mask those `is_set` says carry a non-default value."""
    if paths is None:
        return set(updatable)
    if not paths:
        return {name for name, value in is_set.items() if value}
    for index, path in enumerate(paths):
        if path not in updatable:
            violations.add(
                f"update_mask.paths[{index}]",
                f"{path!r} cannot be updated; allowed: {', '.join(updatable)}",
            )
    return set(paths)
