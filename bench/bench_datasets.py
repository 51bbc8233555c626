"""Benchmark of DatasetService through the real server, beside raw limits of the same run.

Starts the embedded stack (PostgreSQL + SeaweedFS) in a temporary directory and the
real server as a subprocess (`python -m service serve`), then measures CreateDataset,
GetDataset and ListDatasets over a real gRPC channel with the generated stubs, one call
in flight and N calls in flight. Interleaved with those, in alternating order, it
measures what the building blocks can do on the same machine at the same moment:
asyncpg round trips to the same database (single-row INSERT, primary-key SELECT, a
keyset page of 50 rows; one connection, or a pool of N whose release costs no round
trip) and the gRPC floor (Health/Check on the same server process, no auth, no database).
The CPU speed of the machines this runs on swings in phases of seconds (see
shared/spec/performance-notes.md), so the figures reported are medians over rounds and
the service/raw ratios are medians of per-round ratios.

    .venv/bin/python -m bench.bench_datasets            # ~2-3 minutes
    .venv/bin/python -m bench.bench_datasets --quick    # ~30 s smoke run
    .venv/bin/python -m bench.bench_datasets --json results.json
    .venv/bin/python -m bench.bench_datasets --quick --profile-server /tmp/server.prof
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import platform
import pstats
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final, TypeAlias

import asyncpg
import grpc
from datasetd.v1 import common_pb2, dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.storage.embedded import EmbeddedStack

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
APP_ID: Final = "bench"
BUCKET: Final = "datasetd-bench"
PAGE_SIZE: Final = 50
SERVER_START_TIMEOUT: Final = 90.0
SERVER_STOP_TIMEOUT: Final = 30.0
# Rows of the raw scratch table, shaped like a small dataset row.
RAW_COLUMNS: Final = "app_id, id, description, notes, metadata, created_at, modified_at"
RAW_TABLE_DDL: Final = """
CREATE TABLE IF NOT EXISTS bench_raw (
    app_id      text NOT NULL,
    id          text NOT NULL,
    description text NOT NULL DEFAULT '',
    notes       text NOT NULL DEFAULT '',
    metadata    jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    modified_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, id)
)
"""
RAW_INSERT: Final = (
    "INSERT INTO bench_raw (app_id, id, description, metadata) VALUES ($1, $2, $3, $4::jsonb)"
)
RAW_SELECT: Final = f"SELECT {RAW_COLUMNS} FROM bench_raw WHERE app_id = $1 AND id = $2"
RAW_PAGE: Final = (
    f"SELECT {RAW_COLUMNS} FROM bench_raw WHERE app_id = $1 AND id > $2 ORDER BY id LIMIT $3"
)
METADATA: Final[dict[str, Any]] = {"source": "bench", "labels": ["a", "b"], "size": 3}

Op = Callable[[int], Awaitable[None]]
"""One call; the argument is the index of the worker making it (0..concurrency-1)."""


# ---------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class Settings:
    calls: int
    concurrency: int
    rounds: int
    seed: int
    budget: float
    max_seconds: float
    warmup_calls: int
    json_path: Path | None
    quick: bool
    profile_server: Path | None


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_datasets",
        description="DatasetService throughput and latency beside raw limits of the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run")
    parser.add_argument(
        "--calls", type=int, help="calls per measurement (default 1000; 200 with --quick)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="calls in flight, concurrent mode"
    )
    parser.add_argument(
        "--rounds", type=int, help="max interleaved rounds (default 7; 3 with --quick)"
    )
    parser.add_argument(
        "--seed", type=int, default=1000, help="existing datasets to get and page through"
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds for the rounds; no round starts that would overrun it "
        "(default 120; 15 with --quick)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=5.0,
        help="cap on one measurement; it stops early and reports the calls done",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--profile-server",
        type=Path,
        metavar="PATH",
        help="run the server under cProfile, write its stats to PATH and print the top "
        "functions (slows the server down: its figures are then not comparable)",
    )
    args = parser.parse_args(argv)
    quick: bool = args.quick
    settings = Settings(
        calls=args.calls if args.calls is not None else (200 if quick else 1000),
        concurrency=args.concurrency,
        rounds=args.rounds if args.rounds is not None else (3 if quick else 7),
        seed=args.seed,
        budget=args.budget if args.budget is not None else (15.0 if quick else 120.0),
        max_seconds=args.max_seconds,
        warmup_calls=100 if quick else 300,
        json_path=args.json,
        quick=quick,
        profile_server=args.profile_server,
    )
    if settings.calls < 1 or settings.concurrency < 1 or settings.rounds < 1:
        parser.error("--calls, --concurrency and --rounds must be at least 1")
    if settings.seed < PAGE_SIZE:
        parser.error(f"--seed must be at least {PAGE_SIZE}")
    return settings


# ---------------------------------------------------------------------------
# The embedded stack and the server subprocess


@dataclasses.dataclass(frozen=True)
class StackInfo:
    dsn: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_bucket: str


def start_stack(stack: EmbeddedStack) -> StackInfo:
    dsn, s3 = stack.start()
    return StackInfo(dsn, s3.endpoint, s3.access_key, s3.secret_key, s3.bucket)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has the server killed if the bench dies without cleaning up."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


class ServerProcess:
    """`python -m service serve` pointed at the stack; output goes to a log file."""

    def __init__(
        self, stack: StackInfo, work_dir: Path, key: str, profile: Path | None = None
    ) -> None:
        self.profile = profile
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.key = key
        self.log_path = work_dir / "server.log"
        self.env = {
            **os.environ,
            "DATASETD_LISTEN": self.address,
            "DATASETD_DATA_DIR": str(work_dir / "server-data"),
            "DATASETD_DATABASE_URL": stack.dsn,
            "DATASETD_S3_ENDPOINT": stack.s3_endpoint,
            "DATASETD_S3_ACCESS_KEY": stack.s3_access_key,
            "DATASETD_S3_SECRET_KEY": stack.s3_secret_key,
            "DATASETD_S3_BUCKET": stack.s3_bucket,
            "DATASETD_BOOTSTRAP_KEY": key,
            "DATASETD_BOOTSTRAP_APP": APP_ID,
            # Access logs would cost server CPU on every call.
            "DATASETD_LOG_LEVEL": "WARNING",
        }
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            profiler = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
            self._proc = subprocess.Popen(
                [sys.executable, *profiler, "-m", "service", "serve"],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Our Ctrl-C must not reach it before we stop it in order.
                start_new_session=True,
                preexec_fn=_die_with_parent(),  # noqa: PLW1509 (only calls prctl)
            )

    def exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGTERM (graceful), then SIGKILL if it does not exit in time; returns the code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"server did not stop within {SERVER_STOP_TIMEOUT:.0f}s: killing it")
                proc.kill()
                proc.wait()
        return proc.returncode


async def wait_serving(channel: grpc.aio.Channel, server: ServerProcess) -> float:
    """Polls the health service until SERVING; returns the seconds it took."""
    health: Any = health_pb2_grpc.HealthStub(channel)
    started = time.monotonic()
    last_error = "no answer yet"
    while True:
        code = server.exit_code()
        if code is not None:
            raise RuntimeError(
                f"the server exited with code {code} during startup; "
                f"last lines of {server.log_path}:\n{server.log_tail()}"
            )
        try:
            reply: Any = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return time.monotonic() - started
            last_error = f"status {reply.status}"
        except grpc.aio.AioRpcError as exc:
            last_error = f"{exc.code()}: {exc.details()}"
        if time.monotonic() - started > SERVER_START_TIMEOUT:
            raise RuntimeError(
                f"the server did not serve within {SERVER_START_TIMEOUT:.0f}s "
                f"(last: {last_error}); last lines of {server.log_path}:\n{server.log_tail()}"
            )
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------
# CPU accounting from /proc (Linux; zeros elsewhere)

_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the command name, which may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _cpu_seconds(fields: list[str], *, reaped_children: bool = False) -> float:
    # utime and stime are fields 14 and 15; cutime and cstime (waited-for children) 16, 17.
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _CLOCK_TICKS


def process_cpu(pid: int) -> float:
    fields = _stat_fields(pid)
    return 0.0 if fields is None else _cpu_seconds(fields)


def postgres_cpu(postmaster: int | None) -> float:
    """The postmaster, its live children (backends, ...) and the children it reaped."""
    if postmaster is None:
        return 0.0
    fields = _stat_fields(postmaster)
    if fields is None:
        return 0.0
    total = _cpu_seconds(fields, reaped_children=True)
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                child = _stat_fields(int(entry.name))
                if child is not None and int(child[1]) == postmaster:
                    total += _cpu_seconds(child)
    return total


@dataclasses.dataclass(frozen=True)
class Cpu:
    client: float
    server: float
    postgres: float

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(
            self.client - other.client,
            self.server - other.server,
            self.postgres - other.postgres,
        )


class CpuMeter:
    def __init__(self, server_pid: int, postgres_pid: int | None) -> None:
        self._server_pid = server_pid
        self._postgres_pid = postgres_pid

    def read(self) -> Cpu:
        return Cpu(
            time.process_time(),
            process_cpu(self._server_pid),
            postgres_cpu(self._postgres_pid),
        )


# ---------------------------------------------------------------------------
# Measuring


@dataclasses.dataclass(frozen=True)
class Case:
    """One kind of call, with an op for each mode ("seq": 1 in flight, "conc": N)."""

    name: str
    kind: str  # "service", "raw" or "floor"
    ops: dict[str, Op]


@dataclasses.dataclass(frozen=True)
class Sample:
    case: str
    kind: str
    mode: str
    concurrency: int
    round: int
    calls: int
    seconds: float
    rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    client_cpu_ms: float  # per call
    server_cpu_ms: float
    postgres_cpu_ms: float


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of ascending values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(fraction * len(sorted_values) + 0.999999))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def drive(
    op: Op, calls: int, concurrency: int, max_seconds: float
) -> tuple[float, list[float]]:
    """Runs `calls` calls with `concurrency` in flight; returns wall seconds and latencies."""
    latencies: list[float] = []
    issued = 0
    started = time.perf_counter()
    deadline = started + max_seconds

    async def worker(index: int) -> None:
        nonlocal issued
        while issued < calls:
            issued += 1
            begin = time.perf_counter()
            if begin > deadline:
                return
            await op(index)
            latencies.append(time.perf_counter() - begin)

    async with asyncio.TaskGroup() as group:
        for index in range(concurrency):
            group.create_task(worker(index))
    return time.perf_counter() - started, latencies


class Runner:
    def __init__(self, settings: Settings, meter: CpuMeter) -> None:
        self._settings = settings
        self._meter = meter

    def concurrency(self, mode: str) -> int:
        return 1 if mode == "seq" else self._settings.concurrency

    async def sample(self, case: Case, mode: str, round_index: int) -> Sample:
        concurrency = self.concurrency(mode)
        before = self._meter.read()
        seconds, latencies = await drive(
            case.ops[mode], self._settings.calls, concurrency, self._settings.max_seconds
        )
        cpu = self._meter.read() - before
        latencies.sort()
        calls = len(latencies)
        per_call = 1000.0 / max(calls, 1)
        return Sample(
            case=case.name,
            kind=case.kind,
            mode=mode,
            concurrency=concurrency,
            round=round_index,
            calls=calls,
            seconds=seconds,
            rate=calls / seconds,
            p50_ms=percentile(latencies, 0.50) * 1000,
            p95_ms=percentile(latencies, 0.95) * 1000,
            p99_ms=percentile(latencies, 0.99) * 1000,
            client_cpu_ms=cpu.client * per_call,
            server_cpu_ms=cpu.server * per_call,
            postgres_cpu_ms=cpu.postgres * per_call,
        )

    async def warm_up(self, cases: Sequence[Case]) -> None:
        for case in cases:
            for mode, op in case.ops.items():
                await drive(
                    op,
                    self._settings.warmup_calls,
                    self.concurrency(mode),
                    self._settings.max_seconds,
                )


# ---------------------------------------------------------------------------
# The calls


class PageWalker:
    """Per-worker position in a walk over the first `pages` pages, then from the start."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.page = 0
        self.cursor = ""

    def advance(self, cursor: str) -> None:
        self.page += 1
        if self.page >= self.pages or not cursor:
            self.page, self.cursor = 0, ""
        else:
            self.cursor = cursor


