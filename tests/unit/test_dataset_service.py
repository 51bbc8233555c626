"""Dataset use cases against in-memory fakes of the storage ports."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import pytest

from service.domain.datasets import (
    CoverImageInput,
    DatasetFields,
    DatasetService,
    DatasetSettings,
)
from service.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from service.domain.models import (
    Dataset,
    DatasetListQuery,
    DatasetStatistics,
    Principal,
    StoredBlob,
    Visibility,
)
from service.domain.patch import PatchAction
from service.media.probe import MediaProbes

WRITER = Principal("k", "app", frozenset({"read", "write"}))


class FakeRepo:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Dataset] = {}
        self.touches: list[datetime] = []

    async def insert(self, dataset: Dataset) -> Dataset:
        self.rows[(dataset.app_id, dataset.id)] = dataset
        return dataset

    async def get(
        self, app_id: str, dataset_id: str, *, include_deleted: bool = False, lock: bool = False
    ) -> Dataset | None:
        row = self.rows.get((app_id, dataset_id))
        if row is None or (row.deleted_at is not None and not include_deleted):
            return None
        return row

    async def list(self, query: DatasetListQuery) -> list[Dataset]:
        return [r for r in self.rows.values() if r.deleted_at is None][: query.limit]

    async def update(self, dataset: Dataset) -> Dataset:
        saved = dataclasses.replace(dataset, revision=dataset.revision + 1)
        self.rows[(dataset.app_id, dataset.id)] = saved
        return saved

    async def purge(self, app_id: str, dataset_id: str) -> None:
        del self.rows[(app_id, dataset_id)]

    async def purge_expired(self, now: datetime, limit: int) -> int:
        expired = [k for k, r in self.rows.items() if r.purge_after and r.purge_after <= now]
        for key in expired[:limit]:
            del self.rows[key]
        return len(expired[:limit])

    async def statistics(self, app_id: str, dataset_id: str) -> DatasetStatistics:
        return DatasetStatistics()

    async def touch(self, app_id: str, dataset_id: str, now: datetime, since: datetime) -> bool:
        self.touches.append(now)
        row = self.rows[(app_id, dataset_id)]
        if row.last_accessed_at is not None and row.last_accessed_at > since:
            return False
        self.rows[(app_id, dataset_id)] = dataclasses.replace(row, last_accessed_at=now)
        return True


class FakeBlobs:
    def __init__(self) -> None:
        self.stored: list[bytes] = []

    async def put(self, data: bytes, content_type: str) -> StoredBlob:
        self.stored.append(data)
        return StoredBlob(f"k{len(self.stored)}", "h", len(data), content_type)

    async def put_many(self, items: list[tuple[bytes, str]]) -> list[StoredBlob]:
        return [await self.put(data, content_type) for data, content_type in items]

    async def download_url(self, blob: StoredBlob, ttl: timedelta) -> str:
        return f"http://blobs/{blob.key}"

    async def download_urls(self, blobs: list[StoredBlob], ttl: timedelta) -> list[str]:
        return [await self.download_url(b, ttl) for b in blobs]

    def hosted(self, blob: StoredBlob) -> tuple[str, str]:
        return "mem://blobs", blob.key

    def hosted_key(self, suffix: str) -> str | None:
        return suffix

    async def read(self, blob: StoredBlob) -> bytes:
        return self.stored[int(blob.key[1:]) - 1]

    async def collect_orphans(self, older_than: timedelta, limit: int) -> int:
        return 0


class FakeTx:
    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield

    @asynccontextmanager
    async def read_transaction(self) -> AsyncIterator[None]:
        yield

    def after_commit(self, hook: Callable[[], None]) -> None:
        hook()


class Clock:
    def __init__(self) -> None:
        self.current = datetime(2026, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current


def service() -> tuple[DatasetService, FakeRepo, FakeBlobs, Clock]:
    repo, blobs, clock = FakeRepo(), FakeBlobs(), Clock()
    settings = DatasetSettings(delete_retention=timedelta(days=7))
    return DatasetService(repo, blobs, FakeTx(), clock, settings, MediaProbes()), repo, blobs, clock


async def test_delete_sets_purge_time_and_undelete_expires_with_it() -> None:
    datasets, repo, _, clock = service()
    await datasets.create(WRITER, "app", "d", DatasetFields(description="x"))
    outcome = await datasets.delete(WRITER, "app", "d", force=False)
    assert outcome.purge_after == clock.current + timedelta(days=7)
    clock.current += timedelta(days=7, seconds=1)
    with pytest.raises(NotFound):
        await datasets.undelete(WRITER, "app", "d")
    assert await datasets.purge_expired() == 1
    assert repo.rows == {}


async def test_undelete_within_window() -> None:
    datasets, _, _, clock = service()
    await datasets.create(WRITER, "app", "d", DatasetFields())
    await datasets.delete(WRITER, "app", "d", force=False)
    clock.current += timedelta(days=6)
    restored = await datasets.undelete(WRITER, "app", "d")
    assert restored.dataset.deleted_at is None
    with pytest.raises(FailedPrecondition):
        await datasets.undelete(WRITER, "app", "d")


async def test_invalid_cover_is_rejected_before_anything_is_stored() -> None:
    datasets, repo, blobs, _ = service()
    with pytest.raises(InvalidArgument):
        await datasets.create(
            WRITER, "app", "d", DatasetFields(cover=CoverImageInput(data=b"\x89PNG broken"))
        )
    assert blobs.stored == [] and repo.rows == {}


async def test_remove_of_visibility_is_refused() -> None:
    datasets, _, _, _ = service()
    await datasets.create(WRITER, "app", "d", DatasetFields())
    with pytest.raises(InvalidArgument) as raised:
        await datasets.update(
            WRITER,
            "app",
            "d",
            PatchAction.REMOVE,
            DatasetFields(visibility=Visibility.PUBLIC),
            etag="",
        )
    assert raised.value.violations[0].field == "dataset.visibility"


async def test_reads_record_the_access_at_most_once_a_minute() -> None:
    datasets, repo, _, clock = service()
    await datasets.create(WRITER, "app", "d", DatasetFields())
    first = clock.current
    await datasets.get(WRITER, "app", "d")
    clock.current += timedelta(seconds=30)
    await datasets.get(WRITER, "app", "d")
    await datasets.touch("app", "d")
    # The second read and the touch cost no statement: this process recorded one just now.
    assert repo.touches == [first]
    clock.current += timedelta(seconds=31)
    view = await datasets.get(WRITER, "app", "d")
    assert repo.touches == [first, clock.current]
    assert repo.rows[("app", "d")].last_accessed_at == clock.current
    # The view is the row as read, before this read was recorded.
    assert view.dataset.last_accessed_at == first


async def test_a_locked_dataset_refuses_updates_and_deletion_until_unlocked() -> None:
    datasets, _, _, _ = service()
    await datasets.create(WRITER, "app", "d", DatasetFields(locked=True))
    with pytest.raises(FailedPrecondition) as refused:
        await datasets.update(
            WRITER, "app", "d", PatchAction.OVERWRITE, DatasetFields(description="x"), ""
        )
    assert refused.value.reason == "DATASET_LOCKED"
    with pytest.raises(FailedPrecondition):
        await datasets.update(
            WRITER, "app", "d", PatchAction.OVERWRITE, DatasetFields(locked=False, hidden=True), ""
        )
    with pytest.raises(FailedPrecondition):
        await datasets.delete(WRITER, "app", "d", force=True)
    unlocked = await datasets.update(
        WRITER, "app", "d", PatchAction.OVERWRITE, DatasetFields(locked=False), ""
    )
    assert not unlocked.dataset.locked
    await datasets.delete(WRITER, "app", "d", force=True)
