"""InputService and dataset membership as a caller sees them."""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING, Any

import grpc
from datasetd.v1 import common_pb2, data_pb2, dataset_pb2, errors_pb2, input_pb2
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import input_service_pb2 as api
from google.protobuf import json_format, struct_pb2

from service.storage.db import Database
from tests.conftest import Caller, new_caller
from tests.helpers import call_error, download, png_bytes

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

CREATED = errors_pb2.ITEM_OUTCOME_CREATED
INVALID = errors_pb2.ITEM_OUTCOME_INVALID
DUPLICATE = errors_pb2.ITEM_OUTCOME_DUPLICATE_ID


def image_input(
    input_id: str = "", color: tuple[int, int, int] = (10, 20, 30), **data: Any
) -> input_pb2.Input:
    return input_pb2.Input(
        id=input_id,
        data=data_pb2.Data(image=data_pb2.Image(base64=png_bytes(16, 12, color)), **data),
    )


def text_input(input_id: str, raw: str) -> input_pb2.Input:
    return input_pb2.Input(id=input_id, data=data_pb2.Data(text=data_pb2.Text(raw=raw)))


def metadata(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


async def create(
    stub: Inputs, caller: Caller, items: list[input_pb2.Input], **options: Any
) -> api.CreateInputsResponse:
    response: api.CreateInputsResponse = await stub.CreateInputs(
        api.CreateInputsRequest(app_id=caller.app_id, inputs=items, **options),
        metadata=caller.metadata,
    )
    return response


async def new_dataset(stub: Datasets, caller: Caller, dataset_id: str) -> None:
    await stub.CreateDataset(
        dapi.CreateDatasetRequest(app_id=caller.app_id, dataset=dataset_pb2.Dataset(id=dataset_id)),
        metadata=caller.metadata,
    )


async def list_ids(stub: Inputs, caller: Caller, **params: Any) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        page = await stub.ListInputs(
            api.ListInputsRequest(app_id=caller.app_id, page_token=token, **params),
            metadata=caller.metadata,
        )
        ids += [i.id for i in page.inputs]
        token = page.next_page_token
        if not token:
            return ids


async def test_batch_create_stores_media_and_reports_each_input(
    inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "animals")
    cat = image_input(
        "cat-1",
        concepts=[data_pb2.Concept(id="cat", value=1.0)],
        metadata=metadata({"source": "camera"}),
        geo=data_pb2.Geo(geo_point=data_pb2.GeoPoint(longitude=13.4, latitude=52.5)),
    )
    cat.dataset_ids.append("animals")
    cat.title = "cat.png"
    response = await create(
        inputs,
        caller,
        [cat, text_input("note", "héllo wörld"), input_pb2.Input(id="empty")],
    )
    outcomes = [r.outcome for r in response.results]
    assert outcomes == [CREATED, CREATED, INVALID]
    assert response.created_count == 2 and response.failed_count == 1
    assert response.results[2].errors[0].field == "inputs[2].data"
    stored = response.results[0].input
    assert stored.data.image.base64 == b""
    assert stored.data.image.image_info.width == 16
    assert stored.data.image.image_info.format == "PNG"
    assert list(stored.data.image.hosted.sizes) == ["orig"]
    assert stored.title == "cat.png"
    assert list(stored.dataset_ids) == ["animals"]
    assert [c.id for c in stored.data.concepts] == ["cat"]
    assert await asyncio.to_thread(download, stored.data.image.url) == png_bytes(
        16, 12, (10, 20, 30)
    )
    note = response.results[1].input
    assert note.data.text.text_info.char_count == len("héllo wörld")
    got = await inputs.GetInput(
        api.GetInputRequest(app_id=caller.app_id, input_id="cat-1"), metadata=caller.metadata
    )
    assert got.input.data.metadata["source"] == "camera"
    assert abs(got.input.data.geo.geo_point.latitude - 52.5) < 1e-4
    dataset = await datasets.GetDataset(
        dapi.GetDatasetRequest(app_id=caller.app_id, dataset_id="animals"),
        metadata=caller.metadata,
    )
    stats = dataset.dataset.statistics
    assert (stats.inputs_count, stats.annotated_inputs_count, stats.annotations_count) == (1, 1, 1)
    assert dict(stats.concept_counts) == {"cat": 1}


async def test_identical_bytes_are_stored_once(
    inputs: Inputs, caller: Caller, db: Database
) -> None:
    response = await create(
        inputs, caller, [image_input("a", (1, 2, 3)), image_input("b", (1, 2, 3))]
    )
    first, second = (r.input.data.image.hosted.suffix for r in response.results)
    assert first == second
    digest = hashlib.sha256(png_bytes(16, 12, (1, 2, 3))).hexdigest()
    assert first.endswith(digest)
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM blobs WHERE sha256 = $1", digest) == 1


async def test_duplicate_ids_are_reported_per_input(inputs: Inputs, caller: Caller) -> None:
    await create(inputs, caller, [image_input("taken")])
    response = await create(
        inputs, caller, [image_input("taken"), image_input("fresh"), image_input("fresh")]
    )
    assert [r.outcome for r in response.results] == [DUPLICATE, CREATED, DUPLICATE]
    assert "repeats" in response.results[2].errors[0].description


async def test_atomic_batch_is_all_or_nothing(inputs: Inputs, caller: Caller) -> None:
    error = await call_error(
        create(inputs, caller, [image_input("ok-1"), input_pb2.Input(id="bad")], atomic=True)
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1].data" in error.fields
    assert await list_ids(inputs, caller) == []
    await create(inputs, caller, [image_input("dup")])
    error = await call_error(
        create(inputs, caller, [image_input("new"), image_input("dup")], atomic=True)
    )
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert await list_ids(inputs, caller) == ["dup"]


async def test_bad_inputs_name_the_input_and_field(inputs: Inputs, caller: Caller) -> None:
    two_media = input_pb2.Input(
        id="two",
        data=data_pb2.Data(image=data_pb2.Image(base64=png_bytes()), text=data_pb2.Text(raw="x")),
    )
    corrupt = input_pb2.Input(
        id="corrupt", data=data_pb2.Data(image=data_pb2.Image(base64=b"\x89PNG\r\n\x1a\nxx"))
    )
    truncated = input_pb2.Input(
        id="truncated", data=data_pb2.Data(image=data_pb2.Image(base64=png_bytes()[:-20]))
    )
    bad_url = input_pb2.Input(
        id="url", data=data_pb2.Data(image=data_pb2.Image(url="ftp://x/y.png"))
    )
    unknown_dataset = image_input("orphan")
    unknown_dataset.dataset_ids.append("no-such-dataset")
    deep: dict[str, Any] = {"x": 1}
    for _ in range(9):
        deep = {"d": deep}
    too_deep = image_input("deep", metadata=metadata(deep))
    bad_id = image_input("bad id!")
    response = await create(
        inputs, caller, [two_media, corrupt, truncated, bad_url, unknown_dataset, too_deep, bad_id]
    )
    fields = [[e.field for e in r.errors] for r in response.results]
    assert all(r.outcome == INVALID for r in response.results)
    assert fields == [
        ["inputs[0].data"],
        ["inputs[1].data.image.base64"],
        ["inputs[2].data.image.base64"],
        ["inputs[3].data.image.url"],
        ["inputs[4].dataset_ids[0]"],
        ["inputs[5].data.metadata"],
        ["inputs[6].id"],
    ]
    assert await list_ids(inputs, caller) == []


async def test_batch_limits(inputs: Inputs, caller: Caller) -> None:
    error = await call_error(create(inputs, caller, [text_input(f"t{i}", "x") for i in range(129)]))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "128" in error.fields["inputs"]
    big = [
        input_pb2.Input(
            id=f"v{i}", data=data_pb2.Data(video=data_pb2.Video(base64=b"\0" * (33 * 1024 * 1024)))
        )
        for i in range(4)
    ]
    error = await call_error(create(inputs, caller, big))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "MB" in error.fields["inputs"]
    error = await call_error(create(inputs, caller, []))
    assert "inputs" in error.fields


async def test_list_filters_and_pages(inputs: Inputs, datasets: Datasets, caller: Caller) -> None:
    await new_dataset(datasets, caller, "ds")
    items = []
    for i in range(5):
        item = image_input(
            f"img-{i}",
            (i, i, i),
            metadata=metadata({"split": "train" if i % 2 else "test"}),
            concepts=[data_pb2.Concept(id="dog" if i < 2 else "cat", value=1.0)],
        )
        if i < 3:
            item.dataset_ids.append("ds")
        items.append(item)
    items.append(text_input("txt", "plain"))
    await create(inputs, caller, items)
    assert await list_ids(inputs, caller, page_size=2) == [f"img-{i}" for i in range(5)] + ["txt"]
    assert await list_ids(inputs, caller, dataset_id="ds") == ["img-0", "img-1", "img-2"]
    assert await list_ids(inputs, caller, ids=["img-3", "txt", "nope"]) == ["img-3", "txt"]

    def only(**filter_fields: Any) -> common_pb2.InputFilter:
        return common_pb2.InputFilter(**filter_fields)

    assert await list_ids(
        inputs, caller, filter=only(media_types=[common_pb2.MEDIA_TYPE_TEXT])
    ) == ["txt"]
    assert await list_ids(inputs, caller, filter=only(concept_ids=["dog"])) == ["img-0", "img-1"]
    assert await list_ids(
        inputs,
        caller,
        filter=only(negative_concept_ids=["dog"], media_types=[common_pb2.MEDIA_TYPE_IMAGE]),
    ) == ["img-2", "img-3", "img-4"]
    assert await list_ids(
        inputs, caller, filter=only(annotation_state=common_pb2.ANNOTATION_STATE_UNANNOTATED)
    ) == ["txt"]
    assert await list_ids(inputs, caller, filter=only(metadata=metadata({"split": "train"}))) == [
        "img-1",
        "img-3",
    ]


async def test_update_patches_metadata_concepts_title_never_media(
    inputs: Inputs, caller: Caller
) -> None:
    await create(
        inputs,
        caller,
        [
            image_input(
                "p",
                metadata=metadata({"a": {"x": 1}}),
                concepts=[data_pb2.Concept(id="cat", value=1)],
            )
        ],
    )
    patch = input_pb2.Input(
        id="p",
        title="renamed.png",
        data=data_pb2.Data(
            metadata=metadata({"a": {"y": 2}}),
            concepts=[data_pb2.Concept(id="dog", value=1)],
        ),
    )
    # Media never change by a patch: sending some is refused by name, not ignored.
    with_media = input_pb2.Input(
        id="p", data=data_pb2.Data(image=data_pb2.Image(base64=png_bytes(5, 5)))
    )
    refused = await call_error(
        inputs.UpdateInputs(
            api.UpdateInputsRequest(
                app_id=caller.app_id, inputs=[with_media], action=common_pb2.PATCH_ACTION_MERGE
            ),
            metadata=caller.metadata,
        )
    )
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[0].data.image" in refused.fields
    response = await inputs.UpdateInputs(
        api.UpdateInputsRequest(
            app_id=caller.app_id, inputs=[patch], action=common_pb2.PATCH_ACTION_MERGE
        ),
        metadata=caller.metadata,
    )
    updated = response.inputs[0]
    assert updated.title == "renamed.png"
    assert json_format.MessageToDict(updated.data.metadata) == {"a": {"x": 1, "y": 2}}
    assert [c.id for c in updated.data.concepts] == ["cat", "dog"]
    assert updated.data.image.image_info.width == 16  # media never change
    removed = await inputs.UpdateInputs(
        api.UpdateInputsRequest(
            app_id=caller.app_id,
            inputs=[
                input_pb2.Input(id="p", data=data_pb2.Data(concepts=[data_pb2.Concept(id="cat")]))
            ],
            action=common_pb2.PATCH_ACTION_REMOVE,
        ),
        metadata=caller.metadata,
    )
    assert [c.id for c in removed.inputs[0].data.concepts] == ["dog"]
    error = await call_error(
        inputs.UpdateInputs(
            api.UpdateInputsRequest(
                app_id=caller.app_id,
                inputs=[input_pb2.Input(id="p", title="x"), input_pb2.Input(id="ghost", title="y")],
                action=common_pb2.PATCH_ACTION_MERGE,
            ),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert "inputs[1].id" in error.fields


async def test_delete_inputs_reports_unknown_ids(inputs: Inputs, caller: Caller) -> None:
    await create(inputs, caller, [image_input("d1"), image_input("d2", (9, 9, 9))])
    response = await inputs.DeleteInputs(
        api.DeleteInputsRequest(app_id=caller.app_id, ids=["d1", "ghost"]), metadata=caller.metadata
    )
    assert response.deleted_count == 1 and list(response.unknown_ids) == ["ghost"]
    assert await list_ids(inputs, caller) == ["d2"]
    error = await call_error(
        inputs.GetInput(
            api.GetInputRequest(app_id=caller.app_id, input_id="d1"), metadata=caller.metadata
        )
    )
    assert error.code == grpc.StatusCode.NOT_FOUND


async def test_membership_add_list_get_remove(
    inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "m")
    await create(inputs, caller, [image_input(f"i{i}", (i, 0, 0)) for i in range(4)])
    added = await datasets.AddDatasetInputs(
        dapi.AddDatasetInputsRequest(
            app_id=caller.app_id, dataset_id="m", input_ids=["i0", "i1", "i2", "zz"]
        ),
        metadata=caller.metadata,
    )
    assert (added.added_count, added.already_present_count, list(added.unknown_input_ids)) == (
        3,
        0,
        ["zz"],
    )
    again = await datasets.AddDatasetInputs(
        dapi.AddDatasetInputsRequest(app_id=caller.app_id, dataset_id="m", input_ids=["i2", "i3"]),
        metadata=caller.metadata,
    )
    assert (again.added_count, again.already_present_count) == (1, 1)
    page = await datasets.ListDatasetInputs(
        dapi.ListDatasetInputsRequest(app_id=caller.app_id, dataset_id="m", page_size=3),
        metadata=caller.metadata,
    )
    assert [d.input.id for d in page.dataset_inputs] == ["i0", "i1", "i2"]
    assert page.dataset_inputs[0].created_at.seconds > 0
    rest = await datasets.ListDatasetInputs(
        dapi.ListDatasetInputsRequest(
            app_id=caller.app_id, dataset_id="m", page_size=3, page_token=page.next_page_token
        ),
        metadata=caller.metadata,
    )
    assert [d.input.id for d in rest.dataset_inputs] == ["i3"] and not rest.next_page_token
    member = await datasets.GetDatasetInput(
        dapi.GetDatasetInputRequest(app_id=caller.app_id, dataset_id="m", input_id="i1"),
        metadata=caller.metadata,
    )
    assert member.dataset_input.input.id == "i1"
    removed = await datasets.RemoveDatasetInputs(
        dapi.RemoveDatasetInputsRequest(
            app_id=caller.app_id, dataset_id="m", input_ids=["i1", "i3"]
        ),
        metadata=caller.metadata,
    )
    assert removed.removed_count == 2
    assert await list_ids(inputs, caller) == ["i0", "i1", "i2", "i3"]  # inputs stay in the app
    error = await call_error(
        datasets.GetDatasetInput(
            dapi.GetDatasetInputRequest(app_id=caller.app_id, dataset_id="m", input_id="i1"),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.NOT_FOUND
    error = await call_error(
        datasets.AddDatasetInputs(
            dapi.AddDatasetInputsRequest(app_id=caller.app_id, dataset_id="nope", input_ids=["i0"]),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.NOT_FOUND


async def test_delete_by_filter_with_dry_run(
    inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "f")
    items = [image_input(f"u{i}", (i, 1, 1)) for i in range(3)]
    items.append(image_input("labelled", concepts=[data_pb2.Concept(id="cat", value=1)]))
    items.append(image_input("outside", (7, 7, 7)))
    for item in items[:4]:
        item.dataset_ids.append("f")
    await create(inputs, caller, items)
    unannotated = common_pb2.InputFilter(annotation_state=common_pb2.ANNOTATION_STATE_UNANNOTATED)
    dry = await datasets.DeleteDatasetInputsByFilter(
        dapi.DeleteDatasetInputsByFilterRequest(
            app_id=caller.app_id, dataset_id="f", filter=unannotated, dry_run=True
        ),
        metadata=caller.metadata,
    )
    assert (dry.matched_count, dry.deleted_count) == (3, 0)
    assert len(await list_ids(inputs, caller)) == 5
    done = await datasets.DeleteDatasetInputsByFilter(
        dapi.DeleteDatasetInputsByFilterRequest(
            app_id=caller.app_id, dataset_id="f", filter=unannotated
        ),
        metadata=caller.metadata,
    )
    assert (done.matched_count, done.deleted_count) == (3, 3)
    assert await list_ids(inputs, caller) == ["labelled", "outside"]


async def test_merge_adds_source_inputs_once(
    inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    for name in ("src", "dst"):
        await new_dataset(datasets, caller, name)
    items = [
        image_input(f"s{i}", (i, 2, 2), concepts=[data_pb2.Concept(id="cat", value=1)])
        for i in range(3)
    ]
    for item in items:
        item.dataset_ids.append("src")
    items[0].dataset_ids.append("dst")
    await create(inputs, caller, items)
    request = dapi.MergeDatasetRequest(
        app_id=caller.app_id, source_dataset_id="src", destination_dataset_id="dst"
    )
    first = await datasets.MergeDataset(request, metadata=caller.metadata)
    assert (first.added_count, first.already_present_count) == (2, 1)
    second = await datasets.MergeDataset(request, metadata=caller.metadata)
    assert (second.added_count, second.already_present_count) == (0, 3)
    for name in ("src", "dst"):
        got = await datasets.GetDataset(
            dapi.GetDatasetRequest(app_id=caller.app_id, dataset_id=name), metadata=caller.metadata
        )
        assert got.dataset.statistics.inputs_count == 3
        assert dict(got.dataset.statistics.concept_counts) == {"cat": 3}


async def test_download_url_and_other_app(inputs: Inputs, caller: Caller, db: Database) -> None:
    await create(inputs, caller, [image_input("dl", (5, 6, 7))])
    response = await inputs.GetInputDownloadUrl(
        api.GetInputDownloadUrlRequest(app_id=caller.app_id, input_id="dl"),
        metadata=caller.metadata,
    )
    assert await asyncio.to_thread(download, response.url) == png_bytes(16, 12, (5, 6, 7))
    assert response.expire_time.seconds > 0
    other = await new_caller(db)
    error = await call_error(
        inputs.GetInput(
            api.GetInputRequest(app_id=caller.app_id, input_id="dl"), metadata=other.metadata
        )
    )
    assert error.code == grpc.StatusCode.PERMISSION_DENIED


async def test_retried_batch_creates_nothing_twice(inputs: Inputs, caller: Caller) -> None:
    batch = [image_input("", (i, 3, 3)) for i in range(3)]
    first = await create(inputs, caller, batch, request_id="batch-1")
    again = await create(inputs, caller, batch, request_id="batch-1")
    assert first == again
    assert len(await list_ids(inputs, caller)) == 3


async def test_huge_image_by_header_and_other_media_kinds(inputs: Inputs, caller: Caller) -> None:
    from tests.unit.test_media import png_header_only, wav

    huge = input_pb2.Input(
        id="huge", data=data_pb2.Data(image=data_pb2.Image(base64=png_header_only(20000, 20000)))
    )
    audio = input_pb2.Input(id="sound", data=data_pb2.Data(audio=data_pb2.Audio(base64=wav(0.5))))
    response = await create(inputs, caller, [huge, audio])
    assert response.results[0].outcome == INVALID
    assert response.results[0].errors[0].field == "inputs[0].data.image.base64"
    assert "85,000,000" in response.results[0].errors[0].description
    assert response.results[1].outcome == CREATED
    info = response.results[1].input.data.audio.audio_info
    assert info.audio_format == "WAV" and info.sample_rate == 16000


async def test_invalid_utf8_text_is_invalid_argument(
    channel: grpc.aio.Channel, caller: Caller
) -> None:
    """Python stubs cannot even send invalid UTF-8 in a string; other clients can."""
    valid = api.CreateInputsRequest(
        app_id=caller.app_id, inputs=[text_input("t", "ABCD")]
    ).SerializeToString()
    broken = valid.replace(b"ABCD", b"\xff\xfe\xfd\xfc")
    call = channel.unary_unary(
        "/datasetd.v1.InputService/CreateInputs",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )
    error = await call_error(call(broken, metadata=caller.metadata))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "MALFORMED_REQUEST"
