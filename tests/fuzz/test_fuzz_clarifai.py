"""clarifai.api.V2 fuzzed from clarifai-grpc's descriptors through the real server.

V2 answers in-band, so the contract is stricter than the native one's: every call that
reaches the server gets gRPC OK (or the transport's own codes: a cancelled or malformed
call) whose `status.code` is never Clarifai's internal error, well within the deadline;
the server stays SERVING. Served are the methods of the subset (every one fuzzed) and a
sample of the others (which must answer NOT_IMPLEMENTED in-band)."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator

import grpc
import pytest
from clarifai_grpc.grpc.api.status import status_code_pb2

from service.api.clarifai.parts import served_methods
from service.api.clarifai.service import V2, message_class
from service.storage.db import Database
from tests.fuzz.harness import Outcome, Rpc, cases, generate, identities, run, verdict
from tests.fuzz.resources import Resources, ensure, field_paths, open_resources
from tests.fuzz.test_fuzz import _assert_serving

SERVED = sorted(served_methods())
# Outside the subset: they must answer NOT_IMPLEMENTED in-band whatever they are sent.
UNSERVED = ["ListModels", "GetModel", "ListApps", "ListWorkflows", "StreamAnnotations"]
RPCS = [Rpc(V2.methods_by_name[name]) for name in (*SERVED, *UNSERVED)]
EXAMPLES_PER_RPC = 120
# Outside the subset a method answers before it reads the request: a few cases show that
# (generating a request of the model and workflow messages costs more than sending it).
EXAMPLES_PER_UNSERVED_RPC = 20
# Clarifai's codes for a failure of the server itself.
SERVER_FAILURES = frozenset(
    value.number
    for value in status_code_pb2.StatusCode.DESCRIPTOR.values
    if value.name.startswith("INTERNAL_") or value.name in ("SERVER_ERROR", "UNKNOWN")
)


# Served to say why they are refused (concepts exist only as labels in datasetd).
REFUSED = ("PostConcepts", "PatchConcepts")
# An unserved method still authenticates the caller and checks the request's values first.
UNSERVED_ANSWERS = frozenset(
    {
        status_code_pb2.NOT_IMPLEMENTED,
        status_code_pb2.CONN_KEY_INVALID,
        status_code_pb2.CONN_INVALID_REQUEST,
        status_code_pb2.ANNOTATION_INVALID_ARGUMENT,
    }
)


@pytest.fixture(scope="module")
async def resources(db: Database, channel: grpc.aio.Channel) -> AsyncIterator[Resources]:
    yield await open_resources(db, channel)


def in_band_problem(outcome: Outcome) -> str:
    """What is wrong with a V2 answer that gRPC delivered as OK."""
    if outcome.code is not grpc.StatusCode.OK or outcome.response is None:
        return ""
    method = outcome.case.rpc.method
    try:
        answer = message_class(method.output_type).FromString(outcome.response)
    except Exception as exc:
        return f"{method.name}: the answer does not parse ({exc})"
    code = answer.status.code  # type: ignore[attr-defined]
    if code in SERVER_FAILURES:
        return f"{method.name}: in-band {code} {answer.status.details!r}"  # type: ignore[attr-defined]
    if method.name in UNSERVED and code not in UNSERVED_ANSWERS:
        return f"{method.name}: not served, yet answered {code}"
    if code == status_code_pb2.NOT_IMPLEMENTED and method.name not in (*UNSERVED, *REFUSED):
        return f"{method.name}: served, yet answered NOT_IMPLEMENTED"
    return ""


def test_the_subset_is_served() -> None:
    """The methods the clients of issue 14 call are in the subset (a part lost in the
    wiring would turn them into NOT_IMPLEMENTED without anything else failing)."""
    documented = {
        *("PostDatasets", "GetDataset", "ListDatasets", "PatchDatasets", "DeleteDatasets"),
        *("PostDatasetInputs", "ListDatasetInputs", "GetDatasetInput", "DeleteDatasetInputs"),
        *("PostInputs", "GetInput", "ListInputs", "PatchInputs", "DeleteInput", "DeleteInputs"),
        *("StreamInputs", "GetInputCount", "GetInputsAddJob", "ListInputsAddJobs"),
        *("CancelInputsAddJob", "PostAnnotations", "GetAnnotation", "ListAnnotations"),
        *("PatchAnnotations", "DeleteAnnotation", "DeleteAnnotations", "ListConcepts"),
        *("GetConcept", "PostConcepts", "PatchConcepts", "PostDatasetVersions"),
        *("GetDatasetVersion", "ListDatasetVersions", "PatchDatasetVersions"),
        *("DeleteDatasetVersions", "ListDatasetVersionMetricsGroups"),
        *("PutDatasetVersionExports", "GetApp", "PostApps", "GetUser"),
    }
    assert set(SERVED) == documented


@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: rpc.method.name)
async def test_v2_rpc_keeps_the_contract(rpc: Rpc, resources: Resources) -> None:
    await ensure(resources)
    paths = field_paths([r.method.input_type for r in RPCS])
    strategy = cases(
        rpc,
        resources.known(paths),
        identities(
            resources.caller.metadata, resources.reader.metadata, resources.stranger.metadata
        ),
    )
    seed = zlib.crc32(rpc.method.full_name.encode())
    count = EXAMPLES_PER_UNSERVED_RPC if rpc.method.name in UNSERVED else EXAMPLES_PER_RPC
    outcomes = await run(resources.channel, generate(strategy, count, seed))
    problem = verdict(outcomes)
    if problem:
        pytest.fail(f"{rpc.method.name}: {problem}", pytrace=False)
    in_band = [p for p in (in_band_problem(o) for o in outcomes) if p]
    if in_band:
        shown = "\n".join(in_band[:8])
        pytest.fail(f"{len(in_band)} in-band failures:\n{shown}", pytrace=False)
    await _assert_serving(resources.channel)
