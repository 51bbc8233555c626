"""DatasetVersionService as a caller sees it: a version is a snapshot by reference,
READY when CreateDatasetVersion returns (service/domain/contents.py, versions.py).

The last tests check the snapshot semantics: an edit right after the creation never
shows in the version, a deleted input stays in the versions holding it, content shared
between versions is stored once and collected when its last reference goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from clarifai_grpc.grpc.api import resources_pb2
from datasetd.v1 import annotation_service_pb2 as aapi
from datasetd.v1 import common_pb2, data_pb2, dataset_version_pb2, input_pb2, status_pb2
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import dataset_version_service_pb2 as api
from datasetd.v1 import input_service_pb2 as iapi
from google.protobuf import field_mask_pb2

from service.app import Running
from service.storage.contents import PgContentRepository
from service.storage.db import Database
from tests.conftest import Caller, new_caller
from tests.e2e.test_annotations import (
    TEXT,
    add,
    annotation,
    box,
    concepts,
    float32,
    media_inputs,
    points,
    region,
)
from tests.e2e.test_inputs import create, image_input, metadata, new_dataset, text_input
from tests.helpers import call_error, png_bytes

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

PENDING = status_pb2.STATUS_CODE_DATASET_VERSION_PENDING
IN_PROGRESS = status_pb2.STATUS_CODE_DATASET_VERSION_IN_PROGRESS
READY = status_pb2.STATUS_CODE_DATASET_VERSION_READY
FAILURE = status_pb2.STATUS_CODE_DATASET_VERSION_FAILURE
BUILD_TIMEOUT_SECONDS = 30.0

Content = list[tuple[str, bytes | None, bytes | None]]


# --- calls ----------------------------------------------------------------------------------


async def create_version(
    stub: Versions, caller: Caller, dataset_id: str, version_id: str = "", **options: Any
) -> dataset_version_pb2.DatasetVersion:
    version = dataset_version_pb2.DatasetVersion(id=version_id)
    if "description" in options:
        version.description = options.pop("description")
    if "metadata" in options:
        version.metadata.update(options.pop("metadata"))
    response = await stub.CreateDatasetVersion(
        api.CreateDatasetVersionRequest(
            app_id=caller.app_id, dataset_id=dataset_id, version=version, **options
        ),
        metadata=caller.metadata,
    )
    return response.version


async def get_version(
    stub: Versions, caller: Caller, dataset_id: str, version_id: str
) -> dataset_version_pb2.DatasetVersion:
    response = await stub.GetDatasetVersion(
        api.GetDatasetVersionRequest(
            app_id=caller.app_id, dataset_id=dataset_id, version_id=version_id
        ),
        metadata=caller.metadata,
    )
    return response.version


async def wait_for(
    stub: Versions,
    caller: Caller,
    dataset_id: str,
    version_id: str,
    *codes: status_pb2.StatusCode.ValueType,
) -> dataset_version_pb2.DatasetVersion:
    """Polls the version until its status is one of `codes` (READY or FAILURE by default)."""
    wanted = codes or (READY, FAILURE)
    deadline = asyncio.get_running_loop().time() + BUILD_TIMEOUT_SECONDS
    while True:
        version = await get_version(stub, caller, dataset_id, version_id)
        if version.status.code in wanted:
            return version
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"version {version_id} is still {version.status}")
        await asyncio.sleep(0.05)


async def build(
    stub: Versions, caller: Caller, dataset_id: str, version_id: str
) -> dataset_version_pb2.DatasetVersion:
    created = await create_version(stub, caller, dataset_id, version_id)
    assert created.status.code == READY, created.status
    version = await get_version(stub, caller, dataset_id, version_id)
    assert without_exports(version) == without_exports(created)
    return version


def without_exports(
    version: dataset_version_pb2.DatasetVersion,
) -> dataset_version_pb2.DatasetVersion:
    """The version but its export_info, which GetDatasetVersion fills and Create does not."""
    copy = dataset_version_pb2.DatasetVersion()
    copy.CopyFrom(version)
    copy.ClearField("export_info")
    return copy


async def list_ids(stub: Versions, caller: Caller, dataset_id: str, page_size: int) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        page = await stub.ListDatasetVersions(
            api.ListDatasetVersionsRequest(
                app_id=caller.app_id, dataset_id=dataset_id, page_size=page_size, page_token=token
            ),
            metadata=caller.metadata,
        )
        assert len(page.versions) <= page_size
        ids += [v.id for v in page.versions]
        token = page.next_page_token
        if not token:
            return ids


def metrics_of(version: dataset_version_pb2.DatasetVersion) -> dict[str, int]:
    whole = version.metrics["/"]
    # Every counter is set, zeros included: a reader can tell 0 from "not counted".
    assert len(whole.ListFields()) == len(whole.DESCRIPTOR.fields)
    return {f.name: getattr(whole, f.name).value for f in whole.DESCRIPTOR.fields}


async def content(db: Database, caller: Caller, dataset_id: str, version_id: str) -> Content:
    """(input id, serialized input, content hash) of each member, in order."""
    async with db.connection() as conn:
        rows = await conn.fetch(
            "SELECT v.input_id, c.data, v.content_hash FROM version_inputs v"
            " LEFT JOIN input_contents c ON c.hash = v.content_hash"
            " WHERE v.app_id = $1 AND v.dataset_id = $2 AND v.version_id = $3"
            " ORDER BY v.position",
            caller.app_id,
            dataset_id,
            version_id,
        )
    return [(r["input_id"], r["data"], r["content_hash"]) for r in rows]


def parsed(rows: Content) -> dict[str, Any]:
    """The members parsed by the Clarifai reference classes, by input id."""
    result = {}
    for input_id, data, digest in rows:
        assert data is not None and digest == hashlib.sha256(data).digest()
        result[input_id] = resources_pb2.Input.FromString(data)
    return result


@contextlib.asynccontextmanager
async def table_locked(db: Database, table: str) -> AsyncIterator[None]:
    """Holds `table` locked against any access: a build stops at its first read of it,
    with the version IN_PROGRESS, while calls that do not read the table go on."""
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        yield


async def job_of(db: Database, caller: Caller, version_id: str) -> int:
    async with db.connection() as conn:
        job_id: int = await conn.fetchval(
            "SELECT job_id FROM dataset_versions WHERE app_id = $1 AND id = $2",
            caller.app_id,
            version_id,
        )
    return job_id


async def job_settled(db: Database, job_id: int) -> str:
    """The job's final status once its runner let go of it."""
    deadline = asyncio.get_running_loop().time() + BUILD_TIMEOUT_SECONDS
    while True:
        async with db.connection() as conn:
            row = await conn.fetchrow("SELECT status, locked_until FROM jobs WHERE id = $1", job_id)
        assert row is not None
        if row["status"] not in ("pending", "running") and row["locked_until"] is None:
            status: str = row["status"]
            return status
        assert asyncio.get_running_loop().time() < deadline, f"job {job_id} still {row}"
        await asyncio.sleep(0.05)


