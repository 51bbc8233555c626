"""FindDuplicates' grouping (exact groups first, union-find over similar pairs) and the
add-by-search job's stored query, against references written out by hand."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from service.domain.embeddings import (
    DuplicateGroup,
    EmbeddingModel,
    EmbeddingSource,
    GeoBox,
    GeoRadius,
    Ranking,
    SearchFilter,
    SearchSpec,
)
from service.domain.errors import FailedPrecondition, InvalidArgument
from service.domain.models import MediaType, Principal
from service.domain.search_jobs import (
    MAX_NEAR_DUPLICATE_SCOPE,
    SearchJobService,
    duplicate_groups,
    query_from_json,
    query_to_json,
)


def test_pairs_chain_into_one_group_with_its_lowest_similarity() -> None:
    order = {name: seq for seq, name in enumerate("abcdefgh")}
    pairs = [("c", "b", 0.97), ("b", "a", 0.99), ("e", "f", 0.96)]
    groups = duplicate_groups([], pairs, order)
    assert groups == [
        DuplicateGroup(("a", "b", "c"), False, 0.97),
        DuplicateGroup(("e", "f"), False, 0.96),
    ]


def test_exact_groups_come_first_and_stand_for_their_kept_copy_in_near_groups() -> None:
    order = {name: seq for seq, name in enumerate("abcdefgh")}
    exact = [DuplicateGroup(("h", "g"), True, 1.0), DuplicateGroup(("d", "c"), True, 1.0)]
    # "d" is a copy of "c" (kept): its pair with "a" joins "c" to a's group; "h" is a copy
    # of "g" and its pair with "g" itself is no near pair.
    pairs = [("a", "d", 0.99), ("a", "b", 0.98), ("h", "f", 0.97), ("e", "f", 0.96)]
    pairs.append(("g", "h", 0.999))
    groups = duplicate_groups(exact, pairs, order)
    assert groups == [
        DuplicateGroup(("c", "d"), True, 1.0),
        DuplicateGroup(("g", "h"), True, 1.0),
        DuplicateGroup(("a", "b", "c"), False, 0.98),
        DuplicateGroup(("e", "f", "g"), False, 0.96),
    ]


def test_groups_match_connected_components_of_random_graphs() -> None:
    rng = random.Random(7)
    for _ in range(50):
        names = [f"i{n:02d}" for n in range(30)]
        order = {name: n for n, name in enumerate(names)}
        pairs = []
        for _ in range(rng.randrange(0, 40)):
            a, b = rng.sample(names, 2)
            pairs.append((a, b, round(rng.uniform(0.9, 1.0), 3)))
        # Reference: grow components by repeated merging.
        components: list[set[str]] = []
        for a, b, _ in pairs:
            touching = [c for c in components if a in c or b in c]
            merged = {a, b}.union(*touching)
            components = [c for c in components if c not in touching] + [merged]
        groups = duplicate_groups([], pairs, order)
        assert {frozenset(g.input_ids) for g in groups} == {frozenset(c) for c in components}
        assert len(groups) == len(components)
        for group in groups:
            assert list(group.input_ids) == sorted(group.input_ids, key=order.__getitem__)
            inside = [s for a, _, s in pairs if a in group.input_ids]
            assert group.min_similarity == min(inside)
        firsts = [order[g.input_ids[0]] for g in groups]
        assert firsts == sorted(firsts)
        seen = [i for g in groups for i in g.input_ids]
        assert len(seen) == len(set(seen))


def test_a_single_exact_id_repeated_is_no_group() -> None:
    assert duplicate_groups([DuplicateGroup(("a", "a"), True, 1.0)], []) == []


def test_stored_query_round_trips() -> None:
    model = EmbeddingModel(
        "", "datasetd-image-v1", 1, 3, frozenset({MediaType.IMAGE}), False, EmbeddingSource.BUILTIN
    )
    when = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    for geo in (GeoRadius(1.5, -2.5, 10.0), GeoBox(-1.0, 1.0, -2.0, 2.0), None):
        query = SearchFilter(
            app_id="app",
            dataset_id="ds",
            version_id="v1",
            concept_ids=("cat",),
            negative_concept_ids=("dog",),
            metadata={"a": {"b": [1, 2]}},
            media_types=(MediaType.IMAGE, MediaType.TEXT),
            annotated=False,
            geo=geo,
            created_after=when,
            created_before=None,
        )
        ranking = Ranking(model, (0.25, -0.5, 1.0), 0.3, "in1")
        stored = query_to_json(query, ranking)
        back, rank = query_from_json("app", stored)
        assert back == query
        assert rank == {
            "model_id": "datasetd-image-v1",
            "vector": [0.25, -0.5, 1.0],
            "min_score": 0.3,
            "exclude_input_id": "in1",
        }
    assert query_from_json("app", query_to_json(SearchFilter("app"), None)) == (
        SearchFilter("app"),
        {},
    )


# --- FindDuplicates' rules, over in-memory repositories ------------------------------


class _Tx:
    @contextlib.asynccontextmanager
    async def read_transaction(self) -> AsyncIterator[None]:
        yield


class _Preparer:
    async def prepare(
        self, principal: Principal, app_id: str, spec: SearchSpec, *, field: str = "query"
    ) -> tuple[SearchFilter, Ranking | None]:
        return spec.filter, None


@dataclass
class _Search:
    size: int
    pairs_asked: list[tuple[str, float, tuple[MediaType, ...]]] = field(default_factory=list)

    async def exact_duplicates(self, query: SearchFilter) -> list[DuplicateGroup]:
        return []

    async def count(self, query: SearchFilter, ranking: Ranking | None) -> int:
        return self.size

    async def matching_ids(
        self, query: SearchFilter, ranking: Ranking | None, after_seq: int | None, limit: int
    ) -> list[tuple[int, str]]:
        return [(n, f"i{n}") for n in range(min(limit, self.size))]

    async def similar_pairs(
        self, query: SearchFilter, model: EmbeddingModel, threshold: float, neighbours: int
    ) -> tuple[list[tuple[str, str, float]], int, int]:
        self.pairs_asked.append((model.id, threshold, query.media_types))
        return [], self.size, 1


def _model(model_id: str, media: MediaType, source: EmbeddingSource) -> EmbeddingModel:
    return EmbeddingModel("", model_id, 1, 8, frozenset({media}), False, source)


class _Models:
    async def models(self, app_id: str) -> list[EmbeddingModel]:
        return [
            _model("onnx", MediaType.IMAGE, EmbeddingSource.ONNX),
            _model("datasetd-image-v1", MediaType.IMAGE, EmbeddingSource.BUILTIN),
            _model("datasetd-text-v1", MediaType.TEXT, EmbeddingSource.BUILTIN),
        ]

    async def model(self, app_id: str, model_id: str) -> EmbeddingModel | None:
        return next((m for m in await self.models(app_id) if m.id == model_id), None)


def _service(search: _Search) -> SearchJobService:
    return SearchJobService(
        _Preparer(),
        search,  # type: ignore[arg-type]
        _Models(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        _Tx(),  # type: ignore[arg-type]
    )


PRINCIPAL = Principal("test", "app", frozenset({"read", "write"}))


async def test_near_duplicates_run_both_built_in_models_at_the_default_threshold() -> None:
    search = _Search(size=5)
    found = await _service(search).duplicates(
        PRINCIPAL, "app", "ds", "", threshold=0, model_id="", exact_only=False
    )
    assert search.pairs_asked == [
        ("datasetd-image-v1", 0.95, (MediaType.IMAGE,)),
        ("datasetd-text-v1", 0.95, (MediaType.TEXT,)),
    ]
    assert (found.scanned, found.not_embedded) == (5, 2)
    search = _Search(size=5)
    await _service(search).duplicates(
        PRINCIPAL, "app", "ds", "", threshold=0.7, model_id="onnx", exact_only=False
    )
    assert search.pairs_asked == [("onnx", 0.7, (MediaType.IMAGE,))]


async def test_near_duplicates_refuse_a_scope_above_the_limit() -> None:
    service = _service(_Search(size=MAX_NEAR_DUPLICATE_SCOPE + 1))
    with pytest.raises(FailedPrecondition, match="exact_only"):
        await service.duplicates(
            PRINCIPAL, "app", "ds", "", threshold=0, model_id="", exact_only=False
        )
    only = await service.duplicates(
        PRINCIPAL, "app", "ds", "", threshold=0, model_id="", exact_only=True
    )
    assert only.scanned == MAX_NEAR_DUPLICATE_SCOPE + 1


@pytest.mark.parametrize("threshold", [0.49, 1.01, -0.5])
async def test_thresholds_outside_half_to_one_are_refused(threshold: float) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await _service(_Search(size=1)).duplicates(
            PRINCIPAL, "app", "ds", "", threshold=threshold, model_id="", exact_only=False
        )
    assert [v.field for v in refused.value.violations] == ["threshold"]
