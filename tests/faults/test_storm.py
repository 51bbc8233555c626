"""A kill -9 storm: four writers and four readers against a server that is SIGKILLed over
and over, sometimes with its whole stack (PostgreSQL and SeaweedFS too, restarted on the
same data directories).

Writers upload inputs (CreateInputs batches with server-generated ids, and client-streamed
UploadInput calls, some of them cut off mid-stream on purpose), create versions and request
exports. Every call that was not acknowledged is retried with the same request id until it
is, so a retry that ran twice would show as a duplicate. Readers list, get and download
inputs and exports, checking what they read against what was acknowledged. Afterwards the
ledger check (tests.faults.ledger) and, after a zero-grace orphan collection, the orphan
check must hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import dataclasses
import hashlib
import io
import json
import os
import random
import secrets
import signal
import sys
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psutil
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

from service.storage.blobs import ContentAddressedBlobStore, content_key
from service.storage.db import Database
from service.storage.objectstore import ObjectStore
from tests.conftest import Caller, Stack, object_store
from tests.faults.harness import noise_png
from tests.faults.ledger import (
    Ledger,
    LedgerReport,
    OrphanReport,
    check_ledger,
    collect_and_check_orphans,
    zip_problem,
)
from tests.processes import ROOT, ServerProcess, clean_env, run_server

R = TypeVar("R")
T = TypeVar("T")

WRITERS = 4
READERS = 4
BATCH = 4
CALL_TIMEOUT = 15.0
UPLOAD_CHUNK = 32 * 1024
VERSION_READY = status_pb2.STATUS_CODE_DATASET_VERSION_READY
VERSION_FAILED = status_pb2.STATUS_CODE_DATASET_VERSION_FAILURE
EXPORT_SUCCESS = status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_SUCCESS
EXPORT_FAILED = status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_FAILED
PROTOBUF = dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF
# What a client may see while the server (or its stack) is being killed; anything else
# (INTERNAL, UNKNOWN, NOT_FOUND for an acknowledged input...) is a finding.
TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
SETTLE_TIMEOUT = 120.0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Down(Exception):
    """The server is not up, or the storm is over."""


class Target:
    """The server being stormed: its current channel, if it is up."""

    def __init__(self, app: str, key: str) -> None:
        self.caller = Caller(app, key)
        self.channel: grpc.aio.Channel | None = None
        self.up = asyncio.Event()
        self.over = False

    async def ready(self) -> grpc.aio.Channel:
        while self.channel is None:
            if self.over:
                raise Down
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.up.wait(), 0.5)
        return self.channel

    def inputs(self, channel: grpc.aio.Channel) -> input_service_pb2_grpc.InputServiceAsyncStub:
        return input_service_pb2_grpc.InputServiceStub(channel)

    def versions(
        self, channel: grpc.aio.Channel
    ) -> dataset_version_service_pb2_grpc.DatasetVersionServiceAsyncStub:
        return dataset_version_service_pb2_grpc.DatasetVersionServiceStub(channel)


@dataclasses.dataclass
class Tally:
    acknowledged: int = 0
    retried: int = 0
    abandoned: int = 0
    cut_off: int = 0
    reads: int = 0
    server_kills: int = 0
    stack_kills: int = 0
    # Versions and exports whose job was given up after its runner died in each attempt.
    given_up: list[str] = dataclasses.field(default_factory=list)
    findings: list[str] = dataclasses.field(default_factory=list)
    codes: dict[str, int] = dataclasses.field(default_factory=dict)

    def saw(self, code: grpc.StatusCode) -> None:
        self.codes[code.name] = self.codes.get(code.name, 0) + 1


@dataclasses.dataclass
class Storm:
    target: Target
    ledger: Ledger
    tally: Tally
    # (dataset id, version id, export id) of every acknowledged export.
    exports: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    # (input id, sha256) of every acknowledged input, for the readers.
    acked: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def app(self) -> str:
        return self.target.caller.app_id

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self.target.caller.metadata

    async def until_acknowledged(
        self, what: str, call: Callable[[grpc.aio.Channel], Awaitable[T]]
    ) -> T | None:
        """Runs `call` until it is acknowledged; None if the storm ended first."""
        first = True
        while True:
            try:
                channel = await self.target.ready()
            except Down:
                self.tally.abandoned += 1
                return None
            if not first:
                self.tally.retried += 1
            first = False
            try:
                result = await call(channel)
            except grpc.aio.AioRpcError as error:
                self.tally.saw(error.code())
                if error.code() not in TRANSIENT:
                    self.tally.findings.append(f"{what}: {error.code().name} {error.details()}")
                    return None
                await asyncio.sleep(0.05)
                continue
            self.tally.acknowledged += 1
            return result

    async def unary_until_acknowledged(
        self,
        what: str,
        rpc: Callable[[grpc.aio.Channel], grpc.aio.UnaryUnaryMultiCallable[R, T]],
        request: R,
    ) -> T | None:
        """`until_acknowledged` of the unary call of `rpc(channel)` with `request`, the
        storm's key and CALL_TIMEOUT."""
        return await self.until_acknowledged(
            what,
            lambda channel: rpc(channel)(request, metadata=self.metadata, timeout=CALL_TIMEOUT),
        )


