"""Running `python -m service serve` as a separate process, as `make run` does."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
import psutil
from datasetd.v1 import dataset_service_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    process: asyncio.subprocess.Process
    address: str
    banner: str
    # The HTTP port (metrics): a free one unless the caller's env names one.
    http_address: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.pid).children(recursive=True)

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return await asyncio.wait_for(self.process.wait(), 30)


async def start_serve(
    env: dict[str, str], *, stderr: int | IO[bytes]
) -> asyncio.subprocess.Process:
    """`python -m service serve`, as `make run` starts it, with its stdout piped; one
    server process unless `env` sets DATASETD_WORKERS (the default, one per core, would
    multiply the suite's processes)."""
    env = {"DATASETD_WORKERS": "1", **env}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "serve",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
    )


@asynccontextmanager
async def run_server(
    env: dict[str, str],
    *,
    stderr: int | IO[bytes] = asyncio.subprocess.DEVNULL,
    log_tail: Callable[[], str] | None = None,
) -> AsyncIterator[ServerProcess]:
    """The server on a free port, once it serves; killed at the end. Its stderr goes to
    `stderr` (nowhere by default); `log_tail`, if given, tells the server's side of a start
    that failed."""
    port = free_port()
    http = env.get("DATASETD_HTTP_LISTEN") or f"127.0.0.1:{free_port()}"
    env = {
        **env,
        "DATASETD_LISTEN": f"127.0.0.1:{port}",
        "DATASETD_HTTP_LISTEN": http,
        "PYTHONUNBUFFERED": "1",
    }
    process = await start_serve(env, stderr=stderr)
    assert process.stdout is not None
    lines: list[str] = []

    async def read_banner() -> None:
        assert process.stdout is not None
        while not lines or not lines[-1].startswith("stop with Ctrl-C"):
            line = await process.stdout.readline()
            if not line:
                told = f"; {log_tail()}" if log_tail is not None else ""
                raise AssertionError(f"server exited before serving: {''.join(lines)}{told}")
            lines.append(line.decode())

    try:
        await asyncio.wait_for(read_banner(), START_TIMEOUT)
        yield ServerProcess(process, f"127.0.0.1:{port}", "".join(lines), http)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def create_key(env: dict[str, str], app: str) -> str:
    """`python -m service keys create`, with or without a server running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "keys",
        "create",
        "--app",
        app,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode().strip()


def clean_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATASETD_")}
    return {**env, **overrides}


@asynccontextmanager
async def stub_for(address: str) -> AsyncIterator[dataset_service_pb2_grpc.DatasetServiceAsyncStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield dataset_service_pb2_grpc.DatasetServiceStub(channel)
