"""DATASETD_DATABASE_READ_URL end to end: a server (built by open_resources, as `serve`
builds it) reading from a real streaming replica of the test stack's PostgreSQL, called
over a real channel. Pausing the replica's replay makes what it serves visible."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from datasetd.v1 import (
    access_pb2,
    access_service_pb2_grpc,
    annotation_service_pb2_grpc,
    data_pb2,
    dataset_pb2,
    dataset_service_pb2_grpc,
    dataset_version_pb2,
    dataset_version_service_pb2_grpc,
    input_service_pb2_grpc,
    ontology_service_pb2_grpc,
    project_pb2,
    project_service_pb2_grpc,
    search_pb2,
    search_service_pb2_grpc,
    status_pb2,
)
from datasetd.v1 import access_service_pb2 as acapi
from datasetd.v1 import annotation_service_pb2 as aapi
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import dataset_version_service_pb2 as vapi
from datasetd.v1 import input_service_pb2 as iapi
from datasetd.v1 import ontology_service_pb2 as oapi
from datasetd.v1 import project_service_pb2 as papi
from datasetd.v1 import search_service_pb2 as sapi

from service.api.read_routing import LSN_HEADER, MIN_LSN_HEADER, READ_ONLY
from service.app import Running, open_resources, start
from service.client import Client, NotFoundError
from service.config import Config
from service.devstack import EmbeddedReplica
from service.domain.auth import ensure_bootstrap_key, new_key
from service.storage.access import PgUserRepository
from service.storage.api_keys import PgApiKeyRepository
from service.storage.db import Database
from service.storage.replica import ReadReplica, parse_lsn
from tests.conftest import Caller, Stack, new_caller
from tests.e2e.test_annotations import add, annotation, concepts
from tests.e2e.test_exports import finished, request_export
from tests.e2e.test_inputs import create, image_input, new_dataset
from tests.e2e.test_ontologies import full_ontology
from tests.e2e.test_versions import build
from tests.helpers import call_error

if TYPE_CHECKING:
    from datasetd.v1.access_service_pb2_grpc import AccessServiceAsyncStub
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub
    from datasetd.v1.dataset_version_service_pb2_grpc import DatasetVersionServiceAsyncStub
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub
    from datasetd.v1.ontology_service_pb2_grpc import OntologyServiceAsyncStub
    from datasetd.v1.project_service_pb2_grpc import ProjectServiceAsyncStub
    from datasetd.v1.search_service_pb2_grpc import SearchServiceAsyncStub

CATCH_UP_TIMEOUT = 30.0
EXPORT_FORMAT = dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF


@dataclasses.dataclass(frozen=True)
class Stubs:
    datasets: DatasetServiceAsyncStub
    inputs: InputServiceAsyncStub
    annotations: AnnotationServiceAsyncStub
    versions: DatasetVersionServiceAsyncStub
    ontologies: OntologyServiceAsyncStub
    projects: ProjectServiceAsyncStub
    search: SearchServiceAsyncStub
    access: AccessServiceAsyncStub


@dataclasses.dataclass(frozen=True)
class ReplicaServer:
    running: Running
    replica: EmbeddedReplica
    stubs: Stubs

    @property
    def db(self) -> Database:
        return self.running.resources.db

    @property
    def reads(self) -> ReadReplica:
        assert self.db.replica is not None
        return self.db.replica


@pytest.fixture(scope="module")
def replica(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedReplica]:
    server = EmbeddedReplica(
        tmp_path_factory.mktemp("replica"), stack.dsn, settings={"shared_buffers": "64MB"}
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def replica_server(stack: Stack, replica: EmbeddedReplica) -> AsyncIterator[ReplicaServer]:
    config = Config(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        data_dir=stack.data_dir,
        database_url=stack.dsn,
        database_read_url=replica.dsn,
        # Longer than any pause below: only the callers' positions decide.
        read_max_lag=timedelta(minutes=5),
        s3_endpoint=stack.s3.endpoint,
        s3_access_key=stack.s3.access_key,
        s3_secret_key=stack.s3.secret_key,
        s3_bucket=stack.s3.bucket,
        auth_cache_seconds=0.0,
    )
    running = await start(config, await open_resources(config))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stubs = Stubs(
                dataset_service_pb2_grpc.DatasetServiceStub(channel),
                input_service_pb2_grpc.InputServiceStub(channel),
                annotation_service_pb2_grpc.AnnotationServiceStub(channel),
                dataset_version_service_pb2_grpc.DatasetVersionServiceStub(channel),
                ontology_service_pb2_grpc.OntologyServiceStub(channel),
                project_service_pb2_grpc.ProjectServiceStub(channel),
                search_service_pb2_grpc.SearchServiceStub(channel),
                access_service_pb2_grpc.AccessServiceStub(channel),
            )
            yield ReplicaServer(running, replica, stubs)
    finally:
        await running.stop()


async def _same_app_caller(db: Database, app_id: str) -> Caller:
    """Another API key (another principal) of the app."""
    secret, key = new_key(app_id, "other")
    await PgApiKeyRepository(db).insert(dataclasses.replace(key, scopes=("read", "write")))
    return Caller(app_id, secret)


async def _app_owner(db: Database, app_id: str) -> Caller:
    """The app owner's personal key: AccessService's reads need a user."""
    async with db.transaction():
        secret = await ensure_bootstrap_key(
            PgApiKeyRepository(db), PgUserRepository(db), app_id, None
        )
    assert secret is not None
    return Caller(app_id, secret)


async def _eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + CATCH_UP_TIMEOUT
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {CATCH_UP_TIMEOUT:.0f}s: {what}")
        await asyncio.sleep(0.05)


async def _caught_up(server: ReplicaServer) -> None:
    """Until the server knows its replica has replayed all the primary has written."""
    written = await server.db.fetchval("SELECT pg_current_wal_lsn()")

    async def replayed() -> bool:
        return server.reads.usable and server.reads.replayed >= written

    await _eventually(replayed, "the replica catches up with the primary")


async def _get(stubs: Stubs, caller: Caller, dataset_id: str, *extra: tuple[str, str]) -> Any:
    return await stubs.datasets.GetDataset(
        dapi.GetDatasetRequest(app_id=caller.app_id, dataset_id=dataset_id),
        metadata=(*caller.metadata, *extra),
    )


async def _listed(stubs: Stubs, caller: Caller) -> set[str]:
    response = await stubs.datasets.ListDatasets(
        dapi.ListDatasetsRequest(app_id=caller.app_id), metadata=caller.metadata
    )
    return {d.id for d in response.datasets}


async def test_reads_come_from_the_replica_and_callers_read_their_writes(
    replica_server: ReplicaServer,
) -> None:
    server, stubs = replica_server, replica_server.stubs
    writer = await new_caller(server.db)
    other = await _same_app_caller(server.db, writer.app_id)
    await _caught_up(server)
    standby = await asyncpg.connect(server.replica.dsn)
    try:
        await standby.execute("SELECT pg_wal_replay_pause()")
        call = stubs.datasets.CreateDataset(
            dapi.CreateDatasetRequest(
                app_id=writer.app_id, dataset=dataset_pb2.Dataset(id="fresh")
            ),
            metadata=writer.metadata,
        )
        await call
        lsn = dict(await call.trailing_metadata())[LSN_HEADER]
        assert isinstance(lsn, str) and parse_lsn(lsn) > server.reads.replayed

        served, failed_over = server.reads.stats.served, server.reads.stats.failed_over
        missing = await call_error(_get(stubs, other, "fresh"))
        assert missing.code == grpc.StatusCode.NOT_FOUND, "the paused replica answered"
        assert "fresh" not in await _listed(stubs, other)
        assert server.reads.stats.served > served

        assert (await _get(stubs, writer, "fresh")).dataset.id == "fresh", "read-your-writes"
        assert "fresh" in await _listed(stubs, writer)
        carried = await _get(stubs, other, "fresh", (MIN_LSN_HEADER, lsn))
        assert carried.dataset.id == "fresh", "the position a caller carries is honoured"
        assert server.reads.stats.failed_over == failed_over
    finally:
        await standby.execute("SELECT pg_wal_replay_resume()")
        await standby.close()

    async def visible() -> bool:
        return "fresh" in await _listed(stubs, other)

    await _eventually(visible, "the other caller sees the dataset once replay resumes")
    assert (await _get(stubs, other, "fresh")).dataset.id == "fresh"


async def test_a_malformed_min_lsn_is_invalid_argument(replica_server: ReplicaServer) -> None:
    caller = await new_caller(replica_server.db)
    error = await call_error(_get(replica_server.stubs, caller, "x", (MIN_LSN_HEADER, "soon")))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_MIN_LSN" and MIN_LSN_HEADER in error.message


async def _content(stubs: Stubs, writer: Caller) -> None:
    """A dataset with two inputs, an annotation, two READY versions and an export; an
    ontology."""
    await new_dataset(stubs.datasets, writer, "ds")
    vector = data_pb2.Embedding(model_id="replica-model", vector=[1.0, 0.0])
    created = await create(
        stubs.inputs, writer, [image_input("img1", embeddings=[vector]), image_input("img2")]
    )
    assert len(created.results) == 2
    await stubs.datasets.AddDatasetInputs(
        dapi.AddDatasetInputsRequest(app_id=writer.app_id, dataset_id="ds", input_ids=["img1"]),
        metadata=writer.metadata,
    )
    await add(stubs.annotations, writer, [annotation("img1", "ann1", concepts=concepts("cat"))])
    await build(stubs.versions, writer, "ds", "v1")
    await stubs.datasets.AddDatasetInputs(
        dapi.AddDatasetInputsRequest(app_id=writer.app_id, dataset_id="ds", input_ids=["img2"]),
        metadata=writer.metadata,
    )
    await build(stubs.versions, writer, "ds", "v2")
    started = await request_export(stubs.versions, writer, "ds", "v1", EXPORT_FORMAT)
    export = await finished(stubs.versions, writer, "ds", "v1", started.id)
    assert export.status.code == status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_SUCCESS
    await stubs.ontologies.CreateOntology(
        oapi.CreateOntologyRequest(app_id=writer.app_id, ontology=full_ontology("onto1")),
        metadata=writer.metadata,
    )
    await stubs.projects.CreateProject(
        papi.CreateProjectRequest(
            app_id=writer.app_id, project=project_pb2.Project(id="proj1", ontology_id="onto1")
        ),
        metadata=writer.metadata,
    )
    await stubs.projects.AttachDataset(
        papi.AttachDatasetRequest(app_id=writer.app_id, project_id="proj1", dataset_id="ds"),
        metadata=writer.metadata,
    )


def _reads(
    stubs: Stubs, app_id: str, export_id: str, search_job_id: str = ""
) -> dict[str, Callable[[Any], Awaitable[Any]]]:
    """One valid call of every read-only RPC, by method path, given the call metadata."""
    at: dict[str, Any] = {"app_id": app_id, "dataset_id": "ds"}
    version: dict[str, Any] = {**at, "version_id": "v1"}

    async def streamed(stream: Any) -> list[Any]:
        return [message async for message in stream]

    d, i, a, v, o, p, ac = (
        stubs.datasets,
        stubs.inputs,
        stubs.annotations,
        stubs.versions,
        stubs.ontologies,
        stubs.projects,
        stubs.access,
    )
    return {
        "/datasetd.v1.AccessService/ListUsers": lambda m: ac.ListUsers(
            acapi.ListUsersRequest(app_id=app_id), metadata=m
        ),
        "/datasetd.v1.AccessService/ListCollaborators": lambda m: ac.ListCollaborators(
            acapi.ListCollaboratorsRequest(**at), metadata=m
        ),
        # The writer's CreateDataset: no read below is audited under that name.
        "/datasetd.v1.AccessService/ListAuditEvents": lambda m: ac.ListAuditEvents(
            acapi.ListAuditEventsRequest(app_id=app_id, rpc="CreateDataset"), metadata=m
        ),
        "/datasetd.v1.DatasetService/GetDataset": lambda m: d.GetDataset(
            dapi.GetDatasetRequest(**at), metadata=m
        ),
        "/datasetd.v1.DatasetService/ListDatasets": lambda m: d.ListDatasets(
            dapi.ListDatasetsRequest(app_id=app_id), metadata=m
        ),
        "/datasetd.v1.DatasetService/ListDatasetInputs": lambda m: d.ListDatasetInputs(
            dapi.ListDatasetInputsRequest(**at), metadata=m
        ),
        "/datasetd.v1.DatasetService/GetDatasetInput": lambda m: d.GetDatasetInput(
            dapi.GetDatasetInputRequest(**at, input_id="img1"), metadata=m
        ),
        "/datasetd.v1.InputService/GetInput": lambda m: i.GetInput(
            iapi.GetInputRequest(app_id=app_id, input_id="img1"), metadata=m
        ),
        "/datasetd.v1.InputService/ListInputs": lambda m: i.ListInputs(
            iapi.ListInputsRequest(app_id=app_id), metadata=m
        ),
        "/datasetd.v1.InputService/DownloadInput": lambda m: streamed(
            i.DownloadInput(iapi.DownloadInputRequest(app_id=app_id, input_id="img1"), metadata=m)
        ),
        "/datasetd.v1.InputService/GetInputDownloadUrl": lambda m: i.GetInputDownloadUrl(
            iapi.GetInputDownloadUrlRequest(app_id=app_id, input_id="img1"), metadata=m
        ),
        "/datasetd.v1.AnnotationService/GetAnnotation": lambda m: a.GetAnnotation(
            aapi.GetAnnotationRequest(app_id=app_id, annotation_id="ann1"), metadata=m
        ),
        "/datasetd.v1.AnnotationService/ListAnnotations": lambda m: a.ListAnnotations(
            aapi.ListAnnotationsRequest(app_id=app_id, input_ids=["img1"]), metadata=m
        ),
        "/datasetd.v1.DatasetVersionService/GetDatasetVersion": lambda m: v.GetDatasetVersion(
            vapi.GetDatasetVersionRequest(**version), metadata=m
        ),
        "/datasetd.v1.DatasetVersionService/ListDatasetVersions": lambda m: v.ListDatasetVersions(
            vapi.ListDatasetVersionsRequest(**at), metadata=m
        ),
        "/datasetd.v1.DatasetVersionService/GetExport": lambda m: v.GetExport(
            vapi.GetExportRequest(**version, export_id=export_id), metadata=m
        ),
        "/datasetd.v1.DatasetVersionService/ListExports": lambda m: v.ListExports(
            vapi.ListExportsRequest(**version), metadata=m
        ),
        "/datasetd.v1.DatasetVersionService/DownloadExport": lambda m: streamed(
            v.DownloadExport(vapi.DownloadExportRequest(**version, export_id=export_id), metadata=m)
        ),
        "/datasetd.v1.DatasetVersionService/DiffDatasetVersions": lambda m: streamed(
            v.DiffDatasetVersions(
                vapi.DiffDatasetVersionsRequest(**at, from_version_id="v1", to_version_id="v2"),
                metadata=m,
            )
        ),
        "/datasetd.v1.OntologyService/GetOntology": lambda m: o.GetOntology(
            oapi.GetOntologyRequest(app_id=app_id, ontology_id="onto1"), metadata=m
        ),
        "/datasetd.v1.OntologyService/ListOntologies": lambda m: o.ListOntologies(
            oapi.ListOntologiesRequest(app_id=app_id), metadata=m
        ),
        "/datasetd.v1.ProjectService/GetProject": lambda m: p.GetProject(
            papi.GetProjectRequest(app_id=app_id, project_id="proj1"), metadata=m
        ),
        "/datasetd.v1.ProjectService/ListProjects": lambda m: p.ListProjects(
            papi.ListProjectsRequest(app_id=app_id), metadata=m
        ),
        "/datasetd.v1.ProjectService/ValidateDataset": lambda m: p.ValidateDataset(
            papi.ValidateDatasetRequest(**at), metadata=m
        ),
        "/datasetd.v1.SearchService/SearchInputs": lambda m: stubs.search.SearchInputs(
            sapi.SearchInputsRequest(app_id=app_id), metadata=m
        ),
        "/datasetd.v1.SearchService/ListEmbeddingModels": lambda m: (
            stubs.search.ListEmbeddingModels(
                sapi.ListEmbeddingModelsRequest(app_id=app_id), metadata=m
            )
        ),
        "/datasetd.v1.SearchService/GetInputEmbeddings": lambda m: stubs.search.GetInputEmbeddings(
            sapi.GetInputEmbeddingsRequest(app_id=app_id, input_id="img1"), metadata=m
        ),
        "/datasetd.v1.SearchService/FindDuplicates": lambda m: stubs.search.FindDuplicates(
            sapi.FindDuplicatesRequest(
                app_id=app_id, scope=search_pb2.SearchScope(dataset_id="ds"), exact_only=True
            ),
            metadata=m,
        ),
        "/datasetd.v1.SearchService/GetSearchJob": lambda m: stubs.search.GetSearchJob(
            sapi.GetSearchJobRequest(app_id=app_id, job_id=search_job_id), metadata=m
        ),
    }


# What a response must hold to show the content _content made, beside not being NOT_FOUND.
_SHOWS: dict[str, Callable[[Any], bool]] = {
    "ListDatasets": lambda r: any(d.id == "ds" for d in r.datasets),
    "ListDatasetInputs": lambda r: any(m.input.id == "img1" for m in r.dataset_inputs),
    "ListInputs": lambda r: any(i.id == "img1" for i in r.inputs),
    "ListUsers": lambda r: any(u.id == "seen" for u in r.users),
    "ListCollaborators": lambda r: any(c.user_id == "seen" for c in r.collaborators),
    "ListAuditEvents": lambda r: len(r.events) > 0,
    "ListAnnotations": lambda r: any(a.id == "ann1" for a in r.annotations),
    "ListDatasetVersions": lambda r: any(v.id == "v1" for v in r.versions),
    "ListExports": lambda r: len(r.exports) == 1,
    "ListOntologies": lambda r: any(o.id == "onto1" for o in r.ontologies),
    "GetDataset": lambda r: list(r.dataset.project_ids) == ["proj1"],
    "ListProjects": lambda r: any(p.id == "proj1" for p in r.projects),
    "ValidateDataset": lambda r: r.ontology_id == "onto1" and r.annotations_checked > 0,
    "SearchInputs": lambda r: any(h.input.id == "img1" for h in r.hits),
    "GetInputEmbeddings": lambda r: len(r.embeddings) > 0,
    "FindDuplicates": lambda r: r.scanned_count == 2,
    "GetSearchJob": lambda r: r.job.dataset_id == "ds",
    "ListEmbeddingModels": lambda r: any(
        m.id == "replica-model" and m.embedded_count == 1 for m in r.models
    ),
}


async def _shown(method: str, read: Callable[[Any], Awaitable[Any]], metadata: Any) -> bool:
    """Whether the call answers with the content _content made (not deleted yet)."""
    try:
        response = await read(metadata)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise
    return _SHOWS.get(method.rsplit("/", 1)[1], lambda _: True)(response)


async def test_every_read_only_rpc_is_served_by_the_replica(
    replica_server: ReplicaServer,
) -> None:
    server, stubs = replica_server, replica_server.stubs
    writer = await new_caller(server.db)
    # A personal key of the app's owner: it reads everything, AccessService's lists too.
    reader = await _app_owner(server.db, writer.app_id)
    await _content(stubs, writer)
    await stubs.access.CreateUser(
        acapi.CreateUserRequest(app_id=writer.app_id, user=access_pb2.User(id="seen")),
        metadata=reader.metadata,
    )
    await stubs.access.AddCollaborator(
        acapi.AddCollaboratorRequest(
            app_id=writer.app_id,
            dataset_id="ds",
            collaborator=access_pb2.Collaborator(user_id="seen"),
        ),
        metadata=reader.metadata,
    )
    exports = await stubs.versions.ListExports(
        vapi.ListExportsRequest(app_id=writer.app_id, dataset_id="ds", version_id="v1"),
        metadata=writer.metadata,
    )
    # An add-by-search job no runner claims (a real one needs 10,000 matches).
    search_job = await server.db.fetchval(
        "INSERT INTO jobs (kind, app_id) VALUES ('held-by-test', $1) RETURNING id", writer.app_id
    )
    await server.db.execute(
        "INSERT INTO search_jobs (job_id, app_id, dataset_id, query) VALUES ($1, $2, 'ds', '{}')",
        search_job,
        writer.app_id,
    )
    reads = _reads(stubs, writer.app_id, exports.exports[0].id, str(search_job))
    assert set(reads) == READ_ONLY, "drive every read-only RPC"
    await _caught_up(server)
    stats = server.reads.stats
    on_replica = set()
    for method, read in reads.items():
        served, failed_over = stats.served, stats.failed_over
        assert await _shown(method, read, reader.metadata), method
        # A read the replica refused (a write in a read-only call) is rerun on the primary
        # and counted here.
        assert stats.failed_over == failed_over, f"{method} failed on the replica"
        if stats.served > served:
            on_replica.add(method)
    # Their single reads and their read_transaction snapshots alike.
    assert sorted(READ_ONLY - on_replica) == [], "read from the primary only"

    # The content gone on the primary, but not on the paused replica: every read-only RPC
    # still shows it, so each read all it needed from the replica.
    failed_over = stats.failed_over
    standby = await asyncpg.connect(server.replica.dsn)
    try:
        await standby.execute("SELECT pg_wal_replay_pause()")
        await stubs.inputs.DeleteInputs(
            iapi.DeleteInputsRequest(app_id=writer.app_id, ids=["img1"]),
            metadata=writer.metadata,
        )
        await stubs.datasets.DeleteDataset(
            dapi.DeleteDatasetRequest(app_id=writer.app_id, dataset_id="ds"),
            metadata=writer.metadata,
        )
        await stubs.projects.DeleteProject(
            papi.DeleteProjectRequest(app_id=writer.app_id, project_id="proj1"),
            metadata=writer.metadata,
        )
        await stubs.ontologies.DeleteOntology(
            oapi.DeleteOntologyRequest(app_id=writer.app_id, ontology_id="onto1"),
            metadata=writer.metadata,
        )
        # No RPC deletes a job: its rows go (search_jobs with it, ON DELETE CASCADE).
        await server.db.execute("DELETE FROM jobs WHERE id = $1", search_job)
        # Nor audit events; and the user goes without a write of the reader's, which
        # would send its reads to the primary (its collaborations go with it).
        await server.db.execute("DELETE FROM audit_events WHERE app_id = $1", writer.app_id)
        await server.db.execute(
            "DELETE FROM users WHERE app_id = $1 AND id = 'seen'", writer.app_id
        )
        stale = [m for m, read in reads.items() if await _shown(m, read, reader.metadata)]
        assert sorted(stale) == sorted(reads), "answered by the primary"
        assert stats.failed_over == failed_over
    finally:
        await standby.execute("SELECT pg_wal_replay_resume()")
        await standby.close()
    # Once replayed, none does: the check above could tell.
    await _caught_up(server)
    still = [m for m, read in reads.items() if await _shown(m, read, reader.metadata)]
    assert still == [], "the deletions do not hide these"


async def test_reads_fall_back_to_the_primary_without_the_replica(
    replica_server: ReplicaServer,
) -> None:
    server, stubs = replica_server, replica_server.stubs
    caller = await new_caller(server.db)
    await new_dataset(stubs.datasets, caller, "kept")
    await _caught_up(server)
    await asyncio.to_thread(server.replica.stop)
    try:

        async def noticed() -> bool:
            return not server.reads.usable

        # A call already on a replica connection when it dies fails (UNAVAILABLE, retryable);
        # the next sample (every 0.1s) takes the replica out of the rotation.
        await _eventually(noticed, "the sampler notices the replica is gone")
        served = server.reads.stats.served
        reader = await _same_app_caller(server.db, caller.app_id)
        for n in range(3):
            assert (await _get(stubs, reader, "kept")).dataset.id == "kept"
            assert "kept" in await _listed(stubs, reader)
            await new_dataset(stubs.datasets, caller, f"more-{n}")
            assert f"more-{n}" in await _listed(stubs, caller)
        assert server.reads.stats.served == served
    finally:
        await asyncio.to_thread(server.replica.start)
    await _caught_up(server)


async def test_the_client_library_carries_its_position(replica_server: ReplicaServer) -> None:
    server = replica_server
    caller = await new_caller(server.db)
    await _caught_up(server)
    address = f"127.0.0.1:{server.running.port}"
    standby = await asyncpg.connect(server.replica.dsn)
    try:
        await standby.execute("SELECT pg_wal_replay_pause()")
        with Client(address, caller.key, caller.app_id) as client:
            await asyncio.to_thread(client.datasets.create, "carried")
            # As a server process that did not take the write would: it knows nothing of it.
            server.reads._remembered.clear()
            info = await asyncio.to_thread(client.datasets.get, "carried")
            assert info.id == "carried", "the client sent the position of its write"
        with Client(address, caller.key, caller.app_id) as fresh, pytest.raises(NotFoundError):
            await asyncio.to_thread(fresh.datasets.get, "carried")
    finally:
        await standby.execute("SELECT pg_wal_replay_resume()")
        await standby.close()
