"""Reading Clarifai-Data-Protobuf import archives (export-formats.md §5): a `mimetype`
entry, then InputBatch entries whose inputs become drafts with their regions and frames
as annotations."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import cast

from datasetd.v1 import data_pb2, input_pb2
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError

from service.domain.imported import ARCHIVE_FIELD, ImportedAnnotation, ImportedInput
from service.formats.clarifai import JSON_MIMETYPE, MIMETYPE_ENTRY, PROTOBUF_MIMETYPE
from service.formats.safezip import SafeZip, entry_path, invalid_archive
from service.wire.annotations import data_to_json
from service.wire.inputs import input_draft

_EXPECTED = PROTOBUF_MIMETYPE.encode()
_MAX_MIMETYPE_BYTES = 256
_COUNT_SUFFIX = re.compile(r"_n(\d+)$")


def protobuf_batches(archive: SafeZip) -> Iterator[list[ImportedInput]]:
    _check_mimetype(archive)
    for info in archive.entries:
        if info.filename == MIMETYPE_ENTRY:
            continue
        where = entry_path(info.orig_filename)
        batch = _input_batch(where, archive.read(info))
        named = _COUNT_SUFFIX.search(info.filename)
        if named is not None and int(named.group(1)) != len(batch.inputs):
            raise invalid_archive(
                where,
                f"is named for {int(named.group(1))} inputs but holds {len(batch.inputs)}",
            )
        yield [
            _imported_input(f"{where}.inputs[{index}]", message)
            for index, message in enumerate(batch.inputs)
        ]


def _check_mimetype(archive: SafeZip) -> None:
    mimetype = archive.find(MIMETYPE_ENTRY)
    if mimetype is None:
        raise invalid_archive(
            ARCHIVE_FIELD,
            'has no "mimetype" entry; a Clarifai-Data-Protobuf archive has one holding '
            f"exactly {PROTOBUF_MIMETYPE}",
        )
    expected = f"a Clarifai-Data-Protobuf archive has exactly {PROTOBUF_MIMETYPE}"
    # Not read when large: anything longer than a media type is wrong anyway.
    if mimetype.file_size > _MAX_MIMETYPE_BYTES:
        raise invalid_archive(
            entry_path(MIMETYPE_ENTRY), f"is {mimetype.file_size} bytes; {expected}"
        )
    value = bytes(archive.read(mimetype))
    if value != _EXPECTED:
        hint = " (a Clarifai-Data-JSON archive: import its protobuf export instead)"
        raise invalid_archive(
            entry_path(MIMETYPE_ENTRY),
            f"is {value!r}{hint if value == JSON_MIMETYPE.encode() else ''}; {expected}",
        )


def _input_batch(where: str, content: bytearray) -> input_pb2.InputBatch:
    problem = "is not a serialized InputBatch; every entry but mimetype must be one"
    try:
        # Parsing takes any buffer; the annotation says bytes.
        batch = input_pb2.InputBatch.FromString(cast(bytes, content))
    except DecodeError as exc:
        raise invalid_archive(where, f"{problem} ({exc})") from exc
    if len(unknown_fields.UnknownFieldSet(batch)):
        raise invalid_archive(where, f"{problem} (it has fields an InputBatch does not)")
    return batch


def _imported_input(path: str, message: input_pb2.Input) -> ImportedInput:
    draft = input_draft(message)
    # Embedded bytes win over a reference: an export with embedded media may keep the
    # URL it was made from. Memberships of the source deployment mean nothing here.
    # Regions and frames become the annotations below, not the one CreateInputs makes.
    url = "" if draft.data or draft.text else draft.url
    # The size an export wrote is read again from embedded bytes; a URL image keeps it,
    # so that its regions still export in pixels.
    size = None if draft.data else draft.image_size
    draft = dataclasses.replace(draft, url=url, dataset_ids=[], annotation={}, image_size=size)
    data = message.data
    # One annotation per region, as annotation tools make them, and one for all video
    # frames (a track); a version folds them back into the same `data`.
    annotations = [
        ImportedAnnotation(
            f"{path}.data.regions[{index}]",
            data_to_json(data_pb2.Data(regions=[region])),
            root=".regions[0]",
        )
        for index, region in enumerate(data.regions)
    ]
    if data.frames:
        annotations.append(
            ImportedAnnotation(f"{path}.data", data_to_json(data_pb2.Data(frames=data.frames)))
        )
    return ImportedInput(path, draft, tuple(annotations))
