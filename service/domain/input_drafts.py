"""An input as a caller hands it in (the draft), the per-item outcome of a batch, and the
rules of an input's fields that every way in (CreateInputs, UploadInput, ImportDataset)
applies."""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from service.domain.embeddings import MAX_DIMENSION, MAX_EMBEDDINGS_PER_INPUT
from service.domain.errors import FieldViolation, Violations
from service.domain.models import ClientVector, GeoPoint, InputView, MediaType, StoredBlob

EMBEDDING_MODEL_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_BATCH_INPUTS = 128
MAX_BATCH_BYTES = 128 * 1024 * 1024
MAX_IDS_PER_CALL = 1000
TITLE_MAX_CHARS = 512
URL_MAX_CHARS = 2048
# The most pixels an image may have, uploaded (read from its header) or declared by the
# caller for a URL image (data.image.image_info).
MAX_IMAGE_PIXELS = 85_000_000


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
class DraftEmbedding:
    """A vector of data.embeddings as the caller sent it; `num_dimensions` 0 is unset."""

    model_id: str
    vector: tuple[float, ...]
    num_dimensions: int = 0


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
    # Regions and frames sent with the input (CreateInputs), in the JSON form of Data:
    # stored as one annotation of the input, in the transaction that creates it.
    annotation: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Vectors of client embedding models (data.embeddings), stored with the input.
    embeddings: tuple[DraftEmbedding, ...] = ()
    # (width, height) of data.image.image_info as given (0: unset): the size of a URL
    # image the server does not read, so that its regions can be exported in pixels.
    image_size: tuple[int, int] | None = None

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


def check_geo(violations: Violations, field: str, geo: GeoPoint | None) -> None:
    if geo is None:
        return
    if not (math.isfinite(geo.longitude) and -180 <= geo.longitude <= 180):
        violations.add(f"{field}.longitude", f"must be -180..180 degrees, got {geo.longitude}")
    if not (math.isfinite(geo.latitude) and -90 <= geo.latitude <= 90):
        violations.add(f"{field}.latitude", f"must be -90..90 degrees, got {geo.latitude}")


def check_image_size(
    violations: Violations, field: str, size: tuple[int, int] | None, *, uploaded: bool
) -> None:
    """A caller's image_info: for URL images only, both sides positive, at most
    MAX_IMAGE_PIXELS."""
    if size is None:
        return
    if uploaded:
        violations.add(field, "is refused for uploaded bytes: the server reads the size from them")
        return
    width, height = size
    for name, value in (("width", width), ("height", height)):
        if value <= 0:
            violations.add(
                f"{field}.{name}",
                f"must be positive, got {value}" if value else "must be given with the other side",
            )
    if width > 0 and height > 0 and width * height > MAX_IMAGE_PIXELS:
        violations.add(
            field,
            f"image is {width}x{height}; at most {MAX_IMAGE_PIXELS:,} pixels are allowed",
        )


def check_url(violations: Violations, field: str, url: str) -> None:
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
        check_url(violations, f"{media_field}.url", draft.url)
    elif not inline:
        violations.add(media_field, f"is empty: set {media_type.value}.{inline_name} or .url")
    violations.raise_if_any()
    return inline, draft.url, f"{media_field}.{inline_name}"


def check_embeddings(
    violations: Violations, field: str, embeddings: Sequence[DraftEmbedding]
) -> list[ClientVector]:
    """The rules of data.embeddings that need no stored model (`field` names the list);
    the vectors, one per model."""
    if len(embeddings) > MAX_EMBEDDINGS_PER_INPUT:
        violations.add(
            field,
            f"at most {MAX_EMBEDDINGS_PER_INPUT} embeddings per input (one per model), "
            f"got {len(embeddings)}",
        )
    seen: set[str] = set()
    vectors = []
    for index, given in enumerate(embeddings):
        at = f"{field}[{index}]"
        if not EMBEDDING_MODEL_ID.match(given.model_id):
            violations.add(
                f"{at}.model_id",
                "is required: the embedding model the vector belongs to, 1..64 characters "
                f"of [A-Za-z0-9_.-], got {given.model_id[:80]!r}",
            )
        elif given.model_id in seen:
            violations.add(
                f"{at}.model_id", f"{given.model_id!r} repeats: an input has one vector per model"
            )
        seen.add(given.model_id)
        size = len(given.vector)
        if not 1 <= size <= MAX_DIMENSION:
            violations.add(f"{at}.vector", f"must have 1..{MAX_DIMENSION} values, got {size}")
        bad = next((i for i, v in enumerate(given.vector) if not math.isfinite(v)), None)
        if bad is not None:
            violations.add(f"{at}.vector", f"must be finite numbers; vector[{bad}] is not")
        elif size and not any(given.vector):
            violations.add(f"{at}.vector", "must not be all zeros (it has no direction)")
        if given.num_dimensions and given.num_dimensions != size:
            violations.add(
                f"{at}.num_dimensions",
                f"must be 0 or the number of values ({size}), got {given.num_dimensions}",
            )
        vectors.append(ClientVector(given.model_id, given.vector))
    return vectors
