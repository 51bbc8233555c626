"""The domain's job helpers: payload ids and the scheduler that wakes the runner after commit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from service.domain.jobs import Job, JobFailed, JobKind, JobScheduler, JobStatus, payload_ids


def test_payload_ids_come_in_the_order_asked() -> None:
    job = Job(1, JobKind.EXPORT_VERSION, "main", {"version_id": "v", "dataset_id": "d"})
    assert payload_ids(job, "dataset_id", "version_id", what="export") == ["d", "v"]


@pytest.mark.parametrize("payload", [{}, {"dataset_id": "d"}, {"dataset_id": "d", "version_id": 7}])
def test_a_missing_or_mistyped_id_fails_the_job_for_good(payload: dict[str, Any]) -> None:
    job = Job(1, JobKind.BUILD_VERSION, "main", payload)
    with pytest.raises(JobFailed, match="malformed build job payload"):
        payload_ids(job, "dataset_id", "version_id", what="build")


class _Queue:
    async def enqueue(self, kind: JobKind, app_id: str, payload: dict[str, Any]) -> int:
        return 42

    async def cancel(self, job_id: int) -> bool:
        return True

    async def status(self, job_id: int) -> JobStatus | None:
        return None


class _Tx:
    def __init__(self) -> None:
        self.hooks: list[Callable[[], None]] = []

    def after_commit(self, hook: Callable[[], None]) -> None:
        self.hooks.append(hook)


async def test_the_scheduler_wakes_the_runner_only_after_commit() -> None:
    woken: list[bool] = []
    tx = _Tx()
    scheduler = JobScheduler(_Queue(), tx, lambda: woken.append(True))
    assert await scheduler.enqueue(JobKind.BUILD_VERSION, "main", {}) == 42
    assert woken == []
    for hook in tx.hooks:
        hook()
    assert woken == [True]
