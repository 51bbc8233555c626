"""CreateAnnotations with and without an ontology to check against, in the same run.

Starts the embedded stack and the real server (`python -m service serve`), makes two
datasets of the same images, attaches one of them to a project whose ontology has 60
classes (one with three typed attributes, sub-classes, keypoint classes), and sends the
same batches of 128 annotations (two boxes each, labelled with a class of the ontology
and its attribute values) to the inputs of either dataset. Rounds alternate between the
two (free, governed, free, ...) because the CPU speed of this machine swings in phases of
seconds; the figures are medians of the rounds and the ratios medians of per-round
ratios. Beside throughput, the server process's CPU time per annotation: the check runs
there, and CPU time swings less than throughput with what else the machine does. The
issue's target: the check costs at most 15%, a throughput ratio of at least 0.85.

    .venv/bin/python -m bench.bench_ontology            # ~3 minutes
    .venv/bin/python -m bench.bench_ontology --quick    # ~40 s smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from typing import Any, Final

import grpc
from datasetd.v1 import (
    annotation_pb2,
    annotation_service_pb2,
    annotation_service_pb2_grpc,
    data_pb2,
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    input_pb2,
    input_service_pb2,
    input_service_pb2_grpc,
    ontology_pb2,
    ontology_service_pb2,
    ontology_service_pb2_grpc,
    project_pb2,
    project_service_pb2,
    project_service_pb2_grpc,
)
from google.protobuf import json_format

from bench.common import (
    APP_ID,
    CpuMeter,
    announce_serving,
    drive,
    environment,
    install_sigterm_handler,
    load_average,
    stack_and_server,
)
from tests.helpers import png_bytes

BATCH: Final = 128
CONCURRENCY: Final = 4


def ontology() -> ontology_pb2.Ontology:
    classes: list[dict[str, Any]] = [
        {
            "id": "car",
            "shapes": ["SHAPE_BOUNDING_BOX", "SHAPE_VIDEO_TRACK"],
            "attributes": [
                {
                    "id": "color",
                    "name": "Colour",
                    "required": True,
                    "enum_type": {"options": ["red", "blue", "white", "black"]},
                },
                {"id": "occluded", "name": "Occluded", "boolean": {}},
                {"id": "speed", "name": "Speed", "number": {"min": 0, "max": 300}},
            ],
            "sub_classes": [{"id": f"car-{n}", "shapes": ["SHAPE_BOUNDING_BOX"]} for n in range(5)],
        },
        *(
            {"id": f"kp-{n}", "shapes": ["SHAPE_KEYPOINTS"], "keypoint_names": ["a", "b", "c"]}
            for n in range(4)
        ),
        *(
            {"id": f"class-{n}", "shapes": ["SHAPE_BOUNDING_BOX", "SHAPE_POLYGON"]}
            for n in range(50)
        ),
    ]
    return json_format.ParseDict(
        {"id": "bench-ontology", "classes": classes}, ontology_pb2.Ontology()
    )


def batch(input_ids: Sequence[str]) -> list[annotation_pb2.Annotation]:
    def boxed(label: str, left: float) -> data_pb2.Region:
        region = data_pb2.Region(
            region_info=data_pb2.RegionInfo(
                bounding_box=data_pb2.BoundingBox(
                    top_row=0.1, left_col=left, bottom_row=0.5, right_col=left + 0.2
                )
            ),
            data=data_pb2.Data(concepts=[data_pb2.Concept(id=label, value=1.0)]),
        )
        if label == "car":
            region.data.metadata.update({"attributes": {"color": "red", "speed": 42}})
        return region

    return [
        annotation_pb2.Annotation(
            input_id=input_id,
            data=data_pb2.Data(regions=[boxed("car", 0.1), boxed(f"class-{n % 50}", 0.5)]),
        )
        for n, input_id in enumerate(input_ids)
    ]


async def setup(channel: grpc.aio.Channel, metadata: Any, inputs_per_dataset: int) -> None:
    datasets: Any = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    inputs: Any = input_service_pb2_grpc.InputServiceStub(channel)
    ontologies: Any = ontology_service_pb2_grpc.OntologyServiceStub(channel)
    projects: Any = project_service_pb2_grpc.ProjectServiceStub(channel)
    image = png_bytes(32, 24)
    for name in ("free", "governed"):
        await datasets.CreateDataset(
            dataset_service_pb2.CreateDatasetRequest(
                app_id=APP_ID, dataset=dataset_pb2.Dataset(id=name)
            ),
            metadata=metadata,
        )
        for start in range(0, inputs_per_dataset, BATCH):
            items = [
                input_pb2.Input(
                    id=f"{name}-{n}",
                    data=data_pb2.Data(image=data_pb2.Image(base64=image)),
                    dataset_ids=[name],
                )
                for n in range(start, min(start + BATCH, inputs_per_dataset))
            ]
            await inputs.CreateInputs(
                input_service_pb2.CreateInputsRequest(app_id=APP_ID, inputs=items),
                metadata=metadata,
            )
    await ontologies.CreateOntology(
        ontology_service_pb2.CreateOntologyRequest(app_id=APP_ID, ontology=ontology()),
        metadata=metadata,
    )
    await projects.CreateProject(
        project_service_pb2.CreateProjectRequest(
            app_id=APP_ID, project=project_pb2.Project(id="bench", ontology_id="bench-ontology")
        ),
        metadata=metadata,
    )
    await projects.AttachDataset(
        project_service_pb2.AttachDatasetRequest(
            app_id=APP_ID, project_id="bench", dataset_id="governed"
        ),
        metadata=metadata,
    )


async def measure(
    stub: Any, metadata: Any, dataset: str, inputs_per_dataset: int, batches: int, cpu: CpuMeter
) -> tuple[float, float]:
    """Annotations per second of `batches` CreateAnnotations calls on the dataset's inputs,
    and the server's CPU milliseconds per annotation (what the check costs where it runs,
    and less sensitive than throughput to what else the machine does)."""
    offsets = iter(range(batches))

    async def call(worker: int) -> None:
        start = (next(offsets) * BATCH) % inputs_per_dataset
        ids = [f"{dataset}-{(start + n) % inputs_per_dataset}" for n in range(BATCH)]
        response = await stub.CreateAnnotations(
            annotation_service_pb2.CreateAnnotationsRequest(
                app_id=APP_ID, annotations=batch(ids), atomic=True
            ),
            metadata=metadata,
        )
        assert len(response.results) == BATCH

    before = cpu.read()
    seconds, _ = await drive(call, batches, CONCURRENCY, max_seconds=600)
    used = cpu.read() - before
    return batches * BATCH / seconds, used.server * 1000 / (batches * BATCH)


async def run(rounds: int, batches: int, inputs_per_dataset: int) -> dict[str, float]:
    with stack_and_server(time.monotonic()) as running:
        server = running.server
        async with grpc.aio.insecure_channel(server.address) as channel:
            await announce_serving(channel, server)
            metadata = (("authorization", f"Key {server.key}"),)
            await setup(channel, metadata, inputs_per_dataset)
            stub: Any = annotation_service_pb2_grpc.AnnotationServiceStub(channel)
            cpu = CpuMeter(server.pid, None)
            # Warm-up: connections, caches and the checker of the ontology.
            for dataset in ("free", "governed"):
                await measure(stub, metadata, dataset, inputs_per_dataset, 2, cpu)
            free: list[tuple[float, float]] = []
            governed: list[tuple[float, float]] = []
            for number in range(rounds):
                order = ("free", "governed") if number % 2 == 0 else ("governed", "free")
                for dataset in order:
                    found = await measure(stub, metadata, dataset, inputs_per_dataset, batches, cpu)
                    (free if dataset == "free" else governed).append(found)
                print(
                    f"round {number + 1}: without {free[-1][0]:,.0f}/s "
                    f"({free[-1][1]:.3f} ms CPU each), with {governed[-1][0]:,.0f}/s "
                    f"({governed[-1][1]:.3f} ms)",
                    flush=True,
                )
    pairs = list(zip(governed, free, strict=True))
    return {
        "without_ontology": statistics.median(f[0] for f in free),
        "with_ontology": statistics.median(g[0] for g in governed),
        "ratio": statistics.median(g[0] / f[0] for g, f in pairs),
        "cpu_without": statistics.median(f[1] for f in free),
        "cpu_with": statistics.median(g[1] for g in governed),
        "cpu_ratio": statistics.median(g[1] / f[1] for g, f in pairs),
    }


def main(argv: Sequence[str] | None = None) -> int:
    install_sigterm_handler()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    args = parser.parse_args(argv)
    rounds, batches = (4, 6) if args.quick else (10, 16)
    inputs_per_dataset = 512
    load = load_average()
    figures = asyncio.run(run(rounds, batches, inputs_per_dataset))
    print(f"environment: {environment(load)}")
    print(
        f"CreateAnnotations ({BATCH} annotations of 2 boxes per call, {CONCURRENCY} in flight, "
        f"median of {rounds} interleaved rounds)"
    )
    print(f"  without an ontology      {figures['without_ontology']:>10,.0f} annotations/s")
    print(f"  with a 60-class ontology {figures['with_ontology']:>10,.0f} annotations/s")
    cost = (1 - figures["ratio"]) * 100
    print(f"  ratio with/without       {figures['ratio']:>10.2f}  (check costs {cost:.0f}%)")
    print(
        f"  server CPU per annotation: {figures['cpu_without']:.3f} ms without, "
        f"{figures['cpu_with']:.3f} ms with; ratio {figures['cpu_ratio']:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
