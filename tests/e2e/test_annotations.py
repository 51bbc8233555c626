"""AnnotationService as a caller sees it: real server, real channel, generated stubs."""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING, Any

import grpc
from datasetd.v1 import annotation_pb2, common_pb2, data_pb2, errors_pb2, input_pb2, status_pb2
from datasetd.v1 import annotation_service_pb2 as api
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import input_service_pb2 as iapi
from google.protobuf import field_mask_pb2

from service.domain.annotation_rules import MAX_ANNOTATIONS_PER_INPUT
from service.storage.db import Database
from tests.conftest import Caller, new_caller
from tests.e2e.test_inputs import create, image_input, metadata, new_dataset, text_input
from tests.helpers import call_error, png_bytes
from tests.unit.test_media import mp4

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

CREATED = errors_pb2.ITEM_OUTCOME_CREATED
INVALID = errors_pb2.ITEM_OUTCOME_INVALID
DUPLICATE = errors_pb2.ITEM_OUTCOME_DUPLICATE_ID
MERGE = common_pb2.PATCH_ACTION_MERGE
OVERWRITE = common_pb2.PATCH_ACTION_OVERWRITE
REMOVE = common_pb2.PATCH_ACTION_REMOVE
TEXT = "The quick brown fox"
BOX = "data.regions[0].region_info.bounding_box"


# --- builders -------------------------------------------------------------------------------


def concepts(*ids: str, value: float = 1.0) -> list[data_pb2.Concept]:
    return [data_pb2.Concept(id=i, value=value) for i in ids]


def region(
    region_id: str = "", *labels: str, track_id: str = "", **geometry: Any
) -> data_pb2.Region:
    return data_pb2.Region(
        id=region_id,
        region_info=data_pb2.RegionInfo(**geometry),
        data=data_pb2.Data(concepts=concepts(*labels)),
        track_id=track_id,
    )


def box(
    region_id: str, *labels: str, top: float, left: float, bottom: float, right: float
) -> data_pb2.Region:
    edges = data_pb2.BoundingBox(top_row=top, left_col=left, bottom_row=bottom, right_col=right)
    return region(region_id, *labels, bounding_box=edges)


def points(*coordinates: tuple[float, float]) -> list[data_pb2.Point]:
    return [data_pb2.Point(row=row, col=col) for row, col in coordinates]


def annotation(
    input_id: str, annotation_id: str = "", info: dict[str, Any] | None = None, **data: Any
) -> annotation_pb2.Annotation:
    message = annotation_pb2.Annotation(
        id=annotation_id, input_id=input_id, data=data_pb2.Data(**data)
    )
    if info is not None:
        message.annotation_info.update(info)
    return message


def float32(value: float) -> float:
    result: float = struct.unpack("<f", struct.pack("<f", value))[0]
    return result


# --- calls ----------------------------------------------------------------------------------


async def add(
    stub: Annotations, caller: Caller, items: list[annotation_pb2.Annotation], **options: Any
) -> api.CreateAnnotationsResponse:
    response: api.CreateAnnotationsResponse = await stub.CreateAnnotations(
        api.CreateAnnotationsRequest(app_id=caller.app_id, annotations=items, **options),
        metadata=caller.metadata,
    )
    return response


async def get(stub: Annotations, caller: Caller, annotation_id: str) -> annotation_pb2.Annotation:
    response = await stub.GetAnnotation(
        api.GetAnnotationRequest(app_id=caller.app_id, annotation_id=annotation_id),
        metadata=caller.metadata,
    )
    return response.annotation


async def list_all(
    stub: Annotations, caller: Caller, **params: Any
) -> list[annotation_pb2.Annotation]:
    found: list[annotation_pb2.Annotation] = []
    token = ""
    while True:
        page = await stub.ListAnnotations(
            api.ListAnnotationsRequest(app_id=caller.app_id, page_token=token, **params),
            metadata=caller.metadata,
        )
        found += page.annotations
        token = page.next_page_token
        if not token:
            return found


async def list_ids(stub: Annotations, caller: Caller, **params: Any) -> list[str]:
    return [a.id for a in await list_all(stub, caller, **params)]


