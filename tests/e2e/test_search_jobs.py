"""AddDatasetInputs and DeleteDatasetInputsByFilter by search, the ADD_BY_SEARCH job and
GetSearchJob, as a caller sees them through the real server (and the job handler driven
directly where a crash is simulated)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from datasetd.v1 import common_pb2, dataset_pb2, input_pb2, search_pb2, search_service_pb2_grpc
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import input_service_pb2 as iapi
from datasetd.v1 import search_service_pb2 as sapi
from google.protobuf import field_mask_pb2

from service.app import Running
from service.domain.embeddings import SearchFilter, SearchSpec
from service.domain.jobs import Job, JobFailed, JobKind, JobScheduler
from service.domain.models import Principal
from service.domain.search_jobs import AddBySearch
from service.storage.embeddings import PgEmbeddingRepository
from service.storage.inputs import PgInputRepository, PgMembershipRepository
from service.storage.jobs import PgJobQueue
from service.storage.search import PgSearchRepository
from service.storage.search_jobs import PgSearchJobRepository
from service.wire.search import search_spec_from_proto
from service.wiring import Domain, Storage
from tests.conftest import Caller, new_caller
from tests.e2e.test_inputs import create, metadata, new_dataset, text_input
from tests.e2e.test_versions import build
from tests.helpers import call_error

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs
    from datasetd.v1.search_service_pb2_grpc import SearchServiceAsyncStub as Search

JOB_TIMEOUT_SECONDS = 30.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module", name="search_stub")
def search_stub_fixture(channel: grpc.aio.Channel) -> Search:
    return search_service_pb2_grpc.SearchServiceStub(channel)


def tagged(input_id: str, tag: str) -> input_pb2.Input:
    item = text_input(input_id, f"text of {input_id}")
    item.data.metadata.CopyFrom(metadata({"tag": tag}))
    return item


def by_tag(tag: str, **scope: str) -> search_pb2.SearchQuery:
    query = search_pb2.SearchQuery(metadata=metadata({"tag": tag}))
    if scope:
        query.scope.CopyFrom(search_pb2.SearchScope(**scope))
    return query


async def seed(inputs: Inputs, caller: Caller, tags: dict[str, str]) -> None:
    response = await create(inputs, caller, [tagged(i, t) for i, t in tags.items()])
    assert response.created_count == len(tags), response


async def add(
    datasets: Datasets, caller: Caller, dataset_id: str, **request: Any
) -> dapi.AddDatasetInputsResponse:
    response: dapi.AddDatasetInputsResponse = await datasets.AddDatasetInputs(
        dapi.AddDatasetInputsRequest(app_id=caller.app_id, dataset_id=dataset_id, **request),
        metadata=caller.metadata,
    )
    return response


async def members(datasets: Datasets, caller: Caller, dataset_id: str) -> set[str]:
    found: set[str] = set()
    token = ""
    while True:
        page = await datasets.ListDatasetInputs(
            dapi.ListDatasetInputsRequest(
                app_id=caller.app_id, dataset_id=dataset_id, page_size=1000, page_token=token
            ),
            metadata=caller.metadata,
        )
        found |= {m.input.id for m in page.dataset_inputs}
        token = page.next_page_token
        if not token:
            return found


async def set_flag(datasets: Datasets, caller: Caller, dataset_id: str, flag: str) -> None:
    flags: dict[str, Any] = {flag: True}
    await datasets.UpdateDataset(
        dapi.UpdateDatasetRequest(
            app_id=caller.app_id,
            dataset=dataset_pb2.Dataset(id=dataset_id, **flags),
            action=common_pb2.PATCH_ACTION_OVERWRITE,
            update_mask=field_mask_pb2.FieldMask(paths=[flag]),
        ),
        metadata=caller.metadata,
    )


async def get_job(search: Search, caller: Caller, job_id: str) -> search_pb2.SearchJob:
    response = await search.GetSearchJob(
        sapi.GetSearchJobRequest(app_id=caller.app_id, job_id=job_id), metadata=caller.metadata
    )
    return response.job


async def wait_job(search: Search, caller: Caller, job_id: str) -> search_pb2.SearchJob:
    deadline = asyncio.get_running_loop().time() + JOB_TIMEOUT_SECONDS
    while True:
        job = await get_job(search, caller, job_id)
        if job.state in (search_pb2.SEARCH_JOB_STATE_DONE, search_pb2.SEARCH_JOB_STATE_FAILED):
            return job
        assert 0 <= job.percent < 100
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"search job {job_id} is still {job}")
        await asyncio.sleep(0.05)


TAGS = {f"in{n}": ("a" if n % 3 else "b") for n in range(12)}
A_IDS = {i for i, t in TAGS.items() if t == "a"}


# --- inline -----------------------------------------------------------------------------


async def test_add_by_search_adds_every_match_once(
    inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await seed(inputs, caller, TAGS)
    await new_dataset(datasets, caller, "dst")
    await add(datasets, caller, "dst", input_ids=["in1"])

    dry = await add(datasets, caller, "dst", search=by_tag("a"), dry_run=True)
    assert (dry.matched_count, dry.added_count, dry.already_present_count) == (len(A_IDS), 0, 0)
    assert dry.job_id == ""
    assert await members(datasets, caller, "dst") == {"in1"}

    first = await add(datasets, caller, "dst", search=by_tag("a"), request_id="add-a")
    assert first.matched_count == len(A_IDS)
    assert (first.added_count, first.already_present_count) == (len(A_IDS) - 1, 1)
    assert first.job_id == ""
    assert await members(datasets, caller, "dst") == A_IDS

    # The same request id replays the first response; nothing is added twice.
    replay = await add(datasets, caller, "dst", search=by_tag("a"), request_id="add-a")
    assert replay == first
    again = await add(datasets, caller, "dst", search=by_tag("a"))
    assert (again.matched_count, again.added_count, again.already_present_count) == (
        len(A_IDS),
        0,
        len(A_IDS),
    )
    assert await members(datasets, caller, "dst") == A_IDS


async def test_add_from_another_dataset_and_from_a_version(
    inputs: Inputs, datasets: Datasets, versions: Versions, caller: Caller
) -> None:
    await seed(inputs, caller, TAGS)
    for dataset_id in ("src", "dst", "back"):
        await new_dataset(datasets, caller, dataset_id)
    source = ["in1", "in2", "in3", "in4"]
    await add(datasets, caller, "src", input_ids=source)
    await build(versions, caller, "src", "v1")

    scoped = await add(datasets, caller, "dst", search=by_tag("a", dataset_id="src"))
    expected = {i for i in source if TAGS[i] == "a"}
    assert (scoped.matched_count, scoped.added_count) == (len(expected), len(expected))
    assert await members(datasets, caller, "dst") == expected

    # The version keeps what the dataset held when it was built: removed members come back.
    await datasets.RemoveDatasetInputs(
        dapi.RemoveDatasetInputsRequest(
            app_id=caller.app_id, dataset_id="src", input_ids=["in1", "in2"]
        ),
        metadata=caller.metadata,
    )
    restored = await add(
        datasets,
        caller,
        "src",
        search=search_pb2.SearchQuery(
            scope=search_pb2.SearchScope(dataset_id="src", version_id="v1")
        ),
    )
    assert (restored.matched_count, restored.added_count) == (4, 2)
    assert restored.already_present_count == 2
    assert await members(datasets, caller, "src") == set(source)


async def test_guarded_destinations_refuse_and_keep_their_inputs(
    inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await seed(inputs, caller, TAGS)
    for flag in ("locked", "read_only"):
        await new_dataset(datasets, caller, flag.replace("_", "-"))
        dataset_id = flag.replace("_", "-")
        await add(datasets, caller, dataset_id, input_ids=["in1"])
        await set_flag(datasets, caller, dataset_id, flag)
        error = await call_error(add(datasets, caller, dataset_id, search=by_tag("a")))
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.reason == ("DATASET_LOCKED" if flag == "locked" else "DATASET_READ_ONLY")
        assert await members(datasets, caller, dataset_id) == {"in1"}
        deleting = datasets.DeleteDatasetInputsByFilter(
            dapi.DeleteDatasetInputsByFilterRequest(
                app_id=caller.app_id, dataset_id=dataset_id, search=by_tag("a")
            ),
            metadata=caller.metadata,
        )
        assert (await call_error(deleting)).code == grpc.StatusCode.FAILED_PRECONDITION
        assert await members(datasets, caller, dataset_id) == {"in1"}


async def test_bad_add_requests_name_the_field(
    inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await seed(inputs, caller, TAGS)
    await new_dataset(datasets, caller, "dst")
    neither = await call_error(add(datasets, caller, "dst"))
    assert neither.code == INVALID
    assert {"input_ids", "search"} <= set(neither.fields)
    both = await call_error(add(datasets, caller, "dst", input_ids=["in1"], search=by_tag("a")))
    assert both.code == INVALID
    assert {"input_ids", "search"} <= set(both.fields)
    dry = await call_error(add(datasets, caller, "dst", input_ids=["in1"], dry_run=True))
    assert dry.code == INVALID
    assert "dry_run" in dry.fields
    missing = await call_error(add(datasets, caller, "nope", search=by_tag("a")))
    assert missing.code == grpc.StatusCode.NOT_FOUND
    scope = await call_error(add(datasets, caller, "dst", search=by_tag("a", dataset_id="nope")))
    assert scope.code == grpc.StatusCode.NOT_FOUND
    assert "search.scope.dataset_id" in scope.fields
    radius = search_pb2.SearchQuery(geo_radius=search_pb2.GeoRadius(latitude=95, radius_km=1))
    geo = await call_error(add(datasets, caller, "dst", search=radius))
    assert geo.code == INVALID
    assert any(f.startswith("search.geo_radius") for f in geo.fields)
    assert await members(datasets, caller, "dst") == set()


# --- delete by search -------------------------------------------------------------------


async def test_delete_by_search_deletes_the_matching_inputs_of_the_dataset(
    inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await seed(inputs, caller, TAGS)
    await new_dataset(datasets, caller, "ds")
    held = [f"in{n}" for n in range(8)]
    await add(datasets, caller, "ds", input_ids=held)

    def delete(**request: Any) -> Any:
        return datasets.DeleteDatasetInputsByFilter(
            dapi.DeleteDatasetInputsByFilterRequest(
                app_id=caller.app_id, dataset_id="ds", **request
            ),
            metadata=caller.metadata,
        )

    doomed = {i for i in held if TAGS[i] == "a"}
    dry = await delete(search=by_tag("a"), dry_run=True)
    assert (dry.matched_count, dry.deleted_count) == (len(doomed), 0)
    assert await members(datasets, caller, "ds") == set(held)

    done = await delete(search=by_tag("a", dataset_id="ds"), request_id="del-a")
    assert (done.matched_count, done.deleted_count) == (len(doomed), len(doomed))
    assert await members(datasets, caller, "ds") == set(held) - doomed
    # Inputs are deleted, as the filter path deletes them; those outside the dataset stay.
    listed = await inputs.ListInputs(
        iapi.ListInputsRequest(app_id=caller.app_id, page_size=100), metadata=caller.metadata
    )
    assert {i.id for i in listed.inputs} == set(TAGS) - doomed
    assert await delete(search=by_tag("a", dataset_id="ds"), request_id="del-a") == done

    version = await call_error(delete(search=by_tag("b", dataset_id="ds", version_id="v1")))
    assert version.code == INVALID
    assert "search.scope.version_id" in version.fields
    other = await call_error(delete(search=by_tag("b", dataset_id="other")))
    assert other.code == INVALID
    assert "search.scope.dataset_id" in other.fields
    both = await call_error(delete(search=by_tag("b"), filter=common_pb2.InputFilter()))
    assert both.code == INVALID
    assert "filter" in both.fields
    assert await members(datasets, caller, "ds") == set(held) - doomed


# --- the job ----------------------------------------------------------------------------


def job_service(server: Running, inline_limit: int, queue: PgJobQueue | None = None) -> Any:
    """The server's use case (built as the server builds it, over its database and job
    runner) with a lower inline limit, so that a few matches take the job path."""
    db = server.resources.db
    runner = server.runner
    assert runner is not None
    domain = Domain.build(server.config, Storage.build(db, server.resources.objects), runner)
    return dataclasses.replace(
        domain.search_jobs,
        inline_limit=inline_limit,
        queue=JobScheduler(queue or PgJobQueue(db), db, runner.notify),
    )


def principal(caller: Caller) -> Principal:
    return Principal("test", caller.app_id, frozenset({"read", "write"}))


def spec(tag: str) -> SearchSpec:
    return SearchSpec(SearchFilter("", metadata={"tag": tag}))


async def test_many_matches_are_added_by_a_job(
    inputs: Inputs, datasets: Datasets, search_stub: Search, caller: Caller, server: Running
) -> None:
    await seed(inputs, caller, TAGS)
    await new_dataset(datasets, caller, "dst")
    await add(datasets, caller, "dst", input_ids=["in1", "in3"])
    service = job_service(server, inline_limit=3)
    outcome = await service.add(principal(caller), caller.app_id, "dst", spec("a"), dry_run=False)
    assert outcome.job_id is not None and outcome.matched == len(A_IDS)
    assert (outcome.added, outcome.present) == (0, 0)

    job = await wait_job(search_stub, caller, str(outcome.job_id))
    assert job.state == search_pb2.SEARCH_JOB_STATE_DONE, job.error
    assert (job.percent, job.matched_count, job.dataset_id) == (100, len(A_IDS), "dst")
    assert (job.added_count, job.already_present_count) == (len(A_IDS) - 1, 1)
    assert job.created_at.seconds > 0 and job.finished_at.seconds >= job.created_at.seconds
    assert await members(datasets, caller, "dst") == A_IDS | {"in3"}

    # Another app sees no such job, and a malformed id names the field.
    stranger = await new_caller(server.resources.db)
    unknown = await call_error(get_job(search_stub, stranger, str(outcome.job_id)))
    assert unknown.code == grpc.StatusCode.NOT_FOUND
    assert (await call_error(get_job(search_stub, caller, "999999999"))).code == (
        grpc.StatusCode.NOT_FOUND
    )
    bad = await call_error(get_job(search_stub, caller, "12x"))
    assert bad.code == INVALID and "job_id" in bad.fields


class HeldQueue(PgJobQueue):
    """Queues jobs under a kind no runner claims: the test decides when they run."""

    async def enqueue(self, kind: JobKind, app_id: str, payload: dict[str, Any]) -> int:
        job_id: int = await self._db.fetchval(
            "INSERT INTO jobs (kind, app_id, payload) VALUES ('held-by-test', $1, $2) RETURNING id",
            app_id,
            payload,
        )
        return job_id


async def test_a_job_whose_destination_was_locked_fails_with_the_reason(
    inputs: Inputs, datasets: Datasets, search_stub: Search, caller: Caller, server: Running
) -> None:
    await seed(inputs, caller, TAGS)
    await new_dataset(datasets, caller, "dst")
    db = server.resources.db
    service = job_service(server, inline_limit=1, queue=HeldQueue(db))
    outcome = await service.add(principal(caller), caller.app_id, "dst", spec("a"), dry_run=False)
    assert outcome.job_id is not None
    queued = await get_job(search_stub, caller, str(outcome.job_id))
    assert (queued.state, queued.percent) == (search_pb2.SEARCH_JOB_STATE_QUEUED, 0)

    await set_flag(datasets, caller, "dst", "locked")
    await db.execute(
        "UPDATE jobs SET kind = $2 WHERE id = $1", outcome.job_id, JobKind.ADD_BY_SEARCH.value
    )
    assert server.runner is not None
    server.runner.notify()
    job = await wait_job(search_stub, caller, str(outcome.job_id))
    assert job.state == search_pb2.SEARCH_JOB_STATE_FAILED
    assert "locked" in job.error and "dst" in job.error
    assert job.finished_at.seconds > 0 and job.added_count == 0
    assert await members(datasets, caller, "dst") == set()


class Crash(Exception):
    pass


async def test_a_rerun_after_a_crash_counts_and_adds_nothing_twice(
    inputs: Inputs, datasets: Datasets, search_stub: Search, caller: Caller, server: Running
) -> None:
    tags = {f"t{n:02d}": "a" for n in range(11)}
    await seed(inputs, caller, tags)
    await new_dataset(datasets, caller, "dst")
    await add(datasets, caller, "dst", input_ids=["t05"])
    db = server.resources.db
    service = job_service(server, inline_limit=1, queue=HeldQueue(db))
    outcome = await service.add(principal(caller), caller.app_id, "dst", spec("a"), dry_run=False)
    assert outcome.job_id is not None
    handler = AddBySearch(
        PgSearchRepository(db),
        PgEmbeddingRepository(db),
        PgInputRepository(db),
        PgMembershipRepository(db),
        PgSearchJobRepository(db),
        db,
        batch=4,
    )
    stored = await db.fetchval("SELECT payload FROM jobs WHERE id = $1", outcome.job_id)
    job = Job(outcome.job_id, JobKind.ADD_BY_SEARCH, caller.app_id, stored)
    reports: list[int] = []

    async def crash_after_two_batches(percent: int) -> None:
        reports.append(percent)
        if len(reports) == 3:
            raise Crash

    with pytest.raises(Crash):
        await handler.run(job, crash_after_two_batches)
    assert len(await members(datasets, caller, "dst")) == 1 + 8 - 1

    async def progress(percent: int) -> None:
        reports.append(percent)

    await handler.run(job, progress)
    await handler.run(job, progress)
    assert reports == sorted(reports) and max(reports) < 100
    assert await members(datasets, caller, "dst") == set(tags)
    record = await PgSearchJobRepository(db).get(caller.app_id, outcome.job_id)
    assert record is not None
    assert (record.matched_count, record.added_count, record.present_count) == (11, 10, 1)

    # A destination deleted meanwhile fails the job with a clear message.
    await datasets.DeleteDataset(
        dapi.DeleteDatasetRequest(app_id=caller.app_id, dataset_id="dst"),
        metadata=caller.metadata,
    )
    with pytest.raises(JobFailed, match="deleted"):
        await handler.run(job, progress)


async def test_a_ranked_query_adds_what_scores_at_least_min_score(
    inputs: Inputs, datasets: Datasets, search_stub: Search, caller: Caller, server: Running
) -> None:
    rng = random.Random(11)
    vectors = {f"v{n:02d}": [rng.uniform(-1, 1) for _ in range(4)] for n in range(20)}
    items = []
    for input_id, vector in vectors.items():
        item = text_input(input_id, f"text {input_id}")
        item.data.embeddings.add(vector=vector, model_id="h4-client")
        items.append(item)
    assert (await create(inputs, caller, items)).created_count == len(items)
    await new_dataset(datasets, caller, "near")
    await new_dataset(datasets, caller, "near-job")
    target = [1.0, 0.5, -0.25, 0.0]

    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    # float32 on the wire: keep the reference away from the boundary.
    expected = {i for i, v in vectors.items() if cosine(v, target) >= 0.3}
    assert 3 <= len(expected) < len(vectors)
    assert not any(abs(cosine(v, target) - 0.3) < 1e-4 for v in vectors.values())
    rank = search_pb2.Rank(
        vector=search_pb2.QueryVector(values=target), model_id="h4-client", min_score=0.3
    )
    inline = await add(datasets, caller, "near", search=search_pb2.SearchQuery(rank=rank))
    assert (inline.matched_count, inline.added_count) == (len(expected), len(expected))
    assert await members(datasets, caller, "near") == expected

    # The job runs the stored query: the resolved vector and min_score.
    service = job_service(server, inline_limit=1)
    query_spec = search_spec_from_proto(caller.app_id, search_pb2.SearchQuery(rank=rank), "search")
    outcome = await service.add(
        principal(caller), caller.app_id, "near-job", query_spec, dry_run=False
    )
    assert outcome.job_id is not None
    job = await wait_job(search_stub, caller, str(outcome.job_id))
    assert job.state == search_pb2.SEARCH_JOB_STATE_DONE, job.error
    assert (job.matched_count, job.added_count) == (len(expected), len(expected))
    assert await members(datasets, caller, "near-job") == expected
