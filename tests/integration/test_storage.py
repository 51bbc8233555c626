"""Repositories, migrations and the object store against the real servers."""

from __future__ import annotations

import asyncio
import secrets
import urllib.parse
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import pytest

from service.domain.auth import new_key
from service.domain.clock import SystemClock
from service.domain.datasets import DatasetService, DatasetSettings
from service.domain.maintenance import Maintenance
from service.domain.models import CoverImage, Dataset
from service.media.probe import MediaProbes
from service.storage.api_keys import PgApiKeyRepository
from service.storage.blobs import (
    HOSTED_PREFIX,
    HOSTED_SIZE,
    ContentAddressedBlobStore,
    content_key,
)
from service.storage.datasets import PgDatasetRepository
from service.storage.db import Database, _migration_files, migrate
from service.storage.idempotency import PgIdempotencyRepository
from service.storage.objectstore import ObjectStore
from tests.conftest import Stack, object_store


def dsn_for(dsn: str, database: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture
async def fresh_dsn(stack: Stack) -> AsyncIterator[str]:
    name = "mig_" + secrets.token_hex(4)
    admin = await asyncpg.connect(stack.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield dsn_for(stack.dsn, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
def objects(stack: Stack) -> ObjectStore:
    return object_store(stack)


async def test_migrations_apply_once_even_when_servers_race(fresh_dsn: str) -> None:
    connections = [await asyncpg.connect(fresh_dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(conn) for conn in connections))
        applied = sorted(v for result in results for v in result)
        assert applied == [version for version, _, _ in _migration_files()]
        assert await migrate(connections[0]) == []
        rows = await connections[0].fetch("SELECT version FROM schema_migrations")
        assert len(rows) == len(applied)
        tables = {
            r["tablename"]
            for r in await connections[0].fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        }
        assert {"datasets", "api_keys", "blobs", "idempotency", "server_secrets"} <= tables
    finally:
        for conn in connections:
            await conn.close()


async def test_replicas_starting_together_make_the_bucket_once(stack: Stack) -> None:
    # Each replica checks, then creates: the losers of that race must not fail to start.
    bucket = "race-" + secrets.token_hex(4)
    stores = [
        ObjectStore(stack.s3.endpoint, stack.s3.access_key, stack.s3.secret_key, bucket)
        for _ in range(8)
    ]
    try:
        for _ in range(3):
            await asyncio.gather(*(store.ensure_bucket() for store in stores))
        await stores[0].ping()
    finally:
        for store in stores:
            store.close()


async def test_object_store_round_trip(objects: ObjectStore) -> None:
    key = f"test/{secrets.token_hex(4)}"
    await objects.put(key, b"hello", "text/plain")
    assert await objects.exists(key)
    assert await objects.get(key) == b"hello"
    url = await objects.presign_get(key, timedelta(minutes=5))
    assert "X-Amz-Signature" in url
    await objects.delete(key)
    assert not await objects.exists(key)


async def test_signed_urls_are_reused_for_a_quarter_of_their_validity(
    objects: ObjectStore,
) -> None:
    keys = [f"test/{secrets.token_hex(4)}" for _ in range(2)]
    for index, key in enumerate(keys):
        await objects.put(key, f"body {index}".encode(), "text/plain")
    ttl = timedelta(seconds=8)
    first = await objects.presign_many([keys[0], keys[1], keys[0]], ttl)
    assert first[0] == first[2] and first[0] != first[1]
    assert await objects.presign_many(keys, ttl) == first[:2]
    # Another validity is signed on its own.
    assert await objects.presign_many(keys[:1], timedelta(minutes=5)) != first[:1]
    await asyncio.sleep(8 * 0.25 + 1.1)  # past the reuse window; a new X-Amz-Date
    again = await objects.presign_many(keys, ttl)
    assert again[0] != first[0] and again[1] != first[1]
    async with aiohttp.ClientSession() as session:
        for url, index in ((first[1], 1), (again[0], 0)):
            async with session.get(url) as response:
                assert response.status == 200 and await response.read() == f"body {index}".encode()
    for key in keys:
        await objects.delete(key)


async def test_wrong_credentials_are_refused(stack: Stack) -> None:
    bad = ObjectStore(stack.s3.endpoint, stack.s3.access_key, "wrong-secret", stack.s3.bucket)
    with pytest.raises(Exception, match=r"(?i)signature|access|denied"):
        await bad.ping()
    bad.close()


async def test_content_addressed_put_is_idempotent(db: Database, objects: ObjectStore) -> None:
    blobs = ContentAddressedBlobStore(db, objects)
    data = secrets.token_bytes(1000)
    first = await blobs.put(data, "application/octet-stream")
    second = await blobs.put(data, "application/octet-stream")
    assert first == second
    assert first.key == content_key(first.sha256)
    assert await blobs.read(first) == data
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM blobs WHERE key = $1", first.key) == 1


async def _age_blob(db: Database, key: str, age: timedelta) -> None:
    async with db.connection() as conn:
        await conn.execute(
            "UPDATE blobs SET last_seen = now() - $2::interval WHERE key = $1", key, age
        )


async def test_orphans_are_collected_and_referenced_blobs_kept(
    db: Database, objects: ObjectStore
) -> None:
    blobs = ContentAddressedBlobStore(db, objects)
    repo = PgDatasetRepository(db)
    app = "gc-" + secrets.token_hex(4)
    orphan = await blobs.put(secrets.token_bytes(64), "image/png")
    recent = await blobs.put(secrets.token_bytes(64), "image/png")
    cover = await blobs.put(secrets.token_bytes(64), "image/png")
    await repo.insert(Dataset(app_id=app, id="covered", cover=CoverImage(blob=cover)))
    for blob in (orphan, cover):
        await _age_blob(db, blob.key, timedelta(hours=2))
    await blobs.collect_orphans(timedelta(hours=1), limit=10_000)
    assert not await objects.exists(orphan.key)
    assert await objects.exists(recent.key)
    assert await objects.exists(cover.key)
    # Once the dataset is purged its cover is an orphan too.
    await repo.purge(app, "covered")
    await blobs.collect_orphans(timedelta(hours=1), limit=10_000)
    assert not await objects.exists(cover.key)
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM blobs WHERE key = $1", cover.key) == 0


async def test_upload_during_collection_keeps_the_blob(db: Database, objects: ObjectStore) -> None:
    """Re-uploading bytes whose row is old and unreferenced refreshes it, so the
    collector skips it and the object stays for the row about to reference it."""
    blobs = ContentAddressedBlobStore(db, objects)
    data = secrets.token_bytes(64)
    blob = await blobs.put(data, "image/png")
    await _age_blob(db, blob.key, timedelta(hours=2))
    await blobs.put(data, "image/png")
    await blobs.collect_orphans(timedelta(hours=1), limit=10_000)
    assert await objects.exists(blob.key)


async def test_expired_deletions_are_purged(db: Database) -> None:
    repo = PgDatasetRepository(db)
    app = "purge-" + secrets.token_hex(4)
    now = datetime.now(UTC)
    for name, purge_after in [
        ("old", now - timedelta(seconds=1)),
        ("young", now + timedelta(days=1)),
    ]:
        created = await repo.insert(Dataset(app_id=app, id=name))
        await repo.update(
            Dataset(
                app_id=app,
                id=name,
                deleted_at=now,
                purge_after=purge_after,
                revision=created.revision,
            )
        )
    assert await repo.purge_expired(now, limit=100_000) >= 1
    assert await repo.get(app, "old", include_deleted=True) is None
    assert await repo.get(app, "young", include_deleted=True) is not None


async def test_idempotency_records_expire(db: Database) -> None:
    records = PgIdempotencyRepository(db)
    app = "idem-" + secrets.token_hex(4)
    async with db.transaction():
        assert await records.claim(app, "M", "r1", b"f") is None
        await records.complete(app, "M", "r1", b"response")
    earlier = await records.claim(app, "M", "r1", b"f")
    assert earlier is not None and earlier.response == b"response"
    async with db.connection() as conn:
        await conn.execute(
            "UPDATE idempotency SET created_at = now() - interval '2 days' WHERE app_id = $1", app
        )
    assert await records.expire(timedelta(days=1)) >= 1
    async with db.transaction():
        assert await records.claim(app, "M", "r1", b"g") is None


async def test_api_keys_store_only_hashes(db: Database) -> None:
    keys = PgApiKeyRepository(db)
    secret, key = new_key("hash-app", "t")
    await keys.insert(key)
    async with db.connection() as conn:
        row = await conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", key.id)
    assert row is not None
    assert secret.encode() not in b"".join(
        str(v).encode() if not isinstance(v, bytes) else v for v in row.values()
    )
    assert [k.id for k in await keys.find_by_lookup(key.lookup)] == [key.id]


async def test_maintenance_purges_expired_datasets_then_their_orphaned_covers(
    db: Database, objects: ObjectStore
) -> None:
    blobs = ContentAddressedBlobStore(db, objects)
    repo = PgDatasetRepository(db)
    datasets = DatasetService(repo, blobs, db, SystemClock(), DatasetSettings(), MediaProbes())
    maintenance = Maintenance(
        datasets,
        blobs,
        PgIdempotencyRepository(db),
        orphan_grace=timedelta(hours=1),
        request_id_ttl=timedelta(days=1),
    )
    app = "maint-" + secrets.token_hex(4)
    cover = await blobs.put(secrets.token_bytes(80), "image/png")
    created = await repo.insert(Dataset(app_id=app, id="old", cover=CoverImage(blob=cover)))
    past = datetime.now(UTC) - timedelta(days=8)
    await repo.update(
        Dataset(
            app_id=app,
            id="old",
            cover=created.cover,
            deleted_at=past,
            purge_after=past + timedelta(days=7),
        )
    )
    await _age_blob(db, cover.key, timedelta(hours=2))
    report = await maintenance.run_once()
    assert report.datasets_purged >= 1
    assert report.blobs_collected >= 1
    assert await repo.get(app, "old", include_deleted=True) is None
    assert not await objects.exists(cover.key)


async def test_list_keys_pages_in_key_order(objects: ObjectStore) -> None:
    prefix = f"list-{secrets.token_hex(4)}/"
    names = [f"{prefix}{n:02d}" for n in range(7)]
    for name in reversed(names):
        await objects.put(name, b"x", "application/octet-stream")
    assert await objects.list_keys(prefix) == names
    assert await objects.list_keys(prefix, limit=3) == names[:3]
    assert await objects.list_keys(prefix, start_after=names[2], limit=3) == names[3:6]
    assert await objects.list_keys(prefix, start_after=names[5]) == names[6:]


async def test_unregistered_objects_are_found_by_bounded_passes(
    db: Database, objects: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Objects whose row was rolled back are collected; each pass lists a bounded window of
    the bucket and the passes go round it, so every object is looked at in turn."""
    blobs = ContentAddressedBlobStore(db, objects)
    kept = await blobs.put(secrets.token_bytes(64), "image/png")
    window = 5
    # Registered objects (recent, so not collected): more than two windows of them.
    for _ in range(2 * window + 1):
        await blobs.put(secrets.token_bytes(64), "image/png")
    # Last in key order: only passes that go on where the previous stopped reach them.
    strays = [content_key("ff" + secrets.token_hex(31)) for _ in range(4)]
    for key in strays:
        await objects.put(key, b"no row", "image/png")
    monkeypatch.setattr("service.storage.blobs.UNREGISTERED_SCAN", window)
    listed: list[int] = []
    list_keys = objects.list_keys

    async def counting(prefix: str, start_after: str = "", limit: int | None = None) -> list[str]:
        keys = await list_keys(prefix, start_after, limit)
        listed.append(len(keys))
        return keys

    monkeypatch.setattr(objects, "list_keys", counting)
    total = len(await list_keys(f"{HOSTED_PREFIX}/{HOSTED_SIZE}/"))
    passes = 0
    while any([await objects.exists(key) for key in strays]):
        passes += 1
        assert passes <= total // window + 2, "the passes did not go round the bucket"
        listed.clear()
        await blobs.collect_orphans(timedelta(hours=1), limit=10_000)
        assert sum(listed) <= window, listed
    assert await objects.exists(kept.key)