class ServiceCalls:
    def __init__(self, channel: grpc.aio.Channel, key: str, rng: random.Random) -> None:
        self._stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        self._health: Any = health_pb2_grpc.HealthStub(channel)
        self._metadata = (("authorization", f"Key {key}"),)
        self._rng = rng
        metadata = struct_pb2.Struct()
        metadata.update(METADATA)
        # The id is left empty: the server generates one, so one request serves all calls.
        self._create_request = dataset_service_pb2.CreateDatasetRequest(
            app_id=APP_ID,
            dataset=dataset_pb2.Dataset(description="created by the bench", metadata=metadata),
        )
        self._get_requests: list[dataset_service_pb2.GetDatasetRequest] = []
        self._pages = 1

    async def seed(self, count: int, concurrency: int) -> None:
        """Creates `count` datasets (through the service) to get and to page through."""
        ids: list[str] = []

        async def create(_: int) -> None:
            reply: dataset_service_pb2.CreateDatasetResponse = await self._stub.CreateDataset(
                self._create_request, metadata=self._metadata
            )
            ids.append(reply.dataset.id)

        await drive(create, count, concurrency, max_seconds=300.0)
        self._get_requests = [
            dataset_service_pb2.GetDatasetRequest(app_id=APP_ID, dataset_id=i) for i in ids
        ]
        self._pages = count // PAGE_SIZE

    async def create(self, _: int) -> None:
        reply: dataset_service_pb2.CreateDatasetResponse = await self._stub.CreateDataset(
            self._create_request, metadata=self._metadata
        )
        if not reply.dataset.id:
            raise RuntimeError("CreateDataset returned a dataset without id")

    async def get(self, _: int) -> None:
        request = self._rng.choice(self._get_requests)
        reply: dataset_service_pb2.GetDatasetResponse = await self._stub.GetDataset(
            request, metadata=self._metadata
        )
        if reply.dataset.id != request.dataset_id:
            raise RuntimeError(f"GetDataset returned {reply.dataset.id!r}")

    def list_op(self, concurrency: int) -> Op:
        # Oldest first: the seeded datasets, not those CreateDataset adds meanwhile.
        walkers = [PageWalker(self._pages) for _ in range(concurrency)]

        async def list_page(worker: int) -> None:
            walker = walkers[worker]
            request = dataset_service_pb2.ListDatasetsRequest(
                app_id=APP_ID,
                page_size=PAGE_SIZE,
                page_token=walker.cursor,
                sort_order=common_pb2.SORT_ORDER_ASCENDING,
            )
            reply: dataset_service_pb2.ListDatasetsResponse = await self._stub.ListDatasets(
                request, metadata=self._metadata
            )
            if len(reply.datasets) != PAGE_SIZE:
                raise RuntimeError(f"ListDatasets returned {len(reply.datasets)} datasets")
            walker.advance(reply.next_page_token)

        return list_page

    async def health(self, _: int) -> None:
        reply: Any = await self._health.Check(health_pb2.HealthCheckRequest())
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"health status {reply.status}")

    def cases(self, concurrency: int) -> tuple[Case, Case, Case, Case]:
        create = Case("CreateDataset", "service", {"seq": self.create, "conc": self.create})
        get = Case("GetDataset", "service", {"seq": self.get, "conc": self.get})
        page = Case(
            f"ListDatasets({PAGE_SIZE})",
            "service",
            {"seq": self.list_op(1), "conc": self.list_op(concurrency)},
        )
        floor = Case("Health/Check", "floor", {"seq": self.health, "conc": self.health})
        return create, get, page, floor


