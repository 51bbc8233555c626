"""Benchmark of ingest through the real server, beside raw limits of the same run.

Starts the embedded stack (PostgreSQL + SeaweedFS) and the real server as a subprocess
(see bench/common.py) and measures, over a real gRPC channel with the generated stubs:

1. CreateInputs of URL-referenced images (not fetched), 128 inputs per call, each with a
   small metadata Struct and one concept, several calls in flight: inputs/s.
2. CreateInputs of 10 KB and of 100 KB images (distinct random-noise PNGs made with
   Pillow, so that the content-addressed store really stores each), 128 per call,
   several calls in flight: inputs/s and MB/s.
3. CreateInputs of URL images with two boxes each (data.regions: each stored as an
   annotation of its own, in the same transaction) and the same metadata, 128 per call:
   inputs/s, beside a raw COPY of the same rows into tables made `LIKE inputs` and
   `LIKE annotations` (128 inputs + 256 annotations per COPY pair). Target: >= 10,000/s.
4. UploadInput of one 200 MB video (an MP4 header followed by random bytes) in 1 MiB
   chunks, once or twice: MB/s. Skipped, with a note, where the server does not offer
   UploadInput (UNIMPLEMENTED, or UNAVAILABLE "not available yet").

Beside each, in alternating order within every round, the raw limit of the same
building block on the same servers at the same moment: 8 concurrent asyncpg COPYs of 128
equivalent rows into a scratch table made `LIKE inputs` (columns, defaults and indexes);
minio-client PUTs of the same image bytes with 16 threads; one minio put_object
(multipart) of the same 200 MB file. CPU per item and CPU cores in use of this process
(client), the server, PostgreSQL and the S3 server (from /proc) show where the time goes.
Before measuring, rows of another app are put into `inputs` and `blobs` and analyzed, so
that the figures are those of a database in use (see seed_steady_state and --fresh-db).

    .venv/bin/python -m bench.bench_ingest            # ~3-4 minutes
    .venv/bin/python -m bench.bench_ingest --quick    # ~35 s smoke run
    .venv/bin/python -m bench.bench_ingest --only url,stream
    .venv/bin/python -m bench.bench_ingest --only boxes --quick
    .venv/bin/python -m bench.bench_ingest --json results.json
    .venv/bin/python -m bench.bench_ingest --quick --profile-server /tmp/server.prof
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import io
import json
import math
import os
import statistics
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import asyncpg
import grpc
import urllib3
from datasetd.v1 import data_pb2, input_pb2, input_service_pb2, input_service_pb2_grpc
from google.protobuf import json_format
from minio import Minio
from minio.helpers import get_part_info
from PIL import Image

from bench.common import (
    APP_ID,
    Cpu,
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

BATCH: Final = 128  # inputs per CreateInputs call, the API's maximum
MiB: Final = 1024 * 1024
CHUNK: Final = MiB  # bytes per UploadInput message
# Part size of the raw multipart put_object: that of the server's ObjectWriter (minio
# sends 3 parts at a time).
RAW_PART_SIZE: Final = 8 * MiB
# Rows of another app put into `inputs` and `blobs` before measuring, then ANALYZEd: see
# seed_steady_state().
SEED_APP: Final = "bench-seed"
SEED_ROWS: Final = 20_000
CONCEPT_ID: Final = "bench-concept"
RAW_TABLE: Final = "bench_raw_inputs"
# Same columns, defaults, identity, checks and indexes (PK, seq, GIN on metadata, blob
# key) as `inputs`; no foreign key, as `LIKE` copies none.
RAW_TABLE_DDL: Final = f"CREATE TABLE IF NOT EXISTS {RAW_TABLE} (LIKE inputs INCLUDING ALL)"
RAW_ANNOTATIONS: Final = "bench_raw_annotations"
RAW_ANNOTATIONS_DDL: Final = (
    f"CREATE TABLE IF NOT EXISTS {RAW_ANNOTATIONS} (LIKE annotations INCLUDING ALL)"
)
RAW_ANNOTATION_COLUMNS: Final = (
    "app_id",
    "id",
    "input_id",
    "data",
    "positive_concepts",
    "region_counts",
)
BOXES_PER_INPUT: Final = 2
RAW_COPY_COLUMNS: Final = (
    "app_id",
    "id",
    "media_type",
    "blob_key",
    "source_url",
    "media_info",
    "metadata",
    "title",
)
GROUP_KEYS: Final = ("url", "boxes", "png10", "png100", "stream")
CALL_TIMEOUT: Final = 120.0
UPLOAD_TIMEOUT: Final = 600.0
CHANNEL_OPTIONS: Final = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", 64 * MiB),
]


def metadata_of(n: int) -> dict[str, Any]:
    """The small metadata every input gets (and every raw row, as JSON): three keys."""
    return {"source": "bench", "n": n, "tags": ["a", "b"]}


def box_of(n: int, b: int) -> dict[str, Any]:
    """Box `b` of input `n` as an annotation's data (the JSON form of Data)."""
    edge = 0.1 * (b + 1)
    return {
        "regions": [
            {
                "id": f"box-{n}-{b}",
                "region_info": {
                    "bounding_box": {
                        "top_row": edge,
                        "left_col": edge,
                        "bottom_row": edge + 0.3,
                        "right_col": edge + 0.4,
                    }
                },
                "data": {"concepts": [{"id": f"thing-{b}", "name": f"thing-{b}", "value": 1.0}]},
            }
        ]
    }


