"""The run token of an unfinished upload, kept next to its failure log so a re-run resumes.

The state file is named after a hash of the dataset and every item of the job, so only the
very same upload finds it; it is removed when a run finishes cleanly (`service.client.uploads`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from service.client.sources import AnnotationItem
from service.client.upload.messages import item_json


def state_path(
    log_path: Path,
    dataset_id: str,
    inputs: Iterable[tuple[int, Any]],
    annotations: Iterable[tuple[int, Any]],
) -> Path:
    """Where the run token of this exact upload (dataset and items, in order) is kept."""
    digest = hashlib.sha256(json.dumps(dataset_id).encode())
    for name, entries in (("inputs", inputs), ("annotations", annotations)):
        digest.update(b"\n" + name.encode())
        for _, item in entries:
            value = asdict(item) if isinstance(item, AnnotationItem) else item_json(item)
            # JSON has no newline of its own, so the separator keeps items apart;
            # default=str: a value JSON cannot hold fails in the worker, not here.
            digest.update(b"\n" + json.dumps(value, sort_keys=True, default=str).encode())
    identity = digest.hexdigest()[:16]
    return log_path.parent / f".datasetd-upload-{dataset_id}-{identity}.state"


def run_token(path: Path) -> bytes:
    """The token of an unfinished run of this upload, or a new one, saved before any call."""
    try:
        token = path.read_bytes().strip()
    except FileNotFoundError:
        token = b""
    if len(token) != 32:
        token = secrets.token_hex(16).encode()
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(token + b"\n")
        # Replaced in one step: a run killed here leaves either no token or a whole one.
        os.replace(temporary, path)
    return token
