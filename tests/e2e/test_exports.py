"""Exports of dataset versions as a caller sees them: the real server and job runner, the
archives read back with the Clarifai reference classes and pycocotools.

Every rule of export-formats.md §1 is checked on the archives themselves (zipfile), and
every batch is parsed by `clarifai_grpc`'s InputBatch, as existing readers do.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import zipfile
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from clarifai_grpc.grpc.api import resources_pb2
from datasetd.v1 import annotation_service_pb2 as aapi
from datasetd.v1 import common_pb2, data_pb2, dataset_version_pb2, input_pb2, status_pb2
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import dataset_version_service_pb2 as api
from datasetd.v1 import input_service_pb2 as iapi
from google.protobuf import json_format
from pycocotools.coco import COCO

from service.api.links import DownloadLinks
from service.app import Running
from service.domain.clock import SystemClock
from service.domain.exports import ExportBuilder, ExportService, ExportSettings
from service.domain.jobs import Job, JobKind
from service.domain.models import ExportFormat, ExportOptions, Principal, SplitOptions
from service.domain.versions import RETIRED_BUILD
from service.formats.archives import Archives
from service.storage.blobs import ContentAddressedBlobStore
from service.storage.db import Database
from service.storage.exports import PgExportRepository
from service.storage.versions import PgVersionRepository
from tests.conftest import Caller, new_caller
from tests.e2e.test_annotations import TEXT, add, annotation, box, concepts, float32
from tests.e2e.test_inputs import create, image_input, metadata, new_dataset, text_input
from tests.e2e.test_versions import (
    build,
    content,
    create_version,
    every_kind_of_content,
    parsed,
)
from tests.helpers import call_error, download, png_bytes
from tests.snapshots import HeldJobs, version_service
from tests.unit.test_media import mp4

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

# pycocotools' own use of numpy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
PROTOBUF = dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF
JSON = dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_JSON
COCO_FORMAT = dataset_version_pb2.EXPORT_FORMAT_COCO
PENDING = status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_PENDING
IN_PROGRESS = status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_IN_PROGRESS
SUCCESS = status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_SUCCESS
FAILED = status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_FAILED
EXPORT_TIMEOUT_SECONDS = 30.0
BATCH_NAME = re.compile(r"^([a-z0-9_-]+)/batch-\d{6}_n(\d+)$")
MIMETYPES = {
    PROTOBUF: b"application/x.clarifai-data+protobuf",
    JSON: b"application/x.clarifai-data+json",
}
# What the every-kind content was uploaded with (see tests.e2e.test_versions).
ORIGINALS = {
    "img": png_bytes(16, 12, (10, 20, 30)),
    "plain": png_bytes(16, 12, (1, 2, 3)),
    "vid": mp4(),
}
WIDTH, HEIGHT = 16, 12

RefInput = Any  # resources_pb2.Input: clarifai_grpc ships no type information


# --- calls ----------------------------------------------------------------------------------


def options(
    ratios: dict[str, float] | None = None, seed: int = 0, embed_media: bool = False
) -> api.ExportOptions:
    message = api.ExportOptions(embed_media=embed_media)
    if ratios is not None:
        message.split.ratios.update(ratios)
        message.split.seed = seed
    return message


async def request_export(
    stub: Versions,
    caller: Caller,
    dataset_id: str,
    version_id: str,
    export_format: dataset_version_pb2.ExportFormat.ValueType,
    export_options: api.ExportOptions | None = None,
    **extra: Any,
) -> api.Export:
    response = await stub.ExportDatasetVersion(
        api.ExportDatasetVersionRequest(
            app_id=caller.app_id,
            dataset_id=dataset_id,
            version_id=version_id,
            format=export_format,
            options=export_options or options(),
            **extra,
        ),
        metadata=caller.metadata,
    )
    return response.export


async def get_export(
    stub: Versions, caller: Caller, dataset_id: str, version_id: str, export_id: str
) -> api.Export:
    response = await stub.GetExport(
        api.GetExportRequest(
            app_id=caller.app_id, dataset_id=dataset_id, version_id=version_id, export_id=export_id
        ),
        metadata=caller.metadata,
    )
    return response.export


async def finished(
    stub: Versions, caller: Caller, dataset_id: str, version_id: str, export_id: str
) -> api.Export:
    """Polls the export until it succeeded or failed."""
    deadline = asyncio.get_running_loop().time() + EXPORT_TIMEOUT_SECONDS
    while True:
        export = await get_export(stub, caller, dataset_id, version_id, export_id)
        if export.status.code in (SUCCESS, FAILED):
            return export
        assert asyncio.get_running_loop().time() < deadline, f"export still {export.status}"
        await asyncio.sleep(0.05)


async def exported(
    stub: Versions,
    caller: Caller,
    dataset_id: str,
    version_id: str,
    export_format: dataset_version_pb2.ExportFormat.ValueType,
    export_options: api.ExportOptions | None = None,
) -> tuple[api.Export, bytes]:
    """Exports, waits for success and downloads the archive through its URL."""
    started = await request_export(
        stub, caller, dataset_id, version_id, export_format, export_options
    )
    export = await finished(stub, caller, dataset_id, version_id, started.id)
    assert export.status.code == SUCCESS, export.status
    archive = await asyncio.to_thread(download, export.url)
    assert len(archive) == export.size
    return export, archive


async def download_stream(
    stub: Versions, caller: Caller, dataset_id: str, version_id: str, export_id: str
) -> tuple[api.DownloadExportResponse, bytes]:
    """The first message of a DownloadExport stream, and all the bytes."""
    messages = [
        message
        async for message in stub.DownloadExport(
            api.DownloadExportRequest(
                app_id=caller.app_id,
                dataset_id=dataset_id,
                version_id=version_id,
                export_id=export_id,
            ),
            metadata=caller.metadata,
        )
    ]
    assert all(len(m.chunk) <= 1024 * 1024 for m in messages)
    assert all(not m.total_size and not m.sha256 for m in messages[1:])
    return messages[0], b"".join(m.chunk for m in messages)


# --- reading archives -----------------------------------------------------------------------


def batches(
    archive: bytes, export_format: dataset_version_pb2.ExportFormat.ValueType
) -> dict[str, list[RefInput]]:
    """Checks the Clarifai-Data layout rules and parses every batch with the reference
    classes; returns the inputs of each split in archive order."""
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        entries = opened.infolist()
        assert entries[0].filename == "mimetype"
        assert opened.read("mimetype") == MIMETYPES[export_format]
        splits: dict[str, list[RefInput]] = {}
        for entry in entries[1:]:
            match = BATCH_NAME.match(entry.filename)
            assert match, entry.filename
            # Readers take the count after the last `_n`: no extension may follow it.
            assert "." not in entry.filename.rsplit("/", 1)[1]
            raw = opened.read(entry)
            if export_format == PROTOBUF:
                batch = resources_pb2.InputBatch.FromString(raw)
            else:
                batch = json_format.Parse(raw, resources_pb2.InputBatch())
            assert len(batch.inputs) == int(match.group(2)) <= 1000
            splits.setdefault(match.group(1), []).extend(batch.inputs)
    return splits


def by_id(inputs: list[RefInput]) -> dict[str, RefInput]:
    return {item.id: item for item in inputs}


def coco(archive: bytes, tmp_path: Path, split: str = "all") -> COCO:
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        path = tmp_path / f"instances_{split}.json"
        path.write_bytes(opened.read(f"annotations/instances_{split}.json"))
    return COCO(str(path))


# --- the every-kind version -------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    caller: Caller
    mask: data_pb2.Mask
    # The version's content parsed by the reference classes, by input id.
    snapshot: dict[str, RefInput]


@pytest.fixture(scope="module")
async def every_kind(
    versions: Versions, annotations: Annotations, inputs: Inputs, datasets: Datasets, db: Database
) -> Version:
    """Version "v1" of dataset "ds" with every kind of content (see every_kind_of_content)."""
    return await every_kind_version(versions, annotations, inputs, datasets, db)


async def every_kind_version(
    versions: Versions, annotations: Annotations, inputs: Inputs, datasets: Datasets, db: Database
) -> Version:
    caller = await new_caller(db)
    mask = await every_kind_of_content(annotations, inputs, datasets, caller)
    await build(versions, caller, "ds", "v1")
    return Version(caller, mask, parsed(await content(db, caller, "ds", "v1")))


def rehosted(snapshot: dict[str, RefInput], server: Running, app_id: str) -> dict[str, RefInput]:
    """The version's content as the Clarifai archives carry it: the `hosted.prefix` of
    stored originals is the HTTP port's (service.api.links.DownloadLinks.hosted_prefix)."""
    prefix = f"http://127.0.0.1:{server.http_port}/v2/downloads/apps/{app_id}/blobs"
    expected = {}
    for input_id, item in snapshot.items():
        copy = resources_pb2.Input()
        copy.CopyFrom(item)
        for medium in ("image", "video", "audio", "text"):
            media = getattr(copy.data, medium)
            if copy.data.HasField(medium) and media.HasField("hosted"):
                media.hosted.prefix = prefix
        expected[input_id] = copy
    return expected