async def writer(storm: Storm, index: int, stop: asyncio.Event) -> None:
    app, dataset = storm.app, f"d{index}"
    created = await storm.unary_until_acknowledged(
        f"w{index} CreateDataset",
        lambda channel: dataset_service_pb2_grpc.DatasetServiceStub(channel).CreateDataset,
        dapi.CreateDatasetRequest(
            app_id=app, request_id=f"w{index}-dataset", dataset=dataset_pb2.Dataset(id=dataset)
        ),
    )
    if created is None:
        return
    pending: list[str] = []
    step = 0
    while not stop.is_set():
        if step % 3 == 1:
            await upload(storm, index, step, cut=step % 6 == 4)
        else:
            await batch(storm, index, step)
        if step % 5 == 4:
            version_id = f"v{step}"
            request = vapi.CreateDatasetVersionRequest(
                app_id=app,
                dataset_id=dataset,
                request_id=f"w{index}-{version_id}",
                version=dataset_version_pb2.DatasetVersion(id=version_id),
            )
            made = await storm.unary_until_acknowledged(
                f"w{index} CreateDatasetVersion",
                lambda channel: storm.target.versions(channel).CreateDatasetVersion,
                request,
            )
            if made is not None:
                storm.ledger.version(app, dataset, version_id)
                pending.append(version_id)
        pending = await export_ready(storm, index, pending)
        step += 1


async def batch(storm: Storm, index: int, step: int) -> None:
    images = [noise_png(f"{storm.app}/{index}/{step}/{i}".encode(), 40) for i in range(BATCH)]
    request = api.CreateInputsRequest(
        app_id=storm.app,
        request_id=f"w{index}-batch-{step}",
        # Server-generated ids: a request that ran twice would leave two inputs per image.
        inputs=[
            input_pb2.Input(
                data=data_pb2.Data(image=data_pb2.Image(base64=image)), dataset_ids=[f"d{index}"]
            )
            for image in images
        ],
    )
    response = await storm.unary_until_acknowledged(
        f"w{index} CreateInputs", lambda channel: storm.target.inputs(channel).CreateInputs, request
    )
    if response is None:
        for image in images:
            storm.ledger.attempted(storm.app, sha(image))
        return
    for result in response.results:
        digest = sha(images[result.index])
        storm.ledger.acknowledged(storm.app, result.input_id, digest, (f"d{index}",))
        storm.acked.append((result.input_id, digest))


