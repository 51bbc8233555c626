"""Uploads of inputs and annotations: exactly-once, resumable, with a failure log and retry.

Exactly-once and resumable: every call carries a request id derived from a run
token and the bytes of its request (`up-`/`an-`/`st-` + SHA-256). The token
belongs to one upload *run*: it is kept in a state file next to the failure log
(`.datasetd-upload-<dataset>-<identity>.state`, the identity being a hash of the
dataset and every item of the job) until the run finishes cleanly. So running
the same command again after an interruption, a crash or failures replays the
batches the server already answered instead of creating anything twice, while a
new run after a clean finish gets a new token and really uploads: a replay
would report "created" for inputs that were deleted since. Inputs and
annotations also get deterministic ids, so a run with other request ids (or
other batches) finds what is already there as duplicates ("already exists").

Boxes of new inputs (a COCO upload, `upload_inputs(..., annotations=...)`, a retried log)
ride in the inputs' CreateInputs as regions, one call per batch and no CreateAnnotations:
the server stores each region as its own annotation, named by the id the box would have
had through CreateAnnotations (`upload.messages.Boxed`), in the transaction that creates
the input. An input refused for its boxes alone is sent again without them, and its
boxes through CreateAnnotations, so only the bad box fails, as it always did; boxes of an
input that exists already, or of a streamed file, go through CreateAnnotations too.

The parts live in `service.client.upload`; this module runs a job through them.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict, Unpack

from datasetd.v1 import annotation_pb2, dataset_service_pb2, input_pb2
from google.protobuf import json_format

from service.client._rpc import Rpc
from service.client.progress import Progress, reporter
from service.client.sources import (
    BAD_SOURCE,
    DUPLICATE,
    NOT_ATTEMPTED,
    AnnotationItem,
    Box,
    Failure,
    Scan,
    UploadItem,
    read_coco,
    read_csv,
    scan_folder,
)
from service.client.upload.calls import (
    CHUNK_BYTES,
    batch_failures,
    run_annotations,
    run_inputs,
    run_stream,
)
from service.client.upload.engine import REGIONS_REFUSED, Engine, Outcome
from service.client.upload.failures import (
    annotation_failure,
    check_log_folder,
    default_failure_log,
    input_failure,
    read_failure_log,
    write_failure_log,
)
from service.client.upload.messages import (
    AnnotationItems,
    AnnotationLike,
    Boxed,
    InputItems,
    InputLike,
    annotation_source,
    request_id_of,
)
from service.client.upload.plan import (
    MAX_BATCH,
    STREAM_BYTES,
    Batch,
    fold_boxes,
    plan_annotations,
    plan_inputs,
)
from service.client.upload.result import INTERRUPTED, UploadResult
from service.client.upload.state import run_token, state_path

__all__ = [
    "AnnotationItem",
    "AnnotationItems",
    "Box",
    "Failure",
    "InputItems",
    "RetryOptions",
    "UploadItem",
    "UploadOptions",
    "UploadResult",
    "default_failure_log",
    "read_failure_log",
    "request_id_of",
    "retry",
    "upload_annotations",
    "upload_coco",
    "upload_from_csv",
    "upload_from_folder",
    "upload_inputs",
    "write_failure_log",
]


class _RunOptions(TypedDict, total=False):
    batch_size: int  # items per call, 1..128 (32)
    concurrency: int  # calls in flight, 1..64 (4)
    show_progress: bool  # (True)
    progress: Progress | None  # where progress goes when shown (plain text on stderr)


class UploadOptions(_RunOptions, total=False):
    """The keyword options of every upload."""

    failure_log: str | Path | None  # (./datasetd-failures-<dataset>.csv)


class RetryOptions(_RunOptions, total=False):
    """The keyword options of `retry`."""

    new_failure_log: str | Path | None  # where what still fails goes (the log itself)


@dataclass(frozen=True)
class _Settings:
    batch_size: int = 32
    concurrency: int = 4
    show_progress: bool = True
    progress: Progress | None = None
    failure_log: str | Path | None = None

    def __post_init__(self) -> None:
        batch_size = self.batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise ValueError(f"batch_size must be an integer 1..{MAX_BATCH}, got {batch_size!r}")
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH}, got {batch_size}")


@dataclass
class _Job:
    """Everything one upload does: inputs first, then annotations on them."""

    inputs: list[tuple[int, InputLike]] = field(default_factory=list)
    annotations: list[tuple[int, AnnotationLike]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)  # known before uploading
    skipped: int = 0
    # Rows of a retried log that are not uploaded again: they stay in the log
    # and count as skipped, not as new failures.
    carried: list[Failure] = field(default_factory=list)
    counts_annotations: bool = False  # upload_annotations: the annotations are the items


@dataclass
class _Worker:
    """Runs one batch in a worker thread; `token` is the run token, set before any call."""

    rpc: Rpc
    dataset_id: str
    token: bytes = b""

    def __call__(self, batch: Batch) -> list[Outcome]:
        try:
            if batch.kind == "inputs":
                return run_inputs(self.rpc, self.dataset_id, batch, self.token)
            if batch.kind == "stream":
                return run_stream(self.rpc, self.dataset_id, batch, self.token, CHUNK_BYTES)
            return run_annotations(self.rpc, batch, self.token)
        except Exception as error:
            # A bug or a bad item (e.g. metadata the Struct cannot hold) fails this
            # batch's items only, instead of ending the upload and losing its results.
            return batch_failures(batch, f"{type(error).__name__}: {error}")


@dataclass
class _Run:
    """One run of a job: its result so far, and which items already have an outcome
    (the others are logged as not attempted if the run stops)."""

    job: _Job
    result: UploadResult
    done_inputs: set[int] = field(default_factory=set)
    done_annotations: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, dataset_id: str, job: _Job) -> _Run:
        result = UploadResult(dataset_id=dataset_id, skipped=job.skipped + len(job.carried))
        result.failures.extend(job.failures)
        result.failures.extend(job.carried)
        input_failures = [f for f in job.failures if f.kind == "input"]
        annotation_failures = [f for f in job.failures if f.kind == "annotation"]
        result.total = len(job.inputs) + len(input_failures)
        result.annotations_total = len(job.annotations) + len(annotation_failures)
        result.failed = len(input_failures)
        result.annotations_failed = len(annotation_failures)
        return cls(job, result)


def _execute(rpc: Rpc, dataset_id: str, job: _Job, settings: _Settings) -> UploadResult:
    progress = reporter(settings.show_progress, settings.progress)
    worker = _Worker(rpc, dataset_id)
    engine = Engine(worker, settings.concurrency, progress)
    log = settings.failure_log
    log_path = Path(log) if log is not None else default_failure_log(dataset_id)
    check_log_folder(log_path)
    # A missing dataset would fail every input one by one; fail once, clearly.
    rpc.call(
        rpc.datasets.GetDataset,
        dataset_service_pb2.GetDatasetRequest(app_id=rpc.app, dataset_id=dataset_id),
    )
    state = state_path(log_path, dataset_id, job.inputs, job.annotations)
    worker.token = run_token(state)
    started = time.monotonic()
    run = _Run.of(dataset_id, job)
    stopped: BaseException | None = None
    try:
        _run_job(engine, run, settings.batch_size)
    except BaseException as error:
        stopped = error
        run.result.interrupted = isinstance(error, KeyboardInterrupt)
        _add_not_attempted(run, error)
        raise
    finally:
        progress.finish()
        _finish(run, log_path, started, progress)
        if run.result.interrupted:
            print(INTERRUPTED, file=sys.stderr)
        # Kept after an interruption, a crash or failures, so the same command
        # replays what was done; a clean run's token is never used again.
        if stopped is None and not run.result.failures:
            state.unlink(missing_ok=True)
    return run.result


def _run_job(engine: Engine, run: _Run, batch_size: int) -> None:
    """Inputs first (with their boxes), then the annotations still to create on inputs
    that did not fail; counts into the result."""
    job, result = run.job, run.result
    inputs, _ = fold_boxes(job.inputs, job.annotations, STREAM_BYTES)
    boxed = {index: item for index, item in inputs if isinstance(item, Boxed)}
    # Annotations stored with their input need no call of their own.
    stored: set[int] = set()
    lost: dict[str, str] = {}

    def counted(index: int, failure: Failure | None, *, with_boxes: bool) -> None:
        run.done_inputs.add(index)
        if failure is None:
            result.created += 1
            if with_boxes and index in boxed:
                stored.update(i for i, _ in boxed[index].boxes)
            return
        result.failed += 1
        result.already_exists += failure.code == DUPLICATE
        result.failures.append(failure)
        if failure.code != DUPLICATE:
            lost[failure.input_id] = failure.reason

    unboxed: list[tuple[int, InputLike]] = []
    if inputs:
        units = plan_inputs(inputs, batch_size, STREAM_BYTES)
        for index, failure in engine.run("inputs", units, len(inputs)):
            if failure is not None and failure.code == REGIONS_REFUSED:
                unboxed.append((index, boxed[index].item))
            else:
                counted(index, failure, with_boxes=True)
    if unboxed:
        units = plan_inputs(unboxed, batch_size, STREAM_BYTES)
        for index, failure in engine.run("inputs without their boxes", units, len(unboxed)):
            counted(index, failure, with_boxes=False)
    run.done_annotations.update(stored)
    result.annotations_created += len(stored)
    if job.annotations:
        ready: list[tuple[int, AnnotationLike]] = []
        for index, item in job.annotations:
            if index in stored:
                continue
            if item.input_id not in lost:
                ready.append((index, item))
                continue
            run.done_annotations.add(index)
            result.annotations_failed += 1
            reason = f"input not uploaded: {lost[item.input_id]}"
            source = annotation_source(item)
            result.failures.append(annotation_failure(index, item, reason, source, NOT_ATTEMPTED))
        if ready:
            units = plan_annotations(ready, batch_size)
            for index, failure in engine.run("annotations", units, len(ready)):
                run.done_annotations.add(index)
                if failure is None:
                    result.annotations_created += 1
                else:
                    result.annotations_failed += 1
                    result.failures.append(failure)


def _add_not_attempted(run: _Run, error: BaseException) -> None:
    """Logs every item without an outcome, with its item, so `retry` can upload it."""
    if isinstance(error, KeyboardInterrupt):
        reason = "not attempted: the upload was interrupted"
    else:
        reason = f"not attempted: the upload stopped ({type(error).__name__}: {error})"
    result = run.result
    for index, item in run.job.inputs:
        if index not in run.done_inputs:
            result.failed += 1
            result.failures.append(input_failure(index, item, reason, NOT_ATTEMPTED))
    for index, annotation in run.job.annotations:
        if index not in run.done_annotations:
            source = annotation_source(annotation) or annotation.input_id
            result.annotations_failed += 1
            result.failures.append(
                annotation_failure(index, annotation, reason, source, NOT_ATTEMPTED)
            )


def _finish(run: _Run, log_path: Path, started: float, progress: Progress) -> None:
    result = run.result
    if run.job.counts_annotations:
        result.total, result.created, result.failed = (
            result.annotations_total,
            result.annotations_created,
            result.annotations_failed,
        )
        result.annotations_total = result.annotations_created = result.annotations_failed = 0
        result.already_exists = sum(f.code == DUPLICATE for f in result.failures)
    result.failures.sort(key=lambda f: (f.kind != "input", f.index))
    result.elapsed = time.monotonic() - started
    result.failure_log = write_failure_log(log_path, result.failures, result.dataset_id)
    progress.report(f"upload to {result.dataset_id}", result.table_rows())


# --- public entry points ------------------------------------------------------------------


def upload_inputs(
    rpc: Rpc,
    dataset_id: str,
    inputs: InputItems,
    annotations: AnnotationItems = (),
    **options: Unpack[UploadOptions],
) -> UploadResult:
    """Uploads `UploadItem`s (or ready-made `Input` messages) into the dataset, and
    `annotations` on them (boxes of new inputs in the same call, see the module).

    Failure indexes are 1-based positions in `inputs` (and in `annotations`).
    """
    settings = _Settings(**options)
    job = _Job(
        inputs=list(enumerate(inputs, start=1)),
        annotations=list(enumerate(annotations, start=1)),
    )
    return _execute(rpc, dataset_id, job, settings)


def upload_from_folder(
    rpc: Rpc,
    dataset_id: str,
    folder: str | Path,
    input_type: str = "image",
    labels: bool = False,
    **options: Unpack[UploadOptions],
) -> UploadResult:
    settings = _Settings(**options)
    return _execute_scan(rpc, dataset_id, scan_folder(folder, input_type, labels), settings)


def upload_from_csv(
    rpc: Rpc,
    dataset_id: str,
    path: str | Path,
    input_type: str = "image",
    csv_type: str = "url",
    labels: bool = True,
    **options: Unpack[UploadOptions],
) -> UploadResult:
    settings = _Settings(**options)
    scan = read_csv(path, dataset_id, input_type, csv_type, labels)
    return _execute_scan(rpc, dataset_id, scan, settings)


def upload_coco(
    rpc: Rpc,
    dataset_id: str,
    images_dir: str | Path,
    annotations_json: str | Path,
    labels: bool = True,
    **options: Unpack[UploadOptions],
) -> UploadResult:
    """Images with one box annotation per COCO annotation, in the images' CreateInputs
    (`labels=False`: images only)."""
    settings = _Settings(**options)
    scan = read_coco(images_dir, annotations_json, dataset_id, labels)
    return _execute_scan(rpc, dataset_id, scan, settings)


def upload_annotations(
    rpc: Rpc, dataset_id: str, annotations: AnnotationItems, **options: Unpack[UploadOptions]
) -> UploadResult:
    """Creates annotations on existing inputs; `total`/`created`/`failed` count annotations."""
    settings = _Settings(**options)
    job = _Job(annotations=list(enumerate(annotations, start=1)), counts_annotations=True)
    return _execute(rpc, dataset_id, job, settings)


def _execute_scan(rpc: Rpc, dataset_id: str, scan: Scan, settings: _Settings) -> UploadResult:
    job = _Job(
        inputs=list(zip(scan.indexes, scan.items, strict=True)),
        annotations=list(scan.annotations),
        failures=list(scan.failures),
        skipped=scan.skipped,
    )
    return _execute(rpc, dataset_id, job, settings)


def _renamed(old_id: str, item: dict[str, Any]) -> str:
    """A new, deterministic id for an upload that asked for a duplicate."""
    suffix = hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest()[:12]
    return f"{old_id[: 64 - len(suffix) - 5]}-dup-{suffix}"


def retry(
    rpc: Rpc,
    failure_log: str | Path,
    allow_duplicates: bool = False,
    **options: Unpack[RetryOptions],
) -> UploadResult:
    """Uploads again exactly the rows of a failure log, into the dataset it names.

    Rows whose id already existed are skipped (kept in the log) unless
    `allow_duplicates`, which uploads them under new ids (`<id>-dup-<hash>`).
    Rows whose source must be fixed first (bad CSV rows) are kept as they are.
    The log is rewritten with what still fails, and removed when nothing does.
    """
    new_log = options.pop("new_failure_log", None)
    run_options: _RunOptions = options
    settings = _Settings(**run_options, failure_log=failure_log if new_log is None else new_log)
    dataset_id, rows = read_failure_log(failure_log)
    job = _Job()
    for row in rows:
        retryable = row.item is not None and row.code != BAD_SOURCE
        if retryable and row.code == DUPLICATE and not allow_duplicates:
            retryable = False
        if not retryable or row.item is None:
            job.carried.append(row)
        elif row.kind == "annotation":
            job.annotations.append((row.index, _retried_annotation(row, row.item)))
        else:
            job.inputs.append((row.index, _retried_input(row, row.item)))
    return _execute(rpc, dataset_id, job, settings)


def _retried_annotation(row: Failure, item: dict[str, Any]) -> annotation_pb2.Annotation:
    message = json_format.ParseDict(item["proto"], annotation_pb2.Annotation())
    if row.code == DUPLICATE:
        message.id = _renamed(message.id, item)
    return message


def _retried_input(row: Failure, item: dict[str, Any]) -> InputLike:
    if "proto" in item:
        proto = json_format.ParseDict(item["proto"], input_pb2.Input())
        if row.code == DUPLICATE:
            proto.id = _renamed(proto.id, item)
        return proto
    upload = UploadItem.from_json(item)
    if row.code == DUPLICATE:
        upload = replace(upload, input_id=_renamed(upload.input_id, item))
    return upload
