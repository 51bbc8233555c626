"""Synchronous OntologyService API: ontologies (label schemas) as protobuf-JSON dicts.

An ontology goes in and comes out in the protobuf JSON shape of `datasetd.v1.Ontology`
(`{"id": "pets", "classes": [{"id": "cat", "shapes": ["SHAPE_BOUNDING_BOX"]}]}`), the same
JSON that `datasetd ontologies create --file` reads and grpcurl sends, so a schema kept in
a file needs no translation. The server checks it and names every problem by its path.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from datasetd.v1 import ontology_pb2, ontology_service_pb2_grpc
from datasetd.v1 import ontology_service_pb2 as api
from google.protobuf import field_mask_pb2, json_format

from service.client._rpc import Rpc, time_of
from service.client.errors import NotFoundError

# What a caller sets; the other fields of an Ontology are output only and the server
# refuses them in a request.
CONTENT_FIELDS = ("description", "classes", "input_classifications")
# Output-only fields of a class, left out of `OntologyInfo.content` for the same reason.
_CLASS_OUTPUT_ONLY = ("category_id",)
OntologySource = Mapping[str, Any] | str | os.PathLike[str]


@dataclass(frozen=True)
class OntologyInfo:
    """An ontology as the server last returned it; classes in protobuf JSON shape."""

    id: str
    app_id: str
    description: str
    revision: int
    classes: list[dict[str, Any]] = field(default_factory=list)
    input_classifications: list[dict[str, Any]] = field(default_factory=list)
    created_at: datetime | None = None
    modified_at: datetime | None = None

    @property
    def content(self) -> dict[str, Any]:
        """The caller-set fields, as `create` and `update` take them (no output-only
        fields, which requests refuse)."""
        found: dict[str, Any] = {"id": self.id}
        if self.description:
            found["description"] = self.description
        if self.classes:
            found["classes"] = _settable(self.classes)
        if self.input_classifications:
            found["input_classifications"] = _settable(self.input_classifications)
        return found

    def find_class(self, class_id: str) -> dict[str, Any] | None:
        """A copy of the class (at any depth, input classifications included) with this id."""
        return _find(self.content, class_id)

    def class_ids(self) -> list[str]:
        """Every class id, depth first, in the order of the ontology."""
        return [str(c.get("id", "")) for c in _walk([*self.classes, *self.input_classifications])]

    def to_dict(self) -> dict[str, Any]:
        """Every field, output-only ones included, in protobuf JSON shape."""
        return {
            "id": self.id,
            "description": self.description,
            "classes": self.classes,
            "input_classifications": self.input_classifications,
            "app_id": self.app_id,
            "revision": self.revision,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "modified_at": self.modified_at.isoformat() if self.modified_at else None,
        }


def _settable(classes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the classes without their output-only fields, sub-classes included."""
    return [
        {
            key: _settable(value) if key == "sub_classes" else copy.deepcopy(value)
            for key, value in item.items()
            if key not in _CLASS_OUTPUT_ONLY
        }
        for item in classes
    ]


