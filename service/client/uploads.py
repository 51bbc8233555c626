"""The upload engine: batches, concurrency, exactly-once request ids, failure log, retry.

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
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import grpc
from datasetd.v1 import (
    annotation_pb2,
    annotation_service_pb2,
    data_pb2,
    dataset_service_pb2,
    errors_pb2,
    input_pb2,
    input_service_pb2,
)
from google.protobuf import json_format
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from service.client._rpc import Rpc
from service.client.errors import (
    AlreadyExistsError,
    DatasetdError,
    InvalidArgumentError,
)
from service.client.sources import (
    BAD_SOURCE,
    CALL_FAILED,
    CSV_FIELD_LIMIT,
    DUPLICATE,
    INVALID,
    NOT_ATTEMPTED,
    UNREADABLE,
    AnnotationItem,
    Box,
    Failure,
    Scan,
    UploadItem,
    hashed_id,
    read_coco,
    read_csv,
    scan_folder,
)

__all__ = [
    "AnnotationItem",
    "Box",
    "Failure",
    "UploadItem",
    "UploadResult",
    "default_failure_log",
    "request_id_of",
    "retry",
    "upload_annotations",
    "upload_coco",
    "upload_from_csv",
    "upload_from_folder",
    "upload_inputs",
]

MAX_BATCH = 128
# The server takes 128 MB per call; half of it leaves room for protobuf overhead.
BATCH_BYTES = 64 * 1024 * 1024
# Bigger files go through UploadInput one by one, streamed from disk.
STREAM_BYTES = 32 * 1024 * 1024
CHUNK_BYTES = 4 * 1024 * 1024
RETRIES = 4
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
LOG_COLUMNS = ("index", "input_id", "reason", "source", "code", "kind", "dataset_id", "item")
INTERRUPTED = "interrupted; run the same command again to resume"

InputLike = UploadItem | input_pb2.Input
AnnotationLike = AnnotationItem | annotation_pb2.Annotation
InputItems = Iterable[InputLike]
AnnotationItems = Iterable[AnnotationLike]


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


def default_failure_log(dataset_id: str) -> Path:
    """`./datasetd-failures-<dataset>.csv` in the current directory."""
    return Path.cwd() / f"datasetd-failures-{dataset_id}.csv"


def request_id_of(prefix: str, request: Any, token: bytes = b"") -> str:
    """A request id from the run token and the request's deterministic bytes
    (request_id still empty).

    Same run and content, same id: the server replays its recorded answer. Any
    change of content gives another id, so a changed request is never refused
    as a reused id; another run (token) never replays this one's answers.
    """
    digest = hashlib.sha256(token + request.SerializeToString(deterministic=True)).hexdigest()
    return prefix + digest


# --- building requests --------------------------------------------------------------------


class _Unreadable(Exception):
    pass


def _concepts(ids: Iterable[str]) -> list[data_pb2.Concept]:
    return [data_pb2.Concept(id=c, value=1.0) for c in ids]


def _describe(item: InputLike) -> tuple[str, str]:
    if isinstance(item, input_pb2.Input):
        return item.id, item.title or item.id
    return item.input_id, item.source or item.path or item.url or item.input_id


def _item_json(item: InputLike | annotation_pb2.Annotation) -> dict[str, Any]:
    if isinstance(item, UploadItem):
        return item.to_json()
    message: dict[str, Any] = json_format.MessageToDict(item, preserving_proto_field_name=True)
    return {"proto": message}


def _annotation_json(item: AnnotationLike) -> dict[str, Any] | None:
    """The log form of an annotation; None (not retryable) when it cannot even be built."""
    try:
        return _item_json(_annotation_message(item))
    except Exception:
        return None


def _size(item: InputLike) -> int:
    if isinstance(item, input_pb2.Input):
        return item.ByteSize()
    if item.path is not None:
        try:
            return os.stat(item.path).st_size
        except OSError:
            return 0  # reading fails later, in the worker, and is reported there
    if item.data is not None:
        return len(item.data)
    return len((item.text or item.url or "").encode())


def _input_message(item: InputLike, dataset_id: str, with_media: bool = True) -> input_pb2.Input:
    if isinstance(item, input_pb2.Input):
        message = input_pb2.Input()
        message.CopyFrom(item)
        if dataset_id not in message.dataset_ids:
            message.dataset_ids.append(dataset_id)
        return message
    message = input_pb2.Input(id=item.input_id, title=item.title, dataset_ids=[dataset_id])
    media = getattr(message.data, item.kind)
    media.SetInParent()
    if item.url is not None:
        media.url = item.url
    elif item.text is not None:
        media.raw = item.text
    elif with_media:
        content = item.data
        if item.path is not None:
            try:
                content = Path(item.path).read_bytes()
            except OSError as error:
                raise _Unreadable(f"cannot read {item.path}: {error.strerror or error}") from None
        assert content is not None
        if item.kind == "text":
            try:
                media.raw = content.decode("utf-8")
            except UnicodeDecodeError:
                raise _Unreadable(f"{item.path or 'data'} is not valid UTF-8 text") from None
        else:
            media.base64 = content
    message.data.concepts.extend(_concepts(item.concepts))
    if item.metadata:
        message.data.metadata.update(item.metadata)
    if item.geo is not None:
        message.data.geo.geo_point.longitude = item.geo[0]
        message.data.geo.geo_point.latitude = item.geo[1]
    return message


def _annotation_message(item: AnnotationLike) -> annotation_pb2.Annotation:
    if isinstance(item, annotation_pb2.Annotation):
        message = annotation_pb2.Annotation()
        message.CopyFrom(item)
    else:
        message = annotation_pb2.Annotation(id=item.annotation_id, input_id=item.input_id)
        message.data.concepts.extend(_concepts(item.concepts))
        for box in item.boxes:
            edges = data_pb2.BoundingBox(
                top_row=box.top, left_col=box.left, bottom_row=box.bottom, right_col=box.right
            )
            message.data.regions.append(
                data_pb2.Region(
                    region_info=data_pb2.RegionInfo(bounding_box=edges),
                    data=data_pb2.Data(concepts=_concepts([box.concept])),
                )
            )
        if item.metadata:
            message.data.metadata.update(item.metadata)
    if not message.id:
        # Derived from the content, so the same annotation uploaded twice is a duplicate.
        body = message.data.SerializeToString(deterministic=True).hex()
        message.id = hashed_id("ann-", message.input_id, body)
    return message


# --- units of work ------------------------------------------------------------------------

Outcome = tuple[int, Failure | None]  # (index, None when created)


@dataclass(frozen=True)
class _Unit:
    kind: Literal["inputs", "stream", "annotations"]
    entries: list[tuple[int, Any]]


def _plan_inputs(entries: Iterable[tuple[int, InputLike]], batch_size: int) -> Iterator[_Unit]:
    """Cuts batches by count and by bytes, lazily, so files are never all read at once."""
    batch: list[tuple[int, Any]] = []
    size = 0
    for index, item in entries:
        item_size = _size(item)
        if isinstance(item, UploadItem) and item.path is not None and item_size > STREAM_BYTES:
            yield _Unit("stream", [(index, item)])
            continue
        if batch and (len(batch) >= batch_size or size + item_size > BATCH_BYTES):
            yield _Unit("inputs", batch)
            batch, size = [], 0
        batch.append((index, item))
        size += item_size
    if batch:
        yield _Unit("inputs", batch)


def _plan_annotations(
    entries: Iterable[tuple[int, AnnotationLike]], batch_size: int
) -> Iterator[_Unit]:
    batch: list[tuple[int, Any]] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= batch_size:
            yield _Unit("annotations", batch)
            batch = []
    if batch:
        yield _Unit("annotations", batch)


def _call(rpc: Rpc, method: Callable[..., Any], make_request: Callable[[], Any]) -> Any:
    """Retries transient failures: safe because the request id makes each call idempotent."""
    for attempt in range(RETRIES):
        try:
            return rpc.call(method, make_request())
        except DatasetdError as error:
            if error.code not in TRANSIENT or attempt == RETRIES - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _error_text(error: DatasetdError) -> str:
    text = str(error)
    if error.field_violations:
        text += ": " + "; ".join(f"{k}: {v}" for k, v in error.field_violations.items())
    return text


def _result_failure(
    index: int,
    input_id: str,
    source: str,
    outcome: int,
    errors: Iterable[errors_pb2.FieldError],
    kind: Literal["input", "annotation"],
    item: dict[str, Any],
) -> Failure | None:
    if outcome == errors_pb2.ITEM_OUTCOME_CREATED:
        return None
    # Field paths name the position in the request, which means nothing to the reader.
    details = "; ".join(
        f"{e.field.split('.', 1)[1] if '.' in e.field else e.field}: {e.description}"
        for e in errors
    )
    if outcome == errors_pb2.ITEM_OUTCOME_DUPLICATE_ID:
        return Failure(
            index,
            input_id,
            "already exists" + (f" ({details})" if details else ""),
            source,
            DUPLICATE,
            kind,
            item,
        )
    if outcome == errors_pb2.ITEM_OUTCOME_NOT_ATTEMPTED:
        return Failure(
            index, input_id, "not attempted (atomic batch)", source, NOT_ATTEMPTED, kind, item
        )
    return Failure(index, input_id, details or "invalid", source, INVALID, kind, item)


def _run_inputs(rpc: Rpc, dataset_id: str, unit: _Unit, token: bytes) -> list[Outcome]:
    outcomes: list[Outcome] = []
    sent: list[tuple[int, InputLike]] = []
    request = input_service_pb2.CreateInputsRequest(app_id=rpc.app)
    for index, item in unit.entries:
        input_id, source = _describe(item)
        try:
            request.inputs.append(_input_message(item, dataset_id))
        except _Unreadable as error:
            failure = Failure(
                index, input_id, str(error), source, UNREADABLE, "input", _item_json(item)
            )
            outcomes.append((index, failure))
            continue
        sent.append((index, item))
    if not sent:
        return outcomes
    request.request_id = request_id_of("up-", request, token)
    try:
        response = _call(rpc, rpc.inputs.CreateInputs, lambda: request)
    except DatasetdError as error:
        for index, item in sent:
            input_id, source = _describe(item)
            outcomes.append(
                (
                    index,
                    Failure(
                        index,
                        input_id,
                        _error_text(error),
                        source,
                        CALL_FAILED,
                        "input",
                        _item_json(item),
                    ),
                )
            )
        return outcomes
    for result in response.results:
        index, item = sent[result.index]
        input_id, source = _describe(item)
        outcome = _result_failure(
            index,
            result.input_id or input_id,
            source,
            result.outcome,
            result.errors,
            "input",
            _item_json(item),
        )
        outcomes.append((index, outcome))
    return outcomes


def _run_stream(rpc: Rpc, dataset_id: str, unit: _Unit, token: bytes) -> list[Outcome]:
    [(index, item)] = unit.entries
    assert isinstance(item, UploadItem) and item.path is not None
    path = item.path
    try:
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
    except OSError as error:
        reason = f"cannot read {path}: {error.strerror or error}"
        return [
            (
                index,
                Failure(
                    index, item.input_id, reason, item.source, UNREADABLE, "input", item.to_json()
                ),
            )
        ]
    header = input_service_pb2.UploadInputHeader(
        app_id=rpc.app,
        input=_input_message(item, dataset_id, with_media=False),
        content_length=size,
        sha256=digest.hexdigest(),
    )
    # The header names the content's SHA-256, so its hash identifies the whole upload.
    header.request_id = request_id_of("st-", header, token)

    def messages() -> Iterator[input_service_pb2.UploadInputRequest]:
        yield input_service_pb2.UploadInputRequest(header=header)
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                yield input_service_pb2.UploadInputRequest(chunk=chunk)

    try:
        _call(rpc, rpc.inputs.UploadInput, messages)
    except DatasetdError as error:
        code = (
            DUPLICATE
            if isinstance(error, AlreadyExistsError)
            else INVALID
            if isinstance(error, InvalidArgumentError)
            else CALL_FAILED
        )
        reason = "already exists" if code == DUPLICATE else _error_text(error)
        return [
            (
                index,
                Failure(index, item.input_id, reason, item.source, code, "input", item.to_json()),
            )
        ]
    return [(index, None)]


def _run_annotations(rpc: Rpc, unit: _Unit, token: bytes) -> list[Outcome]:
    request = annotation_service_pb2.CreateAnnotationsRequest(app_id=rpc.app)
    for _, item in unit.entries:
        request.annotations.append(_annotation_message(item))
    request.request_id = request_id_of("an-", request, token)

    def failure_of(position: int) -> tuple[int, str, str, dict[str, Any]]:
        index, item = unit.entries[position]
        message = request.annotations[position]
        source = item.source if isinstance(item, AnnotationItem) else message.id
        return index, message.input_id, source or message.id, _item_json(message)

    try:
        response = _call(rpc, rpc.annotations.CreateAnnotations, lambda: request)
    except DatasetdError as error:
        outcomes: list[Outcome] = []
        for position in range(len(unit.entries)):
            index, input_id, source, item = failure_of(position)
            outcomes.append(
                (
                    index,
                    Failure(
                        index, input_id, _error_text(error), source, CALL_FAILED, "annotation", item
                    ),
                )
            )
        return outcomes
    outcomes = []
    for result in response.results:
        index, input_id, source, item = failure_of(result.index)
        outcomes.append(
            (
                index,
                _result_failure(
                    index, input_id, source, result.outcome, result.errors, "annotation", item
                ),
            )
        )
    return outcomes


# --- the engine ---------------------------------------------------------------------------


class _Engine:
    def __init__(self, rpc: Rpc, dataset_id: str, concurrency: int, show_progress: bool) -> None:
        if not 1 <= concurrency <= 64:
            raise ValueError(f"concurrency must be 1..64, got {concurrency}")
        self.rpc = rpc
        self.dataset_id = dataset_id
        self.concurrency = concurrency
        self.token = b""  # the run token, set before the first upload call
        self.console = Console(stderr=True)
        self.progress: Progress | None = None
        if show_progress:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("failed {task.fields[failed]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                console=self.console,
            )

    def run(self, label: str, units: Iterator[_Unit], total: int) -> Iterator[Outcome]:
        """Runs the units with at most `concurrency` calls in flight; yields outcomes.

        Units are planned (and files read) only as workers free up, so memory
        holds a few batches, not the whole source.
        """
        task: TaskID | None = None
        if self.progress is not None:
            task = self.progress.add_task(label, total=total, failed=0, rate="")
        started = time.monotonic()
        done = failed = 0
        pool = futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="datasetd-upload")
        pending: set[futures.Future[list[Outcome]]] = set()
        try:
            exhausted = False
            while True:
                while not exhausted and len(pending) < self.concurrency * 2:
                    unit = next(units, None)
                    if unit is None:
                        exhausted = True
                        break
                    pending.add(pool.submit(self._work, unit))
                if not pending:
                    break
                finished, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                for future in finished:
                    for outcome in future.result():
                        done += 1
                        failed += outcome[1] is not None
                        yield outcome
                if self.progress is not None and task is not None:
                    rate = done / max(time.monotonic() - started, 1e-6)
                    self.progress.update(task, completed=done, failed=failed, rate=f"{rate:.1f}/s")
        finally:
            # On Ctrl-C: nothing new starts; calls already running finish on their own.
            pool.shutdown(wait=not pending, cancel_futures=True)

    def _work(self, unit: _Unit) -> list[Outcome]:
        try:
            if unit.kind == "inputs":
                return _run_inputs(self.rpc, self.dataset_id, unit, self.token)
            if unit.kind == "stream":
                return _run_stream(self.rpc, self.dataset_id, unit, self.token)
            return _run_annotations(self.rpc, unit, self.token)
        except Exception as error:
            # A bug or a bad item (e.g. metadata the Struct cannot hold) fails this
            # unit's items only, instead of ending the upload and losing its results.
            return _unit_failures(unit, f"{type(error).__name__}: {error}")


def _unit_failures(unit: _Unit, reason: str) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for index, item in unit.entries:
        if unit.kind == "annotations":
            source = item.source if isinstance(item, AnnotationItem) else item.id
            failure = Failure(
                index,
                item.input_id,
                reason,
                source or item.input_id,
                CALL_FAILED,
                "annotation",
                _annotation_json(item),
            )
        else:
            input_id, source = _describe(item)
            failure = Failure(
                index, input_id, reason, source, CALL_FAILED, "input", _item_json(item)
            )
        outcomes.append((index, failure))
    return outcomes


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


def _check_options(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise ValueError(f"batch_size must be an integer 1..{MAX_BATCH}, got {batch_size!r}")
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be 1..{MAX_BATCH}, got {batch_size}")


def _check_log_folder(log_path: Path) -> None:
    """Fails before any request, rather than after the upload when the log is written."""
    folder = log_path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"the folder of the failure log {log_path} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"the folder of the failure log {log_path} is not writable")


def _state_path(log_path: Path, dataset_id: str, job: _Job) -> Path:
    """Where the run token of this exact upload (dataset and items, in order) is kept."""
    digest = hashlib.sha256(json.dumps(dataset_id).encode())
    for name, entries in (("inputs", job.inputs), ("annotations", job.annotations)):
        digest.update(b"\n" + name.encode())
        for _, item in entries:
            value = asdict(item) if isinstance(item, AnnotationItem) else _item_json(item)
            # JSON has no newline of its own, so the separator keeps items apart;
            # default=str: a value JSON cannot hold fails in the worker, not here.
            digest.update(b"\n" + json.dumps(value, sort_keys=True, default=str).encode())
    identity = digest.hexdigest()[:16]
    return log_path.parent / f".datasetd-upload-{dataset_id}-{identity}.state"


def _run_token(path: Path) -> bytes:
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


def _execute(
    rpc: Rpc,
    dataset_id: str,
    job: _Job,
    batch_size: int,
    concurrency: int,
    show_progress: bool,
    failure_log: str | Path | None,
) -> UploadResult:
    _check_options(batch_size)
    engine = _Engine(rpc, dataset_id, concurrency, show_progress)
    log_path = Path(failure_log) if failure_log is not None else default_failure_log(dataset_id)
    _check_log_folder(log_path)
    # A missing dataset would fail every input one by one; fail once, clearly.
    rpc.call(
        rpc.datasets.GetDataset,
        dataset_service_pb2.GetDatasetRequest(app_id=rpc.app, dataset_id=dataset_id),
    )
    state = _state_path(log_path, dataset_id, job)
    engine.token = _run_token(state)
    started = time.monotonic()
    result = UploadResult(dataset_id=dataset_id, skipped=job.skipped + len(job.carried))
    result.failures.extend(job.failures)
    result.failures.extend(job.carried)
    input_failures = [f for f in job.failures if f.kind == "input"]
    annotation_failures = [f for f in job.failures if f.kind == "annotation"]
    result.total = len(job.inputs) + len(input_failures)
    result.annotations_total = len(job.annotations) + len(annotation_failures)
    result.failed = len(input_failures)
    result.annotations_failed = len(annotation_failures)
    # Indexes with an outcome: the others are logged as not attempted if the run stops.
    done_inputs: set[int] = set()
    done_annotations: set[int] = set()
    stopped: BaseException | None = None
    try:
        if engine.progress is not None:
            engine.progress.start()
        _run_job(engine, job, batch_size, result, done_inputs, done_annotations)
    except BaseException as error:
        stopped = error
        result.interrupted = isinstance(error, KeyboardInterrupt)
        _add_not_attempted(result, job, done_inputs, done_annotations, error)
        raise
    finally:
        if engine.progress is not None:
            engine.progress.stop()
        _finish(result, job, log_path, started, engine)
        if result.interrupted:
            engine.console.print(INTERRUPTED)
        # Kept after an interruption, a crash or failures, so the same command
        # replays what was done; a clean run's token is never used again.
        if stopped is None and not result.failures:
            state.unlink(missing_ok=True)
    return result


def _run_job(
    engine: _Engine,
    job: _Job,
    batch_size: int,
    result: UploadResult,
    done_inputs: set[int],
    done_annotations: set[int],
) -> None:
    """Inputs first, then the annotations whose input did not fail; counts into `result`."""
    lost: dict[str, str] = {}
    if job.inputs:
        units = _plan_inputs(job.inputs, batch_size)
        for index, failure in engine.run("inputs", units, len(job.inputs)):
            done_inputs.add(index)
            if failure is None:
                result.created += 1
                continue
            result.failed += 1
            result.already_exists += failure.code == DUPLICATE
            result.failures.append(failure)
            if failure.code != DUPLICATE:
                lost[failure.input_id] = failure.reason
    if job.annotations:
        ready: list[tuple[int, AnnotationLike]] = []
        for index, item in job.annotations:
            if item.input_id in lost:
                done_annotations.add(index)
                result.annotations_failed += 1
                result.failures.append(
                    Failure(
                        index,
                        item.input_id,
                        f"input not uploaded: {lost[item.input_id]}",
                        item.source if isinstance(item, AnnotationItem) else item.id,
                        NOT_ATTEMPTED,
                        "annotation",
                        _annotation_json(item),
                    )
                )
            else:
                ready.append((index, item))
        units = _plan_annotations(ready, batch_size)
        for index, failure in engine.run("annotations", units, len(ready)):
            done_annotations.add(index)
            if failure is None:
                result.annotations_created += 1
            else:
                result.annotations_failed += 1
                result.failures.append(failure)


def _add_not_attempted(
    result: UploadResult,
    job: _Job,
    done_inputs: set[int],
    done_annotations: set[int],
    error: BaseException,
) -> None:
    """Logs every item without an outcome, with its item, so `retry` can upload it."""
    if isinstance(error, KeyboardInterrupt):
        reason = "not attempted: the upload was interrupted"
    else:
        reason = f"not attempted: the upload stopped ({type(error).__name__}: {error})"
    for index, item in job.inputs:
        if index not in done_inputs:
            input_id, source = _describe(item)
            result.failed += 1
            result.failures.append(
                Failure(index, input_id, reason, source, NOT_ATTEMPTED, "input", _item_json(item))
            )
    for index, annotation in job.annotations:
        if index not in done_annotations:
            source = annotation.source if isinstance(annotation, AnnotationItem) else annotation.id
            result.annotations_failed += 1
            result.failures.append(
                Failure(
                    index,
                    annotation.input_id,
                    reason,
                    source or annotation.input_id,
                    NOT_ATTEMPTED,
                    "annotation",
                    _annotation_json(annotation),
                )
            )


def _finish(
    result: UploadResult, job: _Job, log_path: Path, started: float, engine: _Engine
) -> None:
    if job.counts_annotations:
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
    if engine.progress is not None:
        engine.console.print(_summary_table(result))


def _summary_table(result: UploadResult) -> Table:
    table = Table(title=f"upload to {result.dataset_id}", show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    rows = [
        ("total", result.total),
        ("created", result.created),
        ("failed", result.failed),
        ("  of which already existed", result.already_exists),
        ("skipped", result.skipped),
    ]
    if result.annotations_total:
        rows += [
            ("annotations", result.annotations_total),
            ("annotations created", result.annotations_created),
            ("annotations failed", result.annotations_failed),
        ]
    for name, value in rows:
        table.add_row(name, str(value))
    table.add_row("elapsed", f"{result.elapsed:.1f} s")
    if result.failure_log is not None:
        table.add_row("failure log", str(result.failure_log))
    return table


# --- the failure log ----------------------------------------------------------------------


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


# --- public entry points ------------------------------------------------------------------


def upload_inputs(
    rpc: Rpc,
    dataset_id: str,
    inputs: InputItems,
    batch_size: int = 32,
    concurrency: int = 4,
    show_progress: bool = True,
    failure_log: str | Path | None = None,
) -> UploadResult:
    """Uploads `UploadItem`s (or ready-made `Input` messages) into the dataset.

    Failure indexes are 1-based positions in `inputs`.
    """
    _check_options(batch_size)
    job = _Job(inputs=list(enumerate(inputs, start=1)))
    return _execute(rpc, dataset_id, job, batch_size, concurrency, show_progress, failure_log)


def upload_from_folder(
    rpc: Rpc,
    dataset_id: str,
    folder: str | Path,
    input_type: str = "image",
    labels: bool = False,
    batch_size: int = 32,
    concurrency: int = 4,
    show_progress: bool = True,
    failure_log: str | Path | None = None,
) -> UploadResult:
    _check_options(batch_size)
    return _execute_scan(
        rpc,
        dataset_id,
        scan_folder(folder, input_type, labels),
        batch_size,
        concurrency,
        show_progress,
        failure_log,
    )


def upload_from_csv(
    rpc: Rpc,
    dataset_id: str,
    path: str | Path,
    input_type: str = "image",
    csv_type: str = "url",
    labels: bool = True,
    batch_size: int = 32,
    concurrency: int = 4,
    show_progress: bool = True,
    failure_log: str | Path | None = None,
) -> UploadResult:
    _check_options(batch_size)
    scan = read_csv(path, dataset_id, input_type, csv_type, labels)
    return _execute_scan(rpc, dataset_id, scan, batch_size, concurrency, show_progress, failure_log)


def upload_coco(
    rpc: Rpc,
    dataset_id: str,
    images_dir: str | Path,
    annotations_json: str | Path,
    labels: bool = True,
    batch_size: int = 32,
    concurrency: int = 4,
    show_progress: bool = True,
    failure_log: str | Path | None = None,
) -> UploadResult:
    """Images, then one box annotation per COCO annotation (`labels=False`: images only)."""
    _check_options(batch_size)
    scan = read_coco(images_dir, annotations_json, dataset_id, labels)
    return _execute_scan(rpc, dataset_id, scan, batch_size, concurrency, show_progress, failure_log)


def upload_annotations(
    rpc: Rpc,
    dataset_id: str,
    annotations: AnnotationItems,
    batch_size: int = 32,
    concurrency: int = 4,
    show_progress: bool = True,
    failure_log: str | Path | None = None,
) -> UploadResult:
    """Creates annotations on existing inputs; `total`/`created`/`failed` count annotations."""
    _check_options(batch_size)
    job = _Job(annotations=list(enumerate(annotations, start=1)), counts_annotations=True)
    return _execute(rpc, dataset_id, job, batch_size, concurrency, show_progress, failure_log)


def _execute_scan(
    rpc: Rpc,
    dataset_id: str,
    scan: Scan,
    batch_size: int,
    concurrency: int,
    show_progress: bool,
    failure_log: str | Path | None,
) -> UploadResult:
    job = _Job(
        inputs=list(zip(scan.indexes, scan.items, strict=True)),
        annotations=list(scan.annotations),
        failures=list(scan.failures),
        skipped=scan.skipped,
    )
    return _execute(rpc, dataset_id, job, batch_size, concurrency, show_progress, failure_log)


def _renamed(old_id: str, item: dict[str, Any]) -> str:
    """A new, deterministic id for an upload that asked for a duplicate."""
    suffix = hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest()[:12]
    return f"{old_id[: 64 - len(suffix) - 5]}-dup-{suffix}"


def retry(
    rpc: Rpc,
    failure_log: str | Path,
    allow_duplicates: bool = False,
    batch_size: int = 32,
    concurrency: int = 4,
    show_progress: bool = True,
    new_failure_log: str | Path | None = None,
) -> UploadResult:
    """Uploads again exactly the rows of a failure log, into the dataset it names.

    Rows whose id already existed are skipped (kept in the log) unless
    `allow_duplicates`, which uploads them under new ids (`<id>-dup-<hash>`).
    Rows whose source must be fixed first (bad CSV rows) are kept as they are.
    The log is rewritten with what still fails, and removed when nothing does.
    """
    _check_options(batch_size)
    dataset_id, rows = read_failure_log(failure_log)
    job = _Job()
    for row in rows:
        retryable = row.item is not None and row.code != BAD_SOURCE
        if retryable and row.code == DUPLICATE and not allow_duplicates:
            retryable = False
        if not retryable or row.item is None:
            job.carried.append(row)
            continue
        renamed = row.code == DUPLICATE
        if row.kind == "annotation":
            message = json_format.ParseDict(row.item["proto"], annotation_pb2.Annotation())
            if renamed:
                message.id = _renamed(message.id, row.item)
            job.annotations.append((row.index, message))
        elif "proto" in row.item:
            proto = json_format.ParseDict(row.item["proto"], input_pb2.Input())
            if renamed:
                proto.id = _renamed(proto.id, row.item)
            job.inputs.append((row.index, proto))
        else:
            item = UploadItem.from_json(row.item)
            if renamed:
                item = replace(item, input_id=_renamed(item.input_id, row.item))
            job.inputs.append((row.index, item))
    return _execute(
        rpc,
        dataset_id,
        job,
        batch_size,
        concurrency,
        show_progress,
        failure_log if new_failure_log is None else new_failure_log,
    )
