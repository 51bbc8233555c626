"""Dataset use cases: create, get, list, patch, delete, undelete, purge; and the flags that
refuse changes to a dataset (`locked`, `read_only`), checked here for every use case that
changes one (check_changeable).

What the flags refuse (FAILED_PRECONDITION):

* `locked` (reason DATASET_LOCKED): every mutation of the dataset: an update of any field
  but `locked` itself (an update of only `locked` is how it is unlocked), deletion, its
  membership (DatasetChange.MEMBERSHIP) and its versions (DatasetChange.VERSIONS).
  Reads and exports change nothing and stay allowed.
* `read_only` (reason DATASET_READ_ONLY): its membership only. Its settings can still be
  updated and versions of its frozen content made.

Inputs belong to the app, not to a dataset: editing or deleting an input is not a change
of the datasets holding it and is not refused.
"""

from __future__ import annotations

import dataclasses
import enum
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from service.domain.access import is_app_admin, readable_datasets
from service.domain.auth import Permission, authorize
from service.domain.errors import (
    Aborted,
    FailedPrecondition,
    NotFound,
    Violations,
)
from service.domain.models import (
    Collaborator,
    CoverImage,
    Dataset,
    DatasetGuard,
    DatasetListQuery,
    DatasetRole,
    DatasetView,
    KeyKind,
    MediaType,
    Principal,
    SortField,
    StoredBlob,
    Visibility,
)
from service.domain.patch import PatchAction, apply_json, merge_json
from service.domain.ports import (
    BlobStore,
    Clock,
    CollaboratorRepository,
    DatasetRepository,
    MediaProber,
    MembershipRepository,
    TransactionManager,
)
from service.domain.validation import (
    check_concept_ids,
    check_id,
    check_metadata,
    check_text,
    checked_ids,
    require_ids,
)

DESCRIPTION_MAX_CHARS = 1024
NOTES_MAX_CHARS = 64 * 1024
URL_MAX_CHARS = 2048
COVER_MAX_BYTES = 10 * 1024 * 1024
QUERY_MAX_CHARS = 256
DISPLAY_NAME_MAX_CHARS = 256
# last_accessed_at is written at most this often per dataset, so reads stay reads.
ACCESS_RECORD_INTERVAL = timedelta(minutes=1)
# Datasets whose last recorded read this process remembers (it forgets the oldest first).
_TOUCHED_MAX = 10_000
FILTER_MEDIA_TYPES = ("MEDIA_TYPE_IMAGE", "MEDIA_TYPE_VIDEO", "MEDIA_TYPE_AUDIO", "MEDIA_TYPE_TEXT")
FILTER_ANNOTATION_STATES = ("ANNOTATION_STATE_ANNOTATED", "ANNOTATION_STATE_UNANNOTATED")


@dataclass(frozen=True)
class CoverImageInput:
    """A cover image as given by a caller: bytes to store, a URL, or neither (no cover)."""

    data: bytes = b""
    url: str = ""


@dataclass(frozen=True)
class DatasetFields:
    """The fields a caller gave in a create or update; None means not given."""

    description: str | None = None
    notes: str | None = None
    metadata: dict[str, Any] | None = None
    visibility: Visibility | None = None
    cover: CoverImageInput | None = None
    default_filter: dict[str, Any] | None = None
    display_name: str | None = None
    locked: bool | None = None
    read_only: bool | None = None
    hidden: bool | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))


@dataclass(frozen=True)
class DeleteOutcome:
    purged: bool
    purge_after: datetime | None


@dataclass(frozen=True)
class DatasetSettings:
    delete_retention: timedelta = timedelta(days=7)
    download_url_ttl: timedelta = timedelta(hours=1)


def _check_url(violations: Violations, field: str, url: str) -> None:
    if len(url) > URL_MAX_CHARS:
        violations.add(field, f"must be at most {URL_MAX_CHARS} characters")
    elif not url.lower().startswith(("http://", "https://")):
        violations.add(field, "must be an http:// or https:// URL")


