"""The installation's embedding models: the built-in ones (numpy + Pillow, no weights)
and an operator's ONNX image model (DATASETD_EMBEDDER_ONNX).

Each implements the domain's `Embedder` port; the embedding job (domain/embedding_job.py)
and the search use case call them off the event loop."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from service.config import Config, ConfigError
from service.domain.embeddings import Embedder, EmbeddingSource
from service.domain.models import MediaType
from service.embedders.builtin import BuiltinImageEmbedder, BuiltinTextEmbedder

__all__ = [
    "by_id",
    "default_embedder",
    "installation_embedders",
]


def installation_embedders(config: Config) -> list[Embedder]:
    """The built-in models unless DATASETD_BUILTIN_EMBEDDERS=off, and the ONNX model when
    one is configured (loaded and checked now: ConfigError says what is wrong)."""
    embedders: list[Embedder] = []
    if config.builtin_embedders:
        embedders += [BuiltinImageEmbedder(), BuiltinTextEmbedder()]
    if config.embedder_onnx:
        from service.embedders.onnx import OnnxImageEmbedder, settings_path

        model = Path(config.embedder_onnx)
        onnx = OnnxImageEmbedder(model, settings_path(model, config.embedder_onnx_settings))
        taken = {embedder.spec.id for embedder in embedders}
        if onnx.spec.id in taken:
            raise ConfigError(
                f"the ONNX model's model_id {onnx.spec.id!r} is the id of a built-in model; "
                "choose another in its settings"
            )
        embedders.append(onnx)
    return embedders


def by_id(embedders: Sequence[Embedder]) -> dict[str, Embedder]:
    return {embedder.spec.id: embedder for embedder in embedders}


def default_embedder(embedders: Sequence[Embedder], media_type: MediaType) -> Embedder | None:
    """The model that ranks a query of this media type when the caller names none: the
    ONNX model before the built-in one (it is what the operator installed on purpose)."""
    order = {EmbeddingSource.ONNX: 0, EmbeddingSource.BUILTIN: 1, EmbeddingSource.CLIENT: 2}
    candidates = [e for e in embedders if media_type in e.spec.media_types]
    if not candidates and media_type is MediaType.TEXT:
        candidates = [e for e in embedders if e.spec.accepts_text_queries]
    candidates.sort(key=lambda e: order[e.spec.source])
    return candidates[0] if candidates else None
