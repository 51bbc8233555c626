from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest
import urllib3
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from prometheus_client.parser import text_string_to_metric_families

from service.config import Config, ConfigError
from service.domain.errors import Unavailable
from service.domain.jobs import Job, JobFailed, JobKind, JobStatus, Progress
from service.domain.models import FidelityReport, VersionMember
from service.domain.ports import ByteSink
from service.formats.archives import _CountedWriter, _CountingSink
from service.jobs import JobRunner
from service.observability import REQUEST_ID, JsonFormatter, _RequestIdFilter, metrics, tracing
from service.observability.metrics import InstanceMetrics, QueuedJobs
from service.storage.objectstore.store import _translated
from service.tools import import_rules


def test_json_log_lines_carry_the_request_id_and_extras() -> None:
    record = logging.makeLogRecord(
        {"name": "datasetd.access", "levelname": "INFO", "msg": "call %s", "args": ("x",)}
    )
    record.method = "/datasetd.v1.DatasetService/GetDataset"
    token = REQUEST_ID.set("req-42")
    try:
        assert _RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "call x"
    assert line["request_id"] == "req-42"
    assert line["method"] == "/datasetd.v1.DatasetService/GetDataset"
    assert line["level"] == "info"


# --- metrics ---------------------------------------------------------------------------------


def _samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def test_rpc_series_are_cached_per_method_and_counted_by_code() -> None:
    method = f"/test.v1.Service/Method{secrets.token_hex(4)}"
    series = metrics.rpc_series(method)
    assert metrics.rpc_series(method) is series
    series.finished("OK", 0.002)
    series.finished("OK", 0.2)
    series.finished("NOT_FOUND", 90.0)
    found = _samples(metrics.exposition())
    label = method.lstrip("/")

    def at(name: str, **labels: str) -> float:
        return found[(name, frozenset(labels.items()))]

    assert at("datasetd_rpc_requests_total", method=label, code="OK") == 2
    assert at("datasetd_rpc_requests_total", method=label, code="NOT_FOUND") == 1
    assert at("datasetd_rpc_duration_seconds_count", method=label) == 3
    assert at("datasetd_rpc_duration_seconds_bucket", method=label, le="0.001") == 0
    assert at("datasetd_rpc_duration_seconds_bucket", method=label, le="0.0025") == 1
    assert at("datasetd_rpc_duration_seconds_bucket", method=label, le="60.0") == 2
    assert at("datasetd_rpc_duration_seconds_bucket", method=label, le="+Inf") == 3


@dataclass
class _Pool:
    size: int
    idle: int
    limit: int

    def get_size(self) -> int:
        return self.size

    def get_idle_size(self) -> int:
        return self.idle

    def get_max_size(self) -> int:
        return self.limit


def test_each_server_reports_its_own_pool_and_queue_beside_the_shared_series() -> None:
    # Two servers in one process, as in the tests: no "Duplicated timeseries".
    first, second = InstanceMetrics(["build", "export"]), InstanceMetrics(["build", "export"])
    pool = _Pool(size=4, idle=1, limit=10)
    first.watch_pool("primary", pool)
    second.watch_pool("primary", _Pool(size=2, idle=2, limit=5))
    found = _samples(metrics.exposition(first))
    assert (
        found[
            ("datasetd_db_pool_connections", frozenset({("pool", "primary"), ("state", "in_use")}))
        ]
        == 3
    )
    assert (
        found[("datasetd_db_pool_connections", frozenset({("pool", "primary"), ("state", "idle")}))]
        == 1
    )
    assert (
        found[("datasetd_db_pool_connections", frozenset({("pool", "primary"), ("state", "max")}))]
        == 10
    )
    # Not sampled yet: no queue value rather than a false zero.
    assert not any(name == "datasetd_jobs_queued" for name, _ in found)
    assert ("datasetd_rpc_in_flight", frozenset()) in found

    pool.idle = 4  # read at scrape time
    first.set_job_queue({"build": QueuedJobs(3, 42.5)})
    found = _samples(metrics.exposition(first))
    assert (
        found[
            ("datasetd_db_pool_connections", frozenset({("pool", "primary"), ("state", "in_use")}))
        ]
        == 0
    )
    assert found[("datasetd_jobs_queued", frozenset({("kind", "build")}))] == 3
    assert found[("datasetd_jobs_queued", frozenset({("kind", "export")}))] == 0
    assert (
        found[("datasetd_jobs_oldest_queued_age_seconds", frozenset({("kind", "build")}))] == 42.5
    )
    assert found[("datasetd_jobs_oldest_queued_age_seconds", frozenset({("kind", "export")}))] == 0
    other = _samples(metrics.exposition(second))
    assert (
        other[("datasetd_db_pool_connections", frozenset({("pool", "primary"), ("state", "max")}))]
        == 5
    )


