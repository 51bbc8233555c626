"""Read routing: every RPC is classified, what may go to the replica, and the replica's
freshness bookkeeping (positions, lag bound, per-caller memory) with fake pools."""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import pkgutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import datasetd.v1
import grpc
import pytest

from service.api.access import AccessRpcs
from service.api.annotations import AnnotationRpcs
from service.api.datasets import DatasetRpcs
from service.api.diffs import DiffRpcs
from service.api.exports import ExportRpcs
from service.api.imports import ImportRpcs
from service.api.inputs import InputRpcs
from service.api.membership import MembershipRpcs
from service.api.ontologies import OntologyRpcs
from service.api.projects import ProjectRpcs
from service.api.read_routing import (
    LSN_HEADER,
    MIN_LSN_HEADER,
    PRIMARY,
    READ_ONLY,
    read_only,
    route_call,
)
from service.api.versions import VersionRpcs
from service.client._rpc import Rpc
from service.config import Config, ConfigError
from service.domain.errors import InvalidArgument
from service.domain.models import Principal
from service.storage import replica as replica_module
from service.storage.replica import ROUTE, CallRoute, ReadReplica, format_lsn, parse_lsn, writes

PRINCIPAL = Principal(key_id="key-1", app_id="app", scopes=frozenset({"read", "write"}))
PARTS = (
    AccessRpcs,
    AnnotationRpcs,
    DatasetRpcs,
    DiffRpcs,
    ExportRpcs,
    ImportRpcs,
    InputRpcs,
    MembershipRpcs,
    OntologyRpcs,
    ProjectRpcs,
    VersionRpcs,
)


def _proto_rpcs() -> set[str]:
    """`/package.Service/Method` of every RPC the datasetd.v1 protos declare."""
    found = set()
    for module in pkgutil.iter_modules(datasetd.v1.__path__):
        if not module.name.endswith("_pb2"):
            continue
        descriptor = importlib.import_module(f"datasetd.v1.{module.name}").DESCRIPTOR
        for service in descriptor.services_by_name.values():
            found |= {f"/{service.full_name}/{method.name}" for method in service.methods}
    return found


def test_every_rpc_is_classified_once() -> None:
    rpcs = _proto_rpcs()
    assert len(rpcs) > 30  # the descriptors were found
    assert not READ_ONLY & PRIMARY
    assert sorted(rpcs - READ_ONLY - PRIMARY) == [], "classify these in read_routing.py"
    assert sorted((READ_ONLY | PRIMARY) - rpcs) == [], "no such RPC any more"


def test_no_mutation_is_read_only() -> None:
    # @mutation wraps the handler (functools.wraps sets __wrapped__); a plain read does not.
    mutations = {
        name
        for part in PARTS
        for name, member in vars(part).items()
        if name[:1].isupper() and hasattr(member, "__wrapped__")
    }
    assert len(mutations) > 10
    assert not {m for m in READ_ONLY if m.rsplit("/", 1)[1] in mutations}


def test_unknown_methods_stay_on_the_primary() -> None:
    assert read_only("/datasetd.v1.DatasetService/GetDataset")
    assert not read_only("/datasetd.v1.DatasetService/CreateDataset")
    assert not read_only("/grpc.health.v1.Health/Check")
    assert not read_only("/test.Echo/Get")


@pytest.mark.parametrize(
    ("sql", "wrote"),
    [
        ("SELECT id, updated_at, deleted_at FROM datasets WHERE app_id = $1", False),
        ("SELECT count(*) FROM inputs WHERE locked_by IS NULL", False),
        ("INSERT INTO t (a) VALUES ($1) RETURNING a", True),
        ("WITH gone AS (DELETE FROM t RETURNING id) SELECT count(*) FROM gone", True),
        ("update t set a = 1 returning a", True),
        ("SELECT * FROM versions WHERE id = $1 FOR UPDATE", True),
        ("SELECT * FROM versions WHERE id = $1 FOR KEY SHARE", True),
        ("SELECT pg_try_advisory_lock($1)", True),
        ("SELECT nextval('s')", True),
    ],
)
def test_statements_that_write_or_lock_are_told_apart(sql: str, wrote: bool) -> None:
    assert writes(sql) is wrote


