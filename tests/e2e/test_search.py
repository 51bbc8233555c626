"""SearchService.SearchInputs as a caller sees it: every filter, ranks by a vector, an
input, image bytes and a text, min_score, pages, dataset and version scopes, and each
bad query refused with its code and field, nothing written."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
from datasetd.v1 import common_pb2, data_pb2, dataset_version_pb2, input_pb2, search_pb2
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import dataset_version_service_pb2 as vapi
from datasetd.v1 import input_service_pb2 as api
from datasetd.v1 import search_service_pb2 as sapi
from google.protobuf import timestamp_pb2

from service.domain.versions import RETIRED_BUILD
from service.storage.db import Database
from tests.conftest import Caller
from tests.e2e.test_inputs import metadata, new_dataset
from tests.e2e.test_versions import build
from tests.helpers import call_error, png_bytes

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs
    from datasetd.v1.search_service_pb2_grpc import SearchServiceAsyncStub as Search

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EMBED_DEADLINE = 60.0
MODEL = "vec2"


def point(latitude: float, longitude: float) -> data_pb2.Geo:
    return data_pb2.Geo(geo_point=data_pb2.GeoPoint(latitude=latitude, longitude=longitude))


def angle(degrees: float) -> data_pb2.Embedding:
    """A unit vector of MODEL at this angle: its cosine to (1, 0) is cos(degrees)."""
    radians = math.radians(degrees)
    return data_pb2.Embedding(model_id=MODEL, vector=[math.cos(radians), math.sin(radians)])


def an_image(
    input_id: str, color: tuple[int, int, int] = (10, 20, 30), **data: Any
) -> input_pb2.Input:
    return input_pb2.Input(
        id=input_id,
        data=data_pb2.Data(image=data_pb2.Image(base64=png_bytes(16, 12, color)), **data),
    )


def a_text(input_id: str, raw: str, **data: Any) -> input_pb2.Input:
    return input_pb2.Input(id=input_id, data=data_pb2.Data(text=data_pb2.Text(raw=raw), **data))


async def create(inputs: Inputs, caller: Caller, *items: input_pb2.Input) -> list[input_pb2.Input]:
    """The inputs created, as GetInput shows them (with their creation times)."""
    await inputs.CreateInputs(
        api.CreateInputsRequest(app_id=caller.app_id, inputs=items, atomic=True),
        metadata=caller.metadata,
    )
    response = await inputs.ListInputs(
        api.ListInputsRequest(app_id=caller.app_id, ids=[i.id for i in items]),
        metadata=caller.metadata,
    )
    by_id = {i.id: i for i in response.inputs}
    return [by_id[i.id] for i in items]


async def page(
    search: Search,
    caller: Caller,
    query: search_pb2.SearchQuery,
    *,
    size: int = 0,
    token: str = "",
) -> sapi.SearchInputsResponse:
    response: sapi.SearchInputsResponse = await search.SearchInputs(
        sapi.SearchInputsRequest(
            app_id=caller.app_id, query=query, page_size=size, page_token=token
        ),
        metadata=caller.metadata,
    )
    return response


async def hits(
    search: Search, caller: Caller, query: search_pb2.SearchQuery, *, size: int = 0
) -> list[search_pb2.SearchHit]:
    """Every hit, page after page (never one twice)."""
    found: list[search_pb2.SearchHit] = []
    token = ""
    for _ in range(100):
        response = await page(search, caller, query, size=size, token=token)
        found += response.hits
        shown = [h.input.id for h in found]
        assert len(shown) == len(set(shown)), f"a hit repeats: {shown}"
        token = response.next_page_token
        if not token:
            return found
    raise AssertionError(f"more than 100 pages: {[h.input.id for h in found]}")


async def ids(search: Search, caller: Caller, **query: Any) -> list[str]:
    return [h.input.id for h in await hits(search, caller, search_pb2.SearchQuery(**query))]


async def test_every_filter(inputs: Inputs, search: Search, caller: Caller) -> None:
    box = data_pb2.BoundingBox(top_row=0.1, left_col=0.1, bottom_row=0.5, right_col=0.5)
    region = data_pb2.Region(
        region_info=data_pb2.RegionInfo(bounding_box=box),
        data=data_pb2.Data(concepts=[data_pb2.Concept(id="dog", value=1)]),
    )
    first = await create(
        inputs,
        caller,
        an_image(
            "cat-paris",
            concepts=[data_pb2.Concept(id="cat", value=1)],
            metadata=metadata({"camera": {"make": "acme"}, "n": 1}),
            geo=point(48.8566, 2.3522),
        ),
        an_image("dog-region", regions=[region], geo=point(48.9, 2.4)),
        an_image("plain", metadata=metadata({"camera": {"make": "other"}})),
    )
    await asyncio.sleep(0.01)
    later = await create(
        inputs,
        caller,
        a_text("words", "hello there", geo=point(-33.8688, 151.2093)),
        an_image("cat-dog", concepts=[data_pb2.Concept(id="cat", value=1)], regions=[region]),
    )
    everything = ["cat-paris", "dog-region", "plain", "words", "cat-dog"]
    # Unranked: creation order, score 0.
    all_hits = await hits(search, caller, search_pb2.SearchQuery())
    assert [h.input.id for h in all_hits] == everything
    assert all(h.score == 0 for h in all_hits)
    assert await ids(search, caller, concept_ids=["cat"]) == ["cat-paris", "cat-dog"]
    assert await ids(search, caller, concept_ids=["dog"]) == ["dog-region", "cat-dog"]
    assert await ids(search, caller, concept_ids=["cat", "dog"]) == ["cat-dog"]
    assert await ids(search, caller, negative_concept_ids=["cat"]) == [
        "dog-region",
        "plain",
        "words",
    ]
    assert await ids(search, caller, concept_ids=["cat"], negative_concept_ids=["dog"]) == [
        "cat-paris"
    ]
    assert await ids(search, caller, metadata=metadata({"camera": {"make": "acme"}})) == [
        "cat-paris"
    ]
    assert await ids(search, caller, metadata=metadata({"camera": {}})) == ["cat-paris", "plain"]
    assert await ids(search, caller, media_types=[common_pb2.MEDIA_TYPE_TEXT]) == ["words"]
    assert (
        await ids(
            search, caller, media_types=[common_pb2.MEDIA_TYPE_TEXT, common_pb2.MEDIA_TYPE_IMAGE]
        )
        == everything
    )
    assert await ids(search, caller, media_types=[common_pb2.MEDIA_TYPE_VIDEO]) == []
    annotated = await ids(search, caller, annotation_state=common_pb2.ANNOTATION_STATE_ANNOTATED)
    unannotated = await ids(
        search, caller, annotation_state=common_pb2.ANNOTATION_STATE_UNANNOTATED
    )
    assert {"dog-region", "cat-dog"} <= set(annotated)
    assert {"plain", "words"} <= set(unannotated)
    assert sorted(annotated + unannotated) == sorted(everything)
    # The same filter as ListInputs answers it.
    listed = await inputs.ListInputs(
        api.ListInputsRequest(
            app_id=caller.app_id,
            filter=common_pb2.InputFilter(annotation_state=common_pb2.ANNOTATION_STATE_ANNOTATED),
        ),
        metadata=caller.metadata,
    )
    assert annotated == [i.id for i in listed.inputs]
    # Paris to the second point is about 6 km; Sydney is 17,000 km away.
    near_paris = search_pb2.GeoRadius(latitude=48.8566, longitude=2.3522, radius_km=10)
    assert await ids(search, caller, geo_radius=near_paris) == ["cat-paris", "dog-region"]
    tight = search_pb2.GeoRadius(latitude=48.8566, longitude=2.3522, radius_km=1)
    assert await ids(search, caller, geo_radius=tight) == ["cat-paris"]
    whole = search_pb2.GeoRadius(latitude=0, longitude=0, radius_km=20_038)
    assert await ids(search, caller, geo_radius=whole) == ["cat-paris", "dog-region", "words"]
    box_south = search_pb2.GeoBox(
        min_latitude=-40, max_latitude=-30, min_longitude=150, max_longitude=152
    )
    assert await ids(search, caller, geo_box=box_south) == ["words"]
    box_paris = search_pb2.GeoBox(
        min_latitude=48.85, max_latitude=48.86, min_longitude=2.3, max_longitude=2.4
    )
    assert await ids(search, caller, geo_box=box_paris) == ["cat-paris"]
    # created_after is inclusive, created_before exclusive.
    boundary = later[0].created_at
    assert await ids(search, caller, created_after=boundary) == ["words", "cat-dog"]
    assert await ids(search, caller, created_before=boundary) == [
        "cat-paris",
        "dog-region",
        "plain",
    ]
    # One transaction, one creation time: the first three share it.
    just_after = timestamp_pb2.Timestamp()
    just_after.FromDatetime(first[0].created_at.ToDatetime() + timedelta(microseconds=1))
    assert await ids(
        search, caller, created_after=first[0].created_at, created_before=just_after
    ) == ["cat-paris", "dog-region", "plain"]
    # Conditions combine.
    assert await ids(
        search,
        caller,
        concept_ids=["cat"],
        media_types=[common_pb2.MEDIA_TYPE_IMAGE],
        geo_radius=near_paris,
    ) == ["cat-paris"]
    # A hit is the input as GetInput shows it.
    got = await inputs.GetInput(
        api.GetInputRequest(app_id=caller.app_id, input_id="cat-paris"), metadata=caller.metadata
    )
    (hit,) = await hits(
        search, caller, search_pb2.SearchQuery(concept_ids=["cat"], geo_radius=tight)
    )
    shown, expected = hit.input, got.input
    # Download URLs are signed per call; everything else is the same.
    assert shown.data.image.url and expected.data.image.url
    shown.data.image.url = expected.data.image.url = ""
    assert shown == expected


async def vector_inputs(inputs: Inputs, caller: Caller) -> None:
    """Seven inputs at 0, 10, ..., 60 degrees from (1, 0), created in reverse order of
    similarity, and one without a vector."""
    await create(
        inputs,
        caller,
        *(an_image(f"deg{d}", embeddings=[angle(d)]) for d in (60, 50, 40, 30, 20, 10, 0)),
        an_image("no-vector"),
    )


def query_vector(degrees: float, **rank: Any) -> search_pb2.SearchQuery:
    radians = math.radians(degrees)
    values = [math.cos(radians), math.sin(radians)]
    return search_pb2.SearchQuery(
        rank=search_pb2.Rank(vector=search_pb2.QueryVector(values=values), model_id=MODEL, **rank)
    )


async def test_ranked_by_a_vector_with_min_score_and_pages(
    inputs: Inputs, search: Search, caller: Caller
) -> None:
    await vector_inputs(inputs, caller)
    ranked = await hits(search, caller, query_vector(0))
    assert [h.input.id for h in ranked] == [f"deg{d}" for d in (0, 10, 20, 30, 40, 50, 60)]
    for h in ranked:
        degrees = int(h.input.id.removeprefix("deg"))
        assert math.isclose(h.score, math.cos(math.radians(degrees)), abs_tol=1e-4)
    # Each hit is the input as GetInput shows it, its client vector included (read with
    # the page, not by GetInput's own query); unranked pages show them too.
    unranked = await hits(search, caller, search_pb2.SearchQuery())
    for h in [*ranked, *unranked]:
        got = await inputs.GetInput(
            api.GetInputRequest(app_id=caller.app_id, input_id=h.input.id),
            metadata=caller.metadata,
        )
        shown, expected = h.input, got.input
        assert [len(e.vector) for e in shown.data.embeddings] == (
            [] if h.input.id == "no-vector" else [2]
        )
        assert shown.data.image.url and expected.data.image.url
        shown.data.image.url = expected.data.image.url = ""
        assert shown == expected, h.input.id
    # A query between two of them: 25 degrees is as close to 20 as to 30.
    middle = [h.input.id for h in await hits(search, caller, query_vector(35))]
    assert middle[:2] in (["deg30", "deg40"], ["deg40", "deg30"])
    assert len(middle) == 7
    threshold = math.cos(math.radians(25))
    kept = await hits(search, caller, query_vector(0, min_score=threshold))
    assert [h.input.id for h in kept] == ["deg0", "deg10", "deg20"]
    # Pages of every size concatenate to the one big page, no repeats.
    for size in (1, 2, 3, 7):
        paged = await hits(search, caller, query_vector(0), size=size)
        assert [h.input.id for h in paged] == [h.input.id for h in ranked], size
    first = await page(search, caller, query_vector(0), size=3)
    assert len(first.hits) == 3 and first.next_page_token
    # Ranked by an input: its own vector, the input itself left out.
    by_input = search_pb2.SearchQuery(rank=search_pb2.Rank(input_id="deg30", model_id=MODEL))
    around = [h.input.id for h in await hits(search, caller, by_input)]
    # Pairs as far from 30 degrees score the same (up to rounding).
    pairs = [set(around[0:2]), set(around[2:4]), set(around[4:6])]
    assert len(around) == 6
    assert pairs == [{"deg20", "deg40"}, {"deg10", "deg50"}, {"deg0", "deg60"}]
    # Filters apply to ranked searches too.
    filtered = query_vector(0)
    filtered.media_types.append(common_pb2.MEDIA_TYPE_TEXT)
    assert await hits(search, caller, filtered) == []


async def test_a_page_token_is_bound_to_its_query(
    inputs: Inputs, search: Search, caller: Caller
) -> None:
    await vector_inputs(inputs, caller)
    token = (await page(search, caller, query_vector(0), size=2)).next_page_token
    assert token
    for other in (query_vector(1), search_pb2.SearchQuery()):
        refused = await call_error(page(search, caller, other, size=2, token=token))
        assert refused.code == INVALID
        assert "page_token" in refused.fields
    tampered = await call_error(page(search, caller, query_vector(0), size=2, token=token[:-2]))
    assert tampered.code == INVALID and "page_token" in tampered.fields
    # The page size may change between pages of one query.
    rest = await page(search, caller, query_vector(0), size=10, token=token)
    assert [h.input.id for h in rest.hits] == [f"deg{d}" for d in (20, 30, 40, 50, 60)]


async def test_page_size_rules(search: Search, caller: Caller) -> None:
    refused = await call_error(page(search, caller, search_pb2.SearchQuery(), size=-1))
    assert refused.code == INVALID and "page_size" in refused.fields


async def test_dataset_and_version_scopes(
    inputs: Inputs, datasets: Datasets, versions: Versions, search: Search, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "set")
    await create(
        inputs,
        caller,
        an_image("in-a", embeddings=[angle(0)], metadata=metadata({"k": "old"})),
        an_image("in-b", embeddings=[angle(30)]),
        an_image("outside", embeddings=[angle(0)], metadata=metadata({"k": "old"})),
    )
    await datasets.AddDatasetInputs(
        dapi.AddDatasetInputsRequest(
            app_id=caller.app_id, dataset_id="set", input_ids=["in-a", "in-b"]
        ),
        metadata=caller.metadata,
    )
    scope = search_pb2.SearchScope(dataset_id="set")
    assert await ids(search, caller, scope=scope) == ["in-a", "in-b"]
    await build(versions, caller, "set", "v1")
    # Edits after the version: metadata and vector replaced, one input deleted, one added.
    await inputs.UpdateInputs(
        api.UpdateInputsRequest(
            app_id=caller.app_id,
            inputs=[
                input_pb2.Input(
                    id="in-a",
                    data=data_pb2.Data(metadata=metadata({"k": "new"}), embeddings=[angle(90)]),
                )
            ],
            action=common_pb2.PATCH_ACTION_OVERWRITE,
        ),
        metadata=caller.metadata,
    )
    await inputs.DeleteInputs(
        api.DeleteInputsRequest(app_id=caller.app_id, ids=["in-b"]), metadata=caller.metadata
    )
    await create(inputs, caller, an_image("in-c", embeddings=[angle(5)]))
    await datasets.AddDatasetInputs(
        dapi.AddDatasetInputsRequest(app_id=caller.app_id, dataset_id="set", input_ids=["in-c"]),
        metadata=caller.metadata,
    )
    pinned = search_pb2.SearchScope(dataset_id="set", version_id="v1")
    assert await ids(search, caller, scope=scope) == ["in-a", "in-c"]
    assert await ids(search, caller, scope=pinned) == ["in-a", "in-b"]
    old = metadata({"k": "old"})
    assert await ids(search, caller, scope=pinned, metadata=old) == ["in-a"]
    assert await ids(search, caller, scope=scope, metadata=old) == []
    # The version is ranked by the vectors it captured: in-a still at 0 degrees.
    ranked = query_vector(0)
    ranked.scope.CopyFrom(pinned)
    pinned_hits = await hits(search, caller, ranked)
    assert [h.input.id for h in pinned_hits] == ["in-a", "in-b"]
    assert math.isclose(pinned_hits[0].score, 1.0, abs_tol=1e-4)
    ranked.scope.CopyFrom(scope)
    assert [h.input.id for h in await hits(search, caller, ranked)] == ["in-c", "in-a"]
    # Ranked by an input deleted since: the vector the version captured (30 degrees).
    by_deleted = search_pb2.SearchQuery(
        scope=pinned, rank=search_pb2.Rank(input_id="in-b", model_id=MODEL)
    )
    (only,) = await hits(search, caller, by_deleted)
    assert only.input.id == "in-a"
    assert math.isclose(only.score, math.cos(math.radians(30)), abs_tol=1e-4)
    gone = await call_error(page(search, caller, search_pb2.SearchQuery(rank=by_deleted.rank)))
    assert gone.code == NOT_FOUND and "query.rank.input_id" in gone.fields


async def test_a_version_hit_shows_the_content_it_captured(
    inputs: Inputs, datasets: Datasets, versions: Versions, search: Search, caller: Caller
) -> None:
    """search.proto: a hit in a version scope is the input with "the content the version
    captured", not its later edits."""
    await new_dataset(datasets, caller, "set")
    old = metadata({"k": "old"})
    await create(inputs, caller, an_image("kept", metadata=old))
    await datasets.AddDatasetInputs(
        dapi.AddDatasetInputsRequest(app_id=caller.app_id, dataset_id="set", input_ids=["kept"]),
        metadata=caller.metadata,
    )
    await build(versions, caller, "set", "v1")
    await inputs.UpdateInputs(
        api.UpdateInputsRequest(
            app_id=caller.app_id,
            inputs=[input_pb2.Input(id="kept", data=data_pb2.Data(metadata=metadata({"k": 2})))],
            action=common_pb2.PATCH_ACTION_OVERWRITE,
        ),
        metadata=caller.metadata,
    )
    pinned = search_pb2.SearchScope(dataset_id="set", version_id="v1")
    (hit,) = await hits(search, caller, search_pb2.SearchQuery(scope=pinned))
    assert hit.input.data.metadata == old


