"""Projects: one ontology of an app and the datasets labelled with it, and the use cases.

A project's ontology and its datasets belong to the project's app; an unknown one is
NOT_FOUND naming the field that carried it."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Final

from service.domain.auth import Permission, authorize
from service.domain.errors import NotFound, Violations
from service.domain.models import Principal, Project
from service.domain.paging import split_page
from service.domain.ports import (
    DatasetRepository,
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


@dataclass(frozen=True)
class ProjectService:
    projects: ProjectRepository
    ontologies: OntologyRepository
    datasets: DatasetRepository
    tx: TransactionManager

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
            await self._require(app_id, project_id, lock=True)
            # Locked and live: a purge waits for the attachment, then removes it.
            if await self.datasets.get(app_id, dataset_id, lock=True) is None:
                raise _missing("dataset_id", "dataset", app_id, dataset_id)
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

    async def _require_ontology(self, app_id: str, ontology_id: str) -> None:
        if await self.ontologies.get(app_id, ontology_id, lock=True) is None:
            raise _missing("project.ontology_id", "ontology", app_id, ontology_id)

    async def _require(self, app_id: str, project_id: str, *, lock: bool = False) -> Project:
        require_ids(("project_id", project_id))
        found = await self.projects.get(app_id, project_id, lock=lock)
        if found is None:
            raise NotFound.in_app("project", app_id, project_id)
        return found