def test_lsn_text_round_trip() -> None:
    assert parse_lsn("16/B374D848") == 0x16_B374D848
    assert format_lsn(0x16_B374D848) == "16/B374D848"
    assert parse_lsn(format_lsn(0)) == 0
    for bad in ("", "16", "x/1", "1/", "/1", "123456789/0", "1/2/3"):
        with pytest.raises(ValueError, match="WAL position"):
            parse_lsn(bad)


def test_route_call_reads_the_header() -> None:
    def routed() -> tuple[CallRoute, CallRoute | None]:
        route = route_call("/datasetd.v1.InputService/GetInput", PRINCIPAL, "0/10")
        return route, ROUTE.get()

    route, current = contextvars.copy_context().run(routed)
    assert current is route
    assert (route.principal, route.read_only, route.min_lsn) == ("key-1", True, 0x10)
    writing = route_call("/datasetd.v1.InputService/CreateInputs", PRINCIPAL, "")
    assert (writing.read_only, writing.min_lsn) == (False, 0)


def test_a_malformed_min_lsn_names_the_header() -> None:
    with pytest.raises(InvalidArgument, match=MIN_LSN_HEADER) as raised:
        route_call("/datasetd.v1.InputService/GetInput", PRINCIPAL, "yesterday")
    assert raised.value.reason == "INVALID_MIN_LSN"


# --- ReadReplica with fake pools -------------------------------------------------------


class _FakePool:
    """Answers the position queries the sampler makes, from attributes a test sets."""

    def __init__(self) -> None:
        self.position = 0
        self.standby = True
        self.fail: Exception | None = None

    async def fetchval(self, sql: str) -> int:
        if self.fail:
            raise self.fail
        return self.position

    @asynccontextmanager
    async def acquire(self, **options: float) -> AsyncIterator[_FakePool]:
        if self.fail:
            raise self.fail
        yield self

    async def fetchrow(self, sql: str) -> dict[str, Any]:
        return {"standby": self.standby, "replayed": self.position, "paused": False}


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _replica(
    max_lag: float = 30.0, clock: _Clock | None = None
) -> tuple[ReadReplica, _FakePool, _FakePool]:
    primary, standby = _FakePool(), _FakePool()
    replica = ReadReplica(
        standby,  # type: ignore[arg-type]
        primary,  # type: ignore[arg-type]
        max_lag=max_lag,
        clock=clock or _Clock(),
    )
    return replica, primary, standby


def _in_call(read: bool, principal: str = "key-1", min_lsn: int = 0) -> CallRoute:
    route = CallRoute(principal, read, min_lsn)
    ROUTE.set(route)
    return route


async def test_reads_need_a_fresh_sample_and_the_callers_position() -> None:
    replica, primary, standby = _replica()
    primary.position = standby.position = 100

    async def check() -> None:
        _in_call(read=True)
        assert not replica.serves("SELECT 1"), "never sampled"
        await replica.sample()
        assert replica.serves("SELECT 1")
        assert not replica.serves("SELECT 1 FOR UPDATE")
        replica.remember("key-1", 150)
        assert not replica.serves("SELECT 1"), "the caller wrote past the replay position"
        _in_call(read=True, principal="key-2")
        assert replica.serves("SELECT 1"), "another caller does not wait"
        _in_call(read=True, principal="key-2", min_lsn=150)
        assert not replica.serves("SELECT 1"), "unless it carries the position"
        standby.position = primary.position = 150
        await replica.sample()
        assert replica.serves("SELECT 1")
        _in_call(read=False)
        assert not replica.serves("SELECT 1"), "a writing call reads the primary"

    await asyncio.create_task(check())


async def test_lag_beyond_the_bound_sends_reads_to_the_primary() -> None:
    clock = _Clock()
    replica, primary, standby = _replica(max_lag=5.0, clock=clock)
    primary.position = standby.position = 100
    await replica.sample()
    assert replica.usable and replica.lag() == 0.0
    primary.position = 200  # a write the replica does not replay
    await replica.sample()
    clock.now += 4.0
    await replica.sample()
    assert replica.usable and replica.lag() == 4.0
    clock.now += 2.0
    await replica.sample()
    assert not replica.usable, "6s behind, over the 5s bound"
    standby.position = 200
    await replica.sample()
    assert replica.usable and replica.lag() == 0.0
    # An idle primary is not lag: nothing is left to replay.
    clock.now += 60.0
    await replica.sample()
    assert replica.usable and replica.lag() == 0.0


