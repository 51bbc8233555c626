"""CreateDataset and GetDataset calls/s of one server started with 1 and with 2 worker
processes (DATASETD_WORKERS), against one embedded stack.

Both servers (`python -m service serve`, one with DATASETD_WORKERS=1, one with 2) run for
the whole benchmark on ports of their own; the idle one costs only its job runner's poll.
Rounds are interleaved (1, 2, 1, 2, ...) because the CPU speed of a shared machine swings
in phases of seconds; the figures are medians over rounds, the ratio the median of the
per-round ratios (2 workers / 1 worker).

The load comes from GENERATORS processes (a single Python client would be the limit), each
with CHANNELS channels: a connection goes to one worker (the kernel's SO_REUSEPORT hash of
its addresses), so many connections spread the calls over the workers. Beside each figure,
the CPU used per wall second by the server (its supervisor, workers and nothing else: the
stack is this benchmark's), PostgreSQL, the load generators and the rest of the machine.

    .venv/bin/python -m bench.bench_workers            # ~2 minutes, part of `make bench`
    .venv/bin/python -m bench.bench_workers --quick    # ~40 s smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import multiprocessing
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final

import psutil

from bench.common import (
    APP_ID,
    BUCKET,
    REPO_ROOT,
    free_port,
    install_sigterm_handler,
    load_average,
    percentile,
)
from service.devstack import EmbeddedStack

WORKERS: Final = (1, 2)
CASES: Final = ("create", "get")
GENERATORS: Final = 2
CHANNELS: Final = 8
START_TIMEOUT: Final = 120.0


@dataclasses.dataclass(frozen=True)
class Settings:
    rounds: int
    seconds: float
    concurrency: int  # calls in flight per generator


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_workers",
        description="CreateDataset and GetDataset calls/s with 1 and 2 worker processes.",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--concurrency", type=int, default=16, help="per load generator")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s")
    args = parser.parse_args(argv)
    if args.quick:
        return Settings(2, 2.0, args.concurrency)
    return Settings(args.rounds, args.seconds, args.concurrency)


# ---------------------------------------------------------------------------
# The load generators (separate processes)


@dataclasses.dataclass(frozen=True)
class Load:
    address: str
    key: str
    case: str
    start_at: float  # time.time() of the measurement's start
    seconds: float
    concurrency: int
    tag: str  # makes this generator's dataset ids unique


@dataclasses.dataclass(frozen=True)
class Generated:
    calls: int
    latencies: list[float]


def generate(load: Load) -> Generated:
    """Runs in a generator process: calls until the measurement ends, counting those that
    finished inside it."""
    return asyncio.run(_generate(load))


async def _generate(load: Load) -> Generated:
    import grpc
    from datasetd.v1 import dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc

    metadata = (("authorization", f"Key {load.key}"),)
    channels = [grpc.aio.insecure_channel(load.address) for _ in range(CHANNELS)]
    stubs = [dataset_service_pb2_grpc.DatasetServiceStub(c) for c in channels]
    get = dataset_service_pb2.GetDatasetRequest(app_id=APP_ID, dataset_id="bench")
    counter = 0
    try:
        # Connected before the start: a connection's set-up is not a call.
        await asyncio.gather(*(c.channel_ready() for c in channels))
        end = load.start_at + load.seconds
        latencies: list[float] = []

        async def call(slot: int) -> None:
            nonlocal counter
            stub = stubs[slot % len(stubs)]
            while True:
                began = time.time()
                if began >= end:
                    return
                if load.case == "get":
                    await stub.GetDataset(get, metadata=metadata)
                else:
                    counter += 1
                    await stub.CreateDataset(
                        dataset_service_pb2.CreateDatasetRequest(
                            app_id=APP_ID,
                            dataset=dataset_pb2.Dataset(id=f"w-{load.tag}-{counter}"),
                        ),
                        metadata=metadata,
                    )
                done = time.time()
                if began >= load.start_at and done <= end:
                    latencies.append(done - began)

        await asyncio.sleep(max(0.0, load.start_at - time.time()))
        await asyncio.gather(*(call(slot) for slot in range(load.concurrency)))
        return Generated(len(latencies), latencies)
    finally:
        for channel in channels:
            await channel.close()


# ---------------------------------------------------------------------------
# The servers


class Server:
    """`python -m service serve` with `workers` worker processes, on the shared stack."""

    def __init__(self, workers: int, env: dict[str, str], log: IO[bytes]) -> None:
        self.workers = workers
        self.address = f"127.0.0.1:{free_port()}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            cwd=REPO_ROOT,
            env={
                **env,
                "DATASETD_WORKERS": str(workers),
                "DATASETD_LISTEN": self.address,
                "DATASETD_HTTP_LISTEN": "off",
            },
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )

    def wait_serving(self) -> None:
        assert self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"the {self.workers}-worker server exited while starting")
            if line.startswith("stop with Ctrl-C"):
                return
        raise RuntimeError(f"the {self.workers}-worker server did not serve in time")

    def cpu(self) -> float:
        """CPU seconds of the supervisor and its workers (live ones and reaped ones)."""
        try:
            process = psutil.Process(self.process.pid)
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

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def postgres_cpu(stack: EmbeddedStack) -> float:
    """The postmaster and its backends (live and reaped)."""
    if stack.postgres.pid is None:
        return 0.0
    try:
        postmaster = psutil.Process(stack.postgres.pid)
        times = postmaster.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in postmaster.children():
            try:
                own = child.cpu_times()
                total += own.user + own.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        return 0.0
    return total


def machine_cpu() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def generators_cpu(pool: concurrent.futures.ProcessPoolExecutor) -> float:
    total = 0.0
    for child in psutil.Process().children():
        if "multiprocessing" in " ".join(child.cmdline()):
            try:
                own = child.cpu_times()
                total += own.user + own.system
            except psutil.NoSuchProcess:
                pass
    return total


@dataclasses.dataclass(frozen=True)
class Sample:
    case: str
    workers: int
    round: int
    rate: float
    p50_ms: float
    p99_ms: float
    cores: dict[str, float]  # CPU seconds per wall second


# ---------------------------------------------------------------------------
# Running


async def measure(
    case: str,
    server: Server,
    key: str,
    round_index: int,
    settings: Settings,
    pool: concurrent.futures.ProcessPoolExecutor,
    stack: EmbeddedStack,
) -> Sample:
    start_at = time.time() + 1.0
    loads = [
        Load(
            server.address,
            key,
            case,
            start_at,
            settings.seconds,
            settings.concurrency,
            f"{secrets.token_hex(3)}{index}",
        )
        for index in range(GENERATORS)
    ]
    loop = asyncio.get_running_loop()
    futures = [loop.run_in_executor(pool, generate, load) for load in loads]
    await asyncio.sleep(max(0.0, start_at - time.time()))
    names = ("server", "postgres", "load generators")
    before = (server.cpu(), postgres_cpu(stack), generators_cpu(pool), machine_cpu())
    began = time.monotonic()
    await asyncio.sleep(settings.seconds)
    after = (server.cpu(), postgres_cpu(stack), generators_cpu(pool), machine_cpu())
    wall = time.monotonic() - began
    results = await asyncio.gather(*futures)
    latencies = sorted(t for result in results for t in result.latencies)
    used = [(a - b) / wall for a, b in zip(after, before, strict=True)]
    cores = dict(zip(names, used[:3], strict=True))
    cores["other"] = used[3] - sum(used[:3])
    return Sample(
        case,
        server.workers,
        round_index,
        sum(result.calls for result in results) / settings.seconds,
        percentile(latencies, 0.5) * 1000,
        percentile(latencies, 0.99) * 1000,
        cores,
    )


async def run(settings: Settings, work_dir: Path) -> list[Sample]:
    print(f"starting the embedded stack in {work_dir} ...", flush=True)
    stack = EmbeddedStack(work_dir / "stack", bucket=BUCKET)
    dsn, s3 = await asyncio.to_thread(stack.start)
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
        "DATASETD_BUILTIN_EMBEDDERS": "off",
        # Access logs would cost server CPU on every call.
        "DATASETD_LOG_LEVEL": "WARNING",
    }
    servers: list[Server] = []
    context = multiprocessing.get_context("spawn")
    try:
        with (
            (work_dir / "servers.log").open("wb") as log,
            concurrent.futures.ProcessPoolExecutor(GENERATORS, mp_context=context) as pool,
        ):
            for workers in WORKERS:
                print(f"starting the server with {workers} worker(s) ...", flush=True)
                server = Server(workers, env, log)
                servers.append(server)
                await asyncio.to_thread(server.wait_serving)
            return await measure_all(settings, servers, key, pool, stack)
    finally:
        for server in servers:
            code = server.stop()
            if code != 0:
                print(f"the {server.workers}-worker server exited with code {code}")
        await asyncio.to_thread(stack.stop)


async def measure_all(
    settings: Settings,
    servers: list[Server],
    key: str,
    pool: concurrent.futures.ProcessPoolExecutor,
    stack: EmbeddedStack,
) -> list[Sample]:
    import grpc
    from datasetd.v1 import dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc

    async with grpc.aio.insecure_channel(servers[0].address) as channel:
        await dataset_service_pb2_grpc.DatasetServiceStub(channel).CreateDataset(
            dataset_service_pb2.CreateDatasetRequest(
                app_id=APP_ID, dataset=dataset_pb2.Dataset(id="bench")
            ),
            metadata=(("authorization", f"Key {key}"),),
        )
    print("warming up ...", flush=True)
    warm = dataclasses.replace(settings, seconds=1.0)
    for server in servers:
        for case in CASES:
            await measure(case, server, key, -1, warm, pool, stack)
    samples: list[Sample] = []
    for round_index in range(settings.rounds):
        for case in CASES:
            for server in servers:
                sample = await measure(case, server, key, round_index, settings, pool, stack)
                samples.append(sample)
                print(
                    f"  round {round_index + 1} {case:6} {server.workers} worker(s): "
                    f"{sample.rate:7.0f}/s, cores busy {sum(sample.cores.values()):.2f}",
                    flush=True,
                )
    return samples


# ---------------------------------------------------------------------------
# Reporting


def report(samples: list[Sample], settings: Settings) -> str:
    cpus = os.cpu_count() or 1
    names = list(samples[0].cores)
    lines = [
        f"\nmedians over {settings.rounds} interleaved rounds of {settings.seconds:.0f}s per "
        f"measurement; {GENERATORS} load generators x {settings.concurrency} calls in flight "
        f"over {CHANNELS} connections each; {cpus} CPUs",
        "",
        f"{'case':14} {'workers':>7} {'calls/s':>8} {'ratio':>6} {'per core':>8} {'p50 ms':>7} "
        f"{'p99 ms':>7}  cores busy: {', '.join(names)} = total",
    ]
    for case, title in (("create", "CreateDataset"), ("get", "GetDataset")):
        by_round = {(s.workers, s.round): s for s in samples if s.case == case}
        for n in WORKERS:
            mine = [s for s in samples if s.case == case and s.workers == n]
            ratios = [
                s.rate / by_round[(1, s.round)].rate for s in mine if by_round[(1, s.round)].rate
            ]
            cores = {name: statistics.median(s.cores[name] for s in mine) for name in names}
            per_core = statistics.median(
                s.rate / s.cores["server"] for s in mine if s.cores["server"] > 0
            )
            lines.append(
                f"{title:14} {n:>7} {statistics.median(s.rate for s in mine):>8.0f} "
                f"{statistics.median(ratios):>5.2f}x {per_core:>8.0f} "
                f"{statistics.median(s.p50_ms for s in mine):>7.1f} "
                f"{statistics.median(s.p99_ms for s in mine):>7.1f}  "
                + " ".join(f"{cores[name]:.2f}" for name in names)
                + f" = {sum(cores.values()):.2f} of {cpus}"
            )
    lines.append(
        "  (ratio: median of the per-round rate / 1 worker; per core: calls per CPU-second of "
        "the server's processes, equal for 1 and 2 workers when a worker costs nothing extra. "
        "The target is 1.7x or more from the second worker, which needs a core free for it: "
        "once the total nears the core count, the second worker only splits the same cores)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    install_sigterm_handler()
    settings = parse_args(argv)
    started = time.monotonic()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="datasetd-bench-workers-") as tmp:
        samples = asyncio.run(run(settings, Path(tmp)))
    print(report(samples, settings))
    print(f"\nload average {load_before:.2f} before, {load_average():.2f} after")
    print(f"total time {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
