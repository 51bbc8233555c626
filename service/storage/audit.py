"""PostgreSQL repository of the audit log, and the pending-audit hook: the audit event of
a mutation is written in the call's first committed transaction, so that the change and
its record commit together.

This module imports nothing of db.py at run time: db.py calls `write_pending` from
`Database.transaction()`."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from service.domain.models import AuditEvent
from service.domain.ports import AuditQuery

if TYPE_CHECKING:
    from service.storage.db import Connection, Database

# What an event keeps of the other ids a request names.
MAX_RESOURCE_IDS = 100

_COLUMNS = "id, at, app_id, user_id, key_id, rpc, dataset_ids, resource_ids, request_id, outcome"
# `at` given only by tests (old events); otherwise the time of the write.
INSERT = """
INSERT INTO audit_events (
    at, app_id, user_id, key_id, rpc, dataset_ids, resource_ids, request_id, outcome
)
VALUES (coalesce($1, clock_timestamp()), $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING id
"""
# The expression of the index audit_events_method (0013_access.sql), spelled the same.
METHOD_NAME = "regexp_replace(rpc, '^.*/', '')"
SET_OUTCOME = "UPDATE audit_events SET outcome = $2 WHERE id = $1"
# Oldest first through audit_events_at; a batch per statement keeps each delete short.
PURGE_BATCH = """
DELETE FROM audit_events WHERE id IN (
    SELECT id FROM audit_events WHERE at < $1 ORDER BY at LIMIT $2
)
"""


@dataclass
class PendingAudit:
    """The audit event of the mutation a call is making."""

    event: AuditEvent  # outcome "OK"
    event_id: int | None = None  # set once written
    # Set by the call when it ends; later transactions write nothing.
    closed: bool = False


PENDING_AUDIT: contextvars.ContextVar[PendingAudit | None] = contextvars.ContextVar(
    "datasetd_pending_audit", default=None
)


def _values(event: AuditEvent) -> tuple[Any, ...]:
    return (
        event.at,
        event.app_id,
        event.user_id,
        event.key_id,
        event.rpc,
        list(event.dataset_ids),
        list(event.resource_ids[:MAX_RESOURCE_IDS]),
        event.request_id,
        event.outcome,
    )


async def write_pending(conn: Connection) -> PendingAudit | None:
    """Writes the call's pending event on `conn` (the outermost transaction's, just
    before COMMIT) unless it is written already or the call has ended; the pending
    record written, for `Database.transaction()` to forget its id if COMMIT fails."""
    pending = PENDING_AUDIT.get()
    if pending is None or pending.closed or pending.event_id is not None:
        return None
    pending.event_id = int(await conn.fetchval(INSERT, *_values(pending.event)))
    return pending


def _row_to_event(row: asyncpg.Record) -> AuditEvent:
    return AuditEvent(
        id=row["id"],
        at=row["at"],
        app_id=row["app_id"],
        user_id=row["user_id"],
        key_id=row["key_id"],
        rpc=row["rpc"],
        dataset_ids=tuple(row["dataset_ids"]),
        resource_ids=tuple(row["resource_ids"]),
        request_id=row["request_id"],
        outcome=row["outcome"],
    )


def list_page_statement(query: AuditQuery) -> tuple[str, list[Any]]:
    """The SELECT of one page of events, newest first, and its arguments. Every filter is
    an equality or range on an indexed column or expression (audit_events_app, _user,
    _key, _outcome, _method; the GIN index of dataset_ids for `@>`)."""
    args: list[Any] = [query.app_id]
    where = ["app_id = $1"]

    def add(condition: str, value: Any) -> None:
        args.append(value)
        where.append(condition.replace("$?", f"${len(args)}"))

    if query.dataset_id is not None:
        add("dataset_ids @> ARRAY[$?::text]", query.dataset_id)
    if query.user_id is not None:
        add("user_id = $?", query.user_id)
    if query.key_id is not None:
        add("key_id = $?", query.key_id)
    if query.rpc is not None:
        # The method's name, as audit_events_method indexes it; a full name (with or
        # without gRPC's leading slash) must match whole too.
        method = query.rpc.rsplit("/", 1)[-1]
        add(f"{METHOD_NAME} = $?", method)
        if "/" in query.rpc:
            add("rpc = $?", "/" + query.rpc.lstrip("/"))
    if query.outcome is not None:
        add("outcome = $?", query.outcome)
    if query.start is not None:
        add("at >= $?", query.start)
    if query.end is not None:
        add("at < $?", query.end)
    if query.before_id is not None:
        add("id < $?", query.before_id)
    args.append(query.limit)
    sql = (
        f"SELECT {_COLUMNS} FROM audit_events WHERE {' AND '.join(where)}"
        f" ORDER BY id DESC LIMIT ${len(args)}"
    )
    return sql, args


class PgAuditRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert(self, event: AuditEvent) -> int:
        # On the primary even in a read-only call (a refused read is recorded too).
        async with self._db.connection(primary=True) as conn:
            return int(await conn.fetchval(INSERT, *_values(event)))

    async def set_outcome(self, event_id: int, outcome: str) -> None:
        await self._db.execute(SET_OUTCOME, event_id, outcome)

    async def list_page(self, query: AuditQuery) -> list[AuditEvent]:
        sql, args = list_page_statement(query)
        return [_row_to_event(row) for row in await self._db.fetch(sql, *args)]

    async def purge_before(self, cutoff: datetime, batch: int = 10_000) -> int:
        purged = 0
        while True:
            deleted = await self._db.affected(PURGE_BATCH, cutoff, batch)
            purged += deleted
            if deleted < batch:
                return purged
