"""The asyncpg pool, ambient transactions and migrations."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from pgvector.asyncpg import register_vector

from service.domain.errors import Unavailable
from service.observability import tracing
from service.storage.audit import PENDING_AUDIT, PendingAudit, write_pending
from service.storage.replica import FALLBACK, ReadReplica, ReplicaConnection, connect_kwargs

log = logging.getLogger(__name__)

T = TypeVar("T")

CLOSE_TIMEOUT_SECONDS = 10.0
# Any constant works; it only has to be the same for every replica.
MIGRATION_LOCK_ID = 0x64617461_7365_7464

# A pooled connection or a direct one: repositories use either the same way.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

_current: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "datasetd_db_connection", default=None
)
# The hooks of the innermost open transaction (or savepoint), run once the outermost commits.
_hooks: contextvars.ContextVar[list[Callable[[], None]] | None] = contextvars.ContextVar(
    "datasetd_db_after_commit", default=None
)


# PostgreSQL is unreachable, not the request wrong: SQLSTATE class 08 (connection
# exception, which asyncpg also raises for a connection lost mid-query) and the server
# shutting down (57P01), crashing (57P02) or still starting up, e.g. in crash recovery
# (57P03). The caller may retry once it is back.
_SERVER_GONE: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
)


def database_unavailable(exc: Exception) -> Unavailable:
    """The error for the caller (raised `from exc`, so the log keeps asyncpg's own)."""
    return Unavailable(
        f"the database is unavailable ({type(exc).__name__}); retry later",
        reason="DATABASE_UNAVAILABLE",
    )


def _lost(exc: BaseException, conn: Connection) -> bool:
    """Whether `exc`, raised while `conn` was in use, means PostgreSQL went away."""
    cause: BaseException | None = exc
    while cause is not None:
        # Rolling back on a lost connection raises InterfaceError ("the underlying
        # connection is closed") in the context of the error that lost it.
        if isinstance(cause, _SERVER_GONE):
            return True
        cause = cause.__context__
    # Using a connection that the server closed under us raises InterfaceError or a
    # socket error: the closed connection tells them from a bug.
    return isinstance(exc, asyncpg.InterfaceError | OSError) and _closed(conn)


def _closed(conn: Connection) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        # The pool takes a connection back (detaching our proxy of it) as soon as it closes.
        return True


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Pool release without asyncpg's default RESET ALL/UNLISTEN round trip.

    asyncpg still rolls back an open transaction on release; the session state
    the default reset clears is never left behind here (advisory locks are
    released in `finally`, and nothing uses LISTEN or cursors; the only SETs are the
    search settings every connection gets at init)."""


# recall@10 ≈ 0.99 at 512-d (pgvector's default of 40 gives ≈ 0.94); strict order keeps
# scanning past ef_search while filters drop rows, in distance order.
HNSW_EF_SEARCH = 100
HNSW_SESSION_SETTINGS = (
    f"SET hnsw.ef_search = {HNSW_EF_SEARCH}; SET hnsw.iterative_scan = strict_order"
)


async def _init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    # pgvector's binary codec: ~10x faster than text for bulk vectors (storage/embeddings.py).
    # The type exists once migration 0012 ran; connections opened before that are replaced
    # (Database.reload_types).
    if await conn.fetchval("SELECT to_regtype('public.vector') IS NOT NULL"):
        await register_vector(conn)
        # What every ranked search wants (storage/search.py): set once per connection, so
        # that a search needs no SET (nor the transaction SET LOCAL needs) per call.
        await conn.execute(HNSW_SESSION_SETTINGS)


@contextmanager
def _ambient(conn: Connection) -> Iterator[None]:
    """`conn` is the ambient transaction's connection for the block."""
    token = _current.set(conn)
    try:
        yield
    finally:
        _current.reset(token)


if TYPE_CHECKING:
    _Connection = asyncpg.Connection[asyncpg.Record]
else:
    _Connection = asyncpg.Connection


class TracedConnection(_Connection):
    """A pool connection whose statements get spans (tracing.connection_span), whichever
    repository runs them; while tracing is off, a call and a branch more per statement."""


# Statements that write inputs or annotations, the rows an input's content is made of.
_CONTENT_WRITE = re.compile(
    r"\b(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(?:inputs|annotations)\b", re.I
)
# Whether the outermost open transaction wrote such rows: it then refreshes the content of
# the inputs it made stale before it commits (Database.content_refresh).
_content_written: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "datasetd_db_content_written", default=None
)


