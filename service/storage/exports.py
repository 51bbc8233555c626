"""PostgreSQL repository of exports, and the reads of version content that exports make."""

from __future__ import annotations

from typing import Any

import asyncpg

from service.domain.models import (
    Export,
    ExportFormat,
    ExportOptions,
    ExportStatus,
    FidelityReport,
    SplitOptions,
    VersionMember,
)
from service.storage.blobs import TOUCH
from service.storage.db import Repository
from service.storage.rows import record, stored_blob

_KEY = "e.app_id = $1 AND e.dataset_id = $2 AND e.version_id = $3"
# While the job runs, its progress (kept by the job runner) is the export's.
_SELECT = """
SELECT e.app_id, e.dataset_id, e.version_id, e.id, e.seq, e.format, e.options, e.status,
       CASE WHEN e.status = 'in_progress' THEN coalesce(j.progress, e.percent)
            ELSE e.percent END AS percent,
       e.details, e.blob_key, b.sha256, b.size AS blob_size, b.content_type, e.split_counts,
       e.fidelity, e.job_id, e.created_at, e.modified_at
FROM {source} e
LEFT JOIN blobs b ON b.key = e.blob_key
LEFT JOIN jobs j ON j.id = e.job_id
"""
GET = _SELECT.format(source="exports") + f"WHERE {_KEY} AND e.id = $4"
LOCK = GET + " FOR UPDATE OF e"
# Export ids hash the app, dataset, version, format and options: one per app (the primary
# key's app_id prefix bounds the scan to the app's exports).
FIND = _SELECT.format(source="exports") + "WHERE e.app_id = $1 AND e.id = $2 LIMIT 1"
PAGE = (
    _SELECT.format(source="exports")
    + f"WHERE {_KEY} AND ($4::bigint IS NULL OR e.seq > $4::bigint) ORDER BY e.seq LIMIT $5"
)
LATEST_BY_FORMAT = (
    "SELECT DISTINCT ON (format) * FROM ("
    + _SELECT.format(source="exports")
    + f"WHERE {_KEY}) AS e ORDER BY format, seq DESC"
)
INSERT = """
INSERT INTO exports (app_id, dataset_id, version_id, id, format, options)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (app_id, dataset_id, version_id, id) DO NOTHING
RETURNING 1
"""
UPDATE = """
WITH updated AS (
    UPDATE exports
    SET status = $5, percent = $6, details = $7, blob_key = $8, size = $9, split_counts = $10,
        fidelity = $11, job_id = $12,
        modified_at = greatest(now(), modified_at + interval '1 microsecond')
    WHERE app_id = $1 AND dataset_id = $2 AND version_id = $3 AND id = $4
    RETURNING *)
""" + _SELECT.format(source="updated")
MEMBERS = """
SELECT v.position, v.input_id, c.data, b.key, b.sha256, b.size, b.content_type
FROM version_inputs v
JOIN input_contents c ON c.hash = v.content_hash
LEFT JOIN blobs b ON b.key = v.blob_key
WHERE v.app_id = $1 AND v.dataset_id = $2 AND v.version_id = $3
  AND ($4::integer IS NULL OR v.position > $4::integer)
ORDER BY v.position LIMIT $5
"""


def _options_to_json(options: ExportOptions) -> dict[str, Any]:
    stored: dict[str, Any] = {"embed_media": options.embed_media}
    if options.pixel_coordinates:
        stored["pixel_coordinates"] = True
    if options.split is not None:
        stored["split"] = {"ratios": options.split.ratios, "seed": options.split.seed}
    return stored


def _options(stored: dict[str, Any]) -> ExportOptions:
    split = stored.get("split")
    return ExportOptions(
        split=SplitOptions(dict(split["ratios"]), int(split["seed"])) if split else None,
        embed_media=bool(stored.get("embed_media", False)),
        pixel_coordinates=bool(stored.get("pixel_coordinates", False)),
    )


# The export's blob as _SELECT joins it.
_EXPORT_BLOB = ("blob_key", "sha256", "blob_size", "content_type")
# A member's blob as MEMBERS joins it.
_MEMBER_BLOB = ("key", "sha256", "size", "content_type")


def _row_to_export(row: asyncpg.Record) -> Export:
    fidelity = row["fidelity"]
    return record(
        Export,
        row,
        format=ExportFormat(row["format"]),
        options=_options(row["options"]),
        status=ExportStatus(row["status"]),
        blob=stored_blob(row, _EXPORT_BLOB),
        split_counts=dict(row["split_counts"]),
        fidelity=FidelityReport(dict(fidelity.get("dropped", {})), list(fidelity.get("notes", []))),
    )


def _row_to_member(row: asyncpg.Record) -> VersionMember:
    return record(VersionMember, row, blob=stored_blob(row, _MEMBER_BLOB))


class PgExportRepository(Repository):
    async def insert(self, export: Export) -> Export | None:
        key = (export.app_id, export.dataset_id, export.version_id, export.id)
        inserted = await self._db.fetchval(
            INSERT, *key, export.format.value, _options_to_json(export.options)
        )
        return None if inserted is None else await self.get(*key)

    async def get(
        self, app_id: str, dataset_id: str, version_id: str, export_id: str, *, lock: bool = False
    ) -> Export | None:
        sql = LOCK if lock else GET
        return await self._one(_row_to_export, sql, app_id, dataset_id, version_id, export_id)

    async def find(self, app_id: str, export_id: str) -> Export | None:
        return await self._one(_row_to_export, FIND, app_id, export_id)

    async def page(
        self, app_id: str, dataset_id: str, version_id: str, after_seq: int | None, limit: int
    ) -> list[tuple[int, Export]]:
        return await self._page(
            _row_to_export, PAGE, app_id, dataset_id, version_id, after_seq, limit
        )

    async def latest_by_format(self, app_id: str, dataset_id: str, version_id: str) -> list[Export]:
        return await self._all(_row_to_export, LATEST_BY_FORMAT, app_id, dataset_id, version_id)

    async def update(self, export: Export) -> Export:
        blob = export.blob
        fidelity = {"dropped": export.fidelity.dropped, "notes": export.fidelity.notes}
        async with self._db.transaction(), self._db.connection() as conn:
            if blob is not None:
                # Row-locks the blob against the orphan collector until the export
                # referencing it commits (and re-creates a row the collector removed).
                await conn.execute(TOUCH, blob.key, blob.sha256, blob.size, blob.content_type)
            row = await conn.fetchrow(
                UPDATE,
                export.app_id,
                export.dataset_id,
                export.version_id,
                export.id,
                export.status.value,
                export.percent,
                export.details,
                blob.key if blob is not None else None,
                blob.size if blob is not None else 0,
                export.split_counts,
                fidelity,
                export.job_id,
            )
        if row is None:
            raise LookupError(f"export {export.id!r} of version {export.version_id!r} is gone")
        return _row_to_export(row)

    async def members(
        self, app_id: str, dataset_id: str, version_id: str, after_position: int | None, limit: int
    ) -> list[VersionMember]:
        rows = await self._db.fetch(MEMBERS, app_id, dataset_id, version_id, after_position, limit)
        for r in rows:
            if r["data"] is None:
                raise LookupError(
                    f"member {r['position']} of version {version_id!r} has no content"
                )
        return [_row_to_member(r) for r in rows]
