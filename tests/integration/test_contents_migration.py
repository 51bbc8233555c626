"""Migration 0014 (snapshots by reference) over a database that a release building versions
in the background left behind: the content READY versions captured moves to
input_contents, stored once, and reads back byte for byte through exports and diffs;
versions still building are FAILED with the reason; content moved from versions built
before migration 0012 gets its search columns from the backfill."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import pytest
from datasetd.v1 import data_pb2, input_pb2

from service.domain.diffs import VersionPair
from service.domain.models import VersionStatus
from service.domain.versions import RETIRED_BUILD
from service.storage.contents import PgContentRepository
from service.storage.db import Database, _migration_files, migrate
from service.storage.diffs import PgVersionPairs
from service.storage.exports import PgExportRepository
from service.storage.versions import PgVersionRepository
from tests.conftest import Stack, object_store
from tests.scratch import migrate_before, scratch_database
from tests.snapshots import content_keeper, create_ready

CONTENTS_MIGRATION = 14
APP = "main"
CREATED = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)


def snapshot(input_id: str, text: str, *, concept: str = "", color: str = "") -> bytes:
    """A member's content as a build stored it: the serialized Input."""
    message = input_pb2.Input(id=input_id, data=data_pb2.Data(text=data_pb2.Text(raw=text)))
    message.created_at.FromDatetime(CREATED)
    if concept:
        message.data.concepts.add(id=concept, value=1.0)
    if color:
        message.data.metadata.update({"color": color})
    return message.SerializeToString()


# Content per (version, input): "a" is the same in v0 and v1 (stored once afterwards),
# "b" changed between them; v1's "b" was built before migration 0012 (no search columns).
A = snapshot("a", "alpha", concept="cat", color="red")
B0 = snapshot("b", "beta")
B1 = snapshot("b", "beta, edited", concept="dog", color="blue")
C = snapshot("c", "gamma")


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class Member:
    input_id: str
    data: bytes | None
    # Search columns as migration 0012's build filled them; None: built before it.
    captured: bool = True


OLD_MEMBER = """
INSERT INTO version_inputs (app_id, dataset_id, version_id, position, input_id, data,
                            content_hash, input_seq, media_type, metadata, concepts, annotated,
                            created_at)
SELECT $1, 'ds', $2, $3, $4, $5, $6, CASE WHEN $7::text IS NULL THEN NULL ELSE i.seq END,
       $7, $8, $9, $10, $11
FROM inputs i WHERE i.app_id = $1 AND i.id = $4
"""


async def old_version(
    conn: asyncpg.Connection, version_id: str, status: str, members: list[Member]
) -> None:
    """A version as migration 0013's schema holds it."""
    built = [m for m in members if m.data is not None]
    await conn.execute(
        "INSERT INTO dataset_versions (app_id, dataset_id, id, status, percent, input_count,"
        " metrics) VALUES ($1, 'ds', $2, $3, $4, $5, $6)",
        APP,
        version_id,
        status,
        100 if status == "ready" else 100 * len(built) // len(members),
        len(members),
        json.dumps({"/": {"inputs_count": len(members)}}) if status == "ready" else "{}",
    )
    for position, m in enumerate(members):
        parsed = input_pb2.Input.FromString(m.data) if m.data is not None else None
        filled = parsed is not None and m.captured
        await conn.execute(
            OLD_MEMBER,
            APP,
            version_id,
            position,
            m.input_id,
            m.data,
            None if m.data is None else digest(m.data),
            "text" if filled else None,
            json.dumps({"color": parsed.data.metadata["color"]})
            if filled and parsed and "color" in parsed.data.metadata.fields
            else ("{}" if filled else None),
            [c.id for c in parsed.data.concepts] if filled and parsed else None,
            bool(parsed.data.concepts) if filled and parsed else None,
            CREATED if filled else None,
        )


@pytest.fixture
async def migrated(stack: Stack) -> AsyncIterator[Database]:
    """A database at migration 0013 with versions of every status, then migrated."""
    async with scratch_database(stack.dsn, "contents") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate_before(conn, CONTENTS_MIGRATION)
            await conn.execute("INSERT INTO datasets (app_id, id) VALUES ($1, 'ds')", APP)
            for input_id, text in (("a", "alpha"), ("b", "beta, edited"), ("c", "gamma")):
                await conn.execute(
                    "INSERT INTO inputs (app_id, id, media_type, text_raw) VALUES ($1, $2,"
                    " 'text', $3)",
                    APP,
                    input_id,
                    text,
                )
                await conn.execute(
                    "INSERT INTO dataset_inputs (app_id, dataset_id, input_id) VALUES"
                    " ($1, 'ds', $2)",
                    APP,
                    input_id,
                )
            await old_version(conn, "v0", "ready", [Member("a", A), Member("b", B0)])
            await old_version(
                conn, "v1", "ready", [Member("a", A), Member("b", B1, captured=False)]
            )
            # Members fixed, nothing built yet; and a build halfway through.
            await old_version(conn, "pending", "pending", [Member("a", None), Member("c", None)])
            await old_version(conn, "halfway", "in_progress", [Member("a", A), Member("c", None)])
            assert await migrate(conn) == [
                v for v, _, _ in _migration_files() if v >= CONTENTS_MIGRATION
            ]
        finally:
            await conn.close()
        database = await Database.connect(dsn)
        try:
            yield database
        finally:
            await database.close()


async def member_bytes(db: Database, version_id: str) -> dict[str, bytes]:
    members = await PgExportRepository(db).members(APP, "ds", version_id, None, 100)
    return {m.input_id: m.data for m in members}


