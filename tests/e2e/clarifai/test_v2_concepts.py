"""clarifai.api.V2 concept RPCs: concepts are the labels in use in the app."""

from __future__ import annotations

from typing import TYPE_CHECKING

from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2
from datasetd.v1 import input_service_pb2 as iapi

from tests.conftest import Caller
from tests.e2e.clarifai.v2 import scope
from tests.helpers import png_bytes
from tests.unit.test_media import mp4

if TYPE_CHECKING:
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

SUCCESS = status_code_pb2.SUCCESS


def concept(concept_id: str, name: str = "") -> resources_pb2.Concept:
    return resources_pb2.Concept(id=concept_id, name=name, value=1.0)


def region(label: str) -> resources_pb2.Region:
    return resources_pb2.Region(
        region_info=resources_pb2.RegionInfo(
            bounding_box=resources_pb2.BoundingBox(
                top_row=0.1, left_col=0.1, bottom_row=0.5, right_col=0.5
            )
        ),
        data=resources_pb2.Data(concepts=[concept(label)]),
    )


async def list_concepts(
    v2: service_pb2_grpc.V2Stub, caller: Caller, **fields: object
) -> service_pb2.MultiConceptResponse:
    response: service_pb2.MultiConceptResponse = await v2.ListConcepts(
        service_pb2.ListConceptsRequest(user_app_id=scope(caller), **fields),
        metadata=caller.metadata,
    )
    assert response.status.code == SUCCESS, response.status
    return response


async def test_concepts_are_the_labels_in_use(
    v2: service_pb2_grpc.V2Stub, inputs: Inputs, caller: Caller
) -> None:
    assert list((await list_concepts(v2, caller)).concepts) == []
    posted = await v2.PostInputs(
        service_pb2.PostInputsRequest(
            user_app_id=scope(caller),
            inputs=[
                resources_pb2.Input(
                    id="img",
                    data=resources_pb2.Data(
                        image=resources_pb2.Image(base64=png_bytes(16, 12)),
                        concepts=[concept("cat", "Cat"), concept("dog")],
                    ),
                ),
                resources_pb2.Input(
                    id="vid", data=resources_pb2.Data(video=resources_pb2.Video(base64=mp4()))
                ),
            ],
        ),
        metadata=caller.metadata,
    )
    assert posted.status.code == SUCCESS, posted.status
    annotated = await v2.PostAnnotations(
        service_pb2.PostAnnotationsRequest(
            user_app_id=scope(caller),
            annotations=[
                resources_pb2.Annotation(
                    input_id="img", data=resources_pb2.Data(regions=[region("fox"), region("cat")])
                ),
                resources_pb2.Annotation(
                    input_id="vid",
                    data=resources_pb2.Data(
                        frames=[
                            resources_pb2.Frame(
                                frame_info=resources_pb2.FrameInfo(number=3),
                                data=resources_pb2.Data(regions=[region("owl")]),
                            )
                        ]
                    ),
                ),
            ],
        ),
        metadata=caller.metadata,
    )
    assert annotated.status.code == SUCCESS, annotated.status

    listed = await list_concepts(v2, caller)
    assert [(c.id, c.name) for c in listed.concepts] == [
        ("cat", "Cat"),
        ("dog", "dog"),
        ("fox", "fox"),
        ("owl", "owl"),
    ]
    assert {c.app_id for c in listed.concepts} == {caller.app_id}
    pages = [
        [c.id for c in (await list_concepts(v2, caller, page=p, per_page=3)).concepts]
        for p in (1, 2, 3)
    ]
    assert pages == [["cat", "dog", "fox"], ["owl"], []]
    assert [c.id for c in (await list_concepts(v2, caller, id="O")).concepts] == [
        "dog",
        "fox",
        "owl",
    ]

    got = await v2.GetConcept(
        service_pb2.GetConceptRequest(user_app_id=scope(caller), concept_id="owl"),
        metadata=caller.metadata,
    )
    assert got.status.code == SUCCESS and got.concept.id == "owl"
    missing = await v2.GetConcept(
        service_pb2.GetConceptRequest(user_app_id=scope(caller), concept_id="emu"),
        metadata=caller.metadata,
    )
    assert missing.status.code == status_code_pb2.CONN_DOES_NOT_EXIST

    # Nothing could keep a concept posted or renamed on its own: refused, and no change.
    created = await v2.PostConcepts(
        service_pb2.PostConceptsRequest(user_app_id=scope(caller), concepts=[concept("emu")]),
        metadata=caller.metadata,
    )
    assert created.status.code == status_code_pb2.NOT_IMPLEMENTED
    assert "label inputs" in created.status.details
    renamed = await v2.PatchConcepts(
        service_pb2.PatchConceptsRequest(
            user_app_id=scope(caller), concepts=[concept("cat", "Kitty")], action="overwrite"
        ),
        metadata=caller.metadata,
    )
    assert renamed.status.code == status_code_pb2.NOT_IMPLEMENTED
    assert [(c.id, c.name) for c in (await list_concepts(v2, caller)).concepts] == [
        ("cat", "Cat"),
        ("dog", "dog"),
        ("fox", "fox"),
        ("owl", "owl"),
    ]
    stored = await inputs.GetInput(
        iapi.GetInputRequest(app_id=caller.app_id, input_id="img"), metadata=caller.metadata
    )
    assert [(c.id, c.name) for c in stored.input.data.concepts] == [("cat", "Cat"), ("dog", "dog")]
