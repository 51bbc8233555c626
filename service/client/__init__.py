"""A synchronous, typed client for datasetd, for scripts and command-line tools."""

from service.client.client import Client
from service.client.dataset import Dataset, InputInfo, MergeResult
from service.client.datasets import DatasetInfo, Datasets, Deleted, Page, Statistic
from service.client.errors import (
    AbortedError,
    AlreadyExistsError,
    DatasetdError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
    from_rpc_error,
)
from service.client.media import DownloadedInput
from service.client.uploads import AnnotationItem, Box, Failure, UploadItem, UploadResult

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "AnnotationItem",
    "Box",
    "Client",
    "Dataset",
    "DatasetInfo",
    "DatasetdError",
    "Datasets",
    "Deleted",
    "DownloadedInput",
    "FailedPreconditionError",
    "Failure",
    "InputInfo",
    "InvalidArgumentError",
    "MergeResult",
    "NotFoundError",
    "Page",
    "PermissionDeniedError",
    "Statistic",
    "UnauthenticatedError",
    "UnavailableError",
    "UploadItem",
    "UploadResult",
    "from_rpc_error",
]
from service.client.access import (
    ApiKeyInfo,
    AuditEventInfo,
    AuditPage,
    CollaboratorInfo,
    NewApiKey,
    UserInfo,
)
from service.client.bulk_delete import BulkDeleteResult
from service.client.exports import (
    ArchiveIntegrityError,
    DownloadResult,
    ExportFailedError,
    ExportInfo,
    ExportSettings,
)
from service.client.inputs import (
    Inputs,
    ReencodeCandidateInfo,
    ReencodeFailedError,
    ReencodeJobInfo,
    ReencodeResultInfo,
)
from service.client.ontologies import Ontologies, OntologyInfo
from service.client.projects import (
    FindingInfo,
    ProjectInfo,
    Projects,
    RuleReportInfo,
    ValidationInfo,
)
from service.client.search import (
    AddFromSearchResult,
    DuplicateGroupInfo,
    DuplicatesResult,
    EmbeddingModelInfo,
    Hit,
    HitPage,
    InputEmbeddingInfo,
    QueryArgs,
    SearchJobFailedError,
    SearchJobInfo,
)
from service.client.versions import VersionFailedError, VersionInfo

__all__ += [
    "AddFromSearchResult",
    "ApiKeyInfo",
    "ArchiveIntegrityError",
    "AuditEventInfo",
    "AuditPage",
    "BulkDeleteResult",
    "CollaboratorInfo",
    "DownloadResult",
    "DuplicateGroupInfo",
    "DuplicatesResult",
    "EmbeddingModelInfo",
    "ExportFailedError",
    "ExportInfo",
    "ExportSettings",
    "FindingInfo",
    "Hit",
    "HitPage",
    "InputEmbeddingInfo",
    "Inputs",
    "NewApiKey",
    "Ontologies",
    "OntologyInfo",
    "ProjectInfo",
    "Projects",
    "QueryArgs",
    "ReencodeCandidateInfo",
    "ReencodeFailedError",
    "ReencodeJobInfo",
    "ReencodeResultInfo",
    "RuleReportInfo",
    "SearchJobFailedError",
    "SearchJobInfo",
    "UserInfo",
    "ValidationInfo",
    "VersionFailedError",
    "VersionInfo",
]
