"""Prometheus metrics (names start with `datasetd_`).

Two registries, neither of them prometheus_client's global default one:

- `REGISTRY`, the process's: what calls, jobs and object-store requests add to as they
  happen. Created once at import, so that several servers in one process (the tests)
  share its series instead of registering them twice ("Duplicated timeseries").
- `InstanceMetrics.registry`, one per running server: gauges read from that server's own
  resources at scrape time (its connection pools, its job queue sample).

`/metrics` serves both (`exposition`). Hot paths hold on to labelled children
(`rpc_series`, `object_store_series`) instead of calling `.labels()` per event: `.labels()`
takes a lock and builds a key every time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# ~1 ms to 60 s: a GetDataset takes a few milliseconds, an UploadInput of a large file or a
# slow ListInputs page seconds.
RPC_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Jobs (version builds, exports, imports) run from a second to hours.
JOB_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)

# No `<name>_created` series beside every counter and histogram: Prometheus stores them as
# gauges of their own, doubling the series for a start time the process start already gives.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)

RPC_REQUESTS = Counter(
    "datasetd_rpc_requests",
    "RPCs answered, by full method name and gRPC status code name.",
    ["method", "code"],
    registry=REGISTRY,
)
RPC_DURATION = Histogram(
    "datasetd_rpc_duration_seconds",
    "Time from the call's arrival to its status, by full method name.",
    ["method"],
    buckets=RPC_BUCKETS,
    registry=REGISTRY,
)
RPC_IN_FLIGHT = Gauge(
    "datasetd_rpc_in_flight",
    "RPCs being served now.",
    registry=REGISTRY,
    # Several worker processes (DATASETD_WORKERS): the sum over those alive.
    multiprocess_mode="livesum",
)
JOB_DURATION = Histogram(
    "datasetd_job_duration_seconds",
    "Time a job run took, by job kind and how the run ended (succeeded, failed, cancelled, "
    "retry, abandoned).",
    ["kind", "outcome"],
    buckets=JOB_BUCKETS,
    registry=REGISTRY,
)
INGEST_ITEMS = Counter(
    "datasetd_ingest_items",
    "Inputs created by CreateInputs, UploadInput and ImportDataset.",
    registry=REGISTRY,
)
INGEST_BYTES = Counter(
    "datasetd_ingest_bytes",
    "Bytes ingested: the stored media of CreateInputs and UploadInput inputs, the archives "
    "of ImportDataset.",
    registry=REGISTRY,
)
EXPORT_ITEMS = Counter(
    "datasetd_export_items",
    "Inputs written into export archives that were completed.",
    registry=REGISTRY,
)
EXPORT_BYTES = Counter(
    "datasetd_export_bytes",
    "Bytes of the export archives that were completed.",
    registry=REGISTRY,
)
OBJECT_STORE_DURATION = Histogram(
    "datasetd_object_store_duration_seconds",
    "Time of an object-store call, by operation.",
    ["operation"],
    buckets=RPC_BUCKETS,
    registry=REGISTRY,
)
OBJECT_STORE_ERRORS = Counter(
    "datasetd_object_store_errors",
    "Object-store calls that raised, by operation.",
    ["operation"],
    registry=REGISTRY,
)


class RpcSeries:
    """The children of one method's series, so a call costs two dict lookups and the
    increments."""

    __slots__ = ("_codes", "_method", "duration")

    def __init__(self, method: str) -> None:
        self._method = method
        self.duration = RPC_DURATION.labels(method)
        self._codes: dict[str, Counter] = {}

    def finished(self, code: str, seconds: float) -> None:
        counter = self._codes.get(code)
        if counter is None:
            counter = self._codes.setdefault(code, RPC_REQUESTS.labels(self._method, code))
        counter.inc()
        self.duration.observe(seconds)


_rpc_series: dict[str, RpcSeries] = {}


def rpc_series(method: str) -> RpcSeries:
    """The series of `method`, a full gRPC method name such as
    "/datasetd.v1.DatasetService/GetDataset" (labelled without the leading slash). Only
    methods the server has handlers for reach here, so the label values are bounded."""
    series = _rpc_series.get(method)
    if series is None:
        series = _rpc_series.setdefault(method, RpcSeries(method.lstrip("/")))
    return series


@dataclass(frozen=True)
class ObjectStoreSeries:
    duration: Histogram
    errors: Counter


_store_series: dict[str, ObjectStoreSeries] = {}
_store_lock = threading.Lock()


def object_store_series(operation: str) -> ObjectStoreSeries:
    """The series of an object-store operation; called from the store's worker threads."""
    series = _store_series.get(operation)
    if series is None:
        with _store_lock:
            series = _store_series.get(operation)
            if series is None:
                series = ObjectStoreSeries(
                    OBJECT_STORE_DURATION.labels(operation), OBJECT_STORE_ERRORS.labels(operation)
                )
                _store_series[operation] = series
    return series


