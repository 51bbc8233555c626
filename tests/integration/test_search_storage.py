"""The search queries (storage/search.py) against the real PostgreSQL with pgvector:
every filter against a Python reference over the same random rows, ranked pages against
numpy, the HNSW path's recall and plan, and a version searched as it was captured."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import random
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from datasetd.v1 import data_pb2, input_pb2

from service.domain.embeddings import (
    EXACT_SCAN_LIMIT,
    EmbeddingModel,
    EmbeddingSource,
    GeoBox,
    GeoRadius,
    Ranking,
    SearchCursor,
    SearchFilter,
    SearchHit,
)
from service.domain.models import MediaType
from service.domain.search import FoundHit
from service.storage import search as search_module
from service.storage.db import Database, migrate
from service.storage.embeddings import PgEmbeddingRepository
from service.storage.inputs import PgInputRepository
from service.storage.search import (
    PgSearchRepository,
    nearest_settings,
    nearest_statement,
)
from tests.conftest import Stack

DIM = 8
# The documented earth radius (km), independent of the code under test.
EARTH_RADIUS_KM = 6371.0088
CONCEPTS = [f"c{n}" for n in range(6)]
COLORS = ["red", "green", "blue"]
CENTERS = [(48.85, 2.35), (40.71, -74.0), (-33.87, 151.2)]
BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)
MEDIA = [MediaType.IMAGE, MediaType.TEXT, MediaType.VIDEO, MediaType.AUDIO]


@dataclasses.dataclass
class Row:
    id: str
    seq: int
    media: MediaType
    metadata: dict[str, Any]
    geo: tuple[float, float] | None  # (latitude, longitude)
    created_at: datetime
    concepts: set[str]
    annotated: bool
    member: bool
    vector: np.ndarray | None


@dataclasses.dataclass
class World:
    app_id: str
    dataset_id: str
    model: EmbeddingModel
    rows: list[Row]


async def new_model(db: Database, app_id: str, dimension: int) -> EmbeddingModel:
    model_id = "m-" + secrets.token_hex(4)
    number = await db.fetchval(
        "INSERT INTO embedding_models (app_id, id, dimension, media_types, source)"
        " VALUES ($1, $2, $3, $4, 'client') RETURNING number",
        app_id,
        model_id,
        dimension,
        ["image", "text"],
    )
    return EmbeddingModel(
        app_id,
        model_id,
        number,
        dimension,
        frozenset({MediaType.IMAGE, MediaType.TEXT}),
        False,
        EmbeddingSource.CLIENT,
    )


async def put_vectors(
    db: Database, app_id: str, model: EmbeddingModel, ids: list[str], vectors: np.ndarray
) -> None:
    """Current vectors (a previous one of an input is kept, replaced)."""
    await PgEmbeddingRepository(db).put_many(
        model, [(app_id, i, [float(x) for x in v]) for i, v in zip(ids, vectors, strict=True)]
    )


def haversine(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    a = (
        math.sin(math.radians(lat1 - lat2) / 2) ** 2
        + math.cos(math.radians(lat2))
        * math.cos(math.radians(lat1))
        * math.sin(math.radians(lon1 - lon2) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def contains(value: Any, pattern: Any) -> bool:
    """jsonb @> for the objects and scalars these tests use."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(
            k in value and contains(value[k], v) for k, v in pattern.items()
        )
    return bool(value == pattern and type(value) is type(pattern))


def matches(row: Row, f: SearchFilter) -> bool:
    if f.dataset_id is not None and not row.member:
        return False
    if not set(f.concept_ids) <= row.concepts:
        return False
    if set(f.negative_concept_ids) & row.concepts:
        return False
    if f.metadata is not None and not contains(row.metadata, f.metadata):
        return False
    if f.media_types and row.media not in f.media_types:
        return False
    if f.annotated is not None and row.annotated != f.annotated:
        return False
    if isinstance(f.geo, GeoRadius):
        if (
            row.geo is None
            or haversine(*row.geo, f.geo.latitude, f.geo.longitude) > f.geo.radius_km
        ):
            return False
    elif isinstance(f.geo, GeoBox):
        if row.geo is None:
            return False
        lat, lon = row.geo
        if not (f.geo.min_latitude <= lat <= f.geo.max_latitude):
            return False
        if not (f.geo.min_longitude <= lon <= f.geo.max_longitude):
            return False
    if f.created_after is not None and row.created_at < f.created_after:
        return False
    return not (f.created_before is not None and row.created_at >= f.created_before)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