async def patch(
    stub: Annotations,
    caller: Caller,
    action: common_pb2.PatchAction.ValueType,
    items: list[annotation_pb2.Annotation],
    **options: Any,
) -> api.UpdateAnnotationsResponse:
    """Patches `items` by id, with the input_id the builders set, as clarifai.api clients
    send it."""
    response: api.UpdateAnnotationsResponse = await stub.UpdateAnnotations(
        api.UpdateAnnotationsRequest(
            app_id=caller.app_id, annotations=items, action=action, **options
        ),
        metadata=caller.metadata,
    )
    return response


async def delete(stub: Annotations, caller: Caller, **params: Any) -> int:
    response = await stub.DeleteAnnotations(
        api.DeleteAnnotationsRequest(app_id=caller.app_id, **params), metadata=caller.metadata
    )
    return response.deleted_count


async def statistics(
    stub: Datasets, caller: Caller, dataset_id: str
) -> tuple[int, int, int, dict[str, int]]:
    """(inputs, annotated inputs, annotations, inputs per positive concept)."""
    response = await stub.GetDataset(
        dapi.GetDatasetRequest(app_id=caller.app_id, dataset_id=dataset_id),
        metadata=caller.metadata,
    )
    stats = response.dataset.statistics
    return (
        stats.inputs_count,
        stats.annotated_inputs_count,
        stats.annotations_count,
        dict(stats.concept_counts),
    )


async def media_inputs(inputs: Inputs, datasets: Datasets, caller: Caller) -> None:
    """An image, a text and a video input, all in dataset "ds"."""
    await new_dataset(datasets, caller, "ds")
    video = input_pb2.Input(id="vid", data=data_pb2.Data(video=data_pb2.Video(base64=mp4())))
    items = [image_input("img"), text_input("txt", TEXT), video]
    for item in items:
        item.dataset_ids.append("ds")
    response = await create(inputs, caller, items)
    assert [r.outcome for r in response.results] == [CREATED] * 3
    assert response.results[2].input.data.video.video_info.frame_count == 50


# --- tests ----------------------------------------------------------------------------------


