"""Helpers shared by the benchmarks: the embedded stack and the server subprocess, CPU
accounting from /proc, driving N calls with M in flight, and reporting odds and ends.

Every benchmark starts the embedded stack (PostgreSQL + SeaweedFS) in a temporary
directory and the real server as a subprocess (`python -m service serve`) pointed at it,
then talks to it over a real gRPC channel with the generated stubs, and measures the raw
limits of the same building blocks in the same run (see shared/spec/performance-notes.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import os
import platform
import pstats
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.devstack import EmbeddedStack

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
APP_ID: Final = "bench"
BUCKET: Final = "datasetd-bench"
SERVER_START_TIMEOUT: Final = 90.0
SERVER_STOP_TIMEOUT: Final = 30.0

Op = Callable[[int], Awaitable[None]]
"""One call; the argument is the index of the worker making it (0..concurrency-1)."""


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
            "DATASETD_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
            "DATASETD_DATA_DIR": str(work_dir / "server-data"),
            "DATASETD_DATABASE_URL": stack.dsn,
            "DATASETD_S3_ENDPOINT": stack.s3_endpoint,
            "DATASETD_S3_ACCESS_KEY": stack.s3_access_key,
            "DATASETD_S3_SECRET_KEY": stack.s3_secret_key,
            "DATASETD_S3_BUCKET": stack.s3_bucket,
            "DATASETD_BOOTSTRAP_KEY": key,
            "DATASETD_BOOTSTRAP_APP": APP_ID,
            # One process per replica (bench_workers measures several workers).
            "DATASETD_WORKERS": "1",
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


@dataclasses.dataclass(frozen=True)
class Running:
    """The embedded stack and the server started on it."""

    stack: EmbeddedStack
    info: StackInfo
    server: ServerProcess
    work_dir: Path


@contextlib.contextmanager
def stack_and_server(started: float, profile: Path | None = None) -> Iterator[Running]:
    """Starts the embedded stack in a temporary directory and the server on it; stops
    both in order however the body ends (and shows the server's log if it died)."""
    with tempfile.TemporaryDirectory(prefix="datasetd-bench-") as tmp:
        work_dir = Path(tmp)
        print(f"starting the embedded stack in {work_dir} ...", flush=True)
        stack = EmbeddedStack(work_dir / "stack", bucket=BUCKET)
        info = start_stack(stack)
        try:
            print(f"embedded stack ready after {time.monotonic() - started:.1f}s", flush=True)
            key = "bench-" + secrets.token_urlsafe(24)
            server = ServerProcess(info, work_dir, key, profile)
            server.start()
            try:
                yield Running(stack, info, server, work_dir)
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


async def announce_serving(channel: grpc.aio.Channel, server: ServerProcess) -> None:
    print(f"waiting for the server on {server.address} ...", flush=True)
    waited = await wait_serving(channel, server)
    print(f"server serving after {waited:.1f}s", flush=True)


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


def process_tree_cpu(parent: int | None) -> float:
    """A process (all its threads), its live children and the children it reaped."""
    if parent is None:
        return 0.0
    fields = _stat_fields(parent)
    if fields is None:
        return 0.0
    total = _cpu_seconds(fields, reaped_children=True)
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                child = _stat_fields(int(entry.name))
                if child is not None and int(child[1]) == parent:
                    total += _cpu_seconds(child)
    return total


def postgres_cpu(postmaster: int | None) -> float:
    """The postmaster, its live children (backends, ...) and the children it reaped."""
    return process_tree_cpu(postmaster)


@dataclasses.dataclass(frozen=True)
class Cpu:
    client: float
    server: float
    postgres: float
    s3: float = 0.0

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(
            self.client - other.client,
            self.server - other.server,
            self.postgres - other.postgres,
            self.s3 - other.s3,
        )


class CpuMeter:
    """CPU seconds used so far by this process (all threads), the server, PostgreSQL and,
    when its pid is given, the S3 server."""

    def __init__(self, server_pid: int, postgres_pid: int | None, s3_pid: int | None = None):
        self._server_pid = server_pid
        self._postgres_pid = postgres_pid
        self._s3_pid = s3_pid

    def read(self) -> Cpu:
        return Cpu(
            time.process_time(),
            process_cpu(self._server_pid),
            postgres_cpu(self._postgres_pid),
            process_tree_cpu(self._s3_pid) if self._s3_pid is not None else 0.0,
        )


# ---------------------------------------------------------------------------
# Measuring


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of ascending values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(fraction * len(sorted_values) + 0.999999))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def drive(
    op: Op, calls: int, concurrency: int, max_seconds: float, min_seconds: float = 0.0
) -> tuple[float, list[float]]:
    """Runs `calls` calls with `concurrency` in flight; returns wall seconds and latencies.

    No call starts after `max_seconds`; with `min_seconds`, calls go on beyond `calls`
    until that much time has passed."""
    latencies: list[float] = []
    issued = 0
    started = time.perf_counter()
    deadline = started + max_seconds
    keep_going_until = started + min_seconds

    async def worker(index: int) -> None:
        nonlocal issued
        while issued < calls or time.perf_counter() < keep_going_until:
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


async def keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Pool reset that costs no round trip.

    asyncpg's default reset runs `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL` on every release, a second round trip per pooled query: the raw limit is
    one round trip per query (asyncpg still rolls back an open transaction itself)."""


# ---------------------------------------------------------------------------
# Reporting and process plumbing


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def environment(load_before: float) -> dict[str, Any]:
    """What the JSON results record about the machine and the libraries."""
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "asyncpg": asyncpg.__version__,
        "platform": platform.platform(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def print_profile(path: Path, top: int = 30) -> None:
    if not path.exists():
        print(f"\nno server profile was written to {path}")
        return
    print(f"\nserver profile ({path}), top {top} functions by own time:")
    stats = pstats.Stats(str(path))
    stats.sort_stats(pstats.SortKey.TIME).print_stats(top)


def exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turns SIGTERM into an exception so that the finally blocks stop the server and stack.
    raise SystemExit(128 + signum)


def install_sigterm_handler() -> None:
    signal.signal(signal.SIGTERM, exit_on_sigterm)
