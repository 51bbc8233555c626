"""Benchmark of dataset versions and their export through the real server, beside the raw
limit of writing the same archive in the same run.

Starts the embedded stack (PostgreSQL + SeaweedFS) and the real server as a subprocess
(see bench/common.py). For each size N it ingests N URL-referenced image inputs (not
fetched; one concept and small metadata each; CreateInputs of 128, 4 in flight) into a
fresh dataset and a bounding-box annotation on every second input (CreateAnnotations of
128), then measures over a real gRPC channel with the generated stubs:

1. version build: CreateDatasetVersion until GetDatasetVersion shows READY: s, inputs/s.
2. export to a Clarifai-Data-Protobuf archive: ExportDatasetVersion until GetExport
   shows SUCCESS: s, inputs/s, archive MB; the server's peak RSS meanwhile (VmRSS sampled
   every 50 ms from /proc, and VmHWM), against the archive's size: memory stays bounded.
3. raw limits of the same run: the version's stored Input bytes (read with asyncpg from
   input_contents through version_inputs, outside the timing) parsed into
   `datasetd.v1.Input` messages, then
   serialized as InputBatch entries of 1,000 into a zipfile (ZIP_STORED) in a temporary
   file; and, as the export does, the stored bytes framed as InputBatch entries without
   re-serializing them; and the latter with ZIP_DEFLATED, as the export compresses its
   batch entries. The ratio service/raw is printed for each.

    .venv/bin/python -m bench.bench_versions                 # 10k inputs, ~1 minute
    .venv/bin/python -m bench.bench_versions --large         # 10k and 100k
    .venv/bin/python -m bench.bench_versions --quick         # 2k inputs, smoke run
    .venv/bin/python -m bench.bench_versions --inputs 5000,20000 --json results.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import asyncpg
import grpc
from datasetd.v1 import (
    annotation_service_pb2,
    annotation_service_pb2_grpc,
    data_pb2,
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    dataset_version_pb2,
    dataset_version_service_pb2,
    dataset_version_service_pb2_grpc,
    input_pb2,
    input_service_pb2,
    input_service_pb2_grpc,
    status_pb2,
)

from bench.common import (
    APP_ID,
    CpuMeter,
    ServerProcess,
    StackInfo,
    announce_serving,
    drive,
    environment,
    install_sigterm_handler,
    load_average,
    stack_and_server,
)

BATCH: Final = 128  # inputs or annotations per call, the API's maximum
IN_FLIGHT: Final = 4
ENTRY_INPUTS: Final = 1000  # inputs per archive entry, as the export writes them
CONCEPT_ID: Final = "bench-concept"
BOX_CONCEPT_ID: Final = "bench-box"
CALL_TIMEOUT: Final = 120.0
JOB_TIMEOUT: Final = 1800.0
POLL_SECONDS: Final = 0.05
RSS_SAMPLE_SECONDS: Final = 0.05
MB: Final = 1e6
MiB: Final = 1024 * 1024
READY: Final = status_pb2.STATUS_CODE_DATASET_VERSION_READY
VERSION_FAILED: Final = status_pb2.STATUS_CODE_DATASET_VERSION_FAILURE
EXPORT_SUCCESS: Final = status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_SUCCESS
EXPORT_FAILED: Final = (
    status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_FAILED,
    status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_UNEXPECTED_ERROR,
)
CHANNEL_OPTIONS: Final = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", 64 * MiB),
]
# The members' content, by the references the version holds (input_contents, shared).
STORED_BYTES: Final = """
SELECT c.data FROM version_inputs v JOIN input_contents c ON c.hash = v.content_hash
WHERE v.app_id = $1 AND v.dataset_id = $2 AND v.version_id = $3
ORDER BY v.position
"""


@dataclasses.dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    json_path: Path | None


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_versions",
        description="Version build and protobuf export throughput beside the raw limit of "
        "writing the same archive with zipfile, in the same run.",
    )
    parser.add_argument(
        "--inputs",
        default="10000",
        help="comma-separated dataset sizes, each measured on its own dataset (default 10000)",
    )
    parser.add_argument("--large", action="store_true", help="add 100000 to the sizes")
    parser.add_argument("--quick", action="store_true", help="2000 inputs only (smoke run)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.inputs.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--inputs: not a comma-separated list of integers: {args.inputs!r}")
    if args.quick:
        sizes = [2000]
    elif args.large and 100_000 not in sizes:
        sizes.append(100_000)
    if not sizes or min(sizes) < 1:
        parser.error("--inputs: sizes must be at least 1")
    return Settings(tuple(sizes), args.json)


# ---------------------------------------------------------------------------
# Peak RSS of the server


def _status_kb(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    values[name] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return values


class RssSampler:
    """Samples VmRSS of a process every RSS_SAMPLE_SECONDS in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.start_kb = _status_kb(pid).get("VmRSS", 0)
        self.peak_kb = self.start_kb
        self.samples = 0
        self.hwm_kb = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = _status_kb(self._pid).get("VmRSS", 0)
            self.peak_kb = max(self.peak_kb, rss)
            self.samples += 1
            self._stop.wait(RSS_SAMPLE_SECONDS)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.hwm_kb = _status_kb(self._pid).get("VmHWM", 0)


