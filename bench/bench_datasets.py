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
import dataclasses
import json
import os
import random
import statistics
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, TypeAlias

import asyncpg
import grpc
from datasetd.v1 import common_pb2, dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import (
    APP_ID,
    CpuMeter,
    Op,
    ServerProcess,
    StackInfo,
    announce_serving,
    drive,
    environment,
    install_sigterm_handler,
    keep_session,
    load_average,
    percentile,
    print_profile,
    stack_and_server,
)

PAGE_SIZE: Final = 50
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
        "environment": environment(load_before),
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
        await announce_serving(channel, server)
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


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    install_sigterm_handler()
    load_before = load_average()
    started = time.monotonic()
    with stack_and_server(started, settings.profile_server) as running:
        samples, pairs, floor = asyncio.run(
            bench(settings, running.info, running.server, running.stack.postgres.pid)
        )
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