def job_finished(kind: str, outcome: str, seconds: float) -> None:
    JOB_DURATION.labels(kind, outcome).observe(seconds)


def ingested(items: int, size: int) -> None:
    if items:
        INGEST_ITEMS.inc(items)
    if size:
        INGEST_BYTES.inc(size)


def exported(items: int, size: int) -> None:
    if items:
        EXPORT_ITEMS.inc(items)
    if size:
        EXPORT_BYTES.inc(size)


class Pool(Protocol):
    """What the pool gauges read (an asyncpg pool)."""

    def get_size(self) -> int: ...

    def get_idle_size(self) -> int: ...

    def get_max_size(self) -> int: ...


@dataclass(frozen=True)
class QueuedJobs:
    """One kind's pending jobs at the last sample."""

    count: int
    oldest_age_seconds: float


@dataclass(eq=False)  # the registry keys its collectors by identity
class _InstanceCollector(Collector):
    pools: dict[str, Pool] = field(default_factory=dict)
    job_kinds: tuple[str, ...] = ()
    queued: Mapping[str, QueuedJobs] | None = None

    def collect(self) -> Iterable[Metric]:
        connections = GaugeMetricFamily(
            "datasetd_db_pool_connections",
            "PostgreSQL pool connections: in_use, idle, max (the pool's limit).",
            labels=["pool", "state"],
        )
        for name, pool in self.pools.items():
            size, idle = pool.get_size(), pool.get_idle_size()
            connections.add_metric([name, "in_use"], size - idle)
            connections.add_metric([name, "idle"], idle)
            connections.add_metric([name, "max"], pool.get_max_size())
        yield connections
        if self.queued is None:
            # Not sampled yet: no value rather than a false zero.
            return
        queued = GaugeMetricFamily(
            "datasetd_jobs_queued", "Jobs waiting to run, by kind.", labels=["kind"]
        )
        oldest = GaugeMetricFamily(
            "datasetd_jobs_oldest_queued_age_seconds",
            "Age of the oldest job waiting to run, by kind (0 when none waits).",
            labels=["kind"],
        )
        for kind in sorted({*self.job_kinds, *self.queued}):
            sample = self.queued.get(kind, QueuedJobs(0, 0.0))
            queued.add_metric([kind], sample.count)
            oldest.add_metric([kind], sample.oldest_age_seconds)
        yield queued
        yield oldest


class InstanceMetrics:
    """The gauges of one running server, read at scrape time."""

    def __init__(self, job_kinds: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _InstanceCollector(job_kinds=tuple(job_kinds))
        self.registry.register(self._collector)

    def watch_pool(self, name: str, pool: Pool) -> None:
        """Reports `pool` as datasetd_db_pool_connections{pool=name}."""
        self._collector.pools[name] = pool

    def set_job_queue(self, queued: Mapping[str, QueuedJobs]) -> None:
        self._collector.queued = dict(queued)


def exposition(instance: InstanceMetrics | None = None) -> bytes:
    """The Prometheus text format of the process's series and `instance`'s."""
    text = generate_latest(REGISTRY)
    if instance is not None:
        text += generate_latest(instance.registry)
    return text