# ---------------------------------------------------------------------------
# Through the service


def _failures(results: Any) -> str:
    problems = [
        f"[{r.index}]: " + "; ".join(f"{e.field}: {e.description}" for e in r.errors)
        for r in results
        if r.errors
    ]
    return " | ".join(problems[:3]) or "no errors reported"


class Service:
    def __init__(self, channel: grpc.aio.Channel, key: str) -> None:
        self.inputs = input_service_pb2_grpc.InputServiceStub(channel)
        self.annotations = annotation_service_pb2_grpc.AnnotationServiceStub(channel)
        self.datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        self.versions = dataset_version_service_pb2_grpc.DatasetVersionServiceStub(channel)
        self.md = (("authorization", f"Key {key}"),)

    async def create_dataset(self) -> str:
        reply: dataset_service_pb2.CreateDatasetResponse = await self.datasets.CreateDataset(
            dataset_service_pb2.CreateDatasetRequest(
                app_id=APP_ID, dataset=dataset_pb2.Dataset(description="bench_versions")
            ),
            metadata=self.md,
            timeout=CALL_TIMEOUT,
        )
        return reply.dataset.id

    async def ingest(self, dataset_id: str, count: int, prefix: str) -> float:
        """N inputs into the dataset, then a box on every second one; returns seconds."""
        input_requests = []
        for start in range(0, count, BATCH):
            request = input_service_pb2.CreateInputsRequest(app_id=APP_ID)
            for n in range(start, min(start + BATCH, count)):
                message = request.inputs.add(id=f"{prefix}-{n}")
                message.dataset_ids.append(dataset_id)
                message.data.image.url = f"https://example.com/i/{prefix}/{n}.jpg"
                message.data.concepts.append(data_pb2.Concept(id=CONCEPT_ID, value=1.0))
                message.data.metadata.update({"source": "bench", "n": n, "tags": ["a", "b"]})
            input_requests.append(request)
        boxed = list(range(0, count, 2))
        annotation_requests = []
        for start in range(0, len(boxed), BATCH):
            areq = annotation_service_pb2.CreateAnnotationsRequest(app_id=APP_ID)
            for n in boxed[start : start + BATCH]:
                annotation = areq.annotations.add(input_id=f"{prefix}-{n}")
                region = annotation.data.regions.add()
                region.region_info.bounding_box.CopyFrom(
                    data_pb2.BoundingBox(top_row=0.1, left_col=0.2, bottom_row=0.6, right_col=0.7)
                )
                region.data.concepts.append(data_pb2.Concept(id=BOX_CONCEPT_ID, value=1.0))
            annotation_requests.append(areq)

        pending_inputs = iter(input_requests)
        pending_annotations = iter(annotation_requests)

        async def create_inputs(_: int) -> None:
            request = next(pending_inputs)
            reply: input_service_pb2.CreateInputsResponse = await self.inputs.CreateInputs(
                request, metadata=self.md, timeout=CALL_TIMEOUT
            )
            if reply.created_count != len(request.inputs):
                raise RuntimeError(f"CreateInputs: {_failures(reply.results)}")

        async def create_annotations(_: int) -> None:
            request = next(pending_annotations)
            reply: annotation_service_pb2.CreateAnnotationsResponse = (
                await self.annotations.CreateAnnotations(
                    request, metadata=self.md, timeout=CALL_TIMEOUT
                )
            )
            if reply.created_count != len(request.annotations):
                raise RuntimeError(f"CreateAnnotations: {_failures(reply.results)}")

        started = time.perf_counter()
        await drive(create_inputs, len(input_requests), IN_FLIGHT, JOB_TIMEOUT)
        await drive(create_annotations, len(annotation_requests), IN_FLIGHT, JOB_TIMEOUT)
        return time.perf_counter() - started

    async def build_version(self, dataset_id: str) -> tuple[str, float, dict[str, int]]:
        """Create → READY; returns the version id, seconds and its metrics."""
        started = time.perf_counter()
        reply: dataset_version_service_pb2.CreateDatasetVersionResponse = (
            await self.versions.CreateDatasetVersion(
                dataset_version_service_pb2.CreateDatasetVersionRequest(
                    app_id=APP_ID,
                    dataset_id=dataset_id,
                    version=dataset_version_pb2.DatasetVersion(description="bench"),
                ),
                metadata=self.md,
                timeout=CALL_TIMEOUT,
            )
        )
        version_id = reply.version.id
        request = dataset_version_service_pb2.GetDatasetVersionRequest(
            app_id=APP_ID, dataset_id=dataset_id, version_id=version_id
        )
        while True:
            got: dataset_version_service_pb2.GetDatasetVersionResponse = (
                await self.versions.GetDatasetVersion(
                    request, metadata=self.md, timeout=CALL_TIMEOUT
                )
            )
            code = got.version.status.code
            if code == READY:
                seconds = time.perf_counter() - started
                metrics: dict[str, int] = {}
                for name, m in got.version.metrics.items():
                    metrics[f"{name}.inputs"] = m.inputs_count.value
                    metrics[f"{name}.bounding_boxes"] = m.bounding_boxes_count.value
                return version_id, seconds, metrics
            if code == VERSION_FAILED:
                raise RuntimeError(f"the version build failed: {got.version.status.details}")
            if time.perf_counter() - started > JOB_TIMEOUT:
                raise RuntimeError(f"the version was not READY within {JOB_TIMEOUT:.0f}s")
            await asyncio.sleep(POLL_SECONDS)

    async def export(self, dataset_id: str, version_id: str) -> tuple[float, int, str]:
        """ExportDatasetVersion → SUCCESS; returns seconds, the archive's size and the
        export id."""
        started = time.perf_counter()
        reply: dataset_version_service_pb2.ExportDatasetVersionResponse = (
            await self.versions.ExportDatasetVersion(
                dataset_version_service_pb2.ExportDatasetVersionRequest(
                    app_id=APP_ID,
                    dataset_id=dataset_id,
                    version_id=version_id,
                    format=dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF,
                ),
                metadata=self.md,
                timeout=CALL_TIMEOUT,
            )
        )
        request = dataset_version_service_pb2.GetExportRequest(
            app_id=APP_ID, dataset_id=dataset_id, version_id=version_id, export_id=reply.export.id
        )
        export = reply.export
        while True:
            if export.status.code == EXPORT_SUCCESS:
                return time.perf_counter() - started, export.size, export.id
            if export.status.code in EXPORT_FAILED:
                raise RuntimeError(f"the export failed: {export.status.details}")
            if time.perf_counter() - started > JOB_TIMEOUT:
                raise RuntimeError(f"the export did not succeed within {JOB_TIMEOUT:.0f}s")
            await asyncio.sleep(POLL_SECONDS)
            got: dataset_version_service_pb2.GetExportResponse = await self.versions.GetExport(
                request, metadata=self.md, timeout=CALL_TIMEOUT
            )
            export = got.export

    async def download_size(self, dataset_id: str, version_id: str, export_id: str) -> int:
        """Bytes of the archive as DownloadExport streams it (a check, not timed)."""
        total = 0
        call = self.versions.DownloadExport(
            dataset_version_service_pb2.DownloadExportRequest(
                app_id=APP_ID, dataset_id=dataset_id, version_id=version_id, export_id=export_id
            ),
            metadata=self.md,
            timeout=CALL_TIMEOUT,
        )
        async for message in call:
            total += len(message.chunk)
        return total


