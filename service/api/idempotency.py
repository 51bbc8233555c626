"""Request-id handling shared by every mutating RPC."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from google.protobuf.message import Message

from service.domain.errors import Violations
from service.domain.idempotency import Idempotency, IdempotencyKey
from service.domain.validation import check_request_id


class Mutation(Protocol):
    """A mutating request: it names its app and may carry a request id."""

    app_id: str
    request_id: str


M = TypeVar("M", bound=Message)


def idempotency_key(method: str, request: Mutation) -> IdempotencyKey | None:
    violations = Violations()
    check_request_id(violations, request.request_id)
    violations.raise_if_any()
    if not request.request_id:
        return None
    assert isinstance(request, Message)
    body = type(request)()
    body.CopyFrom(request)
    body.ClearField("request_id")
    fingerprint = hashlib.sha256(body.SerializeToString(deterministic=True)).digest()
    return IdempotencyKey(request.app_id, method, request.request_id, fingerprint)


async def run_once(
    idempotency: Idempotency,
    method: str,
    request: Mutation,
    response_type: type[M],
    operation: Callable[[], Awaitable[M]],
) -> M:
    """Runs the operation once per request id and replays its response on retries."""

    async def encoded() -> bytes:
        return (await operation()).SerializeToString()

    raw = await idempotency.run(idempotency_key(method, request), encoded)
    return response_type.FromString(raw)
