"""Reads from a streaming replica (DATASETD_DATABASE_READ_URL), with read-your-writes.

What may go to the replica, in a call the transport marked read-only
(`CallRoute.read_only`) and outside a transaction: a `fetch`/`fetchrow`/`fetchval` whose
SQL does not write or lock (rerun on the primary if the replica fails it), the
connection a repository takes with `Database.connection()` for several reads, and the
snapshot of a `Database.read_transaction()`. Everything else (transactions, `execute`,
every statement of a call that may write, authentication, the job runner and maintenance,
which run outside any call) uses the primary.

When: the replica must have replayed the WAL up to the position the caller needs — the
primary's WAL insert position taken after the caller's last writing call in this process
(remembered per API key for `remember_seconds`), or the position the caller sends in
`x-datasetd-min-lsn` (see service/api/read_routing.py), whichever is later — and must not
lag the primary by more than `max_lag` seconds. A background task samples both positions
every SAMPLE_SECONDS. A replica that is unreachable, not a standby, lagging or failing a
query is skipped for the primary (logged once per change of reason). Only a call already
holding a replica connection when the replica dies fails, with UNAVAILABLE (retryable).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger(__name__)

T = TypeVar("T")

SAMPLE_SECONDS: Final = 0.1
# A sample older than this (the sampler is stuck or failing) says nothing about now.
STALE_SECONDS: Final = 2.0
SAMPLE_TIMEOUT_SECONDS: Final = 2.0
# Connecting to a replica that is gone must not hold up the sampler (or a read) for
# asyncpg's default of a minute.
CONNECT_TIMEOUT_SECONDS: Final = 2.0
MAX_REMEMBERED: Final = 100_000
# Past any real position: "read from the primary" while it is in the memory.
_UNKNOWN_POSITION: Final = 2**64 - 1

# After a write: the insert position, past the end of the call's commit record even when
# the commit is not flushed yet (synchronous_commit=off).
_WRITE_POSITION = "SELECT pg_current_wal_insert_lsn()"
# For the lag: what the primary has written out. Not the insert position, which points
# past the header of the next page when the last record ends on a page boundary, a
# position an idle replica never reports as replayed.
_PRIMARY_POSITION = "SELECT pg_current_wal_lsn()"
_REPLICA_POSITION = (
    "SELECT pg_is_in_recovery() AS standby, pg_last_wal_replay_lsn() AS replayed,"
    " pg_is_wal_replay_paused() AS paused"
)

# Statements a hot standby refuses ("cannot execute ... in a read-only transaction"):
# data changes, row locks, sequences, advisory locks. A false match only costs a read on
# the primary.
_WRITES = re.compile(
    r"\b(INSERT|UPDATE|DELETE|MERGE|TRUNCATE|LOCK|SHARE|NEXTVAL|SETVAL|PG_\w*ADVISORY\w*)\b",
    re.IGNORECASE,
)


@functools.lru_cache(maxsize=4096)
def writes(sql: str) -> bool:
    """Whether the statement may write or lock, which a hot standby refuses."""
    return _WRITES.search(sql) is not None


def parse_lsn(text: str) -> int:
    """A WAL position in PostgreSQL's text form (`16/B374D848`) as a number."""
    high, sep, low = text.strip().partition("/")
    if not sep or not 1 <= len(high) <= 8 or not 1 <= len(low) <= 8:
        raise ValueError(f"{text!r} is not a WAL position such as 16/B374D848")
    try:
        return int(high, 16) << 32 | int(low, 16)
    except ValueError:
        raise ValueError(f"{text!r} is not a WAL position such as 16/B374D848") from None


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class Fallback(enum.Enum):
    """The replica did not answer: run the statement on the primary."""

    PRIMARY = "primary"


FALLBACK: Final = Fallback.PRIMARY


@dataclass
class CallRoute:
    """What the transport knows about the current call, for routing its statements."""

    principal: str
    # The RPC only reads (service/api/read_routing.py), so its reads may use the replica.
    read_only: bool
    # The position the caller said it needs (x-datasetd-min-lsn); 0 for none.
    min_lsn: int = 0
    # The replica of the database the call used the primary of, in a call that may
    # write: its position is taken when the call ends.
    wrote_to: ReadReplica | None = None

    async def settle(self) -> int | None:
        """Once the call succeeded: the primary's WAL position after its writes, now
        remembered for the caller; None when nothing needs remembering."""
        if self.wrote_to is None:
            return None
        return await self.wrote_to.settle(self.principal)


