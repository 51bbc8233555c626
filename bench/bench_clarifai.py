"""Benchmark of the Clarifai surface beside its native peers and raw limits, measured in
the same run.

Starts the embedded stack and the real server as a subprocess (bench/common.py), then:

1. PostInputs of 128 small PNG images (base64) through `clarifai.api.V2` (clarifai-grpc's
   own V2Stub) beside the same 128 images through native CreateInputs: inputs/s of each,
   best and median of ROUNDS interleaved rounds (the order swapped every round), and the
   ratio V2 / native (target: at least 0.9).
2. ListInputs in pages of 128 through V2 (numbered pages over native cursors) beside
   native ListInputs (page tokens): inputs/s of a whole walk of the app, interleaved, ratio.
3. An export archive downloaded over the HTTP port (the download route, `Authorization:
   Key`) beside a raw S3 GET of the same object (minio client): MB/s, best of ROUNDS
   interleaved rounds, ratio.

    DATASETD_BENCH_CLARIFAI_ROUNDS=3 DATASETD_BENCH_CLARIFAI_EXPORT_MB=16 \\
        .venv/bin/python -m bench.bench_clarifai                              # quick
    .venv/bin/python -m bench.bench_clarifai                                  # defaults
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import statistics
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import grpc
from clarifai_grpc.channel.clarifai_channel import ClarifaiChannel
from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2
from datasetd.v1 import (
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
from minio import Minio
from PIL import Image

from bench.common import (
    APP_ID,
    Running,
    announce_serving,
    install_sigterm_handler,
    stack_and_server,
)

T = TypeVar("T")
ROUNDS: Final = int(os.environ.get("DATASETD_BENCH_CLARIFAI_ROUNDS", "10"))
EXPORT_MB: Final = int(os.environ.get("DATASETD_BENCH_CLARIFAI_EXPORT_MB", "64"))
BATCH: Final = 128
PAGE: Final = 128
MB: Final = 1e6
READ_CHUNK: Final = 1024 * 1024
# Each image of the export is about this big (noise does not compress).
EXPORT_IMAGE_SIDE: Final = 580
MAX_MESSAGE: Final = 256 * 1024 * 1024
DATASET: Final = "clarifai-bench"


def png(seed: int, side: int = 32) -> bytes:
    """A square PNG of noise, distinct per seed (32x32: about 3 kB)."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


async def timed(call: Callable[[], Awaitable[T]]) -> tuple[T, float]:
    started = time.perf_counter()
    result = await call()
    return result, time.perf_counter() - started


def report(what: str, count: float, unit: str, ours: list[float], peer: list[float]) -> str:
    """Best and median rates of `ours` and `peer` (seconds per run of `count`), and the
    ratio of the bests."""
    best, peer_best = count / min(ours), count / min(peer)
    return (
        f"{what}: {best:,.0f} {unit} best, {count / statistics.median(ours):,.0f} median; "
        f"peer {peer_best:,.0f} best, {count / statistics.median(peer):,.0f} median; "
        f"ratio {best / peer_best:.2f}"
    )