@functools.lru_cache(maxsize=4096)
def _writes_content(query: str) -> bool:
    return _CONTENT_WRITE.search(query) is not None


def _traced(name: str) -> None:
    method = getattr(asyncpg.Connection, name)

    async def call(self: TracedConnection, query: str, *args: Any, **kwargs: Any) -> Any:
        written = _content_written.get()
        if written is not None and not written[0] and _writes_content(query):
            written[0] = True
        with tracing.connection_span(query):
            return await method(self, query, *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    # Set here, not written in the class: the stubs' overloads of each would need repeating.
    setattr(TracedConnection, name, call)


for _name in ("fetch", "fetchrow", "fetchval", "fetchmany", "execute", "executemany"):
    _traced(_name)


@asynccontextmanager
async def _on_standby(replica: ReadReplica, standby: ReplicaConnection) -> AsyncIterator[None]:
    """A block on a connection of the read replica, given back to its pool at the end. The
    replica going away, or the standby cancelling a read that conflicts with the WAL it
    replays (max_standby_streaming_delay), is UNAVAILABLE: a retry succeeds."""
    try:
        yield
    except Exception as exc:
        if _lost(exc, standby):
            replica.lost(exc)
            raise database_unavailable(exc) from exc
        if isinstance(exc, asyncpg.SerializationError):
            raise database_unavailable(exc) from exc
        raise
    finally:
        await replica.checkin(standby)


class Database:
    """Repositories ask it for a connection; inside `transaction()` they all get
    the same one, so use cases compose writes into one transaction without
    passing connections around."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        self.pool = pool
        # Set whenever PostgreSQL could not be reached, so that the health check need not
        # wait for its next round to notice an outage shorter than its interval.
        self.unreachable = asyncio.Event()
        # The streaming replica read-only calls read from (service/storage/replica.py).
        self.replica: ReadReplica | None = None
        # Refreshes the content of the inputs the transaction made stale, in it, just
        # before it commits (ContentKeeper.refresh_own, set by the composition root).
        self.content_refresh: Callable[[], Awaitable[None]] | None = None

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 2, max_size: int = 10) -> Database:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_keep_session,
            connection_class=TracedConnection,
        )
        return cls(pool)

    async def attach_replica(self, dsn: str, *, max_lag: float, max_size: int = 10) -> None:
        """Reads of read-only calls go to the streaming replica at `dsn` when it is fresh
        enough (see ReadReplica); it need not be up yet."""
        pool = await asyncpg.create_pool(
            dsn,
            max_size=max_size,
            init=_init_connection,
            reset=_keep_session,
            connection_class=TracedConnection,
            **connect_kwargs(),
        )
        self.replica = ReadReplica(pool, self.pool, max_lag=max_lag)
        self.replica.start()

    async def close(self) -> None:
        """Closes the pool once its connections are back; after CLOSE_TIMEOUT_SECONDS,
        closes the ones still in use (their transactions roll back) instead of waiting
        forever."""
        if self.replica is not None:
            await self.replica.close()
        try:
            await asyncio.wait_for(self.pool.close(), CLOSE_TIMEOUT_SECONDS)
        except TimeoutError:
            log.error(
                "database connections still in use after %.0fs; closing them",
                CLOSE_TIMEOUT_SECONDS,
            )
            self.pool.terminate()

    async def reload_types(self) -> None:
        """After migrating: connections opened before a migration created a type lack its
        codec (pgvector's); the pools replace them as they are next used."""
        await self.pool.expire_connections()
        if self.replica is not None:
            await self.replica.pool.expire_connections()

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        """A connection of the pool for the block. PostgreSQL being unreachable (when
        connecting, or the connection lost during the block) raises Unavailable instead of
        asyncpg's or the socket's own errors, which no layer above may know; the pool
        replaces a lost connection at its next acquire."""
        if self.replica is not None:
            self.replica.on_primary()
        acquired = False
        try:
            async with self.pool.acquire() as conn:
                acquired = True
                try:
                    yield conn
                except Exception as exc:
                    if _lost(exc, conn):
                        self.unreachable.set()
                        raise database_unavailable(exc) from exc
                    raise
        except Unavailable:
            raise
        except Exception as exc:
            # Before the block: connecting failed (refused, reset, timed out, "the
            # database system is starting up") or the pool is closing at shutdown.
            # After it: a lost connection could not be released.
            if isinstance(exc, _SERVER_GONE) or (
                not acquired and isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError)
            ):
                self.unreachable.set()
                raise database_unavailable(exc) from exc
            raise

    @asynccontextmanager
    async def connection(self, *, primary: bool = False) -> AsyncIterator[Connection]:
        """The ambient transaction's connection, else one of the pool; in a read-only call
        (unless `primary`), one of the replica's when it is fresh enough."""
        current = _current.get()
        if current is not None:
            # Failures reach the transaction() that owns the connection, which translates them.
            yield current
            return
        replica = None if primary else self.replica
        standby = None if replica is None else await replica.checkout()
        if replica is not None and standby is not None:
            async with _on_standby(replica, standby):
                yield standby
            return
        async with self.acquire() as conn:
            yield conn

    # One statement on the ambient connection: a repository method that runs a single
    # statement needs neither to hold a connection nor to know whether it is in a transaction.
    # Outside a transaction, a read-only call's reads may come from the replica.

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        with tracing.db_span(sql):
            if self.replica is not None and _current.get() is None:
                rows = await self.replica.read(sql, lambda conn: conn.fetch(sql, *args))
                if rows is not FALLBACK:
                    return rows
            async with self.connection(primary=True) as conn:
                return await conn.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        with tracing.db_span(sql):
            if self.replica is not None and _current.get() is None:
                row = await self.replica.read(sql, lambda conn: conn.fetchrow(sql, *args))
                if row is not FALLBACK:
                    return row
            async with self.connection(primary=True) as conn:
                return await conn.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        with tracing.db_span(sql):
            if self.replica is not None and _current.get() is None:
                value = await self.replica.read(sql, lambda conn: conn.fetchval(sql, *args))
                if value is not FALLBACK:
                    return value
            async with self.connection(primary=True) as conn:
                return await conn.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> str:
        with tracing.db_span(sql):
            async with self.connection(primary=True) as conn:
                return await conn.execute(sql, *args)

    async def affected(self, sql: str, *args: Any) -> int:
        """The number of rows a DELETE, UPDATE or INSERT statement touched."""
        return rows_affected(await self.execute(sql, *args))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        current = _current.get()
        hooks: list[Callable[[], None]] = []
        hooks_token = _hooks.set(hooks)
        try:
            if current is not None:
                # Nested: a savepoint, so an inner failure does not poison the outer work.
                async with tracing.db_transaction_span(True), current.transaction():
                    yield
            else:
                written: PendingAudit | None = None
                content_token = _content_written.set([False])
                try:
                    async with (
                        tracing.db_transaction_span(False),
                        self.acquire() as conn,
                        conn.transaction(),
                    ):
                        with _ambient(conn):
                            yield
                            if self.content_refresh is not None and _content_written.get() == [
                                True
                            ]:
                                # Inputs this transaction changed (or whose annotations it
                                # changed) commit with their content up to date.
                                await self.content_refresh()
                            # The audit event of the call's mutation commits with it.
                            if PENDING_AUDIT.get() is not None:
                                written = await write_pending(conn)
                except BaseException:
                    if written is not None:
                        # COMMIT failed: the event was never stored; a later transaction
                        # of the call (or the call's own record) writes it.
                        written.event_id = None
                    raise
                finally:
                    _content_written.reset(content_token)
        finally:
            _hooks.reset(hooks_token)
        # Reached only on commit (or a released savepoint): a rollback drops the hooks.
        outer = _hooks.get()
        if current is not None and outer is not None:
            outer.extend(hooks)
        else:
            for hook in hooks:
                hook()

    @asynccontextmanager
    async def read_transaction(self) -> AsyncIterator[None]:
        """A snapshot for reads only: in a read-only call, on the replica when it may serve
        the call (as `connection()` decides), else on the primary. Inside a transaction
        already open, that one (a write's reads must see its own writes)."""
        if _current.get() is not None:
            yield
            return
        replica = self.replica
        standby = None if replica is None else await replica.checkout()
        if replica is None or standby is None:
            # Read-only here too, so that a write or row lock a use case slips into its
            # reads fails in every test, not only once a replica refuses it.
            async with (
                tracing.db_transaction_span(False),
                self.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                with _ambient(conn):
                    yield
            return
        # Repeatable read: the reads of the block see one point of the replay, not each
        # statement a later one.
        async with (
            _on_standby(replica, standby),
            tracing.db_transaction_span(False),
            standby.transaction(isolation="repeatable_read", readonly=True),
        ):
            with _ambient(standby):
                yield

    def after_commit(self, hook: Callable[[], None]) -> None:
        """Runs `hook` once the current transaction commits (at once outside one), so that
        work the transaction makes visible (a queued job) is announced only when it is."""
        hooks = _hooks.get()
        if hooks is None:
            hook()
        else:
            hooks.append(hook)

    @asynccontextmanager
    async def exclusive(self, lock_id: int) -> AsyncIterator[bool]:
        """Yields whether this process got the session lock (held for the block)."""
        async with self.acquire() as conn:
            got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_id))
            try:
                yield got
            finally:
                if got:
                    await conn.execute("SELECT pg_advisory_unlock($1)", lock_id)

    async def ping(self) -> None:
        await self.fetchval("SELECT 1")


