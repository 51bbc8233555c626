"""OpenTelemetry spans for RPCs, database queries and object-store calls.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set: then spans go
over OTLP/gRPC through a BatchSpanProcessor, configured by the standard OTEL_* variables
(OTEL_SERVICE_NAME defaults to "datasetd"). Hot paths test `ENABLED` before anything
else, so tracing that is off costs an attribute read and a branch.

The provider is this module's, not OpenTelemetry's global one: `configure(provider)` sets
it (tests pass an SDK provider with an in-memory exporter) and `configure(None)` turns
tracing off again. Span context still travels in OpenTelemetry's context variables, so a
query's span is a child of the RPC span it runs under.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from contextvars import ContextVar
from typing import TypeAlias

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.util.types import AttributeValue

# The span context captured on the event loop for a call that runs on another thread.
Parent: TypeAlias = Context

log = logging.getLogger(__name__)

ENABLED = False
_tracer: Tracer = trace.NoOpTracer()
_provider: TracerProvider | None = None

SERVICE_NAME = "datasetd"
# Statuses that mean the server failed, not the caller (OpenTelemetry's gRPC conventions):
# only these mark a server span as an error.
_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
# Both a context manager and an asynchronous one.
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()
# Statements are module constants: their operation names are computed once each. Bounded
# in case some caller builds SQL text per call.
_OPERATIONS: dict[str, str] = {}
_MAX_OPERATIONS = 4096
# The statement a Database helper's span covers, so that the connection it runs the
# statement on does not add a second span for it.
_STATEMENT: ContextVar[str | None] = ContextVar("datasetd_traced_statement", default=None)


def configure(provider: TracerProvider | None) -> None:
    """Sends spans to `provider` from now on; None turns tracing off."""
    # Module globals, not an object's attributes: hot paths read ENABLED with one lookup.
    global ENABLED, _tracer, _provider  # noqa: PLW0603
    _provider = provider
    if provider is None:
        _tracer = trace.NoOpTracer()
        ENABLED = False
    else:
        _tracer = provider.get_tracer("datasetd")
        ENABLED = True


def configure_from_env(env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """The OTLP exporter when the environment asks for one (else tracing stays off)."""
    env = os.environ if env is None else env
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    if not endpoint or disabled or env.get("OTEL_TRACES_EXPORTER", "").strip() == "none":
        configure(None)
        return None
    # Imported here: a process that does not trace need not load the SDK and the exporter.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself; only
    # when neither names the service is it "datasetd" rather than "unknown_service".
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = SdkTracerProvider(resource=resource)
    # The exporter reads the endpoint, headers, timeout and TLS settings from OTEL_*.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    configure(provider)
    log.info("tracing: exporting spans over OTLP to %s", endpoint)
    return provider


def shutdown() -> None:
    """Flushes and stops the configured provider (an SDK one), and turns tracing off."""
    provider = _provider
    configure(None)
    stop = getattr(provider, "shutdown", None)
    if stop is not None:
        stop()


# --- RPCs ---------------------------------------------------------------------------------


def start_rpc(
    method: str, request_id: str, metadata: Sequence[tuple[str, str | bytes]] = ()
) -> tuple[Span, object]:
    """Starts the server span of a call and makes it current for the rest of the call;
    end it with `end_rpc` in the same context. A caller's trace context in the metadata
    (W3C `traceparent`, or what OTEL_PROPAGATORS names) makes it the span's parent."""
    full = method.lstrip("/")
    service, _, name = full.rpartition("/")
    # Binary (-bin) values carry no text propagation headers.
    carrier = {k: v for k, v in metadata if isinstance(v, str)}
    span = _tracer.start_span(
        full,
        context=propagate.extract(carrier),
        kind=SpanKind.SERVER,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": name,
            "datasetd.request_id": request_id,
        },
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    return span, token


def end_rpc(span: Span, token: object, code: str, number: int) -> None:
    span.set_attribute("rpc.grpc.status_code", number)
    if code in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, code))
    span.end()
    otel_context.detach(token)  # type: ignore[arg-type]


# --- jobs -----------------------------------------------------------------------------------


