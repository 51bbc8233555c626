"""`datasetd serve` with DATASETD_WORKERS above 1: a supervisor and N worker processes.

The supervisor starts the embedded PostgreSQL and S3 once (what is not configured), picks
the ports when asked for port 0, and runs `python -m service.worker` N times with the
resolved addresses in their environment. Every worker binds the gRPC and HTTP ports with
SO_REUSEPORT, so the kernel spreads new connections over them. Worker 0 starts first and
alone (it applies the migrations and creates the bootstrap key, under their locks anyway);
it alone runs the job runner and the maintenance loop (service.app.start).

A worker that exits is started again after a back-off (0.5 s, doubling up to 30 s, back to
0.5 s once a worker has served for a minute); the others serve on meanwhile. SIGTERM or
SIGINT: every worker shuts down gracefully (DATASETD_SHUTDOWN_GRACE), then the embedded
stack stops. If the supervisor itself dies, each worker's standard input (a pipe only the
supervisor holds the other end of) ends and the worker stops; the embedded servers die with
it (PR_SET_PDEATHSIG, service.devstack).

Metrics: the workers share a PROMETHEUS_MULTIPROC_DIR made here, so that a scrape answered by
any worker reports the counters and histograms of all of them.

This module imports no gRPC, database or numeric library: the supervisor stays small.
With DATASETD_WORKERS=1 `serve` runs service.app.serve in this process, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service.banner import banner_text
from service.config import Config

log = logging.getLogger("datasetd.supervisor")

# Back-off before a worker that exited is started again: doubled per exit in a row, reset
# once a worker has run for STABLE_SECONDS.
RESTART_FIRST_SECONDS = 0.5
RESTART_MAX_SECONDS = 30.0
STABLE_SECONDS = 60.0
# How long a worker may take to serve after its start.
WORKER_START_SECONDS = 120.0
# Beyond the grace period of in-flight calls: the worker's own shutdown steps (up to three
# of service.app.STOP_STEP_SECONDS) and closing its pools.
STOP_MARGIN_SECONDS = 50.0


async def serve(config: Config) -> None:
    """`datasetd serve`: one process as before, or a supervisor of config.workers."""
    if config.workers == 1:
        from service.app import serve as serve_alone

        await serve_alone(config)
        return
    code = await Supervisor(config).run()
    if code:
        raise SystemExit(code)


class WorkerStartError(RuntimeError):
    pass


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    started: float
    ready: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Ports:
    """The listen addresses the workers get, and the sockets that hold ports picked here."""

    listen: str
    http_listen: str
    held: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for sock in self.held:
            sock.close()


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.stopping = asyncio.Event()
        self.workers: dict[int, _Worker] = {}
        self.embedded: list[Any] = []
        self.metrics_dir = ""

    async def run(self) -> int:
        """Serves until SIGTERM/SIGINT; the exit code (0 after a clean stop)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        ports = _resolve_ports(self.config)
        keepers: list[asyncio.Task[None]] = []
        try:
            env = await self._environment(ports)
            if self.stopping.is_set():
                return 0
            starting = asyncio.ensure_future(self._start_all(env))
            stop = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait((starting, stop), return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not starting.done():
                # Stopped while starting: the workers started so far get SIGTERM below.
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                return 0
            try:
                first = starting.result()
            except WorkerStartError as exc:
                print(f"datasetd: {exc}", file=sys.stderr, flush=True)
                return 1
            print(self._banner(first), flush=True)
            keepers = [
                asyncio.create_task(self._keep(index, env), name=f"keep-worker-{index}")
                for index in range(self.config.workers)
            ]
            await self.stopping.wait()
            print("shutting down: finishing in-flight calls", file=sys.stderr, flush=True)
        finally:
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            clean = await self._stop_workers()
            await asyncio.to_thread(self._stop_embedded)
            ports.close()
            if self.metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
        print("datasetd stopped", file=sys.stderr, flush=True)
        return 0 if clean else 1

    async def _start_all(self, env: Mapping[str, str]) -> _Worker:
        """Worker 0 first and alone (migrations, the bootstrap key, the embedding models'
        registration), then the others together; returns worker 0."""
        first = await self._start(0, env)
        rest = await asyncio.gather(*(self._start(i, env) for i in range(1, self.config.workers)))
        log.info("workers serving: %s", ", ".join(str(w.process.pid) for w in [first, *rest]))
        return first

    async def _environment(self, ports: _Ports) -> dict[str, str]:
        """The workers' environment: ours, with the embedded stack's addresses, the ports,
        and the shared metrics directory."""
        env = dict(os.environ)
        env.update(await asyncio.to_thread(self._start_embedded))
        env["DATASETD_LISTEN"] = ports.listen
        env["DATASETD_HTTP_LISTEN"] = ports.http_listen
        self.metrics_dir = tempfile.mkdtemp(prefix="datasetd-metrics-")
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        return env

    def _start_embedded(self) -> Mapping[str, str]:
        """Starts what is not configured, together (SeaweedFS alone takes seconds)."""
        from concurrent.futures import ThreadPoolExecutor

        from service.devstack import EmbeddedPostgres, EmbeddedS3

        config = self.config
        settings: dict[str, str] = {}
        with ThreadPoolExecutor(2, thread_name_prefix="embedded-start") as pool:
            dsn = endpoint = None
            if not config.database_url:
                postgres = EmbeddedPostgres(config.data_dir / "postgres")
                self.embedded.append(postgres)
                log.info("starting embedded PostgreSQL in %s", postgres.data_dir)
                dsn = pool.submit(postgres.start)
            if not config.s3_endpoint:
                s3 = EmbeddedS3(config.data_dir / "s3", config.s3_bucket)
                self.embedded.append(s3)
                log.info("starting embedded S3 (SeaweedFS) in %s", config.data_dir / "s3")
                endpoint = pool.submit(s3.start)
            if dsn is not None:
                settings["DATASETD_DATABASE_URL"] = dsn.result()
            if endpoint is not None:
                started = endpoint.result()
                settings.update(
                    DATASETD_S3_ENDPOINT=started.endpoint,
                    DATASETD_S3_ACCESS_KEY=started.access_key,
                    DATASETD_S3_SECRET_KEY=started.secret_key,
                    DATASETD_S3_BUCKET=started.bucket,
                    DATASETD_S3_SECURE="true" if started.secure else "false",
                )
        return settings

    def _stop_embedded(self) -> None:
        # Reverse order of start; each stop waits until its process is gone.
        for server in reversed(self.embedded):
            try:
                server.stop()
            except Exception:
                log.exception("stopping %s failed", type(server).__name__)

    async def _start(self, index: int, env: Mapping[str, str]) -> _Worker:
        """Starts worker `index` and waits until it serves."""
        read_fd, write_fd = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "service.worker",
                "--index",
                str(index),
                "--ready-fd",
                str(write_fd),
                env=dict(env),
                # The lifeline: never written; its end in the worker reads EOF once we are gone.
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(write_fd,),
                # Our signals (a terminal's Ctrl-C) reach the workers only through us, in order.
                start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        worker = _Worker(index, process, time.monotonic())
        self.workers[index] = worker
        try:
            line = await asyncio.wait_for(_ready_line(read_fd), WORKER_START_SECONDS)
        except TimeoutError:
            process.kill()
            raise WorkerStartError(
                f"worker {index} (pid {process.pid}) did not serve within "
                f"{WORKER_START_SECONDS:.0f}s"
            ) from None
        if not line:
            code = await process.wait()
            raise WorkerStartError(
                f"worker {index} (pid {process.pid}) exited with code {code} before serving"
            )
        worker.ready = json.loads(line)
        return worker

    async def _keep(self, index: int, env: Mapping[str, str]) -> None:
        """Starts worker `index` again whenever it exits, until the shutdown."""
        failures = 0
        while True:
            worker = self.workers[index]
            code = await worker.process.wait()
            if self.stopping.is_set():
                return
            self._forget(worker.process.pid)
            if time.monotonic() - worker.started >= STABLE_SECONDS:
                failures = 0
            delay = min(RESTART_MAX_SECONDS, RESTART_FIRST_SECONDS * 2**failures)
            failures += 1
            log.error(
                "worker %d (pid %d) exited with code %s; starting it again in %.1fs",
                index,
                worker.process.pid,
                code,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
                return
            try:
                started = await self._start(index, env)
            except WorkerStartError as exc:
                log.error("%s", exc)
                continue
            log.info("worker %d serves again (pid %d)", index, started.process.pid)

    def _forget(self, pid: int) -> None:
        """Drops a dead worker's live gauges (its counters stay: they only add up)."""
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    async def _stop_workers(self) -> bool:
        """SIGTERM to every worker, SIGKILL to those still running after the grace; True
        when every one exited cleanly."""
        running = [w for w in self.workers.values() if w.process.returncode is None]
        for worker in running:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        seconds = self.config.shutdown_grace.total_seconds() + STOP_MARGIN_SECONDS
        clean = True
        for worker in running:
            try:
                code = await asyncio.wait_for(worker.process.wait(), seconds)
            except TimeoutError:
                log.error(
                    "worker %d (pid %d) did not stop: killed", worker.index, worker.process.pid
                )
                worker.process.kill()
                code = await worker.process.wait()
            if code != 0:
                log.error(
                    "worker %d (pid %d) exited with code %s", worker.index, worker.process.pid, code
                )
                clean = False
        return clean

    def _banner(self, first: _Worker) -> str:
        config = self.config
        return banner_text(
            config,
            int(first.ready["port"]),
            first.ready.get("http_port"),
            first.ready.get("bootstrap_secret"),
            workers=config.workers,
        )


async def _ready_line(fd: int) -> bytes:
    """The worker's ready line; empty when it exited first (its end of the pipe closed).
    Closes `fd`."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        return await reader.readline()
    finally:
        transport.close()


def _resolve_ports(config: Config) -> _Ports:
    """The addresses every worker binds. A fixed port must be free: a listener already
    there (another installation's workers, which would share it) stops the start. Port 0
    is picked here and held by a socket in the same SO_REUSEPORT group (bound, never
    listening: it gets no connections) so that no other process takes it meanwhile."""
    ports = _Ports(config.listen, config.http_listen)
    try:
        ports.listen = _resolve(config.listen, "DATASETD_LISTEN", ports.held)
        if config.http_listen != "off":
            ports.http_listen = _resolve(config.http_listen, "DATASETD_HTTP_LISTEN", ports.held)
    except BaseException:
        ports.close()
        raise
    return ports


def _resolve(listen: str, variable: str, held: list[socket.socket]) -> str:
    host, _, port_text = listen.rpartition(":")
    bare = host.strip("[]")
    port = int(port_text)
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    address = bare or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    if port:
        # Without SO_REUSEPORT, so that any listener on the port refuses it.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((_numeric(address, family), port))
                probe.listen(1)
            except OSError as exc:
                raise SystemExit(
                    f"configuration error: {variable}={listen}: {exc.strerror}"
                ) from None
        return listen
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((_numeric(address, family), 0))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"configuration error: {variable}={listen}: {exc.strerror}") from None
    held.append(sock)
    return f"{host}:{sock.getsockname()[1]}"


def _numeric(host: str, family: socket.AddressFamily) -> str:
    """A host name (localhost) as the address the workers' servers bind first."""
    infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
    return str(infos[0][4][0])


def main() -> int:
    """`python -m service serve` (service.__main__ comes here before the CLI, whose imports
    the supervisor does not need)."""
    from service.config import ConfigError
    from service.observability import setup_logging

    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        # A Ctrl-C before the signal handlers are in place (during the start).
        print("interrupted", file=sys.stderr)
        return 130
    return 0