async def test_every_annotation_type_round_trips(
    annotations: Annotations, inputs: Inputs, datasets: Datasets, caller: Caller, db: Database
) -> None:
    await media_inputs(inputs, datasets, caller)
    mask = png_bytes(16, 12, (255, 255, 255))
    keypoints = [
        data_pb2.Point(row=0.1, col=0.2, visibility=data_pb2.Point.VISIBILITY_VISIBLE),
        data_pb2.Point(row=0.3, col=0.4, z=-1.5, visibility=data_pb2.Point.VISIBILITY_NOT_VISIBLE),
    ]
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
    for frame in frames:
        frame.data.regions[0].track_id = "track-1"
    sent = [
        annotation(
            "img",
            "labels",
            info={"by": "ann"},
            concepts=[*concepts("cat"), *concepts("dog", value=0)],
        ),
        annotation(
            "img", "box", regions=[box("b1", "cat", top=0.1, left=0.2, bottom=0.6, right=0.7)]
        ),
        annotation(
            "img",
            "poly",
            regions=[
                region(
                    "p1",
                    "tail",
                    polygon=data_pb2.Polygon(points=points((0.1, 0.1), (0.9, 0.5), (0.1, 0.9))),
                )
            ],
        ),
        annotation(
            "img",
            "points",
            regions=[
                region("pt", "nose", point=data_pb2.Point(row=0.25, col=0.75)),
                region("kp", "pose", keypoint_locations=keypoints),
            ],
        ),
        annotation(
            "img",
            "mask",
            regions=[region("m1", "fur", mask=data_pb2.Mask(image=data_pb2.Image(base64=mask)))],
        ),
        annotation(
            "txt",
            "span",
            regions=[
                region(
                    "s1", "animal", span=data_pb2.Span(char_start=16, char_end=19, raw_text="fox")
                )
            ],
        ),
        annotation("vid", "track", frames=frames),
    ]
    response = await add(annotations, caller, sent)
    assert [r.outcome for r in response.results] == [CREATED] * len(sent)
    assert (response.created_count, response.failed_count) == (len(sent), 0)
    for result, original in zip(response.results, sent, strict=True):
        stored = result.annotation
        assert result.annotation_id == original.id == stored.id
        assert stored.status.code == status_pb2.STATUS_CODE_ANNOTATION_SUCCESS
        assert stored.created_at.seconds > 0 and stored.modified_at == stored.created_at
        assert not stored.input_level

    for original in sent:
        got = await get(annotations, caller, original.id)
        assert got.input_id == original.input_id
        # Message equality compares the float32 values the caller sent, bytes and uint64s.
        assert got.data == original.data
        assert got.annotation_info == original.annotation_info
    got_box = (await get(annotations, caller, "box")).data.regions[0].region_info.bounding_box
    assert (got_box.top_row, got_box.right_col) == (float32(0.1), float32(0.7))
    got_mask = (await get(annotations, caller, "mask")).data.regions[0].region_info.mask
    assert got_mask.image.base64 == mask
    got_track = await get(annotations, caller, "track")
    assert [f.data.regions[0].track_id for f in got_track.data.frames] == ["track-1"] * 3
    assert got_track.data.frames[2].frame_info.time == 49 * 40

    listed = await list_all(annotations, caller, input_ids=["img", "txt"])
    assert [a.id for a in listed] == ["labels", "box", "poly", "points", "mask", "span"]
    assert [a.data for a in listed] == [a.data for a in sent[:6]]
    assert await list_ids(annotations, caller, dataset_id="ds", page_size=3) == [a.id for a in sent]
    first = await annotations.ListAnnotations(
        api.ListAnnotationsRequest(app_id=caller.app_id, dataset_id="ds", page_size=4),
        metadata=caller.metadata,
    )
    assert [a.id for a in first.annotations] == ["labels", "box", "poly", "points"]
    rest = await annotations.ListAnnotations(
        api.ListAnnotationsRequest(
            app_id=caller.app_id, dataset_id="ds", page_size=4, page_token=first.next_page_token
        ),
        metadata=caller.metadata,
    )
    assert [a.id for a in rest.annotations] == ["mask", "span", "track"]
    assert not rest.next_page_token

    assert await statistics(datasets, caller, "ds") == (
        3,
        3,
        7,
        {"cat": 1, "tail": 1, "nose": 1, "pose": 1, "fur": 1, "animal": 1, "fox": 1},
    )
    async with db.connection() as conn:
        row = await conn.fetchrow(
            "SELECT region_counts, frame_count, positive_concepts FROM annotations"
            " WHERE app_id = $1 AND id = 'track'",
            caller.app_id,
        )
    assert row is not None
    assert (row["region_counts"]["bounding_box"], row["frame_count"]) == (3, 3)
    assert list(row["positive_concepts"]) == ["fox"]