class Repository:
    """The shared constructor of the PostgreSQL repositories, and the row mappings
    every one of them makes: one row or none, a list, a page keyed by `seq`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def _one(self, convert: Callable[[asyncpg.Record], T], sql: str, *args: Any) -> T | None:
        row = await self._db.fetchrow(sql, *args)
        return None if row is None else convert(row)

    async def _all(self, convert: Callable[[asyncpg.Record], T], sql: str, *args: Any) -> list[T]:
        return [convert(row) for row in await self._db.fetch(sql, *args)]

    async def _page(
        self, convert: Callable[[asyncpg.Record], T], sql: str, *args: Any
    ) -> list[tuple[int, T]]:
        """Rows of a keyset page, each with the `seq` the next page starts after."""
        return [(row["seq"], convert(row)) for row in await self._db.fetch(sql, *args)]


def _migration_files() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files("service.storage.migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


async def migrate(conn: Connection) -> list[int]:
    """Applies pending migrations; returns the versions applied.

    The advisory lock makes servers starting together take turns: the second
    finds the work done. Each migration commits with its version row.
    """
    applied: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in _migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            log.info("applied migration %04d_%s", version, name)
            applied.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied


def rows_affected(status: str) -> int:
    """The row count of a command status such as "DELETE 3" or "INSERT 0 5"."""
    return int(status.rsplit(maxsplit=1)[-1])


async def server_secret(db: Database, name: str, size: int = 32) -> bytes:
    """A random secret created once per installation and shared by all replicas."""
    import secrets

    value: Any = await db.fetchval(
        "INSERT INTO server_secrets (name, value) VALUES ($1, $2)"
        " ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING value",
        name,
        secrets.token_bytes(size),
    )
    return bytes(value)
