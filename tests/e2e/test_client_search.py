"""Search through the synchronous `service.client` library against the real server: the
query's keyword arguments, pages of hits, versions searched as captured, add-from-search,
duplicates, the embedding models, client vectors given on upload, and the errors.

As in test_client.py, every blocking client call runs in a thread (`run`).
"""

from __future__ import annotations

import gc
import itertools
import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from datasetd.v1 import common_pb2, data_pb2, input_pb2
from datasetd.v1 import input_service_pb2 as iapi
from google.protobuf import struct_pb2

from service.app import Running
from service.client import (
    Client,
    FailedPreconditionError,
    Hit,
    InvalidArgumentError,
    NotFoundError,
    UploadItem,
)
from service.client.search import search_query
from service.domain.search_jobs import SearchJobService
from tests.conftest import Caller
from tests.e2e.test_client import fails, run
from tests.readme import fenced_block

MODEL = "test-vec"
# Unit vectors of MODEL: a and d nearly the same direction, b 37 degrees off, c orthogonal.
VECTORS = {
    "a": (1.0, 0.0, 0.0, 0.0),
    "b": (0.8, 0.6, 0.0, 0.0),
    "c": (0.0, 1.0, 0.0, 0.0),
    "d": (0.999, 0.0447, 0.0, 0.0),
}
PARIS = (2.3522, 48.8566)  # (longitude, latitude), as UploadItem.geo takes them
LONDON = (-0.1276, 51.5072)


def items() -> list[UploadItem]:
    return [
        UploadItem(
            "a",
            kind="text",
            text="the cat sat on the mat",
            concepts=("cat",),
            metadata={"camera": "x", "n": 1},
            geo=PARIS,
            embeddings={MODEL: VECTORS["a"]},
        ),
        UploadItem(
            "b",
            kind="text",
            text="a cat and a dog",
            concepts=("cat", "dog"),
            metadata={"camera": "y", "n": 2},
            geo=LONDON,
            embeddings={MODEL: VECTORS["b"]},
        ),
        UploadItem(
            "c",
            kind="text",
            text="a dog in the park",
            concepts=("dog",),
            metadata={"camera": "y", "n": 3},
            embeddings={MODEL: VECTORS["c"]},
        ),
        # The same text as "a": an exact duplicate of it.
        UploadItem(
            "d", kind="text", text="the cat sat on the mat", embeddings={MODEL: VECTORS["d"]}
        ),
    ]


@pytest.fixture
def client(server: Running, caller: Caller) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.port}", caller.key, caller.app_id) as opened:
        yield opened


async def pets(client: Client) -> None:
    """Dataset "pets" with the four inputs of `items`, their vectors given on upload."""

    def upload() -> None:
        client.datasets.create("pets")
        result = client.dataset("pets").upload_inputs(items(), show_progress=False)
        assert result.failed == 0 and not result.failures, result

    await run(upload)


def ids(hits: list[Hit]) -> list[str]:
    return [hit.input.id for hit in hits]


async def found(client: Client, dataset: str | None = "pets", **query: object) -> list[Hit]:
    def search() -> list[Hit]:
        pages = (
            client.dataset(dataset).search(**query)  # type: ignore[arg-type]
            if dataset
            else client.search(**query)  # type: ignore[arg-type]
        )
        return [hit for page in pages for hit in page]

    return await run(search)


def cosine(u: tuple[float, ...], v: tuple[float, ...]) -> float:
    dot = sum(x * y for x, y in zip(u, v, strict=True))
    return dot / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))


async def test_rank_by_a_vector_an_input_and_a_minimum_score(client: Client) -> None:
    await pets(client)
    by_vector = await found(client, vector=[1, 0, 0, 0], model_id=MODEL)
    assert ids(by_vector) == ["a", "d", "b", "c"]
    for hit in by_vector:
        assert hit.score == pytest.approx(cosine((1, 0, 0, 0), VECTORS[hit.input.id]), abs=1e-4)
    assert by_vector[0].input.media_type == "text" and by_vector[0].input.concepts == ["cat"]
    assert by_vector[0].input.metadata == {"camera": "x", "n": 1}

    # The input ranked against is not its own hit.
    similar = await found(client, similar_to="a", model_id=MODEL)
    assert ids(similar) == ["d", "b", "c"]
    best = await found(client, similar_to="a", model_id=MODEL, min_score=0.7)
    assert ids(best) == ["d", "b"]
    # App scope sees the same inputs.
    assert ids(await found(client, None, vector=[0, 1, 0, 0], model_id=MODEL))[:2] == ["c", "b"]