async def test_region_and_frame_ids_are_generated_when_empty(
    annotations: Annotations, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await media_inputs(inputs, datasets, caller)
    response = await add(
        annotations,
        caller,
        [
            annotation("img", regions=[box("", top=0.1, left=0.1, bottom=0.2, right=0.2)]),
            annotation(
                "vid",
                frames=[
                    data_pb2.Frame(
                        frame_info=data_pb2.FrameInfo(number=3),
                        data=data_pb2.Data(
                            regions=[box("", top=0.1, left=0.1, bottom=0.2, right=0.2)]
                        ),
                    )
                ],
            ),
        ],
    )
    image, video = (r.annotation for r in response.results)
    assert len(image.id) == 32 and len(image.data.regions[0].id) == 32
    assert len(video.data.frames[0].id) == 32
    assert len(video.data.frames[0].data.regions[0].id) == 32


async def test_update_merge_remove_overwrite_keep_statistics_exact(
    annotations: Annotations, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await media_inputs(inputs, datasets, caller)
    await add(
        annotations,
        caller,
        [
            annotation(
                "img",
                "a",
                info={"by": "ann", "round": 1},
                regions=[
                    box("r1", "cat", top=0.1, left=0.1, bottom=0.5, right=0.5),
                    box("r2", "dog", top=0.5, left=0.5, bottom=0.9, right=0.9),
                ],
            ),
            annotation("txt", "b", concepts=concepts("short")),
        ],
    )
    assert await statistics(datasets, caller, "ds") == (3, 2, 2, {"cat": 1, "dog": 1, "short": 1})

    # MERGE: a new region joins by id, an existing one changes only what is given.
    polygon = data_pb2.Polygon(points=points((0.2, 0.2), (0.3, 0.8), (0.7, 0.5)))
    changed = data_pb2.Region(
        id="r1",
        region_info=data_pb2.RegionInfo(
            bounding_box=data_pb2.BoundingBox(top_row=0.2, bottom_row=0.4)
        ),
    )
    merged = await patch(
        annotations,
        caller,
        MERGE,
        [
            annotation(
                "img",
                "a",
                info={"round": 2},
                regions=[changed, region("r3", "bird", polygon=polygon)],
            )
        ],
    )
    after = merged.annotations[0]
    assert [r.id for r in after.data.regions] == ["r1", "r2", "r3"]
    r1 = after.data.regions[0]
    assert r1.region_info.bounding_box == data_pb2.BoundingBox(
        top_row=0.2, left_col=0.1, bottom_row=0.4, right_col=0.5
    )
    assert [c.id for c in r1.data.concepts] == ["cat"]
    assert after.data.regions[2].region_info.polygon == polygon
    assert dict(after.annotation_info) == {"by": "ann", "round": 2}
    assert after.modified_at.ToDatetime() > after.created_at.ToDatetime()
    assert await get(annotations, caller, "a") == after
    assert (await statistics(datasets, caller, "ds"))[3] == {
        "cat": 1,
        "dog": 1,
        "bird": 1,
        "short": 1,
    }

    # REMOVE a region by id.
    removed = await patch(
        annotations, caller, REMOVE, [annotation("img", "a", regions=[data_pb2.Region(id="r2")])]
    )
    assert [r.id for r in removed.annotations[0].data.regions] == ["r1", "r3"]
    assert not removed.deleted_ids
    assert (await statistics(datasets, caller, "ds"))[3] == {"cat": 1, "bird": 1, "short": 1}

    # REMOVE that empties an annotation: invalid, unless delete_if_empty.
    emptying = [annotation("txt", "b", concepts=[data_pb2.Concept(id="short")])]
    error = await call_error(patch(annotations, caller, REMOVE, emptying))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.fields) == ["annotations[0].data"]
    assert "empty" in error.fields["annotations[0].data"]
    gone = await patch(annotations, caller, REMOVE, emptying, delete_if_empty=True)
    assert (list(gone.annotations), list(gone.deleted_ids)) == ([], ["b"])
    missing = await call_error(get(annotations, caller, "b"))
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "ANNOTATION_NOT_FOUND")
    assert await statistics(datasets, caller, "ds") == (3, 1, 1, {"cat": 1, "bird": 1})

    # OVERWRITE replaces data; update_mask clears annotation_info.
    overwritten = await patch(
        annotations,
        caller,
        OVERWRITE,
        [annotation("img", "a", concepts=concepts("fish"))],
        update_mask=field_mask_pb2.FieldMask(paths=["data", "annotation_info"]),
    )
    assert overwritten.annotations[0].data == data_pb2.Data(concepts=concepts("fish"))
    assert not overwritten.annotations[0].HasField("annotation_info")
    assert await statistics(datasets, caller, "ds") == (3, 1, 1, {"fish": 1})


