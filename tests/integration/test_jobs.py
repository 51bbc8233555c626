"""The job queue and runner against the real PostgreSQL: leases, retries, takeover, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import asyncpg
import pytest

from service.domain.errors import Unavailable
from service.domain.jobs import Job, JobCancelled, JobFailed, JobKind, JobStatus, Progress
from service.jobs import JobRunner
from service.jobs import runner as runner_module
from service.storage.db import Database, migrate
from service.storage.jobs import PgJobQueue, listen_for_jobs
from tests.conftest import Stack

KIND = JobKind.BUILD_VERSION
SHORT = timedelta(milliseconds=500)

Work = Callable[[Job, Progress], Awaitable[None]]


class Recorder:
    """A handler that records its runs and failures around the test's `work`."""

    def __init__(self, work: Work | None = None) -> None:
        self.runs: list[int] = []
        self.failures: list[tuple[int, str]] = []
        self._work = work

    async def run(self, job: Job, progress: Progress) -> None:
        self.runs.append(job.id)
        if self._work is not None:
            await self._work(job, progress)

    async def failed(self, job: Job, message: str) -> None:
        self.failures.append((job.id, message))


@pytest.fixture(scope="module")
async def jobs_dsn(stack: Stack) -> AsyncIterator[str]:
    # A database of its own: the session server's runner claims the same job
    # kinds and would otherwise run these jobs with the real handlers.
    name = "jobs_" + secrets.token_hex(4)
    admin = await asyncpg.connect(stack.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = urllib.parse.urlunsplit(urllib.parse.urlsplit(stack.dsn)._replace(path=f"/{name}"))
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield dsn
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="module")
async def jobs_db(jobs_dsn: str) -> AsyncIterator[Database]:
    db = await Database.connect(jobs_dsn)
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def queue(jobs_db: Database) -> AsyncIterator[PgJobQueue]:
    yield PgJobQueue(jobs_db)
    # Nothing runnable may outlive its test and be claimed by the next one's runner.
    async with jobs_db.connection() as conn:
        await conn.execute(
            "UPDATE jobs SET status = 'cancelled' WHERE status IN ('pending', 'running')"
        )


async def job_row(db: Database, job_id: int) -> asyncpg.Record:
    async with db.connection() as conn:
        row = await conn.fetchrow(
            "SELECT status, attempts, progress, error, locked_by FROM jobs WHERE id = $1", job_id
        )
    assert row is not None
    return row


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    # Polls the database: there is no event to wait for across connections.
    async with asyncio.timeout(seconds):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


class Rollback(Exception):
    pass


async def test_enqueue_belongs_to_the_callers_transaction(
    jobs_db: Database, queue: PgJobQueue
) -> None:
    with pytest.raises(Rollback):
        async with jobs_db.transaction():
            rolled_back = await queue.enqueue(KIND, "app-a", {"n": 1})
            assert await queue.status(rolled_back) is JobStatus.PENDING
            raise Rollback
    assert await queue.status(rolled_back) is None
    async with jobs_db.transaction():
        committed = await queue.enqueue(KIND, "app-a", {"n": 2})
    assert await queue.status(committed) is JobStatus.PENDING


async def test_a_job_queued_elsewhere_wakes_the_listener_when_it_commits(
    jobs_db: Database, queue: PgJobQueue
) -> None:
    woken = asyncio.Event()
    listener = asyncio.create_task(listen_for_jobs(jobs_db, woken.set))
    try:
        # The listener wakes once when it starts listening (a job may have been missed).
        await asyncio.wait_for(woken.wait(), 10)
        woken.clear()
        async with jobs_db.transaction():
            await queue.enqueue(KIND, "app-a", {"n": 3})
            await asyncio.sleep(0.3)
            assert not woken.is_set(), "woken before the job was committed"
        await asyncio.wait_for(woken.wait(), 5)
        woken.clear()
        with pytest.raises(Rollback):
            async with jobs_db.transaction():
                await queue.enqueue(KIND, "app-a", {"n": 4})
                raise Rollback
        await asyncio.sleep(0.3)
        assert not woken.is_set(), "a rolled back job woke the runner"
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener


async def test_job_runs_once_and_succeeds_with_progress(
    jobs_db: Database, queue: PgJobQueue
) -> None:
    recorded: list[int] = []

    async def work(job: Job, progress: Progress) -> None:
        assert (job.app_id, job.payload, job.attempts) == ("app-b", {"version": "v1"}, 1)
        await progress(40)
        recorded.append((await job_row(jobs_db, job.id))["progress"])
        await progress(41)  # within the throttle interval: not written yet
        recorded.append((await job_row(jobs_db, job.id))["progress"])

    handler = Recorder(work)
    runner = JobRunner(queue, {KIND: handler}, worker_id="w-succeed")
    job_id = await queue.enqueue(KIND, "app-b", {"version": "v1"})
    assert await runner.run_once()
    assert not await runner.run_once()
    row = await job_row(jobs_db, job_id)
    assert (row["status"], row["attempts"], row["progress"], row["error"]) == (
        "succeeded",
        1,
        100,
        "",
    )
    assert recorded == [40, 40]
    assert handler.runs == [job_id]
    assert handler.failures == []
    assert not await queue.cancel(job_id)


async def test_job_failed_is_permanent_with_its_message(
    jobs_db: Database, queue: PgJobQueue
) -> None:
    async def work(job: Job, progress: Progress) -> None:
        raise JobFailed("the dataset has no inputs")

    handler = Recorder(work)
    runner = JobRunner(queue, {KIND: handler}, worker_id="w-fail")
    job_id = await queue.enqueue(KIND, "app-c", {})
    assert await runner.run_once()
    assert not await runner.run_once()
    row = await job_row(jobs_db, job_id)
    assert (row["status"], row["error"], row["attempts"]) == (
        "failed",
        "the dataset has no inputs",
        1,
    )
    assert handler.failures == [(job_id, "the dataset has no inputs")]


async def test_job_of_a_dead_runner_is_taken_over_after_its_lease(
    jobs_db: Database, queue: PgJobQueue
) -> None:
    handler = Recorder()
    runner = JobRunner(queue, {KIND: handler}, worker_id="w-alive")
    job_id = await queue.enqueue(KIND, "app-d", {})
    # The dead runner claims and then never renews, as if its process had been killed.
    dead = await queue.claim([KIND], "w-dead", SHORT)
    assert dead is not None and (dead.id, dead.attempts) == (job_id, 1)
    assert not await runner.run_once()  # still leased
    await asyncio.sleep(SHORT.total_seconds() + 0.1)
    assert await runner.run_once()
    row = await job_row(jobs_db, job_id)
    assert (row["status"], row["attempts"], row["locked_by"]) == ("succeeded", 2, "w-alive")
    assert handler.runs == [job_id]
    # Were the dead runner to come back, the job would no longer be its own.
    assert await queue.heartbeat(job_id, "w-dead", SHORT) is None
    assert await queue.finish(job_id, "w-dead", JobStatus.FAILED, "late") is None
    assert (await job_row(jobs_db, job_id))["status"] == "succeeded"


async def test_two_replicas_run_each_job_exactly_once(
    jobs_dsn: str, jobs_db: Database, queue: PgJobQueue
) -> None:
    running: set[int] = set()
    overlaps: list[int] = []

    async def work(job: Job, progress: Progress) -> None:
        if job.id in running:
            overlaps.append(job.id)
        running.add(job.id)
        await asyncio.sleep(0.01)
        await progress(50)
        running.discard(job.id)

    job_ids = [await queue.enqueue(KIND, "app-e", {"n": n}) for n in range(50)]
    other_replica = await Database.connect(jobs_dsn)
    handlers = [Recorder(work), Recorder(work)]
    runners = [
        JobRunner(
            PgJobQueue(db), {KIND: handler}, worker_id=name, concurrency=3, poll_interval=0.05
        )
        for db, handler, name in zip(
            (jobs_db, other_replica), handlers, ("w-east", "w-west"), strict=True
        )
    ]
    tasks = [asyncio.create_task(runner.run_forever()) for runner in runners]

    async def all_done() -> bool:
        async with jobs_db.connection() as conn:
            done: int = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE id = ANY($1) AND status = 'succeeded'", job_ids
            )
        return done == len(job_ids)

    try:
        await eventually(all_done)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await other_replica.close()
    runs = handlers[0].runs + handlers[1].runs
    assert sorted(runs) == job_ids
    assert overlaps == []
    assert handlers[0].runs and handlers[1].runs, "both replicas should have taken jobs"


