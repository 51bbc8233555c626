"""Search use cases: a query checked against the app (`prepare`, which AddDatasetInputs
and DeleteDatasetInputsByFilter by search share), one page of hits, the app's embedding
models and an input's embeddings."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from typing import Protocol

from service.domain.auth import Permission, authorize
from service.domain.embeddings import (
    MAX_DIMENSION,
    Embedder,
    EmbeddingModel,
    EmbeddingRepository,
    EmbeddingSource,
    EmbeddingState,
    GeoBox,
    GeoRadius,
    InputEmbedding,
    Ranking,
    RankSpec,
    SearchCursor,
    SearchFilter,
    SearchHit,
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
from service.domain.inputs import InputService
from service.domain.models import ClientVector, InputView, MediaType, Principal, VersionStatus
from service.domain.ports import (
    InputRepository,
    MembershipRepository,
    TransactionManager,
    VersionRepository,
)
from service.domain.validation import check_concept_ids, check_id, check_metadata, require_ids

# Half the earth's circumference: a larger circle is the whole earth.
MAX_RADIUS_KM = 20_038.0
MAX_TEXT_QUERY_CHARS = 4096
MAX_IMAGE_QUERY_BYTES = 20 * 1024 * 1024
MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MODEL_ID_RULE = "must be 1..64 characters of [A-Za-z0-9_.-]"
# How long an app's embedding models are reused by searches: a model's row never changes
# but for an installation model reconfigured at a replica's start; a model named by a
# query and missing from them is looked up again at once (a client model just made).
MODELS_CACHE_SECONDS = 5.0
MODELS_CACHE_APPS = 10_000
_STATE_WORDS = {
    EmbeddingState.PENDING: "is still being embedded (state PENDING); retry once it is READY",
    EmbeddingState.FAILED: "could not be embedded (state FAILED)",
}


@dataclass(frozen=True)
class SearchPage:
    """Hits with their inputs as GetInput shows them, and where the next page starts
    (None on the last page)."""

    hits: list[tuple[InputView, float]]
    next: SearchCursor | None


@dataclass(frozen=True)
class FoundHit:
    """A hit with its input's current client vectors (data.embeddings), read with it."""

    hit: SearchHit
    vectors: tuple[ClientVector, ...] = ()


class SearchPages(SearchRepository, Protocol):
    async def page(
        self,
        query: SearchFilter,
        ranking: Ranking | None,
        after: SearchCursor | None,
        limit: int,
        *,
        vectors: bool,
        guarded: bool,
    ) -> list[FoundHit]:
        """`search` in one statement, each hit with its input's client vectors when
        `vectors`; `guarded`: no hits unless the scope's dataset is live and its version
        READY (the caller tells why a page is empty)."""
        ...


@dataclass(frozen=True)
class ModelCount:
    model: EmbeddingModel
    embedded_count: int