ROUTE: contextvars.ContextVar[CallRoute | None] = contextvars.ContextVar(
    "datasetd_read_route", default=None
)

ReplicaConnection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"


@dataclass
class ReplicaStats:
    """How reads were served, for tests and logs."""

    served: int = 0
    # Reads the replica was chosen for but failed, rerun on the primary.
    failed_over: int = 0


class ReadReplica:
    """The read pool of a streaming replica and what is known of its position."""

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        primary: asyncpg.Pool[asyncpg.Record],
        *,
        max_lag: float,
        remember_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self._clock = clock
        self._primary = primary
        self.max_lag = max_lag
        # Past max_lag a write is on any replica we read from (the lag bound), so it
        # need not be remembered longer.
        self._remember_seconds = remember_seconds or max(60.0, max_lag + 5.0)
        self._remembered: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._replayed = 0
        self._sampled_at = float("-inf")
        # Primary positions the replica had not replayed yet when sampled, oldest first,
        # with when they were seen: the oldest one dates the replica's lag.
        self._ahead: deque[tuple[float, int]] = deque()
        self._usable = False
        self._why_not = ""
        self._task: asyncio.Task[None] | None = None
        self.stats = ReplicaStats()

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample_forever(), name="read-replica")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await asyncio.wait_for(self.pool.close(), CONNECT_TIMEOUT_SECONDS * 5)
        except TimeoutError:
            self.pool.terminate()

    # --- routing -------------------------------------------------------------------------

    def needed(self, route: CallRoute) -> int:
        """The position the replica must have replayed to serve `route`'s reads."""
        entry = self._remembered.get(route.principal)
        if entry is not None and entry[1] <= self._clock():
            del self._remembered[route.principal]
            entry = None
        return max(route.min_lsn, entry[0] if entry else 0)

    def serves(self, sql: str | None) -> bool:
        """Whether this statement (None: the statements a repository runs on a connection
        outside a transaction) of the current call may be read from the replica."""
        route = ROUTE.get()
        if route is None or not route.read_only or (sql is not None and writes(sql)):
            return False
        if not self._usable or self._clock() - self._sampled_at > STALE_SECONDS:
            return False
        return self._replayed >= self.needed(route)

    def on_primary(self) -> None:
        """The current call is using the primary: if it may write, its position is
        taken when it ends (read-only calls are not tracked)."""
        route = ROUTE.get()
        if route is not None and not route.read_only:
            route.wrote_to = self

    async def read(
        self, sql: str, query: Callable[[ReplicaConnection], Awaitable[T]]
    ) -> T | Fallback:
        """`query` on a replica connection when `sql` may go there, else FALLBACK; any
        failure on the replica is FALLBACK too, so the primary answers instead (a real
        error in the statement then comes from the primary)."""
        if not self.serves(sql):
            return FALLBACK
        try:
            async with self.pool.acquire(timeout=CONNECT_TIMEOUT_SECONDS) as conn:
                result = await query(conn)
        except asyncpg.ReadOnlySQLTransactionError as exc:
            # A bug: a read-only RPC's query writes and _WRITES did not catch it.
            log.error("a statement of a read-only call writes, rerun on the primary: %s", exc)
            self.stats.failed_over += 1
            return FALLBACK
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            # Unreachable, shutting down, a query cancelled by a recovery conflict, or a
            # table a migration just added that the replica has not replayed yet.
            if _unreachable(exc):
                self._unusable(type(exc).__name__, str(exc))
            else:
                log.debug("read replica failed a query, rerun on the primary: %r", exc)
            self.stats.failed_over += 1
            return FALLBACK
        self.stats.served += 1
        return result

    async def checkout(self) -> ReplicaConnection | None:
        """A replica connection for the current call's statements outside a transaction,
        or None (use the primary) when it may not or cannot be read from; give it back
        with `checkin`."""
        if not self.serves(None):
            return None
        try:
            conn: ReplicaConnection = await self.pool.acquire(timeout=CONNECT_TIMEOUT_SECONDS)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            if _unreachable(exc):
                self._unusable(type(exc).__name__, str(exc))
            self.stats.failed_over += 1
            return None
        self.stats.served += 1
        return conn

    async def checkin(self, conn: ReplicaConnection) -> None:
        try:
            await self.pool.release(conn)
        except Exception as exc:
            # A connection lost mid-call: the pool replaces it; the caller already failed.
            log.debug("releasing a read replica connection failed: %r", exc)

    def lost(self, exc: BaseException) -> None:
        """A replica connection went away during a call."""
        self._unusable(type(exc).__name__, str(exc))

    async def settle(self, principal: str) -> int | None:
        """The primary's WAL position, remembered as what `principal` needs next."""
        try:
            lsn = int(
                await asyncio.wait_for(
                    self._primary.fetchval(_WRITE_POSITION), SAMPLE_TIMEOUT_SECONDS
                )
            )
        except Exception as exc:
            # The write committed; only its position is unknown: the caller reads from
            # the primary for as long as a known position would be remembered.
            log.warning("could not read the primary's WAL position after a write: %r", exc)
            self.remember(principal, _UNKNOWN_POSITION)
            return None
        self.remember(principal, lsn)
        return lsn

    def remember(self, principal: str, lsn: int) -> None:
        previous = self._remembered.pop(principal, None)
        if previous is not None:
            lsn = max(lsn, previous[0])
        self._remembered[principal] = (lsn, self._clock() + self._remember_seconds)
        while len(self._remembered) > MAX_REMEMBERED:
            # The oldest entry: forgetting it early only risks a stale read for a caller
            # idle the longest, and the memory stays bounded.
            self._remembered.popitem(last=False)

    # --- sampling ------------------------------------------------------------------------

    @property
    def replayed(self) -> int:
        return self._replayed

    @property
    def usable(self) -> bool:
        return self._usable and self._clock() - self._sampled_at <= STALE_SECONDS

    def lag(self, now: float | None = None) -> float:
        """Seconds the oldest primary position the replica has not replayed has waited."""
        if not self._ahead:
            return 0.0
        return (self._clock() if now is None else now) - self._ahead[0][0]

    async def _sample_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.sample(), SAMPLE_TIMEOUT_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._unusable(type(exc).__name__, str(exc))
            await asyncio.sleep(SAMPLE_SECONDS)

    async def sample(self) -> None:
        """Takes the positions of the primary and then of the replica, in that order, so
        a primary position counts as replayed only once the replica is past it."""
        now = self._clock()
        primary = int(await self._primary.fetchval(_PRIMARY_POSITION))
        async with self.pool.acquire(timeout=CONNECT_TIMEOUT_SECONDS) as conn:
            row = await conn.fetchrow(_REPLICA_POSITION)
        assert row is not None
        if not row["standby"]:
            self._unusable(
                "not a standby",
                "the server at DATASETD_DATABASE_READ_URL is not in recovery "
                "(pg_is_in_recovery() is false), so nothing tells how fresh it is",
            )
            return
        replayed = int(row["replayed"])
        if not self._ahead or primary > self._ahead[-1][1]:
            self._ahead.append((now, primary))
        while self._ahead and self._ahead[0][1] <= replayed:
            self._ahead.popleft()
        self._replayed, self._sampled_at = replayed, self._clock()
        lag = self.lag(now)
        if lag > self.max_lag:
            paused = " (replay is paused)" if row["paused"] else ""
            self._unusable(
                "lagging", f"{lag:.1f}s behind the primary{paused}, over {self.max_lag:g}s"
            )
        elif not self._usable:
            self._usable = True
            log.info("reading from the read replica again (lag %.1fs)", lag)

    def _unusable(self, kind: str, detail: str) -> None:
        """Logged once per change of reason, not once per sample or read."""
        if self._usable or kind != self._why_not:
            log.warning("read replica not used, reads go to the primary: %s: %s", kind, detail)
        self._usable, self._why_not = False, kind


def _unreachable(exc: BaseException) -> bool:
    return isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.exceptions.AdminShutdownError
        | asyncpg.exceptions.CrashShutdownError
        | asyncpg.exceptions.CannotConnectNowError
        | asyncpg.InterfaceError
        | OSError
        | TimeoutError,
    )


def connect_kwargs() -> dict[str, Any]:
    """Pool options of the read pool beside those the primary's uses."""
    # No connection at creation: a replica that is down when the server starts must not
    # keep it from starting; the sampler finds it once it is up.
    return {"min_size": 0, "timeout": CONNECT_TIMEOUT_SECONDS}