async def build_world(db: Database, rng: random.Random, count: int = 240) -> World:
    app_id = "app-" + secrets.token_hex(6)
    dataset_id = "ds-" + secrets.token_hex(3)
    await db.execute("INSERT INTO datasets (app_id, id) VALUES ($1, $2)", app_id, dataset_id)
    model = await new_model(db, app_id, DIM)
    nprng = np.random.default_rng(rng.randrange(1 << 30))
    rows: list[Row] = []
    for n in range(count):
        geo = None
        if rng.random() < 0.75:
            lat, lon = rng.choice(CENTERS)
            geo = (lat + rng.uniform(-3, 3), lon + rng.uniform(-3, 3))
        metadata: dict[str, Any] = {"color": rng.choice(COLORS), "n": rng.randrange(4)}
        if rng.random() < 0.5:
            metadata["tags"] = {"a": rng.random() < 0.5}
        rows.append(
            Row(
                id=f"in-{n:04d}",
                seq=0,
                media=rng.choice(MEDIA),
                metadata=metadata,
                geo=geo,
                created_at=BASE_TIME + timedelta(hours=rng.randrange(24 * 30)),
                concepts=set(),
                annotated=False,
                member=rng.random() < 0.5,
                vector=nprng.normal(size=DIM) if rng.random() < 0.8 else None,
            )
        )
    # A few exact copies of one vector: equal scores that the cursor must page through.
    twins = [r for r in rows if r.vector is not None][:6]
    for r in twins[1:]:
        r.vector = twins[0].vector
    await db.execute(
        "INSERT INTO inputs (app_id, id, media_type, metadata, latitude, longitude, created_at)"
        " SELECT $1, * FROM unnest($2::text[], $3::text[], $4::jsonb[], $5::float8[],"
        " $6::float8[], $7::timestamptz[])",
        app_id,
        [r.id for r in rows],
        [r.media.value for r in rows],
        [r.metadata for r in rows],
        [r.geo[0] if r.geo else None for r in rows],
        [r.geo[1] if r.geo else None for r in rows],
        [r.created_at for r in rows],
    )
    seqs = {
        rec["id"]: rec["seq"]
        for rec in await db.fetch("SELECT id, seq FROM inputs WHERE app_id = $1", app_id)
    }
    annotation_rows: list[tuple[str, str, bool, list[str]]] = []
    for r in rows:
        r.seq = seqs[r.id]
        for input_level in (True, False):
            if rng.random() < 0.45:
                concepts = rng.sample(CONCEPTS, rng.randrange(3))
                annotation_rows.append((secrets.token_hex(8), r.id, input_level, concepts))
                r.concepts |= set(concepts)
                r.annotated = True
    await db.execute(
        "INSERT INTO annotations (app_id, id, input_id, input_level, data, positive_concepts)"
        " SELECT $1, t.id, t.input_id, t.input_level, '{}'::jsonb,"
        " ARRAY(SELECT jsonb_array_elements_text(t.positive::jsonb))"
        " FROM unnest($2::text[], $3::text[], $4::boolean[], $5::text[])"
        " AS t(id, input_id, input_level, positive)",
        app_id,
        [a[0] for a in annotation_rows],
        [a[1] for a in annotation_rows],
        [a[2] for a in annotation_rows],
        [str(a[3]).replace("'", '"') for a in annotation_rows],
    )
    await db.execute(
        "INSERT INTO dataset_inputs (app_id, dataset_id, input_id)"
        " SELECT $1, $2, unnest($3::text[])",
        app_id,
        dataset_id,
        [r.id for r in rows if r.member],
    )
    with_vector = [r for r in rows if r.vector is not None]
    await put_vectors(
        db, app_id, model, [r.id for r in with_vector], np.array([r.vector for r in with_vector])
    )
    # As autovacuum would have: without statistics the planner takes these tables for empty.
    await db.execute("ANALYZE inputs, annotations, dataset_inputs, embeddings")
    return World(app_id, dataset_id, model, rows)


@pytest.fixture(scope="module")
async def db(stack: Stack) -> AsyncIterator[Database]:
    """A pool of its own over the migrated test database: no server needed."""
    database = await Database.connect(stack.dsn)
    try:
        async with database.acquire() as conn:
            await migrate(conn)
        await database.reload_types()
        yield database
    finally:
        await database.close()


@pytest.fixture(scope="module")
async def world(db: Database) -> World:
    return await build_world(db, random.Random(11))


def random_filter(rng: random.Random, world: World, dataset: bool) -> SearchFilter:
    values: dict[str, Any] = {}
    if rng.random() < 0.3:
        values["concept_ids"] = tuple(rng.sample(CONCEPTS, rng.randrange(1, 3)))
    if rng.random() < 0.3:
        values["negative_concept_ids"] = tuple(rng.sample(CONCEPTS, rng.randrange(1, 3)))
    if rng.random() < 0.3:
        values["metadata"] = rng.choice(
            [{"color": rng.choice(COLORS)}, {"tags": {"a": True}}, {"color": "red", "n": 1}]
        )
    if rng.random() < 0.3:
        values["media_types"] = tuple(rng.sample(MEDIA, rng.randrange(1, 3)))
    if rng.random() < 0.3:
        values["annotated"] = rng.random() < 0.5
    if rng.random() < 0.3:
        lat, lon = rng.choice(CENTERS)
        values["geo"] = GeoRadius(lat, lon, rng.uniform(50, 400))
    elif rng.random() < 0.2:
        lat, lon = rng.choice(CENTERS)
        values["geo"] = GeoBox(lat - 2, lat + 1.5, lon - 1, lon + 2.5)
    if rng.random() < 0.3:
        values["created_after"] = BASE_TIME + timedelta(days=rng.randrange(20))
    if rng.random() < 0.3:
        values["created_before"] = BASE_TIME + timedelta(days=rng.randrange(10, 30))
    return SearchFilter(world.app_id, dataset_id=world.dataset_id if dataset else None, **values)


def single_filters(world: World) -> list[SearchFilter]:
    lat, lon = CENTERS[0]
    app = world.app_id
    return [
        SearchFilter(app),
        SearchFilter(app, dataset_id=world.dataset_id),
        SearchFilter(app, concept_ids=("c1",)),
        SearchFilter(app, concept_ids=("c1", "c2")),
        SearchFilter(app, negative_concept_ids=("c0", "c3")),
        SearchFilter(app, metadata={"color": "blue"}),
        SearchFilter(app, metadata={"tags": {"a": False}}),
        SearchFilter(app, media_types=(MediaType.TEXT,)),
        SearchFilter(app, annotated=True),
        SearchFilter(app, annotated=False),
        SearchFilter(app, geo=GeoRadius(lat, lon, 200.0)),
        SearchFilter(app, geo=GeoBox(lat - 1, lat + 2, lon - 2, lon + 1)),
        SearchFilter(app, created_after=BASE_TIME + timedelta(days=10)),
        SearchFilter(app, created_before=BASE_TIME + timedelta(days=10)),
    ]


async def all_pages(
    repo: PgSearchRepository, f: SearchFilter, ranking: Ranking | None, size: int
) -> list[SearchHit]:
    hits: list[SearchHit] = []
    after: SearchCursor | None = None
    while True:
        page = await repo.search(f, ranking, after, size)
        hits.extend(page)
        if len(page) < size:
            return hits
        after = SearchCursor(page[-1].seq, page[-1].score if ranking else None)


async def all_ids(
    repo: PgSearchRepository, f: SearchFilter, ranking: Ranking | None, size: int
) -> list[tuple[int, str]]:
    ids: list[tuple[int, str]] = []
    after: int | None = None
    while True:
        page = await repo.matching_ids(f, ranking, after, size)
        ids.extend(page)
        if len(page) < size:
            return ids
        after = page[-1][0]


