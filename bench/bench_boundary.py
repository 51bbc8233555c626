"""Benchmark of the request gate (service/api/boundary.py): what checking every field of a
request costs, beside decoding the same request from the wire, in the same run.

Every request of every RPC is walked before a handler runs (finite floats, declared enum
numbers, refused fields), so its cost is paid per call. Three bulk requests as callers send
them: 128 URL inputs with metadata and concepts (CreateInputs), 128 annotations with two
boxes each (CreateAnnotations), and a filtered ListInputs. Rounds alternate decode and check
so that the machine's speed swings touch both alike; the figures are medians of the rounds.

    .venv/bin/python -m bench.bench_boundary [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from datasetd.v1 import annotation_pb2, common_pb2, data_pb2
from datasetd.v1 import annotation_service_pb2 as aapi
from datasetd.v1 import input_service_pb2 as iapi
from google.protobuf.message import Message

from bench.common import environment, load_average
from service.api.boundary import check_request

BATCH = 128


def create_inputs() -> iapi.CreateInputsRequest:
    request = iapi.CreateInputsRequest(app_id="bench")
    for n in range(BATCH):
        item = request.inputs.add(id=f"input-{n}")
        item.data.image.url = f"https://images.example.com/{n}.jpg"
        item.data.metadata.update(
            {"camera": "a7", "frame": n, "tags": ["x", "y"], "gps": {"ok": True}}
        )
        item.data.concepts.add(id="cat", value=1.0)
    return request


def create_annotations() -> aapi.CreateAnnotationsRequest:
    request = aapi.CreateAnnotationsRequest(app_id="bench")
    for n in range(BATCH):
        regions = [
            data_pb2.Region(
                region_info=data_pb2.RegionInfo(
                    bounding_box=data_pb2.BoundingBox(
                        top_row=0.1, left_col=0.1 * k, bottom_row=0.5, right_col=0.2 + 0.1 * k
                    )
                ),
                data=data_pb2.Data(concepts=[data_pb2.Concept(id="cat", value=1.0)]),
            )
            for k in (1, 2)
        ]
        request.annotations.append(
            annotation_pb2.Annotation(input_id=f"input-{n}", data=data_pb2.Data(regions=regions))
        )
    return request


def list_inputs() -> iapi.ListInputsRequest:
    query = common_pb2.InputFilter(
        concept_ids=["cat", "dog"], media_types=[common_pb2.MEDIA_TYPE_IMAGE]
    )
    query.metadata.update({"camera": "a7"})
    return iapi.ListInputsRequest(app_id="bench", page_size=100, filter=query)


def _per_call(work: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        work()
    return (time.perf_counter() - started) / calls


def measure(request: Message, rounds: int, calls: int) -> tuple[float, float]:
    """Median seconds per call of decoding the request and of checking it."""
    wire = request.SerializeToString()
    decode = type(request).FromString
    decoded, checked = [], []
    for _ in range(rounds):
        decoded.append(_per_call(lambda: decode(wire), calls))
        checked.append(_per_call(lambda: check_request(request), calls))
    return statistics.median(decoded), statistics.median(checked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    rounds, calls = (5, 20) if args.quick else (21, 50)
    load_before = load_average()
    cases: list[tuple[str, Message, int]] = [
        ("CreateInputs, 128 inputs", create_inputs(), BATCH),
        ("CreateAnnotations, 128 x 2 boxes", create_annotations(), BATCH),
        ("ListInputs, filtered", list_inputs(), 1),
    ]
    print(
        f"{'request':34} {'bytes':>7} {'decode':>10} {'check':>10} {'check/item':>11} {'ratio':>6}"
    )
    for name, request, items in cases:
        decode, check = measure(request, rounds, calls)
        print(
            f"{name:34} {request.ByteSize():7,} {decode * 1e6:8.0f}us {check * 1e6:8.0f}us "
            f"{check / items * 1e6:9.1f}us {check / decode:5.1f}x"
        )
    print("(decode: protobuf's C parser on the wire bytes; check: boundary.check_request)")
    print("environment", environment(load_before))


if __name__ == "__main__":
    main()
