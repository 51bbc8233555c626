"""The run records of the job runner (job_runs) against the real PostgreSQL: every claim is
a run, its heartbeats, its end and its outcome are recorded by the statements the runner
already makes, a run whose worker died is marked expired when the job is taken over, and
the check the multi-replica test relies on (tests.faults.replicas.run_problems) finds runs
of one job that overlap."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from service.domain.jobs import Job, JobFailed, JobKind, JobStatus, Progress
from service.jobs import JobRunner
from service.storage.db import Database, migrate
from service.storage.jobs import PgJobQueue
from tests.conftest import Stack
from tests.faults.replicas import Run, job_runs, run_problems
from tests.scratch import scratch_database

KIND = JobKind.BUILD_VERSION
SHORT = timedelta(milliseconds=600)


class Handler:
    """Runs `outcomes` in turn, one per run: None succeeds, an exception is raised."""

    def __init__(self, *outcomes: Exception | None, progress: bool = False) -> None:
        self._outcomes = list(outcomes)
        self._progress = progress

    async def run(self, job: Job, progress: Progress) -> None:
        if self._progress:
            await progress(30)
            await asyncio.sleep(0.3)
            await progress(60)
        outcome = self._outcomes.pop(0) if self._outcomes else None
        if outcome is not None:
            raise outcome

    async def failed(self, job: Job, message: str) -> None:
        pass


@pytest.fixture(scope="module")
async def runs_db(stack: Stack) -> AsyncIterator[Database]:
    # A database of its own: the session server's runner would claim these jobs.
    async with scratch_database(stack.dsn, "job_runs") as dsn:
        db = await Database.connect(dsn)
        try:
            async with db.connection() as conn:
                await migrate(conn)
            yield db
        finally:
            await db.close()


async def runs_of(db: Database, job_id: int) -> list[Run]:
    return [run for run in await job_runs(db) if run.job_id == job_id]


async def test_a_run_records_its_worker_heartbeats_and_end(runs_db: Database) -> None:
    queue = PgJobQueue(runs_db)
    runner = JobRunner(queue, {KIND: Handler(progress=True)}, worker_id="w-records")
    job_id = await queue.enqueue(KIND, "app-a", {})
    assert await runner.run_once()
    [run] = await runs_of(runs_db, job_id)
    assert (run.kind, run.worker_id, run.attempt, run.outcome) == (
        KIND.value,
        "w-records",
        1,
        "succeeded",
    )
    assert run.finished_at is not None
    # The progress report after 0.3 s renewed the lease: a heartbeat after the start.
    assert run.started_at < run.heartbeat_at <= run.finished_at
    assert run.lease_until > run.heartbeat_at
    assert run_problems([run]) == []


async def test_each_ending_is_recorded_as_its_outcome(runs_db: Database) -> None:
    queue = PgJobQueue(runs_db)
    handler = Handler(RuntimeError("transient"), None)
    runner = JobRunner(queue, {KIND: handler}, worker_id="w-outcomes", max_attempts=3)
    retried = await queue.enqueue(KIND, "app-b", {})
    assert await runner.run_once()
    assert await runner.run_once()
    assert [run.outcome for run in await runs_of(runs_db, retried)] == ["released", "succeeded"]
    assert [run.attempt for run in await runs_of(runs_db, retried)] == [1, 2]

    failing = JobRunner(queue, {KIND: Handler(JobFailed("no"))}, worker_id="w-outcomes")
    failed = await queue.enqueue(KIND, "app-b", {})
    assert await failing.run_once()
    assert [run.outcome for run in await runs_of(runs_db, failed)] == ["failed"]

    class Cancelled(Handler):
        async def run(self, job: Job, progress: Progress) -> None:
            assert await queue.cancel(job.id)
            await progress(50)  # learns of the cancel here and stops

    cancelling = JobRunner(queue, {KIND: Cancelled()}, worker_id="w-outcomes")
    cancelled = await queue.enqueue(KIND, "app-b", {})
    assert await cancelling.run_once()
    assert [run.outcome for run in await runs_of(runs_db, cancelled)] == ["cancelled"]

    for job_id in (retried, failed, cancelled):
        assert all(run.finished_at is not None for run in await runs_of(runs_db, job_id))
        assert run_problems(await runs_of(runs_db, job_id)) == []


async def test_a_dead_workers_run_expires_and_the_takeover_starts_after_its_lease(
    runs_db: Database,
) -> None:
    queue = PgJobQueue(runs_db)
    job_id = await queue.enqueue(KIND, "app-c", {})
    # The dead worker claims, renews once, then never again: its process was killed.
    assert await queue.claim([KIND], "w-dead", SHORT) is not None
    await asyncio.sleep(0.2)
    await queue.heartbeat(job_id, "w-dead", SHORT)
    runner = JobRunner(queue, {KIND: Handler()}, worker_id="w-alive", lease=SHORT)
    assert not await runner.run_once()  # still leased
    await asyncio.sleep(SHORT.total_seconds() + 0.1)
    assert await runner.run_once()
    dead, alive = await runs_of(runs_db, job_id)
    assert (dead.worker_id, dead.outcome, dead.finished_at) == ("w-dead", "expired", None)
    assert dead.heartbeat_at > dead.started_at
    assert dead.lease_until == dead.heartbeat_at + SHORT
    assert (alive.worker_id, alive.outcome, alive.attempt) == ("w-alive", "succeeded", 2)
    assert alive.started_at >= dead.lease_until
    # Were the dead worker to come back, its statements touch no run, its own included.
    assert await queue.heartbeat(job_id, "w-dead", SHORT) is None
    assert await queue.finish(job_id, "w-dead", JobStatus.FAILED, "late") is None
    assert await runs_of(runs_db, job_id) == [dead, alive]
    assert run_problems([dead, alive]) == []


async def test_a_shutdown_hands_the_run_back_as_released(runs_db: Database) -> None:
    queue = PgJobQueue(runs_db)
    started = asyncio.Event()

    class Slow(Handler):
        async def run(self, job: Job, progress: Progress) -> None:
            started.set()
            await asyncio.sleep(60)

    runner = JobRunner(queue, {KIND: Slow()}, worker_id="w-shutdown", poll_interval=0.05)
    job_id = await queue.enqueue(KIND, "app-d", {})
    task = asyncio.create_task(runner.run_forever())
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    [run] = await runs_of(runs_db, job_id)
    assert run.outcome == "released" and run.finished_at is not None
    # The attempt was given back: the next run is claimed with the same number.
    assert run.attempt == 1
    claimed = await queue.claim([KIND], "w-next", SHORT)
    assert claimed is not None and claimed.attempts == 1
    await queue.finish(job_id, "w-next", JobStatus.SUCCEEDED)
    assert [r.outcome for r in await runs_of(runs_db, job_id)] == ["released", "succeeded"]


def at(seconds: float) -> datetime:
    return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)


def run(run_id: int, start: float, end: float | None, lease: float, outcome: str | None) -> Run:
    return Run(
        id=run_id,
        job_id=7,
        kind=KIND.value,
        worker_id=f"w{run_id}",
        attempt=run_id,
        started_at=at(start),
        heartbeat_at=at(start),
        lease_until=at(lease),
        finished_at=None if end is None else at(end),
        outcome=outcome,
    )


def test_the_run_check_finds_overlapping_runs() -> None:
    # Ended, then the next: fine; a dead run, taken over after its lease: fine.
    assert run_problems([run(1, 0, 1, 3, "released"), run(2, 2, 3, 5, "succeeded")]) == []
    assert run_problems([run(1, 0, None, 3, "expired"), run(2, 3.5, 4, 6, "succeeded")]) == []
    # Started while the other still ran, or while a dead worker's lease was alive.
    assert "before run 1" in run_problems([run(1, 0, 2, 3, "succeeded"), run(2, 1, 3, 4, None)])[0]
    found = run_problems([run(1, 0, None, 3, "expired"), run(2, 2.9, 4, 6, "succeeded")])
    assert len(found) == 1 and "before run 1 (w1, expired) was over" in found[0]
    # A run with no end that nobody took over, followed by another; and one left open.
    found = run_problems([run(1, 0, None, 1, None), run(2, 2, 3, 4, "succeeded")])
    assert "has no end and was not taken over" in found[0]
    assert "never ended" in run_problems([run(1, 0, None, 1, None)])[0]
    assert run_problems([run(1, 0, None, 1, None)], settled=False) == []
    # Times out of order.
    backwards = dataclasses.replace(run(1, 5, 6, 7, "succeeded"), heartbeat_at=at(4))
    assert "out of order" in run_problems([backwards])[0]


async def test_the_run_check_reads_an_overlap_from_the_table(runs_db: Database) -> None:
    queue = PgJobQueue(runs_db)
    job_id = await queue.enqueue(KIND, "app-e", {})
    assert await queue.claim([KIND], "w-first", timedelta(seconds=30)) is not None
    # A second run recorded while the first one's lease is alive: what a claim that
    # ignored the lease would leave.
    await runs_db.execute(
        "INSERT INTO job_runs (job_id, kind, worker_id, attempt, started_at, heartbeat_at,"
        " lease_until) SELECT $1, $2, 'w-second', 2, now(), now(), now() + interval '30s'",
        job_id,
        KIND.value,
    )
    problems = run_problems(await runs_of(runs_db, job_id), settled=False)
    assert len(problems) == 2
    assert "w-second) started at" in problems[0]
    assert "has no end and was not taken over" in problems[1]
    await queue.finish(job_id, "w-first", JobStatus.SUCCEEDED)


async def test_background_jobs_have_a_lane_of_their_own(runs_db: Database) -> None:
    """An older embedding job neither holds up a build (the build's lane skips it) nor
    waits for one (its lane takes it)."""
    queue = PgJobQueue(runs_db)
    background = JobKind.EMBED_INPUTS
    handlers = {KIND: Handler(), background: Handler()}
    runner = JobRunner(queue, handlers, worker_id="w-lanes", background=frozenset({background}))
    embed = await queue.enqueue(background, "app-lanes", {})
    build = await queue.enqueue(KIND, "app-lanes", {})
    assert await runner.run_once(background=False)
    assert [r.outcome for r in await runs_of(runs_db, build)] == ["succeeded"]
    assert await runs_of(runs_db, embed) == []
    assert not await runner.run_once(background=False)
    assert await runner.run_once(background=True)
    assert [r.outcome for r in await runs_of(runs_db, embed)] == ["succeeded"]
