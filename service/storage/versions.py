"""PostgreSQL repository of dataset versions and their content."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from google.protobuf.message import DecodeError

from service.domain.models import (
    DatasetVersion,
    FixedVersion,
    OntologyRef,
    VersionMetrics,
    VersionOntology,
    VersionStatus,
)
from service.formats import snapshot
from service.storage.contents import METRIC_FIELDS, metrics_sums
from service.storage.db import Repository
from service.storage.ontologies import class_json, stored_trees
from service.storage.rows import record
from service.wire.inputs import medium_of
from service.wire.struct import struct_to_dict

_COLUMNS = (
    "app_id, dataset_id, id, seq, status, percent, details, description, metadata, metrics,"
    " input_count, job_id, created_at, modified_at, ontology_id, ontology_revision"
)
_KEY = "app_id = $1 AND dataset_id = $2"
_VERSION_KEY = f"{_KEY} AND id = $3"
_MEMBER_KEY = f"{_KEY} AND version_id = $3"

INSERT = f"""
INSERT INTO dataset_versions (app_id, dataset_id, id, description, metadata, job_id)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (app_id, dataset_id, id) DO NOTHING
RETURNING {_COLUMNS}
"""
# One statement: the members in membership order, each with its input's current content
# and stored original, and the sums of their content's metrics. `stale` counts members
# whose input had no current content (the caller refreshed them first; see
# VersionService.create).
FIX_MEMBERS = f"""
WITH fixed AS (
    INSERT INTO version_inputs (app_id, dataset_id, version_id, position, input_id, blob_key,
                                content_hash, input_seq)
    SELECT m.app_id, m.dataset_id, $3, (row_number() OVER (ORDER BY m.seq) - 1)::integer,
           m.input_id, i.blob_key, i.content_hash, i.seq
    FROM dataset_inputs m JOIN inputs i ON i.app_id = m.app_id AND i.id = m.input_id
    WHERE m.app_id = $1 AND m.dataset_id = $2
    RETURNING content_hash)
SELECT count(*)::integer AS members, count(*) FILTER (WHERE f.content_hash IS NULL) AS stale,
       {metrics_sums("c")}
FROM fixed f LEFT JOIN input_contents c ON c.hash = f.content_hash
"""
SORT_MEMORY = "SET LOCAL work_mem = '64MB'"
# The vectors the members have when the version is created: references, not copies.
CAPTURE_VECTORS = """
INSERT INTO version_embeddings (app_id, dataset_id, version_id, input_id, embedding_id)
SELECT v.app_id, v.dataset_id, v.version_id, v.input_id, e.id
FROM version_inputs v
JOIN embeddings e ON e.app_id = v.app_id AND e.input_id = v.input_id AND e.replaced_at IS NULL
WHERE v.app_id = $1 AND v.dataset_id = $2 AND v.version_id = $3
ON CONFLICT DO NOTHING
"""
GET = f"SELECT {_COLUMNS} FROM dataset_versions WHERE {_VERSION_KEY}"
LOCK = GET + " FOR UPDATE"
PAGE = f"""
SELECT {_COLUMNS} FROM dataset_versions
WHERE {_KEY} AND ($3::bigint IS NULL OR seq < $3::bigint)
ORDER BY seq DESC LIMIT $4
"""
UPDATE = f"""
UPDATE dataset_versions
SET status = $4, percent = $5, details = $6, description = $7, metadata = $8, metrics = $9,
    input_count = $10, modified_at = greatest(now(), modified_at + interval '1 microsecond')