async def test_ready_versions_keep_their_content_and_building_ones_fail(
    migrated: Database,
) -> None:
    db = migrated
    # Stored once per distinct content; the halfway build's page moved too (it is A).
    stored = {r["hash"]: r["data"] for r in await db.fetch("SELECT hash, data FROM input_contents")}
    assert stored == {digest(data): data for data in (A, B0, B1)}
    columns = {
        r["column_name"]
        for r in await db.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $1",
            "version_inputs",
        )
    }
    assert "data" not in columns and "content_hash" in columns

    versions = PgVersionRepository(db)
    for version_id in ("v0", "v1"):
        version = await versions.get(APP, "ds", version_id)
        assert version is not None
        assert (version.status, version.percent, version.input_count) == (
            VersionStatus.READY,
            100,
            2,
        )
    # Exports read the same bytes the build stored.
    assert await member_bytes(db, "v0") == {"a": A, "b": B0}
    assert await member_bytes(db, "v1") == {"a": A, "b": B1}
    # A diff compares by hash and reads the same bytes.
    pairs = await PgVersionPairs(db).page(VersionPair(APP, "ds", "v0", "v1"), None, 10)
    assert [(p.input_id, p.in_from, p.in_to, p.same) for p in pairs] == [
        ("a", True, True, True),
        ("b", True, True, False),
    ]
    assert (pairs[0].from_data, pairs[0].to_data) == (None, A)
    assert (pairs[1].from_data, pairs[1].to_data) == (B0, B1)

    for version_id in ("pending", "halfway"):
        failed = await versions.get(APP, "ds", version_id)
        assert failed is not None
        assert (failed.status, failed.details) == (VersionStatus.FAILED, RETIRED_BUILD)
    # Nothing of a failed version is exported: it is not READY (ExportService refuses it),
    # and its unbuilt members have no content to read.
    assert await member_bytes(db, "pending") == {}
    # The live inputs have no content yet: stale until refreshed.
    assert (
        await db.fetchval(
            "SELECT count(*) FROM inputs WHERE app_id = $1 AND content_hash IS NULL", APP
        )
        == 3
    )


async def test_the_backfill_fills_the_search_columns_of_content_moved_without_them(
    migrated: Database,
) -> None:
    db = migrated
    query = (
        "SELECT media_type, metadata, concepts, annotated, created_at FROM input_contents"
        " WHERE hash = $1"
    )
    before = await db.fetchrow(query, digest(B1))
    assert before is not None and before["media_type"] is None
    assert (
        await db.fetchval(
            "SELECT input_seq FROM version_inputs WHERE version_id = 'v1' AND input_id = 'b'"
        )
        is None
    )
    kept = dict(await db.fetchrow(query, digest(A)) or {})

    repo = PgVersionRepository(db)
    assert await repo.backfill_capture(100) == 1
    assert await repo.backfill_capture(100) == 0
    after = await db.fetchrow(query, digest(B1))
    assert after is not None
    assert dict(after) == {
        "media_type": "text",
        "metadata": {"color": "blue"},
        "concepts": ["dog"],
        "annotated": True,
        "created_at": CREATED,
    }
    # The members referring to it get their input's creation order, as 0012's build gave.
    assert (
        await db.fetchval(
            "SELECT count(*) FROM version_inputs v JOIN inputs i ON i.app_id = v.app_id"
            " AND i.id = v.input_id WHERE v.input_seq IS DISTINCT FROM i.seq"
            " AND v.content_hash IS NOT NULL"
        )
        == 0
    )
    # Content that had its columns keeps them.
    assert dict(await db.fetchrow(query, digest(A)) or {}) == kept
    assert kept["media_type"] == "text" and kept["concepts"] == ["cat"]
    # Filled from the bytes, which stay as they were.
    assert await member_bytes(db, "v1") == {"a": A, "b": B1}


async def test_after_the_migration_versions_refer_to_fresh_content_and_old_is_collected(
    migrated: Database, stack: Stack
) -> None:
    db = migrated
    objects = object_store(stack)
    try:
        # The maintenance loop's refresh gives the migrated inputs their content.
        assert await content_keeper(db, objects).refresh_any() == 3
        new = await create_ready(db, objects, APP, "ds", "v2")
    finally:
        objects.close()
    assert new.input_count == 3
    fresh = await member_bytes(db, "v2")
    assert sorted(fresh) == ["a", "b", "c"]
    assert {i: input_pb2.Input.FromString(d).data.text.raw for i, d in fresh.items()} == {
        "a": "alpha",
        "b": "beta, edited",
        "c": "gamma",
    }

    # Content moved from the old versions lives as long as a version refers to it.
    contents = PgContentRepository(db)
    await db.execute("DELETE FROM dataset_versions WHERE app_id = $1 AND id = 'v0'", APP)
    await contents.collect(100)
    remaining = {r["hash"] for r in await db.fetch("SELECT hash FROM input_contents")}
    assert digest(B0) not in remaining and {digest(A), digest(B1)} <= remaining
    await db.execute(
        "DELETE FROM dataset_versions WHERE app_id = $1 AND id IN ('v1', 'halfway')", APP
    )
    await contents.collect(100)
    remaining = {r["hash"] for r in await db.fetch("SELECT hash FROM input_contents")}
    assert not remaining & {digest(A), digest(B0), digest(B1)}
    # v2's content stays, and reads as before.
    assert await member_bytes(db, "v2") == fresh
