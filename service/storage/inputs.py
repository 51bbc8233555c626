"""PostgreSQL repositories of inputs and dataset membership."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from service.domain.annotation_fields import json_number
from service.domain.models import (
    DatasetGuard,
    DatasetMember,
    GeoPoint,
    Input,
    InputQuery,
    MediaType,
    StoredBlob,
)
from service.storage.db import Database, Repository
from service.storage.rows import BLOB_COLUMNS, record, stored_blob

_INPUT_COLUMNS = """
    i.app_id, i.id, i.seq, i.media_type, i.source_url, i.text_raw, i.media_info, i.metadata,
    i.longitude, i.latitude, i.title, i.created_at, i.modified_at,
    b.key AS blob_key, b.sha256 AS blob_sha256, b.size AS blob_size,
    b.content_type AS blob_content_type,
    coalesce(l.data -> 'concepts', '[]'::jsonb) AS concepts,
    ARRAY(SELECT d.dataset_id FROM dataset_inputs d
          WHERE d.app_id = i.app_id AND d.input_id = i.id ORDER BY d.dataset_id) AS dataset_ids
"""
_INPUT_JOINS = """
    LEFT JOIN blobs b ON b.key = i.blob_key
    LEFT JOIN annotations l ON l.app_id = i.app_id AND l.input_id = i.id AND l.input_level
"""

INSERT_INPUTS = """
INSERT INTO inputs (app_id, id, media_type, blob_key, source_url, text_raw, media_info,
                    metadata, longitude, latitude, title)
SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::jsonb[], $8::jsonb[], $9::float8[], $10::float8[], $11::text[])
ON CONFLICT (app_id, id) DO NOTHING
RETURNING id, created_at
"""
INSERT_INPUT_LEVEL = """
INSERT INTO annotations (app_id, id, input_id, input_level, data, positive_concepts)
SELECT $1, t.annotation_id, t.input_id, true, t.data,
       ARRAY(SELECT jsonb_array_elements_text(t.positive::jsonb))
FROM unnest($2::text[], $3::text[], $4::jsonb[], $5::text[])
     AS t(annotation_id, input_id, data, positive)
"""
UPSERT_INPUT_LEVEL = """
INSERT INTO annotations (app_id, id, input_id, input_level, data, positive_concepts)
VALUES ($1, $2, $3, true, $4, $5)
ON CONFLICT (app_id, input_id) WHERE input_level
DO UPDATE SET data = EXCLUDED.data, positive_concepts = EXCLUDED.positive_concepts,
              modified_at = now()
"""
DELETE_INPUT_LEVEL = "DELETE FROM annotations WHERE app_id = $1 AND input_id = $2 AND input_level"
INSERT_MEMBERS = """
INSERT INTO dataset_inputs (app_id, dataset_id, input_id)
SELECT $1, * FROM unnest($2::text[], $3::text[])
ON CONFLICT DO NOTHING
"""
EXISTING_IDS = "SELECT id FROM inputs WHERE app_id = $1 AND id = ANY($2::text[])"
# Each EXISTS is served by the blob_key index of its table (few rows share a blob).
HELD_BLOB = """
SELECT b.key, b.sha256, b.size, b.content_type FROM blobs b
WHERE b.key = $2
  AND (EXISTS (SELECT 1 FROM inputs WHERE blob_key = b.key AND app_id = $1)
       OR EXISTS (SELECT 1 FROM version_inputs WHERE blob_key = b.key AND app_id = $1))
"""
GET_MANY = f"""
SELECT {_INPUT_COLUMNS} FROM inputs i {_INPUT_JOINS}
WHERE i.app_id = $1 AND i.id = ANY($2::text[]) ORDER BY i.seq
"""
LOCK_MANY = (
    "SELECT id FROM inputs WHERE app_id = $1 AND id = ANY($2::text[]) ORDER BY id FOR UPDATE"
)
UPDATE_INPUT = """
UPDATE inputs SET metadata = $3, longitude = $4, latitude = $5, title = $6,
       modified_at = greatest(now(), modified_at + interval '1 microsecond')
WHERE app_id = $1 AND id = $2
"""
# Only while the input still points at the media that was re-encoded: a concurrent delete
# or change wins, and the re-encode of that input is reported as failed.
REPLACE_MEDIA = """
UPDATE inputs SET blob_key = $4, media_info = $5,
       modified_at = greatest(now(), modified_at + interval '1 microsecond')
