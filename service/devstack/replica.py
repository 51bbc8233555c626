"""An embedded streaming replica of an embedded PostgreSQL, for the read-replica tests.

`pg_basebackup -R` copies the running primary into a new data directory (on first start)
and writes `standby.signal` and `primary_conninfo`; the copy then runs as a hot standby
that replays the primary's WAL over a replication connection on the primary's unix
socket. initdb's `--auth trust` pg_hba.conf already lets local connections replicate and
PostgreSQL's defaults (`wal_level=replica`, `max_wal_senders=10`) already stream, so the
primary needs no change.

Synchronous, like the rest of service.devstack.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Mapping
from typing import Final

from service.devstack.postgres import EmbeddedPostgres, _read_postmaster_pid
from service.devstack.process import (
    POLL_INTERVAL,
    START_TIMEOUT,
    Account,
    Child,
    EmbeddedServerError,
    log_excerpt,
)

# postmaster.pid's status line: a hot standby that accepts read-only connections says
# "standby", never "ready".
_ACCEPTING: Final = frozenset({"ready", "standby"})
_BASEBACKUP_TIMEOUT: Final = 300.0


class EmbeddedReplica(EmbeddedPostgres):
    """A hot standby of the embedded PostgreSQL at `primary_dsn`, on a unix socket in its
    own data directory (so it never collides with the primary's socket)."""

    def __init__(
        self,
        data_dir: pathlib.Path,
        primary_dsn: str,
        *,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(data_dir, settings=settings)
        self._primary_dsn = primary_dsn

    def _initdb(self, install: pathlib.Path, account: Account | None) -> None:
        # Called by start() when the data directory holds no cluster yet: the copy of the
        # primary takes the place of initdb.
        argv = [
            str(install / "bin" / "pg_basebackup"),
            "--dbname",
            self._primary_dsn,
            "--pgdata",
            str(self._data_dir),
            "--write-recovery-conf",
            "--wal-method=stream",
            # The default (spread) checkpoint would make the copy wait for the primary's
            # next regular checkpoint, minutes away.
            "--checkpoint=fast",
            "--no-password",
        ]
        self._run_tool(argv, account, timeout=_BASEBACKUP_TIMEOUT)
        # The copy brings along the primary's logs, which would read as the replica's, and
        # the lock file of its socket, which would make the replica take the primary for
        # another postmaster on its own socket.
        for pattern in ("postgres.log*", ".s.PGSQL.*"):
            for leftover in self._data_dir.glob(pattern):
                leftover.unlink()

    def _wait_ready(self, child: Child, deadline: float) -> None:
        while True:
            lines = _read_postmaster_pid(self._data_dir) or []
            if (
                len(lines) >= 8
                and lines[0].strip() == str(child.pid)
                and lines[7].strip() in _ACCEPTING
            ):
                return
            if not child.alive():
                raise child.startup_failure()
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"the PostgreSQL replica did not accept connections within "
                    f"{START_TIMEOUT:.0f}s; {log_excerpt(self.log_path)}"
                )
            time.sleep(POLL_INTERVAL)