WHERE {_VERSION_KEY}
RETURNING {_COLUMNS}
"""
DELETE = f"DELETE FROM dataset_versions WHERE {_VERSION_KEY}"
STORE_ONTOLOGY = f"""
UPDATE dataset_versions SET ontology_id = $4, ontology_revision = $5, ontology_classes = $6
WHERE {_VERSION_KEY}
"""
ONTOLOGY = f"""
SELECT ontology_id, ontology_revision, ontology_classes FROM dataset_versions
WHERE {_VERSION_KEY} AND ontology_id IS NOT NULL
"""

# Content moved from versions built before migration 0012 (content, no search columns);
# the partial index input_contents_uncaptured holds it only until the backfill is done.
UNCAPTURED = """
SELECT hash, data FROM input_contents
WHERE media_type IS NULL
LIMIT $1
FOR UPDATE SKIP LOCKED
"""
# Such a version captures the vectors its inputs have at backfill time: it had none before.
BACKFILL = """
WITH filled AS (
    UPDATE input_contents c
    SET media_type = t.media_type, metadata = t.metadata,
        concepts = ARRAY(SELECT jsonb_array_elements_text(t.concepts::jsonb)),
        annotated = t.annotated, longitude = t.longitude, latitude = t.latitude,
        created_at = t.created_at
    FROM unnest($1::bytea[], $2::text[], $3::jsonb[], $4::text[], $5::boolean[], $6::float8[],
                $7::float8[], $8::timestamptz[])
         AS t(hash, media_type, metadata, concepts, annotated, longitude, latitude, created_at)
    WHERE c.hash = t.hash
    RETURNING c.hash),
-- Their members' input_seq too (creation order, which never changes; search orders and
-- matches live inputs by it): NULL only if the input was deleted since.
sequenced AS (
    UPDATE version_inputs v SET input_seq = i.seq
    FROM filled f, inputs i
    WHERE v.content_hash = f.hash AND v.input_seq IS NULL
      AND i.app_id = v.app_id AND i.id = v.input_id)
