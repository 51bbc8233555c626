"""What the domain needs from storage. Implemented in service.storage."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from service.domain.models import (
    AnnotatedMedia,
    Annotation,
    AnnotationQuery,
    ApiKey,
    AuditEvent,
    Collaborator,
    Dataset,
    DatasetGuard,
    DatasetListQuery,
    DatasetMember,
    DatasetRole,
    DatasetStatistics,
    DatasetVersion,
    EncodedInput,
    Export,
    ExportFormat,
    ExportOptions,
    FidelityReport,
    FixedVersion,
    IdempotencyRecord,
    Input,
    InputContent,
    InputQuery,
    InputSnapshot,
    MediaType,
    Ontology,
    OntologyRef,
    Project,
    ProjectLink,
    Shape,
    StoredBlob,
    User,
    VersionMember,
    VersionOntology,
)


class TransactionManager(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[None]:
        """Repository calls inside the block share one database transaction."""
        ...

    def read_transaction(self) -> AbstractAsyncContextManager[None]:
        """Repository calls inside the block read one consistent snapshot and may not
        write or lock rows (a read-only call's snapshot may come from a read replica).
        Inside a transaction already open, that transaction's."""
        ...

    def after_commit(self, hook: Callable[[], None]) -> None:
        """Runs `hook` once the outermost transaction commits (dropped if it rolls back);
        outside a transaction, at once."""
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

    async def touch(self, app_id: str, dataset_id: str, now: datetime, since: datetime) -> bool:
        """Records a read at `now` unless one was recorded after `since` (or the row is
        locked by a write); whether it wrote."""
        ...

    async def purge(self, app_id: str, dataset_id: str) -> None: ...

    async def purge_expired(self, now: datetime, limit: int) -> int: ...

    async def statistics(self, app_id: str, dataset_id: str) -> DatasetStatistics: ...


class BlobStore(Protocol):
    async def put(self, data: bytes, content_type: str) -> StoredBlob:
        """Stores bytes under their content address; safe to call again with the same bytes."""
        ...

    async def put_many(self, items: list[tuple[bytes, str]]) -> list[StoredBlob]:
        """Stores several (bytes, content type) concurrently, skipping bytes already stored."""
        ...

    async def download_url(self, blob: StoredBlob, ttl: timedelta) -> str: ...

    async def download_urls(self, blobs: list[StoredBlob], ttl: timedelta) -> list[str]: ...

    def hosted(self, blob: StoredBlob) -> tuple[str, str]:
        """(prefix, suffix) such that prefix + "/orig/" + suffix locates the object."""
        ...

    def hosted_key(self, suffix: str) -> str | None:
        """The key of the object a `hosted` suffix names (the inverse of hosted()); None
        when `suffix` is not of the shape this store gives its objects."""
        ...

    async def read(self, blob: StoredBlob) -> bytes: ...

    async def collect_orphans(self, older_than: timedelta, limit: int) -> int:
        """Deletes blobs no row references that were last touched before `older_than` ago,
        and streamed uploads abandoned (by a crash) for longer than that."""
        ...


class StagedUpload(Protocol):
    """Bytes streamed to a temporary object as they arrive, then published under their
    content address or discarded."""

    async def write(self, chunk: bytes) -> None: ...

    async def finish(self) -> str:
        """Completes the temporary object; returns the hex SHA-256 of all bytes written."""
        ...

    async def read(self) -> bytes:
        """The finished bytes, whole: callers bound the size first."""
        ...

    async def publish(self, content_type: str) -> StoredBlob:
        """Stores the finished bytes under their content address (once, however often the
        same bytes arrive) and removes the temporary object."""
        ...

    async def discard(self) -> None:
        """Removes whatever was written. Safe at any point and more than once; never raises."""
        ...


class MediaStreams(Protocol):
    """Media too large to hold in memory, streamed into and out of the blob store."""

    def stage(self, max_size: int) -> StagedUpload:
        """A new upload of at most `max_size` bytes."""
        ...

    def stream(
        self, blob: StoredBlob, chunk_size: int, offset: int = 0, length: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The stored bytes from `offset` on (negative: that many from the end), `length`
        of them (the rest when None), clamped to the object, in chunks of at most
        `chunk_size`; the bytes before `offset` are never read. Fails if they end early."""
        ...


class MediaLinks(Protocol):
    """Where clients outside fetch stored originals (implemented by the HTTP port)."""

    def hosted_prefix(self, app_id: str) -> str | None:
        """The `hosted.prefix` under which an app's stored originals are fetched over
        HTTP (prefix + "/orig/" + suffix); None while no such address is known."""
        ...

    def input_link(self, app_id: str, input_id: str) -> str | None:
        """The URL clients get for an input's stored original, when it is a link of the
        HTTP port; None: a presigned object-store URL is theirs."""
        ...


class ApiKeyRepository(Protocol):
    async def insert(self, key: ApiKey) -> None: ...

    async def find_by_lookup(self, lookup: str) -> list[ApiKey]: ...

    async def find_by_description(self, app_id: str, description: str) -> ApiKey | None: ...

    async def get(self, app_id: str, key_id: str) -> ApiKey | None: ...

    async def list_page(
        self,
        app_id: str,
        *,
        dataset_id: str | None,
        owned_by: str | None,
        include_revoked: bool,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[ApiKey]:
        """Newest first (created_at, id descending), after the keyset `after`. `dataset_id`:
        only keys bound to it; `owned_by`: only keys of that user or created by them."""
        ...

    async def revoke_key(self, app_id: str, key_id: str) -> ApiKey | None:
        """Sets revoked_at unless set already; the key as it is afterwards (None: unknown)."""
        ...

    async def revoke_for_user(self, app_id: str, user_id: str) -> int:
        """Revokes every active key the user owns or created; how many."""
        ...

    async def touch(self, key_id: str, at: datetime) -> None:
        """Records a use of the key (last_used_at)."""
        ...


class UserRepository(Protocol):
    async def insert(self, user: User) -> User:
        """Raises AlreadyExists (naming `user.id`) when the id is taken."""
        ...

    async def get(self, app_id: str, user_id: str, *, for_update: bool = False) -> User | None: ...

    async def list_page(self, app_id: str, after: str | None, limit: int) -> list[User]: ...

    async def update(self, user: User) -> User: ...

    async def delete(self, app_id: str, user_id: str) -> bool:
        """Deletes the user and their collaborations."""
        ...

    async def owner_ids(self, app_id: str, *, for_update: bool = False) -> list[str]: ...

    async def exists_any(self, app_id: str) -> bool: ...


class CollaboratorRepository(Protocol):
    async def insert(self, collaborator: Collaborator) -> Collaborator:
        """Raises AlreadyExists (naming `collaborator.user_id`) when already one."""
        ...

    async def get(
        self, app_id: str, dataset_id: str, user_id: str, *, for_update: bool = False
    ) -> Collaborator | None: ...

    async def list_page(
        self, app_id: str, dataset_id: str, after: str | None, limit: int
    ) -> list[Collaborator]: ...

    async def set_role(self, collaborator: Collaborator) -> Collaborator: ...

    async def delete(self, app_id: str, dataset_id: str, user_id: str) -> bool: ...

    async def roles_of(self, app_id: str, user_id: str) -> dict[str, DatasetRole]:
        """The user's role per live (not deleted) dataset."""
        ...


@dataclass(frozen=True)
class AuditQuery:
    app_id: str
    dataset_id: str | None = None
    user_id: str | None = None
    key_id: str | None = None
    # A full method name, or a bare method name matched against its last part.
    rpc: str | None = None
    outcome: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    # Keyset: events with a smaller id (newest first).
    before_id: int | None = None
    limit: int = 50


class AuditRepository(Protocol):
    async def insert(self, event: AuditEvent) -> int:
        """Stores the event (in the current transaction, if one is open); its id."""
        ...

    async def set_outcome(self, event_id: int, outcome: str) -> None: ...

    async def list_page(self, query: AuditQuery) -> list[AuditEvent]: ...

    async def purge_before(self, cutoff: datetime, batch: int = 10_000) -> int:
        """Deletes events older than `cutoff`, in batches; how many."""
        ...


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


class InputRepository(Protocol):
    async def insert_many(self, inputs: list[Input]) -> dict[str, datetime]:
        """Inserts the inputs that do not exist yet, with their input-level concepts
        and dataset memberships; returns the ids inserted with their creation times."""
        ...

    async def existing_ids(self, app_id: str, ids: list[str]) -> set[str]: ...

    async def get_many(self, app_id: str, ids: list[str], *, lock: bool = False) -> list[Input]: ...

    async def page(
        self, query: InputQuery, after_seq: int | None, limit: int
    ) -> list[tuple[int, Input]]:
        """Inputs in insertion order after `after_seq`, with their sequence numbers."""
        ...

    async def update(self, updated: Input) -> None:
        """Stores metadata, geo, title and input-level concepts."""
        ...

    async def delete(self, app_id: str, ids: list[str]) -> list[str]: ...

    async def count_matching(self, query: InputQuery) -> int: ...

    async def delete_matching(self, query: InputQuery) -> int: ...

    async def held_blob(self, app_id: str, key: str) -> StoredBlob | None:
        """The blob under `key` when an input of the app (live, or kept by one of its
        versions) has it as its stored original; None otherwise."""
        ...


class MembershipRepository(Protocol):
    async def live_datasets(
        self, app_id: str, dataset_ids: list[str], *, lock: bool = True
    ) -> set[str]:
        """Which of the datasets exist and are not deleted; with `lock`, locks them
        against deletion until the transaction ends (not in a read_transaction)."""
        ...

    async def guarded_datasets(
        self, app_id: str, dataset_ids: list[str]
    ) -> dict[str, DatasetGuard]:
        """The live datasets among `dataset_ids` with the flags that refuse changes to them,
        locked against deletion and against a change of those flags until the transaction
        ends."""
        ...

    async def add(self, app_id: str, dataset_id: str, input_ids: list[str]) -> int: ...

    async def page(
        self, app_id: str, dataset_id: str, after_seq: int | None, limit: int
    ) -> list[DatasetMember]: ...

    async def get(self, app_id: str, dataset_id: str, input_id: str) -> DatasetMember | None: ...

    async def remove(self, app_id: str, dataset_id: str, input_ids: list[str]) -> int: ...

    async def merge(self, app_id: str, source_id: str, destination_id: str) -> tuple[int, int]:
        """Adds every member of the source to the destination; (added, already present)."""
        ...


class AnnotationRepository(Protocol):
    async def input_media(self, app_id: str, input_ids: list[str]) -> dict[str, AnnotatedMedia]:
        """Media type and info of those inputs that exist."""
        ...

    async def lock_inputs(
        self, app_id: str, input_ids: list[str], annotation_ids: list[str]
    ) -> tuple[dict[str, int], set[str]]:
        """Locks the inputs against concurrent annotation writes until the transaction
        ends; returns the number of annotations of each input still present and which
        of `annotation_ids` are taken."""
        ...

    async def insert_many(self, annotations: list[Annotation]) -> list[Annotation]:
        """Inserts the annotations whose ids are free; returns those inserted, as stored."""
        ...

    async def add_many(self, annotations: list[Annotation]) -> int:
        """insert_many without reading the rows back: how many were inserted."""
        ...

    async def get_many(
        self, app_id: str, ids: list[str], *, lock: bool = False
    ) -> list[Annotation]: ...

    async def page(
        self, query: AnnotationQuery, after_seq: int | None, limit: int
    ) -> list[tuple[int, Annotation]]:
        """Annotations in insertion order after `after_seq`, with their sequence numbers."""
        ...

    async def update_many(self, annotations: list[Annotation]) -> list[Annotation]:
        """Stores data and annotation_info; returns the rows as stored."""
        ...

    async def delete(self, app_id: str, ids: list[str]) -> int: ...

    async def delete_for_inputs(self, app_id: str, input_ids: list[str]) -> int: ...


class VersionRepository(Protocol):
    async def insert(self, version: DatasetVersion) -> DatasetVersion | None:
        """None when the dataset already has a version with this id."""
        ...

    async def fix_members(self, app_id: str, dataset_id: str, version_id: str) -> FixedVersion:
        """Records the dataset's current members as the version's, in membership order,
        each with a reference to its input's current content and stored original, and
        captures their current vectors; their number becomes the input_count."""
        ...

    async def get(
        self, app_id: str, dataset_id: str, version_id: str, *, lock: bool = False
    ) -> DatasetVersion | None: ...

    async def page(
        self, app_id: str, dataset_id: str, before_seq: int | None, limit: int
    ) -> list[tuple[int, DatasetVersion]]:
        """Versions newest first, before `before_seq`, with their sequence numbers."""
        ...

    async def update(self, version: DatasetVersion) -> DatasetVersion:
        """Stores status, percent, details, description, metadata, metrics and
        input_count; bumps modified_at."""
        ...

    async def delete(self, app_id: str, dataset_id: str, version_id: str) -> bool: ...

    async def store_ontology(
        self, app_id: str, dataset_id: str, version_id: str, ontology: VersionOntology | None
    ) -> None:
        """Records the ontology the version is built against (None: none), replacing any
        an earlier run recorded; `DatasetVersion.ontology` then names it."""
        ...

    async def ontology(
        self, app_id: str, dataset_id: str, version_id: str
    ) -> VersionOntology | None:
        """The ontology recorded with the version, classes included (for its exports)."""
        ...


class ContentRepository(Protocol):
    """Input contents (storage/contents.py): stored once per distinct content; an input
    refers to its current one, or to none while it is stale (changed since)."""

    async def own_stale(self) -> list[tuple[str, str]]:
        """(app id, input id) of the inputs the current transaction made stale."""
        ...

    async def dataset_stale(self, app_id: str, dataset_id: str, limit: int) -> list[str]:
        """Up to `limit` stale members of the dataset, locked for the transaction."""
        ...

    async def any_stale(self, limit: int) -> list[tuple[str, str]]:
        """Up to `limit` stale inputs of any app that no other transaction holds, locked."""
        ...

    async def share_lock(self) -> None:
        """Held by the transaction until it ends: no content is collected meanwhile, so
        that references it takes stay valid."""
        ...

    async def store(self, contents: list[InputContent]) -> None:
        """Stores each content (once per hash) and makes it its input's current one."""
        ...

    async def collect(self, limit: int) -> int:
        """Deletes content nothing refers to any more (up to `limit`); how many."""
        ...


class InputSnapshotEncoder(Protocol):
    """The serialization of a version's content (implemented in service.formats: the
    domain never sees protobuf)."""

    def encode(self, snapshot: InputSnapshot) -> EncodedInput:
        """Folds the annotations into the input and serializes it."""
        ...


class ExportRepository(Protocol):
    async def insert(self, export: Export) -> Export | None:
        """None when the version already has an export with this id."""
        ...

    async def get(
        self, app_id: str, dataset_id: str, version_id: str, export_id: str, *, lock: bool = False
    ) -> Export | None: ...

    async def find(self, app_id: str, export_id: str) -> Export | None:
        """The export with this id in the app, whichever version it is of."""
        ...

    async def page(
        self, app_id: str, dataset_id: str, version_id: str, after_seq: int | None, limit: int
    ) -> list[tuple[int, Export]]:
        """Exports oldest first, after `after_seq`, with their sequence numbers."""
        ...

    async def latest_by_format(self, app_id: str, dataset_id: str, version_id: str) -> list[Export]:
        """The most recently created export of each format."""
        ...

    async def update(self, export: Export) -> Export:
        """Stores status, percent, details, blob, split counts, fidelity and job id; bumps
        modified_at. A blob is registered as referenced in the same transaction."""
        ...

    async def members(
        self, app_id: str, dataset_id: str, version_id: str, after_position: int | None, limit: int
    ) -> list[VersionMember]:
        """The content of a version's members after `after_position`, in order."""
        ...


class ByteSink(Protocol):
    async def write(self, chunk: bytes) -> None: ...


class ArchiveWriter(Protocol):
    """Writes one export archive into a sink, front to back (implemented in
    service.formats: the domain never sees protobuf or ZIP)."""

    @property
    def needs_census(self) -> bool:
        """Whether observe() must see every member before the first write()."""
        ...

    async def observe(self, members: list[VersionMember]) -> list[frozenset[str]]:
        """Learns what the format must know before writing (COCO: its categories) and
        returns each member's labels (as labels() does)."""
        ...

    async def labels(self, members: list[VersionMember]) -> list[frozenset[str]]:
        """The positive concept ids of each member: input-level, region and frame ones."""
        ...

    async def write(self, split: str, members: list[VersionMember]) -> int:
        """Adds members, in order, to a split; returns how many of them the archive holds
        (a format may leave out media it cannot carry: they are not counted in the split)."""
        ...

    async def finish(self) -> FidelityReport:
        """Writes what is left and closes the archive; reports what the format dropped."""
        ...


class ArchiveFormats(Protocol):
    def writer(
        self,
        export_format: ExportFormat,
        options: ExportOptions,
        splits: list[str],
        sink: ByteSink,
        modified: datetime,
        ontology: VersionOntology | None = None,
        hosted_prefix: str | None = None,
    ) -> ArchiveWriter:
        """A writer of an archive whose members go into `splits`; `modified` is the time
        stamped on its entries (the version's creation, so that archives are repeatable);
        `ontology` the version's, which names categories and concepts; `hosted_prefix`,
        when given, the `hosted.prefix` written for stored originals instead of the one
        the version recorded (formats that carry `hosted`)."""
        ...


class MediaProber(Protocol):
    """Reads what media are from their bytes; implemented in service.media."""

    def probe(
        self, media_type: MediaType, data: bytes, field: str, total_size: int | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Content type and media info (the `media_info` of an input) of `data`, read from
        its headers only. For video and audio, `data` may be the first bytes of media
        `total_size` long. Raises InvalidArgument naming `field` when `data` is not valid
        media of `media_type`."""
        ...


class ImageHeaders(Protocol):
    """Reads the size of an image at a URL from the first bytes of its file, which are not
    kept (DATASETD_FETCH_URLS=header); implemented in service.adapters."""

    async def image_info(self, url: str, field: str) -> dict[str, Any]:
        """The media info (width, height, format, color_mode) of the image at `url`.
        Raises InvalidArgument naming `field` when the URL is refused or unreachable, or
        does not start with a readable image header within the bytes read."""
        ...


class OntologyRepository(Protocol):
    async def insert(self, ontology: Ontology) -> Ontology:
        """Raises AlreadyExists when the id is taken."""
        ...

    async def get(
        self, app_id: str, ontology_id: str, *, lock: bool = False
    ) -> Ontology | None: ...

    async def page(
        self, app_id: str, after_seq: int | None, limit: int
    ) -> list[tuple[int, Ontology]]:
        """Oldest first, each with its sequence number."""
        ...

    async def update(self, ontology: Ontology) -> Ontology:
        """Stores the content, increments the revision and modified_at."""
        ...

    async def delete(self, app_id: str, ontology_id: str) -> bool: ...

    async def governing(self, app_id: str, dataset_id: str) -> Ontology | None:
        """The ontology of the projects the dataset is attached to, None without one.
        A dataset has one at most; were the rows ever to hold several, the ontology of
        the project created first is the one."""
        ...

    async def projects_using(self, app_id: str, ontology_id: str) -> list[str]:
        """The ids of the projects using the ontology, sorted."""
        ...

    async def annotations_using(
        self, app_id: str, classes: Sequence[str], shapes: Sequence[tuple[str, Shape]]
    ) -> int:
        """Annotations of the app carrying any of `classes` as a positive concept, or a
        class of `shapes` drawn as that shape."""
        ...


class ProjectRepository(Protocol):
    async def insert(self, project: Project) -> Project:
        """Raises AlreadyExists when the id is taken."""
        ...

    async def get(self, app_id: str, project_id: str, *, lock: bool = False) -> Project | None: ...

    async def page(
        self, app_id: str, after_seq: int | None, limit: int
    ) -> list[tuple[int, Project]]:
        """Oldest first, each with its sequence number."""
        ...

    async def update(self, project: Project) -> Project:
        """Stores description and ontology_id, and moves modified_at."""
        ...

    async def delete(self, app_id: str, project_id: str) -> bool:
        """Deletes the project and its attachments."""
        ...

    async def attach(self, app_id: str, project_id: str, dataset_id: str) -> bool:
        """Whether the dataset was not attached before."""
        ...

    async def detach(self, app_id: str, project_id: str, dataset_id: str) -> bool:
        """Whether the dataset was attached."""
        ...

    async def ontologies_of_inputs(
        self, app_id: str, input_ids: Sequence[str]
    ) -> list[tuple[str, OntologyRef]]:
        """(input id, ontology) for every live dataset holding one of the inputs and
        attached to a project; distinct pairs."""
        ...

    async def ontologies_of_datasets(
        self, app_id: str, dataset_ids: Sequence[str]
    ) -> list[tuple[str, OntologyRef]]:
        """(dataset id, ontology) for every live dataset of `dataset_ids` attached to a
        project; distinct pairs."""
        ...

    async def other_projects(
        self, app_id: str, dataset_ids: Sequence[str], project_id: str
    ) -> list[ProjectLink]:
        """The attachments of the datasets to projects other than `project_id`."""
        ...
