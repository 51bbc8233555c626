"""clarifai.api.V2 annotation RPCs through clarifai-grpc's own stub; state read back
natively."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytest
from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2, status_pb2
from datasetd.v1 import annotation_service_pb2 as api

from tests.conftest import Caller
from tests.e2e.clarifai.test_v2_inputs import sdk_rebuilt
from tests.e2e.clarifai.v2 import scope
from tests.helpers import png_bytes
from tests.unit.test_media import mp4

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations

SUCCESS = status_code_pb2.SUCCESS
STORED = status_code_pb2.ANNOTATION_SUCCESS
INVALID = status_code_pb2.ANNOTATION_INVALID_ARGUMENT
MISSING = status_code_pb2.CONN_DOES_NOT_EXIST


def labels(*ids: str) -> list[resources_pb2.Concept]:
    return [resources_pb2.Concept(id=i, value=1.0) for i in ids]


def box(
    region_id: str, label: str, top: float = 0.1, bottom: float = 0.5, track: str = ""
) -> resources_pb2.Region:
    return resources_pb2.Region(
        id=region_id,
        track_id=track,
        region_info=resources_pb2.RegionInfo(
            bounding_box=resources_pb2.BoundingBox(
                top_row=top, left_col=0.2, bottom_row=bottom, right_col=0.6
            )
        ),
        data=resources_pb2.Data(concepts=labels(label)),
    )


def with_regions(
    input_id: str, *regions: resources_pb2.Region, annotation_id: str = ""
) -> resources_pb2.Annotation:
    return resources_pb2.Annotation(
        id=annotation_id, input_id=input_id, data=resources_pb2.Data(regions=regions)
    )


async def setup_inputs(v2: service_pb2_grpc.V2Stub, caller: Caller) -> None:
    """Images "i1".."i3" (16x12; i1 labelled "cat" on the input) and video "vid"."""
    items = [
        resources_pb2.Input(
            id=f"i{n}",
            data=resources_pb2.Data(
                image=resources_pb2.Image(base64=png_bytes(16, 12, (n, n, n))),
                concepts=labels("cat") if n == 1 else [],
            ),
        )
        for n in (1, 2, 3)
    ]
    items.append(
        resources_pb2.Input(
            id="vid", data=resources_pb2.Data(video=resources_pb2.Video(base64=mp4()))
        )
    )
    posted = await v2.PostInputs(
        service_pb2.PostInputsRequest(user_app_id=scope(caller), inputs=items),
        metadata=caller.metadata,
    )
    assert posted.status.code == SUCCESS, posted.status


async def post(
    v2: service_pb2_grpc.V2Stub, caller: Caller, *annotations: resources_pb2.Annotation
) -> service_pb2.MultiAnnotationResponse:
    response: service_pb2.MultiAnnotationResponse = await v2.PostAnnotations(
        service_pb2.PostAnnotationsRequest(user_app_id=scope(caller), annotations=annotations),
        metadata=caller.metadata,
    )
    return response


async def native_list(
    annotations: Annotations, caller: Caller, *input_ids: str
) -> list[tuple[str, str]]:
    """(annotation id, input id) of every stored annotation of the inputs, oldest first."""
    listed = await annotations.ListAnnotations(
        api.ListAnnotationsRequest(app_id=caller.app_id, input_ids=input_ids, page_size=1000),
        metadata=caller.metadata,
    )
    return [(a.id, a.input_id) for a in listed.annotations]


async def test_post_annotations_of_every_shape(
    v2: service_pb2_grpc.V2Stub, annotations: Annotations, caller: Caller
) -> None:
    await setup_inputs(v2, caller)
    polygon = resources_pb2.Region(
        id="poly",
        region_info=resources_pb2.RegionInfo(
            polygon=resources_pb2.Polygon(
                points=[
                    resources_pb2.Point(row=0.1, col=0.1, visibility=resources_pb2.Point.VISIBLE),
                    resources_pb2.Point(row=0.1, col=0.9),
                    resources_pb2.Point(row=0.8, col=0.5),
                ]
            )
        ),
        data=resources_pb2.Data(concepts=labels("roof")),
    )
    mask = resources_pb2.Region(
        id="mask",
        region_info=resources_pb2.RegionInfo(
            mask=resources_pb2.Mask(
                image=resources_pb2.Image(base64=png_bytes(16, 12, (255, 255, 255)))
            )
        ),
        data=resources_pb2.Data(concepts=labels("sky")),
    )
    frames = [
        resources_pb2.Frame(
            frame_info=resources_pb2.FrameInfo(index=index, number=number, time=number * 40),
            data=resources_pb2.Data(regions=[box(f"fox-{number}", "fox", track="track-1")]),
        )
        for index, number in enumerate((0, 25))
    ]
    token = with_regions("i3", box("tok", "x"))
    token.data.regions[0].region_info.token.SetInParent()
    token.data.regions[0].region_info.token.raw_text = "t"
    answer = await post(
        v2,
        caller,
        with_regions("i1", box("b1", "dog"), annotation_id="a-box"),
        with_regions("i2", polygon, mask, annotation_id="a-shapes"),
        resources_pb2.Annotation(
            id="a-video", input_id="vid", data=resources_pb2.Data(frames=frames)
        ),
        with_regions("i2", box("b2", "dog", top=0.6, bottom=0.4)),
        token,
        with_regions("nope", box("b3", "dog")),
        with_regions("i3", box("b1", "dog"), annotation_id="a-box"),
    )
    assert answer.status.code == status_code_pb2.MIXED_STATUS, answer.status
    codes = [a.status.code for a in answer.annotations]
    assert codes == [STORED] * 3 + [INVALID] * 4, answer
    details = [a.status.details for a in answer.annotations]
    assert "annotations[3].data.regions[0].region_info.bounding_box" in details[3]
    assert "annotations[4].data.regions[0].region_info.token" in details[4]
    assert "annotations[5]" in details[5] and "nope" in details[5]
    assert "annotations[6].id" in details[6]
    # Stored as posted, read back natively (i1 also has its input-level "cat").
    stored = await native_list(annotations, caller, "i1", "i2", "vid")
    assert [s for s in stored if s[0].startswith("a-")] == [
        ("a-box", "i1"),
        ("a-shapes", "i2"),
        ("a-video", "vid"),
    ]
    video = await annotations.GetAnnotation(
        api.GetAnnotationRequest(app_id=caller.app_id, annotation_id="a-video"),
        metadata=caller.metadata,
    )
    got_frames = video.annotation.data.frames
    assert [(f.frame_info.number, f.frame_info.time) for f in got_frames] == [(0, 0), (25, 1000)]
    assert [f.data.regions[0].track_id for f in got_frames] == ["track-1", "track-1"]
    shapes = await annotations.GetAnnotation(
        api.GetAnnotationRequest(app_id=caller.app_id, annotation_id="a-shapes"),
        metadata=caller.metadata,
    )
    regions = shapes.annotation.data.regions
    assert len(regions[0].region_info.polygon.points) == 3
    assert regions[1].region_info.mask.image.base64 == png_bytes(16, 12, (255, 255, 255))
    # A concept's name defaults to its id.
    assert [c.name for c in answer.annotations[0].data.regions[0].data.concepts] == ["dog"]


async def test_nan_in_a_box_is_refused_naming_the_field(
    v2: service_pb2_grpc.V2Stub, annotations: Annotations, caller: Caller
) -> None:
    await setup_inputs(v2, caller)
    answer = await post(v2, caller, with_regions("i2", box("nan", "dog", top=math.nan)))
    # Floats are checked for every request before any part runs (the interceptor), which
    # answers with the annotations' own code.
    assert answer.status.code == status_code_pb2.ANNOTATION_INVALID_ARGUMENT, answer.status
    assert "annotations[0].data.regions[0].region_info.bounding_box.top_row" in (
        answer.status.details
    )
    assert await native_list(annotations, caller, "i2") == []


async def seeded(v2: service_pb2_grpc.V2Stub, caller: Caller) -> None:
    """The inputs, and annotations "a1x", "a1y", ... "a3y": one box "r<n>" each."""
    await setup_inputs(v2, caller)
    posted = await post(
        v2,
        caller,
        *[
            with_regions(f"i{n}", box(f"r{n}", "dog"), annotation_id=f"a{n}{k}")
            for n in (1, 2, 3)
            for k in "xy"
        ],
    )
    assert posted.status.code == SUCCESS, posted.status


async def get(
    v2: service_pb2_grpc.V2Stub, caller: Caller, annotation_id: str, input_id: str
) -> service_pb2.SingleAnnotationResponse:
    response: service_pb2.SingleAnnotationResponse = await v2.GetAnnotation(
        service_pb2.GetAnnotationRequest(
            user_app_id=scope(caller), annotation_id=annotation_id, input_id=input_id
        ),
        metadata=caller.metadata,
    )
    return response


async def test_list_and_get(v2: service_pb2_grpc.V2Stub, caller: Caller) -> None:
    await seeded(v2, caller)

    async def listed(**fields: object) -> service_pb2.MultiAnnotationResponse:
        response: service_pb2.MultiAnnotationResponse = await v2.ListAnnotations(
            service_pb2.ListAnnotationsRequest(user_app_id=scope(caller), **fields),
            metadata=caller.metadata,
        )
        return response

    by_inputs = await listed(input_ids=["i2", "i3"], list_all_annotations=True)
    assert [a.id for a in by_inputs.annotations] == ["a2x", "a2y", "a3x", "a3y"]
    # What the SDK's list_annotations makes of them: the same annotations.
    assert sdk_rebuilt(by_inputs, resources_pb2.Annotation) == list(by_inputs.annotations)
    # i1's input-level "cat" is an annotation too, flagged so.
    everything = await listed()
    assert len(everything.annotations) == 7
    assert [a.input_level for a in everything.annotations].count(True) == 1
    pages = [
        [a.id for a in (await listed(input_ids=["i2", "i3"], page=p, per_page=3)).annotations]
        for p in (1, 2, 3)
    ]
    assert pages == [["a2x", "a2y", "a3x"], ["a3y"], []]
    parallel = await listed(ids=["a1x", "a3y", "a2x"], input_ids=["i1", "i3", "i1"])
    assert [a.id for a in parallel.annotations] == ["a1x", "a3y"]
    by_ids = await listed(ids=["a1x", "a3y", "gone"], page=2, per_page=1)
    assert [a.id for a in by_ids.annotations] == ["a3y"]
    assert list((await listed(statuses=[status_pb2.Status(code=24151)])).annotations) == []
    successful = await listed(statuses=[status_pb2.Status(code=STORED)], input_ids=["i1"])
    assert len(successful.annotations) == 3
    refused = await listed(user_ids=["someone"])
    assert refused.status.code == INVALID and "user_ids" in refused.status.details
    uneven = await listed(ids=["a1x"], input_ids=["i1", "i2"])
    assert uneven.status.code == INVALID and "input_ids" in uneven.status.details

    got = await get(v2, caller, "a2x", "i2")
    assert got.status.code == SUCCESS and got.annotation.status.code == STORED
    assert got.annotation.data.regions[0].region_info.bounding_box.right_col == pytest.approx(0.6)
    assert (await get(v2, caller, "a2x", "i1")).status.code == MISSING
    assert (await get(v2, caller, "nope", "i1")).status.code == MISSING


async def test_patch(v2: service_pb2_grpc.V2Stub, annotations: Annotations, caller: Caller) -> None:
    await seeded(v2, caller)

    async def patch(
        action: str, *items: resources_pb2.Annotation, delete_if_empty: bool = False
    ) -> service_pb2.MultiAnnotationResponse:
        response: service_pb2.MultiAnnotationResponse = await v2.PatchAnnotations(
            service_pb2.PatchAnnotationsRequest(
                user_app_id=scope(caller),
                annotations=items,
                action=action,
                delete_if_empty_data=delete_if_empty,
            ),
            metadata=caller.metadata,
        )
        return response

    merged = await patch("merge", with_regions("i1", box("extra", "cat"), annotation_id="a1x"))
    assert merged.status.code == SUCCESS, merged.status
    stored = await annotations.GetAnnotation(
        api.GetAnnotationRequest(app_id=caller.app_id, annotation_id="a1x"),
        metadata=caller.metadata,
    )
    assert [r.id for r in stored.annotation.data.regions] == ["r1", "extra"]
    removed = await patch(
        "remove",
        with_regions("i1", resources_pb2.Region(id="r1"), annotation_id="a1y"),
        delete_if_empty=True,
    )
    assert removed.status.code == SUCCESS, removed.status
    assert list(removed.annotations) == []
    assert ("a1y", "i1") not in await native_list(annotations, caller, "i1")
    # Output-only fields the SDK sends back (it patches what it listed) are fine.
    echoed = (await get(v2, caller, "a2x", "i2")).annotation
    echoed.data.regions[0].data.concepts[0].name = "Dog"
    overwritten = await patch("overwrite", echoed)
    assert overwritten.status.code == SUCCESS, overwritten.status
    stored = await annotations.GetAnnotation(
        api.GetAnnotationRequest(app_id=caller.app_id, annotation_id="a2x"),
        metadata=caller.metadata,
    )
    assert stored.annotation.data.regions[0].data.concepts[0].name == "Dog"
    unsupported = with_regions("i2", box("r2", "dog"), annotation_id="a2x")
    unsupported.task_id = "t1"
    refused_patch = await patch("merge", unsupported)
    assert refused_patch.status.code == INVALID
    assert "annotations[0].task_id" in refused_patch.status.details
    unknown = await patch("merge", with_regions("i2", box("r", "dog"), annotation_id="zzz"))
    assert unknown.status.code == MISSING, unknown.status


async def test_delete(
    v2: service_pb2_grpc.V2Stub, annotations: Annotations, caller: Caller
) -> None:
    await seeded(v2, caller)

    async def delete_one(annotation_id: str, input_id: str) -> status_pb2.BaseResponse:
        response: status_pb2.BaseResponse = await v2.DeleteAnnotation(
            service_pb2.DeleteAnnotationRequest(
                user_app_id=scope(caller), annotation_id=annotation_id, input_id=input_id
            ),
            metadata=caller.metadata,
        )
        return response

    assert (await delete_one("a2x", "i3")).status.code == MISSING
    assert (await delete_one("a2x", "i2")).status.code == SUCCESS
    assert await native_list(annotations, caller, "i2") == [("a2y", "i2")]

    async def delete(ids: list[str], input_ids: list[str]) -> status_pb2.BaseResponse:
        response: status_pb2.BaseResponse = await v2.DeleteAnnotations(
            service_pb2.DeleteAnnotationsRequest(
                user_app_id=scope(caller), ids=ids, input_ids=input_ids
            ),
            metadata=caller.metadata,
        )
        return response

    no_inputs = await delete(["a3x"], [])
    assert no_inputs.status.code == INVALID
    assert "input_ids" in no_inputs.status.details
    wrong_pair = await delete(["a3x", "a2y"], ["i3", "i3"])
    assert wrong_pair.status.code == MISSING
    assert [a for a, _ in await native_list(annotations, caller, "i3")] == ["a3x", "a3y"]
    assert (await delete(["a3x"], ["i3"])).status.code == SUCCESS
    assert await native_list(annotations, caller, "i3") == [("a3y", "i3")]
    assert (await delete([], ["i1", "i3"])).status.code == SUCCESS
    assert await native_list(annotations, caller, "i1", "i3") == []
    assert await native_list(annotations, caller, "i2") == [("a2y", "i2")]


async def test_post_inputs_stores_regions_as_the_inputs_annotation(
    v2: service_pb2_grpc.V2Stub, annotations: Annotations, caller: Caller
) -> None:
    boxed = resources_pb2.Input(
        id="boxed",
        data=resources_pb2.Data(
            image=resources_pb2.Image(base64=png_bytes(16, 12, (1, 2, 3))),
            regions=[box("b1", "dog")],
        ),
    )
    inverted = resources_pb2.Input(
        id="inverted",
        data=resources_pb2.Data(
            image=resources_pb2.Image(base64=png_bytes(16, 12, (3, 2, 1))),
            regions=[box("b2", "dog", top=0.6, bottom=0.2)],
        ),
    )
    posted = await v2.PostInputs(
        service_pb2.PostInputsRequest(user_app_id=scope(caller), inputs=[boxed, inverted]),
        metadata=caller.metadata,
    )
    assert [i.status.code for i in posted.inputs] == [
        status_code_pb2.INPUT_DOWNLOAD_SUCCESS,
        status_code_pb2.INPUT_INVALID_ARGUMENT,
    ]
    assert "inputs[1].data.regions[0].region_info.bounding_box" in posted.inputs[1].status.details
    listed = await annotations.ListAnnotations(
        api.ListAnnotationsRequest(app_id=caller.app_id, page_size=1000),
        metadata=caller.metadata,
    )
    assert [(a.input_id, [r.id for r in a.data.regions]) for a in listed.annotations] == [
        ("boxed", ["b1"])
    ]
