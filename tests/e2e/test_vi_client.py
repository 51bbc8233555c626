"""`datasetd.client`, the Vi-shaped client, against the real in-process server.

The examples are the Datature Vi SDK's datasets reference's own (a copy is
vi_datasets_reference.md beside this file): every Python block is read from it and run as
written, with only the import lines (`vi.api...` → `datasetd.client`), the client object
and the placeholder ids and folders changed. What the examples print and return is then
checked against independent readers: json and Pillow for the Vi layout, pycocotools for
COCO and the reference `clarifai_grpc` classes for the Clarifai formats. The training
loaders (datasetd.client.loaders) are checked last, from a download and streamed; their
PyTorch adapter only where torch is installed (`make test-torch`).

The client blocks, so every call goes through `asyncio.to_thread` (see test_client.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import datasetd.client as vi
import pytest
from clarifai_grpc.grpc.api import resources_pb2
from datasetd.client import (
    Client,
    DatasetExportFormat,
    DatasetExportOptions,
    DatasetExportSettings,
)
from datasetd.client.loaders import Sample, ViSamples, torch_dataset, torch_iterable
from google.protobuf import json_format
from PIL import Image
from pycocotools.coco import COCO

from service.app import Running
from tests.conftest import Caller
from tests.e2e.test_client_exports import EDGES, IMAGES, labelled_dataset
from tests.helpers import download

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
T = TypeVar("T")
REFERENCE = Path(__file__).with_name("vi_datasets_reference.md")
VI_IMPORTS = re.compile(r"from vi\.api(?:\.resources\.datasets)?\.(?:types|responses) import")


def reference_examples() -> dict[str, list[str]]:
    """The Python blocks of the reference by the section they are in (`list`, `get`,
    ..., and the type sections by type name)."""
    sections: dict[str, list[str]] = {}
    current = ""
    for heading, block in re.findall(
        r"^### (\S+?)(?:\(\))?\n|```python\n(.*?)```", REFERENCE.read_text(), re.S | re.M
    ):
        if heading:
            current = heading
        else:
            sections.setdefault(current, []).append(block)
    return sections


EXAMPLES = reference_examples()


def test_the_reference_has_its_39_examples() -> None:
    assert sum(len(blocks) for blocks in EXAMPLES.values()) == 39
    assert [len(EXAMPLES[m]) for m in ("list", "get", "create_export", "download")] == [3, 3, 3, 4]


async def run(call: Callable[[], T]) -> T:
    return await asyncio.to_thread(call)


class Example:
    """Runs reference blocks in one namespace, with the placeholders replaced."""

    def __init__(self, client: Client, replacements: dict[str, str]) -> None:
        self.printed: list[str] = []
        self.namespace: dict[str, Any] = {
            "client": client,
            "print": lambda *args: self.printed.append(" ".join(str(a) for a in args)),
            "input": lambda prompt: "yes",
        }
        self.replacements = replacements

    def source(self, block: str) -> str:
        code = VI_IMPORTS.sub("from datasetd.client import", block)
        for placeholder, value in self.replacements.items():
            code = code.replace(placeholder, value)
        assert "vi." not in code, code
        return code

    async def __call__(self, section: str, index: int) -> dict[str, Any]:
        code = self.source(EXAMPLES[section][index])
        await run(
            lambda: exec(compile(code, f"<{section} example {index}>", "exec"), self.namespace)
        )
        return self.namespace


@pytest.fixture
def client(server: Running, caller: Caller) -> Iterator[Client]:
    with Client(
        secret_key=caller.key,
        organization_id=caller.app_id,
        endpoint=f"127.0.0.1:{server.port}",
    ) as opened:
        yield opened


@pytest.fixture
async def ds(datasets: Datasets, inputs: Inputs, annotations: Annotations, caller: Caller) -> str:
    """Dataset "ds": six labelled and boxed 16x12 PNGs and one text (test_client_exports)."""
    await labelled_dataset(datasets, inputs, annotations, caller)
    return "ds"


def example(client: Client, tmp_path: Path, **ids: str) -> Example:
    replacements = {f'"{k}"': f'"{v}"' for k, v in ids.items()}
    for folder in ("./data", "./annotations"):
        replacements[f'"{folder}"'] = json.dumps(str(tmp_path / folder.removeprefix("./")))
    return Example(client, replacements)


def test_every_type_of_the_reference_imports() -> None:
    for section, blocks in EXAMPLES.items():
        if section[0].isupper():
            for block in blocks:
                code = VI_IMPORTS.sub("from datasetd.client import", block)
                namespace: dict[str, Any] = {}
                exec(code, namespace)
                assert namespace[section] is getattr(vi, section)


async def test_list(client: Client, ds: str, tmp_path: Path) -> None:
    for n in range(3):
        await run(lambda n=n: client.native.datasets.create(f"extra-{n}"))  # type: ignore[misc]
    run_example = example(client, tmp_path)
    namespace = await run_example("list", 0)
    assert sorted(run_example.printed) == sorted(
        f"{i}: {i}" for i in ("ds", "extra-0", "extra-1", "extra-2")
    )
    run_example.printed.clear()
    namespace = await run_example("list", 1)
    assert namespace["pagination"].page_size == 50
    # Statistics come with each dataset although ListDatasets leaves them out.
    assert f"ds: {len(IMAGES) + 1} assets" in run_example.printed
    assert "extra-0: 0 assets" in run_example.printed
    namespace = await run_example("list", 2)
    assert run_example.printed[-1] == "Total datasets: 4"
    paged = await run(lambda: client.datasets.list(pagination=vi.PaginationParams(page_size=3)))
    # Later pages are fetched while iterating (so in a thread here), and kept.
    assert await run(lambda: [len(page.items) for page in paged]) == [3, 1]
    assert [len(page.items) for page in paged] == [3, 1]
    assert len(list(paged.all_items())) == 4


async def test_get(client: Client, ds: str, tmp_path: Path) -> None:
    run_example = example(client, tmp_path, dataset_abc123=ds)
    await run_example("get", 0)
    assert run_example.printed == ["Name: ds", f"Assets: {len(IMAGES) + 1}"]
    await run_example("get", 1)
    await run_example("get", 2)
    boxes, concepts = len(IMAGES), len(IMAGES)
    assert run_example.printed[2:] == [
        f"Total assets: {len(IMAGES) + 1}",
        f"Annotated: {len(IMAGES)}",
        f"Annotations: {boxes + concepts}",
        f"Annotation rate: {len(IMAGES) / (len(IMAGES) + 1) * 100:.1f}%",
    ]
    dataset = await run(lambda: client.datasets.get(ds))
    assert dataset.organization_id == client.organization_id
    assert dataset.statistic.tags_count == {"cat": 3, "dog": 3}
    assert dataset.last_accessed is not None and dataset.create_date > 0
    assert dataset.is_locked is False
    assert dataset.access == vi.DatasetAccess(False, False, False)


async def test_dataset_fields_follow_the_server(client: Client, ds: str) -> None:
    """name, is_locked, access and type come from the dataset's own fields."""
    from datasetd.v1 import common_pb2, dataset_pb2, dataset_service_pb2
    from google.protobuf import field_mask_pb2

    native = client.native
    update = dataset_service_pb2.UpdateDatasetRequest(
        app_id=native.app,
        dataset=dataset_pb2.Dataset(
            id=ds, display_name="Cats and dogs", read_only=True, hidden=True, locked=True
        ),
        update_mask=field_mask_pb2.FieldMask(
            paths=["display_name", "read_only", "hidden", "locked"]
        ),
        action=common_pb2.PATCH_ACTION_OVERWRITE,
    )
    update.dataset.metadata.update({"vi": {"type": "vqa", "content": "Image"}})
    update.update_mask.paths.append("metadata")
    await run(lambda: native.rpc.call(native.rpc.datasets.UpdateDataset, update))
    dataset = await run(lambda: client.datasets.get(ds))
    assert (dataset.name, dataset.is_locked) == ("Cats and dogs", True)
    assert dataset.access == vi.DatasetAccess(False, True, True)
    assert (dataset.type, dataset.content) == (vi.DatasetType.VQA, vi.DatasetContent.IMAGE)
    # Hidden: left out of the listing.
    listed = await run(lambda: list(client.datasets.list().all_items()))
    assert ds not in [d.dataset_id for d in listed]


