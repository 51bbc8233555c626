"""clarifai.api.V2 dataset version RPCs (versions, exports, metrics groups) through
clarifai-grpc's own stub on a real channel, with the real job runner; results are read
back through the native API, archives with the SDK's own DatasetExportReader."""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import requests
from clarifai.datasets.export.inputs_annotations import DatasetExportReader
from clarifai.datasets.upload.utils import DisplayUploadStatus
from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2
from datasetd.v1 import data_pb2, input_pb2
from datasetd.v1 import dataset_version_service_pb2 as vapi
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict

from service.app import Running
from service.domain.auth import new_key
from service.domain.versions import RETIRED_BUILD
from service.storage.api_keys import PgApiKeyRepository
from service.storage.db import Database
from tests.conftest import Caller
from tests.e2e.clarifai.v2 import scope
from tests.e2e.test_annotations import add, annotation, box, concepts, points, region
from tests.e2e.test_inputs import create, image_input, new_dataset
from tests.e2e.test_versions import get_version
from tests.helpers import call_error

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

SUCCESS = status_code_pb2.SUCCESS
MISSING = status_code_pb2.CONN_DOES_NOT_EXIST
INVALID = status_code_pb2.CONN_INVALID_REQUEST
PENDING = status_code_pb2.DATASET_VERSION_PENDING
IN_PROGRESS = status_code_pb2.DATASET_VERSION_IN_PROGRESS
READY = status_code_pb2.DATASET_VERSION_READY
EXPORT_DONE = status_code_pb2.DATASET_VERSION_EXPORT_SUCCESS
EXPORT_WAITING = (
    status_code_pb2.DATASET_VERSION_EXPORT_PENDING,
    status_code_pb2.DATASET_VERSION_EXPORT_IN_PROGRESS,
)
PROTOBUF = resources_pb2.CLARIFAI_DATA_PROTOBUF
TIMEOUT_SECONDS = 30.0


async def content(
    inputs: Inputs, datasets: Datasets, annotations: Annotations, caller: Caller
) -> None:
    """Dataset "d": an image tagged cat; an image with a box and a polygon of dog and a
    box of cat; a text tagged (negatively) cat only."""
    text = input_pb2.Input(
        id="txt",
        data=data_pb2.Data(text=data_pb2.Text(raw="hello"), concepts=concepts("cat", value=0)),
    )
    items = [image_input("cat1", concepts=concepts("cat")), image_input("dog1", (1, 2, 3)), text]
    await new_dataset(datasets, caller, "d")
    for item in items:
        item.dataset_ids.append("d")
    made = await create(inputs, caller, items)
    assert made.created_count == 3, made
    polygon = data_pb2.Polygon(points=points((0.1, 0.1), (0.9, 0.5), (0.1, 0.9)))
    regions = [
        box("b1", "dog", top=0.1, left=0.2, bottom=0.6, right=0.7),
        box("b2", "cat", top=0.2, left=0.2, bottom=0.3, right=0.3),
        region("p1", "dog", polygon=polygon),
    ]
    added = await add(annotations, caller, [annotation("dog1", "shapes", regions=regions)])
    assert added.created_count == 1, added


async def post_version(
    v2: service_pb2_grpc.V2Stub, caller: Caller, dataset_id: str, **fields: Any
) -> service_pb2.MultiDatasetVersionResponse:
    response: service_pb2.MultiDatasetVersionResponse = await v2.PostDatasetVersions(
        service_pb2.PostDatasetVersionsRequest(
            user_app_id=scope(caller),
            dataset_id=dataset_id,
            dataset_versions=[resources_pb2.DatasetVersion(**fields)],
        ),
        metadata=caller.metadata,
    )
    return response


async def get(
    v2: service_pb2_grpc.V2Stub, caller: Caller, dataset_id: str, version_id: str
) -> service_pb2.SingleDatasetVersionResponse:
    response: service_pb2.SingleDatasetVersionResponse = await v2.GetDatasetVersion(
        service_pb2.GetDatasetVersionRequest(
            user_app_id=scope(caller), dataset_id=dataset_id, dataset_version_id=version_id
        ),
        metadata=caller.metadata,
    )
    return response


