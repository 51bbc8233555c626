"""Dataset versions: create, get, list, update, delete and cancel; and VersionBuilder,
the background job that captures a version's content.

A version's members are fixed when it is created (in the creating transaction, so a
version holds exactly the dataset's members at that moment). Their content, each input
with every annotation folded in, is captured when the build reaches them and is never
touched again: later edits to inputs, annotations or the dataset change no version.

Inputs deleted between the creation and the build cannot be captured any more. The
build then fails and names them, rather than skipping them: a READY version always
holds every member it was created with.

The ontology governing the dataset (through its projects) is captured in the transaction
that makes the version READY, after every annotation: a class those annotations use
cannot have been removed meanwhile (the ontology refuses that), so the captured classes
name them all, and exports of the version keep the ontology as it was then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import uuid
from collections import defaultdict
from dataclasses import KW_ONLY, dataclass
from typing import Any

from service.domain.annotation_rules import summarize
from service.domain.auth import Permission, authorize
from service.domain.datasets import DatasetChange, require_changeable
from service.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    NotFound,
    Violations,
)
from service.domain.jobs import (
    Job,
    JobCancelled,
    JobFailed,
    JobKind,
    JobQueue,
    Progress,
    payload_ids,
)
from service.domain.models import (
    Annotation,
    AnnotationQuery,
    DatasetVersion,
    Input,
    InputSnapshot,
    InputView,
    Ontology,
    Principal,
    VersionContent,
    VersionMetrics,
    VersionOntology,
    VersionStatus,
)
from service.domain.paging import split_page
from service.domain.ports import (
    AnnotationRepository,
    BlobStore,
    InputRepository,
    InputSnapshotEncoder,
    MembershipRepository,
    OntologyRepository,
    TransactionManager,
    VersionRepository,
)
from service.domain.validation import check_id, check_metadata, check_text, checked_ids, require_ids

DESCRIPTION_MAX_CHARS = 1024
CANCELLED = "cancelled"
# Members per build page: each page is one write transaction and one progress report.
BUILD_PAGE_SIZE = 500
ANNOTATION_PAGE_SIZE = 5000
# How many deleted inputs a failed build names; the message gives the total as well.
MISSING_SHOWN = 20
# The size name of stored originals in a HostedURL (see BlobStore.hosted).
ORIGINAL_SIZE = "orig"

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

    async def create(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        version_id: str,
        fields: VersionFields,
    ) -> DatasetVersion:
        """The version, PENDING: its row, its members and its build job commit together."""
        authorize(principal, app_id, Permission.WRITE)
        violations = checked_ids(("dataset_id", dataset_id))
        check_id(violations, "version.id", version_id, required=False)
        _check_fields(violations, fields)
        violations.raise_if_any()
        version_id = version_id or uuid.uuid4().hex
        async with self.tx.transaction():
            # Also locks the dataset against deletion until the members are recorded.
            await require_changeable(self.members, app_id, [dataset_id], DatasetChange.VERSIONS)
            job_id = await self.queue.enqueue(
                JobKind.BUILD_VERSION, app_id, {"dataset_id": dataset_id, "version_id": version_id}
            )
            created = await self.versions.insert(
                DatasetVersion(
                    app_id=app_id,
                    dataset_id=dataset_id,
                    id=version_id,
                    description=fields.description or "",
                    metadata=fields.metadata or {},
                    job_id=job_id,
                )
            )
            if created is None:
                raise AlreadyExists(
                    f"dataset {dataset_id!r} already has a version {version_id!r}",
                    reason="VERSION_EXISTS",
                    violations=[FieldViolation("version.id", f"{version_id!r} already exists")],
                )
            count = await self.versions.fix_members(app_id, dataset_id, version_id)
        return dataclasses.replace(created, input_count=count)

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


def _inputs_deleted(total: int, shown: list[str]) -> JobFailed:
    more = f" and {total - len(shown)} more" if total > len(shown) else ""
    return JobFailed(
        f"{total} input(s) of the version were deleted before the build could capture them: "
        f"{', '.join(shown)}{more}; create a new version"
    )


def _content(
    position: int, item: Input, annotations: list[Annotation], data: bytes
) -> VersionContent:
    """A member's content and what search filters it by, both from what the build read
    (`annotations` without the input-level one, whose concepts are the input's)."""
    concepts = set(summarize({"concepts": item.concepts}).positive_concepts)
    for annotation in annotations:
        concepts |= summarize(annotation.data).positive_concepts
    return VersionContent(
        position,
        data,
        hashlib.sha256(data).digest(),
        item.blob.key if item.blob is not None else None,
        media_type=item.media_type,
        metadata=item.metadata,
        concepts=tuple(sorted(concepts)),
        annotated=bool(item.concepts or annotations),
        geo=item.geo,
        created_at=item.created_at,
    )


@dataclass(frozen=True)
class VersionBuilder:
    """The BUILD_VERSION job handler.

    Runs in pages of members; each page's content and progress commit together. A run
    after a crash starts again from the first page and overwrites the same rows with
    the content as it is then, and the metrics are summed afresh, so nothing is counted
    twice. Every page first checks, under the version's row lock, that the build should
    go on: a cancelled version stops it (JobCancelled), a deleted one ends it quietly.
    """

    versions: VersionRepository
    inputs: InputRepository
    annotations: AnnotationRepository
    ontologies: OntologyRepository
    blobs: BlobStore
    encoder: InputSnapshotEncoder
    tx: TransactionManager
    _: KW_ONLY
    page_size: int = BUILD_PAGE_SIZE

    async def run(self, job: Job, progress: Progress) -> None:
        target = _Target.of(job)
        key = target.key
        async with self.tx.transaction():
            version = await self._lock_building(target)
            if version is None:
                return
            version = await self.versions.update(
                dataclasses.replace(version, status=VersionStatus.IN_PROGRESS, percent=0)
            )
        total, shown = await self.versions.missing_inputs(*key, MISSING_SHOWN)
        if total:
            raise _inputs_deleted(total, shown)
        metrics = VersionMetrics()
        done = 0
        after: int | None = None
        while members := await self.versions.members(*key, after, self.page_size):
            content, page_metrics = await self._build_page(target.app_id, members)
            metrics += page_metrics
            done += len(members)
            # 100 only once READY, so that a client never sees 100 with work left.
            percent = min(99, done * 100 // max(version.input_count, 1))
            async with self.tx.transaction():
                current = await self._lock_building(target)
                if current is None:
                    return
                await self.versions.store_content(*key, content)
                await self.versions.update(dataclasses.replace(current, percent=percent))
            await progress(percent)
            after = members[-1][0]
        async with self.tx.transaction():
            current = await self._lock_building(target)
            if current is None:
                return
            unbuilt = await self.versions.unbuilt_count(*key)
            if unbuilt:
                raise JobFailed(f"{unbuilt} member(s) of the version have no content")
            governing = await self.ontologies.governing(target.app_id, target.dataset_id)
            await self.versions.store_ontology(
                *key, captured(governing) if governing is not None else None
            )
            await self.versions.update(
                dataclasses.replace(
                    current,
                    status=VersionStatus.READY,
                    percent=100,
                    details="",
                    metrics=metrics,
                    input_count=metrics.inputs_count,
                )
            )

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

    async def _lock_building(self, target: _Target) -> DatasetVersion | None:
        """The version, locked, while its build is to go on; None when there is nothing
        left to do (deleted, or READY: an earlier run finished it before it crashed)."""
        version = await self.versions.get(*target.key, lock=True)
        if version is None or version.status is VersionStatus.READY:
            return None
        if version.status is VersionStatus.FAILED:
            raise JobCancelled(version.details)
        return version

    async def _build_page(
        self, app_id: str, members: list[tuple[int, str]]
    ) -> tuple[list[VersionContent], VersionMetrics]:
        ids = [input_id for _, input_id in members]
        found = {item.id: item for item in await self.inputs.get_many(app_id, ids)}
        gone = [input_id for input_id in ids if input_id not in found]
        if gone:
            # Deleted while the build ran (the check before the first page saw them).
            raise _inputs_deleted(len(gone), gone[:MISSING_SHOWN])
        annotations = await self._annotations_of(app_id, ids)
        snapshots = [
            InputSnapshot(self._stable_view(found[input_id]), annotations.get(input_id, []))
            for input_id in ids
        ]
        # CPU-bound: in a thread, so that the event loop keeps serving calls meanwhile.
        encoded = await asyncio.to_thread(lambda: [self.encoder.encode(s) for s in snapshots])
        content = [
            _content(position, found[input_id], annotations.get(input_id, []), item.data)
            for (position, input_id), item in zip(members, encoded, strict=True)
        ]
        return content, sum((item.metrics for item in encoded), VersionMetrics())

    def _stable_view(self, item: Input) -> InputView:
        """The input with a media reference that stays valid as long as the version:
        the stored original's `s3://bucket/key` location (the version keeps that object
        alive), or the caller's own URL for inputs that only reference one. Presigned
        URLs expire; exports resolve references when they need bytes."""
        if item.blob is None:
            return InputView(item, item.source_url)
        prefix, suffix = self.blobs.hosted(item.blob)
        return InputView(item, f"{prefix}/{ORIGINAL_SIZE}/{suffix}", (prefix, suffix))

    async def _annotations_of(self, app_id: str, ids: list[str]) -> dict[str, list[Annotation]]:
        """Every annotation of these inputs but the input-level ones, in creation order."""
        grouped: dict[str, list[Annotation]] = defaultdict(list)
        after: int | None = None
        while True:
            rows = await self.annotations.page(
                AnnotationQuery(app_id, ids), after, ANNOTATION_PAGE_SIZE
            )
            for _, annotation in rows:
                if not annotation.input_level:
                    grouped[annotation.input_id].append(annotation)
            if len(rows) < ANNOTATION_PAGE_SIZE:
                return grouped
            after = rows[-1][0]