async def test_a_stale_or_failed_sample_is_not_trusted() -> None:
    clock = _Clock()
    replica, _, standby = _replica(clock=clock)
    await replica.sample()
    assert replica.usable
    clock.now += replica_module.STALE_SECONDS + 1
    assert not replica.usable, "the sampler stopped reporting"
    await replica.sample()
    assert replica.usable
    standby.standby = False
    await replica.sample()
    assert not replica.usable, "a promoted or unrelated server says nothing of freshness"


async def test_the_memory_of_positions_expires_and_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _Clock()
    monkeypatch.setattr(replica_module, "MAX_REMEMBERED", 3)
    replica, _, _ = _replica(max_lag=10.0, clock=clock)
    replica.remember("a", 50)
    replica.remember("a", 40)
    assert replica.needed(CallRoute("a", True)) == 50, "a position never moves back"
    assert replica.needed(CallRoute("a", True, min_lsn=70)) == 70
    clock.now += 61.0
    assert replica.needed(CallRoute("a", True)) == 0, "past the lag bound it is replayed"
    for name in ("b", "c", "d", "e"):
        replica.remember(name, 1)
    assert replica.needed(CallRoute("b", True)) == 0, "the oldest made room"
    assert replica.needed(CallRoute("e", True)) == 1


async def test_a_writing_call_settles_its_position() -> None:
    replica, primary, _ = _replica()
    primary.position = 321

    async def call() -> int | None:
        route = _in_call(read=False)
        replica.on_primary()
        return await route.settle()

    assert await asyncio.create_task(call()) == 321
    assert replica.needed(CallRoute("key-1", True)) == 321

    async def read_call() -> int | None:
        route = _in_call(read=True, principal="key-9")
        replica.on_primary()
        return await route.settle()

    assert await asyncio.create_task(read_call()) is None, "reads are not tracked"

    async def unknown() -> int | None:
        route = _in_call(read=False, principal="key-2")
        replica.on_primary()
        primary.fail = OSError("primary gone")
        return await route.settle()

    assert await asyncio.create_task(unknown()) is None
    primary.fail = None
    assert replica.needed(CallRoute("key-2", True)) > 2**63, "read the primary meanwhile"


# --- the client library ----------------------------------------------------------------


class _FakeCall:
    def __init__(self, trailing: tuple[tuple[str, str], ...]) -> None:
        self._trailing = trailing

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


class _FakeMethod:
    """A unary multi-callable: records the metadata sent, answers with `trailing`."""

    def __init__(self) -> None:
        self.sent: list[dict[str, str]] = []
        self.trailing: tuple[tuple[str, str], ...] = ()

    def __call__(self, request: object, **options: object) -> str:
        raise AssertionError("the client must call with_call to read the trailing metadata")

    def with_call(
        self, request: object, metadata: tuple[tuple[str, str], ...], timeout: float | None
    ) -> tuple[str, _FakeCall]:
        self.sent.append(dict(metadata))
        return "response", _FakeCall(self.trailing)


def test_the_client_sends_back_the_newest_position_it_was_given() -> None:
    rpc = Rpc(grpc.insecure_channel("127.0.0.1:1"), "app", "secret")
    method = _FakeMethod()
    assert rpc.call(method, object()) == "response"
    method.trailing = ((LSN_HEADER, "1/A0"), ("x-request-id", "r"))
    rpc.call(method, object())
    method.trailing = ((LSN_HEADER, "0/FF"),)  # an older position (another server's)
    rpc.call(method, object())
    method.trailing = ((LSN_HEADER, "garbage"),)
    rpc.call(method, object())
    rpc.call(method, object())
    assert [sent.get(MIN_LSN_HEADER) for sent in method.sent] == [
        None,
        None,
        "1/A0",
        "1/A0",
        "1/A0",
    ]
    assert all(sent["authorization"] == "Key secret" for sent in method.sent)


def test_read_max_lag_is_a_positive_duration() -> None:
    primary = {"DATASETD_DATABASE_URL": "postgresql://p", "DATASETD_DATABASE_READ_URL": "x"}
    assert Config.from_env(primary).read_max_lag == timedelta(seconds=30)
    assert Config.from_env({**primary, "DATASETD_READ_MAX_LAG": "2m"}).read_max_lag == (
        timedelta(minutes=2)
    )
    for bad in ("0s", "soon"):
        with pytest.raises(ConfigError, match="DATASETD_READ_MAX_LAG"):
            Config.from_env({**primary, "DATASETD_READ_MAX_LAG": bad})
