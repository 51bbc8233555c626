"""Versions, exports, downloads and bulk deletes of the `service.client` library, against
the real in-process server.

The client blocks and the server runs on the test's event loop, so every client call
goes through `asyncio.to_thread` (see tests/e2e/test_client.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from datasetd.v1 import input_pb2
from google.protobuf import json_format
from pycocotools.coco import COCO

from service.app import Running
from service.client import (
    Client,
    DatasetdError,
    DownloadResult,
    ExportSettings,
    NotFoundError,
)
from service.client.exports import DOWNLOAD_MARKER
from service.client.unpack import unpack as real_unpack
from tests.conftest import Caller
from tests.e2e.test_annotations import add, annotation, box, concepts
from tests.e2e.test_inputs import create, image_input, new_dataset, text_input
from tests.helpers import png_bytes

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

# pycocotools' own use of numpy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
T = TypeVar("T")
WIDTH, HEIGHT = 16, 12
# Each image: input-level concept plus one box labelled with the same concept.
IMAGES = {f"img-{n}": ("cat" if n % 2 else "dog", (10 * n, 20, 30)) for n in range(6)}
TEXT = "a cat on a mat"
SPLIT = {"train": 0.5, "validation": 0.5}
EDGES = {"top": 0.1, "left": 0.2, "bottom": 0.6, "right": 0.7}


async def run(call: Callable[[], T]) -> T:
    return await asyncio.to_thread(call)


@pytest.fixture
def client(server: Running, caller: Caller) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.port}", caller.key, caller.app_id) as opened:
        yield opened


async def labelled_dataset(
    datasets: Datasets, inputs: Inputs, annotations: Annotations, caller: Caller
) -> None:
    """Dataset "ds": six labelled and boxed 16x12 PNGs and one text."""
    await new_dataset(datasets, caller, "ds")
    items: list[input_pb2.Input] = [
        image_input(input_id, color, concepts=concepts(label))
        for input_id, (label, color) in IMAGES.items()
    ]
    items.append(text_input("note", TEXT))
    for item in items:
        item.dataset_ids.append("ds")
    response = await create(inputs, caller, items)
    assert response.created_count == len(items)
    boxes = [
        annotation(input_id, regions=[box(f"box-{input_id}", label, **EDGES)])
        for input_id, (label, _) in IMAGES.items()
    ]
    await add(annotations, caller, boxes)


def files_under(root: Path) -> list[str]:
    """The downloaded files, without the marker every download has (checked on its own)."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name != DOWNLOAD_MARKER
    )


def names_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- versions --------------------------------------------------------------------------------


async def test_versions_create_wait_list_get_delete(
    client: Client,
    datasets: Datasets,
    inputs: Inputs,
    annotations: Annotations,
    caller: Caller,
) -> None:
    await labelled_dataset(datasets, inputs, annotations, caller)
    ds = client.dataset("ds")
    assert await run(ds.latest_version) is None

    first = await run(lambda: ds.create_version("v1", description="first", metadata={"k": 1}))
    assert (first.id, first.dataset_id, first.status) == ("v1", "ds", "READY")
    assert first.inputs_count == 7 and first.description == "first"
    assert first.metadata == {"k": 1}
    assert first.metrics["/"]["bounding_boxes_count"] == 6
    assert first.created_at is not None and first.created_at.tzinfo is not None

    # READY when created, whether the library waits or not; waiting returns at once.
    unwaited = await run(lambda: ds.create_version("v2", wait=False))
    assert (unwaited.status, unwaited.inputs_count) == ("READY", 7)
    second = await run(lambda: ds.wait_version("v2"))
    assert second.status == "READY" and second.inputs_count == 7

    listed = await run(lambda: [v.id for v in ds.list_versions(page_size=1)])
    assert listed == ["v2", "v1"]
    latest = await run(ds.latest_version)
    assert latest is not None and latest.id == "v2"
    got = await run(lambda: ds.get_version("v1"))
    assert got.to_dict()["id"] == "v1"
    json.dumps(got.to_dict())

    await run(lambda: ds.delete_version("v2"))
    with pytest.raises(NotFoundError):
        await run(lambda: ds.get_version("v2"))
    assert await run(lambda: [v.id for v in ds.list_versions()]) == ["v1"]

    error = await run(lambda: _raises(lambda: client.dataset("nope").create_version()))
    assert isinstance(error, NotFoundError)


def _raises(call: Callable[[], object]) -> DatasetdError:
    try:
        call()
    except DatasetdError as error:
        return error
    raise AssertionError("the call succeeded but was expected to fail")


# --- exports ---------------------------------------------------------------------------------


