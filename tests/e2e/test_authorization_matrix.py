"""The authorization matrix: every RPC of every datasetd service and every implemented
Clarifai V2 method, called by every kind of principal, has one expected outcome.

The rows are read from the service descriptors: an RPC without a row here fails the test
(a V2 method without a row must answer NOT_IMPLEMENTED). Refused calls must change
nothing (a digest of every table but the audit log and the request ids, before and after)
and return nothing of the dataset (its description and its input's text never appear in
the response bytes). In the same loop, the audit log: every mutation call leaves exactly
one event with the caller's user and key and the outcome the caller got, a refused read
one, an allowed read none.

Requests that would change the world when allowed carry an invalid request id (the
refusal of the access rule comes first, so INVALID_ARGUMENT proves the call got past it)
or name objects that do not exist; the one call that really deletes (V2 DeleteDatasets)
runs last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from clarifai_grpc.grpc.api import service_pb2 as v2_service_pb2
from clarifai_grpc.grpc.api.status import status_code_pb2
from datasetd.v1 import (
    access_service_pb2,
    annotation_service_pb2,
    annotation_service_pb2_grpc,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    dataset_version_pb2,
    dataset_version_service_pb2,
    dataset_version_service_pb2_grpc,
    input_service_pb2,
    input_service_pb2_grpc,
    ontology_service_pb2,
    project_service_pb2,
    search_service_pb2,
)
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from service.app import Running
from service.domain.auth import new_key
from service.domain.models import AppRole, Collaborator, DatasetRole, KeyKind, User
from service.storage.access import PgCollaboratorRepository, PgUserRepository
from service.storage.api_keys import PgApiKeyRepository
from service.storage.db import Database
from tests.e2e.test_versions import READY

SERVICES = [
    module.DESCRIPTOR.services_by_name[name]
    for module, name in (
        (dataset_service_pb2, "DatasetService"),
        (dataset_version_service_pb2, "DatasetVersionService"),
        (input_service_pb2, "InputService"),
        (annotation_service_pb2, "AnnotationService"),
        (ontology_service_pb2, "OntologyService"),
        (project_service_pb2, "ProjectService"),
        (search_service_pb2, "SearchService"),
        (access_service_pb2, "AccessService"),
    )
]
V2 = v2_service_pb2.DESCRIPTOR.services_by_name["V2"]
BAD = "bad request id!"  # refused by the request-id check, after the access rule

# --- principals -------------------------------------------------------------------------

PRE_AUTH = ("no_key", "malformed", "unknown", "expired", "revoked")
IN_APP = ("owner", "member", "viewer", "admin", "read_key", "write_key", "other_dataset_key")
PRINCIPALS = (*PRE_AUTH, *IN_APP, "other_app_key")
# The order allowed callers call in: the owner last (V2 DeleteDatasets really deletes).
ALLOWED_ORDER = ("viewer", "admin", "member", "read_key", "write_key", "other_dataset_key")

# Who may do what: the expectation table, written from the model (not from the
# code). The dataset `ds` is the one a request names; `other` is another dataset.
ALLOWED: dict[str, frozenset[str]] = {
    "dataset_read": frozenset({"owner", "viewer", "admin", "read_key", "write_key"}),
    "dataset_write": frozenset({"owner", "admin", "write_key"}),
    "dataset_manage": frozenset({"owner", "admin"}),
    "catalog_read": frozenset(IN_APP),
    "catalog_write": frozenset({"owner"}),
    "new_dataset": frozenset({"owner", "member", "viewer", "admin"}),
    "app_read": frozenset({"owner"}),
    "app_write": frozenset({"owner"}),
    # Inputs and annotations named by id: through the datasets holding the input (in1 is
    # in ds only, so a key bound to `other` is refused; unknown ids are refused to all
    # but app-wide callers, as the app_* rows with "nope" show).
    "input_read": frozenset({"owner", "viewer", "admin", "read_key", "write_key"}),
    "input_write": frozenset({"owner", "admin", "write_key"}),
    "users_read": frozenset({"owner", "member", "viewer", "admin"}),
    "users_write": frozenset({"owner"}),
    # MergeDataset other → ds: writes ds, reads other.
    "merge": frozenset({"owner"}),
    # Keys bound to ds and the audit log of ds: its Admins and app owners/admins.
    "keys": frozenset({"owner", "admin"}),
    # A job named by an id that does not exist: NOT_FOUND to every caller of the app.
    "any": frozenset(IN_APP),
}
MUTATES = {
    "dataset_read": False,
    "dataset_write": True,
    "dataset_manage": True,
    "catalog_read": False,
    "catalog_write": True,
    "new_dataset": True,
    "app_read": False,
    "app_write": True,
    "input_read": False,
    "input_write": True,
    "users_read": False,
    "users_write": True,
    "merge": True,
    "any": False,
}


@dataclasses.dataclass
class World:
    app_id: str
    other_app: str
    ds: str
    other: str
    input_id: str
    annotation_id: str
    version_id: str
    export_id: str
    secret_words: tuple[bytes, ...]
    sacrificial_key: str
    metadata: dict[str, tuple[tuple[str, str], ...]]
    # principal → (user_id, key_id) the audit log must show.
    identity: dict[str, tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class Row:
    category: str
    build: Callable[[World], Any]
    # For rules the domain decides (keys, audit): whether the call is a mutation.
    mutation: bool | None = None

    @property
    def mutates(self) -> bool:
        return self.mutation if self.mutation is not None else MUTATES[self.category]


def msg(cls: type[Message], **fields: Any) -> Callable[[World], Message]:
    """A request built from a dict; "$name" strings are replaced by the world's values."""

    def build(world: World) -> Message:
        return json_format.ParseDict(_fill(fields, world), cls())

    return build


