"""DatasetService as a caller sees it: real server, real channel, generated stubs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from datasetd.v1 import common_pb2, data_pb2, dataset_pb2
from datasetd.v1 import dataset_service_pb2 as api
from google.protobuf import field_mask_pb2, json_format, struct_pb2

from service.storage.db import Database
from tests.conftest import Caller, new_caller
from tests.helpers import call_error, download, png_bytes

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Stub
PUBLIC = dataset_pb2.Visibility(gettable=dataset_pb2.Visibility.GETTABLE_PUBLIC)


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def as_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message)
    return result


async def create(stub: Stub, caller: Caller, **fields: Any) -> dataset_pb2.Dataset:
    response = await stub.CreateDataset(
        api.CreateDatasetRequest(app_id=caller.app_id, dataset=dataset_pb2.Dataset(**fields)),
        metadata=caller.metadata,
    )
    return response.dataset


async def get(stub: Stub, caller: Caller, dataset_id: str) -> dataset_pb2.Dataset:
    response = await stub.GetDataset(
        api.GetDatasetRequest(app_id=caller.app_id, dataset_id=dataset_id),
        metadata=caller.metadata,
    )
    return response.dataset


async def update(
    stub: Stub,
    caller: Caller,
    action: int,
    paths: list[str] | None = None,
    etag: str = "",
    **fields: Any,
) -> dataset_pb2.Dataset:
    response = await stub.UpdateDataset(
        api.UpdateDatasetRequest(
            app_id=caller.app_id,
            dataset=dataset_pb2.Dataset(**fields),
            action=action,  # type: ignore[arg-type]
            update_mask=field_mask_pb2.FieldMask(paths=paths or []),
            etag=etag,
        ),
        metadata=caller.metadata,
    )
    return response.dataset


async def list_all(stub: Stub, caller: Caller, **params: Any) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        page = await stub.ListDatasets(
            api.ListDatasetsRequest(app_id=caller.app_id, page_token=token, **params),
            metadata=caller.metadata,
        )
        ids += [d.id for d in page.datasets]
        token = page.next_page_token
        if not token:
            return ids


# --- create and get -------------------------------------------------------------------------


async def test_create_then_get_returns_every_field(datasets: Stub, caller: Caller) -> None:
    created = await create(
        datasets,
        caller,
        id="cats",
        description="Cats and dogs",
        notes="# Notes\nfrom the field",
        metadata=struct({"source": "camera", "nested": {"n": 1, "tags": ["a"]}}),
        visibility=PUBLIC,
        default_filter=common_pb2.InputFilter(
            concept_ids=["cat"], media_types=[common_pb2.MEDIA_TYPE_IMAGE]
        ),
    )
    got = await get(datasets, caller, "cats")
    for dataset in (created, got):
        assert dataset.id == "cats"
        assert dataset.app_id == caller.app_id
        assert dataset.description == "Cats and dogs"
        assert dataset.notes == "# Notes\nfrom the field"
        assert as_dict(dataset.metadata) == {"source": "camera", "nested": {"n": 1, "tags": ["a"]}}
        assert dataset.visibility.gettable == dataset_pb2.Visibility.GETTABLE_PUBLIC
        assert list(dataset.default_filter.concept_ids) == ["cat"]
        assert list(dataset.default_filter.media_types) == [common_pb2.MEDIA_TYPE_IMAGE]
        assert dataset.HasField("statistics")
        assert dataset.statistics.inputs_count == 0
        assert dataset.etag
        assert dataset.created_at.seconds > 0
    assert got.created_at == created.created_at


async def test_create_without_id_generates_one(datasets: Stub, caller: Caller) -> None:
    first = await create(datasets, caller, description="a")
    second = await create(datasets, caller, description="b")
    assert len(first.id) == 32 and first.id != second.id
    assert (await get(datasets, caller, first.id)).description == "a"
    assert first.visibility.gettable == dataset_pb2.Visibility.GETTABLE_PRIVATE


async def test_duplicate_id_is_already_exists(datasets: Stub, caller: Caller) -> None:
    await create(datasets, caller, id="dup", description="original")
    error = await call_error(create(datasets, caller, id="dup", description="second"))
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.reason == "DATASET_EXISTS"
    assert (await get(datasets, caller, "dup")).description == "original"


@pytest.mark.parametrize("bad_id", ["bad id!", "x" * 65, "ü", "a/b"])
async def test_invalid_ids_are_rejected_and_nothing_is_written(
    datasets: Stub, caller: Caller, bad_id: str
) -> None:
    error = await call_error(create(datasets, caller, id=bad_id))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "dataset.id" in error.fields
    assert "[A-Za-z0-9_-]" in error.fields["dataset.id"]
    assert await list_all(datasets, caller) == []
    error = await call_error(get(datasets, caller, bad_id))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "dataset_id" in error.fields


async def test_unknown_dataset_is_not_found(datasets: Stub, caller: Caller) -> None:
    error = await call_error(get(datasets, caller, "nope"))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "DATASET_NOT_FOUND"
    assert "nope" in error.message


async def test_metadata_limits(datasets: Stub, caller: Caller) -> None:
    too_large = struct({"blob": "x" * (64 * 1024)})
    error = await call_error(create(datasets, caller, id="big", metadata=too_large))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "64 KiB" in error.message or "65536" in error.fields["dataset.metadata"]
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(8):
        deep = {"d": deep}
    error = await call_error(create(datasets, caller, id="deep", metadata=struct(deep)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "depth" in error.fields["dataset.metadata"]
    assert await list_all(datasets, caller) == []
    # Eight levels are allowed.
    await create(datasets, caller, id="deep8", metadata=struct(deep["d"]))


async def test_every_bad_field_is_reported_at_once(datasets: Stub, caller: Caller) -> None:
    error = await call_error(
        create(
            datasets,
            caller,
            id="ok",
            description="d" * 1025,
            image=data_pb2.Image(url="ftp://example.com/x.png"),
            default_filter=common_pb2.InputFilter(concept_ids=[""]),
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(error.fields) == {
        "dataset.description",
        "dataset.image.url",
        "dataset.default_filter.concept_ids[0]",
    }


# --- cover image ----------------------------------------------------------------------------


async def test_cover_image_is_stored_and_downloadable(datasets: Stub, caller: Caller) -> None:
    image = png_bytes(40, 30)
    created = await create(datasets, caller, id="covered", image=data_pb2.Image(base64=image))
    assert created.image.base64 == b""  # bytes are never echoed back
    info = created.image.image_info
    assert (info.width, info.height, info.format) == (40, 30, "PNG")
    got = await get(datasets, caller, "covered")
    assert await asyncio.to_thread(download, got.image.url) == image


async def test_cover_image_by_url_is_kept_as_reference(datasets: Stub, caller: Caller) -> None:
    created = await create(
        datasets, caller, id="linked", image=data_pb2.Image(url="https://example.com/c.jpg")
    )
    assert created.image.url == "https://example.com/c.jpg"


async def test_corrupt_cover_image_is_rejected(datasets: Stub, caller: Caller) -> None:
    error = await call_error(
        create(datasets, caller, id="broken", image=data_pb2.Image(base64=b"not an image"))
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_IMAGE"
    assert "JPEG" in error.fields["dataset.image.base64"]
    assert await list_all(datasets, caller) == []


# --- list -----------------------------------------------------------------------------------


async def test_pagination_in_every_order_sees_each_dataset_once(
    datasets: Stub, caller: Caller
) -> None:
    names = [f"ds-{i:02d}" for i in range(7)]
    for name in names:
        await create(datasets, caller, id=name)
    newest_first = await list_all(datasets, caller, page_size=3)
    assert newest_first == names[::-1]
    oldest_first = await list_all(
        datasets, caller, page_size=2, sort_order=common_pb2.SORT_ORDER_ASCENDING
    )
    assert oldest_first == names
    by_id = await list_all(datasets, caller, page_size=3, sort_by=api.DATASET_SORT_FIELD_ID)
    assert by_id == sorted(names)
    by_id_desc = await list_all(
        datasets,
        caller,
        page_size=4,
        sort_by=api.DATASET_SORT_FIELD_ID,
        sort_order=common_pb2.SORT_ORDER_DESCENDING,
    )
    assert by_id_desc == sorted(names, reverse=True)
    await update(datasets, caller, common_pb2.PATCH_ACTION_MERGE, id="ds-03", description="x")
    by_modified = await list_all(
        datasets, caller, page_size=3, sort_by=api.DATASET_SORT_FIELD_MODIFIED_AT
    )
    assert by_modified[0] == "ds-03" and sorted(by_modified) == sorted(names)


async def test_pages_stay_correct_while_rows_are_inserted(datasets: Stub, caller: Caller) -> None:
    for i in range(6):
        await create(datasets, caller, id=f"old-{i}")
    first = await datasets.ListDatasets(
        api.ListDatasetsRequest(
            app_id=caller.app_id, page_size=2, sort_order=common_pb2.SORT_ORDER_ASCENDING
        ),
        metadata=caller.metadata,
    )
    for i in range(3):
        await create(datasets, caller, id=f"new-{i}")
    seen = [d.id for d in first.datasets]
    token = first.next_page_token
    while token:
        page = await datasets.ListDatasets(
            api.ListDatasetsRequest(
                app_id=caller.app_id,
                page_size=2,
                page_token=token,
                sort_order=common_pb2.SORT_ORDER_ASCENDING,
            ),
            metadata=caller.metadata,
        )
        seen += [d.id for d in page.datasets]
        token = page.next_page_token
    assert seen == [f"old-{i}" for i in range(6)] + [f"new-{i}" for i in range(3)]


async def test_search_text_matches_id_description_and_notes(datasets: Stub, caller: Caller) -> None:
    await create(datasets, caller, id="street-scenes", description="Cars")
    await create(datasets, caller, id="x1", description="Street CATS at night")
    await create(datasets, caller, id="x2", notes="collected on the street")
    await create(datasets, caller, id="x3", description="100% birds")
    assert sorted(await list_all(datasets, caller, query="street")) == [
        "street-scenes",
        "x1",
        "x2",
    ]
    assert await list_all(datasets, caller, query="cats AT") == ["x1"]
    # LIKE wildcards in the search text are literal characters.
    assert await list_all(datasets, caller, query="0%") == ["x3"]
    assert await list_all(datasets, caller, query="_") == []


async def test_list_shows_only_own_app(datasets: Stub, caller: Caller, db: Database) -> None:
    other = await new_caller(db)
    await create(datasets, caller, id="mine")
    await create(datasets, other, id="theirs")
    assert await list_all(datasets, caller) == ["mine"]
    assert await list_all(datasets, other) == ["theirs"]


async def test_bad_page_size_and_tokens(datasets: Stub, caller: Caller, db: Database) -> None:
    for i in range(3):
        await create(datasets, caller, id=f"p{i}")

    async def page(**params: Any) -> api.ListDatasetsResponse:
        request = api.ListDatasetsRequest(app_id=caller.app_id, **params)
        response: api.ListDatasetsResponse = await datasets.ListDatasets(
            request, metadata=caller.metadata
        )
        return response

    error = await call_error(page(page_size=-1))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in error.fields
    assert len((await page(page_size=100_000)).datasets) == 3
    token = (await page(page_size=1)).next_page_token
    assert token
    tampered = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    foreign_caller = await new_caller(db)
    cases: dict[str, Awaitable[Any]] = {
        "malformed": page(page_size=1, page_token="not a token!"),
        "tampered": page(page_size=1, page_token=tampered),
        "other query": page(page_size=1, page_token=token, query="p"),
        "other sort": page(page_size=1, page_token=token, sort_by=api.DATASET_SORT_FIELD_ID),
        "other app": datasets.ListDatasets(
            api.ListDatasetsRequest(app_id=foreign_caller.app_id, page_size=1, page_token=token),
            metadata=foreign_caller.metadata,
        ),
    }
    for case, call in cases.items():
        error = await call_error(call)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, case
        assert error.reason == "INVALID_PAGE_TOKEN", case
        assert "page_token" in error.fields, case
    # The page size may change between pages.
    assert len((await page(page_size=2, page_token=token)).datasets) == 2


# --- update ---------------------------------------------------------------------------------


async def test_merge_deep_merges_metadata(datasets: Stub, caller: Caller) -> None:
    await create(
        datasets,
        caller,
        id="m",
        description="before",
        metadata=struct(
            {
                "a": {"x": 1, "y": 2},
                "tags": ["one"],
                "people": [{"id": "p1", "name": "Ann"}, {"id": "p2", "name": "Bob"}],
                "keep": True,
            }
        ),
    )
    merged = await update(
        datasets,
        caller,
        common_pb2.PATCH_ACTION_MERGE,
        id="m",
        description="after",
        metadata=struct(
            {
                "a": {"y": 3, "z": 4},
                "tags": ["two"],
                "people": [{"id": "p2", "age": 40}, {"id": "p3", "name": "Cy"}],
                "new": "v",
            }
        ),
    )
    assert merged.description == "after"
    assert as_dict(merged.metadata) == {
        "a": {"x": 1, "y": 3, "z": 4},
        "tags": ["one", "two"],
        "people": [
            {"id": "p1", "name": "Ann"},
            {"id": "p2", "name": "Bob", "age": 40},
            {"id": "p3", "name": "Cy"},
        ],
        "keep": True,
        "new": "v",
    }
    assert as_dict((await get(datasets, caller, "m")).metadata) == as_dict(merged.metadata)


async def test_overwrite_replaces_and_update_mask_clears(datasets: Stub, caller: Caller) -> None:
    await create(
        datasets, caller, id="o", description="d", notes="n", metadata=struct({"a": 1, "b": 2})
    )
    replaced = await update(
        datasets, caller, common_pb2.PATCH_ACTION_OVERWRITE, id="o", metadata=struct({"c": 3})
    )
    assert as_dict(replaced.metadata) == {"c": 3}
    assert replaced.description == "d"  # not given, not touched
    cleared = await update(
        datasets,
        caller,
        common_pb2.PATCH_ACTION_OVERWRITE,
        paths=["description", "visibility"],
        id="o",
    )
    assert cleared.description == ""
    assert cleared.notes == "n"
    assert cleared.visibility.gettable == dataset_pb2.Visibility.GETTABLE_PRIVATE


async def test_remove_deletes_keys_list_items_and_cover(datasets: Stub, caller: Caller) -> None:
    await create(
        datasets,
        caller,
        id="r",
        notes="gone soon",
        image=data_pb2.Image(base64=png_bytes()),
        metadata=struct(
            {
                "a": {"x": 1, "y": 2},
                "drop": "me",
                "people": [{"id": "p1"}, {"id": "p2"}, {"id": "p3"}],
            }
        ),
    )
    removed = await update(
        datasets,
        caller,
        common_pb2.PATCH_ACTION_REMOVE,
        id="r",
        notes="x",
        image=data_pb2.Image(),
        metadata=struct({"a": {"x": True}, "drop": True, "people": [{"id": "p1"}, {"id": "p3"}]}),
    )
    assert as_dict(removed.metadata) == {"a": {"y": 2}, "people": [{"id": "p2"}]}
    assert removed.notes == ""
    assert not removed.HasField("image")
    assert not (await get(datasets, caller, "r")).HasField("image")
    error = await call_error(
        update(datasets, caller, common_pb2.PATCH_ACTION_REMOVE, id="r", metadata=struct({"a": 5}))
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "dataset.metadata.a" in error.fields


async def test_update_errors(datasets: Stub, caller: Caller) -> None:
    created = await create(datasets, caller, id="u", description="v1")
    error = await call_error(
        update(datasets, caller, common_pb2.PATCH_ACTION_UNSPECIFIED, id="u", description="x")
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "action" in error.fields
    error = await call_error(update(datasets, caller, common_pb2.PATCH_ACTION_MERGE, id="u"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "dataset" in error.fields
    error = await call_error(
        update(datasets, caller, common_pb2.PATCH_ACTION_MERGE, paths=["id"], id="u")
    )
    assert "update_mask.paths[0]" in error.fields
    error = await call_error(
        update(datasets, caller, common_pb2.PATCH_ACTION_MERGE, id="missing", description="x")
    )
    assert error.code == grpc.StatusCode.NOT_FOUND
    # Merging must not push metadata past its limits either.
    await update(
        datasets,
        caller,
        common_pb2.PATCH_ACTION_MERGE,
        id="u",
        metadata=struct({"a": "x" * 40_000}),
    )
    error = await call_error(
        update(
            datasets,
            caller,
            common_pb2.PATCH_ACTION_MERGE,
            id="u",
            metadata=struct({"b": "y" * 40_000}),
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await get(datasets, caller, "u")).etag != created.etag


async def test_etag_makes_updates_conditional(datasets: Stub, caller: Caller) -> None:
    created = await create(datasets, caller, id="e", description="v1")
    updated = await update(
        datasets, caller, common_pb2.PATCH_ACTION_MERGE, etag=created.etag, id="e", description="v2"
    )
    assert updated.etag != created.etag
    error = await call_error(
        update(
            datasets,
            caller,
            common_pb2.PATCH_ACTION_MERGE,
            etag=created.etag,
            id="e",
            description="v3",
        )
    )
    assert error.code == grpc.StatusCode.ABORTED
    assert error.reason == "ETAG_MISMATCH"
    assert (await get(datasets, caller, "e")).description == "v2"


# --- delete and undelete --------------------------------------------------------------------


async def test_delete_hides_and_undelete_restores(datasets: Stub, caller: Caller) -> None:
    await create(datasets, caller, id="d", description="keep me")
    deleted = await datasets.DeleteDataset(
        api.DeleteDatasetRequest(app_id=caller.app_id, dataset_id="d"), metadata=caller.metadata
    )
    assert not deleted.purged
    assert deleted.purge_time.seconds > 0
    assert (await call_error(get(datasets, caller, "d"))).code == grpc.StatusCode.NOT_FOUND
    assert await list_all(datasets, caller) == []
    error = await call_error(create(datasets, caller, id="d"))
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.reason == "DATASET_DELETED_EXISTS"
    error = await call_error(
        datasets.DeleteDataset(
            api.DeleteDatasetRequest(app_id=caller.app_id, dataset_id="d"),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.NOT_FOUND
    restored = await datasets.UndeleteDataset(
        api.UndeleteDatasetRequest(app_id=caller.app_id, dataset_id="d"), metadata=caller.metadata
    )
    assert restored.dataset.description == "keep me"
    assert (await get(datasets, caller, "d")).description == "keep me"
    error = await call_error(
        datasets.UndeleteDataset(
            api.UndeleteDatasetRequest(app_id=caller.app_id, dataset_id="d"),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "DATASET_NOT_DELETED"


async def test_force_delete_purges_at_once(datasets: Stub, caller: Caller) -> None:
    await create(datasets, caller, id="f", description="old")
    response = await datasets.DeleteDataset(
        api.DeleteDatasetRequest(app_id=caller.app_id, dataset_id="f", force=True),
        metadata=caller.metadata,
    )
    assert response.purged and not response.HasField("purge_time")
    error = await call_error(
        datasets.UndeleteDataset(
            api.UndeleteDatasetRequest(app_id=caller.app_id, dataset_id="f"),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert (await create(datasets, caller, id="f", description="new")).description == "new"


# --- authentication and authorization -------------------------------------------------------


async def test_missing_malformed_and_wrong_keys(datasets: Stub, caller: Caller) -> None:
    request = api.ListDatasetsRequest(app_id=caller.app_id)
    cases = {
        "MISSING_API_KEY": (),
        "MALFORMED_API_KEY": (("authorization", caller.key),),
        "INVALID_API_KEY": (("authorization", "Key dsd_not-a-real-key-0000000000"),),
    }
    for reason, metadata in cases.items():
        error = await call_error(datasets.ListDatasets(request, metadata=metadata))
        assert error.code == grpc.StatusCode.UNAUTHENTICATED, reason
        assert error.reason == reason
    bearer = (("authorization", f"Bearer {caller.key}"),)
    await datasets.ListDatasets(request, metadata=bearer)


async def test_key_of_another_app_is_permission_denied(
    datasets: Stub, caller: Caller, db: Database
) -> None:
    other = await new_caller(db)
    await create(datasets, other, id="private")
    error = await call_error(
        datasets.GetDataset(
            api.GetDatasetRequest(app_id=other.app_id, dataset_id="private"),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.reason == "WRONG_APP"
    error = await call_error(
        datasets.CreateDataset(
            api.CreateDatasetRequest(app_id=other.app_id, dataset=dataset_pb2.Dataset(id="x")),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.PERMISSION_DENIED


async def test_read_only_key_cannot_write(datasets: Stub, db: Database) -> None:
    reader = await new_caller(db, scopes=("read",))
    await datasets.ListDatasets(
        api.ListDatasetsRequest(app_id=reader.app_id), metadata=reader.metadata
    )
    error = await call_error(create(datasets, reader, id="nope"))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.reason == "MISSING_SCOPE"


async def test_errors_carry_the_request_id(datasets: Stub, caller: Caller) -> None:
    call = datasets.GetDataset(
        api.GetDatasetRequest(app_id=caller.app_id, dataset_id="none"),
        metadata=(*caller.metadata, ("x-request-id", "trace-123")),
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert ("x-request-id", "trace-123") in list(raised.value.trailing_metadata() or ())
    assert (await call_error(get(datasets, caller, "none"))).request_id


# --- idempotency ----------------------------------------------------------------------------


async def test_retry_with_request_id_returns_first_response(datasets: Stub, caller: Caller) -> None:
    request = api.CreateDatasetRequest(
        app_id=caller.app_id, dataset=dataset_pb2.Dataset(description="once"), request_id="req-1"
    )
    first = await datasets.CreateDataset(request, metadata=caller.metadata)
    again = await datasets.CreateDataset(request, metadata=caller.metadata)
    assert again == first
    assert await list_all(datasets, caller) == [first.dataset.id]
    changed = api.CreateDatasetRequest(
        app_id=caller.app_id, dataset=dataset_pb2.Dataset(description="twice"), request_id="req-1"
    )
    error = await call_error(datasets.CreateDataset(changed, metadata=caller.metadata))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "REQUEST_ID_REUSED"
    assert "request_id" in error.fields
    error = await call_error(
        datasets.CreateDataset(
            api.CreateDatasetRequest(app_id=caller.app_id, request_id="bad id"),
            metadata=caller.metadata,
        )
    )
    assert "request_id" in error.fields


async def test_concurrent_retries_create_once(datasets: Stub, caller: Caller) -> None:
    request = api.CreateDatasetRequest(
        app_id=caller.app_id, dataset=dataset_pb2.Dataset(description="race"), request_id="r-9"
    )
    responses = await asyncio.gather(
        *(datasets.CreateDataset(request, metadata=caller.metadata) for _ in range(6))
    )
    assert len({r.dataset.id for r in responses}) == 1
    assert len(await list_all(datasets, caller)) == 1


async def test_retried_delete_replays_instead_of_not_found(datasets: Stub, caller: Caller) -> None:
    await create(datasets, caller, id="gone")
    request = api.DeleteDatasetRequest(app_id=caller.app_id, dataset_id="gone", request_id="del-1")
    first = await datasets.DeleteDataset(request, metadata=caller.metadata)
    again = await datasets.DeleteDataset(request, metadata=caller.metadata)
    assert again == first


async def test_failed_call_does_not_consume_the_request_id(datasets: Stub, caller: Caller) -> None:
    request = api.UndeleteDatasetRequest(
        app_id=caller.app_id, dataset_id="later", request_id="undo-1"
    )
    error = await call_error(datasets.UndeleteDataset(request, metadata=caller.metadata))
    assert error.code == grpc.StatusCode.NOT_FOUND
    await create(datasets, caller, id="later")
    await datasets.DeleteDataset(
        api.DeleteDatasetRequest(app_id=caller.app_id, dataset_id="later"), metadata=caller.metadata
    )
    restored = await datasets.UndeleteDataset(request, metadata=caller.metadata)
    assert restored.dataset.id == "later"
