"""Benchmark of URL image ingest with DATASETD_FETCH_URLS=header against fetching off.

Starts the embedded stack, two servers on it (one with DATASETD_FETCH_URLS=header and
loopback allowed, one without fetching) and a local image server in a process of its own
(aiohttp, honouring Range), then measures CreateInputs of 128 URL images per call, with
several calls in flight, on each server in alternating rounds: inputs/s, and for the
header server the requests and bytes the image server answered.

The image is a 1600x1200 photo-like JPEG; with --exif its frame header sits behind 128 KiB
of APP1 segments, so that every input takes the second, 1 MiB read.

    .venv/bin/python -m bench.bench_url_headers                 # ~1 minute
    .venv/bin/python -m bench.bench_url_headers --exif --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import grpc
from datasetd.v1 import input_pb2, input_service_pb2, input_service_pb2_grpc
from PIL import Image

from bench.common import (
    APP_ID,
    BUCKET,
    REPO_ROOT,
    ServerProcess,
    announce_serving,
    drive,
    free_port,
    print_profile,
    process_cpu,
    start_stack,
)
from service.devstack import EmbeddedStack

BATCH: Final = 128
CALL_TIMEOUT: Final = 120.0


def photo(exif: bool) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((1600, 1200), 48).convert("RGB").save(buffer, "JPEG", quality=85)
    plain = buffer.getvalue()
    if not exif:
        return plain
    payload = b"Exif\x00\x00" + bytes(65527)
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    return plain[:2] + app1 * 2 + plain[2:]


def serve_images(port: int, exif: bool) -> None:
    """The image server (run in its own process): every /i/N.jpg is the same photo."""
    from aiohttp import web

    body = photo(exif)
    counts = {"requests": 0, "ranged": 0, "bytes": 0}

    async def image(request: web.Request) -> web.Response:
        counts["requests"] += 1
        wanted = re.fullmatch(r"bytes=0-(\d+)", request.headers.get("Range", ""))
        if wanted is None:
            counts["bytes"] += len(body)
            return web.Response(body=body, content_type="image/jpeg")
        end = min(int(wanted[1]) + 1, len(body))
        counts["ranged"] += 1
        counts["bytes"] += end
        return web.Response(
            status=206,
            body=body[:end],
            content_type="image/jpeg",
            headers={"Content-Range": f"bytes 0-{end - 1}/{len(body)}"},
        )

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({**counts, "size": len(body)})

    app = web.Application()
    app.router.add_get("/i/{name}", image)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def image_stats(port: int) -> dict[str, int]:
    from aiohttp import ClientSession

    async with ClientSession() as session, session.get(f"http://127.0.0.1:{port}/stats") as got:
        stats: dict[str, int] = await got.json()
        return stats


def requests_for(base: str, batches: int) -> list[input_service_pb2.CreateInputsRequest]:
    run = uuid.uuid4().hex[:8]
    out = []
    for b in range(batches):
        request = input_service_pb2.CreateInputsRequest(app_id=APP_ID)
        for i in range(BATCH):
            message = input_pb2.Input(id=f"{run}-{b}-{i}")
            message.data.image.url = f"{base}/i/{run}-{b}-{i}.jpg"
            request.inputs.append(message)
        out.append(request)
    return out


async def measure(
    server: ServerProcess, requests: list[input_service_pb2.CreateInputsRequest], in_flight: int
) -> tuple[float, float]:
    """(inputs/s, server CPU ms per input)."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = input_service_pb2_grpc.InputServiceStub(channel)
        metadata = (("authorization", f"Key {server.key}"),)
        pending = iter(requests)

        async def create(_: int) -> None:
            reply = await stub.CreateInputs(next(pending), metadata=metadata, timeout=CALL_TIMEOUT)
            created = sum(r.outcome == 1 for r in reply.results)
            if created != len(reply.results):
                raise RuntimeError(f"{len(reply.results) - created} inputs failed: {reply.results}")

        cpu = process_cpu(server.pid)
        seconds, _ = await drive(create, len(requests), in_flight, max_seconds=600)
        inputs = len(requests) * BATCH
        return inputs / seconds, (process_cpu(server.pid) - cpu) * 1000 / inputs


async def run(args: argparse.Namespace, off: ServerProcess, header: ServerProcess) -> None:
    for server in (off, header):
        async with grpc.aio.insecure_channel(server.address) as channel:
            await announce_serving(channel, server)
    base = f"http://127.0.0.1:{args.image_port}"
    results: dict[str, list[tuple[float, float]]] = {"off": [], "header": []}
    for round_index in range(args.rounds):
        order = [("off", off), ("header", header)]
        for name, server in order if round_index % 2 == 0 else order[::-1]:
            before = await image_stats(args.image_port)
            rate, cpu = await measure(server, requests_for(base, args.batches), args.in_flight)
            after = await image_stats(args.image_port)
            results[name].append((rate, cpu))
            read = after["bytes"] - before["bytes"]
            calls = after["requests"] - before["requests"]
            inputs = args.batches * BATCH
            print(
                f"round {round_index + 1} {name:>6}: {rate:8,.0f} inputs/s, server CPU "
                f"{cpu:.3f} ms/input; image requests {calls / inputs:.2f}/input, "
                f"{read / max(calls, 1) / 1024:.0f} KiB/request "
                f"(the file: {after['size'] / 1024:.0f} KiB)",
                flush=True,
            )
    summary = {
        name: {
            "inputs_per_s": max(r for r, _ in rows),
            "cpu_ms_per_input": min(c for _, c in rows),
        }
        for name, rows in results.items()
    }
    print(json.dumps(summary, indent=2))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=40, help="CreateInputs calls per round")
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--exif", action="store_true", help="frame header behind 128 KiB")
    parser.add_argument("--concurrency", type=int, default=32, help="DATASETD_FETCH_CONCURRENCY")
    parser.add_argument("--profile-server", type=Path, help="cProfile the header server")
    parser.add_argument("--serve-images", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_images:
        serve_images(args.serve_images, args.exif)
        return
    args.image_port = free_port()
    images = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_url_headers", "--serve-images", str(args.image_port)]
        + (["--exif"] if args.exif else []),
        cwd=REPO_ROOT,
    )
    with tempfile.TemporaryDirectory(prefix="datasetd-bench-") as tmp:
        work = Path(tmp)
        stack = EmbeddedStack(work / "stack", bucket=BUCKET)
        info = start_stack(stack)
        key = "bench-" + secrets.token_urlsafe(24)
        (work / "off").mkdir()
        (work / "header").mkdir()
        off = ServerProcess(info, work / "off", key)
        header = ServerProcess(info, work / "header", key, args.profile_server)
        header.env |= {
            "DATASETD_FETCH_URLS": "header",
            "DATASETD_FETCH_ALLOWED_NETWORKS": "127.0.0.1/32",
            "DATASETD_FETCH_CONCURRENCY": str(args.concurrency),
        }
        try:
            off.start()
            time.sleep(5)  # the first server applies the migrations and the bootstrap key
            header.start()
            asyncio.run(run(args, off, header))
        finally:
            for server in (header, off):
                server.stop()
            stack.stop()
            images.terminate()
            images.wait()
        if args.profile_server:
            print_profile(args.profile_server)


if __name__ == "__main__":
    main()