async def test_rank_by_image_bytes_and_text_with_the_built_in_models(
    inputs: Inputs, search: Search, caller: Caller
) -> None:
    models = await search.ListEmbeddingModels(
        sapi.ListEmbeddingModelsRequest(app_id=caller.app_id), metadata=caller.metadata
    )
    installed = [m for m in models.models if m.source != search_pb2.EMBEDDING_SOURCE_CLIENT]
    image_model = next(m for m in installed if common_pb2.MEDIA_TYPE_IMAGE in m.media_types)
    text_model = next(m for m in installed if m.accepts_text_queries)
    red, blue = (220, 20, 20), (20, 20, 220)
    await create(
        inputs,
        caller,
        an_image("red", red),
        an_image("blue", blue),
        a_text("about-cats", "cats purr and sleep on warm windowsills"),
        a_text("about-ships", "container ships cross the ocean with cargo"),
    )
    deadline = time.monotonic() + EMBED_DEADLINE
    for input_id, model in (
        ("red", image_model),
        ("blue", image_model),
        ("about-cats", text_model),
        ("about-ships", text_model),
    ):
        while True:
            found = await search.GetInputEmbeddings(
                sapi.GetInputEmbeddingsRequest(app_id=caller.app_id, input_id=input_id),
                metadata=caller.metadata,
            )
            state = {e.model_id: e.state for e in found.embeddings}.get(model.id)
            if state == search_pb2.EMBEDDING_STATE_READY:
                break
            assert state == search_pb2.EMBEDDING_STATE_PENDING, (input_id, found)
            assert time.monotonic() < deadline, f"{input_id} not embedded in time"
            await asyncio.sleep(0.2)
    by_image = search_pb2.SearchQuery(
        rank=search_pb2.Rank(image_bytes=png_bytes(20, 20, (230, 25, 25)))
    )
    ranked = await hits(search, caller, by_image)
    assert [h.input.id for h in ranked] == ["red", "blue"]
    assert ranked[0].score > ranked[1].score
    by_text = search_pb2.SearchQuery(
        rank=search_pb2.Rank(text="cats purr on windowsills", model_id=text_model.id),
        media_types=[common_pb2.MEDIA_TYPE_TEXT],
    )
    texts = await hits(search, caller, by_text)
    assert texts[0].input.id == "about-cats"
    # By an input with the default model of its media type.
    by_input = search_pb2.SearchQuery(rank=search_pb2.Rank(input_id="red"))
    assert [h.input.id for h in await hits(search, caller, by_input)] == ["blue"]
    # Undecodable image bytes are the caller's mistake.
    refused = await call_error(
        page(search, caller, search_pb2.SearchQuery(rank=search_pb2.Rank(image_bytes=b"nope")))
    )
    assert refused.code == INVALID and "query.rank.image_bytes" in refused.fields