def check_every_kind(inputs: dict[str, RefInput], mask: data_pb2.Mask) -> None:
    """What was uploaded, read back with the reference classes."""
    assert list(inputs) == ["img", "txt", "vid", "plain"]
    img = inputs["img"].data
    assert [(c.id, c.value) for c in img.concepts] == [("cat", 1.0), ("dog", 0.0)]
    assert [r.id for r in img.regions] == ["b1", "p1", "pt", "kp", "m1"]
    edges = img.regions[0].region_info.bounding_box
    assert (edges.top_row, edges.left_col, edges.bottom_row, edges.right_col) == tuple(
        float32(v) for v in (0.1, 0.2, 0.6, 0.7)
    )
    assert [c.id for c in img.regions[0].data.concepts] == ["cat"]
    assert [(p.row, p.col) for p in img.regions[1].region_info.polygon.points] == [
        (float32(r), float32(c)) for r, c in ((0.1, 0.1), (0.9, 0.5), (0.1, 0.9))
    ]
    assert img.regions[2].region_info.point.col == float32(0.75)
    assert len(img.regions[3].region_info.keypoint_locations) == 2
    assert img.regions[4].region_info.mask.image.base64 == mask.image.base64
    assert (img.image.image_info.width, img.image.image_info.height) == (WIDTH, HEIGHT)
    txt = inputs["txt"].data
    assert txt.text.raw == TEXT
    assert txt.regions[0].region_info.span.char_end == 19
    vid = inputs["vid"].data
    assert [f.frame_info.number for f in vid.frames] == [0, 25, 49]
    assert [f.data.regions[0].id for f in vid.frames] == ["fox-0", "fox-25", "fox-49"]
    assert vid.frames[1].data.regions[0].region_info.bounding_box.bottom_row == float32(0.5)
    plain = inputs["plain"].data
    assert plain.metadata["camera"] == "x100"
    assert plain.geo.geo_point.latitude == float32(52.5)
    assert plain.geo.geo_point.longitude == float32(13.4)


