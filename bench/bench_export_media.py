"""Benchmark of the exports that carry the media (VI_FULL, COCO with embed_media,
Clarifai protobuf with embed_media) through the real server, beside the raw reads of the
same objects from the object store in the same run.

Starts the embedded stack and the real server as a subprocess (bench/common.py), uploads
N small distinct PNG images (about 2.3 kB each) with a concept each, and snapshots one
version per round (setup, timed apart). Each round then exports its version in the three
formats, one after the other, timing each export job from the request to SUCCESS (polled
every 50 ms), and reads every stored image straight from S3 with the minio client: with
RAW_READS threads (get, read, close per object, as many in flight as the server's media
read-ahead allows) and one after the other (a sample of SEQUENTIAL_SAMPLE objects).
Figures are inputs/s, medians over the rounds, with the ratio of each export to the
concurrent raw read: what the archive costs beyond fetching its media.

    DATASETD_BENCH_MEDIA_INPUTS=2000 .venv/bin/python -m bench.bench_export_media  # quick
    .venv/bin/python -m bench.bench_export_media                                   # 10k

DATASETD_BENCH_MEDIA_ROUNDS sets the rounds (3); DATASETD_BENCH_MEDIA_PROFILE=1 runs the
server under cProfile (its event loop thread only) and prints the top functions.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

import urllib3
from minio import Minio

from bench.bench_vi_download import png, wait_until_serving
from bench.common import (
    APP_ID,
    StackInfo,
    install_sigterm_handler,
    load_average,
    print_profile,
    stack_and_server,
)
from service.client import Client, ExportSettings, UploadItem
from service.formats.media_reads import MAX_READS

INPUTS: Final = int(os.environ.get("DATASETD_BENCH_MEDIA_INPUTS", "10000"))
ROUNDS: Final = int(os.environ.get("DATASETD_BENCH_MEDIA_ROUNDS", "3"))
PROFILE: Final = os.environ.get("DATASETD_BENCH_MEDIA_PROFILE") == "1"
DATASET: Final = "media-bench"
RAW_READS: Final = MAX_READS
SEQUENTIAL_SAMPLE: Final = 2000
POLL_SECONDS: Final = 0.05
EXPORT_TIMEOUT: Final = 3600.0
CASES: Final = {
    "VI_FULL": ExportSettings(format="vi_full"),
    "COCO + images": ExportSettings(format="coco", embed_media=True),
    "protobuf + media": ExportSettings(format="clarifai_data_protobuf", embed_media=True),
}


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def export_seconds(client: Client, version_id: str, settings: ExportSettings) -> float:
    """From the request to the export's SUCCESS."""
    started = time.perf_counter()
    export = client.datasets.create_export(DATASET, settings, version_id=version_id)
    while not export.succeeded:
        if time.perf_counter() - started > EXPORT_TIMEOUT or export.status.endswith("FAILED"):
            raise RuntimeError(f"export {export.id} did not succeed: {export.status}")
        time.sleep(POLL_SECONDS)
        export = client.datasets.get_export(DATASET, export.id, version_id)
    return time.perf_counter() - started


class RawReads:
    """The stored images read straight from S3 with the minio client, as the server's
    object store reads them (a pooled urllib3 client, get + read + close per object)."""

    def __init__(self, info: StackInfo) -> None:
        http = urllib3.PoolManager(maxsize=RAW_READS)
        self._client = Minio(
            info.s3_endpoint.removeprefix("http://"),
            access_key=info.s3_access_key,
            secret_key=info.s3_secret_key,
            secure=False,
            http_client=http,
        )
        self._bucket = info.s3_bucket
        listing = self._client.list_objects(self._bucket, prefix="blobs/", recursive=True)
        self.keys = [o.object_name for o in listing if o.object_name is not None]
        self._pool = ThreadPoolExecutor(RAW_READS)

    def _read(self, key: str) -> int:
        response = self._client.get_object(self._bucket, key)
        try:
            return len(response.read())
        finally:
            response.close()
            response.release_conn()

    def concurrent(self) -> float:
        return timed(lambda: sum(self._pool.map(self._read, self.keys)))

    def sequential(self) -> float:
        sample = self.keys[:SEQUENTIAL_SAMPLE]
        return timed(lambda: [self._read(k) for k in sample]) * len(self.keys) / len(sample)

    def close(self) -> None:
        self._pool.shutdown()


def run(client: Client, info: StackInfo) -> None:
    client.datasets.create(DATASET)
    items = [UploadItem(f"img-{i}", data=png(i), concepts=(f"c{i % 10}",)) for i in range(INPUTS)]
    seconds = timed(
        lambda: client.dataset(DATASET).upload_inputs(
            items, batch_size=128, concurrency=4, show_progress=False
        )
    )
    print(f"setup: uploaded {INPUTS:,} images in {seconds:.1f}s", flush=True)
    started = time.perf_counter()
    versions = [
        client.dataset(DATASET).create_version(f"v{r}", timeout=EXPORT_TIMEOUT).id
        for r in range(ROUNDS)
    ]
    print(f"setup: {ROUNDS} versions READY in {time.perf_counter() - started:.1f}s", flush=True)
    raw = RawReads(info)
    # The exports' archives are stored as blobs too: the objects were listed before.
    assert len(raw.keys) == INPUTS, (len(raw.keys), INPUTS)
    times: dict[str, list[float]] = {name: [] for name in [*CASES, "raw", "raw sequential"]}
    try:
        for round_number, version_id in enumerate(versions, start=1):
            for name, settings in CASES.items():
                times[name].append(export_seconds(client, version_id, settings))
            times["raw"].append(raw.concurrent())
            times["raw sequential"].append(raw.sequential())
            latest = ", ".join(f"{name} {seconds[-1]:.2f}s" for name, seconds in times.items())
            print(f"round {round_number}: {latest}", flush=True)
    finally:
        raw.close()
    baseline = statistics.median(times["raw"])
    print(
        f"\n{INPUTS:,} small images, {ROUNDS} rounds (medians); raw: minio GETs with "
        f"{RAW_READS} threads, sequential: one at a time ({SEQUENTIAL_SAMPLE} sampled)"
    )
    print(f"{'case':18} {'time':>8} {'inputs/s':>9} {'vs raw':>7}")
    for name, measured in times.items():
        median = statistics.median(measured)
        print(
            f"{name:18} {median:7.2f}s {INPUTS / median:9,.0f} {baseline / median:6.2f}x "
            f"(rounds: {', '.join(f'{t:.2f}' for t in measured)})"
        )


def main() -> int:
    install_sigterm_handler()
    started = time.monotonic()
    print(
        f"bench_export_media: {INPUTS:,} inputs (DATASETD_BENCH_MEDIA_INPUTS), "
        f"load {load_average():.1f}"
    )
    with tempfile.TemporaryDirectory(prefix="media-bench-") as tmp:
        profile = Path(tmp) / "server.prof" if PROFILE else None
        with stack_and_server(started, profile) as running:
            server = running.server
            asyncio.run(wait_until_serving(server.address, server))
            with Client(server.address, server.key, APP_ID) as client:
                run(client, running.info)
        if profile is not None:
            print_profile(profile)
    print(f"total time {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
