"""Unpacking a Vi archive (`service.client.unpack.unpack_vi`): the archive's own layout,
counts read from its lines, and entry names that are not the layout's refused."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from service.client.unpack import ArchiveError, unpack_vi

LINES = [
    {
        "asset_id": "a",
        "media_type": "image",
        "file_name": "assets/train/a.png",
        "tags": [{"id": "cat", "value": 1}, {"id": "dog", "value": 0}],
        "annotations": [{"id": "r", "type": "bounding_box"}],
    },
    {"asset_id": "b", "media_type": "image", "url": "https://example.com/b.png", "tags": []},
    {"asset_id": "t", "media_type": "text", "text": "hi", "frames": [{"tags": [{"id": "x"}]}]},
]


def archive(tmp_path: Path, extra: dict[str, bytes] | None = None) -> Path:
    path = tmp_path / "vi.zip"
    with zipfile.ZipFile(path, "w") as zipped:
        zipped.writestr("assets/train/a.png", b"png")
        zipped.writestr("annotations/train.jsonl", "".join(json.dumps(x) + "\n" for x in LINES))
        for name, data in (extra or {}).items():
            zipped.writestr(name, data)
        zipped.writestr("metadata.json", "{}")
    return path


def test_the_layout_is_kept_and_counted(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    stats = unpack_vi(archive(tmp_path), target, annotations_only=False)
    assert (target / "assets/train/a.png").read_bytes() == b"png"
    assert (target / "metadata.json").is_file()
    assert (stats.splits, stats.assets_count, stats.media_files) == ({"train": 3}, 3, 1)
    # cat, the box and the frame's tag; dog is a negative label.
    assert stats.annotations_count == 3
    assert stats.media_missing == ["b"]


def test_annotations_only_writes_no_asset(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    stats = unpack_vi(archive(tmp_path), target, annotations_only=True)
    assert not (target / "assets").exists() and stats.media_files == 0
    assert (target / "annotations/train.jsonl").is_file()


@pytest.mark.parametrize("name", ["../evil", "assets/train/../../x", "/abs", "assets/Train/a", "x"])
def test_names_out_of_the_layout_are_refused(tmp_path: Path, name: str) -> None:
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(ArchiveError, match="unexpected archive entry"):
        unpack_vi(archive(tmp_path, {name: b"!"}), target, annotations_only=False)
    assert not (tmp_path / "evil").exists()