INSERT INTO version_embeddings (app_id, dataset_id, version_id, input_id, embedding_id)
SELECT v.app_id, v.dataset_id, v.version_id, v.input_id, e.id
FROM filled f
JOIN version_inputs v ON v.content_hash = f.hash
JOIN embeddings e ON e.app_id = v.app_id AND e.input_id = v.input_id AND e.replaced_at IS NULL
ON CONFLICT DO NOTHING
"""


@dataclass(frozen=True)
class _Captured:
    media_type: str
    metadata: dict[str, Any]
    concepts: list[str]
    annotated: bool
    longitude: float | None
    latitude: float | None
    created_at: datetime | None


def _capture_of(data: bytes) -> _Captured:
    """The search columns of a serialized member (formats/snapshot.py), read the way the
    export writers read it. Content that does not parse gets media type '' (no media
    filter matches it) rather than stopping the backfill at it forever."""
    try:
        message = snapshot.parse(data)
    except DecodeError:
        return _Captured("", {}, [], False, None, None, None)
    content = message.data
    geo = content.geo.geo_point if content.HasField("geo") else None
    return _Captured(
        media_type=medium_of(content) or "",
        metadata=struct_to_dict(content.metadata) if content.HasField("metadata") else {},
        concepts=sorted(snapshot.positive_concepts(message)),
        annotated=bool(content.concepts or content.regions or content.frames),
        longitude=None if geo is None else geo.longitude,
        latitude=None if geo is None else geo.latitude,
        created_at=message.created_at.ToDatetime(tzinfo=UTC)
        if message.HasField("created_at")
        else None,
    )


_METRIC_NAMES = frozenset(f.name for f in dataclasses.fields(VersionMetrics))


def _metrics(stored: dict[str, Any]) -> VersionMetrics | None:
    # Empty until the version is ready. Unknown keys are skipped so that rows written
    # by a later release that counts more stay readable.
    if not stored:
        return None
    return VersionMetrics(**{k: v for k, v in stored.items() if k in _METRIC_NAMES})


def _classes_json(ontology: VersionOntology) -> dict[str, Any]:
    return {
        "classes": [class_json(c) for c in ontology.classes],
        "input_classifications": [class_json(c) for c in ontology.input_classifications],
        "last_category_id": ontology.last_category_id,
    }


def _row_to_ontology(row: asyncpg.Record) -> VersionOntology:
    stored = row["ontology_classes"]
    (classes, input_classifications), last = stored_trees(
        stored["classes"], stored["input_classifications"], stored["last_category_id"]
    )
    return VersionOntology(
        row["ontology_id"], row["ontology_revision"], classes, input_classifications, last
    )


def _row_to_version(row: asyncpg.Record) -> DatasetVersion:
    ontology_id = row["ontology_id"]
    return record(
        DatasetVersion,
        row,
        status=VersionStatus(row["status"]),
        metrics=_metrics(row["metrics"]),
        ontology=None
        if ontology_id is None
        else OntologyRef(ontology_id, row["ontology_revision"]),
    )


class PgVersionRepository(Repository):
    async def insert(self, version: DatasetVersion) -> DatasetVersion | None:
        return await self._one(
            _row_to_version,
            INSERT,
            version.app_id,
            version.dataset_id,
            version.id,
            version.description,
            version.metadata,
            version.job_id,
        )

    async def fix_members(self, app_id: str, dataset_id: str, version_id: str) -> FixedVersion:
        async with self._db.transaction(), self._db.connection() as conn:
            # The members are sorted by membership order: in memory up to ~1M members.
            await conn.execute(SORT_MEMORY)
            row = await conn.fetchrow(FIX_MEMBERS, app_id, dataset_id, version_id)
            assert row is not None
            await conn.execute(CAPTURE_VECTORS, app_id, dataset_id, version_id)
        return FixedVersion(
            input_count=row["members"],
            metrics=VersionMetrics(**{name: row[name] for name in METRIC_FIELDS}),
            stale=row["stale"],
        )

    async def get(
        self, app_id: str, dataset_id: str, version_id: str, *, lock: bool = False
    ) -> DatasetVersion | None:
        sql = LOCK if lock else GET
        return await self._one(_row_to_version, sql, app_id, dataset_id, version_id)

    async def page(
        self, app_id: str, dataset_id: str, before_seq: int | None, limit: int
    ) -> list[tuple[int, DatasetVersion]]:
        return await self._page(_row_to_version, PAGE, app_id, dataset_id, before_seq, limit)

    async def update(self, version: DatasetVersion) -> DatasetVersion:
        metrics = dataclasses.asdict(version.metrics) if version.metrics is not None else {}
        updated = await self._one(
            _row_to_version,
            UPDATE,
            version.app_id,
            version.dataset_id,
            version.id,
            version.status.value,
            version.percent,
            version.details,
            version.description,
            version.metadata,
            metrics,
            version.input_count,
        )
        if updated is None:
            raise LookupError(f"version {version.id!r} of dataset {version.dataset_id!r} is gone")
        return updated

    async def delete(self, app_id: str, dataset_id: str, version_id: str) -> bool:
        return await self._db.affected(DELETE, app_id, dataset_id, version_id) > 0

    async def backfill_capture(self, limit: int) -> int:
        """Fills the search columns of content moved from versions built before they
        existed (migration 0012) from the content itself, `limit` at a time; idempotent.
        Such a version captures the vectors its inputs have at backfill time: it had none
        before, and its inputs' content is what it captured, so the vectors computed from
        that content are the ones to search it by (an input edited or deleted since
        captures its current vector, or none)."""
        async with self._db.transaction(), self._db.connection() as conn:
            rows = await conn.fetch(UNCAPTURED, limit)
            if not rows:
                return 0
            captured = await asyncio.to_thread(lambda: [_capture_of(r["data"]) for r in rows])
            await conn.execute(
                BACKFILL,
                [r["hash"] for r in rows],
                [c.media_type for c in captured],
                [c.metadata for c in captured],
                [json.dumps(c.concepts) for c in captured],
                [c.annotated for c in captured],
                [c.longitude for c in captured],
                [c.latitude for c in captured],
                [c.created_at for c in captured],
            )
        return len(rows)

    async def store_ontology(
        self, app_id: str, dataset_id: str, version_id: str, ontology: VersionOntology | None
    ) -> None:
        await self._db.execute(
            STORE_ONTOLOGY,
            app_id,
            dataset_id,
            version_id,
            None if ontology is None else ontology.ontology_id,
            None if ontology is None else ontology.revision,
            None if ontology is None else _classes_json(ontology),
        )

    async def ontology(
        self, app_id: str, dataset_id: str, version_id: str
    ) -> VersionOntology | None:
        return await self._one(_row_to_ontology, ONTOLOGY, app_id, dataset_id, version_id)
