"""AccessAdmin (users, collaborators, keys, audit) and the access parts of DatasetService,
over in-memory fakes of the ports."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import pytest

from service.domain.access_admin import MAX_KEY_DATASETS, AccessAdmin, KeyRequest, UserChange
from service.domain.auth import Authenticator
from service.domain.datasets import DatasetFields, DatasetService, DatasetSettings
from service.domain.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from service.domain.models import (
    ApiKey,
    AppRole,
    AuditEvent,
    Collaborator,
    Dataset,
    DatasetListQuery,
    DatasetRole,
    KeyKind,
    Principal,
    SortField,
    User,
)
from service.domain.ports import AuditQuery
from service.media.probe import MediaProbes
from tests.unit.test_dataset_service import FakeBlobs, FakeRepo

APP = "app"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


class FixedClock:
    def __init__(self) -> None:
        self.current = NOW

    def now(self) -> datetime:
        return self.current


class FakeTx:
    """Hooks run when the outermost transaction ends without an error, as in storage."""

    def __init__(self) -> None:
        self.depth = 0
        self.hooks: list[Callable[[], None]] = []

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self.depth += 1
        try:
            yield
        except BaseException:
            if self.depth == 1:
                self.hooks.clear()
            raise
        finally:
            self.depth -= 1
        if self.depth == 0:
            hooks, self.hooks = self.hooks, []
            for hook in hooks:
                hook()

    @asynccontextmanager
    async def read_transaction(self) -> AsyncIterator[None]:
        yield

    def after_commit(self, hook: Callable[[], None]) -> None:
        if self.depth:
            self.hooks.append(hook)
        else:
            hook()


class FakeCollaborators:
    def __init__(self, datasets: FakeRepo) -> None:
        self.rows: dict[tuple[str, str, str], Collaborator] = {}
        self.datasets = datasets

    async def insert(self, collaborator: Collaborator) -> Collaborator:
        key = (collaborator.app_id, collaborator.dataset_id, collaborator.user_id)
        if key in self.rows:
            raise AlreadyExists("already a collaborator", reason="COLLABORATOR_EXISTS")
        self.rows[key] = dataclasses.replace(collaborator, created_at=NOW, modified_at=NOW)
        return self.rows[key]

    async def get(
        self, app_id: str, dataset_id: str, user_id: str, *, for_update: bool = False
    ) -> Collaborator | None:
        return self.rows.get((app_id, dataset_id, user_id))

    async def list_page(
        self, app_id: str, dataset_id: str, after: str | None, limit: int
    ) -> list[Collaborator]:
        rows = sorted(
            (c for (a, d, _), c in self.rows.items() if (a, d) == (app_id, dataset_id)),
            key=lambda c: c.user_id,
        )
        return [c for c in rows if after is None or c.user_id > after][:limit]

    async def set_role(self, collaborator: Collaborator) -> Collaborator:
        key = (collaborator.app_id, collaborator.dataset_id, collaborator.user_id)
        self.rows[key] = collaborator
        return collaborator

    async def delete(self, app_id: str, dataset_id: str, user_id: str) -> bool:
        return self.rows.pop((app_id, dataset_id, user_id), None) is not None

    async def roles_of(self, app_id: str, user_id: str) -> dict[str, DatasetRole]:
        return {
            d: c.role
            for (a, d, u), c in self.rows.items()
            if (a, u) == (app_id, user_id) and await self.datasets.get(a, d) is not None
        }


class FakeUsers:
    def __init__(self, collaborators: FakeCollaborators) -> None:
        self.rows: dict[tuple[str, str], User] = {}
        self.collaborators = collaborators
        self.owner_locks = 0

    async def insert(self, user: User) -> User:
        if (user.app_id, user.id) in self.rows:
            raise AlreadyExists(f"user {user.id!r} exists", reason="USER_EXISTS")
        self.rows[(user.app_id, user.id)] = dataclasses.replace(
            user, created_at=NOW, modified_at=NOW
        )
        return self.rows[(user.app_id, user.id)]

    async def get(self, app_id: str, user_id: str, *, for_update: bool = False) -> User | None:
        return self.rows.get((app_id, user_id))

    async def list_page(self, app_id: str, after: str | None, limit: int) -> list[User]:
        rows = sorted((u for (a, _), u in self.rows.items() if a == app_id), key=lambda u: u.id)
        return [u for u in rows if after is None or u.id > after][:limit]

    async def update(self, user: User) -> User:
        self.rows[(user.app_id, user.id)] = user
        return user

    async def delete(self, app_id: str, user_id: str) -> bool:
        for key in [k for k in self.collaborators.rows if (k[0], k[2]) == (app_id, user_id)]:
            del self.collaborators.rows[key]
        return self.rows.pop((app_id, user_id), None) is not None

    async def owner_ids(self, app_id: str, *, for_update: bool = False) -> list[str]:
        self.owner_locks += for_update
        return sorted(
            u.id for (a, _), u in self.rows.items() if a == app_id and u.role is AppRole.OWNER
        )

    async def exists_any(self, app_id: str) -> bool:
        return any(a == app_id for a, _ in self.rows)


class FakeKeys:
    def __init__(self) -> None:
        self.keys: list[ApiKey] = []
        self.touches: list[tuple[str, datetime]] = []
        self.revocations = 0

    async def insert(self, key: ApiKey) -> None:
        self.keys.append(dataclasses.replace(key, created_at=key.created_at or NOW))

    async def find_by_lookup(self, lookup: str) -> list[ApiKey]:
        return [k for k in self.keys if k.lookup == lookup]

    async def find_by_description(self, app_id: str, description: str) -> ApiKey | None:
        return next(
            (k for k in self.keys if k.app_id == app_id and k.description == description), None
        )

    async def get(self, app_id: str, key_id: str) -> ApiKey | None:
        return next((k for k in self.keys if (k.app_id, k.id) == (app_id, key_id)), None)

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
        rows = [
            k
            for k in self.keys
            if k.app_id == app_id
            and (dataset_id is None or dataset_id in k.dataset_ids)
            and (owned_by is None or owned_by in (k.user_id, k.created_by))
            and (include_revoked or k.revoked_at is None)
        ]
        return rows[::-1][:limit]

    async def revoke_key(self, app_id: str, key_id: str) -> ApiKey | None:
        for index, key in enumerate(self.keys):
            if (key.app_id, key.id) == (app_id, key_id):
                self.revocations += 1
                self.keys[index] = dataclasses.replace(key, revoked_at=key.revoked_at or NOW)
                return self.keys[index]
        return None

    async def revoke_for_user(self, app_id: str, user_id: str) -> int:
        count = 0
        for index, key in enumerate(self.keys):
            mine = user_id in (key.user_id, key.created_by)
            if key.app_id == app_id and mine and key.revoked_at is None:
                self.keys[index] = dataclasses.replace(key, revoked_at=NOW)
                count += 1
        return count

    async def touch(self, key_id: str, at: datetime) -> None:
        self.touches.append((key_id, at))


class FakeAudit:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.queries: list[AuditQuery] = []

    async def insert(self, event: AuditEvent) -> int:
        self.events.append(dataclasses.replace(event, id=len(self.events) + 1))
        return len(self.events)

    async def set_outcome(self, event_id: int, outcome: str) -> None:
        raise NotImplementedError

    async def list_page(self, query: AuditQuery) -> list[AuditEvent]:
        self.queries.append(query)
        return [
            e
            for e in reversed(self.events)
            if e.app_id == query.app_id
            and (query.dataset_id is None or query.dataset_id in e.dataset_ids)
        ][: query.limit]

    async def purge_before(self, cutoff: datetime, batch: int = 10_000) -> int:
        raise NotImplementedError


class World:
    """An app with an owner, an admin, members with roles on datasets d1 and d2 (d3 is
    deleted), and the same kinds of things in app "other"."""

    def __init__(self) -> None:
        self.clock = FixedClock()
        self.tx = FakeTx()
        self.datasets = FakeRepo()
        self.collaborators = FakeCollaborators(self.datasets)
        self.users = FakeUsers(self.collaborators)
        self.keys = FakeKeys()
        self.audit = FakeAudit()
        self.changes = 0
        self.admin = AccessAdmin(
            self.tx,
            self.users,
            self.collaborators,
            self.keys,
            self.audit,
            self.datasets,
            self.clock,
            changed=self._changed,
        )

    def _changed(self) -> None:
        self.changes += 1

    async def seed(self) -> World:
        for app in (APP, "other"):
            for dataset_id in ("d1", "d2", "d3"):
                await self.datasets.insert(Dataset(app, dataset_id))
        self.datasets.rows[(APP, "d3")] = Dataset(APP, "d3", deleted_at=NOW)
        for user_id, role in [
            ("owner", AppRole.OWNER),
            ("boss", AppRole.ADMIN),
            ("ann", AppRole.MEMBER),
            ("vic", AppRole.MEMBER),
            ("nobody", AppRole.MEMBER),
        ]:
            await self.users.insert(User(APP, user_id, role=role))
        await self.users.insert(User("other", "owner", role=AppRole.OWNER))
        await self.collaborators.insert(Collaborator(APP, "d1", "ann", DatasetRole.ADMIN))
        await self.collaborators.insert(Collaborator(APP, "d1", "vic", DatasetRole.VIEWER))
        await self.collaborators.insert(Collaborator(APP, "d2", "vic", DatasetRole.ADMIN))
        return self

    async def who(self, user_id: str, app_id: str = APP) -> Principal:
        user = await self.users.get(app_id, user_id)
        assert user is not None
        return Principal(
            f"key-{user_id}",
            app_id,
            frozenset({"read", "write"}),
            user_id=user_id,
            kind=KeyKind.PERSONAL,
            app_role=user.role,
            dataset_roles=await self.collaborators.roles_of(app_id, user_id),
        )


def key_principal(*datasets: str, scopes: tuple[str, ...] = ("read", "write")) -> Principal:
    return Principal(
        "scoped",
        APP,
        frozenset(scopes),
        user_id="owner",
        kind=KeyKind.SCOPED,
        datasets=frozenset(datasets) or None,
    )


@pytest.fixture
async def world() -> World:
    return await World().seed()


def fields_of(error: DomainError) -> list[str]:
    return [v.field for v in error.violations]


# Users


async def test_users_are_managed_by_owners_and_admins(world: World) -> None:
    admin = world.admin
    created = await admin.create_user(await world.who("boss"), APP, User(APP, "new@x.io", "New"))
    assert (created.id, created.role, created.display_name) == ("new@x.io", AppRole.MEMBER, "New")
    assert world.changes == 1
    for caller in (await world.who("ann"), key_principal()):
        with pytest.raises(PermissionDenied) as raised:
            await admin.create_user(caller, APP, User(APP, "x"))
        assert raised.value.reason in ("APP_ACCESS_DENIED", "PERSONAL_KEY_REQUIRED")
    with pytest.raises(AlreadyExists):
        await admin.create_user(await world.who("owner"), APP, User(APP, "ann"))
    with pytest.raises(InvalidArgument) as bad:
        await admin.create_user(await world.who("owner"), APP, User(APP, "a b", "n" * 201))
    assert fields_of(bad.value) == ["user.id", "user.display_name"]
    with pytest.raises(PermissionDenied) as raised:
        await admin.create_user(await world.who("owner"), "other", User("other", "x"))
    assert raised.value.reason == "WRONG_APP"
    assert ("other", "x") not in world.users.rows and world.changes == 1


async def test_only_an_owner_grants_or_takes_away_owner(world: World) -> None:
    admin, boss, owner = world.admin, await world.who("boss"), await world.who("owner")
    with pytest.raises(PermissionDenied) as raised:
        await admin.create_user(boss, APP, User(APP, "o2", role=AppRole.OWNER))
    assert raised.value.reason == "OWNER_REQUIRED"
    with pytest.raises(PermissionDenied):
        await admin.update_user(boss, APP, "ann", UserChange(role=AppRole.OWNER))
    with pytest.raises(PermissionDenied):
        await admin.update_user(boss, APP, "owner", UserChange(role=AppRole.MEMBER))
    with pytest.raises(PermissionDenied):
        await admin.delete_user(boss, APP, "owner")
    # An admin manages the other roles, and an owner's display name.
    demoted = await admin.update_user(boss, APP, "boss", UserChange(role=AppRole.MEMBER))
    assert demoted.role is AppRole.MEMBER
    renamed = await admin.update_user(boss, APP, "owner", UserChange(display_name="Boss"))
    assert (renamed.display_name, renamed.role) == ("Boss", AppRole.OWNER)
    promoted = await admin.create_user(owner, APP, User(APP, "o2", role=AppRole.OWNER))
    assert promoted.role is AppRole.OWNER
    assert (await admin.update_user(owner, APP, "ann", UserChange(role=AppRole.OWNER))).role is (
        AppRole.OWNER
    )


async def test_the_last_owner_stays(world: World) -> None:
    admin, owner = world.admin, await world.who("owner")
    locks = world.users.owner_locks
    with pytest.raises(FailedPrecondition) as raised:
        await admin.update_user(owner, APP, "owner", UserChange(role=AppRole.ADMIN))
    assert raised.value.reason == "LAST_OWNER"
    assert world.users.owner_locks > locks  # checked under the owners' row locks
    with pytest.raises(FailedPrecondition) as raised:
        await admin.delete_user(owner, APP, "owner")
    assert raised.value.reason == "LAST_OWNER"
    assert world.users.rows[(APP, "owner")].role is AppRole.OWNER and world.changes == 0
    # With a second owner either may go.
    await admin.update_user(owner, APP, "boss", UserChange(role=AppRole.OWNER))
    assert await admin.delete_user(owner, APP, "owner") == 0
    with pytest.raises(FailedPrecondition):
        await admin.update_user(
            await world.who("boss"), APP, "boss", UserChange(role=AppRole.MEMBER)
        )


async def test_update_user_rules(world: World) -> None:
    admin, owner = world.admin, await world.who("owner")
    with pytest.raises(NotFound) as missing:
        await admin.update_user(owner, APP, "ghost", UserChange(display_name="x"))
    assert missing.value.metadata["field"] == "user.id"
    with pytest.raises(InvalidArgument) as bad:
        await admin.update_user(owner, APP, "ann", UserChange())
    assert fields_of(bad.value) == ["user"]
    before = world.changes
    same = await admin.update_user(owner, APP, "ann", UserChange(role=AppRole.MEMBER))
    assert same == world.users.rows[(APP, "ann")] and world.changes == before
    with pytest.raises(PermissionDenied):
        await admin.update_user(await world.who("ann"), APP, "ann", UserChange(display_name="A"))


async def test_delete_user_revokes_their_keys_and_ends_collaborations(world: World) -> None:
    admin, ann = world.admin, await world.who("ann")
    personal = await admin.create_key(ann, APP, KeyRequest(KeyKind.PERSONAL))
    made = await admin.create_key(
        ann, APP, KeyRequest(KeyKind.SCOPED, scopes=("read",), dataset_ids=("d1",))
    )
    other = await admin.create_key(await world.who("vic"), APP, KeyRequest(KeyKind.PERSONAL))
    assert await admin.delete_user(await world.who("boss"), APP, "ann") == 2
    revoked = {k.id for k in world.keys.keys if k.revoked_at is not None}
    assert revoked == {personal.key.id, made.key.id}
    assert other.key.id not in revoked
    assert (APP, "ann") not in world.users.rows
    assert (APP, "d1", "ann") not in world.collaborators.rows
    with pytest.raises(NotFound) as missing:
        await admin.delete_user(await world.who("boss"), APP, "ann")
    assert missing.value.metadata["field"] == "user_id"


async def test_list_users_for_every_user_not_for_scoped_keys(world: World) -> None:
    page = await world.admin.list_users(await world.who("nobody"), APP, None, 2)
    assert [u.id for u in page] == ["ann", "boss", "nobody"]  # limit + 1
    page = await world.admin.list_users(await world.who("nobody"), APP, "nobody", 10)
    assert [u.id for u in page] == ["owner", "vic"]
    with pytest.raises(PermissionDenied):
        await world.admin.list_users(key_principal(), APP, None, 10)


# Collaborators


async def test_collaborators_are_managed_by_dataset_admins(world: World) -> None:
    admin, ann = world.admin, await world.who("ann")
    added = await admin.add_collaborator(ann, APP, "d1", "nobody")
    assert (added.role, added.added_by) == (DatasetRole.VIEWER, "ann")
    assert world.changes == 1
    with pytest.raises(AlreadyExists):
        await admin.add_collaborator(ann, APP, "d1", "nobody", DatasetRole.ADMIN)
    # A Viewer of d1, an Admin of d2 only, a scoped key: not on d1.
    for caller in (await world.who("vic"), await world.who("nobody"), key_principal("d1")):
        with pytest.raises(PermissionDenied):
            await admin.add_collaborator(caller, APP, "d1", "boss")
    with pytest.raises(PermissionDenied) as raised:
        await admin.add_collaborator(ann, APP, "d2", "boss")
    assert raised.value.metadata["dataset_id"] == "d2"
    assert (APP, "d1", "boss") not in world.collaborators.rows
    assert (await admin.add_collaborator(await world.who("boss"), APP, "d2", "ann")).role is (
        DatasetRole.VIEWER
    )


async def test_collaborators_need_a_live_dataset_and_a_user(world: World) -> None:
    admin, boss = world.admin, await world.who("boss")
    for dataset_id in ("nope", "d3"):
        with pytest.raises(NotFound) as missing:
            await admin.add_collaborator(boss, APP, dataset_id, "ann")
        assert missing.value.metadata["field"] == "dataset_id"
    with pytest.raises(NotFound) as missing:
        await admin.add_collaborator(boss, APP, "d2", "ghost")
    assert missing.value.metadata["field"] == "collaborator.user_id"
    with pytest.raises(InvalidArgument) as bad:
        await admin.add_collaborator(boss, APP, "bad id", "bad id")
    assert fields_of(bad.value) == ["dataset_id", "collaborator.user_id"]
    assert world.changes == 0


async def test_viewer_becomes_admin_but_never_back(world: World) -> None:
    admin, ann = world.admin, await world.who("ann")
    same = await admin.update_collaborator(ann, APP, "d1", "vic", DatasetRole.VIEWER)
    assert same.role is DatasetRole.VIEWER and world.changes == 0
    promoted = await admin.update_collaborator(ann, APP, "d1", "vic", DatasetRole.ADMIN)
    assert promoted.role is DatasetRole.ADMIN and world.changes == 1
    with pytest.raises(FailedPrecondition) as raised:
        await admin.update_collaborator(ann, APP, "d1", "vic", DatasetRole.VIEWER)
    assert raised.value.reason == "ADMIN_CANNOT_BE_DEMOTED"
    assert "remove" in raised.value.message and "add them again" in raised.value.message
    assert world.collaborators.rows[(APP, "d1", "vic")].role is DatasetRole.ADMIN
    with pytest.raises(NotFound) as missing:
        await admin.update_collaborator(ann, APP, "d1", "nobody", DatasetRole.ADMIN)
    assert missing.value.metadata["field"] == "user_id"
    with pytest.raises(PermissionDenied):
        await admin.update_collaborator(
            await world.who("nobody"), APP, "d1", "vic", DatasetRole.ADMIN
        )


async def test_remove_and_list_collaborators(world: World) -> None:
    admin, ann, vic = world.admin, await world.who("ann"), await world.who("vic")
    assert [c.user_id for c in await admin.list_collaborators(vic, APP, "d1", None, 10)] == [
        "ann",
        "vic",
    ]
    assert len(await admin.list_collaborators(vic, APP, "d1", None, 0)) == 1
    with pytest.raises(PermissionDenied):
        await admin.list_collaborators(await world.who("nobody"), APP, "d1", None, 10)
    with pytest.raises(PermissionDenied):
        await admin.remove_collaborator(vic, APP, "d1", "ann")
    await admin.remove_collaborator(ann, APP, "d1", "vic")
    assert (APP, "d1", "vic") not in world.collaborators.rows and world.changes == 1
    with pytest.raises(NotFound):
        await admin.remove_collaborator(ann, APP, "d1", "vic")
    with pytest.raises(NotFound):
        await admin.list_collaborators(await world.who("owner"), APP, "d3", None, 10)


# Keys


async def test_personal_keys_act_as_their_caller(world: World) -> None:
    ann = await world.who("ann")
    made = await world.admin.create_key(ann, APP, KeyRequest(KeyKind.PERSONAL, "laptop"))
    key = made.key
    assert (key.kind, key.user_id, key.created_by, key.dataset_ids) == (
        KeyKind.PERSONAL,
        "ann",
        "ann",
        (),
    )
    assert made.secret.startswith("dsd_") and made.secret.encode() not in repr(key).encode()
    auth = authenticator(world)
    principal = await auth.authenticate(made.secret)
    assert (principal.user_id, principal.app_role, dict(principal.dataset_roles)) == (
        "ann",
        AppRole.MEMBER,
        {"d1": DatasetRole.ADMIN},
    )
    with pytest.raises(PermissionDenied) as raised:
        await world.admin.create_key(key_principal(), APP, KeyRequest(KeyKind.PERSONAL))
    assert raised.value.reason == "PERSONAL_KEY_REQUIRED"
    with pytest.raises(InvalidArgument) as bad:
        await world.admin.create_key(
            ann, APP, KeyRequest(KeyKind.PERSONAL, scopes=("read",), dataset_ids=("d1",))
        )
    assert fields_of(bad.value) == ["api_key.access", "api_key.dataset_ids"]


async def test_dataset_admins_make_keys_for_their_datasets(world: World) -> None:
    ann = await world.who("ann")
    for scopes in (("read",), ("read", "write")):
        made = await world.admin.create_key(
            ann, APP, KeyRequest(KeyKind.SCOPED, scopes=scopes, dataset_ids=("d1",))
        )
        assert (made.key.scopes, made.key.dataset_ids, made.key.created_by) == (
            scopes,
            ("d1",),
            "ann",
        )
        principal = await authenticator(world).authenticate(made.secret)
        assert (principal.kind, principal.datasets, principal.scopes) == (
            KeyKind.SCOPED,
            frozenset({"d1"}),
            frozenset(scopes),
        )
    assert world.changes == 2


async def test_a_key_never_exceeds_its_creator(world: World) -> None:
    admin, ann, vic = world.admin, await world.who("ann"), await world.who("vic")
    count = len(world.keys.keys)
    # A Viewer makes no key for the dataset, even a read one.
    with pytest.raises(PermissionDenied) as raised:
        await admin.create_key(
            vic, APP, KeyRequest(KeyKind.SCOPED, scopes=("read",), dataset_ids=("d1",))
        )
    assert raised.value.metadata["field"] == "api_key.dataset_ids[0]"
    # Admin of d1 but not of d2.
    with pytest.raises(PermissionDenied) as raised:
        await admin.create_key(
            ann, APP, KeyRequest(KeyKind.SCOPED, scopes=("read",), dataset_ids=("d1", "d2"))
        )
    assert raised.value.metadata["field"] == "api_key.dataset_ids[1]"
    # Whole-app keys: app owners and admins only.
    with pytest.raises(PermissionDenied) as raised:
        await admin.create_key(ann, APP, KeyRequest(KeyKind.SCOPED, scopes=("read",)))
    assert raised.value.metadata["field"] == "api_key.dataset_ids"
    with pytest.raises(PermissionDenied):
        await admin.create_key(key_principal(), APP, KeyRequest(KeyKind.SCOPED, scopes=("read",)))
    assert len(world.keys.keys) == count
    whole = await admin.create_key(
        await world.who("boss"), APP, KeyRequest(KeyKind.SCOPED, scopes=("read", "write"))
    )
    assert whole.key.dataset_ids == () and whole.key.created_by == "boss"


async def test_key_requests_are_checked(world: World) -> None:
    admin, boss = world.admin, await world.who("boss")
    for dataset_ids in (("nope",), ("d3",), ("d1", "zz")):
        with pytest.raises(NotFound) as missing:
            await admin.create_key(
                boss, APP, KeyRequest(KeyKind.SCOPED, scopes=("read",), dataset_ids=dataset_ids)
            )
        index = len(dataset_ids) - 1
        assert missing.value.metadata["field"] == f"api_key.dataset_ids[{index}]"
    too_many = tuple(f"d{i}" for i in range(MAX_KEY_DATASETS + 1))
    with pytest.raises(InvalidArgument) as bad:
        await admin.create_key(
            boss, APP, KeyRequest(KeyKind.SCOPED, scopes=("read",), dataset_ids=too_many)
        )
    assert fields_of(bad.value) == ["api_key.dataset_ids"]
    with pytest.raises(InvalidArgument) as bad:
        await admin.create_key(
            boss,
            APP,
            KeyRequest(
                KeyKind.SCOPED,
                "x" * 201,
                scopes=("write",),
                dataset_ids=("d1", "d1"),
                expires_at=NOW,
            ),
        )
    assert fields_of(bad.value) == [
        "api_key.description",
        "api_key.expires_at",
        "api_key.access",
        "api_key.dataset_ids[1]",
    ]
    with pytest.raises(InvalidArgument) as bad:
        await admin.create_key(boss, APP, KeyRequest(KeyKind.SCOPED))
    assert fields_of(bad.value) == ["api_key.access"]
    later = NOW + timedelta(days=1)
    made = await admin.create_key(
        boss, APP, KeyRequest(KeyKind.SCOPED, scopes=("read",), expires_at=later)
    )
    assert made.key.expires_at == later
    assert [k.id for k in world.keys.keys] == [made.key.id]


async def test_list_keys(world: World) -> None:
    admin = world.admin
    ann, vic, boss = await world.who("ann"), await world.who("vic"), await world.who("boss")
    a = await admin.create_key(ann, APP, KeyRequest(KeyKind.PERSONAL))
    b = await admin.create_key(
        ann, APP, KeyRequest(KeyKind.SCOPED, scopes=("read",), dataset_ids=("d1",))
    )
    c = await admin.create_key(
        vic, APP, KeyRequest(KeyKind.SCOPED, scopes=("read",), dataset_ids=("d2",))
    )
    d = await admin.create_key(
        boss, APP, KeyRequest(KeyKind.SCOPED, scopes=("read",), dataset_ids=("d1",))
    )
    await admin.revoke_key(ann, APP, a.key.id)

    def ids(keys: list[ApiKey]) -> list[str]:
        return [k.id for k in keys]

    assert ids(await admin.list_keys(boss, APP, None, False, None, 10)) == [
        d.key.id,
        c.key.id,
        b.key.id,
    ]
    assert ids(await admin.list_keys(ann, APP, None, True, None, 10)) == [b.key.id, a.key.id]
    assert ids(await admin.list_keys(ann, APP, "d1", False, None, 10)) == [d.key.id, b.key.id]
    assert len(await admin.list_keys(boss, APP, None, True, None, 1)) == 2
    with pytest.raises(PermissionDenied):
        await admin.list_keys(vic, APP, "d1", False, None, 10)
    with pytest.raises(PermissionDenied) as raised:
        await admin.list_keys(key_principal(), APP, None, False, None, 10)
    assert raised.value.reason == "PERSONAL_KEY_REQUIRED"


async def test_revoke_key_rules(world: World) -> None:
    admin = world.admin
    ann, vic, nobody = await world.who("ann"), await world.who("vic"), await world.who("nobody")
    boss = await world.who("boss")
    on_both = await admin.create_key(
        boss, APP, KeyRequest(KeyKind.SCOPED, scopes=("read",), dataset_ids=("d1", "d2"))
    )
    on_d2 = await admin.create_key(
        boss, APP, KeyRequest(KeyKind.SCOPED, scopes=("read",), dataset_ids=("d2",))
    )
    mine = await admin.create_key(nobody, APP, KeyRequest(KeyKind.PERSONAL))
    made = await admin.create_key(
        ann, APP, KeyRequest(KeyKind.SCOPED, scopes=("read",), dataset_ids=("d1",))
    )
    # Admin of d1 only; of d2 only; a member with no roles: not their keys.
    for caller in (ann, vic, nobody):
        with pytest.raises(PermissionDenied) as raised:
            await admin.revoke_key(caller, APP, on_both.key.id)
        assert raised.value.reason == "KEY_ACCESS_DENIED"
    with pytest.raises(PermissionDenied):
        await admin.revoke_key(key_principal(), APP, mine.key.id)
    assert all(k.revoked_at is None for k in world.keys.keys)
    changes = world.changes
    assert (await admin.revoke_key(vic, APP, on_d2.key.id)).revoked_at == NOW
    assert (await admin.revoke_key(nobody, APP, mine.key.id)).revoked_at == NOW
    assert (await admin.revoke_key(ann, APP, made.key.id)).revoked_at == NOW
    assert (await admin.revoke_key(boss, APP, on_both.key.id)).revoked_at == NOW
    assert world.changes == changes + 4
    # Again: the key as it is, nothing written.
    writes = world.keys.revocations
    world.clock.current = NOW + timedelta(hours=1)
    again = await admin.revoke_key(boss, APP, on_both.key.id)
    assert again.revoked_at == NOW and world.keys.revocations == writes
    assert world.changes == changes + 4
    with pytest.raises(NotFound) as missing:
        await admin.revoke_key(boss, APP, "0123456789abcdef")
    assert missing.value.metadata["field"] == "key_id"
    theirs = await admin.create_key(
        await world.who("owner", "other"), "other", KeyRequest(KeyKind.PERSONAL)
    )
    with pytest.raises(NotFound):
        await admin.revoke_key(await world.who("owner"), APP, theirs.key.id)


# Audit log


async def test_audit_listing_needs_dataset_admin_or_app_admin(world: World) -> None:
    admin = world.admin
    await world.audit.insert(AuditEvent(APP, "/x/A", "OK", dataset_ids=("d1",)))
    await world.audit.insert(AuditEvent(APP, "/x/B", "OK", dataset_ids=("d2",)))
    await world.audit.insert(AuditEvent("other", "/x/C", "OK"))
    everything = await admin.list_audit_events(await world.who("boss"), AuditQuery(APP))
    assert [e.rpc for e in everything] == ["/x/B", "/x/A"]
    ann = await world.who("ann")
    assert [e.rpc for e in await admin.list_audit_events(ann, AuditQuery(APP, "d1"))] == ["/x/A"]
    refused = [
        (ann, AuditQuery(APP)),
        (ann, AuditQuery(APP, "d2")),
        (await world.who("vic"), AuditQuery(APP, "d1")),
        (key_principal(), AuditQuery(APP)),
        (await world.who("boss"), AuditQuery("other")),
    ]
    for caller, query in refused:
        with pytest.raises(PermissionDenied):
            await admin.list_audit_events(caller, query)
    with pytest.raises(InvalidArgument) as bad:
        await admin.list_audit_events(ann, AuditQuery(APP, "d1", start=NOW, end=NOW))
    assert fields_of(bad.value) == ["end_time"]
    assert len(world.audit.queries) == 2


# The access parts of other use cases and of authentication


def authenticator(world: World, cache_seconds: float = 60) -> Authenticator:
    return Authenticator(
        world.keys,
        world.clock,
        cache_seconds,
        users=world.users,
        collaborators=world.collaborators,
    )


class QueryRepo(FakeRepo):
    def __init__(self) -> None:
        super().__init__()
        self.queries: list[DatasetListQuery] = []

    async def list(self, query: DatasetListQuery) -> list[Dataset]:
        self.queries.append(query)
        return [
            r
            for r in self.rows.values()
            if r.app_id == query.app_id
            and r.deleted_at is None
            and (query.only is None or r.id in query.only)
        ][: query.limit]


async def test_a_member_creating_a_dataset_becomes_its_admin(world: World) -> None:
    repo = QueryRepo()
    repo.rows.update(world.datasets.rows)
    world.collaborators.datasets = repo
    invalidated: list[int] = []
    datasets = DatasetService(
        repo,
        FakeBlobs(),
        world.tx,
        world.clock,
        DatasetSettings(),
        MediaProbes(),
        collaborators=world.collaborators,
        roles_changed=lambda: invalidated.append(1),
    )
    await datasets.create(await world.who("nobody"), APP, "mine", DatasetFields())
    added = world.collaborators.rows[(APP, "mine", "nobody")]
    assert (added.role, added.added_by) == (DatasetRole.ADMIN, "nobody")
    assert invalidated == [1]
    await datasets.create(await world.who("boss"), APP, "boss-made", DatasetFields())
    await datasets.create(key_principal(), APP, "key-made", DatasetFields())
    # App owners and admins need no role; a scoped key has no user to give one to.
    assert {d for _, d, _ in world.collaborators.rows} == {"d1", "d2", "mine"}
    assert invalidated == [1]

    async def listed(principal: Principal) -> list[str]:
        views, _ = await datasets.list(
            principal,
            APP,
            sort_field=SortField.CREATED_AT,
            descending=False,
            text="",
            limit=10,
            after=None,
        )
        return sorted(v.dataset.id for v in views)

    assert await listed(await world.who("nobody")) == ["mine"]
    assert repo.queries[-1].only == frozenset({"mine"})
    assert await listed(await world.who("boss")) == ["boss-made", "d1", "d2", "key-made", "mine"]
    assert repo.queries[-1].only is None
    assert await listed(key_principal("key-made")) == ["key-made"]
    queries = len(repo.queries)
    assert await listed(await world.who("vic")) == ["d1", "d2"]
    assert len(repo.queries) == queries + 1
    no_roles = dataclasses.replace(await world.who("nobody"), dataset_roles={})
    assert await listed(no_roles) == []
    assert len(repo.queries) == queries + 1  # nothing readable: no query at all


async def test_app_admins_make_personal_keys_for_other_users(world: World) -> None:
    admin, boss, owner = world.admin, await world.who("boss"), await world.who("owner")
    made = await admin.create_key(boss, APP, KeyRequest(KeyKind.PERSONAL, user_id="nobody"))
    assert (made.key.user_id, made.key.created_by) == ("nobody", "boss")
    assert (await authenticator(world).authenticate(made.secret)).user_id == "nobody"
    count = len(world.keys.keys)
    with pytest.raises(PermissionDenied) as raised:
        await admin.create_key(
            await world.who("ann"), APP, KeyRequest(KeyKind.PERSONAL, user_id="vic")
        )
    assert raised.value.metadata["field"] == "api_key.user_id"
    with pytest.raises(PermissionDenied) as raised:
        await admin.create_key(boss, APP, KeyRequest(KeyKind.PERSONAL, user_id="owner"))
    assert raised.value.reason == "OWNER_REQUIRED"
    with pytest.raises(NotFound) as missing:
        await admin.create_key(boss, APP, KeyRequest(KeyKind.PERSONAL, user_id="ghost"))
    assert missing.value.metadata["field"] == "api_key.user_id"
    with pytest.raises(InvalidArgument) as bad:
        await admin.create_key(
            boss, APP, KeyRequest(KeyKind.SCOPED, scopes=("read",), user_id="nobody")
        )
    assert fields_of(bad.value) == ["api_key.user_id"]
    assert len(world.keys.keys) == count
    assert (
        await admin.create_key(owner, APP, KeyRequest(KeyKind.PERSONAL, user_id="owner"))
    ).key.user_id == "owner"