async def until_ready(
    v2: service_pb2_grpc.V2Stub, caller: Caller, dataset_id: str, version_id: str
) -> resources_pb2.DatasetVersion:
    """Polls GetDatasetVersion as clarifai-python-grpc's tests do: on while PENDING or
    IN_PROGRESS, anything else but READY fails."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_SECONDS
    while True:
        got = await get(v2, caller, dataset_id, version_id)
        assert got.status.code == SUCCESS, got.status
        code = got.dataset_version.status.code
        if code == READY:
            return got.dataset_version
        assert code in (PENDING, IN_PROGRESS), got.dataset_version.status
        assert asyncio.get_running_loop().time() < deadline, got.dataset_version.status
        await asyncio.sleep(0.05)


async def put_exports(
    v2: service_pb2_grpc.V2Stub,
    caller: Caller,
    dataset_id: str,
    version_id: str,
    *exports: resources_pb2.DatasetVersionExport,
) -> service_pb2.MultiDatasetVersionExportResponse:
    response: service_pb2.MultiDatasetVersionExportResponse = await v2.PutDatasetVersionExports(
        service_pb2.PutDatasetVersionExportsRequest(
            user_app_id=scope(caller),
            dataset_id=dataset_id,
            dataset_version_id=version_id,
            exports=exports,
        ),
        metadata=caller.metadata,
    )
    return response


async def exported(
    v2: service_pb2_grpc.V2Stub,
    caller: Caller,
    dataset_id: str,
    version_id: str,
    *formats: resources_pb2.DatasetVersionExportFormat.ValueType,
) -> service_pb2.MultiDatasetVersionExportResponse:
    """Re-sends the same PutDatasetVersionExports, as the SDK's archive_zip does, while
    any export is pending; every answer is SUCCESS at the top."""
    asked = [resources_pb2.DatasetVersionExport(format=f) for f in formats]
    deadline = asyncio.get_running_loop().time() + TIMEOUT_SECONDS
    while True:
        response = await put_exports(v2, caller, dataset_id, version_id, *asked)
        assert response.status.code == SUCCESS, response.status
        assert [e.format for e in response.exports] == list(formats)
        codes = [e.status.code for e in response.exports]
        if all(code == EXPORT_DONE for code in codes):
            return response
        # One format may be done while another is still written.
        assert all(code in (*EXPORT_WAITING, EXPORT_DONE) for code in codes), response.exports
        assert asyncio.get_running_loop().time() < deadline, response.exports
        await asyncio.sleep(0.1)


async def metrics_groups(
    v2: service_pb2_grpc.V2Stub, caller: Caller, dataset_id: str, version_id: str, **filters: Any
) -> service_pb2.MultiDatasetVersionMetricsGroupResponse:
    response: service_pb2.MultiDatasetVersionMetricsGroupResponse = (
        await v2.ListDatasetVersionMetricsGroups(
            service_pb2.ListDatasetVersionMetricsGroupsRequest(
                user_app_id=scope(caller),
                dataset_id=dataset_id,
                dataset_version_id=version_id,
                **filters,
            ),
            metadata=caller.metadata,
        )
    )
    return response


async def first_groups(
    v2: service_pb2_grpc.V2Stub, caller: Caller, dataset_id: str, version_id: str
) -> service_pb2.MultiDatasetVersionMetricsGroupResponse:
    """Polls as the SDK's upload status does: until the response holds any group."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_SECONDS
    while True:
        response = await metrics_groups(v2, caller, dataset_id, version_id)
        assert response.status.code == SUCCESS, response.status
        if len(MessageToDict(response)) > 1:
            return response
        assert asyncio.get_running_loop().time() < deadline, "no metrics groups"
        await asyncio.sleep(0.1)


