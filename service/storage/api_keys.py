"""PostgreSQL repository of API keys (hashes only)."""

from __future__ import annotations

import asyncpg

from service.domain.models import ApiKey
from service.storage.db import Database

INSERT = """
INSERT INTO api_keys (id, app_id, lookup, secret_hash, description, scopes, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""
_COLUMNS = (
    "id, app_id, lookup, secret_hash, description, scopes, created_at, expires_at, revoked_at"
)
BY_LOOKUP = f"SELECT {_COLUMNS} FROM api_keys WHERE lookup = $1"
BY_DESCRIPTION = (
    f"SELECT {_COLUMNS} FROM api_keys WHERE app_id = $1 AND description = $2"
    " AND revoked_at IS NULL ORDER BY created_at LIMIT 1"
)
BY_APP = f"SELECT {_COLUMNS} FROM api_keys WHERE app_id = $1 ORDER BY created_at, id"
REVOKE = """
UPDATE api_keys SET revoked_at = now()
WHERE app_id = $1 AND id = $2 AND revoked_at IS NULL
RETURNING id
"""


def _row_to_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=row["id"],
        app_id=row["app_id"],
        lookup=row["lookup"],
        secret_hash=bytes(row["secret_hash"]),
        description=row["description"],
        scopes=tuple(row["scopes"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
    )


class PgApiKeyRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert(self, key: ApiKey) -> None:
        async with self._db.connection() as conn:
            await conn.execute(
                INSERT,
                key.id,
                key.app_id,
                key.lookup,
                key.secret_hash,
                key.description,
                list(key.scopes),
                key.expires_at,
            )

    async def find_by_lookup(self, lookup: str) -> list[ApiKey]:
        async with self._db.connection() as conn:
            return [_row_to_key(r) for r in await conn.fetch(BY_LOOKUP, lookup)]

    async def find_by_description(self, app_id: str, description: str) -> ApiKey | None:
        async with self._db.connection() as conn:
            row = await conn.fetchrow(BY_DESCRIPTION, app_id, description)
        return None if row is None else _row_to_key(row)

    async def list_for_app(self, app_id: str) -> list[ApiKey]:
        async with self._db.connection() as conn:
            return [_row_to_key(r) for r in await conn.fetch(BY_APP, app_id)]

    async def revoke(self, app_id: str, key_id: str) -> bool:
        """Revokes an active key; False when the app has no such active key."""
        async with self._db.connection() as conn:
            return await conn.fetchval(REVOKE, app_id, key_id) is not None