@dataclass(frozen=True)
class SearchService:
    embeddings: EmbeddingRepository
    repository: SearchPages
    inputs: InputRepository
    members: MembershipRepository
    versions: VersionRepository
    tx: TransactionManager
    # The views of hits: download URLs and client vectors, as GetInput shows them.
    views: InputService
    # The installation's embedders (built in, ONNX), by model id: image and text ranks
    # are embedded with them on the request path.
    embedders: Mapping[str, Embedder]
    # app id -> (when read, its models): see MODELS_CACHE_SECONDS.
    _models: dict[str, tuple[float, list[EmbeddingModel]]] = dataclass_field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    # --- the query -------------------------------------------------------------------------

    async def prepare(
        self, principal: Principal, app_id: str, spec: SearchSpec, *, field: str = "query"
    ) -> tuple[SearchFilter, Ranking | None]:
        """The query checked against the app: its dataset and version exist (the version
        READY), its rank resolved into a vector of a known model. `field` is the path of
        the query in the request, for the errors. Reads only."""
        query = _checked(principal, app_id, spec, field)
        # Independent reads, each one statement: no snapshot needed to hold them together
        # (a dataset deleted meanwhile gives an empty page, as it would a moment later).
        await self._check_scope(app_id, query, field)
        return query, await self._ranking(app_id, query, spec.rank, field)

    async def _ranking(
        self, app_id: str, query: SearchFilter, rank: RankSpec | None, field: str
    ) -> Ranking | None:
        if rank is None:
            return None
        model, target = await self._resolve(app_id, query, rank, f"{field}.rank")
        if isinstance(target, tuple):
            vector = target
        else:
            vector = await self._embed(model, rank, f"{field}.rank")
        return Ranking(
            model=model,
            vector=vector,
            min_score=rank.min_score,
            exclude_input_id=rank.input_id,
        )

    async def _app_models(self, app_id: str, *, fresh: bool = False) -> list[EmbeddingModel]:
        now = time.monotonic()
        cached = self._models.get(app_id)
        if cached is not None and not fresh and now - cached[0] < MODELS_CACHE_SECONDS:
            return cached[1]
        models = await self.embeddings.models(app_id)
        if len(self._models) >= MODELS_CACHE_APPS:
            self._models.clear()
        self._models[app_id] = (now, models)
        return models

    async def _named(
        self, models: Sequence[EmbeddingModel], model_id: str, app_id: str, field: str
    ) -> EmbeddingModel:
        """The model `model_id`, read again if the app's models at hand lack it."""
        for model in models:
            if model.id == model_id:
                return model
        return _named(await self._app_models(app_id, fresh=True), model_id, app_id, field)

    async def _check_scope(self, app_id: str, query: SearchFilter, field: str) -> None:
        if query.dataset_id is None:
            return
        if not await self.members.live_datasets(app_id, [query.dataset_id], lock=False):
            error = NotFound.in_app("dataset", app_id, query.dataset_id)
            raise NotFound(
                error.message,
                reason=error.reason,
                metadata=error.metadata,
                violations=[FieldViolation(f"{field}.scope.dataset_id", "no such dataset")],
            )
        if query.version_id is None:
            return
        version = await self.versions.get(app_id, query.dataset_id, query.version_id)
        if version is None:
            error = NotFound.within("version", query.version_id, "dataset", query.dataset_id)
            raise NotFound(
                error.message,
                reason=error.reason,
                metadata=error.metadata,
                violations=[FieldViolation(f"{field}.scope.version_id", "no such version")],
            )
        if version.status is not VersionStatus.READY:
            raise FailedPrecondition(
                f"version {query.version_id!r} is {version.status.value}; only a READY "
                "version can be searched",
                reason="VERSION_NOT_READY",
                metadata={"status": version.status.value},
                violations=[
                    FieldViolation(f"{field}.scope.version_id", f"is {version.status.value}")
                ],
            )

    async def _resolve(
        self, app_id: str, query: SearchFilter, rank: RankSpec, field: str
    ) -> tuple[EmbeddingModel, tuple[float, ...] | None]:
        """The model of the rank, and its vector when it needs no embedding (a given
        vector, an input's)."""
        models = await self._app_models(app_id)
        if rank.input_id is not None:
            return await self._input_target(app_id, query, rank, models, field)
        if rank.vector is not None:
            model = await self._named(models, rank.model_id, app_id, f"{field}.model_id")
            _check_vector(rank.vector, model, f"{field}.vector.values")
            return model, rank.vector
        if rank.text is not None:
            model = (
                await self._named(models, rank.model_id, app_id, f"{field}.model_id")
                if rank.model_id
                else _default(models, MediaType.TEXT, field, text=True)
            )
            if not model.accepts_text_queries or model.id not in self.embedders:
                raise InvalidArgument.field(
                    f"{field}.text",
                    f"model {model.id!r} cannot embed a text query; models that can: "
                    + _listed(m.id for m in models if m.accepts_text_queries),
                    reason="MODEL_REFUSES_TEXT",
                )
            return model, None
        model = (
            await self._named(models, rank.model_id, app_id, f"{field}.model_id")
            if rank.model_id
            else _default(models, MediaType.IMAGE, field, text=False)
        )
        if MediaType.IMAGE not in model.media_types or model.id not in self.embedders:
            raise InvalidArgument.field(
                f"{field}.image_bytes",
                f"model {model.id!r} cannot embed images; models that can: "
                + _listed(
                    m.id
                    for m in models
                    if MediaType.IMAGE in m.media_types and m.id in self.embedders
                ),
                reason="MODEL_REFUSES_IMAGES",
            )
        return model, None

    async def _input_target(
        self,
        app_id: str,
        query: SearchFilter,
        rank: RankSpec,
        models: Sequence[EmbeddingModel],
        field: str,
    ) -> tuple[EmbeddingModel, tuple[float, ...]]:
        assert rank.input_id is not None
        input_id = rank.input_id
        found = await self.inputs.get_many(app_id, [input_id])
        version = (
            (query.dataset_id, query.version_id)
            if query.dataset_id is not None and query.version_id is not None
            else None
        )
        if rank.model_id:
            model = await self._named(models, rank.model_id, app_id, f"{field}.model_id")
        elif found:
            model = _default(models, found[0].media_type, field, text=False)
        else:
            model = None
        vector = None
        if model is not None and version is not None:
            # A version is searched as captured: the input's vector then (it may be
            # deleted or re-embedded since).
            vector = await self.embeddings.vector_of(app_id, input_id, model, version)
        elif version is not None:
            # Deleted since the version: the installation model the version has a vector
            # of (only the models of its media type embedded it), in the default order.
            for candidate in _installed(models):
                vector = await self.embeddings.vector_of(app_id, input_id, candidate, version)
                if vector is not None:
                    model = candidate
                    break
        if vector is None and not found:
            raise NotFound(
                f"input {input_id!r} not found in app {app_id!r}",
                reason="INPUT_NOT_FOUND",
                metadata={"input_id": input_id},
                violations=[FieldViolation(f"{field}.input_id", f"no input {input_id!r}")],
            )
        assert model is not None
        if vector is None:
            vector = await self.embeddings.vector_of(app_id, input_id, model)
        if vector is None:
            states = {
                s.model_id: s for s in await self.embeddings.states(app_id, input_id, vectors=False)
            }
            state = states.get(model.id)
            if state is None:
                why = f"has no embedding of model {model.id!r} (it does not embed its media)"
            else:
                why = _STATE_WORDS.get(state.state, f"has no vector of model {model.id!r}")
                if state.error:
                    why += f": {state.error}"
            raise FailedPrecondition(
                f"input {input_id!r} {why}",
                reason="INPUT_NOT_EMBEDDED",
                metadata={
                    "input_id": input_id,
                    "model_id": model.id,
                    "state": state.state.name if state is not None else "NONE",
                },
                violations=[FieldViolation(f"{field}.input_id", why)],
            )
        return model, vector

    async def _embed(self, model: EmbeddingModel, rank: RankSpec, field: str) -> tuple[float, ...]:
        embedder = self.embedders[model.id]
        if rank.text is not None:
            (result,) = await asyncio.to_thread(embedder.embed_texts, [rank.text])
            target = f"{field}.text"
        else:
            assert rank.image is not None
            (result,) = await asyncio.to_thread(embedder.embed_images, [rank.image])
            target = f"{field}.image_bytes"
        if isinstance(result, str):
            raise InvalidArgument.field(target, f"cannot be embedded: {result}")
        return tuple(result)

    # --- the use cases ---------------------------------------------------------------------

    async def search(
        self,
        principal: Principal,
        app_id: str,
        spec: SearchSpec,
        after: SearchCursor | None,
        limit: int,
    ) -> SearchPage:
        """`prepare`'s checks, with the scope checked by the page's statement itself: only
        an empty page (or a query refused) costs the reads that tell why."""
        query = _checked(principal, app_id, spec, "query")
        try:
            ranking = await self._ranking(app_id, query, spec.rank, "query")
        except DomainError:
            # A missing dataset or version is the error to report, as `prepare` does.
            await self._check_scope(app_id, query, "query")
            raise
        # A version's hits show what it captured: no current client vectors with them.
        vectors = query.version_id is None and self.views.embeddings is not None
        found = await self.repository.page(
            query, ranking, after, limit + 1, vectors=vectors, guarded=True
        )
        if not found:
            await self._check_scope(app_id, query, "query")
        more = len(found) > limit
        found = found[:limit]
        views = await self.views.views([f.hit.input for f in found], embeddings=False)
        if vectors:
            views = [replace(v, embeddings=f.vectors) for v, f in zip(views, found, strict=True)]
        last = found[-1].hit if more and found else None
        cursor = (
            None
            if last is None
            else SearchCursor(seq=last.seq, score=last.score if ranking is not None else None)
        )
        return SearchPage([(v, f.hit.score) for v, f in zip(views, found, strict=True)], cursor)

    async def models(self, principal: Principal, app_id: str) -> list[ModelCount]:
        authorize(principal, app_id, Permission.READ)
        async with self.tx.read_transaction():
            models = await self.embeddings.models(app_id)
            counts = await self.embeddings.embedded_counts(app_id)
        return [ModelCount(m, counts.get(m.number, 0)) for m in models]

    async def input_embeddings(
        self, principal: Principal, app_id: str, input_id: str, *, vectors: bool
    ) -> list[InputEmbedding]:
        authorize(principal, app_id, Permission.READ)
        require_ids(("input_id", input_id))
        async with self.tx.read_transaction():
            if not await self.inputs.get_many(app_id, [input_id]):
                raise NotFound.in_app("input", app_id, input_id)
            return await self.embeddings.states(app_id, input_id, vectors=vectors)


