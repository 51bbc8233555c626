"""Writing Clarifai-Data-Protobuf and Clarifai-Data-JSON archives (export-formats.md §1, §2).

Layout: `mimetype` first, then batch entries `<split>/batch-<nnnnnn>_n<count>` of at most
MAX_BATCH_INPUTS inputs (fewer when their bytes reach MAX_BATCH_BYTES, or when pending
batches of several splits together hold MAX_PENDING_BYTES), nothing else.

Without embedded media a protobuf batch is the members' stored bytes framed as repeated
field 1 of InputBatch: the version's content is already laid out as the format's Input.
With embed_media the media bytes are copied from the object store into the entry (read
ahead within a memory bound, large files streamed: media_reads), never a batch of them
held whole: an input is written as its stored bytes (without `url` and `hosted`)
followed by a second `data { <medium> { base64 } }` field, whose lengths are known from
the stored size. Protobuf parsers merge repeated occurrences of a message field, so
readers see one Input with its media in `data.<medium>.base64`. The JSON variant splices
the base64 text into the input's JSON the same way.

When the version captured an ontology, a concept without a name (of the input, its
regions, its frames and their regions) is written with the `display_name` of the class
of its id as `name`; the stored bytes are then re-serialized (deterministically) instead
of copied. Concepts that have a name, and those of no class, are written as stored; an
input is parsed only when its stored bytes hold an unnamed concept of a named class
(_Unnamed), so the inputs with nothing to name cost no more than without an ontology.

Given a hosted prefix (the HTTP address of the app's stored originals), the `hosted.prefix`
of every stored original is that prefix instead of the object-store one the version
recorded, so that Clarifai's reader can fetch prefix + "/orig/" + suffix. Copied stored
bytes get it as an appended `data { <medium> { hosted { prefix } } }` (merged by readers,
last value wins: _hosted_overrides), parsed inputs by setting the field.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import secrets
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from datasetd.v1 import data_pb2, input_pb2
from google.protobuf import json_format

from service.domain.models import (
    ExportFormat,
    FidelityReport,
    StoredBlob,
    VersionMember,
    VersionOntology,
)
from service.domain.ontologies import walk
from service.domain.ports import ByteSink, MediaStreams
from service.formats.clarifai import JSON_MIMETYPE, MIMETYPE_ENTRY, PROTOBUF_MIMETYPE
from service.formats.media_reads import READ_AHEAD, ReadAhead, chunks_of, read_ahead
from service.formats.snapshot import labels_of, parse
from service.formats.zipstream import ZipStream
from service.wire.inputs import MEDIA, Medium, medium_of

MIMETYPES = {
    ExportFormat.CLARIFAI_DATA_PROTOBUF: PROTOBUF_MIMETYPE,
    ExportFormat.CLARIFAI_DATA_JSON: JSON_MIMETYPE,
}
MAX_BATCH_INPUTS = 1000
MAX_BATCH_BYTES = 32 * 1024 * 1024
MAX_PENDING_BYTES = 64 * 1024 * 1024

_BATCH_INPUTS = input_pb2.InputBatch.DESCRIPTOR.fields_by_name["inputs"].number
_INPUT_DATA = input_pb2.Input.DESCRIPTOR.fields_by_name["data"].number
_DATA_FIELDS = data_pb2.Data.DESCRIPTOR.fields_by_name
_CONCEPT_FIELDS = data_pb2.Concept.DESCRIPTOR.fields_by_name
_CONCEPT_ID = _CONCEPT_FIELDS["id"].number
# datasetd's own fields of Input (numbered from 100, unknown to the Clarifai model). Binary
# readers skip unknown fields, JSON readers refuse them: the JSON variant leaves them out.
_EXTENSIONS = tuple(f.name for f in input_pb2.Input.DESCRIPTOR.fields if f.number >= 100)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(number: int, length: int) -> bytes:
    """The tag and length of a length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(length)


def _hosted_number(medium: Medium) -> int:
    media_message = _DATA_FIELDS[medium].message_type
    assert media_message is not None
    return int(media_message.fields_by_name["hosted"].number)


