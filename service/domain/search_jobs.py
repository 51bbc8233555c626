"""The search use cases that change or group inputs: AddDatasetInputs and
DeleteDatasetInputsByFilter by search, the ADD_BY_SEARCH job (AddBySearch) and
GetSearchJob, FindDuplicates.

A query is prepared (checked against the app, its rank resolved into a vector) once, on
the request path; a job stores the resolved query in its payload, so that it never embeds
image bytes again and adds what the caller's query meant at the time of the call.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from service.domain.access import Action, Resource, require
from service.domain.auth import Permission, authorize
from service.domain.datasets import DatasetChange, require_changeable
from service.domain.embeddings import (
    INLINE_ADD_LIMIT,
    DuplicateGroup,
    EmbeddingModel,
    EmbeddingRepository,
    EmbeddingSource,
    GeoBox,
    GeoRadius,
    Ranking,
    SearchFilter,
    SearchRepository,
    SearchSpec,
)
from service.domain.errors import (
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Violations,
)
from service.domain.jobs import Job, JobFailed, JobKind, JobQueue, JobStatus, Progress, payload_ids
from service.domain.models import MediaType, Principal
from service.domain.ports import InputRepository, MembershipRepository, TransactionManager
from service.domain.validation import checked_ids

log = logging.getLogger(__name__)

# Matches added per transaction of the job (and per statement inline): one batch's
# ids fit a statement comfortably and a crash loses at most one batch of work.
ADD_BATCH = 5_000
# FindDuplicates compares every input of the scope with its nearest neighbours; above
# this many inputs that takes minutes and a single response could not carry the groups.
MAX_NEAR_DUPLICATE_SCOPE = 100_000
DEFAULT_THRESHOLD = 0.95
MIN_THRESHOLD = 0.5
# Nearest neighbours each input is compared with: a group larger than this is still
# found whole, through the neighbours' own neighbours (union-find).
NEIGHBOURS = 10
JOB_ID_MAX_DIGITS = 18


class SearchJobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


_STATES = {
    JobStatus.PENDING: SearchJobState.QUEUED,
    JobStatus.RUNNING: SearchJobState.RUNNING,
    JobStatus.SUCCEEDED: SearchJobState.DONE,
    JobStatus.FAILED: SearchJobState.FAILED,
    JobStatus.CANCELLED: SearchJobState.FAILED,
}


@dataclass(frozen=True)
class SearchJob:
    """A background AddDatasetInputs by search: counts are the search_jobs row's, status,
    progress and error the jobs row's."""

    app_id: str
    job_id: int
    dataset_id: str
    status: JobStatus
    progress: int
    error: str
    matched_count: int
    added_count: int
    present_count: int
    last_seq: int | None
    created_at: datetime
    finished_at: datetime | None

    @property
    def state(self) -> SearchJobState:
        return _STATES[self.status]

    @property
    def percent(self) -> int:
        """100 only once the job is done."""
        if self.status is JobStatus.SUCCEEDED:
            return 100
        return max(0, min(self.progress, 99))

    @property
    def message(self) -> str:
        if self.status is JobStatus.CANCELLED and not self.error:
            return "the job was cancelled"
        return self.error


class SearchJobRepository(Protocol):
    """The search_jobs table (storage/search_jobs.py)."""

    async def insert(
        self, job_id: int, app_id: str, dataset_id: str, query: dict[str, Any], matched: int
    ) -> None: ...

    async def get(self, app_id: str, job_id: int) -> SearchJob | None: ...

    async def advance(self, job_id: int, last_seq: int, added: int, present: int) -> None:
        """Adds a batch's counts and moves the job's cursor past it (in the batch's
        transaction)."""
        ...

    async def finish(self, job_id: int) -> None:
        """Records when the job ended."""
        ...


class QueryPreparer(Protocol):
    """SearchService.prepare (domain/search.py): checks a query against the app."""

    async def prepare(
        self, principal: Principal, app_id: str, spec: SearchSpec, *, field: str = "query"
    ) -> tuple[SearchFilter, Ranking | None]: ...


@dataclass(frozen=True)
class AddOutcome:
    matched: int
    added: int = 0
    present: int = 0
    # Set when the matches are added by a job.
    job_id: int | None = None


@dataclass(frozen=True)
class Duplicates:
    groups: list[DuplicateGroup]
    scanned: int
    not_embedded: int


