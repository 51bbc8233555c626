"""The embedded streaming replica and the Database's read routing against it: a real hot
standby of the test stack's PostgreSQL (pg_basebackup -R), no server."""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from service.devstack import EmbeddedReplica
from service.domain.errors import Unavailable
from service.storage.db import Database
from service.storage.replica import ROUTE, CallRoute
from tests.conftest import Stack

REPLAY_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def replica(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedReplica]:
    server = EmbeddedReplica(
        tmp_path_factory.mktemp("replica"), stack.dsn, settings={"shared_buffers": "64MB"}
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + REPLAY_TIMEOUT
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {REPLAY_TIMEOUT:.0f}s: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def table(stack: Stack) -> AsyncIterator[str]:
    name = "replica_probe_" + secrets.token_hex(4)
    conn = await asyncpg.connect(stack.dsn)
    try:
        await conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)")
        yield name
        await conn.execute(f"DROP TABLE {name}")
    finally:
        await conn.close()


async def test_the_replica_replays_the_primary_and_refuses_writes(
    stack: Stack, replica: EmbeddedReplica, table: str
) -> None:
    primary = await asyncpg.connect(stack.dsn)
    standby = await asyncpg.connect(replica.dsn)
    try:
        assert await standby.fetchval("SELECT pg_is_in_recovery()") is True
        await primary.execute(f"INSERT INTO {table} VALUES (1), (2)")

        async def replayed() -> bool:
            try:
                return bool(await standby.fetchval(f"SELECT count(*) FROM {table}") == 2)
            except asyncpg.UndefinedTableError:
                return False

        await _eventually(replayed, "the rows written on the primary are on the replica")
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError, match="read-only transaction"):
            await standby.execute(f"INSERT INTO {table} VALUES (3)")
    finally:
        await standby.close()
        await primary.close()


async def _in_call(
    principal: str, *, read_only: bool, work: Callable[[], Awaitable[object]]
) -> object:
    """`work` inside a call of `principal`, as the interceptor routes one; a call that may
    write settles its position at the end."""

    async def call() -> object:
        route = CallRoute(principal, read_only)
        ROUTE.set(route)
        result = await work()
        await route.settle()
        return result

    return await asyncio.create_task(call())


async def test_reads_follow_the_replica_and_the_callers_writes(
    stack: Stack, replica: EmbeddedReplica, table: str
) -> None:
    db = await Database.connect(stack.dsn, min_size=1, max_size=4)
    await db.attach_replica(replica.dsn, max_lag=3.0, max_size=2)
    standby = await asyncpg.connect(replica.dsn)
    assert db.replica is not None
    replica_reads = db.replica.stats
    count = f"SELECT count(*) FROM {table}"

    async def rows(principal: str) -> int:
        value = await _in_call(principal, read_only=True, work=lambda: db.fetchval(count))
        assert isinstance(value, int)
        return value

    try:
        await _caught_up(db)
        served = replica_reads.served
        assert await rows("reader") == 0
        assert replica_reads.served == served + 1, "a read-only call reads the replica"
        assert await db.fetchval(count) == 0
        assert replica_reads.served == served + 1, "outside a call: the primary"

        await standby.execute("SELECT pg_wal_replay_pause()")
        try:
            await _in_call(
                "writer",
                read_only=False,
                work=lambda: db.execute(f"INSERT INTO {table} VALUES (1)"),
            )
            assert await rows("writer") == 1, "the writer reads its write (primary)"
            assert await rows("reader") == 0, "another caller reads the paused replica"
            # Past the 3s lag bound every read goes to the primary.
            await _eventually(lambda: _not_usable(db), "the lag bound trips")
            assert await rows("reader") == 1
        finally:
            await standby.execute("SELECT pg_wal_replay_resume()")
        await _caught_up(db)
        served = replica_reads.served
        assert await rows("reader") == 1
        assert replica_reads.served == served + 1
        assert replica_reads.failed_over == 0
    finally:
        await standby.close()
        await db.close()


async def test_a_read_transaction_is_one_snapshot_of_the_replica(
    stack: Stack, replica: EmbeddedReplica, table: str
) -> None:
    db = await Database.connect(stack.dsn, min_size=1, max_size=2)
    await db.attach_replica(replica.dsn, max_lag=30.0, max_size=2)
    primary = await asyncpg.connect(stack.dsn)
    standby = await asyncpg.connect(replica.dsn)
    assert db.replica is not None
    stats = db.replica.stats
    count = f"SELECT count(*) FROM {table}"

    async def replayed(lsn: str) -> bool:
        return bool(
            await standby.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn)
        )

    async def snapshot() -> tuple[bool, int, int]:
        async with db.read_transaction():
            recovering = await db.fetchval("SELECT pg_is_in_recovery()")
            before = await db.fetchval(count)
            await primary.execute(f"INSERT INTO {table} VALUES (1)")
            lsn = await primary.fetchval("SELECT pg_current_wal_lsn()::text")
            await _eventually(lambda: replayed(lsn), "the replica replays the insert")
            return recovering, before, await db.fetchval(count)

    try:
        await _caught_up(db)
        served = stats.served
        assert await _in_call("reader", read_only=True, work=snapshot) == (True, 0, 0)
        assert stats.served == served + 1 and stats.failed_over == 0
        fresh = await _in_call("reader", read_only=True, work=lambda: db.fetchval(count))
        assert fresh == 1, "the insert was replayed; only the snapshot did not see it"
    finally:
        await standby.close()
        await primary.close()
        await db.close()


