"""PostgreSQL repository of input contents: each input's serialized content, stored once
per distinct content (input_contents, migration 0014), the inputs' references to it, and
the collection of content nothing refers to any more."""

from __future__ import annotations

import dataclasses
import json

import asyncpg

from service.domain.models import InputContent, VersionMetrics
from service.storage.db import Repository

# Writers of references to content (an input's refresh, a version's creation) hold it
# shared until they commit; the collector takes it exclusively, so that it never deletes
# content a transaction it cannot see yet is about to refer to.
CONTENT_LOCK_ID = 0x64617461_636F_6E74
METRIC_FIELDS = tuple(f.name for f in dataclasses.fields(VersionMetrics))

# The inputs this transaction made stale (stale_xid is the top-level transaction's id,
# also within savepoints). Nothing when the transaction has no id: it wrote nothing.
OWN_STALE = """
SELECT app_id, id FROM inputs
WHERE content_hash IS NULL AND stale_xid = pg_current_xact_id_if_assigned()::text::bigint
ORDER BY app_id, id
"""
# Stale members of a dataset; locked, so that a concurrent refresh of the same inputs
# waits for this one (and then finds them fresh).
DATASET_STALE = """
SELECT i.app_id, i.id FROM inputs i
WHERE i.app_id = $1 AND i.content_hash IS NULL
  AND EXISTS (SELECT 1 FROM dataset_inputs m
              WHERE m.app_id = i.app_id AND m.dataset_id = $2 AND m.input_id = i.id)
ORDER BY i.id
LIMIT $3
FOR UPDATE OF i
"""
# Inputs any path left stale, for the maintenance loop; those another transaction holds
# are skipped (it refreshes them itself).
ANY_STALE = """
SELECT app_id, id FROM inputs WHERE content_hash IS NULL
ORDER BY app_id, id
LIMIT $1
FOR UPDATE SKIP LOCKED
"""
SHARE_LOCK = f"SELECT pg_advisory_xact_lock_shared({CONTENT_LOCK_ID})"
# Content already stored keeps its bytes (the same, by its hash); content moved here from
# versions built before migration 0014 gets the columns it lacked.
STORE = """
WITH stored AS (
    INSERT INTO input_contents (hash, data, media_type, metadata, concepts, annotated,
                                longitude, latitude, created_at, metrics)
    SELECT DISTINCT ON (t.hash) t.hash, t.data, t.media_type, t.metadata,
           ARRAY(SELECT jsonb_array_elements_text(t.concepts::jsonb)), t.annotated,
           t.longitude, t.latitude, t.created_at, t.metrics::integer[]
    FROM unnest($3::bytea[], $4::bytea[], $5::text[], $6::jsonb[], $7::text[], $8::boolean[],
                $9::float8[], $10::float8[], $11::timestamptz[], $12::text[])
         AS t(hash, data, media_type, metadata, concepts, annotated, longitude, latitude,
              created_at, metrics)
    ON CONFLICT (hash) DO UPDATE
    SET media_type = excluded.media_type, metadata = excluded.metadata,
        concepts = excluded.concepts, annotated = excluded.annotated,
        longitude = excluded.longitude, latitude = excluded.latitude,
        created_at = excluded.created_at, metrics = excluded.metrics
    WHERE input_contents.metrics IS NULL
    RETURNING 1)
UPDATE inputs i SET content_hash = t.hash
FROM unnest($1::text[], $2::text[], $3::bytea[]) AS t(app_id, id, hash)
WHERE i.app_id = t.app_id AND i.id = t.id AND i.content_hash IS NULL
"""
# Candidates are taken off the list whatever the outcome: content still referred to is
# put on it again when its last reference goes.
COLLECT = """
WITH taken AS (
    DELETE FROM content_candidates
    WHERE hash IN (SELECT hash FROM content_candidates LIMIT $1 FOR UPDATE SKIP LOCKED)
    RETURNING hash),
gone AS (
    DELETE FROM input_contents c USING taken
    WHERE c.hash = taken.hash
      AND NOT EXISTS (SELECT 1 FROM inputs i WHERE i.content_hash = c.hash)
      AND NOT EXISTS (SELECT 1 FROM version_inputs v WHERE v.content_hash = c.hash)
    RETURNING 1)
SELECT (SELECT count(*) FROM taken) AS taken, (SELECT count(*) FROM gone) AS gone
"""
# The collector waits at most this long for writers to commit; it tries again next round.
COLLECT_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '2s'"
EXCLUSIVE_LOCK = f"SELECT pg_advisory_xact_lock({CONTENT_LOCK_ID})"


def metrics_literal(metrics: VersionMetrics) -> str:
    return "{" + ",".join(str(getattr(metrics, name)) for name in METRIC_FIELDS) + "}"


def metrics_sums(alias: str) -> str:
    """SELECT items summing the metrics of `alias`.metrics, one per VersionMetrics field."""
    return ", ".join(
        f"coalesce(sum({alias}.metrics[{i}]), 0)::integer AS {name}"
        for i, name in enumerate(METRIC_FIELDS, start=1)
    )


class PgContentRepository(Repository):
    """The domain's ContentRepository."""

    async def own_stale(self) -> list[tuple[str, str]]:
        rows = await self._db.fetch(OWN_STALE)
        return [(r["app_id"], r["id"]) for r in rows]

    async def dataset_stale(self, app_id: str, dataset_id: str, limit: int) -> list[str]:
        rows = await self._db.fetch(DATASET_STALE, app_id, dataset_id, limit)
        return [r["id"] for r in rows]

    async def any_stale(self, limit: int) -> list[tuple[str, str]]:
        rows = await self._db.fetch(ANY_STALE, limit)
        return [(r["app_id"], r["id"]) for r in rows]

    async def share_lock(self) -> None:
        await self._db.execute(SHARE_LOCK)

    async def store(self, contents: list[InputContent]) -> None:
        if not contents:
            return
        await self.share_lock()
        await self._db.execute(
            STORE,
            [c.app_id for c in contents],
            [c.input_id for c in contents],
            [c.content_hash for c in contents],
            [c.data for c in contents],
            [c.media_type.value for c in contents],
            [c.metadata for c in contents],
            [json.dumps(list(c.concepts)) for c in contents],
            [c.annotated for c in contents],
            [None if c.geo is None else c.geo.longitude for c in contents],
            [None if c.geo is None else c.geo.latitude for c in contents],
            [c.created_at for c in contents],
            [metrics_literal(c.metrics) for c in contents],
        )

    async def collect(self, limit: int) -> int:
        """Deletes up to `limit` candidates' content that nothing refers to; how many
        were deleted. Gives up (0) when writers hold the lock longer than the timeout: the
        next round tries again."""
        try:
            async with self._db.transaction(), self._db.connection() as conn:
                await conn.execute(COLLECT_LOCK_TIMEOUT)
                await conn.execute(EXCLUSIVE_LOCK)
                row = await conn.fetchrow(COLLECT, limit)
        except asyncpg.exceptions.LockNotAvailableError:
            return 0
        assert row is not None
        return int(row["gone"])