# --- the rules (pure) ------------------------------------------------------------------------


def _checked(principal: Principal, app_id: str, spec: SearchSpec, field: str) -> SearchFilter:
    """The query's filter, once the caller may read the app and every rule that needs no
    database holds."""
    authorize(principal, app_id, Permission.READ)
    violations = Violations()
    check_filter(violations, field, spec.filter)
    if spec.rank is not None:
        check_rank(violations, f"{field}.rank", spec.rank)
    violations.raise_if_any()
    return spec.filter


def check_filter(violations: Violations, field: str, query: SearchFilter) -> None:
    """Every rule of a filter that needs no database."""
    scope = f"{field}.scope"
    if query.dataset_id is not None:
        check_id(violations, f"{scope}.dataset_id", query.dataset_id)
    if query.version_id is not None:
        if query.dataset_id is None:
            violations.add(f"{scope}.version_id", "needs scope.dataset_id (its dataset)")
        check_id(violations, f"{scope}.version_id", query.version_id)
    if query.concept_ids:
        check_concept_ids(violations, f"{field}.concept_ids", list(query.concept_ids))
    if query.negative_concept_ids:
        negative = list(query.negative_concept_ids)
        check_concept_ids(violations, f"{field}.negative_concept_ids", negative)
    if query.metadata is not None:
        check_metadata(violations, f"{field}.metadata", query.metadata)
    if isinstance(query.geo, GeoRadius):
        circle = f"{field}.geo_radius"
        _latitude(violations, f"{circle}.latitude", query.geo.latitude)
        _longitude(violations, f"{circle}.longitude", query.geo.longitude)
        radius = query.geo.radius_km
        if not (math.isfinite(radius) and 0 < radius <= MAX_RADIUS_KM):
            violations.add(
                f"{circle}.radius_km",
                f"must be greater than 0 and at most {MAX_RADIUS_KM:g} km, got {radius}",
            )
    elif isinstance(query.geo, GeoBox):
        _check_box(violations, f"{field}.geo_box", query.geo)
    if (
        query.created_after is not None
        and query.created_before is not None
        and query.created_after >= query.created_before
    ):
        violations.add(
            f"{field}.created_before",
            f"must be later than created_after ({query.created_after.isoformat()})",
        )


