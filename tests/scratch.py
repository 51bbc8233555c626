"""Databases of a test's own on the session's PostgreSQL server: the session server's job
runner and maintenance never see their rows."""

from __future__ import annotations

import contextlib
import secrets
import urllib.parse
from collections.abc import AsyncIterator

import asyncpg

from service.storage.db import Database, _migration_files, migrate


@contextlib.asynccontextmanager
async def scratch_database(dsn: str, prefix: str) -> AsyncIterator[str]:
    """A new database on the server of `dsn` (its DSN), dropped at the end."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urllib.parse.urlunsplit(urllib.parse.urlsplit(dsn)._replace(path=f"/{name}"))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def migrate_before(conn: asyncpg.Connection[asyncpg.Record], version: int) -> None:
    """Applies the migrations before `version` (and records them), as a database that a
    release before it left: a test of `version` then migrates the rest."""
    await conn.execute(
        "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
        " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for number, name, sql in _migration_files():
        if number < version:
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", number, name
            )


@contextlib.asynccontextmanager
async def migrated_database(dsn: str, prefix: str) -> AsyncIterator[Database]:
    """A scratch database with every migration applied, as a pool. Migrated before the
    pool opens: its connections register pgvector's codec once the type exists."""
    async with scratch_database(dsn, prefix) as scratch:
        conn = await asyncpg.connect(scratch)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        database = await Database.connect(scratch)
        try:
            yield database
        finally:
            await database.close()