async def test_every_filter_matches_the_reference(db: Database, world: World) -> None:
    repo = PgSearchRepository(db)
    rng = random.Random(5)
    filters = single_filters(world) + [
        random_filter(rng, world, rng.random() < 0.5) for _ in range(40)
    ]
    nonempty = 0
    for f in filters:
        expected = [(r.seq, r.id) for r in sorted(world.rows, key=lambda r: r.seq) if matches(r, f)]
        hits = await all_pages(repo, f, None, 17)
        assert [(h.seq, h.input.id) for h in hits] == expected, f
        assert await repo.count(f, None) == len(expected), f
        assert await all_ids(repo, f, None, 13) == expected, f
        nonempty += bool(expected) and len(expected) < len(world.rows)
    # The random filters are not all trivially empty or full.
    assert nonempty >= 25


async def test_hits_are_the_inputs_as_get_input_returns_them(db: Database, world: World) -> None:
    repo = PgSearchRepository(db)
    hits = await repo.search(
        SearchFilter(world.app_id, dataset_id=world.dataset_id), None, None, 20
    )
    stored = await PgInputRepository(db).get_many(world.app_id, [h.input.id for h in hits])
    assert [h.input for h in hits] == stored
    assert all(world.dataset_id in h.input.dataset_ids for h in hits)


def reference_ranking(world: World, f: SearchFilter, query: np.ndarray) -> list[tuple[float, Row]]:
    scored = [
        (cosine(r.vector, query), r) for r in world.rows if r.vector is not None and matches(r, f)
    ]
    return sorted(scored, key=lambda p: (-p[0], p[1].seq))


def check_ranked(hits: list[SearchHit], reference: list[tuple[float, Row]]) -> None:
    """Same inputs as numpy's exact ranking, each with its score, in score order
    (pgvector sums in float32: scores agree to 1e-5, near ties may swap)."""
    expected = {r.id: score for score, r in reference}
    assert sorted(h.input.id for h in hits) == sorted(expected)
    for h in hits:
        assert h.score == pytest.approx(expected[h.input.id], abs=1e-5)
    for a, b in itertools.pairwise(hits):
        assert (a.score, -a.seq) > (b.score, -b.seq)
        assert expected[a.input.id] >= expected[b.input.id] - 1e-5


async def test_ranked_pages_follow_the_exact_order(db: Database, world: World) -> None:
    repo = PgSearchRepository(db)
    rng = random.Random(7)
    twin = next(r for r in world.rows if r.vector is not None)
    queries = [twin.vector] + [np.random.default_rng(n).normal(size=DIM) for n in range(4)]
    filters = [SearchFilter(world.app_id), SearchFilter(world.app_id, dataset_id=world.dataset_id)]
    filters += [random_filter(rng, world, rng.random() < 0.5) for _ in range(10)]
    for query in queries:
        assert query is not None
        ranking = Ranking(world.model, tuple(float(x) for x in query))
        for f in filters:
            reference = reference_ranking(world, f, query)
            whole = await repo.search(f, ranking, None, 1000)
            check_ranked(whole, reference)
            # Small pages (ties of the identical vectors span pages): no repeat, no skip.
            paged = await all_pages(repo, f, ranking, 3 if f in filters[:2] else 11)
            assert [(h.input.id, h.score) for h in paged] == [(h.input.id, h.score) for h in whole]
            assert await repo.count(f, ranking) == len(reference)
            assert await all_ids(repo, f, ranking, 50) == sorted(
                (r.seq, r.id) for _, r in reference
            )


async def test_min_score_and_the_excluded_input(db: Database, world: World) -> None:
    repo = PgSearchRepository(db)
    anchor = next(r for r in world.rows if r.vector is not None)
    assert anchor.vector is not None
    f = SearchFilter(world.app_id)
    ranking = Ranking(
        world.model,
        tuple(float(x) for x in anchor.vector),
        min_score=0.3,
        exclude_input_id=anchor.id,
    )
    reference = [(s, r) for s, r in reference_ranking(world, f, anchor.vector) if r.id != anchor.id]
    kept = [(s, r) for s, r in reference if s >= 0.3]
    # No score within rounding of the threshold, so the expected set is exact.
    assert all(abs(s - 0.3) > 1e-5 for s, _ in reference)
    assert 0 < len(kept) < len(reference)
    hits = await all_pages(repo, f, ranking, 4)
    check_ranked(hits, kept)
    assert await repo.count(f, ranking) == len(kept)
    assert await all_ids(repo, f, ranking, 7) == sorted((r.seq, r.id) for _, r in kept)


async def test_geo_radius_across_the_antimeridian_and_near_a_pole(db: Database) -> None:
    app_id = "app-" + secrets.token_hex(6)
    points = {
        "east": (10.0, 179.9),
        "west": (10.0, -179.9),
        "far": (10.0, 170.0),
        "pole-a": (89.9, 0.0),
        "pole-b": (89.9, 180.0),
        "south": (80.0, 90.0),
    }
    await db.execute(
        "INSERT INTO inputs (app_id, id, media_type, latitude, longitude)"
        " SELECT $1, * FROM unnest($2::text[], $3::text[], $4::float8[], $5::float8[])",
        app_id,
        list(points),
        ["image"] * len(points),
        [p[0] for p in points.values()],
        [p[1] for p in points.values()],
    )
    repo = PgSearchRepository(db)

    async def within(lat: float, lon: float, km: float) -> set[str]:
        hits = await repo.search(SearchFilter(app_id, geo=GeoRadius(lat, lon, km)), None, None, 50)
        return {h.input.id for h in hits}

    for lat, lon, km in [(10.0, 179.95, 30.0), (89.95, 90.0, 50.0), (10.0, -179.0, 200.0)]:
        expected = {name for name, p in points.items() if haversine(p[0], p[1], lat, lon) <= km}
        assert await within(lat, lon, km) == expected
    assert await within(10.0, 179.95, 30.0) == {"east", "west"}
    assert await within(89.95, 90.0, 50.0) == {"pole-a", "pole-b"}


