"""Imports of archives into a dataset (export-formats.md §5): a Clarifai-Data-Protobuf
archive (for example another deployment's export) or a COCO archive.

The archive is untrusted. It is staged to a temporary file as it arrives (never whole in
memory, capped in size) and then read twice by an ArchiveReader, which caps entry count,
uncompressed size and compression ratio while it reads and never uses an entry name as a
path:

1. `check`: every input and annotation is checked with the rules CreateInputs and
   CreateAnnotations apply (ids, metadata, concepts, media probed from their bytes,
   geometry against the media), and the media of valid inputs are stored in the blob
   store. Nothing else is written; problems are collected and reported together, each
   naming its archive entry and input.
2. `write`: in one database transaction, the inputs are created through InputService
   and their annotations through AnnotationService, batch by batch, all-or-nothing.

Media are stored before the transaction, as everywhere else ("blob first, row second"):
if the import fails, nothing references them and the orphan collector removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import re
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass

from service.domain.annotation_rules import MAX_ANNOTATIONS_PER_INPUT, check_annotation_data
from service.domain.annotations import (
    MAX_BATCH_ANNOTATIONS,
    AnnotationDraft,
    AnnotationService,
    media_context,
)
from service.domain.auth import Permission, authorize
from service.domain.datasets import DatasetChange, require_changeable
from service.domain.errors import DomainError, FieldViolation, InvalidArgument, Violations
from service.domain.imported import (
    ARCHIVE_FIELD,
    CHUNK_FIELD,
    ArchiveReader,
    ArchiveStaging,
    ImportedInput,
    ImportFormat,
    ImportRequest,
    ImportResult,
    ImportSettings,
    StagedArchive,
)
from service.domain.input_drafts import (
    MAX_BATCH_BYTES,
    MAX_BATCH_INPUTS,
    InputDraft,
    StoredMedia,
    media_source,
    medium_field,
)
from service.domain.inputs import InputService
from service.domain.models import AnnotatedMedia, MediaType, Principal, StoredBlob
from service.domain.ontology_check import OntologyChecker, OntologyGate, add_findings, check_all
from service.domain.ports import (
    BlobStore,
    MediaProber,
    MembershipRepository,
    TransactionManager,
)
from service.domain.transfers import check_chunk, require_bytes, size_text
from service.domain.validation import checked_ids

_MIB = 1024 * 1024
# How many problems a failed check collects before it stops reading; the message spells
# out the first few, the details list them all.
MAX_REPORTED = 100
_SUMMARY_VIOLATIONS = 10
# A remembered medium costs a few hundred bytes.
MAX_REMEMBERED_MEDIA = 100_000


@dataclass(frozen=True)
class ReceivedArchive:
    """An archive staged whole (a temporary file), before anything in it was read."""

    staged: StagedArchive
    sha256: str
    size: int


@dataclass(frozen=True)
class CheckedArchive:
    """An archive check() found valid, with the media it stored by hex SHA-256, so that
    write() need not ask the blob store about them again (at most MAX_REMEMBERED_MEDIA:
    the others take the ordinary way, which checks that the object exists). Should the
    orphan collector remove one before write() refers to it (an import slower than
    DATASETD_ORPHAN_GRACE), the input row's foreign key to it fails the write: an input
    never refers to a missing object."""

    archive: ReceivedArchive
    stored: dict[str, StoredBlob]


def _failure(violations: Sequence[FieldViolation], *, complete: bool) -> InvalidArgument:
    shown = "; ".join(f"{v.field}: {v.description}" for v in violations[:_SUMMARY_VIOLATIONS])
    more = len(violations) - _SUMMARY_VIOLATIONS
    count = f"{len(violations)}" if complete else f"at least {len(violations)}"
    return InvalidArgument(
        f"the archive has {count} problem(s); nothing was imported: {shown}"
        + (f"; and {more} more" if more > 0 else ""),
        reason="INVALID_IMPORT",
        violations=violations,
    )


_INPUT_FIELD = re.compile(r"^inputs\[(\d+)\]")
_ANNOTATION_FIELD = re.compile(r"^annotations\[(\d+)\](?:\.data)?")


def _relocated(
    error: DomainError, pattern: re.Pattern[str], locate: Sequence[Callable[[str], str]]
) -> DomainError:
    """`error` of a batch call, with its fields (`inputs[3].id`) renamed to where the
    items sit in the archive. `locate[i]` maps the rest of item i's field to a path."""

    def moved(field: str) -> str:
        match = pattern.match(field)
        if match is None or int(match.group(1)) >= len(locate):
            return field
        return locate[int(match.group(1))](field[match.end() :])

    violations = [FieldViolation(moved(v.field), v.description) for v in error.violations]
    if not violations:
        return error
    shown = "; ".join(f"{v.field}: {v.description}" for v in violations[:_SUMMARY_VIOLATIONS])
    return type(error)(
        f"nothing was imported: {shown}",
        reason=error.reason,
        violations=violations,
        metadata=error.metadata,
    )