# -- the resolved query, as a job payload stores it --------------------------------


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


def query_to_json(query: SearchFilter, ranking: Ranking | None) -> dict[str, Any]:
    geo: dict[str, Any] | None = None
    if isinstance(query.geo, GeoRadius):
        geo = {"radius": [query.geo.latitude, query.geo.longitude, query.geo.radius_km]}
    elif isinstance(query.geo, GeoBox):
        box = query.geo
        geo = {"box": [box.min_latitude, box.max_latitude, box.min_longitude, box.max_longitude]}
    stored: dict[str, Any] = {
        "dataset_id": query.dataset_id,
        "version_id": query.version_id,
        "concept_ids": list(query.concept_ids),
        "negative_concept_ids": list(query.negative_concept_ids),
        "metadata": query.metadata,
        "media_types": [m.value for m in query.media_types],
        "annotated": query.annotated,
        "geo": geo,
        "created_after": _time(query.created_after),
        "created_before": _time(query.created_before),
    }
    if ranking is not None:
        stored["rank"] = {
            "model_id": ranking.model.id,
            "vector": list(ranking.vector),
            "min_score": ranking.min_score,
            "exclude_input_id": ranking.exclude_input_id,
        }
    return stored


def query_from_json(app_id: str, stored: dict[str, Any]) -> tuple[SearchFilter, dict[str, Any]]:
    """The filter and the stored rank (resolved against the models by the caller)."""
    geo: GeoRadius | GeoBox | None = None
    stored_geo = stored.get("geo") or {}
    if "radius" in stored_geo:
        geo = GeoRadius(*(float(v) for v in stored_geo["radius"]))
    elif "box" in stored_geo:
        geo = GeoBox(*(float(v) for v in stored_geo["box"]))
    query = SearchFilter(
        app_id=app_id,
        dataset_id=stored.get("dataset_id"),
        version_id=stored.get("version_id"),
        concept_ids=tuple(stored.get("concept_ids") or ()),
        negative_concept_ids=tuple(stored.get("negative_concept_ids") or ()),
        metadata=stored.get("metadata"),
        media_types=tuple(MediaType(m) for m in stored.get("media_types") or ()),
        annotated=stored.get("annotated"),
        geo=geo,
        created_after=_parse_time(stored.get("created_after")),
        created_before=_parse_time(stored.get("created_before")),
    )
    return query, stored.get("rank") or {}


# -- duplicate groups ----------------------------------------------------------------


def duplicate_groups(
    exact: Iterable[DuplicateGroup],
    pairs: Iterable[tuple[str, str, float]],
    order: dict[str, int] | None = None,
) -> list[DuplicateGroup]:
    """Exact groups first, then near groups: the connected components of the pairs (each
    pair similar at least the threshold), where an exact group stands for its first input
    (the one to keep): its copies are in no near group, and it is in the near group of
    what any of them is near to. A near group's min_similarity is its lowest pair's. Ids
    oldest first (`order`: creation seq by id); groups by their first input's seq."""
    rank = order or {}

    def key(input_id: str) -> tuple[int, str]:
        return (rank.get(input_id, 1 << 62), input_id)

    exact_groups = [
        DuplicateGroup(tuple(sorted(g.input_ids, key=key)), True, 1.0)
        for g in exact
        if len(set(g.input_ids)) > 1
    ]
    kept_copy = {i: g.input_ids[0] for g in exact_groups for i in g.input_ids}
    parent: dict[str, str] = {}

    def find(item: str) -> str:
        root = item
        while parent[root] != root:
            root = parent[root]
        while parent[item] != root:
            parent[item], item = root, parent[item]
        return root

    kept = [
        (a, b, s)
        for a, b, s in ((kept_copy.get(a, a), kept_copy.get(b, b), s) for a, b, s in pairs)
        if a != b
    ]
    for a, b, _ in kept:
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            parent[max(root_a, root_b, key=key)] = min(root_a, root_b, key=key)
    members: dict[str, list[str]] = {}
    for item in parent:
        members.setdefault(find(item), []).append(item)
    lowest: dict[str, float] = {}
    for a, _, similarity in kept:
        root = find(a)
        lowest[root] = min(lowest.get(root, 1.0), similarity)
    near = [
        DuplicateGroup(tuple(sorted(ids, key=key)), False, lowest[root])
        for root, ids in members.items()
    ]
    exact_groups.sort(key=lambda g: key(g.input_ids[0]))
    near.sort(key=lambda g: key(g.input_ids[0]))
    return exact_groups + near