async def test_create_get_and_list_exports(client: Client, ds: str, tmp_path: Path) -> None:
    run_example = example(client, tmp_path, dataset_abc123=ds)
    namespace = await run_example("create_export", 0)
    basic = namespace["export"]
    assert basic.spec.format == DatasetExportFormat.VI_FULL
    namespace = await run_example("create_export", 1)
    custom = namespace["export"]
    assert run_example.printed == [f"Export ID: {custom.dataset_export_id}"]
    assert custom.spec.options == vi.DatasetExportOptions(normalized=True, split_ratio=0.8)
    namespace = await run_example("create_export", 2)
    jsonl = namespace["export"]
    assert jsonl.spec.format == DatasetExportFormat.VI_JSONL
    exports = [basic, custom, jsonl]
    for made in exports:
        await run(
            lambda made=made: client.native.datasets.wait_export(  # type: ignore[misc]
                ds, made.dataset_export_id, made.version_id
            )
        )

    run_example = example(
        client, tmp_path, dataset_abc123=ds, export_xyz789=custom.dataset_export_id
    )
    run_example.printed.clear()
    await run_example("get_export", 0)
    ready, expires = run_example.printed
    # The printed (presigned) URL serves the archive: the Vi layout with the 80/20 split.
    archive = zipfile.ZipFile(io.BytesIO(await run(lambda: download(ready.split(": ", 1)[1]))))
    assert {"annotations/train.jsonl", "annotations/validation.jsonl"} <= set(archive.namelist())
    assert int(expires.split(": ")[1]) > time.time() * 1000
    namespace = await run_example("get_export", 1)
    assert namespace["url"].startswith("http")

    run_example.printed.clear()
    namespace = await run_example("list_exports", 0)
    listed = {e.dataset_export_id for e in namespace["exports"].items}
    assert {e.dataset_export_id for e in exports} <= listed
    assert f"  Format: {DatasetExportFormat.VI_JSONL}" in run_example.printed
    namespace = await run_example("list_exports", 1)
    assert {e.dataset_export_id for e in namespace["ready_exports"]} == listed