# ---------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int
    budget: float  # seconds for the rounds; no round starts that would overrun it
    max_seconds: float  # cap on one measurement
    raw_seconds: float  # raw measurements go on at least this long
    in_flight: int  # CreateInputs calls in flight
    copy_concurrency: int  # concurrent COPYs of 128 rows
    put_threads: int  # threads doing raw S3 PUTs
    url_batches: int  # CreateInputs calls per measurement, URL inputs (with boxes too)
    small_batches: int  # ... 10 KB images
    large_batches: int  # ... 100 KB images
    small_kb: int
    large_kb: int
    stream_mb: int
    stream_uploads: int
    groups: tuple[str, ...]  # which groups of cases to run
    fresh_db: bool  # no steady-state seeding
    json_path: Path | None
    profile_server: Path | None


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_ingest",
        description="Ingest throughput (CreateInputs, UploadInput) beside raw limits of the "
        "same run.",
    )
    parser.add_argument("--quick", action="store_true", help="~35 s smoke run")
    parser.add_argument(
        "--rounds", type=int, help="max interleaved rounds (default 5; 2 with --quick)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds for the rounds; no round starts that would overrun it "
        "(default 140; 20 with --quick)",
    )
    parser.add_argument(
        "--in-flight", type=int, default=4, help="CreateInputs calls in flight (default 4)"
    )
    parser.add_argument(
        "--stream-mb", type=int, default=200, help="size of the streamed upload (default 200)"
    )
    parser.add_argument(
        "--stream-uploads",
        type=int,
        help="streamed uploads, each beside a raw put_object (default 2; 1 with --quick)",
    )
    parser.add_argument(
        "--only",
        help=f"comma-separated groups to run, of {','.join(GROUP_KEYS)} (default all)",
    )
    parser.add_argument(
        "--fresh-db",
        action="store_true",
        help=f"do not seed {SEED_ROWS:,} rows of another app and ANALYZE before measuring: "
        "shows ingest into a fresh database, whose first minute is slowed by a foreign-key "
        "check planned without statistics",
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
    only = tuple(g.strip() for g in args.only.split(",")) if args.only else GROUP_KEYS
    if unknown := [g for g in only if g not in GROUP_KEYS]:
        parser.error(f"--only: unknown groups {', '.join(unknown)}; known: {GROUP_KEYS}")
    settings = Settings(
        quick=quick,
        rounds=args.rounds if args.rounds is not None else (2 if quick else 5),
        budget=args.budget if args.budget is not None else (20.0 if quick else 140.0),
        max_seconds=3.0 if quick else 8.0,
        raw_seconds=1.0 if quick else 2.0,
        in_flight=args.in_flight,
        copy_concurrency=8,
        put_threads=16,
        # About 1-2 s (quick) or 3-4 s per service measurement at the rates of a 2-core
        # machine; the images of each are made beforehand, outside the timing.
        url_batches=48 if quick else 160,
        small_batches=6 if quick else 16,
        large_batches=3 if quick else 10,
        small_kb=10,
        large_kb=100,
        stream_mb=args.stream_mb,
        stream_uploads=(
            args.stream_uploads if args.stream_uploads is not None else (1 if quick else 2)
        ),
        groups=only,
        fresh_db=args.fresh_db,
        json_path=args.json,
        profile_server=args.profile_server,
    )
    if settings.rounds < 1 or settings.in_flight < 1:
        parser.error("--rounds and --in-flight must be at least 1")
    if settings.stream_mb < 1 or settings.stream_uploads < 0:
        parser.error("--stream-mb must be at least 1 and --stream-uploads at least 0")
    return settings


# ---------------------------------------------------------------------------
# Test data: noise PNGs and an MP4


class NoisePngs:
    """Distinct PNGs of random RGB noise (which does not compress) of about `kb` KB."""

    def __init__(self, kb: int) -> None:
        self.kb = kb
        self.side = max(8, int(math.sqrt(kb * 1024 / 3)))
        self.seconds = 0.0  # spent making them
        self.made = 0
        self._cache: dict[int, list[bytes]] = {}

    def make(self, count: int) -> list[bytes]:
        started = time.perf_counter()
        images = []
        for _ in range(count):
            pixels = os.urandom(self.side * self.side * 3)
            buffer = io.BytesIO()
            # Level 0: noise does not compress anyway, and storing is 1.5x faster to make.
            Image.frombytes("RGB", (self.side, self.side), pixels).save(
                buffer, format="PNG", compress_level=0
            )
            images.append(buffer.getvalue())
        self.made += count
        self.seconds += time.perf_counter() - started
        return images

    def for_round(self, round_index: int, count: int) -> list[bytes]:
        """The images of a round, shared by its service and raw measurements; made on
        first use, and those of earlier rounds are dropped."""
        if round_index not in self._cache:
            self._cache = {round_index: self.make(count)}
        return self._cache[round_index]


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _full_box(kind: bytes, payload: bytes) -> bytes:
    return _box(kind, bytes(4) + payload)  # version 0, no flags


def mp4_header(total_size: int) -> bytes:
    """ftyp + moov (2 s, one 640x360 H.264 track of 50 frames) + the header of an mdat box
    that spans the rest of a file of `total_size` bytes: a faststart MP4 whose media data
    (random bytes here) follows."""
    tkhd = _full_box(
        b"tkhd",
        struct.pack(">IIIII", 0, 0, 1, 0, 2000)
        + bytes(52)
        + struct.pack(">II", 640 << 16, 360 << 16),
    )
    mdhd = _full_box(b"mdhd", struct.pack(">IIII", 0, 0, 12800, 25600) + bytes(4))
    hdlr = _full_box(b"hdlr", bytes(4) + b"vide" + bytes(12) + b"\x00")
    stts = _full_box(b"stts", struct.pack(">III", 1, 50, 512))
    avc1 = _box(b"avc1", bytes(6) + struct.pack(">H", 1) + bytes(16) + bytes(4))
    stsd = _full_box(b"stsd", struct.pack(">I", 1) + avc1)
    minf = _box(b"minf", _box(b"stbl", stsd + stts))
    trak = _box(b"trak", tkhd + _box(b"mdia", mdhd + hdlr + minf))
    mvhd = _full_box(b"mvhd", struct.pack(">IIII", 0, 0, 1000, 2000) + bytes(80))
    head = _box(b"ftyp", b"isom" + bytes(4) + b"isomiso2mp41") + _box(b"moov", mvhd + trak)
    rest = total_size - len(head)
    if rest - 8 <= 0xFFFFFFFF:
        return head + struct.pack(">I", rest) + b"mdat"
    return head + struct.pack(">I", 1) + b"mdat" + struct.pack(">Q", rest)


def stream_file(size: int, variant: int) -> bytes:
    """An MP4 of `size` bytes; each variant differs (content addressing stores each)."""
    header = mp4_header(size)
    return header + variant.to_bytes(8, "big") + os.urandom(size - len(header) - 8)


# ---------------------------------------------------------------------------
# Measuring


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A prepared run: `op` called `calls` times with `concurrency` in flight (and on
    until `min_seconds`); every call moves `items_per_call` items of `bytes_per_item`."""

    op: Op
    calls: int
    concurrency: int
    items_per_call: int
    bytes_per_item: float
    min_seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "service" or "raw"
    group: str
    # Round index -> the measurement; None for the streamed uploads, run on their own.
    prepare: Callable[[int], Awaitable[Measurement]] | None = None


@dataclasses.dataclass(frozen=True)
class Group:
    key: str
    title: str
    service_unit: str
    raw_unit: str
    service: Case
    raw: Case


@dataclasses.dataclass(frozen=True)
class Sample:
    case: str
    kind: str
    group: str
    round: int
    calls: int
    items: int
    megabytes: float
    seconds: float
    items_per_s: float
    mb_per_s: float
    p50_ms: float  # per call
    p95_ms: float
    client_cpu_ms: float  # per item
    server_cpu_ms: float
    postgres_cpu_ms: float
    s3_cpu_ms: float
    client_cores: float  # CPU seconds per second of the measurement
    server_cores: float
    postgres_cores: float
    s3_cores: float


class Runner:
    def __init__(self, settings: Settings, meter: CpuMeter) -> None:
        self._settings = settings
        self._meter = meter

    async def sample(self, case: Case, round_index: int) -> Sample:
        assert case.prepare is not None
        m = await case.prepare(round_index)
        before = self._meter.read()
        seconds, latencies = await drive(
            m.op, m.calls, m.concurrency, self._settings.max_seconds, m.min_seconds
        )
        cpu = self._meter.read() - before
        return make_sample(
            case, round_index, m.items_per_call, m.bytes_per_item, seconds, latencies, cpu
        )


def make_sample(
    case: Case,
    round_index: int,
    items_per_call: int,
    bytes_per_item: float,
    seconds: float,
    latencies: list[float],
    cpu: Cpu,
) -> Sample:
    latencies = sorted(latencies)
    items = len(latencies) * items_per_call
    megabytes = items * bytes_per_item / 1e6
    per_item = 1000.0 / max(items, 1)
    return Sample(
        case=case.name,
        kind=case.kind,
        group=case.group,
        round=round_index,
        calls=len(latencies),
        items=items,
        megabytes=megabytes,
        seconds=seconds,
        items_per_s=items / seconds,
        mb_per_s=megabytes / seconds,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p95_ms=percentile(latencies, 0.95) * 1000,
        client_cpu_ms=cpu.client * per_item,
        server_cpu_ms=cpu.server * per_item,
        postgres_cpu_ms=cpu.postgres * per_item,
        s3_cpu_ms=cpu.s3 * per_item,
        client_cores=cpu.client / seconds,
        server_cores=cpu.server / seconds,
        postgres_cores=cpu.postgres / seconds,
        s3_cores=cpu.s3 / seconds,
    )


# ---------------------------------------------------------------------------
# Through the service


def _check_created(reply: input_service_pb2.CreateInputsResponse, expected: int) -> None:
    if reply.created_count == expected:
        return
    problems = [
        f"inputs[{r.index}]: " + "; ".join(f"{e.field}: {e.description}" for e in r.errors)
        for r in reply.results
        if r.errors
    ]
    raise RuntimeError(
        f"CreateInputs created {reply.created_count} of {expected} inputs: "
        + (" | ".join(problems[:3]) or "no errors reported")
    )


class ServiceCalls:
    def __init__(self, channel: grpc.aio.Channel, key: str, settings: Settings) -> None:
        self._stub = input_service_pb2_grpc.InputServiceStub(channel)
        self._metadata = (("authorization", f"Key {key}"),)
        self._settings = settings
        self._next_n = 0  # numbers the inputs: URLs and metadata
        # Region ids name annotations, which are app-wide: unique to this run.
        self._run = uuid.uuid4().hex[:8]

    def _input(self) -> input_pb2.Input:
        n = self._next_n
        self._next_n += 1
        message = input_pb2.Input()
        message.data.metadata.update(metadata_of(n))
        message.data.concepts.append(data_pb2.Concept(id=CONCEPT_ID, value=1.0))
        return message

    def url_requests(self, batches: int) -> list[input_service_pb2.CreateInputsRequest]:
        requests = []
        for _ in range(batches):
            request = input_service_pb2.CreateInputsRequest(app_id=APP_ID)
            for _ in range(BATCH):
                message = self._input()
                message.data.image.url = f"https://example.com/i/{self._next_n - 1}.jpg"
                request.inputs.append(message)
            requests.append(request)
        return requests

    def boxed_requests(self, batches: int) -> list[input_service_pb2.CreateInputsRequest]:
        """URL inputs with BOXES_PER_INPUT boxes each, as regions of their data."""
        requests = self.url_requests(batches)
        for request in requests:
            for message in request.inputs:
                n = int(message.data.metadata.fields["n"].number_value)
                for b in range(BOXES_PER_INPUT):
                    region = message.data.regions.add()
                    json_format.ParseDict(box_of(n, b)["regions"][0], region)
                    region.id = f"{region.id}-{self._run}"
        return requests

    def image_requests(self, images: list[bytes]) -> list[input_service_pb2.CreateInputsRequest]:
        requests = []
        for start in range(0, len(images), BATCH):
            request = input_service_pb2.CreateInputsRequest(app_id=APP_ID)
            for image in images[start : start + BATCH]:
                message = self._input()
                message.data.image.base64 = image
                request.inputs.append(message)
            requests.append(request)
        return requests

    async def create(self, request: input_service_pb2.CreateInputsRequest) -> None:
        reply: input_service_pb2.CreateInputsResponse = await self._stub.CreateInputs(
            request, metadata=self._metadata, timeout=CALL_TIMEOUT
        )
        _check_created(reply, len(request.inputs))

    def batches_op(self, requests: list[input_service_pb2.CreateInputsRequest]) -> Op:
        pending = iter(requests)

        async def create_next(_: int) -> None:
            await self.create(next(pending))

        return create_next

    @staticmethod
    def upload_header(data: bytes) -> input_service_pb2.UploadInputHeader:
        """The first message of an upload of `data` as a video, with its length and hash
        (computed here, before any timing)."""
        header = input_service_pb2.UploadInputHeader(
            app_id=APP_ID,
            content_length=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        header.input.data.video.SetInParent()
        header.input.data.metadata.update(metadata_of(-1))
        return header

    async def upload(
        self, header: input_service_pb2.UploadInputHeader, data: bytes
    ) -> input_service_pb2.UploadInputResponse:
        view = memoryview(data)

        async def messages() -> AsyncIterator[input_service_pb2.UploadInputRequest]:
            yield input_service_pb2.UploadInputRequest(header=header)
            for start in range(0, len(data), CHUNK):
                yield input_service_pb2.UploadInputRequest(chunk=bytes(view[start : start + CHUNK]))

        reply: input_service_pb2.UploadInputResponse = await self._stub.UploadInput(
            messages(), metadata=self._metadata, timeout=UPLOAD_TIMEOUT
        )
        if not reply.input.id or not reply.input.data.HasField("video"):
            raise RuntimeError(f"UploadInput returned an unexpected input: {reply.input}")
        return reply


def not_available(error: grpc.aio.AioRpcError) -> bool:
    """The server does not offer the method (yet)."""
    if error.code() == grpc.StatusCode.UNIMPLEMENTED:
        return True
    details = (error.details() or "").lower()
    return error.code() == grpc.StatusCode.UNAVAILABLE and "not available" in details


# ---------------------------------------------------------------------------
# Raw limits: asyncpg COPY and the minio client


class RawCalls:
    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], stack: StackInfo, threads: int):
        self._pool = pool
        self._bucket = stack.s3_bucket
        # Configured as the server's ObjectStore configures its client.
        http = urllib3.PoolManager(
            maxsize=threads,
            timeout=urllib3.Timeout(connect=5, read=60),
            retries=urllib3.Retry(
                total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        self._minio: Any = Minio(
            stack.s3_endpoint,
            access_key=stack.s3_access_key,
            secret_key=stack.s3_secret_key,
            secure=False,
            http_client=http,
        )
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="raw-s3")
        self._threads = threads
        self._run_id = uuid.uuid4().hex[:8]
        self._next_row = 0
        self._next_key = 0

    async def setup(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(RAW_TABLE_DDL)
            await conn.execute(RAW_ANNOTATIONS_DDL)

    async def seed_steady_state(self) -> None:
        """Rows of another app in `inputs` and `blobs`, then ANALYZE, so that the server
        plans its foreign-key checks as on a database in use.

        On a fresh database PostgreSQL plans the check of annotations -> inputs (app_id,
        id), which runs for every input-level annotation, before `inputs` has statistics:
        it then uses the index inputs_order (app_id, seq) with a filter on id, which reads
        every input of the app, and keeps that plan until autovacuum first analyzes the
        table (up to a minute later). Ingest gets slower with every input until then;
        --fresh-db shows it."""
        async with self._pool.acquire() as conn:
            await conn.copy_records_to_table(
                "inputs",
                records=[
                    (SEED_APP, f"seed-{n}", "image", f"https://example.com/seed/{n}.jpg")
                    for n in range(SEED_ROWS)
                ],
                columns=("app_id", "id", "media_type", "source_url"),
            )
            await conn.copy_records_to_table(
                "blobs",
                records=[
                    (f"{SEED_APP}/{n}", f"{n:064x}", 10_000, "image/png") for n in range(SEED_ROWS)
                ],
                columns=("key", "sha256", "size", "content_type"),
            )
            await conn.execute("ANALYZE inputs, blobs")

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def copy_op(self) -> Op:
        """One COPY of 128 rows like those CreateInputs writes for URL inputs."""

        async def copy(_: int) -> None:
            first = self._next_row
            self._next_row += BATCH
            records = [
                (
                    APP_ID,
                    f"raw-{self._run_id}-{n}",
                    "image",
                    None,
                    f"https://example.com/i/{n}.jpg",
                    "{}",
                    json.dumps(metadata_of(n)),
                    "",
                )
                for n in range(first, first + BATCH)
            ]
            async with self._pool.acquire() as conn:
                await conn.copy_records_to_table(
                    RAW_TABLE, records=records, columns=RAW_COPY_COLUMNS
                )

        return copy

    def copy_boxes_op(self) -> Op:
        """One COPY of 128 input rows and one of their 256 annotation rows, as CreateInputs
        writes them for URL inputs with two boxes each, in one transaction."""

        async def copy(_: int) -> None:
            first = self._next_row
            self._next_row += BATCH
            inputs, annotations = [], []
            for n in range(first, first + BATCH):
                input_id = f"raw-{self._run_id}-{n}"
                inputs.append(
                    (
                        APP_ID,
                        input_id,
                        "image",
                        None,
                        f"https://example.com/i/{n}.jpg",
                        "{}",
                        json.dumps(metadata_of(n)),
                        "",
                    )
                )
                for b in range(BOXES_PER_INPUT):
                    annotations.append(
                        (
                            APP_ID,
                            f"raw-{self._run_id}-{n}-{b}",
                            input_id,
                            json.dumps(box_of(n, b)),
                            [f"thing-{b}"],
                            json.dumps({"bounding_box": 1}),
                        )
                    )
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.copy_records_to_table(
                    RAW_TABLE, records=inputs, columns=RAW_COPY_COLUMNS
                )
                await conn.copy_records_to_table(
                    RAW_ANNOTATIONS, records=annotations, columns=RAW_ANNOTATION_COLUMNS
                )

        return copy

    def put_op(self, images: list[bytes], label: str) -> Op:
        """One PUT of the next image (cycling), on the thread pool."""
        loop = asyncio.get_running_loop()

        def put(key: str, data: bytes) -> None:
            self._minio.put_object(
                self._bucket, key, io.BytesIO(data), len(data), content_type="image/png"
            )

        async def put_next(_: int) -> None:
            index = self._next_key
            self._next_key += 1
            key = f"bench-raw/{self._run_id}/{label}/{index}"
            await loop.run_in_executor(self._executor, put, key, images[index % len(images)])

        return put_next

    async def put_file(self, data: bytes) -> None:
        """One put_object of the whole file, multipart in parts of RAW_PART_SIZE."""
        self._next_key += 1
        key = f"bench-raw/{self._run_id}/stream/{self._next_key}"
        await asyncio.to_thread(
            self._minio.put_object,
            self._bucket,
            key,
            io.BytesIO(data),
            len(data),
            content_type="video/mp4",
            part_size=RAW_PART_SIZE,
        )


def multipart_label(size: int) -> str:
    part_size, parts = get_part_info(size, RAW_PART_SIZE)
    return f"{parts} parts of {part_size / MiB:.0f} MiB, 3 at a time"


# ---------------------------------------------------------------------------
# The groups of cases


def build_groups(
    settings: Settings, service: ServiceCalls, raw: RawCalls, pngs: Sequence[NoisePngs]
) -> list[Group]:
    raw_seconds = settings.raw_seconds

    async def url_service(_: int) -> Measurement:
        requests = service.url_requests(settings.url_batches)
        return Measurement(
            service.batches_op(requests), len(requests), settings.in_flight, BATCH, 0
        )

    async def url_raw(_: int) -> Measurement:
        return Measurement(
            raw.copy_op(),
            settings.url_batches,
            settings.copy_concurrency,
            BATCH,
            0,
            min_seconds=raw_seconds,
        )

    async def boxes_service(_: int) -> Measurement:
        requests = service.boxed_requests(settings.url_batches)
        return Measurement(
            service.batches_op(requests), len(requests), settings.in_flight, BATCH, 0
        )

    async def boxes_raw(_: int) -> Measurement:
        return Measurement(
            raw.copy_boxes_op(),
            settings.url_batches,
            settings.copy_concurrency,
            BATCH,
            0,
            min_seconds=raw_seconds,
        )

    groups = [
        Group(
            "url",
            f"metadata only: {BATCH} URL inputs per CreateInputs, {settings.in_flight} in "
            "flight (item = input or row)",
            "inputs",
            "rows",
            Case("CreateInputs", "service", "url", url_service),
            Case(f"raw COPY, {settings.copy_concurrency} x {BATCH} rows", "raw", "url", url_raw),
        ),
        Group(
            "boxes",
            f"URL inputs with {BOXES_PER_INPUT} boxes each: {BATCH} per CreateInputs, "
            f"{settings.in_flight} in flight (item = input with its boxes)",
            "inputs",
            "inputs",
            Case("CreateInputs", "service", "boxes", boxes_service),
            Case(
                f"raw COPY, {settings.copy_concurrency} x ({BATCH} + "
                f"{BATCH * BOXES_PER_INPUT} rows)",
                "raw",
                "boxes",
                boxes_raw,
            ),
        ),
    ]
    for factory, batches in zip(
        pngs, (settings.small_batches, settings.large_batches), strict=True
    ):
        groups.append(image_group(settings, service, raw, factory, batches))
    return [g for g in groups if g.key in settings.groups]


def image_group(
    settings: Settings,
    service: ServiceCalls,
    raw: RawCalls,
    pngs: NoisePngs,
    batches: int,
) -> Group:
    kb = pngs.kb
    key = f"png{kb}"
    count = batches * BATCH

    async def service_prepare(round_index: int) -> Measurement:
        images = pngs.for_round(round_index, count)
        requests = service.image_requests(images)
        size = statistics.fmean(len(i) for i in images)
        return Measurement(
            service.batches_op(requests), len(requests), settings.in_flight, BATCH, size
        )

    async def raw_prepare(round_index: int) -> Measurement:
        images = pngs.for_round(round_index, count)
        size = statistics.fmean(len(i) for i in images)
        return Measurement(
            raw.put_op(images, key),
            len(images),
            settings.put_threads,
            1,
            size,
            min_seconds=settings.raw_seconds,
        )

    return Group(
        key,
        f"{kb} KB noise PNG ({pngs.side}x{pngs.side}): {BATCH} per CreateInputs, "
        f"{settings.in_flight} in flight (item = input or object)",
        "inputs",
        "objects",
        Case("CreateInputs", "service", key, service_prepare),
        Case(f"raw S3 PUT, {settings.put_threads} threads", "raw", key, raw_prepare),
    )


# ---------------------------------------------------------------------------
# Rounds and streaming


async def warm_up(
    service: ServiceCalls, raw: RawCalls, settings: Settings, pngs: NoisePngs
) -> None:
    """A call of every kind, so that connections, pools and caches exist."""
    await service.create(service.url_requests(1)[0])
    await service.create(service.boxed_requests(1)[0])
    warm = pngs.make(BATCH)
    await service.create(service.image_requests(warm)[0])
    await drive(raw.copy_op(), 16, settings.copy_concurrency, 5.0)
    await drive(raw.put_op(warm, "warm"), 64, settings.put_threads, 5.0)


async def run_rounds(runner: Runner, groups: Sequence[Group], settings: Settings) -> list[Sample]:
    """Rounds of every group, raw and service alternating; stops at the budget."""
    samples: list[Sample] = []
    started = time.monotonic()
    for round_index in range(settings.rounds):
        elapsed = time.monotonic() - started
        if round_index and elapsed + elapsed / round_index > settings.budget:
            print(f"  time budget of {settings.budget:.0f}s reached after {round_index} rounds")
            break
        round_started = time.monotonic()
        for index, group in enumerate(groups):
            first_raw = (round_index + index) % 2 == 0
            order = (group.raw, group.service) if first_raw else (group.service, group.raw)
            for case in order:
                samples.append(await runner.sample(case, round_index))
        print(
            f"  round {round_index + 1}/{settings.rounds}: {time.monotonic() - round_started:.1f}s",
            flush=True,
        )
    return samples


@dataclasses.dataclass
class StreamOutcome:
    status: str  # "measured", "skipped" or "failed"
    note: str = ""


async def run_streaming(
    settings: Settings,
    service: ServiceCalls,
    raw: RawCalls,
    meter: CpuMeter,
    group: Group,
) -> tuple[list[Sample], StreamOutcome]:
    """A small upload first (is UploadInput there?), then each large upload beside a raw
    put_object of the same bytes, in alternating order."""
    samples: list[Sample] = []
    outcome = StreamOutcome("measured")
    try:
        probe = stream_file(4 * MiB, 0)
        await service.upload(service.upload_header(probe), probe)
    except grpc.aio.AioRpcError as error:
        if not_available(error):
            outcome = StreamOutcome("skipped", "skipped: UploadInput not available")
        else:
            outcome = StreamOutcome("failed", f"failed: {error.code().name}: {error.details()}")
        print(f"  UploadInput {outcome.note}", flush=True)
    size = settings.stream_mb * 1_000_000
    for upload in range(settings.stream_uploads):
        data = stream_file(size, upload + 1)
        header = service.upload_header(data)
        order = (group.raw, group.service) if upload % 2 == 0 else (group.service, group.raw)
        for case in order:
            if case.kind == "service" and outcome.status != "measured":
                continue
            before = meter.read()
            begin = time.perf_counter()
            try:
                if case.kind == "service":
                    await service.upload(header, data)
                else:
                    await raw.put_file(data)
            except grpc.aio.AioRpcError as error:
                outcome = StreamOutcome("failed", f"failed: {error.code().name}: {error.details()}")
                print(f"  UploadInput {outcome.note}", flush=True)
                continue
            seconds = time.perf_counter() - begin
            cpu = meter.read() - before
            samples.append(
                make_sample(case, upload, settings.stream_mb, 1e6, seconds, [seconds], cpu)
            )
        print(f"  streamed upload {upload + 1}/{settings.stream_uploads}", flush=True)
    return samples, outcome


def stream_group(settings: Settings) -> Group:
    size = settings.stream_mb * 1_000_000
    return Group(
        "stream",
        f"streaming: one {settings.stream_mb} MB MP4 in {CHUNK // MiB} MiB chunks "
        "(item = MB, so items/s = MB/s)",
        "MB",
        "MB",
        Case("UploadInput", "service", "stream"),
        Case(f"raw put_object ({multipart_label(size)})", "raw", "stream"),
    )


# ---------------------------------------------------------------------------
# Results


@dataclasses.dataclass(frozen=True)
class Summary:
    case: str
    kind: str
    group: str
    rounds: int
    items_per_s: float
    mb_per_s: float
    p50_ms: float
    p95_ms: float
    client_cpu_ms: float
    server_cpu_ms: float
    postgres_cpu_ms: float
    s3_cpu_ms: float
    client_cores: float
    server_cores: float
    postgres_cores: float
    s3_cores: float


@dataclasses.dataclass(frozen=True)
class Comparison:
    group: str
    service: str
    raw: str
    service_rate: float  # items/s
    raw_rate: float
    service_mb_per_s: float
    raw_mb_per_s: float
    ratio: float  # median of per-round ratios
    ratio_min: float
    ratio_max: float


_MEDIANS: Final = tuple(
    f.name for f in dataclasses.fields(Summary) if f.name not in ("case", "kind", "group", "rounds")
)


def summarize(samples: Sequence[Sample]) -> list[Summary]:
    groups: dict[tuple[str, str], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.group, sample.case), []).append(sample)
    return [
        Summary(
            case=case,
            kind=found[0].kind,
            group=group,
            rounds=len(found),
            **{
                name: statistics.median(float(getattr(s, name)) for s in found) for name in _MEDIANS
            },
        )
        for (group, case), found in groups.items()
    ]


def compare(samples: Sequence[Sample], group: Group) -> Comparison | None:
    by_round: dict[int, dict[str, Sample]] = {}
    for s in samples:
        if s.group == group.key:
            by_round.setdefault(s.round, {})[s.kind] = s
    pairs = [(r["service"], r["raw"]) for r in by_round.values() if "service" in r and "raw" in r]
    if not pairs:
        return None
    ratios = [s.items_per_s / r.items_per_s for s, r in pairs if r.items_per_s > 0]
    if not ratios:
        return None
    return Comparison(
        group=group.key,
        service=group.service.name,
        raw=group.raw.name,
        service_rate=statistics.median(s.items_per_s for s, _ in pairs),
        raw_rate=statistics.median(r.items_per_s for _, r in pairs),
        service_mb_per_s=statistics.median(s.mb_per_s for s, _ in pairs),
        raw_mb_per_s=statistics.median(r.mb_per_s for _, r in pairs),
        ratio=statistics.median(ratios),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
    )


def busiest(summary: Summary) -> str:
    cores = {
        "client": summary.client_cores,
        "server": summary.server_cores,
        "postgres": summary.postgres_cores,
        "s3": summary.s3_cores,
    }
    name = max(cores, key=lambda k: cores[k])
    return f"{name} {cores[name]:.2f} cores"


def format_report(
    groups: Sequence[Group],
    summaries: Sequence[Summary],
    found: Sequence[Comparison],
    stream: StreamOutcome,
    settings: Settings,
    load_before: float,
) -> str:
    width = max(len(g.raw.name) for g in groups) + 4
    header = (
        f"{'':<{width}}{'items/s':>9}{'MB/s':>8}{'p50 ms':>9}{'p95 ms':>9}"
        f"  CPU ms/item:{'client':>7}{'server':>8}{'pg':>7}{'s3':>7}"
        f"  cores:{'client':>7}{'server':>7}{'pg':>5}{'s3':>5}"
    )
    lines = [header, "-" * len(header)]
    by_case = {(s.group, s.case): s for s in summaries}
    for group in groups:
        lines.append(group.title)
        for case in (group.service, group.raw):
            s = by_case.get((group.key, case.name))
            if s is None:
                note = stream.note if group.key == "stream" and case.kind == "service" else ""
                lines.append(f"  {case.name:<{width - 2}}{note or 'not measured'}")
                continue
            mb = f"{s.mb_per_s:8.1f}" if s.mb_per_s else f"{'-':>8}"
            lines.append(
                f"  {case.name:<{width - 2}}{s.items_per_s:>9,.0f}{mb}{s.p50_ms:>9.1f}"
                f"{s.p95_ms:>9.1f}  {'':12}{s.client_cpu_ms:7.3f}{s.server_cpu_ms:8.3f}"
                f"{s.postgres_cpu_ms:7.3f}{s.s3_cpu_ms:7.3f}  {'':6}{s.client_cores:7.2f}"
                f"{s.server_cores:7.2f}{s.postgres_cores:5.2f}{s.s3_cores:5.2f}"
            )
    lines += ["", "service vs raw limit (median of per-round ratios, min..max over rounds):"]
    units = {g.key: g for g in groups}
    for c in found:
        g = units[c.group]
        if c.group == "stream":
            figures = f"{c.service_mb_per_s:,.1f} MB/s vs {c.raw} {c.raw_mb_per_s:,.1f} MB/s"
        else:
            service_mb = f" ({c.service_mb_per_s:,.1f} MB/s)" if c.service_mb_per_s else ""
            raw_mb = f" ({c.raw_mb_per_s:,.1f} MB/s)" if c.raw_mb_per_s else ""
            figures = (
                f"{c.service_rate:,.0f} {g.service_unit}/s{service_mb} vs {c.raw} "
                f"{c.raw_rate:,.0f} {g.raw_unit}/s{raw_mb}"
            )
        lines.append(
            f"  {c.group:<7} {c.service} {figures}: {c.ratio:.2f}x "
            f"({c.ratio_min:.2f}..{c.ratio_max:.2f})"
        )
    if stream.status != "measured":
        lines.append(f"  stream  UploadInput {stream.note}")
    lines += ["", "busiest process during each service measurement (median CPU cores in use):"]
    for group in groups:
        s = by_case.get((group.key, group.service.name))
        if s is not None:
            lines.append(
                f"  {group.key:<7} {s.case}: {busiest(s)}; server CPU "
                f"{s.server_cpu_ms:.3f} ms per {group.service_unit.rstrip('s')}"
            )
    rounds = max((s.rounds for s in summaries if s.group != "stream"), default=0)
    lines += [
        "",
        f"{rounds} rounds; figures are medians over rounds; a measurement stops after "
        f"{settings.max_seconds:.0f}s. Latency is per call (a batch, a COPY, a PUT, an upload).",
        "CPU per item and cores in use, per process: client = this bench process (gRPC "
        "client, asyncpg, minio threads), server = the datasetd process, pg = postmaster and "
        "its backends, s3 = the SeaweedFS server.",
        "The machine has "
        f"{os.cpu_count()} cores shared by all four; differences under ~30% are noise.",
        (
            "Fresh database: nothing was seeded (--fresh-db)."
            if settings.fresh_db
            else f"Steady state: {SEED_ROWS:,} inputs and blobs of another app were put into "
            "the database and ANALYZEd before measuring (see --fresh-db)."
        ),
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
    stream: StreamOutcome,
    load_before: float,
) -> None:
    document = {
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(settings).items()
        },
        "environment": environment(load_before),
        "streaming": dataclasses.asdict(stream),
        "summary": [dataclasses.asdict(s) for s in summaries],
        "comparisons": [dataclasses.asdict(c) for c in found],
        "samples": [dataclasses.asdict(s) for s in samples],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# Main


@dataclasses.dataclass(frozen=True)
class Results:
    samples: list[Sample]
    groups: list[Group]
    stream: StreamOutcome


async def bench(
    settings: Settings, meter: CpuMeter, stack: StackInfo, server: ServerProcess
) -> Results:
    pngs = [NoisePngs(settings.small_kb), NoisePngs(settings.large_kb)]
    async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
        await announce_serving(channel, server)
        service = ServiceCalls(channel, server.key, settings)
        pool = await asyncpg.create_pool(
            stack.dsn,
            min_size=settings.copy_concurrency,
            max_size=settings.copy_concurrency,
            reset=keep_session,
        )
        raw = RawCalls(pool, stack, settings.put_threads)
        try:
            await raw.setup()
            if not settings.fresh_db:
                print(
                    f"seeding {SEED_ROWS:,} inputs and blobs of another app and analyzing ...",
                    flush=True,
                )
                await raw.seed_steady_state()
            groups = build_groups(settings, service, raw, pngs)
            print("warming up ...", flush=True)
            await warm_up(service, raw, settings, pngs[0])
            samples: list[Sample] = []
            if groups:
                print(
                    f"measuring: up to {settings.rounds} rounds of {len(groups)} service/raw "
                    f"pairs, {settings.in_flight} CreateInputs calls in flight",
                    flush=True,
                )
                samples += await run_rounds(Runner(settings, meter), groups, settings)
            stream_outcome = StreamOutcome("skipped", "skipped: --stream-uploads 0")
            if "stream" in settings.groups:
                streaming = stream_group(settings)
                groups.append(streaming)
                if settings.stream_uploads:
                    print(f"streaming {settings.stream_mb} MB uploads ...", flush=True)
                    stream_samples, stream_outcome = await run_streaming(
                        settings, service, raw, meter, streaming
                    )
                    samples += stream_samples
        finally:
            raw.close()
            await pool.close()
    made = ", ".join(f"{p.made} of {p.kb} KB" for p in pngs)
    print(f"noise PNGs made: {made} in {sum(p.seconds for p in pngs):.1f}s (not timed)")
    return Results(samples, groups, stream_outcome)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    install_sigterm_handler()
    load_before = load_average()
    started = time.monotonic()
    with stack_and_server(started, settings.profile_server) as running:
        stack = running.stack
        meter = CpuMeter(running.server.pid, stack.postgres.pid, stack.s3.pid)
        results = asyncio.run(bench(settings, meter, running.info, running.server))
    summaries = summarize(results.samples)
    found = [c for g in results.groups if (c := compare(results.samples, g)) is not None]
    print()
    print(format_report(results.groups, summaries, found, results.stream, settings, load_before))
    if settings.json_path is not None:
        write_json(
            settings.json_path,
            settings,
            results.samples,
            summaries,
            found,
            results.stream,
            load_before,
        )
        print(f"\nJSON results written to {settings.json_path}")
    if settings.profile_server is not None:
        print_profile(settings.profile_server)
    print(f"\ntotal time {time.monotonic() - started:.0f}s")
    return 1 if results.stream.status == "failed" else 0


if __name__ == "__main__":
    raise SystemExit(main())