# ---------------------------------------------------------------------------
# Raw limits: zipfile STORED of the same inputs


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def raw_serialize(messages: list[input_pb2.Input], path: Path) -> tuple[float, int]:
    """InputBatch entries of ENTRY_INPUTS messages, serialized, into a STORED zip."""
    started = time.perf_counter()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for entry, start in enumerate(range(0, len(messages), ENTRY_INPUTS)):
            batch = input_pb2.InputBatch(inputs=messages[start : start + ENTRY_INPUTS])
            archive.writestr(f"all/batch-{entry:06d}", batch.SerializeToString())
    return time.perf_counter() - started, path.stat().st_size


def raw_frame(
    stored: list[bytes], path: Path, compression: int = zipfile.ZIP_STORED
) -> tuple[float, int]:
    """The stored bytes framed as InputBatch entries (field 1, length-delimited), as the
    export writes them, into a zip (STORED, or DEFLATED as the export's batch entries)."""
    started = time.perf_counter()
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for entry, start in enumerate(range(0, len(stored), ENTRY_INPUTS)):
            parts: list[bytes] = []
            for data in stored[start : start + ENTRY_INPUTS]:
                parts += (b"\x0a", _varint(len(data)), data)
            archive.writestr(f"all/batch-{entry:06d}", b"".join(parts))
    return time.perf_counter() - started, path.stat().st_size