async def test_every_filter(client: Client) -> None:
    await pets(client)
    every = ids(await found(client))
    # Unranked: creation order, score 0.
    assert every == ["a", "b", "c", "d"]
    assert {hit.score for hit in await found(client)} == {0.0}
    assert ids(await found(client, concepts=["cat"])) == ["a", "b"]
    assert ids(await found(client, concepts=["cat", "dog"])) == ["b"]
    assert ids(await found(client, not_concepts=["dog"])) == ["a", "d"]
    assert ids(await found(client, metadata={"camera": "y"})) == ["b", "c"]
    assert ids(await found(client, metadata={"camera": "y", "n": 3})) == ["c"]
    assert ids(await found(client, media_types=["text"])) == every
    assert ids(await found(client, media_types=["image", "video"])) == []
    # Within 50 km of Paris; inside a box around London.
    assert ids(await found(client, near=(48.85, 2.35, 50))) == ["a"]
    assert ids(await found(client, near=(48.85, 2.35, 400))) == ["a", "b"]
    assert ids(await found(client, box=(51.0, 52.0, -1.0, 0.0))) == ["b"]
    # Annotated and unannotated split the inputs.
    annotated = set(ids(await found(client, annotated=True)))
    unannotated = set(ids(await found(client, annotated=False)))
    assert annotated | unannotated == set(every) and not annotated & unannotated
    now = datetime.now(UTC)
    assert ids(await found(client, created_after=now + timedelta(minutes=5))) == []
    assert ids(await found(client, created_before=now + timedelta(minutes=5))) == every
    assert ids(await found(client, created_after=now - timedelta(hours=1))) == every
    # Filters combine with a rank.
    ranked = await found(client, vector=[0, 1, 0, 0], model_id=MODEL, concepts=["cat"])
    assert ids(ranked) == ["b", "a"]


async def test_pages_and_limit(client: Client) -> None:
    await pets(client)
    query = {"vector": [1, 0, 0, 0], "model_id": MODEL}
    pages = await run(lambda: list(client.dataset("pets").search(page_size=1, **query)))  # type: ignore[arg-type]
    assert [len(page) for page in pages] == [1, 1, 1, 1]
    assert [p.next_page_token != "" for p in pages] == [True, True, True, False]
    assert [hit.input.id for page in pages for hit in page] == ["a", "d", "b", "c"]

    limited = await run(
        lambda: list(client.dataset("pets").search(limit=3, page_size=2, **query))  # type: ignore[arg-type]
    )
    assert [ids(page.hits) for page in limited] == [["a", "d"], ["b"]]
    assert limited[-1].next_page_token == ""
    with pytest.raises(ValueError, match="limit"):
        await run(lambda: list(client.search(limit=0)))


async def test_a_version_is_searched_as_it_was_captured(client: Client) -> None:
    await pets(client)
    version = await run(lambda: client.dataset("pets").create_version("v1"))
    assert version.ready

    camera_z = struct_pb2.Struct()
    camera_z.update({"camera": "z"})

    def edit_a() -> None:
        client.rpc.call(
            client.rpc.inputs.UpdateInputs,
            iapi.UpdateInputsRequest(
                app_id=client.app,
                inputs=[input_pb2.Input(id="a", data=data_pb2.Data(metadata=camera_z))],
                action=common_pb2.PATCH_ACTION_MERGE,
            ),
        )

    await run(edit_a)
    assert ids(await found(client, metadata={"camera": "x"})) == []
    assert ids(await found(client, metadata={"camera": "z"})) == ["a"]
    captured = await found(client, version="v1", metadata={"camera": "x"})
    assert ids(captured) == ["a"]
    assert captured[0].input.metadata == {"camera": "x", "n": 1}
    assert ids(await found(client, version="v1", vector=[1, 0, 0, 0], model_id=MODEL)) == [
        "a",
        "d",
        "b",
        "c",
    ]
    missing = await fails(lambda: list(client.dataset("pets").search(version="nope")))
    assert isinstance(missing, NotFoundError)


