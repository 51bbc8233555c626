"""Annotation messages <-> the domain's annotations."""

from __future__ import annotations

from typing import Any

from datasetd.v1 import annotation_pb2, data_pb2, status_pb2

from service.domain.annotations import AnnotationDraft
from service.domain.models import Annotation
from service.wire.struct import message_to_json, parse_stored, struct_to_dict
from service.wire.timestamps import set_times

# The status of every annotation shown: only stored annotations are mapped to messages.
_STORED = status_pb2.Status(
    code=status_pb2.STATUS_CODE_ANNOTATION_SUCCESS, description="Annotation stored"
)


def data_to_json(message: data_pb2.Data) -> dict[str, Any]:
    """The JSON form annotation rules check and storage keeps (proto field names)."""
    return message_to_json(message)


def annotation_draft(message: annotation_pb2.Annotation) -> AnnotationDraft:
    return AnnotationDraft(
        id=message.id,
        input_id=message.input_id,
        data=data_to_json(message.data),
        annotation_info=(
            struct_to_dict(message.annotation_info) if message.HasField("annotation_info") else None
        ),
    )


def annotation_to_proto(annotation: Annotation) -> annotation_pb2.Annotation:
    message = annotation_pb2.Annotation(
        id=annotation.id,
        input_id=annotation.input_id,
        input_level=annotation.input_level,
        status=_STORED,
    )
    parse_stored(annotation.data, message.data)
    if annotation.annotation_info:
        message.annotation_info.update(annotation.annotation_info)
    set_times(message, annotation.created_at, annotation.modified_at)
    return message
