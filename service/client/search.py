"""Search (SearchService, and AddDatasetInputs by search): the query's keyword arguments,
pages of hits, duplicates, embedding models and an input's embeddings.

Every filter and rank is checked by the server, which names the request field it refuses;
the client only refuses what it cannot express in the request at all (two rank targets,
an unknown media type name, a `near` that is not three numbers).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict, Unpack

from datasetd.v1 import common_pb2, dataset_service_pb2, search_pb2, search_service_pb2
from google.protobuf import struct_pb2

from service.client._rpc import Rpc, time_of
from service.client.bulk_delete import _MEDIA_TYPES, _strings
from service.client.dataset import InputInfo, to_input_info
from service.client.errors import JobFailedError
from service.client.progress import Progress, reporter
from service.client.versions import wait_for

# Fewer hits per call than the server's maximum (1000): a page of inputs with their
# metadata stays small, and `limit` stops early anyway.
DEFAULT_PAGE_SIZE = 100
_RANK_TARGETS = ("similar_to", "image", "text", "vector")
_MEDIA_NAMES = {number: name for name, number in _MEDIA_TYPES.items()}
_JOB_PREFIX = "SEARCH_JOB_STATE_"
_EMBEDDING_PREFIX = "EMBEDDING_STATE_"
_SOURCE_PREFIX = "EMBEDDING_SOURCE_"


class QueryArgs(TypedDict, total=False):
    """The conditions of a search, all optional and combined with AND.

    `concepts` / `not_concepts`: concept ids present (value 1) / absent, on the input or in
    a region. `metadata`: a JSON object the input's metadata contains. `media_types`:
    "image", "video", "audio", "text". `annotated`: True or False (None: either).
    `near`: (latitude, longitude, radius in km). `box`: (min latitude, max latitude,
    min longitude, max longitude). `created_after` / `created_before`: datetimes (naive
    ones are UTC). Rank by cosine similarity to one of: `similar_to` (an input id),
    `image` (bytes or a file path), `text`, `vector` (of `model_id`); `model_id` picks the
    embedding model, `min_score` drops hits below it (-1..1).
    """

    concepts: Sequence[str]
    not_concepts: Sequence[str]
    metadata: Mapping[str, Any]
    media_types: Sequence[str]
    annotated: bool | None
    near: tuple[float, float, float]
    box: tuple[float, float, float, float]
    created_after: datetime
    created_before: datetime
    similar_to: str
    image: bytes | str | Path
    text: str
    vector: Sequence[float]
    model_id: str
    min_score: float


QUERY_ARGS: tuple[str, ...] = tuple(QueryArgs.__annotations__)


@dataclass(frozen=True)
class Hit:
    """One input found, with its cosine similarity to the rank target (0 unranked)."""

    input: InputInfo
    score: float


@dataclass(frozen=True)
class HitPage:
    hits: list[Hit]
    next_page_token: str

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)


@dataclass(frozen=True)
class SearchJobInfo:
    """A background AddDatasetInputs by search as last fetched."""

    id: str
    dataset_id: str
    # QUEUED, RUNNING, DONE or FAILED.
    state: str
    percent_completed: int
    matched: int
    added: int
    already_present: int
    error: str = ""
    created_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def status(self) -> str:
        """The state as wait_for reads it (PENDING and IN_PROGRESS are still running)."""
        return {"QUEUED": "PENDING", "RUNNING": "IN_PROGRESS"}.get(self.state, self.state)

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        for name in ("created_at", "finished_at"):
            value = result[name]
            result[name] = value.isoformat() if value else None
        return result


class SearchJobFailedError(JobFailedError):
    """An add-by-search job failed; the inputs it added stay. `job.error` says why."""

    def __init__(self, job: SearchJobInfo) -> None:
        super().__init__(
            f"search job {job.id} failed after adding {job.added} inputs: "
            f"{job.error or 'no details'}",
            "SEARCH_JOB_FAILED",
        )
        self.job = job


@dataclass(frozen=True)
class AddFromSearchResult:
    """What AddDatasetInputs by search did: counts, and the job when it ran as one."""

    matched: int
    added: int
    already_present: int
    dry_run: bool = False
    job: SearchJobInfo | None = None


@dataclass(frozen=True)
class DuplicateGroupInfo:
    """Inputs that are copies of each other, oldest first (the first is the one to keep)."""

    input_ids: list[str]
    exact: bool
    min_similarity: float


@dataclass(frozen=True)
class DuplicatesResult:
    groups: list[DuplicateGroupInfo]
    scanned: int
    not_embedded: int


@dataclass(frozen=True)
class EmbeddingModelInfo:
    id: str
    dimension: int
    media_types: list[str]
    accepts_text_queries: bool
    # BUILTIN, ONNX or CLIENT.
    source: str
    description: str
    embedded_count: int


@dataclass(frozen=True)
class InputEmbeddingInfo:
    model_id: str
    # PENDING, READY or FAILED.
    state: str
    error: str = ""
    vector: list[float] = field(default_factory=list)
    updated_at: datetime | None = None


def _numbers(name: str, value: Any, count: int, shape: str) -> tuple[float, ...]:
    """A fixed-length tuple of numbers; their ranges are the server's to check."""
    try:
        numbers = tuple(float(item) for item in value)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count:
        raise ValueError(f"{name} must be {shape}, not {value!r}")
    return numbers


