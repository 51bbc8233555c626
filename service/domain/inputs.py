"""Input use cases: batch create, get, list, patch, delete."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from service.domain.annotation_fields import MediaContext
from service.domain.annotation_rules import check_annotation_data
from service.domain.auth import Permission, authorize
from service.domain.contents import ContentKeeper
from service.domain.datasets import DatasetChange, check_changeable
from service.domain.embedding_job import EmbeddingScheduler
from service.domain.embeddings import EmbeddingRepository, EmbeddingSource
from service.domain.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Violations,
    the_one,
)
from service.domain.input_drafts import (
    MAX_BATCH_BYTES,
    MAX_BATCH_INPUTS,
    MAX_IDS_PER_CALL,
    TITLE_MAX_CHARS,
    DraftEmbedding,
    FetchedMedia,
    InputDraft,
    InputOutcome,
    InputSettings,
    MediaFetcher,
    Outcome,
    check_embeddings,
    check_geo,
    check_image_size,
    media_source,
    medium_field,
)
from service.domain.input_regions import annotation_fields, region_annotations, repeated_ids
from service.domain.models import (
    AnnotatedMedia,
    Annotation,
    ClientVector,
    Input,
    InputQuery,
    InputView,
    MediaType,
    Principal,
    StoredBlob,
)
from service.domain.ontology_check import OntologyChecker, OntologyGate, add_findings, check_all
from service.domain.paging import split_page
from service.domain.patch import PatchAction, apply_json, merge_json
from service.domain.ports import (
    AnnotationRepository,
    BlobStore,
    ImageHeaders,
    InputRepository,
    MediaLinks,
    MediaProber,
    MembershipRepository,
    TransactionManager,
)
from service.domain.validation import (
    check_batch_size,
    check_concept_ids,
    check_id,
    check_metadata,
    check_text,
    require_ids,
)


@dataclass(frozen=True)
class _Prepared:
    index: int
    # Field path of the input in the request, e.g. "inputs[3]".
    path: str
    input: Input
    payload: bytes
    content_type: str
    # The regions and frames sent with the input, checked: one annotation each
    # (service.domain.input_regions).
    annotations: tuple[Annotation, ...] = ()
    # Its vectors of client embedding models (data.embeddings), checked.
    vectors: tuple[ClientVector, ...] = ()


# What UpdateInputs may change; media are content-addressed and never change.
PATCHABLE_FIELDS = ("metadata", "concepts", "geo", "title", "embeddings")


@dataclass(frozen=True)
class InputService:
    inputs: InputRepository
    members: MembershipRepository
    blobs: BlobStore
    tx: TransactionManager
    settings: InputSettings
    prober: MediaProber
    # Where the regions and frames sent with an input are stored (as its annotation).
    annotations: AnnotationRepository
    # The ontologies the concepts, regions and frames of an input must fit.
    gate: OntologyGate
    fetcher: MediaFetcher | None = None
    # Links of the HTTP port for stored originals, when clients are to get those.
    links: MediaLinks | None = None
    # Where the vectors of data.embeddings are kept (None: refused).
    embeddings: EmbeddingRepository | None = None
    # Queues the embedding job for new inputs (None: nothing embeds them).
    embedding_jobs: EmbeddingScheduler | None = None
    # Computes the content of new inputs (their snapshot, which versions refer to).
    keeper: ContentKeeper | None = None
    # Reads the size of URL images without a declared one from their headers, when the
    # media are not fetched (DATASETD_FETCH_URLS=header; None: their size stays unknown).
    image_headers: ImageHeaders | None = None

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
        if draft.embeddings:
            given = [ClientVector(e.model_id, e.vector) for e in draft.embeddings]
            await self._check_models(app_id, path, given, {})
        if draft.id and await self.inputs.existing_ids(app_id, [draft.id]):
            raise AlreadyExists(
                f"input {draft.id!r} already exists in app {app_id!r}",
                reason="INPUT_EXISTS",
                violations=[FieldViolation(f"{path}.id", f"{draft.id!r} already exists")],
            )
        wanted = sorted(set(draft.dataset_ids))
        if wanted:
            async with self.tx.transaction():
                live = await self.members.live_datasets(app_id, wanted)
            missing = _missing_datasets(app_id, path, draft.dataset_ids, live)
            if missing:
                raise InvalidArgument(
                    "; ".join(f"{v.field}: {v.description}" for v in missing),
                    reason="INVALID_FIELD",
                    violations=missing,
                )
            # Before the bytes flow too: labels the datasets' ontology refuses.
            gates = await self.gate.for_datasets(app_id, wanted)
            labels = Violations()
            add_findings(
                labels,
                check_all(
                    _checkers(gates, draft.dataset_ids),
                    f"{path}.data",
                    labels_of(draft.concepts, draft.annotation),
                ),
            )
            labels.raise_if_any()

    async def _create(
        self, app_id: str, drafts: Sequence[InputDraft], paths: Sequence[str], *, atomic: bool
    ) -> list[InputOutcome]:
        outcomes, prepared = await self._prepare_all(app_id, drafts, paths)
        await self._check_datasets(app_id, prepared, outcomes)
        prepared = [p for p in prepared if p.index not in outcomes]
        if atomic and outcomes:
            self._fail_atomic(drafts, outcomes)
        # Blob first, row second: the objects exist before any row references them.
        stored = await self.blobs.put_many(
            [(p.payload, p.content_type) for p in prepared if p.payload]
        )
        blob_of = iter(stored)
        rows = [
            dataclasses.replace(p.input, blob=next(blob_of)) if p.payload else p.input
            for p in prepared
        ]
        inserted = await self._insert(app_id, prepared, rows, outcomes, atomic=atomic)
        views = await self.views([r for r in rows if r.id in inserted])
        view_of = {view.input.id: view for view in views}
        for p in prepared:
            if p.index in outcomes:
                continue  # refused while writing (an annotation id taken)
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

    async def _prepare_all(
        self, app_id: str, drafts: Sequence[InputDraft], paths: Sequence[str]
    ) -> tuple[dict[int, InputOutcome], list[_Prepared]]:
        """The checked inputs, and the outcome of each one that failed its checks."""
        url_reads = self._start_url_reads(drafts, paths)
        try:
            return await self._prepare_each(app_id, drafts, paths, url_reads)
        finally:
            _settle(url_reads.values())

    async def _prepare_each(
        self,
        app_id: str,
        drafts: Sequence[InputDraft],
        paths: Sequence[str],
        url_reads: Mapping[int, Awaitable[FetchedMedia | dict[str, Any]]],
    ) -> tuple[dict[int, InputOutcome], list[_Prepared]]:
        outcomes: dict[int, InputOutcome] = {}
        prepared: list[_Prepared] = []
        seen: set[str] = set()
        # Annotation id -> the region or frame that names it, across the request.
        named: dict[str, str] = {}
        dimensions: dict[str, int | None] = {}
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
                ready = await self._prepare(
                    app_id, index, path, input_id, draft, url_reads.get(index)
                )
                if ready.vectors:
                    await self._check_models(app_id, path, ready.vectors, dimensions)
                repeated = repeated_ids(path, ready.annotations, named)
                if repeated:
                    outcomes[index] = InputOutcome(index, input_id, Outcome.INVALID, repeated)
                    continue
                prepared.append(ready)
            except InvalidArgument as invalid:
                outcomes[index] = InputOutcome(index, input_id, Outcome.INVALID, invalid.violations)
        return outcomes, prepared

    async def _check_models(
        self,
        app_id: str,
        path: str,
        vectors: Sequence[ClientVector],
        dimensions: dict[str, int | None],
    ) -> None:
        """Refuses vectors of an installation model, and of a client model of another
        dimension. `dimensions` (model id -> dimension; None: an installation model) is
        what the request has learnt so far: a model's first vector in it sets a new
        model's dimension for the ones after."""
        assert self.embeddings is not None
        violations = Violations()
        for index, given in enumerate(vectors):
            at = f"{path}.data.embeddings[{index}]"
            if given.model_id not in dimensions:
                model = await self.embeddings.model(app_id, given.model_id)
                if model is None:
                    dimensions[given.model_id] = len(given.vector)
                    continue
                dimensions[given.model_id] = (
                    model.dimension if model.source is EmbeddingSource.CLIENT else None
                )
            dimension = dimensions[given.model_id]
            if dimension is None:
                violations.add(
                    f"{at}.model_id",
                    f"{given.model_id!r} is a model datasetd computes itself; name a model "
                    "of your own (ListEmbeddingModels lists the taken ids)",
                )
            elif dimension != len(given.vector):
                violations.add(
                    f"{at}.vector",
                    f"model {given.model_id!r} has {dimension} dimensions, got "
                    f"{len(given.vector)} values",
                )
        violations.raise_if_any()

    async def _insert(
        self,
        app_id: str,
        prepared: list[_Prepared],
        rows: list[Input],
        outcomes: dict[int, InputOutcome],
        *,
        atomic: bool,
    ) -> dict[str, datetime]:
        """The ids of the rows written, with their creation times (an id taken meanwhile
        is skipped, or fails an atomic batch). An input whose regions name annotation ids
        that are taken is not written: its outcome goes into `outcomes`."""
        wanted = sorted({d for r in rows for d in r.dataset_ids})
        async with self.tx.transaction():
            # Locks the datasets against deletion until the rows are written.
            guards = await self.members.guarded_datasets(app_id, wanted)
            gone = set(wanted) - set(guards)
            if gone:
                raise Aborted(
                    f"datasets {', '.join(sorted(gone))} were deleted while the inputs were "
                    "being stored; nothing was written",
                    reason="DATASET_DELETED_CONCURRENTLY",
                )
            for dataset_id, guard in guards.items():
                check_changeable(dataset_id, guard, DatasetChange.MEMBERSHIP)
            refused = await self._taken_annotation_ids(app_id, prepared, outcomes, atomic=atomic)
            if refused:
                rows = [r for r in rows if r.id not in refused]
            inserted = await self.inputs.insert_many(rows)
            if inserted and self.embedding_jobs is not None:
                await self.embedding_jobs.inputs_added(
                    app_id, {r.media_type for r in rows if r.id in inserted}
                )
            # In the same transaction: an input is never seen without the regions it
            # was sent with. A new input has no annotation but its input-level one, and
            # region_annotations keeps within the per-input limit.
            annotations = [a for p in prepared if p.input.id in inserted for a in p.annotations]
            written = await self.annotations.add_many(annotations)
            if written != len(annotations):
                # Ids checked free above were taken by a concurrent writer.
                raise Aborted(
                    "annotation ids of the inputs' regions were taken meanwhile; nothing was "
                    "written, retry the request",
                    reason="ANNOTATION_IDS_TAKEN_CONCURRENTLY",
                )
            await self._put_vectors(
                app_id,
                [
                    (p.path, p.input.id, p.vectors)
                    for p in prepared
                    if p.vectors and p.input.id in inserted
                ],
            )
            if self.keeper is not None and not (atomic and len(inserted) < len(rows)):
                # Their content from what was just written, rather than read back by the
                # refresh before COMMIT (which then finds them fresh).
                regions = {p.input.id: list(p.annotations) for p in prepared}
                await self.keeper.store_new(
                    [
                        (dataclasses.replace(r, created_at=inserted[r.id]), regions[r.id])
                        for r in rows
                        if r.id in inserted
                    ]
                )
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
        return inserted

    async def _taken_annotation_ids(
        self,
        app_id: str,
        prepared: list[_Prepared],
        outcomes: dict[int, InputOutcome],
        *,
        atomic: bool,
    ) -> set[str]:
        """The inputs refused because an annotation id their regions or frames name
        exists already (in the caller's transaction); with `atomic`, raises instead. An
        input whose id exists is left to the insert, which reports the id (a re-run)."""
        ids = [a.id for p in prepared for a in p.annotations]
        if not ids:
            return set()
        boxed = [p.input.id for p in prepared if p.annotations]
        existing, taken = await self.annotations.lock_inputs(app_id, boxed, ids)
        if not taken:
            return set()
        refused: set[str] = set()
        for p in prepared:
            if p.input.id in existing:
                continue
            fields = [
                FieldViolation(field, f"{annotation_id!r} already names an annotation")
                for annotation_id, field in annotation_fields(p.path, p.annotations)
                if annotation_id in taken
            ]
            if fields:
                refused.add(p.input.id)
                outcomes[p.index] = InputOutcome(
                    p.index, p.input.id, Outcome.DUPLICATE_ID, tuple(fields)
                )
        if atomic:
            violations = [
                v for p in prepared if p.input.id in refused for v in outcomes[p.index].violations
            ]
            raise AlreadyExists(
                "annotation ids of the inputs' regions already exist; nothing was stored: "
                + "; ".join(f"{v.field}: {v.description}" for v in violations[:10]),
                reason="ANNOTATION_EXISTS",
                violations=violations,
            )
        return refused

    async def _put_vectors(
        self, app_id: str, items: Sequence[tuple[str, str, Sequence[ClientVector]]]
    ) -> None:
        """Stores (path, input id, vectors), in the caller's transaction: an input is
        never seen without the vectors it was given. A model another request created
        meanwhile with another dimension fails it all."""
        if not items:
            return
        assert self.embeddings is not None
        by_model: dict[str, list[tuple[str, str, int, ClientVector]]] = {}
        for path, input_id, vectors in items:
            for index, given in enumerate(vectors):
                by_model.setdefault(given.model_id, []).append((path, input_id, index, given))
        for model_id, given_vectors in by_model.items():
            dimension = len(given_vectors[0][3].vector)
            model = await self.embeddings.client_model(app_id, model_id, dimension)
            wrong = [g for g in given_vectors if len(g[3].vector) != model.dimension]
            if model.source is not EmbeddingSource.CLIENT or wrong:
                raise InvalidArgument(
                    f"embedding model {model_id!r} changed while the inputs were stored "
                    f"(it has {model.dimension} dimensions); nothing was stored",
                    reason="INVALID_INPUT",
                    violations=[
                        FieldViolation(f"{path}.data.embeddings[{index}]", "wrong dimension")
                        for path, _, index, _ in wrong or given_vectors
                    ],
                )
            await self.embeddings.put_many(
                model, [(app_id, input_id, g.vector) for _, input_id, _, g in given_vectors]
            )

    @staticmethod
    def _check_batch(drafts: Sequence[InputDraft]) -> None:
        check_batch_size(
            "inputs",
            "input",
            len(drafts),
            MAX_BATCH_INPUTS,
            "; split the batch or stream large media with UploadInput",
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

    def _check_fields(self, path: str, draft: InputDraft) -> MediaType:
        """Everything about a draft that does not need its media bytes; returns its medium."""
        violations = Violations()
        check_id(violations, f"{path}.id", draft.id, required=False)
        check_text(violations, f"{path}.title", draft.title, TITLE_MAX_CHARS)
        if draft.metadata is not None:
            check_metadata(violations, f"{path}.data.metadata", draft.metadata)
        check_geo(violations, f"{path}.data.geo.geo_point", draft.geo)
        for position, dataset_id in enumerate(draft.dataset_ids):
            check_id(violations, f"{path}.dataset_ids[{position}]", dataset_id)
        if draft.embeddings and self.embeddings is None:
            violations.add(f"{path}.data.embeddings", "are not stored by this installation")
        check_embeddings(violations, f"{path}.data.embeddings", draft.embeddings)
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
        elif draft.image_size is not None and draft.media[0] is MediaType.IMAGE:
            check_image_size(
                violations,
                f"{path}.data.image.image_info",
                draft.image_size,
                uploaded=bool(draft.data) or draft.stored is not None,
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

    def _start_url_reads(
        self, drafts: Sequence[InputDraft], paths: Sequence[str]
    ) -> dict[int, asyncio.Task[FetchedMedia | dict[str, Any]]]:
        """Starts every URL read of a batch at once, so that a batch costs about its
        slowest read rather than their sum; the reader bounds how many are open. Their
        results are taken in request order, after each input's own checks."""
        reads: dict[int, asyncio.Task[FetchedMedia | dict[str, Any]]] = {}
        for index, draft in enumerate(drafts):
            # Only inputs whose one medium is the URL (the others fail their checks).
            inline = bool(draft.data or draft.text) or draft.stored is not None
            if not draft.url or len(draft.media) != 1 or inline:
                continue
            media_type = draft.media[0]
            field = f"{medium_field(paths[index], media_type)}.url"
            if self.fetcher is not None:
                reads[index] = asyncio.create_task(_fetched(self.fetcher, draft.url, field))
            elif (
                self.image_headers is not None
                and media_type is MediaType.IMAGE
                and draft.image_size is None
            ):
                reads[index] = asyncio.create_task(_header(self.image_headers, draft.url, field))
        return reads

    async def _prepare(
        self,
        app_id: str,
        index: int,
        path: str,
        input_id: str,
        draft: InputDraft,
        url_read: Awaitable[FetchedMedia | dict[str, Any]] | None = None,
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
            # The media fetched from the URL, or an image's info read from its header.
            read = await url_read if source_url and url_read is not None else None
            if isinstance(read, FetchedMedia):
                payload, data_field = read.data, f"{media_field}.url"
            content_type, info = (
                self.prober.probe(media_type, payload, data_field) if payload else ("", {})
            )
            if isinstance(read, dict):
                info = read
            if draft.image_size is not None:
                info = _declared_size(path, draft.image_size, info)
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
        annotations: tuple[Annotation, ...] = ()
        if draft.annotation:
            # Checked against the media just probed, as CreateAnnotations would.
            media = AnnotatedMedia(media_type, info)
            annotations = tuple(region_annotations(app_id, input_id, path, draft.annotation, media))
        vectors = tuple(ClientVector(e.model_id, e.vector) for e in draft.embeddings)
        return _Prepared(index, path, stored, payload, content_type, annotations, vectors)

    async def _check_datasets(
        self, app_id: str, prepared: list[_Prepared], outcomes: dict[int, InputOutcome]
    ) -> None:
        wanted = sorted({d for p in prepared for d in p.input.dataset_ids})
        if not wanted:
            return
        async with self.tx.transaction():
            live = await self.members.live_datasets(app_id, wanted)
        gates = await self.gate.for_datasets(app_id, wanted)
        for p in prepared:
            missing = _missing_datasets(app_id, p.path, p.input.dataset_ids, live)
            if missing:
                outcomes[p.index] = InputOutcome(p.index, p.input.id, Outcome.INVALID, missing)
                continue
            findings = check_all(
                _checkers(gates, p.input.dataset_ids),
                f"{p.path}.data",
                labels_of(p.input.concepts, _regions_of(p.annotations)),
            )
            if findings:
                outcomes[p.index] = InputOutcome(
                    p.index,
                    p.input.id,
                    Outcome.INVALID,
                    tuple(FieldViolation(f.field, f.message) for f in findings),
                )

    # --- read ------------------------------------------------------------------------------

    async def get(self, principal: Principal, app_id: str, input_id: str) -> InputView:
        authorize(principal, app_id, Permission.READ)
        return (await self.views([await self._require(app_id, input_id)]))[0]

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

    async def held_blob(self, principal: Principal, app_id: str, suffix: str) -> StoredBlob:
        """The stored original a `hosted` suffix names, when the app holds it: an input
        of the app, live or kept by one of its versions, has it. NOT_FOUND otherwise, and
        for a key of another app too: whether a blob exists anywhere is never told (a URL
        in an archive may reach anyone)."""
        key = self.blobs.hosted_key(suffix)
        if key is None:
            raise InvalidArgument.field(
                "suffix",
                f"{suffix[:80]!r} is not a hosted suffix; stored originals are named "
                "sha256/<2 hex>/<2 hex>/<64 lowercase hex> (the `hosted.suffix` of an input)",
                reason="BAD_HOSTED_SUFFIX",
            )
        missing = NotFound(
            f"app {app_id!r} has no stored original {suffix!r}", reason="MEDIA_NOT_FOUND"
        )
        if principal.app_id != app_id:
            raise missing
        authorize(principal, app_id, Permission.READ)
        blob = await self.inputs.held_blob(app_id, key)
        if blob is None:
            raise missing
        return blob

    async def download_url(self, blob: StoredBlob) -> str:
        return await self.blobs.download_url(blob, self.settings.download_url_ttl)

    @property
    def download_url_ttl(self) -> timedelta:
        return self.settings.download_url_ttl

    async def list_inputs(
        self, principal: Principal, query: InputQuery, after_seq: int | None, limit: int
    ) -> tuple[list[InputView], int | None]:
        """A page and the cursor of its last row when more rows follow."""
        authorize(principal, query.app_id, Permission.READ)
        self.check_query(query)
        rows = await self.inputs.page(query, after_seq, limit + 1)
        inputs, last = split_page(rows, limit)
        return await self.views(inputs), last

    @staticmethod
    def check_query(query: InputQuery) -> None:
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
        if query.concept_ids is not None:
            check_concept_ids(violations, "filter.concept_ids", list(query.concept_ids))
        if query.negative_concept_ids is not None:
            negative = list(query.negative_concept_ids)
            check_concept_ids(violations, "filter.negative_concept_ids", negative)
        violations.raise_if_any()

    async def views(self, inputs: list[Input], *, embeddings: bool = True) -> list[InputView]:
        """The inputs with the URL of their media: a link of the HTTP port where the links
        say so, else a presigned object-store URL (one signing pass for the rest); with
        `embeddings`, their current client vectors too (one query for all)."""
        links = [
            self.links.input_link(i.app_id, i.id) if self.links and i.blob else None for i in inputs
        ]
        blobs = [i.blob for i, link in zip(inputs, links, strict=True) if i.blob and not link]
        urls = iter(await self.blobs.download_urls(blobs, self.settings.download_url_ttl))
        vectors: dict[str, list[ClientVector]] = {}
        if embeddings and self.embeddings is not None:
            for app_id in dict.fromkeys(i.app_id for i in inputs):
                ids = [i.id for i in inputs if i.app_id == app_id]
                vectors.update(await self.embeddings.client_vectors(app_id, ids))
        views = []
        for item, link in zip(inputs, links, strict=True):
            given = tuple(vectors.get(item.id, ()))
            if item.blob is not None:
                url = link or next(urls)
                views.append(InputView(item, url, self.blobs.hosted(item.blob), given))
            else:
                views.append(InputView(item, item.source_url, embeddings=given))
        return views

    async def _require(self, app_id: str, input_id: str) -> Input:
        require_ids(("input_id", input_id))
        return the_one(await self.inputs.get_many(app_id, [input_id]), "input", app_id, input_id)

    # --- update and delete -----------------------------------------------------------------

    async def update(
        self,
        principal: Principal,
        app_id: str,
        action: PatchAction,
        patches: Sequence[tuple[str, dict[str, Any]]],
    ) -> list[InputView]:
        """Patches (input id, {field: value}) pairs, all-or-nothing. Fields: metadata,
        concepts, geo (a GeoPoint or None), title, embeddings (DraftEmbeddings: each
        replaces the input's vector of its model, whatever the action but REMOVE, which
        is refused; vectors of other models stay)."""
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
            if "embeddings" in fields:
                self._check_patched_embeddings(
                    violations, f"inputs[{index}]", action, fields["embeddings"]
                )
        violations.raise_if_any()
        vectors = [
            (f"inputs[{index}]", input_id, [ClientVector(e.model_id, e.vector) for e in given])
            for index, (input_id, fields) in enumerate(patches)
            if (given := fields.get("embeddings"))
        ]
        dimensions: dict[str, int | None] = {}
        for path, _, given_vectors in vectors:
            await self._check_models(app_id, path, given_vectors, dimensions)
        async with self.tx.transaction():
            current = {i.id: i for i in await self.inputs.get_many(app_id, ids, lock=True)}
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
            gates = await self.gate.for_inputs(
                app_id, [i for i, fields in patches if "concepts" in fields]
            )
            updated = []
            labels = Violations()
            for index, (input_id, fields) in enumerate(patches):
                path = f"inputs[{index}]"
                before = current[input_id]
                patched = self._apply(before, action, fields, path)
                if "concepts" in fields:
                    # An archived class the input carried before may stay.
                    kept = frozenset(c.get("id", "") for c in before.concepts)
                    add_findings(
                        labels,
                        check_all(
                            gates.get(input_id, []),
                            f"{path}.data",
                            {"concepts": patched.concepts},
                            allowed_archived=kept,
                        ),
                    )
                updated.append(patched)
            labels.raise_if_any()
            for patched in updated:
                await self.inputs.update(patched)
            await self._put_vectors(app_id, vectors)
            fresh = {i.id: i for i in await self.inputs.get_many(app_id, ids)}
        return await self.views([fresh[i] for i in ids])

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
                check_geo(violations, f"{path}.data.geo.geo_point", value)
                changes["geo"] = None if remove else value
            elif name == "title":
                check_text(violations, f"{path}.title", value, TITLE_MAX_CHARS)
                changes["title"] = "" if remove else value
            elif name == "embeddings":
                # Checked by update() and stored apart from the row.
                pass
            else:
                violations.add(
                    f"{path}.{name}",
                    "is not patchable (metadata, concepts, geo, title, embeddings)",
                )
        violations.raise_if_any()
        return dataclasses.replace(current, **changes)

    def _check_patched_embeddings(
        self,
        violations: Violations,
        path: str,
        action: PatchAction,
        given: Sequence[DraftEmbedding],
    ) -> None:
        field = f"{path}.data.embeddings"
        if self.embeddings is None:
            violations.add(field, "are not stored by this installation")
        elif action is PatchAction.REMOVE:
            violations.add(
                field,
                "cannot be removed: send a new vector of the model with PATCH_ACTION_MERGE "
                "or PATCH_ACTION_OVERWRITE to replace it",
            )
        else:
            check_embeddings(violations, field, given)

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
        async with self.tx.transaction():
            deleted = set(await self.inputs.delete(app_id, unique))
        return len(deleted), [i for i in unique if i not in deleted]


async def _fetched(fetcher: MediaFetcher, url: str, field: str) -> FetchedMedia | dict[str, Any]:
    return await fetcher.fetch(url, field)


async def _header(headers: ImageHeaders, url: str, field: str) -> FetchedMedia | dict[str, Any]:
    return await headers.image_info(url, field)


def _settle(reads: Iterable[asyncio.Task[Any]]) -> None:
    """Stops the URL reads of inputs that failed before their read was wanted, and takes
    the errors of the finished ones (asyncio logs an error nobody took)."""
    for read in reads:
        if not read.done():
            read.cancel()
        elif not read.cancelled():
            read.exception()


def _declared_size(path: str, size: tuple[int, int], probed: dict[str, Any]) -> dict[str, Any]:
    """The media info of a URL image with the size its caller declared (checked already).
    A fetched image was read: a declared size it contradicts is refused, never kept."""
    width, height = size
    if not probed:
        return {"width": width, "height": height}
    if (probed.get("width"), probed.get("height")) != (width, height):
        raise InvalidArgument.field(
            f"{path}.data.image.image_info",
            f"says {width}x{height}, but the image at the URL is "
            f"{probed.get('width')}x{probed.get('height')}",
            reason="INVALID_INPUT",
        )
    return probed


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


def _checkers(
    gates: Mapping[str, list[OntologyChecker]], dataset_ids: Sequence[str]
) -> list[OntologyChecker]:
    """The checkers of the ontologies of the datasets an input goes into."""
    return [c for d in dict.fromkeys(dataset_ids) for c in gates.get(d, [])]


def _regions_of(annotations: Sequence[Annotation]) -> dict[str, Any]:
    """The regions and frames of an input's annotations as one Data, in request order
    (so that the ontology's findings name the fields of the request)."""
    merged: dict[str, list[Any]] = {}
    for annotation in annotations:
        for kind, items in annotation.data.items():
            merged.setdefault(kind, []).extend(items)
    return merged


def labels_of(concepts: Sequence[dict[str, Any]], regions: Mapping[str, Any]) -> dict[str, Any]:
    """The labels a new input carries, in the shape of annotation data: its concepts and
    the regions and frames sent with it."""
    labels = dict(regions)
    if concepts:
        labels["concepts"] = list(concepts)
    return labels