async def test_version_lifecycle(
    v2: service_pb2_grpc.V2Stub,
    inputs: Inputs,
    datasets: Datasets,
    annotations: Annotations,
    versions: Versions,
    caller: Caller,
) -> None:
    await content(inputs, datasets, annotations, caller)
    wanted = struct_pb2.Struct()
    wanted.update({"purpose": "test"})
    made = await post_version(v2, caller, "d", id="v1", description="first", metadata=wanted)
    assert made.status.code == SUCCESS, made.status
    (version,) = made.dataset_versions
    assert (version.id, version.dataset_id, version.user_id) == ("v1", "d", "me")
    # READY when created (snapshots by reference): the SDK's polling ends at once.
    assert version.status.code == READY, version.status
    ready = await until_ready(v2, caller, "d", "v1")
    native = await get_version(versions, caller, "d", "v1")
    assert ready.metrics["/"].inputs_count.value == native.metrics["/"].inputs_count.value == 3
    assert ready.metrics["/"].bounding_boxes_count.value == 2
    assert (ready.description, dict(ready.metadata)) == ("first", {"purpose": "test"})

    assert (await post_version(v2, caller, "d", id="v2")).status.code == SUCCESS
    seen: list[str] = []
    for page in (1, 2, 3):
        listed = await v2.ListDatasetVersions(
            service_pb2.ListDatasetVersionsRequest(
                user_app_id=scope(caller), dataset_id="d", page=page, per_page=1
            ),
            metadata=caller.metadata,
        )
        assert listed.status.code == SUCCESS, listed.status
        seen += [v.id for v in listed.dataset_versions]
    native_list = await versions.ListDatasetVersions(
        vapi.ListDatasetVersionsRequest(app_id=caller.app_id, dataset_id="d"),
        metadata=caller.metadata,
    )
    assert seen == [v.id for v in native_list.versions] == ["v2", "v1"]
    for origins, expected in (([resources_pb2.TRAINING], []), ([resources_pb2.MANUAL], seen)):
        listed = await v2.ListDatasetVersions(
            service_pb2.ListDatasetVersionsRequest(
                user_app_id=scope(caller), dataset_id="d", request_origins=origins
            ),
            metadata=caller.metadata,
        )
        assert [v.id for v in listed.dataset_versions] == expected

    replaced = struct_pb2.Struct()
    replaced.update({"stage": "final"})
    patched = await v2.PatchDatasetVersions(
        service_pb2.PatchDatasetVersionsRequest(
            user_app_id=scope(caller),
            dataset_id="d",
            action="overwrite",
            dataset_versions=[
                resources_pb2.DatasetVersion(id="v1", description="renamed", metadata=replaced)
            ],
        ),
        metadata=caller.metadata,
    )
    assert patched.status.code == SUCCESS, patched.status
    after = await get_version(versions, caller, "d", "v1")
    assert (after.description, dict(after.metadata)) == ("renamed", {"stage": "final"})
    for action in ("merge", "remove", ""):
        refused = await v2.PatchDatasetVersions(
            service_pb2.PatchDatasetVersionsRequest(
                user_app_id=scope(caller),
                dataset_id="d",
                action=action,
                dataset_versions=[resources_pb2.DatasetVersion(id="v1", description="x")],
            ),
            metadata=caller.metadata,
        )
        assert refused.status.code == INVALID and "action" in refused.status.details, refused
    no_id = await v2.PatchDatasetVersions(
        service_pb2.PatchDatasetVersionsRequest(
            user_app_id=scope(caller),
            dataset_id="d",
            action="overwrite",
            dataset_versions=[resources_pb2.DatasetVersion(description="x")],
        ),
        metadata=caller.metadata,
    )
    assert no_id.status.code == INVALID and "dataset_versions[0].id" in no_id.status.details
    assert (await get_version(versions, caller, "d", "v1")).description == "renamed"

    deleted = await v2.DeleteDatasetVersions(
        service_pb2.DeleteDatasetVersionsRequest(
            user_app_id=scope(caller), dataset_id="d", dataset_version_ids=["v2"]
        ),
        metadata=caller.metadata,
    )
    assert deleted.status.code == SUCCESS, deleted.status
    assert (await get(v2, caller, "d", "v2")).status.code == MISSING
    native_list = await versions.ListDatasetVersions(
        vapi.ListDatasetVersionsRequest(app_id=caller.app_id, dataset_id="d"),
        metadata=caller.metadata,
    )
    assert [v.id for v in native_list.versions] == ["v1"]