def _rank(arguments: Mapping[str, Any]) -> search_pb2.Rank | None:
    targets = [name for name in _RANK_TARGETS if arguments.get(name) is not None]
    if len(targets) > 1:
        raise ValueError(
            f"rank by one of {', '.join(_RANK_TARGETS)} at a time, not {' and '.join(targets)}"
        )
    model_id = arguments.get("model_id") or ""
    min_score = arguments.get("min_score")
    if not targets:
        if min_score is not None:
            raise ValueError(f"min_score needs a rank target: one of {', '.join(_RANK_TARGETS)}")
        if model_id:
            raise ValueError(f"model_id needs a rank target: one of {', '.join(_RANK_TARGETS)}")
        return None
    rank = search_pb2.Rank(model_id=model_id)
    if min_score is not None:
        rank.min_score = float(min_score)
    target = targets[0]
    value = arguments[target]
    if target == "similar_to":
        rank.input_id = value
    elif target == "text":
        rank.text = value
    elif target == "image":
        rank.image_bytes = value if isinstance(value, bytes) else Path(value).read_bytes()
    else:
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError):
            raise ValueError(f"vector must be a sequence of numbers, not {value!r}") from None
        rank.vector.values.extend(values)
    return rank


def search_query(
    dataset_id: str | None = None, version_id: str | None = None, **arguments: Unpack[QueryArgs]
) -> search_pb2.SearchQuery:
    """The SearchQuery of `QueryArgs` in a scope: the app, a dataset or a dataset's version."""
    given: dict[str, Any] = dict(arguments)
    unknown = sorted(set(given) - set(QUERY_ARGS))
    if unknown:
        raise ValueError(f"unknown search argument(s) {', '.join(unknown)}; allowed: {QUERY_ARGS}")
    query = search_pb2.SearchQuery()
    if dataset_id or version_id:
        query.scope.CopyFrom(
            search_pb2.SearchScope(dataset_id=dataset_id or "", version_id=version_id or "")
        )
    if given.get("concepts") is not None:
        query.concept_ids.extend(_strings("concepts", given["concepts"]))
    if given.get("not_concepts") is not None:
        query.negative_concept_ids.extend(_strings("not_concepts", given["not_concepts"]))
    metadata = given.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise ValueError(f"metadata must be a JSON object (a dict), not {metadata!r}")
        struct = struct_pb2.Struct()
        struct.update(dict(metadata))
        query.metadata.CopyFrom(struct)
    if given.get("media_types") is not None:
        for kind in _strings("media_types", given["media_types"]):
            if kind.lower() not in _MEDIA_TYPES:
                raise ValueError(
                    f"media_types: unknown media type {kind!r}; allowed: {', '.join(_MEDIA_TYPES)}"
                )
            query.media_types.append(_MEDIA_TYPES[kind.lower()])
    annotated = given.get("annotated")
    if annotated is not None:
        if not isinstance(annotated, bool):
            raise ValueError(f"annotated must be True, False or None, not {annotated!r}")
        query.annotation_state = (
            common_pb2.ANNOTATION_STATE_ANNOTATED
            if annotated
            else common_pb2.ANNOTATION_STATE_UNANNOTATED
        )
    if given.get("near") is not None:
        lat, lon, km = _numbers("near", given["near"], 3, "(latitude, longitude, radius_km)")
        query.geo_radius.CopyFrom(search_pb2.GeoRadius(latitude=lat, longitude=lon, radius_km=km))
    if given.get("box") is not None:
        edges = _numbers(
            "box", given["box"], 4, "(min_latitude, max_latitude, min_longitude, max_longitude)"
        )
        query.geo_box.CopyFrom(
            search_pb2.GeoBox(
                min_latitude=edges[0],
                max_latitude=edges[1],
                min_longitude=edges[2],
                max_longitude=edges[3],
            )
        )
    for name in ("created_after", "created_before"):
        moment = given.get(name)
        if moment is not None:
            if not isinstance(moment, datetime):
                raise ValueError(f"{name} must be a datetime, not {moment!r}")
            # A naive datetime is read as UTC (Timestamp.FromDatetime's rule).
            getattr(query, name).FromDatetime(moment)
    rank = _rank(given)
    if rank is not None:
        query.rank.CopyFrom(rank)
    return query


