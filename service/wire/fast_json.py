"""Message -> JSON dict on the ingest path, equal to json_format.MessageToDict with proto
field names but several times faster (issue 10, point 4: CreateInputs spent most of its
wire time in json_format's generic printer).

The result is the same dict, value for value and type for type (tests/unit/
test_wire_fast_json.py compares them over every field kind of Data). Anything this module
does not handle itself (well-known types, maps, non-finite floats, unknown enum numbers)
goes to json_format, so its output and its errors stay json_format's.
"""

from __future__ import annotations

import base64
import math
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.internal import type_checkers
from google.protobuf.message import Message

_MESSAGE = FieldDescriptor.CPPTYPE_MESSAGE
_FLOAT = FieldDescriptor.CPPTYPE_FLOAT
_DOUBLE = FieldDescriptor.CPPTYPE_DOUBLE
_ENUM = FieldDescriptor.CPPTYPE_ENUM
_STRING = FieldDescriptor.CPPTYPE_STRING
_INT64 = frozenset({FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64})
_BYTES = FieldDescriptor.TYPE_BYTES

# The shortest decimal of a 32-bit float takes a few string round trips; box edges and
# concept values repeat a lot, so they are remembered (bounded: cleared when full).
_SHORTEST: dict[float, float] = {}
_SHORTEST_MAX = 1 << 16


# Message types json_format prints by rules of their own (well-known types, map entries).
_SPECIAL: dict[Any, bool] = {}


class _Fallback(Exception):
    """A value json_format must print (its rules, or its error)."""


def _shortest(value: float) -> float:
    found = _SHORTEST.get(value)
    if found is None:
        if not math.isfinite(value):
            raise _Fallback
        if len(_SHORTEST) >= _SHORTEST_MAX:
            _SHORTEST.clear()
        found = _SHORTEST[value] = type_checkers.ToShortestFloat(value)
    return found


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    kind = field.cpp_type
    if kind == _STRING:
        return base64.b64encode(value).decode("utf-8") if field.type == _BYTES else value
    if kind == _FLOAT:
        return _shortest(value)
    if kind == _DOUBLE:
        if not math.isfinite(value):
            raise _Fallback
        return value
    if kind == _ENUM:
        enum_type = field.enum_type
        assert enum_type is not None
        enum_value = enum_type.values_by_number.get(value)
        if enum_value is None or enum_type.full_name == "google.protobuf.NullValue":
            raise _Fallback
        return enum_value.name
    if kind in _INT64:
        return str(value)
    return value


def _object(message: Message) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.cpp_type == _MESSAGE:
            kind = field.message_type
            special = _SPECIAL.get(kind)
            if special is None:
                assert kind is not None
                special = _SPECIAL[kind] = kind.full_name.startswith("google.protobuf.") or (
                    kind.GetOptions().map_entry
                )
            if special:
                raise _Fallback
            if field.is_repeated:
                result[field.name] = [_object(item) for item in value]
            else:
                result[field.name] = _object(value)
        elif field.is_repeated:
            result[field.name] = [_scalar(field, item) for item in value]
        else:
            result[field.name] = _scalar(field, value)
    return result


def message_json(message: Message) -> dict[str, Any]:
    """json_format.MessageToDict(message, preserving_proto_field_name=True), faster."""
    try:
        return _object(message)
    except _Fallback:
        result: dict[str, Any] = json_format.MessageToDict(
            message, preserving_proto_field_name=True
        )
        return result


def _value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise _Fallback
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {key: _value(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_value(item) for item in value.list_value.values]
    return None  # null_value, or nothing set: json_format prints null for both


def struct_json(message: struct_pb2.Struct) -> dict[str, Any]:
    """json_format.MessageToDict of a Struct, faster."""
    try:
        return {key: _value(item) for key, item in message.fields.items()}
    except _Fallback:
        result: dict[str, Any] = json_format.MessageToDict(message)
        return result
