"""Projects: one ontology of an app and the datasets labelled with it, and the use cases.

A project's ontology and its datasets belong to the project's app; an unknown one is
NOT_FOUND naming the field that carried it."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from service.domain.auth import Permission, authorize
from service.domain.errors import FailedPrecondition, InvalidArgument, NotFound, Violations
from service.domain.models import AnnotationQuery, OntologyRef, Principal, Project
from service.domain.ontology_check import (
    DatasetValidation,
    OntologyGate,
    Rule,
    Tally,
    check_all,
    class_ids_in,
)
from service.domain.paging import split_page
from service.domain.ports import (
    AnnotationRepository,
    DatasetRepository,
    MembershipRepository,
    OntologyRepository,
    ProjectRepository,
    TransactionManager,
)
from service.domain.validation import check_id, check_text, checked_ids, require_ids

DESCRIPTION_MAX_CHARS: Final = 1024
UPDATABLE_FIELDS: Final = ("description", "ontology_id")


@dataclass(frozen=True)
class ProjectFields:
    """What a caller gave in a create or an update; None means not given."""

    description: str | None = None
    ontology_id: str | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))


def check_project_fields(violations: Violations, fields: ProjectFields, *, create: bool) -> None:
    """Adds a violation for every problem of the given fields (`project.<field>`)."""
    if fields.description is not None:
        check_text(violations, "project.description", fields.description, DESCRIPTION_MAX_CHARS)
    if create or fields.ontology_id is not None:
        check_id(violations, "project.ontology_id", fields.ontology_id or "")


def _missing(field: str, resource: str, app_id: str, resource_id: str) -> NotFound:
    found = NotFound.in_app(resource, app_id, resource_id)
    return NotFound(f"{field}: {found.message}", reason=found.reason, metadata=found.metadata)


# Annotations read per query while validating a dataset.
_VALIDATION_BATCH: Final = 1000


@dataclass(frozen=True)
class ProjectService:
    projects: ProjectRepository
    ontologies: OntologyRepository
    datasets: DatasetRepository
    tx: TransactionManager
    annotations: AnnotationRepository
    members: MembershipRepository
    gate: OntologyGate

    async def create(
        self, principal: Principal, app_id: str, project_id: str, fields: ProjectFields
    ) -> Project:
        authorize(principal, app_id, Permission.WRITE)
        violations = Violations()
        check_id(violations, "project.id", project_id, required=False)
        check_project_fields(violations, fields, create=True)
        violations.raise_if_any()
        draft = Project(
            app_id=app_id,
            id=project_id or uuid.uuid4().hex,
            ontology_id=fields.ontology_id or "",
            description=fields.description or "",
        )
        async with self.tx.transaction():
            # Locked: a concurrent DeleteOntology waits, then sees the project.
            await self._require_ontology(app_id, draft.ontology_id)
            return await self.projects.insert(draft)

    async def get(self, principal: Principal, app_id: str, project_id: str) -> Project:
        authorize(principal, app_id, Permission.READ)
        return await self._require(app_id, project_id)

    async def list(
        self, principal: Principal, app_id: str, after_seq: int | None, limit: int
    ) -> tuple[list[Project], int | None]:
        """A page, oldest first, and the cursor of its last row when more rows follow."""
        authorize(principal, app_id, Permission.READ)
        rows = await self.projects.page(app_id, after_seq, limit + 1)
        return split_page(rows, limit)

    async def update(
        self, principal: Principal, app_id: str, project_id: str, fields: ProjectFields
    ) -> Project:
        authorize(principal, app_id, Permission.WRITE)
        violations = checked_ids(("project.id", project_id))
        if fields.is_empty():
            violations.add(
                "project",
                "nothing to update: set the fields to change or name them in update_mask "
                f"({', '.join(UPDATABLE_FIELDS)})",
            )
        check_project_fields(violations, fields, create=False)
        violations.raise_if_any()
        async with self.tx.transaction():
            current = await self._require(app_id, project_id, lock=True)
            if fields.ontology_id is not None and fields.ontology_id != current.ontology_id:
                await self._require_ontology(app_id, fields.ontology_id)
                await self._refuse_second_ontology(
                    app_id, project_id, current.dataset_ids, fields.ontology_id
                )
            updated = dataclasses.replace(
                current,
                **{
                    name: getattr(fields, name)
                    for name in UPDATABLE_FIELDS
                    if getattr(fields, name) is not None
                },
            )
            return await self.projects.update(updated)

    async def delete(self, principal: Principal, app_id: str, project_id: str) -> None:
        authorize(principal, app_id, Permission.WRITE)
        require_ids(("project_id", project_id))
        if not await self.projects.delete(app_id, project_id):
            raise NotFound.in_app("project", app_id, project_id)

    async def attach(
        self, principal: Principal, app_id: str, project_id: str, dataset_id: str
    ) -> Project:
        authorize(principal, app_id, Permission.WRITE)
        require_ids(("project_id", project_id), ("dataset_id", dataset_id))
        async with self.tx.transaction():
            project = await self._require(app_id, project_id, lock=True)
            # Locked and live: a purge waits for the attachment, then removes it; and two
            # attachments of the dataset take turns, so the second sees the first.
            if await self.datasets.get(app_id, dataset_id, lock=True) is None:
                raise _missing("dataset_id", "dataset", app_id, dataset_id)
            await self._refuse_second_ontology(
                app_id, project_id, (dataset_id,), project.ontology_id
            )
            await self.projects.attach(app_id, project_id, dataset_id)
            return await self._require(app_id, project_id)

    async def detach(
        self, principal: Principal, app_id: str, project_id: str, dataset_id: str
    ) -> Project:
        authorize(principal, app_id, Permission.WRITE)
        require_ids(("project_id", project_id), ("dataset_id", dataset_id))
        async with self.tx.transaction():
            await self._require(app_id, project_id, lock=True)
            await self.projects.detach(app_id, project_id, dataset_id)
            return await self._require(app_id, project_id)

    async def validate(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        rule: Rule | None,
        after: tuple[int, int] | None,
        limit: int,
    ) -> DatasetValidation:
        """Every annotation on the dataset's inputs checked against its ontology: counts
        per rule and a page of findings (of `rule` after `after`, or the first of each)."""
        authorize(principal, app_id, Permission.READ)
        require_ids(("dataset_id", dataset_id))
        if rule is Rule.ARCHIVED_CLASS:
            raise InvalidArgument.field(
                "rule",
                f"{rule.value} is never reported by ValidateDataset: archiving a class keeps "
                "the labels that carry it",
            )
        tally = Tally(rule, after, limit)
        async with self.tx.read_transaction():
            if not await self.members.live_datasets(app_id, [dataset_id], lock=False):
                raise _missing("dataset_id", "dataset", app_id, dataset_id)
            checkers = (await self.gate.for_datasets(app_id, [dataset_id])).get(dataset_id, [])
            if not checkers:
                raise FailedPrecondition(
                    f"dataset {dataset_id!r} is attached to no project, so it has no ontology "
                    "to validate against; attach it first (AttachDataset)",
                    reason="DATASET_NOT_IN_PROJECT",
                    metadata={"dataset_id": dataset_id},
                )
            query = AnnotationQuery(app_id, None, dataset_id)
            cursor: int | None = None
            while True:
                rows = await self.annotations.page(query, cursor, _VALIDATION_BATCH)
                for seq, annotation in rows:
                    found = check_all(
                        checkers,
                        "data",
                        annotation.data,
                        allowed_archived=class_ids_in(annotation.data),
                    )
                    tally.add(seq, annotation.id, annotation.input_id, found)
                if len(rows) < _VALIDATION_BATCH:
                    break
                cursor = rows[-1][0]
        return tally.result(OntologyRef(checkers[0].ontology.id, checkers[0].ontology.revision))

    async def _refuse_second_ontology(
        self, app_id: str, project_id: str, dataset_ids: Sequence[str], ontology_id: str
    ) -> None:
        """FAILED_PRECONDITION when one of the datasets is attached to another project
        with another ontology: a dataset's labels follow one schema, so that its exports
        and versions have one set of categories."""
        if not dataset_ids:
            return
        links = await self.projects.other_projects(app_id, dataset_ids, project_id)
        clashes = [link for link in links if link.ontology_id != ontology_id]
        if not clashes:
            return
        shown = "; ".join(
            f"dataset {c.dataset_id!r} is attached to project {c.project_id!r} (ontology "
            f"{c.ontology_id!r})"
            for c in clashes[:10]
        )
        raise FailedPrecondition(
            f"{shown}: a dataset follows one ontology, and project {project_id!r} would "
            f"bring ontology {ontology_id!r}; detach the dataset from the other project "
            "first, or use projects of the same ontology",
            reason="DATASET_HAS_OTHER_ONTOLOGY",
            metadata={
                "dataset_id": clashes[0].dataset_id,
                "project_id": clashes[0].project_id,
                "ontology_id": clashes[0].ontology_id,
            },
        )

    async def _require_ontology(self, app_id: str, ontology_id: str) -> None:
        if await self.ontologies.get(app_id, ontology_id, lock=True) is None:
            raise _missing("project.ontology_id", "ontology", app_id, ontology_id)

    async def _require(self, app_id: str, project_id: str, *, lock: bool = False) -> Project:
        require_ids(("project_id", project_id))
        found = await self.projects.get(app_id, project_id, lock=lock)
        if found is None:
            raise NotFound.in_app("project", app_id, project_id)
        return found
