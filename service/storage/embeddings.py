"""PostgreSQL repository of embedding models, the inputs' vectors and embedding failures.

Vectors travel through pgvector's binary asyncpg codec, registered on every pool
connection (db.py's `_init_connection`): parameters of type `vector` take a list of
floats (not a tuple), a numpy array or a `pgvector.Vector`, and `vector` columns read as
`pgvector.Vector`. Bulk
inserts with it are ~10x faster than `'[1,2,3]'::vector` text (1000 x 512: ~30 ms
against ~350 ms; text arrays of float4 sliced in SQL: ~120 ms).

Each model has a partial HNSW index, `embeddings_hnsw_<number>`, over its current
vectors cast to its dimension (a pgvector index needs one). A query uses it only when
it repeats the index's expression and predicate with the model's number and dimension
as literals: see `vector_expression` and `index_predicate`, e.g.

    ORDER BY e.vector::vector(512) <=> $1::vector(512)
    WHERE e.model_number = 3 AND e.replaced_at IS NULL
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import asyncpg
from pgvector import Vector

from service.domain.embeddings import (
    ClientVector,
    EmbeddingModel,
    EmbeddingSource,
    EmbeddingState,
    InputEmbedding,
    ModelSpec,
    PendingInput,
)
from service.domain.models import MediaType
from service.storage.db import Connection, Database, Repository, rows_affected

# The expression and predicate of a model's HNSW index ({dimension}, {number}: integers
# read from embedding_models, safe to format). Queries must repeat them literally.
HNSW_INDEX_NAME = "embeddings_hnsw_{number}"
HNSW_EXPRESSION = "vector::vector({dimension})"
HNSW_PREDICATE = "model_number = {number} AND replaced_at IS NULL"
HNSW_OPTIONS = "m = 16, ef_construction = 64"
CREATE_HNSW = (
    "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON embeddings"
    f" USING hnsw (({HNSW_EXPRESSION}) vector_cosine_ops) WITH ({HNSW_OPTIONS})"
    f" WHERE {HNSW_PREDICATE}"
)
DROP_HNSW = "DROP INDEX CONCURRENTLY IF EXISTS {name}"
DROP_HNSW_IN_TRANSACTION = "DROP INDEX IF EXISTS {name}"
# Held while indexes are built, so that two replicas never build (or drop as invalid)
# the same index at once.
INDEX_LOCK_ID = 0x656D62_6864


def index_name(model: EmbeddingModel) -> str:
    return HNSW_INDEX_NAME.format(number=int(model.number))


def vector_expression(model: EmbeddingModel, alias: str = "e") -> str:
    """`<alias>.vector::vector(<dimension>)`, the indexed expression."""
    return f"{alias}.{HNSW_EXPRESSION.format(dimension=int(model.dimension))}"


def index_predicate(model: EmbeddingModel, alias: str = "e") -> str:
    """`<alias>.model_number = <number> AND <alias>.replaced_at IS NULL`, the index's
    predicate (a query's WHERE must imply it for the planner to use the index)."""
    number = int(model.number)
    return f"{alias}.model_number = {number} AND {alias}.replaced_at IS NULL"


_MODEL_COLUMNS = (
    "number, app_id, id, dimension, media_types, accepts_text, source, description, fingerprint,"
    " active"
)

LOCK_INSTALLATION_MODEL = (
    f"SELECT {_MODEL_COLUMNS} FROM embedding_models WHERE app_id = '' AND id = $1 FOR UPDATE"
)
INSERT_INSTALLATION_MODEL = f"""
INSERT INTO embedding_models (app_id, id, dimension, media_types, accepts_text, source,
                              description, fingerprint)
VALUES ('', $1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (app_id, id) DO NOTHING
RETURNING {_MODEL_COLUMNS}
"""
UPDATE_INSTALLATION_MODEL = f"""
UPDATE embedding_models
SET dimension = $2, media_types = $3, accepts_text = $4, source = $5, description = $6,
    fingerprint = $7, active = true
WHERE number = $1
RETURNING {_MODEL_COLUMNS}
"""
# A changed model's vectors are not the model's any more: those no version captured go,
# the captured ones stop being current, and failures are forgotten (the job retries).
DELETE_UNCAPTURED_CURRENT = """
DELETE FROM embeddings e
WHERE e.model_number = $1 AND e.replaced_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM version_embeddings v WHERE v.embedding_id = e.id)
"""
REPLACE_CURRENT = (
    "UPDATE embeddings SET replaced_at = now() WHERE model_number = $1 AND replaced_at IS NULL"
)
CLEAR_FAILURES = "DELETE FROM embedding_failures WHERE model_number = $1"

DEACTIVATE_OTHER_INSTALLATION_MODELS = """
UPDATE embedding_models SET active = false
WHERE app_id = '' AND active AND NOT (id = ANY($1::text[]))
"""
_LIVE = "(app_id <> '' OR active)"
MODELS = f"""
SELECT {_MODEL_COLUMNS} FROM embedding_models WHERE app_id IN ('', $1) AND {_LIVE}
ORDER BY id, app_id
"""
# An installation model wins over a client model of the same id ('' sorts first).
MODEL = f"""
SELECT {_MODEL_COLUMNS} FROM embedding_models WHERE app_id IN ('', $1) AND id = $2 AND {_LIVE}
ORDER BY app_id LIMIT 1
"""
INSERT_CLIENT_MODEL = """
INSERT INTO embedding_models (app_id, id, dimension, media_types, source)
VALUES ($1, $2, $3, $4, 'client')
ON CONFLICT (app_id, id) DO NOTHING
"""
CLIENT_MODEL = f"SELECT {_MODEL_COLUMNS} FROM embedding_models WHERE app_id = $1 AND id = $2"
EMBEDDED_COUNTS = """
SELECT model_number, count(*) AS n FROM embeddings
WHERE app_id = $1 AND replaced_at IS NULL
GROUP BY model_number
"""

# The inputs are locked (KEY SHARE, in key order like a delete's) before their vectors
# are touched: a concurrent delete either committed first (the input gets no vector) or
# waits for this transaction, after which its trigger marks the new vector replaced.
# `live` is read in full (the count) so that every lock is taken, whatever the plan.
MARK_REPLACED = """
WITH live AS (
    SELECT t.app_id, t.input_id
    FROM unnest($2::text[], $3::text[]) AS t(app_id, input_id)
    JOIN inputs i ON i.app_id = t.app_id AND i.id = t.input_id
    ORDER BY t.app_id, t.input_id
    FOR KEY SHARE OF i),
marked AS (
    UPDATE embeddings e SET replaced_at = now()
    FROM live
    WHERE e.app_id = live.app_id AND e.input_id = live.input_id AND e.model_number = $1
      AND e.replaced_at IS NULL)
SELECT count(*) FROM live
"""
# Only inputs that still exist get a vector. A concurrent put of the same input and model
# that committed first keeps its vector (the same model gives the same vector).
INSERT_CURRENT = """
WITH given AS (
    SELECT t.app_id, t.input_id, t.vector
    FROM unnest($2::text[], $3::text[], $4::vector[]) AS t(app_id, input_id, vector)
    WHERE EXISTS (SELECT 1 FROM inputs i WHERE i.app_id = t.app_id AND i.id = t.input_id)),
cleared AS (
    DELETE FROM embedding_failures f USING given
    WHERE f.app_id = given.app_id AND f.input_id = given.input_id AND f.model_number = $1)
INSERT INTO embeddings (app_id, input_id, model_number, vector)
SELECT app_id, input_id, $1, vector FROM given
ON CONFLICT (app_id, input_id, model_number) WHERE replaced_at IS NULL DO NOTHING
"""
RECORD_FAILURES = """
INSERT INTO embedding_failures (app_id, input_id, model_number, error)
SELECT t.app_id, t.input_id, $1, t.error
FROM unnest($2::text[], $3::text[], $4::text[]) AS t(app_id, input_id, error)
WHERE EXISTS (SELECT 1 FROM inputs i WHERE i.app_id = t.app_id AND i.id = t.input_id)
ON CONFLICT (app_id, input_id, model_number)
DO UPDATE SET error = EXCLUDED.error, failed_at = now()
"""
CLIENT_VECTORS = """
SELECT e.input_id, m.id AS model_id, e.vector
FROM embeddings e JOIN embedding_models m ON m.number = e.model_number
WHERE e.app_id = $1 AND e.input_id = ANY($2::text[]) AND e.replaced_at IS NULL
  AND m.source = 'client'
ORDER BY e.input_id, m.id
"""
CURRENT_VECTOR = """
SELECT vector FROM embeddings
WHERE app_id = $1 AND input_id = $2 AND model_number = $3 AND replaced_at IS NULL
"""
CAPTURED_VECTOR = """
SELECT e.vector FROM version_embeddings v JOIN embeddings e ON e.id = v.embedding_id
WHERE v.app_id = $1 AND v.dataset_id = $2 AND v.version_id = $3 AND v.input_id = $4
  AND e.model_number = $5
"""
# Installation models of the input's media type, and every model with a vector of it.
STATES = """
SELECT m.id AS model_id, e.created_at AS embedded_at, f.error, f.failed_at,
       CASE WHEN $3 THEN e.vector END AS vector
FROM inputs i
JOIN embedding_models m ON m.app_id IN ('', i.app_id) AND (m.app_id <> '' OR m.active)
LEFT JOIN embeddings e
    ON e.app_id = i.app_id AND e.input_id = i.id AND e.model_number = m.number
   AND e.replaced_at IS NULL
LEFT JOIN embedding_failures f
    ON f.app_id = i.app_id AND f.input_id = i.id AND f.model_number = m.number
WHERE i.app_id = $1 AND i.id = $2
  AND ((m.app_id = '' AND i.media_type = ANY(m.media_types)) OR e.id IS NOT NULL)
ORDER BY m.id, m.app_id
"""
# Texts qualify with their content; images and other media with a stored original or a
# URL (the job fetches it, or records why it cannot).
_PENDING_WHERE = """
    i.media_type = ANY($2::text[])
    AND (i.media_type <> 'text' OR i.text_raw IS NOT NULL)
    AND NOT EXISTS (
        SELECT 1 FROM embeddings e
        WHERE e.app_id = i.app_id AND e.input_id = i.id AND e.model_number = $1
          AND e.replaced_at IS NULL)
    AND NOT EXISTS (
        SELECT 1 FROM embedding_failures f
        WHERE f.app_id = i.app_id AND f.input_id = i.id AND f.model_number = $1)
"""
# From seq {start} on (see PgEmbeddingRepository.pending), formatted in as an integer
# literal: the plan depends on how many inputs follow it (an index range scan of a short
# tail with index probes, a hash anti-join of a long one), which a cached generic plan of a
# parameter would not know.
PENDING = f"""
SELECT i.seq, i.app_id, i.id, i.media_type, i.blob_key, i.text_raw, i.source_url
FROM inputs i
WHERE {_PENDING_WHERE} AND i.seq >= {{start}}
ORDER BY i.seq LIMIT $3
"""
APPS_WITH_PENDING = f"""
SELECT DISTINCT i.app_id FROM inputs i WHERE {_PENDING_WHERE} AND i.seq >= {{start}}
ORDER BY 1
"""
# Pending media inputs that only reference a URL, failed in one statement when the
# installation does not fetch URLs (rather than read, and failed, a batch at a time).
FAIL_UNFETCHED = f"""
INSERT INTO embedding_failures (app_id, input_id, model_number, error)
SELECT i.app_id, i.id, $1, $3 FROM inputs i
WHERE {_PENDING_WHERE} AND i.seq >= {{start}}
  AND i.media_type <> 'text' AND i.blob_key IS NULL AND i.source_url <> ''
ON CONFLICT (app_id, input_id, model_number)
DO UPDATE SET error = EXCLUDED.error, failed_at = now()
"""
LAST_SEQ = "SELECT coalesce(max(seq), 0) FROM inputs"

# Models whose index is missing or left invalid by an interrupted build.
UNINDEXED_MODELS = """
SELECT m.number, m.dimension, c.oid IS NOT NULL AS present
FROM embedding_models m
LEFT JOIN pg_class c
    ON c.relname = 'embeddings_hnsw_' || m.number AND c.relkind = 'i'
   AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'embeddings'::regclass)
LEFT JOIN pg_index x ON x.indexrelid = c.oid
WHERE c.oid IS NULL OR NOT x.indisvalid
ORDER BY m.number
"""
# A build capturing a vector locks it (its foreign key) and so is never collected under
# it; SKIP LOCKED leaves such rows for a later round. Only a vector replaced and collected
# between a capture's snapshot and its lock makes that capture fail (the build is retried).
COLLECT_REPLACED = """
DELETE FROM embeddings WHERE id IN (
    SELECT e.id FROM embeddings e
    WHERE e.replaced_at IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM version_embeddings v WHERE v.embedding_id = e.id)
    ORDER BY e.replaced_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED)
"""

_CLIENT_MEDIA_TYPES = [m.value for m in MediaType]
# How often `pending` looks at every input again rather than from its hint on.
FULL_SCAN_SECONDS = 300.0


def _row_to_model(row: asyncpg.Record) -> EmbeddingModel:
    return EmbeddingModel(
        app_id=row["app_id"],
        id=row["id"],
        number=row["number"],
        dimension=row["dimension"],
        media_types=frozenset(MediaType(m) for m in row["media_types"]),
        accepts_text_queries=row["accepts_text"],
        source=EmbeddingSource(row["source"]),
        description=row["description"],
    )


def to_vector(values: Sequence[float]) -> Vector:
    """The codec's parameter: pgvector.Vector takes a list or a numpy array only."""
    return Vector(values if isinstance(values, list) else list(values))


def from_vector(value: Any) -> tuple[float, ...]:
    return tuple(value.to_list())


class PgEmbeddingRepository(Repository):
    """The domain's EmbeddingRepository."""

    def __init__(self, db: Database, *, full_scan_seconds: float = FULL_SCAN_SECONDS) -> None:
        super().__init__(db)
        self._full_scan_seconds = full_scan_seconds
        # Model number -> (the seq before which every input was found embedded or failed,
        # when every input was last looked at): see `pending`.
        self._hints: dict[int, tuple[int, float]] = {}

    async def sync_installation_models(self, specs: Sequence[ModelSpec]) -> list[EmbeddingModel]:
        models = []
        for spec in specs:
            async with self._db.transaction(), self._db.connection() as conn:
                models.append(await self._sync(conn, spec))
        await self._db.execute(DEACTIVATE_OTHER_INSTALLATION_MODELS, [s.id for s in specs])
        return models

    async def _sync(self, conn: Connection, spec: ModelSpec) -> EmbeddingModel:
        values = (
            spec.dimension,
            sorted(m.value for m in spec.media_types),
            spec.accepts_text_queries,
            spec.source.value,
            spec.description,
            spec.fingerprint,
        )
        row = await conn.fetchrow(LOCK_INSTALLATION_MODEL, spec.id)
        if row is None:
            row = await conn.fetchrow(INSERT_INSTALLATION_MODEL, spec.id, *values)
            if row is not None:
                return _row_to_model(row)
            # Another replica registered it meanwhile.
            row = await conn.fetchrow(LOCK_INSTALLATION_MODEL, spec.id)
            assert row is not None
        stored = (
            row["dimension"],
            sorted(row["media_types"]),
            row["accepts_text"],
            row["source"],
            row["description"],
            row["fingerprint"],
        )
        if stored == values and row["active"]:
            return _row_to_model(row)
        number = row["number"]
        if row["fingerprint"] != spec.fingerprint or row["dimension"] != spec.dimension:
            await conn.execute(DELETE_UNCAPTURED_CURRENT, number)
            await conn.execute(REPLACE_CURRENT, number)
            await conn.execute(CLEAR_FAILURES, number)
            self._hints.pop(number, None)
            if row["dimension"] != spec.dimension:
                # Its expression casts to the old dimension: new vectors would not fit.
                name = HNSW_INDEX_NAME.format(number=int(number))
                await conn.execute(DROP_HNSW_IN_TRANSACTION.format(name=name))
        updated = await conn.fetchrow(UPDATE_INSTALLATION_MODEL, number, *values)
        assert updated is not None  # locked above
        return _row_to_model(updated)

    async def models(self, app_id: str) -> list[EmbeddingModel]:
        return await self._all(_row_to_model, MODELS, app_id)

    async def model(self, app_id: str, model_id: str) -> EmbeddingModel | None:
        return await self._one(_row_to_model, MODEL, app_id, model_id)

    async def client_model(self, app_id: str, model_id: str, dimension: int) -> EmbeddingModel:
        # Two calls giving the first vectors of a model at once: both find the one row.
        await self._db.execute(
            INSERT_CLIENT_MODEL, app_id, model_id, dimension, _CLIENT_MEDIA_TYPES
        )
        model = await self._one(_row_to_model, CLIENT_MODEL, app_id, model_id)
        assert model is not None
        return model

    async def embedded_counts(self, app_id: str) -> dict[int, int]:
        rows = await self._db.fetch(EMBEDDED_COUNTS, app_id)
        return {r["model_number"]: r["n"] for r in rows}

    async def put(
        self, app_id: str, input_id: str, model: EmbeddingModel, vector: Sequence[float]
    ) -> None:
        await self.put_many(model, [(app_id, input_id, vector)])

    async def put_many(
        self, model: EmbeddingModel, vectors: Sequence[tuple[str, str, Sequence[float]]]
    ) -> None:
        if not vectors:
            return
        for _, input_id, vector in vectors:
            if len(vector) != model.dimension:
                raise ValueError(
                    f"a vector of {len(vector)} dimensions for input {input_id!r} of model"
                    f" {model.id!r} ({model.dimension} dimensions)"
                )
        app_ids = [a for a, _, _ in vectors]
        input_ids = [i for _, i, _ in vectors]
        async with self._db.transaction(), self._db.connection() as conn:
            await conn.fetchval(MARK_REPLACED, model.number, app_ids, input_ids)
            await conn.execute(
                INSERT_CURRENT,
                model.number,
                app_ids,
                input_ids,
                [to_vector(v) for _, _, v in vectors],
            )

    async def record_failures(
        self, model: EmbeddingModel, failures: Sequence[tuple[str, str, str]]
    ) -> None:
        # One row per input (the last error wins): ON CONFLICT DO UPDATE may not touch a
        # row twice in one statement.
        latest = {(app_id, input_id): error for app_id, input_id, error in failures}
        if not latest:
            return
        await self._db.execute(
            RECORD_FAILURES,
            model.number,
            [a for a, _ in latest],
            [i for _, i in latest],
            list(latest.values()),
        )

    async def client_vectors(
        self, app_id: str, input_ids: Sequence[str]
    ) -> dict[str, list[ClientVector]]:
        found: dict[str, list[ClientVector]] = {}
        if not input_ids:
            return found
        for row in await self._db.fetch(CLIENT_VECTORS, app_id, list(input_ids)):
            found.setdefault(row["input_id"], []).append(
                ClientVector(row["model_id"], from_vector(row["vector"]))
            )
        return found

    async def vector_of(
        self,
        app_id: str,
        input_id: str,
        model: EmbeddingModel,
        version: tuple[str, str] | None = None,
    ) -> tuple[float, ...] | None:
        if version is None:
            value = await self._db.fetchval(CURRENT_VECTOR, app_id, input_id, model.number)
        else:
            dataset_id, version_id = version
            value = await self._db.fetchval(
                CAPTURED_VECTOR, app_id, dataset_id, version_id, input_id, model.number
            )
        return None if value is None else from_vector(value)

    async def states(self, app_id: str, input_id: str, *, vectors: bool) -> list[InputEmbedding]:
        rows = await self._db.fetch(STATES, app_id, input_id, vectors)
        states = []
        for row in rows:
            if row["embedded_at"] is not None:
                vector = () if row["vector"] is None else from_vector(row["vector"])
                states.append(
                    InputEmbedding(
                        row["model_id"],
                        EmbeddingState.READY,
                        vector=vector,
                        updated_at=row["embedded_at"],
                    )
                )
            elif row["failed_at"] is not None:
                states.append(
                    InputEmbedding(
                        row["model_id"],
                        EmbeddingState.FAILED,
                        error=row["error"],
                        updated_at=row["failed_at"],
                    )
                )
            else:
                states.append(InputEmbedding(row["model_id"], EmbeddingState.PENDING))
        return states

    async def pending(self, model: EmbeddingModel, limit: int) -> list[PendingInput]:
        """Finding the few inputs without a vector among many means an anti-join of every
        input with every vector (~250 ms at 100k inputs). Most calls look only from the
        seq where the previous call found the first pending input on (the job embeds in
        seq order, new inputs get larger seqs): an index range scan of the tail. An input
        whose insert committed after a larger seq was seen, or one that became pending
        again behind the hint (a model changed by another replica), is found by the full
        look every FULL_SCAN_SECONDS."""
        media = sorted(m.value for m in model.media_types)
        now = time.monotonic()
        hint = self._hints.get(model.number)
        full = hint is None or now - hint[1] >= self._full_scan_seconds
        # Read before the inputs: whatever commits in between is seen by the next query.
        last = await self._db.fetchval(LAST_SEQ)
        start = 0 if full or hint is None else hint[0]
        rows = await self._db.fetch(PENDING.format(start=int(start)), model.number, media, limit)
        after = rows[0]["seq"] if rows else last + 1
        self._hints[model.number] = (after, now if full or hint is None else hint[1])
        return [
            PendingInput(
                app_id=r["app_id"],
                input_id=r["id"],
                media_type=MediaType(r["media_type"]),
                blob_key=r["blob_key"],
                text=r["text_raw"],
                source_url=r["source_url"],
            )
            for r in rows
        ]

    async def fail_unfetched(self, model: EmbeddingModel, error: str) -> int:
        media = sorted(m.value for m in model.media_types)
        hint = self._hints.get(model.number)
        fresh = hint is not None and time.monotonic() - hint[1] < self._full_scan_seconds
        start = hint[0] if fresh and hint is not None else 0
        sql = FAIL_UNFETCHED.format(start=int(start))
        return await self._db.affected(sql, model.number, media, error)

    async def apps_with_pending(self, model: EmbeddingModel) -> list[str]:
        media = sorted(m.value for m in model.media_types)
        hint = self._hints.get(model.number)
        fresh = hint is not None and time.monotonic() - hint[1] < self._full_scan_seconds
        start = hint[0] if fresh and hint is not None else 0
        rows = await self._db.fetch(APPS_WITH_PENDING.format(start=int(start)), model.number, media)
        return [r["app_id"] for r in rows]

    async def ensure_indexes(self) -> None:
        """Never from inside a transaction that wrote embeddings: the concurrent build
        waits for every transaction using the table, that one included."""
        # A plain connection of the pool: CREATE INDEX CONCURRENTLY refuses to run in a
        # transaction, and takes minutes on a large table (writes go on meanwhile).
        async with self._db.acquire() as conn:
            missing = await conn.fetch(UNINDEXED_MODELS)
            if not missing:
                return
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", INDEX_LOCK_ID):
                return  # another replica is building them
            try:
                # Read again under the lock: the holder before us may have built them.
                for row in await conn.fetch(UNINDEXED_MODELS):
                    number, dimension = int(row["number"]), int(row["dimension"])
                    name = HNSW_INDEX_NAME.format(number=number)
                    if row["present"]:
                        # Invalid: a build was interrupted (crash, cancel).
                        await conn.execute(DROP_HNSW.format(name=name))
                    await conn.execute(
                        CREATE_HNSW.format(name=name, number=number, dimension=dimension)
                    )
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", INDEX_LOCK_ID)

    async def collect_replaced(self, limit: int) -> int:
        return rows_affected(await self._db.execute(COLLECT_REPLACED, limit))
