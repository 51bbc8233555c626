"""The Vi export formats (VI_JSONL, VI_FULL) as a caller sees them: the real server and job
runner; the archives opened with zipfile and every line read back with plain `json`,
checked against what was uploaded (tests.e2e.test_versions.every_kind_of_content)."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from datasetd.v1 import dataset_version_pb2

from tests.e2e.test_annotations import float32
from tests.e2e.test_exports import (
    COCO_FORMAT,
    HEIGHT,
    ORIGINALS,
    WIDTH,
    Version,
    every_kind_version,
    exported,
    options,
    request_export,
)
from tests.helpers import call_error

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

    from service.storage.db import Database

VI_FULL = dataset_version_pb2.EXPORT_FORMAT_VI_FULL
VI_JSONL = dataset_version_pb2.EXPORT_FORMAT_VI_JSONL


@pytest.fixture(scope="module")
async def every_kind(
    versions: Versions, annotations: Annotations, inputs: Inputs, datasets: Datasets, db: Database
) -> Version:
    """Version "v1" of dataset "ds" with every kind of content, as test_exports has it."""
    return await every_kind_version(versions, annotations, inputs, datasets, db)


def lines(archive: bytes, split: str = "all") -> list[dict[str, Any]]:
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        text = opened.read(f"annotations/{split}.jsonl").decode()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def summary(archive: bytes) -> dict[str, Any]:
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        loaded: dict[str, Any] = json.loads(opened.read("metadata.json"))
    return loaded


def by_id(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["id"]: item for item in items}


def check_lines(
    found: list[dict[str, Any]], every_kind: Version, scale_x: float, scale_y: float, places: int
) -> None:
    """Every input and region of the every-kind content; coordinates times scale_x/scale_y
    (the image's size for pixels, 1 for normalized), rounded to `places` decimals."""

    def x(value: float) -> float:
        return round(float32(value) * scale_x, places)

    def y(value: float) -> float:
        return round(float32(value) * scale_y, places)

    assert [line["asset_id"] for line in found] == ["img", "txt", "vid", "plain"]
    assert [line["media_type"] for line in found] == ["image", "text", "video", "image"]
    img, txt, vid, plain = found
    assert (img["width"], img["height"]) == (WIDTH, HEIGHT)
    assert img["tags"] == [
        {"id": "cat", "name": "cat", "value": 1},
        {"id": "dog", "name": "dog", "value": 0},
    ]
    regions = by_id(img["annotations"])
    assert list(regions) == ["b1", "p1", "pt", "kp", "m1"]
    assert regions["b1"]["type"] == "bounding_box"
    assert regions["b1"]["concepts"] == [{"id": "cat", "name": "cat", "value": 1}]
    box = regions["b1"]["bounding_box"]
    assert box == pytest.approx(
        {"x_min": x(0.2), "y_min": y(0.1), "x_max": x(0.7), "y_max": y(0.6)}, abs=10**-places
    )
    assert regions["p1"]["type"] == "polygon"
    corners = [[x(c), y(r)] for r, c in ((0.1, 0.1), (0.9, 0.5), (0.1, 0.9))]
    assert len(regions["p1"]["polygon"]) == 3
    for got, wanted in zip(regions["p1"]["polygon"], corners, strict=True):
        assert got == pytest.approx(wanted, abs=10**-places)
    assert regions["pt"]["point"] == pytest.approx({"x": x(0.75), "y": y(0.25)}, abs=10**-places)
    keypoints = regions["kp"]["keypoints"]
    assert [v for k in keypoints for v in (k["x"], k["y"])] == pytest.approx(
        [x(0.2), y(0.1), x(0.4), y(0.3)], abs=10**-places
    )
    mask = regions["m1"]
    assert mask["type"] == "mask" and mask["concepts"][0]["id"] == "fur"
    assert base64.b64decode(mask["mask"]["png_base64"]) == every_kind.mask.image.base64

    assert txt["text"] == "The quick brown fox"
    assert "file_name" not in txt and "url" not in txt
    (span,) = txt["annotations"]
    assert span["type"] == "span" and span["span"] == {"start": 16, "end": 19, "text": "fox"}

    video = every_kind.snapshot["vid"].data.video.video_info
    vx = video.width / WIDTH if scale_x != 1 else 1
    vy = video.height / HEIGHT if scale_y != 1 else 1
    assert [f["number"] for f in vid["frames"]] == [0, 25, 49]
    assert [f["time_ms"] for f in vid["frames"]] == [0, 1000, 1960]
    assert [f["tags"] for f in vid["frames"]] == [[{"id": "fox", "name": "fox", "value": 1}]] * 3
    for frame in vid["frames"]:
        (fox,) = frame["annotations"]
        assert fox["id"] == f"fox-{frame['number']}" and fox["type"] == "bounding_box"
        assert fox["bounding_box"] == pytest.approx(
            {
                "x_min": round(float32(0.1) * scale_x * vx, places),
                "y_min": round(float32(0.1) * scale_y * vy, places),
                "x_max": round(float32(0.5) * scale_x * vx, places),
                "y_max": round(float32(0.5) * scale_y * vy, places),
            },
            abs=10**-places,
        )
    assert vid["annotations"] == [] and vid["tags"] == []

    assert plain["metadata"] == {"camera": "x100"}
    assert plain["geo"] == pytest.approx({"latitude": 52.5, "longitude": 13.4}, abs=1e-5)
    assert plain["tags"] == [] and plain["annotations"] == []
    assert all(line["split"] == "all" for line in found)


async def test_vi_jsonl_has_one_line_per_input_with_normalized_coordinates(
    versions: Versions, every_kind: Version
) -> None:
    export, archive = await exported(versions, every_kind.caller, "ds", "v1", VI_JSONL)
    assert export.format == VI_JSONL and not export.options.pixel_coordinates
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        assert opened.namelist() == ["annotations/all.jsonl", "metadata.json"]
    found = lines(archive)
    check_lines(found, every_kind, 1, 1, 6)
    # Annotations only: every medium is referenced where the version stores it.
    for line in found:
        if line["media_type"] != "text":
            medium = line["media_type"]
            stored = getattr(every_kind.snapshot[line["asset_id"]].data, medium)
            assert line["url"] == stored.url and "file_name" not in line
    assert summary(archive) == {
        "format": "vi_jsonl",
        "coordinates": "normalized",
        "splits": {"all": 4},
        "assets": 0,
        "tags": 2,
        # b1, p1, pt, kp, m1, the span and one box on each of three frames.
        "annotations": 9,
    }
    assert dict(export.split_counts) == {"all": 4}


async def test_vi_jsonl_in_pixels_is_its_own_export(
    versions: Versions, every_kind: Version
) -> None:
    caller = every_kind.caller
    normalized = await request_export(versions, caller, "ds", "v1", VI_JSONL)
    pixels = options()
    pixels.pixel_coordinates = True
    export, archive = await exported(versions, caller, "ds", "v1", VI_JSONL, pixels)
    assert export.options.pixel_coordinates and export.id != normalized.id
    check_lines(lines(archive), every_kind, WIDTH, HEIGHT, 2)
    assert summary(archive)["coordinates"] == "pixels"


async def test_vi_full_holds_every_listed_media_file_with_its_bytes(
    versions: Versions, every_kind: Version
) -> None:
    caller = every_kind.caller
    split = options({"train": 0.5, "validation": 0.5}, seed=4)
    export, archive = await exported(versions, caller, "ds", "v1", VI_FULL, split)
    # The format is the media: the option is kept as what the archive holds.
    assert export.options.embed_media
    found = {name: lines(archive, name) for name in ("train", "validation")}
    assert dict(export.split_counts) == {name: len(items) for name, items in found.items()}
    every = sorted(line["asset_id"] for items in found.values() for line in items)
    assert every == ["img", "plain", "txt", "vid"]
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        names = set(opened.namelist())
        listed = set()
        for name, items in found.items():
            for line in items:
                assert line["split"] == name and "url" not in line
                if line["media_type"] == "text":
                    assert "file_name" not in line
                    continue
                path = line["file_name"]
                assert path.startswith(f"assets/{name}/{line['asset_id']}.")
                assert opened.read(path) == ORIGINALS[line["asset_id"]], path
                listed.add(path)
    assert names == listed | {
        "annotations/train.jsonl",
        "annotations/validation.jsonl",
        "metadata.json",
    }
    assert {p.rsplit("/", 1)[1] for p in listed} == {"img.png", "plain.png", "vid.mp4"}
    assert summary(archive)["assets"] == 3

    # The same content as VI_JSONL, line for line, but for where the media are.
    _, jsonl = await exported(versions, caller, "ds", "v1", VI_JSONL, split)
    for name, items in found.items():
        for full, plain in zip(items, lines(jsonl, name), strict=True):
            full.pop("file_name", None)
            plain.pop("url", None)
            assert full == plain


async def test_coco_split_counts_count_only_the_images_written(
    versions: Versions, every_kind: Version
) -> None:
    export, _ = await exported(versions, every_kind.caller, "ds", "v1", COCO_FORMAT)
    # img and plain; the text and the video have no place in COCO (see fidelity).
    assert dict(export.split_counts) == {"all": 2}
    assert export.fidelity.dropped["text_inputs"] == 1
    assert export.fidelity.dropped["video_inputs"] == 1


async def test_vi_options_that_do_not_apply_are_refused_by_name(
    versions: Versions, every_kind: Version
) -> None:
    caller = every_kind.caller
    pixels = options()
    pixels.pixel_coordinates = True
    refused = await call_error(request_export(versions, caller, "ds", "v1", COCO_FORMAT, pixels))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "VI_FULL and VI_JSONL" in refused.fields["options.pixel_coordinates"]
    refused = await call_error(
        request_export(versions, caller, "ds", "v1", VI_JSONL, options(embed_media=True))
    )
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "VI_FULL" in refused.fields["options.embed_media"]
