"""The search query's rules: the mapping of a SearchQuery (wire), the checks needing no
database, and SearchService.prepare against in-memory fakes of its ports."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from datasetd.v1 import common_pb2, search_pb2

from service.domain import search as search_module
from service.domain.embeddings import (
    EmbeddingModel,
    EmbeddingSource,
    EmbeddingState,
    GeoBox,
    GeoRadius,
    InputEmbedding,
    ModelSpec,
    RankSpec,
    SearchFilter,
    SearchSpec,
)
from service.domain.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Violations,
)
from service.domain.input_drafts import DraftEmbedding, check_embeddings
from service.domain.models import DatasetVersion, Input, MediaType, Principal, VersionStatus
from service.domain.search import SearchService, check_filter, check_rank
from service.wire.search import search_spec_from_proto

APP = "app"
READER = Principal("k", APP, frozenset({"read"}))
IMAGES = EmbeddingModel(
    "", "builtin-image", 1, 4, frozenset({MediaType.IMAGE}), False, EmbeddingSource.BUILTIN
)
TEXTS = EmbeddingModel(
    "", "builtin-text", 2, 3, frozenset({MediaType.TEXT}), True, EmbeddingSource.BUILTIN
)
CLIENT = EmbeddingModel(APP, "mine", 3, 2, frozenset(), False, EmbeddingSource.CLIENT)


def fields(error: DomainError) -> set[str]:
    return {v.field for v in error.violations}


# --- wire ------------------------------------------------------------------------------------


def test_every_field_of_a_query_is_mapped() -> None:
    query = search_pb2.SearchQuery(
        scope=search_pb2.SearchScope(dataset_id="d", version_id="v"),
        concept_ids=["cat"],
        negative_concept_ids=["dog"],
        media_types=[common_pb2.MEDIA_TYPE_IMAGE, common_pb2.MEDIA_TYPE_TEXT],
        annotation_state=common_pb2.ANNOTATION_STATE_UNANNOTATED,
        geo_radius=search_pb2.GeoRadius(latitude=1.5, longitude=2.5, radius_km=3),
        rank=search_pb2.Rank(
            vector=search_pb2.QueryVector(values=[1, 2]), model_id="mine", min_score=0.5
        ),
    )
    query.metadata.update({"a": {"b": 1}})
    query.created_after.FromDatetime(datetime(2026, 1, 1))
    query.created_before.FromDatetime(datetime(2026, 2, 1))
    spec = search_spec_from_proto(APP, query, "query")
    assert spec.filter == SearchFilter(
        app_id=APP,
        dataset_id="d",
        version_id="v",
        concept_ids=("cat",),
        negative_concept_ids=("dog",),
        metadata={"a": {"b": 1.0}},
        media_types=(MediaType.IMAGE, MediaType.TEXT),
        annotated=False,
        geo=GeoRadius(1.5, 2.5, 3.0),
        created_after=datetime(2026, 1, 1, tzinfo=UTC),
        created_before=datetime(2026, 2, 1, tzinfo=UTC),
    )
    assert spec.rank == RankSpec(vector=(1.0, 2.0), model_id="mine", min_score=0.5)


def test_wire_refuses_what_cannot_be_mapped_at_once() -> None:
    query = search_pb2.SearchQuery(
        media_types=[common_pb2.MEDIA_TYPE_UNSPECIFIED],
        geo_radius=search_pb2.GeoRadius(latitude=1, longitude=1, radius_km=1),
        geo_box=search_pb2.GeoBox(max_latitude=1, max_longitude=1),
        rank=search_pb2.Rank(model_id="m"),
    )
    with pytest.raises(InvalidArgument) as raised:
        search_spec_from_proto(APP, query, "search")
    assert fields(raised.value) == {"search.media_types[0]", "search.geo_box", "search.rank"}


def test_box_and_empty_query() -> None:
    box = search_pb2.GeoBox(min_latitude=-1, max_latitude=1, min_longitude=-2, max_longitude=2)
    spec = search_spec_from_proto(APP, search_pb2.SearchQuery(geo_box=box), "query")
    assert spec.filter.geo == GeoBox(-1, 1, -2, 2)
    assert search_spec_from_proto(APP, search_pb2.SearchQuery(), "query") == SearchSpec(
        SearchFilter(app_id=APP)
    )


# --- pure rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (SearchFilter(APP, geo=GeoRadius(91, 0, 1)), "q.geo_radius.latitude"),
        (SearchFilter(APP, geo=GeoRadius(0, -181, 1)), "q.geo_radius.longitude"),
        (SearchFilter(APP, geo=GeoRadius(0, 0, 0)), "q.geo_radius.radius_km"),
        (SearchFilter(APP, geo=GeoRadius(0, 0, -5)), "q.geo_radius.radius_km"),
        (SearchFilter(APP, geo=GeoRadius(0, 0, 20_039)), "q.geo_radius.radius_km"),
        (SearchFilter(APP, geo=GeoBox(2, 1, 0, 1)), "q.geo_box.min_latitude"),
        (SearchFilter(APP, geo=GeoBox(0, 1, 5, 1)), "q.geo_box.min_longitude"),
        (SearchFilter(APP, geo=GeoBox(-91, 1, 0, 1)), "q.geo_box.min_latitude"),
        (SearchFilter(APP, metadata=cast(Any, [1])), "q.metadata"),
        (SearchFilter(APP, concept_ids=("",)), "q.concept_ids[0]"),
        (SearchFilter(APP, negative_concept_ids=("x",) * 101), "q.negative_concept_ids"),
        (SearchFilter(APP, version_id="v"), "q.scope.version_id"),
        (SearchFilter(APP, dataset_id="bad id"), "q.scope.dataset_id"),
        (
            SearchFilter(
                APP,
                created_after=datetime(2026, 2, 1, tzinfo=UTC),
                created_before=datetime(2026, 1, 1, tzinfo=UTC),
            ),
            "q.created_before",
        ),
    ],
)
def test_filter_rules(query: SearchFilter, field: str) -> None:
    violations = Violations()
    check_filter(violations, "q", query)
    assert field in {v.field for v in violations.items}


def test_a_good_filter_passes() -> None:
    violations = Violations()
    query = SearchFilter(
        APP,
        dataset_id="d",
        version_id="v",
        concept_ids=("a",),
        metadata={"k": "v"},
        geo=GeoRadius(-90, 180, 20_038),
    )
    check_filter(violations, "q", query)
    assert violations.items == []


@pytest.mark.parametrize(
    ("rank", "field"),
    [
        (RankSpec(), "r"),
        (RankSpec(input_id="a", text="b"), "r"),
        (RankSpec(vector=(1.0,)), "r.model_id"),
        (RankSpec(vector=(math.nan,), model_id="m"), "r.vector.values"),
        (RankSpec(vector=(math.inf, 1.0), model_id="m"), "r.vector.values"),
        (RankSpec(vector=(), model_id="m"), "r.vector.values"),
        (RankSpec(vector=(0.0, 0.0), model_id="m"), "r.vector.values"),
        (RankSpec(text=""), "r.text"),
        (RankSpec(text="x" * 4097), "r.text"),
        (RankSpec(image=b""), "r.image_bytes"),
        (RankSpec(input_id="no good"), "r.input_id"),
        (RankSpec(input_id="a", model_id="bad/model"), "r.model_id"),
        (RankSpec(input_id="a", min_score=1.5), "r.min_score"),
        (RankSpec(input_id="a", min_score=-1.01), "r.min_score"),
    ],
)
def test_rank_rules(rank: RankSpec, field: str) -> None:
    violations = Violations()
    check_rank(violations, "r", rank)
    assert field in {v.field for v in violations.items}


def test_client_embedding_rules() -> None:
    violations = Violations()
    given = [
        DraftEmbedding("ok", (1.0, 2.0), 2),
        DraftEmbedding("ok", (1.0,)),
        DraftEmbedding("", (1.0,)),
        DraftEmbedding("nan", (math.nan,)),
        DraftEmbedding("dims", (1.0, 2.0), 3),
        DraftEmbedding("long", (1.0,) * 1537),
        *(DraftEmbedding(f"m{i}", (1.0,)) for i in range(3)),
    ]
    check_embeddings(violations, "inputs[0].data.embeddings", given)
    assert {v.field for v in violations.items} == {
        "inputs[0].data.embeddings",
        "inputs[0].data.embeddings[1].model_id",
        "inputs[0].data.embeddings[2].model_id",
        "inputs[0].data.embeddings[3].vector",
        "inputs[0].data.embeddings[4].num_dimensions",
        "inputs[0].data.embeddings[5].vector",
    }


# --- prepare ---------------------------------------------------------------------------------


class FakeTx:
    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield

    @asynccontextmanager
    async def read_transaction(self) -> AsyncIterator[None]:
        yield

    def after_commit(self, hook: Callable[[], None]) -> None:
        hook()


class FakeEmbeddings:
    def __init__(self) -> None:
        self.vectors: dict[tuple[str, str], tuple[float, ...]] = {}
        # What the version "ready" captured.
        self.captured: dict[tuple[str, str], tuple[float, ...]] = {}
        self.states_of: dict[str, list[InputEmbedding]] = {}
        # Models made after the first read (a client's first vectors of a new model).
        self.added: list[EmbeddingModel] = []
        self.reads = 0

    async def models(self, app_id: str) -> list[EmbeddingModel]:
        self.reads += 1
        return [IMAGES, TEXTS, CLIENT, *self.added]

    async def vector_of(
        self,
        app_id: str,
        input_id: str,
        model: EmbeddingModel,
        version: tuple[str, str] | None = None,
    ) -> tuple[float, ...] | None:
        if version is not None:
            return self.captured.get((input_id, model.id))
        return self.vectors.get((input_id, model.id))

    async def states(self, app_id: str, input_id: str, *, vectors: bool) -> list[InputEmbedding]:
        return self.states_of.get(input_id, [])


class FakeRows:
    def __init__(self) -> None:
        self.inputs = {"img": Input(APP, "img", MediaType.IMAGE)}
        self.versions = {
            "ready": DatasetVersion(APP, "d", "ready", status=VersionStatus.READY),
            "building": DatasetVersion(APP, "d", "building", status=VersionStatus.IN_PROGRESS),
        }

    async def get_many(self, app_id: str, ids: list[str], *, lock: bool = False) -> list[Input]:
        return [self.inputs[i] for i in ids if i in self.inputs]

    async def live_datasets(
        self, app_id: str, dataset_ids: list[str], *, lock: bool = True
    ) -> set[str]:
        return set(dataset_ids) & {"d"}

    async def get(
        self, app_id: str, dataset_id: str, version_id: str, *, lock: bool = False
    ) -> DatasetVersion | None:
        return self.versions.get(version_id)


class FakeEmbedder:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def embed_images(self, images: Sequence[bytes]) -> list[list[float] | str]:
        return [[1.0, 0, 0, 0] if i.startswith(b"\x89PNG") else "not an image" for i in images]

    def embed_texts(self, texts: Sequence[str]) -> list[list[float] | str]:
        return [[0.0, 1.0, 0.0] for _ in texts]


def spec_of(model: EmbeddingModel) -> ModelSpec:
    return ModelSpec(
        model.id,
        model.dimension,
        model.media_types,
        model.accepts_text_queries,
        model.source,
        "",
        "f",
    )


@pytest.fixture
def service() -> SearchService:
    rows = FakeRows()
    return SearchService(
        embeddings=cast(Any, FakeEmbeddings()),
        repository=cast(Any, None),
        inputs=cast(Any, rows),
        members=cast(Any, rows),
        versions=cast(Any, rows),
        tx=FakeTx(),
        views=cast(Any, None),
        embedders={m.id: FakeEmbedder(spec_of(m)) for m in (IMAGES, TEXTS)},
    )


def spec(rank: RankSpec | None = None, **conditions: Any) -> SearchSpec:
    return SearchSpec(SearchFilter(APP, **conditions), rank)


async def test_prepare_resolves_each_kind_of_rank(service: SearchService) -> None:
    embeddings = cast(FakeEmbeddings, service.embeddings)
    embeddings.vectors[("img", IMAGES.id)] = (0.0, 0.0, 1.0, 0.0)
    _, by_input = await service.prepare(READER, APP, spec(RankSpec(input_id="img")))
    assert by_input is not None
    assert (by_input.model, by_input.vector, by_input.exclude_input_id) == (
        IMAGES,
        (0.0, 0.0, 1.0, 0.0),
        "img",
    )
    _, by_text = await service.prepare(READER, APP, spec(RankSpec(text="a cat")))
    assert by_text is not None and (by_text.model, by_text.vector) == (TEXTS, (0.0, 1.0, 0.0))
    _, by_image = await service.prepare(READER, APP, spec(RankSpec(image=b"\x89PNG..")))
    assert by_image is not None and by_image.model == IMAGES
    _, by_vector = await service.prepare(
        READER, APP, spec(RankSpec(vector=(1.0, 2.0), model_id="mine", min_score=0.2))
    )
    assert by_vector is not None
    assert (by_vector.model, by_vector.vector, by_vector.min_score) == (CLIENT, (1.0, 2.0), 0.2)
    query, none = await service.prepare(READER, APP, spec(dataset_id="d", version_id="ready"))
    assert none is None and query.version_id == "ready"


@pytest.mark.parametrize(
    ("given", "error", "field"),
    [
        (spec(dataset_id="nope"), NotFound, "query.scope.dataset_id"),
        (spec(dataset_id="d", version_id="nope"), NotFound, "query.scope.version_id"),
        (spec(dataset_id="d", version_id="building"), FailedPrecondition, "query.scope.version_id"),
        (spec(RankSpec(input_id="nope")), NotFound, "query.rank.input_id"),
        (spec(RankSpec(input_id="img")), FailedPrecondition, "query.rank.input_id"),
        (spec(RankSpec(vector=(1.0,), model_id="nope")), NotFound, "query.rank.model_id"),
        (
            spec(RankSpec(vector=(1.0,), model_id="mine")),
            InvalidArgument,
            "query.rank.vector.values",
        ),
        (spec(RankSpec(text="x", model_id="builtin-image")), InvalidArgument, "query.rank.text"),
        (spec(RankSpec(text="x", model_id="mine")), InvalidArgument, "query.rank.text"),
        (spec(RankSpec(image=b"GIF8")), InvalidArgument, "query.rank.image_bytes"),
        (
            spec(RankSpec(image=b"\x89PNG", model_id="builtin-text")),
            InvalidArgument,
            "query.rank.image_bytes",
        ),
    ],
)
async def test_prepare_refuses(
    service: SearchService, given: SearchSpec, error: type[DomainError], field: str
) -> None:
    with pytest.raises(error) as raised:
        await service.prepare(READER, APP, given)
    assert field in fields(raised.value)


async def test_an_input_still_embedding_names_its_state(service: SearchService) -> None:
    embeddings = cast(FakeEmbeddings, service.embeddings)
    embeddings.states_of["img"] = [InputEmbedding(IMAGES.id, EmbeddingState.PENDING)]
    with pytest.raises(FailedPrecondition) as raised:
        await service.prepare(READER, APP, spec(RankSpec(input_id="img")))
    assert "PENDING" in raised.value.message
    embeddings.states_of["img"] = [InputEmbedding(IMAGES.id, EmbeddingState.FAILED, "bad jpeg")]
    with pytest.raises(FailedPrecondition) as raised:
        await service.prepare(READER, APP, spec(RankSpec(input_id="img")))
    assert "FAILED" in raised.value.message and "bad jpeg" in raised.value.message


async def test_unknown_model_lists_the_known_ones(service: SearchService) -> None:
    with pytest.raises(NotFound) as raised:
        await service.prepare(READER, APP, spec(RankSpec(vector=(1.0,), model_id="clip")))
    assert "'clip'" in raised.value.message
    assert all(repr(m) in raised.value.message for m in ("builtin-image", "builtin-text", "mine"))


async def test_prepare_needs_read_access_to_the_app(service: SearchService) -> None:
    with pytest.raises(PermissionDenied):
        await service.prepare(Principal("k", "other", frozenset({"read"})), APP, spec())
    with pytest.raises(PermissionDenied):
        await service.prepare(Principal("k", APP, frozenset()), APP, spec())


async def test_a_version_ranks_by_the_vector_it_captured(service: SearchService) -> None:
    embeddings = cast(FakeEmbeddings, service.embeddings)
    embeddings.vectors[("img", IMAGES.id)] = (1.0, 0.0, 0.0, 0.0)
    embeddings.captured[("img", IMAGES.id)] = (0.0, 1.0, 0.0, 0.0)
    # An input deleted since the version: found through the version's vectors.
    embeddings.captured[("gone", TEXTS.id)] = (0.0, 0.0, 1.0)
    pinned = {"dataset_id": "d", "version_id": "ready"}
    _, ranking = await service.prepare(READER, APP, spec(RankSpec(input_id="img"), **pinned))
    assert ranking is not None and ranking.vector == (0.0, 1.0, 0.0, 0.0)
    _, ranking = await service.prepare(READER, APP, spec(RankSpec(input_id="gone"), **pinned))
    assert ranking is not None and (ranking.model, ranking.vector) == (TEXTS, (0.0, 0.0, 1.0))
    with pytest.raises(NotFound):
        await service.prepare(READER, APP, spec(RankSpec(input_id="gone")))


async def test_models_are_reused_and_a_new_one_is_found_at_once(
    service: SearchService, monkeypatch: pytest.MonkeyPatch
) -> None:
    embeddings = cast(FakeEmbeddings, service.embeddings)
    by_vector = spec(RankSpec(vector=(1.0, 2.0), model_id="mine"))
    for _ in range(3):
        await service.prepare(READER, APP, by_vector)
    assert embeddings.reads == 1
    # A model the app gained since: read again, found.
    fresh = EmbeddingModel(APP, "fresh", 4, 2, frozenset(), False, EmbeddingSource.CLIENT)
    embeddings.added.append(fresh)
    _, ranking = await service.prepare(
        READER, APP, spec(RankSpec(vector=(1.0, 2.0), model_id="fresh"))
    )
    assert ranking is not None and ranking.model == fresh
    assert embeddings.reads == 2
    # A model the app does not have: read again too, then refused.
    with pytest.raises(NotFound) as refused:
        await service.prepare(READER, APP, spec(RankSpec(vector=(1.0, 2.0), model_id="nope")))
    assert fields(refused.value) == {"query.rank.model_id"}
    assert embeddings.reads == 3
    # Once they are older than the cache's time, every search reads them.
    monkeypatch.setattr(search_module, "MODELS_CACHE_SECONDS", 0.0)
    await service.prepare(READER, APP, by_vector)
    await service.prepare(READER, APP, by_vector)
    assert embeddings.reads == 5
