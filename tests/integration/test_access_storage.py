"""Storage of access control (issue 12) against the real PostgreSQL: users, collaborators,
the new API key columns and queries, the audit log with its pending-audit hook and
purge, and migration 0013 over an installation that already has keys."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from service.config import Config, ConfigError
from service.domain.auth import new_key
from service.domain.clock import SystemClock
from service.domain.datasets import DatasetService, DatasetSettings
from service.domain.errors import AlreadyExists, NotFound
from service.domain.maintenance import Maintenance
from service.domain.models import (
    ApiKey,
    AppRole,
    AuditEvent,
    Collaborator,
    Dataset,
    DatasetRole,
    KeyKind,
    User,
)
from service.domain.ports import AuditQuery
from service.media.probe import MediaProbes
from service.storage.access import PgCollaboratorRepository, PgUserRepository
from service.storage.api_keys import PgApiKeyRepository
from service.storage.audit import PENDING_AUDIT, PendingAudit, PgAuditRepository
from service.storage.blobs import ContentAddressedBlobStore
from service.storage.datasets import PgDatasetRepository
from service.storage.db import Database, migrate
from service.storage.idempotency import PgIdempotencyRepository
from tests.conftest import Stack, object_store
from tests.scratch import migrate_before, migrated_database, scratch_database

ACCESS_MIGRATION = 13


@pytest.fixture(scope="module")
async def db(stack: Stack) -> AsyncIterator[Database]:
    async with migrated_database(stack.dsn, "access") as database:
        yield database


@pytest.fixture
def app() -> str:
    return "app-" + secrets.token_hex(5)


@dataclasses.dataclass(frozen=True)
class Repos:
    users: PgUserRepository
    collaborators: PgCollaboratorRepository
    keys: PgApiKeyRepository
    audit: PgAuditRepository
    datasets: PgDatasetRepository


@pytest.fixture
def repos(db: Database) -> Repos:
    return Repos(
        PgUserRepository(db),
        PgCollaboratorRepository(db),
        PgApiKeyRepository(db),
        PgAuditRepository(db),
        PgDatasetRepository(db),
    )


# --- users -------------------------------------------------------------------------------


async def test_users_insert_get_list_update_delete(db: Database, repos: Repos, app: str) -> None:
    users = repos.users
    assert not await users.exists_any(app)
    created = await users.insert(User(app, "bob@example.com", "Bob", AppRole.MEMBER))
    assert (created.app_id, created.id, created.display_name, created.role) == (
        app,
        "bob@example.com",
        "Bob",
        AppRole.MEMBER,
    )
    assert created.created_at is not None and created.modified_at is not None
    assert await users.exists_any(app)
    assert not await users.exists_any(app + "-other")

    with pytest.raises(AlreadyExists) as taken:
        await users.insert(User(app, "bob@example.com", "Another Bob"))
    assert taken.value.reason == "USER_EXISTS"
    assert [v.field for v in taken.value.violations] == ["user.id"]
    # The refused insert changed nothing.
    assert await users.get(app, "bob@example.com") == created
    # The same id in another app is another user.
    await users.insert(User(app + "-other", "bob@example.com"))

    for user_id, role in [
        ("carol", AppRole.OWNER),
        ("alice", AppRole.ADMIN),
        ("dan", AppRole.OWNER),
    ]:
        await users.insert(User(app, user_id, role=role))
    assert await users.get(app, "nobody") is None
    async with db.transaction():
        locked = await users.get(app, "alice", for_update=True)
        assert locked is not None and locked.role is AppRole.ADMIN

    everyone = await users.list_page(app, None, 10)
    assert [u.id for u in everyone] == ["alice", "bob@example.com", "carol", "dan"]
    assert [u.id for u in await users.list_page(app, None, 2)] == ["alice", "bob@example.com"]
    assert [u.id for u in await users.list_page(app, "bob@example.com", 2)] == ["carol", "dan"]
    assert await users.list_page(app, "dan", 2) == []

    assert await users.owner_ids(app) == ["carol", "dan"]
    async with db.transaction():
        assert await users.owner_ids(app, for_update=True) == ["carol", "dan"]
    assert await users.owner_ids(app + "-other") == []

    updated = await users.update(
        dataclasses.replace(created, display_name="Robert", role=AppRole.OWNER)
    )
    assert (updated.display_name, updated.role) == ("Robert", AppRole.OWNER)
    assert updated.created_at == created.created_at
    assert updated.modified_at is not None and updated.modified_at >= created.modified_at
    assert await users.get(app, "bob@example.com") == updated
    assert await users.owner_ids(app) == ["bob@example.com", "carol", "dan"]
    with pytest.raises(NotFound) as missing:
        await users.update(User(app, "nobody", "x"))
    assert missing.value.reason == "USER_NOT_FOUND"

    assert await users.delete(app, "dan")
    assert not await users.delete(app, "dan")
    assert await users.get(app, "dan") is None
    assert await users.owner_ids(app) == ["bob@example.com", "carol"]


# --- collaborators -----------------------------------------------------------------------


async def _team(repos: Repos, app: str) -> Collaborator:
    """Users ann, ben, cid; datasets cats (ann viewer, cid admin, ben viewer), dogs (ann
    admin), owls (ann viewer). Ann's collaboration on cats, as inserted."""
    for name in ("ann", "ben", "cid"):
        await repos.users.insert(User(app, name))
    for dataset_id in ("cats", "dogs", "owls"):
        await repos.datasets.insert(Dataset(app_id=app, id=dataset_id))
    team = repos.collaborators
    added = await team.insert(Collaborator(app, "cats", "ann", added_by="cid"))
    await team.insert(Collaborator(app, "cats", "cid", DatasetRole.ADMIN))
    await team.insert(Collaborator(app, "cats", "ben"))
    await team.insert(Collaborator(app, "dogs", "ann", DatasetRole.ADMIN))
    await team.insert(Collaborator(app, "owls", "ann"))
    return added


