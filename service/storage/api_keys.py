"""PostgreSQL repository of API keys (hashes only)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from service.domain.models import ApiKey, KeyKind
from service.storage.db import Repository
from service.storage.rows import record

INSERT = """
INSERT INTO api_keys (
    id, app_id, lookup, secret_hash, description, scopes, expires_at,
    kind, user_id, dataset_ids, created_by
)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
"""
_COLUMNS = (
    "id, app_id, lookup, secret_hash, description, scopes, created_at, expires_at, revoked_at,"
    " kind, user_id, dataset_ids, created_by, last_used_at"
)
BY_LOOKUP = f"SELECT {_COLUMNS} FROM api_keys WHERE lookup = $1"
BY_DESCRIPTION = (
    f"SELECT {_COLUMNS} FROM api_keys WHERE app_id = $1 AND description = $2"
    " AND revoked_at IS NULL ORDER BY created_at LIMIT 1"
)
BY_APP = f"SELECT {_COLUMNS} FROM api_keys WHERE app_id = $1 ORDER BY created_at, id"
BY_ID = f"SELECT {_COLUMNS} FROM api_keys WHERE app_id = $1 AND id = $2"
REVOKE = """
UPDATE api_keys SET revoked_at = now()
WHERE app_id = $1 AND id = $2 AND revoked_at IS NULL
RETURNING id
"""
# Revoking twice keeps the first time: revocation is idempotent.
REVOKE_KEY = f"""
UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
WHERE app_id = $1 AND id = $2
RETURNING {_COLUMNS}
"""
REVOKE_FOR_USER = """
UPDATE api_keys SET revoked_at = now()
WHERE app_id = $1 AND revoked_at IS NULL AND (user_id = $2 OR created_by = $2)
"""
# Never moves last_used_at backwards (touches of concurrent calls may arrive out of order).
TOUCH = """
UPDATE api_keys SET last_used_at = $2
WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $2)
"""


def _row_to_key(row: asyncpg.Record) -> ApiKey:
    return record(
        ApiKey,
        row,
        secret_hash=bytes(row["secret_hash"]),
        scopes=tuple(row["scopes"]),
        kind=KeyKind(row["kind"]),
        dataset_ids=tuple(row["dataset_ids"]),
    )


def list_page_statement(
    app_id: str,
    *,
    dataset_id: str | None,
    owned_by: str | None,
    include_revoked: bool,
    after: tuple[datetime, str] | None,
    limit: int,
) -> tuple[str, list[Any]]:
    """The SELECT of one page of keys, newest first (index api_keys_newest), and its
    arguments."""
    args: list[Any] = [app_id]
    where = ["app_id = $1"]
    if dataset_id is not None:
        args.append(dataset_id)
        where.append(f"dataset_ids @> ARRAY[${len(args)}::text]")
    if owned_by is not None:
        args.append(owned_by)
        where.append(f"(user_id = ${len(args)} OR created_by = ${len(args)})")
    if not include_revoked:
        where.append("revoked_at IS NULL")
    if after is not None:
        args.extend(after)
        where.append(f"(created_at, id) < (${len(args) - 1}, ${len(args)})")
    args.append(limit)
    sql = (
        f"SELECT {_COLUMNS} FROM api_keys WHERE {' AND '.join(where)}"
        f" ORDER BY created_at DESC, id DESC LIMIT ${len(args)}"
    )
    return sql, args


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
            key.kind.value,
            key.user_id,
            list(key.dataset_ids),
            key.created_by,
        )

    async def find_by_lookup(self, lookup: str) -> list[ApiKey]:
        return await self._all(_row_to_key, BY_LOOKUP, lookup)

    async def find_by_description(self, app_id: str, description: str) -> ApiKey | None:
        return await self._one(_row_to_key, BY_DESCRIPTION, app_id, description)

    async def get(self, app_id: str, key_id: str) -> ApiKey | None:
        return await self._one(_row_to_key, BY_ID, app_id, key_id)

    async def list_page(
        self,
        app_id: str,
        *,
        dataset_id: str | None,
        owned_by: str | None,
        include_revoked: bool,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[ApiKey]:
        sql, args = list_page_statement(
            app_id,
            dataset_id=dataset_id,
            owned_by=owned_by,
            include_revoked=include_revoked,
            after=after,
            limit=limit,
        )
        return await self._all(_row_to_key, sql, *args)

    async def list_for_app(self, app_id: str) -> list[ApiKey]:
        return await self._all(_row_to_key, BY_APP, app_id)

    async def revoke(self, app_id: str, key_id: str) -> bool:
        """Revokes an active key; False when the app has no such active key."""
        return await self._db.fetchval(REVOKE, app_id, key_id) is not None

    async def revoke_key(self, app_id: str, key_id: str) -> ApiKey | None:
        return await self._one(_row_to_key, REVOKE_KEY, app_id, key_id)

    async def revoke_for_user(self, app_id: str, user_id: str) -> int:
        return await self._db.affected(REVOKE_FOR_USER, app_id, user_id)

    async def touch(self, key_id: str, at: datetime) -> None:
        await self._db.execute(TOUCH, key_id, at)