def _fill(value: Any, world: World) -> Any:
    if isinstance(value, str) and value.startswith("$"):
        return getattr(world, value[1:])
    if isinstance(value, dict):
        return {k: _fill(v, world) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, world) for v in value]
    return value


def v2(method: str, **fields: Any) -> Callable[[World], Message]:
    cls = message_factory.GetMessageClass(V2.methods_by_name[method].input_type)
    return msg(cls, user_app_id={"user_id": "me", "app_id": "$app_id"}, **fields)


ds = dataset_service_pb2
dv = dataset_version_service_pb2
ins = input_service_pb2
an = annotation_service_pb2
on = ontology_service_pb2
pr = project_service_pb2
se = search_service_pb2
ac = access_service_pb2
A = "$app_id"
D = "$ds"
TEXT = {"text": {"raw": "new text"}}

ROWS: dict[str, Row] = {
    # DatasetService
    "DatasetService/CreateDataset": Row(
        "new_dataset",
        msg(ds.CreateDatasetRequest, app_id=A, dataset={"id": "mx-new"}, request_id=BAD),
    ),
    "DatasetService/GetDataset": Row(
        "dataset_read", msg(ds.GetDatasetRequest, app_id=A, dataset_id=D)
    ),
    "DatasetService/ListDatasets": Row("catalog_read", msg(ds.ListDatasetsRequest, app_id=A)),
    "DatasetService/UpdateDataset": Row(
        "dataset_write",
        msg(
            ds.UpdateDatasetRequest,
            app_id=A,
            dataset={"id": D, "notes": "changed"},
            update_mask="notes",
            request_id=BAD,
        ),
    ),
    "DatasetService/DeleteDataset": Row(
        "dataset_write", msg(ds.DeleteDatasetRequest, app_id=A, dataset_id=D, request_id=BAD)
    ),
    "DatasetService/UndeleteDataset": Row(
        "dataset_write", msg(ds.UndeleteDatasetRequest, app_id=A, dataset_id=D, request_id=BAD)
    ),
    "DatasetService/AddDatasetInputs": Row(
        "dataset_write",
        msg(
            ds.AddDatasetInputsRequest,
            app_id=A,
            dataset_id=D,
            input_ids=["$input_id"],
            request_id=BAD,
        ),
    ),
    "DatasetService/ListDatasetInputs": Row(
        "dataset_read", msg(ds.ListDatasetInputsRequest, app_id=A, dataset_id=D)
    ),
    "DatasetService/GetDatasetInput": Row(
        "dataset_read", msg(ds.GetDatasetInputRequest, app_id=A, dataset_id=D, input_id="$input_id")
    ),
    "DatasetService/RemoveDatasetInputs": Row(
        "dataset_write",
        msg(
            ds.RemoveDatasetInputsRequest,
            app_id=A,
            dataset_id=D,
            input_ids=["$input_id"],
            request_id=BAD,
        ),
    ),
    "DatasetService/DeleteDatasetInputsByFilter": Row(
        "dataset_write",
        msg(
            ds.DeleteDatasetInputsByFilterRequest,
            app_id=A,
            dataset_id=D,
            dry_run=True,
            request_id=BAD,
        ),
    ),
    "DatasetService/MergeDataset": Row(
        "merge",
        msg(
            ds.MergeDatasetRequest,
            app_id=A,
            source_dataset_id="$other",
            destination_dataset_id=D,
            request_id=BAD,
        ),
    ),
    "DatasetService/ImportDataset": Row(
        "dataset_write",
        msg(ds.ImportDatasetRequest, header={"app_id": A, "dataset_id": D, "request_id": BAD}),
    ),
    # DatasetVersionService
    "DatasetVersionService/CreateDatasetVersion": Row(
        "dataset_write", msg(dv.CreateDatasetVersionRequest, app_id=A, dataset_id=D, request_id=BAD)
    ),
    "DatasetVersionService/GetDatasetVersion": Row(
        "dataset_read",
        msg(dv.GetDatasetVersionRequest, app_id=A, dataset_id=D, version_id="$version_id"),
    ),
    "DatasetVersionService/ListDatasetVersions": Row(
        "dataset_read", msg(dv.ListDatasetVersionsRequest, app_id=A, dataset_id=D)
    ),
    "DatasetVersionService/UpdateDatasetVersion": Row(
        "dataset_write",
        msg(
            dv.UpdateDatasetVersionRequest,
            app_id=A,
            dataset_id=D,
            version={"id": "$version_id", "description": "x"},
            update_mask="description",
            request_id=BAD,
        ),
    ),
    "DatasetVersionService/DeleteDatasetVersion": Row(
        "dataset_write",
        msg(
            dv.DeleteDatasetVersionRequest,
            app_id=A,
            dataset_id=D,
            version_id="$version_id",
            request_id=BAD,
        ),
    ),
    "DatasetVersionService/CancelDatasetVersionBuild": Row(
        "dataset_write",
        msg(dv.CancelDatasetVersionBuildRequest, app_id=A, dataset_id=D, version_id="$version_id"),
    ),
    "DatasetVersionService/ExportDatasetVersion": Row(
        "dataset_write",
        msg(
            dv.ExportDatasetVersionRequest,
            app_id=A,
            dataset_id=D,
            version_id="$version_id",
            request_id=BAD,
        ),
    ),
    "DatasetVersionService/GetExport": Row(
        "dataset_read",
        msg(
            dv.GetExportRequest,
            app_id=A,
            dataset_id=D,
            version_id="$version_id",
            export_id="$export_id",
        ),
    ),
    "DatasetVersionService/ListExports": Row(
        "dataset_read",
        msg(dv.ListExportsRequest, app_id=A, dataset_id=D, version_id="$version_id"),
    ),
    "DatasetVersionService/DownloadExport": Row(
        "dataset_read",
        msg(
            dv.DownloadExportRequest,
            app_id=A,
            dataset_id=D,
            version_id="$version_id",
            export_id="$export_id",
        ),
    ),
    "DatasetVersionService/DiffDatasetVersions": Row(
        "dataset_read",
        msg(
            dv.DiffDatasetVersionsRequest,
            app_id=A,
            dataset_id=D,
            from_version_id="$version_id",
            to_version_id="$version_id",
        ),
    ),
    # InputService
    "InputService/CreateInputs": Row(
        "dataset_write",
        msg(
            ins.CreateInputsRequest,
            app_id=A,
            inputs=[{"id": "mx-created", "data": TEXT, "dataset_ids": [D]}],
            request_id=BAD,
        ),
    ),
    "InputService/UploadInput": Row(
        "dataset_write",
        msg(
            ins.UploadInputRequest,
            header={"app_id": A, "input": {"id": "mx-up", "dataset_ids": [D]}, "request_id": BAD},
        ),
    ),
    "InputService/GetInput": Row(
        "input_read", msg(ins.GetInputRequest, app_id=A, input_id="$input_id")
    ),
    "InputService/ListInputs": Row(
        "dataset_read", msg(ins.ListInputsRequest, app_id=A, dataset_id=D)
    ),
    "InputService/UpdateInputs": Row(
        "input_write",
        msg(
            ins.UpdateInputsRequest,
            app_id=A,
            inputs=[{"id": "$input_id", "title": "x"}],
            request_id=BAD,
        ),
    ),
    "InputService/DeleteInputs": Row(
        "input_write", msg(ins.DeleteInputsRequest, app_id=A, ids=["$input_id"], request_id=BAD)
    ),
    "InputService/DownloadInput": Row(
        "input_read", msg(ins.DownloadInputRequest, app_id=A, input_id="$input_id")
    ),
    "InputService/GetInputDownloadUrl": Row(
        "input_read", msg(ins.GetInputDownloadUrlRequest, app_id=A, input_id="$input_id")
    ),
    "InputService/ReencodeInputs": Row(
        "input_write",
        msg(
            ins.ReencodeInputsRequest,
            app_id=A,
            input_ids=["$input_id"],
            dry_run=True,
            request_id=BAD,
        ),
    ),
    "InputService/GetReencodeJob": Row(
        "app_read", msg(ins.GetReencodeJobRequest, app_id=A, job_id="1")
    ),
    "InputService/CancelReencodeJob": Row(
        "app_write", msg(ins.CancelReencodeJobRequest, app_id=A, job_id="1", request_id=BAD)
    ),
    # AnnotationService
    "AnnotationService/CreateAnnotations": Row(
        "input_write",
        msg(
            an.CreateAnnotationsRequest,
            app_id=A,
            annotations=[{"input_id": "$input_id"}],
            request_id=BAD,
        ),
    ),
    "AnnotationService/GetAnnotation": Row(
        "input_read", msg(an.GetAnnotationRequest, app_id=A, annotation_id="$annotation_id")
    ),
    # By dataset it is a dataset read (as ListDatasetInputs); by input, through its datasets.
    "AnnotationService/ListAnnotations": Row(
        "input_read", msg(an.ListAnnotationsRequest, app_id=A, input_ids=["$input_id"])
    ),
    "AnnotationService/UpdateAnnotations": Row(
        "input_write",
        msg(
            an.UpdateAnnotationsRequest,
            app_id=A,
            annotations=[{"id": "$annotation_id", "input_id": "$input_id"}],
            request_id=BAD,
        ),
    ),
    "AnnotationService/DeleteAnnotations": Row(
        "input_write",
        msg(an.DeleteAnnotationsRequest, app_id=A, ids=["$annotation_id"], request_id=BAD),
    ),
    # OntologyService
    "OntologyService/CreateOntology": Row(
        "catalog_write",
        msg(on.CreateOntologyRequest, app_id=A, ontology={"id": "mx-o"}, request_id=BAD),
    ),
    "OntologyService/GetOntology": Row(
        "catalog_read", msg(on.GetOntologyRequest, app_id=A, ontology_id="nope")
    ),
    "OntologyService/ListOntologies": Row("catalog_read", msg(on.ListOntologiesRequest, app_id=A)),
    "OntologyService/UpdateOntology": Row(
        "catalog_write",
        msg(
            on.UpdateOntologyRequest,
            app_id=A,
            ontology={"id": "nope", "description": "x"},
            request_id=BAD,
        ),
    ),
    "OntologyService/DeleteOntology": Row(
        "catalog_write", msg(on.DeleteOntologyRequest, app_id=A, ontology_id="nope", request_id=BAD)
    ),
    # ProjectService
    "ProjectService/CreateProject": Row(
        "catalog_write",
        msg(pr.CreateProjectRequest, app_id=A, project={"id": "mx-p"}, request_id=BAD),
    ),
    "ProjectService/GetProject": Row(
        "catalog_read", msg(pr.GetProjectRequest, app_id=A, project_id="nope")
    ),
    "ProjectService/ListProjects": Row("catalog_read", msg(pr.ListProjectsRequest, app_id=A)),
    "ProjectService/UpdateProject": Row(
        "catalog_write",
        msg(
            pr.UpdateProjectRequest,
            app_id=A,
            project={"id": "nope", "description": "x"},
            request_id=BAD,
        ),
    ),
    "ProjectService/DeleteProject": Row(
        "catalog_write", msg(pr.DeleteProjectRequest, app_id=A, project_id="nope", request_id=BAD)
    ),
    "ProjectService/AttachDataset": Row(
        "catalog_write",
        msg(pr.AttachDatasetRequest, app_id=A, project_id="nope", dataset_id=D, request_id=BAD),
    ),
    "ProjectService/DetachDataset": Row(
        "catalog_write",
        msg(pr.DetachDatasetRequest, app_id=A, project_id="nope", dataset_id=D, request_id=BAD),
    ),
    "ProjectService/ValidateDataset": Row(
        "dataset_read", msg(pr.ValidateDatasetRequest, app_id=A, dataset_id=D)
    ),
    # SearchService
    "SearchService/SearchInputs": Row(
        "dataset_read", msg(se.SearchInputsRequest, app_id=A, query={"scope": {"dataset_id": D}})
    ),
    "SearchService/FindDuplicates": Row(
        "dataset_read", msg(se.FindDuplicatesRequest, app_id=A, scope={"dataset_id": D})
    ),
    "SearchService/ListEmbeddingModels": Row(
        "catalog_read", msg(se.ListEmbeddingModelsRequest, app_id=A)
    ),
    "SearchService/GetInputEmbeddings": Row(
        "input_read", msg(se.GetInputEmbeddingsRequest, app_id=A, input_id="$input_id")
    ),
    "SearchService/GetSearchJob": Row(
        "any", msg(se.GetSearchJobRequest, app_id=A, job_id="987654")
    ),
    # AccessService
    "AccessService/CreateUser": Row(
        "users_write", msg(ac.CreateUserRequest, app_id=A, user={"id": "mx-user"}, request_id=BAD)
    ),
    "AccessService/ListUsers": Row("users_read", msg(ac.ListUsersRequest, app_id=A)),
    "AccessService/UpdateUser": Row(
        "users_write",
        msg(
            ac.UpdateUserRequest,
            app_id=A,
            user={"id": "member", "display_name": "x"},
            request_id=BAD,
        ),
    ),
    "AccessService/DeleteUser": Row(
        "users_write", msg(ac.DeleteUserRequest, app_id=A, user_id="member", request_id=BAD)
    ),
    "AccessService/AddCollaborator": Row(
        "dataset_manage",
        msg(
            ac.AddCollaboratorRequest,
            app_id=A,
            dataset_id=D,
            collaborator={"user_id": "member"},
            request_id=BAD,
        ),
    ),
    "AccessService/ListCollaborators": Row(
        "dataset_read", msg(ac.ListCollaboratorsRequest, app_id=A, dataset_id=D)
    ),
    "AccessService/UpdateCollaborator": Row(
        "dataset_manage",
        msg(
            ac.UpdateCollaboratorRequest,
            app_id=A,
            dataset_id=D,
            user_id="viewer",
            role="DATASET_ROLE_ADMIN",
            request_id=BAD,
        ),
    ),
    "AccessService/RemoveCollaborator": Row(
        "dataset_manage",
        msg(ac.RemoveCollaboratorRequest, app_id=A, dataset_id=D, user_id="viewer", request_id=BAD),
    ),
    "AccessService/CreateApiKey": Row(
        "keys",
        msg(
            ac.CreateApiKeyRequest,
            app_id=A,
            api_key={
                "description": "made by the matrix",
                "kind": "KEY_KIND_SCOPED",
                "access": "KEY_ACCESS_READ",
                "dataset_ids": [D],
            },
        ),
        mutation=True,
    ),
    "AccessService/ListApiKeys": Row(
        "keys", msg(ac.ListApiKeysRequest, app_id=A, dataset_id=D), mutation=False
    ),
    # Revoking twice is not an error: every allowed caller revokes the same key.
    "AccessService/RevokeApiKey": Row(
        "keys", msg(ac.RevokeApiKeyRequest, app_id=A, key_id="$sacrificial_key"), mutation=True
    ),
    "AccessService/ListAuditEvents": Row(
        "keys", msg(ac.ListAuditEventsRequest, app_id=A, dataset_id=D), mutation=False
    ),
}
V2_ROWS: dict[str, Row] = {
    # An invalid id: refused per annotation after the rule, nothing stored.
    "PostAnnotations": Row(
        "input_write",
        v2("PostAnnotations", annotations=[{"id": "bad id!", "input_id": "$input_id"}]),
    ),
    "GetAnnotation": Row(
        "input_read",
        v2("GetAnnotation", annotation_id="$annotation_id", input_id="$input_id"),
    ),
    "ListAnnotations": Row("input_read", v2("ListAnnotations", input_ids=["$input_id"])),
    "PatchAnnotations": Row(
        "input_write",
        v2(
            "PatchAnnotations",
            annotations=[{"id": "$annotation_id", "input_id": "$input_id"}],
            action="bogus",
        ),
    ),
    "DeleteAnnotation": Row(
        "app_write", v2("DeleteAnnotation", input_id="nope", annotation_id="nope")
    ),
    "DeleteAnnotations": Row(
        "app_write", v2("DeleteAnnotations", ids=["nope"], input_ids=["nope"])
    ),
    "GetApp": Row("catalog_read", v2("GetApp")),
    "GetUser": Row("catalog_read", v2("GetUser")),
    "PostApps": Row("catalog_read", v2("PostApps", apps=[{"id": "$app_id"}])),
    "ListConcepts": Row("catalog_read", v2("ListConcepts")),
    "GetConcept": Row("catalog_read", v2("GetConcept", concept_id="nope")),
    "PostConcepts": Row("catalog_write", v2("PostConcepts", concepts=[{"id": "bad id!"}])),
    "PatchConcepts": Row(
        "catalog_write", v2("PatchConcepts", concepts=[{"id": "bad id!"}], action="overwrite")
    ),
    "PostDatasetInputs": Row(
        "dataset_write",
        v2("PostDatasetInputs", dataset_id=D, dataset_inputs=[{"input": {"id": "nope"}}]),
    ),
    "ListDatasetInputs": Row("dataset_read", v2("ListDatasetInputs", dataset_id=D)),
    "GetDatasetInput": Row(
        "dataset_read", v2("GetDatasetInput", dataset_id=D, input_id="$input_id")
    ),
    "DeleteDatasetInputs": Row(
        "dataset_write", v2("DeleteDatasetInputs", dataset_id=D, input_ids=["nope"])
    ),
    "PostDatasets": Row("new_dataset", v2("PostDatasets", datasets=[{"id": "bad id!"}])),
    "GetDataset": Row("dataset_read", v2("GetDataset", dataset_id=D)),
    "ListDatasets": Row("catalog_read", v2("ListDatasets")),
    "PatchDatasets": Row(
        "dataset_write", v2("PatchDatasets", datasets=[{"id": D, "notes": "x"}], action="bogus")
    ),
    "DeleteDatasets": Row("dataset_write", v2("DeleteDatasets", dataset_ids=[D])),
    "PostInputs": Row(
        "dataset_write",
        v2("PostInputs", inputs=[{"id": "bad id!", "dataset_ids": [D]}]),
    ),
    "GetInputsAddJob": Row("app_read", v2("GetInputsAddJob", id="nope")),
    "CancelInputsAddJob": Row("app_write", v2("CancelInputsAddJob", id="nope")),
    "ListInputsAddJobs": Row("app_read", v2("ListInputsAddJobs")),
    "GetInput": Row("input_read", v2("GetInput", input_id="$input_id")),
    "ListInputs": Row("app_read", v2("ListInputs")),
    "StreamInputs": Row("app_read", v2("StreamInputs")),
    "GetInputCount": Row("app_read", v2("GetInputCount")),
    "PatchInputs": Row(
        "input_write", v2("PatchInputs", inputs=[{"id": "$input_id"}], action="bogus")
    ),
    "DeleteInput": Row("app_write", v2("DeleteInput", input_id="nope")),
    "DeleteInputs": Row("app_write", v2("DeleteInputs", ids=["nope"])),
    "PostDatasetVersions": Row(
        "dataset_write",
        v2("PostDatasetVersions", dataset_id=D, dataset_versions=[{"id": "bad id!"}]),
    ),
    "ListDatasetVersions": Row("dataset_read", v2("ListDatasetVersions", dataset_id=D)),
    "GetDatasetVersion": Row(
        "dataset_read", v2("GetDatasetVersion", dataset_id=D, dataset_version_id="$version_id")
    ),
    "PatchDatasetVersions": Row(
        "dataset_write",
        v2("PatchDatasetVersions", dataset_id=D, dataset_versions=[{"id": "nope"}], action="merge"),
    ),
    "DeleteDatasetVersions": Row(
        "dataset_write", v2("DeleteDatasetVersions", dataset_id=D, dataset_version_ids=["nope"])
    ),
    "PutDatasetVersionExports": Row(
        "dataset_write",
        v2("PutDatasetVersionExports", dataset_id=D, dataset_version_id="nope"),
    ),
    "ListDatasetVersionMetricsGroups": Row(
        "dataset_read",
        v2("ListDatasetVersionMetricsGroups", dataset_id=D, dataset_version_id="$version_id"),
    ),
}
# Really deletes the dataset: the last call of the matrix.
LAST = f"/{V2.full_name}/DeleteDatasets"

