"""Several datasetd replicas on one PostgreSQL and one S3, a client balancing across them,
and the run records of the job runner (job_runs) that show no job ran twice at once.

Used by tests/faults/test_replicas.py and bench/bench_replicas.py;
tests/integration/test_job_runs.py tests the run records and their check.

A replica is `python -m service serve` (tests.processes.start_serve) on ports chosen once:
a replica that was killed comes back on the same gRPC and HTTP ports, as a pod behind a
stable address would, so the client's round-robin channel reconnects to it.
tests.processes.run_server picks a new gRPC port at every start, hence this launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import itertools
import re
import signal
import time
import zipfile
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import grpc
import psutil
from datasetd.v1 import input_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.storage.db import Database
from tests.processes import START_TIMEOUT, ServerProcess, free_port, start_serve

SERVING = health_pb2.HealthCheckResponse.SERVING
# What the load's channel is given: round robin over every replica, and reconnection
# attempts to a replica that went away that stay frequent (gRPC's default backoff grows
# to two minutes, longer than a replica takes to come back).
BALANCED_OPTIONS: tuple[tuple[str, str | int], ...] = (
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
# The access log's line for a call (service/api/interceptors.py, text format).
ACCESS_LINE = re.compile(r" datasetd\.access \[[^]]*\] /datasetd\.v1\.\w+/\w+ ")
START_MARK = b"=== replica start "


# --- a database of its own --------------------------------------------------------------


# --- the replicas -----------------------------------------------------------------------


@dataclasses.dataclass
class Replica:
    index: int
    port: int
    http_port: int
    data_dir: Path
    log_path: Path
    server: ServerProcess | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.server is not None, f"replica {self.index} is not running"
        return self.server.pid

    def access_calls(self) -> list[int]:
        """Calls in this replica's access log, for each of its starts in order."""
        counts: list[int] = []
        if not self.log_path.exists():
            return counts
        with self.log_path.open("rb") as log:
            for line in log:
                if line.startswith(START_MARK):
                    counts.append(0)
                elif counts and ACCESS_LINE.search(line.decode(errors="replace")):
                    counts[-1] += 1
        return counts

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return f"replica {self.index}: no log"
        kept = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"replica {self.index} log:\n" + "\n".join(kept)


class Replicas:
    """`count` replicas of `env` (one stack, one bootstrap key), each with its ports, data
    directory and log (its stderr) under `directory`."""

    def __init__(self, env: dict[str, str], directory: Path, count: int) -> None:
        self.env = env
        self.replicas = [
            Replica(
                index,
                free_port(),
                free_port(),
                directory / f"replica-{index}",
                directory / f"replica-{index}.log",
            )
            for index in range(count)
        ]
        self.kills: list[tuple[int, int, float]] = []  # (replica, pid, monotonic time)

    def __iter__(self) -> Iterator[Replica]:
        return iter(self.replicas)

    def __getitem__(self, index: int) -> Replica:
        return self.replicas[index]

    @property
    def target(self) -> str:
        """One channel target naming every replica, for a round-robin channel."""
        return "ipv4:" + ",".join(replica.address for replica in self.replicas)

    async def start(self, replica: Replica) -> None:
        """Starts the replica on its ports; returns once it serves (its banner printed)."""
        assert replica.server is None or replica.server.process.returncode is not None
        replica.starts += 1
        env = {
            **self.env,
            "DATASETD_LISTEN": replica.address,
            "DATASETD_HTTP_LISTEN": f"127.0.0.1:{replica.http_port}",
            "DATASETD_DATA_DIR": str(replica.data_dir),
            "PYTHONUNBUFFERED": "1",
        }
        with replica.log_path.open("ab") as log:
            log.write(START_MARK + f"{replica.starts} ===\n".encode())
            log.flush()
            process = await start_serve(env, stderr=log)
        assert process.stdout is not None
        banner: list[str] = []
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while not banner or not banner[-1].startswith("stop with Ctrl-C"):
                    line = await process.stdout.readline()
                    if not line:
                        raise AssertionError(
                            f"replica {replica.index} exited before serving: "
                            f"{''.join(banner)}\n{replica.log_tail()}"
                        )
                    banner.append(line.decode())
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        replica.server = ServerProcess(
            process, replica.address, "".join(banner), f"127.0.0.1:{replica.http_port}"
        )

    async def start_all(self) -> None:
        await asyncio.gather(*(self.start(replica) for replica in self.replicas))

    async def kill(self, replica: Replica) -> None:
        """SIGKILL of the replica and anything it started: nothing of it lingers."""
        server = replica.server
        assert server is not None and server.process.returncode is None
        victims = [psutil.Process(server.pid), *server.descendants()]
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGKILL)
        await server.process.wait()
        _, alive = await asyncio.to_thread(psutil.wait_procs, victims, 10)
        assert not alive, f"still running after SIGKILL: {alive}"
        self.kills.append((replica.index, server.pid, time.monotonic()))

    async def stop_all(self) -> None:
        """SIGTERM (a graceful stop) of every running replica; SIGKILL if it hangs."""

        async def stop(server: ServerProcess) -> None:
            if server.process.returncode is not None:
                return
            try:
                await server.stop()
            except TimeoutError:
                server.process.kill()
                await server.process.wait()

        await asyncio.gather(
            *(stop(replica.server) for replica in self.replicas if replica.server is not None)
        )

    def replica_of_worker(self, worker_id: str) -> Replica | None:
        """The running replica a job runner's worker id names (host:pid:random)."""
        parts = worker_id.split(":")
        if len(parts) < 2 or not parts[-2].isdigit():
            return None
        pid = int(parts[-2])
        for replica in self.replicas:
            server = replica.server
            if server is not None and server.pid == pid and server.process.returncode is None:
                return replica
        return None