def jsonl_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_vi_download(save_dir: Path, splits: list[str], with_media: bool) -> None:
    """The Vi layout, read back with json and Pillow: every image line has its box."""
    lines = [
        line for split in splits for line in jsonl_lines(save_dir / f"annotations/{split}.jsonl")
    ]
    assert sorted(line["asset_id"] for line in lines) == sorted([*IMAGES, "note"])
    for line in lines:
        if line["media_type"] != "image":
            continue
        label, color = IMAGES[line["asset_id"]]
        assert [t["id"] for t in line["tags"]] == [label]
        (region,) = line["annotations"]
        assert region["bounding_box"] == pytest.approx(
            {
                "x_min": EDGES["left"],
                "y_min": EDGES["top"],
                "x_max": EDGES["right"],
                "y_max": EDGES["bottom"],
            }
        )
        if with_media:
            image = Image.open(save_dir / line["file_name"]).convert("RGB")
            assert image.getpixel((0, 0)) == color
        else:
            assert "file_name" not in line


async def test_download(client: Client, ds: str, tmp_path: Path) -> None:
    run_example = example(client, tmp_path, dataset_abc123=ds)
    namespace = await run_example("download", 0)
    downloaded = namespace["downloaded"]
    assert run_example.printed == [downloaded.summary()]
    assert downloaded.format == "vi_full" and downloaded.splits == ["all"]
    assert downloaded.assets_count == len(IMAGES) + 1
    assert downloaded.annotations_count == 2 * len(IMAGES)
    check_vi_download(tmp_path / "data", ["all"], with_media=True)

    run_example.printed.clear()
    await run(lambda: __import__("shutil").rmtree(tmp_path / "data"))
    namespace = await run_example("download", 1)
    downloaded = namespace["downloaded"]
    assert run_example.printed[0] == f"Saved to: {tmp_path / 'data'}"
    assert sorted(downloaded.splits) == ["train", "validation"]
    assert sum(downloaded.split_counts.values()) == len(IMAGES) + 1
    check_vi_download(tmp_path / "data", ["train", "validation"], with_media=True)

    namespace = await run_example("download", 2)
    assert namespace["downloaded"].format == "vi_jsonl"
    check_vi_download(tmp_path / "annotations", ["all"], with_media=False)
    assert not (tmp_path / "annotations" / "assets").exists()

    await run(lambda: __import__("shutil").rmtree(tmp_path / "data"))
    namespace = await run_example("download", 3)
    assert namespace["downloaded"].assets_count == len(IMAGES) + 1
    check_vi_download(tmp_path / "data", ["all"], with_media=True)


