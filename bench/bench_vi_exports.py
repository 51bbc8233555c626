"""Benchmark of the Vi export writer (VI_JSONL, normalized and in pixels) beside the least
a converter of the same members must do, measured in the same run.

Members are made as a version stores them (bench.bench_ontology_exports.members: serialized
`datasetd.v1.Input`s of URL-referenced 640x480 images, each with an input-level concept and
two labelled boxes) and written through `Archives.writer` into a sink that only counts
bytes. The raw baseline parses each member, builds its line's dict directly (ids, size,
tags, boxes; no names, no metadata, no bookkeeping), serializes it with `json.dumps` and
deflates the lines with zlib at the ZIP writer's level: parse + JSON + deflate, the three
costs no writer of the format avoids. COCO, another format of the same members, is written
in the same rounds for comparison. Rounds alternate the cases; the figures are medians.

    .venv/bin/python -m bench.bench_vi_exports [--quick] [--members N]
"""

from __future__ import annotations

import json
import statistics
import time
import zlib
from typing import Any

from datasetd.v1 import input_pb2

from bench.bench_ontology_exports import (
    MODIFIED,
    _CountingSink,
    _NoMedia,
    members,
    run_writer_bench,
)
from service.domain.models import ExportFormat, ExportOptions, VersionMember
from service.formats.archives import Archives

PAGE = 500


async def write(
    export_format: ExportFormat, items: list[VersionMember], options: ExportOptions
) -> float:
    sink = _CountingSink()
    writer = Archives(_NoMedia()).writer(export_format, options, ["all"], sink, MODIFIED)
    started = time.perf_counter()
    if writer.needs_census:
        for start in range(0, len(items), PAGE):
            await writer.observe(items[start : start + PAGE])
    for start in range(0, len(items), PAGE):
        await writer.write("all", items[start : start + PAGE])
    await writer.finish()
    return time.perf_counter() - started


def raw(items: list[VersionMember]) -> float:
    started = time.perf_counter()
    deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    size = 0
    for item in items:
        message = input_pb2.Input.FromString(item.data)
        data = message.data
        line: dict[str, Any] = {
            "asset_id": message.id,
            "url": data.image.url,
            "width": data.image.image_info.width,
            "height": data.image.image_info.height,
            "tags": [{"id": c.id, "value": c.value} for c in data.concepts],
            "annotations": [
                {
                    "id": r.id,
                    "bounding_box": [
                        r.region_info.bounding_box.left_col,
                        r.region_info.bounding_box.top_row,
                        r.region_info.bounding_box.right_col,
                        r.region_info.bounding_box.bottom_row,
                    ],
                    "concepts": [c.id for c in r.data.concepts],
                }
                for r in data.regions
            ],
        }
        size += len(deflate.compress(json.dumps(line, separators=(",", ":")).encode() + b"\n"))
    size += len(deflate.flush())
    assert size > 0
    return time.perf_counter() - started


async def bench(count: int, rounds: int) -> None:
    items = members(count)
    cases = {
        "VI_JSONL normalized": (ExportFormat.VI_JSONL, ExportOptions()),
        "VI_JSONL pixels": (ExportFormat.VI_JSONL, ExportOptions(pixel_coordinates=True)),
        "COCO": (ExportFormat.COCO, ExportOptions()),
    }
    times: dict[str, list[float]] = {name: [] for name in [*cases, "raw"]}
    for _ in range(rounds):
        for name, (export_format, options) in cases.items():
            times[name].append(await write(export_format, items, options))
        times["raw"].append(raw(items))
    baseline = statistics.median(times["raw"])
    print(f"{count:,} members (2 boxes and a tag each), {rounds} rounds (medians)")
    print(f"{'case':22} {'time':>9} {'members/s':>11} {'vs raw':>7}")
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"{name:22} {median:8.3f}s {count / median:11,.0f} {median / baseline:6.2f}x")


def main() -> None:
    run_writer_bench(__doc__.split("\n\n")[0], bench)


if __name__ == "__main__":
    main()
