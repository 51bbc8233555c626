"""Project messages <-> the domain's projects."""

from __future__ import annotations

from collections.abc import Sequence

from datasetd.v1 import project_pb2

from service.domain.errors import Violations
from service.domain.models import Project
from service.domain.projects import UPDATABLE_FIELDS, ProjectFields
from service.wire.masks import given_fields
from service.wire.timestamps import set_times


def project_fields(
    message: project_pb2.Project, paths: Sequence[str] | None, violations: Violations
) -> ProjectFields:
    """The fields a caller gave: those in `paths`, or else those set to a non-default value
    (`paths` None: a create, where every field is given)."""
    given = given_fields(
        paths,
        UPDATABLE_FIELDS,
        {
            "description": bool(message.description),
            "ontology_id": bool(message.ontology_id),
        },
        violations,
    )
    return ProjectFields(
        description=message.description if "description" in given else None,
        ontology_id=message.ontology_id if "ontology_id" in given else None,
    )


def project_to_proto(project: Project) -> project_pb2.Project:
    message = project_pb2.Project(
        id=project.id,
        app_id=project.app_id,
        description=project.description,
        ontology_id=project.ontology_id,
        dataset_ids=project.dataset_ids,
    )
    set_times(message, project.created_at, project.modified_at)
    return message
