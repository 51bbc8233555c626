"""How the command-line tool shows results, errors and confirmation prompts."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from service.client.errors import DatasetdError
from service.client.exports import DownloadResult


def plain(value: Any) -> Any:
    """JSON-ready form of client results (dataclasses, datetimes, paths)."""
    if hasattr(value, "to_dict"):
        return plain(value.to_dict())
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (Path, Enum)):
        return str(value)
    return value


class Output:
    """Tables for people, JSON (one document per command) for scripts."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.console = Console()
        self.errors = Console(stderr=True)

    def document(self, value: Any) -> None:
        print(json.dumps(plain(value), indent=2, sort_keys=True, ensure_ascii=False))

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str) -> None:
        """Rows as a table, or as a JSON list with every field of each row."""
        if self.as_json:
            self.document(list(rows))
            return
        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(_cell(row.get(column)) for column in columns))
        self.console.print(table)
        if not rows:
            self.console.print("(none)")

    def record(self, value: Any, title: str) -> None:
        """One object as a two-column table, or as a JSON object."""
        if self.as_json:
            self.document(value)
            return
        data = plain(value)
        table = Table(title=title, title_justify="left", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")
        for key, item in data.items():
            table.add_row(key, _cell(item))
        self.console.print(table)

    def outcome(self, document: Any, message: str) -> None:
        """What a change did: `document` for scripts, `message` for people."""
        if self.as_json:
            self.document(document)
        else:
            self.text(message)

    def text(self, message: str) -> None:
        """Progress and notes for people: stderr in JSON mode, so stdout stays parseable."""
        (self.errors if self.as_json else self.console).print(message, highlight=False)

    def error(self, error: DatasetdError) -> None:
        if self.as_json:
            detail = {
                "code": error.code.name,
                "message": error.message,
                "reason": error.reason,
                "field_violations": error.field_violations,
                "request_id": error.request_id,
            }
            print(json.dumps({"error": detail}, sort_keys=True), file=sys.stderr)
            return
        lines = [f"error: {error.code.name}: {error.message}"]
        if error.reason:
            lines.append(f"  reason: {error.reason}")
        lines.extend(f"  {field}: {text}" for field, text in error.field_violations.items())
        if error.request_id:
            lines.append(f"  request id: {error.request_id}")
        self.errors.print("\n".join(lines), highlight=False, markup=False)


def _cell(value: Any) -> str:
    value = plain(value)
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False) if value else "-"
    return str(value)


class ConfirmationRefused(Exception):
    """The user said no, or there was nobody to ask."""


def confirm(output: Output, what: str, assume_yes: bool) -> None:
    """Asks before a destructive command; without a terminal only `--yes` proceeds."""
    output.text(what)
    if assume_yes:
        return
    if not sys.stdin.isatty():
        raise ConfirmationRefused(
            "refusing to continue without confirmation: no terminal to ask on; pass --yes"
        )
    answer = input("Continue? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise ConfirmationRefused("cancelled; nothing was changed")


def confirm_typed(output: Output, what: str, expected: str, assume_yes: bool) -> None:
    """Asks the user to type `expected` (a dataset id) before an irreversible or wide change:
    a reflexive "y" is not enough there. Without a terminal only `--yes` proceeds."""
    output.text(what)
    if assume_yes:
        return
    if not sys.stdin.isatty():
        raise ConfirmationRefused(
            "refusing to continue without confirmation: no terminal to type "
            f"{expected!r} on; pass --yes"
        )
    answer = input(f"Type {expected} to confirm: ").strip()
    if answer != expected:
        raise ConfirmationRefused(f"cancelled: {answer!r} is not {expected!r}; nothing was changed")


def download_summary(result: DownloadResult) -> str:
    """What `download` wrote, as a table 100 columns wide at most."""
    table = Table(title=result.summary_title(), show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for name, value in result.summary_rows():
        table.add_row(name, value)
    buffer = io.StringIO()
    Console(file=buffer, width=100, color_system=None).print(table)
    return buffer.getvalue().rstrip("\n")