async def test_collaborators_insert_get_list_set_role(db: Database, repos: Repos, app: str) -> None:
    team = repos.collaborators
    added = await _team(repos, app)
    assert (added.role, added.added_by) == (DatasetRole.VIEWER, "cid")
    assert added.created_at is not None

    with pytest.raises(AlreadyExists) as again:
        await team.insert(Collaborator(app, "cats", "ann", DatasetRole.ADMIN))
    assert again.value.reason == "COLLABORATOR_EXISTS"
    assert [v.field for v in again.value.violations] == ["collaborator.user_id"]
    stored = await team.get(app, "cats", "ann")
    assert stored == added
    with pytest.raises(NotFound) as no_user:
        await team.insert(Collaborator(app, "cats", "nobody"))
    assert no_user.value.reason == "USER_NOT_FOUND"
    with pytest.raises(NotFound) as no_dataset:
        await team.insert(Collaborator(app, "nothing", "ben"))
    assert no_dataset.value.reason == "DATASET_NOT_FOUND"

    assert await team.get(app, "dogs", "ben") is None
    async with db.transaction():
        locked = await team.get(app, "dogs", "ann", for_update=True)
        assert locked is not None and locked.role is DatasetRole.ADMIN

    assert [c.user_id for c in await team.list_page(app, "cats", None, 10)] == ["ann", "ben", "cid"]
    assert [c.user_id for c in await team.list_page(app, "cats", None, 2)] == ["ann", "ben"]
    assert [c.user_id for c in await team.list_page(app, "cats", "ben", 2)] == ["cid"]
    assert [c.user_id for c in await team.list_page(app, "dogs", None, 10)] == ["ann"]

    promoted = await team.set_role(dataclasses.replace(added, role=DatasetRole.ADMIN))
    assert promoted.role is DatasetRole.ADMIN and promoted.added_by == "cid"
    assert (await team.get(app, "cats", "ann")) == promoted
    with pytest.raises(NotFound) as not_one:
        await team.set_role(Collaborator(app, "dogs", "ben", DatasetRole.ADMIN))
    assert not_one.value.reason == "COLLABORATOR_NOT_FOUND"