# V2 in-band codes → the status code name they stand for.
V2_CODES = {
    status_code_pb2.SUCCESS: "OK",
    status_code_pb2.CONN_KEY_INVALID: "UNAUTHENTICATED",
    status_code_pb2.CONN_INSUFFICIENT_SCOPES: "PERMISSION_DENIED",
}
REFUSED = ("PERMISSION_DENIED", "UNAUTHENTICATED")


def all_methods() -> list[MethodDescriptor]:
    return [m for service in SERVICES for m in service.methods]


def row_of(method: MethodDescriptor) -> Row | None:
    if method.containing_service is V2:
        return V2_ROWS.get(method.name)
    return ROWS.get(f"{method.containing_service.name}/{method.name}")


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def expected(row: Row, principal: str, method: MethodDescriptor) -> str:
    """ALLOWED, or the exact code of the refusal."""
    if principal in PRE_AUTH:
        return "UNAUTHENTICATED"
    if principal == "other_app_key":
        # V2 reads the app from user_app_id: a key of another app is not a key of it.
        return "UNAUTHENTICATED" if method.containing_service is V2 else "PERMISSION_DENIED"
    return "ALLOWED" if principal in ALLOWED[row.category] else "PERMISSION_DENIED"


# --- the world ---------------------------------------------------------------------------


