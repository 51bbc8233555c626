"""PostgreSQL repository of projects and their attached datasets."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from service.domain.errors import AlreadyExists
from service.domain.models import OntologyRef, Project, ProjectLink
from service.storage.db import Repository
from service.storage.rows import record

# The live datasets attached to the project `p`, sorted.
_DATASETS = """ARRAY(SELECT pd.dataset_id FROM project_datasets pd
      JOIN datasets d ON d.app_id = pd.app_id AND d.id = pd.dataset_id
      WHERE pd.app_id = p.app_id AND pd.project_id = p.id AND d.deleted_at IS NULL
      ORDER BY pd.dataset_id) AS dataset_ids"""
_COLUMNS = (
    f"p.app_id, p.id, p.seq, p.description, p.ontology_id, p.created_at, p.modified_at, {_DATASETS}"
)

INSERT = f"""
WITH p AS (
    INSERT INTO projects (app_id, id, description, ontology_id) VALUES ($1, $2, $3, $4)
    ON CONFLICT (app_id, id) DO NOTHING
    RETURNING *)
SELECT {_COLUMNS} FROM p
"""
SELECT_ONE = f"SELECT {_COLUMNS} FROM projects p WHERE p.app_id = $1 AND p.id = $2"
LOCK_ONE = SELECT_ONE + " FOR UPDATE OF p"
PAGE = f"""
SELECT {_COLUMNS} FROM projects p
WHERE p.app_id = $1 AND ($2::bigint IS NULL OR p.seq > $2::bigint)
ORDER BY p.seq LIMIT $3
"""
UPDATE = f"""
WITH p AS (
    UPDATE projects SET description = $3, ontology_id = $4,
           modified_at = greatest(now(), modified_at + interval '1 microsecond')
    WHERE app_id = $1 AND id = $2
    RETURNING *)
SELECT {_COLUMNS} FROM p
"""
TOUCH = """
UPDATE projects SET modified_at = greatest(now(), modified_at + interval '1 microsecond')
WHERE app_id = $1 AND id = $2
"""
DELETE = "DELETE FROM projects WHERE app_id = $1 AND id = $2"
ATTACH = """
INSERT INTO project_datasets (app_id, project_id, dataset_id) VALUES ($1, $2, $3)
ON CONFLICT DO NOTHING
"""
DETACH = "DELETE FROM project_datasets WHERE app_id = $1 AND project_id = $2 AND dataset_id = $3"
# The ontology (id, revision) of each live dataset holding one of the inputs ($2), or of
# each of the datasets ($2), through the projects they are attached to.
_GOVERNED = """
JOIN datasets d ON d.app_id = pd.app_id AND d.id = pd.dataset_id AND d.deleted_at IS NULL
JOIN projects p ON p.app_id = pd.app_id AND p.id = pd.project_id
JOIN ontologies o ON o.app_id = p.app_id AND o.id = p.ontology_id
"""
ONTOLOGIES_OF_INPUTS = f"""
SELECT DISTINCT m.input_id AS key, o.id, o.revision
FROM dataset_inputs m
JOIN project_datasets pd ON pd.app_id = m.app_id AND pd.dataset_id = m.dataset_id
{_GOVERNED}
WHERE m.app_id = $1 AND m.input_id = ANY($2::text[])
"""
ONTOLOGIES_OF_DATASETS = f"""
SELECT DISTINCT pd.dataset_id AS key, o.id, o.revision
FROM project_datasets pd
{_GOVERNED}
WHERE pd.app_id = $1 AND pd.dataset_id = ANY($2::text[])
"""
# Projects other than $3 that the datasets ($2) are attached to, with their ontology.
OTHER_PROJECTS = """
SELECT pd.dataset_id, p.id AS project_id, p.ontology_id
FROM project_datasets pd
JOIN projects p ON p.app_id = pd.app_id AND p.id = pd.project_id
WHERE pd.app_id = $1 AND pd.dataset_id = ANY($2::text[]) AND p.id <> $3
ORDER BY pd.dataset_id, p.id
"""


def _row_to_project(row: asyncpg.Record) -> Project:
    return record(Project, row, dataset_ids=tuple(row["dataset_ids"]))


class PgProjectRepository(Repository):
    async def insert(self, project: Project) -> Project:
        found = await self._one(
            _row_to_project,
            INSERT,
            project.app_id,
            project.id,
            project.description,
            project.ontology_id,
        )
        if found is None:
            raise AlreadyExists(
                f"project {project.id!r} already exists in app {project.app_id!r}",
                reason="PROJECT_EXISTS",
                metadata={"project_id": project.id},
            )
        return found

    async def get(self, app_id: str, project_id: str, *, lock: bool = False) -> Project | None:
        return await self._one(
            _row_to_project, LOCK_ONE if lock else SELECT_ONE, app_id, project_id
        )

    async def page(
        self, app_id: str, after_seq: int | None, limit: int
    ) -> list[tuple[int, Project]]:
        return await self._page(_row_to_project, PAGE, app_id, after_seq, limit)

    async def update(self, project: Project) -> Project:
        found = await self._one(
            _row_to_project,
            UPDATE,
            project.app_id,
            project.id,
            project.description,
            project.ontology_id,
        )
        if found is None:
            raise RuntimeError(f"project {project.app_id}/{project.id} vanished during update")
        return found

    async def delete(self, app_id: str, project_id: str) -> bool:
        return await self._db.affected(DELETE, app_id, project_id) > 0

    async def attach(self, app_id: str, project_id: str, dataset_id: str) -> bool:
        added = await self._db.affected(ATTACH, app_id, project_id, dataset_id) > 0
        if added:
            await self._db.affected(TOUCH, app_id, project_id)
        return added

    async def detach(self, app_id: str, project_id: str, dataset_id: str) -> bool:
        removed = await self._db.affected(DETACH, app_id, project_id, dataset_id) > 0
        if removed:
            await self._db.affected(TOUCH, app_id, project_id)
        return removed

    async def ontologies_of_inputs(
        self, app_id: str, input_ids: Sequence[str]
    ) -> list[tuple[str, OntologyRef]]:
        return await self._refs(ONTOLOGIES_OF_INPUTS, app_id, input_ids)

    async def ontologies_of_datasets(
        self, app_id: str, dataset_ids: Sequence[str]
    ) -> list[tuple[str, OntologyRef]]:
        return await self._refs(ONTOLOGIES_OF_DATASETS, app_id, dataset_ids)

    async def _refs(
        self, query: str, app_id: str, keys: Sequence[str]
    ) -> list[tuple[str, OntologyRef]]:
        if not keys:
            return []
        rows = await self._db.fetch(query, app_id, list(keys))
        return [(row["key"], OntologyRef(row["id"], row["revision"])) for row in rows]

    async def other_projects(
        self, app_id: str, dataset_ids: Sequence[str], project_id: str
    ) -> list[ProjectLink]:
        rows = await self._db.fetch(OTHER_PROJECTS, app_id, list(dataset_ids), project_id)
        return [ProjectLink(r["dataset_id"], r["project_id"], r["ontology_id"]) for r in rows]
