"""What one batch does: its CreateInputs, UploadInput or CreateAnnotations call, and the
outcome of each of its items."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from datasetd.v1 import annotation_service_pb2, errors_pb2, input_service_pb2

from service.client._rpc import Rpc
from service.client.errors import AlreadyExistsError, DatasetdError, InvalidArgumentError
from service.client.sources import (
    CALL_FAILED,
    DUPLICATE,
    INVALID,
    NOT_ATTEMPTED,
    UNREADABLE,
    Failure,
    UploadItem,
)
from service.client.upload.engine import REGIONS_REFUSED, Outcome, call
from service.client.upload.failures import annotation_failure, input_failure
from service.client.upload.messages import (
    Boxed,
    Unreadable,
    annotation_message,
    annotation_source,
    describe,
    input_message,
    item_json,
    request_id_of,
)
from service.client.upload.plan import Batch

CHUNK_BYTES = 4 * 1024 * 1024


def error_text(error: DatasetdError) -> str:
    text = str(error)
    if error.field_violations:
        text += ": " + "; ".join(f"{k}: {v}" for k, v in error.field_violations.items())
    return text


def result_failure(
    index: int,
    input_id: str,
    source: str,
    outcome: int,
    errors: Iterable[errors_pb2.FieldError],
    kind: Literal["input", "annotation"],
    item: dict[str, Any],
) -> Failure | None:
    """The failure an item's outcome in a batch response stands for; None: created."""
    if outcome == errors_pb2.ITEM_OUTCOME_CREATED:
        return None
    # Field paths name the position in the request, which means nothing to the reader.
    details = "; ".join(
        f"{e.field.split('.', 1)[1] if '.' in e.field else e.field}: {e.description}"
        for e in errors
    )
    if outcome == errors_pb2.ITEM_OUTCOME_DUPLICATE_ID:
        reason, code = "already exists" + (f" ({details})" if details else ""), DUPLICATE
    elif outcome == errors_pb2.ITEM_OUTCOME_NOT_ATTEMPTED:
        reason, code = "not attempted (atomic batch)", NOT_ATTEMPTED
    else:
        reason, code = details or "invalid", INVALID
    return Failure(index, input_id, reason, source, code, kind, item)


def batch_failures(batch: Batch, reason: str) -> list[Outcome]:
    """Every item of a batch failed for one reason (the call, or a bug, failed)."""
    if batch.kind == "annotations":
        return [
            (
                i,
                annotation_failure(
                    i, item, reason, annotation_source(item) or item.input_id, CALL_FAILED
                ),
            )
            for i, item in batch.entries
        ]
    return [(i, input_failure(i, item, reason, CALL_FAILED)) for i, item in batch.entries]


def run_inputs(rpc: Rpc, dataset_id: str, batch: Batch, token: bytes) -> list[Outcome]:
    outcomes: list[Outcome] = []
    sent: list[tuple[int, Any]] = []
    request = input_service_pb2.CreateInputsRequest(app_id=rpc.app)
    for index, item in batch.entries:
        try:
            request.inputs.append(input_message(item, dataset_id))
        except Unreadable as error:
            outcomes.append((index, input_failure(index, item, str(error), UNREADABLE)))
            continue
        sent.append((index, item))
    if not sent:
        return outcomes
    request.request_id = request_id_of("up-", request, token)
    try:
        response = call(rpc, rpc.inputs.CreateInputs, lambda: request)
    except DatasetdError as error:
        return outcomes + batch_failures(Batch("inputs", sent), error_text(error))
    for result in response.results:
        index, item = sent[result.index]
        input_id, source = describe(item)
        if isinstance(item, Boxed) and _regions_only(result):
            refused = Failure(index, input_id, "boxes refused", source, REGIONS_REFUSED)
            outcomes.append((index, refused))
            continue
        failure = result_failure(
            index,
            result.input_id or input_id,
            source,
            result.outcome,
            result.errors,
            "input",
            item_json(item),
        )
        outcomes.append((index, failure))
    return outcomes


def _regions_only(result: input_service_pb2.InputResult) -> bool:
    """Whether an input failed for its regions alone."""
    regions = f"inputs[{result.index}].data.regions"
    return (
        result.outcome != errors_pb2.ITEM_OUTCOME_CREATED
        and bool(result.errors)
        and all(e.field.startswith(regions) for e in result.errors)
    )


def run_stream(
    rpc: Rpc, dataset_id: str, batch: Batch, token: bytes, chunk_bytes: int = CHUNK_BYTES
) -> list[Outcome]:
    """One big file through UploadInput, read from disk chunk by chunk (twice: the header
    carries its SHA-256)."""
    [(index, item)] = batch.entries
    assert isinstance(item, UploadItem) and item.path is not None
    path = item.path

    def failed(reason: str, code: str) -> list[Outcome]:
        return [
            (
                index,
                Failure(index, item.input_id, reason, item.source, code, "input", item.to_json()),
            )
        ]

    try:
        digest, size = hashlib.sha256(), 0
        for chunk in _chunks(path, chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
    except OSError as error:
        return failed(f"cannot read {path}: {error.strerror or error}", UNREADABLE)
    header = input_service_pb2.UploadInputHeader(
        app_id=rpc.app,
        input=input_message(item, dataset_id, with_media=False),
        content_length=size,
        sha256=digest.hexdigest(),
    )
    # The header names the content's SHA-256, so its hash identifies the whole upload.
    header.request_id = request_id_of("st-", header, token)

    def messages() -> Iterator[input_service_pb2.UploadInputRequest]:
        yield input_service_pb2.UploadInputRequest(header=header)
        for chunk in _chunks(path, chunk_bytes):
            yield input_service_pb2.UploadInputRequest(chunk=chunk)

    try:
        call(rpc, rpc.inputs.UploadInput, messages)
    except AlreadyExistsError:
        return failed("already exists", DUPLICATE)
    except DatasetdError as error:
        code = INVALID if isinstance(error, InvalidArgumentError) else CALL_FAILED
        return failed(error_text(error), code)
    return [(index, None)]


def _chunks(path: str, size: int) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(size):
            yield chunk


def run_annotations(rpc: Rpc, batch: Batch, token: bytes) -> list[Outcome]:
    request = annotation_service_pb2.CreateAnnotationsRequest(app_id=rpc.app)
    for _, item in batch.entries:
        request.annotations.append(annotation_message(item))
    request.request_id = request_id_of("an-", request, token)

    def failure_of(position: int) -> tuple[int, str, str, dict[str, Any]]:
        index, item = batch.entries[position]
        message = request.annotations[position]
        source = annotation_source(item) or message.id
        return index, message.input_id, source, item_json(message)

    try:
        response = call(rpc, rpc.annotations.CreateAnnotations, lambda: request)
    except DatasetdError as error:
        reason = error_text(error)
        outcomes: list[Outcome] = []
        for position in range(len(batch.entries)):
            index, input_id, source, item = failure_of(position)
            failure = Failure(index, input_id, reason, source, CALL_FAILED, "annotation", item)
            outcomes.append((index, failure))
        return outcomes
    outcomes = []
    for result in response.results:
        index, input_id, source, item = failure_of(result.index)
        failure_or_none = result_failure(
            index, input_id, source, result.outcome, result.errors, "annotation", item
        )
        outcomes.append((index, failure_or_none))
    return outcomes
