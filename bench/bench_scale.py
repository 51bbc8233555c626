"""Scale figures at N inputs (default 1,000,000) for deploy/SCALING.md: what each table,
index and bucket prefix holds per input, and the throughput of ingest, version build and
export, measured on one dataset of one app.

Starts the embedded stack (PostgreSQL + SeaweedFS) and the real server as a subprocess
(see bench/common.py), then over a real gRPC channel with the generated stubs:

1. ingest: N URL-referenced image inputs (not fetched, the fast path), each with four
   metadata keys, one input-level concept and 1 or 2 bounding boxes in `data.regions`
   (stored as an annotation in the same CreateInputs call), CreateInputs of 128 with 4 in
   flight (as bench_ingest and bench_versions); then 2% of N (--bytes-fraction) small
   distinct noise PNGs uploaded as bytes, same shape, so that objects per input can be
   measured. All go into one dataset.
2. sizes after ingest, from PostgreSQL directly (asyncpg, after ANALYZE): per table rows
   (exact and reltuples), pg_relation_size, pg_indexes_size, pg_total_relation_size and
   bytes per input; per index its size; from S3 (minio list_objects): objects and bytes
   per prefix.
3. a version of the whole dataset (CreateDatasetVersion -> READY: inputs/s) and its
   protobuf export (ExportDatasetVersion -> SUCCESS: inputs/s, archive bytes); the
   server's peak RSS during each (VmRSS sampled from /proc); sizes again.
4. HNSW: pgvector's `hnsw (vector_cosine_ops)` with m=16, ef_construction=64 over M random
   512-dim vectors in a scratch table (maintenance_work_mem 1GB): build time, index and
   table size, 100 k-NN queries (LIMIT 10, ef_search 40); if M builds in under 80 s, M more
   vectors are added and the index rebuilt, a second point for the linear extrapolation.

Figures are printed as they come and the JSON is rewritten after every phase (to --json;
the work directory is removed at the end), so that an interrupted run still leaves the
figures of the phases it completed. Extrapolations printed at the end are linear in the
per-input figures measured here and are labelled as such.

    .venv/bin/python -m bench.bench_scale                          # 1M inputs, 15-40 min
    .venv/bin/python -m bench.bench_scale --inputs 20000 --hnsw-vectors 10000   # ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import asyncpg
import grpc
import urllib3
from datasetd.v1 import data_pb2, input_pb2, input_service_pb2, input_service_pb2_grpc
from minio import Minio

from bench.bench_ingest import NoisePngs
from bench.bench_versions import CHANNEL_OPTIONS, RssSampler, Service, _failures
from bench.common import (
    APP_ID,
    Cpu,
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

BATCH: Final = 128  # inputs per CreateInputs call, the API's maximum
IN_FLIGHT: Final = 4  # as bench_ingest and bench_versions
CALL_TIMEOUT: Final = 120.0
INGEST_TIMEOUT: Final = 4 * 3600.0
IMAGE_KB: Final = 4  # noise PNGs of about 4 KB (37x37 pixels)
LABELS: Final = tuple(f"label-{i}" for i in range(20))
# A few rows of another app, ANALYZEd before ingest so that the foreign-key check of
# annotations -> inputs is planned with statistics (see bench_ingest.seed_steady_state);
# deleted again before sizes are measured.
SEED_APP: Final = "bench-scale-seed"
SEED_ROWS: Final = 2000
HNSW_TABLE: Final = "bench_scale_hnsw"
HNSW_DIM: Final = 512
HNSW_M: Final = 16
HNSW_EF_CONSTRUCTION: Final = 64
HNSW_EF_SEARCH: Final = 40
HNSW_MAINTENANCE_WORK_MEM: Final = "1GB"
HNSW_GROW_BELOW_S: Final = 80.0  # build of M faster than this: measure 2M as well
HNSW_QUERIES: Final = 100
HNSW_INSERT_CHUNK: Final = 20_000
EXTRAPOLATE_TO: Final = (10_000_000, 100_000_000, 1_000_000_000)
MB: Final = 1e6

TABLE_SIZES: Final = """
SELECT c.relname AS name, c.reltuples::bigint AS reltuples,
       pg_relation_size(c.oid) AS heap, pg_indexes_size(c.oid) AS indexes,
       pg_total_relation_size(c.oid) AS total
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relname <> $1
ORDER BY total DESC, name
"""
INDEX_SIZES: Final = """
SELECT i.relname AS name, t.relname AS table_name, am.amname AS method,
       pg_relation_size(i.oid) AS bytes
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_am am ON am.oid = i.relam
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname = 'public' AND t.relname <> $1
ORDER BY bytes DESC, name
"""


# ---------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class Settings:
    inputs: int
    bytes_fraction: float
    hnsw_vectors: int
    hnsw_grow: bool
    json_path: Path


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_scale",
        description="Sizes per table, index and bucket prefix, and ingest/version/export "
        "throughput at N inputs, plus HNSW index size and build time (deploy/SCALING.md).",
    )
    parser.add_argument(
        "--inputs", type=int, default=1_000_000, help="URL inputs (default 1,000,000)"
    )
    parser.add_argument(
        "--bytes-fraction",
        type=float,
        default=0.02,
        help="byte-uploaded images, as a fraction of --inputs (default 0.02)",
    )
    parser.add_argument(
        "--hnsw-vectors",
        type=int,
        default=100_000,
        help="random 512-dim vectors for the HNSW measurement (default 100,000; 0 skips it)",
    )
    parser.add_argument(
        "--no-hnsw-grow",
        action="store_true",
        help=f"do not measure twice the vectors when the first build takes under "
        f"{HNSW_GROW_BELOW_S:.0f}s",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("/tmp/datasetd-bench-scale.json"),
        help="results, rewritten after every phase (default /tmp/datasetd-bench-scale.json)",
    )
    args = parser.parse_args(argv)
    if args.inputs < BATCH:
        parser.error(f"--inputs must be at least {BATCH}")
    if not 0 <= args.bytes_fraction <= 1:
        parser.error("--bytes-fraction must be between 0 and 1")
    if args.hnsw_vectors < 0:
        parser.error("--hnsw-vectors must be at least 0")
    return Settings(
        args.inputs, args.bytes_fraction, args.hnsw_vectors, not args.no_hnsw_grow, args.json
    )


# ---------------------------------------------------------------------------
# Results, written as they come


class Report:
    def __init__(self, settings: Settings, load_before: float) -> None:
        self.path = settings.json_path
        self.load_before = load_before
        self.data: dict[str, Any] = {
            "benchmark": "bench_scale",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": {
                "inputs": settings.inputs,
                "bytes_fraction": settings.bytes_fraction,
                "hnsw_vectors": settings.hnsw_vectors,
                "batch": BATCH,
                "in_flight": IN_FLIGHT,
                "image_kb": IMAGE_KB,
            },
            "phases": {},
            "complete": False,
        }

    def add(self, phase: str, figures: Any) -> None:
        self.data["phases"][phase] = figures
        self.write()

    def write(self) -> None:
        self.data["environment"] = environment(self.load_before)
        self.data["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.path.write_text(json.dumps(self.data, indent=2) + "\n", encoding="utf-8")


def cpu_figures(cpu: Cpu, seconds: float) -> dict[str, float]:
    return {
        "client_cores": cpu.client / seconds,
        "server_cores": cpu.server / seconds,
        "postgres_cores": cpu.postgres / seconds,
        "s3_cores": cpu.s3 / seconds,
        "server_cpu_s": cpu.server,
        "postgres_cpu_s": cpu.postgres,
        "s3_cpu_s": cpu.s3,
    }


def cores_text(f: dict[str, Any]) -> str:
    return (
        f"cores: client {f['client_cores']:.2f}, server {f['server_cores']:.2f}, "
        f"postgres {f['postgres_cores']:.2f}, s3 {f['s3_cores']:.2f}"
    )


# ---------------------------------------------------------------------------
# Ingest


class Ingest:
    """Builds CreateInputs requests as they are sent (1M messages would not fit kindly in
    memory up front) and keeps count."""

    def __init__(self, channel: grpc.aio.Channel, key: str, dataset_id: str) -> None:
        self._stub = input_service_pb2_grpc.InputServiceStub(channel)
        self._md = (("authorization", f"Key {key}"),)
        self._dataset_id = dataset_id
        self.created = 0
        self.regions = 0

    def _input(self, n: int) -> input_pb2.Input:
        message = input_pb2.Input()
        message.dataset_ids.append(self._dataset_id)
        message.data.metadata.update(
            {
                "source": "bench-scale",
                "n": n,
                "split": "val" if n % 10 == 0 else "train",
                "camera": f"cam-{n % 50}",
            }
        )
        message.data.concepts.append(data_pb2.Concept(id=LABELS[n % len(LABELS)], value=1.0))
        for r in range(1 + n % 2):  # 1 or 2 boxes, in normalized coordinates
            region = message.data.regions.add()
            offset = 0.3 * r
            region.region_info.bounding_box.CopyFrom(
                data_pb2.BoundingBox(
                    top_row=0.1 + offset,
                    left_col=0.1 + offset,
                    bottom_row=0.4 + offset,
                    right_col=0.5 + offset,
                )
            )
            region.data.concepts.append(
                data_pb2.Concept(id=LABELS[(n + r + 1) % len(LABELS)], value=1.0)
            )
        return message

    def url_request(self, first: int, count: int) -> input_service_pb2.CreateInputsRequest:
        request = input_service_pb2.CreateInputsRequest(app_id=APP_ID)
        for n in range(first, first + count):
            message = self._input(n)
            message.data.image.url = f"https://example.com/scale/{n}.jpg"
            request.inputs.append(message)
        return request

    def bytes_request(
        self, first: int, images: list[bytes]
    ) -> input_service_pb2.CreateInputsRequest:
        request = input_service_pb2.CreateInputsRequest(app_id=APP_ID)
        for offset, image in enumerate(images):
            message = self._input(first + offset)
            message.data.image.base64 = image
            request.inputs.append(message)
        return request

    async def send(self, request: input_service_pb2.CreateInputsRequest) -> None:
        reply: input_service_pb2.CreateInputsResponse = await self._stub.CreateInputs(
            request, metadata=self._md, timeout=CALL_TIMEOUT
        )
        if reply.created_count != len(request.inputs):
            raise RuntimeError(f"CreateInputs: {_failures(reply.results)}")
        self.created += reply.created_count
        self.regions += sum(len(i.data.regions) for i in request.inputs)


async def ingest_urls(
    ingest: Ingest, count: int, meter: CpuMeter, progress_every: int
) -> dict[str, Any]:
    calls = (count + BATCH - 1) // BATCH
    next_call = 0
    created_before = ingest.created
    started = time.perf_counter()
    last_report = [started, 0]

    async def op(_: int) -> None:
        nonlocal next_call
        index = next_call
        next_call += 1
        first = index * BATCH
        await ingest.send(ingest.url_request(first, min(BATCH, count - first)))
        done = ingest.created - created_before
        if done // progress_every > last_report[1] // progress_every:
            now = time.perf_counter()
            window = (done - last_report[1]) / max(now - last_report[0], 1e-9)
            print(
                f"  {done:,} URL inputs after {now - started:.0f}s "
                f"({done / (now - started):,.0f}/s overall, {window:,.0f}/s lately)",
                flush=True,
            )
            last_report[:] = [now, done]

    before = meter.read()
    seconds, latencies = await drive(op, calls, IN_FLIGHT, INGEST_TIMEOUT)
    cpu = meter.read() - before
    created = ingest.created - created_before
    if created != count:
        raise RuntimeError(f"created {created} of {count} URL inputs")
    latencies.sort()
    return {
        "inputs": created,
        "seconds": seconds,
        "inputs_per_s": created / seconds,
        "call_p50_ms": latencies[len(latencies) // 2] * 1000,
        "call_p95_ms": latencies[int(len(latencies) * 0.95)] * 1000,
        **cpu_figures(cpu, seconds),
    }


async def ingest_bytes(ingest: Ingest, first: int, count: int, meter: CpuMeter) -> dict[str, Any]:
    pngs = NoisePngs(IMAGE_KB)
    requests: list[input_service_pb2.CreateInputsRequest] = []
    image_bytes = 0
    for start in range(0, count, BATCH):
        images = pngs.make(min(BATCH, count - start))
        image_bytes += sum(len(i) for i in images)
        requests.append(ingest.bytes_request(first + start, images))
    pending = iter(requests)

    async def op(_: int) -> None:
        await ingest.send(next(pending))

    created_before = ingest.created
    before = meter.read()
    seconds, _ = await drive(op, len(requests), IN_FLIGHT, INGEST_TIMEOUT)
    cpu = meter.read() - before
    created = ingest.created - created_before
    if created != count:
        raise RuntimeError(f"created {created} of {count} byte-uploaded inputs")
    return {
        "inputs": created,
        "image_bytes": image_bytes,
        "mean_image_bytes": image_bytes / max(created, 1),
        "seconds": seconds,
        "inputs_per_s": created / seconds,
        "mb_per_s": image_bytes / MB / seconds,
        "making_images_s": pngs.seconds,
        **cpu_figures(cpu, seconds),
    }


# ---------------------------------------------------------------------------
# PostgreSQL and S3 sizes


async def seed(pool: asyncpg.Pool[asyncpg.Record]) -> None:
    async with pool.acquire() as conn:
        await conn.copy_records_to_table(
            "inputs",
            records=[
                (SEED_APP, f"seed-{n}", "image", f"https://example.com/seed/{n}.jpg")
                for n in range(SEED_ROWS)
            ],
            columns=("app_id", "id", "media_type", "source_url"),
        )
        await conn.execute("ANALYZE")


async def unseed(pool: asyncpg.Pool[asyncpg.Record]) -> None:
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM inputs WHERE app_id = $1", SEED_APP)
        await conn.execute("VACUUM inputs")


async def database_sizes(pool: asyncpg.Pool[asyncpg.Record], inputs: int) -> dict[str, Any]:
    started = time.perf_counter()
    async with pool.acquire() as conn:
        await conn.execute("ANALYZE")
        tables = []
        for row in await conn.fetch(TABLE_SIZES, HNSW_TABLE):
            name: str = row["name"]
            rows: int = await conn.fetchval(f'SELECT count(*) FROM "{name}"')
            total: int = row["total"]
            tables.append(
                {
                    "table": name,
                    "rows": rows,
                    "reltuples": row["reltuples"],
                    "heap_bytes": row["heap"],
                    "index_bytes": row["indexes"],
                    "toast_bytes": total - row["heap"] - row["indexes"],
                    "total_bytes": total,
                    "bytes_per_row": total / rows if rows else None,
                    "bytes_per_input": total / inputs,
                }
            )
        indexes = [
            {
                "index": row["name"],
                "table": row["table_name"],
                "method": row["method"],
                "bytes": row["bytes"],
                "bytes_per_input": row["bytes"] / inputs,
            }
            for row in await conn.fetch(INDEX_SIZES, HNSW_TABLE)
        ]
        database: int = await conn.fetchval("SELECT pg_database_size(current_database())")
    total = sum(t["total_bytes"] for t in tables)
    return {
        "inputs": inputs,
        "tables": tables,
        "indexes": indexes,
        "tables_total_bytes": total,
        "tables_bytes_per_input": total / inputs,
        "database_bytes": database,
        "measured_in_s": time.perf_counter() - started,
    }


def print_database(figures: dict[str, Any]) -> None:
    print(
        f"  {'table':<22} {'rows':>12} {'heap MB':>9} {'index MB':>9} {'toast MB':>9} "
        f"{'total MB':>9} {'B/row':>7} {'B/input':>8}"
    )
    for t in figures["tables"]:
        per_row = f"{t['bytes_per_row']:.0f}" if t["bytes_per_row"] else "-"
        print(
            f"  {t['table']:<22} {t['rows']:>12,} {t['heap_bytes'] / MB:>9.1f} "
            f"{t['index_bytes'] / MB:>9.1f} {t['toast_bytes'] / MB:>9.1f} "
            f"{t['total_bytes'] / MB:>9.1f} {per_row:>7} {t['bytes_per_input']:>8.1f}"
        )
    print(
        f"  all tables {figures['tables_total_bytes'] / MB:,.1f} MB = "
        f"{figures['tables_bytes_per_input']:,.0f} B per input; database "
        f"{figures['database_bytes'] / MB:,.1f} MB"
    )
    print("  indexes over 1 MB:")
    for i in figures["indexes"]:
        if i["bytes"] >= MB:
            print(
                f"    {i['index']:<32} {i['table']:<16} {i['method']:<6} "
                f"{i['bytes'] / MB:>9.1f} MB  {i['bytes_per_input']:>6.1f} B/input"
            )


def _object_sizes(info: StackInfo) -> dict[str, dict[str, int]]:
    client: Any = Minio(
        info.s3_endpoint,
        access_key=info.s3_access_key,
        secret_key=info.s3_secret_key,
        secure=False,
        http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=5, read=120)),
    )
    prefixes: dict[str, dict[str, int]] = {}
    for obj in client.list_objects(info.s3_bucket, recursive=True):
        parts = obj.object_name.split("/")
        prefix = "/".join(parts[:2]) + "/" if len(parts) > 2 else parts[0]
        entry = prefixes.setdefault(prefix, {"objects": 0, "bytes": 0})
        entry["objects"] += 1
        entry["bytes"] += obj.size or 0
    return prefixes


async def object_sizes(info: StackInfo, inputs: int, byte_inputs: int) -> dict[str, Any]:
    started = time.perf_counter()
    prefixes = await asyncio.to_thread(_object_sizes, info)
    objects = sum(p["objects"] for p in prefixes.values())
    size = sum(p["bytes"] for p in prefixes.values())
    blobs = prefixes.get("blobs/orig/", {"objects": 0, "bytes": 0})
    return {
        "bucket": info.s3_bucket,
        "prefixes": prefixes,
        "objects": objects,
        "bytes": size,
        "objects_per_input": objects / inputs,
        "blob_objects_per_byte_input": blobs["objects"] / byte_inputs if byte_inputs else None,
        "listed_in_s": time.perf_counter() - started,
    }


def print_objects(figures: dict[str, Any]) -> None:
    for prefix, p in sorted(figures["prefixes"].items()):
        print(
            f"  s3://{figures['bucket']}/{prefix:<16} {p['objects']:>9,} objects "
            f"{p['bytes'] / MB:>10.1f} MB"
        )
    per_byte = figures["blob_objects_per_byte_input"]
    print(
        f"  {figures['objects']:,} objects, {figures['bytes'] / MB:,.1f} MB; "
        f"{figures['objects_per_input']:.4f} objects per input"
        + (f", {per_byte:.3f} blob objects per byte-uploaded input" if per_byte else "")
    )


# ---------------------------------------------------------------------------
# Version build and export


async def version_and_export(
    service: Service,
    dataset_id: str,
    inputs: int,
    meter: CpuMeter,
    server_pid: int,
    report: Report,
) -> tuple[str, str]:
    print(f"building a version of the {inputs:,} inputs ...", flush=True)
    before = meter.read()
    with RssSampler(server_pid) as rss:
        version_id, build_s, metrics = await service.build_version(dataset_id)
    cpu = meter.read() - before
    build = {
        "inputs": inputs,
        "seconds": build_s,
        "inputs_per_s": inputs / build_s,
        "metrics": metrics,
        "server_rss_before_mb": rss.start_kb / 1024,
        "server_rss_peak_mb": rss.peak_kb / 1024,
        **cpu_figures(cpu, build_s),
    }
    report.add("version_build", build)
    print(
        f"version {version_id} READY in {build_s:.1f}s = {build['inputs_per_s']:,.0f} "
        f"inputs/s; server RSS {build['server_rss_before_mb']:.0f} -> peak "
        f"{build['server_rss_peak_mb']:.0f} MB; {cores_text(build)}; metrics {metrics}",
        flush=True,
    )

    print("exporting it (Clarifai protobuf) ...", flush=True)
    before = meter.read()
    with RssSampler(server_pid) as rss:
        export_s, size, export_id = await service.export(dataset_id, version_id)
    cpu = meter.read() - before
    export = {
        "inputs": inputs,
        "seconds": export_s,
        "inputs_per_s": inputs / export_s,
        "archive_bytes": size,
        "archive_bytes_per_input": size / inputs,
        "archive_mb_per_s": size / MB / export_s,
        "server_rss_before_mb": rss.start_kb / 1024,
        "server_rss_peak_mb": rss.peak_kb / 1024,
        **cpu_figures(cpu, export_s),
    }
    report.add("export", export)
    print(
        f"export {export_id} SUCCESS in {export_s:.1f}s = {export['inputs_per_s']:,.0f} "
        f"inputs/s; archive {size / MB:,.1f} MB ({export['archive_bytes_per_input']:.0f} "
        f"B/input); server RSS peak {export['server_rss_peak_mb']:.0f} MB; {cores_text(export)}",
        flush=True,
    )
    return version_id, export_id


# ---------------------------------------------------------------------------
# HNSW


async def hnsw_build(
    conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], vectors: int
) -> dict[str, Any]:
    notices: list[str] = []

    def on_notice(_: Any, message: Any) -> None:
        notices.append(str(message))

    conn.add_log_listener(on_notice)
    try:
        started = time.perf_counter()
        await conn.execute(
            f"CREATE INDEX bench_scale_hnsw_embedding ON {HNSW_TABLE} "
            f"USING hnsw (embedding vector_cosine_ops) "
            f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"
        )
        build_s = time.perf_counter() - started
    finally:
        conn.remove_log_listener(on_notice)
    index_bytes: int = await conn.fetchval("SELECT pg_relation_size('bench_scale_hnsw_embedding')")
    # Heap and TOAST: a 512-dim vector (2 KB) is stored out of line.
    table_bytes: int = await conn.fetchval(f"SELECT pg_table_size('{HNSW_TABLE}')")
    # k-NN queries with random probes, as a search would run them.
    await conn.execute(f"SET hnsw.ef_search = {HNSW_EF_SEARCH}")
    latencies = []
    query = f"SELECT id FROM {HNSW_TABLE} ORDER BY embedding <=> $1::vector LIMIT 10"
    probe = (
        f"SELECT (SELECT array_agg(random()::real) FROM generate_series(1, {HNSW_DIM}) "
        "WHERE g IS NOT NULL)::vector::text FROM generate_series(1, $1) g"
    )
    probes = [r[0] for r in await conn.fetch(probe, HNSW_QUERIES)]
    for vector in probes:
        begin = time.perf_counter()
        rows = await conn.fetch(query, vector)
        latencies.append(time.perf_counter() - begin)
        if len(rows) != 10:
            raise RuntimeError(f"the k-NN query returned {len(rows)} rows")
    plan = await conn.fetchval(f"EXPLAIN {query}", probes[0])
    latencies.sort()
    return {
        "vectors": vectors,
        "build_s": build_s,
        "vectors_per_s": vectors / build_s,
        "index_bytes": index_bytes,
        "index_bytes_per_vector": index_bytes / vectors,
        "table_bytes": table_bytes,
        "table_bytes_per_vector": table_bytes / vectors,
        "query_p50_ms": latencies[len(latencies) // 2] * 1000,
        "query_p95_ms": latencies[int(len(latencies) * 0.95)] * 1000,
        "query_plan_first_line": plan,
        "notices": notices,
    }


async def hnsw(pool: asyncpg.Pool[asyncpg.Record], settings: Settings) -> dict[str, Any]:
    async with pool.acquire() as conn:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        version: str = await conn.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        )
        await conn.execute(f"DROP TABLE IF EXISTS {HNSW_TABLE}")
        await conn.execute(
            f"CREATE TABLE {HNSW_TABLE} (id bigint PRIMARY KEY, "
            f"embedding vector({HNSW_DIM}) NOT NULL)"
        )
        await conn.execute(f"SET maintenance_work_mem = '{HNSW_MAINTENANCE_WORK_MEM}'")
        workers: str = await conn.fetchval("SHOW max_parallel_maintenance_workers")
        shared_buffers: str = await conn.fetchval("SHOW shared_buffers")
        figures: dict[str, Any] = {
            "pgvector": version,
            "dimensions": HNSW_DIM,
            "m": HNSW_M,
            "ef_construction": HNSW_EF_CONSTRUCTION,
            "ef_search": HNSW_EF_SEARCH,
            "maintenance_work_mem": HNSW_MAINTENANCE_WORK_MEM,
            "max_parallel_maintenance_workers": workers,
            "shared_buffers": shared_buffers,
            "builds": [],
        }
        loaded = 0
        target = settings.hnsw_vectors
        while True:
            # Rows inserted while the index exists would be added to it one by one.
            await conn.execute("DROP INDEX IF EXISTS bench_scale_hnsw_embedding")
            started = time.perf_counter()
            for start in range(loaded, target, HNSW_INSERT_CHUNK):
                end = min(start + HNSW_INSERT_CHUNK, target)
                await conn.execute(
                    f"INSERT INTO {HNSW_TABLE} SELECT g, (SELECT array_agg(random()::real) "
                    f"FROM generate_series(1, {HNSW_DIM}) WHERE g IS NOT NULL)::vector "
                    "FROM generate_series($1::bigint, $2::bigint) g",
                    start,
                    end - 1,
                )
            await conn.execute(f"VACUUM ANALYZE {HNSW_TABLE}")
            load_s = time.perf_counter() - started
            loaded = target
            print(f"  {loaded:,} random vectors loaded in {load_s:.1f}s; building ...", flush=True)
            build = await hnsw_build(conn, loaded)
            build["load_s"] = load_s
            figures["builds"].append(build)
            print(
                f"  HNSW over {loaded:,} x {HNSW_DIM}-dim: built in {build['build_s']:.1f}s "
                f"({build['vectors_per_s']:,.0f} vectors/s), index "
                f"{build['index_bytes'] / MB:,.1f} MB = {build['index_bytes_per_vector']:,.0f} "
                f"B/vector, table {build['table_bytes'] / MB:,.1f} MB; k-NN p50 "
                f"{build['query_p50_ms']:.1f} ms, p95 {build['query_p95_ms']:.1f} ms"
                + (f"; notices: {build['notices']}" if build["notices"] else ""),
                flush=True,
            )
            if (
                not settings.hnsw_grow
                or len(figures["builds"]) > 1
                or build["build_s"] >= HNSW_GROW_BELOW_S
            ):
                break
            target = 2 * loaded
    return figures


# ---------------------------------------------------------------------------
# Extrapolation


def extrapolate(report: Report) -> dict[str, Any]:
    """Linear in the per-input (per-vector) figures measured here; labelled as such."""
    phases = report.data["phases"]
    sizes = phases.get("sizes_final") or phases.get("sizes_after_ingest")
    out: dict[str, Any] = {"method": "linear in the per-input figures measured here"}
    if sizes is None:
        return out
    measured = sizes["inputs"]
    out["measured_inputs"] = measured
    out["tables"] = {
        t["table"]: {str(n): t["bytes_per_input"] * n for n in EXTRAPOLATE_TO}
        for t in sizes["tables"]
        if t["bytes_per_input"] * measured >= MB
    }
    out["all_tables"] = {str(n): sizes["tables_bytes_per_input"] * n for n in EXTRAPOLATE_TO}
    if "hnsw" in phases and phases["hnsw"]["builds"]:
        last = phases["hnsw"]["builds"][-1]
        out["hnsw_index"] = {str(n): last["index_bytes_per_vector"] * n for n in EXTRAPOLATE_TO}
        out["hnsw_build_s_single_process"] = {
            str(n): n / last["vectors_per_s"] for n in EXTRAPOLATE_TO
        }
    for phase in ("ingest_urls", "version_build", "export"):
        if phase in phases:
            rate = phases[phase]["inputs_per_s"]
            out[f"{phase}_hours"] = {str(n): n / rate / 3600 for n in EXTRAPOLATE_TO}
    return out


def print_extrapolation(figures: dict[str, Any]) -> None:
    if "measured_inputs" not in figures:
        return
    names = [f"{n // 1_000_000:,}M" for n in EXTRAPOLATE_TO]
    print(
        f"\nEXTRAPOLATION ({figures['method']}, measured at "
        f"{figures['measured_inputs']:,} inputs): GB, and hours on this machine"
    )
    print(f"  {'':<26}" + "".join(f"{n:>12}" for n in names))
    rows = [(k, v) for k, v in figures["tables"].items()]
    rows.append(("all tables", figures["all_tables"]))
    if "hnsw_index" in figures:
        rows.append(("HNSW index (512-dim)", figures["hnsw_index"]))
    for name, values in rows:
        print(f"  {name:<26}" + "".join(f"{values[str(n)] / 1e9:>12,.1f}" for n in EXTRAPOLATE_TO))
    for phase in ("ingest_urls", "version_build", "export"):
        key = f"{phase}_hours"
        if key in figures:
            print(
                f"  {phase + ' (h)':<26}"
                + "".join(f"{figures[key][str(n)]:>12,.1f}" for n in EXTRAPOLATE_TO)
            )


# ---------------------------------------------------------------------------
# The run


async def bench(
    settings: Settings, info: StackInfo, server: ServerProcess, meter: CpuMeter, report: Report
) -> None:
    pool: asyncpg.Pool[asyncpg.Record] = await asyncpg.create_pool(info.dsn, min_size=1, max_size=2)
    try:
        async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            await announce_serving(channel, server)  # it has migrated the schema by then
            await seed(pool)
            service = Service(channel, server.key)
            dataset_id = await service.create_dataset()
            ingest = Ingest(channel, server.key, dataset_id)
            byte_count = int(settings.inputs * settings.bytes_fraction)

            print(
                f"ingesting {settings.inputs:,} URL inputs (1-2 boxes, 1 concept, 4 metadata "
                f"keys each) into dataset {dataset_id}, {BATCH} per call, {IN_FLIGHT} in "
                "flight ...",
                flush=True,
            )
            urls = await ingest_urls(
                ingest, settings.inputs, meter, max(settings.inputs // 20, BATCH)
            )
            urls["regions"] = ingest.regions
            report.add("ingest_urls", urls)
            print(
                f"URL ingest: {urls['inputs']:,} inputs in {urls['seconds']:.1f}s = "
                f"{urls['inputs_per_s']:,.0f} inputs/s (call p50 {urls['call_p50_ms']:.0f} ms, "
                f"p95 {urls['call_p95_ms']:.0f} ms); {cores_text(urls)}",
                flush=True,
            )
            if byte_count:
                print(f"uploading {byte_count:,} {IMAGE_KB} KB noise PNGs as bytes ...", flush=True)
                uploaded = await ingest_bytes(ingest, settings.inputs, byte_count, meter)
                report.add("ingest_bytes", uploaded)
                print(
                    f"byte ingest: {uploaded['inputs']:,} inputs in {uploaded['seconds']:.1f}s "
                    f"= {uploaded['inputs_per_s']:,.0f} inputs/s, {uploaded['mb_per_s']:.1f} "
                    f"MB/s; {cores_text(uploaded)}",
                    flush=True,
                )
            total = ingest.created
            report.data["regions"] = ingest.regions

            await unseed(pool)
            print(f"\nsizes after ingest ({total:,} inputs, {ingest.regions:,} boxes):", flush=True)
            sizes = await database_sizes(pool, total)
            report.add("sizes_after_ingest", sizes)
            print_database(sizes)
            objects = await object_sizes(info, total, byte_count)
            report.add("objects_after_ingest", objects)
            print_objects(objects)
            print(flush=True)

            await version_and_export(service, dataset_id, total, meter, server.pid, report)

            print(f"\nsizes after the version and its export ({total:,} inputs):", flush=True)
            sizes = await database_sizes(pool, total)
            report.add("sizes_final", sizes)
            print_database(sizes)
            objects = await object_sizes(info, total, byte_count)
            report.add("objects_final", objects)
            print_objects(objects)

        if settings.hnsw_vectors:
            print(
                f"\nHNSW (m={HNSW_M}, ef_construction={HNSW_EF_CONSTRUCTION}, vector_cosine_ops, "
                f"maintenance_work_mem {HNSW_MAINTENANCE_WORK_MEM}) over random {HNSW_DIM}-dim "
                "vectors:",
                flush=True,
            )
            report.add("hnsw", await hnsw(pool, settings))
    finally:
        await pool.close()


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    install_sigterm_handler()
    report = Report(settings, load_average())
    started = time.monotonic()
    print(f"figures are written as they come to {settings.json_path}", flush=True)
    try:
        with stack_and_server(started) as running:
            meter = CpuMeter(running.server.pid, running.stack.postgres.pid, running.stack.s3.pid)
            asyncio.run(bench(settings, running.info, running.server, meter, report))
        report.data["complete"] = True
    finally:
        figures = extrapolate(report)
        report.data["extrapolation"] = figures
        report.data["total_s"] = time.monotonic() - started
        report.write()
        print_extrapolation(figures)
        print(
            f"\nJSON written to {settings.json_path}; total time {time.monotonic() - started:.0f}s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
