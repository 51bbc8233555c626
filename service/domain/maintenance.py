"""Periodic clean-up: purge expired deletions, collect orphan blobs, forget old request ids."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from datetime import timedelta

from service.domain.datasets import DatasetService
from service.domain.ports import BlobStore, IdempotencyRepository


@dataclass(frozen=True)
class MaintenanceReport:
    """What one maintenance round removed (logged when it removed anything)."""

    datasets_purged: int
    blobs_collected: int
    request_ids_expired: int


@dataclass(frozen=True)
class Maintenance:
    datasets: DatasetService
    blobs: BlobStore
    idempotency: IdempotencyRepository
    _: KW_ONLY
    orphan_grace: timedelta
    request_id_ttl: timedelta

    async def run_once(self) -> MaintenanceReport:
        # Purge first: a purged dataset's cover becomes an orphan, collected once
        # its grace period is over.
        purged = await self.datasets.purge_expired()
        collected = await self.blobs.collect_orphans(self.orphan_grace, limit=1000)
        expired = await self.idempotency.expire(self.request_id_ttl)
        return MaintenanceReport(purged, collected, expired)
