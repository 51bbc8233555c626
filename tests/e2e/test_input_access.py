"""Callers bound to a dataset on its inputs and annotations, named by id: a dataset Admin's
personal key and a write key bound to the dataset annotate and edit the inputs it holds
and nothing else; a Viewer reads them and changes nothing; ids that do not exist are
refused like inputs of another dataset (native gRPC, Clarifai's V2 and its REST gateway)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import aiohttp
import grpc
import pytest
from clarifai_grpc.grpc.api import resources_pb2
from clarifai_grpc.grpc.api import service_pb2 as v2_pb2
from clarifai_grpc.grpc.api.status import status_code_pb2
from datasetd.v1 import (
    access_pb2,
    access_service_pb2_grpc,
    annotation_pb2,
    annotation_service_pb2,
    annotation_service_pb2_grpc,
    common_pb2,
    data_pb2,
    dataset_service_pb2,
    input_pb2,
    input_service_pb2,
    input_service_pb2_grpc,
)

from service.app import Running
from service.storage.db import Database
from tests.conftest import Caller
from tests.e2e.test_access_service import App, owner_key
from tests.helpers import details_of

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs


@dataclasses.dataclass(frozen=True)
class Team:
    """`ds` holds in-ds and in-both; `other` holds in-other and in-both; an annotation on
    in-ds and one on in-other."""

    app: App
    admin: Caller
    viewer: Caller
    write_key: Caller


@pytest.fixture
def inputs_stub(channel: grpc.aio.Channel) -> Inputs:
    return input_service_pb2_grpc.InputServiceStub(channel)


@pytest.fixture
def annotations_stub(channel: grpc.aio.Channel) -> Annotations:
    return annotation_service_pb2_grpc.AnnotationServiceStub(channel)


@pytest.fixture
async def app(db: Database, channel: grpc.aio.Channel, datasets: Datasets) -> App:
    made = App(
        await owner_key(db), access_service_pb2_grpc.AccessServiceStub(channel), datasets, db
    )
    await made.new_dataset("ds")
    return made


def _concept(name: str) -> data_pb2.Data:
    return data_pb2.Data(concepts=[data_pb2.Concept(id=name, value=1.0)])


@pytest.fixture
async def team(app: App, inputs_stub: Inputs, annotations_stub: Annotations) -> Team:
    owner = app.owner
    await app.new_dataset("other")
    placed = {"in-ds": ["ds"], "in-other": ["other"], "in-both": ["ds", "other"]}
    await inputs_stub.CreateInputs(
        input_service_pb2.CreateInputsRequest(
            app_id=app.app_id,
            inputs=[
                input_pb2.Input(id=i, data=data_pb2.Data(text=data_pb2.Text(raw=i)), dataset_ids=d)
                for i, d in placed.items()
            ],
        ),
        metadata=owner.metadata,
    )
    made = await annotations_stub.CreateAnnotations(
        annotation_service_pb2.CreateAnnotationsRequest(
            app_id=app.app_id,
            annotations=[
                annotation_pb2.Annotation(id="an-ds", input_id="in-ds", data=_concept("a")),
                annotation_pb2.Annotation(id="an-other", input_id="in-other", data=_concept("a")),
            ],
        ),
        metadata=owner.metadata,
    )
    assert made.created_count == 2
    admin = await app.user("adm")
    await app.collaborate("adm", access_pb2.DATASET_ROLE_ADMIN)
    viewer = await app.user("view")
    await app.collaborate("view", access_pb2.DATASET_ROLE_VIEWER)
    key = await app.create_key(
        owner,
        kind=access_pb2.KEY_KIND_SCOPED,
        access=access_pb2.KEY_ACCESS_READ_WRITE,
        dataset_ids=["ds"],
    )
    return Team(app, admin, viewer, Caller(app.app_id, key.secret))


async def _annotate(stub: Annotations, caller: Caller, input_id: str) -> str:
    try:
        made = await stub.CreateAnnotations(
            annotation_service_pb2.CreateAnnotationsRequest(
                app_id=caller.app_id,
                annotations=[annotation_pb2.Annotation(input_id=input_id, data=_concept("b"))],
            ),
            metadata=caller.metadata,
        )
    except grpc.aio.AioRpcError as error:
        return details_of(error).reason
    assert made.created_count == 1, made
    return "OK"


async def _retitle(stub: Inputs, caller: Caller, input_id: str) -> str:
    try:
        await stub.UpdateInputs(
            input_service_pb2.UpdateInputsRequest(
                app_id=caller.app_id,
                inputs=[input_pb2.Input(id=input_id, title="renamed")],
                action=common_pb2.PATCH_ACTION_MERGE,
            ),
            metadata=caller.metadata,
        )
    except grpc.aio.AioRpcError as error:
        return details_of(error).reason
    return "OK"


async def _get(stub: Inputs, caller: Caller, input_id: str) -> str:
    try:
        got = await stub.GetInput(
            input_service_pb2.GetInputRequest(app_id=caller.app_id, input_id=input_id),
            metadata=caller.metadata,
        )
    except grpc.aio.AioRpcError as error:
        return details_of(error).reason
    assert got.input.id == input_id
    return "OK"


async def _delete(stub: Inputs, caller: Caller, input_id: str) -> str:
    try:
        await stub.DeleteInputs(
            input_service_pb2.DeleteInputsRequest(app_id=caller.app_id, ids=[input_id]),
            metadata=caller.metadata,
        )
    except grpc.aio.AioRpcError as error:
        return details_of(error).reason
    return "OK"


DENIED = "INPUT_ACCESS_DENIED"


@pytest.mark.parametrize("who", ["admin", "write_key"])
async def test_dataset_writers_annotate_and_edit_their_datasets_inputs_only(
    who: str, team: Team, inputs_stub: Inputs, annotations_stub: Annotations
) -> None:
    caller: Caller = getattr(team, who)
    assert await _annotate(annotations_stub, caller, "in-ds") == "OK"
    assert await _annotate(annotations_stub, caller, "in-both") == "OK"
    assert await _annotate(annotations_stub, caller, "in-other") == DENIED
    assert await _annotate(annotations_stub, caller, "no-such-input") == DENIED
    assert await _retitle(inputs_stub, caller, "in-ds") == "OK"
    assert await _retitle(inputs_stub, caller, "in-other") == DENIED
    patch = annotation_service_pb2.UpdateAnnotationsRequest(
        app_id=caller.app_id, action=common_pb2.PATCH_ACTION_MERGE
    )
    patch.annotations.add(id="an-ds", data=_concept("c"))
    updated = await annotations_stub.UpdateAnnotations(patch, metadata=caller.metadata)
    assert [a.id for a in updated.annotations] == ["an-ds"]
    patch.annotations[0].id = "an-other"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await annotations_stub.UpdateAnnotations(patch, metadata=caller.metadata)
    assert details_of(refused.value).reason == DENIED
    # Deleting takes the input out of every dataset: `other` must allow it too.
    assert await _delete(inputs_stub, caller, "in-both") == DENIED
    assert await _delete(inputs_stub, caller, "in-ds") == "OK"
    owner = team.app.owner
    assert await _get(inputs_stub, owner, "in-ds") == "INPUT_NOT_FOUND"
    assert await _get(inputs_stub, owner, "in-both") == "OK"
    # What the refusals left: in-other untouched, its annotation unchanged.
    other = await annotations_stub.GetAnnotation(
        annotation_service_pb2.GetAnnotationRequest(app_id=owner.app_id, annotation_id="an-other"),
        metadata=owner.metadata,
    )
    assert [c.id for c in other.annotation.data.concepts] == ["a"]
    got = await inputs_stub.GetInput(
        input_service_pb2.GetInputRequest(app_id=owner.app_id, input_id="in-other"),
        metadata=owner.metadata,
    )
    assert got.input.title == ""


async def test_a_viewer_reads_its_datasets_inputs_and_changes_nothing(
    team: Team, inputs_stub: Inputs, annotations_stub: Annotations
) -> None:
    viewer = team.viewer
    assert await _get(inputs_stub, viewer, "in-ds") == "OK"
    assert await _get(inputs_stub, viewer, "in-both") == "OK"
    assert await _get(inputs_stub, viewer, "in-other") == DENIED
    # An id that does not exist is refused the same way: nothing tells it apart.
    assert await _get(inputs_stub, viewer, "no-such-input") == DENIED
    got = await annotations_stub.GetAnnotation(
        annotation_service_pb2.GetAnnotationRequest(app_id=viewer.app_id, annotation_id="an-ds"),
        metadata=viewer.metadata,
    )
    assert got.annotation.input_id == "in-ds"
    listed = await annotations_stub.ListAnnotations(
        annotation_service_pb2.ListAnnotationsRequest(app_id=viewer.app_id, input_ids=["in-ds"]),
        metadata=viewer.metadata,
    )
    assert [a.id for a in listed.annotations] == ["an-ds"]
    # No dataset gives the viewer a write: refused before any lookup.
    assert await _retitle(inputs_stub, viewer, "in-ds") == "APP_ACCESS_DENIED"
    assert await _annotate(annotations_stub, viewer, "in-ds") == "APP_ACCESS_DENIED"
    assert await _delete(inputs_stub, viewer, "in-ds") == "APP_ACCESS_DENIED"
    # Every annotation of the app is not the viewer's to list.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await annotations_stub.ListAnnotations(
            annotation_service_pb2.ListAnnotationsRequest(app_id=viewer.app_id),
            metadata=viewer.metadata,
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    owner = team.app.owner
    got_input = await inputs_stub.GetInput(
        input_service_pb2.GetInputRequest(app_id=owner.app_id, input_id="in-ds"),
        metadata=owner.metadata,
    )
    assert got_input.input.title == ""


async def test_clarifai_v2_and_its_rest_gateway_follow_the_same_rule(
    team: Team, channel: grpc.aio.Channel, server: Running
) -> None:
    post_annotations = channel.unary_unary(
        "/clarifai.api.V2/PostAnnotations",
        request_serializer=v2_pb2.PostAnnotationsRequest.SerializeToString,
        response_deserializer=v2_pb2.MultiAnnotationResponse.FromString,
    )
    scope = resources_pb2.UserAppIDSet(user_id="me", app_id=team.app.app_id)

    async def post(caller: Caller, input_id: str) -> int:
        answer = await post_annotations(
            v2_pb2.PostAnnotationsRequest(
                user_app_id=scope,
                annotations=[
                    resources_pb2.Annotation(
                        input_id=input_id,
                        data=resources_pb2.Data(
                            concepts=[resources_pb2.Concept(id="v2", value=1.0)]
                        ),
                    )
                ],
            ),
            metadata=caller.metadata,
        )
        code: int = answer.status.code
        return code

    for caller in (team.admin, team.write_key):
        assert await post(caller, "in-ds") == status_code_pb2.SUCCESS
        assert await post(caller, "in-other") == status_code_pb2.CONN_INSUFFICIENT_SCOPES
    assert await post(team.viewer, "in-ds") == status_code_pb2.CONN_INSUFFICIENT_SCOPES

    base = f"http://127.0.0.1:{server.http_port}/v2/users/me/apps/{team.app.app_id}/inputs/"
    headers = {"Authorization": f"Key {team.viewer.key}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "in-ds", headers=headers) as response:
            body = await response.json(content_type=None)
            assert body["status"]["code"] == status_code_pb2.SUCCESS, body
            assert body["input"]["id"] == "in-ds"
        async with session.get(base + "in-other", headers=headers) as response:
            body = await response.json(content_type=None)
            assert body["status"]["code"] == status_code_pb2.CONN_INSUFFICIENT_SCOPES, body
            assert "input" not in body


async def test_deleting_needs_write_on_datasets_in_the_trash_too(
    team: Team, inputs_stub: Inputs, datasets: Datasets
) -> None:
    """Undeleting a dataset would bring it back without the input: its trash counts."""
    owner = team.app.owner
    await team.app.new_dataset("trash")
    await datasets.AddDatasetInputs(
        dataset_service_pb2.AddDatasetInputsRequest(
            app_id=owner.app_id, dataset_id="trash", input_ids=["in-ds"]
        ),
        metadata=owner.metadata,
    )
    await datasets.DeleteDataset(
        dataset_service_pb2.DeleteDatasetRequest(app_id=owner.app_id, dataset_id="trash"),
        metadata=owner.metadata,
    )
    # Reading and annotating follow the live datasets only.
    assert await _get(inputs_stub, team.admin, "in-ds") == "OK"
    assert await _delete(inputs_stub, team.admin, "in-ds") == DENIED
    assert await _get(inputs_stub, owner, "in-ds") == "OK"
