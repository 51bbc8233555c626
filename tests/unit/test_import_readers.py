"""The archive reader's defences and decoders, on archives forged byte by byte."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from service.domain.errors import InvalidArgument
from service.domain.imported import ArchiveLimits
from service.formats.coco.rle import rle_counts, rle_png
from service.formats.safezip import SafeZip, _directory_size


def archive(entries: dict[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    buffer.seek(0)
    return buffer


def test_the_end_records_give_the_entry_count_before_zipfile_reads_the_directory() -> None:
    entries, directory = _directory_size(archive({"a": b"1", "b": b"2"})) or (0, 0)
    assert entries == 2 and 2 * 46 < directory < 2 * 100
    # Over 65,535 entries the count lives in the ZIP64 end record.
    many = archive({f"e{n}": b"" for n in range(70_000)})
    entries, directory = _directory_size(many) or (0, 0)
    assert entries == 70_000 and directory > 70_000 * 46
    assert _directory_size(io.BytesIO(b"no zip here" * 10)) is None
    with pytest.raises(InvalidArgument) as refused:
        SafeZip(many, ArchiveLimits(max_entries=69_999))
    assert "70000 entries" in refused.value.message


def test_an_entry_that_inflates_past_its_declared_size_is_refused() -> None:
    data = archive({"all/b_n1": bytes(200_000)}).getvalue()
    # Shrink the declared size in the central directory record (offset 24 of it): the
    # deflated stream still holds 200,000 bytes.
    at = data.rindex(b"PK\x01\x02")
    forged = data[: at + 24] + struct.pack("<L", 1000) + data[at + 28 :]
    reader = SafeZip(io.BytesIO(forged), ArchiveLimits())
    (entry,) = reader.entries
    with pytest.raises(InvalidArgument) as refused:
        reader.read(entry)
    assert refused.value.violations[0].field == 'archive["all/b_n1"]'


def test_only_entries_above_the_floor_are_held_to_the_ratio() -> None:
    limits = ArchiveLimits(max_ratio=100, ratio_floor_bytes=64 * 1024)
    small = SafeZip(archive({"zeros": bytes(64 * 1024)}), limits)
    assert len(small.read(small.entries[0])) == 64 * 1024
    with pytest.raises(InvalidArgument) as refused:
        SafeZip(archive({"zeros": bytes(64 * 1024 + 1)}), limits)
    assert refused.value.reason == "ARCHIVE_TOO_LARGE"


@pytest.mark.parametrize("seed", range(5))
def test_rle_masks_decode_as_pycocotools_encodes_them(seed: int) -> None:
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    mask = (rng.random((height, width)) > 0.6).astype(np.uint8)
    encoded = coco_mask.encode(np.asfortranarray(mask))
    counts = rle_counts(encoded["counts"].decode())
    assert sum(counts) == height * width
    png = Image.open(io.BytesIO(rle_png(encoded["counts"].decode(), height, width)))
    assert np.array_equal(np.array(png.convert("L")) > 0, mask.astype(bool))
    # The uncompressed form: the runs themselves.
    assert rle_counts(counts) == counts


def test_broken_rle_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cover 5 pixels"):
        rle_png([2, 3], 4, 4)
    with pytest.raises(ValueError, match="alphabet"):
        rle_counts("\x01")