def check_rank(violations: Violations, field: str, rank: RankSpec) -> None:
    """Every rule of a rank that needs no database or model."""
    targets = [
        name
        for name, value in (
            ("input_id", rank.input_id),
            ("image_bytes", rank.image),
            ("text", rank.text),
            ("vector", rank.vector),
        )
        if value is not None
    ]
    if len(targets) != 1:
        violations.add(field, "needs exactly one target: input_id, image_bytes, text or vector")
    if rank.model_id and not MODEL_ID_PATTERN.match(rank.model_id):
        violations.add(f"{field}.model_id", f"{MODEL_ID_RULE}, got {rank.model_id[:80]!r}")
    if rank.input_id is not None:
        check_id(violations, f"{field}.input_id", rank.input_id)
    if rank.text is not None and not 1 <= len(rank.text) <= MAX_TEXT_QUERY_CHARS:
        violations.add(
            f"{field}.text", f"must be 1..{MAX_TEXT_QUERY_CHARS} characters, got {len(rank.text)}"
        )
    if rank.image is not None and not 1 <= len(rank.image) <= MAX_IMAGE_QUERY_BYTES:
        violations.add(
            f"{field}.image_bytes",
            f"must be 1..{MAX_IMAGE_QUERY_BYTES} bytes of an image, got {len(rank.image)}",
        )
    if rank.vector is not None:
        if not rank.model_id:
            violations.add(f"{field}.model_id", "is required with a vector: the model it is of")
        values = f"{field}.vector.values"
        if not 1 <= len(rank.vector) <= MAX_DIMENSION:
            violations.add(values, f"must have 1..{MAX_DIMENSION} values, got {len(rank.vector)}")
        bad = [i for i, v in enumerate(rank.vector) if not math.isfinite(v)]
        if bad:
            violations.add(values, f"must be finite numbers; values[{bad[0]}] is not")
        elif rank.vector and not any(rank.vector):
            violations.add(values, "must not be all zeros (a zero vector has no direction)")
    if rank.min_score is not None and not (
        math.isfinite(rank.min_score) and -1 <= rank.min_score <= 1
    ):
        violations.add(f"{field}.min_score", f"must be -1..1 (cosine), got {rank.min_score}")


