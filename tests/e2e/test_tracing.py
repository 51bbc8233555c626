"""OpenTelemetry spans of the real server, over a real channel, caught by the SDK's
in-memory exporter: one server span per RPC carrying the request id the caller got back,
with the database and object-store spans of the call as its descendants."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from datasetd.v1 import data_pb2, dataset_pb2, input_pb2
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import input_service_pb2 as iapi
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from service.app import Running
from service.observability import tracing
from tests.conftest import Caller, Stack, stack_env
from tests.processes import run_server, stub_for

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

SQL_OPERATIONS = {
    *("SELECT", "INSERT", "UPDATE", "DELETE", "WITH"),
    # A transaction's span and asyncpg's statements that open, end and nest it.
    *("TRANSACTION", "BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"),
}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Tracing on for one test; off again afterwards, for the tests sharing the server."""
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracing.configure(provider)
    try:
        yield exported
    finally:
        tracing.configure(None)
        provider.shutdown()


async def request_id_of(call: Any) -> str:
    """The x-request-id the server put in the call's trailing metadata."""
    trailing = await call.trailing_metadata()
    return next(str(v) for k, v in trailing if k == "x-request-id")


def rpc_span(spans: tuple[ReadableSpan, ...], request_id: str) -> ReadableSpan:
    (found,) = [
        s
        for s in spans
        if s.kind is SpanKind.SERVER
        and (s.attributes or {}).get("datasetd.request_id") == request_id
    ]
    return found


def descendants(spans: tuple[ReadableSpan, ...], root: ReadableSpan) -> list[ReadableSpan]:
    """The spans under `root`, following parent links (not just a shared trace id)."""
    assert root.context is not None
    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    found = []
    for span in spans:
        parent = span.parent
        while parent is not None:
            if parent.span_id == root.context.span_id:
                assert span.context is not None
                assert span.context.trace_id == root.context.trace_id
                found.append(span)
                break
            above = by_id.get(parent.span_id)
            parent = above.parent if above is not None else None
    return found


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_rpc_database_and_object_store_spans_form_one_trace_per_call(
    server: Running,
    caller: Caller,
    datasets: Datasets,
    inputs: Inputs,
    exporter: InMemorySpanExporter,
) -> None:
    create_dataset = datasets.CreateDataset(
        dapi.CreateDatasetRequest(app_id=caller.app_id, dataset=dataset_pb2.Dataset(id="traced")),
        metadata=caller.metadata,
    )
    await create_dataset
    url = "https://example.com/cat.jpg"
    create_inputs = inputs.CreateInputs(
        iapi.CreateInputsRequest(
            app_id=caller.app_id,
            inputs=[
                input_pb2.Input(
                    id="by-url",
                    data=data_pb2.Data(image=data_pb2.Image(url=url)),
                    dataset_ids=["traced"],
                ),
                # Content no other test stored: the store is written, not just asked.
                input_pb2.Input(
                    id="inline",
                    data=data_pb2.Data(text=data_pb2.Text(raw=secrets.token_hex(16))),
                ),
            ],
        ),
        metadata=caller.metadata,
    )
    created = await create_inputs
    assert [r.input.id for r in created.results] == ["by-url", "inline"]
    get_dataset = datasets.GetDataset(
        dapi.GetDatasetRequest(app_id=caller.app_id, dataset_id="traced"),
        metadata=caller.metadata,
    )
    await get_dataset
    spans = exporter.get_finished_spans()

    calls = [
        ("datasetd.v1.DatasetService", "CreateDataset", create_dataset),
        ("datasetd.v1.InputService", "CreateInputs", create_inputs),
        ("datasetd.v1.DatasetService", "GetDataset", get_dataset),
    ]
    for service, method, call in calls:
        request_id = await request_id_of(call)
        span = rpc_span(spans, request_id)
        assert span.name == f"{service}/{method}"
        assert attributes(span) == {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            "datasetd.request_id": request_id,
            "rpc.grpc.status_code": 0,
        }
        assert span.status.status_code is not StatusCode.ERROR
        under = descendants(spans, span)
        queries = [s for s in under if attributes(s).get("db.system") == "postgresql"]
        assert queries, f"{method}: no database span under the RPC span"
        for query in queries:
            assert query.kind is SpanKind.CLIENT
            # The statement's keyword only: never parameters (nor the app id in them).
            assert attributes(query) == {
                "db.system": "postgresql",
                "db.operation": query.name,
            }
            assert query.name in SQL_OPERATIONS

    under = descendants(spans, rpc_span(spans, await request_id_of(create_inputs)))
    stored = [s for s in under if attributes(s).get("rpc.system") == "aws-api"]
    # The text is stored; the URL input is kept by reference (fetching is off).
    assert [s.name for s in stored if attributes(s)["rpc.method"] == "put"] == ["S3 put"]
    for span in stored:
        assert span.kind is SpanKind.CLIENT
        assert attributes(span)["aws.s3.bucket"] == server.resources.objects.bucket
    # The statements of a transaction are children of its span.
    transactions = [s for s in under if s.name == "TRANSACTION"]
    assert transactions
    assert any(
        s.parent is not None and s.parent.span_id == transactions[0].context.span_id
        for s in under
        if transactions[0].context is not None
    )


