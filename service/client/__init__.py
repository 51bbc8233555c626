"""A synchronous, typed client for datasetd, for scripts and command-line tools."""

from service.client.client import Client
from service.client.dataset import Dataset, DownloadedInput, InputInfo, MergeResult
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

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "Client",
    "Dataset",
    "DatasetInfo",
    "DatasetdError",
    "Datasets",
    "Deleted",
    "DownloadedInput",
    "FailedPreconditionError",
    "InputInfo",
    "InvalidArgumentError",
    "MergeResult",
    "NotFoundError",
    "Page",
    "PermissionDeniedError",
    "Statistic",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
]