def _latitude(violations: Violations, field: str, value: float) -> None:
    if not (math.isfinite(value) and -90 <= value <= 90):
        violations.add(field, f"must be -90..90 degrees, got {value}")


def _longitude(violations: Violations, field: str, value: float) -> None:
    if not (math.isfinite(value) and -180 <= value <= 180):
        violations.add(field, f"must be -180..180 degrees, got {value}")


def _check_box(violations: Violations, field: str, box: GeoBox) -> None:
    _latitude(violations, f"{field}.min_latitude", box.min_latitude)
    _latitude(violations, f"{field}.max_latitude", box.max_latitude)
    _longitude(violations, f"{field}.min_longitude", box.min_longitude)
    _longitude(violations, f"{field}.max_longitude", box.max_longitude)
    if box.min_latitude > box.max_latitude:
        violations.add(
            f"{field}.min_latitude",
            f"must be at most max_latitude ({box.max_latitude}), got {box.min_latitude}",
        )
    if box.min_longitude > box.max_longitude:
        violations.add(
            f"{field}.min_longitude",
            f"must be at most max_longitude ({box.max_longitude}), got {box.min_longitude}; "
            "a box across the antimeridian is two searches",
        )


def _check_vector(vector: Sequence[float], model: EmbeddingModel, field: str) -> None:
    if len(vector) != model.dimension:
        raise InvalidArgument.field(
            field,
            f"must have {model.dimension} values (the dimension of model {model.id!r}), "
            f"got {len(vector)}",
            reason="WRONG_DIMENSION",
        )


def _listed(ids: Iterable[str]) -> str:
    names = sorted(set(ids))
    return ", ".join(repr(n) for n in names) if names else "none"


def _named(
    models: Sequence[EmbeddingModel], model_id: str, app_id: str, field: str
) -> EmbeddingModel:
    for model in models:
        if model.id == model_id:
            return model
    known = _listed(m.id for m in models)
    raise NotFound(
        f"embedding model {model_id!r} not found in app {app_id!r}; known models: {known}",
        reason="EMBEDDING_MODEL_NOT_FOUND",
        metadata={"model_id": model_id},
        violations=[FieldViolation(field, f"no model {model_id!r}; known: {known}")],
    )


def _default(
    models: Sequence[EmbeddingModel], media_type: MediaType, field: str, *, text: bool
) -> EmbeddingModel:
    """The installation's model for a media type: the configured ONNX model before the
    built-in one; for a text query, a text model before one that only takes text queries."""
    installed = _installed(models)
    candidates = [m for m in installed if media_type in m.media_types]
    if not candidates and text:
        candidates = [m for m in installed if m.accepts_text_queries]
    if not candidates:
        raise FailedPrecondition(
            f"no embedding model of this installation embeds {media_type.value} inputs; "
            f"name one in {field}.model_id (see ListEmbeddingModels)",
            reason="NO_EMBEDDING_MODEL",
            violations=[FieldViolation(f"{field}.model_id", "is required here")],
        )
    return candidates[0]


def _installed(models: Sequence[EmbeddingModel]) -> list[EmbeddingModel]:
    """The installation's models, the configured ONNX one first."""
    order = {EmbeddingSource.ONNX: 0, EmbeddingSource.BUILTIN: 1}
    installed = [m for m in models if m.source is not EmbeddingSource.CLIENT]
    return sorted(installed, key=lambda m: order[m.source])
