"""Three datasetd replicas against one PostgreSQL and one S3 server, one client channel
balancing across them (gRPC round robin), a steady load of uploads, version creations
and exports, and a replica SIGKILLed mid-load and started again on the same ports.

Afterwards: every acknowledged input is present exactly once (tests.faults.ledger's check,
reading PostgreSQL and S3 directly), every version READY with every input acknowledged in
its dataset before it was asked for, every export complete (downloaded, its archive read
back: exactly the version's inputs), no job ran twice at the same time (the run records,
tests.faults.replicas.run_problems), calls reached every replica, and health SERVING on
all three at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
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

from service.storage.db import Database
from service.storage.objectstore import ObjectStore
from tests.conftest import Stack, stack_env
from tests.faults.harness import noise_png
from tests.faults.ledger import Ledger, check_ledger, collect_and_check_orphans, zip_problem
from tests.faults.replicas import (
    BALANCED_OPTIONS,
    SERVING,
    Replica,
    Replicas,
    Run,
    archive_input_ids,
    health_of,
    job_runs,
    run_problems,
    running_replicas,
)
from tests.scratch import scratch_database

T = TypeVar("T")
R = TypeVar("R")

REPLICAS = 3
LEASE = "3s"
BATCH = 4
UPLOAD_CHUNK = 16 * 1024
CALL_TIMEOUT = 20.0
# A call that stays UNAVAILABLE this long is a finding: two replicas keep serving.
RETRY_FOR = 60.0
VERSION_READY = status_pb2.STATUS_CODE_DATASET_VERSION_READY
VERSION_FAILED = status_pb2.STATUS_CODE_DATASET_VERSION_FAILURE
EXPORT_SUCCESS = status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_SUCCESS
EXPORT_FAILED = (
    status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_FAILED,
    status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_UNEXPECTED_ERROR,
)
PROTOBUF = dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF
# How long the versions and exports asked for during the load may take to finish after it.
SETTLE_SECONDS = 90.0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class Plan:
    uploaders: int
    load_seconds: float
    # Seconds into the load at which a replica is killed; each comes back DOWN_SECONDS later.
    kills_at: tuple[float, ...]
    version_every: float
    down_seconds: float = 2.0


@dataclasses.dataclass
class Exported:
    dataset_id: str
    version_id: str
    export_id: str
    input_ids: list[str]


@dataclasses.dataclass
class HeldUpload:
    name: str
    media: bytes
    requests: list[api.UploadInputRequest]
    channel: grpc.aio.Channel
    call: grpc.aio.StreamUnaryCall[api.UploadInputRequest, api.UploadInputResponse]


class Load:
    """The clients: uploaders, a version builder, and for each version a follow-up that
    waits for it, exports it and downloads the archive. Every call goes through the one
    balanced channel; UNAVAILABLE is retried with the same request."""

    def __init__(self, channel: grpc.aio.Channel, app: str, key: str) -> None:
        self.app = app
        self.metadata = (("authorization", f"Key {key}"),)
        self.datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        self.inputs = input_service_pb2_grpc.InputServiceStub(channel)
        self.versions = dataset_version_service_pb2_grpc.DatasetVersionServiceStub(channel)
        self.ledger = Ledger()
        self.findings: list[str] = []
        self.codes: Counter[str] = Counter()
        self.retries = 0
        # Uploads cut off by a kill and sent again whole.
        self.held_retried = 0
        # dataset id → ids of the inputs acknowledged in it so far.
        self.members: dict[str, set[str]] = defaultdict(set)
        # (dataset id, version id) → the inputs acknowledged in it before it was asked for.
        self.expected: dict[tuple[str, str], set[str]] = {}
        self.exported: list[Exported] = []
        self.follow_ups: list[asyncio.Task[None]] = []
        # job id → pid of the replica that was killed while it ran the job.
        self.cut_off: dict[int, int] = {}

    async def call(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T | None:
        """`attempt` until it succeeds; UNAVAILABLE (a replica went away under the call, or
        the channel had not noticed yet) is retried, anything else is a finding."""
        deadline = time.monotonic() + RETRY_FOR
        while True:
            try:
                return await attempt()
            except grpc.aio.AioRpcError as error:
                self.codes[error.code().name] += 1
                if error.code() is not grpc.StatusCode.UNAVAILABLE:
                    self.findings.append(f"{what}: {error.code().name} {error.details()}")
                    return None
                if time.monotonic() > deadline:
                    self.findings.append(f"{what}: UNAVAILABLE for {RETRY_FOR}s")
                    return None
                self.retries += 1
                await asyncio.sleep(0.1)

    async def unary(
        self, what: str, rpc: grpc.aio.UnaryUnaryMultiCallable[T, R], request: T
    ) -> R | None:
        return await self.call(
            what, lambda: rpc(request, metadata=self.metadata, timeout=CALL_TIMEOUT)
        )

    async def create_dataset(self, dataset_id: str) -> None:
        made = await self.unary(
            f"CreateDataset {dataset_id}",
            self.datasets.CreateDataset,
            dapi.CreateDatasetRequest(
                app_id=self.app,
                request_id=f"dataset-{dataset_id}",
                dataset=dataset_pb2.Dataset(id=dataset_id),
            ),
        )
        assert made is not None, self.findings

    async def upload(self, index: int, stop: asyncio.Event) -> None:
        dataset_id = f"d{index}"
        step = 0
        while not stop.is_set():
            name = f"{self.app}/{index}/{step}"
            images = [noise_png(f"{name}/{i}".encode(), 32) for i in range(BATCH)]
            request = api.CreateInputsRequest(
                app_id=self.app,
                request_id=f"up{index}-{step}",
                # Server-generated ids: a retry that ran twice would leave two per image.
                inputs=[
                    input_pb2.Input(
                        data=data_pb2.Data(image=data_pb2.Image(base64=image)),
                        dataset_ids=[dataset_id],
                    )
                    for image in images
                ],
            )
            response = await self.unary(f"CreateInputs {name}", self.inputs.CreateInputs, request)
            if response is None:
                for image in images:
                    self.ledger.attempted(self.app, sha(image))
            else:
                for result in response.results:
                    digest = sha(images[result.index])
                    self.ledger.acknowledged(self.app, result.input_id, digest, (dataset_id,))
                    self.members[dataset_id].add(result.input_id)
            step += 1

    def upload_requests(
        self, name: str, media: bytes, dataset_id: str
    ) -> list[api.UploadInputRequest]:
        header = api.UploadInputHeader(
            app_id=self.app,
            input=input_pb2.Input(
                data=data_pb2.Data(image=data_pb2.Image()), dataset_ids=[dataset_id]
            ),
            content_length=len(media),
            sha256=sha(media),
            request_id=f"held-{name}",
        )
        chunks = [media[i : i + UPLOAD_CHUNK] for i in range(0, len(media), UPLOAD_CHUNK)]
        return [
            api.UploadInputRequest(header=header),
            *(api.UploadInputRequest(chunk=chunk) for chunk in chunks),
        ]

    async def hold_upload(self, address: str, name: str) -> HeldUpload:
        """An UploadInput to one replica, left open halfway through its bytes: the kill of
        that replica then certainly cuts a call off."""
        media = noise_png(f"{self.app}/held/{name}".encode(), 160)
        requests = self.upload_requests(name, media, "d0")
        channel = grpc.aio.insecure_channel(address)
        stub = input_service_pb2_grpc.InputServiceStub(channel)
        call = stub.UploadInput(metadata=self.metadata, timeout=CALL_TIMEOUT)
        for request in requests[: len(requests) // 2]:
            await call.write(request)
        return HeldUpload(name, media, requests, channel, call)

    async def complete_held(self, held: HeldUpload) -> None:
        """A held call to a replica that was not killed: the rest of its bytes, and its
        answer is an acknowledged input like any other."""
        try:
            for request in held.requests[len(held.requests) // 2 :]:
                await held.call.write(request)
            await held.call.done_writing()
            response = await held.call
        except grpc.aio.AioRpcError as error:
            self.codes[error.code().name] += 1
            self.findings.append(f"held upload {held.name}: {error.code().name}")
            self.ledger.attempted(self.app, sha(held.media))
            return
        finally:
            await held.channel.close()
        self.ledger.acknowledged(self.app, response.input.id, sha(held.media), ("d0",))
        self.members["d0"].add(response.input.id)

    async def finish_held(self, held: HeldUpload) -> None:
        """The held call failed with the replica; the caller sends it again, whole and with
        the same request id, through the balanced channel."""
        try:
            await held.call
            self.findings.append(f"held upload {held.name}: answered by a killed replica")
        except grpc.aio.AioRpcError as error:
            self.codes[error.code().name] += 1
            if error.code() is not grpc.StatusCode.UNAVAILABLE:
                self.findings.append(f"held upload {held.name}: {error.code().name}")
                return
        finally:
            await held.channel.close()
        self.held_retried += 1
        response = await self.call(
            f"UploadInput {held.name}",
            lambda: self.inputs.UploadInput(
                iter(held.requests), metadata=self.metadata, timeout=CALL_TIMEOUT
            ),
        )
        if response is None:
            self.ledger.attempted(self.app, sha(held.media))
            return
        self.ledger.acknowledged(self.app, response.input.id, sha(held.media), ("d0",))
        self.members["d0"].add(response.input.id)

    async def build_versions(self, datasets: int, every: float, stop: asyncio.Event) -> None:
        for number in range(1_000_000):
            try:
                await asyncio.wait_for(stop.wait(), every)
                return
            except TimeoutError:
                pass
            dataset_id = f"d{number % datasets}"
            version_id = f"v{number}"
            expected = set(self.members[dataset_id])
            made = await self.unary(
                f"CreateDatasetVersion {dataset_id}/{version_id}",
                self.versions.CreateDatasetVersion,
                vapi.CreateDatasetVersionRequest(
                    app_id=self.app,
                    dataset_id=dataset_id,
                    request_id=f"version-{dataset_id}-{version_id}",
                    version=dataset_version_pb2.DatasetVersion(id=version_id),
                ),
            )
            if made is None:
                continue
            if made.version.status.code != VERSION_READY:
                # A version is READY when CreateDatasetVersion answers, a replay included.
                self.findings.append(f"version {dataset_id}/{version_id}: {made.version.status}")
                continue
            self.ledger.version(self.app, dataset_id, version_id)
            self.expected[(dataset_id, version_id)] = expected
            self.follow_ups.append(asyncio.create_task(self.export(dataset_id, version_id)))

    async def wait_ready(self, dataset_id: str, version_id: str) -> bool:
        name = f"{dataset_id}/{version_id}"
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline:
            got = await self.unary(
                f"GetDatasetVersion {name}",
                self.versions.GetDatasetVersion,
                vapi.GetDatasetVersionRequest(
                    app_id=self.app, dataset_id=dataset_id, version_id=version_id
                ),
            )
            if got is None:
                return False
            if got.version.status.code == VERSION_READY:
                return True
            if got.version.status.code == VERSION_FAILED:
                self.findings.append(f"version {name}: {got.version.status}")
                return False
            await asyncio.sleep(0.2)
        self.findings.append(f"version {name} not READY after {SETTLE_SECONDS}s")
        return False

    async def export(self, dataset_id: str, version_id: str) -> None:
        """Waits for the version, exports it, waits for the export, downloads the archive
        and reads it back."""
        if not await self.wait_ready(dataset_id, version_id):
            return
        name = f"{dataset_id}/{version_id}"
        asked = await self.unary(
            f"ExportDatasetVersion {name}",
            self.versions.ExportDatasetVersion,
            vapi.ExportDatasetVersionRequest(
                app_id=self.app,
                dataset_id=dataset_id,
                version_id=version_id,
                format=PROTOBUF,
                request_id=f"export-{dataset_id}-{version_id}",
            ),
        )
        if asked is None:
            return
        export_id = asked.export.id
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            got = await self.unary(
                f"GetExport {name}/{export_id}",
                self.versions.GetExport,
                vapi.GetExportRequest(
                    app_id=self.app,
                    dataset_id=dataset_id,
                    version_id=version_id,
                    export_id=export_id,
                ),
            )
            if got is None:
                return
            if got.export.status.code == EXPORT_SUCCESS:
                break
            if got.export.status.code in EXPORT_FAILED:
                self.findings.append(f"export {name}/{export_id}: {got.export.status}")
                return
            if time.monotonic() > deadline:
                self.findings.append(f"export {name}/{export_id} not done in {SETTLE_SECONDS}s")
                return
            await asyncio.sleep(0.2)

        async def download() -> tuple[bytes, int, str]:
            stream = self.versions.DownloadExport(
                vapi.DownloadExportRequest(
                    app_id=self.app,
                    dataset_id=dataset_id,
                    version_id=version_id,
                    export_id=export_id,
                ),
                metadata=self.metadata,
                timeout=CALL_TIMEOUT,
            )
            messages = [message async for message in stream]
            archive = b"".join(message.chunk for message in messages)
            return archive, messages[0].total_size, messages[0].sha256

        downloaded = await self.call(f"DownloadExport {name}/{export_id}", download)
        if downloaded is None:
            return
        archive, size, digest = downloaded
        if len(archive) != size or sha(archive) != digest:
            self.findings.append(f"export {name}/{export_id}: download does not match its header")
            return
        problem = zip_problem(archive)
        if problem is not None:
            self.findings.append(f"export {name}/{export_id}: archive is {problem}")
            return
        self.ledger.archive(self.app, archive)
        self.exported.append(
            Exported(dataset_id, version_id, export_id, archive_input_ids(archive))
        )


# The jobs a kill must cut off and another replica take to the end: the exports the load
# waits for (a version is READY when created: no build job). The background embedding job
# runs as long as uploads go on (each queues more), so it is only ever handed back at the
# final stop.
FOLLOWED_KINDS = "kind = 'export_version'"


async def pick_victim(replicas: Replicas, db: Database, within: float) -> Replica:
    """The replica running a job right now, if one does within `within` seconds (its run
    is then cut off, and the job must be taken over only once its lease expired); the
    second replica otherwise."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        rows = await db.fetch(
            "SELECT locked_by FROM jobs WHERE status = 'running' AND locked_until > now()"
            f" AND {FOLLOWED_KINDS}"
        )
        for row in rows:
            replica = replicas.replica_of_worker(row["locked_by"])
            if replica is not None:
                return replica
        await asyncio.sleep(0.02)
    return replicas[1]