async def test_a_read_transaction_elsewhere_is_read_only_on_the_primary(
    stack: Stack, replica: EmbeddedReplica, table: str
) -> None:
    db = await Database.connect(stack.dsn, min_size=1, max_size=2)
    await db.attach_replica(replica.dsn, max_lag=30.0, max_size=2)
    assert db.replica is not None
    stats = db.replica.stats

    async def refused(sql: str) -> None:
        async with db.read_transaction():
            assert await db.fetchval("SELECT pg_is_in_recovery()") is False
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await db.fetch(sql)

    async def joined() -> int:
        """A read_transaction inside a write's transaction reads what it wrote."""
        async with db.transaction():
            await db.execute(f"INSERT INTO {table} VALUES (7)")
            async with db.read_transaction():
                value = await db.fetchval(f"SELECT count(*) FROM {table}")
            await db.execute(f"DELETE FROM {table}")
        assert isinstance(value, int)
        return value

    try:
        await _caught_up(db)
        served = stats.served
        for sql in (f"INSERT INTO {table} VALUES (1)", f"SELECT id FROM {table} FOR SHARE"):
            # A call that may write, and no call at all (the job runner, maintenance).
            await _in_call("writer", read_only=False, work=functools.partial(refused, sql))
            await refused(sql)
        assert await _in_call("reader", read_only=True, work=joined) == 1
        assert stats.served == served
    finally:
        await db.close()


async def test_a_replica_lost_in_a_read_transaction_is_unavailable(
    stack: Stack, replica: EmbeddedReplica
) -> None:
    db = await Database.connect(stack.dsn, min_size=1, max_size=2)
    await db.attach_replica(replica.dsn, max_lag=30.0, max_size=2)
    standby = await asyncpg.connect(replica.dsn)

    async def cut() -> None:
        async with db.read_transaction():
            pid = await db.fetchval("SELECT pg_backend_pid()")
            assert await standby.fetchval("SELECT pg_terminate_backend($1)", pid) is True
            await db.fetchval("SELECT 1")

    try:
        await _caught_up(db)
        with pytest.raises(Unavailable) as lost:
            await _in_call("reader", read_only=True, work=cut)
        assert lost.value.reason == "DATABASE_UNAVAILABLE"
        assert not await _usable(db), "the replica is out of the rotation at once"
        await _caught_up(db)
    finally:
        await standby.close()
        await db.close()


async def test_a_recovery_conflict_in_a_read_transaction_is_unavailable(
    stack: Stack, tmp_path: Path, table: str
) -> None:
    # A replica of its own that cancels a conflicting read at once, not after 30s.
    impatient = EmbeddedReplica(
        tmp_path, stack.dsn, settings={"shared_buffers": "64MB", "max_standby_streaming_delay": "0"}
    )
    await asyncio.to_thread(impatient.start)
    db = await Database.connect(stack.dsn, min_size=1, max_size=2)
    await db.attach_replica(impatient.dsn, max_lag=30.0, max_size=2)
    primary = await asyncpg.connect(stack.dsn)

    async def exclusive() -> None:
        # Replayed, the lock conflicts with the snapshot's lock on the table.
        async with primary.transaction():
            await primary.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")

    async def conflicted() -> None:
        async with db.read_transaction():
            await db.fetchval(f"SELECT count(*) FROM {table}")
            locking = asyncio.create_task(exclusive())
            try:
                await db.fetchval("SELECT pg_sleep(20)")
            finally:
                await locking

    try:
        await _caught_up(db)
        started = asyncio.get_running_loop().time()
        with pytest.raises(Unavailable) as cancelled:
            await _in_call("reader", read_only=True, work=conflicted)
        assert isinstance(cancelled.value.__cause__, asyncpg.SerializationError)
        assert asyncio.get_running_loop().time() - started < 10, "cancelled by the conflict"
        assert await _usable(db), "the replica itself is fine"
    finally:
        await primary.close()
        await db.close()
        await asyncio.to_thread(impatient.stop)


async def _caught_up(db: Database) -> None:
    """Waits until the sampler saw the replica replay all the primary had written."""
    written = await db.fetchval("SELECT pg_current_wal_lsn()")

    async def replayed() -> bool:
        return await _usable(db) and db.replica is not None and db.replica.replayed >= written

    await _eventually(replayed, "the replica catches up with the primary")


async def _usable(db: Database) -> bool:
    return db.replica is not None and db.replica.usable


async def _not_usable(db: Database) -> bool:
    return not await _usable(db)


async def test_a_replica_that_is_down_is_skipped(stack: Stack, tmp_path: Path, table: str) -> None:
    # Nothing listens on this socket: the server starts and reads go to the primary.
    missing = f"postgresql://postgres@/postgres?host={tmp_path}&port=5432"
    db = await Database.connect(stack.dsn, min_size=1, max_size=2)
    await db.attach_replica(missing, max_lag=1.0)
    try:
        await asyncio.sleep(0.5)
        assert db.replica is not None and not db.replica.usable
        value = await _in_call(
            "reader", read_only=True, work=lambda: db.fetchval(f"SELECT count(*) FROM {table}")
        )
        assert value == 0
        assert db.replica.stats.served == 0
    finally:
        await db.close()
