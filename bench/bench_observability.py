"""Benchmark of what metrics and traces add to every call, beside a whole unary call
through the real interceptor over loopback gRPC in the same run.

Per RPC the interceptor moves the in-flight gauge up and down, counts the call under its
method and code and observes its latency (labelled children cached per method), and tests
the tracing flag; per statement a pool connection tests the flag too. With tracing on, each
RPC also starts and ends a server span (SDK provider, batch processor, an exporter that
drops the spans). Figures are medians of rounds.

    .venv/bin/python -m bench.bench_observability [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from bench.common import environment, load_average
from service.api.interceptors import RequestInterceptor
from service.domain.models import Principal
from service.observability import metrics, tracing


def per_op_ns(fn: Callable[[], None], count: int, rounds: int) -> float:
    timings = []
    for _ in range(rounds):
        started = time.perf_counter_ns()
        for _ in range(count):
            fn()
        timings.append((time.perf_counter_ns() - started) / count)
    return statistics.median(timings)


def rpc_metrics() -> None:
    # What _Call does for metrics, in the order it does it.
    series = metrics.rpc_series("/datasetd.v1.DatasetService/GetDataset")
    metrics.RPC_IN_FLIGHT.inc()
    if tracing.ENABLED:
        raise AssertionError("tracing must be off here")
    metrics.RPC_IN_FLIGHT.dec()
    series.finished("OK", 0.0012)


def statement_off() -> None:
    with tracing.connection_span("SELECT 1"):
        pass


def rpc_span() -> None:
    span, token = tracing.start_rpc("/datasetd.v1.DatasetService/GetDataset", "request-id")
    tracing.end_rpc(span, token, "OK", 0)


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class _Anyone:
    async def authenticate(self, secret: str) -> Principal:
        return Principal(app_id="bench", key_id="bench", scopes=frozenset({"read"}))


async def unary_calls(count: int) -> float:
    """Microseconds per sequential unary call through RequestInterceptor over loopback."""

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    server = grpc.aio.server(interceptors=[RequestInterceptor(_Anyone())])  # type: ignore[arg-type]
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/bench.Echo/Call"
            )
            key = (("authorization", "Key bench"),)
            for _ in range(200):
                await call(b"x", metadata=key)
            started = time.perf_counter()
            for _ in range(count):
                await call(b"x", metadata=key)
            return (time.perf_counter() - started) / count * 1e6
    finally:
        await server.stop(None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args().quick
    count, rounds, calls = (20_000, 5, 1_000) if quick else (100_000, 9, 5_000)
    load_before = load_average()
    tracing.configure(None)
    call_us = asyncio.run(unary_calls(calls))
    metrics_ns = per_op_ns(rpc_metrics, count, rounds)
    statement_ns = per_op_ns(statement_off, count, rounds)
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Drop(), max_queue_size=count))
    tracing.configure(provider)
    try:
        span_ns = per_op_ns(rpc_span, count // 4, rounds)
    finally:
        tracing.configure(None)
        provider.shutdown()
    print(f"unary call through the interceptor, loopback: {call_us:8.1f} us/call (sequential)")
    print(
        f"metrics per RPC (gauge up/down, count, histogram): {metrics_ns / 1000:6.2f} us "
        f"= {metrics_ns / 10 / call_us:.2f}% of a call"
    )
    print(f"tracing off, per statement (flag test, null context): {statement_ns:6.0f} ns")
    print(f"tracing on, server span per RPC (SDK, batch processor): {span_ns / 1000:6.2f} us")
    print(environment(load_before))


if __name__ == "__main__":
    main()