# A string: asyncpg's classes are generic in the stubs only.
Executor: TypeAlias = "asyncpg.Connection[asyncpg.Record] | asyncpg.Pool[asyncpg.Record]"


class RawCalls:
    """asyncpg round trips to the same database: one connection, or a pool of N."""

    def __init__(
        self,
        conn: asyncpg.Connection[asyncpg.Record],
        pool: asyncpg.Pool[asyncpg.Record],
        rng: random.Random,
    ) -> None:
        self._conn = conn
        self._pool = pool
        self._rng = rng
        self._metadata = json.dumps(METADATA)
        self._ids: list[str] = []
        self._pages = 1

    async def seed(self, count: int) -> None:
        await self._conn.execute(RAW_TABLE_DDL)
        self._ids = [uuid.uuid4().hex for _ in range(count)]
        await self._conn.executemany(
            RAW_INSERT,
            [(APP_ID, i, "seeded by the bench", self._metadata) for i in self._ids],
        )
        await self._conn.execute("ANALYZE bench_raw")
        self._pages = count // PAGE_SIZE

    def _executor(self, mode: str) -> Executor:
        return self._conn if mode == "seq" else self._pool

    def insert_op(self, mode: str) -> Op:
        executor = self._executor(mode)

        async def insert(_: int) -> None:
            await executor.execute(
                RAW_INSERT, "raw-insert", uuid.uuid4().hex, "created by the bench", self._metadata
            )

        return insert

    def select_op(self, mode: str) -> Op:
        executor = self._executor(mode)

        async def select(_: int) -> None:
            row = await executor.fetchrow(RAW_SELECT, APP_ID, self._rng.choice(self._ids))
            if row is None:
                raise RuntimeError("raw SELECT found no row")

        return select

    def page_op(self, mode: str, concurrency: int) -> Op:
        executor = self._executor(mode)
        walkers = [PageWalker(self._pages) for _ in range(concurrency)]

        async def page(worker: int) -> None:
            walker = walkers[worker]
            # One row more than the page, as a server does to know whether more follow.
            rows = await executor.fetch(RAW_PAGE, APP_ID, walker.cursor, PAGE_SIZE + 1)
            if len(rows) < PAGE_SIZE:
                raise RuntimeError(f"raw page returned {len(rows)} rows")
            walker.advance(rows[PAGE_SIZE - 1]["id"])

        return page

    def cases(self, concurrency: int) -> tuple[Case, Case, Case]:
        insert = Case(
            "raw INSERT", "raw", {"seq": self.insert_op("seq"), "conc": self.insert_op("conc")}
        )
        select = Case(
            "raw SELECT by PK",
            "raw",
            {"seq": self.select_op("seq"), "conc": self.select_op("conc")},
        )
        page = Case(
            f"raw page of {PAGE_SIZE}",
            "raw",
            {"seq": self.page_op("seq", 1), "conc": self.page_op("conc", concurrency)},
        )
        return insert, select, page