async def test_roles_of_counts_live_datasets_and_deletions_cascade(repos: Repos, app: str) -> None:
    people, team = repos.users, repos.collaborators
    await _team(repos, app)
    await team.set_role(Collaborator(app, "cats", "ann", DatasetRole.ADMIN))
    assert await team.roles_of(app, "ann") == {
        "cats": DatasetRole.ADMIN,
        "dogs": DatasetRole.ADMIN,
        "owls": DatasetRole.VIEWER,
    }
    assert await team.roles_of(app, "ben") == {"cats": DatasetRole.VIEWER}
    assert await team.roles_of(app + "-other", "ann") == {}

    # A soft-deleted dataset grants nothing but keeps its collaborators for an undelete.
    dogs = await repos.datasets.get(app, "dogs")
    assert dogs is not None
    now = datetime.now(UTC)
    deleted = await repos.datasets.update(
        dataclasses.replace(dogs, deleted_at=now, purge_after=now + timedelta(days=7))
    )
    assert "dogs" not in await team.roles_of(app, "ann")
    assert await team.get(app, "dogs", "ann") is not None
    await repos.datasets.update(dataclasses.replace(deleted, deleted_at=None, purge_after=None))
    assert (await team.roles_of(app, "ann"))["dogs"] is DatasetRole.ADMIN

    # A purged dataset and a deleted user take their collaborations with them.
    await repos.datasets.purge(app, "owls")
    assert await team.get(app, "owls", "ann") is None
    assert await people.delete(app, "ben")
    assert [c.user_id for c in await team.list_page(app, "cats", None, 10)] == ["ann", "cid"]

    assert await team.delete(app, "cats", "cid")
    assert not await team.delete(app, "cats", "cid")
    assert await team.roles_of(app, "cid") == {}


# --- API keys ----------------------------------------------------------------------------


def _key(app: str, **fields: object) -> ApiKey:
    _, key = new_key(app, str(fields.pop("description", "k")))
    return dataclasses.replace(key, **fields)  # type: ignore[arg-type]


async def _keys(repos: Repos, app: str) -> list[ApiKey]:
    """Keys of several kinds, bindings and creators, as inserted."""
    await repos.users.insert(User(app, "uma"))
    later = datetime.now(UTC) + timedelta(days=3)
    made = [
        _key(app, description="personal", kind=KeyKind.PERSONAL, user_id="uma", created_by="uma"),
        _key(
            app, description="cats-read", scopes=("read",), dataset_ids=("cats",), created_by="uma"
        ),
        _key(app, description="cats-dogs", dataset_ids=("cats", "dogs"), created_by="vic"),
        _key(app, description="app-wide", expires_at=later),
        _key(app, description="vic's", kind=KeyKind.PERSONAL, user_id="vic", created_by="vic"),
    ]
    for key in made:
        await repos.keys.insert(key)
    return made


async def test_api_keys_store_and_map_the_new_columns(repos: Repos, app: str) -> None:
    keys = repos.keys
    made = await _keys(repos, app)
    other_app = _key(app + "-other", dataset_ids=("cats",))
    await keys.insert(other_app)

    stored = await keys.get(app, made[1].id)
    assert stored is not None
    assert stored == dataclasses.replace(made[1], created_at=stored.created_at)
    assert stored.kind is KeyKind.SCOPED and stored.dataset_ids == ("cats",)
    assert stored.scopes == ("read",) and stored.created_by == "uma"
    assert stored.last_used_at is None and stored.revoked_at is None
    personal = await keys.get(app, made[0].id)
    assert personal is not None and (personal.kind, personal.user_id) == (KeyKind.PERSONAL, "uma")
    assert await keys.get(app, other_app.id) is None
    assert await keys.get(app + "-other", other_app.id) is not None
    # The existing methods map the new columns too.
    assert {k.id for k in await keys.find_by_lookup(made[2].lookup)} >= {made[2].id}
    by_description = await keys.find_by_description(app, "cats-dogs")
    assert by_description is not None and by_description.dataset_ids == ("cats", "dogs")
    assert {k.id for k in await keys.list_for_app(app)} == {k.id for k in made}

    # A personal key without its user breaks the table's rule.
    with pytest.raises(asyncpg.CheckViolationError):
        await keys.insert(_key(app, kind=KeyKind.PERSONAL))

    used = datetime.now(UTC).replace(microsecond=0)
    await keys.touch(made[1].id, used)
    await keys.touch(made[1].id, used - timedelta(minutes=5))  # a late, older touch
    touched = await keys.get(app, made[1].id)
    assert touched is not None and touched.last_used_at == used
    await keys.touch(made[1].id, used + timedelta(minutes=1))
    touched = await keys.get(app, made[1].id)
    assert touched is not None and touched.last_used_at == used + timedelta(minutes=1)