def rank_query(**rank: Any) -> search_pb2.SearchQuery:
    return search_pb2.SearchQuery(rank=search_pb2.Rank(**rank))


async def test_bad_queries_are_refused_by_field_and_write_nothing(
    inputs: Inputs,
    datasets: Datasets,
    versions: Versions,
    search: Search,
    caller: Caller,
    db: Database,
) -> None:
    await vector_inputs(inputs, caller)
    await new_dataset(datasets, caller, "ds")
    models = await search.ListEmbeddingModels(
        sapi.ListEmbeddingModelsRequest(app_id=caller.app_id), metadata=caller.metadata
    )
    image_only = [
        m.id
        for m in models.models
        if m.source != search_pb2.EMBEDDING_SOURCE_CLIENT and not m.accepts_text_queries
    ]
    vector = search_pb2.QueryVector
    cases: list[tuple[search_pb2.SearchQuery, grpc.StatusCode, str]] = [
        (rank_query(input_id="nope", model_id=MODEL), NOT_FOUND, "query.rank.input_id"),
        (rank_query(input_id="nope"), NOT_FOUND, "query.rank.input_id"),
        (rank_query(input_id="no-vector", model_id=MODEL), PRECONDITION, "query.rank.input_id"),
        (
            rank_query(vector=vector(values=[1, 0, 0]), model_id=MODEL),
            INVALID,
            "query.rank.vector.values",
        ),
        (rank_query(vector=vector(values=[1, 0])), INVALID, "query.rank.model_id"),
        (
            rank_query(vector=vector(values=[1, 0]), model_id="unknown"),
            NOT_FOUND,
            "query.rank.model_id",
        ),
        (rank_query(text="a cat", model_id=MODEL), INVALID, "query.rank.text"),
        (rank_query(model_id=MODEL), INVALID, "query.rank"),
        (
            rank_query(input_id="deg0", min_score=1.5, model_id=MODEL),
            INVALID,
            "query.rank.min_score",
        ),
        (
            search_pb2.SearchQuery(geo_radius=search_pb2.GeoRadius(latitude=91, radius_km=1)),
            INVALID,
            "query.geo_radius.latitude",
        ),
        (
            search_pb2.SearchQuery(geo_radius=search_pb2.GeoRadius(longitude=-181, radius_km=1)),
            INVALID,
            "query.geo_radius.longitude",
        ),
        (
            search_pb2.SearchQuery(geo_radius=search_pb2.GeoRadius(radius_km=-1)),
            INVALID,
            "query.geo_radius.radius_km",
        ),
        (
            search_pb2.SearchQuery(geo_radius=search_pb2.GeoRadius(radius_km=0)),
            INVALID,
            "query.geo_radius.radius_km",
        ),
        (
            search_pb2.SearchQuery(
                geo_box=search_pb2.GeoBox(
                    min_latitude=10, max_latitude=5, min_longitude=0, max_longitude=1
                )
            ),
            INVALID,
            "query.geo_box.min_latitude",
        ),
        (
            search_pb2.SearchQuery(
                geo_radius=search_pb2.GeoRadius(radius_km=1),
                geo_box=search_pb2.GeoBox(max_latitude=1, max_longitude=1),
            ),
            INVALID,
            "query.geo_box",
        ),
        (
            search_pb2.SearchQuery(
                created_after=timestamp_pb2.Timestamp(seconds=2000),
                created_before=timestamp_pb2.Timestamp(seconds=1000),
            ),
            INVALID,
            "query.created_before",
        ),
        (search_pb2.SearchQuery(concept_ids=[""]), INVALID, "query.concept_ids[0]"),
        (
            search_pb2.SearchQuery(scope=search_pb2.SearchScope(dataset_id="missing")),
            NOT_FOUND,
            "query.scope.dataset_id",
        ),
        (
            search_pb2.SearchQuery(scope=search_pb2.SearchScope(dataset_id="ds", version_id="v9")),
            NOT_FOUND,
            "query.scope.version_id",
        ),
        (
            search_pb2.SearchQuery(scope=search_pb2.SearchScope(version_id="v9")),
            INVALID,
            "query.scope.version_id",
        ),
    ]
    if image_only:
        cases.append((rank_query(text="a cat", model_id=image_only[0]), INVALID, "query.rank.text"))
    nan_values = vector(values=[math.nan, 0])
    cases.append((rank_query(vector=nan_values, model_id=MODEL), INVALID, "query.rank.vector"))
    inf_values = vector(values=[math.inf, 0])
    cases.append((rank_query(vector=inf_values, model_id=MODEL), INVALID, "query.rank.vector"))
    before = await ids(search, caller)
    for query, code, field in cases:
        refused = await call_error(page(search, caller, query))
        assert refused.code == code, (query, refused)
        assert any(
            f == field or f.startswith(field + ".") or f.startswith(field + "[")
            for f in refused.fields
        ), (field, refused.fields)
    # A version that is not READY: one that was building when datasetd was upgraded,
    # failed by migration 0014 (versions are READY when created, there is no build to
    # cancel: the cancel is refused).
    await create(inputs, caller, an_image("member"))
    await datasets.AddDatasetInputs(
        dapi.AddDatasetInputsRequest(app_id=caller.app_id, dataset_id="ds", input_ids=["member"]),
        metadata=caller.metadata,
    )
    await versions.CreateDatasetVersion(
        vapi.CreateDatasetVersionRequest(
            app_id=caller.app_id,
            dataset_id="ds",
            version=dataset_version_pb2.DatasetVersion(id="failed"),
        ),
        metadata=caller.metadata,
    )
    ended = await call_error(
        versions.CancelDatasetVersionBuild(
            vapi.CancelDatasetVersionBuildRequest(
                app_id=caller.app_id, dataset_id="ds", version_id="failed"
            ),
            metadata=caller.metadata,
        )
    )
    assert (ended.code, ended.reason) == (PRECONDITION, "VERSION_BUILD_ENDED")
    pinned = search_pb2.SearchQuery(
        scope=search_pb2.SearchScope(dataset_id="ds", version_id="failed")
    )
    assert [h.input.id for h in (await page(search, caller, pinned)).hits] == ["member"]
    await db.execute(
        "UPDATE dataset_versions SET status = 'failed', details = $2"
        " WHERE app_id = $1 AND dataset_id = 'ds' AND id = 'failed'",
        caller.app_id,
        RETIRED_BUILD,
    )
    refused = await call_error(page(search, caller, pinned))
    assert refused.code == PRECONDITION
    assert refused.reason == "VERSION_NOT_READY"
    assert "query.scope.version_id" in refused.fields
    assert await ids(search, caller) == [*before, "member"]