def _require_search_read(principal: Principal, app_id: str, scope: str | None) -> None:
    """A search that adds to (or deletes from) one dataset reads another: its scope, or
    the whole app without one. The RPC's rule checked only the dataset it changes."""
    if scope:
        require(principal, app_id, Action.READ, Resource.DATASETS, [scope])
    else:
        require(principal, app_id, Action.READ, Resource.APP)


def parse_job_id(value: str) -> int:
    if not value:
        raise InvalidArgument.field("job_id", "is required: the job_id AddDatasetInputs returned")
    if not value.isascii() or not value.isdigit() or len(value) > JOB_ID_MAX_DIGITS:
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise InvalidArgument.field("job_id", f"must be a job id (decimal digits), got {shown!r}")
    return int(value)


# -- the use cases -------------------------------------------------------------------


@dataclass(frozen=True)
class SearchJobService:
    preparer: QueryPreparer
    search: SearchRepository
    embeddings: EmbeddingRepository
    records: InputRepository
    members: MembershipRepository
    jobs: SearchJobRepository
    queue: JobQueue
    tx: TransactionManager
    # More matches than this are added by a job (tests lower it to reach the job path).
    inline_limit: int = INLINE_ADD_LIMIT

    async def add(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        spec: SearchSpec,
        *,
        dry_run: bool,
    ) -> AddOutcome:
        """Adds every match to the dataset: in the call up to `inline_limit` matches, by
        a job otherwise; only counts on a dry run."""
        authorize(principal, app_id, Permission.WRITE)
        checked_ids(("dataset_id", dataset_id)).raise_if_any()
        # The caller's app, whatever app the spec was decoded for.
        spec = replace(spec, filter=replace(spec.filter, app_id=app_id))
        _require_search_read(principal, app_id, spec.filter.dataset_id)
        query, ranking = await self.preparer.prepare(principal, app_id, spec, field="search")
        async with self.tx.transaction():
            if dry_run:
                await self._require_live(app_id, dataset_id)
                return AddOutcome(await self.search.count(query, ranking))
            await require_changeable(self.members, app_id, [dataset_id], DatasetChange.MEMBERSHIP)
            matched = await self.search.count(query, ranking)
            if matched > self.inline_limit:
                stored = query_to_json(query, ranking)
                job_id = await self.queue.enqueue(
                    JobKind.ADD_BY_SEARCH, app_id, {"dataset_id": dataset_id, "query": stored}
                )
                await self.jobs.insert(job_id, app_id, dataset_id, stored, matched)
                return AddOutcome(matched, job_id=job_id)
            added = present = 0
            after: int | None = None
            while batch := await self.search.matching_ids(query, ranking, after, ADD_BATCH):
                after = batch[-1][0]
                new, old = await add_batch(self.records, self.members, app_id, dataset_id, batch)
                added, present = added + new, present + old
            return AddOutcome(matched, added, present)

    async def delete(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        spec: SearchSpec,
        *,
        dry_run: bool,
        field: str = "search",
    ) -> tuple[int, int]:
        """(matched, deleted): deletes the inputs of the dataset that match, as
        DeleteDatasetInputsByFilter's filter does."""
        authorize(principal, app_id, Permission.WRITE)
        violations = checked_ids(("dataset_id", dataset_id))
        scope = spec.filter
        if scope.version_id:
            violations.add(
                f"{field}.scope.version_id",
                "must be empty: inputs are deleted from the dataset as it is now, not from a "
                "version",
            )
        if scope.dataset_id and scope.dataset_id != dataset_id:
            violations.add(
                f"{field}.scope.dataset_id",
                f"must be empty or {dataset_id!r} (the dataset_id of the request)",
            )
        violations.raise_if_any()
        spec = replace(
            spec, filter=replace(scope, app_id=app_id, dataset_id=dataset_id, version_id=None)
        )
        _require_search_read(principal, app_id, dataset_id)
        query, ranking = await self.preparer.prepare(principal, app_id, spec, field=field)
        async with self.tx.transaction():
            if dry_run:
                await self._require_live(app_id, dataset_id)
                return await self.search.count(query, ranking), 0
            await require_changeable(self.members, app_id, [dataset_id], DatasetChange.MEMBERSHIP)
            # Every match first: deleting while walking the matches by seq would be
            # correct too, but this keeps the deletes to a few statements.
            ids: list[str] = []
            after: int | None = None
            while batch := await self.search.matching_ids(query, ranking, after, ADD_BATCH):
                after = batch[-1][0]
                ids.extend(i for _, i in batch)
            deleted = 0
            for start in range(0, len(ids), ADD_BATCH):
                deleted += len(await self.records.delete(app_id, ids[start : start + ADD_BATCH]))
            return deleted, deleted

    async def get_job(self, principal: Principal, app_id: str, job_id: str) -> SearchJob:
        authorize(principal, app_id, Permission.READ)
        number = parse_job_id(job_id)
        async with self.tx.read_transaction():
            job = await self.jobs.get(app_id, number)
        if job is None:
            raise NotFound.in_app("search_job", app_id, job_id)
        # The job is named by its own id: its dataset decides who may see it.
        require(principal, app_id, Action.READ, Resource.DATASETS, [job.dataset_id])
        return job

    async def duplicates(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        version_id: str,
        *,
        threshold: float,
        model_id: str,
        exact_only: bool,
    ) -> Duplicates:
        authorize(principal, app_id, Permission.READ)
        violations = Violations()
        if not dataset_id:
            violations.add(
                "scope.dataset_id", "is required: duplicates are looked for in a dataset"
            )
        if threshold == 0:
            threshold = DEFAULT_THRESHOLD
        elif not MIN_THRESHOLD <= threshold <= 1:
            violations.add("threshold", f"must be 0 (default {DEFAULT_THRESHOLD}) or 0.5..1")
        violations.raise_if_any()
        spec = SearchSpec(SearchFilter(app_id, dataset_id, version_id or None))
        try:
            query, _ = await self.preparer.prepare(principal, app_id, spec, field="")
        except DomainError as error:
            # The scope is a field of the request itself here, not of a query.
            error.violations = tuple(
                FieldViolation(v.field.removeprefix("."), v.description) for v in error.violations
            )
            raise
        async with self.tx.read_transaction():
            models = [] if exact_only else await self._models(app_id, model_id)
            exact = await self.search.exact_duplicates(query)
            if exact_only:
                return Duplicates(
                    duplicate_groups(exact, []), await self.search.count(query, None), 0
                )
            scope = await self.search.matching_ids(query, None, None, MAX_NEAR_DUPLICATE_SCOPE + 1)
            if len(scope) > MAX_NEAR_DUPLICATE_SCOPE:
                raise FailedPrecondition(
                    f"the scope has more than {MAX_NEAR_DUPLICATE_SCOPE} inputs: near "
                    "duplicates are looked for in at most that many; set exact_only, or look "
                    "in a smaller dataset",
                    reason="SCOPE_TOO_LARGE",
                    metadata={"limit": str(MAX_NEAR_DUPLICATE_SCOPE)},
                )
            pairs: list[tuple[str, str, float]] = []
            not_embedded = 0
            for model in models:
                part = replace(query, media_types=tuple(sorted(model.media_types, key=_value)))
                found, _, missing = await self.search.similar_pairs(
                    part, model, threshold, NEIGHBOURS
                )
                pairs.extend(found)
                not_embedded += missing
        order = {input_id: seq for seq, input_id in scope}
        return Duplicates(duplicate_groups(exact, pairs, order), len(scope), not_embedded)

    async def _models(self, app_id: str, model_id: str) -> list[EmbeddingModel]:
        if model_id:
            model = await self.embeddings.model(app_id, model_id)
            if model is None:
                known = [m.id for m in await self.embeddings.models(app_id)]
                raise NotFound(
                    f"embedding model {model_id!r} not found in app {app_id!r}; known: "
                    + (", ".join(known) or "none"),
                    reason="EMBEDDING_MODEL_NOT_FOUND",
                    metadata={"model_id": model_id},
                )
            return [model]
        installed = [m for m in await self.embeddings.models(app_id) if m.app_id == ""]
        chosen: list[EmbeddingModel] = []
        for media in (MediaType.IMAGE, MediaType.TEXT):
            candidates = [m for m in installed if media in m.media_types]
            # The built-in one, as the proto says; an installation without built-in
            # models (DATASETD_BUILTIN_EMBEDDERS=off) uses the one it has.
            candidates.sort(key=lambda m: (m.source is not EmbeddingSource.BUILTIN, m.id))
            if candidates and candidates[0] not in chosen:
                chosen.append(candidates[0])
        if not chosen:
            raise FailedPrecondition(
                "no embedding model embeds images or texts in this installation: set "
                "exact_only, or name a model_id",
                reason="NO_EMBEDDING_MODEL",
            )
        return chosen

    async def _require_live(self, app_id: str, dataset_id: str) -> None:
        if not await self.members.live_datasets(app_id, [dataset_id], lock=False):
            raise NotFound.in_app("dataset", app_id, dataset_id)


