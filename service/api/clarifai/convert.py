"""Clarifai messages ↔ native (datasetd.v1) messages.

The data model messages are wire-compatible (same field numbers and types for every field
datasetd has), so a resource crosses over as its bytes. What a caller sets that datasetd
does not model would cross as unknown fields and be dropped silently; `native` refuses it
instead, naming the field by its Clarifai path, unless the RPC lists it as ignored (fields
the real API ignores too, or output-only fields the SDK echoes back)."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from service.domain.errors import InvalidArgument, Violations

N = TypeVar("N", bound=Message)
C = TypeVar("C", bound=Message)


def unsupported(message: Message, native: Any, path: str) -> list[str]:
    """The paths of the fields set in `message` that `native` (the Descriptor of the
    datasetd message of the same wire shape) has no field for."""
    found: list[str] = []
    for field, value in message.ListFields():
        here = f"{path}.{field.name}" if path else field.name
        mirror = native.fields_by_number.get(field.number)
        if mirror is None or mirror.type != field.type:
            found.append(here)
            continue
        if field.type != FieldDescriptor.TYPE_MESSAGE or field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            continue
        if mirror.message_type.full_name.startswith("google.protobuf."):
            continue
        if field.is_repeated:
            for index, item in enumerate(value):
                found += unsupported(item, mirror.message_type, f"{here}[{index}]")
        else:
            found += unsupported(value, mirror.message_type, here)
    return found


def native(
    message: Message,
    native_type: type[N],
    path: str,
    violations: Violations,
    ignored: Collection[str] = (),
) -> N:
    """`message` as `native_type`; each field datasetd does not model is a violation
    (its path relative to `path` is matched against `ignored`, with `[i]` indices
    removed, and then cleared rather than refused)."""
    copy = type(message)()
    copy.CopyFrom(message)
    for field_path in unsupported(copy, native_type.DESCRIPTOR, ""):
        if _unindexed(field_path) in ignored:
            _clear(copy, field_path)
            continue
        violations.add(
            f"{path}.{field_path}" if path else field_path,
            "is not supported by datasetd (remove it; see the README: Clarifai compatibility)",
        )
    return native_type.FromString(copy.SerializeToString())


def native_all(
    messages: Iterable[Message],
    native_type: type[N],
    path: str,
    violations: Violations,
    ignored: Collection[str] = (),
) -> list[N]:
    """`native` for each message of a repeated field `path`."""
    return [
        native(message, native_type, f"{path}[{i}]", violations, ignored)
        for i, message in enumerate(messages)
    ]


def native_one(
    message: Message, native_type: type[N], path: str, ignored: Collection[str] = ()
) -> N:
    """`native` for a single message: its unsupported fields are raised at once."""
    violations = Violations()
    converted = native(message, native_type, path, violations, ignored)
    violations.raise_if_any()
    return converted


def clarifai(message: Message, clarifai_type: type[C]) -> C:
    """A native message as its Clarifai counterpart. Fields Clarifai has no number for
    (datasetd's own, such as a dataset's statistics) are left out."""
    converted = clarifai_type.FromString(message.SerializeToString())
    converted.DiscardUnknownFields()
    return converted


def _unindexed(path: str) -> str:
    out, depth = [], 0
    for char in path:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif depth == 0:
            out.append(char)
    return "".join(out)


def _clear(message: Message, path: str) -> None:
    """Clears the field at `path` (dotted, with `[i]` indices) in `message`."""
    head, _, rest = path.partition(".")
    name, _, index = head.partition("[")
    if not rest:
        message.ClearField(name)
        return
    child = getattr(message, name)
    if index:
        child = child[int(index.rstrip("]"))]
    _clear(child, rest)


def refuse(path: str, description: str) -> InvalidArgument:
    return InvalidArgument.field(path, description)
