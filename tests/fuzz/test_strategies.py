"""The fuzzer sends what it claims to: the hostile values of issue 17 appear in the requests
generated from the descriptors (checked on the messages, not on the strategies' code)."""

from __future__ import annotations

import math

from google.protobuf import descriptor
from google.protobuf.message import Message

from tests.fuzz.harness import discover, generate
from tests.fuzz.strategies import Known, messages

FD = descriptor.FieldDescriptor
KNOWN = Known(
    app_id="app-1",
    ids={"dataset": ("ds-1",), "input": ("in-1",)},
    page_tokens=("tok",),
    field_paths=("metadata",),
)
EXTREMES = {2**63 - 1, -(2**63), 2**64 - 1, 2**31 - 1, -(2**31), 2**32 - 1}


def features(message: Message, found: set[str], depth: int = 0, in_struct: bool = False) -> None:
    if depth >= 60:
        found.add("nesting of 60 messages")
    struct = in_struct or message.DESCRIPTOR.full_name == "google.protobuf.Struct"
    for field, value in message.ListFields():
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if field.is_repeated and len(value) >= 100:
            found.add("struct with 1000+ keys" if is_map and len(value) >= 1000 else "long list")
        items = list(value.values()) if is_map else list(value) if field.is_repeated else [value]
        if is_map:
            keys = list(value)
            found.update(_string_features(k) for k in keys if isinstance(k, str))
        for item in items:
            if isinstance(item, Message):
                features(item, found, depth + 1, struct)
            elif isinstance(item, float) and not math.isfinite(item):
                found.add(f"{'NaN' if math.isnan(item) else 'inf'}{' in Struct' if struct else ''}")
            elif field.type == FD.TYPE_ENUM:
                assert field.enum_type is not None
                if item not in field.enum_type.values_by_number:
                    found.add("undeclared enum number")
            elif isinstance(item, int) and not isinstance(item, bool) and item in EXTREMES:
                found.add("integer extreme")
            elif isinstance(item, str):
                found.add(_string_features(item))
            elif isinstance(item, bytes) and len(item) >= 10_000:
                found.add("large bytes")


def _string_features(text: str) -> str:
    if len(text) >= 100_000:
        return "string of 100 KB"
    if "../" in text or "%00" in text or "/" in text:
        return "path-like string"
    if any(ord(c) < 0x20 for c in text):
        return "control characters"
    if any(ord(c) > 0xFFFF for c in text):
        return "astral unicode"
    return "other string"


def test_requests_carry_every_kind_of_hostile_value() -> None:
    found: set[str] = set()
    for rpc in discover():
        for message in generate(messages(rpc.method.input_type, KNOWN), 12, 17):
            features(message, found)
    assert {
        "NaN in Struct",
        "inf in Struct",
        "NaN",
        "inf",
        "undeclared enum number",
        "integer extreme",
        "string of 100 KB",
        "path-like string",
        "control characters",
        "astral unicode",
        "long list",
        "struct with 1000+ keys",
        "nesting of 60 messages",
        "large bytes",
    } <= found, found
