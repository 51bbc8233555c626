"""PostgreSQL repository of video re-encode jobs (their state is the job row's)."""

from __future__ import annotations

import asyncpg

from service.domain.jobs import JobStatus
from service.domain.reencode import ReencodeJob, ReencodeResult
from service.storage.db import Repository

INSERT = """
INSERT INTO reencode_jobs (app_id, job_id, input_ids) VALUES ($1, $2, $3)
"""
GET = """
SELECT r.app_id, r.job_id, r.input_ids, r.results, r.created_at,
       j.status, j.progress, j.error
FROM reencode_jobs r JOIN jobs j ON j.id = r.job_id
WHERE r.app_id = $1 AND r.job_id = $2
"""
RECORD = """
UPDATE reencode_jobs
SET results = results || jsonb_build_object($3::text, $4::jsonb),
    modified_at = greatest(now(), modified_at + interval '1 microsecond')
WHERE app_id = $1 AND job_id = $2
"""


def _row_to_job(row: asyncpg.Record) -> ReencodeJob:
    results = row["results"]
    return ReencodeJob(
        app_id=row["app_id"],
        job_id=row["job_id"],
        status=JobStatus(row["status"]),
        percent=row["progress"],
        details=row["error"],
        results=[ReencodeResult.from_json(i, results.get(i)) for i in row["input_ids"]],
        created_at=row["created_at"],
    )


class PgReencodeRepository(Repository):
    async def insert(self, app_id: str, job_id: int, input_ids: list[str]) -> None:
        await self._db.execute(INSERT, app_id, job_id, input_ids)

    async def get(self, app_id: str, job_id: int) -> ReencodeJob | None:
        return await self._one(_row_to_job, GET, app_id, job_id)

    async def record(self, app_id: str, job_id: int, result: ReencodeResult) -> None:
        await self._db.execute(RECORD, app_id, job_id, result.input_id, result.to_json())
