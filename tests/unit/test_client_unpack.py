"""Unpacking export archives on the client: hostile names, coordinates, bad layouts."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from datasetd.v1 import data_pb2, input_pb2

from service.client.unpack import ArchiveError, clean_name, unpack

PROTOBUF_MIMETYPE = b"application/x.clarifai-data+protobuf"


def archive(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as out:
        for name, data in entries.items():
            out.writestr(name, data)
    return path


def batch(*inputs: input_pb2.Input) -> bytes:
    return input_pb2.InputBatch(inputs=list(inputs)).SerializeToString()


def boxed(input_id: str, width: int = 0, height: int = 0) -> input_pb2.Input:
    edges = data_pb2.BoundingBox(top_row=0.25, left_col=0.5, bottom_row=0.75, right_col=1.0)
    region = data_pb2.Region(region_info=data_pb2.RegionInfo(bounding_box=edges))
    image = data_pb2.Image(
        base64=b"\x89PNG...",
        image_info=data_pb2.ImageInfo(width=width, height=height, format="PNG"),
    )
    return input_pb2.Input(id=input_id, data=data_pb2.Data(image=image, regions=[region]))


def test_clean_names_never_escape_the_directory() -> None:
    # One plain name: no separator, never hidden, never "." or "..".
    assert clean_name("../../etc/passwd") == "_.._etc_passwd"
    assert clean_name("..") == "input"
    assert clean_name("a b/c\\d") == "a_b_c_d"
    assert clean_name("ok-id_1.x") == "ok-id_1.x"


def test_hostile_ids_become_safe_unique_files(tmp_path: Path) -> None:
    path = archive(
        tmp_path / "a.zip",
        {
            "mimetype": PROTOBUF_MIMETYPE,
            "all/batch-000000_n3": batch(boxed("../evil"), boxed("_evil"), boxed("_EVIL")),
        },
    )
    target = tmp_path / "out"
    target.mkdir()
    stats = unpack(path, target, "clarifai_data_protobuf")
    assert stats.splits == {"all": 3} and stats.media_files == 3
    names = sorted(p.name for p in (target / "all" / "images").iterdir())
    assert names == ["_EVIL-3.png", "_evil-2.png", "_evil.png"]
    assert not (tmp_path / "evil.png").exists()


def test_unexpected_entries_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    for entries in (
        {"mimetype": PROTOBUF_MIMETYPE, "../all/batch-000000_n1": batch(boxed("x"))},
        {"mimetype": b"application/zip", "all/batch-000000_n1": batch(boxed("x"))},
        {"mimetype": PROTOBUF_MIMETYPE, "all/batch-000000_n1": b"\xff\xff\xff"},
    ):
        with pytest.raises(ArchiveError):
            unpack(archive(tmp_path / "bad.zip", entries), target, "clarifai_data_protobuf")


def test_pixels_need_the_image_size(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    sized = archive(
        tmp_path / "s.zip",
        {"mimetype": PROTOBUF_MIMETYPE, "all/batch-000000_n1": batch(boxed("x", 200, 100))},
    )
    unpack(sized, target, "clarifai_data_protobuf", normalized=False)
    line = json.loads((target / "all" / "annotations.jsonl").read_text())
    edges = line["input"]["data"]["regions"][0]["region_info"]["bounding_box"]
    assert edges == {"top_row": 25.0, "left_col": 100.0, "bottom_row": 75.0, "right_col": 200.0}

    unsized = archive(
        tmp_path / "u.zip",
        {"mimetype": PROTOBUF_MIMETYPE, "all/batch-000000_n1": batch(boxed("y"))},
    )
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match="image size"):
        unpack(unsized, other, "clarifai_data_protobuf", normalized=False)