async def stored_inputs(
    pool: asyncpg.Pool[asyncpg.Record], dataset_id: str, version_id: str
) -> list[bytes]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(STORED_BYTES, APP_ID, dataset_id, version_id)
    return [bytes(row["data"]) for row in rows]


# ---------------------------------------------------------------------------
# One size


@dataclasses.dataclass(frozen=True)
class Result:
    inputs: int
    ingest_s: float
    build_s: float
    build_inputs_per_s: float
    build_server_cpu_s: float
    build_postgres_cpu_s: float
    metrics: dict[str, int]
    export_s: float
    export_inputs_per_s: float
    export_server_cpu_s: float
    archive_mb: float
    download_mb: float
    rss_before_mb: float
    rss_peak_mb: float
    rss_hwm_mb: float
    rss_samples: int
    raw_serialize_s: float
    raw_serialize_inputs_per_s: float
    raw_serialize_mb: float
    raw_frame_s: float
    raw_frame_inputs_per_s: float
    raw_frame_mb: float
    raw_deflate_s: float
    raw_deflate_inputs_per_s: float
    raw_deflate_mb: float


async def measure(
    count: int,
    service: Service,
    pool: asyncpg.Pool[asyncpg.Record],
    meter: CpuMeter,
    server_pid: int,
    work_dir: Path,
) -> Result:
    dataset_id = await service.create_dataset()
    prefix = f"v{count}-{uuid.uuid4().hex[:6]}"
    print(f"[{count:,}] ingesting into dataset {dataset_id} ...", flush=True)
    ingest_s = await service.ingest(dataset_id, count, prefix)
    print(f"[{count:,}] ingested in {ingest_s:.1f}s; building a version ...", flush=True)

    before = meter.read()
    version_id, build_s, metrics = await service.build_version(dataset_id)
    build_cpu = meter.read() - before
    print(f"[{count:,}] version {version_id} READY in {build_s:.2f}s; exporting ...", flush=True)

    # Raw limit first, then the export, then the raw limit again: the machine's speed
    # swings in phases, so each raw figure is the better of two around the export.
    stored = await stored_inputs(pool, dataset_id, version_id)
    if len(stored) != count:
        raise RuntimeError(f"version_inputs holds {len(stored)} rows, expected {count}")
    messages = [input_pb2.Input.FromString(data) for data in stored]
    raw_dir = Path(tempfile.mkdtemp(prefix="raw-", dir=work_dir))
    ser_a, ser_size = raw_serialize(messages, raw_dir / "serialize-a.zip")
    frame_a, frame_size = raw_frame(stored, raw_dir / "frame-a.zip")
    deflate_a, deflate_size = raw_frame(stored, raw_dir / "deflate-a.zip", zipfile.ZIP_DEFLATED)

    before = meter.read()
    with RssSampler(server_pid) as rss:
        export_s, size, export_id = await service.export(dataset_id, version_id)
    export_cpu = meter.read() - before

    ser_b, _ = raw_serialize(messages, raw_dir / "serialize-b.zip")
    frame_b, _ = raw_frame(stored, raw_dir / "frame-b.zip")
    deflate_b, _ = raw_frame(stored, raw_dir / "deflate-b.zip", zipfile.ZIP_DEFLATED)
    ser_s, frame_s = min(ser_a, ser_b), min(frame_a, frame_b)
    deflate_s = min(deflate_a, deflate_b)

    downloaded = await service.download_size(dataset_id, version_id, export_id)
    return Result(
        inputs=count,
        ingest_s=ingest_s,
        build_s=build_s,
        build_inputs_per_s=count / build_s,
        build_server_cpu_s=build_cpu.server,
        build_postgres_cpu_s=build_cpu.postgres,
        metrics=metrics,
        export_s=export_s,
        export_inputs_per_s=count / export_s,
        export_server_cpu_s=export_cpu.server,
        archive_mb=size / MB,
        download_mb=downloaded / MB,
        rss_before_mb=rss.start_kb / 1024,
        rss_peak_mb=rss.peak_kb / 1024,
        rss_hwm_mb=rss.hwm_kb / 1024,
        rss_samples=rss.samples,
        raw_serialize_s=ser_s,
        raw_serialize_inputs_per_s=count / ser_s,
        raw_serialize_mb=ser_size / MB,
        raw_frame_s=frame_s,
        raw_frame_inputs_per_s=count / frame_s,
        raw_frame_mb=frame_size / MB,
        raw_deflate_s=deflate_s,
        raw_deflate_inputs_per_s=count / deflate_s,
        raw_deflate_mb=deflate_size / MB,
    )


