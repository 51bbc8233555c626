"""Retry safety for mutations: the same request id and body return the first response."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.domain.errors import InvalidArgument
from service.domain.ports import IdempotencyRepository, TransactionManager


@dataclass(frozen=True)
class IdempotencyKey:
    app_id: str
    method: str
    request_id: str
    # Hash of the request without its request id.
    fingerprint: bytes


@dataclass(frozen=True)
class Idempotency:
    tx: TransactionManager
    records: IdempotencyRepository

    async def run(
        self, key: IdempotencyKey | None, operation: Callable[[], Awaitable[bytes]]
    ) -> bytes:
        """Runs `operation` once per key. The claim, the operation's writes and the
        stored response commit in one transaction, so a crash leaves either all of
        them or none; a concurrent retry waits on the claim and then replays."""
        if key is None:
            return await operation()
        async with self.tx.transaction():
            earlier = await self.records.claim(
                key.app_id, key.method, key.request_id, key.fingerprint
            )
            if earlier is not None:
                if earlier.fingerprint != key.fingerprint or earlier.response is None:
                    raise InvalidArgument.field(
                        "request_id",
                        f"was already used for a different {key.method} request; "
                        "use a new request id for a new request",
                        reason="REQUEST_ID_REUSED",
                    )
                return earlier.response
            response = await operation()
            await self.records.complete(key.app_id, key.method, key.request_id, response)
            return response