async def test_a_failed_call_carries_its_status_code(
    caller: Caller, datasets: Datasets, exporter: InMemorySpanExporter
) -> None:
    call = datasets.GetDataset(
        dapi.GetDatasetRequest(app_id=caller.app_id, dataset_id="missing"),
        metadata=caller.metadata,
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    span = rpc_span(exporter.get_finished_spans(), await request_id_of(call))
    assert attributes(span)["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # The caller's mistake, not the server's: not an error span.
    assert span.status.status_code is not StatusCode.ERROR


async def test_a_callers_trace_context_is_continued(
    caller: Caller, datasets: Datasets, exporter: InMemorySpanExporter
) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    call = datasets.GetDataset(
        dapi.GetDatasetRequest(app_id=caller.app_id, dataset_id="anything"),
        metadata=(*caller.metadata, ("traceparent", f"00-{trace_id}-{parent_id}-01")),
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    span = rpc_span(exporter.get_finished_spans(), await request_id_of(call))
    assert span.context is not None and span.parent is not None
    assert span.context.trace_id == int(trace_id, 16)
    assert span.parent.span_id == int(parent_id, 16)
    assert span.parent.is_remote


async def test_no_spans_while_tracing_is_off(
    caller: Caller, datasets: Datasets, exporter: InMemorySpanExporter
) -> None:
    tracing.configure(None)
    await datasets.CreateDataset(
        dapi.CreateDatasetRequest(app_id=caller.app_id, dataset=dataset_pb2.Dataset(id="dark")),
        metadata=caller.metadata,
    )
    assert exporter.get_finished_spans() == ()


# --- OTLP from a server process configured by the environment -------------------------------


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """The receiving end of OTLP/gRPC, as a collector would run it."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, str], trace_pb2.Span]] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans += [(resource, span) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


def _attribute(span: trace_pb2.Span, key: str) -> str:
    return next((a.value.string_value for a in span.attributes if a.key == key), "")


async def test_a_server_exports_its_spans_over_otlp_when_the_endpoint_is_set(
    stack: Stack, caller: Caller
) -> None:
    collector = _Collector()
    receiver = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)  # type: ignore[no-untyped-call]
    port = receiver.add_insecure_port("127.0.0.1:0")
    await receiver.start()
    env = {
        **stack_env(stack),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        # Batches leave every 100 ms instead of every 5 s.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    env.pop("OTEL_SERVICE_NAME", None)
    try:
        async with run_server(env) as process, stub_for(process.address) as datasets:
            call = datasets.CreateDataset(
                dapi.CreateDatasetRequest(
                    app_id=caller.app_id, dataset=dataset_pb2.Dataset(id="otlp")
                ),
                metadata=caller.metadata,
            )
            await call
            request_id = await request_id_of(call)
            deadline = time.monotonic() + 15
            while True:
                rpcs = [
                    (resource, span)
                    for resource, span in collector.spans
                    if _attribute(span, "datasetd.request_id") == request_id
                ]
                if rpcs:
                    break
                assert time.monotonic() < deadline, "no span reached the collector"
                await asyncio.sleep(0.1)
            ((resource, rpc),) = rpcs
            assert resource["service.name"] == "datasetd"
            assert rpc.name == "datasetd.v1.DatasetService/CreateDataset"
            assert rpc.kind == trace_pb2.Span.SPAN_KIND_SERVER
            # The queries of the call were batched with it or before it (ended first).
            queries = [
                span
                for _, span in collector.spans
                if span.trace_id == rpc.trace_id and _attribute(span, "db.system") == "postgresql"
            ]
            assert queries
            assert all(q.kind == trace_pb2.Span.SPAN_KIND_CLIENT for q in queries)
    finally:
        await receiver.stop(None)
