"""Hypothesis strategies built from protobuf descriptors: hostile values for every field type.

Nothing here names a datasetd message: the strategies walk `Descriptor`s, so a field or an
RPC added to the protos is fuzzed without touching this file. What the fuzzer knows of the
server is only `Known`, the ids of real resources, so that a share of the requests gets past
"not found" and into the code that does the work.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from google.protobuf import descriptor, struct_pb2
from google.protobuf import message as pb_message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

T = TypeVar("T")
FD = descriptor.FieldDescriptor
Message = pb_message.Message

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
_INT_RANGES: Mapping[int, tuple[int, int]] = {
    FD.TYPE_INT32: INT32,
    FD.TYPE_SINT32: INT32,
    FD.TYPE_SFIXED32: INT32,
    FD.TYPE_INT64: INT64,
    FD.TYPE_SINT64: INT64,
    FD.TYPE_SFIXED64: INT64,
    FD.TYPE_UINT32: UINT32,
    FD.TYPE_FIXED32: UINT32,
    FD.TYPE_UINT64: UINT64,
    FD.TYPE_FIXED64: UINT64,
}
# Beyond the generated messages' depth the recursion (Data → Region → Data …) stops.
MAX_DEPTH = 4

# Values that have broken id handling, path building, SQL LIKE patterns or JSON somewhere.
HOSTILE_STRINGS = (
    "",
    " ",
    "../x",
    "../../etc/passwd",
    "..",
    ".",
    "a/b",
    "/",
    "//",
    "%00",
    "%2e%2e%2f",
    "\x00",
    "a\x00b",
    "\n",
    "\r\n",
    "\t",
    "\x7f",
    "\x1b[31m",
    "'; DROP TABLE inputs; --",
    "%",
    "_",
    "\\",
    "*",
    "?",
    "${x}",
    "{{x}}",
    "é",
    "e\u0301",
    "ß",
    "\u202e",
    "\ufeff",
    "\u200b",
    "\U0001f600",
    "\U0010ffff",
    "null",
    "true",
    "0",
    "-1",
    "NaN",
    "Infinity",
    "1e309",
    "[]",
    "{}",
    '{"a":',
    "<script>",
    "a" * 129,
    "a" * 256,
    "a" * 1025,
)
# Big enough to cross any sane length limit; built from a drawn size, not drawn character by
# character (which would be slow and exceed Hypothesis' per-example data budget).
TOKEN_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=."
HUGE_LENGTHS = st.integers(min_value=1_000, max_value=110_000)


@dataclasses.dataclass(frozen=True)
class Known:
    """Real resources of the fuzzing app, and which field names refer to which."""

    app_id: str
    ids: Mapping[str, Sequence[str]]  # "dataset", "input", … → ids that exist
    page_tokens: Sequence[str] = ()
    field_paths: Sequence[str] = ()
    blobs: Sequence[bytes] = ()  # real content: an image, an archive
    # (message full name, field name) the server sets: calm requests leave them out.
    output_only: frozenset[tuple[str, str]] = frozenset()

    def ids_for(self, field_name: str) -> Sequence[str]:
        for kind, ids in self.ids.items():
            if kind in field_name and ids:
                return ids
        return tuple(i for ids in self.ids.values() for i in ids)


def weighted(*options: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """`one_of` with integer weights (Hypothesis has none built in)."""
    table = [strategy for weight, strategy in options for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def huge_strings() -> st.SearchStrategy[str]:
    return st.builds(
        lambda unit, n: (unit * n)[:n],
        st.sampled_from(["a", "é", "\x00", "\U0001f600", "../", "%00", " "]),
        HUGE_LENGTHS,
    )


def text() -> st.SearchStrategy[str]:
    # Lone surrogates cannot be encoded as UTF-8, so protobuf refuses them client-side;
    # invalid UTF-8 is sent by the raw-bytes cases instead.
    return st.text(st.characters(exclude_categories=["Cs"]), max_size=40)


def hostile_strings(huge: bool) -> st.SearchStrategy[str]:
    options: list[tuple[int, st.SearchStrategy[str]]] = [
        (4, st.sampled_from(HOSTILE_STRINGS)),
        (3, text()),
        (1, st.text(st.characters(max_codepoint=0x1F), max_size=20)),
    ]
    if huge:
        options.append((1, huge_strings()))
    return weighted(*options)


def page_tokens(known: Known) -> st.SearchStrategy[str]:
    options: list[tuple[int, st.SearchStrategy[str]]] = [
        (2, hostile_strings(huge=True)),
        (1, st.binary(max_size=64).map(lambda b: b.hex())),
        (1, st.text(TOKEN_ALPHABET, max_size=90)),
    ]
    if known.page_tokens:
        real = st.sampled_from(list(known.page_tokens))
        options += [
            (2, real),
            # One character changed: the signature must catch it.
            (
                2,
                st.tuples(real, st.integers(0, 200), st.sampled_from("A_-=.0")).map(
                    lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + 1 :]
                ),
            ),
            (1, real.map(lambda token: token[: len(token) // 2])),
        ]
    return weighted(*options)


def strings(field: FD, known: Known, huge: bool) -> st.SearchStrategy[str]:
    name = field.name
    hostile = hostile_strings(huge)
    if name == "app_id":
        return weighted((8, st.just(known.app_id)), (2, hostile))
    if "page_token" in name:
        return page_tokens(known)
    if name in ("id", "ids") or name.endswith(("_id", "_ids")):
        ids = known.ids_for(name)
        if ids:
            return weighted((6, st.sampled_from(list(ids))), (4, hostile))
    if name == "paths" and known.field_paths:
        return weighted((6, st.sampled_from(list(known.field_paths))), (4, hostile))
    return hostile


def integers(field_type: int) -> st.SearchStrategy[int]:
    low, high = _INT_RANGES[field_type]
    candidates = {low, low + 1, high, high - 1, -1, 0, 1, 2, 100, 1000, 1001, 10**6}
    edges = sorted(value for value in candidates if low <= value <= high)
    return weighted((3, st.sampled_from(edges)), (2, st.integers(low, high)))


def floats(width: Literal[32, 64]) -> st.SearchStrategy[float]:
    """Every float including NaN, ±inf, -0.0 and subnormals."""
    special = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0, -1.0, 0.5, 1e-45, 3.4028235e38]
    if width == 64:
        special += [1.7976931348623157e308, 5e-324, -1e308]
    return weighted((3, st.sampled_from(special)), (2, st.floats(width=width)))


def enums(enum: descriptor.EnumDescriptor) -> st.SearchStrategy[int]:
    declared = [value.number for value in enum.values]
    return weighted(
        (6, st.sampled_from(declared)),
        (3, st.sampled_from([999, -1, 2**31 - 1, -(2**31), max(declared) + 1])),
        (1, st.integers(*INT32)),
    )


# --- google.protobuf.Struct and Value -----------------------------------------------------

JSON_NUMBERS = floats(64)


def json_leaves(huge: bool) -> st.SearchStrategy[Any]:
    return weighted(
        (3, JSON_NUMBERS),
        (3, hostile_strings(huge)),
        (1, st.booleans()),
        (1, st.none()),
    )


def json_values(huge: bool) -> st.SearchStrategy[Any]:
    return st.recursive(
        json_leaves(huge),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(hostile_strings(huge=False), inner, max_size=4),
        ),
        max_leaves=12,
    )


def deep(depth: int, leaf: Any, as_list: bool) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if as_list and level % 2 else {"k": value}
    return value


def json_objects(huge: bool) -> st.SearchStrategy[dict[str, Any]]:
    options: list[tuple[int, st.SearchStrategy[dict[str, Any]]]] = [
        (6, st.dictionaries(hostile_strings(huge=False), json_values(huge), max_size=5)),
        # Nesting on both sides of protobuf's parse depth limit (100 messages, 3 per level).
        (
            1,
            st.builds(
                lambda depth, leaf, as_list: {"deep": deep(depth, leaf, as_list)},
                st.integers(10, 100),
                json_leaves(huge=False),
                st.booleans(),
            ),
        ),
    ]
    if huge:
        options.append(
            (
                1,
                st.builds(
                    lambda n, leaf: {f"key{i}": leaf if i % 7 else i for i in range(n)},
                    st.integers(1_000, 5_000),
                    json_leaves(huge=False),
                ),
            )
        )
    return weighted(*options)


def structs(huge: bool) -> st.SearchStrategy[struct_pb2.Struct]:
    return json_objects(huge).map(_struct)


def values(huge: bool) -> st.SearchStrategy[struct_pb2.Value]:
    def build(value: Any) -> struct_pb2.Value:
        holder = struct_pb2.Struct()
        holder.update({"v": value})
        return holder.fields["v"]

    return json_values(huge).map(build)


def list_values(huge: bool) -> st.SearchStrategy[struct_pb2.ListValue]:
    def build(items: list[Any]) -> struct_pb2.ListValue:
        message = struct_pb2.ListValue()
        message.extend(items)
        return message

    return st.lists(json_values(huge), max_size=5).map(build)


_WELL_KNOWN: Mapping[str, Callable[[bool], st.SearchStrategy[Any]]] = {
    "google.protobuf.Struct": structs,
    "google.protobuf.Value": values,
    "google.protobuf.ListValue": list_values,
}


# --- messages -------------------------------------------------------------------------------


def scalars(field: FD, known: Known, huge: bool) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FD.TYPE_STRING:
        return strings(field, known, huge)
    if kind == FD.TYPE_BYTES:
        options: list[tuple[int, st.SearchStrategy[bytes]]] = [(4, st.binary(max_size=256))]
        if huge:
            options.append((1, st.builds(bytes, st.integers(10_000, 300_000))))
        return weighted(*options)
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_ENUM:
        assert field.enum_type is not None
        return enums(field.enum_type)
    if kind == FD.TYPE_FLOAT:
        return floats(32)
    if kind == FD.TYPE_DOUBLE:
        return floats(64)
    return integers(kind)


# --- calm values: plausible requests, to reach the use cases behind validation ---------------

CALM_WORDS = ("a", "fuzz", "cat", "dog", "train", "hello world", "x-1", "metadata", "concepts")


def calm_scalars(field: FD, known: Known) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FD.TYPE_STRING:
        if field.name == "app_id":
            return st.just(known.app_id)
        if field.name == "request_id":
            # Fresh: a reused one replays or conflicts (the hostile requests test that).
            return st.text("0123456789abcdef", min_size=16, max_size=32)
        ids = known.ids_for(field.name)
        if (field.name in ("id", "ids") or field.name.endswith(("_id", "_ids"))) and ids:
            return st.sampled_from(list(ids))
        if field.name == "paths" and known.field_paths:
            return st.sampled_from(list(known.field_paths))
        return st.sampled_from(CALM_WORDS)
    if kind == FD.TYPE_BYTES:
        return st.sampled_from(list(known.blobs)) if known.blobs else st.binary(max_size=64)
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_ENUM:
        assert field.enum_type is not None
        numbers = [value.number for value in field.enum_type.values]
        # UNSPECIFIED (0) is refused where a choice is required: mostly a real choice.
        return weighted((4, st.sampled_from(numbers[1:] or numbers)), (1, st.just(numbers[0])))
    if kind in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return st.floats(0.0, 1.0, width=32)
    return st.integers(0, 10)


def calm_structs() -> st.SearchStrategy[struct_pb2.Struct]:
    leaves = st.one_of(st.sampled_from(CALM_WORDS), st.integers(-5, 5), st.booleans())
    return st.dictionaries(st.sampled_from(CALM_WORDS), leaves, max_size=3).map(_struct)


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def long_lists(element: st.SearchStrategy[T]) -> st.SearchStrategy[list[T]]:
    """Thousands of copies of one drawn element: cheap to draw, heavy for the server."""
    return st.builds(lambda item, n: [item] * n, element, st.integers(100, 5_000))


@st.composite
def messages(
    draw: st.DrawFn,
    message: descriptor.Descriptor,
    known: Known,
    depth: int = 0,
    huge: bool = True,
    calm: bool = False,
) -> Message:
    cls = GetMessageClass(message)
    result: Message = cls()
    if depth > MAX_DEPTH:
        return result
    chosen_oneofs = {
        oneof.name: draw(st.sampled_from([None, *oneof.fields])) for oneof in message.oneofs
    }
    for field in message.fields:
        if calm and (message.full_name, field.name) in known.output_only:
            continue
        oneof = field.containing_oneof
        if oneof is not None and chosen_oneofs[oneof.name] is not field:
            continue
        if oneof is None and draw(st.integers(0, 19)) >= _presence(field, depth, calm):
            continue
        set_field(draw, result, field, known, depth, huge, calm)
    return result


def _presence(field: FD, depth: int, calm: bool) -> int:
    """In twentieths: ids are mostly present, so that requests name a resource and get past
    "required" checks into the code behind them; a calm request sets most of the request's
    own fields and few of the nested messages'."""
    if field.name in ("app_id", "id") or field.name.endswith("_id"):
        return 17
    if calm:
        return 15 if depth == 0 else 5
    return 10