def to_hit(message: search_pb2.SearchHit) -> Hit:
    return Hit(to_input_info(message.input), message.score)


def to_search_job(message: search_pb2.SearchJob) -> SearchJobInfo:
    return SearchJobInfo(
        id=message.id,
        dataset_id=message.dataset_id,
        state=search_pb2.SearchJobState.Name(message.state).removeprefix(_JOB_PREFIX),
        percent_completed=message.percent,
        matched=message.matched_count,
        added=message.added_count,
        already_present=message.already_present_count,
        error=message.error,
        created_at=time_of(message, "created_at"),
        finished_at=time_of(message, "finished_at"),
    )


class Search:
    """The search calls of one app; `Client` and `Dataset` expose them with their scope."""

    def __init__(self, rpc: Rpc) -> None:
        self.rpc = rpc

    def pages(
        self,
        query: search_pb2.SearchQuery,
        limit: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Iterator[HitPage]:
        """Pages of hits, fetched lazily; with `limit`, at most that many hits in all
        (and no page fetched beyond them)."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        left = limit
        token = ""
        while True:
            size = page_size if left is None else min(page_size, left)
            response = self.rpc.call(
                self.rpc.search.SearchInputs,
                search_service_pb2.SearchInputsRequest(
                    app_id=self.rpc.app, query=query, page_size=size, page_token=token
                ),
            )
            hits = [to_hit(h) for h in response.hits]
            token = response.next_page_token
            if left is not None:
                hits = hits[:left]
                left -= len(hits)
                if left == 0:
                    token = ""
            yield HitPage(hits, token)
            if not token:
                return

    def add(
        self,
        dataset_id: str,
        query: search_pb2.SearchQuery,
        dry_run: bool,
        wait: bool,
        timeout: float,
        progress: Progress,
        request_id: str | None,
    ) -> AddFromSearchResult:
        response = self.rpc.app_call(
            self.rpc.datasets.AddDatasetInputs,
            dataset_service_pb2.AddDatasetInputsRequest,
            dataset_id=dataset_id,
            search=query,
            dry_run=dry_run,
            request_id=request_id,
        )
        if not response.job_id:
            return AddFromSearchResult(
                response.matched_count,
                response.added_count,
                response.already_present_count,
                dry_run,
            )
        job = self.wait(response.job_id, timeout, progress) if wait else self.job(response.job_id)
        return AddFromSearchResult(
            job.matched or response.matched_count, job.added, job.already_present, False, job
        )

    def wait(self, job_id: str, timeout: float, progress: Progress) -> SearchJobInfo:
        """Fetches the job until it ended: DONE is returned, FAILED raised."""
        first = self.job(job_id)
        return wait_for(
            lambda: self.job(job_id),
            "DONE",
            SearchJobFailedError,
            timeout,
            f"adding {first.matched:,} inputs to {first.dataset_id}",
            progress,
        )

    def job(self, job_id: str) -> SearchJobInfo:
        response = self.rpc.app_call(
            self.rpc.search.GetSearchJob, search_service_pb2.GetSearchJobRequest, job_id=job_id
        )
        return to_search_job(response.job)

    def duplicates(
        self,
        dataset_id: str,
        version_id: str | None,
        threshold: float | None,
        exact_only: bool,
        model_id: str,
    ) -> DuplicatesResult:
        if threshold == 0:
            # The request cannot tell 0 from unset (the default, 0.95).
            raise ValueError("threshold must be a cosine similarity in 0.5..1, not 0")
        response = self.rpc.app_call(
            self.rpc.search.FindDuplicates,
            search_service_pb2.FindDuplicatesRequest,
            scope=search_pb2.SearchScope(dataset_id=dataset_id, version_id=version_id or ""),
            threshold=threshold or 0.0,
            exact_only=exact_only,
            model_id=model_id,
        )
        return DuplicatesResult(
            groups=[
                DuplicateGroupInfo(list(g.input_ids), g.exact, g.min_similarity)
                for g in response.groups
            ],
            scanned=response.scanned_count,
            not_embedded=response.not_embedded_count,
        )

    def models(self) -> list[EmbeddingModelInfo]:
        response = self.rpc.app_call(
            self.rpc.search.ListEmbeddingModels, search_service_pb2.ListEmbeddingModelsRequest
        )
        return [
            EmbeddingModelInfo(
                id=m.id,
                dimension=m.dimension,
                media_types=[_MEDIA_NAMES.get(t, str(t)) for t in m.media_types],
                accepts_text_queries=m.accepts_text_queries,
                source=search_pb2.EmbeddingSource.Name(m.source).removeprefix(_SOURCE_PREFIX),
                description=m.description,
                embedded_count=m.embedded_count,
            )
            for m in response.models
        ]

    def embeddings(self, input_id: str, include_vectors: bool) -> list[InputEmbeddingInfo]:
        response = self.rpc.app_call(
            self.rpc.search.GetInputEmbeddings,
            search_service_pb2.GetInputEmbeddingsRequest,
            input_id=input_id,
            include_vectors=include_vectors,
        )
        return [
            InputEmbeddingInfo(
                model_id=e.model_id,
                state=search_pb2.EmbeddingState.Name(e.state).removeprefix(_EMBEDDING_PREFIX),
                error=e.error,
                vector=list(e.vector),
                updated_at=time_of(e, "updated_at"),
            )
            for e in response.embeddings
        ]


class Searches:
    """`search`, `embedding_models` and `input_embeddings` of the client's app."""

    rpc: Rpc

    def search(
        self,
        limit: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        **query: Unpack[QueryArgs],
    ) -> Iterator[HitPage]:
        """Pages of the app's inputs matching `query` (see `QueryArgs`): by score when
        ranked, else by creation order; fetched lazily, at most `limit` hits in all."""
        return Search(self.rpc).pages(search_query(**query), limit, page_size)

    def embedding_models(self) -> list[EmbeddingModelInfo]:
        """The app's embedding models: built in, ONNX, and those callers gave vectors of."""
        return Search(self.rpc).models()

    def input_embeddings(
        self, input_id: str, include_vectors: bool = False
    ) -> list[InputEmbeddingInfo]:
        """An input's embedding per model, with its state (and its vector when asked)."""
        return Search(self.rpc).embeddings(input_id, include_vectors)

    def search_job(self, job_id: str) -> SearchJobInfo:
        """An add-by-search job (`AddFromSearchResult.job`) as it is now."""
        return Search(self.rpc).job(job_id)

    def wait_search_job(
        self,
        job_id: str,
        timeout: float = 3600,
        show_progress: bool = False,
        progress: Progress | None = None,
    ) -> SearchJobInfo:
        """Waits until the job added every match (DONE) or raises SearchJobFailedError."""
        return Search(self.rpc).wait(job_id, timeout, reporter(show_progress, progress))
