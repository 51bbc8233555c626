"""Domain records. Plain data: no transport or storage types."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
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
    # The projects the dataset is attached to, sorted (read only: kept by ProjectService).
    project_ids: tuple[str, ...] = ()
    display_name: str = ""
    # What they refuse: service.domain.datasets.check_changeable.
    locked: bool = False
    read_only: bool = False
    # Left out of listings unless asked for.
    hidden: bool = False
    # Kept by DatasetService.touch, not by updates (read only here).
    last_accessed_at: datetime | None = None

    @property
    def etag(self) -> str:
        return f"r{self.revision}"


@dataclass(frozen=True)
class DatasetGuard:
    """The flags of a live dataset that refuse changes to it."""

    locked: bool = False
    read_only: bool = False


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
    include_hidden: bool = False
    # Only these datasets (what the caller may read); None: every dataset of the app.
    only: frozenset[str] | None = None


class AppRole(enum.Enum):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"


class DatasetRole(enum.Enum):
    VIEWER = "viewer"
    ADMIN = "admin"


class KeyKind(enum.Enum):
    PERSONAL = "personal"
    SCOPED = "scoped"


@dataclass(frozen=True)
class ApiKey:
    id: str
    app_id: str
    lookup: str
    secret_hash: bytes
    description: str
    # The key's own rights: ("read",) or ("read", "write"). A personal key has both and
    # is limited by its user's roles instead.
    scopes: tuple[str, ...] = ("read", "write")
    created_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    kind: KeyKind = KeyKind.SCOPED
    # Personal keys: the user the key acts as.
    user_id: str | None = None
    # Scoped keys: the datasets the key is bound to; empty means the whole app.
    dataset_ids: tuple[str, ...] = ()
    # The user who made the key; "" when made from the command line (bootstrap path).
    created_by: str = ""
    last_used_at: datetime | None = None


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: a key and, for personal keys, the user it acts as with
    the user's roles at authentication time."""

    key_id: str
    app_id: str
    # The key's rights ("read", "write"); see `service.domain.access` for how they
    # combine with roles.
    scopes: frozenset[str]
    # Personal keys: the user; scoped keys: their creator ("" when made from the CLI).
    user_id: str = ""
    kind: KeyKind = KeyKind.SCOPED
    # Personal keys: the user's app role.
    app_role: AppRole | None = None
    # Scoped keys bound to datasets: those datasets; None means the whole app.
    datasets: frozenset[str] | None = None
    # Personal keys: the user's role per dataset.
    dataset_roles: Mapping[str, DatasetRole] = field(default_factory=dict)


@dataclass(frozen=True)
class User:
    app_id: str
    id: str
    display_name: str = ""
    role: AppRole = AppRole.MEMBER
    created_at: datetime | None = None
    modified_at: datetime | None = None


@dataclass(frozen=True)
class Collaborator:
    app_id: str
    dataset_id: str
    user_id: str
    role: DatasetRole = DatasetRole.VIEWER
    added_by: str = ""
    created_at: datetime | None = None
    modified_at: datetime | None = None


@dataclass(frozen=True)
class AuditEvent:
    """One audited call (a mutation, or a refused read)."""

    app_id: str
    rpc: str
    outcome: str
    user_id: str = ""
    key_id: str = ""
    dataset_ids: tuple[str, ...] = ()
    resource_ids: tuple[str, ...] = ()
    request_id: str = ""
    id: int | None = None
    at: datetime | None = None


@dataclass(frozen=True)
class IdempotencyRecord:
    fingerprint: bytes
    response: bytes | None


class MediaType(enum.Enum):
    IMAGE = "image"
    VIDEO = "video"
    AUDIO = "audio"
    TEXT = "text"


@dataclass(frozen=True)
class GeoPoint:
    longitude: float
    latitude: float


@dataclass(frozen=True)
class Input:
    """A stored input. `concepts` are its input-level concepts (proto JSON form)."""

    app_id: str
    id: str
    media_type: MediaType
    blob: StoredBlob | None = None
    source_url: str = ""
    text: str | None = None
    media_info: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    geo: GeoPoint | None = None
    title: str = ""
    concepts: list[dict[str, Any]] = field(default_factory=list)
    dataset_ids: list[str] = field(default_factory=list)
    created_at: datetime | None = None
    modified_at: datetime | None = None


@dataclass(frozen=True)
class ClientVector:
    """A vector a caller gave in data.embeddings (see service/domain/embeddings.py)."""

    model_id: str
    vector: tuple[float, ...]


@dataclass(frozen=True)
class InputView:
    input: Input
    download_url: str = ""
    # (prefix, suffix) of the HostedURL of the stored original.
    hosted: tuple[str, str] | None = None
    # Its current client vectors (data.embeddings), by model id.
    embeddings: tuple[ClientVector, ...] = ()