def _value(media: MediaType) -> str:
    return media.value


async def add_batch(
    records: InputRepository,
    members: MembershipRepository,
    app_id: str,
    dataset_id: str,
    batch: Sequence[tuple[int, str]],
) -> tuple[int, int]:
    """(added, already present) of one batch of matches; an input a version still lists
    but that was deleted since is neither."""
    ids = [input_id for _, input_id in batch]
    existing = await records.existing_ids(app_id, ids)
    known = [i for i in ids if i in existing]
    added = await members.add(app_id, dataset_id, known)
    return added, len(known) - added


@dataclass(frozen=True)
class AddBySearch:
    """The ADD_BY_SEARCH job: walks the matches by seq, one transaction per batch that
    adds it, counts it and moves the job's cursor past it, so that a rerun after a crash
    resumes after the last committed batch and counts nothing twice."""

    search: SearchRepository
    embeddings: EmbeddingRepository
    records: InputRepository
    members: MembershipRepository
    jobs: SearchJobRepository
    tx: TransactionManager
    batch: int = ADD_BATCH

    async def run(self, job: Job, progress: Progress) -> None:
        (dataset_id,) = payload_ids(job, "dataset_id", what="add-by-search")
        stored = job.payload.get("query")
        if not isinstance(stored, dict):
            raise JobFailed(f"malformed add-by-search job payload {job.payload!r}")
        query, ranking = await self._query(job.app_id, stored)
        record = await self.jobs.get(job.app_id, job.id)
        if record is None:
            raise JobFailed(f"add-by-search job {job.id} has no record")
        after, done, matched = (
            record.last_seq,
            record.added_count + record.present_count,
            record.matched_count,
        )
        while True:
            await progress(min(99, done * 100 // max(matched, 1)))
            async with self.tx.transaction():
                await self._require_destination(job.app_id, dataset_id)
                batch = await self.search.matching_ids(query, ranking, after, self.batch)
                if not batch:
                    await self.jobs.finish(job.id)
                    break
                added, present = await add_batch(
                    self.records, self.members, job.app_id, dataset_id, batch
                )
                after = batch[-1][0]
                await self.jobs.advance(job.id, after, added, present)
            done += len(batch)
        log.info("add-by-search job %s: done", job.id)

    async def failed(self, job: Job, message: str) -> None:
        """The inputs added so far stay (the proto says so); only the end is recorded."""
        await self.jobs.finish(job.id)

    async def _require_destination(self, app_id: str, dataset_id: str) -> None:
        try:
            await require_changeable(self.members, app_id, [dataset_id], DatasetChange.MEMBERSHIP)
        except NotFound:
            raise JobFailed(
                f"dataset {dataset_id!r} was deleted while its inputs were being added"
            ) from None
        except DomainError as exc:
            raise JobFailed(f"cannot add more inputs: {exc}") from None

    async def _query(
        self, app_id: str, stored: dict[str, Any]
    ) -> tuple[SearchFilter, Ranking | None]:
        try:
            query, rank = query_from_json(app_id, stored)
        except (TypeError, ValueError) as exc:
            raise JobFailed(f"malformed add-by-search query {stored!r}: {exc}") from None
        if not rank:
            return query, None
        model_id = str(rank.get("model_id", ""))
        model = await self.embeddings.model(app_id, model_id)
        if model is None:
            raise JobFailed(f"embedding model {model_id!r} of the query no longer exists")
        min_score = rank.get("min_score")
        exclude = rank.get("exclude_input_id")
        return query, Ranking(
            model,
            tuple(float(v) for v in rank.get("vector") or ()),
            None if min_score is None else float(min_score),
            None if exclude is None else str(exclude),
        )
