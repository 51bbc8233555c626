"""Ontology messages <-> the domain's ontologies."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from datasetd.v1 import dataset_version_pb2, ontology_pb2

from service.domain.errors import Violations
from service.domain.models import (
    AttributeKind,
    Ontology,
    OntologyAttribute,
    OntologyClass,
    OntologyRef,
    Shape,
)
from service.domain.ontologies import UPDATABLE_FIELDS, OntologyFields
from service.wire.masks import given_fields
from service.wire.timestamps import set_times

_SHAPES: Final = {ontology_pb2.Shape.Value(shape.value): shape for shape in Shape}
_NUMBERS: Final = {shape: number for number, shape in _SHAPES.items()}


def _attribute(message: ontology_pb2.OntologyAttribute) -> OntologyAttribute:
    chosen = message.WhichOneof("kind")
    kind = AttributeKind(chosen) if chosen else AttributeKind.UNSPECIFIED
    number = message.number
    return OntologyAttribute(
        id=message.id,
        name=message.name,
        kind=kind,
        required=message.required,
        options=tuple(message.enum_type.options),
        minimum=number.min if number.HasField("min") else None,
        maximum=number.max if number.HasField("max") else None,
    )


def _class(message: ontology_pb2.OntologyClass) -> OntologyClass:
    return OntologyClass(
        id=message.id,
        display_name=message.display_name,
        color=message.color,
        # The boundary refuses numbers the proto does not declare.
        shapes=tuple(_SHAPES.get(number, Shape.UNSPECIFIED) for number in message.shapes),
        keypoint_names=tuple(message.keypoint_names),
        attributes=tuple(_attribute(a) for a in message.attributes),
        sub_classes=_classes(message.sub_classes),
        archived=message.archived,
    )


def _classes(messages: Iterable[ontology_pb2.OntologyClass]) -> tuple[OntologyClass, ...]:
    return tuple(_class(m) for m in messages)


def ontology_fields(
    message: ontology_pb2.Ontology, paths: Sequence[str] | None, violations: Violations
) -> OntologyFields:
    """The fields a caller gave: those in `paths`, or else those set to a non-default value
    (`paths` None: a create, where every field is given)."""
    given = given_fields(
        paths,
        UPDATABLE_FIELDS,
        {
            "description": bool(message.description),
            "classes": bool(message.classes),
            "input_classifications": bool(message.input_classifications),
        },
        violations,
    )
    return OntologyFields(
        description=message.description if "description" in given else None,
        classes=_classes(message.classes) if "classes" in given else None,
        input_classifications=(
            _classes(message.input_classifications) if "input_classifications" in given else None
        ),
    )


def _attribute_to_proto(attribute: OntologyAttribute) -> ontology_pb2.OntologyAttribute:
    message = ontology_pb2.OntologyAttribute(
        id=attribute.id, name=attribute.name, required=attribute.required
    )
    kind = attribute.kind
    if kind is AttributeKind.ENUM:
        message.enum_type.options.extend(attribute.options)
    elif kind is AttributeKind.BOOLEAN:
        message.boolean.SetInParent()
    elif kind is AttributeKind.TEXT:
        message.text.SetInParent()
    elif kind is AttributeKind.NUMBER:
        message.number.SetInParent()
        if attribute.minimum is not None:
            message.number.min = attribute.minimum
        if attribute.maximum is not None:
            message.number.max = attribute.maximum
    return message


def _class_to_proto(item: OntologyClass) -> ontology_pb2.OntologyClass:
    return ontology_pb2.OntologyClass(
        id=item.id,
        display_name=item.display_name,
        color=item.color,
        shapes=[_NUMBERS[shape] for shape in item.shapes],
        keypoint_names=item.keypoint_names,
        attributes=[_attribute_to_proto(a) for a in item.attributes],
        sub_classes=[_class_to_proto(c) for c in item.sub_classes],
        archived=item.archived,
        category_id=item.category_id,
    )


def ontology_to_proto(ontology: Ontology) -> ontology_pb2.Ontology:
    message = ontology_pb2.Ontology(
        id=ontology.id,
        app_id=ontology.app_id,
        description=ontology.description,
        classes=[_class_to_proto(c) for c in ontology.classes],
        input_classifications=[_class_to_proto(c) for c in ontology.input_classifications],
        revision=ontology.revision,
    )
    set_times(message, ontology.created_at, ontology.modified_at)
    return message


def version_ontology_to_proto(ontology: OntologyRef) -> dataset_version_pb2.VersionOntology:
    return dataset_version_pb2.VersionOntology(ontology_id=ontology.id, revision=ontology.revision)
