"""PostgreSQL repository of API keys (hashes only)."""

from __future__ import annotations

import asyncpg

from service.domain.models import ApiKey
from service.storage.db import Repository
from service.storage.rows import record

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
    return record(ApiKey, row, secret_hash=bytes(row["secret_hash"]), scopes=tuple(row["scopes"]))


class PgApiKeyRepository(Repository):
    async def insert(self, key: ApiKey) -> None:
        await self._db.execute(
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
        return await self._all(_row_to_key, BY_LOOKUP, lookup)

    async def find_by_description(self, app_id: str, description: str) -> ApiKey | None:
        return await self._one(_row_to_key, BY_DESCRIPTION, app_id, description)

    async def list_for_app(self, app_id: str) -> list[ApiKey]:
        return await self._all(_row_to_key, BY_APP, app_id)

    async def revoke(self, app_id: str, key_id: str) -> bool:
        """Revokes an active key; False when the app has no such active key."""
        return await self._db.fetchval(REVOKE, app_id, key_id) is not None
