"""Search messages <-> the domain's search types: a SearchQuery as a SearchSpec (the
filter and the rank as the caller sent them; SearchService.prepare checks them against
the app), hits, embedding models and input embeddings as messages."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from datasetd.v1 import common_pb2, search_pb2
from google.protobuf import timestamp_pb2

from service.domain.embeddings import (
    EmbeddingModel,
    EmbeddingSource,
    EmbeddingState,
    GeoBox,
    GeoRadius,
    InputEmbedding,
    RankSpec,
    SearchFilter,
    SearchSpec,
)
from service.domain.errors import Violations
from service.domain.models import InputView, MediaType
from service.wire.inputs import input_to_proto
from service.wire.struct import struct_to_dict
from service.wire.timestamps import set_timestamp

_MEDIA_TYPES = {
    common_pb2.MEDIA_TYPE_IMAGE: MediaType.IMAGE,
    common_pb2.MEDIA_TYPE_VIDEO: MediaType.VIDEO,
    common_pb2.MEDIA_TYPE_AUDIO: MediaType.AUDIO,
    common_pb2.MEDIA_TYPE_TEXT: MediaType.TEXT,
}
MEDIA_TYPE_NUMBERS = {media: number for number, media in _MEDIA_TYPES.items()}
_ANNOTATED = {
    common_pb2.ANNOTATION_STATE_UNSPECIFIED: None,
    common_pb2.ANNOTATION_STATE_ANNOTATED: True,
    common_pb2.ANNOTATION_STATE_UNANNOTATED: False,
}
_SOURCES = {
    EmbeddingSource.BUILTIN: search_pb2.EMBEDDING_SOURCE_BUILTIN,
    EmbeddingSource.ONNX: search_pb2.EMBEDDING_SOURCE_ONNX,
    EmbeddingSource.CLIENT: search_pb2.EMBEDDING_SOURCE_CLIENT,
}
_STATES = {
    EmbeddingState.PENDING: search_pb2.EMBEDDING_STATE_PENDING,
    EmbeddingState.READY: search_pb2.EMBEDDING_STATE_READY,
    EmbeddingState.FAILED: search_pb2.EMBEDDING_STATE_FAILED,
}


def search_spec_from_proto(app_id: str, query: search_pb2.SearchQuery, field: str) -> SearchSpec:
    """The query as the domain takes it; `field` is the path of `query` in the request
    ("query", "search"). What cannot be mapped at all is refused here, every problem at
    once (INVALID_ARGUMENT); the ranges and the app's state are the domain's to check."""
    violations = Violations()
    media_types: list[MediaType] = []
    for index, number in enumerate(query.media_types):
        media = _MEDIA_TYPES.get(number)
        if media is None:
            violations.add(
                f"{field}.media_types[{index}]",
                "must be MEDIA_TYPE_IMAGE, MEDIA_TYPE_VIDEO, MEDIA_TYPE_AUDIO or MEDIA_TYPE_TEXT",
            )
        elif media not in media_types:
            media_types.append(media)
    if query.annotation_state not in _ANNOTATED:
        violations.add(
            f"{field}.annotation_state",
            "must be ANNOTATION_STATE_UNSPECIFIED, _ANNOTATED or _UNANNOTATED",
        )
    geo: GeoRadius | GeoBox | None = None
    if query.HasField("geo_radius") and query.HasField("geo_box"):
        violations.add(f"{field}.geo_box", "set at most one of geo_radius and geo_box")
    elif query.HasField("geo_radius"):
        circle = query.geo_radius
        geo = GeoRadius(circle.latitude, circle.longitude, circle.radius_km)
    elif query.HasField("geo_box"):
        box = query.geo_box
        geo = GeoBox(box.min_latitude, box.max_latitude, box.min_longitude, box.max_longitude)
    created_after = _time(violations, f"{field}.created_after", query, "created_after")
    created_before = _time(violations, f"{field}.created_before", query, "created_before")
    rank = _rank(violations, f"{field}.rank", query.rank) if query.HasField("rank") else None
    violations.raise_if_any()
    scope = query.scope
    return SearchSpec(
        filter=SearchFilter(
            app_id=app_id,
            dataset_id=scope.dataset_id or None,
            version_id=scope.version_id or None,
            concept_ids=tuple(query.concept_ids),
            negative_concept_ids=tuple(query.negative_concept_ids),
            metadata=struct_to_dict(query.metadata) if query.HasField("metadata") else None,
            media_types=tuple(media_types),
            annotated=_ANNOTATED.get(query.annotation_state),
            geo=geo,
            created_after=created_after,
            created_before=created_before,
        ),
        rank=rank,
    )


def _time(
    violations: Violations, field: str, query: search_pb2.SearchQuery, name: str
) -> datetime | None:
    if not query.HasField(name):  # type: ignore[arg-type]
        return None
    stamp: timestamp_pb2.Timestamp = getattr(query, name)
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        violations.add(field, "must be a timestamp between 0001-01-01 and 9999-12-31")
        return None


def _rank(violations: Violations, field: str, rank: search_pb2.Rank) -> RankSpec | None:
    target = rank.WhichOneof("target")
    spec = RankSpec(
        model_id=rank.model_id,
        min_score=rank.min_score if rank.HasField("min_score") else None,
    )
    if target == "input_id":
        return dataclasses.replace(spec, input_id=rank.input_id)
    if target == "image_bytes":
        return dataclasses.replace(spec, image=rank.image_bytes)
    if target == "text":
        return dataclasses.replace(spec, text=rank.text)
    if target == "vector":
        return dataclasses.replace(spec, vector=tuple(rank.vector.values))
    violations.add(field, "needs a target: set input_id, image_bytes, text or vector")
    return None


def hit_to_proto(view: InputView, score: float) -> search_pb2.SearchHit:
    return search_pb2.SearchHit(input=input_to_proto(view), score=score)


def model_to_proto(model: EmbeddingModel, embedded_count: int = 0) -> search_pb2.EmbeddingModel:
    return search_pb2.EmbeddingModel(
        id=model.id,
        dimension=model.dimension,
        media_types=[MEDIA_TYPE_NUMBERS[m] for m in _ordered(model.media_types)],
        accepts_text_queries=model.accepts_text_queries,
        source=_SOURCES[model.source],
        description=model.description,
        embedded_count=embedded_count,
    )


def input_embedding_to_proto(embedding: InputEmbedding) -> search_pb2.InputEmbedding:
    message = search_pb2.InputEmbedding(
        model_id=embedding.model_id,
        state=_STATES[embedding.state],
        error=embedding.error,
        vector=embedding.vector,
    )
    if embedding.updated_at is not None:
        set_timestamp(message.updated_at, embedding.updated_at)
    return message


def _ordered(media_types: Iterable[MediaType]) -> Sequence[MediaType]:
    order = list(MediaType)
    return sorted(media_types, key=order.index)