async def test_download_native_formats_read_by_independent_readers(
    client: Client, ds: str, tmp_path: Path
) -> None:
    coco = DatasetExportSettings(format=DatasetExportFormat.COCO)
    result = await run(
        lambda: client.datasets.download(ds, export_settings=coco, save_dir=tmp_path / "coco")
    )
    assert result.format == "coco"
    reader = COCO(str(tmp_path / "coco" / "all" / "annotations.json"))
    assert len(reader.getImgIds()) == len(IMAGES)
    boxes = reader.loadAnns(reader.getAnnIds())
    # normalized=True (Vi's default) divides the pixel boxes by the image size.
    assert {tuple(round(v, 4) for v in a["bbox"]) for a in boxes} == {(0.2, 0.1, 0.5, 0.5)}

    native = DatasetExportSettings(
        format=DatasetExportFormat.CLARIFAI_DATA_PROTOBUF, options=vi.DatasetExportOptions()
    )
    result = await run(
        lambda: client.datasets.download(ds, export_settings=native, save_dir=tmp_path / "pb")
    )
    assert result.format == "clarifai_data_protobuf"
    lines = jsonl_lines(tmp_path / "pb" / "all" / "annotations.jsonl")
    parsed = [json_format.ParseDict(line["input"], resources_pb2.Input()) for line in lines]
    assert sorted(p.id for p in parsed) == sorted([*IMAGES, "note"])
    for item in parsed:
        if item.id in IMAGES:
            (region,) = item.data.regions
            assert region.region_info.bounding_box.left_col == pytest.approx(EDGES["left"])


async def test_get_dataset_shortcut(client: Client, ds: str, tmp_path: Path) -> None:
    run_example = example(client, tmp_path, dataset_abc123=ds)
    namespace = await run_example("download", 3)
    result = namespace["downloaded"]
    assert result.save_dir == tmp_path / "data"
    assert result.format == "vi_full"


async def test_delete(client: Client, ds: str, tmp_path: Path) -> None:
    await run(lambda: client.native.datasets.create("other"))
    run_example = example(client, tmp_path, dataset_abc123=ds)
    await run_example("delete", 0)
    assert run_example.printed == [f"Deleted: {ds}"]
    restored = await run(lambda: client.native.datasets.undelete(ds))
    assert restored.id == ds

    run_example = example(client, tmp_path, dataset_abc123="other")
    await run_example("delete", 1)
    assert run_example.printed == [
        "About to delete: other",
        "  Assets: 0",
        "  Annotations: 0",
        "Deleted.",
    ]
    remaining = await run(lambda: [d.dataset_id for d in client.datasets.list().all_items()])
    assert remaining == [ds]
    deleted = await run(lambda: client.datasets.delete(ds))
    assert (deleted.kind, deleted.dataset_id) == ("Dataset", ds)
    assert deleted.status.conditions[0].condition == "Deleted"


