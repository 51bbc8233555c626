"""Synchronous ProjectService API: a project is one ontology and the datasets labelled with it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
from datasetd.v1 import project_pb2, project_service_pb2_grpc
from datasetd.v1 import project_service_pb2 as api
from google.protobuf import field_mask_pb2

from service.client._rpc import Rpc, time_of


@dataclass(frozen=True)
class ProjectInfo:
    """A project as the server last returned it."""

    id: str
    app_id: str
    description: str
    ontology_id: str
    # The live attached datasets, sorted.
    dataset_ids: list[str] = field(default_factory=list)
    created_at: datetime | None = None
    modified_at: datetime | None = None


_RULE_PREFIX = "ONTOLOGY_RULE_"


@dataclass(frozen=True)
class FindingInfo:
    """One problem of one label on a dataset's input."""

    # Empty for an input's own concepts (input-level labels).
    annotation_id: str
    input_id: str
    # UNKNOWN_CLASS, SHAPE_NOT_ALLOWED, MISSING_ATTRIBUTE, ... (OntologyRule without prefix).
    rule: str
    # Path of the offending field within the annotation, e.g. `data.regions[0].data.concepts[0].id`.
    field: str
    message: str


@dataclass(frozen=True)
class RuleReportInfo:
    """How many labels of the whole dataset break a rule, and a page of them."""

    rule: str
    annotations_count: int
    findings_count: int
    findings: list[FindingInfo]


@dataclass(frozen=True)
class ValidationInfo:
    """A dataset's labels checked against its project's ontology (ValidateDataset)."""

    ontology_id: str
    ontology_revision: int
    annotations_checked: int
    annotations_invalid: int
    # One report per rule with findings, in rule order; empty when every label fits.
    rules: list[RuleReportInfo]
    # With a rule asked for: the token of its next page of findings, else empty.
    next_page_token: str = ""


def _rule_number(rule: str) -> Any:
    """A rule by its name, with or without the ONTOLOGY_RULE_ prefix."""
    names = [v.name.removeprefix(_RULE_PREFIX) for v in api.OntologyRule.DESCRIPTOR.values]
    name = rule.upper().removeprefix(_RULE_PREFIX)
    if name not in names or name == "UNSPECIFIED":
        allowed = ", ".join(n for n in names if n != "UNSPECIFIED")
        raise ValueError(f"rule must be one of {allowed}; got {rule!r}")
    return api.OntologyRule.Value(_RULE_PREFIX + name)


def _to_validation(message: api.ValidateDatasetResponse) -> ValidationInfo:
    def rule(number: Any) -> str:
        return api.OntologyRule.Name(number).removeprefix(_RULE_PREFIX)

    return ValidationInfo(
        ontology_id=message.ontology_id,
        ontology_revision=message.ontology_revision,
        annotations_checked=message.annotations_checked,
        annotations_invalid=message.annotations_invalid,
        rules=[
            RuleReportInfo(
                rule=rule(report.rule),
                annotations_count=report.annotations_count,
                findings_count=report.findings_count,
                findings=[
                    FindingInfo(f.annotation_id, f.input_id, rule(f.rule), f.field, f.message)
                    for f in report.findings
                ],
            )
            for report in message.rules
        ],
        next_page_token=message.next_page_token,
    )


def _to_info(message: project_pb2.Project) -> ProjectInfo:
    return ProjectInfo(
        id=message.id,
        app_id=message.app_id,
        description=message.description,
        ontology_id=message.ontology_id,
        dataset_ids=list(message.dataset_ids),
        created_at=time_of(message, "created_at"),
        modified_at=time_of(message, "modified_at"),
    )