async def _personal(db: Database, app_id: str, user_id: str, role: AppRole) -> tuple[str, str]:
    await PgUserRepository(db).insert(User(app_id=app_id, id=user_id, role=role))
    secret, key = new_key(app_id, f"personal key of {user_id}")
    await PgApiKeyRepository(db).insert(
        dataclasses.replace(key, kind=KeyKind.PERSONAL, user_id=user_id)
    )
    return secret, key.id


async def _scoped(
    db: Database, app_id: str, scopes: tuple[str, ...], datasets: tuple[str, ...] = (), **more: Any
) -> tuple[str, str]:
    secret, key = new_key(app_id, "scoped")
    await PgApiKeyRepository(db).insert(
        dataclasses.replace(key, scopes=scopes, dataset_ids=datasets, **more)
    )
    return secret, key.id


def _key(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Key {secret}"),)


@pytest.fixture(scope="module")
async def world(server: Running, channel: grpc.aio.Channel) -> World:
    db = server.resources.db
    tag = secrets.token_hex(4)
    app_id, other_app = f"mx-{tag}", f"mx-other-{tag}"
    owner_secret, owner_key = await _personal(db, app_id, "owner", AppRole.OWNER)
    owner = _key(owner_secret)
    description = f"matrix secret description {tag}"
    text = f"matrix secret text {tag}"
    datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    for dataset_id in ("ds", "other"):
        await datasets.CreateDataset(
            json_format.ParseDict(
                {"app_id": app_id, "dataset": {"id": dataset_id, "description": description}},
                dataset_service_pb2.CreateDatasetRequest(),
            ),
            metadata=owner,
        )
    await input_service_pb2_grpc.InputServiceStub(channel).CreateInputs(
        json_format.ParseDict(
            {
                "app_id": app_id,
                "inputs": [{"id": "in1", "data": {"text": {"raw": text}}, "dataset_ids": ["ds"]}],
            },
            input_service_pb2.CreateInputsRequest(),
        ),
        metadata=owner,
    )
    made = await annotation_service_pb2_grpc.AnnotationServiceStub(channel).CreateAnnotations(
        json_format.ParseDict(
            {
                "app_id": app_id,
                "annotations": [
                    {
                        "id": "an1",
                        "input_id": "in1",
                        "data": {"concepts": [{"id": "c", "value": 1}]},
                    }
                ],
            },
            annotation_service_pb2.CreateAnnotationsRequest(),
        ),
        metadata=owner,
    )
    assert made.created_count == 1, made
    versions = dataset_version_service_pb2_grpc.DatasetVersionServiceStub(channel)
    created = await versions.CreateDatasetVersion(
        dataset_version_service_pb2.CreateDatasetVersionRequest(
            app_id=app_id, dataset_id="ds", version=dataset_version_pb2.DatasetVersion(id="v1")
        ),
        metadata=owner,
    )
    # READY when created: exportable at once.
    assert created.version.status.code == READY, created.version.status
    export = await versions.ExportDatasetVersion(
        dataset_version_service_pb2.ExportDatasetVersionRequest(
            app_id=app_id,
            dataset_id="ds",
            version_id="v1",
            format=dataset_version_pb2.EXPORT_FORMAT_COCO,
        ),
        metadata=owner,
    )
    export_id = export.export.id
    users = PgCollaboratorRepository(db)
    metadata = {"owner": owner, "no_key": ()}
    identity = {"owner": ("owner", owner_key)}
    for user_id, role in (
        ("member", None),
        ("viewer", DatasetRole.VIEWER),
        ("admin", DatasetRole.ADMIN),
    ):
        secret, key_id = await _personal(db, app_id, user_id, AppRole.MEMBER)
        if role is not None:
            await users.insert(
                Collaborator(app_id=app_id, dataset_id="ds", user_id=user_id, role=role)
            )
        metadata[user_id] = _key(secret)
        identity[user_id] = (user_id, key_id)
    for name, scopes, bound in (
        ("read_key", ("read",), ("ds",)),
        ("write_key", ("read", "write"), ("ds",)),
        ("other_dataset_key", ("read", "write"), ("other",)),
    ):
        secret, key_id = await _scoped(db, app_id, scopes, bound)
        metadata[name] = _key(secret)
        identity[name] = ("", key_id)
    secret, key_id = await _scoped(db, other_app, ("read", "write"))
    metadata["other_app_key"] = _key(secret)
    identity["other_app_key"] = ("", key_id)
    past = datetime.now(UTC) - timedelta(days=1)
    expired, _ = await _scoped(db, app_id, ("read", "write"), expires_at=past)
    revoked, revoked_id = await _scoped(db, app_id, ("read", "write"))
    assert await PgApiKeyRepository(db).revoke(app_id, revoked_id)
    _, sacrificial = await _scoped(db, app_id, ("read",), ("ds",))
    metadata |= {
        "malformed": (("authorization", "Basic abc"),),
        "unknown": _key("dsd_" + secrets.token_urlsafe(32)),
        "expired": _key(expired),
        "revoked": _key(revoked),
    }
    for name in PRE_AUTH:
        identity[name] = ("", "")
    await _until(lambda: _busy_jobs(db, app_id), lambda busy: busy == 0)
    return World(
        app_id=app_id,
        other_app=other_app,
        ds="ds",
        other="other",
        input_id="in1",
        annotation_id="an1",
        version_id="v1",
        export_id=export_id,
        secret_words=(description.encode(), text.encode()),
        sacrificial_key=sacrificial,
        metadata=metadata,
        identity=identity,
    )


async def _until(fetch: Callable[[], Any], done: Callable[[Any], bool], seconds: float = 30) -> Any:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        value = await fetch()
        if done(value):
            return value
        assert asyncio.get_running_loop().time() < deadline, f"still {value}"
        await asyncio.sleep(0.05)


async def _busy_jobs(db: Database, app_id: str) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM jobs WHERE app_id = $1 AND status IN ('queued', 'running')",
            app_id,
        )
    )