def element_strategy(
    field: FD, known: Known, depth: int, huge: bool, calm: bool = False
) -> st.SearchStrategy[Any]:
    if field.type == FD.TYPE_MESSAGE:
        assert field.message_type is not None
        name = field.message_type.full_name
        if calm and name == "google.protobuf.Struct":
            return calm_structs()
        well_known = _WELL_KNOWN.get(name)
        if well_known is not None:
            return well_known(huge)
        return messages(field.message_type, known, depth + 1, huge, calm)
    if calm:
        return calm_scalars(field, known)
    return scalars(field, known, huge)


def set_field(
    draw: st.DrawFn,
    result: Message,
    field: FD,
    known: Known,
    depth: int,
    huge: bool,
    calm: bool,
) -> None:
    target = getattr(result, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        entries = draw(
            st.dictionaries(
                scalars(key_field, known, huge=False),
                element_strategy(value_field, known, depth, huge=False),
                max_size=4,
            )
        )
        for key, value in entries.items():
            if value_field.type == FD.TYPE_MESSAGE:
                target[key].CopyFrom(value)
            else:
                target[key] = value
        return
    if field.is_repeated:
        element = element_strategy(field, known, depth, huge, calm)
        short = st.lists(element, min_size=1, max_size=3) if calm else st.lists(element, max_size=4)
        # Long lists repeat an element without huge values, so a request stays in megabytes.
        long = long_lists(element_strategy(field, known, depth, huge=False))
        items = draw(weighted((8, short), (1, long)) if huge and not calm else short)
        if field.type == FD.TYPE_MESSAGE:
            for item in items:
                target.add().CopyFrom(item)
        else:
            target.extend(items)
        return
    value = draw(element_strategy(field, known, depth, huge, calm))
    if field.type == FD.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(result, field.name, value)


# --- the wire ----------------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= 2**64 - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def wire_integers(message: descriptor.Descriptor) -> st.SearchStrategy[bytes]:
    """A varint field whose value no setter would accept: int64/uint64 extremes in any
    integer or enum field (decoders truncate them to the field's width)."""
    fields = [
        f for f in message.fields if f.type in _INT_RANGES or f.type in (FD.TYPE_ENUM, FD.TYPE_BOOL)
    ]
    if not fields:
        return st.just(b"")
    return st.builds(
        lambda field, value: varint(field.number << 3) + varint(value),
        st.sampled_from(fields),
        st.sampled_from([2**63 - 1, -(2**63), 2**64 - 1, 2**32, 2**31, -1, 999]),
    )


def mutated(serialized: bytes, draw: st.DrawFn) -> bytes:
    """A valid encoding cut short, with a byte flipped, or with a tail of garbage."""
    how = draw(st.sampled_from(["truncate", "flip", "append", "float"]))
    if how == "truncate" and serialized:
        return serialized[: draw(st.integers(0, len(serialized) - 1))]
    if how == "flip" and serialized:
        at = draw(st.integers(0, len(serialized) - 1))
        flipped = serialized[at] ^ draw(st.integers(1, 255))
        return serialized[:at] + bytes([flipped]) + serialized[at + 1 :]
    if how == "float":
        # Field 1 as a fixed64 NaN, whatever field 1 is: a wire type mismatch or a NaN.
        return serialized + b"\x09" + struct.pack("<d", math.nan)
    return serialized + draw(st.binary(min_size=1, max_size=64))