@dataclass(frozen=True)
class AnnotationQuery:
    """Which annotations a page is about: of these inputs and/or of a dataset's inputs."""

    app_id: str
    input_ids: list[str] | None = None
    dataset_id: str | None = None


@dataclass(frozen=True)
class InputQuery:
    """Which inputs a list or bulk delete is about; every condition must hold."""

    app_id: str
    ids: tuple[str, ...] | None = None
    dataset_id: str | None = None
    media_types: tuple[MediaType, ...] | None = None
    metadata: dict[str, Any] | None = None
    concept_ids: tuple[str, ...] | None = None
    negative_concept_ids: tuple[str, ...] | None = None
    annotated: bool | None = None


@dataclass(frozen=True)
class DatasetMember:
    """An input in a dataset: since when, and its position in the dataset's listing."""

    input: Input
    added_at: datetime
    seq: int


@dataclass(frozen=True)
class Annotation:
    """A stored annotation. `data` and `annotation_info` are in the protobuf JSON form of
    `Data` and `Struct` with proto field names."""

    app_id: str
    id: str
    input_id: str
    data: dict[str, Any]
    annotation_info: dict[str, Any] = field(default_factory=dict)
    input_level: bool = False
    created_at: datetime | None = None
    modified_at: datetime | None = None


@dataclass(frozen=True)
class AnnotatedMedia:
    """What annotation rules need to know about the annotated input."""

    media_type: MediaType
    media_info: dict[str, Any] = field(default_factory=dict)


