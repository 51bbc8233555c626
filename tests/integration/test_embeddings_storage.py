"""The embeddings repository and what a version captures for search, against the real
PostgreSQL (with pgvector). A database of its own: the session server's embedding job and
maintenance would otherwise embed, index and collect these rows meanwhile."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from service.domain.clock import SystemClock
from service.domain.datasets import DatasetService, DatasetSettings
from service.domain.embeddings import (
    ClientVector,
    EmbeddingModel,
    EmbeddingSource,
    EmbeddingState,
    ModelSpec,
)
from service.domain.maintenance import Maintenance
from service.domain.models import (
    Annotation,
    Dataset,
    GeoPoint,
    Input,
    MediaType,
)
from service.media.probe import MediaProbes
from service.storage.annotations import PgAnnotationRepository
from service.storage.blobs import ContentAddressedBlobStore
from service.storage.datasets import PgDatasetRepository
from service.storage.db import Database
from service.storage.embeddings import (
    PgEmbeddingRepository,
    index_name,
    index_predicate,
    vector_expression,
)
from service.storage.idempotency import PgIdempotencyRepository
from service.storage.inputs import PgInputRepository, PgMembershipRepository
from service.storage.versions import PgVersionRepository
from tests.conftest import Stack, object_store
from tests.scratch import migrated_database
from tests.snapshots import create_ready


@pytest.fixture(scope="module")
async def db(stack: Stack) -> AsyncIterator[Database]:
    async with migrated_database(stack.dsn, "emb") as database:
        yield database


@pytest.fixture
def repo(db: Database) -> PgEmbeddingRepository:
    return PgEmbeddingRepository(db)


@pytest.fixture
def app() -> str:
    return "app-" + secrets.token_hex(5)


def spec(
    model_id: str,
    dimension: int = 4,
    fingerprint: str = "v1",
    media: frozenset[MediaType] = frozenset({MediaType.IMAGE, MediaType.TEXT}),
) -> ModelSpec:
    return ModelSpec(
        id=model_id,
        dimension=dimension,
        media_types=media,
        accepts_text_queries=True,
        source=EmbeddingSource.BUILTIN,
        description="test model",
        fingerprint=fingerprint,
    )


# The installation's models are exactly those of the last sync: each new one is synced
# with those before it, as a process configured with all of them would.
_REGISTERED: list[ModelSpec] = []


async def new_model(repo: PgEmbeddingRepository, dimension: int = 4, **kw: Any) -> EmbeddingModel:
    _REGISTERED.append(spec("m-" + secrets.token_hex(4), dimension, **kw))
    return (await repo.sync_installation_models(_REGISTERED))[-1]


def image(app: str, input_id: str, **kw: Any) -> Input:
    return Input(
        app, input_id, MediaType.IMAGE, source_url=f"https://example.com/{input_id}.jpg", **kw
    )


def text(app: str, input_id: str, content: str = "hello") -> Input:
    return Input(app, input_id, MediaType.TEXT, text=content)


async def add(db: Database, *inputs: Input) -> None:
    assert set(await PgInputRepository(db).insert_many(list(inputs))) == {i.id for i in inputs}


async def rows(db: Database, app: str, input_id: str, model: EmbeddingModel) -> list[Any]:
    return await db.fetch(
        "SELECT id, replaced_at IS NULL AS current FROM embeddings"
        " WHERE app_id = $1 AND input_id = $2 AND model_number = $3 ORDER BY id",
        app,
        input_id,
        model.number,
    )


async def delete_inputs(db: Database, app: str, *ids: str) -> None:
    assert sorted(await PgInputRepository(db).delete(app, list(ids))) == sorted(ids)


# --- versions, created the way CreateDatasetVersion does ----------------------------------


async def build_version(
    db: Database, stack: Stack, app: str, dataset_id: str, version_id: str
) -> None:
    await create_ready(db, object_store(stack), app, dataset_id, version_id)


async def new_dataset(db: Database, app: str, dataset_id: str) -> None:
    await PgDatasetRepository(db).insert(Dataset(app, dataset_id))


# What search filters a version's members by: the columns of the content they refer to.
CAPTURE_COLUMNS = """
SELECT v.input_id, v.input_seq, c.media_type, c.metadata, c.concepts, c.annotated,
       c.longitude, c.latitude, c.created_at