async def every_kind_of_content(
    annotations: Annotations, inputs: Inputs, datasets: Datasets, caller: Caller
) -> data_pb2.Mask:
    """Dataset "ds": an image with labels, a box, a polygon, a point, keypoints and a mask;
    a text with a span; a video with a box on three frames; an image with metadata and a
    geo point only. Returns the mask."""
    await media_inputs(inputs, datasets, caller)
    plain = image_input(
        "plain",
        color=(1, 2, 3),
        metadata=metadata({"camera": "x100"}),
        geo=data_pb2.Geo(geo_point=data_pb2.GeoPoint(longitude=13.4, latitude=52.5)),
    )
    plain.dataset_ids.append("ds")
    await create(inputs, caller, [plain])
    frames = [
        data_pb2.Frame(
            id=f"f{number}",
            frame_info=data_pb2.FrameInfo(index=index, number=number, time=number * 40),
            data=data_pb2.Data(
                concepts=concepts("fox"),
                regions=[box(f"fox-{number}", "fox", top=0.1, left=0.1, bottom=0.5, right=0.5)],
            ),
        )
        for index, number in enumerate((0, 25, 49))
    ]
    polygon = data_pb2.Polygon(points=points((0.1, 0.1), (0.9, 0.5), (0.1, 0.9)))
    span = data_pb2.Span(char_start=16, char_end=19, raw_text="fox")
    mask = data_pb2.Mask(image=data_pb2.Image(base64=png_bytes(16, 12, (255, 255, 255))))
    sent = [
        annotation("img", "labels", concepts=[*concepts("cat"), *concepts("dog", value=0)]),
        annotation(
            "img", "box", regions=[box("b1", "cat", top=0.1, left=0.2, bottom=0.6, right=0.7)]
        ),
        annotation("img", "poly", regions=[region("p1", "tail", polygon=polygon)]),
        annotation(
            "img",
            "points",
            regions=[
                region("pt", "nose", point=data_pb2.Point(row=0.25, col=0.75)),
                region("kp", "pose", keypoint_locations=points((0.1, 0.2), (0.3, 0.4))),
            ],
        ),
        annotation("img", "mask", regions=[region("m1", "fur", mask=mask)]),
        annotation("txt", "span", regions=[region("s1", "animal", span=span)]),
        annotation("vid", "track", frames=frames),
    ]
    await add(annotations, caller, sent, atomic=True)
    return mask