# Tables whose changes a refused call may cause: its audit event, and the request ids.
_NOT_DIGESTED = frozenset({"audit_events", "idempotency", "schema_migrations"})
# Columns a refused call may touch: the key's last use (authentication, not the call).
_VOLATILE = frozenset({"last_used_at"})


async def digest(db: Database, apps: list[str]) -> dict[str, str]:
    columns = await db.fetch(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
    )
    tables: dict[str, list[str]] = {}
    for row in columns:
        tables.setdefault(row["table_name"], []).append(row["column_name"])
    out: dict[str, str] = {}
    for table, names in tables.items():
        if table in _NOT_DIGESTED:
            continue
        if "app_id" not in names:
            # Installation-wide (blobs, job runs, secrets): every app's background work
            # touches them at any time. A refused call's write would show in the app's
            # own tables too (an input, an export, a job referring to it).
            continue
        kept = ", ".join(f'"{n}"' for n in names if n not in _VOLATILE)
        out[table] = await db.fetchval(
            f"SELECT md5(coalesce(string_agg(r::text, '|' ORDER BY r::text), '')) "
            f'FROM (SELECT {kept} FROM "{table}" WHERE app_id = ANY($1::text[])) r',
            apps,
        )
    return out


# --- calling -----------------------------------------------------------------------------

