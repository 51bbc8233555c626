"""Input use cases: batch create, get, list, patch, delete; dataset membership and merge."""

from __future__ import annotations

import dataclasses
import enum
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from service.domain.annotation_rules import MediaContext, check_annotation_data
from service.domain.auth import Permission, authorize
from service.domain.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Violations,
)
from service.domain.models import (
    DatasetMember,
    GeoPoint,
    Input,
    InputQuery,
    InputView,
    MediaType,
    Principal,
    StoredBlob,
)
from service.domain.patch import PatchAction, apply_json, merge_json
from service.domain.ports import (
    BlobStore,
    InputRepository,
    MediaProber,
    MembershipRepository,
    TransactionManager,
)
from service.domain.validation import check_id, check_metadata, check_text

MAX_BATCH_INPUTS = 128
MAX_BATCH_BYTES = 128 * 1024 * 1024
MAX_IDS_PER_CALL = 1000
TITLE_MAX_CHARS = 512
URL_MAX_CHARS = 2048


class Outcome(enum.Enum):
    CREATED = "created"
    DUPLICATE_ID = "duplicate_id"
    INVALID = "invalid"
    NOT_ATTEMPTED = "not_attempted"


@dataclass(frozen=True)
class StoredMedia:
    """Media already in the blob store, checked and described (streamed uploads). `text`
    is the content of a text medium, stored inline as well."""

    blob: StoredBlob
    info: dict[str, Any]
    text: str | None = None


@dataclass(frozen=True)
class InputDraft:
    """An input as a caller gave it. `media` lists every medium set, so that two
    media in one input can be reported instead of silently picking one. With `stored`,
    the bytes have arrived another way and `data`, `url` and `text` are empty."""

    id: str = ""
    media: tuple[MediaType, ...] = ()
    data: bytes = b""
    url: str = ""
    text: str | None = None
    metadata: dict[str, Any] | None = None
    concepts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    geo: GeoPoint | None = None
    title: str = ""
    dataset_ids: list[str] = dataclasses.field(default_factory=list)
    stored: StoredMedia | None = None

    def payload_size(self) -> int:
        return len(self.data) + len((self.text or "").encode())


@dataclass(frozen=True)
class InputOutcome:
    index: int
    input_id: str
    outcome: Outcome
    violations: tuple[FieldViolation, ...] = ()
    view: InputView | None = None


@dataclass(frozen=True)
class FetchedMedia:
    data: bytes
    content_type: str
    final_url: str


class MediaFetcher(Protocol):
    async def fetch(self, url: str, field: str) -> FetchedMedia: ...


@dataclass(frozen=True)
class InputSettings:
    download_url_ttl: timedelta = timedelta(hours=1)


@dataclass(frozen=True)
class _Prepared:
    index: int
    # Field path of the input in the request, e.g. "inputs[3]".
    path: str
    input: Input
    payload: bytes
    content_type: str


def _check_geo(violations: Violations, field: str, geo: GeoPoint | None) -> None:
    if geo is None:
        return
    if not (math.isfinite(geo.longitude) and -180 <= geo.longitude <= 180):
        violations.add(f"{field}.longitude", f"must be -180..180 degrees, got {geo.longitude}")
    if not (math.isfinite(geo.latitude) and -90 <= geo.latitude <= 90):
        violations.add(f"{field}.latitude", f"must be -90..90 degrees, got {geo.latitude}")


def _check_url(violations: Violations, field: str, url: str) -> None:
    if len(url) > URL_MAX_CHARS:
        violations.add(field, f"must be at most {URL_MAX_CHARS} characters")
    elif not url.lower().startswith(("http://", "https://")):
        violations.add(field, "must be an http:// or https:// URL")


def medium_field(path: str, media_type: MediaType) -> str:
    return f"{path}.data.{media_type.value}"


