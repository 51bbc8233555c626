"""Typed exceptions for failed calls, decoded from the gRPC status details."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2


class DatasetdError(Exception):
    """A call the server rejected, with what the server said about why."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        field_violations: dict[str, str] | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.message = message
        # `reason` is the stable machine-readable part; messages may change wording.
        self.reason = reason
        self.field_violations: dict[str, str] = dict(field_violations or {})
        self.request_id = request_id


class JobFailedError(DatasetdError):
    """A server job (a version build, an export) ended in failure; ABORTED, as the job
    was given up rather than the call refused."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(grpc.StatusCode.ABORTED, message, reason=reason)


class NotFoundError(DatasetdError):
    """NOT_FOUND."""


class AlreadyExistsError(DatasetdError):
    """ALREADY_EXISTS."""


class InvalidArgumentError(DatasetdError):
    """INVALID_ARGUMENT; `field_violations` names the offending fields."""


class PermissionDeniedError(DatasetdError):
    """PERMISSION_DENIED."""


class UnauthenticatedError(DatasetdError):
    """UNAUTHENTICATED."""


class FailedPreconditionError(DatasetdError):
    """FAILED_PRECONDITION."""


class AbortedError(DatasetdError):
    """ABORTED (e.g. an etag mismatch)."""


class UnavailableError(DatasetdError):
    """UNAVAILABLE; usually worth retrying."""


_BY_CODE: dict[grpc.StatusCode, type[DatasetdError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def from_rpc_error(error: grpc.RpcError) -> DatasetdError:
    """Converts a failed call into the typed exception for its status code."""
    # Sync-channel errors are also grpc.Call; anything else carries no status.
    if not isinstance(error, grpc.Call):
        return DatasetdError(grpc.StatusCode.UNKNOWN, str(error))
    reason, request_id = "", ""
    fields: dict[str, str] = {}
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
                request_id = info.metadata.get("request_id", "")
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields.update({v.field: v.description for v in bad.field_violations})
    code = error.code()
    cls = _BY_CODE.get(code, DatasetdError)
    return cls(code, error.details() or "", reason, fields, request_id)