# --- tests ----------------------------------------------------------------------------------


async def test_build_captures_inputs_annotations_and_metrics(
    versions: Versions,
    annotations: Annotations,
    inputs: Inputs,
    datasets: Datasets,
    caller: Caller,
    db: Database,
) -> None:
    mask = await every_kind_of_content(annotations, inputs, datasets, caller)

    created = await create_version(
        versions, caller, "ds", "v1", description="first", metadata={"by": "test"}
    )
    assert (created.id, created.dataset_id, created.app_id) == ("v1", "ds", caller.app_id)
    # READY when the call returns, with its metrics: a snapshot by reference.
    assert created.status.code == READY, created.status
    assert created.description == "first" and created.metadata["by"] == "test"
    version = await get_version(versions, caller, "ds", "v1")
    assert without_exports(version) == without_exports(created)
    assert version.status.percent_completed == 100
    assert version.modified_at.ToDatetime() >= version.created_at.ToDatetime()
    assert metrics_of(version) == {
        "inputs_count": 4,
        "unlabeled_inputs_count": 1,
        "inputs_with_metadata_count": 1,
        "inputs_with_geo_count": 1,
        # b1, p1, pt, kp, m1, s1 and a box on each of three frames; keypoints are no point.
        "regions_count": 9,
        "bounding_boxes_count": 4,
        "polygons_count": 1,
        "points_count": 1,
        "masks_count": 1,
        "frames_count": 3,
        "embeddings_count": 0,
        "positive_input_tags_count": 1,
        "positive_region_tags_count": 9,
        "positive_frame_tags_count": 3,
        "region_inputs_count": 3,
        "region_frames_count": 3,
        "frame_inputs_count": 1,
    }

    rows = await content(db, caller, "ds", "v1")
    assert [input_id for input_id, _, _ in rows] == ["img", "txt", "vid", "plain"]
    snapshot = parsed(rows)
    img = snapshot["img"]
    assert img.id == "img"
    assert [(c.id, c.value) for c in img.data.concepts] == [("cat", 1.0), ("dog", 0.0)]
    assert [r.id for r in img.data.regions] == ["b1", "p1", "pt", "kp", "m1"]
    edges = img.data.regions[0].region_info.bounding_box
    assert (edges.top_row, edges.left_col, edges.bottom_row, edges.right_col) == tuple(
        float32(v) for v in (0.1, 0.2, 0.6, 0.7)
    )
    assert [c.id for c in img.data.regions[0].data.concepts] == ["cat"]
    assert len(img.data.regions[1].region_info.polygon.points) == 3
    assert img.data.regions[2].region_info.point.col == float32(0.75)
    assert len(img.data.regions[3].region_info.keypoint_locations) == 2
    assert img.data.regions[4].region_info.mask.image.base64 == mask.image.base64
    image = img.data.image
    assert (image.image_info.width, image.image_info.height) == (16, 12)
    assert list(image.hosted.sizes) == ["orig"]
    # A stable reference to the stored original, not a URL that expires.
    assert image.url == f"{image.hosted.prefix}/orig/{image.hosted.suffix}"
    assert image.url.startswith("s3://") and not image.base64
    txt = snapshot["txt"]
    assert txt.data.text.raw == TEXT
    assert txt.data.regions[0].region_info.span.char_end == 19
    vid = snapshot["vid"]
    assert [f.frame_info.number for f in vid.data.frames] == [0, 25, 49]
    assert vid.data.frames[2].frame_info.time == 49 * 40
    assert [f.data.regions[0].id for f in vid.data.frames] == ["fox-0", "fox-25", "fox-49"]
    assert vid.data.video.video_info.frame_count == 50
    other = snapshot["plain"]
    assert other.data.metadata["camera"] == "x100"
    assert other.data.geo.geo_point.latitude == float32(52.5)
    assert not other.data.concepts and not other.data.regions
    # What describes the live input rather than its content is left out.
    assert not img.dataset_ids and not img.HasField("status")


