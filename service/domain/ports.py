"""What the domain needs from storage. Implemented in service.storage."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Protocol

from service.domain.models import (
    ApiKey,
    Dataset,
    DatasetListQuery,
    DatasetStatistics,
    IdempotencyRecord,
    StoredBlob,
)


class TransactionManager(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[None]:
        """Repository calls inside the block share one database transaction."""
        ...


class DatasetRepository(Protocol):
    async def insert(self, dataset: Dataset) -> Dataset:
        """Raises AlreadyExists when the id is taken (deleted datasets included)."""
        ...

    async def get(
        self, app_id: str, dataset_id: str, *, include_deleted: bool = False, lock: bool = False
    ) -> Dataset | None: ...

    async def list(self, query: DatasetListQuery) -> list[Dataset]: ...

    async def update(self, dataset: Dataset) -> Dataset:
        """Stores every mutable field (deletion marks included), bumps the revision and
        modified_at."""
        ...

    async def purge(self, app_id: str, dataset_id: str) -> None: ...

    async def purge_expired(self, now: datetime, limit: int) -> int: ...

    async def statistics(self, app_id: str, dataset_id: str) -> DatasetStatistics: ...


class BlobStore(Protocol):
    async def put(self, data: bytes, content_type: str) -> StoredBlob:
        """Stores bytes under their content address; safe to call again with the same bytes."""
        ...

    async def download_url(self, blob: StoredBlob, ttl: timedelta) -> str: ...

    async def collect_orphans(self, older_than: timedelta, limit: int) -> int:
        """Deletes blobs no row references that were last touched before `older_than` ago."""
        ...


class ApiKeyRepository(Protocol):
    async def insert(self, key: ApiKey) -> None: ...

    async def find_by_lookup(self, lookup: str) -> list[ApiKey]: ...

    async def find_by_description(self, app_id: str, description: str) -> ApiKey | None: ...


class IdempotencyRepository(Protocol):
    async def claim(
        self, app_id: str, method: str, request_id: str, fingerprint: bytes
    ) -> IdempotencyRecord | None:
        """Reserves the request id in the current transaction; returns the earlier record if any."""
        ...

    async def complete(
        self, app_id: str, method: str, request_id: str, response: bytes
    ) -> None: ...

    async def expire(self, older_than: timedelta) -> int: ...


class Clock(Protocol):
    def now(self) -> datetime: ...
