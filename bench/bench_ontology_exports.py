"""Benchmark of what carrying an ontology costs the export writers, beside the same archive
written without one, in the same run.

With an ontology the COCO writer takes its categories from the classes (a one-off cost),
and the Clarifai writers parse every member to name its unnamed concepts from the classes'
display names, re-serializing those they renamed, where they otherwise copy the stored
bytes. Members are made as a version stores them (serialized `datasetd.v1.Input`s of
URL-referenced images, each with an input-level concept and two labelled boxes), written
through `Archives.writer` into a sink that only counts bytes. Rounds alternate the two
cases so that the machine's speed swings touch both alike; the figures are medians.

    .venv/bin/python -m bench.bench_ontology_exports [--quick] [--members N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from datasetd.v1 import data_pb2, input_pb2

from bench.common import environment, load_average
from service.domain.models import (
    ExportFormat,
    ExportOptions,
    OntologyClass,
    Shape,
    StoredBlob,
    VersionMember,
    VersionOntology,
)
from service.domain.ontologies import number_classes
from service.domain.ports import StagedUpload
from service.formats.archives import Archives

CLASSES = 100
# The formats whose ontology handling this benchmark is about (the Vi writers are measured
# with their own format's benchmark).
MEASURED = (ExportFormat.CLARIFAI_DATA_PROTOBUF, ExportFormat.CLARIFAI_DATA_JSON, ExportFormat.COCO)
MODIFIED = datetime(2024, 1, 1, tzinfo=UTC)


class _NoMedia:
    """Nothing is embedded: the writers never read media."""

    def stage(self, max_size: int) -> StagedUpload:
        raise AssertionError("the writers measured here never read media")

    def stream(
        self, blob: StoredBlob, chunk_size: int, offset: int = 0, length: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        raise AssertionError("the writers measured here never read media")


class _CountingSink:
    def __init__(self) -> None:
        self.size = 0

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)


def members(count: int) -> list[VersionMember]:
    """Images labelled with the classes in turn; one label in ten outside the ontology."""
    found = []
    for n in range(count):
        message = input_pb2.Input(id=f"input-{n}")
        data = message.data
        data.image.url = f"s3://bench/orig/{n}.jpg"
        data.image.image_info.width, data.image.image_info.height = 640, 480
        data.image.image_info.format = "JPEG"
        data.concepts.append(data_pb2.Concept(id=f"class-{n % CLASSES}", value=1.0))
        for k in range(2):
            region = data.regions.add(id=f"r{n}-{k}")
            edges = region.region_info.bounding_box
            edges.top_row, edges.left_col, edges.bottom_row, edges.right_col = 0.1, 0.1, 0.5, 0.6
            concept = f"class-{(n + k) % CLASSES}" if n % 10 else f"other-{k}"
            region.data.concepts.append(data_pb2.Concept(id=concept, value=1.0))
        found.append(VersionMember(n, message.id, message.SerializeToString(), None))
    return found


def ontology() -> VersionOntology:
    classes = tuple(
        OntologyClass(f"class-{n}", f"Class {n}", shapes=(Shape.BOUNDING_BOX,))
        for n in range(CLASSES)
    )
    (numbered, inputs), last = number_classes((classes, ()), {}, 0)
    return VersionOntology("bench", 1, numbered, inputs, last)


async def write(
    export_format: ExportFormat, items: list[VersionMember], with_ontology: VersionOntology | None
) -> float:
    sink = _CountingSink()
    writer = Archives(_NoMedia()).writer(
        export_format, ExportOptions(), ["all"], sink, MODIFIED, with_ontology
    )
    started = time.perf_counter()
    if writer.needs_census:
        for start in range(0, len(items), 500):
            await writer.observe(items[start : start + 500])
    for start in range(0, len(items), 500):
        await writer.write("all", items[start : start + 500])
    await writer.finish()
    return time.perf_counter() - started


async def bench(count: int, rounds: int) -> None:
    items = members(count)
    governing = ontology()
    print(f"{count:,} members, {CLASSES} classes with display names, {rounds} rounds (medians)")
    print(f"{'format':24} {'without':>10} {'with':>10} {'ratio':>6} {'with: members/s':>16}")
    for export_format in MEASURED:
        plain, governed = [], []
        for _ in range(rounds):
            plain.append(await write(export_format, items, None))
            governed.append(await write(export_format, items, governing))
        without, with_ = statistics.median(plain), statistics.median(governed)
        print(
            f"{export_format.name:24} {without:9.3f}s {with_:9.3f}s {with_ / without:5.2f}x "
            f"{count / with_:16,.0f}"
        )


def run_writer_bench(
    description: str, measure: Callable[[int, int], Coroutine[Any, Any, None]]
) -> None:
    """The command line of the writer benchmarks: `measure(members, rounds)`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer members and rounds")
    parser.add_argument("--members", type=int, default=0, help="members per archive")
    args = parser.parse_args()
    count = args.members or (2000 if args.quick else 20000)
    rounds = 3 if args.quick else 7
    load_before = load_average()
    asyncio.run(measure(count, rounds))
    print("environment", environment(load_before))


def main() -> None:
    run_writer_bench(__doc__.split("\n\n")[0], bench)


if __name__ == "__main__":
    main()