WHERE app_id = $1 AND id = $2 AND blob_key = $3
"""
DELETE_INPUTS = "DELETE FROM inputs WHERE app_id = $1 AND id = ANY($2::text[]) RETURNING id"

# Every condition is optional (NULL means "any"), so one statement serves every
# combination of filters. $1 app; $2 ids; $3 dataset; $4 media types; $5 metadata
# containment; $6 concepts all present; $7 concepts all absent; $8 annotated.
_MATCH = """
    i.app_id = $1
    AND ($2::text[] IS NULL OR i.id = ANY($2::text[]))
    AND ($3::text IS NULL OR EXISTS (
        SELECT 1 FROM dataset_inputs m
        WHERE m.app_id = i.app_id AND m.dataset_id = $3::text AND m.input_id = i.id))
    AND ($4::text[] IS NULL OR i.media_type = ANY($4::text[]))
    AND ($5::jsonb IS NULL OR i.metadata @> $5::jsonb)
    AND ($6::text[] IS NULL OR $6::text[] <@ ARRAY(
        SELECT unnest(a.positive_concepts) FROM annotations a
        WHERE a.app_id = i.app_id AND a.input_id = i.id))
    AND ($7::text[] IS NULL OR NOT EXISTS (
        SELECT 1 FROM annotations a
        WHERE a.app_id = i.app_id AND a.input_id = i.id AND a.positive_concepts && $7::text[]))
    AND ($8::boolean IS NULL OR EXISTS (
        SELECT 1 FROM annotations a WHERE a.app_id = i.app_id AND a.input_id = i.id) = $8::boolean)
"""
LIST_INPUTS = f"""
SELECT {_INPUT_COLUMNS} FROM inputs i {_INPUT_JOINS}
WHERE {_MATCH} AND ($9::bigint IS NULL OR i.seq > $9::bigint)
ORDER BY i.seq LIMIT $10
"""
COUNT_MATCHING = f"SELECT count(*) FROM inputs i WHERE {_MATCH}"
DELETE_MATCHING = f"DELETE FROM inputs i WHERE {_MATCH}"

LIVE_DATASETS = """
SELECT id FROM datasets
WHERE app_id = $1 AND id = ANY($2::text[]) AND deleted_at IS NULL
ORDER BY id
"""
LOCK_LIVE_DATASETS = LIVE_DATASETS + " FOR SHARE"
GUARDED_DATASETS = """
SELECT id, locked, read_only FROM datasets
WHERE app_id = $1 AND id = ANY($2::text[]) AND deleted_at IS NULL
ORDER BY id FOR SHARE
"""
ADD_MEMBERS = """
INSERT INTO dataset_inputs (app_id, dataset_id, input_id)
SELECT $1, $2, input_id FROM unnest($3::text[]) AS t(input_id)
ON CONFLICT DO NOTHING
"""
_MEMBER_SELECT = f"""
SELECT m.seq AS member_seq, m.added_at, {_INPUT_COLUMNS}
FROM dataset_inputs m JOIN inputs i ON i.app_id = m.app_id AND i.id = m.input_id
{_INPUT_JOINS}
"""
LIST_MEMBERS = f"""{_MEMBER_SELECT}
WHERE m.app_id = $1 AND m.dataset_id = $2 AND ($3::bigint IS NULL OR m.seq > $3::bigint)
ORDER BY m.seq LIMIT $4
"""
GET_MEMBER = f"""{_MEMBER_SELECT}
WHERE m.app_id = $1 AND m.dataset_id = $2 AND m.input_id = $3
"""
REMOVE_MEMBERS = """
DELETE FROM dataset_inputs
WHERE app_id = $1 AND dataset_id = $2 AND input_id = ANY($3::text[])
"""
MERGE = """
WITH source AS (
    SELECT input_id, seq FROM dataset_inputs WHERE app_id = $1 AND dataset_id = $2),
added AS (
    INSERT INTO dataset_inputs (app_id, dataset_id, input_id)
    SELECT $1, $3, input_id FROM source ORDER BY seq
    ON CONFLICT DO NOTHING
    RETURNING 1)