def _under(path: str) -> Callable[[str], str]:
    return lambda rest: path + rest


def _groups(items: Sequence[ImportedInput]) -> Iterator[list[ImportedInput]]:
    """Batches that InputService accepts: at most MAX_BATCH_INPUTS inputs and
    MAX_BATCH_BYTES of media (check() refused any one input larger than that)."""
    group: list[ImportedInput] = []
    size = 0
    for item in items:
        payload = item.draft.payload_size()
        if group and (len(group) == MAX_BATCH_INPUTS or size + payload > MAX_BATCH_BYTES):
            yield group
            group, size = [], 0
        group.append(item)
        size += payload
    if group:
        yield group


@dataclass(frozen=True)
class _Media:
    """What check() learnt of one input: its stored bytes and content type (empty for
    inputs that reference a URL)."""

    payload: bytes
    content_type: str


@dataclass(frozen=True)
class ImportService:
    inputs: InputService
    annotations: AnnotationService
    members: MembershipRepository
    blobs: BlobStore
    staging: ArchiveStaging
    reader: ArchiveReader
    tx: TransactionManager
    settings: ImportSettings
    prober: MediaProber
    # The ontology of the projects the target dataset is attached to.
    gate: OntologyGate

    # --- receive ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def receive(
        self, principal: Principal, request: ImportRequest, chunks: AsyncIterable[bytes]
    ) -> AsyncIterator[ReceivedArchive]:
        """Checks the header, then stages the archive's bytes; the staged archive is
        removed when the block ends, whatever happens."""
        authorize(principal, request.app_id, Permission.WRITE)
        violations = checked_ids(("header.dataset_id", request.dataset_id))
        if request.format is None:
            violations.add(
                "header.format",
                "must be IMPORT_FORMAT_CLARIFAI_DATA_PROTOBUF or IMPORT_FORMAT_COCO",
            )
        violations.raise_if_any()
        # Before the bytes flow: an import into a dataset that does not exist costs the
        # caller nothing. write() checks again in its transaction.
        await self._require_dataset(request)
        staged = self.staging.stage()
        try:
            size = await self._stream(staged, chunks)
            digest = await staged.finish()
            yield ReceivedArchive(staged, digest, size)
        finally:
            # Shielded: a cancelled call (the client went away) still cleans up.
            await asyncio.shield(staged.discard())

    async def _stream(self, staged: StagedArchive, chunks: AsyncIterable[bytes]) -> int:
        limit = self.settings.max_archive_bytes
        size = 0
        async for chunk in chunks:
            check_chunk(chunk, CHUNK_FIELD, "INVALID_IMPORT_STREAM")
            size += len(chunk)
            # As soon as the excess arrives, not after the rest of the stream.
            if size > limit:
                raise InvalidArgument.field(
                    CHUNK_FIELD,
                    f"archives may be at most {limit} bytes ({size_text(limit)}) on this server",
                    reason="ARCHIVE_TOO_LARGE",
                )
            await staged.write(chunk)
        require_bytes(size, CHUNK_FIELD, "archive", "INVALID_IMPORT_STREAM")
        return size

    async def _require_dataset(self, request: ImportRequest) -> None:
        async with self.tx.transaction():
            await require_changeable(
                self.members, request.app_id, [request.dataset_id], DatasetChange.MEMBERSHIP
            )

    async def _batches(
        self, archive: ReceivedArchive, archive_format: ImportFormat
    ) -> AsyncGenerator[list[ImportedInput], None]:
        """The reader's batches; parsing and decompressing run in a worker thread."""
        batches = self.reader.read(archive.staged.file(), archive_format, self.settings.limits)
        try:
            while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                yield batch
        finally:
            # A reader still running in its thread (the call was cancelled) cannot be
            # closed; it stops at its next read of the discarded file.
            with contextlib.suppress(ValueError):
                batches.close()

    # --- pass 1: check ---------------------------------------------------------------------

    async def check(
        self, principal: Principal, request: ImportRequest, archive: ReceivedArchive
    ) -> CheckedArchive:
        """Reads the whole archive and checks every input and annotation; stores the media
        of valid inputs while no problem has been found. Raises InvalidArgument listing
        the problems (at most MAX_REPORTED); writes no row."""
        authorize(principal, request.app_id, Permission.WRITE)
        assert request.format is not None
        problems = Violations()
        seen: set[str] = set()
        stored: dict[str, StoredBlob] = {}
        count = 0
        governed = await self.gate.for_datasets(request.app_id, [request.dataset_id])
        checkers = governed.get(request.dataset_id, [])
        async with contextlib.aclosing(self._batches(archive, request.format)) as batches:
            async for batch in batches:
                count += len(batch)
                if count > self.settings.max_inputs:
                    raise InvalidArgument.field(
                        ARCHIVE_FIELD,
                        f"the archive holds more than {self.settings.max_inputs} inputs, the "
                        "most one import may create; split it into several archives",
                        reason="ARCHIVE_TOO_LARGE",
                    )
                media = await self._check_batch(principal, request, batch, problems, seen)
                _check_labels(checkers, batch, problems)
                if not problems.items:
                    await self._store(media, stored)
                if len(problems.items) >= MAX_REPORTED:
                    break
        if problems.items:
            # Reading stops at MAX_REPORTED problems: there may be more.
            complete = len(problems.items) < MAX_REPORTED
            raise _failure(problems.items[:MAX_REPORTED], complete=complete)
        return CheckedArchive(archive, stored)

    async def _check_batch(
        self,
        principal: Principal,
        request: ImportRequest,
        batch: list[ImportedInput],
        problems: Violations,
        seen: set[str],
    ) -> list[_Media]:
        valid: list[ImportedInput] = []
        for item in batch:
            draft = item.draft
            if draft.id:
                if draft.id in seen:
                    problems.add(f"{item.path}.id", f"{draft.id!r} repeats an earlier input's id")
                    continue
                seen.add(draft.id)
            try:
                # The rules of CreateInputs for everything but the media bytes.
                await self.inputs.check_draft(
                    principal, request.app_id, draft, path=item.path, check_state=False
                )
            except InvalidArgument as invalid:
                problems.items.extend(invalid.violations)
                continue
            if draft.payload_size() > MAX_BATCH_BYTES:
                problems.add(
                    medium_field(item.path, draft.media[0]),
                    f"embedded media of {size_text(draft.payload_size())} are more than the "
                    f"{size_text(MAX_BATCH_BYTES)} an import takes per input; reference the "
                    "media by URL or upload them with UploadInput",
                )
                continue
            valid.append(item)
        # Probing media and checking geometry is CPU-bound: in a thread.
        checked = await asyncio.to_thread(_check_content, self.prober, valid)
        media = []
        for found, violations in checked:
            problems.items.extend(violations)
            if found is not None and found.payload:
                media.append(found)
        return media

    async def _store(self, media: list[_Media], stored: dict[str, StoredBlob]) -> None:
        async def put(group: list[tuple[bytes, str]]) -> None:
            for blob in await self.blobs.put_many(group):
                if len(stored) < MAX_REMEMBERED_MEDIA:
                    stored[blob.sha256] = blob

        group: list[tuple[bytes, str]] = []
        size = 0
        # Bounded groups: put_many runs its uploads concurrently.
        for item in media:
            if group and size + len(item.payload) > MAX_BATCH_BYTES:
                await put(group)
                group, size = [], 0
            group.append((item.payload, item.content_type))
            size += len(item.payload)
        if group:
            await put(group)

    # --- pass 2: write ---------------------------------------------------------------------

    async def write(
        self, principal: Principal, request: ImportRequest, checked: CheckedArchive
    ) -> ImportResult:
        """Creates every input of a checked archive, in the dataset, with its annotations:
        all in one transaction, so that a failure (an id taken meanwhile, the dataset
        deleted) leaves nothing behind."""
        assert request.format is not None
        inputs_created = annotations_created = 0
        async with (
            self.tx.transaction(),
            contextlib.aclosing(self._batches(checked.archive, request.format)) as batches,
        ):
            await self._require_dataset(request)
            async for batch in batches:
                for group in _groups(batch):
                    created = await self._create_group(principal, request, group, checked)
                    inputs_created += len(group)
                    annotations_created += created
        return ImportResult(inputs_created, annotations_created)

    async def _create_group(
        self,
        principal: Principal,
        request: ImportRequest,
        group: list[ImportedInput],
        checked: CheckedArchive,
    ) -> int:
        """Creates the inputs of `group` and their annotations; returns how many
        annotations were created."""
        # Hashing and probing again are CPU-bound: in a thread.
        with_media = await asyncio.to_thread(
            lambda: [_with_stored_media(self.prober, item, checked.stored) for item in group]
        )
        drafts = [
            dataclasses.replace(
                draft,
                # Generated here, not by InputService: the annotations need the id.
                id=draft.id or uuid.uuid4().hex,
                dataset_ids=[request.dataset_id],
            )
            for draft in with_media
        ]
        try:
            await self.inputs.create_batch(principal, request.app_id, drafts, atomic=True)
        except DomainError as error:
            raise _relocated(error, _INPUT_FIELD, [_under(item.path) for item in group]) from error
        annotations = [
            (AnnotationDraft(input_id=draft.id, data=annotation.data), annotation)
            for draft, item in zip(drafts, group, strict=True)
            for annotation in item.annotations
        ]
        for start in range(0, len(annotations), MAX_BATCH_ANNOTATIONS):
            chunk = annotations[start : start + MAX_BATCH_ANNOTATIONS]
            try:
                await self.annotations.create_batch(
                    principal, request.app_id, [draft for draft, _ in chunk], atomic=True
                )
            except DomainError as error:
                raise _relocated(
                    error, _ANNOTATION_FIELD, [annotation.locate for _, annotation in chunk]
                ) from error
        return len(annotations)