async def test_create_get_list_and_wait_exports(
    client: Client,
    datasets: Datasets,
    inputs: Inputs,
    annotations: Annotations,
    caller: Caller,
) -> None:
    await labelled_dataset(datasets, inputs, annotations, caller)
    assert await run(lambda: client.datasets.list_exports("ds")) == []

    # No version yet: one is created and built first.
    settings = ExportSettings(format="coco", split_ratio=[0.5, 0.5], seed=7)
    started = await run(lambda: client.datasets.create_export("ds", settings))
    assert started.format == "coco" and started.dataset_id == "ds"
    assert started.split_ratio == {"train": 0.5, "validation": 0.5} and started.seed == 7
    versions = await run(lambda: list(client.dataset("ds").list_versions()))
    assert [v.id for v in versions] == [started.version_id]

    done = await run(lambda: client.datasets.wait_export("ds", started.id, show_progress=True))
    assert done.status == "SUCCESS" and done.percent_completed == 100
    assert done.size > 0 and done.url
    assert done.url_expires_at is not None and done.url_expires_at > datetime.now(UTC)
    # The inputs each split holds: COCO carries only the images (6 of the 7 inputs).
    assert sum(done.split_counts.values()) == 6
    assert set(done.split_counts) == {"train", "validation"}
    assert done.fidelity["dropped"] == {"text_inputs": 1}

    got = await run(lambda: client.datasets.get_export("ds", started.id))
    assert got.id == started.id and got.status == "SUCCESS" and got.url
    json.dumps(got.to_dict())

    # Idempotent: the same settings give the same export.
    again = await run(lambda: client.datasets.create_export("ds", settings))
    assert again.id == started.id and again.status == "SUCCESS"
    other = await run(lambda: client.datasets.create_export("ds", ExportSettings()))
    listed = await run(lambda: client.datasets.list_exports("ds", started.version_id))
    assert {e.id for e in listed} == {started.id, other.id}
    assert {e.format for e in listed} == {"coco", "clarifai_data_protobuf"}

    with pytest.raises(NotFoundError):
        await run(lambda: client.datasets.get_export("ds", "no-such-export"))


def test_export_settings_are_validated() -> None:
    assert ExportSettings(split_ratio=(0.7, 0.2, 0.1)).ratios() == {
        "train": 0.7,
        "validation": 0.2,
        "test": 0.1,
    }
    with pytest.raises(ValueError, match="format must be one of"):
        ExportSettings(format="yolo")
    with pytest.raises(ValueError, match="sum to 1"):
        ExportSettings(split_ratio={"train": 0.8, "validation": 0.3})
    with pytest.raises(ValueError, match="> 0"):
        ExportSettings(split_ratio={"train": 1.0, "validation": 0.0})
    with pytest.raises(ValueError, match="2 or 3 ratios"):
        ExportSettings(split_ratio=[1.0])
    with pytest.raises(ValueError, match="split name"):
        ExportSettings(split_ratio={"Train/..": 1.0})
    with pytest.raises(ValueError, match="seed"):
        ExportSettings(seed=-1)


# --- download --------------------------------------------------------------------------------