async def test_geo_radius_matches_the_great_circle_distance(db: Database) -> None:
    app_id = "app-" + secrets.token_hex(6)
    rng = random.Random(19)
    centres = [(0.0, 0.0), (45.0, 7.0), (-20.0, 179.5), (87.5, -30.0), (-60.0, -100.0)]
    points: dict[str, tuple[float, float]] = {}
    for n in range(4000):
        lat, lon = rng.choice(centres)
        lat = max(-90.0, min(90.0, lat + rng.uniform(-6, 6)))
        lon = (lon + rng.uniform(-10, 10) + 180) % 360 - 180
        points[f"p{n}"] = (lat, lon)
    await db.execute(
        "INSERT INTO inputs (app_id, id, media_type, latitude, longitude)"
        " SELECT $1, * FROM unnest($2::text[], $3::text[], $4::float8[], $5::float8[])",
        app_id,
        list(points),
        ["image"] * len(points),
        [p[0] for p in points.values()],
        [p[1] for p in points.values()],
    )
    await db.execute("ANALYZE inputs")
    repo = PgSearchRepository(db)
    checked = 0
    for lat, lon in centres:
        for km in (5.0, 60.0, 300.0, 900.0, 2500.0):
            f = SearchFilter(app_id, geo=GeoRadius(lat, lon, km))
            got = {i for _, i in await repo.matching_ids(f, None, None, 10_000)}
            distances = {name: haversine(*p, lat, lon) for name, p in points.items()}
            expected = {name for name, d in distances.items() if d <= km}
            ambiguous = {name for name, d in distances.items() if abs(d - km) < 1e-6}
            assert got - ambiguous == expected - ambiguous, (lat, lon, km)
            assert await repo.count(f, None) == len(got)
            checked += len(expected)
    assert checked > 4000


def snapshot_of(row: Row) -> bytes:
    """The serialized snapshot of a world's input as the version holds it (what its hits
    show): its metadata, geo point, creation time and positive concepts."""
    message = input_pb2.Input(id=row.id)
    message.created_at.FromDatetime(row.created_at)
    message.data.metadata.update(row.metadata)
    if row.geo is not None:
        message.data.geo.geo_point.latitude, message.data.geo.geo_point.longitude = row.geo
    for concept in sorted(row.concepts):
        message.data.concepts.add(id=concept, value=1.0)
    return message.SerializeToString()


async def capture_version(db: Database, world: World, version_id: str) -> list[Row]:
    """A READY version of the world's dataset, its content references, search columns and
    vector references taken as CreateDatasetVersion takes them; its members."""
    app, ds = world.app_id, world.dataset_id
    await db.execute(
        "INSERT INTO dataset_versions (app_id, dataset_id, id, status)"
        " VALUES ($1, $2, $3, 'ready')",
        app,
        ds,
        version_id,
    )
    members = [r for r in world.rows if r.member]
    # The capture, as CreateDatasetVersion takes it: each member refers to its input's
    # content (input_contents: its snapshot and the search columns of the live rows).
    snapshots = [snapshot_of(r) for r in members]
    await db.execute(
        """
        INSERT INTO input_contents (hash, data, media_type, metadata, concepts, annotated,
                                    longitude, latitude, created_at)
        SELECT t.hash, t.data, i.media_type, i.metadata,
               ARRAY(SELECT DISTINCT unnest(a.positive_concepts) FROM annotations a
                     WHERE a.app_id = i.app_id AND a.input_id = i.id),
               EXISTS (SELECT 1 FROM annotations a WHERE a.app_id = i.app_id AND a.input_id = i.id),
               i.longitude, i.latitude, i.created_at
        FROM unnest($2::text[], $3::bytea[], $4::bytea[]) AS t(id, hash, data)
        JOIN inputs i ON i.app_id = $1 AND i.id = t.id
        ON CONFLICT (hash) DO NOTHING
        """,
        app,
        [r.id for r in members],
        [hashlib.sha256(data).digest() for data in snapshots],
        snapshots,
    )
    await db.execute(
        """
        INSERT INTO version_inputs (app_id, dataset_id, version_id, position, input_id, input_seq,
                                    content_hash)
        SELECT i.app_id, $2, $3, (row_number() OVER (ORDER BY i.seq))::int, i.id, i.seq, t.hash
        FROM unnest($4::text[], $5::bytea[]) AS t(id, hash)
        JOIN inputs i ON i.app_id = $1 AND i.id = t.id
        """,
        app,
        ds,
        version_id,
        [r.id for r in members],
        [hashlib.sha256(data).digest() for data in snapshots],
    )
    await db.execute(
        "INSERT INTO version_embeddings (app_id, dataset_id, version_id, input_id, embedding_id)"
        " SELECT e.app_id, $2, $3, e.input_id, e.id FROM embeddings e"
        " WHERE e.app_id = $1 AND e.input_id = ANY($4::text[]) AND e.replaced_at IS NULL",
        app,
        ds,
        version_id,
        [r.id for r in members],
    )
    return members