async def test_api_keys_revocation_and_pages(repos: Repos, app: str) -> None:
    keys = repos.keys
    made = await _keys(repos, app)
    other_app = _key(app + "-other")
    await keys.insert(other_app)
    assert await keys.revoke_for_user(app, "vic") == 2
    assert await keys.revoke_for_user(app, "vic") == 0
    first = await keys.revoke_key(app, made[3].id)
    assert first is not None and first.revoked_at is not None
    again = await keys.revoke_key(app, made[3].id)
    assert again is not None and again.revoked_at == first.revoked_at
    assert await keys.revoke_key(app, "0123456789abcdef") is None
    assert await keys.revoke_key(app, other_app.id) is None

    every = await keys.list_for_app(app)
    newest_first = sorted(every, key=lambda k: (k.created_at, k.id), reverse=True)
    cases: list[tuple[str | None, str | None, bool, Callable[[ApiKey], bool]]] = [
        (None, None, True, lambda k: True),
        (None, None, False, lambda k: k.revoked_at is None),
        ("cats", None, True, lambda k: "cats" in k.dataset_ids),
        ("dogs", None, True, lambda k: "dogs" in k.dataset_ids),
        # Its only key was created by vic, whose keys are revoked.
        ("dogs", None, False, lambda k: False),
        (None, "uma", True, lambda k: "uma" in (k.user_id, k.created_by)),
        (None, "vic", False, lambda k: False),
        ("cats", "vic", True, lambda k: k.id == made[2].id),
    ]
    for dataset_id, owned_by, include_revoked, wanted in cases:
        expected = [k.id for k in newest_first if wanted(k)]
        pages: list[str] = []
        after: tuple[datetime, str] | None = None
        while True:
            page = await keys.list_page(
                app,
                dataset_id=dataset_id,
                owned_by=owned_by,
                include_revoked=include_revoked,
                after=after,
                limit=2,
            )
            pages.extend(k.id for k in page)
            if len(page) < 2:
                break
            assert page[-1].created_at is not None
            after = (page[-1].created_at, page[-1].id)
        assert pages == expected, (dataset_id, owned_by, include_revoked)
        assert bool(expected) == (include_revoked or (dataset_id, owned_by) == (None, None))

    # The CLI's revoke still answers whether it revoked an active key.
    assert await keys.revoke(app, made[1].id)
    assert not await keys.revoke(app, made[1].id)


# --- audit log ---------------------------------------------------------------------------

RPCS = [
    "/datasetd.v1.DatasetService/DeleteDataset",
    "/datasetd.v1.DatasetService/CreateDataset",
    "/datasetd.v1.AccessService/CreateApiKey",
    "/clarifai.api.V2/DeleteDatasets",
]