# A job can end between the sighting and the kill; the kill is tried again (each time
# after the replica is back) until one cuts a job off.
KILL_ATTEMPTS = 3


async def kill_and_restart(
    replicas: Replicas, db: Database, plan: Plan, started: float, load: Load, log: list[str]
) -> None:
    for kill_at in plan.kills_at:
        await asyncio.sleep(max(0.0, started + kill_at - time.monotonic()))
        for attempt in range(KILL_ATTEMPTS):
            if await kill_one(replicas, db, plan, started, load, log, f"{kill_at}-{attempt}"):
                break


async def kill_one(
    replicas: Replicas,
    db: Database,
    plan: Plan,
    started: float,
    load: Load,
    log: list[str],
    name: str,
) -> bool:
    """One kill and restart; whether it cut a job off. An upload is held open on every
    replica beforehand, so that the kill follows the sighting of a running job at once."""
    held = {
        replica.index: await load.hold_upload(replica.address, f"kill-{name}-{replica.index}")
        for replica in replicas
    }
    victim = await pick_victim(replicas, db, within=6.0)
    pid = victim.pid
    await replicas.kill(victim)
    killed = time.monotonic()
    retried = asyncio.create_task(load.finish_held(held.pop(victim.index)))
    # What the dead replica held stays recorded as its until the lease expires (a
    # third of it at least after its last heartbeat): read at once, this is what the
    # kill cut off.
    rows = await db.fetch(
        f"SELECT id FROM jobs WHERE status = 'running' AND locked_by LIKE $1 AND {FOLLOWED_KINDS}",
        f"%:{pid}:%",
    )
    load.cut_off.update({row["id"]: pid for row in rows})
    log.append(
        f"t={time.monotonic() - started:.1f}s killed replica {victim.index} (pid {pid}), "
        f"cutting off jobs {[row['id'] for row in rows]}"
    )
    await asyncio.gather(retried, *(load.complete_held(other) for other in held.values()))
    await asyncio.sleep(max(0.0, plan.down_seconds - (time.monotonic() - killed)))
    await replicas.start(victim)
    log.append(f"t={time.monotonic() - started:.1f}s replica {victim.index} serving again")
    return bool(rows)