class Bench:
    def __init__(self, running: Running, channel: grpc.aio.Channel) -> None:
        self.running = running
        self.key = running.server.key
        self.metadata = (("authorization", f"Key {self.key}"),)
        self.scope = resources_pb2.UserAppIDSet(user_id="me", app_id=APP_ID)
        self.v2: Any = service_pb2_grpc.V2Stub(channel)
        self.inputs: Any = input_service_pb2_grpc.InputServiceStub(channel)
        self.datasets: Any = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        self.versions: Any = dataset_version_service_pb2_grpc.DatasetVersionServiceStub(channel)

    async def post_v2(self, images: list[tuple[str, bytes]]) -> None:
        response = await self.v2.PostInputs(
            service_pb2.PostInputsRequest(
                user_app_id=self.scope,
                inputs=[
                    resources_pb2.Input(
                        id=input_id,
                        data=resources_pb2.Data(image=resources_pb2.Image(base64=data)),
                    )
                    for input_id, data in images
                ],
            ),
            metadata=self.metadata,
        )
        if response.status.code != status_code_pb2.SUCCESS or len(response.inputs) != len(images):
            raise RuntimeError(f"V2 PostInputs failed: {response.status}")

    async def post_native(self, images: list[tuple[str, bytes]], dataset: str = "") -> None:
        response = await self.inputs.CreateInputs(
            input_service_pb2.CreateInputsRequest(
                app_id=APP_ID,
                inputs=[
                    input_pb2.Input(
                        id=input_id,
                        data=data_pb2.Data(image=data_pb2.Image(base64=data)),
                        dataset_ids=[dataset] if dataset else [],
                    )
                    for input_id, data in images
                ],
            ),
            metadata=self.metadata,
        )
        if response.failed_count or len(response.results) != len(images):
            raise RuntimeError(f"native CreateInputs failed: {response}")

    async def walk_v2(self) -> int:
        seen, page = 0, 1
        while True:
            response = await self.v2.ListInputs(
                service_pb2.ListInputsRequest(user_app_id=self.scope, page=page, per_page=PAGE),
                metadata=self.metadata,
            )
            if response.status.code != status_code_pb2.SUCCESS:
                raise RuntimeError(f"V2 ListInputs failed: {response.status}")
            if not response.inputs:
                return seen
            seen += len(response.inputs)
            page += 1

    async def walk_native(self) -> int:
        seen, token = 0, ""
        while True:
            response = await self.inputs.ListInputs(
                input_service_pb2.ListInputsRequest(
                    app_id=APP_ID, page_size=PAGE, page_token=token
                ),
                metadata=self.metadata,
            )
            seen += len(response.inputs)
            token = response.next_page_token
            if not token:
                return seen

    async def post_inputs(self) -> None:
        v2_s: list[float] = []
        native_s: list[float] = []
        for r in range(ROUNDS):
            # Distinct bytes everywhere: identical content would be stored once.
            v2_batch = [(f"v2-{r}-{i}", png(2 * (r * BATCH + i))) for i in range(BATCH)]
            native_batch = [(f"n-{r}-{i}", png(2 * (r * BATCH + i) + 1)) for i in range(BATCH)]
            runs = [
                (v2_s, lambda b=v2_batch: self.post_v2(b)),
                (native_s, lambda b=native_batch: self.post_native(b)),
            ]
            # Swapped every round: neither always runs on the other's warmed caches.
            for seconds, run in runs if r % 2 == 0 else runs[::-1]:
                seconds.append((await timed(run))[1])
        print(report(f"PostInputs ({BATCH} images) V2", BATCH, "inputs/s", v2_s, native_s))

    async def list_inputs(self) -> None:
        v2_s: list[float] = []
        native_s: list[float] = []
        count = 0
        for r in range(ROUNDS):
            runs: list[tuple[list[float], Callable[[], Awaitable[int]]]] = [
                (v2_s, self.walk_v2),
                (native_s, self.walk_native),
            ]
            counts = set()
            for seconds, run in runs if r % 2 == 0 else runs[::-1]:
                count, spent = await timed(run)
                counts.add(count)
                seconds.append(spent)
            if len(counts) != 1:
                raise RuntimeError(f"the walks saw different numbers of inputs: {counts}")
        print(
            report(
                f"ListInputs walk ({count:,} inputs, pages of {PAGE}) V2",
                count,
                "inputs/s",
                v2_s,
                native_s,
            )
        )

    async def make_export(self) -> dataset_version_service_pb2.Export:
        await self.datasets.CreateDataset(
            dataset_service_pb2.CreateDatasetRequest(
                app_id=APP_ID, dataset=dataset_pb2.Dataset(id=DATASET)
            ),
            metadata=self.metadata,
        )
        image_bytes = len(png(0, EXPORT_IMAGE_SIDE))
        count = max(1, EXPORT_MB * 1_000_000 // image_bytes)
        started = time.perf_counter()
        for first in range(0, count, 16):
            batch = [
                (f"x-{i}", png(10_000_000 + i, EXPORT_IMAGE_SIDE))
                for i in range(first, min(first + 16, count))
            ]
            await self.post_native(batch, DATASET)
        await self.versions.CreateDatasetVersion(
            dataset_version_service_pb2.CreateDatasetVersionRequest(
                app_id=APP_ID,
                dataset_id=DATASET,
                version=dataset_version_pb2.DatasetVersion(id="v1"),
            ),
            metadata=self.metadata,
        )
        at = {"app_id": APP_ID, "dataset_id": DATASET, "version_id": "v1"}
        while True:
            version = await self.versions.GetDatasetVersion(
                dataset_version_service_pb2.GetDatasetVersionRequest(**at),
                metadata=self.metadata,
            )
            if version.version.status.code == status_pb2.STATUS_CODE_DATASET_VERSION_READY:
                break
            await asyncio.sleep(0.2)
        export: dataset_version_service_pb2.Export = (
            await self.versions.ExportDatasetVersion(
                dataset_version_service_pb2.ExportDatasetVersionRequest(
                    **at,
                    format=dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF,
                    options=dataset_version_service_pb2.ExportOptions(embed_media=True),
                ),
                metadata=self.metadata,
            )
        ).export
        while export.status.code != status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_SUCCESS:
            if export.status.code == status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_FAILED:
                raise RuntimeError(f"export failed: {export.status}")
            await asyncio.sleep(0.2)
            export = (
                await self.versions.GetExport(
                    dataset_version_service_pb2.GetExportRequest(**at, export_id=export.id),
                    metadata=self.metadata,
                )
            ).export
        seconds = time.perf_counter() - started
        print(
            f"setup: {count} images, version and export in {seconds:.1f}s, "
            f"{export.size / MB:.1f} MB"
        )
        return export

    def route_get(self, url: str) -> int:
        request = urllib.request.Request(url, headers={"Authorization": f"Key {self.key}"})
        size = 0
        with urllib.request.urlopen(request, timeout=600) as response:
            if response.headers["Content-Type"] != "application/zip":
                raise RuntimeError(f"the route answered {response.headers['Content-Type']}")
            while chunk := response.read(READ_CHUNK):
                size += len(chunk)
        return size

    def s3_get(self, client: Minio, bucket: str, key: str) -> int:
        response = client.get_object(bucket, key)
        size = 0
        try:
            for chunk in response.stream(READ_CHUNK):
                size += len(chunk)
        finally:
            response.close()
            response.release_conn()
        return size

    async def download(self) -> None:
        export = await self.make_export()
        info = self.running.info
        # The object the export's presigned URL names (path-style: /bucket/key).
        _, bucket, key = urllib.parse.urlsplit(export.url).path.split("/", 2)
        client = Minio(info.s3_endpoint, info.s3_access_key, info.s3_secret_key, secure=False)
        http = self.running.server.env["DATASETD_HTTP_LISTEN"]
        url = f"http://{http}/v2/downloads/apps/{APP_ID}/exports/{export.id}"
        route_s: list[float] = []
        s3_s: list[float] = []
        runs = [
            (route_s, lambda: self.route_get(url)),
            (s3_s, lambda: self.s3_get(client, bucket, urllib.parse.unquote(key))),
        ]
        for r in range(min(ROUNDS, 5)):
            for seconds, run in runs if r % 2 == 0 else runs[::-1]:
                started = time.perf_counter()
                size = await asyncio.to_thread(run)
                seconds.append(time.perf_counter() - started)
                if size != export.size:
                    raise RuntimeError(f"downloaded {size} bytes of {export.size}")
        print(
            report(
                f"export download over HTTP ({export.size / MB:.1f} MB) vs raw S3 GET",
                export.size / MB,
                "MB/s",
                route_s,
                s3_s,
            )
        )


async def run(running: Running) -> None:
    server = running.server
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]
    # clarifai-grpc's stub needs one of its channels made first (its response
    # deserializer wrapper is a module global set there); that channel is never used.
    host, port = server.address.rsplit(":", 1)
    ClarifaiChannel.get_insecure_grpc_channel(base=host, port=int(port)).close()
    async with grpc.aio.insecure_channel(server.address, options=options) as channel:
        await announce_serving(channel, server)
        bench = Bench(running, channel)
        await bench.post_inputs()
        await bench.list_inputs()
        await bench.download()


def main() -> int:
    install_sigterm_handler()
    started = time.monotonic()
    print(
        f"bench_clarifai: {ROUNDS} rounds (DATASETD_BENCH_CLARIFAI_ROUNDS), export of about "
        f"{EXPORT_MB} MB (DATASETD_BENCH_CLARIFAI_EXPORT_MB)"
    )
    with stack_and_server(started) as running:
        asyncio.run(run(running))
    print(f"total time {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
