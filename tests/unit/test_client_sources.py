"""Folder, CSV and COCO readers of the client, and the request ids of the upload engine."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.client.sources import (
    BAD_SOURCE,
    Box,
    UploadItem,
    clean_id,
    parse_metadata,
    read_coco,
    read_csv,
    scan_folder,
)
from service.client.sources import Failure as LogFailure
from service.client.upload.failures import read_failure_log, write_failure_log
from service.client.upload.messages import annotation_message, input_message, request_id_of
from service.client.upload.plan import MAX_BATCH, plan_inputs


def write(path: Path, content: bytes | str = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


# --- folders --------------------------------------------------------------------------------


def test_folder_recurses_in_sorted_order_with_labels_from_the_parent(tmp_path: Path) -> None:
    root = tmp_path / "animals"
    write(root / "top.PNG")
    write(root / "dogs" / "b.jpg")
    write(root / "cats" / "z.jpeg")
    write(root / "cats" / "a.webp")
    write(root / "cats" / "small" / "kitten.GIF")
    write(root / "cats" / "notes.txt")
    write(root / "readme.md")
    scan = scan_folder(root, "image", labels=True)
    assert [i.source for i in scan.items] == [
        "cats/a.webp",
        "cats/small/kitten.GIF",
        "cats/z.jpeg",
        "dogs/b.jpg",
        "top.PNG",
    ]
    assert [i.concepts for i in scan.items] == [
        ("cats",),
        ("small",),
        ("cats",),
        ("dogs",),
        ("animals",),
    ]
    assert [i.input_id for i in scan.items] == ["a", "kitten", "z", "b", "top"]
    assert scan.skipped == 2 and scan.failures == []
    assert all(Path(i.path or "").is_absolute() and i.kind == "image" for i in scan.items)

    unlabelled = scan_folder(root, "image")
    assert all(i.concepts == () for i in unlabelled.items)


def test_folder_text_files_and_every_image_extension(tmp_path: Path) -> None:
    for ext in ("jpg", "jpeg", "png", "webp", "tiff", "tif", "bmp", "gif"):
        write(tmp_path / f"img-{ext}.{ext.upper()}")
    write(tmp_path / "doc.txt", "hello")
    images = scan_folder(tmp_path, "image")
    assert len(images.items) == 8 and images.skipped == 1
    texts = scan_folder(tmp_path, "text")
    assert [(i.input_id, i.kind) for i in texts.items] == [("doc", "text")]
    assert texts.skipped == 8


def test_folder_ids_are_cleaned_and_collisions_fail_the_later_file(tmp_path: Path) -> None:
    write(tmp_path / "a" / "my photo (1).png")
    write(tmp_path / "b" / "my_photo__1_.png")
    write(tmp_path / ("x" * 80 + ".png"))
    scan = scan_folder(tmp_path, "image")
    assert [i.input_id for i in scan.items] == ["my_photo__1_", "x" * 64]
    assert scan.items[0].source == "a/my photo (1).png"
    [failure] = scan.failures
    assert failure.source == "b/my_photo__1_.png"
    assert failure.code == BAD_SOURCE and "a/my photo (1).png" in failure.reason
    assert failure.index == 2


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a folder"):
        scan_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="input_type"):
        scan_folder(tmp_path, "picture")


def test_clean_id() -> None:
    assert clean_id("héllo wörld.v2") == "h_llo_w_rld_v2"
    assert clean_id("ok-id_1") == "ok-id_1"
    assert len(clean_id("y" * 100)) == 64


# --- CSV ------------------------------------------------------------------------------------


def csv_file(tmp_path: Path, text: str) -> Path:
    return write(tmp_path / "data.csv", text)


def test_csv_rows_become_items_in_any_column_order(tmp_path: Path) -> None:
    path = csv_file(
        tmp_path,
        "concepts,input,inputid,geopoints,metadata\n"
        '"cat, dog ,cat",https://example.com/a.png,a1,"10.5,-20",'
        '"{""source"": ""camera"", ""n"": 2}"\n'
        ",https://example.com/b.png,,,\n",
    )
    scan = read_csv(path, "ds", "image", "url")
    assert scan.failures == []
    first, second = scan.items
    assert first == UploadItem(
        "a1",
        "image",
        url="https://example.com/a.png",
        concepts=("cat", "dog"),
        metadata={"source": "camera", "n": 2},
        geo=(10.5, -20.0),
        source="data.csv:2",
    )
    assert second.input_id.startswith("csv-") and len(second.input_id) <= 64
    assert scan.indexes == [2, 3]
    # Derived ids depend on the dataset and the row, not on chance.
    assert read_csv(path, "ds", "image", "url").items[1].input_id == second.input_id
    assert read_csv(path, "other", "image", "url").items[1].input_id != second.input_id
    assert read_csv(path, "ds", "image", "url", labels=False).items[0].concepts == ()


def test_csv_header_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="header row is required"):
        read_csv(csv_file(tmp_path, ""), "ds")
    with pytest.raises(ValueError, match=r"'url', 'label'.*allowed: inputid, input, concepts"):
        read_csv(csv_file(tmp_path, "input,url,label\nx,y,z\n"), "ds")
    with pytest.raises(ValueError, match="'input' column is required"):
        read_csv(csv_file(tmp_path, "inputid,concepts\na,b\n"), "ds")
    with pytest.raises(ValueError, match="more than once"):
        read_csv(csv_file(tmp_path, "input,Input\na,b\n"), "ds")
    with pytest.raises(ValueError, match="text inputs only"):
        read_csv(csv_file(tmp_path, "input\nhello\n"), "ds", "image", "raw")
    with pytest.raises(ValueError, match="csv_type"):
        read_csv(csv_file(tmp_path, "input\nhello\n"), "ds", "image", "ftp")


def test_csv_single_quoted_metadata_keeps_apostrophes(tmp_path: Path) -> None:
    path = csv_file(
        tmp_path,
        "input,metadata\n"
        "https://e.com/1.png,\"{'source': 'local', 'note': \"\"it's fine\"\", 'ok': True}\"\n",
    )
    [item] = read_csv(path, "ds").items
    assert item.metadata == {"source": "local", "note": "it's fine", "ok": True}
    assert parse_metadata('{"a": "b\'s"}') == {"a": "b's"}
    assert parse_metadata("{'a': None, 'b': [1, 2.5]}") == {"a": None, "b": [1, 2.5]}
    for bad, reason in [
        ("[1, 2]", "must be an object"),
        ("{'a': (1, 2)}", "cannot represent"),
        ("{1: 'x'}", "cannot represent"),
        ("{'a': b'x'}", "not JSON-compatible"),
        ("{not json", "neither"),
        ("__import__('os')", "neither"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_metadata(bad)


def test_csv_bad_rows_are_reported_with_their_starting_line(tmp_path: Path) -> None:
    path = csv_file(
        tmp_path,
        "inputid,input,metadata,geopoints\n"  # line 1
        'ok1,https://e.com/1.png,"{""multi"":\n""line""}",\n'  # lines 2-3
        "badgeo,https://e.com/2.png,,200,10\n"  # line 4: 5 fields
        'badlon,https://e.com/2.png,,"200,10"\n'  # line 5
        'badlat,https://e.com/3.png,,"10,-91"\n'  # line 6
        'nan,https://e.com/4.png,,"x,1"\n'  # line 7
        "badmeta,https://e.com/5.png,[1],\n"  # line 8
        "\n"  # line 9: blank, ignored
        "bad id!,https://e.com/6.png,,\n"  # line 10
        "noinput,,,\n"  # line 11
        "notaurl,/tmp/x.png,,\n"  # line 12
        "ok1,https://e.com/7.png,\"{'x':\n1}\",\n"  # lines 13-14: repeated id
        'ok2,https://e.com/8.png,,"-122.4,37.8"\n',  # line 15
    )
    scan = read_csv(path, "ds")
    assert [(i.input_id, index) for i, index in zip(scan.items, scan.indexes, strict=True)] == [
        ("ok1", 2),
        ("ok2", 15),
    ]
    assert scan.items[0].metadata == {"multi": "line"}
    assert scan.items[1].geo == (-122.4, 37.8)
    reasons = {f.index: f.reason for f in scan.failures}
    assert sorted(reasons) == [4, 5, 6, 7, 8, 10, 11, 12, 13]
    assert "5 fields" in reasons[4]
    assert "longitude must be -180..180" in reasons[5]
    assert "latitude must be -90..90" in reasons[6]
    assert "two numbers" in reasons[7]
    assert "must be an object" in reasons[8]
    assert "[A-Za-z0-9_-]" in reasons[10]
    assert "input is empty" in reasons[11]
    assert "http(s) URL" in reasons[12]
    assert "repeats line 2" in reasons[13]
    assert {f.source for f in scan.failures if f.index == 13} == {"data.csv:13"}
    assert all(f.code == BAD_SOURCE and f.item is None for f in scan.failures)


def test_csv_raw_text_and_file_paths(tmp_path: Path) -> None:
    raw = csv_file(tmp_path, 'input,concepts\n"Hello, world\nsecond line",greeting\n')
    [item] = read_csv(raw, "ds", "text", "raw").items
    assert (item.kind, item.text, item.concepts) == (
        "text",
        "Hello, world\nsecond line",
        ("greeting",),
    )

    write(tmp_path / "imgs" / "a.png")
    paths = csv_file(tmp_path, f"input\nimgs/a.png\n{tmp_path / 'abs.png'}\n")
    first, second = read_csv(paths, "ds", "image", "file_path").items
    assert first.path == str(tmp_path / "imgs" / "a.png") and first.title == "a.png"
    assert second.path == str(tmp_path / "abs.png")


# --- COCO -----------------------------------------------------------------------------------


def test_coco_boxes_are_normalised_and_bad_ones_reported(tmp_path: Path) -> None:
    document = {
        "images": [
            {"id": 1, "file_name": "sub/one.png", "width": 200, "height": 100},
            {"id": 2, "file_name": "two.png", "width": 50, "height": 50},
            {"id": 3, "file_name": "other/one.png", "width": 10, "height": 10},
        ],
        "categories": [{"id": 7, "name": "traffic light"}, {"id": 8, "name": "cat"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [20, 10, 100, 50]},
            {"id": 11, "image_id": 2, "category_id": 8, "bbox": [0, 0, 50.4, 50]},
            {"id": 12, "image_id": 2, "category_id": 8, "bbox": [10, 10, 60, 5]},
            {"id": 13, "image_id": 9, "category_id": 8, "bbox": [1, 1, 2, 2]},
            {"id": 14, "image_id": 1, "category_id": 99, "bbox": [1, 1, 2, 2]},
            {"id": 15, "image_id": 1, "category_id": 8, "bbox": [1, 1, 0, 2]},
        ],
    }
    path = write(tmp_path / "instances.json", json.dumps(document))
    scan = read_coco(tmp_path, path, "ds")
    assert [i.input_id for i in scan.items] == ["one", "two"]
    assert scan.items[0].path == str(tmp_path / "sub" / "one.png")
    (i1, first), (i2, second) = scan.annotations
    assert (i1, i2) == (1, 2)
    assert first.input_id == "one"
    assert first.boxes == (Box("traffic_light", 0.1, 0.1, 0.6, 0.6),)
    assert second.boxes == (Box("cat", 0.0, 0.0, 1.0, 1.0),)  # clipped by less than a pixel
    assert first.annotation_id and first.annotation_id != second.annotation_id
    assert read_coco(tmp_path, path, "ds").annotations[0][1] == first
    failures = {(f.kind, f.index): f.reason for f in scan.failures}
    assert "also the id of sub/one.png" in failures["input", 3]
    assert "outside the 50x50 image" in failures["annotation", 3]
    assert "unknown (or rejected) image_id 9" in failures["annotation", 4]
    assert "unknown category_id 99" in failures["annotation", 5]
    assert "positive width" in failures["annotation", 6]
    assert read_coco(tmp_path, path, "ds", labels=False).annotations == []


# --- request ids, batches and the log -------------------------------------------------------


def test_request_ids_are_deterministic_and_change_with_one_byte(tmp_path: Path) -> None:
    from datasetd.v1 import input_service_pb2

    image = write(tmp_path / "a.png", b"\x89PNG-one")
    item = UploadItem("a", path=str(image), concepts=("c",), metadata={"b": 1, "a": [1, 2]})

    def request_id() -> str:
        request = input_service_pb2.CreateInputsRequest(
            app_id="app", inputs=[input_message(item, "ds")]
        )
        return request_id_of("up-", request)

    first = request_id()
    assert first == request_id()
    assert first.startswith("up-") and len(first) <= 128
    image.write_bytes(b"\x89PNG-onf")
    assert request_id() != first

    same = UploadItem("a", path=str(image), concepts=("c",), metadata={"a": [1, 2], "b": 1})
    one = input_service_pb2.CreateInputsRequest(app_id="app", inputs=[input_message(same, "ds")])
    assert request_id_of("up-", one) == request_id()


def test_annotation_ids_derive_from_content() -> None:
    from service.client.sources import AnnotationItem

    box = Box("cat", 0.1, 0.2, 0.3, 0.4)
    first = annotation_message(AnnotationItem("img", boxes=(box,)))
    assert first.id.startswith("ann-") and len(first.id) <= 64
    assert annotation_message(AnnotationItem("img", boxes=(box,))).id == first.id
    other = Box("cat", 0.1, 0.2, 0.3, 0.5)
    assert annotation_message(AnnotationItem("img", boxes=(other,))).id != first.id
    assert annotation_message(AnnotationItem("img", boxes=(box,), annotation_id="mine")).id == (
        "mine"
    )
    region = first.data.regions[0]
    assert region.data.concepts[0].id == "cat"
    assert region.region_info.bounding_box.bottom_row == pytest.approx(0.4)


def test_batches_are_cut_by_count_and_size(tmp_path: Path) -> None:
    items = [(n, UploadItem(f"t{n}", "text", text="x" * 10)) for n in range(1, 8)]
    assert [len(u.entries) for u in plan_inputs(items, 3)] == [3, 3, 1]
    assert MAX_BATCH == 128
    big = write(tmp_path / "big.bin", b"")
    with big.open("wb") as handle:
        handle.truncate(40 * 1024 * 1024)  # sparse: no real disk use
    units = list(plan_inputs([(1, items[0][1]), (2, UploadItem("big", path=str(big)))], 32))
    assert [u.kind for u in units] == ["stream", "inputs"]


def test_failure_log_round_trips_and_disappears_when_empty(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    item = UploadItem("a", data=b"\x00\x01", source="x", geo=(1.0, 2.0))
    failures = [
        LogFailure(3, "a", 'bad, "quoted"\nreason', "x", "invalid", item=item.to_json()),
        LogFailure(4, "", "input is empty", "data.csv:4", BAD_SOURCE),
    ]
    assert write_failure_log(path, failures, "ds") == path
    dataset_id, back = read_failure_log(path)
    assert dataset_id == "ds" and back == failures
    assert back[0].item is not None and UploadItem.from_json(back[0].item) == item
    assert write_failure_log(path, [], "ds") is None
    assert not path.exists()


@pytest.fixture
def default_csv_limit() -> Iterator[None]:
    """The stock 128 KB field limit, as in a fresh process, restored afterwards."""
    previous = csv.field_size_limit(131072)
    yield
    csv.field_size_limit(previous)


@pytest.mark.usefixtures("default_csv_limit")
def test_big_csv_fields_are_read(tmp_path: Path) -> None:
    text = "word " * 40_000  # 200 KB in one cell
    raw = csv_file(tmp_path, f"inputid,input\nbig,{text}\n")
    [item] = read_csv(raw, "ds", "text", "raw").items
    assert item.text == text

    log = tmp_path / "log.csv"
    big = UploadItem("big", "text", text=text)
    write_failure_log(
        log, [LogFailure(1, "big", "invalid", "x", "invalid", item=big.to_json())], "ds"
    )
    _, [back] = read_failure_log(log)
    assert back.item is not None and UploadItem.from_json(back.item) == big


def test_coco_file_names_outside_the_images_folder_are_rejected(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write(images / "in.png")
    write(tmp_path / "secret.png")
    document = {
        "images": [
            {"id": 1, "file_name": "../secret.png", "width": 1, "height": 1},
            {"id": 2, "file_name": str(tmp_path / "secret.png"), "width": 1, "height": 1},
            {"id": 3, "file_name": "sub/../in.png", "width": 1, "height": 1},
        ],
        "categories": [],
    }
    path = write(tmp_path / "instances.json", json.dumps(document))
    scan = read_coco(images, path, "ds")
    assert [(i.input_id, i.path) for i in scan.items] == [("in", str(images / "sub/../in.png"))]
    assert [(f.index, f.code) for f in scan.failures] == [(1, BAD_SOURCE), (2, BAD_SOURCE)]
    assert all("outside the images folder" in f.reason for f in scan.failures)
