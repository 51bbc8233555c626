"""What an upload reports back: counts, failures, where the failure log is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.client.sources import Failure

INTERRUPTED = "interrupted; run the same command again to resume"


@dataclass
class UploadResult:
    """What an upload did. `total`, `created` and `failed` count inputs, except for
    `upload_annotations` where they count annotations; a COCO upload counts its
    boxes in the `annotations_*` fields. Batches replayed when resuming a run
    count as created."""

    dataset_id: str
    total: int = 0
    created: int = 0
    failed: int = 0
    already_exists: int = 0
    skipped: int = 0
    annotations_total: int = 0
    annotations_created: int = 0
    annotations_failed: int = 0
    elapsed: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    failure_log: Path | None = None
    interrupted: bool = False

    def summary(self) -> str:
        parts = [f"{self.created} of {self.total} created", f"{self.failed} failed"]
        if self.already_exists:
            parts.append(f"{self.already_exists} already existed")
        if self.skipped:
            parts.append(f"{self.skipped} skipped")
        if self.annotations_total:
            parts.append(
                f"annotations {self.annotations_created} of {self.annotations_total} created, "
                f"{self.annotations_failed} failed"
            )
        text = f"dataset {self.dataset_id}: " + ", ".join(parts) + f" in {self.elapsed:.1f} s"
        if self.failure_log is not None:
            text += f"; failures in {self.failure_log}"
        if self.interrupted:
            text += f" ({INTERRUPTED})"
        return text

    def table_rows(self) -> list[tuple[str, str]]:
        """The summary as (name, value) rows, for a table."""
        counts = [
            ("total", self.total),
            ("created", self.created),
            ("failed", self.failed),
            ("  of which already existed", self.already_exists),
            ("skipped", self.skipped),
        ]
        if self.annotations_total:
            counts += [
                ("annotations", self.annotations_total),
                ("annotations created", self.annotations_created),
                ("annotations failed", self.annotations_failed),
            ]
        rows = [(name, str(value)) for name, value in counts]
        rows.append(("elapsed", f"{self.elapsed:.1f} s"))
        if self.failure_log is not None:
            rows.append(("failure log", str(self.failure_log)))
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset_id": self.dataset_id,
            "total": self.total,
            "created": self.created,
            "failed": self.failed,
            "already_exists": self.already_exists,
            "skipped": self.skipped,
            "annotations_total": self.annotations_total,
            "annotations_created": self.annotations_created,
            "annotations_failed": self.annotations_failed,
            "elapsed_seconds": round(self.elapsed, 3),
            "failure_log": str(self.failure_log) if self.failure_log else None,
            "interrupted": self.interrupted,
            "failures": [
                {
                    "index": f.index,
                    "input_id": f.input_id,
                    "reason": f.reason,
                    "source": f.source,
                    "code": f.code,
                    "kind": f.kind,
                }
                for f in self.failures
            ],
        }
