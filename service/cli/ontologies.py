"""`datasetd ontologies …` and `datasetd projects …`: label schemas and the projects using them.

The sections are registered here, beside their handlers, so that main.py only names them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli.commands import client_of, fields_of
from service.cli.output import Output, confirm
from service.client.ontologies import OntologyInfo
from service.client.projects import ProjectInfo, ValidationInfo

if TYPE_CHECKING:
    from service.cli.main import CommandTree

_ONTOLOGY_FILE_HELP = (
    "JSON file of a datasetd.v1.Ontology, e.g. "
    '{"classes": [{"id": "car", "shapes": ["SHAPE_BOUNDING_BOX"]}]} '
    "(see README, Projects and ontologies)"
)


def add_commands(tree: CommandTree) -> None:
    from service.cli.main import add_confirm_option, positive_int

    ontologies = tree.section("ontologies", "label schemas: classes, shapes and attributes")
    sub = tree.command(ontologies, "create", ontologies_create, "create an ontology from a file")
    sub.add_argument("ontology", nargs="?", default="", help="id (else the file's, else generated)")
    sub.add_argument("--file", required=True, help=_ONTOLOGY_FILE_HELP)
    sub = tree.command(
        ontologies, "get", ontologies_get, "show an ontology and its classes", "ontology"
    )
    sub.add_argument(
        "--editable",
        action="store_true",
        help="print only the fields `update --file` takes, as JSON (no output-only fields)",
    )
    tree.command(ontologies, "list", ontologies_list, "list the app's ontologies, oldest first")
    sub = tree.command(
        ontologies,
        "update",
        ontologies_update,
        "replace an ontology's description and classes with a file's (a new revision)",
        "ontology",
    )
    sub.add_argument("--file", required=True, help=_ONTOLOGY_FILE_HELP)
    sub.add_argument(
        "--expected-revision",
        type=positive_int,
        default=0,
        help="fail (ABORTED) if the ontology is no longer at this revision",
    )
    tree.command(
        ontologies,
        "archive-class",
        ontologies_archive_class,
        "archive a class: annotations keep it, new labels may not use it",
        "ontology",
        "class_id",
    )
    sub = tree.command(
        ontologies, "delete", ontologies_delete, "delete an ontology no project uses", "ontology"
    )
    add_confirm_option(sub)

    projects = tree.section("projects", "projects: an ontology and the datasets labelled with it")
    sub = tree.command(projects, "create", projects_create, "create a project")
    sub.add_argument("project", nargs="?", default="", help="id (generated when left out)")
    sub.add_argument("--ontology", required=True, help="id of the ontology the project uses")
    sub.add_argument("--description", default="")
    tree.command(
        projects,
        "get",
        projects_get,
        "show a project with its ontology and attached datasets",
        "project",
    )
    tree.command(projects, "list", projects_list, "list the app's projects, oldest first")
    sub = tree.command(
        projects, "update", projects_update, "change a project's description or ontology", "project"
    )
    sub.add_argument("--description", default=None)
    sub.add_argument("--ontology", default=None, help="id of the ontology to use from now on")
    sub = tree.command(
        projects,
        "delete",
        projects_delete,
        "delete a project (its datasets are detached and stay)",
        "project",
    )
    add_confirm_option(sub)
    tree.command(
        projects, "attach", projects_attach, "attach a dataset to a project", "project", "dataset"
    )
    tree.command(
        projects,
        "detach",
        projects_detach,
        "detach a dataset from a project",
        "project",
        "dataset",
    )
    sub = tree.command(
        projects,
        "validate",
        projects_validate,
        "check a dataset's labels against its project's ontology (exit 1 when some break it)",
        "dataset",
    )
    sub.add_argument(
        "--rule",
        default=None,
        help="list every finding of this rule only, e.g. UNKNOWN_CLASS, SHAPE_NOT_ALLOWED, "
        "MISSING_ATTRIBUTE, INVALID_ATTRIBUTE, UNKNOWN_ATTRIBUTE, UNKNOWN_KEYPOINT",
    )
    sub.add_argument(
        "--page-size",
        type=positive_int,
        default=20,
        help="findings shown per rule without --rule (20; at most 1000)",
    )


# --- ontologies ----------------------------------------------------------------

_ONTOLOGY_COLUMNS = ("id", "description", "revision", "classes", "modified_at")
_CLASS_COLUMNS = (
    "class",
    "category_id",
    "display_name",
    "color",
    "shapes",
    "keypoints",
    "attributes",
    "archived",
)


def _ontology_row(ontology: OntologyInfo) -> dict[str, Any]:
    return {
        "id": ontology.id,
        "description": ontology.description,
        "revision": ontology.revision,
        "classes": len(ontology.class_ids()),
        "created_at": ontology.created_at,
        "modified_at": ontology.modified_at,
    }


def _attribute(attribute: dict[str, Any]) -> str:
    kind: str = next(k for k in ("enum_type", "boolean", "number", "text") if k in attribute)
    detail = ""
    if kind == "enum_type":
        detail = "|".join(attribute[kind].get("options", []))
    elif kind == "number" and attribute[kind]:
        bounds = attribute[kind]
        detail = f"{bounds.get('min', '')}..{bounds.get('max', '')}"
    shown = kind.removesuffix("_type") + (f": {detail}" if detail else "")
    required = ", required" if attribute.get("required") else ""
    return f"{attribute.get('id')} ({shown}{required})"


def _class_rows(ontology: OntologyInfo) -> list[dict[str, Any]]:
    """One row per class, sub-classes as `parent > child`; input classifications marked."""
    rows: list[dict[str, Any]] = []

    def add(classes: list[dict[str, Any]], prefix: str) -> None:
        for item in classes:
            name = prefix + str(item.get("id", ""))
            rows.append(
                {
                    "class": name,
                    "category_id": item.get("category_id", ""),
                    "display_name": item.get("display_name", ""),
                    "color": item.get("color", ""),
                    "shapes": ", ".join(s.removeprefix("SHAPE_") for s in item.get("shapes", [])),
                    "keypoints": ", ".join(item.get("keypoint_names", [])),
                    "attributes": "; ".join(_attribute(a) for a in item.get("attributes", [])),
                    "archived": "yes" if item.get("archived") else "",
                }
            )
            add(item.get("sub_classes", []), name + " > ")

    add(ontology.classes, "")
    add(ontology.input_classifications, "(input) ")
    return rows


def _show_ontology(output: Output, ontology: OntologyInfo, title: str) -> None:
    if output.as_json:
        output.document(ontology)
        return
    output.record(_ontology_row(ontology), title)
    output.table(_class_rows(ontology), _CLASS_COLUMNS, f"classes of {ontology.id}")


def ontologies_create(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        ontology = client.ontologies.create(Path(args.file), ontology_id=args.ontology)
    _show_ontology(output, ontology, f"created ontology {ontology.id}")
    return 0


def ontologies_get(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        ontology = client.ontologies.get(args.ontology)
    if args.editable:
        output.document(ontology.content)
        return 0
    _show_ontology(output, ontology, f"ontology {ontology.id}")
    return 0


def ontologies_list(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        rows = [_ontology_row(o) for o in client.ontologies.list()]
    output.table(rows, _ONTOLOGY_COLUMNS, f"ontologies of app {args.app}")
    return 0


def ontologies_update(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        ontology = client.ontologies.update(
            args.ontology, Path(args.file), expected_revision=args.expected_revision
        )
    _show_ontology(output, ontology, f"updated ontology {ontology.id}")
    return 0


def ontologies_archive_class(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        ontology = client.ontologies.archive_class(args.ontology, args.class_id)
    _show_ontology(output, ontology, f"archived {args.class_id} in ontology {ontology.id}")
    return 0


def ontologies_delete(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        ontology = client.ontologies.get(args.ontology)
        confirm(
            output,
            f"Ontology {ontology.id} (revision {ontology.revision}, "
            f"{len(ontology.class_ids())} classes) will be deleted for good; "
            "annotations are not changed.",
            args.yes,
        )
        client.ontologies.delete(args.ontology)
    output.outcome(
        {"ontology_id": args.ontology, "deleted": True}, f"Ontology {args.ontology} was deleted."
    )
    return 0


# --- projects ------------------------------------------------------------------

_PROJECT_COLUMNS = ("id", "description", "ontology_id", "dataset_ids", "modified_at")


def _show_project(output: Output, project: ProjectInfo, title: str) -> None:
    output.record(fields_of(project), title)


def projects_create(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        project = client.projects.create(
            args.project, ontology_id=args.ontology, description=args.description
        )
    _show_project(output, project, f"created project {project.id}")
    return 0


def projects_get(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        project = client.projects.get(args.project)
        ontology = client.ontologies.get(project.ontology_id)
    if output.as_json:
        output.document(fields_of(project) | {"ontology": ontology})
        return 0
    _show_project(output, project, f"project {project.id}")
    output.table(
        _class_rows(ontology),
        _CLASS_COLUMNS,
        f"ontology {ontology.id} (revision {ontology.revision})",
    )
    return 0


def projects_list(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        rows = [fields_of(p) for p in client.projects.list()]
    output.table(rows, _PROJECT_COLUMNS, f"projects of app {args.app}")
    return 0


def projects_update(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        project = client.projects.update(
            args.project, description=args.description, ontology_id=args.ontology
        )
    _show_project(output, project, f"updated project {project.id}")
    return 0


def projects_delete(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        project = client.projects.get(args.project)
        attached = ", ".join(project.dataset_ids) or "none"
        confirm(
            output,
            f"Project {project.id} will be deleted for good; its datasets ({attached}) are "
            f"detached and stay, and its ontology {project.ontology_id} stays.",
            args.yes,
        )
        client.projects.delete(args.project)
    output.outcome(
        {"project_id": args.project, "deleted": True}, f"Project {args.project} was deleted."
    )
    return 0


def projects_attach(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        project = client.projects.attach_dataset(args.project, args.dataset)
    _show_project(output, project, f"attached {args.dataset} to project {project.id}")
    return 0


def projects_detach(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        project = client.projects.detach_dataset(args.project, args.dataset)
    _show_project(output, project, f"detached {args.dataset} from project {project.id}")
    return 0


_RULE_COLUMNS = ("rule", "annotations_count", "findings_count")
_FINDING_COLUMNS = ("rule", "input_id", "annotation_id", "field", "message")


def projects_validate(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        report = client.projects.validate_dataset(args.dataset, page_size=args.page_size)
        findings = (
            list(client.projects.dataset_findings(args.dataset, args.rule))
            if args.rule
            else [f for rule in report.rules for f in rule.findings]
        )
    if output.as_json:
        output.document(
            fields_of(report, leave_out=("rules", "next_page_token"))
            | {
                "dataset_id": args.dataset,
                "rules": [fields_of(r, leave_out=("findings",)) for r in report.rules],
                "findings": findings,
            }
        )
    else:
        _show_validation(output, args.dataset, report)
        if findings:
            shown = (
                f"every finding of {args.rule.upper()}" if args.rule else "first findings per rule"
            )
            output.table([fields_of(f) for f in findings], _FINDING_COLUMNS, shown)
        elif not report.annotations_invalid:
            output.text("Every label on the dataset fits the ontology.")
    return 0 if report.annotations_invalid == 0 else 1


def _show_validation(output: Output, dataset_id: str, report: ValidationInfo) -> None:
    output.record(
        {
            "dataset": dataset_id,
            "ontology": f"{report.ontology_id} (revision {report.ontology_revision})",
            "annotations_checked": report.annotations_checked,
            "annotations_invalid": report.annotations_invalid,
        },
        f"labels of dataset {dataset_id} against ontology {report.ontology_id}",
    )
    if report.rules:
        output.table(
            [fields_of(r, leave_out=("findings",)) for r in report.rules],
            _RULE_COLUMNS,
            "rules broken",
        )
