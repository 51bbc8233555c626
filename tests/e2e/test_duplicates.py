"""FindDuplicates through the real server: identical uploads are an exact group, the same
picture re-encoded or resized a near group once the built-in embedding job has run,
distinct pictures in no group; a version is looked at as it was built."""

from __future__ import annotations

import asyncio
import io
import random
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from datasetd.v1 import data_pb2, input_pb2, search_pb2, search_service_pb2_grpc
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import search_service_pb2 as sapi
from PIL import Image, ImageDraw

from tests.conftest import Caller
from tests.e2e.test_inputs import create, new_dataset, text_input
from tests.e2e.test_versions import build
from tests.helpers import call_error

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs
    from datasetd.v1.search_service_pb2_grpc import SearchServiceAsyncStub as Search

EMBED_TIMEOUT_SECONDS = 60.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module", name="search_stub")
def search_stub_fixture(channel: grpc.aio.Channel) -> Search:
    return search_service_pb2_grpc.SearchServiceStub(channel)


def picture(seed: int, size: int = 96) -> Image.Image:
    """A picture of coloured shapes on a coloured ground, different for every seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(size), rng.randrange(size)
        box = (x, y, x + rng.randrange(10, 60), y + rng.randrange(10, 60))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def encoded(image: Image.Image, form: str = "PNG", **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, form, **options)
    return out.getvalue()


def image_of(input_id: str, data: bytes) -> input_pb2.Input:
    return input_pb2.Input(id=input_id, data=data_pb2.Data(image=data_pb2.Image(base64=data)))


async def wait_embedded(search: Search, caller: Caller, input_ids: list[str]) -> None:
    deadline = asyncio.get_running_loop().time() + EMBED_TIMEOUT_SECONDS
    for input_id in input_ids:
        while True:
            response = await search.GetInputEmbeddings(
                sapi.GetInputEmbeddingsRequest(app_id=caller.app_id, input_id=input_id),
                metadata=caller.metadata,
            )
            states = [e.state for e in response.embeddings]
            if states and all(s == search_pb2.EMBEDDING_STATE_READY for s in states):
                break
            assert search_pb2.EMBEDDING_STATE_FAILED not in states, response
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{input_id} is not embedded: {response}")
            await asyncio.sleep(0.1)


async def duplicates(search: Search, caller: Caller, **request: Any) -> sapi.FindDuplicatesResponse:
    response: sapi.FindDuplicatesResponse = await search.FindDuplicates(
        sapi.FindDuplicatesRequest(app_id=caller.app_id, **request), metadata=caller.metadata
    )
    return response


def groups_of(response: sapi.FindDuplicatesResponse) -> list[tuple[tuple[str, ...], bool]]:
    return [(tuple(g.input_ids), g.exact) for g in response.groups]


def scope(dataset_id: str, version_id: str = "") -> search_pb2.SearchScope:
    return search_pb2.SearchScope(dataset_id=dataset_id, version_id=version_id)


async def test_exact_and_near_duplicates_in_a_dataset_and_its_version(
    inputs: Inputs, datasets: Datasets, versions: Versions, search_stub: Search, caller: Caller
) -> None:
    same = encoded(picture(1))
    base = picture(100)
    items = [
        image_of("e1", same),
        image_of("n1", encoded(base, "JPEG", quality=90)),
        image_of("u1", encoded(picture(2))),
        image_of("e2", same),
        image_of("n2", encoded(base, "JPEG", quality=40)),
        image_of("u2", encoded(picture(3))),
        image_of("n3", encoded(base.resize((72, 72)))),
        image_of("u3", encoded(picture(4))),
        text_input("t1", "the quick brown fox jumps over the lazy dog"),
        text_input("t2", "the quick brown fox jumps over the lazy dog"),
        text_input("t3", "quarterly revenue grew in every region but one"),
    ]
    ids = [i.id for i in items]
    await create(inputs, caller, items)
    await new_dataset(datasets, caller, "ds")
    await datasets.AddDatasetInputs(
        dapi.AddDatasetInputsRequest(app_id=caller.app_id, dataset_id="ds", input_ids=ids),
        metadata=caller.metadata,
    )
    exact = [(("e1", "e2"), True), (("t1", "t2"), True)]

    only = await duplicates(search_stub, caller, scope=scope("ds"), exact_only=True)
    assert groups_of(only) == exact
    assert (only.scanned_count, only.not_embedded_count) == (len(ids), 0)
    assert all(g.min_similarity == 1 for g in only.groups)

    await wait_embedded(search_stub, caller, ids)
    found = await duplicates(search_stub, caller, scope=scope("ds"))
    assert groups_of(found) == [*exact, (("n1", "n2", "n3"), False)]
    assert (found.scanned_count, found.not_embedded_count) == (len(ids), 0)
    assert 0.95 <= found.groups[2].min_similarity <= 1
    # Above the group's lowest pair, that pair no longer joins it; the others may still.
    threshold = found.groups[2].min_similarity + 1e-3
    strict = await duplicates(search_stub, caller, scope=scope("ds"), threshold=threshold)
    assert groups_of(strict)[:2] == exact
    near = strict.groups[2:]
    assert all(g.min_similarity >= threshold - 1e-6 for g in near)
    assert {i for g in near for i in g.input_ids} <= {"n1", "n2", "n3"}
    # Re-encoded is not identical: at 0.999 only the exact groups are left.
    assert groups_of(await duplicates(search_stub, caller, scope=scope("ds"), threshold=0.999)) == (
        exact
    )

    await build(versions, caller, "ds", "v1")
    await datasets.RemoveDatasetInputs(
        dapi.RemoveDatasetInputsRequest(app_id=caller.app_id, dataset_id="ds", input_ids=["e2"]),
        metadata=caller.metadata,
    )
    now = await duplicates(search_stub, caller, scope=scope("ds"))
    assert groups_of(now) == [(("t1", "t2"), True), (("n1", "n2", "n3"), False)]
    then = await duplicates(search_stub, caller, scope=scope("ds", "v1"))
    assert groups_of(then) == groups_of(found)
    assert then.scanned_count == len(ids)


async def test_bad_requests_name_the_field(
    inputs: Inputs, datasets: Datasets, search_stub: Search, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "ds")

    async def refused(**request: Any) -> tuple[grpc.StatusCode, set[str]]:
        error = await call_error(duplicates(search_stub, caller, **request))
        return error.code, set(error.fields)

    assert await refused() == (INVALID, {"scope.dataset_id"})
    assert await refused(scope=scope("ds"), threshold=0.3) == (INVALID, {"threshold"})
    assert await refused(scope=scope("ds"), threshold=1.5) == (INVALID, {"threshold"})
    code, fields = await refused(scope=scope("nope"))
    assert code == grpc.StatusCode.NOT_FOUND and fields == {"scope.dataset_id"}
    code, fields = await refused(scope=scope("ds", "nope"))
    assert code == grpc.StatusCode.NOT_FOUND and fields == {"scope.version_id"}
    error = await call_error(duplicates(search_stub, caller, scope=scope("ds"), model_id="nope"))
    assert error.code == grpc.StatusCode.NOT_FOUND and "nope" in error.message
    # An empty dataset has no duplicates, and says how many inputs it looked at.
    empty = await duplicates(search_stub, caller, scope=scope("ds"), threshold=0.5)
    assert (list(empty.groups), empty.scanned_count, empty.not_embedded_count) == ([], 0, 0)