async def keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Pool reset that costs no round trip.

    asyncpg's default reset runs `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL` on every release, a second round trip per pooled query: the raw limit is
    one round trip per query (asyncpg still rolls back an open transaction itself)."""


# ---------------------------------------------------------------------------
# Rounds and results


@dataclasses.dataclass(frozen=True)
class Pair:
    service: Case
    raw: Case


async def run_rounds(
    runner: Runner, pairs: Sequence[Pair], floor: Case, settings: Settings
) -> list[Sample]:
    """Rounds of every measurement, raw and service alternating; stops at the budget."""
    samples: list[Sample] = []
    started = time.monotonic()
    for round_index in range(settings.rounds):
        elapsed = time.monotonic() - started
        if round_index and elapsed + elapsed / round_index > settings.budget:
            print(f"  time budget of {settings.budget:.0f}s reached after {round_index} rounds")
            break
        round_started = time.monotonic()
        for mode in ("seq", "conc"):
            for index, pair in enumerate(pairs):
                first_raw = (round_index + index) % 2 == 0
                order = (pair.raw, pair.service) if first_raw else (pair.service, pair.raw)
                for case in order:
                    samples.append(await runner.sample(case, mode, round_index))
            samples.append(await runner.sample(floor, mode, round_index))
        print(
            f"  round {round_index + 1}/{settings.rounds}: {time.monotonic() - round_started:.1f}s",
            flush=True,
        )
    return samples


@dataclasses.dataclass(frozen=True)
class Summary:
    case: str
    kind: str
    mode: str
    concurrency: int
    rounds: int
    rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    client_cpu_ms: float
    server_cpu_ms: float
    postgres_cpu_ms: float


@dataclasses.dataclass(frozen=True)
class Comparison:
    service: str
    raw: str
    mode: str
    service_rate: float
    raw_rate: float
    ratio: float  # median of per-round ratios
    ratio_min: float
    ratio_max: float


def summarize(samples: Sequence[Sample]) -> list[Summary]:
    groups: dict[tuple[str, str], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.case, sample.mode), []).append(sample)

    def median(group: list[Sample], field: str) -> float:
        return statistics.median(float(getattr(s, field)) for s in group)

    return [
        Summary(
            case=case,
            kind=group[0].kind,
            mode=mode,
            concurrency=group[0].concurrency,
            rounds=len(group),
            rate=median(group, "rate"),
            p50_ms=median(group, "p50_ms"),
            p95_ms=median(group, "p95_ms"),
            p99_ms=median(group, "p99_ms"),
            client_cpu_ms=median(group, "client_cpu_ms"),
            server_cpu_ms=median(group, "server_cpu_ms"),
            postgres_cpu_ms=median(group, "postgres_cpu_ms"),
        )
        for (case, mode), group in groups.items()
    ]


def compare(samples: Sequence[Sample], service: str, raw: str, mode: str) -> Comparison | None:
    by_round: dict[int, dict[str, float]] = {}
    for s in samples:
        if s.mode == mode and s.case in (service, raw):
            by_round.setdefault(s.round, {})[s.case] = s.rate
    ratios = [r[service] / r[raw] for r in by_round.values() if r.get(raw) and service in r]
    if not ratios:
        return None
    return Comparison(
        service=service,
        raw=raw,
        mode=mode,
        service_rate=statistics.median(r[service] for r in by_round.values() if service in r),
        raw_rate=statistics.median(r[raw] for r in by_round.values() if raw in r),
        ratio=statistics.median(ratios),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
    )


def comparisons(samples: Sequence[Sample], pairs: Sequence[Pair], floor: Case) -> list[Comparison]:
    found: list[Comparison] = []
    for mode in ("seq", "conc"):
        for pair in pairs:
            for reference in (pair.raw.name, floor.name):
                comparison = compare(samples, pair.service.name, reference, mode)
                if comparison is not None:
                    found.append(comparison)
    return found


def _mode_title(mode: str, concurrency: int) -> str:
    if mode == "seq":
        return "sequential: 1 call in flight"
    return f"concurrent: {concurrency} calls in flight"


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def format_report(
    summaries: Sequence[Summary],
    found: Sequence[Comparison],
    settings: Settings,
    load_before: float,
) -> str:
    name_width = max(len(s.case) for s in summaries) + 2
    header = (
        f"{'':<{name_width}}{'calls/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
        f"   CPU ms per call: {'client':>7}{'server':>8}{'postgres':>10}"
    )
    lines = [header, "-" * len(header)]
    for mode in ("seq", "conc"):
        rows = [s for s in summaries if s.mode == mode]
        if not rows:
            continue
        lines.append(_mode_title(mode, rows[0].concurrency))
        for s in rows:
            server_cpu = f"{s.server_cpu_ms:8.3f}" if s.kind != "raw" else f"{'-':>8}"
            lines.append(
                f"  {s.case:<{name_width - 2}}{s.rate:>9,.0f}{s.p50_ms:>9.2f}{s.p95_ms:>9.2f}"
                f"{s.p99_ms:>9.2f}   {'':17}{s.client_cpu_ms:7.3f}{server_cpu}"
                f"{s.postgres_cpu_ms:10.3f}"
            )
    lines += ["", "service vs reference (median of per-round ratios, min..max over rounds):"]
    for c in found:
        lines.append(
            f"  {c.mode:<4} {c.service} {c.service_rate:,.0f} calls/s vs {c.raw} "
            f"{c.raw_rate:,.0f}/s: {c.ratio:.2f}x ({c.ratio_min:.2f}..{c.ratio_max:.2f})"
        )
    rounds = max((s.rounds for s in summaries), default=0)
    lines += [
        "",
        f"{rounds} rounds x up to {settings.calls} calls per measurement; figures are medians "
        "over rounds.",
        "CPU is per call and process: client = this bench process (grpc client or asyncpg), "
        "server = the datasetd process, postgres = postmaster and its backends.",
        "The machine has "
        f"{os.cpu_count()} cores shared by all three; differences under ~30% are noise.",
        f"Load average (1 min) before the run {load_before:.2f}, after {load_average():.2f}: "
        "other work on the machine lowers the absolute figures more than the ratios.",
    ]
    return "\n".join(lines)


def write_json(
    path: Path,
    settings: Settings,
    samples: Sequence[Sample],
    summaries: Sequence[Summary],
    found: Sequence[Comparison],
    load_before: float,
) -> None:
    document = {
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(settings).items()
        },
        "environment": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "asyncpg": asyncpg.__version__,
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        "summary": [dataclasses.asdict(s) for s in summaries],
        "comparisons": [dataclasses.asdict(c) for c in found],
        "samples": [dataclasses.asdict(s) for s in samples],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# Main


async def bench(
    settings: Settings, stack: StackInfo, server: ServerProcess, postgres_pid: int | None
) -> tuple[list[Sample], list[Pair], Case]:
    rng = random.Random(42)
    async with grpc.aio.insecure_channel(server.address) as channel:
        print(f"waiting for the server on {server.address} ...", flush=True)
        waited = await wait_serving(channel, server)
        print(f"server serving after {waited:.1f}s", flush=True)
        service = ServiceCalls(channel, server.key, rng)
        conn = await asyncpg.connect(stack.dsn)
        pool = await asyncpg.create_pool(
            stack.dsn,
            min_size=settings.concurrency,
            max_size=settings.concurrency,
            reset=keep_session,
        )
        try:
            print(f"seeding {settings.seed} datasets and {settings.seed} raw rows ...", flush=True)
            await service.seed(settings.seed, settings.concurrency)
            raw = RawCalls(conn, pool, rng)
            await raw.seed(settings.seed)
            create, get, page, floor = service.cases(settings.concurrency)
            raw_insert, raw_select, raw_page = raw.cases(settings.concurrency)
            pairs = [Pair(create, raw_insert), Pair(get, raw_select), Pair(page, raw_page)]
            runner = Runner(settings, CpuMeter(server.pid, postgres_pid))
            print("warming up ...", flush=True)
            await runner.warm_up([c for p in pairs for c in (p.raw, p.service)] + [floor])
            print(
                f"measuring: up to {settings.rounds} rounds, {settings.calls} calls per "
                f"measurement, concurrency 1 and {settings.concurrency}",
                flush=True,
            )
            samples = await run_rounds(runner, pairs, floor, settings)
        finally:
            await pool.close()
            await conn.close()
    return samples, pairs, floor


def print_profile(path: Path, top: int = 30) -> None:
    if not path.exists():
        print(f"\nno server profile was written to {path}")
        return
    print(f"\nserver profile ({path}), top {top} functions by own time:")
    stats = pstats.Stats(str(path))
    stats.sort_stats(pstats.SortKey.TIME).print_stats(top)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turns SIGTERM into an exception so that the finally blocks stop the server and stack.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    load_before = load_average()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="datasetd-bench-") as tmp:
        work_dir = Path(tmp)
        print(f"starting the embedded stack in {work_dir} ...", flush=True)
        stack = EmbeddedStack(work_dir / "stack", bucket=BUCKET)
        info = start_stack(stack)
        try:
            print(f"embedded stack ready after {time.monotonic() - started:.1f}s", flush=True)
            key = "bench-" + secrets.token_urlsafe(24)
            server = ServerProcess(info, work_dir, key, settings.profile_server)
            server.start()
            try:
                samples, pairs, floor = asyncio.run(
                    bench(settings, info, server, stack.postgres.pid)
                )
            except BaseException:
                if server.exit_code() is not None:
                    print(f"the server exited; last lines of its log:\n{server.log_tail()}")
                raise
            finally:
                code = server.stop()
                if code not in (0, None):
                    print(f"the server exited with code {code}:\n{server.log_tail()}")
        finally:
            stack.stop()
    summaries = summarize(samples)
    found = comparisons(samples, pairs, floor)
    print()
    print(format_report(summaries, found, settings, load_before))
    if settings.json_path is not None:
        write_json(settings.json_path, settings, samples, summaries, found, load_before)
        print(f"\nJSON results written to {settings.json_path}")
    if settings.profile_server is not None:
        print_profile(settings.profile_server)
    print(f"\ntotal time {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