def _walk(classes: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in classes:
        yield item
        yield from _walk(item.get("sub_classes", []))


def _find(content: dict[str, Any], class_id: str) -> dict[str, Any] | None:
    """The class with this id in an ontology's content (a reference into it)."""
    classes = [*content.get("classes", []), *content.get("input_classifications", [])]
    return next((c for c in _walk(classes) if c.get("id") == class_id), None)


def _to_info(message: ontology_pb2.Ontology) -> OntologyInfo:
    def dicts(items: Any) -> list[dict[str, Any]]:
        # Field names as in the proto (snake_case), as the files a caller writes use them.
        return [json_format.MessageToDict(c, preserving_proto_field_name=True) for c in items]

    return OntologyInfo(
        id=message.id,
        app_id=message.app_id,
        description=message.description,
        revision=message.revision,
        classes=dicts(message.classes),
        input_classifications=dicts(message.input_classifications),
        created_at=time_of(message, "created_at"),
        modified_at=time_of(message, "modified_at"),
    )


def parse_ontology(source: OntologySource, ontology_id: str = "") -> ontology_pb2.Ontology:
    """An Ontology message from a dict, JSON text or a JSON file, with `ontology_id` as its id.

    Raises ValueError naming what is wrong: not JSON, not an object, a field an Ontology does
    not have, a value of the wrong type, or an id other than `ontology_id`. The ontology's
    own rules (unique class ids, allowed shapes, ...) are the server's to check.
    """
    if isinstance(source, os.PathLike):
        where = f"ontology file {os.fspath(source)}"
        text = Path(source).read_text(encoding="utf-8")
        value: Any = _json(text, where)
    elif isinstance(source, str):
        where = "ontology JSON"
        value = _json(source, where)
    else:
        where = "ontology"
        value = dict(source)
    if not isinstance(value, dict):
        raise ValueError(
            f"{where}: must be a JSON object (a datasetd.v1.Ontology), not {type(value).__name__}"
        )
    given_id = value.get("id", "")
    if ontology_id and given_id and given_id != ontology_id:
        raise ValueError(f"{where}: its id {given_id!r} is not the ontology {ontology_id!r}")
    message = ontology_pb2.Ontology()
    try:
        json_format.ParseDict(value, message)
    except json_format.ParseError as error:
        raise ValueError(f"{where}: {error}") from None
    if ontology_id:
        message.id = ontology_id
    return message


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON: {error}") from None


class Ontologies:
    """Ontologies of the client's app (`Client.ontologies`)."""

    def __init__(self, rpc: Rpc, channel: grpc.Channel) -> None:
        self._rpc = rpc
        self._stub = ontology_service_pb2_grpc.OntologyServiceStub(channel)

    def create(
        self, ontology: OntologySource, ontology_id: str = "", request_id: str | None = None
    ) -> OntologyInfo:
        """Creates an ontology at revision 1 from a dict in the protobuf JSON shape of an
        Ontology, JSON text or a path of a JSON file. `ontology_id` (else the JSON's id,
        else one the server generates) names it."""
        response = self._rpc.app_call(
            self._stub.CreateOntology,
            api.CreateOntologyRequest,
            ontology=parse_ontology(ontology, ontology_id),
            request_id=request_id,
        )
        return _to_info(response.ontology)

    def get(self, ontology_id: str) -> OntologyInfo:
        response = self._rpc.app_call(
            self._stub.GetOntology, api.GetOntologyRequest, ontology_id=ontology_id
        )
        return _to_info(response.ontology)

    def list(self, page_size: int = 100) -> Iterator[OntologyInfo]:
        """Every ontology of the app, oldest first; pages are fetched as the caller goes."""
        for response in self._rpc.app_pages(
            self._stub.ListOntologies, api.ListOntologiesRequest, page_size
        ):
            yield from (_to_info(o) for o in response.ontologies)

    def update(
        self,
        ontology_id: str,
        ontology: OntologySource,
        expected_revision: int = 0,
        fields: tuple[str, ...] = CONTENT_FIELDS,
        request_id: str | None = None,
    ) -> OntologyInfo:
        """Replaces the ontology's `fields` with those of `ontology` (same sources as
        `create`) and returns it at its next revision.

        By default the ontology is replaced as a whole: a field `ontology` leaves out is
        cleared. A non-zero `expected_revision` makes the update conditional (AbortedError,
        reason REVISION_MISMATCH, when the ontology changed since). Removing a class or shape
        that annotations use is FailedPreconditionError (ONTOLOGY_CLASS_IN_USE); archive the
        class instead (`archive_class`).
        """
        unknown = sorted(set(fields) - set(CONTENT_FIELDS))
        if unknown or not fields:
            raise ValueError(
                f"fields must name some of {', '.join(CONTENT_FIELDS)}; got {list(fields)}"
            )
        response = self._rpc.app_call(
            self._stub.UpdateOntology,
            api.UpdateOntologyRequest,
            ontology=parse_ontology(ontology, ontology_id),
            update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
            expected_revision=expected_revision,
            request_id=request_id,
        )
        return _to_info(response.ontology)

    def archive_class(
        self, ontology_id: str, class_id: str, request_id: str | None = None
    ) -> OntologyInfo:
        """Archives a class (at any depth): annotations keep it, new labels may not use it.

        Updates the ontology at the revision it was read at, so a concurrent change is
        AbortedError (REVISION_MISMATCH) rather than overwritten. An unknown class is
        NotFoundError listing the classes; archiving an archived class changes nothing.
        """
        current = self.get(ontology_id)
        content = current.content
        found = _find(content, class_id)
        if found is None:
            known = current.class_ids()
            shown = ", ".join(known[:50]) + (" ..." if len(known) > 50 else "")
            raise NotFoundError(
                grpc.StatusCode.NOT_FOUND,
                f"ontology {ontology_id!r} has no class {class_id!r}; "
                f"its classes: {shown or '(none)'}",
                reason="ONTOLOGY_CLASS_NOT_FOUND",
            )
        if found.get("archived"):
            return current
        found["archived"] = True
        return self.update(
            ontology_id,
            content,
            expected_revision=current.revision,
            request_id=request_id,
        )

    def delete(self, ontology_id: str, request_id: str | None = None) -> None:
        """Deletes an ontology at once; FailedPreconditionError (ONTOLOGY_IN_USE, naming the
        projects) while projects use it."""
        self._rpc.app_call(
            self._stub.DeleteOntology,
            api.DeleteOntologyRequest,
            ontology_id=ontology_id,
            request_id=request_id,
        )