# --- tests ----------------------------------------------------------------------------------


async def test_protobuf_archive_follows_every_rule_and_downloads_both_ways(
    versions: Versions, every_kind: Version, server: Running
) -> None:
    caller = every_kind.caller
    export, archive = await exported(versions, caller, "ds", "v1", PROTOBUF)
    assert (export.dataset_id, export.version_id, export.format) == ("ds", "v1", PROTOBUF)
    assert export.status.percent_completed == 100
    assert dict(export.split_counts) == {"all": 4}
    assert export.url_expire_time.ToDatetime() > export.created_at.ToDatetime()
    assert export.modified_at.ToDatetime() >= export.created_at.ToDatetime()
    assert not export.fidelity.dropped and export.fidelity.notes

    first, streamed = await download_stream(versions, caller, "ds", "v1", export.id)
    assert streamed == archive
    assert first.total_size == len(archive)
    assert first.sha256 == hashlib.sha256(archive).hexdigest()

    splits = batches(archive, PROTOBUF)
    assert list(splits) == ["all"]
    inputs = by_id(splits["all"])
    check_every_kind(inputs, every_kind.mask)
    # Exactly the version's content: nothing added, nothing lost; `hosted` under the HTTP
    # port, where Clarifai's reader fetches prefix + "/orig/" + suffix.
    assert inputs == rehosted(every_kind.snapshot, server, caller.app_id)
    image = inputs["img"].data.image
    assert image.url.endswith(f"/orig/{image.hosted.suffix}")
    assert image.hosted.prefix.startswith(f"http://127.0.0.1:{server.http_port}/v2/downloads/")
    assert list(image.hosted.sizes) == ["orig"] and not image.base64

    version = (
        await versions.GetDatasetVersion(
            api.GetDatasetVersionRequest(app_id=caller.app_id, dataset_id="ds", version_id="v1"),
            metadata=caller.metadata,
        )
    ).version
    info = version.export_info.clarifai_data_protobuf
    assert (info.format, info.status.code, info.size) == (PROTOBUF, SUCCESS, len(archive))
    assert info.url


