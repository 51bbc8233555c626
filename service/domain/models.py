"""Domain records. Plain data: no transport or storage types."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class Visibility(enum.IntEnum):
    """Numeric values are the wire values of `Visibility.Gettable`."""

    PRIVATE = 10
    ORG = 30
    PUBLIC = 50


class SortField(enum.Enum):
    CREATED_AT = "created_at"
    MODIFIED_AT = "modified_at"
    ID = "id"


@dataclass(frozen=True)
class StoredBlob:
    """Bytes in the object store under a content-addressed key."""

    key: str
    sha256: str
    size: int
    content_type: str


@dataclass(frozen=True)
class CoverImage:
    """Either a stored image (`blob`) or an external reference (`url`)."""

    url: str = ""
    blob: StoredBlob | None = None
    width: int = 0
    height: int = 0
    format: str = ""
    color_mode: str = ""


@dataclass(frozen=True)
class Dataset:
    app_id: str
    id: str
    description: str = ""
    notes: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    visibility: Visibility = Visibility.PRIVATE
    cover: CoverImage | None = None
    default_filter: dict[str, Any] | None = None
    created_at: datetime | None = None
    modified_at: datetime | None = None
    revision: int = 1
    deleted_at: datetime | None = None
    purge_after: datetime | None = None

    @property
    def etag(self) -> str:
        return f"r{self.revision}"


@dataclass(frozen=True)
class DatasetStatistics:
    inputs_count: int = 0
    annotated_inputs_count: int = 0
    annotations_count: int = 0
    concept_counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetView:
    """A dataset as shown to a caller: with a download URL and statistics when asked."""

    dataset: Dataset
    cover_download_url: str = ""
    statistics: DatasetStatistics | None = None


@dataclass(frozen=True)
class DatasetListQuery:
    app_id: str
    sort_field: SortField
    descending: bool
    text: str
    limit: int
    # Sort value and id of the last row of the previous page (keyset pagination).
    after: tuple[Any, str] | None = None


@dataclass(frozen=True)
class ApiKey:
    id: str
    app_id: str
    lookup: str
    secret_hash: bytes
    description: str
    scopes: tuple[str, ...] = ("read", "write")
    created_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    key_id: str
    app_id: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class IdempotencyRecord:
    fingerprint: bytes
    response: bytes | None
