"""The archive reader of the client's unpackers (`service.client.unpack.Archive`): STORED
entries are sliced from a memory map, so the checks zipfile would make on them are made
there (local header, name, CRC-32, entries that share bytes); and the unpack's progress."""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from service.client import unpack as unpacking
from service.client.progress import Unit
from service.client.unpack import ArchiveError, unpack, unpack_vi, write_file

ASSET = b"png bytes of a"
LINE = b'{"asset_id": "a", "media_type": "image", "file_name": "assets/train/a.png"}\n'
# The offset field of a central directory record (after its signature and 38 bytes).
CENTRAL_OFFSET = 42


def vi_archive(path: Path, assets: int = 1) -> Path:
    with zipfile.ZipFile(path, "w") as zipped:
        zipped.writestr("assets/train/a.png", ASSET)
        for n in range(1, assets):
            zipped.writestr(f"assets/train/{n}.png", b"more")
        zipped.writestr("annotations/train.jsonl", LINE, zipfile.ZIP_DEFLATED)
    return path


def patched(path: Path, old: bytes, new: bytes) -> Path:
    """The archive with the first occurrence of `old` replaced (same length)."""
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    path.write_bytes(data.replace(old, new, 1))
    return path


def unpacked(archive: Path, tmp_path: Path) -> Path:
    target = tmp_path / "out"
    target.mkdir()
    unpack_vi(archive, target, annotations_only=False)
    return target


def test_stored_entries_are_written_as_they_are(tmp_path: Path) -> None:
    target = unpacked(vi_archive(tmp_path / "a.zip", assets=3), tmp_path)
    assert (target / "assets/train/a.png").read_bytes() == ASSET
    assert (target / "assets/train/2.png").read_bytes() == b"more"
    assert (target / "annotations/train.jsonl").read_bytes() == LINE


def test_damaged_stored_bytes_are_refused(tmp_path: Path) -> None:
    archive = patched(vi_archive(tmp_path / "a.zip"), ASSET, b"PNG bytes of a")
    with pytest.raises(ArchiveError, match="damaged"):
        unpacked(archive, tmp_path)


def test_a_local_header_naming_another_file_is_refused(tmp_path: Path) -> None:
    archive = patched(vi_archive(tmp_path / "a.zip"), b"assets/train/a.png", b"assets/train/b.png")
    with pytest.raises(ArchiveError, match="another name"):
        unpacked(archive, tmp_path)


def test_entries_sharing_their_bytes_are_refused(tmp_path: Path) -> None:
    """A central directory pointing many entries at the same bytes would write them many
    times over: a ZIP bomb made of STORED entries."""
    path = vi_archive(tmp_path / "a.zip", assets=2)
    with zipfile.ZipFile(path) as zipped:
        start = zipped.start_dir
    data = bytearray(path.read_bytes())
    first = data.index(b"PK\x01\x02", start)
    second = data.index(b"PK\x01\x02", first + 4)
    data[second + CENTRAL_OFFSET : second + CENTRAL_OFFSET + 4] = struct.pack("<L", 0)
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="share their bytes"):
        unpacked(path, tmp_path)


def test_write_file_writes_in_pieces_and_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unpacking, "_MAX_WRITE", 3)
    path = tmp_path / "f"
    path.write_bytes(b"an older and longer content")
    write_file(str(path), memoryview(b"0123456789"))
    assert path.read_bytes() == b"0123456789"


class Recording:
    """A Progress that keeps what it was told: each advance, and the sum per task."""

    def __init__(self) -> None:
        self.tasks: list[tuple[str, float | None, Unit]] = []
        self.advances: list[float] = []
        self.done: dict[str, float] = {}
        self.finished = 0

    def start(self, description: str, total: float | None, unit: Unit) -> None:
        self.tasks.append((description, total, unit))
        self.done[description] = 0

    def advance(self, amount: float = 1, failed: int = 0) -> None:
        self.advances.append(amount)
        self.done[self.tasks[-1][0]] += amount

    def finish(self) -> None:
        self.finished += 1

    def report(self, title: str, rows: Sequence[tuple[str, str]]) -> None:
        pass


def test_unpacking_reports_its_entries_a_batch_at_a_time(tmp_path: Path) -> None:
    entries = unpacking.PROGRESS_EVERY + 10
    archive = vi_archive(tmp_path / "a.zip", assets=entries - 1)
    target = tmp_path / "out"
    target.mkdir()
    progress = Recording()
    stats = unpack(archive, target, "vi_full", None, False, progress)
    assert stats.media_files == entries - 1
    assert progress.tasks == [("unpacking", entries, "files")]
    assert progress.advances == [unpacking.PROGRESS_EVERY, 10] and progress.finished == 1
