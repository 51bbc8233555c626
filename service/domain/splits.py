"""The deterministic, concept-stratified split of an export (export-formats.md §4).

The assignment is computed in three passes over the version in member order, holding
counters per concept and per stratum but nothing per input, so it works page by page:

1. count_labels(): how many inputs carry each positive concept.
2. count_stratum(): each input's stratum is its rarest positive concept (fewest inputs;
   ties go to the smallest concept id), or the unlabeled stratum when it has none.
   Rarest first is the usual choice for multi-label data: common concepts end up spread
   over the splits anyway, rare ones only if they are stratified on.
3. assign(): each stratum of n inputs has fixed quotas per split (below), and its inputs,
   in member order, draw their split by sequential selection sampling: with R inputs
   and q_j places of split j left, an input goes to split j with probability q_j / R,
   drawn from u = SHA-256(seed, stratum, input id) as a number in [0, 1). Every
   arrangement meeting the quotas is equally likely, the quotas are met exactly, and the
   same version, ratios and seed always give the same assignment.

Quotas: strata are taken in order of their key; each gets n * ratio places per split,
corrected by the rounding error carried over from the strata before it (so the totals
stay within rounding of the ratios), rounded by largest remainder. A stratum with at
least as many inputs as there are splits gets at least one input in every split, taken
from the split with the most places: every concept with enough inputs is present in
every split, even at the cost of the totals when there are many tiny strata.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping

# The stratum of inputs without any positive concept; no concept id is empty.
UNLABELED = ""
_UNIT = 2.0**64


class StratifiedSplit:
    def __init__(self, ratios: Mapping[str, float], seed: int) -> None:
        self.names = sorted(ratios)
        self._ratios = [ratios[name] for name in self.names]
        self._seed = seed
        self._concepts: Counter[str] = Counter()
        self._sizes: Counter[str] = Counter()
        # Per stratum: inputs still to assign, and places left per split.
        self._left: dict[str, tuple[int, list[int]]] = {}

    def count_labels(self, labels: frozenset[str]) -> None:
        self._concepts.update(labels)

    def count_stratum(self, labels: frozenset[str]) -> None:
        self._sizes[self._stratum(labels)] += 1

    def plan(self) -> dict[str, list[int]]:
        """Fixes the quotas once every input was counted; returns them per stratum."""
        errors = [0.0] * len(self.names)
        quotas: dict[str, list[int]] = {}
        for stratum in sorted(self._sizes):
            size = self._sizes[stratum]
            places = self._places(size, errors)
            errors = [
                error + count - size * ratio
                for error, count, ratio in zip(errors, places, self._ratios, strict=True)
            ]
            quotas[stratum] = places
            self._left[stratum] = (size, list(places))
        return quotas

    def assign(self, input_id: str, labels: frozenset[str]) -> str:
        stratum = self._stratum(labels)
        remaining, places = self._left[stratum]
        if remaining <= 0:
            raise RuntimeError(f"stratum {stratum!r} has more inputs than were counted")
        digest = hashlib.sha256(f"{self._seed}\0{stratum}\0{input_id}".encode()).digest()
        threshold = int.from_bytes(digest[:8], "big") / _UNIT * remaining
        chosen = len(places) - 1
        cumulative = 0
        for index, count in enumerate(places):
            cumulative += count
            if threshold < cumulative:
                chosen = index
                break
        places[chosen] -= 1
        self._left[stratum] = (remaining - 1, places)
        return self.names[chosen]

    def _stratum(self, labels: frozenset[str]) -> str:
        if not labels:
            return UNLABELED
        return min(labels, key=lambda concept: (self._concepts[concept], concept))

    def _places(self, size: int, errors: list[float]) -> list[int]:
        wanted = [max(size * r - e, 0.0) for r, e in zip(self._ratios, errors, strict=True)]
        total = sum(wanted)
        if total <= 0:
            wanted, total = [size * r for r in self._ratios], float(size)
        scaled = [w * size / total for w in wanted]
        places = [math.floor(s) for s in scaled]
        # Largest remainder; ties go to the larger ratio, then to the first name.
        order = sorted(
            range(len(places)), key=lambda j: (-(scaled[j] - places[j]), -self._ratios[j], j)
        )
        for index in order[: size - sum(places)]:
            places[index] += 1
        if size >= len(places):
            for index, count in enumerate(places):
                if count == 0:
                    donor = max(range(len(places)), key=lambda j: (places[j], -j))
                    places[donor] -= 1
                    places[index] += 1
        return places
