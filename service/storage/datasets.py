"""PostgreSQL repository of datasets."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from service.domain.errors import AlreadyExists
from service.domain.models import (
    CoverImage,
    Dataset,
    DatasetListQuery,
    DatasetStatistics,
    SortField,
    Visibility,
)
from service.storage.db import Repository
from service.storage.rows import BLOB_COLUMNS, record, stored_blob

_COLUMNS = (
    "d.app_id, d.id, d.description, d.notes, d.metadata, d.visibility, d.cover_url,"
    " d.cover_info, d.default_filter, d.created_at, d.modified_at, d.revision, d.deleted_at,"
    " d.purge_after, d.display_name, d.locked, d.read_only, d.hidden, d.last_accessed_at,"
    " b.key AS blob_key, b.sha256 AS blob_sha256, b.size AS blob_size,"
    " b.content_type AS blob_content_type,"
    " ARRAY(SELECT pd.project_id FROM project_datasets pd"
    " WHERE pd.app_id = d.app_id AND pd.dataset_id = d.id ORDER BY pd.project_id)"
    " AS project_ids"
)
_FROM = "datasets d LEFT JOIN blobs b ON b.key = d.cover_blob"

# One round trip: the written row comes back joined with its cover blob.
INSERT = f"""
WITH d AS (
    INSERT INTO datasets (app_id, id, description, notes, metadata, visibility, cover_url,
                          cover_blob, cover_info, default_filter, display_name, locked,
                          read_only, hidden)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
    ON CONFLICT (app_id, id) DO NOTHING
    RETURNING *)
SELECT {_COLUMNS} FROM d LEFT JOIN blobs b ON b.key = d.cover_blob
"""

SELECT_ONE = f"SELECT {_COLUMNS} FROM {_FROM} WHERE d.app_id = $1 AND d.id = $2"
SELECT_ONE_LIVE = SELECT_ONE + " AND d.deleted_at IS NULL"
LOCK_ONE = "SELECT 1 FROM datasets WHERE app_id = $1 AND id = $2 FOR UPDATE"

UPDATE = f"""
WITH d AS (
    UPDATE datasets SET description = $3, notes = $4, metadata = $5, visibility = $6,
           cover_url = $7, cover_blob = $8, cover_info = $9, default_filter = $10,
           display_name = $11, locked = $12, read_only = $13, hidden = $14,
           deleted_at = $15, purge_after = $16, revision = revision + 1,
           modified_at = greatest(now(), modified_at + interval '1 microsecond')
    WHERE app_id = $1 AND id = $2
    RETURNING *)
SELECT {_COLUMNS} FROM d LEFT JOIN blobs b ON b.key = d.cover_blob
"""

PURGE = "DELETE FROM datasets WHERE app_id = $1 AND id = $2"
# Best effort and never waiting: a row locked by a write (or shared by an import) is
# skipped, and one read within the last minute is not written again.
TOUCH = """
UPDATE datasets SET last_accessed_at = $3
WHERE ctid = (
    SELECT ctid FROM datasets
    WHERE app_id = $1 AND id = $2 AND deleted_at IS NULL
      AND (last_accessed_at IS NULL OR last_accessed_at <= $4)
    FOR NO KEY UPDATE SKIP LOCKED)
"""
PURGE_EXPIRED = """
DELETE FROM datasets WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM datasets
    WHERE deleted_at IS NOT NULL AND purge_after <= $1
    LIMIT $2 FOR UPDATE SKIP LOCKED))
"""

STATISTICS = """
SELECT
    (SELECT count(*) FROM dataset_inputs m WHERE m.app_id = $1 AND m.dataset_id = $2) AS inputs,
    (SELECT count(DISTINCT a.input_id) FROM dataset_inputs m
     JOIN annotations a ON a.app_id = m.app_id AND a.input_id = m.input_id
     WHERE m.app_id = $1 AND m.dataset_id = $2) AS annotated,
    (SELECT count(*) FROM dataset_inputs m
     JOIN annotations a ON a.app_id = m.app_id AND a.input_id = m.input_id
     WHERE m.app_id = $1 AND m.dataset_id = $2) AS annotations