async def test_version_scope_is_searched_as_captured(db: Database) -> None:
    rng = random.Random(3)
    world = await build_world(db, rng, count=60)
    app, ds = world.app_id, world.dataset_id
    version_id = "v1"
    members = await capture_version(db, world, version_id)
    captured = [dataclasses.replace(r) for r in world.rows]

    # Edits after the capture: metadata, concepts, a deletion, a new vector.
    with_vector = [r for r in members if r.vector is not None]
    edited, relabelled, deleted, revectored = with_vector[:4]
    await db.execute(
        'UPDATE inputs SET metadata = \'{"color": "violet"}\' WHERE app_id = $1 AND id = $2',
        app,
        edited.id,
    )
    await db.execute(
        "INSERT INTO annotations (app_id, id, input_id, data, positive_concepts)"
        " VALUES ($1, $2, $3, '{}', ARRAY['late'])",
        app,
        secrets.token_hex(8),
        relabelled.id,
    )
    await db.execute("DELETE FROM inputs WHERE app_id = $1 AND id = $2", app, deleted.id)
    await put_vectors(db, app, world.model, [revectored.id], -np.array([revectored.vector]))

    repo = PgSearchRepository(db)
    version = SearchFilter(app, dataset_id=ds, version_id=version_id)
    live = SearchFilter(app, dataset_id=ds)
    # The live scope sees the edits ...
    assert edited.id in {
        h.input.id
        for h in await repo.search(
            dataclasses.replace(live, metadata={"color": "violet"}), None, None, 100
        )
    }
    assert deleted.id not in {h.input.id for h in await all_pages(repo, live, None, 100)}
    # ... the version does not.
    for f in [
        version,
        dataclasses.replace(version, metadata={"color": "violet"}),
        dataclasses.replace(version, metadata={"color": edited.metadata["color"]}),
        dataclasses.replace(version, concept_ids=("late",)),
        dataclasses.replace(version, negative_concept_ids=("late",)),
        dataclasses.replace(version, annotated=False),
    ]:
        reference = [
            (r.seq, r.id) for r in captured if matches(r, f) and "late" not in f.concept_ids
        ]
        if f.metadata == {"color": "violet"}:
            reference = []
        hits = await all_pages(repo, f, None, 7)
        assert [(h.seq, h.input.id) for h in hits] == sorted(reference), f
        assert await repo.count(f, None) == len(reference)
        assert await all_ids(repo, f, None, 9) == sorted(reference)

    shown = {h.input.id: h.input for h in await all_pages(repo, version, None, 100)}
    # A member's hit shows the content captured: its columns, or its snapshot when the
    # version has one.
    assert shown[edited.id].metadata == edited.metadata
    assert shown[edited.id].created_at == edited.created_at
    gone = next(h for h in await all_pages(repo, version, None, 100) if h.input.id == deleted.id)
    assert gone.input.metadata == deleted.metadata
    assert gone.input.media_type == deleted.media
    assert gone.input.created_at == deleted.created_at
    assert gone.seq == deleted.seq

    # Ranked by the captured vectors: the revectored input keeps its old score.
    assert revectored.vector is not None
    ranking = Ranking(world.model, tuple(float(x) for x in revectored.vector))
    hits = await all_pages(repo, version, ranking, 5)
    check_ranked(
        hits, reference_ranking(World(app, ds, world.model, captured), version, revectored.vector)
    )
    assert hits[0].input.id in {
        r.id
        for r in captured
        if r.vector is not None and np.array_equal(r.vector, revectored.vector)
    }
    live_hits = await repo.search(live, ranking, None, 1000)
    assert revectored.id in {h.input.id for h in live_hits[-3:]}


@dataclasses.dataclass
class Big:
    app_id: str
    model: EmbeddingModel
    ids: list[str]
    vectors: np.ndarray


BIG = 25_000
BIG_DIM = 32
TWINS = slice(100, 130)


@pytest.fixture(scope="module")
async def big(db: Database) -> AsyncIterator[Big]:
    app_id = "app-" + secrets.token_hex(6)
    model = await new_model(db, app_id, BIG_DIM)
    rng = np.random.default_rng(17)
    centers = rng.normal(size=(50, BIG_DIM))
    vectors = (centers[rng.integers(0, 50, BIG)] + 0.35 * rng.normal(size=(BIG, BIG_DIM))).astype(
        np.float32
    )
    ids = [f"in-{n:05d}" for n in range(BIG)]
    # Thirty copies of one vector: a tie longer than a page, on the index path.
    vectors[TWINS] = vectors[TWINS.start]
    # One input in a hundred has {"g": 7}: the selective filter; five are {"rare": true}.
    await db.execute(
        "INSERT INTO inputs (app_id, id, media_type, metadata)"
        " SELECT $1, 'in-' || lpad(g::text, 5, '0'), 'image', jsonb_build_object('g', g % 100)"
        " || CASE WHEN g % 5000 = 3 THEN '{\"rare\": true}'::jsonb ELSE '{}' END"
        " FROM generate_series(0, $2 - 1) g ORDER BY g",
        app_id,
        BIG,
    )
    # Nine inputs in ten are in the dataset: still too many for the exact path.
    await db.execute("INSERT INTO datasets (app_id, id) VALUES ($1, 'most')", app_id)
    await db.execute(
        "INSERT INTO dataset_inputs (app_id, dataset_id, input_id)"
        " SELECT $1, 'most', 'in-' || lpad(g::text, 5, '0') FROM generate_series(0, $2 - 1) g"
        " WHERE g % 10 <> 0",
        app_id,
        BIG,
    )
    # Stored (and indexed) in reverse order of the twins' seq: the index meets them in an
    # order of its own, the pages are by seq.
    stored = list(range(BIG))
    stored[TWINS] = stored[TWINS][::-1]
    await put_vectors(db, app_id, model, [ids[n] for n in stored], vectors[stored])
    # The model's HNSW index, as the server builds it.
    await PgEmbeddingRepository(db).ensure_indexes()
    await db.execute("ANALYZE inputs, embeddings, dataset_inputs")
    yield Big(app_id, model, ids, vectors)


def exact_top(big: Big, query: np.ndarray, k: int, keep: np.ndarray | None = None) -> list[str]:
    normed = big.vectors / np.linalg.norm(big.vectors, axis=1, keepdims=True)
    scores = normed @ (query / np.linalg.norm(query))
    order = np.lexsort((np.arange(BIG), -scores))
    if keep is not None:
        order = order[keep[order]]
    return [big.ids[i] for i in order[:k]]