SELECT (SELECT count(*) FROM added) AS added, (SELECT count(*) FROM source) AS total
"""


def row_to_input(row: asyncpg.Record) -> Input:
    geo = None
    if row["longitude"] is not None and row["latitude"] is not None:
        geo = GeoPoint(row["longitude"], row["latitude"])
    return record(
        Input,
        row,
        media_type=MediaType(row["media_type"]),
        blob=stored_blob(row, BLOB_COLUMNS),
        text=row["text_raw"],
        geo=geo,
        dataset_ids=list(row["dataset_ids"]),
    )


def _query_args(query: InputQuery) -> list[Any]:
    return [
        query.app_id,
        list(query.ids) if query.ids is not None else None,
        query.dataset_id,
        [m.value for m in query.media_types] if query.media_types else None,
        query.metadata,
        list(query.concept_ids) if query.concept_ids else None,
        list(query.negative_concept_ids) if query.negative_concept_ids else None,
        query.annotated,
    ]


def _positive(concepts: list[dict[str, Any]]) -> list[str]:
    """summarize()'s positive concepts of an input-level annotation, which holds concepts
    only: without its walk over regions and frames (it showed in the ingest profile)."""
    positive = set()
    for concept in concepts:
        concept_id = concept.get("id")
        value = json_number(concept.get("value", 0))
        if isinstance(concept_id, str) and value is not None and value > 0:
            positive.add(concept_id)
    return sorted(positive)


# Row counts after which this process re-analyzes the ingest tables (see below).
_ANALYZE_AFTER = (1_000, 10_000, 100_000)
ANALYZE_INGEST_TABLES = "ANALYZE inputs, annotations, dataset_inputs"


class PgInputRepository(Repository):
    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self._inserted = 0

    async def _refresh_statistics(self, added: int) -> None:
        """Until autovacuum first analyzes a new table, the foreign-key checks of
        annotations and memberships are planned without statistics and scan every
        input of the app: ingest into a fresh database slowed down ~5x with every
        batch. Analyzing at a few early milestones replans them (cached plans are
        invalidated by new statistics); later, autovacuum keeps up on its own."""
        before, self._inserted = self._inserted, self._inserted + added
        if any(before < mark <= self._inserted for mark in _ANALYZE_AFTER):
            async with self._db.acquire() as conn:
                await conn.execute(ANALYZE_INGEST_TABLES)

    async def insert_many(self, inputs: list[Input]) -> dict[str, datetime]:
        if not inputs:
            return {}
        app_id = inputs[0].app_id
        async with self._db.connection() as conn:
            inserted = {
                r["id"]: r["created_at"]
                for r in await conn.fetch(
                    INSERT_INPUTS,
                    app_id,
                    [i.id for i in inputs],
                    [i.media_type.value for i in inputs],
                    [i.blob.key if i.blob else None for i in inputs],
                    [i.source_url for i in inputs],
                    [i.text for i in inputs],
                    [i.media_info for i in inputs],
                    [i.metadata for i in inputs],
                    [i.geo.longitude if i.geo else None for i in inputs],
                    [i.geo.latitude if i.geo else None for i in inputs],
                    [i.title for i in inputs],
                )
            }
            labelled = [i for i in inputs if i.id in inserted and i.concepts]
            if labelled:
                await conn.execute(
                    INSERT_INPUT_LEVEL,
                    app_id,
                    [uuid.uuid4().hex for _ in labelled],
                    [i.id for i in labelled],
                    [{"concepts": i.concepts} for i in labelled],
                    # JSON text: asyncpg would read nested lists as a 2-D array.
                    [json.dumps(_positive(i.concepts)) for i in labelled],
                )
            pairs = [(d, i.id) for i in inputs if i.id in inserted for d in i.dataset_ids]
            if pairs:
                await conn.execute(
                    INSERT_MEMBERS, app_id, [d for d, _ in pairs], [i for _, i in pairs]
                )
        await self._refresh_statistics(len(inserted))
        return inserted

    async def existing_ids(self, app_id: str, ids: list[str]) -> set[str]:
        return {r["id"] for r in await self._db.fetch(EXISTING_IDS, app_id, ids)}

    async def held_blob(self, app_id: str, key: str) -> StoredBlob | None:
        row = await self._db.fetchrow(HELD_BLOB, app_id, key)
        if row is None:
            return None
        return StoredBlob(row["key"], row["sha256"], row["size"], row["content_type"])

    async def get_many(self, app_id: str, ids: list[str], *, lock: bool = False) -> list[Input]:
        async with self._db.connection() as conn:
            if lock:
                await conn.fetch(LOCK_MANY, app_id, ids)
            return [row_to_input(r) for r in await conn.fetch(GET_MANY, app_id, ids)]

    async def page(
        self, query: InputQuery, after_seq: int | None, limit: int
    ) -> list[tuple[int, Input]]:
        return await self._page(row_to_input, LIST_INPUTS, *_query_args(query), after_seq, limit)

    async def update(self, updated: Input) -> None:
        geo = updated.geo
        async with self._db.connection() as conn:
            await conn.execute(
                UPDATE_INPUT,
                updated.app_id,
                updated.id,
                updated.metadata,
                geo.longitude if geo else None,
                geo.latitude if geo else None,
                updated.title,
            )
            if updated.concepts:
                await conn.execute(
                    UPSERT_INPUT_LEVEL,
                    updated.app_id,
                    uuid.uuid4().hex,
                    updated.id,
                    {"concepts": updated.concepts},
                    _positive(updated.concepts),
                )
            else:
                await conn.execute(DELETE_INPUT_LEVEL, updated.app_id, updated.id)

    async def delete(self, app_id: str, ids: list[str]) -> list[str]:
        return [r["id"] for r in await self._db.fetch(DELETE_INPUTS, app_id, ids)]

    async def replace_media(
        self, app_id: str, input_id: str, old: StoredBlob, new: StoredBlob, info: dict[str, Any]
    ) -> bool:
        """Points a video at re-encoded media (service.domain.reencode.MediaReplacer)."""
        return await self._db.affected(REPLACE_MEDIA, app_id, input_id, old.key, new.key, info) > 0

    async def count_matching(self, query: InputQuery) -> int:
        count: int = await self._db.fetchval(COUNT_MATCHING, *_query_args(query))
        return count

    async def delete_matching(self, query: InputQuery) -> int:
        return await self._db.affected(DELETE_MATCHING, *_query_args(query))


# The datasets of named inputs and of the inputs of named annotations, for the access
# rule of a caller bound to datasets: live ones, or with $4 deleted ones too. An id that
# does not exist has no row.
NAMED_INPUT_DATASETS = """
WITH named (kind, id, input_id) AS (
    SELECT 'input', i.id, i.id FROM inputs i WHERE i.app_id = $1 AND i.id = ANY($2::text[])
    UNION ALL
    SELECT 'annotation', a.id, a.input_id FROM annotations a
    WHERE a.app_id = $1 AND a.id = ANY($3::text[])
)
SELECT n.kind, n.id,
       coalesce(array_agg(m.dataset_id) FILTER (WHERE m.dataset_id IS NOT NULL), '{}')
           AS dataset_ids
