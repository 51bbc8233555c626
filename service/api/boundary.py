"""The one gate every request value passes before any servicer sees it.

Each request message, unary or one message of a client stream, is walked field by field
from its descriptor: floats must be finite, enum numbers must be declared, and a field the
service does not accept in that request (`field_policy.refusal`) is refused by name.
Because the walk is driven by descriptors, a new RPC or field is covered without code
here, and a value no servicer expects (NaN in metadata, enum 999) never reaches one.

The walk is paid on every call, so it is built for the common case of a clean request:
what to do with each field at each place of each request type is decided once (`_Node`),
and the walk records no paths; only when it finds something does a second walk name the
places.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass, field
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
# Every number in JSON metadata is a Value.number_value: tag 0x11 (field 2, 64-bit), then a
# little-endian double, which is NaN or infinite exactly when its 11 exponent bits are all
# set. No match in the encoded bytes proves the metadata clean at C speed; a match (a
# non-finite number, or those bytes inside a string) is settled by walking the values.
_MAYBE_NON_FINITE = re.compile(rb"\x11.{6}[\xf0-\xff][\x7f\xff]", re.DOTALL)

Path = tuple[str, ...] | None
"""The parts of a field path (`inputs`, `[3]`, `.data`), or None on the walk that only
looks for a problem."""


def check_request(message: Message) -> None:
    """Raises INVALID_ARGUMENT naming every refused or malformed field of `message`."""
    root = _root(message.DESCRIPTOR.full_name)
    violations: list[FieldViolation] = []
    _message(root, message, violations, None)
    if violations:
        violations.clear()
        _message(root, message, violations, ())
    violations.extend(outside_mask(message))
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
    """What to do with one field at one place of one request type."""

    refused: str | None
    kind: _Kind
    is_map: bool
    is_repeated: bool
    enum_type: EnumDescriptor | None
    child: _Node | None  # where the field's messages are walked (kind MESSAGE)


@dataclass
class _Node:
    """One place in a request type (e.g. `inputs.data` of CreateInputsRequest) and the
    plans of its fields, made on first use."""

    request_type: str
    names: tuple[str, ...]
    plans: dict[int, _Plan] = field(default_factory=dict)

    def plan(self, field: FieldDescriptor) -> _Plan:
        found = self.plans.get(field.number)
        if found is None:
            found = self.plans[field.number] = self._make(field)
        return found

    def _make(self, field: FieldDescriptor) -> _Plan:
        names = (*self.names, field.name)
        element = field
        entry = field.message_type
        is_map = field.is_repeated and entry is not None and entry.GetOptions().map_entry
        if is_map:
            assert entry is not None
            element = entry.fields_by_name["value"]
        element_type = element.message_type
        child = None
        if element.type == FieldDescriptor.TYPE_MESSAGE and element_type is not None:
            if element_type.full_name in _JSON:
                kind = _Kind.JSON
            else:
                kind, child = _Kind.MESSAGE, _Node(self.request_type, names)
        elif element.type in _FLOATS:
            kind = _Kind.FLOAT
        elif element.type == FieldDescriptor.TYPE_ENUM:
            kind = _Kind.ENUM
        else:
            kind = _Kind.SKIP
        reason = refusal(self.request_type, names, field)
        return _Plan(reason, kind, is_map, field.is_repeated, element.enum_type, child)


_ROOTS: dict[str, _Node] = {}


def _root(request_type: str) -> _Node:
    node = _ROOTS.get(request_type)
    if node is None:
        node = _ROOTS[request_type] = _Node(request_type, ())
    return node


def _here(at: Path, *parts: str) -> Path:
    return None if at is None else (*at, *parts)


def _name(at: Path) -> str:
    return "" if at is None else "".join(at).lstrip(".")


def _message(node: _Node, message: Message, out: list[FieldViolation], at: Path) -> None:
    for field_descriptor, value in message.ListFields():
        plan = node.plan(field_descriptor)
        if plan.refused is not None:
            out.append(FieldViolation(_name(_here(at, "." + field_descriptor.name)), plan.refused))
        elif plan.kind is _Kind.SKIP:
            continue
        elif plan.is_map:
            for key, item in value.items():
                where = _here(at, "." + field_descriptor.name, f"[{json.dumps(key)}]")
                _value(plan, item, out, where)
        elif plan.is_repeated:
            for index, item in enumerate(value):
                _value(plan, item, out, _here(at, "." + field_descriptor.name, f"[{index}]"))
        else:
            _value(plan, value, out, _here(at, "." + field_descriptor.name))


def _value(plan: _Plan, value: Any, out: list[FieldViolation], at: Path) -> None:
    kind = plan.kind
    if kind is _Kind.MESSAGE:
        assert plan.child is not None
        _message(plan.child, value, out, at)
    elif kind is _Kind.FLOAT:
        if not math.isfinite(value):
            out.append(FieldViolation(_name(at), f"must be a finite number, not {value}"))
    elif kind is _Kind.ENUM:
        assert plan.enum_type is not None
        if value not in plan.enum_type.values_by_number:
            out.append(FieldViolation(_name(at), _unknown_enum(plan.enum_type, value)))
    elif kind is _Kind.JSON:
        _json_value(value, out, at)


def _json_value(message: Message, out: list[FieldViolation], at: Path) -> None:
    """Struct, Value and ListValue, with paths as a JSON reader writes them: meta["a"][2].

    Metadata is most of what a bulk request carries, and nearly all of it is fine: a scan
    of its encoding settles most of it, and keys are only formatted for a violation."""
    if not _MAYBE_NON_FINITE.search(message.SerializeToString()):
        return
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
                where = _name(at) + "".join(f"[{json.dumps(key)}]" for key in keys)
                number = node.number_value
                out.append(FieldViolation(where, f"must be a finite number (JSON has no {number})"))
            elif which == "struct_value":
                stack.append((node.struct_value, keys))
            elif which == "list_value":
                stack.append((node.list_value, keys))


def _unknown_enum(enum_type: EnumDescriptor, number: int) -> str:
    allowed = ", ".join(f"{v.name} ({v.number})" for v in enum_type.values)
    return f"unknown {enum_type.name} value {number}; allowed: {allowed}"