@pytest.mark.parametrize(("dataset", "estimated"), [(False, False), (True, False), (False, True)])
async def test_hnsw_path_keeps_its_recall(
    db: Database, big: Big, dataset: bool, estimated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted past the exact limit, or (`estimated`) estimated far above it: the index."""
    if estimated:
        monkeypatch.setattr(search_module, "LARGE_ESTIMATE", 1000)
    repo = PgSearchRepository(db)
    rng = np.random.default_rng(23)
    f = SearchFilter(big.app_id, dataset_id="most" if dataset else None)
    keep = np.array([not dataset or n % 10 != 0 for n in range(BIG)])
    assert await repo.count(f, None) == int(keep.sum()) > EXACT_SCAN_LIMIT
    found = total = 0
    for _ in range(20):
        query = big.vectors[rng.integers(BIG)] + 0.2 * rng.normal(size=BIG_DIM)
        ranking = Ranking(big.model, tuple(float(x) for x in query))
        hits = await repo.search(f, ranking, None, 10)
        assert len(hits) == 10
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        expected = exact_top(big, query, 10, keep)
        found += len({h.input.id for h in hits} & set(expected))
        total += 10
        # The next page continues past the first one.
        after = SearchCursor(hits[-1].seq, hits[-1].score)
        following = await repo.search(f, ranking, after, 10)
        assert len(following) == 10
        assert {h.input.id for h in following}.isdisjoint(h.input.id for h in hits)
        assert following[0].score <= hits[-1].score
    assert found / total >= 0.95


@pytest.mark.parametrize(
    "f",
    [
        lambda app: SearchFilter(app, media_types=(MediaType.IMAGE,)),
        lambda app: SearchFilter(app, dataset_id="most"),
    ],
)
async def test_hnsw_path_walks_the_index(
    db: Database, big: Big, f: Callable[[str], SearchFilter]
) -> None:
    query = tuple(float(x) for x in big.vectors[0])
    sql, args = nearest_statement(
        f(big.app_id),
        Ranking(big.model, query),
        None,
        18,
    )
    async with db.read_transaction(), db.connection() as conn:
        for setting in nearest_settings(18):
            await conn.execute(setting)
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
    assert f"embeddings_hnsw_{big.model.number}" in plan, plan


async def test_selective_filter_is_exact(db: Database, big: Big) -> None:
    repo = PgSearchRepository(db)
    rng = np.random.default_rng(29)
    f = SearchFilter(big.app_id, metadata={"g": 7})
    keep = np.array([n % 100 == 7 for n in range(BIG)])
    assert await repo.count(f, None) == int(keep.sum())
    for _ in range(10):
        query = big.vectors[rng.integers(BIG)] + 0.2 * rng.normal(size=BIG_DIM)
        hits = await repo.search(f, Ranking(big.model, tuple(float(x) for x in query)), None, 10)
        assert [h.input.id for h in hits] == exact_top(big, query, 10, keep)


async def test_exact_duplicates_group_same_originals_and_same_texts(db: Database) -> None:
    rng = random.Random(31)
    app_id = "app-" + secrets.token_hex(6)
    dataset_id = "ds"
    await db.execute("INSERT INTO datasets (app_id, id) VALUES ($1, $2)", app_id, dataset_id)
    keys = [f"test/{app_id}/{n}" for n in range(12)]
    await db.execute(
        "INSERT INTO blobs (key, sha256, size, content_type)"
        " SELECT k, md5(k), 1, 'image/png' FROM unnest($1::text[]) AS k",
        keys,
    )
    texts = [f"text {n}" for n in range(8)]
    # (id, media, blob, text, member): images share originals, texts (stored both inline
    # and as a blob of their bytes, or inline only) share their text.
    rows: list[tuple[str, str, str | None, str | None, bool]] = []
    for n in range(150):
        if rng.random() < 0.6:
            rows.append((f"i{n}", "image", rng.choice(keys), None, rng.random() < 0.5))
        else:
            text = rng.choice(texts)
            blob = keys[texts.index(text)] if rng.random() < 0.5 else None
            rows.append((f"i{n}", "text", blob, text, rng.random() < 0.5))
    await db.execute(
        "INSERT INTO inputs (app_id, id, media_type, blob_key, text_raw)"
        " SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[])",
        app_id,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
    )
    await db.execute(
        "INSERT INTO dataset_inputs (app_id, dataset_id, input_id)"
        " SELECT $1, $2, unnest($3::text[])",
        app_id,
        dataset_id,
        [r[0] for r in rows if r[4]],
    )
    order = {r[0]: n for n, r in enumerate(rows)}

    def reference(
        kept: list[tuple[str, str, str | None, str | None, bool]],
    ) -> list[tuple[str, ...]]:
        groups: dict[str, list[str]] = {}
        for id_, _, blob, text, _ in kept:
            groups.setdefault(f"t:{text}" if text is not None else f"b:{blob}", []).append(id_)
        found = [tuple(ids) for ids in groups.values() if len(ids) > 1]
        return sorted(found, key=lambda ids: order[ids[0]])

    repo = PgSearchRepository(db)
    for f, kept in [
        (SearchFilter(app_id), rows),
        (SearchFilter(app_id, dataset_id=dataset_id), [r for r in rows if r[4]]),
        (SearchFilter(app_id, media_types=(MediaType.TEXT,)), [r for r in rows if r[1] == "text"]),
    ]:
        groups = await repo.exact_duplicates(f)
        assert [g.input_ids for g in groups] == reference(kept)
        assert all(g.exact and g.min_similarity == 1.0 for g in groups)
        assert len(groups) >= 5

    # A version groups by what it captured, whatever the live inputs became since.
    await db.execute(
        "INSERT INTO dataset_versions (app_id, dataset_id, id, status)"
        " VALUES ($1, $2, 'v', 'ready')",
        app_id,
        dataset_id,
    )
    members = [r for r in rows if r[4]]
    # Each member refers to its content (its snapshot, with the text of a text input).
    snapshots = [
        input_pb2.Input(
            id=r[0], data=data_pb2.Data(text=data_pb2.Text(raw=r[3])) if r[3] else None
        ).SerializeToString()
        for r in members
    ]
    hashes = [hashlib.sha256(data).digest() for data in snapshots]
    await db.execute(
        "INSERT INTO input_contents (hash, data, media_type, metadata)"
        " SELECT t.hash, t.data, t.media_type, '{}' FROM unnest($1::bytea[], $2::bytea[],"
        " $3::text[]) AS t(hash, data, media_type) ON CONFLICT (hash) DO NOTHING",
        hashes,
        snapshots,
        [r[1] for r in members],
    )
    await db.execute(
        "INSERT INTO version_inputs (app_id, dataset_id, version_id, position, input_id,"
        " input_seq, blob_key, content_hash)"
        " SELECT i.app_id, $2, 'v', (row_number() OVER (ORDER BY i.seq))::int, i.id, i.seq,"
        " i.blob_key, t.hash FROM unnest($3::text[], $4::bytea[]) AS t(id, hash)"
        " JOIN inputs i ON i.app_id = $1 AND i.id = t.id",
        app_id,
        dataset_id,
        [r[0] for r in members],
        hashes,
    )
    images = [r for r in members if r[1] == "image"]
    await db.execute(
        "UPDATE inputs SET blob_key = $3 WHERE app_id = $1 AND id = ANY($2::text[])",
        app_id,
        [r[0] for r in images],
        keys[0],
    )
    live = await repo.exact_duplicates(SearchFilter(app_id, dataset_id=dataset_id))
    assert tuple(r[0] for r in images) in [g.input_ids for g in live]
    version = await repo.exact_duplicates(
        SearchFilter(app_id, dataset_id=dataset_id, version_id="v")
    )
    assert [g.input_ids for g in version] == reference(members)


def reference_pairs(
    world: World, f: SearchFilter, threshold: float, neighbours: int
) -> dict[tuple[str, str], float]:
    scoped = sorted(
        (r for r in world.rows if r.vector is not None and matches(r, f)), key=lambda r: r.seq
    )
    pairs: dict[tuple[str, str], float] = {}
    for a in scoped:
        assert a.vector is not None
        near = sorted(
            ((1 - cosine(a.vector, b.vector), b) for b in scoped if b.id != a.id),  # type: ignore[arg-type]
            key=lambda p: (p[0], p[1].seq),
        )[:neighbours]
        for distance, b in near:
            if 1 - distance >= threshold:
                first, second = (a, b) if a.seq < b.seq else (b, a)
                pairs[(first.id, second.id)] = 1 - distance
    return pairs


async def test_similar_pairs_exact(db: Database, world: World) -> None:
    repo = PgSearchRepository(db)
    for f in [SearchFilter(world.app_id), SearchFilter(world.app_id, dataset_id=world.dataset_id)]:
        expected = reference_pairs(world, f, 0.6, 3)
        pairs, scanned, missing = await repo.similar_pairs(f, world.model, 0.6, 3)
        assert {(a, b) for a, b, _ in pairs} == set(expected)
        for a, b, similarity in pairs:
            assert similarity == pytest.approx(expected[(a, b)], abs=1e-5)
        assert [p[2] for p in pairs] == sorted((p[2] for p in pairs), reverse=True)
        in_scope = [r for r in world.rows if matches(r, f)]
        assert scanned == len(in_scope)
        assert missing == sum(r.vector is None for r in in_scope)
        # The identical vectors pair up at similarity 1.
        assert sum(1 for p in pairs if p[2] > 0.9999) >= 1


async def test_similar_pairs_through_the_index(
    db: Database, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index path, on a scope small enough to check against numpy: the limit lowered."""
    await PgEmbeddingRepository(db).ensure_indexes()
    monkeypatch.setattr(search_module, "EXACT_PAIRS_LIMIT", 20)
    f = SearchFilter(world.app_id)
    expected = reference_pairs(world, f, 0.5, 4)
    pairs, scanned, missing = await PgSearchRepository(db).similar_pairs(f, world.model, 0.5, 4)
    got = {(a, b) for a, b, _ in pairs}
    assert len(got & set(expected)) >= 0.95 * len(expected)
    # It may miss a neighbour, never invent one: each pair is two real inputs at their
    # real similarity, above the threshold.
    vectors = {r.id: r.vector for r in world.rows if r.vector is not None}
    for a, b, similarity in pairs:
        assert similarity >= 0.5
        assert similarity == pytest.approx(cosine(vectors[a], vectors[b]), abs=1e-5)
    assert scanned == len(world.rows)
    assert missing == sum(r.vector is None for r in world.rows)


async def test_hnsw_pages_through_ties(db: Database, big: Big) -> None:
    repo = PgSearchRepository(db)
    f = SearchFilter(big.app_id)
    ranking = Ranking(big.model, tuple(float(x) for x in big.vectors[TWINS.start]))
    hits: list[SearchHit] = []
    after = None
    for _ in range(5):
        page = await repo.search(f, ranking, after, 8)
        hits.extend(page)
        after = SearchCursor(page[-1].seq, page[-1].score)
    twins = big.ids[TWINS]
    assert [h.input.id for h in hits[: len(twins)]] == twins
    assert len({h.input.id for h in hits}) == len(hits) == 40


async def test_similar_pairs_walk_the_index_above_the_exact_limit(db: Database, big: Big) -> None:
    rows = await db.fetch(
        "SELECT e.id, i.seq FROM embeddings e JOIN inputs i"
        " ON i.app_id = e.app_id AND i.id = e.input_id WHERE e.app_id = $1",
        big.app_id,
    )
    assert len(rows) > search_module.EXACT_PAIRS_LIMIT
    async with db.read_transaction(), db.connection() as conn:
        for setting in nearest_settings(5):
            await conn.execute(setting)
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN " + search_module._nearest_pairs(big.model),
                [r["id"] for r in rows],
                [r["seq"] for r in rows],
                5,
                0.9,
            )
        )
    assert f"embeddings_hnsw_{big.model.number}" in plan, plan


