"""Embeddings and search: the data the search use cases, the embedding job and their
repositories exchange, and the ports they need.

A vector space is an `EmbeddingModel`: built in (computed by datasetd, no weights to
download), ONNX (DATASETD_EMBEDDER_ONNX) or client (callers give the vectors in
`data.embeddings`; the first vector of a model id in an app sets its dimension). An
input has at most one current vector per model; a replaced vector is kept while a
dataset version refers to it, so that a version is searched as it was captured.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

# ClientVector lives beside InputView, which carries an input's client vectors.
from service.domain.models import ClientVector as ClientVector  # noqa: PLC0414 (re-exported)
from service.domain.models import Input, MediaType

# Largest dimension of a vector: a row of the embeddings table must fit in a page with
# the vector stored inline (STORAGE PLAIN, see performance-notes.md), and HNSW indexes
# take at most 2,000 dimensions.
MAX_DIMENSION = 1536
# Vectors one input may carry in data.embeddings (one per model).
MAX_EMBEDDINGS_PER_INPUT = 8
# Above this many candidates a ranked search walks the model's HNSW index (iterative
# scan); at or below it, it computes every candidate's distance exactly (recall 1), which
# is what keeps the recall of selective filters.
EXACT_SCAN_LIMIT = 20_000
# AddDatasetInputs by search adds up to this many matches in the call; more run as a job.
INLINE_ADD_LIMIT = 10_000


class EmbeddingSource(enum.Enum):
    BUILTIN = "builtin"
    ONNX = "onnx"
    CLIENT = "client"


@dataclass(frozen=True)
class EmbeddingModel:
    """A vector space. `app_id` is "" for the installation's models (built in, ONNX),
    which every app sees; `number` is the storage key (index names, partial predicates)."""

    app_id: str
    id: str
    number: int
    dimension: int
    media_types: frozenset[MediaType]
    accepts_text_queries: bool
    source: EmbeddingSource
    description: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """An installation model as its embedder describes it; `fingerprint` changes when
    its vectors would (new weights, new preprocessing), which re-embeds every input."""

    id: str
    dimension: int
    media_types: frozenset[MediaType]
    accepts_text_queries: bool
    source: EmbeddingSource
    description: str
    fingerprint: str


class EmbeddingState(enum.Enum):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class InputEmbedding:
    model_id: str
    state: EmbeddingState
    error: str = ""
    vector: tuple[float, ...] = ()
    updated_at: datetime | None = None


@dataclass(frozen=True)
class GeoRadius:
    latitude: float
    longitude: float
    radius_km: float


@dataclass(frozen=True)
class GeoBox:
    min_latitude: float
    max_latitude: float
    min_longitude: float
    max_longitude: float


@dataclass(frozen=True)
class SearchFilter:
    """Which inputs a search, an add-by-search or a delete-by-search is about. `dataset_id`
    alone scopes to the dataset's current members; with `version_id`, to the version's
    members and the content it captured. Every set condition must hold."""

    app_id: str
    dataset_id: str | None = None
    version_id: str | None = None
    concept_ids: tuple[str, ...] = ()
    negative_concept_ids: tuple[str, ...] = ()
    metadata: dict[str, Any] | None = None
    media_types: tuple[MediaType, ...] = ()
    annotated: bool | None = None
    geo: GeoRadius | GeoBox | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


@dataclass(frozen=True)
class Ranking:
    """Order by cosine similarity to `vector` in `model`'s space. `exclude_input_id` is the
    input ranked against (never its own hit); `min_score` drops hits below it."""

    model: EmbeddingModel
    vector: tuple[float, ...]
    min_score: float | None = None
    exclude_input_id: str | None = None


@dataclass(frozen=True)
class SearchCursor:
    """Where the previous page ended: the last hit's score (ranked searches) and its
    input's seq (creation order, the tie-break)."""

    seq: int
    score: float | None = None


@dataclass(frozen=True)
class SearchHit:
    input: Input
    score: float
    seq: int


@dataclass(frozen=True)
class DuplicateGroup:
    input_ids: tuple[str, ...]
    exact: bool
    min_similarity: float


@dataclass(frozen=True)
class PendingInput:
    """An input the embedding job still has to embed with one model: its media (stored
    original or text) as the job reads it."""

    app_id: str
    input_id: str
    media_type: MediaType
    blob_key: str | None
    text: str | None
    source_url: str


