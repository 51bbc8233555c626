"""PostgreSQL store of request ids and the responses they produced."""

from __future__ import annotations

from datetime import timedelta

from service.domain.models import IdempotencyRecord
from service.storage.db import Repository

# The insert blocks while another transaction holds an uncommitted claim on the
# same key, so a concurrent retry waits for the first call and then replays it.
CLAIM = """
INSERT INTO idempotency (app_id, method, request_id, fingerprint) VALUES ($1, $2, $3, $4)
ON CONFLICT (app_id, method, request_id) DO NOTHING
RETURNING 1
"""
EARLIER = """
SELECT fingerprint, response FROM idempotency WHERE app_id = $1 AND method = $2 AND request_id = $3
"""
COMPLETE = """
UPDATE idempotency SET response = $4 WHERE app_id = $1 AND method = $2 AND request_id = $3
"""
EXPIRE = "DELETE FROM idempotency WHERE created_at < now() - $1::interval"


class PgIdempotencyRepository(Repository):
    async def claim(
        self, app_id: str, method: str, request_id: str, fingerprint: bytes
    ) -> IdempotencyRecord | None:
        async with self._db.connection() as conn:
            # Two rounds: an earlier record can expire between the two statements.
            for _ in range(2):
                if await conn.fetchval(CLAIM, app_id, method, request_id, fingerprint):
                    return None
                row = await conn.fetchrow(EARLIER, app_id, method, request_id)
                if row is not None:
                    response = row["response"]
                    return IdempotencyRecord(
                        bytes(row["fingerprint"]), None if response is None else bytes(response)
                    )
        raise RuntimeError(f"could not claim request id {request_id!r}")

    async def complete(self, app_id: str, method: str, request_id: str, response: bytes) -> None:
        await self._db.execute(COMPLETE, app_id, method, request_id, response)

    async def expire(self, older_than: timedelta) -> int:
        return await self._db.affected(EXPIRE, older_than)