# Data's media fields, each with the number of its `hosted` (the way down to a stored
# original's HostedURL), and HostedURL's `prefix`.
_HOSTED_OF_MEDIUM = {_DATA_FIELDS[medium].number: _hosted_number(medium) for medium in MEDIA}
_HOSTED_PREFIX = data_pb2.HostedURL.DESCRIPTOR.fields_by_name["prefix"].number


def _varint_from(buf: bytes, at: int, value: int) -> tuple[int, int]:
    """The rest of a varint whose first byte, `value`, had its high bit set; and its end."""
    value &= 0x7F
    shift = 7
    while True:
        byte = buf[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _find(
    buf: bytes, at: int, end: int, wanted: Container[int]
) -> tuple[int, int, int, int] | None:
    """The first length-delimited field of the message in buf[at:end] whose number is in
    `wanted`: (number, start of its tag, start of its value, end), the other fields only
    stepped over. Straight-line on purpose: this runs once per level per member."""
    while at < end:
        start = at
        tag = buf[at]
        at += 1
        if tag >= 0x80:
            tag, at = _varint_from(buf, at, tag)
        wire = tag & 7
        if wire == 2:
            size = buf[at]
            at += 1
            if size >= 0x80:
                size, at = _varint_from(buf, at, size)
            if tag >> 3 in wanted:
                return tag >> 3, start, at, at + size
            at += size
        elif wire == 0:
            while buf[at] >= 0x80:
                at += 1
            at += 1
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        else:  # groups: not in proto3 messages
            raise ValueError(f"unexpected wire type {wire}")
    return None


_INPUT_DATA_ONLY = frozenset({_INPUT_DATA})


def _medium_number(stored: bytes) -> int | None:
    """The field number of a stored input's medium in Data (None without one). Images and
    videos, fields 1 and 2 of Data, are its first field in stored (field-order) bytes:
    one byte tells them; audio and text are looked for."""
    data = _find(stored, 0, len(stored), _INPUT_DATA_ONLY)
    if data is None:
        return None
    _, _, data_at, data_end = data
    if data_at < data_end and (first := stored[data_at] >> 3) in _HOSTED_OF_MEDIUM:
        return first
    medium = _find(stored, data_at, data_end, _HOSTED_OF_MEDIUM)
    return None if medium is None else medium[0]


def _hosted_overrides(prefix: str) -> dict[int, bytes]:
    """By medium field number, the bytes of `data { <medium> { hosted { prefix } } }`.

    Appended to a stored input they set its `hosted.prefix`: protobuf parsers merge the
    repeated occurrences of a message field and keep the last value of a string (the
    rule the embedded media rely on too), so suffix and sizes stay as stored. The same
    bytes for every input of a medium: the stored bytes are still copied, not parsed."""
    raw = prefix.encode()
    prefix_field = _length_delimited(_HOSTED_PREFIX, len(raw)) + raw
    overrides = {}
    for number, hosted_number in _HOSTED_OF_MEDIUM.items():
        hosted = _length_delimited(hosted_number, len(prefix_field)) + prefix_field
        medium = _length_delimited(number, len(hosted)) + hosted
        overrides[number] = _length_delimited(_INPUT_DATA, len(medium)) + medium
    return overrides


# The tag of a Concept's `name`.
_NAME_TAG = _varint(_CONCEPT_FIELDS["name"].number << 3 | 2)


def _media_field(medium: Medium, size: int) -> bytes:
    """`data { <medium> { base64: ` up to the `size` media bytes that follow."""
    medium_field = _DATA_FIELDS[medium]
    media_message = medium_field.message_type
    assert media_message is not None
    inner = _length_delimited(media_message.fields_by_name["base64"].number, size)
    middle = _length_delimited(medium_field.number, len(inner) + size)
    return _length_delimited(_INPUT_DATA, len(middle) + len(inner) + size) + middle + inner


def display_names(ontology: VersionOntology | None) -> dict[str, str]:
    """The display name of every class of an ontology that has one, by class id."""
    if ontology is None:
        return {}
    return {
        item.id: item.display_name
        for tree in (ontology.classes, ontology.input_classifications)
        for _, _, item in walk(tree, "")
        if item.display_name
    }


class _Unnamed:
    """Finds, in an input's stored bytes, a concept that may need a name: one whose `id`
    is a class with a display name and whose `name` is not set.

    A Concept's `id` is field 1 and its `name` field 2: stored inputs are serialized in
    field order (upb), so a set name directly follows the id. The bytes of `id = <class>`
    not followed by a non-empty `name` are a necessary sign of a concept to name; a false
    alarm (the same bytes in another field) only costs the parse that finds nothing. The
    ids are matched as a trie, so the search costs about the same for any number of
    classes."""

    def __init__(self, names: dict[str, str]) -> None:
        encoded = [
            _length_delimited(_CONCEPT_ID, len(raw)) + raw
            for raw in (class_id.encode() for class_id in names)
        ]
        name_follows = re.escape(_NAME_TAG) + b"[^\\x00]"
        self._pattern = re.compile(_trie(encoded) + b"(?!" + name_follows + b")")

    def found(self, data: bytes) -> bool:
        return self._pattern.search(data) is not None


def _trie(words: list[bytes]) -> bytes:
    """A regular expression matching any of `words`, none of which is a prefix of
    another, branching on one byte at a time."""
    root: dict[int, Any] = {}
    for word in words:
        node = root
        for byte in word:
            node = node.setdefault(byte, {})

    def render(node: dict[int, Any]) -> bytes:
        branches = [re.escape(bytes([byte])) + render(node[byte]) for byte in sorted(node)]
        if len(branches) <= 1:
            return b"".join(branches)
        return b"(?:" + b"|".join(branches) + b")"

    return render(root)


def _name_concepts(data: data_pb2.Data, names: dict[str, str]) -> int:
    """Gives each concept of `data`, its regions, its frames and their regions without a
    name the name of its class; returns how many it named. Only where concepts can be
    (domain.annotation_rules refuses regions in a region's data and nested frames):
    reading the empty repeated fields was most of what a walk down every Data cost."""
    groups = [data.concepts]
    groups += [region.data.concepts for region in data.regions]
    for frame in data.frames:
        groups.append(frame.data.concepts)
        groups += [region.data.concepts for region in frame.data.regions]
    named = 0
    for concepts in groups:
        for concept in concepts:
            if not concept.name and concept.id in names:
                concept.name = names[concept.id]
                named += 1
    return named


def _base64_size(size: int) -> int:
    return -(-size // 3) * 4


class _Base64Chunks:
    """Base64 of a byte stream, chunk by chunk: each chunk encodes whole 3-byte groups
    and carries the rest over."""

    def __init__(self) -> None:
        self._carry = b""

    def encode(self, chunk: bytes) -> bytes:
        data = self._carry + chunk
        whole = len(data) - len(data) % 3
        self._carry = data[whole:]
        return base64.b64encode(data[:whole])

    def end(self) -> bytes:
        tail, self._carry = self._carry, b""
        return base64.b64encode(tail)


@dataclass(frozen=True)
class _Item:
    """One encoded input: `before`, then the media (if embedded), then `after`."""

    before: bytes
    after: bytes = b""
    media: StoredBlob | None = None
    media_size: int = 0

    @property
    def size(self) -> int:
        return len(self.before) + self.media_size + len(self.after)


@dataclass
class _Batch:
    items: list[_Item] = field(default_factory=list)
    size: int = 0
    memory: int = 0


class ClarifaiDataWriter:
    """An ArchiveWriter of the protobuf or JSON variant."""

    needs_census = False

    def __init__(
        self,
        export_format: ExportFormat,
        embed_media: bool,
        sink: ByteSink,
        modified: datetime,
        streams: MediaStreams,
        ontology: VersionOntology | None = None,
        reads: ReadAhead = READ_AHEAD,
        hosted_prefix: str | None = None,
    ) -> None:
        self._json = export_format is ExportFormat.CLARIFAI_DATA_JSON
        # Replaces the object-store prefix the version recorded in `hosted`, which no
        # client outside can fetch.
        self._hosted_prefix = hosted_prefix
        self._overrides = _hosted_overrides(self._hosted_prefix or "")
        self._names = display_names(ontology)
        self._unnamed = _Unnamed(self._names) if self._names else None
        self._mimetype = MIMETYPES[export_format]
        self._embed = embed_media
        self._zip = ZipStream(sink, modified)
        self._streams = streams
        self._reads = reads
        self._started = False
        self._pending: dict[str, _Batch] = {}
        self._pending_memory = 0
        self._batches: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter()
        # Marks where the base64 text goes in an input's JSON; random, so that no
        # caller-chosen text (metadata, ids) can be mistaken for it.
        self._marker = f"datasetd-media-{secrets.token_hex(16)}"
        self._token = json.dumps(self._marker).encode()
        if self._json:
            self._open, self._separator, self._close = b'{"inputs":[', b",", b"]}"
        else:
            self._open, self._separator, self._close = b"", b"", b""

    async def observe(self, members: list[VersionMember]) -> list[frozenset[str]]:
        return await self.labels(members)

    async def labels(self, members: list[VersionMember]) -> list[frozenset[str]]:
        return await asyncio.to_thread(labels_of, [m.data for m in members])

    async def write(self, split: str, members: list[VersionMember]) -> int:
        await self._start()
        for item in await asyncio.to_thread(lambda: [self._encode(m) for m in members]):
            batch = self._pending.get(split)
            if batch is not None and (
                len(batch.items) >= MAX_BATCH_INPUTS or batch.size + item.size > MAX_BATCH_BYTES
            ):
                await self._flush(split)
            batch = self._pending.setdefault(split, _Batch())
            batch.items.append(item)
            batch.size += item.size + len(self._separator)
            memory = len(item.before) + len(item.after)
            batch.memory += memory
            self._pending_memory += memory
            while self._pending_memory > MAX_PENDING_BYTES:
                await self._flush(max(self._pending, key=lambda s: self._pending[s].memory))
        return len(members)

    async def finish(self) -> FidelityReport:
        await self._start()
        for split in sorted(self._pending):
            await self._flush(split)
        await self._zip.close()
        return self._fidelity()

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            await self._zip.add(MIMETYPE_ENTRY, self._mimetype.encode(), compress=False)

    def _encode(self, member: VersionMember) -> _Item:
        message: input_pb2.Input | None = None
        medium: Medium | None = None
        rewritten = self._embed
        unnamed = self._unnamed is not None and self._unnamed.found(member.data)
        if self._json or self._embed or unnamed:
            message = parse(member.data)
            if unnamed:
                rewritten = _name_concepts(message.data, self._names) > 0 or rewritten
            if self._embed:
                medium = self._detach_media(message, member.blob)
            if self._hosted_prefix is not None and member.blob is not None:
                # Media not embedded (texts without raw content) keep their `hosted`.
                rewritten = self._rehost_message(message) or rewritten
        if self._json:
            assert message is not None
            return self._encode_json(message, medium, member.blob)
        # Unchanged, the stored bytes are copied as they are.
        if message is not None and rewritten:
            head = message.SerializeToString(deterministic=True)
        elif message is None and self._hosted_prefix is not None and member.blob is not None:
            medium_number = _medium_number(member.data)
            head = member.data
            if medium_number is not None:
                head += self._overrides[medium_number]
        else:
            head = member.data
        if medium is None or member.blob is None:
            return _Item(_length_delimited(_BATCH_INPUTS, len(head)) + head)
        size = member.blob.size
        media_field = _media_field(medium, size)
        frame = _length_delimited(_BATCH_INPUTS, len(head) + len(media_field) + size)
        return _Item(frame + head + media_field, media=member.blob, media_size=size)

    def _encode_json(
        self, message: input_pb2.Input, medium: Medium | None, blob: StoredBlob | None
    ) -> _Item:
        # Enum values as numbers: the value names of datasetd.v1 carry prefixes that
        # the Clarifai model's do not, so only numbers read the same in both.
        document: dict[str, Any] = json_format.MessageToDict(
            message, use_integers_for_enums=True, preserving_proto_field_name=True
        )
        for name in _EXTENSIONS:
            if document.pop(name, None) is not None:
                self._dropped[f"{name}s"] += 1
        if medium is None or blob is None:
            return _Item(_dumps(document))
        document.setdefault("data", {}).setdefault(medium, {})["base64"] = self._marker
        text = _dumps(document)
        # Split inside the string's quotes: the base64 text goes between them.
        at = text.index(self._token)
        before, after = text[: at + 1], text[at + len(self._token) - 1 :]
        return _Item(before, after, blob, _base64_size(blob.size))

    def _rehost_message(self, message: input_pb2.Input) -> bool:
        """Sets the `hosted.prefix` of a parsed input's medium; whether it had `hosted`."""
        medium = medium_of(message.data)
        if medium is None or self._hosted_prefix is None:
            return False
        media = getattr(message.data, medium)
        if not media.HasField("hosted"):
            return False
        media.hosted.prefix = self._hosted_prefix
        return True

    def _detach_media(self, message: input_pb2.Input, blob: StoredBlob | None) -> Medium | None:
        """Clears the media reference of an input whose bytes are embedded; returns the
        medium whose bytes follow (None for texts, whose content is in `raw`)."""
        data = message.data
        medium = medium_of(data)
        if medium is None:
            return None
        media = getattr(data, medium)
        if medium == "text" and data.text.raw:
            media.ClearField("url")
            media.ClearField("hosted")
            return None
        if blob is None or medium == "text":
            self._dropped["media_not_embedded"] += 1
            return None
        media.ClearField("url")
        media.ClearField("hosted")
        return medium

    async def _flush(self, split: str) -> None:
        batch = self._pending.pop(split)
        self._pending_memory -= batch.memory
        name = f"{split}/batch-{self._batches[split]:06d}_n{len(batch.items)}"
        self._batches[split] += 1
        framed = len(self._open) + batch.size + len(self._close)
        if not any(item.media is not None for item in batch.items):
            body = self._separator.join(item.before + item.after for item in batch.items)
            await self._zip.add(name, self._open + body + self._close, compress=True)
            return
        # Media are mostly compressed formats already: deflating them costs CPU for nothing.
        async with self._zip.open(name, size=framed, compress=False) as entry:
            await entry.write(self._open)
            files = [(item, item.media) for item in batch.items if item.media is not None]
            async with contextlib.aclosing(read_ahead(self._streams, files, self._reads)) as ready:
                for index, item in enumerate(batch.items):
                    if index:
                        await entry.write(self._separator)
                    await entry.write(item.before)
                    if item.media is not None:
                        _, blob, content = await anext(ready)
                        encoder = _Base64Chunks() if self._json else None
                        async for chunk in chunks_of(self._streams, blob, content):
                            await entry.write(encoder.encode(chunk) if encoder else chunk)
                        if encoder is not None:
                            await entry.write(encoder.end())
                    await entry.write(item.after)
            await entry.write(self._close)

    def _fidelity(self) -> FidelityReport:
        notes = []
        if self._embed:
            notes.append(
                "media bytes are embedded in data.<medium>.base64 (texts are in data.text.raw)"
            )
            if self._dropped["media_not_embedded"]:
                notes.append(
                    "inputs whose media are only referenced by a URL keep that URL instead "
                    "of embedded bytes"
                )
        elif self._hosted_prefix is not None:
            notes.append(
                "media are referenced, not embedded: hosted (size orig) names the stored "
                "original under this deployment's HTTP port (fetched with a key of the app), "
                "url its place in the bucket (s3://...); inputs created from a URL keep it"
            )
        else:
            notes.append(
                "media are referenced, not embedded: url and hosted (size orig) name the "
                "stored original in this deployment's bucket (s3://...); inputs created from "
                "a URL keep it"
            )
        if self._names:
            notes.append(
                "concepts without a name are named with the display_name of their class in "
                "the ontology the version was built against"
            )
        if self._json:
            notes.append("enum values are written as numbers (protobuf JSON mapping)")
            if self._dropped["titles"]:
                notes.append(
                    "input titles are left out: they are datasetd's own field, which JSON "
                    "readers of the Clarifai model refuse"
                )
        return FidelityReport(dict(sorted(self._dropped.items())), notes)


def _dumps(document: dict[str, Any]) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