def _counter(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_object_store_calls_are_timed_and_failures_counted_by_operation() -> None:
    operation = f"op-{secrets.token_hex(4)}"

    def unreachable() -> None:
        raise urllib3.exceptions.NewConnectionError(None, "refused")  # type: ignore[arg-type]

    ok = _translated(lambda: 7, operation, "bucket", None)
    assert ok() == 7
    with pytest.raises(Unavailable):
        _translated(unreachable, operation, "bucket", None)()
    assert _counter("datasetd_object_store_duration_seconds_count", operation=operation) == 2
    assert _counter("datasetd_object_store_errors_total", operation=operation) == 1


class _Archive:
    """An ArchiveWriter writing one byte per member."""

    def __init__(self, sink: ByteSink) -> None:
        self.sink = sink

    @property
    def needs_census(self) -> bool:
        return False

    async def observe(self, members: list[VersionMember]) -> list[frozenset[str]]:
        return [frozenset() for _ in members]

    async def labels(self, members: list[VersionMember]) -> list[frozenset[str]]:
        return [frozenset() for _ in members]

    async def write(self, split: str, members: list[VersionMember]) -> int:
        await self.sink.write(b"x" * len(members))
        return len(members)

    async def finish(self) -> FidelityReport:
        await self.sink.write(b"end")
        return FidelityReport()


class _Sink:
    async def write(self, chunk: bytes) -> None:
        pass


async def test_an_export_counts_its_members_and_bytes_once_complete() -> None:
    items, size = _counter("datasetd_export_items_total"), _counter("datasetd_export_bytes_total")
    counted = _CountingSink(_Sink())
    writer = _CountedWriter(_Archive(counted), counted)
    members = [cast(VersionMember, object())] * 3
    await writer.write("train", members)
    await writer.write("test", members[:1])
    # Counted only once complete: a failed run adds nothing.
    assert _counter("datasetd_export_items_total") == items
    await writer.finish()
    assert _counter("datasetd_export_items_total") == items + 4
    assert _counter("datasetd_export_bytes_total") == size + 4 + len(b"end")


# --- jobs --------------------------------------------------------------------------------------


class _OneJobQueue:
    """Hands out one job, then none; remembers how it ended."""

    def __init__(self, job: Job) -> None:
        self.job: Job | None = job
        self.ended: JobStatus | None = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield

    async def claim(
        self, kinds: Collection[JobKind], worker_id: str, lease: timedelta
    ) -> Job | None:
        job, self.job = self.job, None
        return job

    async def heartbeat(
        self, job_id: int, worker_id: str, lease: timedelta, *, progress: int | None = None
    ) -> JobStatus | None:
        return JobStatus.RUNNING

    async def finish(
        self, job_id: int, worker_id: str, status: JobStatus, error: str = ""
    ) -> JobStatus | None:
        self.ended = status
        return status

    async def release(
        self, job_id: int, worker_id: str, *, counted: bool = True
    ) -> JobStatus | None:
        self.ended = JobStatus.PENDING
        return JobStatus.PENDING


class _Handler:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    async def run(self, job: Job, progress: Progress) -> None:
        await progress(50)
        if self.error is not None:
            raise self.error

    async def failed(self, job: Job, message: str) -> None:
        pass


@pytest.mark.parametrize(
    ("error", "outcome"),
    [(None, "succeeded"), (JobFailed("bad payload"), "failed"), (RuntimeError("bug"), "retry")],
)
async def test_job_runs_are_timed_by_kind_and_outcome(
    error: Exception | None, outcome: str
) -> None:
    kind = JobKind.BUILD_VERSION
    before = _counter("datasetd_job_duration_seconds_count", kind=kind.value, outcome=outcome)
    queue = _OneJobQueue(Job(1, kind, "app", attempts=1))
    runner = JobRunner(queue, {kind: _Handler(error)}, worker_id="unit")
    assert await runner.run_once()
    assert not await runner.run_once()
    after = _counter("datasetd_job_duration_seconds_count", kind=kind.value, outcome=outcome)
    assert after == before + 1


# --- traces ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "operation"),
    [
        ("SELECT 1", "SELECT"),
        ("\n    insert into inputs (id) VALUES ($1)", "INSERT"),
        ("WITH claimed AS (UPDATE jobs SET x = 1) SELECT 1", "WITH"),
        ("BEGIN;", "BEGIN"),
        ("   ", "EMPTY"),
    ],
)
def test_a_statement_is_named_by_its_first_keyword(sql: str, operation: str) -> None:
    assert tracing.operation_of(sql) == operation


