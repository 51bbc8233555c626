"""Every call passes through here: request id, authentication, the RPC's access rule, its
audit event, error mapping, access log."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn, Protocol

import grpc
from clarifai_grpc.grpc.api.status import status_code_pb2
from google.protobuf.message import DecodeError, Message

from service.api.access_policy import (
    POLICY,
    InputDatasets,
    Named,
    Policy,
    Rule,
    check_named,
    reaches_named,
    resource_ids,
)
from service.api.boundary import check_request
from service.api.errors import internal_status, to_rpc_status
from service.api.read_routing import LSN_HEADER, MIN_LSN_HEADER, route_call
from service.domain.access import Action, Resource, allows, denial, require, require_app
from service.domain.auth import Authenticator, parse_authorization
from service.domain.errors import (
    DomainError,
    ErrorKind,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from service.domain.models import AuditEvent, Principal
from service.domain.ports import AuditRepository
from service.domain.validation import ID_PATTERN
from service.observability import REQUEST_ID, metrics, tracing
from service.storage.audit import PENDING_AUDIT, PendingAudit
from service.storage.replica import CallRoute, format_lsn

log = logging.getLogger("datasetd.access")

PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "principal", default=None
)
# Infrastructure services a load balancer or grpcurl must reach without a key.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_REQUEST_ID_HEADER = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
# Clarifai's in-band codes of a response that failed without an exception.
_V2_SUCCESS = status_code_pb2.SUCCESS
_V2_OUTCOMES = {
    status_code_pb2.MIXED_STATUS: "MIXED_STATUS",
    status_code_pb2.NOT_IMPLEMENTED: "UNIMPLEMENTED",
    status_code_pb2.CONN_DOES_NOT_EXIST: "NOT_FOUND",
    status_code_pb2.CONN_KEY_INVALID: "UNAUTHENTICATED",
    status_code_pb2.CONN_INSUFFICIENT_SCOPES: "PERMISSION_DENIED",
    status_code_pb2.CONN_INVALID_REQUEST: "INVALID_ARGUMENT",
    status_code_pb2.CONN_BAD_REQUEST_FORMAT: "INVALID_ARGUMENT",
    status_code_pb2.INPUT_INVALID_ARGUMENT: "INVALID_ARGUMENT",
    status_code_pb2.ANNOTATION_INVALID_ARGUMENT: "INVALID_ARGUMENT",
    status_code_pb2.INPUT_DUPLICATE: "ALREADY_EXISTS",
    status_code_pb2.INTERNAL_SERVER_ISSUE: "INTERNAL",
    status_code_pb2.RPC_SERVER_UNAVAILABLE: "UNAVAILABLE",
}
# Outcomes of a refused call (a refused read is audited, an allowed one is not).
_REFUSED = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED"})

Context = grpc.aio.ServicerContext[Any, Any]


class Transport(Protocol):
    """What a call needs of the way it came: a gRPC servicer context, or the REST
    gateway's stand-in (whose calls always answer in-band, so never abort)."""

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str]]) -> None: ...

    def code(self) -> grpc.StatusCode | None: ...

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> NoReturn: ...


def current_principal() -> Principal:
    principal = PRINCIPAL.get()
    if principal is None:
        raise RuntimeError("no authenticated caller in this context")
    return principal


