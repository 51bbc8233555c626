"""Runs durable jobs: claims them under a lease, keeps the lease alive, records the outcome.

Every replica runs a JobRunner over the same queue. A job is held under a
lease that the runner renews while the handler works; a replica that dies
stops renewing, and once the lease expires another runner takes the job over
and runs it again from the start (handlers are idempotent). A runner that
cannot renew for most of a lease stops its handler before the lease can
expire, so two runners never work on the same job at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Collection, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Protocol

from service.domain.errors import Unavailable
from service.domain.jobs import Job, JobCancelled, JobFailed, JobHandler, JobKind, JobStatus
from service.observability import metrics, tracing

log = logging.getLogger(__name__)

# Progress reports reach the database at most this often; cancellation is noticed
# at the first progress report after this interval (or at the next heartbeat).
PROGRESS_INTERVAL_SECONDS = 0.5
# Handing a job back on shutdown is a courtesy (the lease expires anyway): never
# hold up the shutdown for long.
RELEASE_TIMEOUT_SECONDS = 5.0
# A job that met an outage of PostgreSQL or the object store waits this long before it is
# handed back, and is retried this many times without counting an attempt.
OUTAGE_PAUSE_SECONDS = 2.0
OUTAGE_RETRIES = 30
CANCELLED_MESSAGE = "cancelled"


class LeasedJobQueue(Protocol):
    """What the runner needs of the queue (service.storage.jobs.PgJobQueue)."""

    def transaction(self) -> AbstractAsyncContextManager[None]: ...

    async def claim(
        self, kinds: Collection[JobKind], worker_id: str, lease: timedelta
    ) -> Job | None: ...

    async def heartbeat(
        self, job_id: int, worker_id: str, lease: timedelta, *, progress: int | None = None
    ) -> JobStatus | None: ...

    async def finish(
        self, job_id: int, worker_id: str, status: JobStatus, error: str = ""
    ) -> JobStatus | None: ...

    async def release(
        self, job_id: int, worker_id: str, *, counted: bool = True
    ) -> JobStatus | None: ...


def new_worker_id() -> str:
    """Names this runner in the jobs table: which host and process holds a lease."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def gave_up_message(attempts: int) -> str:
    # Exception texts can carry internals (paths, SQL): callers get a pointer instead.
    return f"internal error after {attempts} attempts (see server log)"


class _Lease:
    """A claimed job's lease as its runner knows it; also the handler's Progress callback."""

    def __init__(
        self, queue: LeasedJobQueue, job: Job, worker_id: str, duration: timedelta
    ) -> None:
        self._queue = queue
        self._job = job
        self._worker_id = worker_id
        self._duration = duration
        # RUNNING while held; CANCELLED once cancel() was seen; None once another
        # runner took the job over. Never goes back to RUNNING.
        self.status: JobStatus | None = JobStatus.RUNNING
        # When the last renewal that succeeded was sent: the lease runs from there.
        self.confirmed_at = time.monotonic()
        self._percent: int | None = None
        self._last_contact = -math.inf

    @property
    def held(self) -> bool:
        return self.status is JobStatus.RUNNING

    @property
    def lost(self) -> bool:
        return self.status is not JobStatus.RUNNING and self.status is not JobStatus.CANCELLED

    def lose(self) -> None:
        self.status = None

    async def renew(self) -> None:
        sent = time.monotonic()
        self._last_contact = sent
        status = await self._queue.heartbeat(
            self._job.id, self._worker_id, self._duration, progress=self._percent
        )
        if self.status is JobStatus.RUNNING:
            self.status = status
            if status is JobStatus.RUNNING:
                self.confirmed_at = max(self.confirmed_at, sent)

    async def progress(self, percent: int) -> None:
        self._percent = min(max(int(percent), 0), 100)
        if self.held and time.monotonic() - self._last_contact >= PROGRESS_INTERVAL_SECONDS:
            try:
                await self.renew()
            except Exception as exc:
                # The heartbeat keeps the lease safe; a lost report is no reason to fail the job.
                log.warning("job %s: progress not recorded: %s", self._job.id, exc)
        if not self.held:
            raise JobCancelled(f"job {self._job.id} was cancelled")