async def test_bulk_delete_assets(client: Client, ds: str, tmp_path: Path) -> None:
    run_example = example(client, tmp_path, dataset_abc123=ds)
    namespace = await run_example("bulk_delete_assets", 0)
    # datasetd stores an input only once it is checked: none is ever in error.
    assert namespace["response"].status.deleted == 0
    assert namespace["response"].spec.filter == '{"status": "error"}'
    namespace = await run_example("bulk_delete_assets", 1)
    session = namespace["response"]
    assert (session.status.matched, session.status.deleted) == (1, 1)
    remaining = await run(lambda: [i.id for i in client.dataset(ds).list_inputs()])
    assert sorted(remaining) == sorted(IMAGES)

    cats = [i for i, (label, _) in IMAGES.items() if label == "cat"]
    by_tag = await run(
        lambda: client.datasets.bulk_delete_assets(
            ds, {"tags": {"$in": ["cat"]}}, strict_query=True
        )
    )
    assert by_tag.status.deleted == len(cats)
    with pytest.raises(ValueError, match="unknown filter field 'colour'"):
        await run(
            lambda: client.datasets.bulk_delete_assets(ds, {"colour": "red"}, strict_query=True)
        )
    with pytest.raises(ValueError, match="empty filter"):
        await run(lambda: client.datasets.bulk_delete_assets(ds, "{}", strict_query=True))
    # Lenient: a bare key is a metadata key, matching nothing here (no input has it).
    lenient = await run(lambda: client.datasets.bulk_delete_assets(ds, {"colour": "red"}))
    assert lenient.status.matched == 0
    left = await run(lambda: client.datasets.get(ds))
    assert left.statistic.asset_total == len(IMAGES) - len(cats)


# --- training loaders ---

LOADER_SPLIT = DatasetExportSettings(options=DatasetExportOptions(split_ratio=0.5))


def check_samples(samples: ViSamples, splits: set[str]) -> None:
    seen = []
    for image, line in samples:
        label, color = IMAGES[line["asset_id"]]
        assert image.convert("RGB").getpixel((0, 0)) == color
        assert image.size == (16, 12)
        assert line["split"] in splits
        (region,) = line["annotations"]
        assert region["concepts"][0]["id"] == label
        assert region["bounding_box"]["x_min"] == pytest.approx(EDGES["left"])
        seen.append(line["asset_id"])
    assert sorted(seen) == sorted(IMAGES)


async def test_samples_of_a_download(client: Client, ds: str, tmp_path: Path) -> None:
    await run(
        lambda: client.datasets.download(ds, export_settings=LOADER_SPLIT, save_dir=tmp_path / "d")
    )
    samples = await run(lambda: ViSamples.from_folder(tmp_path / "d"))
    assert len(samples) == len(IMAGES)
    assert sum(samples.splits.values()) == len(IMAGES)
    check_samples(samples, {"train", "validation"})
    train = ViSamples.from_folder(tmp_path / "d", split="train")
    assert len(train) == samples.splits["train"]
    raw = ViSamples.from_folder(tmp_path / "d", decode=False)
    assert raw[0].image[:8] == b"\x89PNG\r\n\x1a\n"
    wrapped = ViSamples.from_folder(tmp_path / "d", transform=lambda s: s.annotations["asset_id"])
    assert sorted(wrapped) == sorted(IMAGES)


async def test_other_layouts_are_refused(client: Client, ds: str, tmp_path: Path) -> None:
    coco = DatasetExportSettings(format=DatasetExportFormat.COCO)
    await run(lambda: client.datasets.download(ds, export_settings=coco, save_dir=tmp_path / "c"))
    with pytest.raises(ValueError, match="Vi format"):
        ViSamples.from_folder(tmp_path / "c")


async def test_samples_streamed_from_the_server(client: Client, ds: str) -> None:
    version = await run(lambda: client.native.dataset(ds).create_version("v1"))
    samples = await run(lambda: ViSamples.from_server(client, ds, export_settings=LOADER_SPLIT))
    check_samples(samples, {"train", "validation"})
    # The export is of the newest READY version, made before: no new snapshot.
    versions = await run(lambda: list(client.native.dataset(ds).list_versions()))
    assert [v.id for v in versions] == [version.id]
    # Spooled in a temporary file instead of memory, the samples are the same.
    spooled = await run(
        lambda: ViSamples.from_server(client, ds, "v1", LOADER_SPLIT, memory_limit=0)
    )
    check_samples(spooled, {"train", "validation"})
    validation = await run(lambda: ViSamples.from_server(client, ds, split="validation"))
    assert {line["split"] for line in validation.lines} <= {"validation", "all"}