FROM named n
LEFT JOIN (dataset_inputs m
           JOIN datasets d ON d.app_id = m.app_id AND d.id = m.dataset_id)
       ON m.app_id = $1 AND m.input_id = n.input_id AND (d.deleted_at IS NULL OR $4::boolean)
GROUP BY n.kind, n.id
"""


def _row_to_member(row: asyncpg.Record) -> DatasetMember:
    return DatasetMember(row_to_input(row), row["added_at"], row["member_seq"])


class PgMembershipRepository(Repository):
    async def live_datasets(
        self, app_id: str, dataset_ids: list[str], *, lock: bool = True
    ) -> set[str]:
        if not dataset_ids:
            return set()
        sql = LOCK_LIVE_DATASETS if lock else LIVE_DATASETS
        return {r["id"] for r in await self._db.fetch(sql, app_id, dataset_ids)}

    async def datasets_of_inputs(
        self,
        app_id: str,
        input_ids: Sequence[str],
        annotation_ids: Sequence[str],
        *,
        trashed: bool = False,
    ) -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
        """The datasets holding each named input and the input of each named annotation
        (in one statement); ids that do not exist are absent."""
        found: dict[str, dict[str, frozenset[str]]] = {"input": {}, "annotation": {}}
        if input_ids or annotation_ids:
            rows = await self._db.fetch(
                NAMED_INPUT_DATASETS, app_id, list(input_ids), list(annotation_ids), trashed
            )
            for row in rows:
                found[row["kind"]][row["id"]] = frozenset(row["dataset_ids"])
        return found["input"], found["annotation"]

    async def guarded_datasets(
        self, app_id: str, dataset_ids: list[str]
    ) -> dict[str, DatasetGuard]:
        rows = await self._db.fetch(GUARDED_DATASETS, app_id, dataset_ids) if dataset_ids else []
        return {r["id"]: DatasetGuard(r["locked"], r["read_only"]) for r in rows}

    async def add(self, app_id: str, dataset_id: str, input_ids: list[str]) -> int:
        if not input_ids:
            return 0
        return await self._db.affected(ADD_MEMBERS, app_id, dataset_id, input_ids)

    async def page(
        self, app_id: str, dataset_id: str, after_seq: int | None, limit: int
    ) -> list[DatasetMember]:
        return await self._all(_row_to_member, LIST_MEMBERS, app_id, dataset_id, after_seq, limit)

    async def get(self, app_id: str, dataset_id: str, input_id: str) -> DatasetMember | None:
        return await self._one(_row_to_member, GET_MEMBER, app_id, dataset_id, input_id)

    async def remove(self, app_id: str, dataset_id: str, input_ids: list[str]) -> int:
        return await self._db.affected(REMOVE_MEMBERS, app_id, dataset_id, input_ids)

    async def merge(self, app_id: str, source_id: str, destination_id: str) -> tuple[int, int]:
        row = await self._db.fetchrow(MERGE, app_id, source_id, destination_id)
        assert row is not None
        return row["added"], row["total"] - row["added"]