"""
# Inputs labelled with each concept, positively, at input or region level.
CONCEPT_COUNTS = """
SELECT c.concept, count(DISTINCT a.input_id) AS inputs
FROM dataset_inputs m
JOIN annotations a ON a.app_id = m.app_id AND a.input_id = m.input_id
CROSS JOIN LATERAL unnest(a.positive_concepts) AS c(concept)
WHERE m.app_id = $1 AND m.dataset_id = $2
GROUP BY c.concept
"""

# $2 is the search text, $3 its ILIKE pattern; $4/$5 the keyset cursor; $6 the limit.
_TEXT_FILTER = (
    "($2 = '' OR d.id ILIKE $3 OR d.display_name ILIKE $3 OR d.description ILIKE $3"
    " OR d.notes ILIKE $3)"
)


def _list_sql(
    column: str, descending: bool, with_cursor: bool, with_hidden: bool, with_only: bool
) -> str:
    direction, compare = ("DESC", "<") if descending else ("ASC", ">")
    cursor = f" AND (d.{column}, d.id) {compare} ($4, $5)" if with_cursor else ""
    limit = "$6" if with_cursor else "$4"
    hidden = "" if with_hidden else " AND NOT d.hidden"
    # The datasets the caller may read, after the limit's parameter.
    only = (" AND d.id = ANY($7)" if with_cursor else " AND d.id = ANY($5)") if with_only else ""
    return (
        f"SELECT {_COLUMNS} FROM {_FROM} WHERE d.app_id = $1 AND d.deleted_at IS NULL{hidden}"
        f"{only} AND {_TEXT_FILTER}{cursor} ORDER BY d.{column} {direction}, d.id {direction}"
        f" LIMIT {limit}"
    )


# Every statement the list call can run, built once from whitelisted names.
LIST_SQL = {
    (field, descending, with_cursor, with_hidden, with_only): _list_sql(
        field.value, descending, with_cursor, with_hidden, with_only
    )
    for field in SortField
    for descending in (False, True)
    for with_cursor in (False, True)
    for with_hidden in (False, True)
    for with_only in (False, True)
}


def _like_pattern(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _values(dataset: Dataset) -> tuple[Any, ...]:
    """Parameters $1 to $14 of INSERT and UPDATE: the key and the editable columns."""
    cover = dataset.cover
    cover_info = None
    if cover is not None:
        cover_info = {
            "width": cover.width,
            "height": cover.height,
            "format": cover.format,
            "color_mode": cover.color_mode,
        }
    return (
        dataset.app_id,
        dataset.id,
        dataset.description,
        dataset.notes,
        dataset.metadata,
        int(dataset.visibility),
        cover.url if cover is not None else "",
        cover.blob.key if cover is not None and cover.blob else None,
        cover_info,
        dataset.default_filter,
        dataset.display_name,
        dataset.locked,
        dataset.read_only,
        dataset.hidden,
    )


def _cover(row: asyncpg.Record) -> CoverImage | None:
    blob = stored_blob(row, BLOB_COLUMNS)
    if blob is None and not row["cover_url"]:
        return None
    info = row["cover_info"] or {}
    return CoverImage(
        url=row["cover_url"],
        blob=blob,
        width=info.get("width", 0),
        height=info.get("height", 0),
        format=info.get("format", ""),
        color_mode=info.get("color_mode", ""),
    )


def _row_to_dataset(row: asyncpg.Record) -> Dataset:
    return record(
        Dataset,
        row,
        visibility=Visibility(row["visibility"]),
        cover=_cover(row),
        project_ids=tuple(row["project_ids"]),
    )


class PgDatasetRepository(Repository):
    async def insert(self, dataset: Dataset) -> Dataset:
        async with self._db.connection() as conn:
            row = await conn.fetchrow(INSERT, *_values(dataset))
            if row is None:
                existing = await conn.fetchrow(SELECT_ONE, dataset.app_id, dataset.id)
                deleted = existing is not None and existing["deleted_at"] is not None
                raise AlreadyExists(
                    f"dataset {dataset.id!r} already exists in app {dataset.app_id!r}"
                    + (
                        " (deleted; undelete it, or delete it with force to reuse the id)"
                        if deleted
                        else ""
                    ),
                    reason="DATASET_DELETED_EXISTS" if deleted else "DATASET_EXISTS",
                    metadata={"dataset_id": dataset.id},
                )
        return _row_to_dataset(row)

    async def get(
        self, app_id: str, dataset_id: str, *, include_deleted: bool = False, lock: bool = False
    ) -> Dataset | None:
        async with self._db.connection() as conn:
            if lock and await conn.fetchval(LOCK_ONE, app_id, dataset_id) is None:
                return None
            row = await conn.fetchrow(
                SELECT_ONE if include_deleted else SELECT_ONE_LIVE, app_id, dataset_id
            )
        return None if row is None else _row_to_dataset(row)

    async def list(self, query: DatasetListQuery) -> list[Dataset]:
        with_only = query.only is not None
        sql = LIST_SQL[
            (
                query.sort_field,
                query.descending,
                query.after is not None,
                query.include_hidden,
                with_only,
            )
        ]
        args: list[Any] = [query.app_id, query.text, _like_pattern(query.text)]
        if query.after is not None:
            args.extend(query.after)
        args.append(query.limit)
        if query.only is not None:
            args.append(sorted(query.only))
        return await self._all(_row_to_dataset, sql, *args)

    async def update(self, dataset: Dataset) -> Dataset:
        row = await self._db.fetchrow(
            UPDATE, *_values(dataset), dataset.deleted_at, dataset.purge_after
        )
        if row is None:
            raise RuntimeError(f"dataset {dataset.app_id}/{dataset.id} vanished during update")
        return _row_to_dataset(row)

    async def touch(self, app_id: str, dataset_id: str, now: datetime, since: datetime) -> bool:
        # On the primary even in a read-only call (execute never reads the replica).
        return await self._db.affected(TOUCH, app_id, dataset_id, now, since) > 0

    async def purge(self, app_id: str, dataset_id: str) -> None:
        await self._db.execute(PURGE, app_id, dataset_id)

    async def purge_expired(self, now: datetime, limit: int) -> int:
        return await self._db.affected(PURGE_EXPIRED, now, limit)

    async def statistics(self, app_id: str, dataset_id: str) -> DatasetStatistics:
        # Counted from the rows each time, so they are exact after any change.
        async with self._db.connection() as conn:
            totals = await conn.fetchrow(STATISTICS, app_id, dataset_id)
            concepts = await conn.fetch(CONCEPT_COUNTS, app_id, dataset_id)
        assert totals is not None
        return DatasetStatistics(
            inputs_count=totals["inputs"],
            annotated_inputs_count=totals["annotated"],
            annotations_count=totals["annotations"],
            concept_counts={r["concept"]: r["inputs"] for r in concepts},
        )
