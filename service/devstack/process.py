"""Supervising a server process for the development stack.

Each server is a child of this process, started in its own session so that a
Ctrl-C in the terminal reaches only us and we can shut servers down in order,
and armed with a parent-death signal so that it does not outlive us when we
are killed. A data directory is locked (flock) while a server uses it; a lock
that can be taken while a server still runs on that directory means its owner
was killed, and the server's start() stops the leftover before starting afresh.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import psutil

log = logging.getLogger(__name__)

START_TIMEOUT: Final = 60.0
POLL_INTERVAL: Final = 0.05
_LOG_TAIL_LINES: Final = 40
_PR_SET_PDEATHSIG: Final = 1

# Signals to send in turn, each with how long to wait for the exit after it.
TerminatePlan = Sequence[tuple[signal.Signals, float]]


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started or stopped."""


@dataclasses.dataclass(frozen=True)
class Account:
    """A system account to run a server as, when we are root."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        """subprocess arguments that drop to this account and none of root's groups."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


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


@dataclasses.dataclass(frozen=True)
class Command:
    """What to run for a Child, and where its output goes."""

    argv: Sequence[str]
    cwd: pathlib.Path
    env: Mapping[str, str]
    log_path: pathlib.Path
    death_signal: signal.Signals
    account: Account | None = None


class Child:
    """A server process, spawned by and reaped from a thread of its own.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not
    the process: spawned from a short-lived thread (EmbeddedStack's start
    threads, asyncio.to_thread's pool) the server would be killed as soon as
    that thread finished. A dedicated thread that lives exactly as long as the
    child keeps the signal meaningful and reaps the child without a zombie.
    """

    def __init__(self, name: str, command: Command) -> None:
        self.name = name
        self._command = command
        self._spawned = threading.Event()
        self._spawn_error: BaseException | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name=f"{name}-child", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._spawned.wait()
        if self._spawn_error is not None:
            raise EmbeddedServerError(
                f"could not start {self.name} ({self._command.argv[0]}): {self._spawn_error}"
            ) from self._spawn_error

    def _run(self) -> None:
        command = self._command
        try:
            with command.log_path.open("ab") as log_file:
                self._popen = subprocess.Popen(
                    list(command.argv),
                    cwd=command.cwd,
                    env=dict(command.env),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    # Only calls prctl and getppid, which take no locks, so it
                    # is safe after fork in a threaded process.
                    preexec_fn=_death_signal_preexec(command.death_signal),  # noqa: PLW1509
                    **(command.account.popen_kwargs() if command.account else {}),
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

    def terminate(self, plan: TerminatePlan) -> None:
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

    def startup_failure(self) -> EmbeddedServerError:
        """The error for a server that exited before it became ready."""
        return EmbeddedServerError(
            f"{self.name} exited with code {self.returncode} during startup; "
            f"{log_excerpt(self._command.log_path)}"
        )


def spawn(name: str, command: Command) -> Child:
    """Start a server, its previous log kept beside the new one."""
    _rotate_log(command.log_path)
    child = Child(name, command)
    child.start()
    return child


def gone(proc: Any) -> bool:
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
        remaining = [p for p in remaining if not gone(p)]
        if not remaining or time.monotonic() >= deadline:
            return remaining
        time.sleep(POLL_INTERVAL)


def terminate_leftover(proc: Any, plan: TerminatePlan, what: str) -> None:
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


def log_excerpt(path: pathlib.Path) -> str:
    """The end of a server's log, for the error that says why it failed."""
    return f"last lines of {path}:\n{_log_tail(path)}"


def write_private_file(path: pathlib.Path, text: str) -> None:
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


class DirLock:
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


class Server:
    """What every embedded server keeps: its data directory, the lock on it and
    its child process, all changed only under `_state_lock`."""

    def __init__(self, data_dir: pathlib.Path) -> None:
        # Absolute and symlink-free: the path is matched against the command
        # line and cwd of leftover servers.
        self._data_dir = pathlib.Path(data_dir).expanduser().resolve()
        self._state_lock = threading.Lock()
        self._child: Child | None = None
        self._dir_lock: DirLock | None = None

    @property
    def data_dir(self) -> pathlib.Path:
        return self._data_dir

    @property
    def pid(self) -> int | None:
        """The server's pid while running."""
        child = self._child
        return child.pid if child is not None and child.alive() else None

    def _lock_data_dir(self, what: str) -> DirLock:
        self._data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return DirLock(self._data_dir, what)

    def _release(
        self,
        plan: TerminatePlan,
        label: str,
        stopped: Callable[[], None] = lambda: None,
        cleanup: Callable[[], None] = lambda: None,
    ) -> None:
        """Stop our child (if any) with `plan` and run `stopped` once it is gone; then
        run `cleanup` and release the directory lock whatever happened. Called with
        `_state_lock` held."""
        child, dir_lock = self._child, self._dir_lock
        self._child = self._dir_lock = None
        try:
            if child is not None:
                started = time.monotonic()
                child.terminate(plan)
                stopped()
                log.info("%s stopped in %.2fs", label, time.monotonic() - started)
        finally:
            try:
                cleanup()
            finally:
                if dir_lock is not None:
                    dir_lock.release()
