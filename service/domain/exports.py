"""Exports of dataset versions: ExportService (create, get, list, download) and
ExportBuilder, the background job that writes an archive.

An export is identified by its version, format and options: its id is a hash of them, so
asking again for the same export finds the same row, whatever its state. A failed export
is queued again when asked for again; any other is returned as it is.

The builder reads the version in pages of members and streams the archive into a
temporary object as it goes (never the whole version or archive in memory). The archive
is published under its content address only once complete, in the transaction that
marks the export succeeded: nobody ever sees a partial archive, and identical archives
are stored once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import KW_ONLY, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from service.domain.auth import Permission, authorize
from service.domain.errors import FailedPrecondition, NotFound, Violations
from service.domain.jobs import Job, JobFailed, JobKind, JobQueue, Progress, payload_ids
from service.domain.models import (
    Export,
    ExportFormat,
    ExportOptions,
    ExportStatus,
    ExportView,
    FidelityReport,
    Principal,
    StoredBlob,
    VersionMember,
    VersionOntology,
    VersionStatus,
)
from service.domain.paging import split_page
from service.domain.ports import (
    ArchiveFormats,
    BlobStore,
    ByteSink,
    Clock,
    ExportRepository,
    MediaLinks,
    MediaStreams,
    TransactionManager,
    VersionRepository,
)
from service.domain.splits import StratifiedSplit
from service.domain.validation import checked_ids, require_ids
from service.domain.versions import VersionService

# Without a split every input is in this one.
NO_SPLIT = "all"
SPLIT_NAME = re.compile(r"^[a-z0-9_-]{1,32}$")
MAX_SPLITS = 32
RATIO_TOLERANCE = 1e-6
# Members per page: one query, one progress report and one check that the export is
# still wanted.
EXPORT_PAGE_SIZE = 500
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
# Sizes the parts of the streamed upload (8 MiB parts for anything up to this size).
MAX_ARCHIVE_BYTES = 64 * 1024**3
ARCHIVE_CONTENT_TYPE = "application/zip"
_UNFINISHED = frozenset({ExportStatus.PENDING, ExportStatus.IN_PROGRESS})
# ZIP timestamps start in 1980.
_ZIP_EPOCH = datetime(1980, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class ExportSettings:
    download_url_ttl: timedelta = timedelta(hours=1)


def _split_names(options: ExportOptions) -> list[str]:
    return sorted(options.split.ratios) if options.split is not None else [NO_SPLIT]


_VI_FORMATS = frozenset({ExportFormat.VI_FULL, ExportFormat.VI_JSONL})


def check_format_options(
    violations: Violations, export_format: ExportFormat, options: ExportOptions
) -> ExportOptions:
    """The options as the export keeps them: the Vi formats' own rules applied."""
    if options.pixel_coordinates and export_format not in _VI_FORMATS:
        violations.add(
            "options.pixel_coordinates",
            f"only the VI_FULL and VI_JSONL formats have a choice of coordinates "
            f"(EXPORT_FORMAT_{export_format.name} has its own)",
        )
    if export_format is ExportFormat.VI_JSONL and options.embed_media:
        violations.add(
            "options.embed_media",
            "VI_JSONL holds annotations only; ask for EXPORT_FORMAT_VI_FULL for the media",
        )
    if export_format is ExportFormat.VI_FULL:
        # The format is the media plus the annotations: one export, whichever was asked.
        return dataclasses.replace(options, embed_media=True)
    return options


def check_options(violations: Violations, options: ExportOptions) -> None:
    split = options.split
    if split is None:
        return
    field = "options.split.ratios"
    if not split.ratios:
        violations.add(field, "is required: name each split with its ratio, e.g. train 0.8")
        return
    if len(split.ratios) > MAX_SPLITS:
        violations.add(field, f"must have at most {MAX_SPLITS} splits, got {len(split.ratios)}")
    for name, ratio in split.ratios.items():
        # A long bad name is cut short: it is echoed in the error.
        where = f"{field}[{name if len(name) <= 40 else name[:37] + '...'}]"
        if not SPLIT_NAME.match(name):
            violations.add(where, "names must be 1..32 characters of [a-z0-9_-]")
        if not math.isfinite(ratio) or ratio <= 0:
            violations.add(where, f"must be greater than 0, got {ratio}")
    total = sum(split.ratios.values())
    if math.isfinite(total) and abs(total - 1) > RATIO_TOLERANCE:
        violations.add(field, f"must sum to 1 (within {RATIO_TOLERANCE}), got {total!r}")


def derive_export_id(
    app_id: str,
    dataset_id: str,
    version_id: str,
    export_format: ExportFormat,
    options: ExportOptions,
) -> str:
    """The id of the export of a version in a format with options: a hash of them in a
    canonical form, so that the same request always names the same export."""
    canonical: dict[str, Any] = {
        "app": app_id,
        "dataset": dataset_id,
        "version": version_id,
        "format": export_format.value,
        "embed_media": options.embed_media,
    }
    # Only when set: the ids of the exports made before the option existed stay the same.
    if options.pixel_coordinates:
        canonical["pixel_coordinates"] = True
    if options.split is not None:
        canonical["split"] = {"ratios": options.split.ratios, "seed": options.split.seed}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ExportService:
    versions: VersionService
    exports: ExportRepository
    queue: JobQueue
    blobs: BlobStore
    streams: MediaStreams
    tx: TransactionManager
    clock: Clock
    settings: ExportSettings

    async def create(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        version_id: str,
        export_format: ExportFormat | None,
        options: ExportOptions,
    ) -> ExportView:
        """The export of a READY version in a format: queued now (in the transaction that
        records it), or as it stands when it was asked for before."""
        authorize(principal, app_id, Permission.WRITE)
        violations = checked_ids(("dataset_id", dataset_id), ("version_id", version_id))
        if export_format is None:
            allowed = ", ".join(f.name for f in ExportFormat)
            violations.add("format", f"must name a format (EXPORT_FORMAT_ + one of {allowed})")
        check_options(violations, options)
        if export_format is not None:
            options = check_format_options(violations, export_format, options)
        violations.raise_if_any()
        assert export_format is not None
        async with self.tx.transaction():
            version = await self.versions.get(
                principal, app_id, dataset_id, version_id, for_write=True
            )
            if version.status is not VersionStatus.READY:
                raise FailedPrecondition(
                    f"version {version_id!r} is {version.status.value}; only a ready version "
                    "can be exported",
                    reason="VERSION_NOT_READY",
                    metadata={"status": version.status.value},
                )
            new = Export(
                app_id=app_id,
                dataset_id=dataset_id,
                version_id=version_id,
                id=derive_export_id(app_id, dataset_id, version_id, export_format, options),
                format=export_format,
                options=options,
            )
            key = (app_id, dataset_id, version_id, new.id)
            existing = await self.exports.get(*key, lock=True)
            if existing is None:
                inserted = await self.exports.insert(new)
                if inserted is not None:
                    return await self._view(await self._enqueue(inserted))
                # Created by a concurrent request, which the insert waited for.
                existing = await self.exports.get(*key, lock=True)
                if existing is None:
                    raise RuntimeError(f"export {new.id} vanished while it was created")
            if existing.status is ExportStatus.FAILED:
                retried = dataclasses.replace(
                    existing, status=ExportStatus.PENDING, percent=0, details=""
                )
                return await self._view(await self._enqueue(retried))
            return await self._view(existing)

    async def get(
        self, principal: Principal, app_id: str, dataset_id: str, version_id: str, export_id: str
    ) -> ExportView:
        authorize(principal, app_id, Permission.READ)
        return await self._view(
            await self._require(principal, app_id, dataset_id, version_id, export_id)
        )

    async def page(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        version_id: str,
        after_seq: int | None,
        limit: int,
    ) -> tuple[list[ExportView], int | None]:
        """A page, oldest first, and the cursor of its last row when more rows follow."""
        authorize(principal, app_id, Permission.READ)
        async with self.tx.read_transaction():
            await self.versions.get(principal, app_id, dataset_id, version_id)
            rows = await self.exports.page(app_id, dataset_id, version_id, after_seq, limit + 1)
        exports, last = split_page(rows, limit)
        return await self._views(exports), last

    async def latest_by_format(
        self, principal: Principal, app_id: str, dataset_id: str, version_id: str
    ) -> list[ExportView]:
        """The most recently requested export of each format (for a version's export info)."""
        authorize(principal, app_id, Permission.READ)
        return await self._views(
            await self.exports.latest_by_format(app_id, dataset_id, version_id)
        )

    async def download(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        version_id: str,
        export_id: str,
        offset: int = 0,
        length: int | None = None,
    ) -> tuple[StoredBlob, AsyncGenerator[bytes, None]]:
        """The archive and its bytes from `offset` (`length` of them, all when None) in
        chunks of at most DOWNLOAD_CHUNK_BYTES. FAILED_PRECONDITION until the export
        succeeded."""
        authorize(principal, app_id, Permission.READ)
        export = await self._require(principal, app_id, dataset_id, version_id, export_id)
        if export.status is not ExportStatus.SUCCEEDED or export.blob is None:
            raise FailedPrecondition(
                f"export {export_id!r} is {export.status.value}; only a succeeded export "
                "can be downloaded",
                reason="EXPORT_NOT_READY",
                metadata={"status": export.status.value},
            )
        return export.blob, self.streams.stream(export.blob, DOWNLOAD_CHUNK_BYTES, offset, length)

    async def download_by_id(
        self,
        principal: Principal,
        app_id: str,
        export_id: str,
        offset: int = 0,
        length: int | None = None,
    ) -> tuple[Export, StoredBlob, AsyncGenerator[bytes, None]]:
        """`download` of the export with this id in the app, for links that name only the
        app and the export; the export too, for its version and format."""
        authorize(principal, app_id, Permission.READ)
        require_ids(("export_id", export_id))
        export = await self.exports.find(app_id, export_id)
        if export is None:
            raise NotFound.within("export", export_id, "app", app_id)
        blob, stream = await self.download(
            principal, app_id, export.dataset_id, export.version_id, export_id, offset, length
        )
        return export, blob, stream

    async def _require(
        self, principal: Principal, app_id: str, dataset_id: str, version_id: str, export_id: str
    ) -> Export:
        require_ids(("export_id", export_id))
        async with self.tx.read_transaction():
            await self.versions.get(principal, app_id, dataset_id, version_id)
            export = await self.exports.get(app_id, dataset_id, version_id, export_id)
        if export is None:
            raise NotFound.within("export", export_id, "version", version_id)
        return export

    async def _enqueue(self, export: Export) -> Export:
        job_id = await self.queue.enqueue(
            JobKind.EXPORT_VERSION,
            export.app_id,
            {
                "dataset_id": export.dataset_id,
                "version_id": export.version_id,
                "export_id": export.id,
            },
        )
        return await self.exports.update(dataclasses.replace(export, job_id=job_id))

    async def _view(self, export: Export) -> ExportView:
        return (await self._views([export]))[0]

    async def _views(self, exports: list[Export]) -> list[ExportView]:
        blobs = [e.blob for e in exports if e.blob is not None]
        ttl = self.settings.download_url_ttl
        urls = iter(await self.blobs.download_urls(blobs, ttl))
        expires = self.clock.now() + ttl
        return [
            ExportView(e, next(urls), expires) if e.blob is not None else ExportView(e)
            for e in exports
        ]


