"""The project rules and the request → fields mapping, without a server."""

from __future__ import annotations

from datasetd.v1 import project_pb2

from service.domain.errors import Violations
from service.domain.projects import DESCRIPTION_MAX_CHARS, ProjectFields, check_project_fields
from service.wire.projects import project_fields


def _problems(fields: ProjectFields, *, create: bool) -> dict[str, str]:
    violations = Violations()
    check_project_fields(violations, fields, create=create)
    return {v.field: v.description for v in violations.items}


def test_a_create_needs_a_well_formed_ontology_id() -> None:
    assert _problems(ProjectFields(description="", ontology_id="onto"), create=True) == {}
    assert (
        "required" in _problems(ProjectFields(ontology_id=""), create=True)["project.ontology_id"]
    )
    assert "project.ontology_id" in _problems(ProjectFields(ontology_id="a/b"), create=True)
    long = _problems(
        ProjectFields(description="x" * (DESCRIPTION_MAX_CHARS + 1), ontology_id="o"), create=True
    )
    assert set(long) == {"project.description"}


def test_an_update_checks_only_what_it_changes() -> None:
    assert _problems(ProjectFields(description="new"), create=False) == {}
    # Named in the mask but empty: the ontology cannot be cleared.
    assert "project.ontology_id" in _problems(ProjectFields(ontology_id=""), create=False)


def test_fields_come_from_the_mask_or_else_from_what_is_set() -> None:
    message = project_pb2.Project(id="p", description="d", ontology_id="o")
    violations = Violations()
    assert project_fields(message, None, violations) == ProjectFields("d", "o")
    assert project_fields(message, ["description"], violations) == ProjectFields("d", None)
    only_set = project_fields(project_pb2.Project(id="p", ontology_id="o"), [], violations)
    assert only_set == ProjectFields(None, "o")
    assert violations.items == []
    project_fields(message, ["dataset_ids"], violations)
    assert [v.field for v in violations.items] == ["update_mask.paths[0]"]