async def test_add_from_search_counts_adds_once_and_is_idempotent(client: Client) -> None:
    await pets(client)
    await run(lambda: client.datasets.create("picked"))
    picked = client.dataset("picked")
    dry = await run(
        lambda: picked.add_from_search(from_dataset="pets", concepts=["cat"], dry_run=True)
    )
    assert (dry.matched, dry.added, dry.already_present, dry.dry_run) == (2, 0, 0, True)
    assert await run(lambda: list(picked.list_inputs())) == []

    added = await run(lambda: picked.add_from_search(from_dataset="pets", concepts=["cat"]))
    assert (added.matched, added.added, added.already_present, added.job) == (2, 2, 0, None)
    again = await run(
        lambda: picked.add_from_search(vector=[1, 0, 0, 0], model_id=MODEL, min_score=0.9)
    )
    # a and d score at least 0.9 in the whole app; a was already there.
    assert (again.matched, again.added, again.already_present) == (2, 1, 1)
    members = await run(lambda: sorted(i.id for i in picked.list_inputs()))
    assert members == ["a", "b", "d"]


async def test_add_from_search_as_a_job_waits_with_progress(
    client: Client, request: pytest.FixtureRequest
) -> None:
    await pets(client)
    await run(lambda: client.datasets.create("picked"))
    # The server's own use case (in this process, a frozen dataclass; other tests may have
    # built copies), so that two matches take the job path through the real call; the
    # limits are restored when the test ends.
    for live in [o for o in gc.get_objects() if isinstance(o, SearchJobService)]:
        request.addfinalizer(partial(object.__setattr__, live, "inline_limit", live.inline_limit))
        object.__setattr__(live, "inline_limit", 1)

    class Recorder:
        def __init__(self) -> None:
            self.started: list[tuple[str, float | None, str]] = []
            self.advanced = 0.0
            self.finished = False

        def start(self, description: str, total: float | None, unit: str) -> None:
            self.started.append((description, total, unit))

        def advance(self, amount: float = 1, failed: int = 0) -> None:
            self.advanced += amount

        def finish(self) -> None:
            self.finished = True

        def report(self, title: str, rows: object) -> None:
            pass

    recorder = Recorder()
    result = await run(
        lambda: client.dataset("picked").add_from_search(
            from_dataset="pets",
            concepts=["cat"],
            show_progress=True,
            progress=recorder,
        )
    )
    assert result.job is not None and result.job.state == "DONE"
    assert (result.matched, result.added, result.already_present) == (2, 2, 0)
    assert result.job.percent_completed == 100 and result.job.finished_at is not None
    assert recorder.started == [("adding 2 inputs to picked", 100, "percent")]
    assert recorder.advanced == 100 and recorder.finished
    assert await run(lambda: client.search_job(result.job.id if result.job else "")) == result.job

    unwaited = await run(
        lambda: client.dataset("picked").add_from_search(from_dataset="pets", wait=False)
    )
    assert unwaited.job is not None and unwaited.matched == 4
    waited = await run(lambda: client.wait_search_job(unwaited.job.id if unwaited.job else ""))
    assert (waited.state, waited.added, waited.already_present) == ("DONE", 2, 2)


async def test_duplicates_exact_and_near(client: Client) -> None:
    await pets(client)
    exact = await run(lambda: client.dataset("pets").duplicates(exact_only=True))
    assert [(g.input_ids, g.exact) for g in exact.groups] == [(["a", "d"], True)]
    assert exact.scanned == 4

    # e is near b by its vector (0.996); at 0.75 "a" is near both (0.80, 0.78) and joins
    # them as the kept copy of its exact group, whose other copy "d" is in no near group.
    e = UploadItem("e", kind="text", text="a cat by a dog", embeddings={MODEL: (0.78, 0.62, 0, 0)})
    await run(lambda: client.dataset("pets").upload_inputs([e], show_progress=False))
    for threshold, near_group in ((0.99, ["b", "e"]), (0.75, ["a", "b", "e"])):
        near = await run(partial(client.dataset("pets").duplicates, threshold, model_id=MODEL))
        assert [(g.input_ids, g.exact) for g in near.groups] == [
            (["a", "d"], True),
            (near_group, False),
        ], threshold
        vectors = {**VECTORS, "e": (0.78, 0.62, 0.0, 0.0)}
        lowest = min(
            similarity
            for x, y in itertools.combinations(near_group, 2)
            if (similarity := cosine(vectors[x], vectors[y])) >= threshold
        )
        assert near.groups[1].min_similarity == pytest.approx(lowest, abs=1e-4)
        assert (near.scanned, near.not_embedded) == (5, 0)
    with pytest.raises(ValueError, match="threshold"):
        await run(lambda: client.dataset("pets").duplicates(threshold=0))
    too_low = await fails(lambda: client.dataset("pets").duplicates(threshold=0.2))
    assert isinstance(too_low, InvalidArgumentError) and "threshold" in too_low.field_violations