class JobRunner:
    """Claims and runs jobs of the kinds in `handlers`.

    `handlers` is read at every claim, not copied: the composition root may fill
    it after building the runner. `concurrency` jobs run at once; `max_attempts`
    bounds the runs of a job that keeps failing with unexpected errors or
    keeps killing its process. Jobs of the `background` kinds (work no caller waits
    for, such as embedding every upload) run in a lane of their own, one at a time
    besides those: a stream of them never holds up a version build or an export.
    """

    def __init__(
        self,
        queue: LeasedJobQueue,
        handlers: Mapping[JobKind, JobHandler],
        *,
        worker_id: str,
        lease: timedelta = timedelta(seconds=30),
        poll_interval: float = 1.0,
        concurrency: int = 1,
        max_attempts: int = 3,
        background: frozenset[JobKind] = frozenset(),
    ) -> None:
        if lease <= timedelta(0) or poll_interval <= 0:
            raise ValueError("lease and poll_interval must be positive")
        if concurrency < 1 or max_attempts < 1:
            raise ValueError("concurrency and max_attempts must be at least 1")
        self._queue = queue
        self._handlers = handlers
        self.worker_id = worker_id
        self._lease = lease
        self._poll_interval = poll_interval
        self._concurrency = concurrency
        self._background = background
        self._max_attempts = max_attempts
        self._outages: dict[int, int] = {}
        # How each run settled, for the duration metric (see run_once).
        self._settled: dict[int, str] = {}
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """Claims at once instead of at the next poll. Call it after the enqueueing
        transaction commits: before, the job is not visible to the runner yet."""
        self._wake.set()

    async def run_forever(self) -> None:
        """Runs jobs until cancelled; a job in progress is then handed back to the queue."""
        async with asyncio.TaskGroup() as group:
            for slot in range(self._concurrency):
                group.create_task(self._poll(background=False), name=f"job-runner-{slot}")
            if self._background:
                group.create_task(self._poll(background=True), name="job-runner-background")

    async def _poll(self, *, background: bool) -> None:
        while True:
            # Cleared before the claim, so a notify() during the claim is not lost.
            self._wake.clear()
            try:
                if await self.run_once(background=background):
                    continue
            except Exception as exc:
                log.warning("job runner: cannot claim jobs (retrying): %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_interval)

    async def run_once(self, *, background: bool | None = None) -> bool:
        """Claims and runs at most one job (of the background kinds, of the others, or of
        any kind when `background` is None); whether there was one."""
        kinds = [
            kind
            for kind in self._handlers
            if background is None or (kind in self._background) == background
        ]
        if not kinds:
            return False
        job = await self._queue.claim(kinds, self.worker_id, self._lease)
        if job is None:
            return False
        started = time.monotonic()
        try:
            with tracing.job_span(job.kind.value, job.id, job.attempts):
                await self._run(job)
        finally:
            # Unsettled: the lease was lost, an outage or the shutdown handed the job back,
            # or its outcome could not be recorded.
            outcome = self._settled.pop(job.id, "abandoned")
            metrics.job_finished(job.kind.value, outcome, time.monotonic() - started)
        return True

    async def _run(self, job: Job) -> None:
        handler = self._handlers[job.kind]
        if job.attempts > self._max_attempts:
            # Every earlier attempt ended with its runner gone (the lease expired):
            # a job that kills its process must not take replicas down forever.
            log.error("job %s (%s): runner died in each of its attempts", job.id, job.kind.value)
            message = gave_up_message(job.attempts - 1)
            if not await self._settle(job, handler, JobStatus.FAILED, message):
                with contextlib.suppress(Exception):
                    await self._queue.finish(job.id, self.worker_id, JobStatus.FAILED, message)
            return
        log.info("job %s (%s) attempt %d started", job.id, job.kind.value, job.attempts)
        lease = _Lease(self._queue, job, self.worker_id, self._lease)
        work = asyncio.create_task(handler.run(job, lease.progress), name=f"job-{job.id}")
        keep_alive = asyncio.create_task(self._keep_alive(job, lease, work))
        try:
            await asyncio.wait({work})
        except asyncio.CancelledError:
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            keep_alive.cancel()
            # Handed back at once, without counting the attempt: the shutdown is not
            # the job's fault, and another replica need not wait for the lease to expire.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self._queue.release(job.id, self.worker_id, counted=False),
                    RELEASE_TIMEOUT_SECONDS,
                )
            raise
        finally:
            # Stopped before settling: a renewal would wait on the row lock the settling
            # transaction holds.
            keep_alive.cancel()
            await asyncio.gather(keep_alive, return_exceptions=True)
        if lease.lost:
            log.warning("job %s: lease lost to another runner; stopped", job.id)
            return
        error = asyncio.CancelledError() if work.cancelled() else work.exception()
        if error is None:
            await self._settle(job, handler, JobStatus.SUCCEEDED, "")
        elif isinstance(error, JobFailed):
            await self._settle(job, handler, JobStatus.FAILED, str(error) or "failed")
        elif isinstance(error, JobCancelled):
            await self._settle(job, handler, JobStatus.CANCELLED, CANCELLED_MESSAGE)
        elif isinstance(error, Unavailable) and self._outages.get(job.id, 0) < OUTAGE_RETRIES:
            await self._after_outage(job, error)
        else:
            log.error(
                "job %s (%s) attempt %d/%d raised",
                job.id,
                job.kind.value,
                job.attempts,
                self._max_attempts,
                exc_info=error,
            )
            if job.attempts < self._max_attempts:
                await self._settle(job, handler, JobStatus.PENDING, "")
            else:
                await self._settle(job, handler, JobStatus.FAILED, gave_up_message(job.attempts))

    async def _after_outage(self, job: Job, error: Unavailable) -> None:
        """PostgreSQL or the object store went away under the job: not the job's fault, so
        the attempt is not counted. The job goes back to the queue after a pause (an outage
        must not spin it); if PostgreSQL is still away the release fails and the lease
        expires, which counts. OUTAGE_RETRIES bounds the uncounted retries of one job."""
        self._outages[job.id] = self._outages.get(job.id, 0) + 1
        log.warning("job %s (%s): %s; retrying after the outage", job.id, job.kind.value, error)
        await asyncio.sleep(OUTAGE_PAUSE_SECONDS)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self._queue.release(job.id, self.worker_id, counted=False),
                RELEASE_TIMEOUT_SECONDS,
            )

    async def _keep_alive(self, job: Job, lease: _Lease, work: asyncio.Task[None]) -> None:
        interval = self._lease.total_seconds() / 3
        while lease.held:
            await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(lease.renew(), interval)
            except Exception as exc:
                # Once two renewals are missed, a third of the lease is left: stop the
                # handler before another runner may take the job over.
                if time.monotonic() - lease.confirmed_at < 2 * interval:
                    log.warning("job %s: lease renewal failed (retrying): %s", job.id, exc)
                    continue
                log.error("job %s: lease cannot be renewed; stopping: %s", job.id, exc)
                lease.lose()
            if lease.lost:
                work.cancel()
        # Cancelled: the handler learns it at its next progress report and stops cleanly.

    async def _settle(self, job: Job, handler: JobHandler, status: JobStatus, message: str) -> bool:
        """Ends the job with `status` (PENDING: back to the queue for a retry) and, when it
        ends failed or cancelled, records that on its resource in the same transaction.

        False when that could not be recorded: the job stays leased to this runner
        and runs again once the lease expires."""
        if status is not JobStatus.PENDING:
            self._outages.pop(job.id, None)
        try:
            async with self._queue.transaction():
                if status is JobStatus.PENDING:
                    ended = await self._queue.release(job.id, self.worker_id)
                else:
                    ended = await self._queue.finish(job.id, self.worker_id, status, message)
                if ended is JobStatus.CANCELLED:
                    await handler.failed(job, CANCELLED_MESSAGE)
                elif ended is JobStatus.FAILED:
                    await handler.failed(job, message)
        except Exception:
            log.exception("job %s: outcome not recorded; it runs again after its lease", job.id)
            return False
        if ended is None:
            log.warning("job %s: lease lost to another runner before it ended", job.id)
        else:
            log.info("job %s (%s) %s", job.id, job.kind.value, ended.value)
            self._settled[job.id] = "retry" if ended is JobStatus.PENDING else ended.value
        return True