@contextlib.asynccontextmanager
async def running_replicas(
    env: dict[str, str], directory: Path, count: int
) -> AsyncIterator[Replicas]:
    replicas = Replicas(env, directory, count)
    try:
        await replicas.start_all()
        yield replicas
    finally:
        await replicas.stop_all()


async def health_of(address: str) -> int:
    """The health service's status of one replica (not through the balanced channel)."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        status: int = reply.status
        return status


# --- archives ---------------------------------------------------------------------------


def archive_input_ids(archive: bytes) -> list[str]:
    """The input ids a Clarifai-Data-Protobuf archive holds, read independently of the
    server's reader: every entry but `mimetype` is a serialized InputBatch."""
    ids: list[str] = []
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        for info in opened.infolist():
            if info.filename == "mimetype" or info.is_dir():
                continue
            batch = input_pb2.InputBatch.FromString(opened.read(info))
            ids.extend(message.id for message in batch.inputs)
    return ids


# --- run records --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """One row of job_runs: one claim of a job, until it ended or its lease ran out."""

    id: int
    job_id: int
    kind: str
    worker_id: str
    attempt: int
    started_at: datetime
    heartbeat_at: datetime
    lease_until: datetime
    finished_at: datetime | None
    outcome: str | None

    @property
    def ended(self) -> datetime:
        """When the run was over at the latest: when it ended, or, for a run whose worker
        died (nobody saw it end), when the lease its last heartbeat extended ran out.
        Another run of the job before then would have run beside it."""
        return self.finished_at if self.finished_at is not None else self.lease_until


RUNS = """
SELECT id, job_id, kind, worker_id, attempt, started_at, heartbeat_at, lease_until,
       finished_at, outcome
FROM job_runs ORDER BY job_id, started_at, id
"""


async def job_runs(db: Database) -> list[Run]:
    return [Run(**dict(row)) for row in await db.fetch(RUNS)]


def run_problems(runs: Iterable[Run], *, settled: bool = True) -> list[str]:
    """What the run records show went wrong: two runs of a job at the same time (a run
    started before the previous one ended or, when its worker died, before its lease
    expired), a run that was neither ended nor taken over yet was followed by another,
    and, when `settled` (no job should be running any more), a run still open."""
    problems: list[str] = []
    by_job: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        by_job[run.job_id].append(run)
    for job_id, job in sorted(by_job.items()):
        job.sort(key=lambda run: (run.started_at, run.id))
        for earlier, later in itertools.pairwise(job):
            if later.started_at < earlier.ended:
                problems.append(
                    f"job {job_id}: run {later.id} ({later.worker_id}) started at "
                    f"{later.started_at.isoformat()}, before run {earlier.id} "
                    f"({earlier.worker_id}, {earlier.outcome or 'open'}) was over at "
                    f"{earlier.ended.isoformat()}"
                )
            if earlier.finished_at is None and earlier.outcome != "expired":
                problems.append(
                    f"job {job_id}: run {earlier.id} has no end and was not taken over "
                    f"({earlier.outcome or 'open'}), yet run {later.id} followed it"
                )
        for run in job:
            if run.heartbeat_at < run.started_at or run.lease_until < run.heartbeat_at:
                problems.append(f"job {job_id}: run {run.id} has its times out of order")
        if settled and job[-1].outcome is None:
            problems.append(f"job {job_id}: run {job[-1].id} ({job[-1].worker_id}) never ended")
    return problems


def runs_by_worker(runs: Sequence[Run]) -> dict[str, list[Run]]:
    grouped: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        grouped[run.worker_id].append(run)
    return dict(grouped)