async def test_download_protobuf_layout_media_and_counts(
    client: Client,
    datasets: Datasets,
    inputs: Inputs,
    annotations: Annotations,
    caller: Caller,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await labelled_dataset(datasets, inputs, annotations, caller)
    target = tmp_path / "out"
    result = await run(
        lambda: client.datasets.download(
            "ds", target, ExportSettings(split_ratio=SPLIT, seed=1), show_progress=True
        )
    )
    assert isinstance(result, DownloadResult)
    assert result.save_dir == target and result.format == "clarifai_data_protobuf"
    assert set(result.splits) == {"train", "validation"} and sum(result.splits.values()) == 7
    assert result.assets_count == 7 and result.media_files == 7
    # Per image: one input-level concept and one box.
    assert result.annotations_count == 12
    assert result.size_mb > 0 and result.media_missing == []
    # Only the unpacked content: no archive, no temporary directories.
    assert names_in(tmp_path) == ["out"]

    seen: dict[str, str] = {}
    for split, count in result.splits.items():
        lines = jsonl(target / split / "annotations.jsonl")
        assert len(lines) == count
        for line in lines:
            seen[line["input_id"]] = split
            message = json_format.ParseDict(line["input"], input_pb2.Input())
            if line["input_id"] == "note":
                assert line["file"] == "texts/note.txt"
                assert (target / split / line["file"]).read_text(encoding="utf-8") == TEXT
                continue
            label, color = IMAGES[line["input_id"]]
            assert line["file"] == f"images/{line['input_id']}.png"
            assert (target / split / line["file"]).read_bytes() == png_bytes(WIDTH, HEIGHT, color)
            assert not message.data.image.base64  # the bytes are in the file, not the JSON
            assert [c.id for c in message.data.concepts] == [label]
            edges = message.data.regions[0].region_info.bounding_box
            assert edges.left_col == pytest.approx(0.2) and edges.bottom_row == pytest.approx(0.6)
            assert [c.id for c in message.data.regions[0].data.concepts] == [label]
    assert set(seen) == {*IMAGES, "note"}

    text = await run(result.info)
    assert "annotations" in text and "12" in text and "validation" in text
    assert text in capsys.readouterr().out
    assert json.loads(json.dumps(result.to_dict()))["assets_count"] == 7


async def test_download_coco_loads_with_pycocotools_and_normalizes(
    client: Client,
    datasets: Datasets,
    inputs: Inputs,
    annotations: Annotations,
    caller: Caller,
    tmp_path: Path,
) -> None:
    await labelled_dataset(datasets, inputs, annotations, caller)
    pixels = await run(
        lambda: client.datasets.download(
            "ds",
            tmp_path / "coco",
            ExportSettings(format="coco", split_ratio=SPLIT),
            show_progress=False,
        )
    )
    assert sum(pixels.splits.values()) == 6 and pixels.media_files == 6
    assert pixels.annotations_count == 12  # six boxes, six image-level concepts
    images_seen = 0
    for split in pixels.splits:
        root = tmp_path / "coco" / split
        loaded = COCO(str(root / "annotations.json"))
        for image in loaded.dataset["images"]:
            _, color = IMAGES[image["datasetd_input_id"]]
            data = (root / "images" / image["file_name"]).read_bytes()
            assert data == png_bytes(WIDTH, HEIGHT, color)
            images_seen += 1
        for item in loaded.loadAnns(loaded.getAnnIds()):
            assert item["bbox"] == pytest.approx([3.2, 1.2, 8.0, 6.0], abs=0.01)
    assert images_seen == 6

    normalized = await run(
        lambda: client.datasets.download(
            "ds",
            tmp_path / "norm",
            ExportSettings(format="coco", split_ratio=SPLIT, normalized=True),
            show_progress=False,
        )
    )
    boxes = []
    for split in normalized.splits:
        loaded = COCO(str(tmp_path / "norm" / split / "annotations.json"))
        boxes += [a["bbox"] for a in loaded.loadAnns(loaded.getAnnIds())]
    assert len(boxes) == 6
    for bbox in boxes:
        assert all(0 <= v <= 1 for v in bbox)
        assert bbox == pytest.approx([0.2, 0.1, 0.5, 0.5], abs=1e-3)


async def test_download_json_in_pixels(
    client: Client,
    datasets: Datasets,
    inputs: Inputs,
    annotations: Annotations,
    caller: Caller,
    tmp_path: Path,
) -> None:
    await labelled_dataset(datasets, inputs, annotations, caller)
    result = await run(
        lambda: client.datasets.download(
            "ds",
            tmp_path / "px",
            ExportSettings(format="clarifai_data_json", normalized=False),
            show_progress=False,
        )
    )
    assert result.splits == {"all": 7} and result.media_files == 7
    lines = {line["input_id"]: line for line in jsonl(tmp_path / "px/all/annotations.jsonl")}
    edges = lines["img-1"]["input"]["data"]["regions"][0]["region_info"]["bounding_box"]
    assert edges == pytest.approx(
        {"top_row": 1.2, "left_col": 3.2, "bottom_row": 7.2, "right_col": 11.2}, abs=1e-3
    )
    image = (tmp_path / "px/all" / lines["img-1"]["file"]).read_bytes()
    assert image == png_bytes(WIDTH, HEIGHT, IMAGES["img-1"][1])


async def test_download_refuses_a_non_empty_dir_unless_overwrite(
    client: Client,
    datasets: Datasets,
    inputs: Inputs,
    annotations: Annotations,
    caller: Caller,
    tmp_path: Path,
) -> None:
    await labelled_dataset(datasets, inputs, annotations, caller)
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        await run(lambda: client.datasets.download("ds", target, show_progress=False))
    assert files_under(target) == ["keep.txt"]
    # Refused before anything was asked of the server.
    assert await run(lambda: list(client.dataset("ds").list_versions())) == []

    # Not even with overwrite: the folder is not an earlier download.
    with pytest.raises(FileExistsError, match="not an earlier datasetd download"):
        await run(
            lambda: client.datasets.download("ds", target, overwrite=True, show_progress=False)
        )
    assert files_under(target) == ["keep.txt"]

    earlier = tmp_path / "earlier"
    await run(lambda: client.datasets.download("ds", earlier, show_progress=False))
    assert (earlier / DOWNLOAD_MARKER).is_file()
    (earlier / "all" / "stale.txt").write_text("from before")
    result = await run(
        lambda: client.datasets.download("ds", earlier, overwrite=True, show_progress=False)
    )
    assert not (earlier / "all" / "stale.txt").exists()
    assert result.assets_count == 7 and (earlier / "all" / "annotations.jsonl").is_file()
    assert names_in(tmp_path) == ["busy", "earlier"]

    # An empty directory is simply used.
    empty = tmp_path / "empty"
    empty.mkdir()
    await run(lambda: client.datasets.download("ds", empty, show_progress=False))
    assert (empty / "all" / "images" / "img-0.png").is_file()


async def test_an_interrupted_download_leaves_nothing_behind(
    client: Client,
    datasets: Datasets,
    inputs: Inputs,
    annotations: Annotations,
    caller: Caller,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await labelled_dataset(datasets, inputs, annotations, caller)

    def unpack_then_fail(*args: Any) -> Any:
        real_unpack(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr("service.client.exports.unpack", unpack_then_fail)
    with pytest.raises(KeyboardInterrupt):
        await run(lambda: client.datasets.download("ds", tmp_path / "x", show_progress=False))
    assert names_in(tmp_path) == []


async def test_download_annotations_only_writes_no_media(
    client: Client,
    datasets: Datasets,
    inputs: Inputs,
    annotations: Annotations,
    caller: Caller,
    tmp_path: Path,
) -> None:
    await labelled_dataset(datasets, inputs, annotations, caller)
    result = await run(
        lambda: client.datasets.download(
            "ds", tmp_path / "a", annotations_only=True, show_progress=False
        )
    )
    assert files_under(tmp_path / "a") == ["all/annotations.jsonl"]
    assert result.media_files == 0 and result.assets_count == 7
    assert result.annotations_count == 12
    lines = jsonl(tmp_path / "a/all/annotations.jsonl")
    assert all(line["file"] is None for line in lines)

    coco = await run(
        lambda: client.datasets.download(
            "ds",
            tmp_path / "c",
            ExportSettings(format="coco"),
            annotations_only=True,
            show_progress=False,
        )
    )
    assert files_under(tmp_path / "c") == ["all/annotations.json"]
    assert coco.assets_count == 6 and coco.annotations_count == 12


# --- bulk delete -----------------------------------------------------------------------------


async def test_bulk_delete_assets_by_concept_dry_run_and_refusals(
    client: Client,
    datasets: Datasets,
    inputs: Inputs,
    annotations: Annotations,
    caller: Caller,
) -> None:
    await labelled_dataset(datasets, inputs, annotations, caller)
    ds = client.dataset("ds")

    dry = await run(
        lambda: client.datasets.bulk_delete_assets("ds", {"concepts": ["cat"]}, dry_run=True)
    )
    assert (dry.matched, dry.deleted, dry.dry_run) == (3, 0, True)
    assert len(await run(lambda: list(ds.list_inputs()))) == 7

    with pytest.raises(ValueError, match=r"'labels'.*allowed: concepts, not_concepts"):
        client.datasets.bulk_delete_assets("ds", {"labels": ["cat"]})
    with pytest.raises(ValueError, match="strict_query=True refuses an empty filter"):
        client.datasets.bulk_delete_assets("ds", {}, strict_query=True)
    with pytest.raises(ValueError, match="strict_query=True refuses an empty filter"):
        client.datasets.bulk_delete_assets("ds", {"concepts": []}, strict_query=True)
    with pytest.raises(ValueError, match="media type"):
        client.datasets.bulk_delete_assets("ds", {"media_types": ["hologram"]})
    with pytest.raises(ValueError, match="annotated"):
        client.datasets.bulk_delete_assets("ds", {"annotated": "yes"})

    done = await run(
        lambda: client.datasets.bulk_delete_assets(
            "ds", {"concepts": ["cat"], "media_types": ["image"]}, strict_query=True
        )
    )
    assert (done.matched, done.deleted) == (3, 3)
    left = await run(lambda: sorted(i.id for i in ds.list_inputs()))
    assert left == sorted([*(i for i, (label, _) in IMAGES.items() if label == "dog"), "note"])

    unannotated = await run(
        lambda: client.datasets.bulk_delete_assets("ds", {"annotated": False}, dry_run=True)
    )
    assert unannotated.matched == 1  # the text

    everything = await run(lambda: client.datasets.bulk_delete_assets("ds", None))
    assert (everything.matched, everything.deleted) == (4, 4)
    assert await run(lambda: list(ds.list_inputs())) == []


async def test_download_of_an_unknown_dataset_is_not_found(client: Client, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        await run(lambda: client.datasets.download("nope", tmp_path / "n", show_progress=False))
    assert names_in(tmp_path) == []