async def upload(storm: Storm, index: int, step: int, *, cut: bool) -> None:
    media = noise_png(f"{storm.app}/{index}/{step}/up".encode(), 160)
    input_id = f"w{index}-up-{step}"
    header = api.UploadInputHeader(
        app_id=storm.app,
        input=input_pb2.Input(
            id=input_id, data=data_pb2.Data(image=data_pb2.Image()), dataset_ids=[f"d{index}"]
        ),
        content_length=len(media),
        sha256=sha(media),
        request_id=f"w{index}-upload-{step}",
    )
    chunks = [media[i : i + UPLOAD_CHUNK] for i in range(0, len(media), UPLOAD_CHUNK)]

    async def send(channel: grpc.aio.Channel) -> api.UploadInputResponse | None:
        call = storm.target.inputs(channel).UploadInput(
            metadata=storm.metadata, timeout=CALL_TIMEOUT
        )
        await call.write(api.UploadInputRequest(header=header))
        for number, chunk in enumerate(chunks):
            if cut and number == len(chunks) // 2:
                # Cut off mid-stream: the server has part of the bytes, then the
                # client goes. Nothing of it may stay behind.
                await asyncio.sleep(0.05)
                call.cancel()
                return None
            await call.write(api.UploadInputRequest(chunk=chunk))
        await call.done_writing()
        response: api.UploadInputResponse = await call
        return response

    if cut:
        try:
            channel = await storm.target.ready()
            await send(channel)
        except (Down, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        # Never recorded as sent: any trace of these bytes is a finding.
        storm.tally.cut_off += 1
        return
    response = await storm.until_acknowledged(f"w{index} UploadInput", send)
    if response is None:
        storm.ledger.attempted(storm.app, sha(media))
        return
    storm.ledger.acknowledged(storm.app, response.input.id, sha(media), (f"d{index}",))
    storm.acked.append((response.input.id, sha(media)))


async def export_ready(storm: Storm, index: int, pending: list[str]) -> list[str]:
    """Requests an export of each pending version that is READY; the others stay pending."""
    left = []
    for version_id in pending:
        try:
            channel = await storm.target.ready()
            got = await storm.target.versions(channel).GetDatasetVersion(
                vapi.GetDatasetVersionRequest(
                    app_id=storm.app, dataset_id=f"d{index}", version_id=version_id
                ),
                metadata=storm.metadata,
                timeout=CALL_TIMEOUT,
            )
        except Down:
            return pending
        except grpc.aio.AioRpcError as error:
            storm.tally.saw(error.code())
            if error.code() not in TRANSIENT:
                storm.tally.findings.append(f"GetDatasetVersion {version_id}: {error.code().name}")
            left.append(version_id)
            continue
        if got.version.status.code == VERSION_FAILED:
            continue  # judged by settle(), which can tell why
        if got.version.status.code != VERSION_READY:
            left.append(version_id)
            continue
        request = vapi.ExportDatasetVersionRequest(
            app_id=storm.app,
            dataset_id=f"d{index}",
            version_id=version_id,
            format=PROTOBUF,
            request_id=f"w{index}-export-{version_id}",
        )
        exported = await storm.unary_until_acknowledged(
            f"w{index} ExportDatasetVersion",
            lambda channel: storm.target.versions(channel).ExportDatasetVersion,
            request,
        )
        if exported is not None:
            storm.exports.append((f"d{index}", version_id, exported.export.id))
    return left


async def download_export(
    storm: Storm, channel: grpc.aio.Channel, export: tuple[str, str, str]
) -> bytes | None:
    """The archive if the export succeeded, checked against its announced size and hash."""
    dataset_id, version_id, export_id = export
    got = await storm.target.versions(channel).GetExport(
        vapi.GetExportRequest(
            app_id=storm.app, dataset_id=dataset_id, version_id=version_id, export_id=export_id
        ),
        metadata=storm.metadata,
        timeout=CALL_TIMEOUT,
    )
    if got.export.status.code != EXPORT_SUCCESS:
        # A failed export is judged by settle(), which can tell why.
        return None
    messages = [
        m
        async for m in storm.target.versions(channel).DownloadExport(
            vapi.DownloadExportRequest(
                app_id=storm.app, dataset_id=dataset_id, version_id=version_id, export_id=export_id
            ),
            metadata=storm.metadata,
            timeout=CALL_TIMEOUT,
        )
    ]
    archive = b"".join(m.chunk for m in messages)
    if len(archive) != messages[0].total_size or sha(archive) != messages[0].sha256:
        storm.tally.findings.append(f"export {export}: download does not match its header")
    storm.ledger.archive(storm.app, archive)
    return archive


async def reader(storm: Storm, index: int, stop: asyncio.Event) -> None:
    rng = random.Random(index)
    while not stop.is_set():
        try:
            channel = await storm.target.ready()
            choice = rng.randrange(4)
            if choice == 0:
                await storm.target.inputs(channel).ListInputs(
                    api.ListInputsRequest(app_id=storm.app, page_size=50),
                    metadata=storm.metadata,
                    timeout=CALL_TIMEOUT,
                )
            elif choice == 1 and storm.acked:
                input_id, digest = rng.choice(storm.acked)
                chunks = [
                    m.chunk
                    async for m in storm.target.inputs(channel).DownloadInput(
                        api.DownloadInputRequest(app_id=storm.app, input_id=input_id),
                        metadata=storm.metadata,
                        timeout=CALL_TIMEOUT,
                    )
                ]
                if sha(b"".join(chunks)) != digest:
                    storm.tally.findings.append(f"DownloadInput {input_id}: other bytes")
            elif choice == 3 and storm.acked:
                input_id, _ = rng.choice(storm.acked)
                got = await storm.target.inputs(channel).GetInput(
                    api.GetInputRequest(app_id=storm.app, input_id=input_id),
                    metadata=storm.metadata,
                    timeout=CALL_TIMEOUT,
                )
                if got.input.id != input_id:
                    storm.tally.findings.append(f"GetInput {input_id}: got {got.input.id}")
            elif choice == 2 and storm.exports:
                await download_export(storm, channel, rng.choice(storm.exports))
            else:
                await asyncio.sleep(0.05)
                continue
            storm.tally.reads += 1
        except Down:
            return
        except grpc.aio.AioRpcError as error:
            storm.tally.saw(error.code())
            if error.code() not in TRANSIENT:
                storm.tally.findings.append(f"reader: {error.code().name} {error.details()}")
            await asyncio.sleep(0.05)


# --- the stack and the kills ---------------------------------------------------------------


# The stack runs in a process of its own: PostgreSQL and SeaweedFS are spawned with a
# pre-exec step, and a fork of this process (whose gRPC threads are busy) may abort
# before its exec.
STACK_SCRIPT = """
import json, pathlib, sys
from service.devstack import EmbeddedStack
stack = EmbeddedStack(pathlib.Path(sys.argv[1]), bucket="storm")
dsn, s3 = stack.start()
print(json.dumps({"dsn": dsn, "endpoint": s3.endpoint, "access_key": s3.access_key,
                  "secret_key": s3.secret_key, "bucket": s3.bucket,
                  "pids": [stack.postgres.pid, stack.s3.pid]}), flush=True)
sys.stdin.read()
stack.stop()
"""


class StackProcess:
    """PostgreSQL and SeaweedFS on `directory`, run by a helper process."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.process: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            STACK_SCRIPT,
            str(self.directory),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 120)
        assert line, "the stack did not start"
        self.info = json.loads(line)

    @property
    def env(self) -> dict[str, str]:
        return {
            "DATASETD_DATABASE_URL": self.info["dsn"],
            "DATASETD_S3_ENDPOINT": self.info["endpoint"],
            "DATASETD_S3_ACCESS_KEY": self.info["access_key"],
            "DATASETD_S3_SECRET_KEY": self.info["secret_key"],
            "DATASETD_S3_BUCKET": self.info["bucket"],
        }

    def servers(self) -> list[psutil.Process]:
        """PostgreSQL (the postmaster and its backends) and SeaweedFS."""
        found = []
        for pid in self.info["pids"]:
            process = psutil.Process(pid)
            found += [process, *process.children(recursive=True)]
        return found

    async def kill(self) -> None:
        """kill -9 of every process of the stack (the servers first: the helper's death
        would send them their stop signal)."""
        assert self.process is not None
        victims = self.servers()
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGKILL)
        self.process.kill()
        await self.process.wait()
        await asyncio.to_thread(psutil.wait_procs, victims, 10)

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 90)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


@dataclasses.dataclass
class Stormed:
    stack: StackProcess
    env: dict[str, str]
    tally: Tally

    async def kill(self, server: ServerProcess, *, whole_stack: bool) -> None:
        server.process.send_signal(signal.SIGKILL)
        if whole_stack:
            await self.stack.kill()
        await server.process.wait()
        if whole_stack:
            # Restarted on the same data directories: PostgreSQL recovers from its WAL.
            await self.stack.start()
            self.env.update(self.stack.env)
            self.tally.stack_kills += 1
        else:
            self.tally.server_kills += 1


@contextlib.asynccontextmanager
async def dedicated_stack(directory: Path) -> AsyncIterator[StackProcess]:
    stack = StackProcess(directory)
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()


# JobRunner's default: a job claimed once more after this many runs whose runner died is
# failed instead, so that a job that kills its process cannot take replicas down forever.
# Under a storm of kills a job can be killed that often without any fault of its own.
MAX_JOB_ATTEMPTS = 3
JOB_ATTEMPTS = {
    "version": "SELECT j.attempts FROM dataset_versions v JOIN jobs j ON j.id = v.job_id"
    " WHERE v.app_id = $1 AND v.dataset_id = $2 AND v.id = $3",
    "export": "SELECT j.attempts FROM exports e JOIN jobs j ON j.id = e.job_id"
    " WHERE e.app_id = $1 AND e.dataset_id = $2 AND e.version_id = $3 AND e.id = $4",
}


async def killed_too_often(db: Database, what: str, *key: str) -> bool:
    """Whether the job of a failed version or export was given up because its runner died
    in each of its attempts (rather than because it raised)."""
    attempts = await db.fetchval(JOB_ATTEMPTS[what], *key)
    return attempts is not None and attempts > MAX_JOB_ATTEMPTS


async def settle(storm: Storm, channel: grpc.aio.Channel, db: Database, deadline: float) -> None:
    """Waits for every acknowledged version to be READY and every acknowledged export to
    finish, and downloads each finished export once. A version or an export whose job was
    given up after its runner was killed in each attempt is counted, not a finding; such an
    export is asked for again, as a client would (a failed export is retried when asked
    again); anything else failed is a finding."""
    versions = storm.target.versions(channel)
    app = storm.ledger.app(storm.app)
    for dataset_id, version_id in sorted(app.versions):
        while True:
            got = await versions.GetDatasetVersion(
                vapi.GetDatasetVersionRequest(
                    app_id=storm.app, dataset_id=dataset_id, version_id=version_id
                ),
                metadata=storm.metadata,
                timeout=CALL_TIMEOUT,
            )
            if got.version.status.code == VERSION_READY:
                break
            if got.version.status.code == VERSION_FAILED:
                if not await killed_too_often(db, "version", storm.app, dataset_id, version_id):
                    storm.tally.findings.append(f"{dataset_id}/{version_id}: {got.version.status}")
                storm.tally.given_up.append(f"version {dataset_id}/{version_id}")
                app.versions.discard((dataset_id, version_id))
                break
            assert time.monotonic() < deadline, f"{dataset_id}/{version_id}: {got.version.status}"
            await asyncio.sleep(0.2)
    for export in storm.exports:
        again = 0
        while await download_export(storm, channel, export) is None:
            assert time.monotonic() < deadline, f"export {export} never finished"
            state = await versions.GetExport(
                vapi.GetExportRequest(
                    app_id=storm.app,
                    dataset_id=export[0],
                    version_id=export[1],
                    export_id=export[2],
                ),
                metadata=storm.metadata,
                timeout=CALL_TIMEOUT,
            )
            if state.export.status.code == EXPORT_FAILED:
                if not await killed_too_often(db, "export", storm.app, *export):
                    storm.tally.findings.append(f"export {export}: {state.export.status}")
                    break
                storm.tally.given_up.append(f"export {export}")
                again += 1
                asked = await versions.ExportDatasetVersion(
                    vapi.ExportDatasetVersionRequest(
                        app_id=storm.app,
                        dataset_id=export[0],
                        version_id=export[1],
                        format=PROTOBUF,
                        request_id=f"settle-{export[2]}-{again}",
                    ),
                    metadata=storm.metadata,
                    timeout=CALL_TIMEOUT,
                )
                assert asked.export.id == export[2], "the same export, asked again"
            await asyncio.sleep(0.2)


async def run_storm(
    directory: Path, kills: int, stack_kill_every: int, seed: int, tally: Tally
) -> tuple[LedgerReport, OrphanReport]:
    rng = random.Random(seed)
    app, key = "storm", "storm-key-" + secrets.token_hex(12)
    async with dedicated_stack(directory) as stack:
        stormed = Stormed(
            stack,
            {
                **clean_env(),
                "DATASETD_BOOTSTRAP_KEY": key,
                "DATASETD_BOOTSTRAP_APP": app,
                # Jobs of a killed server are taken over quickly.
                "DATASETD_JOB_LEASE": "2s",
                "DATASETD_LOG_LEVEL": "WARNING",
            },
            tally,
        )
        stormed.env.update(stack.env)
        target = Target(app, key)
        storm = Storm(target, Ledger(), tally)
        stop = asyncio.Event()
        workers = [asyncio.create_task(writer(storm, i, stop)) for i in range(WRITERS)]
        workers += [asyncio.create_task(reader(storm, i, stop)) for i in range(READERS)]
        # Channels stay open until the end: closing one would cancel the calls still on it
        # locally, where a client of a dying server sees UNAVAILABLE.
        channels: list[grpc.aio.Channel] = []
        try:
            for number in range(kills):
                whole_stack = (number + 1) % stack_kill_every == 0
                async with run_server(dict(stormed.env)) as server:
                    channels.append(grpc.aio.insecure_channel(server.address))
                    target.channel = channels[-1]
                    target.up.set()
                    await asyncio.sleep(rng.uniform(0.3, 2.0))
                    target.up.clear()
                    target.channel = None
                    await stormed.kill(server, whole_stack=whole_stack)
            stop.set()
            async with run_server(dict(stormed.env)) as server:
                channels.append(grpc.aio.insecure_channel(server.address))
                target.channel = channels[-1]
                target.up.set()
                # The writers finish their current step against a live server.
                await asyncio.wait_for(asyncio.gather(*workers), SETTLE_TIMEOUT)
                target.over = True
                db = await Database.connect(stack.info["dsn"], min_size=1, max_size=2)
                try:
                    await settle(storm, channels[-1], db, time.monotonic() + SETTLE_TIMEOUT)
                finally:
                    await db.close()
                await server.stop()
        finally:
            target.over = True
            stop.set()
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            for channel in channels:
                await channel.close()
        return await check_stack(stack, storm.ledger)


async def check_stack(stack: StackProcess, ledger: Ledger) -> tuple[LedgerReport, OrphanReport]:
    """The ledger check, then the orphan check after a zero-grace collection (the server is
    stopped: nothing writes)."""
    info = stack.info
    objects = ObjectStore(info["endpoint"], info["access_key"], info["secret_key"], info["bucket"])
    db = await Database.connect(info["dsn"], min_size=1, max_size=2)
    try:
        return (
            await check_ledger(db, objects, ledger),
            await collect_and_check_orphans(db, objects),
        )
    finally:
        await db.close()
        objects.close()


async def storm_and_check(directory: Path, kills: int, stack_kill_every: int) -> None:
    seed = int(os.environ.get("STORM_SEED", "0")) or secrets.randbelow(2**31)
    started = time.monotonic()
    tally = Tally()
    try:
        report, orphans = await run_storm(directory, kills, stack_kill_every, seed, tally)
    finally:
        print(
            f"\nstorm (seed {seed}) for {time.monotonic() - started:.1f}s: "
            f"{tally.server_kills} server kills, {tally.stack_kills} whole-stack kills; "
            f"{tally.acknowledged} acknowledged calls, {tally.retried} retries, "
            f"{tally.abandoned} abandoned at the end, {tally.cut_off} uploads cut off, "
            f"{tally.reads} reads; errors seen {tally.codes}; given up after their runner "
            f"was killed {MAX_JOB_ATTEMPTS} times: {tally.given_up}; findings {tally.findings}"
        )
    print(f"ledger: {report}\norphans: {orphans}")
    assert not tally.findings, tally.findings
    assert tally.server_kills + tally.stack_kills == kills
    # The storm proved something: calls were interrupted and retried, inputs, versions
    # and exports were acknowledged and checked.
    assert tally.retried > 0, "no kill interrupted a call"
    assert report.acknowledged_inputs > 0
    assert report.ready_versions > 0
    assert report.archives_checked > 0
    assert tally.cut_off > 0


async def test_kill_storm_short(tmp_path: Path) -> None:
    await storm_and_check(tmp_path, kills=5, stack_kill_every=3)


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_kill_storm(tmp_path: Path) -> None:
    await storm_and_check(tmp_path, kills=50, stack_kill_every=7)


# --- the checks can fail -------------------------------------------------------------------


async def test_the_ledger_check_finds_what_it_is_for(
    stack: Stack, db: Database, caller: Caller, inputs: input_service_pb2_grpc.InputServiceAsyncStub
) -> None:
    """Lost, unsent and damaged data each fail the checks, which the storm relies on."""
    images = [noise_png(f"{caller.app_id}/{i}".encode(), 24) for i in range(3)]

    async def create(image: bytes) -> str:
        response = await inputs.CreateInputs(
            api.CreateInputsRequest(
                app_id=caller.app_id,
                inputs=[input_pb2.Input(data=data_pb2.Data(image=data_pb2.Image(base64=image)))],
            ),
            metadata=caller.metadata,
        )
        return response.results[0].input_id

    ledger = Ledger()
    for image in images[:2]:
        ledger.acknowledged(caller.app_id, await create(image), sha(image))
    objects = object_store(stack)
    try:
        assert (await check_ledger(db, objects, ledger)).acknowledged_inputs == 2

        lost = copy.deepcopy(ledger)
        lost.acknowledged(caller.app_id, "never-stored", sha(b"x"))
        with pytest.raises(AssertionError, match="never-stored: acknowledged, not in the database"):
            await check_ledger(db, objects, lost)

        await create(images[2])
        with pytest.raises(AssertionError, match="never sent"):
            await check_ledger(db, objects, ledger)
        ledger.attempted(caller.app_id, sha(images[2]))
        await check_ledger(db, objects, ledger)

        key = content_key(sha(images[0]))
        await objects.delete(key)
        try:
            with pytest.raises(AssertionError, match=f"object {key} is missing"):
                await check_ledger(db, objects, ledger)
        finally:
            await objects.put(key, images[0], "image/png")

        # A stray object without a row is collected; a row whose object is gone is found.
        stray = content_key(sha(b"no row for these bytes"))
        await objects.put(stray, b"no row for these bytes", "application/octet-stream")
        assert (await collect_and_check_orphans(db, objects)).collected >= 1
        assert not await objects.exists(stray)
        await objects.delete(key)
        try:
            with pytest.raises(AssertionError, match="rows without an object") as raised:
                await collect_and_check_orphans(db, objects)
            assert key in str(raised.value)
        finally:
            await objects.put(key, images[0], "image/png")
        await collect_and_check_orphans(db, objects)
    finally:
        objects.close()

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("a", b"a" * 1000)
    assert zip_problem(archive.getvalue()) is None
    assert zip_problem(archive.getvalue()[:-30]) is not None
    damaged = bytearray(archive.getvalue())
    damaged[damaged.index(b"a" * 100) + 10] ^= 1
    assert zip_problem(bytes(damaged)) == "member a fails its CRC"


class _RolledBack(Exception):
    pass


async def test_the_collector_finds_objects_whose_row_was_rolled_back(
    stack: Stack, db: Database
) -> None:
    """Inside a transaction (a mutation with a request id) the blobs row commits only with
    it, after the object was written; a rollback leaves an object without a row, which the
    collector removes. An object whose row is not committed yet is left alone."""
    objects = object_store(stack)
    blobs = ContentAddressedBlobStore(db, objects)

    async def collect() -> None:
        # In a context of its own: not on the transaction's connection.
        collection = asyncio.create_task(
            blobs.collect_orphans(timedelta(hours=1), 1000), context=contextvars.Context()
        )
        await collection

    pending, rolled_back = secrets.token_bytes(64), secrets.token_bytes(64)
    try:
        async with db.transaction():
            blob = await blobs.put(pending, "application/octet-stream")
            await collect()
            assert await objects.exists(blob.key)
        assert await db.fetchval("SELECT count(*) FROM blobs WHERE key = $1", blob.key) == 1

        with contextlib.suppress(_RolledBack):
            async with db.transaction():
                lost = await blobs.put(rolled_back, "application/octet-stream")
                raise _RolledBack
        assert await db.fetchval("SELECT count(*) FROM blobs WHERE key = $1", lost.key) == 0
        assert await objects.exists(lost.key)
        await collect()
        assert not await objects.exists(lost.key)
    finally:
        objects.close()
