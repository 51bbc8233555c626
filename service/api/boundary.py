"""The one gate every request value passes before any servicer sees it.

Each request message, unary or one message of a client stream, is walked field by field
from its descriptor: floats must be finite, enum numbers must be declared, and a field the
service does not accept in that request (`field_policy.refusal`) is refused by name.
Because the walk is driven by descriptors, a new RPC or field is covered without code
here, and a value no servicer expects (NaN in metadata, enum 999) never reaches one.
"""

from __future__ import annotations

import enum
import functools
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from service.api.field_policy import outside_mask, refusal
from service.domain.errors import FieldViolation, InvalidArgument

# Enough to fix a request; a request with thousands of bad values would otherwise turn
# the error itself into a payload larger than the request.
MAX_REPORTED = 20

_JSON = frozenset(
    m.DESCRIPTOR.full_name for m in (struct_pb2.Struct, struct_pb2.Value, struct_pb2.ListValue)
)
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


def check_request(message: Message) -> None:
    """Raises INVALID_ARGUMENT naming every refused or malformed field of `message`."""
    violations: list[FieldViolation] = []
    found = itertools.chain(
        _Walk(message.DESCRIPTOR.full_name).message(message, (), ()), outside_mask(message)
    )
    for violation in found:
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


class _Kind(enum.Enum):
    SKIP = enum.auto()  # strings, integers, bytes, booleans: any value is well-formed here
    MESSAGE = enum.auto()
    JSON = enum.auto()
    FLOAT = enum.auto()
    ENUM = enum.auto()


@dataclass(frozen=True)
class _Plan:
    """What to do with one field at one place of one request type, decided once."""

    refused: str | None
    kind: _Kind
    is_map: bool
    is_repeated: bool
    element: FieldDescriptor  # the field itself, or the value field of a map entry


@functools.cache
def _plan(request_type: str, names: tuple[str, ...], field: FieldDescriptor) -> _Plan:
    element = field
    entry = field.message_type
    is_map = field.is_repeated and entry is not None and entry.GetOptions().map_entry
    if is_map:
        assert entry is not None
        element = entry.fields_by_name["value"]
    element_type = element.message_type
    if element.type == FieldDescriptor.TYPE_MESSAGE and element_type is not None:
        json_like = element_type.full_name in _JSON
        kind = _Kind.JSON if json_like else _Kind.MESSAGE
    elif element.type in _FLOATS:
        kind = _Kind.FLOAT
    elif element.type == FieldDescriptor.TYPE_ENUM:
        kind = _Kind.ENUM
    else:
        kind = _Kind.SKIP
    return _Plan(refusal(request_type, names, field), kind, is_map, field.is_repeated, element)


def _path(parts: tuple[str, ...]) -> str:
    return "".join(parts).lstrip(".")


class _Walk:
    def __init__(self, request_type: str) -> None:
        self.request_type = request_type

    def message(
        self, message: Message, at: tuple[str, ...], names: tuple[str, ...]
    ) -> Iterator[FieldViolation]:
        for field, value in message.ListFields():
            inner = (*names, field.name)
            plan = _plan(self.request_type, inner, field)
            if plan.refused is not None:
                yield FieldViolation(_path((*at, "." + field.name)), plan.refused)
            elif plan.kind is _Kind.SKIP:
                continue
            elif plan.is_map:
                for key, item in value.items():
                    here = (*at, "." + field.name, f"[{json.dumps(key)}]")
                    yield from self.value(plan, item, here, inner)
            elif plan.is_repeated:
                for index, item in enumerate(value):
                    yield from self.value(plan, item, (*at, "." + field.name, f"[{index}]"), inner)
            else:
                yield from self.value(plan, value, (*at, "." + field.name), inner)

    def value(
        self, plan: _Plan, value: Any, at: tuple[str, ...], names: tuple[str, ...]
    ) -> Iterator[FieldViolation]:
        if plan.kind is _Kind.MESSAGE:
            yield from self.message(value, at, names)
        elif plan.kind is _Kind.JSON:
            yield from _json_value(value, at)
        elif plan.kind is _Kind.FLOAT:
            if not math.isfinite(value):
                yield FieldViolation(_path(at), f"must be a finite number, not {value}")
        elif plan.kind is _Kind.ENUM:
            enum_type = plan.element.enum_type
            assert enum_type is not None
            if value not in enum_type.values_by_number:
                yield FieldViolation(_path(at), _unknown_enum(enum_type, value))


def _json_value(message: Message, at: tuple[str, ...]) -> Iterator[FieldViolation]:
    """Struct, Value and ListValue, with paths as a JSON reader writes them: meta["a"][2].

    Keys are kept raw and only formatted for a violation: metadata is most of what a bulk
    request carries, and nearly all of it is fine."""
    stack: list[tuple[Message, tuple[str | int, ...]]] = [(message, ())]
    while stack:
        node, keys = stack.pop()
        if isinstance(node, struct_pb2.Struct):
            stack.extend((value, (*keys, key)) for key, value in node.fields.items())
        elif isinstance(node, struct_pb2.ListValue):
            stack.extend((value, (*keys, index)) for index, value in enumerate(node.values))
        elif isinstance(node, struct_pb2.Value):
            which = node.WhichOneof("kind")
            if which == "number_value" and not math.isfinite(node.number_value):
                where = _path(at) + "".join(f"[{json.dumps(key)}]" for key in keys)
                number = node.number_value
                yield FieldViolation(where, f"must be a finite number (JSON has no {number})")
            elif which == "struct_value":
                stack.append((node.struct_value, keys))
            elif which == "list_value":
                stack.append((node.list_value, keys))


def _unknown_enum(enum: EnumDescriptor, number: int) -> str:
    allowed = ", ".join(f"{v.name} ({v.number})" for v in enum.values)
    return f"unknown {enum.name} value {number}; allowed: {allowed}"