async def test_a_ready_version_never_changes(
    versions: Versions,
    annotations: Annotations,
    inputs: Inputs,
    datasets: Datasets,
    caller: Caller,
    db: Database,
) -> None:
    await new_dataset(datasets, caller, "ds")
    items = [
        image_input("a", concepts=concepts("cat"), metadata=metadata({"v": 1})),
        image_input("b", color=(90, 90, 90)),
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
            ),
            annotation("b", "lbl", concepts=concepts("dog")),
        ],
        atomic=True,
    )
    before = await build(versions, caller, "ds", "v1")
    rows_before = await content(db, caller, "ds", "v1")
    assert [input_id for input_id, _, _ in rows_before] == ["a", "b", "t"]

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
    late = image_input("c", color=(0, 200, 0))
    late.dataset_ids.append("ds")
    await create(inputs, caller, [late])

    after = await get_version(versions, caller, "ds", "v1")
    assert after.status.code == READY
    assert metrics_of(after) == metrics_of(before)
    assert metrics_of(after)["inputs_count"] == 3
    assert await content(db, caller, "ds", "v1") == rows_before
    assert parsed(rows_before)["a"].data.metadata["v"] == 1

    # The edits did happen: a new version sees them.
    second = await build(versions, caller, "ds", "v2")
    rows_now = await content(db, caller, "ds", "v2")
    assert [input_id for input_id, _, _ in rows_now] == ["a", "c"]
    assert rows_now[0][2] != rows_before[0][2]
    assert parsed(rows_now)["a"].data.metadata["v"] == 2
    assert not parsed(rows_now)["a"].data.regions
    assert metrics_of(second)["regions_count"] == 0