async def test_embedding_models_and_an_inputs_embeddings(client: Client) -> None:
    await pets(client)
    models = {m.id: m for m in await run(client.embedding_models)}
    mine = models[MODEL]
    assert (mine.dimension, mine.source, mine.embedded_count) == (4, "CLIENT", 4)
    assert all(m.source in ("BUILTIN", "ONNX", "CLIENT") for m in models.values())

    embeddings = {e.model_id: e for e in await run(lambda: client.input_embeddings("b", True))}
    assert embeddings[MODEL].state == "READY"
    assert embeddings[MODEL].vector == pytest.approx(list(VECTORS["b"]), abs=1e-6)
    assert embeddings[MODEL].updated_at is not None
    without = {e.model_id: e for e in await run(lambda: client.input_embeddings("b"))}
    assert without[MODEL].vector == []
    unknown = await fails(lambda: client.input_embeddings("nope"))
    assert isinstance(unknown, NotFoundError)


async def test_bad_queries_name_the_argument(client: Client) -> None:
    await pets(client)
    # What the request cannot carry is refused before any call.
    for query, message in (
        ({"similar_to": "a", "text": "cat"}, "one of"),
        ({"media_types": ["picture"]}, "picture"),
        ({"near": (1.0, 2.0)}, "near"),
        ({"min_score": 0.5}, "min_score needs a rank"),
        ({"metadata": [1]}, "metadata"),
    ):
        with pytest.raises(ValueError, match=message):
            search_query(**query)

    async def refused(
        **query: object,
    ) -> InvalidArgumentError | NotFoundError | FailedPreconditionError:
        error = await fails(lambda: list(client.dataset("pets").search(**query)))  # type: ignore[arg-type]
        assert isinstance(error, InvalidArgumentError | NotFoundError | FailedPreconditionError)
        return error

    wrong_size = await refused(vector=[1, 0, 0], model_id=MODEL)
    assert isinstance(wrong_size, InvalidArgumentError)
    assert any("vector" in f for f in wrong_size.field_violations), wrong_size.field_violations
    unknown_model = await refused(vector=[1, 0, 0, 0], model_id="no-such-model")
    assert any("model_id" in f for f in unknown_model.field_violations) or isinstance(
        unknown_model, NotFoundError
    )
    unknown_input = await refused(similar_to="nope", model_id=MODEL)
    assert "nope" in unknown_input.message or any(
        "input_id" in f for f in unknown_input.field_violations
    )
    north = await refused(near=(91, 0, 1))
    assert isinstance(north, InvalidArgumentError)
    assert any("geo_radius.latitude" in f for f in north.field_violations)
    inverted = await refused(box=(50, 40, 0, 1))
    assert isinstance(inverted, InvalidArgumentError)
    assert any("geo_box" in f for f in inverted.field_violations)


README_CLIENT = 'Client("127.0.0.1:50051", api_key="dsd_...", app="main")'


async def test_the_readme_example_runs_as_written(
    client: Client, server: Running, caller: Caller, capsys: pytest.CaptureFixture[str]
) -> None:
    example = fenced_block("python", "photos.search(")
    assert README_CLIENT in example
    example = example.replace(
        README_CLIENT, f"Client({f'127.0.0.1:{server.port}'!r}, {caller.key!r}, {caller.app_id!r})"
    )
    await run(lambda: exec(compile(example, "README.md", "exec"), {}))

    printed = capsys.readouterr().out.splitlines()
    # What the example's comments promise.
    promised = [
        line.split("  # ", 1)[1].strip()
        for line in example.splitlines()
        if line.lstrip().startswith("print(") and "  # " in line
    ]
    assert printed[: len(promised)] == promised
    models = printed[len(promised) :]
    assert "my-clip-py 3 CLIENT 3" in models
    assert any(line.startswith("my-clip-py READY [1.0, 0.0, 0.0]") for line in models), models
    members = await run(lambda: sorted(i.id for i in client.dataset("photo-cats").list_inputs()))
    assert members == ["photo-1", "photo-2"]


def test_vectors_survive_the_failure_log() -> None:
    """A failed item's vectors are logged and `retry` uploads them again."""
    for item in items():
        logged = json.loads(json.dumps(item.to_json()))
        assert logged["embeddings"] == {MODEL: list(VECTORS[item.input_id])}
        assert UploadItem.from_json(logged) == item