@pytest.mark.torch
async def test_pytorch_data_loader(client: Client, ds: str, tmp_path: Path) -> None:
    import torch
    from torch.utils.data import DataLoader

    def tensors(sample: Sample) -> tuple[Any, Any]:
        pixels = bytearray(sample.image.convert("RGB").tobytes())
        image = torch.frombuffer(pixels, dtype=torch.uint8)
        box = sample.annotations["annotations"][0]["bounding_box"]
        return image.reshape(12, 16, 3), torch.tensor(
            [box[k] for k in ("x_min", "y_min", "x_max", "y_max")]
        )

    await run(lambda: client.datasets.download(ds, save_dir=tmp_path / "d"))
    samples = ViSamples.from_folder(tmp_path / "d", transform=tensors)

    def batches(loader: DataLoader[Any]) -> Iterator[tuple[Any, Any]]:
        yield from loader

    for workers in (0, 2):
        loader: DataLoader[Any] = DataLoader(
            torch_dataset(samples), batch_size=4, shuffle=True, num_workers=workers
        )
        images, boxes = zip(*batches(loader), strict=True)
        assert sum(len(b) for b in images) == len(IMAGES)
        assert images[0].shape[1:] == (12, 16, 3)
        assert torch.allclose(boxes[0][0], torch.tensor([0.2, 0.1, 0.7, 0.6]))
    streamed = await run(lambda: ViSamples.from_server(client, ds, transform=tensors))
    loader = DataLoader(torch_iterable(streamed), batch_size=3, num_workers=2)
    assert sum(len(images) for images, _ in batches(loader)) == len(IMAGES)


# --- the README's section "For Datature Vi users" ---


def readme_block(containing: str) -> str:
    from tests.readme import fenced_block

    return fenced_block("python", containing)


async def run_readme_examples(
    server: Running, caller: Caller, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Any], list[str]]:
    """The Quick start's `pets` (20 labelled images, version v1), then the section's client
    and loader examples as written, in one namespace, from a scratch folder."""
    from service.client import UploadItem
    from tests.helpers import png_bytes

    monkeypatch.setenv("DATASETD_API_KEY", caller.key)
    monkeypatch.setenv("DATASETD_APP", caller.app_id)
    monkeypatch.setenv("DATASETD_ADDRESS", f"127.0.0.1:{server.port}")
    monkeypatch.chdir(tmp_path)
    with Client() as setup:
        items = [
            UploadItem(f"{label}-{i}", data=png_bytes(64, 48, (r, g, 10 * i)), concepts=(label,))
            for label, (r, g) in (("cat", (200, 120)), ("dog", (60, 90)))
            for i in range(10)
        ]

        def quick_start() -> None:
            setup.native.datasets.create("pets", description="Cats and dogs")
            pets = setup.native.dataset("pets")
            pets.upload_inputs(items, show_progress=False, failure_log=tmp_path / "f.csv")
            pets.create_version("v1")

        await run(quick_start)
    printed: list[str] = []
    namespace: dict[str, Any] = {"print": lambda *a: printed.append(" ".join(map(str, a)))}
    for block in (readme_block("client = Client()"), readme_block("ViSamples.from_server")):
        await run(lambda block=block: exec(block, namespace))  # type: ignore[misc]
    return namespace, printed


async def test_the_readme_examples_run_as_written(
    server: Running, caller: Caller, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    namespace, printed = await run_readme_examples(server, caller, tmp_path, monkeypatch)
    try:
        assert printed[0] == "pets: 20 assets"
        assert "vi_full" in printed[1] and namespace["downloaded"].splits == ["train", "validation"]
        assert printed[2] == "0"
        train = namespace["samples"]
        assert len(train) == namespace["downloaded"].split_counts["train"]
        assert printed[3 : 3 + len(train)] == [
            f"{s.annotations['asset_id']} (64, 48) ['{s.annotations['asset_id'][:3]}']"
            for s in train
        ]
        assert printed[-1] == "20 {'all': 20}"
    finally:
        namespace["client"].close()


@pytest.mark.torch
async def test_the_readme_torch_example_runs_as_written(
    server: Running, caller: Caller, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    namespace, printed = await run_readme_examples(server, caller, tmp_path, monkeypatch)
    try:
        del printed[:]
        await run(lambda: exec(readme_block("DataLoader(torch_dataset"), namespace))
        train = len(namespace["samples"])
        shuffled = [line for line in printed if line.startswith(str(min(8, train)))]
        assert shuffled, printed
        assert sum(int(line) for line in printed if line.isdigit()) == 20
    finally:
        namespace["client"].close()
