"""Durable background jobs: what the domain asks of the job queue and its handlers."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class JobKind(enum.Enum):
    BUILD_VERSION = "build_version"
    EXPORT_VERSION = "export_version"
    REENCODE_VIDEOS = "reencode_videos"
    EMBED_INPUTS = "embed_inputs"
    ADD_BY_SEARCH = "add_by_search"


class JobStatus(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Job:
    id: int
    kind: JobKind
    app_id: str
    payload: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0


class JobFailed(Exception):
    """A permanent failure: the job is not retried and the message is shown to callers."""


class JobCancelled(Exception):
    """Raised inside a handler when its job was cancelled while it ran."""


# Reports progress (0..100); raises JobCancelled when the job was cancelled meanwhile.
Progress = Callable[[int], Awaitable[None]]


class JobHandler(Protocol):
    async def run(self, job: Job, progress: Progress) -> None:
        """Does the work. Must be idempotent: after a crash the job runs again from the start."""
        ...

    async def failed(self, job: Job, message: str) -> None:
        """Records a permanent failure (or a cancellation) on the job's resource."""
        ...


class JobQueue(Protocol):
    async def enqueue(self, kind: JobKind, app_id: str, payload: dict[str, Any]) -> int:
        """Queues a job in the current transaction: it runs only if the transaction commits."""
        ...

    async def cancel(self, job_id: int) -> bool:
        """Marks a pending or running job cancelled; False when it had already ended."""
        ...

    async def status(self, job_id: int) -> JobStatus | None: ...


def payload_ids(job: Job, *names: str, what: str) -> list[str]:
    """The ids a job's payload names, in the order asked; JobFailed (no retry can help)
    when one is missing or not a string."""
    values = [job.payload.get(name) for name in names]
    ids = [value for value in values if isinstance(value, str)]
    if len(ids) < len(names):
        raise JobFailed(f"malformed {what} job payload {job.payload!r}")
    return ids


class AfterCommit(Protocol):
    def after_commit(self, hook: Callable[[], None]) -> None: ...


class JobScheduler:
    """The job queue as use cases see it: a job queued in a transaction wakes the runner
    once that transaction commits, so a build starts at once instead of at the runner's
    next poll, and never before its rows are visible."""

    def __init__(self, queue: JobQueue, tx: AfterCommit, wake: Callable[[], None]) -> None:
        self._queue = queue
        self._tx = tx
        self._wake = wake

    async def enqueue(self, kind: JobKind, app_id: str, payload: dict[str, Any]) -> int:
        job_id = await self._queue.enqueue(kind, app_id, payload)
        self._tx.after_commit(self._wake)
        return job_id

    async def cancel(self, job_id: int) -> bool:
        return await self._queue.cancel(job_id)

    async def status(self, job_id: int) -> JobStatus | None:
        return await self._queue.status(job_id)
