"""Struct and message <-> JSON: the dict forms the domain keeps for metadata, filters
and annotation data."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(value)
    return result


def message_to_json(message: Message) -> dict[str, Any]:
    """The JSON form the domain checks and storage keeps: proto field names, so that it
    reads the same as the protos and the API docs."""
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def parse_stored(value: dict[str, Any], message: Message) -> None:
    """Fills `message` from stored JSON. Unknown fields are skipped, not fatal: a stored
    row must stay readable even if a later release drops a field it holds."""
    json_format.ParseDict(value, message, ignore_unknown_fields=True)
