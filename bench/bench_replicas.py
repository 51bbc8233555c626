"""Upload and GetDataset throughput with 1, 2 and 3 datasetd replicas against one stack.

Starts the embedded stack (PostgreSQL + SeaweedFS) in a temporary directory and three
replicas (`python -m service serve`, tests.faults.replicas) on it. All three run for the
whole benchmark; a measurement "with N replicas" sends its calls through a channel that
balances (gRPC round robin) over the first N of them, so the idle ones cost only their
job runner's poll. Rounds are interleaved (1, 2, 3, 1, 2, 3, ...) because the CPU speed of
this machine swings in phases of seconds; the figures are medians over rounds and the
ratios medians of per-round ratios against 1 replica.

Measured, each with N = 1, 2, 3:
  upload      CreateInputs batches of small PNGs (distinct bytes), inputs/s
  get         GetDataset of one dataset, calls/s
  floor       Health/Check (no auth, no database): the gRPC floor of the same replicas
and beside each, the CPU each process used (psutil cpu_times deltas: every replica,
PostgreSQL with its backends, SeaweedFS, this load generator, and whatever else ran on the
machine meanwhile) as cores busy, and their sum against the cores of the machine: with 2
cores, the ceiling shows as a sum near 2.

    .venv/bin/python -m bench.bench_replicas            # ~2-3 minutes
    .venv/bin/python -m bench.bench_replicas --quick    # ~1 minute smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import grpc
import psutil
from datasetd.v1 import (
    data_pb2,
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    input_pb2,
    input_service_pb2,
    input_service_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import (
    APP_ID,
    BUCKET,
    Op,
    drive,
    install_sigterm_handler,
    load_average,
    percentile,
)
from service.devstack import EmbeddedStack
from tests.faults.harness import noise_png
from tests.faults.replicas import BALANCED_OPTIONS, Replicas

REPLICAS: Final = (1, 2, 3)
BATCH: Final = 8
IMAGE_SIDE: Final = 24


@dataclasses.dataclass(frozen=True)
class Settings:
    rounds: int
    seconds: float
    concurrency: int
    quick: bool


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_replicas",
        description="Upload and GetDataset throughput with 1, 2 and 3 replicas, same run.",
    )
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; 1 quick)")
    parser.add_argument(
        "--seconds", type=float, help="length of one measurement (default 4; 2 quick)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    args = parser.parse_args(argv)
    quick: bool = args.quick
    settings = Settings(
        rounds=args.rounds if args.rounds is not None else (1 if quick else 3),
        seconds=args.seconds if args.seconds is not None else (2.0 if quick else 4.0),
        concurrency=args.concurrency,
        quick=quick,
    )
    if settings.rounds < 1 or settings.seconds <= 0 or settings.concurrency < 1:
        parser.error("--rounds, --seconds and --concurrency must be positive")
    return settings


# ---------------------------------------------------------------------------
# CPU of each process


def tree_cpu(process: psutil.Process) -> float:
    """CPU seconds of a process, the children it reaped and its live children (the
    postmaster's backends come and go)."""
    try:
        times = process.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in process.children(recursive=True):
            try:
                own = child.cpu_times()
                total += own.user + own.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        return 0.0
    return total


def own_cpu() -> float:
    """This process alone: the replicas and the stack are its children."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def machine_cpu() -> float:
    """CPU seconds of the whole machine (every core), busy in anything but idle."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


class CpuMeter:
    """Per process; "other" is what the rest of the machine used meanwhile."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.names = [*processes, "load generator", "other"]
        self._processes = processes

    def read(self) -> dict[str, float]:
        found = {name: tree_cpu(process) for name, process in self._processes.items()}
        found["load generator"] = own_cpu()
        found["other"] = machine_cpu() - sum(found.values())
        return found


@dataclasses.dataclass(frozen=True)
class Sample:
    case: str
    replicas: int
    round: int
    rate: float  # inputs/s for upload, calls/s otherwise
    p50_ms: float
    p99_ms: float
    cores: dict[str, float]  # CPU seconds per wall second, by process


# ---------------------------------------------------------------------------
# The calls


class Images:
    """Distinct small PNGs, made before the rounds so that the load generator spends its
    CPU on calls during them."""

    def __init__(self, count: int) -> None:
        tag = secrets.token_hex(4)
        self._images = [noise_png(f"{tag}/{i}".encode(), IMAGE_SIDE) for i in range(count)]
        self._next = 0

    def take(self, count: int) -> list[bytes]:
        taken = [self._images[(self._next + i) % len(self._images)] for i in range(count)]
        self._next += count
        return taken


class Calls:
    def __init__(self, channel: grpc.aio.Channel, key: str, images: Images) -> None:
        self._datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        self._inputs = input_service_pb2_grpc.InputServiceStub(channel)
        self._health: Any = health_pb2_grpc.HealthStub(channel)
        self._metadata = (("authorization", f"Key {key}"),)
        self._images = images
        self._get = dataset_service_pb2.GetDatasetRequest(app_id=APP_ID, dataset_id="bench")

    async def create_dataset(self) -> None:
        await self._datasets.CreateDataset(
            dataset_service_pb2.CreateDatasetRequest(
                app_id=APP_ID, dataset=dataset_pb2.Dataset(id="bench")
            ),
            metadata=self._metadata,
        )

    async def upload(self, _: int) -> None:
        request = input_service_pb2.CreateInputsRequest(
            app_id=APP_ID,
            inputs=[
                input_pb2.Input(
                    data=data_pb2.Data(image=data_pb2.Image(base64=image)),
                    dataset_ids=["bench"],
                )
                for image in self._images.take(BATCH)
            ],
        )
        reply: input_service_pb2.CreateInputsResponse = await self._inputs.CreateInputs(
            request, metadata=self._metadata
        )
        if len(reply.results) != BATCH:
            raise RuntimeError(f"CreateInputs created {len(reply.results)} of {BATCH}")

    async def get(self, _: int) -> None:
        reply: dataset_service_pb2.GetDatasetResponse = await self._datasets.GetDataset(
            self._get, metadata=self._metadata
        )
        if reply.dataset.id != "bench":
            raise RuntimeError(f"GetDataset returned {reply.dataset.id!r}")

    async def floor(self, _: int) -> None:
        reply: Any = await self._health.Check(health_pb2.HealthCheckRequest())
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"health status {reply.status}")


# ---------------------------------------------------------------------------
# Running


async def measure(
    case: str,
    op: Op,
    per_call: int,
    replicas: int,
    round_index: int,
    settings: Settings,
    meter: CpuMeter,
) -> Sample:
    before, wall_before = meter.read(), time.monotonic()
    seconds, latencies = await drive(
        op, 10**9, settings.concurrency, settings.seconds, min_seconds=settings.seconds
    )
    after, wall = meter.read(), time.monotonic() - wall_before
    latencies.sort()
    return Sample(
        case,
        replicas,
        round_index,
        len(latencies) * per_call / seconds,
        percentile(latencies, 0.5) * 1000,
        percentile(latencies, 0.99) * 1000,
        {name: (after[name] - before[name]) / wall for name in meter.names},
    )


async def run(settings: Settings, work_dir: Path) -> list[Sample]:
    print(f"starting the embedded stack in {work_dir} ...", flush=True)
    stack = EmbeddedStack(work_dir / "stack", bucket=BUCKET)
    dsn, s3 = await asyncio.to_thread(stack.start)
    try:
        key = "bench-" + secrets.token_urlsafe(24)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DATASETD_")},
            "DATASETD_DATABASE_URL": dsn,
            "DATASETD_S3_ENDPOINT": s3.endpoint,
            "DATASETD_S3_ACCESS_KEY": s3.access_key,
            "DATASETD_S3_SECRET_KEY": s3.secret_key,
            "DATASETD_S3_BUCKET": s3.bucket,
            "DATASETD_BOOTSTRAP_KEY": key,
            "DATASETD_BOOTSTRAP_APP": APP_ID,
            # Access logs would cost replica CPU on every call.
            "DATASETD_LOG_LEVEL": "WARNING",
        }
        replicas = Replicas(env, work_dir, max(REPLICAS))
        print("starting 3 replicas ...", flush=True)
        await replicas.start_all()
        try:
            return await measure_all(settings, replicas, key, stack)
        finally:
            await replicas.stop_all()
    finally:
        await asyncio.to_thread(stack.stop)


async def measure_all(
    settings: Settings, replicas: Replicas, key: str, stack: EmbeddedStack
) -> list[Sample]:
    processes = {
        f"replica {replica.index + 1}": psutil.Process(replica.pid) for replica in replicas
    }
    assert stack.postgres.pid is not None and stack.s3.pid is not None
    processes["postgres"] = psutil.Process(stack.postgres.pid)
    processes["seaweedfs"] = psutil.Process(stack.s3.pid)
    meter = CpuMeter(processes)
    # Enough images for the fastest upload rate seen here, several times over.
    images = Images(3000 if settings.quick else 6000)
    channels = {
        n: grpc.aio.insecure_channel(
            "ipv4:" + ",".join(r.address for r in replicas.replicas[:n]), options=BALANCED_OPTIONS
        )
        for n in REPLICAS
    }
    calls = {n: Calls(channel, key, images) for n, channel in channels.items()}
    try:
        await calls[1].create_dataset()
        print("warming up ...", flush=True)
        for n in REPLICAS:
            # Every subchannel connected and every replica's caches warm.
            await drive(calls[n].upload, 30 * n, settings.concurrency, 30.0)
            await drive(calls[n].get, 200 * n, settings.concurrency, 30.0)
            await drive(calls[n].floor, 200 * n, settings.concurrency, 30.0)
        samples: list[Sample] = []
        for round_index in range(settings.rounds):
            for n in REPLICAS:
                for case, op, per_call in (
                    ("upload", calls[n].upload, BATCH),
                    ("get", calls[n].get, 1),
                    ("floor", calls[n].floor, 1),
                ):
                    sample = await measure(case, op, per_call, n, round_index, settings, meter)
                    samples.append(sample)
                    print(
                        f"  round {round_index + 1} {case:6} {n} replica(s): "
                        f"{sample.rate:8.0f}/s, cores busy {sum(sample.cores.values()):.2f}",
                        flush=True,
                    )
        return samples
    finally:
        for channel in channels.values():
            await channel.close()


# ---------------------------------------------------------------------------
# Reporting


def report(samples: list[Sample], settings: Settings) -> str:
    cpus = os.cpu_count() or 1
    names = list(samples[0].cores)
    lines = [
        f"\nmedians over {settings.rounds} interleaved rounds of {settings.seconds:.0f}s per "
        f"measurement, {settings.concurrency} calls in flight, {BATCH} inputs per "
        f"CreateInputs; {cpus} CPUs",
        "",
        f"{'case':8} {'replicas':>8} {'rate/s':>9} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}"
        f"  cores busy: {', '.join(names)} = total",
    ]
    for case, unit in (("upload", "inputs"), ("get", "calls"), ("floor", "calls")):
        by_round = {(s.replicas, s.round): s for s in samples if s.case == case}
        for n in REPLICAS:
            mine = [s for s in samples if s.case == case and s.replicas == n]
            ratios = [
                s.rate / by_round[(1, s.round)].rate
                for s in mine
                if by_round[(1, s.round)].rate > 0
            ]
            cores = {name: statistics.median(s.cores[name] for s in mine) for name in names}
            lines.append(
                f"{case:8} {n:>8} {statistics.median(s.rate for s in mine):>9.0f} "
                f"{statistics.median(ratios):>5.2f}x "
                f"{statistics.median(s.p50_ms for s in mine):>7.1f} "
                f"{statistics.median(s.p99_ms for s in mine):>7.1f}  "
                + " ".join(f"{cores[name]:.2f}" for name in names)
                + f" = {sum(cores.values()):.2f} of {cpus}"
            )
        lines.append(f"  ({case}: rate in {unit}/s; ratio: median of per-round rate / 1 replica)")
    lines.append(
        "\nThe replicas share the machine's cores with PostgreSQL, SeaweedFS and the load "
        "generator: once the total nears the core count, another replica adds no capacity; "
        "it only splits the same cores further."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    install_sigterm_handler()
    settings = parse_args(argv)
    started = time.monotonic()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="datasetd-bench-replicas-") as tmp:
        samples = asyncio.run(run(settings, Path(tmp)))
    print(report(samples, settings))
    print(f"\nload average {load_before:.2f} before, {load_average():.2f} after")
    print(f"total time {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