async def run_replicas(stack: Stack, directory: Path, plan: Plan) -> None:
    app, key = "replicas", "replicas-key-" + secrets.token_hex(12)
    # A bucket of its own too: the orphan collector of a database deletes the objects that
    # database has no row for, which are every other database's objects in a shared bucket.
    bucket = "replicas-" + secrets.token_hex(4)
    async with scratch_database(stack.dsn, "replicas") as dsn:
        env = {
            **stack_env(stack),
            "DATASETD_DATABASE_URL": dsn,
            "DATASETD_S3_BUCKET": bucket,
            "DATASETD_BOOTSTRAP_APP": app,
            "DATASETD_BOOTSTRAP_KEY": key,
            # A killed replica's jobs are taken over soon.
            "DATASETD_JOB_LEASE": LEASE,
            "DATASETD_MAINTENANCE_INTERVAL": "1h",
            # INFO: the access log tells which replica served which calls.
            "DATASETD_LOG_LEVEL": "INFO",
        }
        db = await Database.connect(dsn, min_size=1, max_size=3)
        objects = ObjectStore(stack.s3.endpoint, stack.s3.access_key, stack.s3.secret_key, bucket)
        events: list[str] = []
        try:
            async with running_replicas(env, directory, REPLICAS) as replicas:
                channel = grpc.aio.insecure_channel(replicas.target, options=BALANCED_OPTIONS)
                try:
                    load = Load(channel, app, key)
                    await drive(load, replicas, db, plan, events)
                    await check_replicas(replicas, load, events)
                except BaseException:
                    # The replicas' side of a failure: their logs go with the test's tmp_path.
                    print("\n".join(replica.log_tail(20) for replica in replicas.replicas))
                    raise
                finally:
                    await channel.close()
            await check_data(db, objects, load)
            # The replicas are stopped: nothing writes, so anything unreferenced is an orphan.
            print(f"orphans: {await collect_and_check_orphans(db, objects)}")
        finally:
            await db.close()
            objects.close()


