"""`python -m service migrate`, run as the Kubernetes migration Job runs it: a separate process
against a real PostgreSQL, here a fresh database on the test stack's server."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from service.storage.db import _migration_files
from tests.conftest import Stack, stack_env
from tests.processes import ROOT, clean_env

MIGRATE_TIMEOUT = 120.0


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str

    def applied(self) -> list[str]:
        assert self.code == 0, f"exit {self.code}: {self.stderr}"
        names: list[str] = json.loads(self.stdout)["applied"]
        return names


async def run_migrate(env: dict[str, str], *options: str) -> Ran:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "migrate",
        *options,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), MIGRATE_TIMEOUT)
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
async def empty_dsn(stack: Stack) -> AsyncIterator[str]:
    name = "migrate_" + secrets.token_hex(4)
    admin = await asyncpg.connect(stack.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        parts = urllib.parse.urlsplit(stack.dsn)
        yield urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def every_migration() -> list[str]:
    return [f"{version:04d}_{name}" for version, name, _ in _migration_files()]


async def public_tables(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {row["tablename"] for row in rows}


async def test_migrate_applies_every_migration_once(stack: Stack, empty_dsn: str) -> None:
    env = {**stack_env(stack), "DATASETD_DATABASE_URL": empty_dsn}
    assert await public_tables(empty_dsn) == set()

    first = await run_migrate(env, "--json")
    assert first.applied() == every_migration()
    tables = await public_tables(empty_dsn)
    assert {"schema_migrations", "api_keys", "blobs", "datasets", "inputs", "jobs"} <= tables

    second = await run_migrate(env, "--json")
    assert second.applied() == []
    assert await public_tables(empty_dsn) == tables


async def test_migrate_prints_what_it_applied(stack: Stack, empty_dsn: str) -> None:
    env = {**stack_env(stack), "DATASETD_DATABASE_URL": empty_dsn}
    first = await run_migrate(env)
    assert first.code == 0, first.stderr
    assert all(name in first.stdout for name in every_migration())
    again = await run_migrate(env)
    assert again.code == 0, again.stderr
    assert "no migrations to apply" in again.stdout


async def test_replicas_migrating_together_apply_each_migration_once(
    stack: Stack, empty_dsn: str
) -> None:
    # Several pods (Job retries, or replicas) may run it at the same moment.
    env = {**stack_env(stack), "DATASETD_DATABASE_URL": empty_dsn}
    runs = await asyncio.gather(*(run_migrate(env, "--json") for _ in range(3)))
    applied = sorted(name for ran in runs for name in ran.applied())
    assert applied == every_migration()


async def test_credentials_of_a_url_without_them_come_from_pguser(
    stack: Stack, empty_dsn: str
) -> None:
    # The Kubernetes manifests give DATASETD_DATABASE_READ_URL no credentials and set PGUSER
    # and PGPASSWORD from the CloudNativePG secret instead; asyncpg must pick those up.
    parts = urllib.parse.urlsplit(empty_dsn)
    assert parts.username == "postgres"
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname or ""))
    env = {**stack_env(stack), "DATASETD_DATABASE_URL": bare, "PGUSER": "nobody_here"}
    refused = await run_migrate(env)
    assert refused.code == 1
    assert refused.stderr.startswith("error: migration failed: ")
    assert "nobody_here" in refused.stderr
    ran = await run_migrate({**env, "PGUSER": "postgres"}, "--json")
    assert ran.applied() == every_migration()


async def test_migrate_without_a_database_url_refuses(stack: Stack) -> None:
    env = clean_env(DATASETD_DATA_DIR=str(stack.data_dir / "migrate-nowhere"))
    ran = await run_migrate(env)
    assert ran.code == 2
    assert "DATASETD_DATABASE_URL" in ran.stderr
    assert not (stack.data_dir / "migrate-nowhere").exists()
