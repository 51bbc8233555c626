"""Every RPC of every datasetd.v1 service, fuzzed from its descriptors through the real server.

Whatever arrives (hostile field values, garbage bytes, streams in the wrong order or cut off,
keys that are missing, wrong or of another app), the caller gets a status that is neither
UNKNOWN nor INTERNAL, well within the call's deadline, and the server stays SERVING.

`make test` sends EXAMPLES_PER_RPC cases per RPC with fixed seeds, so a failure reproduces;
`make test-slow` sends DATASETD_FUZZ_EXAMPLES (default SLOW_EXAMPLES_PER_RPC) per RPC, with a
seed taken from DATASETD_FUZZ_SEED or drawn (a failure names it). DATASETD_FUZZ_STATS=1 (with
`-s`) prints the statuses of each batch: how far the requests got.
"""

from __future__ import annotations

import os
import random
import zlib
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.server import SERVICE_NAMES
from service.storage.db import Database
from tests.fuzz.harness import (
    Case,
    Rpc,
    cases,
    discover,
    generate,
    identities,
    run,
    verdict,
)
from tests.fuzz.resources import Resources, ensure, field_paths, open_resources

RPCS = discover()
EXAMPLES_PER_RPC = 200
SLOW_EXAMPLES_PER_RPC = 1_000
# Generated then sent in batches, so that tens of thousands of requests never sit in memory.
BATCH = 250


@pytest.fixture(scope="module")
async def resources(db: Database, channel: grpc.aio.Channel) -> AsyncIterator[Resources]:
    yield await open_resources(db, channel)


def _cases(rpc: Rpc, res: Resources, count: int, seed_value: int) -> list[Case]:
    paths = field_paths([r.method.input_type for r in RPCS])
    # AccessService manages nothing for a scoped key: its RPCs are fuzzed as the owner.
    main = res.manager if rpc.method.containing_service.name == "AccessService" else res.caller
    strategy = cases(
        rpc,
        res.known(paths),
        identities(main.metadata, res.reader.metadata, res.stranger.metadata),
    )
    return generate(strategy, count, seed_value)


async def _fuzz(rpc: Rpc, res: Resources, count: int, base_seed: int, rerun: str = "") -> None:
    sent = 0
    batch_number = 0
    while sent < count:
        size = min(BATCH, count - sent)
        await ensure(res)
        batch = _cases(rpc, res, size, base_seed + batch_number)
        outcomes = await run(res.channel, batch)
        if os.environ.get("DATASETD_FUZZ_STATS"):
            print(rpc.name, Counter(outcome.label for outcome in outcomes).most_common())
            details = Counter(o.details[:150] for o in outcomes if o.label == "INVALID_ARGUMENT")
            print("   ", details.most_common(6))
        problem = verdict(outcomes)
        if problem:
            where = f"batch {batch_number} (seed {base_seed + batch_number}{rerun})"
            pytest.fail(f"{rpc.name}, {where}: {problem}", pytrace=False)
        sent += size
        batch_number += 1
    await _assert_serving(res.channel)


async def _assert_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", *SERVICE_NAMES):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service


def _seed(rpc: Rpc) -> int:
    return zlib.crc32(rpc.name.encode())


# --- the suite ---------------------------------------------------------------------------


def test_every_rpc_of_every_served_service_is_fuzzed() -> None:
    discovered = {rpc.method.containing_service.full_name for rpc in RPCS}
    assert discovered == set(SERVICE_NAMES)
    kinds = {(rpc.client_streaming, rpc.server_streaming) for rpc in RPCS}
    assert {(False, False), (True, False), (False, True)} <= kinds


@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: rpc.name)
async def test_rpc_keeps_the_contract(rpc: Rpc, resources: Resources) -> None:
    await _fuzz(rpc, resources, EXAMPLES_PER_RPC, _seed(rpc))


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: rpc.name)
async def test_rpc_keeps_the_contract_at_length(rpc: Rpc, resources: Resources) -> None:
    count = int(os.environ.get("DATASETD_FUZZ_EXAMPLES", SLOW_EXAMPLES_PER_RPC))
    base = int(os.environ.get("DATASETD_FUZZ_SEED", random.randrange(2**31)))
    rerun = f"; rerun with DATASETD_FUZZ_SEED={base}"
    await _fuzz(rpc, resources, count, base + _seed(rpc), rerun)


async def test_the_server_is_serving_after_the_fuzzing(channel: grpc.aio.Channel) -> None:
    await _assert_serving(channel)
