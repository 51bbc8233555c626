"""The failure log: one CSV row per item not uploaded, with the item itself so `retry` can
upload exactly those rows again."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from service.client.sources import CSV_FIELD_LIMIT, Failure
from service.client.upload.messages import (
    AnnotationLike,
    InputLike,
    annotation_json,
    describe,
    item_json,
)

LOG_COLUMNS = ("index", "input_id", "reason", "source", "code", "kind", "dataset_id", "item")


def input_failure(index: int, item: InputLike, reason: str, code: str) -> Failure:
    input_id, source = describe(item)
    return Failure(index, input_id, reason, source, code, "input", item_json(item))


def annotation_failure(
    index: int, item: AnnotationLike, reason: str, source: str, code: str
) -> Failure:
    return Failure(index, item.input_id, reason, source, code, "annotation", annotation_json(item))


def default_failure_log(dataset_id: str) -> Path:
    """`./datasetd-failures-<dataset>.csv` in the current directory."""
    return Path.cwd() / f"datasetd-failures-{dataset_id}.csv"


def check_log_folder(log_path: Path) -> None:
    """Fails before any request, rather than after the upload when the log is written."""
    folder = log_path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"the folder of the failure log {log_path} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"the folder of the failure log {log_path} is not writable")


def write_failure_log(path: Path, failures: list[Failure], dataset_id: str) -> Path | None:
    """Writes one CSV row per failure; with no failures, removes a stale log instead."""
    if not failures:
        path.unlink(missing_ok=True)
        return None
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(LOG_COLUMNS)
        for f in failures:
            # default=str: an item whose metadata JSON cannot hold (a datetime) failed
            # for that reason; the log keeps it, as text, rather than losing the run.
            item = json.dumps(f.item, sort_keys=True, default=str) if f.item is not None else ""
            writer.writerow(
                [f.index, f.input_id, f.reason, f.source, f.code, f.kind, dataset_id, item]
            )
    # Replaced in one step, so an interrupted write never leaves half a log.
    temporary.replace(path)
    return path


def read_failure_log(path: str | Path) -> tuple[str, list[Failure]]:
    """The dataset id and the failures recorded in a log written by an upload."""
    # An item's JSON (a raw text, hex data) easily exceeds the default 128 KB field limit.
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with Path(path).open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = set(LOG_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path} is not a datasetd failure log (no {', '.join(sorted(missing))})"
            )
        rows = list(reader)
    datasets = {row["dataset_id"] for row in rows}
    if len(datasets) > 1:
        raise ValueError(f"{path} mixes datasets: {', '.join(sorted(datasets))}")
    if not datasets:
        raise ValueError(f"{path} lists no failures")
    failures = [
        Failure(
            index=int(row["index"]),
            input_id=row["input_id"],
            reason=row["reason"],
            source=row["source"],
            code=row["code"],
            kind="annotation" if row["kind"] == "annotation" else "input",
            item=json.loads(row["item"]) if row["item"] else None,
        )
        for row in rows
    ]
    return datasets.pop(), failures