_ids = itertools.count()


@dataclasses.dataclass
class Outcome:
    code: str
    body: bytes
    request_id: str


async def call(
    channel: grpc.aio.Channel, method: MethodDescriptor, request: Message, metadata: Any
) -> Outcome:
    request_id = f"mx-{secrets.token_hex(3)}-{next(_ids)}"
    metadata = (*metadata, ("x-request-id", request_id))
    path = path_of(method)
    out = message_factory.GetMessageClass(method.output_type)
    serialize = lambda m: m.SerializeToString()  # noqa: E731
    raw = lambda b: b  # noqa: E731
    try:
        if method.client_streaming:
            stream = channel.stream_unary(
                path, request_serializer=serialize, response_deserializer=raw
            )
            body = await stream(iter([request]), metadata=metadata, timeout=30)
        elif method.server_streaming:
            many = channel.unary_stream(
                path, request_serializer=serialize, response_deserializer=raw
            )
            parts = [part async for part in many(request, metadata=metadata, timeout=30)]
            body = b"".join(parts)
        else:
            unary = channel.unary_unary(
                path, request_serializer=serialize, response_deserializer=raw
            )
            body = await unary(request, metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as error:
        details = (error.details() or "").encode() + repr(error.trailing_metadata()).encode()
        return Outcome(error.code().name, details, request_id)
    code = "OK"
    if method.containing_service is V2:
        answer = out.FromString(body)
        status = answer.status  # type: ignore[attr-defined]
        code = V2_CODES.get(status.code, f"V2:{status.code}")
    return Outcome(code, body, request_id)


async def audit_rows(db: Database, request_id: str) -> list[tuple[str, str, str, str]]:
    rows = await db.fetch(
        "SELECT app_id, user_id, key_id, outcome FROM audit_events WHERE request_id = $1",
        request_id,
    )
    return [(r["app_id"], r["user_id"], r["key_id"], r["outcome"]) for r in rows]


# --- the tests ---------------------------------------------------------------------------


def test_every_rpc_has_a_row() -> None:
    missing = [path_of(m) for m in all_methods() if row_of(m) is None]
    assert missing == [], f"RPCs without a row in the authorization matrix: {missing}"
    stale = set(ROWS) - {f"{m.containing_service.name}/{m.name}" for m in all_methods()}
    assert stale == set()


async def test_unlisted_v2_methods_are_not_implemented(
    world: World, channel: grpc.aio.Channel
) -> None:
    """A V2 method without a row must be one datasetd does not implement: it answers
    NOT_IMPLEMENTED (any implemented one must get a row above)."""
    implemented = []
    for method in V2.methods:
        if method.name in V2_ROWS or method.client_streaming or method.server_streaming:
            continue
        request = message_factory.GetMessageClass(method.input_type)()
        outcome = await call(channel, method, request, world.metadata["owner"])
        if outcome.code != f"V2:{status_code_pb2.NOT_IMPLEMENTED}":
            implemented.append((method.name, outcome.code))
    assert implemented == []


async def test_add_by_search_needs_read_on_what_the_search_reads(
    world: World, channel: grpc.aio.Channel
) -> None:
    """AddDatasetInputs names the dataset it writes and, in its search, the one it reads
    (or the whole app): the domain re-checks the second (a dataset Admin of `ds` and a key
    bound to `ds` may not copy another dataset's inputs into it)."""
    stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)

    async def add(principal: str, scope: str) -> str:
        request = json_format.ParseDict(
            {
                "app_id": world.app_id,
                "dataset_id": world.ds,
                "search": {"scope": {"dataset_id": scope}} if scope else {"media_types": []},
                "dry_run": True,
            },
            dataset_service_pb2.AddDatasetInputsRequest(),
        )
        try:
            await stub.AddDatasetInputs(request, metadata=world.metadata[principal])
        except grpc.aio.AioRpcError as error:
            return error.code().name
        return "OK"

    for principal in ("admin", "write_key"):
        assert await add(principal, world.other) == "PERMISSION_DENIED", principal
        assert await add(principal, "") == "PERMISSION_DENIED", principal
        assert await add(principal, world.ds) == "OK", principal
    assert await add("owner", world.other) == "OK"
    assert await add("owner", "") == "OK"