def media_source(
    draft: InputDraft, media_type: MediaType, media_field: str
) -> tuple[bytes, str, str]:
    """(inline bytes, source URL, field of the inline bytes); exactly one is given."""
    inline_name = "raw" if media_type is MediaType.TEXT else "base64"
    inline = (draft.text or "").encode() if media_type is MediaType.TEXT else draft.data
    violations = Violations()
    if draft.url and inline:
        violations.add(
            media_field, f"set either {media_type.value}.{inline_name} or .url, not both"
        )
    elif draft.url:
        _check_url(violations, f"{media_field}.url", draft.url)
    elif not inline:
        violations.add(media_field, f"is empty: set {media_type.value}.{inline_name} or .url")
    violations.raise_if_any()
    return inline, draft.url, f"{media_field}.{inline_name}"


# What UpdateInputs may change; media are content-addressed and never change.
PATCHABLE_FIELDS = ("metadata", "concepts", "geo", "title")


class InputService:
    def __init__(
        self,
        inputs: InputRepository,
        members: MembershipRepository,
        blobs: BlobStore,
        tx: TransactionManager,
        settings: InputSettings,
        prober: MediaProber,
        fetcher: MediaFetcher | None = None,
    ) -> None:
        self._inputs = inputs
        self._members = members
        self._blobs = blobs
        self._tx = tx
        self._settings = settings
        self._prober = prober
        self._fetcher = fetcher

    # --- create ----------------------------------------------------------------------------

    async def create_batch(
        self, principal: Principal, app_id: str, drafts: Sequence[InputDraft], *, atomic: bool
    ) -> list[InputOutcome]:
        """Validates every input, stores the media of the valid ones, then writes the
        rows in one transaction; with `atomic`, any failure fails the whole batch."""
        authorize(principal, app_id, Permission.WRITE)
        self._check_batch(drafts)
        paths = [f"inputs[{index}]" for index in range(len(drafts))]
        return await self._create(app_id, drafts, paths, atomic=atomic)

    async def create_one(
        self, principal: Principal, app_id: str, draft: InputDraft, *, path: str = "inputs[0]"
    ) -> InputView:
        """One input, all-or-nothing (used by streamed uploads after their media are
        stored); errors name its fields under `path`."""
        authorize(principal, app_id, Permission.WRITE)
        (outcome,) = await self._create(app_id, [draft], [path], atomic=True)
        assert outcome.view is not None
        return outcome.view

    async def check_draft(
        self,
        principal: Principal,
        app_id: str,
        draft: InputDraft,
        *,
        path: str,
        check_state: bool,
    ) -> None:
        """Checks an input whose media have not arrived yet, so that a streamed upload
        with a bad header fails before its bytes flow. With `check_state`, also that the
        id is free and the datasets exist; creating the input checks all of it again."""
        authorize(principal, app_id, Permission.WRITE)
        self._check_fields(path, draft)
        if not check_state:
            return
        if draft.id and await self._inputs.existing_ids(app_id, [draft.id]):
            raise AlreadyExists(
                f"input {draft.id!r} already exists in app {app_id!r}",
                reason="INPUT_EXISTS",
                violations=[FieldViolation(f"{path}.id", f"{draft.id!r} already exists")],
            )
        wanted = sorted(set(draft.dataset_ids))
        if wanted:
            async with self._tx.transaction():
                live = await self._members.live_datasets(app_id, wanted)
            missing = _missing_datasets(app_id, path, draft.dataset_ids, live)
            if missing:
                raise InvalidArgument(
                    "; ".join(f"{v.field}: {v.description}" for v in missing),
                    reason="INVALID_FIELD",
                    violations=missing,
                )

    async def _create(
        self, app_id: str, drafts: Sequence[InputDraft], paths: Sequence[str], *, atomic: bool
    ) -> list[InputOutcome]:
        outcomes: dict[int, InputOutcome] = {}
        prepared: list[_Prepared] = []
        seen: set[str] = set()
        for index, draft in enumerate(drafts):
            input_id = draft.id or uuid.uuid4().hex
            path = paths[index]
            if draft.id and draft.id in seen:
                outcomes[index] = InputOutcome(
                    index,
                    input_id,
                    Outcome.DUPLICATE_ID,
                    (FieldViolation(f"{path}.id", f"{draft.id!r} repeats within the request"),),
                )
                continue
            seen.add(input_id)
            try:
                prepared.append(await self._prepare(app_id, index, path, input_id, draft))
            except InvalidArgument as invalid:
                outcomes[index] = InputOutcome(index, input_id, Outcome.INVALID, invalid.violations)
        await self._check_datasets(app_id, prepared, outcomes)
        prepared = [p for p in prepared if p.index not in outcomes]
        if atomic and outcomes:
            self._fail_atomic(drafts, outcomes)
        # Blob first, row second: the objects exist before any row references them.
        stored = await self._blobs.put_many(
            [(p.payload, p.content_type) for p in prepared if p.payload]
        )
        blob_of = iter(stored)
        rows = [
            dataclasses.replace(p.input, blob=next(blob_of)) if p.payload else p.input
            for p in prepared
        ]
        wanted = sorted({d for r in rows for d in r.dataset_ids})
        async with self._tx.transaction():
            # Locks the datasets against deletion until the rows are written.
            gone = set(wanted) - await self._members.live_datasets(app_id, wanted)
            if gone:
                raise Aborted(
                    f"datasets {', '.join(sorted(gone))} were deleted while the inputs were "
                    "being stored; nothing was written",
                    reason="DATASET_DELETED_CONCURRENTLY",
                )
            inserted = await self._inputs.insert_many(rows)
            if atomic and len(inserted) < len(rows):
                duplicates = [r.id for r in rows if r.id not in inserted]
                raise AlreadyExists(
                    f"inputs already exist: {', '.join(duplicates[:20])}; nothing was stored",
                    reason="INPUT_EXISTS",
                    violations=[
                        FieldViolation(f"{p.path}.id", f"{p.input.id!r} already exists")
                        for p in prepared
                        if p.input.id not in inserted
                    ],
                )
        views = await self._views([r for r in rows if r.id in inserted])
        view_of = {view.input.id: view for view in views}
        for p in prepared:
            if p.input.id in inserted:
                outcomes[p.index] = InputOutcome(
                    p.index, p.input.id, Outcome.CREATED, view=view_of[p.input.id]
                )
            else:
                outcomes[p.index] = InputOutcome(
                    p.index,
                    p.input.id,
                    Outcome.DUPLICATE_ID,
                    (FieldViolation(f"{p.path}.id", f"{p.input.id!r} already exists"),),
                )
        return [outcomes[i] for i in range(len(drafts))]

    @staticmethod
    def _check_batch(drafts: Sequence[InputDraft]) -> None:
        if not drafts:
            raise InvalidArgument.field("inputs", "must contain at least one input")
        if len(drafts) > MAX_BATCH_INPUTS:
            raise InvalidArgument.field(
                "inputs",
                f"at most {MAX_BATCH_INPUTS} inputs per call, got {len(drafts)}; "
                "split the batch or stream large media with UploadInput",
                reason="BATCH_TOO_LARGE",
            )
        total = sum(d.payload_size() for d in drafts)
        if total > MAX_BATCH_BYTES:
            raise InvalidArgument.field(
                "inputs",
                f"at most {MAX_BATCH_BYTES // (1024 * 1024)} MB of media per call, got "
                f"{total / (1024 * 1024):.1f} MB; split the batch or use UploadInput",
                reason="BATCH_TOO_LARGE",
            )

    @staticmethod
    def _fail_atomic(drafts: Sequence[InputDraft], outcomes: dict[int, InputOutcome]) -> None:
        violations = [v for i in sorted(outcomes) for v in outcomes[i].violations]
        duplicates = all(o.outcome is Outcome.DUPLICATE_ID for o in outcomes.values())
        error = AlreadyExists if duplicates else InvalidArgument
        raise error(
            f"{len(outcomes)} of {len(drafts)} inputs failed; nothing was stored (atomic batch): "
            + "; ".join(f"{v.field}: {v.description}" for v in violations[:10]),
            reason="INPUT_EXISTS" if duplicates else "INVALID_INPUT",
            violations=violations,
        )

    @staticmethod
    def _check_fields(path: str, draft: InputDraft) -> MediaType:
        """Everything about a draft that does not need its media bytes; returns its medium."""
        violations = Violations()
        check_id(violations, f"{path}.id", draft.id, required=False)
        check_text(violations, f"{path}.title", draft.title, TITLE_MAX_CHARS)
        if draft.metadata is not None:
            check_metadata(violations, f"{path}.data.metadata", draft.metadata)
        _check_geo(violations, f"{path}.data.geo.geo_point", draft.geo)
        for position, dataset_id in enumerate(draft.dataset_ids):
            check_id(violations, f"{path}.dataset_ids[{position}]", dataset_id)
        if not draft.media:
            violations.add(
                f"{path}.data", "needs one medium: image, video, audio (bytes or url) or text"
            )
        elif len(draft.media) > 1:
            violations.add(
                f"{path}.data",
                "has more than one medium ("
                + ", ".join(m.value for m in draft.media)
                + "); one input carries exactly one",
            )
        violations.raise_if_any()
        media_type = draft.media[0]
        if draft.concepts:
            check_annotation_data(
                violations,
                f"{path}.data",
                {"concepts": draft.concepts},
                MediaContext(media_type=media_type.value),
            )
            violations.raise_if_any()
        return media_type

    async def _prepare(
        self, app_id: str, index: int, path: str, input_id: str, draft: InputDraft
    ) -> _Prepared:
        media_type = self._check_fields(path, draft)
        blob: StoredBlob | None = None
        if draft.stored is not None:
            # Streamed uploads: checked and stored already; put_many skips an empty payload.
            blob, payload, source_url = draft.stored.blob, b"", ""
            content_type, info, text = blob.content_type, draft.stored.info, draft.stored.text
        else:
            media_field = medium_field(path, media_type)
            payload, source_url, data_field = media_source(draft, media_type, media_field)
            if source_url and self._fetcher is not None:
                fetched = await self._fetcher.fetch(source_url, f"{media_field}.url")
                payload, data_field = fetched.data, f"{media_field}.url"
            content_type, info = (
                self._prober.probe(media_type, payload, data_field) if payload else ("", {})
            )
            # Texts are stored inline (for search and export) and as a blob (for download).
            text = payload.decode() if media_type is MediaType.TEXT and payload else None
        stored = Input(
            app_id=app_id,
            id=input_id,
            media_type=media_type,
            blob=blob,
            source_url=source_url,
            text=text,
            media_info=info,
            metadata=draft.metadata or {},
            geo=draft.geo,
            title=draft.title,
            concepts=draft.concepts,
            dataset_ids=list(dict.fromkeys(draft.dataset_ids)),
        )
        return _Prepared(index, path, stored, payload, content_type)

    async def _check_datasets(
        self, app_id: str, prepared: list[_Prepared], outcomes: dict[int, InputOutcome]
    ) -> None:
        wanted = sorted({d for p in prepared for d in p.input.dataset_ids})
        if not wanted:
            return
        async with self._tx.transaction():
            live = await self._members.live_datasets(app_id, wanted)
        for p in prepared:
            missing = _missing_datasets(app_id, p.path, p.input.dataset_ids, live)
            if missing:
                outcomes[p.index] = InputOutcome(p.index, p.input.id, Outcome.INVALID, missing)

    # --- read ------------------------------------------------------------------------------

    async def get(self, principal: Principal, app_id: str, input_id: str) -> InputView:
        authorize(principal, app_id, Permission.READ)
        return (await self._views([await self._require(app_id, input_id)]))[0]

    async def stored_media(
        self, principal: Principal, app_id: str, input_id: str
    ) -> tuple[Input, StoredBlob]:
        """The input and its stored original, for downloads."""
        authorize(principal, app_id, Permission.READ)
        found = await self._require(app_id, input_id)
        if found.blob is None:
            raise FailedPrecondition(
                f"input {input_id!r} has no stored media"
                + (
                    f" (it references {found.source_url})" if found.source_url else " (inline text)"
                ),
                reason="NO_STORED_MEDIA",
            )
        return found, found.blob

    async def download_url(self, blob: StoredBlob) -> str:
        return await self._blobs.download_url(blob, self._settings.download_url_ttl)

    @property
    def download_url_ttl(self) -> timedelta:
        return self._settings.download_url_ttl

    async def list_inputs(
        self, principal: Principal, query: InputQuery, after_seq: int | None, limit: int
    ) -> tuple[list[InputView], int | None]:
        """A page and the cursor of its last row when more rows follow."""
        authorize(principal, query.app_id, Permission.READ)
        self._check_query(query)
        rows = await self._inputs.page(query, after_seq, limit + 1)
        page = rows[:limit]
        views = await self._views([row for _, row in page])
        return views, page[-1][0] if len(rows) > limit and page else None

    @staticmethod
    def _check_query(query: InputQuery) -> None:
        violations = Violations()
        if query.ids is not None:
            if len(query.ids) > MAX_IDS_PER_CALL:
                violations.add("ids", f"at most {MAX_IDS_PER_CALL} ids")
            for index, input_id in enumerate(query.ids):
                check_id(violations, f"ids[{index}]", input_id)
        if query.dataset_id is not None:
            check_id(violations, "dataset_id", query.dataset_id)
        if query.metadata is not None:
            check_metadata(violations, "filter.metadata", query.metadata)
        violations.raise_if_any()

    async def _views(self, inputs: list[Input]) -> list[InputView]:
        blobs = [i.blob for i in inputs if i.blob is not None]
        urls = iter(await self._blobs.download_urls(blobs, self._settings.download_url_ttl))
        views = []
        for item in inputs:
            if item.blob is not None:
                views.append(InputView(item, next(urls), self._blobs.hosted(item.blob)))
            else:
                views.append(InputView(item, item.source_url))
        return views

    async def _require(self, app_id: str, input_id: str) -> Input:
        violations = Violations()
        check_id(violations, "input_id", input_id)
        violations.raise_if_any()
        found = await self._inputs.get_many(app_id, [input_id])
        if not found:
            raise NotFound(
                f"input {input_id!r} not found in app {app_id!r}",
                reason="INPUT_NOT_FOUND",
                metadata={"input_id": input_id},
            )
        return found[0]

    # --- update and delete -----------------------------------------------------------------

    async def update(
        self,
        principal: Principal,
        app_id: str,
        action: PatchAction,
        patches: Sequence[tuple[str, dict[str, Any]]],
    ) -> list[InputView]:
        """Patches (input id, {field: value}) pairs, all-or-nothing. Fields: metadata,
        concepts, geo (a GeoPoint or None), title."""
        authorize(principal, app_id, Permission.WRITE)
        violations = Violations()
        if not patches or len(patches) > MAX_BATCH_INPUTS:
            violations.add("inputs", f"must contain 1..{MAX_BATCH_INPUTS} inputs")
        ids = [input_id for input_id, _ in patches]
        for index, (input_id, fields) in enumerate(patches):
            check_id(violations, f"inputs[{index}].id", input_id)
            if not fields:
                violations.add(f"inputs[{index}]", "nothing to update")
            if ids.count(input_id) > 1:
                violations.add(f"inputs[{index}].id", f"{input_id!r} repeats within the request")
        violations.raise_if_any()
        async with self._tx.transaction():
            current = {i.id: i for i in await self._inputs.get_many(app_id, ids, lock=True)}
            missing = [i for i in ids if i not in current]
            if missing:
                raise NotFound(
                    f"inputs not found: {', '.join(missing[:20])}; nothing was changed",
                    reason="INPUT_NOT_FOUND",
                    violations=[
                        FieldViolation(f"inputs[{ids.index(m)}].id", f"no input {m!r}")
                        for m in missing
                    ],
                )
            updated = []
            for index, (input_id, fields) in enumerate(patches):
                patched = self._apply(current[input_id], action, fields, f"inputs[{index}]")
                await self._inputs.update(patched)
                updated.append(patched)
            fresh = {i.id: i for i in await self._inputs.get_many(app_id, ids)}
        return await self._views([fresh[i] for i in ids])

    @staticmethod
    def _apply(current: Input, action: PatchAction, fields: dict[str, Any], path: str) -> Input:
        remove = action is PatchAction.REMOVE
        violations = Violations()
        changes: dict[str, Any] = {}
        for name, value in fields.items():
            if name == "metadata":
                metadata = apply_json(action, current.metadata, value, f"{path}.data.metadata")
                check_metadata(violations, f"{path}.data.metadata", metadata)
                changes["metadata"] = metadata
            elif name == "concepts":
                changes["concepts"] = _patch_concepts(current.concepts, value, action)
                if changes["concepts"]:
                    check_annotation_data(
                        violations,
                        f"{path}.data",
                        {"concepts": changes["concepts"]},
                        MediaContext(media_type=current.media_type.value),
                    )
            elif name == "geo":
                _check_geo(violations, f"{path}.data.geo.geo_point", value)
                changes["geo"] = None if remove else value
            elif name == "title":
                check_text(violations, f"{path}.title", value, TITLE_MAX_CHARS)
                changes["title"] = "" if remove else value
            else:
                violations.add(
                    f"{path}.{name}", "is not patchable (metadata, concepts, geo, title)"
                )
        violations.raise_if_any()
        return dataclasses.replace(current, **changes)

    async def delete(
        self, principal: Principal, app_id: str, ids: Sequence[str]
    ) -> tuple[int, list[str]]:
        authorize(principal, app_id, Permission.WRITE)
        violations = Violations()
        if not ids or len(ids) > MAX_IDS_PER_CALL:
            violations.add("ids", f"must contain 1..{MAX_IDS_PER_CALL} ids")
        for index, input_id in enumerate(ids):
            check_id(violations, f"ids[{index}]", input_id)
        violations.raise_if_any()
        unique = list(dict.fromkeys(ids))
        async with self._tx.transaction():
            deleted = set(await self._inputs.delete(app_id, unique))
        return len(deleted), [i for i in unique if i not in deleted]

    # --- dataset membership ----------------------------------------------------------------

    async def add_to_dataset(
        self, principal: Principal, app_id: str, dataset_id: str, input_ids: Sequence[str]
    ) -> tuple[int, int, list[str]]:
        """(added, already present, unknown ids)."""
        authorize(principal, app_id, Permission.WRITE)
        unique = self._check_member_ids(dataset_id, input_ids)
        async with self._tx.transaction():
            await self._require_live_dataset(app_id, dataset_id)
            existing = await self._inputs.existing_ids(app_id, unique)
            known = [i for i in unique if i in existing]
            added = await self._members.add(app_id, dataset_id, known)
        return added, len(known) - added, [i for i in unique if i not in existing]

    async def list_members(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        after_seq: int | None,
        limit: int,
    ) -> tuple[list[tuple[DatasetMember, InputView]], int | None]:
        authorize(principal, app_id, Permission.READ)
        self._check_dataset_id(dataset_id)
        async with self._tx.transaction():
            await self._require_live_dataset(app_id, dataset_id)
            rows = await self._members.page(app_id, dataset_id, after_seq, limit + 1)
        page = rows[:limit]
        views = await self._views([m.input for m in page])
        cursor = page[-1].seq if len(rows) > limit and page else None
        return list(zip(page, views, strict=True)), cursor

    async def get_member(
        self, principal: Principal, app_id: str, dataset_id: str, input_id: str
    ) -> tuple[DatasetMember, InputView]:
        authorize(principal, app_id, Permission.READ)
        violations = Violations()
        check_id(violations, "dataset_id", dataset_id)
        check_id(violations, "input_id", input_id)
        violations.raise_if_any()
        async with self._tx.transaction():
            await self._require_live_dataset(app_id, dataset_id)
            member = await self._members.get(app_id, dataset_id, input_id)
        if member is None:
            raise NotFound(
                f"input {input_id!r} is not in dataset {dataset_id!r}",
                reason="DATASET_INPUT_NOT_FOUND",
                metadata={"dataset_id": dataset_id, "input_id": input_id},
            )
        return member, (await self._views([member.input]))[0]

    async def remove_from_dataset(
        self, principal: Principal, app_id: str, dataset_id: str, input_ids: Sequence[str]
    ) -> int:
        authorize(principal, app_id, Permission.WRITE)
        unique = self._check_member_ids(dataset_id, input_ids)
        async with self._tx.transaction():
            await self._require_live_dataset(app_id, dataset_id)
            return await self._members.remove(app_id, dataset_id, unique)

    async def delete_by_filter(
        self, principal: Principal, query: InputQuery, *, dry_run: bool
    ) -> tuple[int, int]:
        """(matched, deleted) among the dataset's inputs."""
        authorize(principal, query.app_id, Permission.WRITE)
        assert query.dataset_id is not None
        self._check_query(query)
        async with self._tx.transaction():
            await self._require_live_dataset(query.app_id, query.dataset_id)
            if dry_run:
                return await self._inputs.count_matching(query), 0
            deleted = await self._inputs.delete_matching(query)
            return deleted, deleted

    async def merge(
        self, principal: Principal, app_id: str, source_id: str, destination_id: str
    ) -> tuple[int, int]:
        authorize(principal, app_id, Permission.WRITE)
        violations = Violations()
        check_id(violations, "source_dataset_id", source_id)
        check_id(violations, "destination_dataset_id", destination_id)
        if source_id == destination_id:
            violations.add("destination_dataset_id", "must differ from source_dataset_id")
        violations.raise_if_any()
        async with self._tx.transaction():
            live = await self._members.live_datasets(app_id, sorted({source_id, destination_id}))
            for dataset_id in (source_id, destination_id):
                if dataset_id not in live:
                    raise dataset_not_found(app_id, dataset_id)
            return await self._members.merge(app_id, source_id, destination_id)

    @staticmethod
    def _check_dataset_id(dataset_id: str) -> None:
        violations = Violations()
        check_id(violations, "dataset_id", dataset_id)
        violations.raise_if_any()

    def _check_member_ids(self, dataset_id: str, input_ids: Sequence[str]) -> list[str]:
        violations = Violations()
        check_id(violations, "dataset_id", dataset_id)
        if not input_ids or len(input_ids) > MAX_IDS_PER_CALL:
            violations.add("input_ids", f"must contain 1..{MAX_IDS_PER_CALL} ids")
        for index, input_id in enumerate(input_ids):
            check_id(violations, f"input_ids[{index}]", input_id)
        violations.raise_if_any()
        return list(dict.fromkeys(input_ids))

    async def _require_live_dataset(self, app_id: str, dataset_id: str) -> None:
        if not await self._members.live_datasets(app_id, [dataset_id]):
            raise dataset_not_found(app_id, dataset_id)


def _missing_datasets(
    app_id: str, path: str, dataset_ids: list[str], live: set[str]
) -> tuple[FieldViolation, ...]:
    return tuple(
        FieldViolation(
            f"{path}.dataset_ids[{dataset_ids.index(d)}]", f"no dataset {d!r} in app {app_id!r}"
        )
        for d in dict.fromkeys(dataset_ids)
        if d not in live
    )


def dataset_not_found(app_id: str, dataset_id: str) -> NotFound:
    return NotFound(
        f"dataset {dataset_id!r} not found in app {app_id!r}",
        reason="DATASET_NOT_FOUND",
        metadata={"dataset_id": dataset_id},
    )


def _patch_concepts(
    current: list[dict[str, Any]], given: list[dict[str, Any]], action: PatchAction
) -> list[dict[str, Any]]:
    """Concepts are an id-keyed list: merged by id, replaced, or removed by id."""
    if action is PatchAction.OVERWRITE:
        return list(given)
    if action is PatchAction.REMOVE:
        drop = {c.get("id") for c in given}
        return [c for c in current if c.get("id") not in drop]
    merged: list[dict[str, Any]] = merge_json(current, given) if current else list(given)
    return merged