async def test_cancel_reaches_the_handler_at_its_next_progress_report(
    jobs_db: Database, queue: PgJobQueue
) -> None:
    started = asyncio.Event()
    seen: list[str] = []

    async def work(job: Job, progress: Progress) -> None:
        started.set()
        try:
            for percent in range(100):
                await progress(percent)
                await asyncio.sleep(0.05)
        except JobCancelled:
            seen.append("cancelled")
            raise

    handler = Recorder(work)
    runner = JobRunner(queue, {KIND: handler}, worker_id="w-cancel", lease=timedelta(seconds=3))
    job_id = await queue.enqueue(KIND, "app-f", {})
    run = asyncio.create_task(runner.run_once())
    await asyncio.wait_for(started.wait(), 5)
    assert await queue.cancel(job_id)
    assert await asyncio.wait_for(run, 5)
    assert seen == ["cancelled"]
    assert await queue.status(job_id) is JobStatus.CANCELLED
    assert handler.failures == [(job_id, "cancelled")]
    assert not await queue.cancel(job_id)


async def test_unexpected_errors_are_retried_up_to_max_attempts(
    jobs_db: Database, queue: PgJobQueue
) -> None:
    async def work(job: Job, progress: Progress) -> None:
        raise RuntimeError("connection reset")

    handler = Recorder(work)
    runner = JobRunner(queue, {KIND: handler}, worker_id="w-retry", max_attempts=3)
    job_id = await queue.enqueue(KIND, "app-g", {})
    for attempt in (1, 2):
        assert await runner.run_once()
        row = await job_row(jobs_db, job_id)
        assert (row["status"], row["attempts"], row["locked_by"]) == ("pending", attempt, None)
    assert await runner.run_once()
    row = await job_row(jobs_db, job_id)
    message = "internal error after 3 attempts (see server log)"
    assert (row["status"], row["attempts"], row["error"]) == ("failed", 3, message)
    assert handler.runs == [job_id] * 3
    assert handler.failures == [(job_id, message)]
    assert not await runner.run_once()


async def test_a_transient_error_then_success(jobs_db: Database, queue: PgJobQueue) -> None:
    async def work(job: Job, progress: Progress) -> None:
        if job.attempts == 1:
            raise ConnectionResetError("blip")

    handler = Recorder(work)
    runner = JobRunner(queue, {KIND: handler}, worker_id="w-blip")
    job_id = await queue.enqueue(KIND, "app-h", {})
    assert await runner.run_once()
    assert await runner.run_once()
    row = await job_row(jobs_db, job_id)
    assert (row["status"], row["attempts"]) == ("succeeded", 2)
    assert handler.failures == []