async def test_authorization_matrix(
    world: World, channel: grpc.aio.Channel, server: Running
) -> None:
    """Runs last of the module: its final call (V2 DeleteDatasets) deletes `ds`."""
    db = server.resources.db
    methods = [m for m in all_methods() if path_of(m) != LAST]
    methods += [m for m in V2.methods if m.name in V2_ROWS and path_of(m) != LAST]
    methods.append(V2.methods_by_name["DeleteDatasets"])
    problems: list[str] = []
    apps = [world.app_id, world.other_app]
    for method in methods:
        row = row_of(method)
        assert row is not None
        request = row.build(world)
        plan = {p: expected(row, p, method) for p in PRINCIPALS}
        refused = [p for p in PRINCIPALS if plan[p] != "ALLOWED"]
        allowed = [p for p in (*ALLOWED_ORDER, "owner") if plan[p] == "ALLOWED"]
        # The allowed calls of the method before may have started a job (a version build,
        # an export): it must not change the tables while the refused calls are watched.
        await _until(lambda: _busy_jobs(db, world.app_id), lambda busy: busy == 0)
        before = await digest(db, apps)
        for principal in refused:
            outcome = await call(channel, method, request, world.metadata[principal])
            where = f"{path_of(method)} as {principal}"
            if outcome.code != plan[principal]:
                problems.append(f"{where}: {outcome.code}, expected {plan[principal]}")
            for word in world.secret_words:
                if word in outcome.body:
                    problems.append(f"{where}: the refusal carries {word!r}")
            problems += await _audit_problems(db, world, row, principal, outcome, where)
        after = await digest(db, apps)
        changed = sorted(t for t in before if before[t] != after.get(t))
        if changed:
            problems.append(f"{path_of(method)}: refused calls changed {changed}")
        for principal in allowed:
            outcome = await call(channel, method, request, world.metadata[principal])
            where = f"{path_of(method)} as {principal}"
            if outcome.code in REFUSED:
                problems.append(f"{where}: {outcome.code}, expected to be allowed")
            problems += await _audit_problems(db, world, row, principal, outcome, where)
    assert problems == [], "\n".join(problems)


async def _audit_problems(
    db: Database, world: World, row: Row, principal: str, outcome: Outcome, where: str
) -> list[str]:
    rows = await audit_rows(db, outcome.request_id)
    wanted = 1 if row.mutates or outcome.code in REFUSED else 0
    if len(rows) != wanted:
        return [f"{where} ({outcome.code}): {len(rows)} audit events, expected {wanted}"]
    if not rows:
        return []
    app_id, user_id, key_id, recorded = rows[0]
    problems = []
    if (user_id, key_id) != world.identity[principal]:
        problems.append(
            f"{where}: audit caller {(user_id, key_id)}, expected {world.identity[principal]}"
        )
    if app_id != world.app_id:
        problems.append(f"{where}: audit app {app_id}")
    if not outcome.code.startswith("V2:") and recorded != outcome.code:
        problems.append(f"{where}: audit outcome {recorded}, the caller got {outcome.code}")
    if outcome.code.startswith("V2:") and recorded == "OK":
        problems.append(f"{where}: audit outcome OK, the caller got {outcome.code}")
    return problems