async def drive(
    load: Load, replicas: Replicas, db: Database, plan: Plan, events: list[str]
) -> None:
    for index in range(plan.uploaders):
        await load.create_dataset(f"d{index}")
    stop = asyncio.Event()
    started = time.monotonic()
    tasks = [asyncio.create_task(load.upload(i, stop)) for i in range(plan.uploaders)]
    tasks.append(asyncio.create_task(load.build_versions(plan.uploaders, plan.version_every, stop)))
    try:
        await kill_and_restart(replicas, db, plan, started, load, events)
        await asyncio.sleep(max(0.0, started + plan.load_seconds - time.monotonic()))
        stop.set()
        await asyncio.gather(*tasks)
        await asyncio.wait_for(asyncio.gather(*load.follow_ups), SETTLE_SECONDS + 30)
    finally:
        stop.set()
        for task in [*tasks, *load.follow_ups]:
            task.cancel()
        await asyncio.gather(*tasks, *load.follow_ups, return_exceptions=True)
    events.append(f"load over after {time.monotonic() - started:.1f}s")


async def check_replicas(replicas: Replicas, load: Load, events: list[str]) -> None:
    statuses = [await health_of(replica.address) for replica in replicas.replicas]
    calls = [replica.access_calls() for replica in replicas.replicas]
    print(
        "\n" + "\n".join(events) + f"\ncalls served by each replica, per start: {calls}; "
        f"errors seen {dict(load.codes)}, {load.retries} retries; "
        f"{load.held_retried} uploads cut off by a kill and sent again"
    )
    assert not load.findings, load.findings
    assert statuses == [SERVING] * len(statuses), statuses
    assert len(replicas.kills) > 0
    assert load.held_retried == len(replicas.kills), "a held upload was not cut off"
    for replica, counts in zip(replicas.replicas, calls, strict=True):
        assert len(counts) == replica.starts
        # Round robin: every replica served calls, a restarted one again after its restart.
        assert all(count > 0 for count in counts), f"replica {replica.index} idle: {counts}"


