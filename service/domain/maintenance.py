"""Periodic clean-up: purge expired deletions, collect orphan blobs and input content no
input or version refers to, refresh input content any path left stale, forget old request
ids, purge audit events past their retention; for search, collect replaced vectors, build missing
vector indexes and fill the search columns of versions built before they existed."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from datetime import timedelta
from typing import Protocol

from service.domain.clock import SystemClock
from service.domain.contents import ContentKeeper
from service.domain.datasets import DatasetService
from service.domain.embeddings import EmbeddingRepository
from service.domain.ports import AuditRepository, BlobStore, Clock, IdempotencyRepository

DEFAULT_AUDIT_RETENTION = timedelta(days=90)
# Rows each round handles at most, so that a round stays short whatever the backlog.
COLLECT_BATCH = 1000
BACKFILL_BATCH = 500
# Batches of the backfill per round: 10,000 members a minute at the default interval.
BACKFILL_BATCHES = 20


class CaptureBackfill(Protocol):
    """storage/versions.py"""

    async def backfill_capture(self, limit: int) -> int:
        """Fills the search columns of up to `limit` members of versions built before
        they existed; how many it filled (0 once done)."""
        ...


@dataclass(frozen=True)
class MaintenanceReport:
    """What one maintenance round removed or filled (logged when it did anything)."""

    datasets_purged: int
    blobs_collected: int
    request_ids_expired: int
    vectors_collected: int = 0
    version_members_backfilled: int = 0
    audit_purged: int = 0
    contents_refreshed: int = 0
    contents_collected: int = 0


@dataclass(frozen=True)
class Maintenance:
    datasets: DatasetService
    blobs: BlobStore
    idempotency: IdempotencyRepository
    _: KW_ONLY
    orphan_grace: timedelta
    request_id_ttl: timedelta
    embeddings: EmbeddingRepository | None = None
    captures: CaptureBackfill | None = None
    audit: AuditRepository | None = None
    audit_retention: timedelta = DEFAULT_AUDIT_RETENTION
    keeper: ContentKeeper | None = None
    clock: Clock = field(default_factory=SystemClock)

    async def run_once(self) -> MaintenanceReport:
        # Purge first: a purged dataset's cover becomes an orphan, collected once
        # its grace period is over.
        purged = await self.datasets.purge_expired()
        collected = await self.blobs.collect_orphans(self.orphan_grace, limit=1000)
        expired = await self.idempotency.expire(self.request_id_ttl)
        vectors = 0
        if self.embeddings is not None:
            # Vectors a deleted version referred to become collectable; the indexes a
            # crash left invalid are rebuilt (a no-op when every model has one).
            vectors = await self.embeddings.collect_replaced(COLLECT_BATCH)
            await self.embeddings.ensure_indexes()
        backfilled = 0
        if self.captures is not None:
            for _ in range(BACKFILL_BATCHES):
                filled = await self.captures.backfill_capture(BACKFILL_BATCH)
                backfilled += filled
                if filled < BACKFILL_BATCH:
                    break
        audit_purged = 0
        if self.audit is not None:
            audit_purged = await self.audit.purge_before(self.clock.now() - self.audit_retention)
        refreshed = contents_collected = 0
        if self.keeper is not None:
            for _ in range(BACKFILL_BATCHES):
                done = await self.keeper.refresh_any()
                refreshed += done
                if not done:
                    break
            contents_collected = await self.keeper.collect(COLLECT_BATCH)
        return MaintenanceReport(
            purged,
            collected,
            expired,
            vectors,
            backfilled,
            audit_purged,
            refreshed,
            contents_collected,
        )
