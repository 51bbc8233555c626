"""Cutting an upload into batches: by count and by bytes, lazily, big files on their own."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from datasetd.v1 import input_pb2

from service.client.sources import UploadItem
from service.client.upload.messages import AnnotationLike, Boxed, InputLike, foldable

MAX_BATCH = 128
# The server takes 128 MB per call; half of it leaves room for protobuf overhead.
BATCH_BYTES = 64 * 1024 * 1024
# Bigger files go through UploadInput one by one, streamed from disk.
STREAM_BYTES = 32 * 1024 * 1024
# The server keeps at most 1,000 annotations per input, one of them its input-level one;
# an input with more boxes sends them all through CreateAnnotations, which says which fail.
MAX_BOXES = 999


@dataclass(frozen=True)
class Batch:
    """One call's worth of items, each with its index in the upload (for the failure log)."""

    kind: Literal["inputs", "stream", "annotations"]
    entries: list[tuple[int, Any]]


def size_of(item: InputLike) -> int:
    """The bytes an item adds to a request, estimated without reading its file."""
    if isinstance(item, Boxed):
        return size_of(item.item) + sum(64 for _ in item.boxes)
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


def plan_inputs(
    entries: Iterable[tuple[int, InputLike]], batch_size: int, stream_bytes: int = STREAM_BYTES
) -> Iterator[Batch]:
    """Cuts batches by count and by bytes, lazily, so files are never all read at once;
    files over `stream_bytes` get a batch of their own, to be streamed."""
    batch: list[tuple[int, Any]] = []
    size = 0
    for index, item in entries:
        item_size = size_of(item)
        if isinstance(item, UploadItem) and item.path is not None and item_size > stream_bytes:
            yield Batch("stream", [(index, item)])
            continue
        if batch and (len(batch) >= batch_size or size + item_size > BATCH_BYTES):
            yield Batch("inputs", batch)
            batch, size = [], 0
        batch.append((index, item))
        size += item_size
    if batch:
        yield Batch("inputs", batch)


def fold_boxes(
    inputs: Iterable[tuple[int, InputLike]],
    annotations: Iterable[tuple[int, AnnotationLike]],
    stream_bytes: int = STREAM_BYTES,
) -> tuple[list[tuple[int, InputLike]], set[int]]:
    """The inputs with the boxes of each new input folded into it (`Boxed`), and the
    indexes of the annotations folded. Streamed files keep theirs apart: an UploadInput
    header takes no regions (the media they are checked against come after it)."""
    boxes: dict[str, list[tuple[int, AnnotationLike]]] = {}
    for index, annotation in annotations:
        if foldable(annotation):
            boxes.setdefault(annotation.input_id, []).append((index, annotation))
    folded: set[int] = set()
    result: list[tuple[int, InputLike]] = []
    for index, item in inputs:
        if isinstance(item, UploadItem) and not (
            item.path is not None and size_of(item) > stream_bytes
        ):
            # pop: of two items with one id (the second fails), only the first has them.
            mine = boxes.pop(item.input_id, [])
            if 0 < len(mine) <= MAX_BOXES:
                folded.update(i for i, _ in mine)
                result.append((index, Boxed(item, tuple(mine))))
                continue
        result.append((index, item))
    return result, folded


def plan_annotations(
    entries: Iterable[tuple[int, AnnotationLike]], batch_size: int
) -> Iterator[Batch]:
    """Annotations are small: batches by count only."""
    batch: list[tuple[int, Any]] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= batch_size:
            yield Batch("annotations", batch)
            batch = []
    if batch:
        yield Batch("annotations", batch)
