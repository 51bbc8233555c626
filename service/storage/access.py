"""PostgreSQL repositories of an app's users and of dataset collaborators."""

from __future__ import annotations

import asyncpg

from service.domain.errors import AlreadyExists, FieldViolation, NotFound
from service.domain.models import AppRole, Collaborator, DatasetRole, User
from service.storage.db import Repository
from service.storage.rows import record

_USER_COLUMNS = "app_id, id, display_name, role, created_at, modified_at"
# A taken id inserts nothing and returns no row: the caller's transaction stays usable.
INSERT_USER = f"""
INSERT INTO users (app_id, id, display_name, role) VALUES ($1, $2, $3, $4)
ON CONFLICT DO NOTHING
RETURNING {_USER_COLUMNS}
"""
USER = f"SELECT {_USER_COLUMNS} FROM users WHERE app_id = $1 AND id = $2"
USER_FOR_UPDATE = USER + " FOR UPDATE"
USERS_PAGE = f"""
SELECT {_USER_COLUMNS} FROM users
WHERE app_id = $1 AND ($2::text IS NULL OR id > $2)
ORDER BY id LIMIT $3
"""
UPDATE_USER = f"""
UPDATE users SET display_name = $3, role = $4, modified_at = now()
WHERE app_id = $1 AND id = $2
RETURNING {_USER_COLUMNS}
"""
# Collaborations go with the user (ON DELETE CASCADE).
DELETE_USER = "DELETE FROM users WHERE app_id = $1 AND id = $2"
OWNERS = "SELECT id FROM users WHERE app_id = $1 AND role = 'owner' ORDER BY id"
OWNERS_FOR_UPDATE = OWNERS + " FOR UPDATE"
ANY_USER = "SELECT EXISTS (SELECT 1 FROM users WHERE app_id = $1)"

_COLLABORATOR_COLUMNS = "app_id, dataset_id, user_id, role, added_by, created_at, modified_at"
INSERT_COLLABORATOR = f"""
INSERT INTO collaborators (app_id, dataset_id, user_id, role, added_by)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING
RETURNING {_COLLABORATOR_COLUMNS}
"""
COLLABORATOR = f"""
SELECT {_COLLABORATOR_COLUMNS} FROM collaborators
WHERE app_id = $1 AND dataset_id = $2 AND user_id = $3
"""
COLLABORATOR_FOR_UPDATE = COLLABORATOR + " FOR UPDATE"
COLLABORATORS_PAGE = f"""
SELECT {_COLLABORATOR_COLUMNS} FROM collaborators
WHERE app_id = $1 AND dataset_id = $2 AND ($3::text IS NULL OR user_id > $3)
ORDER BY user_id LIMIT $4
"""
SET_ROLE = f"""
UPDATE collaborators SET role = $4, modified_at = now()
WHERE app_id = $1 AND dataset_id = $2 AND user_id = $3
RETURNING {_COLLABORATOR_COLUMNS}
"""
DELETE_COLLABORATOR = """
DELETE FROM collaborators WHERE app_id = $1 AND dataset_id = $2 AND user_id = $3
"""
# A soft-deleted dataset keeps its collaborators (undelete restores them) but grants nothing.
ROLES_OF = """
SELECT c.dataset_id, c.role FROM collaborators c
JOIN datasets d ON d.app_id = c.app_id AND d.id = c.dataset_id
WHERE c.app_id = $1 AND c.user_id = $2 AND d.deleted_at IS NULL
"""
# The foreign keys of collaborators (0013_access.sql, PostgreSQL's default names).
_USER_FK = "collaborators_app_id_user_id_fkey"
_DATASET_FK = "collaborators_app_id_dataset_id_fkey"


def _row_to_user(row: asyncpg.Record) -> User:
    return record(User, row, role=AppRole(row["role"]))


def _row_to_collaborator(row: asyncpg.Record) -> Collaborator:
    return record(Collaborator, row, role=DatasetRole(row["role"]))