async def test_list_newest_first_in_pages_update_and_delete(
    versions: Versions, datasets: Datasets, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "ds")
    await new_dataset(datasets, caller, "other")
    for version_id in ("v1", "v2", "v3"):
        await create_version(versions, caller, "ds", version_id, metadata={"keep": True})
    await create_version(versions, caller, "other", "o1")
    empty = await wait_for(versions, caller, "ds", "v1")
    assert empty.status.code == READY
    assert metrics_of(empty)["inputs_count"] == 0

    assert await list_ids(versions, caller, "ds", page_size=2) == ["v3", "v2", "v1"]
    assert await list_ids(versions, caller, "ds", page_size=1000) == ["v3", "v2", "v1"]
    first = await versions.ListDatasetVersions(
        api.ListDatasetVersionsRequest(app_id=caller.app_id, dataset_id="ds", page_size=2),
        metadata=caller.metadata,
    )
    foreign = await call_error(
        versions.ListDatasetVersions(
            api.ListDatasetVersionsRequest(
                app_id=caller.app_id, dataset_id="other", page_token=first.next_page_token
            ),
            metadata=caller.metadata,
        )
    )
    assert foreign.code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in foreign.fields

    async def update(
        version: dataset_version_pb2.DatasetVersion, *paths: str
    ) -> dataset_version_pb2.DatasetVersion:
        response = await versions.UpdateDatasetVersion(
            api.UpdateDatasetVersionRequest(
                app_id=caller.app_id,
                dataset_id="ds",
                version=version,
                update_mask=field_mask_pb2.FieldMask(paths=paths),
            ),
            metadata=caller.metadata,
        )
        return response.version

    described = await update(dataset_version_pb2.DatasetVersion(id="v2", description="second"))
    assert described.description == "second" and described.metadata["keep"] is True
    replaced = dataset_version_pb2.DatasetVersion(id="v2")
    replaced.metadata.update({"new": 1})
    updated = await update(replaced, "metadata")
    assert dict(updated.metadata) == {"new": 1} and updated.description == "second"
    cleared = await update(dataset_version_pb2.DatasetVersion(id="v2"), "description", "metadata")
    assert cleared.description == "" and not cleared.metadata
    assert cleared.modified_at.ToDatetime() > described.modified_at.ToDatetime()
    # Content and status are not the caller's to change.
    assert cleared.status.code == READY and metrics_of(cleared)["inputs_count"] == 0

    await versions.DeleteDatasetVersion(
        api.DeleteDatasetVersionRequest(app_id=caller.app_id, dataset_id="ds", version_id="v2"),
        metadata=caller.metadata,
    )
    gone = await call_error(get_version(versions, caller, "ds", "v2"))
    assert (gone.code, gone.reason) == (grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")
    assert await list_ids(versions, caller, "ds", page_size=1) == ["v3", "v1"]
    again = await call_error(
        versions.DeleteDatasetVersion(
            api.DeleteDatasetVersionRequest(app_id=caller.app_id, dataset_id="ds", version_id="v2"),
            metadata=caller.metadata,
        )
    )
    assert again.code == grpc.StatusCode.NOT_FOUND
    # The same id may be used again once the version is gone.
    await build(versions, caller, "ds", "v2")
    assert await list_ids(versions, caller, "ds", page_size=2) == ["v2", "v3", "v1"]


async def test_there_is_no_build_to_cancel(
    versions: Versions, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "ds")
    item = image_input("a")
    item.dataset_ids.append("ds")
    await create(inputs, caller, [item])
    await build(versions, caller, "ds", "v1")
    ended = await call_error(
        versions.CancelDatasetVersionBuild(
            api.CancelDatasetVersionBuildRequest(
                app_id=caller.app_id, dataset_id="ds", version_id="v1"
            ),
            metadata=caller.metadata,
        )
    )
    assert (ended.code, ended.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "VERSION_BUILD_ENDED",
    )
    assert (await get_version(versions, caller, "ds", "v1")).status.code == READY


async def test_bad_requests_name_the_field(
    versions: Versions, datasets: Datasets, caller: Caller, db: Database
) -> None:
    await new_dataset(datasets, caller, "ds")
    await create_version(versions, caller, "ds", "v1")

    unknown = await call_error(create_version(versions, caller, "nope", "v1"))
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "DATASET_NOT_FOUND")
    assert (await call_error(get_version(versions, caller, "nope", "v1"))).reason == (
        "DATASET_NOT_FOUND"
    )
    unlisted = await call_error(
        versions.ListDatasetVersions(
            api.ListDatasetVersionsRequest(app_id=caller.app_id, dataset_id="nope"),
            metadata=caller.metadata,
        )
    )
    assert unlisted.reason == "DATASET_NOT_FOUND"
    missing = await call_error(get_version(versions, caller, "ds", "nope"))
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")
    not_updated = await call_error(
        versions.UpdateDatasetVersion(
            api.UpdateDatasetVersionRequest(
                app_id=caller.app_id,
                dataset_id="ds",
                version=dataset_version_pb2.DatasetVersion(id="nope", description="x"),
            ),
            metadata=caller.metadata,
        )
    )
    assert not_updated.reason == "VERSION_NOT_FOUND"
    not_cancelled = await call_error(
        versions.CancelDatasetVersionBuild(
            api.CancelDatasetVersionBuildRequest(
                app_id=caller.app_id, dataset_id="ds", version_id="nope"
            ),
            metadata=caller.metadata,
        )
    )
    assert not_cancelled.reason == "VERSION_NOT_FOUND"

    taken = await call_error(create_version(versions, caller, "ds", "v1"))
    assert taken.code == grpc.StatusCode.ALREADY_EXISTS and "version.id" in taken.fields
    bad = await call_error(
        create_version(
            versions,
            caller,
            "bad id",
            "x" * 65,
            description="d" * 1025,
            metadata={"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}},
        )
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(bad.fields) == {
        "dataset_id",
        "version.id",
        "version.description",
        "version.metadata",
    }
    no_id = await call_error(get_version(versions, caller, "ds", ""))
    assert no_id.code == grpc.StatusCode.INVALID_ARGUMENT and "version_id" in no_id.fields

    async def update_error(
        version: dataset_version_pb2.DatasetVersion, *paths: str
    ) -> dict[str, str]:
        error = await call_error(
            versions.UpdateDatasetVersion(
                api.UpdateDatasetVersionRequest(
                    app_id=caller.app_id,
                    dataset_id="ds",
                    version=version,
                    update_mask=field_mask_pb2.FieldMask(paths=paths),
                ),
                metadata=caller.metadata,
            )
        )
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        return error.fields

    described = dataset_version_pb2.DatasetVersion(id="v1", description="x")
    assert "update_mask.paths[1]" in await update_error(described, "description", "status")
    assert "version" in await update_error(dataset_version_pb2.DatasetVersion(id="v1"))
    assert "version.id" in await update_error(dataset_version_pb2.DatasetVersion(description="x"))
    negative = await call_error(
        versions.ListDatasetVersions(
            api.ListDatasetVersionsRequest(app_id=caller.app_id, dataset_id="ds", page_size=-1),
            metadata=caller.metadata,
        )
    )
    assert "page_size" in negative.fields

    stranger = await new_caller(db)
    denied = await call_error(
        versions.GetDatasetVersion(
            api.GetDatasetVersionRequest(app_id=caller.app_id, dataset_id="ds", version_id="v1"),
            metadata=stranger.metadata,
        )
    )
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED

    # The versions of a deleted dataset are gone with it.
    await datasets.DeleteDataset(
        dapi.DeleteDatasetRequest(app_id=caller.app_id, dataset_id="ds"), metadata=caller.metadata
    )
    assert (await call_error(get_version(versions, caller, "ds", "v1"))).reason == (
        "DATASET_NOT_FOUND"
    )


async def test_request_id_replays_the_first_response(
    versions: Versions, datasets: Datasets, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "ds")
    first = await create_version(versions, caller, "ds", request_id="create-1")
    replayed = await create_version(versions, caller, "ds", request_id="create-1")
    assert len(first.id) == 32 and replayed == first
    assert await list_ids(versions, caller, "ds", page_size=10) == [first.id]
    reused = await call_error(
        create_version(versions, caller, "ds", description="other", request_id="create-1")
    )
    assert (reused.code, reused.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")

    request = api.UpdateDatasetVersionRequest(
        app_id=caller.app_id,
        dataset_id="ds",
        version=dataset_version_pb2.DatasetVersion(id=first.id, description="once"),
        request_id="update-1",
    )
    updated = await versions.UpdateDatasetVersion(request, metadata=caller.metadata)
    again = await versions.UpdateDatasetVersion(request, metadata=caller.metadata)
    assert again == updated

    delete = api.DeleteDatasetVersionRequest(
        app_id=caller.app_id, dataset_id="ds", version_id=first.id, request_id="delete-1"
    )
    await versions.DeleteDatasetVersion(delete, metadata=caller.metadata)
    # A retry of a delete that succeeded succeeds too, instead of NOT_FOUND.
    await versions.DeleteDatasetVersion(delete, metadata=caller.metadata)
    assert await list_ids(versions, caller, "ds", page_size=10) == []


# --- snapshots by reference -------------------------------------------------------------------


async def test_an_edit_right_after_the_creation_never_shows(
    versions: Versions,
    annotations: Annotations,
    inputs: Inputs,
    datasets: Datasets,
    caller: Caller,
    db: Database,
) -> None:
    await new_dataset(datasets, caller, "ds")
    item = image_input("a", metadata=metadata({"v": 1}))
    item.dataset_ids.append("ds")
    await create(inputs, caller, [item])
    # The creation and the edits race: whichever order they commit in, the version holds
    # the input either wholly before or wholly after them, never half of them.
    edits = asyncio.gather(
        inputs.UpdateInputs(
            iapi.UpdateInputsRequest(
                app_id=caller.app_id,
                inputs=[input_pb2.Input(id="a", data=data_pb2.Data(metadata=metadata({"v": 2})))],
                action=common_pb2.PATCH_ACTION_MERGE,
            ),
            metadata=caller.metadata,
        ),
    )
    created = await create_version(versions, caller, "ds", "v1")
    await edits
    await add(
        annotations,
        caller,
        [
            annotation(
                "a", "late", regions=[box("r", "x", top=0.1, left=0.1, bottom=0.3, right=0.3)]
            )
        ],
    )
    version = await get_version(versions, caller, "ds", "v1")
    assert without_exports(version) == without_exports(created)
    assert version.status.code == READY
    assert metrics_of(version).get("regions_count", 0) == 0
    exported = await content_of_version(db, caller, "ds", "v1")
    assert not exported["a"].data.regions
    assert exported["a"].data.metadata["v"] in (1, 2)
    # The edits are in the input now, and in a version made after them.
    await build(versions, caller, "ds", "v2")
    later = await content_of_version(db, caller, "ds", "v2")
    assert later["a"].data.metadata["v"] == 2 and len(later["a"].data.regions) == 1


async def content_of_version(
    db: Database, caller: Caller, dataset_id: str, version_id: str
) -> dict[str, input_pb2.Input]:
    """The version's members as its content holds them, by input id."""
    return {
        input_id: input_pb2.Input.FromString(data)
        for input_id, data, _ in await content(db, caller, dataset_id, version_id)
        if data is not None
    }


async def test_versions_share_content_and_the_last_reference_frees_it(
    server: Running,
    versions: Versions,
    inputs: Inputs,
    datasets: Datasets,
    caller: Caller,
    db: Database,
) -> None:
    await new_dataset(datasets, caller, "ds")
    items = [image_input(f"s-{n}", color=(n, 9, 9)) for n in range(3)]
    for item in items:
        item.dataset_ids.append("ds")
    await create(inputs, caller, items)
    for version_id in ("v1", "v2", "v3"):
        await build(versions, caller, "ds", version_id)
    hashes = {
        version_id: [h for _, _, h in await content(db, caller, "ds", version_id)]
        for version_id in ("v1", "v2", "v3")
    }
    # Three versions, one stored content per input.
    assert hashes["v1"] == hashes["v2"] == hashes["v3"]
    async with db.connection() as conn:
        stored = await conn.fetchval(
            "SELECT count(*) FROM input_contents WHERE hash = ANY($1::bytea[])", hashes["v1"]
        )
    assert stored == 3
    # s-0 changes: its old content is still held by the versions, then by nothing.
    await inputs.UpdateInputs(
        iapi.UpdateInputsRequest(
            app_id=caller.app_id,
            inputs=[input_pb2.Input(id="s-0", data=data_pb2.Data(metadata=metadata({"n": 1})))],
            action=common_pb2.PATCH_ACTION_MERGE,
        ),
        metadata=caller.metadata,
    )
    old = hashes["v1"][0]
    assert old is not None and hashes["v1"][1] is not None and hashes["v1"][2] is not None
    collector = PgContentRepository(db)
    await collector.collect(10_000)
    assert await content_exists(db, old)
    for version_id in ("v1", "v2"):
        await versions.DeleteDatasetVersion(
            api.DeleteDatasetVersionRequest(
                app_id=caller.app_id, dataset_id="ds", version_id=version_id
            ),
            metadata=caller.metadata,
        )
        await collector.collect(10_000)
        assert await content_exists(db, old)
    # A deleted input keeps its content while a version holds it.
    await inputs.DeleteInputs(
        iapi.DeleteInputsRequest(app_id=caller.app_id, ids=["s-1"]), metadata=caller.metadata
    )
    await collector.collect(10_000)
    assert await content_exists(db, hashes["v1"][1])
    await versions.DeleteDatasetVersion(
        api.DeleteDatasetVersionRequest(app_id=caller.app_id, dataset_id="ds", version_id="v3"),
        metadata=caller.metadata,
    )
    await collector.collect(10_000)
    assert not await content_exists(db, old)
    assert not await content_exists(db, hashes["v1"][1])
    # s-2 is unchanged and still refers to its content.
    assert await content_exists(db, hashes["v1"][2])


async def content_exists(db: Database, digest: bytes) -> bool:
    async with db.connection() as conn:
        found: bool = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM input_contents WHERE hash = $1)", digest
        )
    return found


async def test_a_write_outside_a_transaction_is_refreshed_at_creation(
    versions: Versions, inputs: Inputs, datasets: Datasets, caller: Caller, db: Database
) -> None:
    await new_dataset(datasets, caller, "ds")
    item = image_input("w", metadata=metadata({"v": 1}))
    item.dataset_ids.append("ds")
    await create(inputs, caller, [item])
    # A path that writes with no transaction (here: SQL by hand) leaves the content stale.
    async with db.pool.acquire() as conn:
        await conn.execute(
            "UPDATE inputs SET title = 'by hand' WHERE app_id = $1 AND id = 'w'", caller.app_id
        )
        assert await conn.fetchval(
            "SELECT content_hash IS NULL FROM inputs WHERE app_id = $1 AND id = 'w'",
            caller.app_id,
        )
    await build(versions, caller, "ds", "v1")
    members = await content_of_version(db, caller, "ds", "v1")
    assert members["w"].title == "by hand"


async def test_content_computed_at_ingest_is_what_a_refresh_computes(
    versions: Versions, inputs: Inputs, datasets: Datasets, caller: Caller, db: Database
) -> None:
    """CreateInputs computes new inputs' content from what it wrote; reading them back
    (the refresh every other change goes through) must give the very same bytes."""
    await new_dataset(datasets, caller, "ds")
    boxed = image_input(
        "boxed",
        concepts=concepts("cat", "dog", value=1.0) + concepts("cow", value=0.0),
        regions=[
            box("", "cat", top=0.1, left=0.2, bottom=0.5, right=0.6),
            box("named", "dog", top=0.2, left=0.1, bottom=0.4, right=0.3),
        ],
        metadata=metadata({"split": "train", "n": 1.5, "tags": ["a", "b"], "nested": {"k": None}}),
        geo=data_pb2.Geo(geo_point=data_pb2.GeoPoint(longitude=13.4, latitude=52.5)),
    )
    boxed.title = "a title"
    url = input_pb2.Input(
        id="url",
        data=data_pb2.Data(
            image=data_pb2.Image(
                url="https://images.invalid/x.jpg",
                image_info=data_pb2.ImageInfo(width=640, height=480),
            ),
            regions=[box("", "car", top=0.0, left=0.0, bottom=1.0, right=1.0)],
        ),
    )
    items = [boxed, url, text_input("text", "some words"), image_input("plain")]
    for item in items:
        item.dataset_ids.append("ds")
    await create(inputs, caller, items)
    async with db.connection() as conn:
        rows = await conn.fetch(
            "SELECT id, content_hash FROM inputs WHERE app_id = $1 ORDER BY id", caller.app_id
        )
        at_ingest = {r["id"]: r["content_hash"] for r in rows}
        assert None not in at_ingest.values()
        # Stale again, as any change makes them: the version's creation reads them back.
        await conn.execute("UPDATE inputs SET content_hash = NULL WHERE app_id = $1", caller.app_id)
    await build(versions, caller, "ds", "v1")
    refreshed = {input_id: digest for input_id, _, digest in await content(db, caller, "ds", "v1")}
    assert refreshed == at_ingest