def format_result(r: Result) -> str:
    ratio_ser = r.export_inputs_per_s / r.raw_serialize_inputs_per_s
    ratio_frame = r.export_inputs_per_s / r.raw_frame_inputs_per_s
    ratio_deflate = r.export_inputs_per_s / r.raw_deflate_inputs_per_s
    return "\n".join(
        [
            f"== {r.inputs:,} inputs (a bounding box on every second), ingest {r.ingest_s:.1f}s",
            f"version build (Create -> READY): {r.build_s:.2f}s = "
            f"{r.build_inputs_per_s:,.0f} inputs/s; CPU server {r.build_server_cpu_s:.2f}s, "
            f"postgres {r.build_postgres_cpu_s:.2f}s; metrics {r.metrics}",
            f"export protobuf (Export -> SUCCESS): {r.export_s:.2f}s = "
            f"{r.export_inputs_per_s:,.0f} inputs/s; archive {r.archive_mb:.2f} MB "
            f"(downloaded {r.download_mb:.2f} MB); server CPU {r.export_server_cpu_s:.2f}s",
            f"raw zipfile STORED, serialize Input messages in entries of {ENTRY_INPUTS}: "
            f"{r.raw_serialize_s:.3f}s = {r.raw_serialize_inputs_per_s:,.0f} inputs/s "
            f"({r.raw_serialize_mb:.2f} MB); export/raw = {ratio_ser:.2f}",
            f"raw zipfile STORED, frame stored bytes in entries of {ENTRY_INPUTS}: "
            f"{r.raw_frame_s:.3f}s = {r.raw_frame_inputs_per_s:,.0f} inputs/s "
            f"({r.raw_frame_mb:.2f} MB); export/raw = {ratio_frame:.2f}",
            f"raw zipfile DEFLATED (as the export's entries), frame stored bytes: "
            f"{r.raw_deflate_s:.3f}s = {r.raw_deflate_inputs_per_s:,.0f} inputs/s "
            f"({r.raw_deflate_mb:.2f} MB); export/raw = {ratio_deflate:.2f}",
            f"server RSS during the export: {r.rss_before_mb:.0f} MB before, peak "
            f"{r.rss_peak_mb:.0f} MB (+{r.rss_peak_mb - r.rss_before_mb:.0f} MB; "
            f"{r.rss_samples} samples), lifetime VmHWM {r.rss_hwm_mb:.0f} MB; "
            f"archive {r.archive_mb:.2f} MB",
        ]
    )


async def bench(
    settings: Settings, info: StackInfo, server: ServerProcess, meter: CpuMeter
) -> list[Result]:
    results = []
    pool: asyncpg.Pool[asyncpg.Record] = await asyncpg.create_pool(info.dsn, min_size=1, max_size=2)
    try:
        async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            await announce_serving(channel, server)
            service = Service(channel, server.key)
            for count in settings.sizes:
                result = await measure(
                    count, service, pool, meter, server.pid, server.log_path.parent
                )
                print(format_result(result), flush=True)
                results.append(result)
    finally:
        await pool.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    install_sigterm_handler()
    load_before = load_average()
    started = time.monotonic()
    with stack_and_server(started) as running:
        meter = CpuMeter(running.server.pid, running.stack.postgres.pid)
        results = asyncio.run(bench(settings, running.info, running.server, meter))
    print("\nsummary")
    for r in results:
        print(format_result(r))
    if settings.json_path is not None:
        settings.json_path.write_text(
            json.dumps(
                {
                    "benchmark": "bench_versions",
                    "environment": environment(load_before),
                    "results": [dataclasses.asdict(r) for r in results],
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        print(f"\nJSON results written to {settings.json_path}")
    print(f"\ntotal time {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
