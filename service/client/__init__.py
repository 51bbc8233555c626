"""A synchronous, typed client for datasetd, for scripts and command-line tools."""

from service.client.datasets import Client, DatasetInfo, Datasets, Deleted, Page, Statistic
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
    "DatasetInfo",
    "DatasetdError",
    "Datasets",
    "Deleted",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "Page",
    "PermissionDeniedError",
    "Statistic",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
]