async def test_audit_insert_filters_and_pages(repos: Repos, app: str) -> None:
    audit = repos.audit
    base = datetime.now(UTC) - timedelta(hours=1)
    events: list[AuditEvent] = []
    ids: list[int] = []
    for n in range(24):
        event = AuditEvent(
            app_id=app,
            rpc=RPCS[n % len(RPCS)],
            outcome=["OK", "PERMISSION_DENIED", "NOT_FOUND"][n % 3],
            user_id=["u1", "u2", ""][n % 3 if n % 5 else 2],
            key_id=f"k{n % 4}",
            dataset_ids=(("d1",) if n % 2 else ()) + (("d2",) if n % 3 == 0 else ()),
            resource_ids=(f"r{n}",),
            request_id=f"req-{n}",
            at=base + timedelta(minutes=n),
        )
        event_id = await audit.insert(event)
        events.append(dataclasses.replace(event, id=event_id))
        ids.append(event_id)
    await audit.insert(AuditEvent(app_id=app + "-other", rpc=RPCS[0], outcome="OK"))
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    stored = await audit.list_page(AuditQuery(app, limit=100))
    assert stored == list(reversed(events))

    middle = base + timedelta(minutes=7)
    end = base + timedelta(minutes=19)
    cases: list[tuple[AuditQuery, Callable[[AuditEvent], bool]]] = [
        (AuditQuery(app, dataset_id="d1"), lambda e: "d1" in e.dataset_ids),
        (AuditQuery(app, dataset_id="d2"), lambda e: "d2" in e.dataset_ids),
        (AuditQuery(app, dataset_id="d3"), lambda e: False),
        (AuditQuery(app, user_id="u1"), lambda e: e.user_id == "u1"),
        (AuditQuery(app, user_id=""), lambda e: e.user_id == ""),
        (AuditQuery(app, key_id="k2"), lambda e: e.key_id == "k2"),
        (AuditQuery(app, rpc=RPCS[0]), lambda e: e.rpc == RPCS[0]),
        (AuditQuery(app, rpc=RPCS[0].lstrip("/")), lambda e: e.rpc == RPCS[0]),
        # A bare method name: every service's method of that name.
        (AuditQuery(app, rpc="DeleteDataset"), lambda e: e.rpc == RPCS[0]),
        (AuditQuery(app, rpc="DeleteDatasets"), lambda e: e.rpc == RPCS[3]),
        # Only the part after the last '/': a shorter suffix is no match.
        (AuditQuery(app, rpc="Dataset"), lambda e: False),
        (AuditQuery(app, rpc="DatasetService/DeleteDataset"), lambda e: False),
        (AuditQuery(app, outcome="PERMISSION_DENIED"), lambda e: e.outcome == "PERMISSION_DENIED"),
        (AuditQuery(app, start=middle), lambda e: e.at is not None and e.at >= middle),
        (AuditQuery(app, end=end), lambda e: e.at is not None and e.at < end),
        (
            AuditQuery(app, dataset_id="d1", outcome="OK", start=middle, end=end),
            lambda e: (
                "d1" in e.dataset_ids
                and e.outcome == "OK"
                and e.at is not None
                and middle <= e.at < end
            ),
        ),
    ]
    for query, wanted in cases:
        expected = [e.id for e in reversed(events) if wanted(e)]
        got: list[int | None] = []
        before: int | None = None
        while True:
            page = await audit.list_page(dataclasses.replace(query, before_id=before, limit=3))
            got.extend(e.id for e in page)
            if len(page) < 3:
                break
            before = page[-1].id
        assert got == expected, query

    await audit.set_outcome(ids[5], "ABORTED")
    changed = await audit.list_page(AuditQuery(app, before_id=(ids[5]) + 1, limit=1))
    assert [(e.id, e.outcome) for e in changed] == [(ids[5], "ABORTED")]

    many = AuditEvent(
        app_id=app, rpc=RPCS[0], outcome="OK", resource_ids=tuple(map(str, range(150)))
    )
    many_id = await audit.insert(many)
    kept = await audit.list_page(AuditQuery(app, before_id=many_id + 1, limit=1))
    assert kept[0].resource_ids == tuple(map(str, range(100)))
    assert kept[0].at is not None and abs(kept[0].at - datetime.now(UTC)) < timedelta(minutes=1)