async def test_bad_version_requests(
    v2: service_pb2_grpc.V2Stub, datasets: Datasets, versions: Versions, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "d")
    unknown_dataset = await post_version(v2, caller, "nope", id="v1")
    assert unknown_dataset.status.code == MISSING, unknown_dataset.status
    unsupported = await post_version(
        v2,
        caller,
        "d",
        id="v1",
        annotation_filter_config=resources_pb2.AnnotationFilterConfig(),
        embed_model_version_ids=["m"],
    )
    assert unsupported.status.code == INVALID, unsupported.status
    assert "dataset_versions[0].embed_model_version_ids" in unsupported.status.details
    native_list = await versions.ListDatasetVersions(
        vapi.ListDatasetVersionsRequest(app_id=caller.app_id, dataset_id="d"),
        metadata=caller.metadata,
    )
    assert list(native_list.versions) == []
    assert (await get(v2, caller, "d", "ghost")).status.code == MISSING
    assert (await get(v2, caller, "nope", "ghost")).status.code == MISSING
    export_missing = await put_exports(
        v2, caller, "d", "ghost", resources_pb2.DatasetVersionExport(format=PROTOBUF)
    )
    assert export_missing.status.code == MISSING, export_missing.status
    assert (await metrics_groups(v2, caller, "d", "ghost")).status.code == MISSING
    deleted = await v2.DeleteDatasetVersions(
        service_pb2.DeleteDatasetVersionsRequest(
            user_app_id=scope(caller), dataset_id="d", dataset_version_ids=["ghost"]
        ),
        metadata=caller.metadata,
    )
    assert deleted.status.code == MISSING, deleted.status
    assert (await post_version(v2, caller, "d", id="v1")).status.code == SUCCESS
    await until_ready(v2, caller, "d", "v1")
    bad_formats = await put_exports(
        v2,
        caller,
        "d",
        "v1",
        resources_pb2.DatasetVersionExport(),
        resources_pb2.DatasetVersionExport(format=PROTOBUF, include_embeddings=True),
    )
    assert bad_formats.status.code == INVALID, bad_formats.status
    assert "exports[0].format" in bad_formats.status.details
    assert "exports[1].include_embeddings" in bad_formats.status.details
    listed = await versions.ListExports(
        vapi.ListExportsRequest(app_id=caller.app_id, dataset_id="d", version_id="v1"),
        metadata=caller.metadata,
    )
    assert list(listed.exports) == []


