"""How long-running client calls report progress, without the library drawing anything itself.

The library only calls a `Progress`: the command-line tool passes one that draws rich progress
bars; a script gets `TextProgress` (plain lines on stderr) by default, or `NO_PROGRESS` with
`show_progress=False`. Keeping the drawing out of the library keeps it free of any terminal
toolkit, so it can be embedded anywhere.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from typing import Literal, Protocol, TextIO

# What a task counts, so a display can choose its columns: upload items (with failures and a
# rate), downloaded files, downloaded bytes, or the percentage a server job reports.
Unit = Literal["uploads", "files", "bytes", "percent"]


class Progress(Protocol):
    """Receives the progress of one operation: tasks one after another, then a summary."""

    def start(self, description: str, total: float | None, unit: Unit) -> None:
        """A task begins (an upload runs its inputs, then its annotations); None: no total."""

    def advance(self, amount: float = 1, failed: int = 0) -> None:
        """`amount` more of the current task is done, `failed` of which failed.

        Thread-safe: downloads advance from their worker threads.
        """

    def finish(self) -> None:
        """The operation ended, successfully or not; may be called with no task started."""

    def report(self, title: str, rows: Sequence[tuple[str, str]]) -> None:
        """A closing summary: a two-column table of names and values."""


class NoProgress:
    """Reports nothing: `show_progress=False`."""

    def start(self, description: str, total: float | None, unit: Unit) -> None:
        pass

    def advance(self, amount: float = 1, failed: int = 0) -> None:
        pass

    def finish(self) -> None:
        pass

    def report(self, title: str, rows: Sequence[tuple[str, str]]) -> None:
        pass


NO_PROGRESS = NoProgress()


def reporter(show_progress: bool, progress: Progress | None) -> Progress:
    """The `Progress` a public call uses: none when not shown, else the caller's or plain text."""
    if not show_progress:
        return NO_PROGRESS
    return progress if progress is not None else TextProgress()


class TextProgress:
    """Plain text on stderr: each task's final state as one line, redrawn in place on a
    terminal; the summary as a boxed table."""

    REDRAW_SECONDS = 0.2

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()
        self._task: _Task | None = None
        self._drawn = 0.0

    def start(self, description: str, total: float | None, unit: Unit) -> None:
        with self._lock:
            self._end_task()
            self._task = _Task(description, total, unit, time.monotonic())

    def advance(self, amount: float = 1, failed: int = 0) -> None:
        with self._lock:
            if self._task is None:
                return
            self._task.done += amount
            self._task.failed += failed
            now = time.monotonic()
            if self.stream.isatty() and now - self._drawn >= self.REDRAW_SECONDS:
                self._drawn = now
                self.stream.write("\r" + self._task.line(now))
                self.stream.flush()

    def finish(self) -> None:
        with self._lock:
            self._end_task()

    def report(self, title: str, rows: Sequence[tuple[str, str]]) -> None:
        self.stream.write(text_table(title, rows, align_right=True) + "\n")
        self.stream.flush()

    def _end_task(self) -> None:
        if self._task is not None:
            prefix = "\r" if self.stream.isatty() else ""
            self.stream.write(prefix + self._task.line(time.monotonic()) + "\n")
            self.stream.flush()
            self._task = None


class _Task:
    def __init__(self, description: str, total: float | None, unit: Unit, started: float) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.started = started
        self.done = 0.0
        self.failed = 0

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-6)
        total = "?" if self.total is None else f"{self.total:g}"
        if self.unit == "percent":
            parts = [f"{self.done:3.0f}%"]
        elif self.unit == "bytes":
            mib = "?" if self.total is None else f"{self.total / 2**20:.1f}"
            parts = [f"{self.done / 2**20:.1f}/{mib} MiB"]
        else:
            parts = [f"{self.done:g}/{total}"]
        if self.unit == "uploads":
            parts += [f"failed {self.failed}", f"{self.done / elapsed:.1f}/s"]
        minutes, seconds = divmod(int(elapsed), 60)
        parts.append(f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}")
        return f"{self.description} " + " ".join(parts)


def text_table(title: str, rows: Sequence[tuple[str, str]], align_right: bool = False) -> str:
    """Rows in a box with the title centred above: readable without any terminal toolkit."""
    left = max((len(name) for name, _ in rows), default=0)
    right = max((len(value) for _, value in rows), default=0)
    width = left + right + 7
    lines = [title.center(width).rstrip() if len(title) < width else title]
    lines.append(f"┌{'─' * (left + 2)}┬{'─' * (right + 2)}┐")
    for name, value in rows:
        shown = value.rjust(right) if align_right else value.ljust(right)
        lines.append(f"│ {name.ljust(left)} │ {shown} │")
    lines.append(f"└{'─' * (left + 2)}┴{'─' * (right + 2)}┘")
    return "\n".join(lines)