async def test_json_archive_parses_into_the_reference_model(
    versions: Versions, every_kind: Version, server: Running
) -> None:
    export, archive = await exported(versions, every_kind.caller, "ds", "v1", JSON)
    assert dict(export.split_counts) == {"all": 4}
    splits = batches(archive, JSON)
    inputs = by_id(splits["all"])
    check_every_kind(inputs, every_kind.mask)
    assert inputs == rehosted(every_kind.snapshot, server, every_kind.caller.app_id)
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        document = json.loads(opened.read(opened.namelist()[1]))
    # The protobuf JSON mapping with the proto field names.
    assert "region_info" in document["inputs"][0]["data"]["regions"][0]


async def test_coco_archive_loads_with_pycocotools(
    versions: Versions, every_kind: Version, tmp_path: Path
) -> None:
    caller = every_kind.caller
    export, archive = await exported(versions, caller, "ds", "v1", COCO_FORMAT)
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        assert opened.namelist() == ["annotations/instances_all.json"]
    loaded = coco(archive, tmp_path)
    images = {image["datasetd_input_id"]: image for image in loaded.dataset["images"]}
    assert list(images) == ["img", "plain"]
    img = images["img"]
    assert (img["width"], img["height"], img["file_name"]) == (WIDTH, HEIGHT, "img.png")
    assert img["coco_url"] == every_kind.snapshot["img"].data.image.url
    categories = {c["name"]: c["id"] for c in loaded.dataset["categories"]}
    assert categories == {"cat": 1, "dog": 2, "fur": 3, "nose": 4, "pose": 5, "tail": 6}
    assert img["datasetd_concepts"] == [
        {"concept_id": "cat", "category_id": 1, "value": 1.0},
        {"concept_id": "dog", "category_id": 2, "value": 0.0},
    ]

    annotations = {a["datasetd_region_id"]: a for a in loaded.loadAnns(loaded.getAnnIds())}
    assert set(annotations) == {"b1", "p1", "m1"}
    boxed = annotations["b1"]
    assert boxed["category_id"] == 1 and boxed["image_id"] == img["id"]
    expected = (0.2 * WIDTH, 0.1 * HEIGHT, 0.5 * WIDTH, 0.5 * HEIGHT)
    assert all(abs(a - b) <= 0.5 for a, b in zip(boxed["bbox"], expected, strict=True))
    assert abs(boxed["area"] - 0.5 * WIDTH * 0.5 * HEIGHT) <= 0.5
    polygon = annotations["p1"]
    assert polygon["category_id"] == 6
    corners = [
        (0.1 * WIDTH, 0.1 * HEIGHT),
        (0.5 * WIDTH, 0.9 * HEIGHT),
        (0.9 * WIDTH, 0.1 * HEIGHT),
    ]
    flat = polygon["segmentation"][0]
    assert all(
        abs(a - b) <= 0.01 for a, b in zip(flat, [v for c in corners for v in c], strict=True)
    )
    assert abs(polygon["area"] - 0.5 * (0.8 * WIDTH) * (0.8 * HEIGHT)) <= 0.01
    assert polygon["bbox"] == pytest.approx([1.6, 1.2, 12.8, 9.6], abs=0.01)
    masked = annotations["m1"]
    assert masked["category_id"] == 3
    assert masked["area"] == WIDTH * HEIGHT and masked["bbox"] == [0, 0, WIDTH, HEIGHT]
    assert int(loaded.annToMask(masked).sum()) == WIDTH * HEIGHT
    assert int(loaded.annToMask(polygon).sum()) > 0

    assert dict(export.fidelity.dropped) == {
        "video_inputs": 1,
        "video_frames": 3,
        "text_inputs": 1,
        "text_spans": 1,
        "points": 1,
        "keypoints": 1,
        "metadata": 1,
        "geo": 1,
    }
    assert any("datasetd_concepts" in note for note in export.fidelity.notes)

    # Categories are the same in every export of the version, split or not.
    _, split_archive = await exported(
        versions, caller, "ds", "v1", COCO_FORMAT, options({"train": 0.5, "val": 0.5}, seed=3)
    )
    split_images = 0
    for split in ("train", "val"):
        part = coco(split_archive, tmp_path, split)
        assert part.dataset["categories"] == loaded.dataset["categories"]
        split_images += len(part.dataset["images"])
    assert split_images == 2


