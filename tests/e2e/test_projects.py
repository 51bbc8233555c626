"""ProjectService as a caller sees it: real server, real channel, generated stubs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import pytest
from datasetd.v1 import (
    dataset_pb2,
    dataset_service_pb2,
    ontology_pb2,
    ontology_service_pb2,
    ontology_service_pb2_grpc,
    project_pb2,
    project_service_pb2_grpc,
)
from datasetd.v1 import project_service_pb2 as api
from google.protobuf import field_mask_pb2

from service.storage.db import Database
from tests.conftest import Caller, new_caller
from tests.helpers import call_error

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub
    from datasetd.v1.ontology_service_pb2_grpc import OntologyServiceAsyncStub
    from datasetd.v1.project_service_pb2_grpc import ProjectServiceAsyncStub as Stub


@pytest.fixture(scope="session")
def projects(channel: grpc.aio.Channel) -> Stub:
    return project_service_pb2_grpc.ProjectServiceStub(channel)


@pytest.fixture(scope="session")
def ontologies(channel: grpc.aio.Channel) -> OntologyServiceAsyncStub:
    return ontology_service_pb2_grpc.OntologyServiceStub(channel)


async def new_ontology(stub: OntologyServiceAsyncStub, caller: Caller, ontology_id: str) -> None:
    await stub.CreateOntology(
        ontology_service_pb2.CreateOntologyRequest(
            app_id=caller.app_id, ontology=ontology_pb2.Ontology(id=ontology_id)
        ),
        metadata=caller.metadata,
    )


async def new_dataset(stub: DatasetServiceAsyncStub, caller: Caller, dataset_id: str) -> None:
    await stub.CreateDataset(
        dataset_service_pb2.CreateDatasetRequest(
            app_id=caller.app_id, dataset=dataset_pb2.Dataset(id=dataset_id)
        ),
        metadata=caller.metadata,
    )


async def create(stub: Stub, caller: Caller, project_id: str, ontology_id: str) -> Any:
    response = await stub.CreateProject(
        api.CreateProjectRequest(
            app_id=caller.app_id,
            project=project_pb2.Project(
                id=project_id, ontology_id=ontology_id, description="road scenes"
            ),
        ),
        metadata=caller.metadata,
    )
    return response.project


async def get(stub: Stub, caller: Caller, project_id: str) -> Any:
    response = await stub.GetProject(
        api.GetProjectRequest(app_id=caller.app_id, project_id=project_id),
        metadata=caller.metadata,
    )
    return response.project


async def attach(stub: Stub, caller: Caller, project_id: str, dataset_id: str) -> Any:
    response = await stub.AttachDataset(
        api.AttachDatasetRequest(
            app_id=caller.app_id, project_id=project_id, dataset_id=dataset_id
        ),
        metadata=caller.metadata,
    )
    return response.project


async def detach(stub: Stub, caller: Caller, project_id: str, dataset_id: str) -> Any:
    response = await stub.DetachDataset(
        api.DetachDatasetRequest(
            app_id=caller.app_id, project_id=project_id, dataset_id=dataset_id
        ),
        metadata=caller.metadata,
    )
    return response.project


async def update(stub: Stub, caller: Caller, project: project_pb2.Project, *paths: str) -> Any:
    response = await stub.UpdateProject(
        api.UpdateProjectRequest(
            app_id=caller.app_id,
            project=project,
            update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
        ),
        metadata=caller.metadata,
    )
    return response.project


async def dataset_projects(
    stub: DatasetServiceAsyncStub, caller: Caller, dataset_id: str
) -> list[str]:
    response = await stub.GetDataset(
        dataset_service_pb2.GetDatasetRequest(app_id=caller.app_id, dataset_id=dataset_id),
        metadata=caller.metadata,
    )
    return list(response.dataset.project_ids)


async def test_create_get_update_and_delete(
    projects: Stub, ontologies: OntologyServiceAsyncStub, caller: Caller
) -> None:
    await new_ontology(ontologies, caller, "o1")
    await new_ontology(ontologies, caller, "o2")
    created = await create(projects, caller, "p1", "o1")
    assert (created.id, created.app_id, created.ontology_id) == ("p1", caller.app_id, "o1")
    assert created.description == "road scenes" and list(created.dataset_ids) == []
    assert created.created_at.seconds > 0 and created.modified_at.seconds > 0
    assert await get(projects, caller, "p1") == created

    generated = await create(projects, caller, "", "o1")
    assert len(generated.id) == 32

    taken = await call_error(create(projects, caller, "p1", "o2"))
    assert taken.code == grpc.StatusCode.ALREADY_EXISTS and taken.reason == "PROJECT_EXISTS"

    moved = await update(projects, caller, project_pb2.Project(id="p1", ontology_id="o2"))
    assert moved.ontology_id == "o2" and moved.description == "road scenes"
    assert moved.modified_at.ToDatetime() > created.modified_at.ToDatetime()
    cleared = await update(projects, caller, project_pb2.Project(id="p1"), "description")
    assert cleared.description == "" and cleared.ontology_id == "o2"
    assert await get(projects, caller, "p1") == cleared

    await projects.DeleteProject(
        api.DeleteProjectRequest(app_id=caller.app_id, project_id="p1"), metadata=caller.metadata
    )
    gone = await call_error(get(projects, caller, "p1"))
    assert gone.code == grpc.StatusCode.NOT_FOUND and gone.reason == "PROJECT_NOT_FOUND"
    again = await call_error(
        projects.DeleteProject(
            api.DeleteProjectRequest(app_id=caller.app_id, project_id="p1"),
            metadata=caller.metadata,
        )
    )
    assert again.code == grpc.StatusCode.NOT_FOUND


async def test_list_pages_oldest_first(
    projects: Stub, ontologies: OntologyServiceAsyncStub, caller: Caller
) -> None:
    await new_ontology(ontologies, caller, "o")
    for index in range(5):
        await create(projects, caller, f"p{index}", "o")
    seen: list[str] = []
    token = ""
    while True:
        response = await projects.ListProjects(
            api.ListProjectsRequest(app_id=caller.app_id, page_size=2, page_token=token),
            metadata=caller.metadata,
        )
        assert len(response.projects) <= 2
        seen.extend(p.id for p in response.projects)
        token = response.next_page_token
        if not token:
            break
    assert seen == [f"p{index}" for index in range(5)]
    bad = await call_error(
        projects.ListProjects(
            api.ListProjectsRequest(app_id=caller.app_id, page_token="garbage"),
            metadata=caller.metadata,
        )
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in bad.fields
    negative = await call_error(
        projects.ListProjects(
            api.ListProjectsRequest(app_id=caller.app_id, page_size=-1), metadata=caller.metadata
        )
    )
    assert "page_size" in negative.fields


async def test_attach_and_detach_are_idempotent_and_shown_by_the_dataset(
    projects: Stub,
    ontologies: OntologyServiceAsyncStub,
    datasets: DatasetServiceAsyncStub,
    caller: Caller,
) -> None:
    await new_ontology(ontologies, caller, "o")
    await new_dataset(datasets, caller, "d1")
    await new_dataset(datasets, caller, "d2")
    await create(projects, caller, "pa", "o")
    await create(projects, caller, "pb", "o")

    first = await attach(projects, caller, "pa", "d2")
    assert list(first.dataset_ids) == ["d2"]
    twice = await attach(projects, caller, "pa", "d2")
    assert list(twice.dataset_ids) == ["d2"]
    both = await attach(projects, caller, "pa", "d1")
    assert list(both.dataset_ids) == ["d1", "d2"]
    await attach(projects, caller, "pb", "d2")

    assert await dataset_projects(datasets, caller, "d2") == ["pa", "pb"]
    assert await dataset_projects(datasets, caller, "d1") == ["pa"]
    listed = await datasets.ListDatasets(
        dataset_service_pb2.ListDatasetsRequest(app_id=caller.app_id), metadata=caller.metadata
    )
    assert {d.id: list(d.project_ids) for d in listed.datasets} == {
        "d1": ["pa"],
        "d2": ["pa", "pb"],
    }

    detached = await detach(projects, caller, "pa", "d2")
    assert list(detached.dataset_ids) == ["d1"]
    still = await detach(projects, caller, "pa", "d2")
    assert list(still.dataset_ids) == ["d1"]
    assert await dataset_projects(datasets, caller, "d2") == ["pb"]

    # Deleting a project detaches its datasets; the datasets stay.
    await projects.DeleteProject(
        api.DeleteProjectRequest(app_id=caller.app_id, project_id="pb"), metadata=caller.metadata
    )
    assert await dataset_projects(datasets, caller, "d2") == []

    # A deleted dataset is left out of the project until undeleted; purged, it is detached.
    await datasets.DeleteDataset(
        dataset_service_pb2.DeleteDatasetRequest(app_id=caller.app_id, dataset_id="d1"),
        metadata=caller.metadata,
    )
    assert list((await get(projects, caller, "pa")).dataset_ids) == []
    deleted = await call_error(attach(projects, caller, "pa", "d1"))
    assert deleted.code == grpc.StatusCode.NOT_FOUND and "dataset_id" in deleted.message
    await datasets.UndeleteDataset(
        dataset_service_pb2.UndeleteDatasetRequest(app_id=caller.app_id, dataset_id="d1"),
        metadata=caller.metadata,
    )
    assert list((await get(projects, caller, "pa")).dataset_ids) == ["d1"]
    await datasets.DeleteDataset(
        dataset_service_pb2.DeleteDatasetRequest(app_id=caller.app_id, dataset_id="d1", force=True),
        metadata=caller.metadata,
    )
    await new_dataset(datasets, caller, "d1")
    assert list((await get(projects, caller, "pa")).dataset_ids) == []
    assert await dataset_projects(datasets, caller, "d1") == []


async def test_an_ontology_in_use_cannot_be_deleted(
    projects: Stub, ontologies: OntologyServiceAsyncStub, caller: Caller
) -> None:
    await new_ontology(ontologies, caller, "used")
    await new_ontology(ontologies, caller, "spare")
    await create(projects, caller, "first", "used")
    await create(projects, caller, "second", "used")

    def delete(ontology_id: str) -> Any:
        return ontologies.DeleteOntology(
            ontology_service_pb2.DeleteOntologyRequest(
                app_id=caller.app_id, ontology_id=ontology_id
            ),
            metadata=caller.metadata,
        )

    refused = await call_error(delete("used"))
    assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.reason == "ONTOLOGY_IN_USE"
    assert "'first'" in refused.message and "'second'" in refused.message

    await update(projects, caller, project_pb2.Project(id="first", ontology_id="spare"))
    await projects.DeleteProject(
        api.DeleteProjectRequest(app_id=caller.app_id, project_id="second"),
        metadata=caller.metadata,
    )
    refused = await call_error(delete("spare"))
    assert "'first'" in refused.message and "'second'" not in refused.message
    await delete("used")
    gone = await call_error(
        ontologies.GetOntology(
            ontology_service_pb2.GetOntologyRequest(app_id=caller.app_id, ontology_id="used"),
            metadata=caller.metadata,
        )
    )
    assert gone.code == grpc.StatusCode.NOT_FOUND


async def test_bad_input_names_the_field_and_writes_nothing(
    projects: Stub,
    ontologies: OntologyServiceAsyncStub,
    datasets: DatasetServiceAsyncStub,
    caller: Caller,
    db: Database,
) -> None:
    await new_ontology(ontologies, caller, "o")
    await new_dataset(datasets, caller, "mine")

    unknown = await call_error(create(projects, caller, "p", "nope"))
    assert unknown.code == grpc.StatusCode.NOT_FOUND
    assert unknown.reason == "ONTOLOGY_NOT_FOUND"
    assert "project.ontology_id" in unknown.message and "'nope'" in unknown.message
    missing = await call_error(create(projects, caller, "p", ""))
    assert "project.ontology_id" in missing.fields
    bad = await call_error(create(projects, caller, "bad id!", "bad/id"))
    assert {"project.id", "project.ontology_id"} <= set(bad.fields)
    long = await call_error(
        projects.CreateProject(
            api.CreateProjectRequest(
                app_id=caller.app_id,
                project=project_pb2.Project(id="p", ontology_id="o", description="x" * 1025),
            ),
            metadata=caller.metadata,
        )
    )
    assert "project.description" in long.fields
    output_only = await call_error(
        projects.CreateProject(
            api.CreateProjectRequest(
                app_id=caller.app_id,
                project=project_pb2.Project(id="p", ontology_id="o", dataset_ids=["mine"]),
            ),
            metadata=caller.metadata,
        )
    )
    assert "project.dataset_ids" in output_only.fields
    listed = await projects.ListProjects(
        api.ListProjectsRequest(app_id=caller.app_id), metadata=caller.metadata
    )
    assert list(listed.projects) == []

    await create(projects, caller, "p", "o")
    # Another app's dataset and ontology are not found, whatever their ids.
    other = await new_caller(db)
    await new_ontology(ontologies, other, "theirs")
    await new_dataset(datasets, other, "theirs")
    foreign = await call_error(attach(projects, caller, "p", "theirs"))
    assert foreign.code == grpc.StatusCode.NOT_FOUND and foreign.reason == "DATASET_NOT_FOUND"
    assert "dataset_id" in foreign.message and "'theirs'" in foreign.message
    absent = await call_error(attach(projects, caller, "p", "absent"))
    assert absent.code == grpc.StatusCode.NOT_FOUND and "'absent'" in absent.message
    elsewhere = await call_error(
        update(projects, caller, project_pb2.Project(id="p", ontology_id="theirs"))
    )
    assert elsewhere.code == grpc.StatusCode.NOT_FOUND and elsewhere.reason == "ONTOLOGY_NOT_FOUND"
    no_project = await call_error(attach(projects, caller, "ghost", "mine"))
    assert no_project.code == grpc.StatusCode.NOT_FOUND
    assert no_project.reason == "PROJECT_NOT_FOUND"
    bad_ids = await call_error(attach(projects, caller, "", "bad id"))
    assert {"project_id", "dataset_id"} <= set(bad_ids.fields)
    bad_detach = await call_error(detach(projects, caller, "p", ""))
    assert "dataset_id" in bad_detach.fields
    assert list((await get(projects, caller, "p")).dataset_ids) == []
    assert (await get(projects, caller, "p")).ontology_id == "o"

    outside = await call_error(
        update(
            projects,
            caller,
            project_pb2.Project(id="p", ontology_id="o", description="y"),
            "ontology_id",
        )
    )
    assert "not in update_mask" in outside.fields["project.description"]
    unknown_path = await call_error(
        update(projects, caller, project_pb2.Project(id="p"), "dataset_ids")
    )
    assert "update_mask.paths[0]" in unknown_path.fields
    nothing = await call_error(update(projects, caller, project_pb2.Project(id="p")))
    assert "nothing to update" in nothing.fields["project"]
    cleared = await call_error(update(projects, caller, project_pb2.Project(id="p"), "ontology_id"))
    assert "project.ontology_id" in cleared.fields
    no_id = await call_error(update(projects, caller, project_pb2.Project(description="z")))
    assert "project.id" in no_id.fields
