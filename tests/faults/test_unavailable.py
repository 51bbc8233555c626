"""The storage layer turns PostgreSQL and S3 being unreachable into the domain's
Unavailable, through the fault proxy in front of the session's stack, without a server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from service.domain.errors import ErrorKind, Unavailable
from service.storage.db import Database
from service.storage.objectstore import ObjectStore
from tests.conftest import Stack
from tests.faults.harness import socket_path
from tests.faults.proxy import FaultProxy, Upstream


@pytest.fixture
async def pg_proxy(stack: Stack) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(Upstream.unix(socket_path(stack.dsn))) as proxy:
        yield proxy


async def test_database_unreachable_is_unavailable_and_the_pool_recovers(
    pg_proxy: FaultProxy,
) -> None:
    db = await Database.connect(
        f"postgresql://postgres@{pg_proxy.endpoint}/postgres", min_size=1, max_size=2
    )
    try:
        assert await db.fetchval("SELECT 1") == 1
        pg_proxy.reset()  # drops the pooled connection and refuses new ones
        with pytest.raises(Unavailable) as lost:
            await db.fetchval("SELECT 1")
        assert lost.value.kind is ErrorKind.UNAVAILABLE
        assert lost.value.reason == "DATABASE_UNAVAILABLE"
        assert db.unreachable.is_set()
        # Inside a transaction too: the connection is lost between two statements.
        pg_proxy.pass_through()
        with pytest.raises(Unavailable):
            async with db.transaction(), db.connection() as conn:
                await conn.execute("SELECT 1")
                pg_proxy.reset()
                await conn.execute("SELECT 2")
        pg_proxy.pass_through()
        # The pool replaces the lost connections by itself.
        assert await db.fetchval("SELECT 3") == 3
    finally:
        db.pool.terminate()


async def test_a_silent_object_store_is_unavailable_within_two_timeouts(stack: Stack) -> None:
    async with FaultProxy(Upstream.tcp(stack.s3.endpoint)) as proxy:
        s3 = stack.s3
        store = ObjectStore(proxy.endpoint, s3.access_key, s3.secret_key, s3.bucket, timeout=0.5)
        try:
            await store.put("faults/probe", b"x", "application/octet-stream")
            proxy.blackhole()
            started = time.monotonic()
            with pytest.raises(Unavailable) as silent:
                await store.get("faults/probe")
            # Two attempts of 0.5 s (one read retry) and a backoff, not urllib3's forever.
            assert time.monotonic() - started < 3.0
            assert silent.value.reason == "OBJECT_STORE_UNAVAILABLE"
            assert store.unreachable.is_set()
            proxy.reset()
            with pytest.raises(Unavailable):
                await store.put("faults/probe2", b"y", "application/octet-stream")
            proxy.pass_through()
            assert await store.get("faults/probe") == b"x"
            await store.delete("faults/probe")
        finally:
            store.close()
