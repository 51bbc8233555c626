"""PostgreSQL repository of dataset versions and their content."""

from __future__ import annotations

import dataclasses
from typing import Any

import asyncpg

from service.domain.models import (
    DatasetVersion,
    OntologyRef,
    VersionContent,
    VersionMetrics,
    VersionOntology,
    VersionStatus,
)
from service.storage.db import Repository
from service.storage.ontologies import class_json, stored_trees
from service.storage.rows import record

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
# One statement: the members in membership order, and their number on the version.
FIX_MEMBERS = """
WITH fixed AS (
    INSERT INTO version_inputs (app_id, dataset_id, version_id, position, input_id, blob_key)
    SELECT m.app_id, m.dataset_id, $3, (row_number() OVER (ORDER BY m.seq) - 1)::integer,
           m.input_id, i.blob_key
    FROM dataset_inputs m JOIN inputs i ON i.app_id = m.app_id AND i.id = m.input_id
    WHERE m.app_id = $1 AND m.dataset_id = $2
    RETURNING 1)
UPDATE dataset_versions SET input_count = (SELECT count(*) FROM fixed)
WHERE app_id = $1 AND dataset_id = $2 AND id = $3
RETURNING input_count
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
MEMBERS = f"""
SELECT position, input_id FROM version_inputs
WHERE {_MEMBER_KEY} AND ($4::integer IS NULL OR position > $4::integer)
ORDER BY position LIMIT $5
"""
# The window counts every missing member before LIMIT keeps the first few.
MISSING_INPUTS = """
SELECT v.input_id, count(*) OVER () AS total FROM version_inputs v
WHERE v.app_id = $1 AND v.dataset_id = $2 AND v.version_id = $3
  AND NOT EXISTS (SELECT 1 FROM inputs i WHERE i.app_id = v.app_id AND i.id = v.input_id)
ORDER BY v.position LIMIT $4
"""
STORE_CONTENT = """
UPDATE version_inputs v SET data = t.data, content_hash = t.content_hash, blob_key = t.blob_key
FROM unnest($4::integer[], $5::bytea[], $6::bytea[], $7::text[])
     AS t(position, data, content_hash, blob_key)
WHERE v.app_id = $1 AND v.dataset_id = $2 AND v.version_id = $3 AND v.position = t.position
"""
UNBUILT_COUNT = f"SELECT count(*) FROM version_inputs WHERE {_MEMBER_KEY} AND data IS NULL"
STORE_ONTOLOGY = f"""
UPDATE dataset_versions SET ontology_id = $4, ontology_revision = $5, ontology_classes = $6
WHERE {_VERSION_KEY}
"""
ONTOLOGY = f"""
SELECT ontology_id, ontology_revision, ontology_classes FROM dataset_versions
WHERE {_VERSION_KEY} AND ontology_id IS NOT NULL
"""

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

    async def fix_members(self, app_id: str, dataset_id: str, version_id: str) -> int:
        count: int = await self._db.fetchval(FIX_MEMBERS, app_id, dataset_id, version_id)
        return count

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

    async def members(
        self, app_id: str, dataset_id: str, version_id: str, after_position: int | None, limit: int
    ) -> list[tuple[int, str]]:
        rows = await self._db.fetch(MEMBERS, app_id, dataset_id, version_id, after_position, limit)
        return [(r["position"], r["input_id"]) for r in rows]

    async def missing_inputs(
        self, app_id: str, dataset_id: str, version_id: str, limit: int
    ) -> tuple[int, list[str]]:
        rows = await self._db.fetch(MISSING_INPUTS, app_id, dataset_id, version_id, limit)
        return (rows[0]["total"] if rows else 0), [r["input_id"] for r in rows]

    async def store_content(
        self, app_id: str, dataset_id: str, version_id: str, content: list[VersionContent]
    ) -> None:
        if not content:
            return
        await self._db.execute(
            STORE_CONTENT,
            app_id,
            dataset_id,
            version_id,
            [c.position for c in content],
            [c.data for c in content],
            [c.content_hash for c in content],
            [c.blob_key for c in content],
        )

    async def unbuilt_count(self, app_id: str, dataset_id: str, version_id: str) -> int:
        count: int = await self._db.fetchval(UNBUILT_COUNT, app_id, dataset_id, version_id)
        return count

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
