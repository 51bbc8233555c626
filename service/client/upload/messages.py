"""Building the CreateInputs and CreateAnnotations messages of upload items, and their ids.

Everything here is deterministic: the same item gives the same bytes, so request ids and
generated annotation ids are the same on every run (see `service.client.uploads`).

A new input's boxes travel in its CreateInputs (`Boxed`): each box is one region of
`data.regions`, and the server stores each region as an annotation of its own named by
the region's id. The region id is the id the box's CreateAnnotations would have used,
so both routes give the same annotations (one per box, same ids).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasetd.v1 import annotation_pb2, data_pb2, input_pb2
from google.protobuf import json_format

from service.client.sources import AnnotationItem, UploadItem, hashed_id

AnnotationLike = AnnotationItem | annotation_pb2.Annotation


@dataclass(frozen=True)
class Boxed:
    """A new input uploaded with its boxes in one CreateInputs: `boxes` are (index in the
    upload's annotations, annotation) pairs, each one box and nothing else (`foldable`)."""

    item: UploadItem
    boxes: tuple[tuple[int, AnnotationLike], ...]


InputLike = UploadItem | input_pb2.Input | Boxed
InputItems = Iterable[UploadItem | input_pb2.Input]
AnnotationItems = Iterable[AnnotationLike]


class Unreadable(Exception):
    """An item's file cannot be read (or is not the text it claims): that item fails alone."""


def request_id_of(prefix: str, request: Any, token: bytes = b"") -> str:
    """A request id from the run token and the request's deterministic bytes
    (request_id still empty).

    Same run and content, same id: the server replays its recorded answer. Any
    change of content gives another id, so a changed request is never refused
    as a reused id; another run (token) never replays this one's answers.
    """
    digest = hashlib.sha256(token + request.SerializeToString(deterministic=True)).hexdigest()
    return prefix + digest


def describe(item: InputLike) -> tuple[str, str]:
    """The input id and the source an item is logged under."""
    if isinstance(item, Boxed):
        item = item.item
    if isinstance(item, input_pb2.Input):
        return item.id, item.title or item.id
    return item.input_id, item.source or item.path or item.url or item.input_id


def annotation_source(item: AnnotationLike) -> str:
    """Where an annotation came from; may be empty (each caller has its own fallback)."""
    return item.source if isinstance(item, AnnotationItem) else item.id


def item_json(item: InputLike | annotation_pb2.Annotation) -> dict[str, Any]:
    """The failure-log form of an item, from which `retry` rebuilds it. A boxed input's
    boxes are logged as annotation rows of their own (`service.client.uploads`)."""
    if isinstance(item, Boxed):
        item = item.item
    if isinstance(item, UploadItem):
        return item.to_json()
    message: dict[str, Any] = json_format.MessageToDict(item, preserving_proto_field_name=True)
    return {"proto": message}


def annotation_json(item: AnnotationLike) -> dict[str, Any] | None:
    """The log form of an annotation; None (not retryable) when it cannot even be built."""
    try:
        return item_json(annotation_message(item))
    except Exception:
        return None


def _concepts(ids: Iterable[str]) -> list[data_pb2.Concept]:
    # A label is both the concept's id and its name (a folder label: the folder's name),
    # so that readers of the stored concepts see a name without knowing this default.
    return [data_pb2.Concept(id=c, name=c, value=1.0) for c in ids]


def input_message(item: InputLike, dataset_id: str, with_media: bool = True) -> input_pb2.Input:
    """The Input to create; `with_media=False` leaves the bytes out (they are streamed)."""
    if isinstance(item, Boxed):
        message = input_message(item.item, dataset_id, with_media)
        message.data.regions.extend(box_region(a) for _, a in item.boxes)
        return message
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
        _set_content(media, item)
    message.data.concepts.extend(_concepts(item.concepts))
    if item.metadata:
        message.data.metadata.update(item.metadata)
    if item.geo is not None:
        message.data.geo.geo_point.longitude = item.geo[0]
        message.data.geo.geo_point.latitude = item.geo[1]
    for model_id, vector in (item.embeddings or {}).items():
        message.data.embeddings.append(data_pb2.Embedding(model_id=model_id, vector=vector))
    return message


def _set_content(media: Any, item: UploadItem) -> None:
    content = item.data
    if item.path is not None:
        try:
            content = Path(item.path).read_bytes()
        except OSError as error:
            raise Unreadable(f"cannot read {item.path}: {error.strerror or error}") from None
    assert content is not None
    if item.kind == "text":
        try:
            media.raw = content.decode("utf-8")
        except UnicodeDecodeError:
            raise Unreadable(f"{item.path or 'data'} is not valid UTF-8 text") from None
    else:
        media.base64 = content


def annotation_message(item: AnnotationLike) -> annotation_pb2.Annotation:
    """The Annotation to create; without an id, one derived from its content."""
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


def foldable(item: AnnotationLike) -> bool:
    """Whether an annotation is exactly one box, so that it can travel as a region of its
    input's CreateInputs and be stored as the same annotation."""
    if isinstance(item, AnnotationItem):
        return len(item.boxes) == 1 and not item.concepts and not item.metadata
    fields = [f.name for f, _ in item.data.ListFields()]
    return fields == ["regions"] and len(item.data.regions) == 1 and not item.annotation_info


def box_region(item: AnnotationLike) -> data_pb2.Region:
    """The region of a `foldable` annotation, named by the annotation's id."""
    message = annotation_message(item)
    region = data_pb2.Region()
    region.CopyFrom(message.data.regions[0])
    region.id = message.id
    return region
