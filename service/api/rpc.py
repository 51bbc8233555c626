"""What every servicer method shares, so that a method reads decode → domain → encode:
the mutation decorator (authorization and request-id idempotency), streamed downloads,
and the composition of one proto service out of several servicer parts."""

from __future__ import annotations

import contextlib
import functools
import types
import typing
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from datasetd.v1 import common_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from service.api.idempotency import Mutation, run_once
from service.api.interceptors import Context, current_principal
from service.domain.auth import Permission, authorize
from service.domain.errors import Violations
from service.domain.idempotency import Idempotency
from service.domain.models import Principal
from service.domain.patch import PatchAction

__all__ = [
    "Context",
    "compose",
    "decoded",
    "download",
    "mutation",
    "patch_request",
]


class Mutating(Protocol):
    @property
    def idempotency(self) -> Idempotency: ...


S = TypeVar("S", bound=Mutating)
Req = TypeVar("Req", bound=Mutation)
Resp = TypeVar("Resp", bound=Message)


class _Chunk(Protocol):
    """A message of a download stream: its bytes and, in the first, the header fields."""

    chunk: bytes


Chunked = TypeVar("Chunked", bound=_Chunk)


def mutation(
    permission: Permission = Permission.WRITE,
) -> Callable[
    [Callable[[S, Req, Principal], Awaitable[Resp]]],
    Callable[[S, Req, Context], Coroutine[Any, Any, Resp]],
]:
    """Turns `handler(self, request, principal)` into the RPC method: the caller must hold
    `permission` on the request's app, and the handler runs once per request id (its
    writes, the claim and the stored response commit together; a retry replays)."""

    def decorate(
        handler: Callable[[S, Req, Principal], Awaitable[Resp]],
    ) -> Callable[[S, Req, Context], Coroutine[Any, Any, Resp]]:
        method = handler.__name__

        @functools.cache
        def response_type() -> type[Resp]:
            # The annotation names the type a replay decodes to; resolved on first use,
            # once the module that defines the handler has all its names.
            resolved: type[Resp] = typing.get_type_hints(handler)["return"]
            return resolved

        @functools.wraps(handler)
        async def rpc(self: S, request: Req, context: Context) -> Resp:
            principal = current_principal()
            authorize(principal, request.app_id, permission)
            return await run_once(
                self.idempotency,
                method,
                request,
                response_type(),
                lambda: handler(self, request, principal),
            )

        return rpc

    return decorate


async def download(
    first: Chunked, stream: AsyncGenerator[bytes, None], chunk: Callable[[bytes], Chunked]
) -> AsyncIterator[Chunked]:
    """The messages of a download: `first` (the header fields) carries the first chunk,
    `chunk` makes the others; `first` alone when the content is empty."""
    pending: Chunked | None = first
    # Closed explicitly so the object store connection is released as soon as the
    # client goes away, not when the generator is garbage-collected.
    async with contextlib.aclosing(stream) as chunks:
        async for data in chunks:
            if pending is not None:
                pending.chunk = data
                yield pending
                pending = None
            else:
                yield chunk(data)
    if pending is not None:
        yield pending


Decoded = TypeVar("Decoded")


def decoded(decode: Callable[[Violations], Decoded]) -> Decoded:
    """What `decode` reads from a request; every violation it found is raised at once."""
    violations = Violations()
    value = decode(violations)
    violations.raise_if_any()
    return value


def patch_request(
    action: common_pb2.PatchAction.ValueType, decode: Callable[[Violations], Decoded]
) -> tuple[PatchAction, Decoded]:
    """The action of an Update request and what `decode` reads from it, the problems of
    both reported together."""
    violations = Violations()
    chosen = _patch_action(violations, action)
    value = decode(violations)
    violations.raise_if_any()
    assert chosen is not None
    return chosen, value


_ACTIONS = {
    common_pb2.PATCH_ACTION_MERGE: PatchAction.MERGE,
    common_pb2.PATCH_ACTION_OVERWRITE: PatchAction.OVERWRITE,
    common_pb2.PATCH_ACTION_REMOVE: PatchAction.REMOVE,
}


def _patch_action(
    violations: Violations, value: common_pb2.PatchAction.ValueType
) -> PatchAction | None:
    """The action of an Update request; None (and a violation) when it is not chosen."""
    action = _ACTIONS.get(value)
    if action is None:
        violations.add(
            "action", "must be PATCH_ACTION_MERGE, PATCH_ACTION_OVERWRITE or PATCH_ACTION_REMOVE"
        )
    return action


def compose(service: ServiceDescriptor, *parts: object) -> Any:
    """One proto service served by parts that each own some of its RPCs (a part per
    resource: versions, exports, diffs). Every RPC must have exactly one owner, checked
    at startup, so a forgotten method fails the server's start, not a caller's call."""
    servicer = types.SimpleNamespace()
    for method in service.methods:
        owners = [part for part in parts if callable(getattr(part, method.name, None))]
        if len(owners) != 1:
            raise RuntimeError(f"{method.full_name} is implemented by {len(owners)} parts, not 1")
        setattr(servicer, method.name, getattr(owners[0], method.name))
    return servicer
