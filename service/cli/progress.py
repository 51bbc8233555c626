"""The client library's progress, drawn as rich progress bars and tables on stderr.

The library only reports (`service.client.progress.Progress`); how it looks is the
command-line tool's business, so the library needs no terminal toolkit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as Bars
from rich.table import Table

from service.client.progress import Unit

# The columns of each kind of task; a new set of bars starts when the kind changes.
_COLUMNS: dict[Unit, Callable[[], list[ProgressColumn | str]]] = {
    "uploads": lambda: [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    ],
    "files": lambda: [
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    ],
    "bytes": lambda: [
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    ],
    "percent": lambda: [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    ],
}


class RichProgress:
    """A `Progress` for the CLI: tasks of one kind share one set of bars, which stays on
    screen when the operation finishes."""

    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self._lock = threading.Lock()
        self._bars: Bars | None = None
        self._unit: Unit | None = None
        self._task: TaskID | None = None
        self._started = 0.0
        self._done = 0.0
        self._failed = 0

    def start(self, description: str, total: float | None, unit: Unit) -> None:
        with self._lock:
            if self._bars is not None and self._unit != unit:
                self._stop()
            if self._bars is None:
                self._bars = Bars(*_COLUMNS[unit](), console=self.console)
                self._bars.start()
                self._unit = unit
            self._task = self._bars.add_task(description, total=total, failed=0, rate="")
            self._started, self._done, self._failed = time.monotonic(), 0.0, 0

    def advance(self, amount: float = 1, failed: int = 0) -> None:
        with self._lock:
            if self._bars is None or self._task is None:
                return
            self._done += amount
            self._failed += failed
            rate = self._done / max(time.monotonic() - self._started, 1e-6)
            self._bars.update(
                self._task, completed=self._done, failed=self._failed, rate=f"{rate:.1f}/s"
            )

    def finish(self) -> None:
        with self._lock:
            self._stop()

    def report(self, title: str, rows: Sequence[tuple[str, str]]) -> None:
        table = Table(title=title, show_header=False)
        table.add_column("what")
        table.add_column("count", justify="right")
        for name, value in rows:
            table.add_row(name, value)
        self.console.print(table)

    def _stop(self) -> None:
        if self._bars is not None:
            self._bars.stop()
        self._bars, self._unit, self._task = None, None, None