async def test_audit_purge_in_batches_and_by_maintenance(
    db: Database, repos: Repos, stack: Stack, app: str
) -> None:
    audit = repos.audit
    now = datetime.now(UTC)
    old = [now - timedelta(days=100, minutes=n) for n in range(7)]
    recent = [now - timedelta(days=80), now - timedelta(minutes=1)]
    for at in old + recent:
        await audit.insert(AuditEvent(app_id=app, rpc=RPCS[1], outcome="OK", at=at))
    assert await audit.purge_before(now - timedelta(days=90), batch=3) == len(old)
    left = await audit.list_page(AuditQuery(app, limit=100))
    assert sorted(e.at for e in left if e.at is not None) == sorted(recent)
    assert await audit.purge_before(now - timedelta(days=90), batch=3) == 0

    # The maintenance round purges past DATASETD_AUDIT_RETENTION and reports it.
    blobs = ContentAddressedBlobStore(db, object_store(stack))
    maintenance = Maintenance(
        DatasetService(repos.datasets, blobs, db, SystemClock(), DatasetSettings(), MediaProbes()),
        blobs,
        PgIdempotencyRepository(db),
        orphan_grace=timedelta(hours=1),
        request_id_ttl=timedelta(days=1),
        audit=audit,
        audit_retention=timedelta(days=30),
    )
    report = await maintenance.run_once()
    assert report.audit_purged == 1
    left = await audit.list_page(AuditQuery(app, limit=100))
    assert [e.at for e in left] == [recent[1]]


def test_audit_retention_setting() -> None:
    assert Config.from_env({}).audit_retention == timedelta(days=90)
    assert Config.from_env({"DATASETD_AUDIT_RETENTION": "30d"}).audit_retention == timedelta(
        days=30
    )
    for value in ("0s", "forever"):
        with pytest.raises(ConfigError, match="DATASETD_AUDIT_RETENTION"):
            Config.from_env({"DATASETD_AUDIT_RETENTION": value})


# --- the pending-audit hook --------------------------------------------------------------


async def _events_of(db: Database, request_id: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT id, outcome, rpc, key_id FROM audit_events WHERE request_id = $1", request_id
    )


def _pending(app: str) -> PendingAudit:
    return PendingAudit(
        AuditEvent(
            app_id=app,
            rpc="/datasetd.v1.AccessService/CreateUser",
            outcome="OK",
            user_id="admin",
            key_id="k1",
            request_id="req-" + secrets.token_hex(6),
        )
    )


async def test_pending_audit_commits_with_the_outermost_transaction_once(
    db: Database, repos: Repos, app: str
) -> None:
    pending = _pending(app)
    token = PENDING_AUDIT.set(pending)
    try:
        async with db.transaction():
            await repos.users.insert(User(app, "first"))
            async with db.transaction():
                await repos.users.insert(User(app, "second"))
            async with db.transaction():
                pass
            # Not before COMMIT: a savepoint released is no commit.
            assert pending.event_id is None
            assert await _events_of(db, pending.event.request_id) == []
        assert pending.event_id is not None
        # A later transaction of the same call writes nothing more.
        async with db.transaction():
            await repos.users.insert(User(app, "third"))
    finally:
        PENDING_AUDIT.reset(token)
    rows = await _events_of(db, pending.event.request_id)
    assert [(r["id"], r["outcome"], r["rpc"], r["key_id"]) for r in rows] == [
        (pending.event_id, "OK", pending.event.rpc, "k1")
    ]


async def test_pending_audit_rollback_writes_nothing_until_a_commit(
    db: Database, repos: Repos, app: str
) -> None:
    pending = _pending(app)
    token = PENDING_AUDIT.set(pending)
    try:
        with pytest.raises(AlreadyExists):
            async with db.transaction():
                await repos.users.insert(User(app, "gone"))
                await repos.users.insert(User(app, "gone"))
        assert pending.event_id is None
        assert await _events_of(db, pending.event.request_id) == []
        assert await repos.users.get(app, "gone") is None
        # The call's first transaction that commits carries the event.
        async with db.transaction():
            await repos.users.insert(User(app, "kept"))
    finally:
        PENDING_AUDIT.reset(token)
    assert [r["id"] for r in await _events_of(db, pending.event.request_id)] == [pending.event_id]
    assert pending.event_id is not None