class EmbeddingRepository(Protocol):
    """Models, vectors and states (storage/embeddings.py)."""

    async def sync_installation_models(self, specs: Sequence[ModelSpec]) -> list[EmbeddingModel]:
        """Registers the installation's models, which are exactly `specs`: others are
        retired (not listed, searched nor pending; their vectors stay) until configured
        again. A model whose fingerprint changed has its current vectors and failures
        cleared, so that the job embeds every input again."""
        ...

    async def models(self, app_id: str) -> list[EmbeddingModel]:
        """The installation's models and the app's client models, by id."""
        ...

    async def model(self, app_id: str, model_id: str) -> EmbeddingModel | None: ...

    async def client_model(self, app_id: str, model_id: str, dimension: int) -> EmbeddingModel:
        """The app's client model, created with this dimension when it does not exist yet
        (the caller checks the dimension of an existing one)."""
        ...

    async def embedded_counts(self, app_id: str) -> dict[int, int]:
        """Inputs of the app with a current vector, by model number."""
        ...

    async def put(
        self, app_id: str, input_id: str, model: EmbeddingModel, vector: Sequence[float]
    ) -> None:
        """Makes `vector` the input's current vector of the model (the previous one is
        marked replaced) and clears a recorded failure."""
        ...

    async def put_many(
        self, model: EmbeddingModel, vectors: Sequence[tuple[str, str, Sequence[float]]]
    ) -> None:
        """`put` for many (app_id, input_id, vector) in one statement."""
        ...

    async def record_failures(
        self, model: EmbeddingModel, failures: Sequence[tuple[str, str, str]]
    ) -> None:
        """(app_id, input_id, error) of inputs the model could not embed."""
        ...

    async def client_vectors(
        self, app_id: str, input_ids: Sequence[str]
    ) -> dict[str, list[ClientVector]]:
        """The current client-model vectors of these inputs (what GetInput returns)."""
        ...

    async def vector_of(
        self,
        app_id: str,
        input_id: str,
        model: EmbeddingModel,
        version: tuple[str, str] | None = None,
    ) -> tuple[float, ...] | None:
        """The input's current vector of the model, or the one a version (dataset id,
        version id) captured."""
        ...

    async def states(self, app_id: str, input_id: str, *, vectors: bool) -> list[InputEmbedding]:
        """One per installation model that embeds the input's media type and per model with
        a vector of the input, by model id."""
        ...

    async def pending(self, model: EmbeddingModel, limit: int) -> list[PendingInput]:
        """Inputs (of any app) of the model's media types with neither a current vector of
        it nor a recorded failure, oldest first."""
        ...

    async def fail_unfetched(self, model: EmbeddingModel, error: str) -> int:
        """Records `error` as the failure of every pending media input of the model that
        only references a URL (no stored original); how many."""
        ...

    async def apps_with_pending(self, model: EmbeddingModel) -> list[str]: ...

    async def ensure_indexes(self) -> None:
        """Builds the HNSW index of every model that has none (outside a transaction)."""
        ...

    async def collect_replaced(self, limit: int) -> int:
        """Deletes replaced vectors no version refers to."""
        ...


class SearchRepository(Protocol):
    """The search queries (storage/search.py)."""

    async def search(
        self,
        query: SearchFilter,
        ranking: Ranking | None,
        after: SearchCursor | None,
        limit: int,
    ) -> list[SearchHit]:
        """One page of hits: by score then seq when ranked, by seq otherwise. Exact over
        the candidates when they are at most EXACT_SCAN_LIMIT (and always in a version
        scope), through the model's HNSW index with an iterative scan otherwise."""
        ...

    async def matching_ids(
        self, query: SearchFilter, ranking: Ranking | None, after_seq: int | None, limit: int
    ) -> list[tuple[int, str]]:
        """(seq, input id) of matching inputs by seq; a ranking only filters (min_score)."""
        ...

    async def count(self, query: SearchFilter, ranking: Ranking | None) -> int: ...

    async def exact_duplicates(self, query: SearchFilter) -> list[DuplicateGroup]:
        """Groups of inputs with the same stored original or the same text."""
        ...

    async def similar_pairs(
        self, query: SearchFilter, model: EmbeddingModel, threshold: float, neighbours: int
    ) -> tuple[list[tuple[str, str, float]], int, int]:
        """Pairs (input id, input id, similarity ≥ threshold) among the scope's inputs, each
        input compared with its `neighbours` nearest; with the number of inputs scanned and
        of those without a vector of the model."""
        ...


class Embedder(Protocol):
    """Computes vectors of one installation model (service/embedders). CPU-bound: callers
    run it off the event loop."""

    spec: ModelSpec

    def embed_images(self, images: Sequence[bytes]) -> list[list[float] | str]:
        """One unit vector per image, or an error message for an image it cannot decode."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> list[list[float] | str]:
        """One unit vector per text (only when the model embeds texts or text queries)."""
        ...


@dataclass(frozen=True)
class RankSpec:
    """A rank as the caller asked for it (exactly one target set); the search use case
    resolves it into a Ranking."""

    input_id: str | None = None
    image: bytes | None = None
    text: str | None = None
    vector: tuple[float, ...] | None = None
    model_id: str = ""
    min_score: float | None = None


@dataclass(frozen=True)
class SearchSpec:
    """A query as the caller sent it: the filter (not yet checked against the app's
    datasets and versions) and the rank."""

    filter: SearchFilter
    rank: RankSpec | None = None