@dataclass(frozen=True)
class _Undecodable:
    """Stands in for a request message that failed to parse, so the caller gets
    INVALID_ARGUMENT instead of gRPC's INTERNAL "Exception deserializing request"."""

    error: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    decode = deserializer

    def parse(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError as exc:
            return _Undecodable(str(exc) or "malformed protobuf")

    return parse


def _checked(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(
            f"the request is not a valid protobuf message ({request.error}); "
            "string fields must be valid UTF-8",
            reason="MALFORMED_REQUEST",
        )
    if isinstance(request, Message):  # every datasetd RPC; raw-bytes handlers exist in tests
        check_request(request)
    return request


async def _checked_stream(requests: AsyncIterator[Any], call: Call) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(await call.admitted(request))


def _resource_ids(request: Message) -> tuple[str, ...]:
    """The ids an audit event keeps; a request they cannot be read from keeps none (the
    audit log never fails a call)."""
    try:
        return resource_ids(request)
    except Exception:
        log.warning("cannot read the resource ids of a %s", type(request).__name__, exc_info=True)
        return ()


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is None:
        return
    yield first
    async for item in rest:
        yield item


class Call:
    """The per-call part: request id, authentication, access rule, audit event, error
    mapping, access log (of the gRPC calls and of the REST gateway's)."""

    def __init__(
        self,
        authenticator: Authenticator,
        method: str,
        metadata: Sequence[tuple[str, str | bytes]],
        in_band: Callable[[Exception], Message] | None = None,
        parse: Callable[[list[str]], str] = parse_authorization,
        *,
        policy: Policy = POLICY,
        audit: AuditRepository | None = None,
        inputs: InputDatasets | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._rule: Rule | None = policy.rule(method)
        self._audit = audit
        # Where named inputs are (for callers who are not app-wide): `admit` leaves the
        # lookup of a message to `admitted` (only when `_deferring`; else it refuses).
        self._inputs = inputs
        self._lookup: tuple[str, Rule, Named] | None = None
        self._deferring = False
        # Makes the call's audit event, once a request message named its app.
        self._event: Callable[[], AuditEvent] | None = None
        self._pending: PendingAudit | None = None
        # The request of a unary call, seen before authentication (to record a refused
        # call against the app it names).
        self._request: Any = None
        self._recorded = False
        # The secret from the `authorization` values (the REST gateway takes only `Key`).
        self._parse = parse
        # Clarifai's V2: a failure is an OK response whose `status` tells (`answer`).
        self._in_band = in_band
        self.answer: Message | None = None
        self.method = method
        self._authorization = [str(v) for k, v in metadata if k == "authorization"]
        self._client_request_id = next((str(v) for k, v in metadata if k == _REQUEST_ID_HEADER), "")
        self._min_lsn = next((str(v) for k, v in metadata if k == MIN_LSN_HEADER), "")
        self._route: CallRoute | None = None
        self._started = time.perf_counter()
        self.outcome = "OK"
        # What the caller receives, for the metrics and the span.
        self.code = grpc.StatusCode.OK
        self._series = metrics.rpc_series(method)
        self._span: tuple[Any, object] | None = None
        self._metadata = metadata

    async def begin(self, context: Transport) -> None:
        request_id = (
            self._client_request_id
            if _CLIENT_REQUEST_ID.match(self._client_request_id)
            else uuid.uuid4().hex
        )
        REQUEST_ID.set(request_id)
        if tracing.ENABLED:
            self._span = tracing.start_rpc(self.method, request_id, self._metadata)
        context.set_trailing_metadata(((_REQUEST_ID_HEADER, request_id),))
        secret = self._parse(self._authorization)
        PRINCIPAL.set(await self._authenticator.authenticate(secret))
        if self._rule is None:
            # Every RPC declares its rule (access_policy.py); one that does not is refused.
            raise PermissionDenied(f"no access rule for {self.method}", reason="NO_ACCESS_RULE")
        # After authentication, which always reads the primary.
        self._route = route_call(self.method, current_principal(), self._min_lsn)

    def note_request(self, request: Any) -> None:
        """The request of a unary call, known before authentication."""
        self._request = request

    def admit(self, request: Any) -> Any:
        """Checks a request message (each message of a client stream) against the RPC's
        rule; the first one that names the app starts the call's audit event, which a
        mutation's first committed transaction writes (storage's PENDING_AUDIT).

        Inputs named by id, for a caller who is not app-wide, need a query: called by
        `admitted`, this leaves it to that one; called alone, it refuses them."""
        self._lookup = None
        rule = self._rule
        if rule is None or not isinstance(request, Message):
            if rule is not None and (rule.domain or isinstance(request, _Undecodable)):
                # Undecodable: INVALID_ARGUMENT next; raw bytes: test handlers only.
                return request
            raise PermissionDenied(f"no access rule for {self.method}", reason="NO_ACCESS_RULE")
        subject = rule.subject(request)
        if subject is None:
            return request
        principal = current_principal()
        # Clarifai's user_app_id: empty means the key's app (as scope.app_of reads it).
        app_id = rule.app_id(subject) or ("" if rule.app_field else principal.app_id)
        resource, datasets = rule.target(subject)
        if self._event is None:
            # Made when needed: an allowed read (most calls) records nothing.
            self._event = lambda: AuditEvent(
                app_id=app_id,
                rpc=self.method,
                outcome="OK",
                user_id=principal.user_id,
                key_id=principal.key_id,
                dataset_ids=rule.audited_datasets(subject, datasets),
                resource_ids=_resource_ids(request),
                request_id=REQUEST_ID.get(),
            )
            if rule.mutates and self._audit is not None:
                self._pending = PendingAudit(self._event())
                PENDING_AUDIT.set(self._pending)
        if not rule.app_field and app_id != principal.app_id:
            raise Unauthenticated(
                f"user_app_id.app_id {app_id!r}: the key does not belong to this app",
                reason="KEY_APP_MISMATCH",
            )
        if rule.domain:
            require_app(principal, app_id)
            return request
        if resource is Resource.APP and rule.inputs is not None:
            ids = rule.inputs(subject)
            # App owners and admins and whole-app keys: no query (the common case).
            if ids and not allows(principal, rule.action, Resource.APP):
                require_app(principal, app_id)
                if not self._deferring or not reaches_named(principal, rule.action):
                    raise denial(principal, rule.action, Resource.APP)
                self._lookup = (app_id, rule, ids)
                return request
        require(principal, app_id, rule.action, resource, datasets)
        reads = rule.reads(subject)
        if reads:
            require(principal, app_id, Action.READ, Resource.DATASETS, reads)
        return request

    async def admitted(self, request: Any) -> Any:
        """`admit`, then the datasets of the inputs the message names when the caller is
        not app-wide (one query through the InputDatasets port)."""
        self._deferring = True
        try:
            request = self.admit(request)
        finally:
            self._deferring = False
        lookup, self._lookup = self._lookup, None
        if lookup is not None:
            app_id, rule, ids = lookup
            placement = None
            if self._inputs is not None:
                # Ids no input can have are unknown without asking (and one with a NUL
                # would fail the query as INTERNAL before the use case refused it).
                inputs = [i for i in ids.inputs if ID_PATTERN.match(i)]
                annotations = [a for a in ids.annotations if ID_PATTERN.match(a)]
                placement = (
                    await self._inputs.datasets_of_inputs(
                        app_id, inputs, annotations, trashed=rule.every
                    )
                    if inputs or annotations
                    else ({}, {})
                )
            check_named(current_principal(), rule, ids, placement)
        return request

    def answered(self, response: Any) -> Any:
        """Notes the outcome of a response that tells it in-band (Clarifai's `status`)."""
        if self._in_band is not None and self.outcome == "OK":
            code = getattr(getattr(response, "status", None), "code", _V2_SUCCESS)
            if code not in (_V2_SUCCESS, 0):
                self.outcome = _V2_OUTCOMES.get(code, "FAILED_PRECONDITION")
        return response

    def _outcome(self) -> str:
        if self._in_band is not None:
            return self.outcome
        return self.code.name

    def records(self) -> bool:
        """Whether `record` has something to write."""
        if self._audit is None or self._recorded:
            return False
        return self._pending is not None or self._outcome() in _REFUSED

    async def record(self) -> None:
        """Writes or completes the call's audit event once it has ended: a mutation's
        (whatever its outcome), a refused read's, a call refused before authentication
        (against the app its request names). An audit failure never changes the call's
        outcome: it is logged."""
        if self._audit is None or self._recorded:
            return
        self._recorded = True
        outcome = self._outcome()
        pending = self._pending
        try:
            if pending is not None:
                pending.closed = True
                if pending.event_id is None:
                    await self._audit.insert(replace(pending.event, outcome=outcome))
                elif outcome != "OK":
                    await self._audit.set_outcome(pending.event_id, outcome)
            elif outcome in _REFUSED:
                event = self._event() if self._event else self._unauthenticated_event()
                if event is not None:
                    await self._audit.insert(replace(event, outcome=outcome))
        except Exception:
            log.warning(
                "could not record the audit event of %s",
                self.method,
                exc_info=True,
                extra={"request_id": REQUEST_ID.get()},
            )

    def _unauthenticated_event(self) -> AuditEvent | None:
        """The event of a call refused before its caller was known."""
        rule, request = self._rule, self._request
        if rule is None or PRINCIPAL.get() is not None or not isinstance(request, Message):
            return None
        subject = rule.subject(request)
        app_id = "" if subject is None else rule.app_id(subject)
        if not ID_PATTERN.match(app_id):
            return None
        _, datasets = rule.target(subject)
        return AuditEvent(
            app_id=app_id,
            rpc=self.method,
            outcome="UNAUTHENTICATED",
            dataset_ids=rule.audited_datasets(subject, datasets),
            resource_ids=_resource_ids(request),
            request_id=REQUEST_ID.get(),
        )

    async def settle(self, context: Transport) -> None:
        """After a call that may have written: its WAL position, so that the caller's
        next reads wait for a replica that has it (read-your-writes)."""
        lsn = None if self._route is None else await self._route.settle()
        if lsn is not None:
            context.set_trailing_metadata(
                ((_REQUEST_ID_HEADER, REQUEST_ID.get()), (LSN_HEADER, format_lsn(lsn)))
            )

    async def fail(self, context: Transport, exc: Exception) -> None:
        request_id = REQUEST_ID.get()
        if self._in_band is not None:
            self._note(exc, request_id)
            self.answer = self._in_band(exc)
            return
        if isinstance(exc, DomainError):
            self.outcome = exc.kind.value
            status = to_rpc_status(exc, request_id)
            if exc.kind is ErrorKind.UNAVAILABLE and exc.__cause__ is not None:
                # PostgreSQL or the object store failed: the caller only learns that it may
                # retry; the log keeps what the driver said.
                log.warning(
                    "%s in %s: %r",
                    exc.reason,
                    self.method,
                    exc.__cause__,
                    extra={"request_id": request_id},
                )
        else:
            self.outcome = "INTERNAL"
            log.error(
                "unexpected error in %s",
                self.method,
                exc_info=exc,
                extra={"request_id": request_id},
            )
            status = internal_status(request_id)
        self.code = status.code
        trailing = (*status.trailing_metadata, (_REQUEST_ID_HEADER, request_id))
        # Before the status leaves: once it has, the caller may already look for the event.
        if self.records():
            await asyncio.shield(self.record())
        await context.abort(status.code, status.details, trailing)

    def _note(self, exc: Exception, request_id: str) -> None:
        """The outcome of an in-band failure, for the access log (and the server log when
        it is ours)."""
        if isinstance(exc, DomainError):
            self.outcome = exc.kind.value
            return
        self.outcome = "INTERNAL"
        log.error(
            "unexpected error in %s", self.method, exc_info=exc, extra={"request_id": request_id}
        )

    @contextlib.asynccontextmanager
    async def running(self, context: Transport) -> AsyncIterator[bool]:
        """Begins the call, turns its failure into a status and logs it when it ends;
        yields whether the call began (the body runs only then)."""
        metrics.RPC_IN_FLIGHT.inc()
        try:
            try:
                await self.begin(context)
            except Exception as exc:
                if self._in_band is None:
                    raise
                # Answered in-band (`answer`): the body is skipped.
                await self.fail(context, exc)
                yield False
                return
            yield True
            await self.settle(context)
        except grpc.aio.AbortError:
            self.outcome = "ABORTED_BY_HANDLER"
            self.code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except asyncio.CancelledError:
            # The caller cancelled or its deadline passed.
            self.code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            await self.fail(context, exc)
        finally:
            try:
                if self.records():
                    # Shielded: a cancelled call still completes its audit event.
                    await asyncio.shield(self.record())
            finally:
                # Even when the call is cancelled while its event is written. Without an
                # await before it when there is nothing to record (most reads): a
                # handler's abort has sent the status already, and the call's span and
                # metrics must be complete before the caller can look at them.
                self.done()

    def done(self) -> None:
        elapsed = time.perf_counter() - self._started
        metrics.RPC_IN_FLIGHT.dec()
        self._series.finished(self.code.name, elapsed)
        if self._span is not None:
            tracing.end_rpc(*self._span, self.code.name, self.code.value[0])
        elapsed_ms = elapsed * 1000
        log.info(
            "%s %s %.1fms",
            self.method,
            self.outcome,
            elapsed_ms,
            extra={"method": self.method, "outcome": self.outcome, "elapsed_ms": elapsed_ms},
        )


class RequestInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        authenticator: Authenticator,
        in_band: Callable[[str], Callable[[Exception], Message] | None] = lambda path: None,
        *,
        policy: Policy = POLICY,
        audit: AuditRepository | None = None,
        inputs: InputDatasets | None = None,
    ) -> None:
        """`in_band(path)` tells how the RPC at `path` answers a failure when it does so
        in its response (Clarifai's V2) rather than with a gRPC status; `inputs` finds
        the datasets of inputs named by id (without it, only app-wide callers reach them)."""
        self._authenticator = authenticator
        self._in_band = in_band
        self._policy = policy
        self._audit = audit
        self._inputs = inputs

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        authenticator = self._authenticator
        in_band = self._in_band(method)
        policy, audit, inputs = self._policy, self._audit, self._inputs
        metadata = tuple(handler_call_details.invocation_metadata or ())
        kwargs: dict[str, Any] = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        # The generic handler types describe sync behaviours; ours are coroutines.
        inner: Any = handler.unary_unary or handler.stream_unary
        if inner is not None:

            async def unary_response(request: Any, context: Context) -> Any:
                call = Call(
                    authenticator,
                    method,
                    metadata,
                    in_band,
                    policy=policy,
                    audit=audit,
                    inputs=inputs,
                )
                if handler.stream_unary:
                    # The first message (the header) names the app, to record a call
                    # refused before authentication.
                    first = await anext(aiter(request), None)
                    call.note_request(first)
                    request = _prepend(first, request)
                else:
                    call.note_request(request)
                async with call.running(context) as began:
                    if not began:
                        return call.answer
                    if handler.stream_unary:
                        return call.answered(await inner(_checked_stream(request, call), context))
                    admitted = _checked(await call.admitted(request))
                    return call.answered(await inner(admitted, context))
                return call.answer

            if handler.unary_unary:
                return grpc.unary_unary_rpc_method_handler(unary_response, **kwargs)
            return grpc.stream_unary_rpc_method_handler(unary_response, **kwargs)

        inner_stream: Any = handler.unary_stream or handler.stream_stream

        async def stream_response(request: Any, context: Context) -> AsyncIterator[Any]:
            call = Call(
                authenticator, method, metadata, in_band, policy=policy, audit=audit, inputs=inputs
            )
            if not handler.stream_stream:
                call.note_request(request)
            async with call.running(context) as began:
                if began:
                    request = (
                        _checked_stream(request, call)
                        if handler.stream_stream
                        else _checked(await call.admitted(request))
                    )
                    async for item in inner_stream(request, context):
                        yield item
            if call.answer is not None:
                yield call.answer

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(stream_response, **kwargs)
        return grpc.stream_stream_rpc_method_handler(stream_response, **kwargs)