async def test_an_index_scan_that_runs_out_gives_way_to_the_exact_page(
    db: Database, big: Big, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter the planner misjudges as keeping many: the index path first; it finds
    fewer than a page, and the exact page replaces it."""
    monkeypatch.setattr(search_module, "LARGE_ESTIMATE", -1)
    exact_pages = 0
    exact = PgSearchRepository._exact

    async def counted(self: PgSearchRepository, *args: Any) -> list[FoundHit]:
        nonlocal exact_pages
        exact_pages += 1
        return await exact(self, *args)

    monkeypatch.setattr(PgSearchRepository, "_exact", counted)
    keep = np.array([n % 5000 == 3 for n in range(BIG)])
    rng = np.random.default_rng(37)
    for n in range(3):
        query = rng.normal(size=BIG_DIM)
        ranking = Ranking(big.model, tuple(float(x) for x in query))
        f = SearchFilter(big.app_id, metadata={"rare": True})
        hits = await PgSearchRepository(db).search(f, ranking, None, 10)
        assert [h.input.id for h in hits] == exact_top(big, query, 10, keep)
        assert exact_pages == n + 1


async def test_a_version_hit_shows_its_snapshot(db: Database) -> None:
    world = await build_world(db, random.Random(4), count=20)
    app, ds, version_id = world.app_id, world.dataset_id, "v1"
    relabelled = (await capture_version(db, world, version_id))[0]
    repo = PgSearchRepository(db)
    version = SearchFilter(app, dataset_id=ds, version_id=version_id)
    snapshot = input_pb2.Input(id=relabelled.id, title="as captured")
    snapshot.data.metadata.update({"color": "captured"})
    snapshot.data.concepts.add(id="c9", value=1.0)
    # The member refers to other content, with the same search columns.
    data = snapshot.SerializeToString()
    await db.execute(
        "INSERT INTO input_contents (hash, data, media_type, metadata, concepts, annotated,"
        " longitude, latitude, created_at)"
        " SELECT $6, $4, c.media_type, c.metadata, c.concepts, c.annotated, c.longitude,"
        " c.latitude, c.created_at FROM version_inputs v"
        " JOIN input_contents c ON c.hash = v.content_hash"
        " WHERE v.app_id = $1 AND v.dataset_id = $2 AND v.version_id = $3 AND v.input_id = $5"
        " ON CONFLICT (hash) DO NOTHING",
        app,
        ds,
        version_id,
        data,
        relabelled.id,
        hashlib.sha256(data).digest(),
    )
    await db.execute(
        "UPDATE version_inputs SET content_hash = $4"
        " WHERE app_id = $1 AND dataset_id = $2 AND version_id = $3 AND input_id = $5",
        app,
        ds,
        version_id,
        hashlib.sha256(data).digest(),
        relabelled.id,
    )
    (hit,) = [h for h in await all_pages(repo, version, None, 100) if h.input.id == relabelled.id]
    assert hit.input.title == "as captured"
    assert hit.input.metadata == {"color": "captured"}
    assert hit.input.concepts == [{"id": "c9", "value": 1.0}]

    assert hit.input.blob is None and hit.input.media_type is relabelled.media


async def check_vectors(db: Database, app_id: str, found: list[FoundHit]) -> None:
    """Each hit carries its input's current client vectors, as GetInput reads them."""
    ids = [f.hit.input.id for f in found]
    expected = await PgEmbeddingRepository(db).client_vectors(app_id, ids)
    for f in found:
        assert f.vectors == tuple(expected.get(f.hit.input.id, ())), f.hit.input.id
        for given in f.vectors:
            assert all(isinstance(x, float) for x in given.vector)


async def test_a_page_carries_its_hits_client_vectors(db: Database, world: World) -> None:
    repo = PgSearchRepository(db)
    anchor = next(r for r in world.rows if r.vector is not None)
    assert anchor.vector is not None
    ranking = Ranking(world.model, tuple(float(x) for x in anchor.vector))
    for f in (SearchFilter(world.app_id), SearchFilter(world.app_id, dataset_id=world.dataset_id)):
        for rank in (None, ranking):
            found = await repo.page(f, rank, None, 25, vectors=True, guarded=True)
            assert [x.hit for x in found] == await repo.search(f, rank, None, 25)
            await check_vectors(db, world.app_id, found)
            # Unranked, some hits have vectors and some none; ranked, all have one.
            assert {bool(x.vectors) for x in found} == ({True, False} if rank is None else {True})
            without = await repo.page(f, rank, None, 25, vectors=False, guarded=True)
            assert [x.hit for x in without] == [x.hit for x in found]
            assert all(x.vectors == () for x in without)


async def test_a_page_through_the_index_carries_client_vectors(db: Database, big: Big) -> None:
    repo = PgSearchRepository(db)
    query = tuple(float(x) for x in big.vectors[7])
    found = await repo.page(
        SearchFilter(big.app_id), Ranking(big.model, query), None, 10, vectors=True, guarded=True
    )
    assert [f.hit.input.id for f in found] == exact_top(big, big.vectors[7], 10)
    await check_vectors(db, big.app_id, found)
    assert all(len(f.vectors) == 1 and f.vectors[0].model_id == big.model.id for f in found)


async def test_a_guarded_page_needs_a_live_dataset_and_a_ready_version(db: Database) -> None:
    world = await build_world(db, random.Random(41), count=30)
    app, ds = world.app_id, world.dataset_id
    await capture_version(db, world, "v1")
    repo = PgSearchRepository(db)
    anchor = next(r for r in world.rows if r.vector is not None)
    assert anchor.vector is not None
    ranking = Ranking(world.model, tuple(float(x) for x in anchor.vector))
    scopes = [SearchFilter(app, dataset_id=ds), SearchFilter(app, dataset_id=ds, version_id="v1")]

    async def pages(guarded: bool) -> list[int]:
        return [
            len(await repo.page(f, rank, None, 50, vectors=False, guarded=guarded))
            for f in scopes
            for rank in (None, ranking)
        ]

    assert all(await pages(True))
    await db.execute(
        "UPDATE dataset_versions SET status = 'in_progress'"
        " WHERE app_id = $1 AND dataset_id = $2 AND id = 'v1'",
        app,
        ds,
    )
    assert await pages(True) == [*(await pages(False))[:2], 0, 0]
    await db.execute(
        "UPDATE datasets SET deleted_at = now() WHERE app_id = $1 AND id = $2", app, ds
    )
    assert await pages(True) == [0, 0, 0, 0]
    # Unguarded (the search jobs' pages, checked beforehand): the rows regardless.
    assert all(await pages(False))