async def test_export_polled_to_success_and_read_by_the_sdk(
    v2: service_pb2_grpc.V2Stub,
    server: Running,
    inputs: Inputs,
    datasets: Datasets,
    annotations: Annotations,
    versions: Versions,
    caller: Caller,
    tmp_path: Path,
) -> None:
    await content(inputs, datasets, annotations, caller)
    assert (await post_version(v2, caller, "d", id="v1")).status.code == SUCCESS
    # No wait for the build: the SDK exports right after create_version.
    done = await exported(v2, caller, "d", "v1", PROTOBUF)
    (export,) = done.exports
    native_exports = await versions.ListExports(
        vapi.ListExportsRequest(app_id=caller.app_id, dataset_id="d", version_id="v1"),
        metadata=caller.metadata,
    )
    (native_export,) = native_exports.exports
    assert export.size == native_export.size > 0
    link = urllib.parse.urlsplit(export.url)
    assert link.path == f"/v2/downloads/apps/{caller.app_id}/exports/{native_export.id}"
    assert {"expires", "signature"} <= set(urllib.parse.parse_qs(link.query))
    again = await put_exports(
        v2, caller, "d", "v1", resources_pb2.DatasetVersionExport(format=PROTOBUF)
    )
    assert again.exports[0].status.code == EXPORT_DONE
    assert urllib.parse.urlsplit(again.exports[0].url).path == link.path
    assert again.exports[0].size == export.size
    native_exports = await versions.ListExports(
        vapi.ListExportsRequest(app_id=caller.app_id, dataset_id="d", version_id="v1"),
        metadata=caller.metadata,
    )
    assert len(native_exports.exports) == 1

    # The bytes of the native download, and the same through the V2 URL, which the SDK
    # reads with its key (DatasetExportReader insists on Content-Type application/zip).
    archive = tmp_path / "export.zip"
    with archive.open("wb") as out:
        async for message in versions.DownloadExport(
            vapi.DownloadExportRequest(
                app_id=caller.app_id, dataset_id="d", version_id="v1", export_id=native_export.id
            ),
            metadata=caller.metadata,
        ):
            out.write(message.chunk)
    assert archive.stat().st_size == export.size
    with DatasetExportReader(local_archive_path=str(archive)) as reader:
        assert len(reader) == 3
        read = {item.id: item for item in reader}
    assert sorted(read) == ["cat1", "dog1", "txt"]
    assert [c.id for c in read["cat1"].data.concepts] == ["cat"]
    assert [r.id for r in read["dog1"].data.regions] == ["b1", "b2", "p1"]
    assert "orig" in read["dog1"].data.image.hosted.sizes

    def by_url() -> list[str]:
        session = requests.Session()
        session.headers["Authorization"] = f"Key {caller.key}"
        with DatasetExportReader(session=session, archive_url=export.url) as reader:
            return sorted(item.SerializeToString().hex() for item in reader)

    from_url = await asyncio.to_thread(by_url)
    assert from_url == sorted(item.SerializeToString().hex() for item in read.values())

    got = await get(v2, caller, "d", "v1")
    info = got.dataset_version.export_info
    assert info.clarifai_data_protobuf.status.code == EXPORT_DONE
    assert urllib.parse.urlsplit(info.clarifai_data_protobuf.url).path == link.path
    assert info.clarifai_data_protobuf.size == export.size
    assert not info.HasField("coco")

    both = await exported(
        v2, caller, "d", "v1", resources_pb2.CLARIFAI_DATA_JSON, resources_pb2.COCO
    )
    native_exports = await versions.ListExports(
        vapi.ListExportsRequest(app_id=caller.app_id, dataset_id="d", version_id="v1"),
        metadata=caller.metadata,
    )
    ids = {e.format: e.id for e in native_exports.exports}
    for item in both.exports:
        assert urllib.parse.urlsplit(item.url).path.endswith(f"/exports/{ids[item.format]}")
    info = (await get(v2, caller, "d", "v1")).dataset_version.export_info
    assert info.coco.status.code == info.clarifai_data_json.status.code == EXPORT_DONE


