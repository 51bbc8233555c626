"""The concept-stratified split: exact quotas, determinism, strata, ratios."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain.splits import StratifiedSplit

Member = tuple[str, frozenset[str]]


def members(sizes: dict[str, int]) -> list[Member]:
    """`sizes[c]` inputs labelled with concept c alone ("" = unlabeled), interleaved."""
    found: list[Member] = []
    for concept, size in sizes.items():
        found += [(f"{concept}-{n}", frozenset({concept} - {""})) for n in range(size)]
    return sorted(found, key=lambda m: m[0][::-1])


def split(
    items: list[Member], ratios: dict[str, float], seed: int
) -> tuple[dict[str, str], dict[str, list[int]]]:
    splitter = StratifiedSplit(ratios, seed)
    for _, labels in items:
        splitter.count_labels(labels)
    for _, labels in items:
        splitter.count_stratum(labels)
    quotas = splitter.plan()
    return {input_id: splitter.assign(input_id, labels) for input_id, labels in items}, quotas


def test_same_seed_same_assignment_other_seed_another() -> None:
    items = members({"a": 40, "b": 20, "": 10})
    ratios = {"train": 0.8, "test": 0.2}
    first, _ = split(items, ratios, 1)
    assert split(items, ratios, 1)[0] == first
    assert split(items, ratios, 2)[0] != first


def test_each_stratum_meets_its_quotas_and_totals_follow_the_ratios() -> None:
    sizes = {"a": 40, "b": 20, "c": 5, "": 10}
    assigned, quotas = split(members(sizes), {"train": 0.8, "test": 0.2}, 3)
    assert quotas == {"": [2, 8], "a": [8, 32], "b": [4, 16], "c": [1, 4]}
    for concept, (test, train) in quotas.items():
        placed = Counter(s for i, s in assigned.items() if i.startswith(f"{concept or ''}-"))
        if concept:
            assert placed == {"train": train, "test": test}
    assert Counter(assigned.values()) == {"train": 60, "test": 15}


def test_small_strata_reach_every_split() -> None:
    assigned, quotas = split(members({"a": 2, "b": 3, "c": 1}), {"train": 0.9, "val": 0.1}, 0)
    assert quotas["a"] == [1, 1] and quotas["b"] == [2, 1] and sum(quotas["c"]) == 1
    assert {assigned["a-0"], assigned["a-1"]} == {"train", "val"}


def test_stratum_is_the_rarest_concept() -> None:
    items: list[Member] = [(f"common-{n}", frozenset({"common"})) for n in range(10)]
    items += [(f"both-{n}", frozenset({"common", "rare"})) for n in range(4)]
    _, quotas = split(items, {"a": 0.5, "b": 0.5}, 0)
    assert quotas == {"common": [5, 5], "rare": [2, 2]}


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=6),
    weights=st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=4),
    seed=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_quotas_are_met_exactly_and_totals_stay_near_the_ratios(
    sizes: list[int], weights: list[int], seed: int
) -> None:
    ratios = {f"s{i}": w / sum(weights) for i, w in enumerate(weights)}
    items = members({f"c{i}": size for i, size in enumerate(sizes)})
    assigned, quotas = split(items, ratios, seed)
    names = sorted(ratios)
    expected: Counter[str] = Counter()
    for places in quotas.values():
        expected.update(dict(zip(names, places, strict=True)))
    assert Counter(assigned.values()) == +expected
    big_enough = all(size * min(ratios.values()) >= 2 or size == 0 for size in sizes)
    for name, ratio in ratios.items():
        # Within rounding; strata too small for every split can pull the totals away.
        if big_enough:
            assert abs(expected[name] - len(items) * ratio) <= 1.0 + 1e-9