class PgUserRepository(Repository):
    async def insert(self, user: User) -> User:
        created = await self._one(
            _row_to_user, INSERT_USER, user.app_id, user.id, user.display_name, user.role.value
        )
        if created is None:
            raise AlreadyExists(
                f"user {user.id!r} already exists in app {user.app_id!r}",
                reason="USER_EXISTS",
                violations=[FieldViolation("user.id", "already taken in this app")],
                metadata={"user_id": user.id},
            )
        return created

    async def get(self, app_id: str, user_id: str, *, for_update: bool = False) -> User | None:
        return await self._one(
            _row_to_user, USER_FOR_UPDATE if for_update else USER, app_id, user_id
        )

    async def list_page(self, app_id: str, after: str | None, limit: int) -> list[User]:
        return await self._all(_row_to_user, USERS_PAGE, app_id, after, limit)

    async def update(self, user: User) -> User:
        updated = await self._one(
            _row_to_user, UPDATE_USER, user.app_id, user.id, user.display_name, user.role.value
        )
        if updated is None:
            raise NotFound.in_app("user", user.app_id, user.id)
        return updated

    async def delete(self, app_id: str, user_id: str) -> bool:
        return await self._db.affected(DELETE_USER, app_id, user_id) > 0

    async def owner_ids(self, app_id: str, *, for_update: bool = False) -> list[str]:
        rows = await self._db.fetch(OWNERS_FOR_UPDATE if for_update else OWNERS, app_id)
        return [row["id"] for row in rows]

    async def exists_any(self, app_id: str) -> bool:
        return bool(await self._db.fetchval(ANY_USER, app_id))


class PgCollaboratorRepository(Repository):
    async def insert(self, collaborator: Collaborator) -> Collaborator:
        c = collaborator
        try:
            created = await self._one(
                _row_to_collaborator,
                INSERT_COLLABORATOR,
                c.app_id,
                c.dataset_id,
                c.user_id,
                c.role.value,
                c.added_by,
            )
        except asyncpg.ForeignKeyViolationError as exc:
            # The use case checks both first; this is a user or dataset purged meanwhile.
            if exc.constraint_name == _USER_FK:
                raise NotFound.in_app("user", c.app_id, c.user_id) from exc
            if exc.constraint_name == _DATASET_FK:
                raise NotFound.in_app("dataset", c.app_id, c.dataset_id) from exc
            raise
        if created is None:
            raise AlreadyExists(
                f"user {c.user_id!r} is already a collaborator of dataset {c.dataset_id!r}",
                reason="COLLABORATOR_EXISTS",
                violations=[
                    FieldViolation("collaborator.user_id", "already a collaborator of the dataset")
                ],
                metadata={"dataset_id": c.dataset_id, "user_id": c.user_id},
            )
        return created

    async def get(
        self, app_id: str, dataset_id: str, user_id: str, *, for_update: bool = False
    ) -> Collaborator | None:
        return await self._one(
            _row_to_collaborator,
            COLLABORATOR_FOR_UPDATE if for_update else COLLABORATOR,
            app_id,
            dataset_id,
            user_id,
        )

    async def list_page(
        self, app_id: str, dataset_id: str, after: str | None, limit: int
    ) -> list[Collaborator]:
        return await self._all(
            _row_to_collaborator, COLLABORATORS_PAGE, app_id, dataset_id, after, limit
        )

    async def set_role(self, collaborator: Collaborator) -> Collaborator:
        c = collaborator
        updated = await self._one(
            _row_to_collaborator, SET_ROLE, c.app_id, c.dataset_id, c.user_id, c.role.value
        )
        if updated is None:
            raise NotFound.within("collaborator", c.user_id, "dataset", c.dataset_id)
        return updated

    async def delete(self, app_id: str, dataset_id: str, user_id: str) -> bool:
        return await self._db.affected(DELETE_COLLABORATOR, app_id, dataset_id, user_id) > 0

    async def roles_of(self, app_id: str, user_id: str) -> dict[str, DatasetRole]:
        rows = await self._db.fetch(ROLES_OF, app_id, user_id)
        return {row["dataset_id"]: DatasetRole(row["role"]) for row in rows}