async def test_a_version_is_ready_when_posted_and_a_failed_one_refuses_export_and_metrics(
    v2: service_pb2_grpc.V2Stub,
    inputs: Inputs,
    datasets: Datasets,
    annotations: Annotations,
    versions: Versions,
    caller: Caller,
    db: Database,
) -> None:
    await content(inputs, datasets, annotations, caller)
    made = await post_version(v2, caller, "d", id="v1")
    assert made.status.code == SUCCESS, made.status
    assert made.dataset_versions[0].status.code == READY, made.dataset_versions[0].status
    # No build to wait for: the metrics come as soon as their protobuf export is written.
    groups = await first_groups(v2, caller, "d", "v1")
    assert list(groups.dataset_version_metrics_groups)
    export = await put_exports(
        v2, caller, "d", "v1", resources_pb2.DatasetVersionExport(format=PROTOBUF)
    )
    assert export.status.code == SUCCESS, export.status
    # There is no build to cancel.
    ended = await call_error(
        versions.CancelDatasetVersionBuild(
            vapi.CancelDatasetVersionBuildRequest(
                app_id=caller.app_id, dataset_id="d", version_id="v1"
            ),
            metadata=caller.metadata,
        )
    )
    assert (ended.code, ended.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "VERSION_BUILD_ENDED",
    )

    # A version that was building when datasetd was upgraded: FAILED by migration 0014.
    assert (await post_version(v2, caller, "d", id="v2")).status.code == SUCCESS
    await db.execute(
        "UPDATE dataset_versions SET status = 'failed', details = $2"
        " WHERE app_id = $1 AND dataset_id = 'd' AND id = 'v2'",
        caller.app_id,
        RETIRED_BUILD,
    )
    failed = await get(v2, caller, "d", "v2")
    assert failed.dataset_version.status.code == status_code_pb2.DATASET_VERSION_FAILURE
    assert (await get_version(versions, caller, "d", "v2")).status.details == RETIRED_BUILD
    refused = await put_exports(
        v2, caller, "d", "v2", resources_pb2.DatasetVersionExport(format=PROTOBUF)
    )
    assert refused.status.code == INVALID, refused.status
    assert "cannot be exported" in refused.status.details
    no_metrics = await metrics_groups(v2, caller, "d", "v2")
    assert no_metrics.status.code == INVALID, no_metrics.status
    listed = await versions.ListExports(
        vapi.ListExportsRequest(app_id=caller.app_id, dataset_id="d", version_id="v2"),
        metadata=caller.metadata,
    )
    assert list(listed.exports) == []


async def test_metrics_groups_as_the_sdk_reads_them(
    v2: service_pb2_grpc.V2Stub,
    inputs: Inputs,
    datasets: Datasets,
    annotations: Annotations,
    versions: Versions,
    caller: Caller,
) -> None:
    await content(inputs, datasets, annotations, caller)
    assert (await post_version(v2, caller, "d", id="v1")).status.code == SUCCESS
    response = await first_groups(v2, caller, "d", "v1")
    uploaded_inputs, uploaded_annotations = DisplayUploadStatus.get_dataset_version_stats(response)
    assert {k: int(v) for k, v in uploaded_inputs.items()} == {"total": 3, "image": 2, "text": 1}
    assert uploaded_annotations == {"concepts": 1, "bboxes": 2, "polygons": 1}
    native = (await get_version(versions, caller, "d", "v1")).metrics["/"]
    groups = MessageToDict(response)["datasetVersionMetricsGroups"]
    total = next(g for g in groups if g["value"] == "total")
    assert total["type"] == "INPUT_TYPE" and total["parentPath"] == "/"
    assert int(total["metrics"]["inputsCount"]) == native.inputs_count.value
    assert int(total["metrics"]["boundingBoxesCount"]) == native.bounding_boxes_count.value
    by_concept = {g["value"]: g["metrics"] for g in groups if g.get("type") == "CONCEPT_ID"}
    assert set(by_concept) == {"cat", "dog"}
    # Every count the SDK reads is present, 0 included (absent would be its KeyError).
    assert by_concept["cat"]["polygonsCount"] == "0"
    assert {k: int(by_concept["dog"][k]) for k in ("inputsCount", "boundingBoxesCount")} == {
        "inputsCount": 1,
        "boundingBoxesCount": 1,
    }
    assert int(by_concept["cat"]["inputsCount"]) == 2

    only_concepts = await metrics_groups(v2, caller, "d", "v1", types=[resources_pb2.CONCEPT_ID])
    assert [g.value.string_value for g in only_concepts.dataset_version_metrics_groups] == [
        "cat",
        "dog",
    ]
    only_total = await metrics_groups(
        v2, caller, "d", "v1", values=[struct_pb2.Value(string_value="total")]
    )
    assert [g.value.string_value for g in only_total.dataset_version_metrics_groups] == ["total"]
    elsewhere = await metrics_groups(v2, caller, "d", "v1", parent_paths=["/elsewhere"])
    assert elsewhere.status.code == SUCCESS and not elsewhere.dataset_version_metrics_groups
    every = [g.value.string_value for g in response.dataset_version_metrics_groups]
    second = await metrics_groups(v2, caller, "d", "v1", page=2, per_page=1)
    assert [g.value.string_value for g in second.dataset_version_metrics_groups] == every[1:2]


async def test_empty_dataset_still_has_a_total(
    v2: service_pb2_grpc.V2Stub, datasets: Datasets, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "empty")
    assert (await post_version(v2, caller, "empty", id="v1")).status.code == SUCCESS
    response = await first_groups(v2, caller, "empty", "v1")
    uploaded_inputs, uploaded_annotations = DisplayUploadStatus.get_dataset_version_stats(response)
    assert {k: int(v) for k, v in uploaded_inputs.items()} == {"total": 0}
    assert uploaded_annotations == {"concepts": 0, "bboxes": 0, "polygons": 0}


async def test_a_read_only_key_gets_the_total_alone(
    v2: service_pb2_grpc.V2Stub,
    inputs: Inputs,
    datasets: Datasets,
    annotations: Annotations,
    versions: Versions,
    caller: Caller,
    db: Database,
) -> None:
    await content(inputs, datasets, annotations, caller)
    assert (await post_version(v2, caller, "d", id="v1")).status.code == SUCCESS
    await until_ready(v2, caller, "d", "v1")
    secret, key = new_key(caller.app_id, "reader")
    await PgApiKeyRepository(db).insert(dataclasses.replace(key, scopes=("read",)))
    reader = Caller(caller.app_id, secret)
    # The breakdown needs the version's export, which a read-only key may not make.
    response = await first_groups(v2, reader, "d", "v1")
    assert [g.value.string_value for g in response.dataset_version_metrics_groups] == ["total"]
    assert response.dataset_version_metrics_groups[0].metrics.inputs_count.value == 3
    listed = await versions.ListExports(
        vapi.ListExportsRequest(app_id=caller.app_id, dataset_id="d", version_id="v1"),
        metadata=caller.metadata,
    )
    assert list(listed.exports) == []


async def test_the_sdk_versions_exports_and_reads_upload_status(
    server: Running,
    inputs: Inputs,
    datasets: Datasets,
    annotations: Annotations,
    versions: Versions,
    caller: Caller,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    await content(inputs, datasets, annotations, caller)
    home = tmp_path_factory.mktemp("home")

    def sdk() -> tuple[str, str, Any]:
        # The SDK is synchronous and the server runs in this event loop: in a thread.
        from clarifai.client.dataset import Dataset

        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HOME", str(home))
            dataset = Dataset(
                dataset_id="d",
                user_id="me",
                app_id=caller.app_id,
                pat=caller.key,
                base_url=f"http://127.0.0.1:{server.port}",
            )
            version = dataset.create_version(id="v1", description="by the sdk")
            # archive_zip re-sends PutDatasetVersionExports each second until it is done.
            url: str = version.archive_zip()
            stats = dataset.get_upload_status(pre_upload=True)
            return version.version.id, url, stats

    version_id, url, stats = await asyncio.to_thread(sdk)
    assert version_id == "v1"
    listed = await versions.ListExports(
        vapi.ListExportsRequest(app_id=caller.app_id, dataset_id="d", version_id="v1"),
        metadata=caller.metadata,
    )
    (export,) = listed.exports
    assert urllib.parse.urlsplit(url).path.endswith(f"/exports/{export.id}")
    uploaded_inputs, uploaded_annotations = stats
    assert {k: int(v) for k, v in uploaded_inputs.items()} == {"total": 3, "image": 2, "text": 1}
    assert uploaded_annotations == {"concepts": 1, "bboxes": 2, "polygons": 1}
    # The upload status made its own throw-away version, as the SDK does.
    native_list = await versions.ListDatasetVersions(
        vapi.ListDatasetVersionsRequest(app_id=caller.app_id, dataset_id="d"),
        metadata=caller.metadata,
    )
    assert len(native_list.versions) == 2
    assert {v.description for v in native_list.versions} == {"by the sdk", "SDK Upload Status"}
