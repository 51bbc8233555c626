"""PostgreSQL repository of add-by-search jobs: their counts and cursor (search_jobs);
their state, progress and error are the jobs row's."""

from __future__ import annotations

from typing import Any

import asyncpg

from service.domain.jobs import JobStatus
from service.domain.search_jobs import SearchJob
from service.storage.db import Repository

INSERT = """
INSERT INTO search_jobs (job_id, app_id, dataset_id, query, matched_count)
VALUES ($1, $2, $3, $4, $5)
"""
# A job that ended without reaching finish() (cancelled) ended when its row last changed.
GET = """
SELECT s.app_id, s.job_id, s.dataset_id, s.matched_count, s.added_count, s.present_count,
       s.last_seq, s.created_at, j.status, j.progress, j.error,
       CASE WHEN j.status IN ('succeeded', 'failed', 'cancelled')
            THEN coalesce(s.finished_at, j.updated_at) END AS finished_at
FROM search_jobs s JOIN jobs j ON j.id = s.job_id
WHERE s.app_id = $1 AND s.job_id = $2
"""
ADVANCE = """
UPDATE search_jobs
SET last_seq = $2, added_count = added_count + $3, present_count = present_count + $4
WHERE job_id = $1
"""
FINISH = """
UPDATE search_jobs SET finished_at = coalesce(finished_at, now()) WHERE job_id = $1
"""


def _row_to_job(row: asyncpg.Record) -> SearchJob:
    return SearchJob(
        app_id=row["app_id"],
        job_id=row["job_id"],
        dataset_id=row["dataset_id"],
        status=JobStatus(row["status"]),
        progress=row["progress"],
        error=row["error"],
        matched_count=row["matched_count"],
        added_count=row["added_count"],
        present_count=row["present_count"],
        last_seq=row["last_seq"],
        created_at=row["created_at"],
        finished_at=row["finished_at"],
    )


class PgSearchJobRepository(Repository):
    async def insert(
        self, job_id: int, app_id: str, dataset_id: str, query: dict[str, Any], matched: int
    ) -> None:
        await self._db.execute(INSERT, job_id, app_id, dataset_id, query, matched)

    async def get(self, app_id: str, job_id: int) -> SearchJob | None:
        return await self._one(_row_to_job, GET, app_id, job_id)

    async def advance(self, job_id: int, last_seq: int, added: int, present: int) -> None:
        await self._db.execute(ADVANCE, job_id, last_seq, added, present)

    async def finish(self, job_id: int) -> None:
        await self._db.execute(FINISH, job_id)
