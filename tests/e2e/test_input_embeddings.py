"""Embeddings of inputs as a caller sees them: vectors given in data.embeddings
(CreateInputs, UpdateInputs, the UploadInput header) read back with GetInput and
ListInputs, the app's models, and the states of the built-in embeddings."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
from datasetd.v1 import common_pb2, data_pb2, errors_pb2, input_pb2, search_pb2
from datasetd.v1 import input_service_pb2 as api
from datasetd.v1 import search_service_pb2 as sapi
from google.protobuf import field_mask_pb2

from tests.conftest import Caller
from tests.helpers import call_error, png_bytes

if TYPE_CHECKING:
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs
    from datasetd.v1.search_service_pb2_grpc import SearchServiceAsyncStub as Search

CREATED = errors_pb2.ITEM_OUTCOME_CREATED
INVALID = errors_pb2.ITEM_OUTCOME_INVALID
MERGE = common_pb2.PATCH_ACTION_MERGE
REMOVE = common_pb2.PATCH_ACTION_REMOVE
# How long the embedding job may take to embed a fresh input (2 cores, other tests running).
EMBED_DEADLINE = 60.0


def embedding(model_id: str, *vector: float, dims: int = 0) -> data_pb2.Embedding:
    return data_pb2.Embedding(model_id=model_id, vector=vector, num_dimensions=dims)


def image(input_id: str, *embeddings: data_pb2.Embedding) -> input_pb2.Input:
    return input_pb2.Input(
        id=input_id,
        data=data_pb2.Data(image=data_pb2.Image(base64=png_bytes()), embeddings=embeddings),
    )


def patch(input_id: str, *embeddings: data_pb2.Embedding) -> input_pb2.Input:
    return input_pb2.Input(id=input_id, data=data_pb2.Data(embeddings=embeddings))


def vectors_of(message: input_pb2.Input) -> dict[str, list[float]]:
    return {e.model_id: list(e.vector) for e in message.data.embeddings}


def close(given: list[float], found: list[float]) -> bool:
    return len(given) == len(found) and all(
        math.isclose(a, b, rel_tol=1e-6) for a, b in zip(given, found, strict=True)
    )


async def create(
    inputs: Inputs, caller: Caller, *items: input_pb2.Input, atomic: bool = False
) -> api.CreateInputsResponse:
    response: api.CreateInputsResponse = await inputs.CreateInputs(
        api.CreateInputsRequest(app_id=caller.app_id, inputs=items, atomic=atomic),
        metadata=caller.metadata,
    )
    return response


async def get(inputs: Inputs, caller: Caller, input_id: str) -> input_pb2.Input:
    response = await inputs.GetInput(
        api.GetInputRequest(app_id=caller.app_id, input_id=input_id), metadata=caller.metadata
    )
    found: input_pb2.Input = response.input
    return found


async def models(search: Search, caller: Caller) -> dict[str, search_pb2.EmbeddingModel]:
    response = await search.ListEmbeddingModels(
        sapi.ListEmbeddingModelsRequest(app_id=caller.app_id), metadata=caller.metadata
    )
    return {m.id: m for m in response.models}


async def states(
    search: Search, caller: Caller, input_id: str, *, vectors: bool = False
) -> dict[str, search_pb2.InputEmbedding]:
    response = await search.GetInputEmbeddings(
        sapi.GetInputEmbeddingsRequest(
            app_id=caller.app_id, input_id=input_id, include_vectors=vectors
        ),
        metadata=caller.metadata,
    )
    return {e.model_id: e for e in response.embeddings}


async def test_given_vectors_are_stored_and_read_back(
    inputs: Inputs, search: Search, caller: Caller
) -> None:
    created = await create(
        inputs,
        caller,
        image("a", embedding("mine", 1, 2, 3, dims=3), embedding("other.v1", 0.5, -0.5)),
        image("b", embedding("mine", 3, 2, 1)),
    )
    assert [r.outcome for r in created.results] == [CREATED, CREATED]
    assert vectors_of(created.results[0].input) == {"mine": [1, 2, 3], "other.v1": [0.5, -0.5]}
    got = await get(inputs, caller, "a")
    assert vectors_of(got) == {"mine": [1, 2, 3], "other.v1": [0.5, -0.5]}
    assert {e.model_id: e.num_dimensions for e in got.data.embeddings} == {
        "mine": 3,
        "other.v1": 2,
    }
    listed = await inputs.ListInputs(
        api.ListInputsRequest(app_id=caller.app_id), metadata=caller.metadata
    )
    assert {i.id: vectors_of(i) for i in listed.inputs} == {
        "a": {"mine": [1, 2, 3], "other.v1": [0.5, -0.5]},
        "b": {"mine": [3, 2, 1]},
    }
    known = await models(search, caller)
    assert known["mine"].dimension == 3
    assert known["mine"].source == search_pb2.EMBEDDING_SOURCE_CLIENT
    assert known["mine"].embedded_count == 2
    assert known["other.v1"].embedded_count == 1
    found = await states(search, caller, "a", vectors=True)
    assert found["mine"].state == search_pb2.EMBEDDING_STATE_READY
    assert close(list(found["mine"].vector), [1, 2, 3])
    assert found["mine"].HasField("updated_at")
    without = await states(search, caller, "a")
    assert not without["mine"].vector


async def test_an_update_replaces_the_vector_of_its_model_only(
    inputs: Inputs, caller: Caller
) -> None:
    await create(inputs, caller, image("u", embedding("m1", 1, 0), embedding("m2", 0, 1)))
    updated = await inputs.UpdateInputs(
        api.UpdateInputsRequest(
            app_id=caller.app_id,
            inputs=[
                input_pb2.Input(id="u", data=data_pb2.Data(embeddings=[embedding("m1", 0, 5)]))
            ],
            action=MERGE,
        ),
        metadata=caller.metadata,
    )
    assert vectors_of(updated.inputs[0]) == {"m1": [0, 5], "m2": [0, 1]}
    assert vectors_of(await get(inputs, caller, "u")) == {"m1": [0, 5], "m2": [0, 1]}
    # The mask names the field; a vector of a new model joins.
    await inputs.UpdateInputs(
        api.UpdateInputsRequest(
            app_id=caller.app_id,
            inputs=[input_pb2.Input(id="u", data=data_pb2.Data(embeddings=[embedding("m3", 7)]))],
            action=MERGE,
            update_mask=field_mask_pb2.FieldMask(paths=["embeddings"]),
        ),
        metadata=caller.metadata,
    )
    assert vectors_of(await get(inputs, caller, "u")) == {"m1": [0, 5], "m2": [0, 1], "m3": [7]}
    refused = await call_error(
        inputs.UpdateInputs(
            api.UpdateInputsRequest(
                app_id=caller.app_id,
                inputs=[
                    input_pb2.Input(id="u", data=data_pb2.Data(embeddings=[embedding("m1", 1, 1)]))
                ],
                action=REMOVE,
            ),
            metadata=caller.metadata,
        )
    )
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[0].data.embeddings" in refused.fields
    wrong = await call_error(
        inputs.UpdateInputs(
            api.UpdateInputsRequest(
                app_id=caller.app_id,
                inputs=[
                    input_pb2.Input(id="u", data=data_pb2.Data(embeddings=[embedding("m1", 1)]))
                ],
                action=MERGE,
            ),
            metadata=caller.metadata,
        )
    )
    assert wrong.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[0].data.embeddings[0].vector" in wrong.fields
    assert vectors_of(await get(inputs, caller, "u")) == {"m1": [0, 5], "m2": [0, 1], "m3": [7]}


async def test_bad_vectors_are_refused_by_path_and_nothing_is_stored(
    inputs: Inputs, search: Search, caller: Caller
) -> None:
    await create(inputs, caller, image("first", embedding("dim2", 1, 2)))
    builtin = sorted(
        m.id
        for m in (await models(search, caller)).values()
        if m.source != search_pb2.EMBEDDING_SOURCE_CLIENT
    )
    cases: list[tuple[input_pb2.Input, str]] = [
        (image("wrong-dim", embedding("dim2", 1, 2, 3)), "inputs[0].data.embeddings[0].vector"),
        (
            image("too-many", *(embedding(f"m{i}", 1) for i in range(9))),
            "inputs[0].data.embeddings",
        ),
        (
            image("twice", embedding("same", 1), embedding("same", 2)),
            "inputs[0].data.embeddings[1].model_id",
        ),
        (image("no-model", embedding("", 1)), "inputs[0].data.embeddings[0].model_id"),
        (image("bad-model", embedding("a/b", 1)), "inputs[0].data.embeddings[0].model_id"),
        (
            image("dims", embedding("dims", 1, 2, dims=3)),
            "inputs[0].data.embeddings[0].num_dimensions",
        ),
        (image("empty", embedding("empty")), "inputs[0].data.embeddings[0].vector"),
        (image("long", embedding("long", *([1.0] * 1537))), "inputs[0].data.embeddings[0].vector"),
    ]
    if builtin:
        cases.append(
            (image("builtin", embedding(builtin[0], 1)), "inputs[0].data.embeddings[0].model_id")
        )
    for given, field in cases:
        refused = await call_error(create(inputs, caller, given, atomic=True))
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT, given.id
        assert field in refused.fields, (given.id, refused.fields)
        # Per item in a non-atomic batch: the other input is created.
        batch = await create(inputs, caller, given, image(f"ok-{given.id}"))
        assert batch.results[0].outcome == INVALID
        assert field in {e.field for e in batch.results[0].errors}, given.id
        assert batch.results[1].outcome == CREATED
    for bad in (math.nan, math.inf):
        refused = await call_error(create(inputs, caller, image("nan", embedding("f", 1, bad))))
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
        assert any(f.startswith("inputs[0].data.embeddings[0].vector") for f in refused.fields)
    listed = await inputs.ListInputs(
        api.ListInputsRequest(app_id=caller.app_id), metadata=caller.metadata
    )
    assert sorted(i.id for i in listed.inputs) == sorted(
        ["first", *(f"ok-{given.id}" for given, _ in cases)]
    )
    known = await models(search, caller)
    assert known["dim2"].dimension == 2 and known["dim2"].embedded_count == 1
    # A refused request created no model.
    assert not {"too-many", "twice", "dims", "empty", "long", "m0", "same"} & set(known)


async def test_embeddings_in_annotations_are_refused(inputs: Inputs, caller: Caller) -> None:
    region = data_pb2.Region(
        region_info=data_pb2.RegionInfo(
            bounding_box=data_pb2.BoundingBox(
                top_row=0.1, left_col=0.1, bottom_row=0.9, right_col=0.9
            )
        ),
        data=data_pb2.Data(embeddings=[embedding("r", 1)]),
    )
    given = image("with-region")
    given.data.regions.append(region)
    refused = await call_error(create(inputs, caller, given))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[0].data.regions[0].data.embeddings" in refused.fields


async def test_an_upload_header_carries_vectors(inputs: Inputs, caller: Caller) -> None:
    payload = png_bytes(10, 10)
    header = api.UploadInputHeader(
        app_id=caller.app_id,
        input=input_pb2.Input(
            id="up",
            data=data_pb2.Data(image=data_pb2.Image(), embeddings=[embedding("up-model", 1, 2)]),
        ),
    )

    async def messages() -> AsyncIterator[api.UploadInputRequest]:
        yield api.UploadInputRequest(header=header)
        yield api.UploadInputRequest(chunk=payload)

    response = await inputs.UploadInput(messages(), metadata=caller.metadata)
    assert vectors_of(response.input) == {"up-model": [1, 2]}
    assert vectors_of(await get(inputs, caller, "up")) == {"up-model": [1, 2]}


async def test_built_in_embeddings_reach_ready(
    inputs: Inputs, search: Search, caller: Caller
) -> None:
    known = await models(search, caller)
    image_models = [
        m.id
        for m in known.values()
        if m.source != search_pb2.EMBEDDING_SOURCE_CLIENT
        and common_pb2.MEDIA_TYPE_IMAGE in m.media_types
    ]
    assert image_models, f"no installation model embeds images: {sorted(known)}"
    await create(inputs, caller, image("pic"))
    deadline = time.monotonic() + EMBED_DEADLINE
    while True:
        found = await states(search, caller, "pic", vectors=True)
        assert set(image_models) <= set(found)
        if all(found[m].state == search_pb2.EMBEDDING_STATE_READY for m in image_models):
            break
        assert all(
            found[m].state == search_pb2.EMBEDDING_STATE_PENDING
            for m in image_models
            if found[m].state != search_pb2.EMBEDDING_STATE_READY
        ), found
        assert time.monotonic() < deadline, f"not embedded after {EMBED_DEADLINE}s: {found}"
        await asyncio.sleep(0.2)
    for model_id in image_models:
        vector = list(found[model_id].vector)
        assert len(vector) == known[model_id].dimension
        assert math.isclose(math.sqrt(sum(v * v for v in vector)), 1.0, rel_tol=1e-3)
    # Built-in vectors are not the input's data.embeddings (those are the caller's).
    assert not (await get(inputs, caller, "pic")).data.embeddings


async def test_embeddings_of_an_unknown_input_are_not_found(search: Search, caller: Caller) -> None:
    missing = await call_error(
        search.GetInputEmbeddings(
            sapi.GetInputEmbeddingsRequest(app_id=caller.app_id, input_id="nope"),
            metadata=caller.metadata,
        )
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
