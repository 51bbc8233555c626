"""DiffDatasetVersions and ImportDataset as a caller sees them."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import zipfile
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from clarifai_grpc.grpc.api import resources_pb2
from datasetd.v1 import annotation_service_pb2 as aapi
from datasetd.v1 import (
    common_pb2,
    data_pb2,
    dataset_service_pb2_grpc,
    dataset_version_pb2,
    input_pb2,
)
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import dataset_version_service_pb2 as api
from datasetd.v1 import input_service_pb2 as iapi
from PIL import Image
from pycocotools import mask as coco_mask

from service import app
from service.app import Resources, Running
from service.config import Config
from service.domain.diffs import DiffService
from service.domain.errors import Aborted
from service.domain.models import Principal
from service.domain.versions import RETIRED_BUILD
from service.formats.snapshot import ProtobufContentConcepts
from service.storage.db import Database
from service.storage.diffs import PgVersionPairs
from service.storage.inputs import PgMembershipRepository
from service.storage.versions import PgVersionRepository
from tests.conftest import Caller, Stack, new_caller, object_store
from tests.e2e.test_annotations import add, annotation, box, concepts, float32, list_all
from tests.e2e.test_exports import exported
from tests.e2e.test_exports import options as export_options
from tests.e2e.test_inputs import (
    create,
    image_input,
    list_ids,
    metadata,
    new_dataset,
    text_input,
)
from tests.e2e.test_upload import download_stream
from tests.e2e.test_versions import (
    build,
    content,
    create_version,
    every_kind_of_content,
    parsed,
)
from tests.helpers import CallError, call_error, details_of, png_bytes

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

MIB = 1024 * 1024
PROTOBUF = dapi.IMPORT_FORMAT_CLARIFAI_DATA_PROTOBUF
COCO = dapi.IMPORT_FORMAT_COCO
MIMETYPE = b"application/x.clarifai-data+protobuf"
EXPORT_PROTOBUF = dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF
EXPORT_COCO = dataset_version_pb2.EXPORT_FORMAT_COCO
ADDED = api.INPUT_CHANGE_KIND_ADDED
REMOVED = api.INPUT_CHANGE_KIND_REMOVED
CHANGED = api.INPUT_CHANGE_KIND_CHANGED


# --- diff helpers ---------------------------------------------------------------------------


async def diff(
    stub: Versions, caller: Caller, dataset_id: str, older: str, newer: str
) -> tuple[list[api.InputChanges], api.DiffSummary]:
    """The change batches and the summary, checking that the summary comes last only."""
    call = stub.DiffDatasetVersions(
        api.DiffDatasetVersionsRequest(
            app_id=caller.app_id,
            dataset_id=dataset_id,
            from_version_id=older,
            to_version_id=newer,
        ),
        metadata=caller.metadata,
    )
    messages = [message async for message in call]
    assert messages and messages[-1].WhichOneof("part") == "summary"
    assert all(m.WhichOneof("part") == "changes" for m in messages[:-1])
    return [m.changes for m in messages[:-1]], messages[-1].summary


def changes_of(batches: list[api.InputChanges]) -> list[tuple[str, int, list[str], list[str]]]:
    return [
        (c.input_id, c.kind, list(c.concepts_added), list(c.concepts_removed))
        for batch in batches
        for c in batch.changes
    ]


def concept_counts(summary: api.DiffSummary) -> dict[str, tuple[int, int]]:
    return {k: (v.from_count, v.to_count) for k, v in summary.concepts.items()}


async def in_dataset(inputs: Inputs, caller: Caller, items: list[input_pb2.Input]) -> None:
    """Creates the inputs in dataset "ds", 128 per call."""
    for item in items:
        item.dataset_ids.append("ds")
    for start in range(0, len(items), 128):
        response = await create(inputs, caller, items[start : start + 128], atomic=True)
        assert response.created_count == len(items[start : start + 128])


async def relabel(inputs: Inputs, caller: Caller, input_ids: list[str], concept: str) -> None:
    await inputs.UpdateInputs(
        iapi.UpdateInputsRequest(
            app_id=caller.app_id,
            inputs=[
                input_pb2.Input(id=i, data=data_pb2.Data(concepts=concepts(concept)))
                for i in input_ids
            ],
            action=common_pb2.PATCH_ACTION_MERGE,
        ),
        metadata=caller.metadata,
    )


# --- diff tests ----------------------------------------------------------------------------


async def test_diff_reports_added_removed_and_changed_inputs(
    versions: Versions,
    annotations: Annotations,
    inputs: Inputs,
    datasets: Datasets,
    caller: Caller,
) -> None:
    await new_dataset(datasets, caller, "ds")
    await in_dataset(
        inputs,
        caller,
        [
            image_input("a", concepts=concepts("cat")),
            image_input("b", color=(1, 1, 1), concepts=concepts("dog")),
            text_input("c", "unchanged text"),
            image_input("d", color=(2, 2, 2)),
            text_input("f", "metadata changes"),
        ],
    )
    car = box("car-box", "car", top=0.1, left=0.1, bottom=0.5, right=0.5)
    await add(annotations, caller, [annotation("d", "box-d", regions=[car])], atomic=True)
    await build(versions, caller, "ds", "v1")

    # Labels are what the diff reports, but any change of content counts: "f" gets
    # metadata only. A negative concept labels nothing.
    await relabel(inputs, caller, ["a"], "kitten")
    await inputs.UpdateInputs(
        iapi.UpdateInputsRequest(
            app_id=caller.app_id,
            inputs=[input_pb2.Input(id="f", data=data_pb2.Data(metadata=metadata({"k": 1})))],
            action=common_pb2.PATCH_ACTION_MERGE,
        ),
        metadata=caller.metadata,
    )
    await datasets.RemoveDatasetInputs(
        dapi.RemoveDatasetInputsRequest(app_id=caller.app_id, dataset_id="ds", input_ids=["b"]),
        metadata=caller.metadata,
    )
    await annotations.DeleteAnnotations(
        aapi.DeleteAnnotationsRequest(app_id=caller.app_id, ids=["box-d"]),
        metadata=caller.metadata,
    )
    truck = box("truck-box", "truck", top=0.2, left=0.2, bottom=0.6, right=0.6)
    await add(
        annotations,
        caller,
        [
            annotation("d", "box-d2", regions=[truck]),
            annotation("d", "not-a-cat", concepts=concepts("cat", value=0)),
        ],
        atomic=True,
    )
    await in_dataset(inputs, caller, [image_input("e", color=(3, 3, 3), concepts=concepts("cat"))])
    await build(versions, caller, "ds", "v2")

    batches, summary = await diff(versions, caller, "ds", "v1", "v2")
    assert changes_of(batches) == [
        ("a", CHANGED, ["kitten"], []),
        ("b", REMOVED, [], []),
        ("d", CHANGED, ["truck"], ["car"]),
        ("e", ADDED, [], []),
        ("f", CHANGED, [], []),
    ]
    assert (summary.added, summary.removed, summary.changed, summary.unchanged) == (1, 1, 3, 1)
    assert concept_counts(summary) == {
        "cat": (1, 2),
        "dog": (1, 0),
        "kitten": (0, 1),
        "car": (1, 0),
        "truck": (0, 1),
    }

    back, reverse = await diff(versions, caller, "ds", "v2", "v1")
    assert changes_of(back) == [
        ("a", CHANGED, [], ["kitten"]),
        ("b", ADDED, [], []),
        ("d", CHANGED, ["car"], ["truck"]),
        ("e", REMOVED, [], []),
        ("f", CHANGED, [], []),
    ]
    assert concept_counts(reverse) == {k: (t, f) for k, (f, t) in concept_counts(summary).items()}

    same, itself = await diff(versions, caller, "ds", "v2", "v2")
    assert same == []
    assert (itself.added, itself.removed, itself.changed, itself.unchanged) == (0, 0, 0, 5)
    assert concept_counts(itself)["cat"] == (2, 2)


async def test_diff_streams_at_most_500_changes_per_message_in_id_order(
    versions: Versions, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "ds")
    await in_dataset(inputs, caller, [text_input(f"t{n:03}", f"text {n}") for n in range(400)])
    await build(versions, caller, "ds", "v1")
    await datasets.RemoveDatasetInputs(
        dapi.RemoveDatasetInputsRequest(
            app_id=caller.app_id, dataset_id="ds", input_ids=[f"t{n:03}" for n in range(100)]
        ),
        metadata=caller.metadata,
    )
    await relabel(inputs, caller, [f"t{n:03}" for n in range(100, 110)], "edited")
    await in_dataset(inputs, caller, [text_input(f"u{n:03}", f"new {n}") for n in range(450)])
    await build(versions, caller, "ds", "v2")

    batches, summary = await diff(versions, caller, "ds", "v1", "v2")
    assert [len(batch.changes) for batch in batches] == [500, 60]
    found = changes_of(batches)
    assert [input_id for input_id, *_ in found] == sorted(input_id for input_id, *_ in found)
    assert found[:100] == [(f"t{n:03}", REMOVED, [], []) for n in range(100)]
    assert found[100:110] == [(f"t{n:03}", CHANGED, ["edited"], []) for n in range(100, 110)]
    assert found[110:] == [(f"u{n:03}", ADDED, [], []) for n in range(450)]
    assert (summary.added, summary.removed, summary.changed, summary.unchanged) == (
        450,
        100,
        10,
        290,
    )
    assert concept_counts(summary) == {"edited": (0, 10)}


async def test_diff_needs_two_ready_versions_of_the_dataset(
    versions: Versions, inputs: Inputs, datasets: Datasets, caller: Caller, db: Database
) -> None:
    await new_dataset(datasets, caller, "ds")
    await new_dataset(datasets, caller, "other")
    await in_dataset(inputs, caller, [image_input("a")])
    await build(versions, caller, "ds", "v1")
    await build(versions, caller, "other", "o1")

    unknown = await call_error(diff(versions, caller, "nope", "v1", "v1"))
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "DATASET_NOT_FOUND")
    missing = await call_error(diff(versions, caller, "ds", "v1", "nope"))
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")
    # A version of another dataset is not a version of this one.
    foreign = await call_error(diff(versions, caller, "ds", "o1", "v1"))
    assert (foreign.code, foreign.reason) == (grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")
    bad = await call_error(diff(versions, caller, "bad id", "", "x" * 65))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(bad.fields) == {"dataset_id", "from_version_id", "to_version_id"}

    # A version that is not READY: one that was building when datasetd was upgraded,
    # failed by migration 0014 (versions are READY when created now).
    await create_version(versions, caller, "ds", "v2")
    await db.execute(
        "UPDATE dataset_versions SET status = 'failed', details = $2"
        " WHERE app_id = $1 AND dataset_id = 'ds' AND id = 'v2'",
        caller.app_id,
        RETIRED_BUILD,
    )
    failed = await call_error(diff(versions, caller, "ds", "v1", "v2"))
    assert failed.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.reason == "VERSION_NOT_READY" and "to_version_id" in failed.message

    # Another app's key, naming this app.
    stranger = Caller(caller.app_id, (await new_caller(db)).key)
    denied = await call_error(diff(versions, stranger, "ds", "v1", "v1"))
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED


async def test_a_version_deleted_while_its_diff_streams_ends_the_stream(
    server: Running, versions: Versions, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    """Driven through the domain with one change per message, to delete a version between
    two of them."""
    await new_dataset(datasets, caller, "ds")
    await build(versions, caller, "ds", "v1")
    await in_dataset(inputs, caller, [text_input("a", "a"), text_input("b", "b")])
    await build(versions, caller, "ds", "v2")
    db = server.resources.db
    service = DiffService(
        PgVersionRepository(db),
        PgMembershipRepository(db),
        PgVersionPairs(db),
        ProtobufContentConcepts(),
        db,
        page_size=1,
        batch_size=1,
    )
    principal = Principal("test", caller.app_id, frozenset({"read", "write"}))
    parts = await service.diff(principal, caller.app_id, "ds", "v1", "v2")
    first = await anext(parts)
    assert isinstance(first, list) and [c.input_id for c in first] == ["a"]
    await versions.DeleteDatasetVersion(
        api.DeleteDatasetVersionRequest(app_id=caller.app_id, dataset_id="ds", version_id="v1"),
        metadata=caller.metadata,
    )
    with pytest.raises(Aborted) as aborted:
        await anext(parts)
    assert aborted.value.reason == "VERSION_DELETED_CONCURRENTLY"


# --- import helpers -------------------------------------------------------------------------


def zip_of(entries: Iterable[tuple[str, bytes]], **options: Any) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, **options) as archive:
        for name, data in entries:
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def protobuf_archive(*batches: Any, mimetype: bytes | None = MIMETYPE) -> bytes:
    """An archive of InputBatch messages (ours or the reference classes'), laid out as an
    export lays them out."""
    entries = [] if mimetype is None else [("mimetype", mimetype)]
    for number, batch in enumerate(batches):
        entries.append((f"all/batch-{number:06}_n{len(batch.inputs)}", batch.SerializeToString()))
    return zip_of(entries)


def import_messages(
    caller: Caller,
    dataset_id: str,
    archive: bytes,
    archive_format: dapi.ImportFormat.ValueType = PROTOBUF,
    request_id: str = "",
) -> Iterator[dapi.ImportDatasetRequest]:
    yield dapi.ImportDatasetRequest(
        header=dapi.ImportDatasetHeader(
            app_id=caller.app_id,
            dataset_id=dataset_id,
            format=archive_format,
            request_id=request_id,
        )
    )
    for start in range(0, len(archive), MIB):
        yield dapi.ImportDatasetRequest(chunk=archive[start : start + MIB])


async def import_archive(
    stub: Datasets, caller: Caller, dataset_id: str, archive: bytes, **options: Any
) -> dapi.ImportDatasetResponse:
    async def stream() -> AsyncIterator[dapi.ImportDatasetRequest]:
        for message in import_messages(caller, dataset_id, archive, **options):
            yield message

    response: dapi.ImportDatasetResponse = await stub.ImportDataset(
        stream(), metadata=caller.metadata
    )
    return response


async def refused(
    port: int, caller: Caller, dataset_id: str, archive: bytes, **options: Any
) -> CallError:
    """An import the server must refuse, through the synchronous client: a server that
    ends a client stream early can make grpc.aio clients report INTERNAL instead of its
    status (grpc/grpc#36066; see tests/e2e/test_upload.py)."""

    def call() -> CallError:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
            try:
                stub.ImportDataset(
                    import_messages(caller, dataset_id, archive, **options),
                    metadata=caller.metadata,
                )
            except grpc.RpcError as error:
                assert isinstance(error, grpc.Call)
                return details_of(error)
        raise AssertionError("the import succeeded but was expected to fail")

    return await asyncio.to_thread(call)


async def embedded(inputs: Inputs, caller: Caller, item: input_pb2.Input) -> input_pb2.Input:
    """A version member with its stored media embedded, as an offline export carries it.
    Its URL stays: embedded bytes win over it."""
    result = input_pb2.Input()
    result.CopyFrom(item)
    for medium in ("image", "video", "audio"):
        if item.data.HasField(medium):
            chunks = await download_stream(inputs, caller, item.id)
            getattr(result.data, medium).base64 = b"".join(c.chunk for c in chunks)
    return result


def without_times(items: dict[str, Any]) -> dict[str, Any]:
    for item in items.values():
        item.ClearField("created_at")
    return items


# --- import tests ---------------------------------------------------------------------------


async def test_a_protobuf_export_imports_into_another_app_with_the_same_content(
    versions: Versions,
    annotations: Annotations,
    inputs: Inputs,
    datasets: Datasets,
    caller: Caller,
    db: Database,
) -> None:
    await every_kind_of_content(annotations, inputs, datasets, caller)
    await build(versions, caller, "ds", "v1")
    source = [
        input_pb2.Input.FromString(data or b"")
        for _, data, _ in await content(db, caller, "ds", "v1")
    ]
    members = [await embedded(inputs, caller, item) for item in source]
    # Two batches: the importer reads every entry in archive order.
    archive = protobuf_archive(
        input_pb2.InputBatch(inputs=members[:3]), input_pb2.InputBatch(inputs=members[3:])
    )

    other = await new_caller(db)
    await new_dataset(datasets, other, "copy")
    response = await import_archive(datasets, other, "copy", archive)
    # Regions b1, p1, pt, kp, m1 of "img", s1 of "txt", and the frames of "vid".
    assert (response.inputs_created, response.annotations_created) == (4, 7)
    await build(versions, other, "copy", "v1")

    original = without_times(parsed(await content(db, caller, "ds", "v1")))
    copied = without_times(parsed(await content(db, other, "copy", "v1")))
    assert list(copied) == list(original) == ["img", "txt", "vid", "plain"]
    # Ids, media, concepts, regions, frames, metadata and geo: the same, field for field.
    assert copied == original
    assert [r.id for r in copied["img"].data.regions] == ["b1", "p1", "pt", "kp", "m1"]


async def test_exports_with_embedded_media_import_back(
    versions: Versions,
    annotations: Annotations,
    inputs: Inputs,
    datasets: Datasets,
    caller: Caller,
    db: Database,
) -> None:
    """What ExportDatasetVersion writes, ImportDataset reads: the protobuf archive gives
    back the same content, the COCO archive the images with their boxes, polygons and
    masks under the same ids."""
    await every_kind_of_content(annotations, inputs, datasets, caller)
    await build(versions, caller, "ds", "v1")
    original = without_times(parsed(await content(db, caller, "ds", "v1")))
    embed = export_options(embed_media=True)
    _, protobuf = await exported(versions, caller, "ds", "v1", EXPORT_PROTOBUF, embed)
    _, coco = await exported(versions, caller, "ds", "v1", EXPORT_COCO, embed)

    other = await new_caller(db)
    await new_dataset(datasets, other, "copy")
    await import_archive(datasets, other, "copy", protobuf)
    await build(versions, other, "copy", "v1")
    assert without_times(parsed(await content(db, other, "copy", "v1"))) == original

    third = await new_caller(db)
    await new_dataset(datasets, third, "coco")
    response = await import_archive(datasets, third, "coco", coco, archive_format=COCO)
    # The two images; points, keypoints, videos and texts have no place in COCO.
    assert response.inputs_created == 2
    await build(versions, third, "coco", "v1")
    copied = parsed(await content(db, third, "coco", "v1"))
    assert set(copied) == {"img", "plain"}
    kinds = {
        r.id: ([f.name for f, _ in r.region_info.ListFields()], [c.id for c in r.data.concepts])
        for r in copied["img"].data.regions
    }
    assert kinds == {
        "b1": (["bounding_box"], ["cat"]),
        "p1": (["polygon"], ["tail"]),
        "m1": (["mask"], ["fur"]),
    }
    assert [(c.id, c.value) for c in copied["img"].data.concepts] == [
        (c.id, c.value) for c in original["img"].data.concepts
    ]
    assert copied["img"].data.image.hosted == original["img"].data.image.hosted


async def test_an_archive_written_with_the_reference_classes_imports(
    versions: Versions,
    annotations: Annotations,
    datasets: Datasets,
    caller: Caller,
    db: Database,
) -> None:
    ref = resources_pb2
    cat = ref.Concept(id="cat", name="Cat", value=1.0)
    image = ref.Input(
        id="ref-img",
        data=ref.Data(
            image=ref.Image(base64=png_bytes(20, 10, (9, 9, 9))),
            concepts=[cat],
            regions=[
                ref.Region(
                    id="r1",
                    region_info=ref.RegionInfo(
                        bounding_box=ref.BoundingBox(
                            top_row=0.1, left_col=0.2, bottom_row=0.5, right_col=0.6
                        )
                    ),
                    data=ref.Data(concepts=[cat]),
                )
            ],
            geo=ref.Geo(geo_point=ref.GeoPoint(longitude=2.35, latitude=48.85)),
        ),
    )
    image.data.metadata.update({"source": "clarifai"})
    text = ref.Input(id="ref-txt", data=ref.Data(text=ref.Text(raw="hello from the reference")))
    archive = protobuf_archive(ref.InputBatch(inputs=[image, text]))

    await new_dataset(datasets, caller, "ds")
    response = await import_archive(datasets, caller, "ds", archive)
    assert (response.inputs_created, response.annotations_created) == (2, 1)
    level, stored = await list_all(annotations, caller, input_ids=["ref-img"])
    assert level.input_level and [c.id for c in level.data.concepts] == ["cat"]
    edges = stored.data.regions[0].region_info.bounding_box
    assert (edges.top_row, edges.left_col, edges.bottom_row, edges.right_col) == tuple(
        float32(v) for v in (0.1, 0.2, 0.5, 0.6)
    )
    await build(versions, caller, "ds", "v1")
    snapshot = parsed(await content(db, caller, "ds", "v1"))
    assert list(snapshot) == ["ref-img", "ref-txt"]
    img = snapshot["ref-img"]
    assert [(c.id, c.name, c.value) for c in img.data.concepts] == [("cat", "Cat", 1.0)]
    assert img.data.regions[0].id == "r1" and img.data.regions[0].data.concepts[0].id == "cat"
    assert (img.data.image.image_info.width, img.data.image.image_info.height) == (20, 10)
    assert img.data.metadata["source"] == "clarifai"
    assert img.data.geo.geo_point.latitude == float32(48.85)
    assert snapshot["ref-txt"].data.text.raw == "hello from the reference"


def coco_archive(document: dict[str, Any], images: dict[str, bytes], split: str = "train") -> bytes:
    return zip_of(
        [
            (f"annotations/instances_{split}.json", json.dumps(document).encode()),
            *((f"images/{split}/{name}", data) for name, data in images.items()),
        ]
    )


def coco_document(*annotations: dict[str, Any]) -> dict[str, Any]:
    return {
        "info": {"description": "hand-made"},
        "licenses": [],
        "images": [
            {"id": 1, "file_name": "a.png", "width": 16, "height": 12},
            {"id": 2, "file_name": "b.png", "width": 20, "height": 10},
        ],
        "categories": [
            {"id": 1, "name": "cat", "supercategory": "animal"},
            {"id": 2, "name": "dog", "supercategory": "animal"},
        ],
        "annotations": list(annotations),
    }


COCO_IMAGES = {"a.png": png_bytes(16, 12, (5, 5, 5)), "b.png": png_bytes(20, 10, (6, 6, 6))}


async def test_a_coco_archive_imports_boxes_polygons_and_masks_normalised(
    annotations: Annotations, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    mask = np.zeros((12, 16), dtype=np.uint8)
    mask[2:6, 3:9] = 1
    rle = coco_mask.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()
    document = coco_document(
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [4, 3, 8, 6], "iscrowd": 0},
        {
            "id": 11,
            "image_id": 2,
            "category_id": 2,
            "bbox": [2, 1, 16, 8],
            "segmentation": [[2, 1, 18, 1, 10, 9]],
            "iscrowd": 0,
        },
        {"id": 12, "image_id": 1, "category_id": 2, "segmentation": rle, "iscrowd": 1},
    )
    await new_dataset(datasets, caller, "ds")
    response = await import_archive(
        datasets, caller, "ds", coco_archive(document, COCO_IMAGES), archive_format=COCO
    )
    assert (response.inputs_created, response.annotations_created) == (2, 3)

    got = await inputs.GetInput(
        iapi.GetInputRequest(app_id=caller.app_id, input_id="a"), metadata=caller.metadata
    )
    assert got.input.title == "a.png" and got.input.data.image.image_info.width == 16
    first, crowd = await list_all(annotations, caller, input_ids=["a"])
    (boxed,) = first.data.regions
    edges = boxed.region_info.bounding_box
    assert (edges.top_row, edges.left_col, edges.bottom_row, edges.right_col) == (
        0.25,
        0.25,
        0.75,
        0.75,
    )
    assert boxed.id == "10" and [c.id for c in boxed.data.concepts] == ["cat"]
    (masked,) = crowd.data.regions
    assert [c.id for c in masked.data.concepts] == ["dog"]
    decoded = Image.open(io.BytesIO(masked.region_info.mask.image.base64))
    assert decoded.size == (16, 12)
    assert np.array_equal(np.array(decoded.convert("L")) > 0, mask.astype(bool))

    (polygon,) = await list_all(annotations, caller, input_ids=["b"])
    points = polygon.data.regions[0].region_info.polygon.points
    assert [(p.row, p.col) for p in points] == [
        (float32(0.1), float32(0.1)),
        (float32(0.1), float32(0.9)),
        (float32(0.9), float32(0.5)),
    ]
    assert set(await list_ids(inputs, caller, dataset_id="ds")) == {"a", "b"}


async def test_a_retry_with_the_request_id_replays_and_another_archive_is_refused(
    server: Running, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "ds")
    archive = protobuf_archive(input_pb2.InputBatch(inputs=[text_input("x", "x")]))
    first = await import_archive(datasets, caller, "ds", archive, request_id="import-1")
    again = await import_archive(datasets, caller, "ds", archive, request_id="import-1")
    assert first == again and first.inputs_created == 1
    other = protobuf_archive(input_pb2.InputBatch(inputs=[text_input("y", "y")]))
    reused = await refused(server.port, caller, "ds", other, request_id="import-1")
    assert (reused.code, reused.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
    assert await list_ids(inputs, caller) == ["x"]


# --- bad archives ---------------------------------------------------------------------------


def batch_of(*items: input_pb2.Input) -> input_pb2.InputBatch:
    return input_pb2.InputBatch(inputs=list(items))


def texts(prefix: str, count: int) -> input_pb2.InputBatch:
    return batch_of(*(text_input(f"{prefix}{n}", f"{prefix} {n}") for n in range(count)))


async def test_bad_archives_are_refused_by_entry_and_nothing_is_imported(
    server: Running, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "ds")
    await create(inputs, caller, [text_input("existing", "was here before")])
    good = texts("ok-", 3)

    async def rejected(
        archive: bytes, reason: str, field: str, *words: str, **options: Any
    ) -> CallError:
        error = await refused(server.port, caller, "ds", archive, **options)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.reason == reason, error
        assert field in error.fields, error
        for word in words:
            assert word in error.message, error
        return error

    await rejected(b"this is not a zip archive" * 40, "INVALID_ARCHIVE", "archive", "not a ZIP")
    await rejected(protobuf_archive(good, mimetype=None), "INVALID_ARCHIVE", "archive", "mimetype")
    await rejected(
        protobuf_archive(good, mimetype=b"application/x.clarifai-data+json"),
        "INVALID_ARCHIVE",
        'archive["mimetype"]',
        "Clarifai-Data-JSON",
    )
    await rejected(
        protobuf_archive(good, mimetype=MIMETYPE + b"\n"), "INVALID_ARCHIVE", 'archive["mimetype"]'
    )
    for name, word in (
        ("../escape_n0", ".."),
        ("/etc/absolute_n0", "absolute"),
        ("C:/windows_n0", "absolute"),
        ("all\\backslash_n0", "backslash"),
    ):
        hostile = zip_of([("mimetype", MIMETYPE), (name, b"")])
        await rejected(hostile, "INVALID_ARCHIVE", f"archive[{json.dumps(name)}]", word)

    # A malformed batch late in the archive: the batches before it are not imported.
    late = zip_of(
        [
            ("mimetype", MIMETYPE),
            ("all/batch-000000_n3", good.SerializeToString()),
            ("all/batch-000001_n1", b"\xff\xfe not protobuf"),
        ]
    )
    await rejected(late, "INVALID_ARCHIVE", 'archive["all/batch-000001_n1"]', "InputBatch")
    miscounted = zip_of([("mimetype", MIMETYPE), ("all/batch-000000_n5", good.SerializeToString())])
    await rejected(miscounted, "INVALID_ARCHIVE", 'archive["all/batch-000000_n5"]', "holds 3")

    # Content is checked like CreateInputs and CreateAnnotations would, and every
    # problem is named by entry, input and field.
    bad_box = image_input(
        "boxed", regions=[box("r", "x", top=0.5, left=0.1, bottom=0.2, right=0.3)]
    )
    s3 = input_pb2.Input(
        id="remote",
        data=data_pb2.Data(image=data_pb2.Image(url="s3://another-deployment/blobs/orig/x")),
    )
    error = await rejected(
        protobuf_archive(good, batch_of(bad_box, text_input("ok-1", "twice"), s3)),
        "INVALID_IMPORT",
        'archive["all/batch-000001_n3"].inputs[0].data.regions[0]'
        ".region_info.bounding_box.bottom_row",
    )
    assert error.fields['archive["all/batch-000001_n3"].inputs[1].id'].startswith("'ok-1' repeats")
    assert "http" in error.fields['archive["all/batch-000001_n3"].inputs[2].data.image.url']
    assert len(error.fields) == 3

    big = zip_of([("mimetype", MIMETYPE), ("all/bomb_n1", bytes(20 * MIB))])
    assert len(big) < 100_000
    await rejected(big, "ARCHIVE_TOO_LARGE", 'archive["all/bomb_n1"]', "100:1")
    crowded = zip_of(
        itertools.chain([("mimetype", MIMETYPE)], ((f"all/e{n}_n0", b"") for n in range(100_000)))
    )
    await rejected(crowded, "ARCHIVE_TOO_LARGE", "archive", "100001 entries")

    header = await refused(server.port, caller, "ds", protobuf_archive(good), archive_format=0)
    assert header.code == grpc.StatusCode.INVALID_ARGUMENT and "header.format" in header.fields
    unknown = await refused(server.port, caller, "nope", protobuf_archive(good))
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "DATASET_NOT_FOUND")

    assert await list_ids(inputs, caller) == ["existing"]


async def test_bad_coco_archives_name_the_image_or_annotation(
    server: Running, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "ds")
    outside = coco_document(
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [4, 3, 8, 6]},
        {"id": 77, "image_id": 2, "category_id": 1, "bbox": [15, 2, 8, 4]},
    )
    error = await refused(
        server.port, caller, "ds", coco_archive(outside, COCO_IMAGES), archive_format=COCO
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    field = 'archive["annotations/instances_train.json"].annotations[1].bbox'
    assert list(error.fields) == [field]
    assert "annotation 77" in error.fields[field] and "outside" in error.fields[field]

    unknown_category = coco_document(
        {"id": 5, "image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]}
    )
    error = await refused(
        server.port, caller, "ds", coco_archive(unknown_category, COCO_IMAGES), archive_format=COCO
    )
    assert "annotation 5: no category with id 9" in error.message

    no_image = await refused(
        server.port,
        caller,
        "ds",
        coco_archive(coco_document(), {"a.png": COCO_IMAGES["a.png"]}),
        archive_format=COCO,
    )
    assert 'archive["annotations/instances_train.json"].images[1].file_name' in no_image.fields

    wrong_size = await refused(
        server.port,
        caller,
        "ds",
        coco_archive(coco_document(), {"a.png": png_bytes(8, 8), "b.png": COCO_IMAGES["b.png"]}),
        archive_format=COCO,
    )
    assert "16x12 pixels but its file is 8x8" in wrong_size.message

    not_coco = await refused(
        server.port, caller, "ds", protobuf_archive(texts("t", 1)), archive_format=COCO
    )
    assert "instances_" in not_coco.message
    assert await list_ids(inputs, caller) == []


async def test_a_failure_after_some_batches_were_written_rolls_them_back(
    server: Running, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    """An id taken in the app is only found when the inputs are written (a check before
    would race anyway): by then 128 inputs have been created in the import's transaction,
    and they must go with it."""
    await new_dataset(datasets, caller, "ds")
    await create(inputs, caller, [text_input("taken", "first")])
    archive = protobuf_archive(texts("n", 150), batch_of(text_input("taken", "second")))
    error = await refused(server.port, caller, "ds", archive)
    assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "INPUT_EXISTS")
    assert list(error.fields) == ['archive["all/batch-000001_n1"].inputs[0].id']
    assert await list_ids(inputs, caller) == ["taken"]
    members = await datasets.ListDatasetInputs(
        dapi.ListDatasetInputsRequest(app_id=caller.app_id, dataset_id="ds"),
        metadata=caller.metadata,
    )
    assert not members.dataset_inputs


# --- caps -----------------------------------------------------------------------------------

SMALL_CAP = MIB


@pytest.fixture(scope="module")
async def capped(stack: Stack) -> AsyncIterator[Running]:
    """A second server on the same stack with DATASETD_MAX_IMPORT_BYTES at 1 MiB, so at
    most 4 MiB uncompressed."""
    config = Config(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        data_dir=stack.data_dir,
        database_url=stack.dsn,
        s3_endpoint=stack.s3.endpoint,
        s3_access_key=stack.s3.access_key,
        s3_secret_key=stack.s3.secret_key,
        s3_bucket=stack.s3.bucket,
        auth_cache_seconds=0.0,
        max_import_bytes=SMALL_CAP,
    )
    running: Running = await app.start(
        config, Resources(await Database.connect(stack.dsn), object_store(stack))
    )
    try:
        yield running
    finally:
        await running.stop()


async def test_archives_over_the_caps_are_refused(
    capped: Running, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "ds")
    noise = np.random.default_rng(7).bytes(SMALL_CAP + 1)
    error = await refused(capped.port, caller, "ds", noise)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ARCHIVE_TOO_LARGE")
    assert list(error.fields) == ["chunk"] and "1 MiB" in error.message

    # Entries too small to be held to the ratio, but 4.4 MiB together.
    many = zip_of(
        itertools.chain(
            [("mimetype", MIMETYPE)], ((f"all/part-{n}_n0", bytes(64 * 1024)) for n in range(70))
        )
    )
    assert len(many) < SMALL_CAP
    error = await refused(capped.port, caller, "ds", many)
    assert (error.reason, list(error.fields)) == ("ARCHIVE_TOO_LARGE", ["archive"])
    assert str(4 * SMALL_CAP) in error.message
    assert await list_ids(inputs, caller) == []