@dataclass(frozen=True)
class _Target:
    """The export an EXPORT_VERSION job is about."""

    app_id: str
    dataset_id: str
    version_id: str
    export_id: str

    @classmethod
    def of(cls, job: Job) -> _Target:
        ids = payload_ids(job, "dataset_id", "version_id", "export_id", what="export")
        return cls(job.app_id, *ids)

    @property
    def version_key(self) -> tuple[str, str, str]:
        return self.app_id, self.dataset_id, self.version_id


class _Abandoned(Exception):
    """The export is gone (its version was deleted) or another job now writes it."""


@dataclass(frozen=True)
class ExportBuilder:
    """The EXPORT_VERSION job handler.

    A run reads the version once to write the archive, after one or two counting passes
    when the format or a split needs them (see service.domain.splits). A rerun after a
    crash starts over with a new temporary object; the old one is removed as an abandoned
    upload. A run stops quietly at its next page when its export is gone or was handed
    to another job.
    """

    exports: ExportRepository
    versions: VersionRepository
    formats: ArchiveFormats
    streams: MediaStreams
    tx: TransactionManager
    _: KW_ONLY
    page_size: int = EXPORT_PAGE_SIZE
    # Where clients fetch the stored originals an archive references; without it (or an
    # address yet) archives carry `hosted` as the version recorded it.
    links: MediaLinks | None = None

    async def run(self, job: Job, progress: Progress) -> None:
        target = _Target.of(job)
        async with self.tx.transaction():
            export = await self._lock_mine(target, job)
            version = await self.versions.get(*target.version_key)
            # Succeeded or failed: an earlier run of this job ended it before it crashed.
            if export is None or version is None or export.status not in _UNFINISHED:
                return
            export = await self.exports.update(
                dataclasses.replace(export, status=ExportStatus.IN_PROGRESS, percent=0)
            )
            ontology = await self.versions.ontology(*target.version_key)
        pages = _Pages(self.exports, self.page_size, target, job.id, progress, version.input_count)
        staged = self.streams.stage(MAX_ARCHIVE_BYTES)
        try:
            modified = max(version.created_at or _ZIP_EPOCH, _ZIP_EPOCH)
            counts, fidelity = await self._write(export, pages, staged, modified, ontology)
            await staged.finish()
            # Published (its blobs row committed, then the object) before the export
            # refers to it: if the export is gone by then, the collector removes it.
            blob = await staged.publish(ARCHIVE_CONTENT_TYPE)
            async with self.tx.transaction():
                current = await self._lock_mine(target, job)
                if current is None:
                    return
                await self.exports.update(
                    dataclasses.replace(
                        current,
                        status=ExportStatus.SUCCEEDED,
                        percent=100,
                        details="",
                        blob=blob,
                        split_counts=counts,
                        fidelity=fidelity,
                    )
                )
        except _Abandoned:
            return
        finally:
            # Removes the temporary object (the published archive has its own key).
            # Shielded: a cancelled run still cleans up.
            await asyncio.shield(staged.discard())

    async def _write(
        self,
        export: Export,
        pages: _Pages,
        sink: ByteSink,
        modified: datetime,
        ontology: VersionOntology | None,
    ) -> tuple[dict[str, int], FidelityReport]:
        """Writes the archive: the counting passes first when needed, then the members."""
        names = _split_names(export.options)
        prefix = self.links.hosted_prefix(export.app_id) if self.links is not None else None
        writer = self.formats.writer(
            export.format, export.options, names, sink, modified, ontology, prefix
        )
        split = export.options.split
        splitter = StratifiedSplit(split.ratios, split.seed) if split is not None else None
        census = splitter is not None or writer.needs_census
        pages.passes = 1 + int(census) + int(splitter is not None)
        if census:
            async for page in pages.read():
                for found in await writer.observe(page):
                    if splitter is not None:
                        splitter.count_labels(found)
        if splitter is not None:
            async for page in pages.read():
                for found in await writer.labels(page):
                    splitter.count_stratum(found)
            splitter.plan()
        counts = dict.fromkeys(names, 0)
        async for page in pages.read():
            if splitter is None:
                assigned = [NO_SPLIT] * len(page)
            else:
                assigned = [
                    splitter.assign(member.input_id, found)
                    for member, found in zip(page, await writer.labels(page), strict=True)
                ]
            for name in names:
                members = [m for m, s in zip(page, assigned, strict=True) if s == name]
                if members:
                    counts[name] += await writer.write(name, members)
        return counts, await writer.finish()

    async def failed(self, job: Job, message: str) -> None:
        try:
            target = _Target.of(job)
        except JobFailed:
            return
        async with self.tx.transaction():
            export = await self._lock_mine(target, job)
            if export is not None and export.status is not ExportStatus.SUCCEEDED:
                await self.exports.update(
                    dataclasses.replace(
                        export, status=ExportStatus.FAILED, details=message or "failed"
                    )
                )

    async def _lock_mine(self, target: _Target, job: Job) -> Export | None:
        """The export, locked, while this job is the one to write it."""
        export = await self.exports.get(*target.version_key, target.export_id, lock=True)
        if export is None or export.job_id != job.id:
            return None
        return export


class _Pages:
    """Reads a version's members a page at a time, pass after pass. After each page it
    checks that the export is still the job's, and reports progress over all passes (100
    only once the export succeeded)."""

    def __init__(
        self,
        exports: ExportRepository,
        page_size: int,
        target: _Target,
        job_id: int,
        progress: Progress,
        members: int,
    ) -> None:
        self._exports = exports
        self._page_size = page_size
        self._target = target
        self._job_id = job_id
        self._progress = progress
        self._members = max(members, 1)
        self._read = 0
        self.passes = 1

    async def read(self) -> AsyncIterator[list[VersionMember]]:
        target = self._target
        after: int | None = None
        while page := await self._exports.members(*target.version_key, after, self._page_size):
            yield page
            after = page[-1].position
            current = await self._exports.get(*target.version_key, target.export_id)
            if current is None or current.job_id != self._job_id:
                raise _Abandoned
            self._read += len(page)
            await self._progress(min(99, self._read * 100 // (self.passes * self._members)))
