"""PostgreSQL job queue: durable jobs, claimed by runners under a time-limited lease."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg

from service.domain.jobs import Job, JobKind, JobStatus
from service.storage.db import Database, Repository
from service.storage.rows import record

# NOTIFY is delivered when the enqueuing transaction commits: the runner of another
# process (worker 0 of DATASETD_WORKERS, another replica) claims the job at once instead
# of at its next poll (listen_for_jobs).
JOBS_CHANNEL = "datasetd_jobs"
ENQUEUE = f"""
WITH queued AS (
    INSERT INTO jobs (kind, app_id, payload) VALUES ($1, $2, $3) RETURNING id)
SELECT id, pg_notify('{JOBS_CHANNEL}', '') FROM queued
"""
# How often the listening connection is checked, and retried once lost.
LISTEN_CHECK_SECONDS = 5.0

CANCEL = """
UPDATE jobs SET status = 'cancelled', updated_at = now()
WHERE id = $1 AND status IN ('pending', 'running')
RETURNING 1
"""

STATUS = "SELECT status FROM jobs WHERE id = $1"

# SKIP LOCKED: runners racing for the queue each take a different row instead of
# queueing behind one another; the row lock held until the UPDATE commits makes
# the claim exclusive. A running job whose lease expired belongs to a runner that
# died (or lost its database for a whole lease) and is taken over.
# The same statement records the run in job_runs (and marks the run it took the job
# over from as expired): no extra round trip.
CLAIM = """
WITH claimed AS (
    UPDATE jobs
    SET status = 'running', locked_by = $2, locked_until = now() + $3::interval,
        attempts = attempts + 1, updated_at = now(),
        run_id = nextval('job_runs_id_seq'::regclass)
    FROM (
        SELECT id, run_id FROM jobs
        WHERE kind = ANY($1::text[])
          AND (status = 'pending'
               OR (status = 'running' AND (locked_until IS NULL OR locked_until < now())))
        ORDER BY id
        FOR UPDATE SKIP LOCKED
        LIMIT 1) AS previous
    WHERE jobs.id = previous.id
    RETURNING jobs.id, jobs.kind, jobs.app_id, jobs.payload, jobs.attempts, jobs.run_id,
              jobs.locked_until, previous.run_id AS previous_run
),
expired AS (
    UPDATE job_runs SET outcome = 'expired'
    FROM claimed
    WHERE job_runs.id = claimed.previous_run AND job_runs.outcome IS NULL
),
started AS (
    INSERT INTO job_runs
        (id, job_id, kind, worker_id, attempt, started_at, heartbeat_at, lease_until)
    SELECT run_id, id, kind, $2, attempts, now(), now(), locked_until FROM claimed
)
SELECT id, kind, app_id, payload, attempts FROM claimed
"""

# The lease-holder statements match on locked_by alone and report the status, so
# one round trip tells the holder both "still yours" and "cancelled meanwhile".
# cancel() keeps locked_by, which is how the runner that held the job learns of it.
HEARTBEAT = """
WITH job AS (
    UPDATE jobs
    SET locked_until = CASE WHEN status = 'running' THEN now() + $3::interval
                            ELSE locked_until END,
        progress = CASE WHEN status = 'running' THEN coalesce($4, progress) ELSE progress END,
        updated_at = now()
    WHERE id = $1 AND locked_by = $2
    RETURNING status, run_id, locked_until
),
run AS (
    UPDATE job_runs SET heartbeat_at = now(),
        lease_until = coalesce(job.locked_until, job_runs.lease_until)
    FROM job
    WHERE job_runs.id = job.run_id AND job_runs.outcome IS NULL
)
SELECT status FROM job
"""

FINISH = """
WITH job AS (
    UPDATE jobs
    SET status = CASE WHEN status = 'running' THEN $3 ELSE status END,
        error = CASE WHEN status = 'running' THEN $4 ELSE error END,
        progress = CASE WHEN status = 'running' AND $3 = 'succeeded' THEN 100 ELSE progress END,
        locked_until = NULL, updated_at = now()
    WHERE id = $1 AND locked_by = $2
    RETURNING status, run_id
),
run AS (
    UPDATE job_runs SET finished_at = now(), outcome = job.status
    FROM job
    WHERE job_runs.id = job.run_id AND job_runs.outcome IS NULL
)
SELECT status FROM job
"""

# Back to pending with no holder: any runner may retry it. `counted` false gives
# back the attempt of a run interrupted by a shutdown rather than by the job.
RELEASE = """
WITH job AS (
    UPDATE jobs
    SET status = CASE WHEN status = 'running' THEN 'pending' ELSE status END,
        attempts = CASE WHEN status = 'running' AND NOT $3 THEN greatest(attempts - 1, 0)
                        ELSE attempts END,
        locked_by = CASE WHEN status = 'running' THEN NULL ELSE locked_by END,
        locked_until = NULL, updated_at = now()
    WHERE id = $1 AND locked_by = $2
    RETURNING status, run_id
),
run AS (
    UPDATE job_runs SET finished_at = now(),
        outcome = CASE WHEN job.status = 'pending' THEN 'released' ELSE job.status END
    FROM job
    WHERE job_runs.id = job.run_id AND job_runs.outcome IS NULL
)
SELECT status FROM job
"""


def _job(row: asyncpg.Record) -> Job:
    return record(Job, row, kind=JobKind(row["kind"]))


def _status(value: str | None) -> JobStatus | None:
    return None if value is None else JobStatus(value)


class PgJobQueue(Repository):
    """The domain's JobQueue, plus the lease primitives of the job runner.

    The lease-holder methods (claim, heartbeat) run on a connection of their
    own, never the caller's ambient transaction: a handler calling progress()
    from inside its own transaction must neither make the write wait for that
    transaction's commit nor hold the job row locked against the heartbeat and
    cancel(). finish() and release() do join the ambient transaction, so the
    runner can commit a job's end together with the handler's `failed` write.
    """

    # -- JobQueue -----------------------------------------------------------

    async def enqueue(self, kind: JobKind, app_id: str, payload: dict[str, Any]) -> int:
        job_id: int = await self._db.fetchval(ENQUEUE, kind.value, app_id, payload)
        return job_id

    async def cancel(self, job_id: int) -> bool:
        return await self._db.fetchval(CANCEL, job_id) is not None

    async def status(self, job_id: int) -> JobStatus | None:
        return _status(await self._db.fetchval(STATUS, job_id))

    # -- lease primitives -----------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        async with self._db.transaction():
            yield

    async def claim(
        self, kinds: Collection[JobKind], worker_id: str, lease: timedelta
    ) -> Job | None:
        """Takes the oldest runnable job of these kinds, or None when there is none."""
        if not kinds:
            return None
        async with self._db.acquire() as conn:
            row = await conn.fetchrow(CLAIM, [kind.value for kind in kinds], worker_id, lease)
        return None if row is None else _job(row)

    async def heartbeat(
        self, job_id: int, worker_id: str, lease: timedelta, *, progress: int | None = None
    ) -> JobStatus | None:
        """Extends the lease (and records progress) while the job runs.

        Returns the job's status while this worker holds it: RUNNING (still
        yours), CANCELLED (stop); None when another worker took it over."""
        async with self._db.acquire() as conn:
            return _status(await conn.fetchval(HEARTBEAT, job_id, worker_id, lease, progress))

    async def finish(
        self, job_id: int, worker_id: str, status: JobStatus, error: str = ""
    ) -> JobStatus | None:
        """Ends a running job as SUCCEEDED, FAILED or CANCELLED.

        Returns the status the job ended with (CANCELLED when cancel() came
        first), or None when this worker no longer holds it."""
        if status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
            raise ValueError(f"not a final status: {status}")
        return _status(await self._db.fetchval(FINISH, job_id, worker_id, status.value, error))

    async def release(
        self, job_id: int, worker_id: str, *, counted: bool = True
    ) -> JobStatus | None:
        """Puts a running job back to pending for any runner to retry.

        Returns PENDING, CANCELLED when cancel() came first, or None when this
        worker no longer holds it."""
        return _status(await self._db.fetchval(RELEASE, job_id, worker_id, counted))


log = logging.getLogger(__name__)


async def listen_for_jobs(db: Database, wake: Callable[[], None]) -> None:
    """Calls `wake` whenever any process queues a job (runs until cancelled, as a task). Holds one
    connection of the pool; a lost one (PostgreSQL restarting) is replaced, and `wake` is
    called then too, since a notification may have been missed meanwhile (the runner's
    poll would find the job anyway, a second later)."""

    def notified(*_: object) -> None:
        wake()

    while True:
        try:
            async with db.acquire() as conn:
                await conn.add_listener(JOBS_CHANNEL, notified)
                wake()
                try:
                    while not conn.is_closed():
                        await asyncio.sleep(LISTEN_CHECK_SECONDS)
                        await conn.execute("SELECT 1")
                finally:
                    if not conn.is_closed():
                        await conn.remove_listener(JOBS_CHANNEL, notified)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("job notifications lost (%s); listening again", exc)
        await asyncio.sleep(1.0)