def test_tracing_is_off_without_an_otlp_endpoint() -> None:
    assert tracing.configure_from_env({}) is None
    assert not tracing.ENABLED
    with tracing.db_span("SELECT 1"), tracing.job_span("k", 1, 1):
        assert not trace.get_current_span().get_span_context().is_valid
    assert tracing.current_context() is None


def test_an_otlp_endpoint_turns_tracing_on_under_the_service_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    try:
        provider = tracing.configure_from_env(env)
        assert isinstance(provider, SdkTracerProvider)
        assert tracing.ENABLED
        assert provider.resource.attributes["service.name"] == "datasetd"
    finally:
        tracing.shutdown()
    assert not tracing.ENABLED
    monkeypatch.setenv("OTEL_SERVICE_NAME", "datasetd-eu")
    try:
        provider = tracing.configure_from_env(env)
        assert isinstance(provider, SdkTracerProvider)
        assert provider.resource.attributes["service.name"] == "datasetd-eu"
    finally:
        tracing.shutdown()
    assert tracing.configure_from_env({**env, "OTEL_SDK_DISABLED": "true"}) is None


# --- configuration and layering ----------------------------------------------------------------


@pytest.mark.parametrize("listen", ["off", "127.0.0.1:0", "0.0.0.0:9464", ":8080", "[::1]:65535"])
def test_the_http_port_is_host_port_or_off(listen: str) -> None:
    assert Config.from_env({"DATASETD_HTTP_LISTEN": listen}).http_listen == listen


@pytest.mark.parametrize("listen", ["", "8080", "localhost", "host:65536", "host:http", "on"])
def test_a_bad_http_port_names_its_variable(listen: str) -> None:
    with pytest.raises(ConfigError, match="DATASETD_HTTP_LISTEN"):
        Config.from_env({"DATASETD_HTTP_LISTEN": listen})


@pytest.mark.parametrize(
    "source",
    [
        "from service.observability import metrics\n",
        "import prometheus_client\n",
        "from opentelemetry import trace\n",
    ],
)
def test_the_domain_records_no_metrics_or_spans_itself(tmp_path: Path, source: str) -> None:
    path = tmp_path / "service" / "domain" / "rules.py"
    path.parent.mkdir(parents=True)
    path.write_text(source)
    (violation,) = import_rules.check(tmp_path)
    assert violation.package == "service.domain"
    assert "callback" in violation.why
