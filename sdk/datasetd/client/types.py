"""The request and response types of `client.datasets`, with the names and fields of the
Datature Vi SDK's datasets reference (README "For Datature Vi users" maps each field).

Plain dataclasses: the client has no pydantic dependency. Times are Unix milliseconds, as
in Vi.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from service.client.progress import text_table


class DatasetType(StrEnum):
    """What a dataset is annotated for; declared in the dataset's metadata (`vi.type`)."""

    PHRASE_GROUNDING = "phrase-grounding"
    VQA = "vqa"


class DatasetContent(StrEnum):
    """The media of a dataset; declared in the dataset's metadata (`vi.content`)."""

    IMAGE = "Image"


class DatasetExportFormat(StrEnum):
    """Vi's export formats (both real server formats) and datasetd's native ones."""

    VI_FULL = "vi_full"
    VI_JSONL = "vi_jsonl"
    CLARIFAI_DATA_PROTOBUF = "clarifai_data_protobuf"
    CLARIFAI_DATA_JSON = "clarifai_data_json"
    COCO = "coco"


@dataclass(frozen=True)
class PaginationParams:
    """How many items a page holds (1..1000 for datasets; the server caps larger sizes)."""

    page_size: int = 50

    def __post_init__(self) -> None:
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int):
            raise ValueError(f"page_size must be an integer, not {self.page_size!r}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {self.page_size}")


@dataclass(frozen=True)
class DatasetExportOptions:
    """`normalized`: coordinates in 0..1 (True) or pixels; `split_ratio`: the share of
    inputs in split "train", the rest in "validation" (None: one split, "all")."""

    normalized: bool = True
    split_ratio: float | None = None

    def __post_init__(self) -> None:
        ratio = self.split_ratio
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1
        ):
            raise ValueError(f"split_ratio must be a number in (0, 1], not {ratio!r}")


@dataclass(frozen=True)
class DatasetExportSettings:
    format: DatasetExportFormat = DatasetExportFormat.VI_FULL
    options: DatasetExportOptions = field(default_factory=DatasetExportOptions)


@dataclass(frozen=True)
class ResourceCondition:
    """One condition a resource reached (Vi's `ResourceCondition`)."""

    condition: str
    status: str
    last_transition_time: int | None = None
    reason: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class ResourceMetadata:
    time_created: int | None = None
    last_updated: int | None = None
    # datasetd's own: the dataset version an export is of.
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetStatistic:
    asset_total: int = 0
    annotation_total: int = 0
    asset_annotated: int = 0
    tags_count: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetAccess:
    is_public: bool | None = None
    is_read_only: bool | None = None
    is_hidden: bool | None = None


@dataclass(frozen=True)
class AssetStatusDetail:
    description: str
    color: str
    create_date: int | None = None


@dataclass
class Dataset:
    """A dataset. A listed dataset fetches its statistics (GetDataset) when first read:
    ListDatasets leaves them out."""

    dataset_id: str
    name: str
    owner: str
    organization_id: str
    type: DatasetType | None
    content: DatasetContent | None
    create_date: int
    users: dict[str, str]
    tags: dict[str, int]
    status: int
    last_accessed: int | None
    is_locked: bool
    access: DatasetAccess
    asset_statuses: dict[str, AssetStatusDetail]
    self_link: str
    etag: str
    description: str | None
    loaded_statistic: DatasetStatistic | None = field(default=None, repr=False)
    load_statistic: Callable[[], DatasetStatistic] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def statistic(self) -> DatasetStatistic:
        if self.loaded_statistic is None:
            self.loaded_statistic = (
                self.load_statistic() if self.load_statistic else DatasetStatistic()
            )
        return self.loaded_statistic

    def info(self) -> None:
        """Prints a summary of the dataset."""
        stat = self.statistic
        rows = [
            ("id", self.dataset_id),
            ("organization", self.organization_id),
            ("type", self.type.value if self.type else "-"),
            ("content", self.content.value if self.content else "-"),
            ("assets", f"{stat.asset_total} ({stat.asset_annotated} annotated)"),
            ("annotations", str(stat.annotation_total)),
            ("locked", str(self.is_locked)),
            ("public / read-only / hidden", _flags(self.access)),
            ("created (Unix ms)", str(self.create_date)),
            ("last accessed (Unix ms)", str(self.last_accessed or "-")),
            ("description", self.description or "-"),
        ]
        if stat.tags_count:
            rows.append(("tags", json.dumps(stat.tags_count, sort_keys=True)))
        print(text_table(f"Dataset {self.name}", rows))


def _flags(access: DatasetAccess) -> str:
    return " / ".join(str(v) for v in (access.is_public, access.is_read_only, access.is_hidden))


@dataclass(frozen=True)
class DatasetExportDownloadUrl:
    url: str
    expires_at: int


@dataclass(frozen=True)
class DatasetExportSpec:
    format: DatasetExportFormat
    options: DatasetExportOptions


@dataclass(frozen=True)
class DatasetExportStatus:
    conditions: list[ResourceCondition]
    download_url: DatasetExportDownloadUrl | None


@dataclass(frozen=True)
class DatasetExport:
    organization_id: str
    dataset_id: str
    dataset_export_id: str
    spec: DatasetExportSpec
    status: DatasetExportStatus
    metadata: ResourceMetadata
    self_link: str
    etag: str
    # datasetd's own: the version the export is of.
    version_id: str = ""


@dataclass(frozen=True)
class DatasetDownloadResult:
    save_dir: Path
    size_mb: float
    splits: list[str]
    assets_count: int
    annotations_count: int
    # datasetd's own: what was downloaded.
    format: str = ""
    dataset_export_id: str = ""
    version_id: str = ""
    split_counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        rows = [
            ("format", self.format),
            ("export", self.dataset_export_id),
            ("version", self.version_id),
            ("size", f"{self.size_mb:.2f} MB"),
            ("assets", str(self.assets_count)),
            ("annotations", str(self.annotations_count)),
        ]
        rows += [(f"split {name}", str(n)) for name, n in self.split_counts.items()]
        return text_table(f"Downloaded into {self.save_dir}", rows)

    def info(self) -> None:
        print(self.summary())


@dataclass(frozen=True)
class DeletedDatasetStatus:
    conditions: list[ResourceCondition]


@dataclass(frozen=True)
class DeletedDataset:
    kind: str
    user: str
    organization_id: str
    dataset_id: str
    self_link: str
    etag: str
    metadata: ResourceMetadata
    status: DeletedDatasetStatus


@dataclass(frozen=True)
class BulkAssetDeletionSpec:
    filter: str | dict[str, Any] | None
    metadata_query: str | None = None
    rule_query: str | None = None
    strict_query: bool | None = None


@dataclass(frozen=True)
class BulkAssetDeletionStatus:
    conditions: list[ResourceCondition]
    # datasetd's own: inputs the filter matched and inputs deleted.
    matched: int = 0
    deleted: int = 0


@dataclass(frozen=True)
class BulkAssetDeletionSession:
    kind: str
    organization_id: str
    dataset_id: str
    delete_many_assets_session_id: str
    self_link: str
    etag: str
    metadata: ResourceMetadata
    spec: BulkAssetDeletionSpec
    status: BulkAssetDeletionStatus
