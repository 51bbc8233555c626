"""Clarifai's in-band statuses: SUCCESS, and what a domain error becomes.

Clarifai clients read `response.status.code`, never the gRPC code (except UNAVAILABLE,
which they retry), so every outcome of a V2 call, refusals included, is an OK gRPC
response whose `status` says what happened."""

from __future__ import annotations

from collections.abc import Iterable

from clarifai_grpc.grpc.api.status import status_code_pb2, status_pb2
from google.protobuf.message import Message

from service.domain.errors import DomainError, ErrorKind

Code = status_code_pb2.StatusCode
SUCCESS = status_code_pb2.SUCCESS
MIXED_STATUS = status_code_pb2.MIXED_STATUS
FAILURE = status_code_pb2.FAILURE
NOT_IMPLEMENTED = status_code_pb2.NOT_IMPLEMENTED
# What the real API answers for a missing resource of any kind (inputs, concepts, datasets).
DOES_NOT_EXIST = status_code_pb2.CONN_DOES_NOT_EXIST
INVALID_REQUEST = status_code_pb2.CONN_INVALID_REQUEST
BAD_REQUEST_FORMAT = status_code_pb2.CONN_BAD_REQUEST_FORMAT
KEY_INVALID = status_code_pb2.CONN_KEY_INVALID
INSUFFICIENT_SCOPES = status_code_pb2.CONN_INSUFFICIENT_SCOPES
INPUT_DUPLICATE = status_code_pb2.INPUT_DUPLICATE
INPUT_INVALID_ARGUMENT = status_code_pb2.INPUT_INVALID_ARGUMENT
ANNOTATION_INVALID_ARGUMENT = status_code_pb2.ANNOTATION_INVALID_ARGUMENT
THROTTLED = status_code_pb2.CONN_THROTTLED
SERVER_ERROR = status_code_pb2.INTERNAL_SERVER_ISSUE
UNAVAILABLE = status_code_pb2.RPC_SERVER_UNAVAILABLE

# The SDK recognises a duplicate input by this exact text (its retry log keys off it).
DUPLICATE_INPUT_DETAILS = "Input has a duplicate ID."
NOT_FOUND_DESCRIPTION = "Resource does not exist"
KEY_INVALID_DESCRIPTION = "Invalid API key or Invalid API key/application pair"

# The HTTP status the REST mapping answers with, as Clarifai's gateway does.
_HTTP: dict[int, int] = {
    SUCCESS: 200,
    MIXED_STATUS: 200,
    FAILURE: 400,
    NOT_IMPLEMENTED: 501,
    DOES_NOT_EXIST: 404,
    INVALID_REQUEST: 400,
    BAD_REQUEST_FORMAT: 400,
    KEY_INVALID: 401,
    INSUFFICIENT_SCOPES: 403,
    INPUT_DUPLICATE: 409,
    INPUT_INVALID_ARGUMENT: 400,
    ANNOTATION_INVALID_ARGUMENT: 400,
    THROTTLED: 429,
    SERVER_ERROR: 500,
    UNAVAILABLE: 503,
}


def http_status(code: int) -> int:
    """The HTTP status of a Clarifai code in the REST mapping."""
    return _HTTP.get(code, 400)


def make(code: int, description: str, details: str = "", req_id: str = "") -> status_pb2.Status:
    return status_pb2.Status(
        code=code,
        description=description,
        details=details,
        req_id=req_id,
        http_status_code=http_status(code),
    )


def ok(req_id: str = "") -> status_pb2.Status:
    return make(SUCCESS, "Ok", req_id=req_id)


def _details(error: DomainError) -> str:
    """The message, and each bad field by path: the description names the field."""
    if not error.violations:
        return error.message
    fields = "; ".join(f"{v.field}: {v.description}" for v in error.violations)
    return f"{error.message} ({fields})" if fields not in error.message else error.message


def of_error(
    error: Exception, req_id: str = "", *, invalid: int = INVALID_REQUEST
) -> status_pb2.Status:
    """The in-band status of a failed call. `invalid` is the code of a refused value for
    the resource at hand (INPUT_INVALID_ARGUMENT for inputs, ...)."""
    if not isinstance(error, DomainError):
        return make(
            SERVER_ERROR,
            "Internal error",
            f"the server log has the details under request id {req_id}",
            req_id,
        )
    details = _details(error)
    kind = error.kind
    if kind is ErrorKind.NOT_FOUND:
        return make(DOES_NOT_EXIST, NOT_FOUND_DESCRIPTION, details, req_id)
    if kind is ErrorKind.ALREADY_EXISTS:
        if error.reason.startswith("INPUT"):
            return make(INPUT_DUPLICATE, "Input duplicate", DUPLICATE_INPUT_DETAILS, req_id)
        return make(INVALID_REQUEST, "Resource already exists", details, req_id)
    if kind is ErrorKind.UNAUTHENTICATED:
        return make(KEY_INVALID, KEY_INVALID_DESCRIPTION, details, req_id)
    if kind is ErrorKind.PERMISSION_DENIED:
        return make(INSUFFICIENT_SCOPES, "Insufficient scopes", details, req_id)
    if kind is ErrorKind.RESOURCE_EXHAUSTED:
        return make(THROTTLED, "Making too many requests", details, req_id)
    if kind is ErrorKind.UNAVAILABLE:
        return make(UNAVAILABLE, "Service unavailable, retry", details, req_id)
    if kind is ErrorKind.INVALID_ARGUMENT:
        return make(invalid, "Invalid request", details, req_id)
    # FAILED_PRECONDITION, ABORTED: the request is valid but cannot be done now.
    return make(INVALID_REQUEST, "Request cannot be done in the current state", details, req_id)


def not_supported(method: str, req_id: str = "") -> status_pb2.Status:
    return make(
        NOT_IMPLEMENTED,
        "Not supported by datasetd",
        f"{method} is not part of the Clarifai API subset datasetd serves "
        "(see the README: Clarifai compatibility)",
        req_id,
    )


def with_status(response_type: type[Message], status: status_pb2.Status) -> Message:
    """A response of `response_type` that carries only `status`."""
    response = response_type()
    response.status.CopyFrom(status)  # type: ignore[attr-defined]
    return response


def summary(item_codes: Iterable[int], req_id: str = "") -> status_pb2.Status:
    """The top-level status of a batch that is not atomic: SUCCESS when every item
    succeeded, FAILURE when none did, MIXED_STATUS otherwise."""
    codes = list(item_codes)
    good = sum(1 for code in codes if code in _ITEM_SUCCESS)
    if good == len(codes):
        return ok(req_id)
    if good == 0:
        return make(FAILURE, "Failure", req_id=req_id)
    return make(MIXED_STATUS, "Mixed Success", req_id=req_id)


_ITEM_SUCCESS = frozenset(
    {
        SUCCESS,
        status_code_pb2.INPUT_DOWNLOAD_SUCCESS,
        status_code_pb2.ANNOTATION_SUCCESS,
        status_code_pb2.DATASET_INPUT_SUCCESS,
    }
)