def check_filter(violations: Violations, field: str, value: dict[str, Any]) -> None:
    """Validates the JSON form of an InputFilter (proto field names)."""
    for key, item in value.items():
        where = f"{field}.{key}"
        if key in ("concept_ids", "negative_concept_ids"):
            check_concept_ids(violations, where, item)
        elif key == "metadata":
            check_metadata(violations, where, item)
        elif key == "media_types":
            if not isinstance(item, list) or any(v not in FILTER_MEDIA_TYPES for v in item):
                violations.add(where, f"must be a list of {', '.join(FILTER_MEDIA_TYPES)}")
        elif key == "annotation_state":
            if item not in FILTER_ANNOTATION_STATES:
                violations.add(where, f"must be one of {', '.join(FILTER_ANNOTATION_STATES)}")
        else:
            violations.add(where, "is not a field of InputFilter")


class DatasetChange(enum.Enum):
    """What a use case changes of a dataset, for the flags that refuse it."""

    MEMBERSHIP = "change the inputs of"
    VERSIONS = "change the versions of"


def check_changeable(dataset_id: str, guard: DatasetGuard, change: DatasetChange) -> None:
    if guard.locked:
        raise locked_error(dataset_id, change.value)
    if guard.read_only and change is DatasetChange.MEMBERSHIP:
        raise FailedPrecondition(
            f"dataset {dataset_id!r} is read-only: cannot {change.value} it; clear the flag "
            'first (UpdateDataset with dataset.read_only false and update_mask ["read_only"])',
            reason="DATASET_READ_ONLY",
            metadata={"dataset_id": dataset_id},
        )


def locked_error(dataset_id: str, what: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"dataset {dataset_id!r} is locked: cannot {what} it; unlock it first "
        '(UpdateDataset with dataset.locked false and update_mask ["locked"])',
        reason="DATASET_LOCKED",
        metadata={"dataset_id": dataset_id},
    )


async def require_changeable(
    members: MembershipRepository,
    app_id: str,
    dataset_ids: Sequence[str],
    change: DatasetChange,
) -> None:
    """NOT_FOUND for a dataset that is not live, FAILED_PRECONDITION for one whose flags
    refuse the change. In the caller's transaction: the datasets stay locked against
    deletion and against a change of their flags until it ends."""
    wanted = sorted(set(dataset_ids))
    guards = await members.guarded_datasets(app_id, wanted)
    for dataset_id in dict.fromkeys(dataset_ids):
        guard = guards.get(dataset_id)
        if guard is None:
            raise NotFound.in_app("dataset", app_id, dataset_id)
        check_changeable(dataset_id, guard, change)


def _check_display_name(violations: Violations, value: str) -> None:
    where = "dataset.display_name"
    check_text(violations, where, value, DISPLAY_NAME_MAX_CHARS)
    if any(unicodedata.category(c) == "Cc" for c in value if c != "\x00"):
        violations.add(where, "must not contain control characters (newlines, tabs, ...)")


def _check_fields(violations: Violations, fields: DatasetFields) -> None:
    if fields.display_name is not None:
        _check_display_name(violations, fields.display_name)
    if fields.description is not None:
        check_text(violations, "dataset.description", fields.description, DESCRIPTION_MAX_CHARS)
    if fields.notes is not None:
        check_text(violations, "dataset.notes", fields.notes, NOTES_MAX_CHARS)
    if fields.metadata is not None:
        check_metadata(violations, "dataset.metadata", fields.metadata)
    if fields.default_filter is not None:
        check_filter(violations, "dataset.default_filter", fields.default_filter)
    cover = fields.cover
    if cover is not None:
        if cover.data and cover.url:
            violations.add(
                "dataset.image", "set either image.base64 (bytes) or image.url, not both"
            )
        elif len(cover.data) > COVER_MAX_BYTES:
            violations.add(
                "dataset.image.base64",
                f"must be at most {COVER_MAX_BYTES} bytes, got {len(cover.data)}",
            )
        elif cover.url:
            _check_url(violations, "dataset.image.url", cover.url)