async def test_pending_audit_forgets_its_id_when_commit_fails(db: Database, app: str) -> None:
    # A deferred constraint fails at COMMIT, after the event was inserted.
    suffix = secrets.token_hex(4)
    await db.execute(
        f"CREATE TABLE parent_{suffix} (id int PRIMARY KEY);"
        f" CREATE TABLE child_{suffix} (id int REFERENCES parent_{suffix}"
        " DEFERRABLE INITIALLY DEFERRED)"
    )
    pending = _pending(app)
    token = PENDING_AUDIT.set(pending)
    try:
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            async with db.transaction():
                await db.execute(f"INSERT INTO child_{suffix} VALUES (1)")
        assert pending.event_id is None
        assert await _events_of(db, pending.event.request_id) == []
        async with db.transaction():
            await db.execute(f"INSERT INTO parent_{suffix} VALUES (1)")
    finally:
        PENDING_AUDIT.reset(token)
    assert [r["id"] for r in await _events_of(db, pending.event.request_id)] == [pending.event_id]


async def test_pending_audit_closed_or_absent_writes_nothing(
    db: Database, repos: Repos, app: str
) -> None:
    pending = _pending(app)
    pending.closed = True
    token = PENDING_AUDIT.set(pending)
    try:
        async with db.transaction():
            await repos.users.insert(User(app, "late"))
    finally:
        PENDING_AUDIT.reset(token)
    assert pending.event_id is None
    assert await _events_of(db, pending.event.request_id) == []
    before = await db.fetchval("SELECT count(*) FROM audit_events WHERE app_id = $1", app)
    async with db.transaction():
        await repos.users.insert(User(app, "plain"))
    assert await db.fetchval("SELECT count(*) FROM audit_events WHERE app_id = $1", app) == before
    assert await repos.users.get(app, "plain") is not None


# --- migration 0013 over existing keys ---------------------------------------------------

_OLD_INSERT = """
INSERT INTO api_keys (id, app_id, lookup, secret_hash, description, scopes, revoked_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""


async def test_migration_makes_each_bootstrap_key_the_owners_personal_key(stack: Stack) -> None:
    async with scratch_database(stack.dsn, "access_migration") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate_before(conn, ACCESS_MIGRATION)
            old: dict[str, ApiKey] = {}
            rows = [
                ("main", "bootstrap", ["read", "write"], None),
                ("main", "ci", ["read"], None),
                ("team", "bootstrap", ["read", "write"], datetime.now(UTC)),
                ("team", "bootstrap", ["read", "write"], None),
                ("lonely", "scripts", ["read", "write"], None),
            ]
            for n, (app_id, description, scopes, revoked) in enumerate(rows):
                _, key = new_key(app_id, description)
                old[f"{app_id}/{n}"] = key
                await conn.execute(
                    _OLD_INSERT,
                    key.id,
                    app_id,
                    key.lookup,
                    key.secret_hash,
                    description,
                    scopes,
                    revoked,
                )
            applied = await migrate(conn)
            assert applied[0] == ACCESS_MIGRATION
        finally:
            await conn.close()

        database = await Database.connect(dsn)
        try:
            users, keys = PgUserRepository(database), PgApiKeyRepository(database)
            for app_id in ("main", "team"):
                assert await users.list_page(app_id, None, 10) == [
                    User(
                        app_id,
                        "owner",
                        "App owner",
                        AppRole.OWNER,
                        *_times(await users.get(app_id, "owner")),
                    )
                ]
            assert not await users.exists_any("lonely")

            for name, key in old.items():
                found = await keys.get(key.app_id, key.id)
                assert found is not None, name
                if key.description == "bootstrap":
                    assert (found.kind, found.user_id) == (KeyKind.PERSONAL, "owner"), name
                    assert found.scopes == ("read", "write")
                else:
                    assert (found.kind, found.user_id) == (KeyKind.SCOPED, None), name
                    assert found.scopes == tuple(rows[int(name.split("/")[1])][2])
                assert found.dataset_ids == () and found.created_by == ""
                assert found.secret_hash == key.secret_hash
            # The owner of a migrated installation has personal keys to act with.
            assert await keys.revoke_for_user("team", "owner") == 1
        finally:
            await database.close()


def _times(user: User | None) -> tuple[datetime | None, datetime | None]:
    assert user is not None
    return user.created_at, user.modified_at