async def test_embedded_media_are_the_original_bytes(
    versions: Versions, every_kind: Version, tmp_path: Path
) -> None:
    caller = every_kind.caller
    embedded = options(embed_media=True)
    for export_format in (PROTOBUF, JSON):
        export, archive = await exported(versions, caller, "ds", "v1", export_format, embedded)
        assert export.options.embed_media
        inputs = by_id(batches(archive, export_format)["all"])
        check_every_kind(inputs, every_kind.mask)
        assert inputs["img"].data.image.base64 == ORIGINALS["img"]
        assert inputs["plain"].data.image.base64 == ORIGINALS["plain"]
        assert inputs["vid"].data.video.base64 == ORIGINALS["vid"]
        assert inputs["txt"].data.text.raw == TEXT
        for item, medium in (("img", "image"), ("vid", "video"), ("txt", "text")):
            media = getattr(inputs[item].data, medium)
            assert not media.url and not media.HasField("hosted")
        assert inputs["vid"].data.video.video_info.frame_count == 50

    export, archive = await exported(versions, caller, "ds", "v1", COCO_FORMAT, embedded)
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        assert opened.read("images/all/img.png") == ORIGINALS["img"]
        assert opened.read("images/all/plain.png") == ORIGINALS["plain"]
    images = coco(archive, tmp_path).dataset["images"]
    assert [i["file_name"] for i in images] == ["img.png", "plain.png"]
    assert all("coco_url" not in i for i in images)


async def labelled_texts(
    inputs: Inputs, datasets: Datasets, caller: Caller, sizes: dict[str, int]
) -> None:
    """Dataset "ds" with `sizes[c]` texts labelled with concept c each ("" = unlabeled)."""
    await new_dataset(datasets, caller, "ds")
    items = []
    for concept, size in sizes.items():
        for n in range(size):
            item = text_input(f"{concept or 'none'}-{n}", f"text {concept} {n}")
            if concept:
                item.data.concepts.extend(concepts(concept))
            item.dataset_ids.append("ds")
            items.append(item)
    for start in range(0, len(items), 100):
        await create(inputs, caller, items[start : start + 100])


def assignment(splits: dict[str, list[RefInput]]) -> dict[str, str]:
    return {item.id: split for split, items in splits.items() for item in items}


