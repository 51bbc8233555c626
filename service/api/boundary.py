"""The one gate every request value passes before any servicer sees it.

Each request message, unary or one message of a client stream, is walked field by field
from its descriptor: floats must be finite, enum numbers must be declared, and a field the
service does not accept in that request (`field_policy.refusal`) is refused by name.
Because the walk is driven by descriptors, a new RPC or field is covered without code
here, and a value no servicer expects (NaN in metadata, enum 999) never reaches one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from service.api.field_policy import refusal
from service.domain.errors import FieldViolation, InvalidArgument

# Enough to fix a request; a request with thousands of bad values would otherwise turn
# the error itself into a payload larger than the request.
MAX_REPORTED = 20

_STRUCT = "google.protobuf.Struct"
_VALUE = "google.protobuf.Value"
_LIST_VALUE = "google.protobuf.ListValue"
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


def check_request(message: Message) -> None:
    """Raises INVALID_ARGUMENT naming every refused or malformed field of `message`."""
    violations: list[FieldViolation] = []
    walker = _Walk(message.DESCRIPTOR.full_name)
    for violation in walker.message(message, "", ()):
        violations.append(violation)
        if len(violations) > MAX_REPORTED:
            break
    if not violations:
        return
    shown = violations[:MAX_REPORTED]
    summary = "; ".join(f"{v.field}: {v.description}" for v in shown)
    if len(violations) > MAX_REPORTED:
        summary += f"; and more (only the first {MAX_REPORTED} are listed)"
    raise InvalidArgument(summary, reason="INVALID_FIELD", violations=shown)


class _Walk:
    def __init__(self, request_type: str) -> None:
        self.request_type = request_type

    def message(
        self, message: Message, at: str, names: tuple[str, ...]
    ) -> Iterator[FieldViolation]:
        name = message.DESCRIPTOR.full_name
        if name in (_STRUCT, _VALUE, _LIST_VALUE):
            yield from _json_value(message, at)
            return
        for field, value in message.ListFields():
            path = f"{at}.{field.name}" if at else field.name
            field_names = (*names, field.name)
            reason = refusal(self.request_type, field_names, field)
            if reason is not None:
                yield FieldViolation(path, reason)
            elif _is_map(field):
                yield from self.map(field, value, path, field_names)
            elif field.is_repeated:
                for index, item in enumerate(value):
                    yield from self.value(field, item, f"{path}[{index}]", field_names)
            else:
                yield from self.value(field, value, path, field_names)

    def map(
        self, field: FieldDescriptor, entries: object, at: str, names: tuple[str, ...]
    ) -> Iterator[FieldViolation]:
        entry = field.message_type
        assert entry is not None
        value_field = entry.fields_by_name["value"]
        for key, item in entries.items():  # type: ignore[attr-defined]
            yield from self.value(value_field, item, f"{at}[{json.dumps(key)}]", names)

    def value(
        self, field: FieldDescriptor, value: object, at: str, names: tuple[str, ...]
    ) -> Iterator[FieldViolation]:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            assert isinstance(value, Message)
            yield from self.message(value, at, names)
        elif field.type in _FLOATS:
            assert isinstance(value, float)
            if not math.isfinite(value):
                yield FieldViolation(at, f"must be a finite number, not {value}")
        elif field.type == FieldDescriptor.TYPE_ENUM:
            assert isinstance(value, int)
            enum = field.enum_type
            assert enum is not None
            if value not in enum.values_by_number:
                yield FieldViolation(at, _unknown_enum(enum, value))


def _json_value(message: Message, at: str) -> Iterator[FieldViolation]:
    """Struct, Value and ListValue, with paths as a JSON reader writes them: meta["a"][2]."""
    stack: list[tuple[Message, str]] = [(message, at)]
    while stack:
        node, path = stack.pop()
        kind = node.DESCRIPTOR.full_name
        if kind == _STRUCT:
            stack.extend((v, f"{path}[{json.dumps(k)}]") for k, v in node.fields.items())  # type: ignore[attr-defined]
        elif kind == _LIST_VALUE:
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node.values))  # type: ignore[attr-defined]
        elif node.WhichOneof("kind") == "number_value":
            number: float = node.number_value  # type: ignore[attr-defined]
            if not math.isfinite(number):
                yield FieldViolation(path, f"must be a finite number (JSON has no {number})")
        elif node.WhichOneof("kind") in ("struct_value", "list_value"):
            stack.append((getattr(node, str(node.WhichOneof("kind"))), path))


def _is_map(field: FieldDescriptor) -> bool:
    entry: Descriptor | None = field.message_type
    return field.is_repeated and entry is not None and entry.GetOptions().map_entry


def _unknown_enum(enum: EnumDescriptor, number: int) -> str:
    allowed = ", ".join(f"{v.name} ({v.number})" for v in enum.values)
    return f"unknown {enum.name} value {number}; allowed: {allowed}"