class VersionStatus(enum.Enum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class VersionMetrics:
    """Counts of a version's content. Field names are those of `DatasetVersionMetrics`."""

    inputs_count: int = 0
    unlabeled_inputs_count: int = 0
    inputs_with_metadata_count: int = 0
    inputs_with_geo_count: int = 0
    regions_count: int = 0
    bounding_boxes_count: int = 0
    polygons_count: int = 0
    points_count: int = 0
    masks_count: int = 0
    frames_count: int = 0
    embeddings_count: int = 0
    positive_input_tags_count: int = 0
    positive_region_tags_count: int = 0
    positive_frame_tags_count: int = 0
    region_inputs_count: int = 0
    region_frames_count: int = 0
    frame_inputs_count: int = 0

    def __add__(self, other: VersionMetrics) -> VersionMetrics:
        return VersionMetrics(
            **{
                f.name: getattr(self, f.name) + getattr(other, f.name)
                for f in dataclasses.fields(self)
            }
        )


@dataclass(frozen=True)
class DatasetVersion:
    """`metrics` is None until the version is ready; `input_count` is the number of
    members, fixed at creation."""

    app_id: str
    dataset_id: str
    id: str
    status: VersionStatus = VersionStatus.PENDING
    percent: int = 0
    details: str = ""
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    metrics: VersionMetrics | None = None
    input_count: int = 0
    job_id: int | None = None
    created_at: datetime | None = None
    modified_at: datetime | None = None
    # The ontology recorded when the build completed (its classes, for exports, are
    # read apart: VersionRepository.ontology); None without a governing ontology.
    ontology: OntologyRef | None = None


@dataclass(frozen=True)
class InputSnapshot:
    """What a version keeps of one member: the input as it is when the build reaches
    it, with a stable media reference in `view.download_url` (never a presigned URL,
    which would expire while the version lives on), and its annotations in creation
    order, without the input-level one (whose concepts are `view.input.concepts`)."""

    view: InputView
    annotations: list[Annotation]


@dataclass(frozen=True)
class EncodedInput:
    """A serialized snapshot and the metrics of exactly what was serialized."""

    data: bytes
    metrics: VersionMetrics


@dataclass(frozen=True)
class InputContent:
    """An input's content as it is now: its serialized snapshot (stored once per distinct
    content, which versions refer to by hash), the metrics of exactly what was serialized,
    and what search filters a version's members by, from the same reads."""

    app_id: str
    input_id: str
    data: bytes
    content_hash: bytes
    metrics: VersionMetrics
    media_type: MediaType
    metadata: dict[str, Any] = field(default_factory=dict)
    # The positive concepts of the input and of its annotations' regions and frames.
    concepts: tuple[str, ...] = ()
    # Any annotation at all (input-level concepts included).
    annotated: bool = False
    geo: GeoPoint | None = None
    created_at: datetime | None = None


@dataclass(frozen=True)
class FixedVersion:
    """What CreateDatasetVersion recorded: the members' number, the sums of their
    content's metrics, and how many members had no content (stale: the creation retries)."""

    input_count: int
    metrics: VersionMetrics
    stale: int


@dataclass(frozen=True)
class VersionMember:
    """One member of a READY version as exports read it: its serialized content and the
    stored original it references, if any."""

    position: int
    input_id: str
    data: bytes
    blob: StoredBlob | None


class ExportFormat(enum.Enum):
    CLARIFAI_DATA_PROTOBUF = "clarifai_data_protobuf"
    CLARIFAI_DATA_JSON = "clarifai_data_json"
    COCO = "coco"
    VI_FULL = "vi_full"
    VI_JSONL = "vi_jsonl"


class ExportStatus(enum.Enum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class SplitOptions:
    """Named ratios (each > 0, summing to 1) and the seed of the assignment."""

    ratios: dict[str, float]
    seed: int = 0


@dataclass(frozen=True)
class ExportOptions:
    split: SplitOptions | None = None
    embed_media: bool = False
    # Vi formats only: pixels instead of coordinates normalized to 0..1.
    pixel_coordinates: bool = False


@dataclass(frozen=True)
class FidelityReport:
    """What a format could not carry: counts by kind, and how items were mapped."""

    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Export:
    """An export of a version. `blob` is the archive once it succeeded; `percent` is the
    progress of its job while it runs."""

    app_id: str
    dataset_id: str
    version_id: str
    id: str
    format: ExportFormat
    options: ExportOptions
    status: ExportStatus = ExportStatus.PENDING
    percent: int = 0
    details: str = ""
    blob: StoredBlob | None = None
    split_counts: dict[str, int] = field(default_factory=dict)
    fidelity: FidelityReport = field(default_factory=FidelityReport)
    job_id: int | None = None
    created_at: datetime | None = None
    modified_at: datetime | None = None


@dataclass(frozen=True)
class ExportView:
    """An export as shown to a caller: with a time-limited download URL once it succeeded."""

    export: Export
    url: str = ""
    url_expires_at: datetime | None = None


# --- ontologies (rules and use cases in ontologies.py) -----------------------------------


class Shape(enum.Enum):
    """How a class may be drawn; the values are the proto enum's names."""

    UNSPECIFIED = "SHAPE_UNSPECIFIED"
    CLASSIFICATION = "SHAPE_CLASSIFICATION"
    BOUNDING_BOX = "SHAPE_BOUNDING_BOX"
    POLYGON = "SHAPE_POLYGON"
    POLYLINE = "SHAPE_POLYLINE"
    POINT = "SHAPE_POINT"
    KEYPOINTS = "SHAPE_KEYPOINTS"
    MASK = "SHAPE_MASK"
    SPAN = "SHAPE_SPAN"
    VIDEO_TRACK = "SHAPE_VIDEO_TRACK"


class AttributeKind(enum.Enum):
    """The type of an attribute; the values are the proto oneof's field names."""

    UNSPECIFIED = ""
    ENUM = "enum_type"
    BOOLEAN = "boolean"
    NUMBER = "number"
    TEXT = "text"


@dataclass(frozen=True)
class OntologyAttribute:
    id: str
    name: str
    kind: AttributeKind
    required: bool = False
    # ENUM only.
    options: tuple[str, ...] = ()
    # NUMBER only; None means unbounded.
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class OntologyClass:
    id: str
    display_name: str = ""
    color: str = ""
    shapes: tuple[Shape, ...] = ()
    keypoint_names: tuple[str, ...] = ()
    attributes: tuple[OntologyAttribute, ...] = ()
    sub_classes: tuple[OntologyClass, ...] = ()
    archived: bool = False
    # The class's category number in exports, given by the service (0: not yet given).
    category_id: int = 0


@dataclass(frozen=True)
class Ontology:
    app_id: str
    id: str
    description: str = ""
    classes: tuple[OntologyClass, ...] = ()
    input_classifications: tuple[OntologyClass, ...] = ()
    revision: int = 1
    created_at: datetime | None = None
    modified_at: datetime | None = None
    # The highest category number ever given: new classes get the next ones, so that a
    # removed class's number is never another's.
    last_category_id: int = 0


@dataclass(frozen=True)
class VersionOntology:
    """The ontology governing a dataset as a version captured it: exports take category
    numbers and concept names from these classes, whatever the ontology becomes."""

    ontology_id: str
    revision: int
    classes: tuple[OntologyClass, ...] = ()
    input_classifications: tuple[OntologyClass, ...] = ()
    last_category_id: int = 0


# --- projects (use cases in projects.py) --------------------------------------------------


@dataclass(frozen=True)
class OntologyRef:
    """An ontology at one revision."""

    id: str
    revision: int


@dataclass(frozen=True)
class ProjectLink:
    """A dataset attached to a project, and the project's ontology."""

    dataset_id: str
    project_id: str
    ontology_id: str


@dataclass(frozen=True)
class Project:
    app_id: str
    id: str
    ontology_id: str
    description: str = ""
    # The live datasets attached, sorted (read only: kept by attach and detach).
    dataset_ids: tuple[str, ...] = ()
    created_at: datetime | None = None
    modified_at: datetime | None = None