FROM version_inputs v JOIN input_contents c ON c.hash = v.content_hash
WHERE v.app_id = $1 AND v.dataset_id = $2 AND v.version_id = $3
ORDER BY v.position
"""


async def captured(
    db: Database, app: str, dataset_id: str, version_id: str
) -> list[dict[str, Any]]:
    return [dict(r) for r in await db.fetch(CAPTURE_COLUMNS, app, dataset_id, version_id)]


async def references(
    db: Database, app: str, dataset_id: str, version_id: str
) -> set[tuple[str, int]]:
    found = await db.fetch(
        "SELECT input_id, embedding_id FROM version_embeddings"
        " WHERE app_id = $1 AND dataset_id = $2 AND version_id = $3",
        app,
        dataset_id,
        version_id,
    )
    return {(r["input_id"], r["embedding_id"]) for r in found}


# --- vectors -----------------------------------------------------------------------------


async def test_put_keeps_one_current_vector_and_the_replaced_one(
    db: Database, repo: PgEmbeddingRepository, app: str
) -> None:
    model = await new_model(repo)
    await add(db, image(app, "a"), image(app, "b"))
    await repo.put(app, "a", model, [1.0, 0.0, 0.0, 0.0])
    await repo.put(app, "a", model, (0.0, 0.5, 0.25, 0.0))
    assert [r["current"] for r in await rows(db, app, "a", model)] == [False, True]
    assert await repo.vector_of(app, "a", model) == (0.0, 0.5, 0.25, 0.0)

    # Many at once; an input that does not exist (deleted meanwhile) gets no vector.
    await repo.put_many(
        model,
        [
            (app, "a", [0.0, 0.0, 1.0, 0.0]),
            (app, "b", [0.0, 0.0, 0.0, 1.0]),
            (app, "gone", [1.0, 1.0, 1.0, 1.0]),
        ],
    )
    assert [r["current"] for r in await rows(db, app, "a", model)] == [False, False, True]
    assert await repo.vector_of(app, "b", model) == (0.0, 0.0, 0.0, 1.0)
    assert await rows(db, app, "gone", model) == []
    assert (await repo.embedded_counts(app))[model.number] == 2

    with pytest.raises(ValueError, match="dimensions"):
        await repo.put(app, "a", model, [1.0, 2.0])


async def test_a_deleted_inputs_vector_is_collected_unless_a_version_captured_it(
    db: Database, stack: Stack, repo: PgEmbeddingRepository, app: str
) -> None:
    model = await new_model(repo)
    await new_dataset(db, app, "ds")
    await add(db, image(app, "kept", dataset_ids=["ds"]), image(app, "loose"))
    await repo.put(app, "kept", model, [1.0, 0.0, 0.0, 0.0])
    await repo.put(app, "loose", model, [0.0, 1.0, 0.0, 0.0])
    await build_version(db, stack, app, "ds", "v1")
    [kept] = await rows(db, app, "kept", model)
    [loose] = await rows(db, app, "loose", model)

    await delete_inputs(db, app, "kept", "loose")
    assert [r["current"] for r in await rows(db, app, "kept", model)] == [False]
    assert [r["current"] for r in await rows(db, app, "loose", model)] == [False]
    assert await repo.vector_of(app, "kept", model) is None

    while await repo.collect_replaced(1000):
        pass
    assert await rows(db, app, "loose", model) == []
    assert [r["id"] for r in await rows(db, app, "kept", model)] == [kept["id"]]
    # The version still searches by the vector it captured.
    assert await repo.vector_of(app, "kept", model, ("ds", "v1")) == (1.0, 0.0, 0.0, 0.0)

    assert await PgVersionRepository(db).delete(app, "ds", "v1")
    while await repo.collect_replaced(1000):
        pass
    assert await rows(db, app, "kept", model) == []
    assert loose["id"] != kept["id"]


async def test_pending_failures_and_states(
    db: Database, repo: PgEmbeddingRepository, app: str
) -> None:
    model = await new_model(repo)
    other = await new_model(repo, media=frozenset({MediaType.VIDEO}))
    await add(
        db,
        image(app, "done"),
        image(app, "failed"),
        text(app, "note", "a cat on a mat"),
        image(app, "url-only"),
        Input(app, "clip", MediaType.VIDEO),
    )
    await repo.put(app, "done", model, [1.0, 0.0, 0.0, 0.0])
    await repo.record_failures(
        model, [(app, "failed", "first"), (app, "failed", "cannot decode"), (app, "gone", "x")]
    )

    pending = [p for p in await repo.pending(model, 10_000) if p.app_id == app]
    assert [p.input_id for p in pending] == ["note", "url-only"]  # oldest first
    note, url_only = pending
    assert (note.media_type, note.text, note.blob_key) == (MediaType.TEXT, "a cat on a mat", None)
    assert url_only.source_url == "https://example.com/url-only.jpg"
    assert app in await repo.apps_with_pending(model)
    assert [p.input_id for p in await repo.pending(other, 10_000) if p.app_id == app] == ["clip"]

    states = {s.model_id: s for s in await repo.states(app, "done", vectors=True)}
    assert states[model.id].state is EmbeddingState.READY
    assert states[model.id].vector == (1.0, 0.0, 0.0, 0.0)
    assert other.id not in states  # a video model does not embed images
    [failed] = [
        s for s in await repo.states(app, "failed", vectors=False) if s.model_id == model.id
    ]
    assert (failed.state, failed.error) == (EmbeddingState.FAILED, "cannot decode")
    [waiting] = [s for s in await repo.states(app, "note", vectors=False) if s.model_id == model.id]
    assert waiting.state is EmbeddingState.PENDING
    without = await repo.states(app, "done", vectors=False)
    assert [s.vector for s in without if s.model_id == model.id] == [()]

    # A client model shows only where the input has a vector of it.
    client = await repo.client_model(app, "mine", 2)
    await repo.put(app, "note", client, [0.5, 0.5])
    assert client.id in {s.model_id for s in await repo.states(app, "note", vectors=False)}
    assert client.id not in {s.model_id for s in await repo.states(app, "done", vectors=False)}
    assert await repo.client_vectors(app, ["note", "done"]) == {
        "note": [ClientVector("mine", (0.5, 0.5))]
    }

    # An embedded input is no longer pending; a put clears a recorded failure.
    await repo.put(app, "failed", model, [0.0, 1.0, 0.0, 0.0])
    await repo.put_many(model, [(app, "note", [0.0, 0.0, 1.0, 0.0])])
    assert [p.input_id for p in await repo.pending(model, 10_000) if p.app_id == app] == [
        "url-only"
    ]
    assert await db.fetchval("SELECT count(*) FROM embedding_failures WHERE app_id = $1", app) == 0


async def test_concurrent_first_vectors_of_a_client_model_share_it(
    repo: PgEmbeddingRepository, app: str
) -> None:
    models = await asyncio.gather(*(repo.client_model(app, "shared", 3) for _ in range(6)))
    assert len({m.number for m in models}) == 1
    assert models[0].source is EmbeddingSource.CLIENT and models[0].dimension == 3
    assert await repo.model(app, "shared") == models[0]
    assert "shared" in {m.id for m in await repo.models(app)}
    assert "shared" not in {m.id for m in await repo.models(app + "-other")}


async def test_a_changed_fingerprint_embeds_every_input_again(
    db: Database, stack: Stack, repo: PgEmbeddingRepository, app: str
) -> None:
    model_id = "fp-" + secrets.token_hex(4)
    [model] = await repo.sync_installation_models([spec(model_id)])
    assert await repo.sync_installation_models([spec(model_id)]) == [model]
    await new_dataset(db, app, "ds")
    await add(db, image(app, "a", dataset_ids=["ds"]), image(app, "b"), image(app, "c"))
    await repo.put(app, "a", model, [1.0, 0.0, 0.0, 0.0])
    await repo.put(app, "b", model, [0.0, 1.0, 0.0, 0.0])
    await repo.record_failures(model, [(app, "c", "broken")])
    await build_version(db, stack, app, "ds", "v1")
    await repo.ensure_indexes()

    [changed] = await repo.sync_installation_models([spec(model_id, 3, fingerprint="v2")])
    assert (changed.number, changed.dimension) == (model.number, 3)
    # The captured vector stays (replaced), the other is gone, the failure forgotten.
    assert [r["current"] for r in await rows(db, app, "a", model)] == [False]
    assert await rows(db, app, "b", model) == []
    pending = [p.input_id for p in await repo.pending(changed, 10_000) if p.app_id == app]
    assert pending == ["a", "b", "c"]
    assert await repo.vector_of(app, "a", changed, ("ds", "v1")) == (1.0, 0.0, 0.0, 0.0)
    # The old index cast to 4 dimensions: it is dropped, and rebuilt for 3.
    assert await db.fetchval("SELECT to_regclass($1)", index_name(model)) is None
    await repo.put(app, "a", changed, [0.0, 0.0, 1.0])
    await repo.ensure_indexes()
    assert await db.fetchval("SELECT to_regclass($1)", index_name(model)) is not None


async def test_a_model_no_longer_configured_is_retired_until_configured_again(
    db: Database, repo: PgEmbeddingRepository, app: str
) -> None:
    kept, dropped = spec("kept-" + secrets.token_hex(4)), spec("gone-" + secrets.token_hex(4))
    await repo.sync_installation_models([kept, dropped])
    await add(db, image(app, "a"))
    [gone] = [m for m in await repo.models(app) if m.id == dropped.id]
    await repo.put(app, "a", gone, [1.0, 0.0, 0.0, 0.0])

    await repo.sync_installation_models([kept])
    ids = {m.id for m in await repo.models(app)}
    assert kept.id in ids and dropped.id not in ids
    assert await repo.model(app, dropped.id) is None
    assert dropped.id not in {s.model_id for s in await repo.states(app, "a", vectors=False)}
    # Its vectors stay: configured again, it is back with them.
    await repo.sync_installation_models([kept, dropped])
    assert await repo.model(app, dropped.id) == gone
    states = {s.model_id: s.state for s in await repo.states(app, "a", vectors=False)}
    assert states[dropped.id] is EmbeddingState.READY


async def test_ensure_indexes_builds_a_valid_index_queries_use(
    db: Database, repo: PgEmbeddingRepository, app: str
) -> None:
    model = await new_model(repo, 3)
    await add(db, *(image(app, f"i{n}") for n in range(20)))
    await repo.put_many(model, [(app, f"i{n}", [1.0, n / 10, (n % 3) / 3]) for n in range(20)])
    name = index_name(model)
    # What a crash in the middle of a build leaves: an invalid index of that name.
    async with db.acquire() as conn:
        with pytest.raises(asyncpg.PostgresError):
            await conn.execute(
                f"CREATE INDEX CONCURRENTLY {name} ON embeddings USING hnsw"
                " ((vector::vector(2)) vector_cosine_ops)"
                f" WHERE model_number = {model.number} AND replaced_at IS NULL"
            )
    valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)"
    assert await db.fetchval(valid, name) is False

    await repo.ensure_indexes()
    assert await db.fetchval(valid, name) is True
    await repo.ensure_indexes()  # nothing to do
    assert await db.fetchval(valid, name) is True

    query = (
        f"SELECT e.input_id FROM embeddings e WHERE {index_predicate(model)}"
        f" ORDER BY {vector_expression(model)} <=> $1::vector(3) LIMIT 5"
    )
    async with db.transaction(), db.connection() as conn:
        # The table is tiny: without this the planner would rather sort it all.
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + query, [2.0, 1.2, 0.0]))
        assert f"Index Scan using {name}" in plan, plan
        found = [r["input_id"] for r in await conn.fetch(query, [2.0, 1.2, 0.0])]
    assert found[0] == "i6"  # the same direction


# --- what a version captures -------------------------------------------------------------


async def test_a_version_captures_its_inputs_search_columns_and_vectors(
    db: Database, stack: Stack, repo: PgEmbeddingRepository, app: str
) -> None:
    model = await new_model(repo)
    await new_dataset(db, app, "ds")
    await add(
        db,
        image(
            app,
            "cat",
            metadata={"camera": {"make": "x"}},
            geo=GeoPoint(13.4, 52.5),
            concepts=[{"id": "cat", "value": 1.0}, {"id": "dog", "value": 0.0}],
            dataset_ids=["ds"],
        ),
        text(app, "note", "plain"),
        image(app, "boxed"),
    )
    await PgMembershipRepository(db).add(app, "ds", ["note", "boxed"])
    region = {
        "regions": [
            {
                "region_info": {
                    "bounding_box": {
                        "top_row": 0.1,
                        "left_col": 0.1,
                        "bottom_row": 0.5,
                        "right_col": 0.5,
                    }
                },
                "data": {"concepts": [{"id": "tail", "value": 1.0}]},
            }
        ]
    }
    await PgAnnotationRepository(db).insert_many(
        [
            Annotation(app, "ann-1", "cat", region),
            Annotation(app, "ann-2", "boxed", {"concepts": [{"id": "dog", "value": 0.0}]}),
        ]
    )
    await repo.put(app, "cat", model, [1.0, 0.0, 0.0, 0.0])
    await repo.put(app, "note", model, [0.0, 1.0, 0.0, 0.0])
    live = {i.id: i for i in await PgInputRepository(db).get_many(app, ["cat", "note", "boxed"])}
    seqs = {
        r["id"]: r["seq"]
        for r in await db.fetch("SELECT id, seq FROM inputs WHERE app_id = $1", app)
    }

    await build_version(db, stack, app, "ds", "v1")
    expected = [
        {
            "input_id": "cat",
            "input_seq": seqs["cat"],
            "media_type": "image",
            "metadata": {"camera": {"make": "x"}},
            "concepts": ["cat", "tail"],
            "annotated": True,
            "longitude": 13.4,
            "latitude": 52.5,
            "created_at": live["cat"].created_at,
        },
        {
            "input_id": "note",
            "input_seq": seqs["note"],
            "media_type": "text",
            "metadata": {},
            "concepts": [],
            "annotated": False,
            "longitude": None,
            "latitude": None,
            "created_at": live["note"].created_at,
        },
        {
            "input_id": "boxed",
            "input_seq": seqs["boxed"],
            "media_type": "image",
            "metadata": {},
            "concepts": [],
            "annotated": True,
            "longitude": None,
            "latitude": None,
            "created_at": live["boxed"].created_at,
        },
    ]
    assert await captured(db, app, "ds", "v1") == expected
    [cat_vector] = await rows(db, app, "cat", model)
    [note_vector] = await rows(db, app, "note", model)
    refs = {("cat", cat_vector["id"]), ("note", note_vector["id"])}
    assert await references(db, app, "ds", "v1") == refs

    # Later edits move nothing the version captured.
    edited = live["cat"]
    await PgInputRepository(db).update(
        Input(app, "cat", MediaType.IMAGE, metadata={"camera": {"make": "y"}}, concepts=[])
    )
    await repo.put(app, "cat", model, [0.0, 0.0, 0.0, 1.0])
    await PgAnnotationRepository(db).delete(app, ["ann-1"])
    assert edited.metadata == {"camera": {"make": "x"}}
    assert await captured(db, app, "ds", "v1") == expected
    assert await references(db, app, "ds", "v1") == refs
    assert await repo.vector_of(app, "cat", model, ("ds", "v1")) == (1.0, 0.0, 0.0, 0.0)
    assert await repo.vector_of(app, "cat", model) == (0.0, 0.0, 0.0, 1.0)

    # Content moved by migration 0014 from versions built before migration 0012: the
    # maintenance loop fills the same columns from the serialized content, and captures
    # the vectors current at that time.
    await db.execute(
        "UPDATE input_contents SET media_type = NULL, metadata = NULL, concepts = NULL,"
        " annotated = NULL, longitude = NULL, latitude = NULL, created_at = NULL,"
        " metrics = NULL WHERE hash IN (SELECT content_hash FROM version_inputs"
        " WHERE app_id = $1 AND dataset_id = 'ds' AND version_id = 'v1')",
        app,
    )
    await db.execute(
        "UPDATE version_inputs SET input_seq = NULL"
        " WHERE app_id = $1 AND dataset_id = 'ds' AND version_id = 'v1'",
        app,
    )
    await db.execute("DELETE FROM version_embeddings WHERE app_id = $1", app)
    blobs = ContentAddressedBlobStore(db, object_store(stack))
    datasets = DatasetService(
        PgDatasetRepository(db), blobs, db, SystemClock(), DatasetSettings(), MediaProbes()
    )
    maintenance = Maintenance(
        datasets,
        blobs,
        PgIdempotencyRepository(db),
        orphan_grace=timedelta(hours=1),
        request_id_ttl=timedelta(days=1),
        embeddings=repo,
        captures=PgVersionRepository(db),
    )
    report = await maintenance.run_once()
    assert report.version_members_backfilled >= 3
    backfilled = await captured(db, app, "ds", "v1")
    # The serialized content keeps geo points as float (32 bits): within a meter.
    assert backfilled[0].pop("longitude") == pytest.approx(13.4, abs=1e-5)
    assert backfilled[0].pop("latitude") == pytest.approx(52.5, abs=1e-5)
    assert backfilled == [
        {k: v for k, v in row.items() if n or k not in ("longitude", "latitude")}
        for n, row in enumerate(expected)
    ]
    # The version lost its references above: the replaced vector went, the current one
    # is what the backfill captures.
    [current] = await rows(db, app, "cat", model)
    assert current["current"]
    assert await references(db, app, "ds", "v1") == {
        ("cat", current["id"]),
        ("note", note_vector["id"]),
    }
    assert await PgVersionRepository(db).backfill_capture(100) == 0


async def test_pending_looks_from_its_hint_and_at_every_input_periodically(
    db: Database, repo: PgEmbeddingRepository, app: str
) -> None:
    # Audio: no other test of the module adds any, so every pending input is this test's.
    model = await new_model(repo, media=frozenset({MediaType.AUDIO}))
    await add(db, Input(app, "a1", MediaType.AUDIO), Input(app, "a2", MediaType.AUDIO))
    assert [p.input_id for p in await repo.pending(model, 10)] == ["a1", "a2"]
    await repo.put_many(model, [(app, "a1", [1.0, 0, 0, 0]), (app, "a2", [0, 1.0, 0, 0])])
    assert await repo.pending(model, 10) == []
    await add(db, Input(app, "a3", MediaType.AUDIO))
    assert [p.input_id for p in await repo.pending(model, 10)] == ["a3"]
    assert await repo.apps_with_pending(model) == [app]

    # a1 pending again behind the hint (what a model changed by another replica does):
    # the hint skips it until the next look at every input.
    await db.execute(
        "DELETE FROM embeddings WHERE app_id = $1 AND input_id = 'a1' AND model_number = $2",
        app,
        model.number,
    )
    assert [p.input_id for p in await repo.pending(model, 10)] == ["a3"]
    looks_at_all = PgEmbeddingRepository(db, full_scan_seconds=0)
    assert [p.input_id for p in await looks_at_all.pending(model, 10)] == ["a1", "a3"]