async def test_outages_do_not_use_up_attempts_but_are_bounded(
    jobs_db: Database, queue: PgJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL or S3 away under a job is not the job's fault: it is retried without
    counting an attempt, up to OUTAGE_RETRIES times; after that attempts count again."""
    monkeypatch.setattr(runner_module, "OUTAGE_PAUSE_SECONDS", 0.0)
    monkeypatch.setattr(runner_module, "OUTAGE_RETRIES", 4)
    outages = 6

    async def work(job: Job, progress: Progress) -> None:
        if len(handler.runs) <= outages:
            raise Unavailable("the object store does not answer", reason="OBJECT_STORE_UNAVAILABLE")

    handler = Recorder(work)
    runner = JobRunner(queue, {KIND: handler}, worker_id="w-outage", max_attempts=3)
    job_id = await queue.enqueue(KIND, "app-o", {})
    for _ in range(4):
        assert await runner.run_once()
        row = await job_row(jobs_db, job_id)
        assert (row["status"], row["attempts"]) == ("pending", 0)
    # The fifth and sixth outages count: two attempts of three.
    for attempt in (1, 2):
        assert await runner.run_once()
        row = await job_row(jobs_db, job_id)
        assert (row["status"], row["attempts"]) == ("pending", attempt)
    assert await runner.run_once()
    row = await job_row(jobs_db, job_id)
    assert (row["status"], row["attempts"]) == ("succeeded", 3)
    assert handler.failures == []


async def test_a_job_that_kills_every_runner_is_given_up(
    jobs_db: Database, queue: PgJobQueue
) -> None:
    handler = Recorder()
    runner = JobRunner(queue, {KIND: handler}, worker_id="w-survivor", max_attempts=2)
    job_id = await queue.enqueue(KIND, "app-i", {})
    for worker in ("w-dead-1", "w-dead-2"):
        claimed = await queue.claim([KIND], worker, timedelta(milliseconds=100))
        assert claimed is not None and claimed.id == job_id
        await asyncio.sleep(0.15)
    assert await runner.run_once()
    message = "internal error after 2 attempts (see server log)"
    row = await job_row(jobs_db, job_id)
    assert (row["status"], row["error"]) == ("failed", message)
    assert handler.runs == []
    assert handler.failures == [(job_id, message)]


async def test_a_runner_that_lost_its_lease_stops_its_handler(
    jobs_db: Database, queue: PgJobQueue
) -> None:
    started = asyncio.Event()
    stopped: list[str] = []

    async def work(job: Job, progress: Progress) -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            stopped.append("stopped")
            raise

    handler = Recorder(work)
    runner = JobRunner(
        queue, {KIND: handler}, worker_id="w-slow", lease=timedelta(milliseconds=600)
    )
    job_id = await queue.enqueue(KIND, "app-j", {})
    run = asyncio.create_task(runner.run_once())
    await asyncio.wait_for(started.wait(), 5)
    async with jobs_db.connection() as conn:
        await conn.execute("UPDATE jobs SET locked_by = 'w-thief' WHERE id = $1", job_id)
    assert await asyncio.wait_for(run, 5)
    assert stopped == ["stopped"]
    assert handler.failures == []
    row = await job_row(jobs_db, job_id)
    assert (row["status"], row["locked_by"]) == ("running", "w-thief")


async def test_shutdown_hands_the_running_job_back(jobs_db: Database, queue: PgJobQueue) -> None:
    started = asyncio.Event()

    async def work(job: Job, progress: Progress) -> None:
        started.set()
        await asyncio.sleep(10)

    handler = Recorder(work)
    runner = JobRunner(queue, {KIND: handler}, worker_id="w-stopping")
    job_id = await queue.enqueue(KIND, "app-k", {})
    task = asyncio.create_task(runner.run_forever())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    row = await job_row(jobs_db, job_id)
    # Pending again, attempt not counted: any replica retries it without waiting for the lease.
    assert (row["status"], row["attempts"], row["locked_by"]) == ("pending", 0, None)
    assert handler.failures == []


async def test_notify_wakes_an_idle_runner(jobs_db: Database, queue: PgJobQueue) -> None:
    handler = Recorder()
    runner = JobRunner(queue, {KIND: handler}, worker_id="w-idle", poll_interval=60)
    task = asyncio.create_task(runner.run_forever())
    try:
        await asyncio.sleep(0.1)  # the first poll found nothing: now it waits a minute
        job_id = await queue.enqueue(KIND, "app-l", {})
        runner.notify()

        async def done() -> bool:
            return await queue.status(job_id) is JobStatus.SUCCEEDED

        await eventually(done, seconds=2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert handler.runs == [job_id]