def _only_lock(fields: DatasetFields) -> bool:
    """Whether an update changes nothing but the lock (what a locked dataset allows)."""
    return fields.locked is not None and dataclasses.replace(fields, locked=None).is_empty()


def _stored_cover(dataset: Dataset) -> StoredBlob | None:
    return dataset.cover.blob if dataset.cover is not None else None


@dataclass(frozen=True)
class DatasetService:
    datasets: DatasetRepository
    blobs: BlobStore
    tx: TransactionManager
    clock: Clock
    settings: DatasetSettings
    prober: MediaProber
    # A member who creates a dataset becomes its Admin collaborator (app owners and
    # admins need no role). None only where no caller is a member (tests of storage).
    collaborators: CollaboratorRepository | None = None
    # Called once a dataset's creator got their role, so that this server's
    # authentication cache learns it at once (the Authenticator's invalidate).
    roles_changed: Callable[[], None] = lambda: None
    # When this process last recorded a read of each dataset (app id, dataset id): most
    # reads then cost no statement at all on the primary.
    _touched: dict[tuple[str, str], datetime] = field(default_factory=dict, compare=False)

    async def create(
        self, principal: Principal, app_id: str, dataset_id: str, fields: DatasetFields
    ) -> DatasetView:
        authorize(principal, app_id, Permission.WRITE)
        violations = Violations()
        check_id(violations, "dataset.id", dataset_id, required=False)
        _check_fields(violations, fields)
        violations.raise_if_any()
        # Bytes go to the object store before the row that references them.
        cover = await self._store_cover(fields.cover)
        draft = Dataset(
            app_id=app_id,
            id=dataset_id or uuid.uuid4().hex,
            description=fields.description or "",
            notes=fields.notes or "",
            metadata=fields.metadata or {},
            visibility=fields.visibility or Visibility.PRIVATE,
            cover=cover,
            default_filter=fields.default_filter or None,
            display_name=fields.display_name or "",
            locked=bool(fields.locked),
            read_only=bool(fields.read_only),
            hidden=bool(fields.hidden),
        )
        async with self.tx.transaction():
            created = await self.datasets.insert(draft)
            if principal.kind is KeyKind.PERSONAL and not is_app_admin(principal):
                await self._add_creator(principal, created)
        return await self._view(created, with_statistics=True)

    async def _add_creator(self, principal: Principal, dataset: Dataset) -> None:
        if self.collaborators is None:
            raise RuntimeError("DatasetService needs a CollaboratorRepository for members")
        await self.collaborators.insert(
            Collaborator(
                app_id=dataset.app_id,
                dataset_id=dataset.id,
                user_id=principal.user_id,
                role=DatasetRole.ADMIN,
                added_by=principal.user_id,
            )
        )
        self.tx.after_commit(self.roles_changed)

    async def get(self, principal: Principal, app_id: str, dataset_id: str) -> DatasetView:
        authorize(principal, app_id, Permission.READ)
        dataset = await self._require(app_id, dataset_id)
        view = await self._view(dataset, with_statistics=True)
        await self.touch(app_id, dataset_id, dataset.last_accessed_at)
        return view

    async def touch(
        self, app_id: str, dataset_id: str, last_recorded: datetime | None = None
    ) -> None:
        """Records that the dataset was read, at most once per ACCESS_RECORD_INTERVAL.

        The statement runs on the primary (even when the read was served by the replica)
        and skips a row a write holds: a read never waits for it. `last_recorded`, the
        dataset's last_accessed_at as the caller read it, saves the statement when recent.
        """
        now = self.clock.now()
        since = now - ACCESS_RECORD_INTERVAL
        key = (app_id, dataset_id)
        known = max(filter(None, (last_recorded, self._touched.get(key))), default=None)
        if known is not None and known > since:
            return
        await self.datasets.touch(app_id, dataset_id, now, since)
        self._touched.pop(key, None)
        self._touched[key] = now
        while len(self._touched) > _TOUCHED_MAX:
            del self._touched[next(iter(self._touched))]

    async def list(
        self,
        principal: Principal,
        app_id: str,
        *,
        sort_field: SortField,
        descending: bool,
        text: str,
        limit: int,
        after: tuple[Any, str] | None,
        include_hidden: bool = False,
    ) -> tuple[list[DatasetView], bool]:
        """One page and whether more rows follow."""
        authorize(principal, app_id, Permission.READ)
        violations = Violations()
        check_text(violations, "query", text, QUERY_MAX_CHARS)
        violations.raise_if_any()
        readable = readable_datasets(principal)
        if readable is not None and not readable:
            return [], False
        rows = await self.datasets.list(
            DatasetListQuery(
                app_id, sort_field, descending, text, limit + 1, after, include_hidden, readable
            )
        )
        page = rows[:limit]
        # One signing round for the page's covers instead of one per dataset.
        covers = [blob for d in page if (blob := _stored_cover(d)) is not None]
        urls = iter(await self.blobs.download_urls(covers, self.settings.download_url_ttl))
        views = [DatasetView(d, next(urls) if _stored_cover(d) else "") for d in page]
        return views, len(rows) > limit

    async def update(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        action: PatchAction,
        fields: DatasetFields,
        etag: str,
    ) -> DatasetView:
        authorize(principal, app_id, Permission.WRITE)
        violations = checked_ids(("dataset.id", dataset_id))
        if fields.is_empty():
            violations.add(
                "dataset", "nothing to update: set the fields to change or name them in update_mask"
            )
        if action is PatchAction.REMOVE and fields.visibility is not None:
            violations.add("dataset.visibility", "cannot be removed; OVERWRITE it instead")
        _check_fields(violations, fields)
        violations.raise_if_any()
        new_cover = None
        if action is not PatchAction.REMOVE and fields.cover is not None:
            new_cover = await self._store_cover(fields.cover)
        async with self.tx.transaction():
            current = await self._require(app_id, dataset_id, lock=True)
            if etag and etag != current.etag:
                raise Aborted(
                    f"dataset {dataset_id!r} changed since etag {etag!r} (now {current.etag!r}); "
                    "get it again and retry",
                    reason="ETAG_MISMATCH",
                    metadata={"current_etag": current.etag},
                )
            if current.locked and not _only_lock(fields):
                raise locked_error(dataset_id, "update fields other than `locked` of")
            updated = self._apply(current, action, fields, new_cover)
            saved = await self.datasets.update(updated)
        return await self._view(saved, with_statistics=True)

    async def delete(
        self, principal: Principal, app_id: str, dataset_id: str, *, force: bool
    ) -> DeleteOutcome:
        authorize(principal, app_id, Permission.WRITE)
        require_ids(("dataset_id", dataset_id))
        async with self.tx.transaction():
            current = await self.datasets.get(app_id, dataset_id, include_deleted=True, lock=True)
            if current is None or (current.deleted_at is not None and not force):
                raise NotFound.in_app("dataset", app_id, dataset_id)
            if current.locked:
                raise locked_error(dataset_id, "delete")
            if force:
                await self.datasets.purge(app_id, dataset_id)
                return DeleteOutcome(purged=True, purge_after=None)
            now = self.clock.now()
            purge_after = now + self.settings.delete_retention
            await self.datasets.update(
                dataclasses.replace(current, deleted_at=now, purge_after=purge_after)
            )
            return DeleteOutcome(purged=False, purge_after=purge_after)

    async def undelete(self, principal: Principal, app_id: str, dataset_id: str) -> DatasetView:
        authorize(principal, app_id, Permission.WRITE)
        require_ids(("dataset_id", dataset_id))
        async with self.tx.transaction():
            current = await self.datasets.get(app_id, dataset_id, include_deleted=True, lock=True)
            if current is None or (
                current.purge_after is not None and current.purge_after <= self.clock.now()
            ):
                raise NotFound(
                    f"no deleted dataset {dataset_id!r} in app {app_id!r} "
                    "(never created, or already purged)",
                    reason="DATASET_NOT_FOUND",
                    metadata={"dataset_id": dataset_id},
                )
            if current.deleted_at is None:
                raise FailedPrecondition(
                    f"dataset {dataset_id!r} is not deleted", reason="DATASET_NOT_DELETED"
                )
            restored = await self.datasets.update(
                dataclasses.replace(current, deleted_at=None, purge_after=None)
            )
        return await self._view(restored, with_statistics=True)

    async def purge_expired(self, limit: int = 1000) -> int:
        return await self.datasets.purge_expired(self.clock.now(), limit)

    def _apply(
        self,
        current: Dataset,
        action: PatchAction,
        fields: DatasetFields,
        new_cover: CoverImage | None,
    ) -> Dataset:
        remove = action is PatchAction.REMOVE
        changes: dict[str, Any] = {}
        if fields.description is not None:
            changes["description"] = "" if remove else fields.description
        if fields.notes is not None:
            changes["notes"] = "" if remove else fields.notes
        if fields.visibility is not None:
            changes["visibility"] = fields.visibility
        if fields.display_name is not None:
            changes["display_name"] = "" if remove else fields.display_name
        for flag in ("locked", "read_only", "hidden"):
            value = getattr(fields, flag)
            if value is not None:
                changes[flag] = False if remove else value
        if fields.cover is not None:
            changes["cover"] = None if remove else new_cover
        if fields.metadata is not None:
            metadata = apply_json(action, current.metadata, fields.metadata, "dataset.metadata")
            violations = Violations()
            check_metadata(violations, "dataset.metadata", metadata)
            violations.raise_if_any(reason="METADATA_TOO_LARGE")
            changes["metadata"] = metadata
        if fields.default_filter is not None:
            if remove:
                changes["default_filter"] = None
            elif action is PatchAction.MERGE:
                merged = merge_json(current.default_filter or {}, fields.default_filter)
                violations = Violations()
                check_filter(violations, "dataset.default_filter", merged)
                violations.raise_if_any()
                changes["default_filter"] = merged or None
            else:
                changes["default_filter"] = fields.default_filter or None
        return dataclasses.replace(current, **changes)

    async def _store_cover(self, cover: CoverImageInput | None) -> CoverImage | None:
        if cover is None:
            return None
        if cover.url:
            return CoverImage(url=cover.url)
        if not cover.data:
            return None
        content_type, info = self.prober.probe(MediaType.IMAGE, cover.data, "dataset.image.base64")
        blob = await self.blobs.put(cover.data, content_type)
        return CoverImage(
            blob=blob,
            width=info["width"],
            height=info["height"],
            format=info["format"],
            color_mode=info["color_mode"],
        )

    async def _view(self, dataset: Dataset, *, with_statistics: bool) -> DatasetView:
        url = ""
        blob = _stored_cover(dataset)
        if blob is not None:
            url = await self.blobs.download_url(blob, self.settings.download_url_ttl)
        statistics = None
        if with_statistics:
            statistics = await self.datasets.statistics(dataset.app_id, dataset.id)
        return DatasetView(dataset, url, statistics)

    async def _require(self, app_id: str, dataset_id: str, *, lock: bool = False) -> Dataset:
        require_ids(("dataset_id", dataset_id))
        dataset = await self.datasets.get(app_id, dataset_id, lock=lock)
        if dataset is None:
            raise NotFound.in_app("dataset", app_id, dataset_id)
        return dataset