def job_span(kind: str, job_id: int, attempt: int) -> AbstractContextManager[object]:
    """The root span of one run of a job: its queries and object-store calls are its
    children (the handler's task copies the context it is created in)."""
    if not ENABLED:
        return _NO_SPAN
    return _tracer.start_as_current_span(
        f"job {kind}",
        kind=SpanKind.CONSUMER,
        attributes={
            "datasetd.job.kind": kind,
            "datasetd.job.id": job_id,
            "datasetd.job.attempt": attempt,
        },
    )


# --- database -----------------------------------------------------------------------------


def operation_of(sql: str) -> str:
    """The statement's first keyword (SELECT, INSERT, WITH, ...): never its parameters,
    which asyncpg sends apart anyway, nor the text, which may be long."""
    name = _OPERATIONS.get(sql)
    if name is None:
        words = sql.split(None, 1)
        # asyncpg's own transaction statements come with a semicolon ("BEGIN;").
        name = words[0].rstrip(";").upper() if words else "EMPTY"
        if len(_OPERATIONS) < _MAX_OPERATIONS:
            _OPERATIONS[sql] = name
    return name


def _in_trace() -> bool:
    """Whether a span is current. Statements outside any (the job runner's polling, the
    queue sampler) would each start a trace of their own: noise, so they get none."""
    return trace.get_current_span().get_span_context().is_valid


@contextlib.contextmanager
def _statement_span(sql: str) -> Iterator[None]:
    operation = operation_of(sql)
    token = _STATEMENT.set(sql)
    try:
        with _tracer.start_as_current_span(
            operation,
            kind=SpanKind.CLIENT,
            attributes={"db.system": "postgresql", "db.operation": operation},
        ):
            yield
    finally:
        _STATEMENT.reset(token)


def db_span(sql: str) -> AbstractContextManager[object]:
    """The span of one statement run by a Database helper (from acquiring a connection to
    the result); a no-op context while tracing is off or outside a trace."""
    if not ENABLED or not _in_trace():
        return _NO_SPAN
    return _statement_span(sql)


def connection_span(sql: str) -> AbstractContextManager[object]:
    """The span of one statement run on a connection: every statement a repository runs on
    a connection it holds, and none the Database helper already has a span for."""
    if not ENABLED or _STATEMENT.get() is sql or not _in_trace():
        return _NO_SPAN
    return _statement_span(sql)


@contextlib.asynccontextmanager
async def _transaction_span(operation: str) -> AsyncIterator[None]:
    with _tracer.start_as_current_span(
        operation,
        kind=SpanKind.CLIENT,
        attributes={"db.system": "postgresql", "db.operation": operation},
    ):
        yield


def db_transaction_span(nested: bool) -> AbstractAsyncContextManager[object]:
    """The span around a transaction (a savepoint when `nested`): its statements are its
    children. Asynchronous so that it joins the `async with` that opens the transaction."""
    if not ENABLED or not _in_trace():
        return _NO_SPAN
    return _transaction_span("SAVEPOINT" if nested else "TRANSACTION")


# --- object store -------------------------------------------------------------------------


def current_context() -> Context | None:
    """The context to parent spans started on another thread (None while tracing is off:
    capturing it would cost for nothing)."""
    return otel_context.get_current() if ENABLED else None


@contextlib.contextmanager
def _object_store_span(operation: str, bucket: str, parent: Context) -> Iterator[None]:
    attributes: dict[str, AttributeValue] = {
        "rpc.system": "aws-api",
        "rpc.service": "S3",
        "rpc.method": operation,
        "aws.s3.bucket": bucket,
        "datasetd.object_store.operation": operation,
    }
    with _tracer.start_as_current_span(
        f"S3 {operation}", context=parent, kind=SpanKind.CLIENT, attributes=attributes
    ):
        yield


def object_store_span(
    operation: str, bucket: str, parent: Context | None
) -> AbstractContextManager[object]:
    """The span of one object-store call, run on a worker thread under `parent` (from
    `current_context()` on the event loop)."""
    if parent is None or not ENABLED:
        return _NO_SPAN
    return _object_store_span(operation, bucket, parent)
