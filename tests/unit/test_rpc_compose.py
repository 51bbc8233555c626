"""compose(): every RPC of a proto service is served by exactly one servicer part."""

from __future__ import annotations

from typing import Any

import pytest
from datasetd.v1 import dataset_version_service_pb2

from service.api.rpc import compose

SERVICE = dataset_version_service_pb2.DESCRIPTOR.services_by_name["DatasetVersionService"]
NAMES = [method.name for method in SERVICE.methods]


def _part(*names: str) -> Any:
    async def rpc(request: object, context: object) -> str:
        return "served"

    return type("Part", (), dict.fromkeys(names, staticmethod(rpc)))()


def test_each_rpc_goes_to_the_part_that_owns_it() -> None:
    half = len(NAMES) // 2
    first, second = _part(*NAMES[:half]), _part(*NAMES[half:])
    servicer = compose(SERVICE, first, second)
    assert getattr(servicer, NAMES[0]) == getattr(first, NAMES[0])
    assert getattr(servicer, NAMES[-1]) == getattr(second, NAMES[-1])


def test_an_rpc_without_a_part_stops_the_start() -> None:
    with pytest.raises(RuntimeError, match=rf"{NAMES[-1]} is implemented by 0 parts"):
        compose(SERVICE, _part(*NAMES[:-1]))


def test_an_rpc_with_two_parts_stops_the_start() -> None:
    with pytest.raises(RuntimeError, match=rf"{NAMES[0]} is implemented by 2 parts"):
        compose(SERVICE, _part(*NAMES), _part(NAMES[0]))
