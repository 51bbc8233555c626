"""Dataset versions: create, get, list, update, delete and cancel.

A version is a snapshot by reference: CreateDatasetVersion records, in one transaction,
the dataset's members with a reference to each input's current content (the input with
every annotation folded in, kept up to date by ContentKeeper, domain/contents.py), the
metrics summed over that content, the vectors the inputs have, and the ontology governing
the dataset (through its projects). The version is READY when the call returns, it is
exactly the dataset at that moment, and later edits to inputs, annotations or the
dataset change no version. Content shared by versions is stored once.

Versions created by a release that built them in a background job (BUILD_VERSION) and
still building when it was upgraded are failed by migration 0014; RetiredBuild ends
their jobs.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any

from service.domain.auth import Permission, authorize
from service.domain.contents import ContentKeeper
from service.domain.datasets import DatasetChange, require_changeable
from service.domain.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    NotFound,
    Violations,
)
from service.domain.jobs import Job, JobFailed, JobQueue, Progress, payload_ids
from service.domain.models import (
    DatasetVersion,
    Ontology,
    Principal,
    VersionOntology,
    VersionStatus,
)
from service.domain.paging import split_page
from service.domain.ports import (
    ContentRepository,
    MembershipRepository,
    OntologyRepository,
    TransactionManager,
    VersionRepository,
)
from service.domain.validation import check_id, check_metadata, check_text, checked_ids, require_ids

DESCRIPTION_MAX_CHARS = 1024
CANCELLED = "cancelled"
RETIRED_BUILD = "the version was being built when datasetd was upgraded; create a new version"

BUILDING = frozenset({VersionStatus.PENDING, VersionStatus.IN_PROGRESS})


# What UpdateDatasetVersion may change: a version's content never changes.
UPDATABLE_FIELDS = ("description", "metadata")


@dataclass(frozen=True)
class VersionFields:
    """The fields a caller gave in a create or update; None means not given."""

    description: str | None = None
    metadata: dict[str, Any] | None = None

    def is_empty(self) -> bool:
        return self.description is None and self.metadata is None


def _check_fields(violations: Violations, fields: VersionFields) -> None:
    if fields.description is not None:
        check_text(violations, "version.description", fields.description, DESCRIPTION_MAX_CHARS)
    if fields.metadata is not None:
        check_metadata(violations, "version.metadata", fields.metadata)


@dataclass(frozen=True)
class VersionService:
    versions: VersionRepository
    members: MembershipRepository
    queue: JobQueue
    tx: TransactionManager
    keeper: ContentKeeper
    contents: ContentRepository
    ontologies: OntologyRepository

    async def create(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        version_id: str,
        fields: VersionFields,
    ) -> DatasetVersion:
        """The version, READY: its row, its members' references to their content, its
        metrics, vectors and ontology commit together."""
        authorize(principal, app_id, Permission.WRITE)
        violations = checked_ids(("dataset_id", dataset_id))
        check_id(violations, "version.id", version_id, required=False)
        _check_fields(violations, fields)
        violations.raise_if_any()
        version_id = version_id or uuid.uuid4().hex
        async with self.tx.transaction():
            # Also locks the dataset against deletion until the members are recorded.
            await require_changeable(self.members, app_id, [dataset_id], DatasetChange.VERSIONS)
            # Members a write outside a transaction left stale get their content now.
            await self.keeper.refresh_dataset(app_id, dataset_id)
            # Before the references are read: no content they name is collected meanwhile.
            await self.contents.share_lock()
            created = await self.versions.insert(
                DatasetVersion(
                    app_id=app_id,
                    dataset_id=dataset_id,
                    id=version_id,
                    description=fields.description or "",
                    metadata=fields.metadata or {},
                )
            )
            if created is None:
                raise AlreadyExists(
                    f"dataset {dataset_id!r} already has a version {version_id!r}",
                    reason="VERSION_EXISTS",
                    violations=[FieldViolation("version.id", f"{version_id!r} already exists")],
                )
            fixed = await self.versions.fix_members(app_id, dataset_id, version_id)
            if fixed.stale:
                # A write outside a transaction committed between the refresh and the
                # references: nothing of the version is kept, a retry takes it in.
                raise Aborted(
                    f"{fixed.stale} input(s) of dataset {dataset_id!r} changed while the "
                    "version was being created; nothing was stored, retry",
                    reason="INPUTS_CHANGED_CONCURRENTLY",
                )
            governing = await self.ontologies.governing(app_id, dataset_id)
            await self.versions.store_ontology(
                app_id, dataset_id, version_id, captured(governing) if governing else None
            )
            return await self.versions.update(
                dataclasses.replace(
                    created,
                    status=VersionStatus.READY,
                    percent=100,
                    metrics=fixed.metrics,
                    input_count=fixed.input_count,
                )
            )

    async def get(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        version_id: str,
        *,
        for_write: bool = False,
    ) -> DatasetVersion:
        """`for_write`: in the caller's transaction, which then writes under the version;
        the dataset stays locked against deletion until it ends."""
        authorize(principal, app_id, Permission.READ)
        self._check_ids(dataset_id, version_id, "version_id")
        if for_write:
            async with self.tx.transaction():
                return await self._require(app_id, dataset_id, version_id)
        async with self.tx.read_transaction():
            return await self._require(app_id, dataset_id, version_id, share=False)

    async def list(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        before_seq: int | None,
        limit: int,
    ) -> tuple[list[DatasetVersion], int | None]:
        """A page, newest first, and the cursor of its last row when more rows follow."""
        authorize(principal, app_id, Permission.READ)
        require_ids(("dataset_id", dataset_id))
        async with self.tx.read_transaction():
            await self._require_dataset(app_id, dataset_id, share=False)
            rows = await self.versions.page(app_id, dataset_id, before_seq, limit + 1)
        return split_page(rows, limit)

    async def update(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        version_id: str,
        fields: VersionFields,
    ) -> DatasetVersion:
        """Replaces description and/or metadata, whatever the status: content never changes."""
        authorize(principal, app_id, Permission.WRITE)
        violations = checked_ids(("dataset_id", dataset_id), ("version.id", version_id))
        if fields.is_empty():
            violations.add(
                "version",
                "nothing to update: set description or metadata, or name them in update_mask",
            )
        _check_fields(violations, fields)
        violations.raise_if_any()
        async with self.tx.transaction():
            current = await self._require(app_id, dataset_id, version_id, lock=True, change=True)
            changes: dict[str, Any] = {}
            if fields.description is not None:
                changes["description"] = fields.description
            if fields.metadata is not None:
                changes["metadata"] = fields.metadata
            return await self.versions.update(dataclasses.replace(current, **changes))

    async def delete(
        self, principal: Principal, app_id: str, dataset_id: str, version_id: str
    ) -> None:
        authorize(principal, app_id, Permission.WRITE)
        self._check_ids(dataset_id, version_id, "version_id")
        async with self.tx.transaction():
            current = await self._require(app_id, dataset_id, version_id, lock=True, change=True)
            # A build that runs on finds the version gone at its next page and stops.
            if current.status in BUILDING and current.job_id is not None:
                await self.queue.cancel(current.job_id)
            await self.versions.delete(app_id, dataset_id, version_id)

    async def cancel(
        self, principal: Principal, app_id: str, dataset_id: str, version_id: str
    ) -> DatasetVersion:
        """Ends a pending or running build: the version is FAILED with details "cancelled"."""
        authorize(principal, app_id, Permission.WRITE)
        self._check_ids(dataset_id, version_id, "version_id")
        async with self.tx.transaction():
            current = await self._require(app_id, dataset_id, version_id, lock=True, change=True)
            if current.status not in BUILDING:
                raise FailedPrecondition(
                    f"the build of version {version_id!r} already ended "
                    f"({current.status.value}); there is nothing to cancel",
                    reason="VERSION_BUILD_ENDED",
                    metadata={"status": current.status.value},
                )
            if current.job_id is not None:
                await self.queue.cancel(current.job_id)
            return await self.versions.update(
                dataclasses.replace(current, status=VersionStatus.FAILED, details=CANCELLED)
            )

    @staticmethod
    def _check_ids(dataset_id: str, version_id: str, version_field: str) -> None:
        violations = checked_ids(("dataset_id", dataset_id))
        check_id(violations, version_field, version_id)
        violations.raise_if_any()

    async def _require_dataset(self, app_id: str, dataset_id: str, *, share: bool = True) -> None:
        """`share`: lock the dataset against deletion (not in a read_transaction, whose
        snapshot already keeps it from vanishing between its reads)."""
        if not await self.members.live_datasets(app_id, [dataset_id], lock=share):
            raise NotFound.in_app("dataset", app_id, dataset_id)

    async def _require(
        self,
        app_id: str,
        dataset_id: str,
        version_id: str,
        *,
        lock: bool = False,
        share: bool = True,
        change: bool = False,
    ) -> DatasetVersion:
        """The version of a live dataset: those of a deleted dataset are gone with it.
        `change`: the caller changes the version, which the dataset's lock refuses."""
        if change:
            await require_changeable(self.members, app_id, [dataset_id], DatasetChange.VERSIONS)
        else:
            await self._require_dataset(app_id, dataset_id, share=share)
        version = await self.versions.get(app_id, dataset_id, version_id, lock=lock)
        if version is None:
            raise NotFound.within("version", version_id, "dataset", dataset_id)
        return version


@dataclass(frozen=True)
class _Target:
    """The version a build job is about."""

    app_id: str
    dataset_id: str
    version_id: str

    @classmethod
    def of(cls, job: Job) -> _Target:
        return cls(job.app_id, *payload_ids(job, "dataset_id", "version_id", what="build"))

    @property
    def key(self) -> tuple[str, str, str]:
        return self.app_id, self.dataset_id, self.version_id


def captured(ontology: Ontology) -> VersionOntology:
    """What a version keeps of the ontology governing its dataset."""
    return VersionOntology(
        ontology.id,
        ontology.revision,
        ontology.classes,
        ontology.input_classifications,
        ontology.last_category_id,
    )


@dataclass(frozen=True)
class RetiredBuild:
    """The handler of BUILD_VERSION jobs queued by a release that built versions in the
    background: migration 0014 failed their versions (their content was never captured
    and cannot be any more); a job still queued marks its version so, if it is still
    building, and ends."""

    versions: VersionRepository
    tx: TransactionManager

    async def run(self, job: Job, progress: Progress) -> None:
        await self.failed(job, RETIRED_BUILD)

    async def failed(self, job: Job, message: str) -> None:
        try:
            target = _Target.of(job)
        except JobFailed:
            return
        async with self.tx.transaction():
            version = await self.versions.get(*target.key, lock=True)
            # A cancelled version keeps its "cancelled"; a READY one stays READY.
            if version is not None and version.status in BUILDING:
                await self.versions.update(
                    dataclasses.replace(
                        version, status=VersionStatus.FAILED, details=message or "failed"
                    )
                )
