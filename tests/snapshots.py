"""Versions created the way CreateDatasetVersion does, for tests that drive the domain on a
database of their own (no server): a VersionService with its ContentKeeper (snapshots by
reference, service/domain/contents.py)."""

from __future__ import annotations

from typing import Any

from service.domain.contents import ContentKeeper
from service.domain.jobs import JobKind, JobQueue
from service.domain.models import DatasetVersion, Principal
from service.domain.versions import VersionFields, VersionService
from service.formats.snapshot import ProtobufSnapshotEncoder
from service.storage.annotations import PgAnnotationRepository
from service.storage.blobs import ContentAddressedBlobStore
from service.storage.contents import PgContentRepository
from service.storage.db import Database
from service.storage.inputs import PgInputRepository, PgMembershipRepository
from service.storage.jobs import PgJobQueue
from service.storage.objectstore import ObjectStore
from service.storage.ontologies import PgOntologyRepository
from service.storage.versions import PgVersionRepository


class HeldJobs(PgJobQueue):
    """Queues jobs under a kind no runner claims, so that the test runs them."""

    async def enqueue(self, kind: JobKind, app_id: str, payload: dict[str, Any]) -> int:
        async with self._db.connection() as conn:
            job_id: int = await conn.fetchval(
                "INSERT INTO jobs (kind, app_id, payload) VALUES ('held-by-test', $1, $2)"
                " RETURNING id",
                app_id,
                payload,
            )
        return job_id


def content_keeper(db: Database, objects: ObjectStore) -> ContentKeeper:
    contents = PgContentRepository(db)
    return ContentKeeper(
        contents,
        PgInputRepository(db),
        PgAnnotationRepository(db),
        ContentAddressedBlobStore(db, objects),
        ProtobufSnapshotEncoder(),
        db,
    )


def version_service(
    db: Database, objects: ObjectStore, queue: JobQueue | None = None
) -> VersionService:
    """Without the transaction hook of the composition root (Storage.build): inputs written
    through `db` stay stale until the version's creation refreshes them, the path of writes
    outside a transaction."""
    keeper = content_keeper(db, objects)
    return VersionService(
        PgVersionRepository(db),
        PgMembershipRepository(db),
        queue if queue is not None else PgJobQueue(db),
        db,
        keeper,
        keeper.contents,
        PgOntologyRepository(db),
    )


async def create_ready(
    db: Database, objects: ObjectStore, app_id: str, dataset_id: str, version_id: str
) -> DatasetVersion:
    """The version, checked READY as CreateDatasetVersion returns it."""
    principal = Principal("test", app_id, frozenset({"read", "write"}))
    version = await version_service(db, objects).create(
        principal, app_id, dataset_id, version_id, VersionFields()
    )
    assert version.status.value == "ready" and version.percent == 100, version
    return version