async def test_updates_are_all_or_nothing_and_validated(
    annotations: Annotations, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await media_inputs(inputs, datasets, caller)
    await add(
        annotations,
        caller,
        [
            annotation(
                "img", "a", regions=[box("r1", "cat", top=0.1, left=0.1, bottom=0.5, right=0.5)]
            ),
            annotation(
                "txt", "t", regions=[region("s", span=data_pb2.Span(char_start=0, char_end=3))]
            ),
        ],
    )
    before = [await get(annotations, caller, i) for i in ("a", "t")]
    inverted = data_pb2.Region(
        id="r1",
        region_info=data_pb2.RegionInfo(bounding_box=data_pb2.BoundingBox(bottom_row=0.05)),
    )
    beyond_text = data_pb2.Region(
        id="s", region_info=data_pb2.RegionInfo(span=data_pb2.Span(char_end=len(TEXT) + 1))
    )
    error = await call_error(
        patch(
            annotations,
            caller,
            MERGE,
            [
                annotation("img", "a", regions=[inverted]),
                annotation("txt", "t", regions=[beyond_text]),
            ],
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(error.fields) == {
        f"annotations[0].{BOX}.bottom_row",
        "annotations[1].data.regions[0].region_info.span.char_end",
    }
    error = await call_error(
        patch(
            annotations,
            caller,
            MERGE,
            [
                annotation("img", "a", concepts=concepts("x")),
                annotation("img", "ghost", concepts=concepts("y")),
            ],
        )
    )
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "ANNOTATION_NOT_FOUND")
    assert list(error.fields) == ["annotations[1].id"]
    assert [await get(annotations, caller, i) for i in ("a", "t")] == before

    error = await call_error(
        patch(
            annotations,
            caller,
            common_pb2.PATCH_ACTION_UNSPECIFIED,
            # By id alone: data beside a mask that does not name it would be refused first.
            [annotation_pb2.Annotation(id="a"), annotation_pb2.Annotation(id="a")],
            update_mask=field_mask_pb2.FieldMask(paths=["input_id"]),
            delete_if_empty=True,
        )
    )
    assert set(error.fields) == {"action", "update_mask.paths[0]"}
    error = await call_error(
        patch(
            annotations,
            caller,
            MERGE,
            [annotation_pb2.Annotation(id="a"), annotation("img", "a", concepts=concepts("x"))],
            delete_if_empty=True,
        )
    )
    assert set(error.fields) == {"delete_if_empty", "annotations[0]", "annotations[1].id"}


async def test_input_level_annotation_is_the_inputs_concepts(
    annotations: Annotations, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "ds")
    labelled = image_input("lab", concepts=concepts("cat"))
    labelled.dataset_ids.append("ds")
    await create(inputs, caller, [labelled])
    (level,) = await list_all(annotations, caller, input_ids=["lab"])
    assert level.input_level
    assert [c.id for c in level.data.concepts] == ["cat"]
    assert await get(annotations, caller, level.id) == level

    await patch(annotations, caller, MERGE, [annotation("lab", level.id, concepts=concepts("dog"))])
    got = await inputs.GetInput(
        iapi.GetInputRequest(app_id=caller.app_id, input_id="lab"), metadata=caller.metadata
    )
    assert [c.id for c in got.input.data.concepts] == ["cat", "dog"]
    assert (await statistics(datasets, caller, "ds"))[3] == {"cat": 1, "dog": 1}

    error = await call_error(
        patch(
            annotations,
            caller,
            MERGE,
            [
                annotation(
                    "lab", level.id, regions=[box("r", top=0.1, left=0.1, bottom=0.2, right=0.2)]
                )
            ],
        )
    )
    assert list(error.fields) == ["annotations[0].data.regions"]

    removed = await patch(
        annotations,
        caller,
        REMOVE,
        [
            annotation(
                "lab", level.id, concepts=[data_pb2.Concept(id="cat"), data_pb2.Concept(id="dog")]
            )
        ],
        delete_if_empty=True,
    )
    assert list(removed.deleted_ids) == [level.id]
    got = await inputs.GetInput(
        iapi.GetInputRequest(app_id=caller.app_id, input_id="lab"), metadata=caller.metadata
    )
    assert not got.input.data.concepts
    assert await statistics(datasets, caller, "ds") == (1, 0, 0, {})


async def test_delete_by_ids_and_by_input_ids(
    annotations: Annotations, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await media_inputs(inputs, datasets, caller)
    await add(
        annotations,
        caller,
        [
            annotation("img", "i1", concepts=concepts("cat")),
            annotation("img", "i2", concepts=concepts("dog")),
            annotation("txt", "t1", concepts=concepts("cat")),
            annotation("txt", "t2", concepts=concepts("word")),
            annotation("vid", "v1", concepts=concepts("cat")),
        ],
    )
    assert await statistics(datasets, caller, "ds") == (3, 3, 5, {"cat": 3, "dog": 1, "word": 1})
    assert await delete(annotations, caller, ids=["i2", "t1", "ghost", "i2"]) == 2
    assert await statistics(datasets, caller, "ds") == (3, 3, 3, {"cat": 2, "word": 1})
    assert await delete(annotations, caller, input_ids=["txt", "vid"]) == 2
    assert await list_ids(annotations, caller) == ["i1"]
    assert await statistics(datasets, caller, "ds") == (3, 1, 1, {"cat": 1})

    for params, field in (
        ({}, "ids"),
        ({"ids": ["i1"], "input_ids": ["img"]}, "ids"),
        ({"ids": ["bad id"]}, "ids[0]"),
        ({"input_ids": [f"i{n}" for n in range(1001)]}, "input_ids"),
    ):
        error = await call_error(delete(annotations, caller, **params))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error.fields, (params, error.fields)
    assert await list_ids(annotations, caller) == ["i1"]


async def test_bad_annotations_name_the_annotation_and_field(
    annotations: Annotations, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await media_inputs(inputs, datasets, caller)
    deep: dict[str, Any] = {"x": 1}
    for _ in range(9):
        deep = {"d": deep}
    nan, inf = float("nan"), float("inf")
    bad = [
        annotation("img", regions=[box("", top=1.5, left=0.1, bottom=0.5, right=0.5)]),
        annotation("img", regions=[box("", top=0.6, left=0.1, bottom=0.2, right=0.5)]),
        annotation(
            "img",
            regions=[region(polygon=data_pb2.Polygon(points=points((0.1, 0.1), (0.2, 0.2))))],
        ),
        annotation("txt", regions=[region(span=data_pb2.Span(char_start=10, char_end=20))]),
        annotation("nowhere", concepts=concepts("cat")),
        annotation("img", concepts=concepts("cat"), metadata=metadata({"blob": "x" * 70_000})),
        annotation("img", concepts=concepts("cat"), metadata=metadata(deep)),
        annotation("img", info=deep, concepts=concepts("cat")),
        annotation(
            "vid", frames=[data_pb2.Frame(frame_info=data_pb2.FrameInfo(number=50, time=2001))]
        ),
        annotation("img", regions=[region(span=data_pb2.Span(char_start=0, char_end=1))]),
        annotation("img", "bad id!", concepts=concepts("cat")),
        annotation("img"),
    ]
    response = await add(annotations, caller, bad)
    assert [r.outcome for r in response.results] == [INVALID] * len(bad)
    assert (response.created_count, response.failed_count) == (0, len(bad))
    fields = [[e.field for e in r.errors] for r in response.results]
    assert fields == [
        [f"annotations[0].{BOX}.top_row"],
        [f"annotations[1].{BOX}.bottom_row"],
        ["annotations[2].data.regions[0].region_info.polygon.points"],
        ["annotations[3].data.regions[0].region_info.span.char_end"],
        ["annotations[4].input_id"],
        ["annotations[5].data.metadata"],
        ["annotations[6].data.metadata"],
        ["annotations[7].annotation_info"],
        [
            "annotations[8].data.frames[0].frame_info.number",
            "annotations[8].data.frames[0].frame_info.time",
        ],
        ["annotations[9].data.regions[0].region_info.span"],
        ["annotations[10].id"],
        ["annotations[11].data"],
    ]
    descriptions = {e.field: e.description for r in response.results for e in r.errors}
    assert (
        "19 characters" in descriptions["annotations[3].data.regions[0].region_info.span.char_end"]
    )
    assert "50" in descriptions["annotations[8].data.frames[0].frame_info.number"]
    assert await list_ids(annotations, caller) == []

    # A value no JSON or geometry can hold is refused at the boundary, for the whole call,
    # naming each place: not an item outcome, since nothing of such a request is stored.
    good = annotation("img", concepts=concepts("cat"))
    non_finite = [
        good,
        annotation("img", regions=[box("", top=nan, left=0.1, bottom=0.5, right=0.5)]),
        annotation("img", regions=[box("", top=0.1, left=0.1, bottom=0.5, right=inf)]),
    ]
    error = await call_error(add(annotations, caller, non_finite))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(error.fields) == [
        f"annotations[1].{BOX}.top_row",
        f"annotations[2].{BOX}.right_col",
    ]
    assert all("finite" in description for description in error.fields.values())
    assert await list_ids(annotations, caller) == []

    error = await call_error(add(annotations, caller, []))
    assert list(error.fields) == ["annotations"]
    error = await call_error(
        add(annotations, caller, [annotation("img", concepts=concepts("c"))] * 129)
    )
    assert (error.reason, list(error.fields)) == ("BATCH_TOO_LARGE", ["annotations"])


async def test_at_most_1000_annotations_per_input_even_concurrently(
    annotations: Annotations, inputs: Inputs, caller: Caller
) -> None:
    await create(inputs, caller, [image_input("full"), image_input("race", (1, 1, 1))])
    limit = MAX_ANNOTATIONS_PER_INPUT

    async def fill(input_id: str, count: int) -> None:
        for start in range(0, count, 128):
            batch = [
                annotation(input_id, concepts=concepts("c")) for _ in range(min(128, count - start))
            ]
            response = await add(annotations, caller, batch)
            assert response.created_count == len(batch)

    await asyncio.gather(fill("full", limit - 2), fill("race", limit - 10))
    straddling = await add(
        annotations, caller, [annotation("full", concepts=concepts("c")) for _ in range(3)]
    )
    assert [r.outcome for r in straddling.results] == [CREATED, CREATED, INVALID]
    (error,) = straddling.results[2].errors
    assert error.field == "annotations[2].input_id"
    assert f"{limit - 2} stored and 2 earlier" in error.description
    one_more = await add(annotations, caller, [annotation("full", concepts=concepts("c"))])
    assert one_more.results[0].errors[0].field == "annotations[0].input_id"
    assert len(await list_ids(annotations, caller, input_ids=["full"], page_size=1000)) == limit

    # Two batches racing for the last 10 places of one input: the lock lets exactly 10 in.
    batches = [[annotation("race", concepts=concepts("c")) for _ in range(10)] for _ in range(2)]
    results = await asyncio.gather(*(add(annotations, caller, b) for b in batches))
    assert sum(r.created_count for r in results) == 10
    assert len(await list_ids(annotations, caller, input_ids=["race"], page_size=1000)) == limit


async def test_atomic_batch_is_all_or_nothing(
    annotations: Annotations, inputs: Inputs, caller: Caller
) -> None:
    await create(inputs, caller, [image_input("img")])
    good = annotation("img", "good", concepts=concepts("cat"))
    inverted = annotation("img", "bad", regions=[box("", top=0.6, left=0.1, bottom=0.2, right=0.5)])
    error = await call_error(add(annotations, caller, [good, inverted], atomic=True))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ANNOTATION")
    assert list(error.fields) == [f"annotations[1].{BOX}.bottom_row"]
    assert await list_ids(annotations, caller) == []

    await add(annotations, caller, [annotation("img", "taken", concepts=concepts("cat"))])
    error = await call_error(
        add(
            annotations,
            caller,
            [good, annotation("img", "taken", concepts=concepts("x"))],
            atomic=True,
        )
    )
    assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "ANNOTATION_EXISTS")
    assert list(error.fields) == ["annotations[1].id"]
    assert await list_ids(annotations, caller) == ["taken"]

    # Without `atomic`, each annotation gets its own outcome.
    mixed = await add(
        annotations, caller, [good, good, annotation("img", "taken", concepts=concepts("x"))]
    )
    assert [r.outcome for r in mixed.results] == [CREATED, DUPLICATE, DUPLICATE]
    assert "repeats" in mixed.results[1].errors[0].description
    assert "already exists" in mixed.results[2].errors[0].description
    assert await list_ids(annotations, caller) == ["taken", "good"]


async def test_request_id_retries_replay_the_first_response(
    annotations: Annotations, inputs: Inputs, caller: Caller
) -> None:
    await create(inputs, caller, [image_input("img")])
    batch = [annotation("img", concepts=concepts("cat")) for _ in range(3)]
    first = await add(annotations, caller, batch, request_id="create-1")
    again = await add(annotations, caller, batch, request_id="create-1")
    assert first == again
    assert len(await list_ids(annotations, caller)) == 3
    reused = await call_error(add(annotations, caller, batch[:1], request_id="create-1"))
    assert reused.reason == "REQUEST_ID_REUSED"

    target = first.results[0].annotation_id
    change = [annotation("img", target, concepts=concepts("dog"))]
    updated = await patch(annotations, caller, MERGE, change, request_id="update-1")
    replayed = await patch(annotations, caller, MERGE, change, request_id="update-1")
    assert updated == replayed
    assert (await get(annotations, caller, target)).modified_at == updated.annotations[
        0
    ].modified_at

    ids = [r.annotation_id for r in first.results[1:]]
    assert await delete(annotations, caller, ids=ids, request_id="delete-1") == 2
    assert await delete(annotations, caller, ids=ids, request_id="delete-1") == 2
    assert await list_ids(annotations, caller) == [target]


async def test_lookup_errors_and_other_apps(
    annotations: Annotations, inputs: Inputs, caller: Caller, db: Database
) -> None:
    await create(inputs, caller, [image_input("img")])
    await add(annotations, caller, [annotation("img", "a", concepts=concepts("cat"))])
    error = await call_error(get(annotations, caller, "ghost"))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "ANNOTATION_NOT_FOUND")
    error = await call_error(list_ids(annotations, caller, dataset_id="no-such"))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "DATASET_NOT_FOUND")
    error = await call_error(list_ids(annotations, caller, input_ids=["ok", "not ok"]))
    assert list(error.fields) == ["input_ids[1]"]
    error = await call_error(
        annotations.ListAnnotations(
            api.ListAnnotationsRequest(app_id=caller.app_id, page_token="garbage"),
            metadata=caller.metadata,
        )
    )
    assert error.reason == "INVALID_PAGE_TOKEN"
    assert await list_ids(annotations, caller, input_ids=["unknown"]) == []

    other = await new_caller(db)
    error = await call_error(
        annotations.GetAnnotation(
            api.GetAnnotationRequest(app_id=caller.app_id, annotation_id="a"),
            metadata=other.metadata,
        )
    )
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    # Apps are separate namespaces: another app cannot annotate this app's inputs.
    response = await add(annotations, other, [annotation("img", "a", concepts=concepts("cat"))])
    assert [e.field for e in response.results[0].errors] == ["annotations[0].input_id"]


async def test_an_update_names_the_input_an_annotation_is_on_or_none(
    annotations: Annotations, inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await media_inputs(inputs, datasets, caller)
    await add(annotations, caller, [annotation("img", "on-img", concepts=concepts("cat"))])
    moved = annotation("txt", "on-img", concepts=concepts("dog"))
    error = await call_error(patch(annotations, caller, common_pb2.PATCH_ACTION_MERGE, [moved]))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "stays on its input" in error.fields["annotations[0].input_id"]
    assert "'img'" in error.fields["annotations[0].input_id"]
    # Without an input_id, or with the right one, the patch applies.
    unnamed = annotation_pb2.Annotation(id="on-img", data=data_pb2.Data(concepts=concepts("dog")))
    await patch(annotations, caller, common_pb2.PATCH_ACTION_MERGE, [unnamed])
    named = annotation("img", "on-img", concepts=concepts("bird"))
    response = await patch(annotations, caller, common_pb2.PATCH_ACTION_MERGE, [named])
    stored = response.annotations[0]
    assert stored.input_id == "img"
    assert sorted(c.id for c in stored.data.concepts) == ["bird", "cat", "dog"]
