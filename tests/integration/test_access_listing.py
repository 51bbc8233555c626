"""The access parts of part B over real PostgreSQL: ListDatasets' storage filter, and the
use cases with the Authenticator over the repositories."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from service.domain.access_admin import AccessAdmin, KeyRequest, UserChange
from service.domain.auth import Authenticator, ensure_bootstrap_key
from service.domain.clock import SystemClock
from service.domain.datasets import DatasetFields, DatasetService, DatasetSettings
from service.domain.errors import FailedPrecondition, Unauthenticated
from service.domain.models import (
    AppRole,
    Dataset,
    DatasetListQuery,
    DatasetRole,
    KeyKind,
    Principal,
    SortField,
    User,
)
from service.media.probe import MediaProbes
from service.storage.access import PgCollaboratorRepository, PgUserRepository
from service.storage.api_keys import PgApiKeyRepository
from service.storage.audit import PgAuditRepository
from service.storage.blobs import ContentAddressedBlobStore
from service.storage.datasets import PgDatasetRepository
from service.storage.db import Database
from tests.conftest import Stack, object_store
from tests.scratch import migrated_database


@pytest.fixture
async def repo(stack: Stack) -> AsyncIterator[PgDatasetRepository]:
    database: Database
    async with migrated_database(stack.dsn, "listing") as database:
        yield PgDatasetRepository(database)


async def test_list_keeps_to_the_readable_datasets(repo: PgDatasetRepository) -> None:
    for app_id in ("app", "other"):
        for index in range(6):
            await repo.insert(Dataset(app_id, f"d{index}", description=f"set {index}"))
    readable = frozenset({"d1", "d3", "d4", "missing"})
    for sort_field in SortField:
        for descending in (False, True):
            query = DatasetListQuery("app", sort_field, descending, "", 2, only=readable)
            first = await repo.list(query)
            assert len(first) == 2
            last = first[-1]
            after = (getattr(last, sort_field.value), last.id)
            rest = await repo.list(
                DatasetListQuery("app", sort_field, descending, "", 10, after, only=readable)
            )
            ids = [d.id for d in first + rest]
            assert sorted(ids) == ["d1", "d3", "d4"], (sort_field, descending)
            assert {d.app_id for d in first + rest} == {"app"}
    assert (
        await repo.list(DatasetListQuery("app", SortField.ID, False, "", 10, only=frozenset()))
        == []
    )
    assert [
        d.id
        for d in await repo.list(
            DatasetListQuery("app", SortField.ID, False, "set 3", 10, only=readable)
        )
    ] == ["d3"]
    everything = await repo.list(DatasetListQuery("app", SortField.ID, False, "", 10))
    assert [d.id for d in everything] == [f"d{i}" for i in range(6)]


@pytest.fixture
async def database(stack: Stack) -> AsyncIterator[Database]:
    async with migrated_database(stack.dsn, "access") as db:
        yield db


async def test_members_roles_keys_and_listing_over_postgres(
    database: Database, stack: Stack
) -> None:
    """The access use cases and the Authenticator over the PostgreSQL repositories."""
    db, clock = database, SystemClock()
    keys, users = PgApiKeyRepository(db), PgUserRepository(db)
    collaborators, repo = PgCollaboratorRepository(db), PgDatasetRepository(db)
    auth = Authenticator(keys, clock, 60, users=users, collaborators=collaborators)
    admin = AccessAdmin(
        db, users, collaborators, keys, PgAuditRepository(db), repo, clock, auth.invalidate
    )
    datasets = DatasetService(
        repo,
        ContentAddressedBlobStore(db, object_store(stack)),
        db,
        clock,
        DatasetSettings(),
        MediaProbes(),
        collaborators=collaborators,
        roles_changed=auth.invalidate,
    )
    async with db.transaction():
        secret = await ensure_bootstrap_key(keys, users, "app", None)
    assert secret is not None
    owner = await auth.authenticate(secret)
    assert (owner.user_id, owner.app_role) == ("owner", AppRole.OWNER)

    await admin.create_user(owner, "app", User("app", "ann@x.io", "Ann"))
    made = await admin.create_key(
        await auth.authenticate(secret), "app", KeyRequest(KeyKind.PERSONAL)
    )
    assert made.key.user_id == "owner" and made.key.created_at is not None
    ann_key = await admin.create_key(owner, "app", KeyRequest(KeyKind.PERSONAL, user_id="ann@x.io"))
    ann = await auth.authenticate(ann_key.secret)
    assert (ann.user_id, ann.app_role, dict(ann.dataset_roles)) == (
        "ann@x.io",
        AppRole.MEMBER,
        {},
    )
    await datasets.create(owner, "app", "theirs", DatasetFields())
    await datasets.create(ann, "app", "mine", DatasetFields())
    ann = await auth.authenticate(ann_key.secret)  # the cache was invalidated
    assert dict(ann.dataset_roles) == {"mine": DatasetRole.ADMIN}

    async def listed(principal: Principal) -> list[str]:
        views, _ = await datasets.list(
            principal,
            "app",
            sort_field=SortField.ID,
            descending=False,
            text="",
            limit=10,
            after=None,
        )
        return [v.dataset.id for v in views]

    assert await listed(ann) == ["mine"]
    assert await listed(owner) == ["mine", "theirs"]

    # The last owner stays; nothing changed by the refusal.
    with pytest.raises(FailedPrecondition):
        await admin.update_user(owner, "app", "owner", UserChange(role=AppRole.MEMBER))
    assert (await users.owner_ids("app")) == ["owner"]
    # Deleting a user revokes their keys and ends their roles, in one transaction.
    assert await admin.delete_user(owner, "app", "ann@x.io") == 1
    assert await collaborators.get("app", "mine", "ann@x.io") is None
    with pytest.raises(Unauthenticated):
        await auth.authenticate(ann_key.secret)
    stored = await keys.get("app", ann_key.key.id)
    assert stored is not None and stored.revoked_at is not None