async def test_split_is_deterministic_stratified_and_respects_ratios(
    versions: Versions, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    sizes = {"a": 12, "b": 8, "c": 4, "d": 4, "e": 2, "": 2}
    await labelled_texts(inputs, datasets, caller, sizes)
    await build(versions, caller, "ds", "v1")
    total = sum(sizes.values())
    ratios = {"train": 0.75, "validation": 0.25}

    export, archive = await exported(versions, caller, "ds", "v1", PROTOBUF, options(ratios, 7))
    splits = batches(archive, PROTOBUF)
    assert sorted(splits) == ["train", "validation"]
    assert {s: len(items) for s, items in splits.items()} == dict(export.split_counts)
    for name, ratio in ratios.items():
        assert abs(export.split_counts[name] - total * ratio) <= 1
    assert dict(export.options.split.ratios) == ratios and export.options.split.seed == 7
    first = assignment(splits)
    assert len(first) == total
    for concept, size in sizes.items():
        if concept and size >= 2:
            placed = Counter(first[f"{concept}-{n}"] for n in range(size))
            assert set(placed) == {"train", "validation"}, concept

    # The same seed always gives the same assignment, in any format and with any media.
    _, again = await exported(
        versions, caller, "ds", "v1", JSON, options(ratios, 7, embed_media=True)
    )
    assert assignment(batches(again, JSON)) == first
    _, other = await exported(versions, caller, "ds", "v1", PROTOBUF, options(ratios, 8))
    assert assignment(batches(other, PROTOBUF)) != first

    three = {"train": 0.5, "validation": 0.3, "test": 0.2}
    export, archive = await exported(versions, caller, "ds", "v1", PROTOBUF, options(three, 1))
    assert sorted(batches(archive, PROTOBUF)) == ["test", "train", "validation"]
    for name, ratio in three.items():
        assert abs(export.split_counts[name] - total * ratio) <= 1.5


async def test_pages_do_not_change_the_archive(
    server: Running, versions: Versions, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    """The builder driven directly, three members a page, against the runner's 500."""
    await labelled_texts(inputs, datasets, caller, {"a": 6, "b": 4, "c": 3, "": 2})
    await build(versions, caller, "ds", "v1")
    await build(versions, caller, "ds", "v2")
    ratios = {"train": 0.6, "test": 0.4}
    _, archive = await exported(versions, caller, "ds", "v1", PROTOBUF, options(ratios, 9))

    db, objects = server.resources.db, server.resources.objects
    blobs = ContentAddressedBlobStore(db, objects)
    records = PgExportRepository(db)
    service = ExportService(
        version_service(db, objects, HeldJobs(db)),
        records,
        HeldJobs(db),
        blobs,
        blobs,
        db,
        SystemClock(),
        ExportSettings(),
    )
    principal = Principal("test", caller.app_id, frozenset({"read", "write"}))
    held = await service.create(
        principal,
        caller.app_id,
        "ds",
        "v2",
        ExportFormat.CLARIFAI_DATA_PROTOBUF,
        ExportOptions(split=SplitOptions(ratios, 9)),
    )
    export = held.export
    assert export.job_id is not None
    payload = {"dataset_id": "ds", "version_id": "v2", "export_id": export.id}
    reported: list[int] = []

    async def progress(percent: int) -> None:
        reported.append(percent)

    # The runner's builder names media under the HTTP port: so does this one.
    links = DownloadLinks(b"", timedelta(hours=1), f"http://127.0.0.1:{server.http_port}")
    builder = ExportBuilder(
        records, PgVersionRepository(db), Archives(blobs), blobs, db, page_size=3, links=links
    )
    await builder.run(Job(export.job_id, JobKind.EXPORT_VERSION, caller.app_id, payload), progress)
    # Three passes of five pages.
    assert len(reported) == 15 and reported == sorted(reported) and reported[-1] < 100
    done = await get_export(versions, caller, "ds", "v2", export.id)
    assert done.status.code == SUCCESS
    paged = await asyncio.to_thread(download, done.url)
    assert batches(paged, PROTOBUF) == batches(archive, PROTOBUF)


async def test_same_request_same_export_with_progress_then_listed(
    versions: Versions, inputs: Inputs, datasets: Datasets, caller: Caller, db: Database
) -> None:
    await labelled_texts(inputs, datasets, caller, {"a": 3, "b": 2})
    await build(versions, caller, "ds", "v1")
    # Reads go on, but the archive cannot be registered in blobs: the job stops there,
    # in progress, once it has written the archive.
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE blobs IN SHARE MODE")
        first = await request_export(versions, caller, "ds", "v1", COCO_FORMAT)
        assert first.status.code in (PENDING, IN_PROGRESS)
        deadline = asyncio.get_running_loop().time() + EXPORT_TIMEOUT_SECONDS
        while True:
            again = await request_export(versions, caller, "ds", "v1", COCO_FORMAT)
            assert again.id == first.id
            if again.status.code == IN_PROGRESS and again.status.percent_completed > 0:
                break
            assert asyncio.get_running_loop().time() < deadline, again.status
            await asyncio.sleep(0.05)
        assert again.status.percent_completed < 100 and not again.url
        unfinished = await call_error(download_stream(versions, caller, "ds", "v1", first.id))
        assert (unfinished.code, unfinished.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "EXPORT_NOT_READY",
        )
    done = await finished(versions, caller, "ds", "v1", first.id)
    assert done.status.code == SUCCESS
    replay = await request_export(versions, caller, "ds", "v1", COCO_FORMAT)
    assert (replay.id, replay.status.code, replay.size) == (first.id, SUCCESS, done.size)

    # A request id replays the first response; other options are another export.
    keyed = await request_export(versions, caller, "ds", "v1", PROTOBUF, request_id="exp-1")
    assert await request_export(versions, caller, "ds", "v1", PROTOBUF, request_id="exp-1") == keyed
    split = await request_export(versions, caller, "ds", "v1", PROTOBUF, options({"all": 1.0}))
    assert len({first.id, keyed.id, split.id}) == 3

    listed: list[str] = []
    token = ""
    while True:
        page = await versions.ListExports(
            api.ListExportsRequest(
                app_id=caller.app_id,
                dataset_id="ds",
                version_id="v1",
                page_size=1,
                page_token=token,
            ),
            metadata=caller.metadata,
        )
        assert len(page.exports) <= 1
        listed += [e.id for e in page.exports]
        token = page.next_page_token
        if not token:
            break
    assert listed == [first.id, keyed.id, split.id]


async def test_a_failed_export_is_retried_when_asked_again(
    server: Running, versions: Versions, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "ds")
    original = png_bytes(16, 12, (77, 1, 99))
    item = input_pb2.Input(
        id="lost", data=data_pb2.Data(image=data_pb2.Image(base64=original)), dataset_ids=["ds"]
    )
    stored = (await create(inputs, caller, [item])).results[0].input.data.image.hosted
    await build(versions, caller, "ds", "v1")
    objects = server.resources.objects
    key = f"blobs/orig/{stored.suffix}"
    await objects.delete(key)
    try:
        embedded = options(embed_media=True)
        first = await request_export(versions, caller, "ds", "v1", PROTOBUF, embedded)
        failed = await finished(versions, caller, "ds", "v1", first.id)
        assert failed.status.code == FAILED and failed.status.details
    finally:
        await objects.put(key, original, "image/png")
    retried = await request_export(versions, caller, "ds", "v1", PROTOBUF, embedded)
    assert retried.id == first.id and retried.status.code in (PENDING, IN_PROGRESS, SUCCESS)
    done = await finished(versions, caller, "ds", "v1", first.id)
    assert done.status.code == SUCCESS and not done.status.details
    archive = await asyncio.to_thread(download, done.url)
    assert batches(archive, PROTOBUF)["all"][0].data.image.base64 == original


async def test_a_ready_version_exports_the_same_archive_after_edits(
    versions: Versions,
    annotations: Annotations,
    inputs: Inputs,
    datasets: Datasets,
    caller: Caller,
) -> None:
    await new_dataset(datasets, caller, "ds")
    items = [
        image_input("a", color=(5, 6, 7), concepts=concepts("cat"), metadata=metadata({"v": 1})),
        image_input("b", color=(8, 9, 10)),
        text_input("t", "some text"),
    ]
    for item in items:
        item.dataset_ids.append("ds")
    await create(inputs, caller, items)
    await add(
        annotations,
        caller,
        [
            annotation(
                "a", "box", regions=[box("r", "cat", top=0.1, left=0.1, bottom=0.2, right=0.2)]
            )
        ],
        atomic=True,
    )
    await build(versions, caller, "ds", "v1")
    before, archive = await exported(versions, caller, "ds", "v1", PROTOBUF)

    await inputs.UpdateInputs(
        iapi.UpdateInputsRequest(
            app_id=caller.app_id,
            inputs=[input_pb2.Input(id="a", data=data_pb2.Data(metadata=metadata({"v": 2})))],
            action=common_pb2.PATCH_ACTION_MERGE,
        ),
        metadata=caller.metadata,
    )
    await annotations.DeleteAnnotations(
        aapi.DeleteAnnotationsRequest(app_id=caller.app_id, ids=["box"]), metadata=caller.metadata
    )
    await datasets.RemoveDatasetInputs(
        dapi.RemoveDatasetInputsRequest(app_id=caller.app_id, dataset_id="ds", input_ids=["b"]),
        metadata=caller.metadata,
    )
    await inputs.DeleteInputs(
        iapi.DeleteInputsRequest(app_id=caller.app_id, ids=["t"]), metadata=caller.metadata
    )

    # A one-way split named "all" lays the archive out exactly as no split does.
    after, again = await exported(
        versions, caller, "ds", "v1", PROTOBUF, options({"all": 1.0}, seed=5)
    )
    assert after.id != before.id
    assert again == archive
    inputs_after = by_id(batches(again, PROTOBUF)["all"])
    assert list(inputs_after) == ["a", "b", "t"]
    assert inputs_after["a"].data.metadata["v"] == 1 and inputs_after["a"].data.regions


async def test_bad_requests_name_the_field(
    versions: Versions, inputs: Inputs, datasets: Datasets, caller: Caller, db: Database
) -> None:
    await labelled_texts(inputs, datasets, caller, {"a": 1})
    await build(versions, caller, "ds", "v1")

    unspecified = await call_error(
        request_export(versions, caller, "ds", "v1", dataset_version_pb2.EXPORT_FORMAT_UNSPECIFIED)
    )
    assert unspecified.code == grpc.StatusCode.INVALID_ARGUMENT and "format" in unspecified.fields

    async def bad_split(ratios: dict[str, float]) -> dict[str, str]:
        error = await call_error(
            request_export(versions, caller, "ds", "v1", PROTOBUF, options(ratios))
        )
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        return error.fields

    field = "options.split.ratios"
    assert set(await bad_split({"train": 0.8, "val": -0.2, "test": 0.4})) == {f"{field}[val]"}
    assert set(await bad_split({"train": 1.0, "val": 0.0})) == {f"{field}[val]"}
    assert set(await bad_split({"train": 0.8, "val": 0.3})) == {field}
    assert set(await bad_split({"Train": 0.5, "va l": 0.5})) == {
        f"{field}[Train]",
        f"{field}[va l]",
    }
    assert set(await bad_split({})) == {field}

    unknown = await call_error(request_export(versions, caller, "ds", "nope", PROTOBUF))
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")
    missing = await call_error(get_export(versions, caller, "ds", "v1", "nope"))
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "EXPORT_NOT_FOUND")

    # A version that is not READY cannot be exported: one that was building when datasetd
    # was upgraded, failed by migration 0014 (versions are READY when created now).
    await create_version(versions, caller, "ds", "v2")
    await db.execute(
        "UPDATE dataset_versions SET status = 'failed', details = $3"
        " WHERE app_id = $1 AND dataset_id = 'ds' AND id = $2",
        caller.app_id,
        "v2",
        RETIRED_BUILD,
    )
    failed = await call_error(request_export(versions, caller, "ds", "v2", PROTOBUF))
    assert (failed.code, failed.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "VERSION_NOT_READY",
    )

    stranger = await new_caller(db)
    denied = await call_error(
        versions.ListExports(
            api.ListExportsRequest(app_id=caller.app_id, dataset_id="ds", version_id="v1"),
            metadata=stranger.metadata,
        )
    )
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED
