"""The dataset fields people coming from Datature Vi expect (issue 15): display_name, the
lock that refuses every mutation, read_only, hidden and last_accessed_at, against the real
server over a real channel. What a refused call would have changed is read back through
other RPCs (and the database) to show nothing changed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc
from datasetd.v1 import common_pb2, dataset_pb2, dataset_version_pb2
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import dataset_version_service_pb2 as vapi
from google.protobuf import field_mask_pb2

from service.storage.db import Database
from tests.conftest import Caller
from tests.e2e.test_exports import finished, request_export
from tests.e2e.test_inputs import create, image_input, new_dataset
from tests.e2e.test_versions import build, create_version
from tests.helpers import call_error

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

OVERWRITE = common_pb2.PATCH_ACTION_OVERWRITE
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
VI_JSONL = dataset_version_pb2.EXPORT_FORMAT_VI_JSONL


async def get(datasets: Datasets, caller: Caller, dataset_id: str) -> dataset_pb2.Dataset:
    response = await datasets.GetDataset(
        dapi.GetDatasetRequest(app_id=caller.app_id, dataset_id=dataset_id),
        metadata=caller.metadata,
    )
    return response.dataset


async def update(
    datasets: Datasets, caller: Caller, dataset: dataset_pb2.Dataset, *paths: str
) -> dataset_pb2.Dataset:
    response = await datasets.UpdateDataset(
        dapi.UpdateDatasetRequest(
            app_id=caller.app_id,
            dataset=dataset,
            action=OVERWRITE,
            update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
        ),
        metadata=caller.metadata,
    )
    return response.dataset


async def listed(datasets: Datasets, caller: Caller, **params: Any) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        page = await datasets.ListDatasets(
            dapi.ListDatasetsRequest(app_id=caller.app_id, page_size=1, page_token=token, **params),
            metadata=caller.metadata,
        )
        ids += [d.id for d in page.datasets]
        token = page.next_page_token
        if not token:
            return sorted(ids)


async def members(datasets: Datasets, caller: Caller, dataset_id: str) -> list[str]:
    response = await datasets.ListDatasetInputs(
        dapi.ListDatasetInputsRequest(app_id=caller.app_id, dataset_id=dataset_id),
        metadata=caller.metadata,
    )
    return sorted(item.input.id for item in response.dataset_inputs)


async def refused(call: Awaitable[Any], reason: str) -> str:
    error = await call_error(call)
    assert (error.code, error.reason) == (PRECONDITION, reason), error
    return error.message


async def test_fields_are_stored_returned_and_patched_by_mask(
    datasets: Datasets, caller: Caller
) -> None:
    created = await datasets.CreateDataset(
        dapi.CreateDatasetRequest(
            app_id=caller.app_id,
            dataset=dataset_pb2.Dataset(
                id="pets", display_name="My Pets 🐈", read_only=True, hidden=True
            ),
        ),
        metadata=caller.metadata,
    )
    assert created.dataset.display_name == "My Pets 🐈"
    got = await get(datasets, caller, "pets")
    assert (got.display_name, got.locked, got.read_only, got.hidden) == (
        "My Pets 🐈",
        False,
        True,
        True,
    )
    # Cleared through the mask: the fields set to their empty values.
    cleared = await update(
        datasets, caller, dataset_pb2.Dataset(id="pets"), "display_name", "read_only", "hidden"
    )
    assert (cleared.display_name, cleared.read_only, cleared.hidden) == ("", False, False)
    renamed = await update(
        datasets, caller, dataset_pb2.Dataset(id="pets", display_name="Cats"), "display_name"
    )
    assert renamed.display_name == "Cats"
    assert (await get(datasets, caller, "pets")).display_name == "Cats"
    # The search text matches the display name too.
    await new_dataset(datasets, caller, "other")
    assert await listed(datasets, caller, query="cAtS") == ["pets"]

    for bad, wanted in (("a\nb", "control characters"), ("x" * 257, "at most 256")):
        error = await call_error(
            update(datasets, caller, dataset_pb2.Dataset(id="pets", display_name=bad))
        )
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert wanted in error.fields["dataset.display_name"]
    assert (await get(datasets, caller, "pets")).display_name == "Cats"


async def test_a_locked_dataset_refuses_every_mutation_until_unlocked(
    datasets: Datasets, inputs: Inputs, versions: Versions, caller: Caller, db: Database
) -> None:
    await new_dataset(datasets, caller, "ds")
    await new_dataset(datasets, caller, "src")
    items = [image_input("a"), image_input("b", color=(1, 2, 3))]
    items[0].dataset_ids.append("ds")
    items[1].dataset_ids.append("src")
    await create(inputs, caller, items)
    await build(versions, caller, "ds", "v1")
    locked = await update(datasets, caller, dataset_pb2.Dataset(id="ds", locked=True), "locked")
    assert locked.locked
    before = await get(datasets, caller, "ds")
    app, ds = caller.app_id, "ds"
    meta = caller.metadata

    calls: dict[str, Awaitable[Any]] = {
        "UpdateDataset": update(
            datasets, caller, dataset_pb2.Dataset(id=ds, description="x"), "description"
        ),
        # Unlocking together with another change is still a change of a locked dataset.
        "UpdateDataset+unlock": update(
            datasets,
            caller,
            dataset_pb2.Dataset(id=ds, description="x", locked=False),
            "description",
            "locked",
        ),
        "DeleteDataset": datasets.DeleteDataset(
            dapi.DeleteDatasetRequest(app_id=app, dataset_id=ds), metadata=meta
        ),
        "DeleteDataset force": datasets.DeleteDataset(
            dapi.DeleteDatasetRequest(app_id=app, dataset_id=ds, force=True), metadata=meta
        ),
        "AddDatasetInputs": datasets.AddDatasetInputs(
            dapi.AddDatasetInputsRequest(app_id=app, dataset_id=ds, input_ids=["b"]),
            metadata=meta,
        ),
        "RemoveDatasetInputs": datasets.RemoveDatasetInputs(
            dapi.RemoveDatasetInputsRequest(app_id=app, dataset_id=ds, input_ids=["a"]),
            metadata=meta,
        ),
        "DeleteDatasetInputsByFilter": datasets.DeleteDatasetInputsByFilter(
            dapi.DeleteDatasetInputsByFilterRequest(app_id=app, dataset_id=ds), metadata=meta
        ),
        "MergeDataset": datasets.MergeDataset(
            dapi.MergeDatasetRequest(
                app_id=app, source_dataset_id="src", destination_dataset_id=ds
            ),
            metadata=meta,
        ),
        "CreateInputs": create(inputs, caller, [_in_dataset(image_input("c"), ds)]),
        "CreateDatasetVersion": create_version(versions, caller, ds, "v2"),
        "UpdateDatasetVersion": versions.UpdateDatasetVersion(
            vapi.UpdateDatasetVersionRequest(
                app_id=app,
                dataset_id=ds,
                version=dataset_version_pb2.DatasetVersion(id="v1", description="x"),
            ),
            metadata=meta,
        ),
        "DeleteDatasetVersion": versions.DeleteDatasetVersion(
            vapi.DeleteDatasetVersionRequest(app_id=app, dataset_id=ds, version_id="v1"),
            metadata=meta,
        ),
    }
    for name, call in calls.items():
        message = await refused(call, "DATASET_LOCKED")
        assert "'ds' is locked" in message and "unlock" in message, name

    # Nothing changed: the dataset, its members, its versions; no input "c".
    after = await get(datasets, caller, ds)
    assert (after.etag, after.description) == (before.etag, before.description)
    assert await members(datasets, caller, ds) == ["a"]
    listed_versions = await versions.ListDatasetVersions(
        vapi.ListDatasetVersionsRequest(app_id=app, dataset_id=ds), metadata=meta
    )
    assert [v.id for v in listed_versions.versions] == ["v1"]
    assert listed_versions.versions[0].description == ""
    assert await db.fetchval("SELECT count(*) FROM inputs WHERE app_id = $1", app) == 2
    # Reads and exports change nothing and stay allowed.
    export = await request_export(versions, caller, ds, "v1", VI_JSONL)
    assert (await finished(versions, caller, ds, "v1", export.id)).url

    unlocked = await update(datasets, caller, dataset_pb2.Dataset(id=ds), "locked")
    assert not unlocked.locked
    added = await datasets.AddDatasetInputs(
        dapi.AddDatasetInputsRequest(app_id=app, dataset_id=ds, input_ids=["b"]), metadata=meta
    )
    assert added.added_count == 1
    await datasets.DeleteDataset(
        dapi.DeleteDatasetRequest(app_id=app, dataset_id=ds, force=True), metadata=meta
    )


def _in_dataset(item: Any, dataset_id: str) -> Any:
    item.dataset_ids.append(dataset_id)
    return item


async def test_a_read_only_dataset_keeps_its_members_but_not_its_settings(
    datasets: Datasets, inputs: Inputs, versions: Versions, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "ro")
    await create(inputs, caller, [_in_dataset(image_input("a"), "ro"), image_input("b")])
    await update(datasets, caller, dataset_pb2.Dataset(id="ro", read_only=True), "read_only")
    app, meta = caller.app_id, caller.metadata
    for call in (
        datasets.AddDatasetInputs(
            dapi.AddDatasetInputsRequest(app_id=app, dataset_id="ro", input_ids=["b"]),
            metadata=meta,
        ),
        datasets.RemoveDatasetInputs(
            dapi.RemoveDatasetInputsRequest(app_id=app, dataset_id="ro", input_ids=["a"]),
            metadata=meta,
        ),
        create(inputs, caller, [_in_dataset(image_input("c"), "ro")]),
    ):
        message = await refused(call, "DATASET_READ_ONLY")
        assert "read-only" in message and "read_only" in message
    assert await members(datasets, caller, "ro") == ["a"]
    # Its settings and versions of its frozen content are not its membership.
    described = await update(
        datasets, caller, dataset_pb2.Dataset(id="ro", description="frozen"), "description"
    )
    assert described.description == "frozen" and described.read_only
    await build(versions, caller, "ro", "v1")
    await update(datasets, caller, dataset_pb2.Dataset(id="ro"), "read_only")
    removed = await datasets.RemoveDatasetInputs(
        dapi.RemoveDatasetInputsRequest(app_id=app, dataset_id="ro", input_ids=["a"]),
        metadata=meta,
    )
    assert removed.removed_count == 1


async def test_hidden_datasets_are_listed_only_when_asked_for(
    datasets: Datasets, caller: Caller
) -> None:
    for dataset_id in ("a", "b", "c"):
        await new_dataset(datasets, caller, dataset_id)
    await update(datasets, caller, dataset_pb2.Dataset(id="b", hidden=True), "hidden")
    assert await listed(datasets, caller) == ["a", "c"]
    assert await listed(datasets, caller, include_hidden=True) == ["a", "b", "c"]
    assert (await get(datasets, caller, "b")).hidden
    # A page token belongs to its listing: it cannot switch the hidden ones on.
    first = await datasets.ListDatasets(
        dapi.ListDatasetsRequest(app_id=caller.app_id, page_size=1), metadata=caller.metadata
    )
    error = await call_error(
        datasets.ListDatasets(
            dapi.ListDatasetsRequest(
                app_id=caller.app_id,
                page_size=1,
                page_token=first.next_page_token,
                include_hidden=True,
            ),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_reads_record_the_last_access_without_changing_the_dataset(
    datasets: Datasets, caller: Caller, db: Database
) -> None:
    await new_dataset(datasets, caller, "seen")
    await new_dataset(datasets, caller, "unseen")
    started = datetime.now(UTC)
    first = await get(datasets, caller, "seen")
    # The response shows the dataset as read; the read itself is recorded.
    assert not first.HasField("last_accessed_at")

    async def stored(dataset_id: str) -> datetime | None:
        value: datetime | None = await db.fetchval(
            "SELECT last_accessed_at FROM datasets WHERE app_id = $1 AND id = $2",
            caller.app_id,
            dataset_id,
        )
        return value

    recorded = await stored("seen")
    assert recorded is not None and started <= recorded <= datetime.now(UTC)
    second = await get(datasets, caller, "seen")
    assert second.last_accessed_at.ToDatetime(tzinfo=UTC) == recorded
    # A read of it is not a change of it.
    assert (second.etag, second.modified_at) == (first.etag, first.modified_at)
    # Within the minute, more reads leave it as it is.
    await asyncio.sleep(0.01)
    await members(datasets, caller, "seen")
    await get(datasets, caller, "seen")
    assert await stored("seen") == recorded
    # Listing is not reading a dataset; reading its inputs is.
    await listed(datasets, caller)
    assert await stored("unseen") is None
    await members(datasets, caller, "unseen")
    assert await stored("unseen") is not None
    # An update neither records an access nor moves it.
    updated = await update(
        datasets, caller, dataset_pb2.Dataset(id="seen", description="x"), "description"
    )
    assert updated.last_accessed_at.ToDatetime(tzinfo=UTC) == recorded
    error = await call_error(
        update(
            datasets,
            caller,
            dataset_pb2.Dataset(id="seen", last_accessed_at=first.created_at),
        )
    )
    assert "output only" in error.fields["dataset.last_accessed_at"]