class Projects:
    """Projects of the client's app (`Client.projects`)."""

    def __init__(self, rpc: Rpc, channel: grpc.Channel) -> None:
        self._rpc = rpc
        self._stub = project_service_pb2_grpc.ProjectServiceStub(channel)

    def _project(self, method: Any, request_type: type[Any], **fields: Any) -> ProjectInfo:
        """Calls a method that answers with the project."""
        return _to_info(self._rpc.app_call(method, request_type, **fields).project)

    def create(
        self,
        project_id: str,
        ontology_id: str,
        description: str = "",
        request_id: str | None = None,
    ) -> ProjectInfo:
        """Creates a project using an ontology of the app (NotFoundError naming
        `project.ontology_id` otherwise); an empty `project_id` lets the server generate one."""
        return self._project(
            self._stub.CreateProject,
            api.CreateProjectRequest,
            project=project_pb2.Project(
                id=project_id, ontology_id=ontology_id, description=description
            ),
            request_id=request_id,
        )

    def get(self, project_id: str) -> ProjectInfo:
        return self._project(self._stub.GetProject, api.GetProjectRequest, project_id=project_id)

    def list(self, page_size: int = 100) -> Iterator[ProjectInfo]:
        """Every project of the app, oldest first; pages are fetched as the caller goes."""
        for response in self._rpc.app_pages(
            self._stub.ListProjects, api.ListProjectsRequest, page_size
        ):
            yield from (_to_info(p) for p in response.projects)

    def update(
        self,
        project_id: str,
        description: str | None = None,
        ontology_id: str | None = None,
        request_id: str | None = None,
    ) -> ProjectInfo:
        """Replaces the given fields; those left as None are untouched (`description=""`
        clears it)."""
        project = project_pb2.Project(id=project_id)
        paths: list[str] = []
        if description is not None:
            project.description = description
            paths.append("description")
        if ontology_id is not None:
            project.ontology_id = ontology_id
            paths.append("ontology_id")
        if not paths:
            raise ValueError("update needs at least one of description or ontology_id")
        return self._project(
            self._stub.UpdateProject,
            api.UpdateProjectRequest,
            project=project,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            request_id=request_id,
        )

    def delete(self, project_id: str, request_id: str | None = None) -> None:
        """Deletes a project at once; its datasets are detached and stay."""
        self._rpc.app_call(
            self._stub.DeleteProject,
            api.DeleteProjectRequest,
            project_id=project_id,
            request_id=request_id,
        )

    def attach_dataset(
        self, project_id: str, dataset_id: str, request_id: str | None = None
    ) -> ProjectInfo:
        """Attaches a live dataset of the app; attaching it again changes nothing."""
        return self._project(
            self._stub.AttachDataset,
            api.AttachDatasetRequest,
            project_id=project_id,
            dataset_id=dataset_id,
            request_id=request_id,
        )

    def detach_dataset(
        self, project_id: str, dataset_id: str, request_id: str | None = None
    ) -> ProjectInfo:
        """Detaches a dataset; detaching one that is not attached changes nothing."""
        return self._project(
            self._stub.DetachDataset,
            api.DetachDatasetRequest,
            project_id=project_id,
            dataset_id=dataset_id,
            request_id=request_id,
        )

    def validate_dataset(
        self,
        dataset_id: str,
        rule: str | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> ValidationInfo:
        """Checks every label on the dataset's inputs against the ontology of the project it
        is attached to (FailedPreconditionError, DATASET_NOT_IN_PROJECT, when none): per
        rule, how many annotations break it and its first `page_size` findings. With `rule`
        (e.g. "UNKNOWN_CLASS") only that rule, and `next_page_token` continues its findings.
        Read only; labels made before the dataset was attached are reported, never dropped.
        """
        response = self._rpc.app_call(
            self._stub.ValidateDataset,
            api.ValidateDatasetRequest,
            dataset_id=dataset_id,
            rule=_rule_number(rule) if rule else None,
            page_size=page_size,
            page_token=page_token,
        )
        return _to_validation(response)

    def dataset_findings(
        self, dataset_id: str, rule: str, page_size: int = 1000
    ) -> Iterator[FindingInfo]:
        """Every finding of one rule in the dataset, page after page, as the caller goes
        (the server reads the whole dataset for each page, hence the largest pages)."""
        for response in self._rpc.app_pages(
            self._stub.ValidateDataset,
            api.ValidateDatasetRequest,
            page_size,
            dataset_id=dataset_id,
            rule=_rule_number(rule),
        ):
            for report in _to_validation(response).rules:
                yield from report.findings