def _with_stored_media(
    prober: MediaProber, item: ImportedInput, stored: dict[str, StoredBlob]
) -> InputDraft:
    """The draft, with its media replaced by the blob check() stored when it remembers it
    (as a streamed upload hands over its stored media)."""
    draft = item.draft
    media_type = draft.media[0]
    inline, _, field = media_source(draft, media_type, medium_field(item.path, media_type))
    blob = stored.get(hashlib.sha256(inline).hexdigest()) if inline else None
    if blob is None:
        return draft
    _, info = prober.probe(media_type, inline, field)
    text = draft.text if media_type is MediaType.TEXT else None
    return dataclasses.replace(
        draft, data=b"", text=None, url="", stored=StoredMedia(blob, info, text)
    )


def _check_content(
    prober: MediaProber, items: list[ImportedInput]
) -> list[tuple[_Media | None, list[FieldViolation]]]:
    """Per input: its media (None when invalid) and the problems of its media and
    annotations."""
    return [_check_item(prober, item) for item in items]


def _check_item(
    prober: MediaProber, item: ImportedInput
) -> tuple[_Media | None, list[FieldViolation]]:
    draft = item.draft
    media_type = draft.media[0]
    try:
        inline, _, field = media_source(draft, media_type, medium_field(item.path, media_type))
        content_type, info = prober.probe(media_type, inline, field) if inline else ("", {})
    except InvalidArgument as invalid:
        return None, list(invalid.violations)
    problems = Violations()
    if item.declared_size is not None and inline:
        actual = (info.get("width"), info.get("height"))
        if actual != item.declared_size:
            width, height = item.declared_size
            problems.add(
                f"{item.path}.width",
                f"the archive says the image is {width}x{height} pixels but its file is "
                f"{actual[0]}x{actual[1]}",
            )
    if len(item.annotations) > MAX_ANNOTATIONS_PER_INPUT:
        problems.add(
            f"{item.path}.data",
            f"makes {len(item.annotations)} annotations (one per region, one for all "
            f"frames); an input may have at most {MAX_ANNOTATIONS_PER_INPUT}",
        )
    context = media_context(AnnotatedMedia(media_type, info))
    for annotation in item.annotations:
        local = Violations()
        check_annotation_data(local, "", annotation.data, context)
        for violation in local.items:
            problems.add(annotation.locate(violation.field), violation.description)
    return _Media(inline, content_type), problems.items


def _check_labels(
    checkers: Sequence[OntologyChecker], batch: list[ImportedInput], problems: Violations
) -> None:
    """The problems of the labels of `batch` under the target dataset's ontology."""
    if not checkers:
        return
    for item in batch:
        if item.draft.concepts:
            add_findings(
                problems,
                check_all(checkers, f"{item.path}.data", {"concepts": item.draft.concepts}),
            )
        for annotation in item.annotations:
            for finding in check_all(checkers, "", annotation.data):
                problems.add(annotation.locate(finding.field), finding.message)
