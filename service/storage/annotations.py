"""PostgreSQL repository of annotations.

Batches travel as parallel arrays expanded by unnest(), one round trip per batch.
JSON goes as text and is cast in SQL: asyncpg would encode a JSON list nested in a
jsonb[] parameter as a multi-dimensional array.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from service.domain.annotation_rules import summarize
from service.domain.models import AnnotatedMedia, Annotation, AnnotationQuery, MediaType
from service.storage.db import Repository
from service.storage.rows import record

_COLUMNS = (
    "a.app_id, a.id, a.input_id, a.seq, a.input_level, a.data, a.annotation_info,"
    " a.created_at, a.modified_at"
)

INPUT_MEDIA = """
SELECT id, media_type, media_info FROM inputs WHERE app_id = $1 AND id = ANY($2::text[])
"""
# NO KEY UPDATE conflicts with itself but not with the foreign-key checks of rows that
# reference the input (dataset membership), which need not wait for annotation writes.
# The lock is a statement of its own: counts read in the same statement would come from
# a snapshot taken before waiting for the lock, and miss what the other writer committed.
LOCK_INPUTS = """
SELECT id FROM inputs WHERE app_id = $1 AND id = ANY($2::text[])
ORDER BY id FOR NO KEY UPDATE
"""
LOAD = """
SELECT
    (SELECT coalesce(jsonb_object_agg(c.input_id, c.n), '{}'::jsonb) FROM (
        SELECT input_id, count(*) AS n FROM annotations
        WHERE app_id = $1 AND input_id = ANY($2::text[]) GROUP BY input_id) c) AS counts,
    ARRAY(SELECT id FROM annotations WHERE app_id = $1 AND id = ANY($3::text[])) AS taken
"""
INSERT = f"""
INSERT INTO annotations AS a (app_id, id, input_id, data, annotation_info, positive_concepts,
                              region_counts, frame_count)
SELECT $1, t.id, t.input_id, t.data::jsonb, t.info::jsonb,
       ARRAY(SELECT jsonb_array_elements_text(t.positive::jsonb)), t.region_counts::jsonb,
       t.frame_count
FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::int[])
     WITH ORDINALITY AS t(id, input_id, data, info, positive, region_counts, frame_count, n)
-- Sequence numbers follow the request order, and so do list pages.
ORDER BY t.n
ON CONFLICT (app_id, id) DO NOTHING
RETURNING {_COLUMNS}
"""
# The same insert when the caller needs only how many were written (CreateInputs).
INSERT_COUNTED = f"""
WITH written AS ({INSERT.replace(f"RETURNING {_COLUMNS}", "RETURNING 1")})
SELECT count(*) FROM written
"""
GET_MANY = f"""
SELECT {_COLUMNS} FROM annotations a WHERE a.app_id = $1 AND a.id = ANY($2::text[])
ORDER BY a.id
"""
LOCK_MANY = GET_MANY + " FOR UPDATE"
# NULL means "any" for each condition, so one statement serves every filter.
PAGE = f"""
SELECT {_COLUMNS} FROM annotations a
WHERE a.app_id = $1
  AND ($2::text[] IS NULL OR a.input_id = ANY($2::text[]))
  AND ($3::text IS NULL OR EXISTS (
      SELECT 1 FROM dataset_inputs m
      WHERE m.app_id = a.app_id AND m.dataset_id = $3::text AND m.input_id = a.input_id))
  AND ($4::bigint IS NULL OR a.seq > $4::bigint)
ORDER BY a.seq LIMIT $5
"""
UPDATE = f"""
UPDATE annotations a
SET data = t.data::jsonb, annotation_info = t.info::jsonb,
    positive_concepts = ARRAY(SELECT jsonb_array_elements_text(t.positive::jsonb)),
    region_counts = t.region_counts::jsonb, frame_count = t.frame_count,
    modified_at = greatest(now(), a.modified_at + interval '1 microsecond')
FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int[])
     AS t(id, data, info, positive, region_counts, frame_count)
WHERE a.app_id = $1 AND a.id = t.id
RETURNING {_COLUMNS}
"""
DELETE = "DELETE FROM annotations WHERE app_id = $1 AND id = ANY($2::text[])"
DELETE_FOR_INPUTS = "DELETE FROM annotations WHERE app_id = $1 AND input_id = ANY($2::text[])"


def _row_to_annotation(row: asyncpg.Record) -> Annotation:
    return record(Annotation, row)


def _content_columns(annotations: list[Annotation]) -> list[list[Any]]:
    """data, annotation_info and the columns derived from data for filters and statistics."""
    summaries = [summarize(a.data) for a in annotations]
    return [
        [json.dumps(a.data) for a in annotations],
        [json.dumps(a.annotation_info) for a in annotations],
        [json.dumps(sorted(s.positive_concepts)) for s in summaries],
        [json.dumps(s.region_counts) for s in summaries],
        [s.frame_count for s in summaries],
    ]


class PgAnnotationRepository(Repository):
    async def input_media(self, app_id: str, input_ids: list[str]) -> dict[str, AnnotatedMedia]:
        if not input_ids:
            return {}
        rows = await self._db.fetch(INPUT_MEDIA, app_id, input_ids)
        return {r["id"]: AnnotatedMedia(MediaType(r["media_type"]), r["media_info"]) for r in rows}

    async def lock_inputs(
        self, app_id: str, input_ids: list[str], annotation_ids: list[str]
    ) -> tuple[dict[str, int], set[str]]:
        async with self._db.connection() as conn:
            locked = [r["id"] for r in await conn.fetch(LOCK_INPUTS, app_id, input_ids)]
            row = await conn.fetchrow(LOAD, app_id, locked, annotation_ids)
        assert row is not None
        counts: dict[str, int] = row["counts"]
        return {i: counts.get(i, 0) for i in locked}, set(row["taken"])

    async def insert_many(self, annotations: list[Annotation]) -> list[Annotation]:
        return await self._write(INSERT, annotations, [a.input_id for a in annotations])

    async def add_many(self, annotations: list[Annotation]) -> int:
        if not annotations:
            return 0
        count: int = await self._db.fetchval(
            INSERT_COUNTED,
            annotations[0].app_id,
            [a.id for a in annotations],
            [a.input_id for a in annotations],
            *_content_columns(annotations),
        )
        return count

    async def get_many(
        self, app_id: str, ids: list[str], *, lock: bool = False
    ) -> list[Annotation]:
        return await self._all(_row_to_annotation, LOCK_MANY if lock else GET_MANY, app_id, ids)

    async def page(
        self, query: AnnotationQuery, after_seq: int | None, limit: int
    ) -> list[tuple[int, Annotation]]:
        return await self._page(
            _row_to_annotation,
            PAGE,
            query.app_id,
            query.input_ids,
            query.dataset_id,
            after_seq,
            limit,
        )

    async def update_many(self, annotations: list[Annotation]) -> list[Annotation]:
        return await self._write(UPDATE, annotations)

    async def _write(
        self, sql: str, annotations: list[Annotation], *columns: list[Any]
    ) -> list[Annotation]:
        """Runs an INSERT or UPDATE of one app's annotations, whose parameters are the app,
        the ids, `columns` and the content columns; returns the rows written."""
        if not annotations:
            return []
        ids = [a.id for a in annotations]
        return await self._all(
            _row_to_annotation,
            sql,
            annotations[0].app_id,
            ids,
            *columns,
            *_content_columns(annotations),
        )

    async def delete(self, app_id: str, ids: list[str]) -> int:
        return await self._db.affected(DELETE, app_id, ids)

    async def delete_for_inputs(self, app_id: str, input_ids: list[str]) -> int:
        return await self._db.affected(DELETE_FOR_INPUTS, app_id, input_ids)