MEMBERS = """
SELECT dataset_id, version_id, array_agg(input_id) AS input_ids
FROM version_inputs WHERE app_id = $1 GROUP BY dataset_id, version_id
"""


# A job's end is recorded by its runner right after the job's own writes commit, so the
# last export can be seen as done a moment before its run is.
RUNS_SETTLE_SECONDS = 180.0


async def settled_runs(db: Database) -> list[Run]:
    """The job runs, once none is still open (or after RUNS_SETTLE_SECONDS, as they are)."""
    deadline = time.monotonic() + RUNS_SETTLE_SECONDS
    while True:
        runs = await job_runs(db)
        last = {run.job_id: run for run in runs}  # ordered by job, then start
        if all(run.outcome is not None for run in last.values()) or time.monotonic() > deadline:
            return runs
        await asyncio.sleep(0.2)


async def check_data(db: Database, objects: ObjectStore, load: Load) -> None:
    report = await check_ledger(db, objects, load.ledger)
    print(f"ledger: {report}")
    problems: list[str] = []
    members = {
        (row["dataset_id"], row["version_id"]): set(row["input_ids"])
        for row in await db.fetch(MEMBERS, load.app)
    }
    for (dataset_id, version_id), expected in sorted(load.expected.items()):
        missing = expected - members.get((dataset_id, version_id), set())
        if missing:
            problems.append(
                f"version {dataset_id}/{version_id}: {len(missing)} inputs acknowledged "
                f"before it was asked for are not in it, e.g. {sorted(missing)[:3]}"
            )
    for export in load.exported:
        held = members.get((export.dataset_id, export.version_id), set())
        counted = Counter(export.input_ids)
        if set(counted) != held or any(n > 1 for n in counted.values()):
            problems.append(
                f"export {export.dataset_id}/{export.version_id}/{export.export_id}: "
                f"{len(export.input_ids)} inputs in the archive, the version holds {len(held)}"
            )
    if set(load.expected) != {(e.dataset_id, e.version_id) for e in load.exported}:
        problems.append("not every version was exported and downloaded")
    runs = await settled_runs(db)
    problems += run_problems(runs)
    expired = [run for run in runs if run.outcome == "expired"]
    # Each job a kill cut off: its run by the dead replica expired, and a run of another
    # worker (run_problems: after that lease) took it to the end.
    for job_id, pid in sorted(load.cut_off.items()):
        job = [run for run in runs if run.job_id == job_id]
        dead = [run for run in job if f":{pid}:" in run.worker_id]
        if not dead or dead[-1].outcome != "expired" or dead[-1].finished_at is not None:
            problems.append(f"job {job_id}: the killed replica's run is not expired: {job}")
        elif job[-1].outcome != "succeeded" or f":{pid}:" in job[-1].worker_id:
            problems.append(f"job {job_id}: not taken over to the end: {job}")
    print(
        f"{len(load.expected)} versions, {len(load.exported)} exports downloaded and read "
        f"back; {len(runs)} job runs by {len({run.worker_id for run in runs})} workers, "
        f"{len(expired)} taken over from a killed replica "
        f"({', '.join(f'job {r.job_id} {r.kind}' for r in expired)})"
    )
    assert not problems, "\n".join(problems[:30])
    assert report.acknowledged_inputs > 0 and report.ready_versions == len(load.expected)
    assert load.exported, "no export finished"
    assert load.cut_off, "no kill cut a job off"
    kinds = {run.kind for run in runs}
    # Versions are READY when created: exports are the load's jobs, builds are no more.
    assert "export_version" in kinds and "build_version" not in kinds, kinds
    assert len([run for run in runs if run.kind == "export_version"]) >= len(load.exported)


async def test_three_replicas_one_killed_under_load(stack: Stack, tmp_path: Path) -> None:
    await run_replicas(
        stack,
        tmp_path,
        Plan(uploaders=4, load_seconds=20.0, kills_at=(7.0,), version_every=1.5),
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_three_replicas_two_kills_under_heavier_load(stack: Stack, tmp_path: Path) -> None:
    await run_replicas(
        stack,
        tmp_path,
        Plan(uploaders=6, load_seconds=60.0, kills_at=(12.0, 35.0), version_every=1.0),
    )
