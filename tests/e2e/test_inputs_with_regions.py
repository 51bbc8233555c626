"""CreateInputs with regions and frames: each becomes an annotation of the new input, in the
transaction that creates it, checked as CreateAnnotations checks them (issue 10, point 2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from datasetd.v1 import data_pb2, input_pb2
from datasetd.v1 import input_service_pb2 as api

from tests.conftest import Caller
from tests.e2e.test_annotations import BOX, box, concepts, list_all
from tests.e2e.test_inputs import CREATED, DUPLICATE, INVALID, create, image_input, list_ids
from tests.helpers import call_error
from tests.unit.test_media import mp4

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs


def boxed(input_id: str = "", **edges: float) -> input_pb2.Input:
    """An image input with one box labelled "cat" (a valid one unless `edges` say otherwise)."""
    geometry = {"top": 0.1, "left": 0.2, "bottom": 0.6, "right": 0.7, **edges}
    item = image_input(input_id)
    item.data.regions.append(box(f"{input_id}-box", "cat", **geometry))
    return item


def video_with_frame(input_id: str, number: int) -> input_pb2.Input:
    """The 50-frame test video with one boxed frame."""
    frame = data_pb2.Frame(
        id=f"{input_id}-f",
        frame_info=data_pb2.FrameInfo(number=number, time=number * 40),
        data=data_pb2.Data(regions=[box("fox", "fox", top=0.1, left=0.1, bottom=0.5, right=0.5)]),
    )
    return input_pb2.Input(
        id=input_id,
        data=data_pb2.Data(video=data_pb2.Video(base64=mp4()), frames=[frame]),
    )


async def test_each_region_and_frame_is_read_back_as_an_annotation_of_its_own(
    inputs: Inputs, annotations: Annotations, caller: Caller
) -> None:
    image = image_input("img", concepts=concepts("pet"))
    image.data.regions.extend(
        [
            box("b1", "cat", top=0.1, left=0.2, bottom=0.6, right=0.7),
            box("", "dog", top=0.5, left=0.5, bottom=0.9, right=0.9),
        ]
    )
    response = await create(inputs, caller, [image, video_with_frame("vid", 25)])
    assert [r.outcome for r in response.results] == [CREATED, CREATED]
    # The input itself shows its medium and input-level concepts; regions are annotations.
    assert not response.results[0].input.data.regions

    found = await list_all(annotations, caller, input_ids=["img"])
    assert [a.input_level for a in found] == [True, False, False]
    assert [c.id for c in found[0].data.concepts] == ["pet"]
    # One annotation per region, as CreateAnnotations stores one box each; a region the
    # caller named names its annotation, the other gets an id derived from the input.
    cat, dog = found[1], found[2]
    assert [len(cat.data.regions), len(dog.data.regions)] == [1, 1]
    assert cat.id == cat.data.regions[0].id == "b1"
    assert cat.data.regions[0].data.concepts[0].id == "cat"
    assert (
        cat.data.regions[0].region_info.bounding_box.bottom_row
        == image.data.regions[0].region_info.bounding_box.bottom_row
    )
    assert len(dog.id) == 32 and dog.data.regions[0].id == dog.id
    assert dog.data.regions[0].data.concepts[0].id == "dog"

    (video,) = await list_all(annotations, caller, input_ids=["vid"])
    assert video.id == "vid-f"
    assert [f.id for f in video.data.frames] == ["vid-f"]
    assert video.data.frames[0].frame_info.number == 25
    assert video.data.frames[0].data.regions[0].id == "fox"


async def test_derived_annotation_ids_are_the_same_for_the_same_input_and_position(
    inputs: Inputs, annotations: Annotations, caller: Caller
) -> None:
    """A re-run after deleting the inputs gives the regions the same ids again."""
    batch = [boxed("one"), boxed("two")]
    for item in batch:
        item.data.regions[0].id = ""
    await create(inputs, caller, batch)
    first = sorted((a.input_id, a.id) for a in await list_all(annotations, caller))
    await inputs.DeleteInputs(
        api.DeleteInputsRequest(app_id=caller.app_id, ids=["one", "two"]),
        metadata=caller.metadata,
    )
    await create(inputs, caller, batch)
    again = sorted((a.input_id, a.id) for a in await list_all(annotations, caller))
    assert first == again and len({i for _, i in first}) == 2


async def test_an_annotation_id_already_taken_fails_only_its_input(
    inputs: Inputs, annotations: Annotations, caller: Caller
) -> None:
    await create(inputs, caller, [boxed("first")])
    # "first-box" names the annotation of the first input's region.
    taken = boxed("second")
    taken.data.regions[0].id = "first-box"
    response = await create(inputs, caller, [taken, boxed("third")])
    assert [r.outcome for r in response.results] == [DUPLICATE, CREATED]
    assert [e.field for e in response.results[0].errors] == ["inputs[0].data.regions[0].id"]
    assert sorted(await list_ids(inputs, caller)) == ["first", "third"]
    stored = sorted((a.input_id, a.id) for a in await list_all(annotations, caller))
    assert stored == [("first", "first-box"), ("third", "third-box")]

    # The same input again: its id is what is taken, and what the result names.
    again = await create(inputs, caller, [boxed("first")])
    assert [r.outcome for r in again.results] == [DUPLICATE]
    assert [e.field for e in again.results[0].errors] == ["inputs[0].id"]

    error = await call_error(create(inputs, caller, [boxed("fourth"), taken], atomic=True))
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert list(error.fields) == ["inputs[1].data.regions[0].id"]
    assert sorted(await list_ids(inputs, caller)) == ["first", "third"]


async def test_a_region_id_repeated_across_inputs_of_a_request_fails_the_later_input(
    inputs: Inputs, annotations: Annotations, caller: Caller
) -> None:
    a, b = boxed("a"), boxed("b")
    b.data.regions[0].id = "a-box"
    response = await create(inputs, caller, [a, b])
    assert [r.outcome for r in response.results] == [CREATED, INVALID]
    assert [e.field for e in response.results[1].errors] == ["inputs[1].data.regions[0].id"]
    assert [a.id for a in await list_all(annotations, caller)] == ["a-box"]


async def test_an_input_with_invalid_regions_is_invalid_and_nothing_of_it_is_stored(
    inputs: Inputs, annotations: Annotations, caller: Caller
) -> None:
    batch = [
        boxed("good"),
        boxed("inverted", top=0.6, bottom=0.2),
        boxed("outside", top=-0.5),
        # Frame 50 of a video of 50 frames (0..49).
        video_with_frame("late", 50),
        # Frames are for videos and audio, not images.
        image_input("still", frames=[data_pb2.Frame(frame_info=data_pb2.FrameInfo(number=1))]),
    ]
    response = await create(inputs, caller, batch)
    assert [r.outcome for r in response.results] == [CREATED] + [INVALID] * 4
    fields = [[e.field for e in r.errors] for r in response.results]
    assert fields[1] == [f"inputs[1].{BOX}.bottom_row"]
    assert fields[2] == [f"inputs[2].{BOX}.top_row"]
    assert "inputs[3].data.frames[0].frame_info.number" in fields[3]
    assert all(f.startswith("inputs[4].data.frames") for f in fields[4]), fields[4]
    assert await list_ids(inputs, caller) == ["good"]
    stored = await list_all(annotations, caller)
    assert [(a.input_id, a.data.regions[0].id) for a in stored] == [("good", "good-box")]


async def test_an_atomic_batch_with_an_invalid_region_stores_nothing(
    inputs: Inputs, annotations: Annotations, caller: Caller
) -> None:
    batch = [boxed("good"), video_with_frame("vid", 10), boxed("bad", top=0.6, bottom=0.2)]
    error = await call_error(create(inputs, caller, batch, atomic=True))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    assert list(error.fields) == [f"inputs[2].{BOX}.bottom_row"]
    assert await list_ids(inputs, caller) == []
    assert await list_all(annotations, caller) == []

    response = await create(inputs, caller, batch[:2], atomic=True)
    assert [r.outcome for r in response.results] == [CREATED, CREATED]
    assert [a.input_id for a in await list_all(annotations, caller)] == ["good", "vid"]


async def test_a_replay_with_the_same_request_id_creates_nothing_twice(
    inputs: Inputs, annotations: Annotations, caller: Caller
) -> None:
    # Generated input ids: a second execution would create a second input.
    batch = [boxed(), video_with_frame("", 5)]
    first = await create(inputs, caller, batch, request_id="with-regions")
    again = await create(inputs, caller, batch, request_id="with-regions")
    assert first == again
    ids = [r.input_id for r in first.results]
    assert sorted(await list_ids(inputs, caller)) == sorted(ids)
    stored = await list_all(annotations, caller)
    assert sorted(a.input_id for a in stored) == sorted(ids)


async def test_regions_are_still_refused_where_they_cannot_be_stored(
    inputs: Inputs, caller: Caller
) -> None:
    await create(inputs, caller, [image_input("img")])
    patch = input_pb2.Input(
        id="img", data=data_pb2.Data(regions=[box("b", top=0.1, left=0.1, bottom=0.5, right=0.5)])
    )
    error = await call_error(
        inputs.UpdateInputs(
            api.UpdateInputsRequest(app_id=caller.app_id, inputs=[patch]),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "CreateAnnotations" in error.fields["inputs[0].data.regions"]
    # Media in a region's data: the annotation rules of the boundary apply.
    nested = boxed("nested")
    nested.data.regions[0].data.image.url = "https://example.com/a.png"
    error = await call_error(create(inputs, caller, [nested]))
    assert list(error.fields) == ["inputs[0].data.regions[0].data.image"]
