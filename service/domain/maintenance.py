"""Periodic clean-up: purge expired deletions, collect orphan blobs, forget old request ids."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from service.domain.datasets import DatasetService
from service.domain.ports import BlobStore, IdempotencyRepository


@dataclass(frozen=True)
class MaintenanceReport:
    datasets_purged: int
    blobs_collected: int
    request_ids_expired: int


class Maintenance:
    def __init__(
        self,
        datasets: DatasetService,
        blobs: BlobStore,
        idempotency: IdempotencyRepository,
        *,
        orphan_grace: timedelta,
        request_id_ttl: timedelta,
    ) -> None:
        self._datasets = datasets
        self._blobs = blobs
        self._idempotency = idempotency
        self._orphan_grace = orphan_grace
        self._request_id_ttl = request_id_ttl

    async def run_once(self) -> MaintenanceReport:
        # Purge first: a purged dataset's cover becomes an orphan, collected once
        # its grace period is over.
        purged = await self._datasets.purge_expired()
        collected = await self._blobs.collect_orphans(self._orphan_grace, limit=1000)
        expired = await self._idempotency.expire(self._request_id_ttl)
        return MaintenanceReport(purged, collected, expired)
