from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from service.domain.auth import (
    Authenticator,
    Permission,
    authorize,
    ensure_bootstrap_key,
    new_key,
    parse_authorization,
)
from service.domain.errors import InvalidArgument, PermissionDenied, Unauthenticated
from service.domain.models import (
    AppRole,
    Collaborator,
    Dataset,
    DatasetRole,
    KeyKind,
    Principal,
    User,
)
from service.domain.ports import Clock
from tests.unit.test_access_admin import FakeCollaborators, FakeKeys, FakeUsers, FixedClock
from tests.unit.test_dataset_service import FakeRepo

__all__ = ["FakeKeys", "FixedClock", "authenticator"]


def authenticator(
    keys: FakeKeys, clock: Clock, cache_seconds: float = 5.0, users: FakeUsers | None = None
) -> Authenticator:
    """An Authenticator over fakes; `users` (with their collaborators) when personal keys
    are used."""
    users = users or FakeUsers(FakeCollaborators(FakeRepo()))
    return Authenticator(keys, clock, cache_seconds, users=users, collaborators=users.collaborators)


def test_parse_authorization_schemes() -> None:
    assert parse_authorization(["Key abc"]) == "abc"
    assert parse_authorization(["bearer  abc "]) == "abc"
    for values, reason in [
        ([], "MISSING_API_KEY"),
        (["abc"], "MALFORMED_API_KEY"),
        (["Basic abc"], "MALFORMED_API_KEY"),
        (["Key "], "MALFORMED_API_KEY"),
        (["Key a", "Key b"], "MALFORMED_API_KEY"),
    ]:
        with pytest.raises(Unauthenticated) as raised:
            parse_authorization(values)
        assert raised.value.reason == reason


async def test_authenticate_checks_secret_expiry_and_revocation() -> None:
    keys, clock = FakeKeys(), FixedClock()
    secret, key = new_key("app", "k")
    assert secret.startswith("dsd_") and secret.encode() not in repr(key).encode()
    await keys.insert(key)
    auth = authenticator(keys, clock, cache_seconds=0)
    principal = await auth.authenticate(secret)
    assert principal.app_id == "app"
    with pytest.raises(Unauthenticated):
        await auth.authenticate(secret + "x")
    keys.keys = [dataclasses.replace(key, expires_at=clock.current - timedelta(seconds=1))]
    with pytest.raises(Unauthenticated):
        await auth.authenticate(secret)
    keys.keys = [dataclasses.replace(key, revoked_at=clock.current)]
    with pytest.raises(Unauthenticated):
        await auth.authenticate(secret)


async def test_authenticate_caches_for_the_configured_time() -> None:
    keys, clock = FakeKeys(), FixedClock()
    secret, key = new_key("app", "k")
    await keys.insert(key)
    auth = authenticator(keys, clock, cache_seconds=60)
    await auth.authenticate(secret)
    keys.keys.clear()
    assert (await auth.authenticate(secret)).app_id == "app"


def test_authorize_app_and_scopes() -> None:
    principal = Principal("k", "app", frozenset({"read"}))
    authorize(principal, "app", Permission.READ)
    with pytest.raises(PermissionDenied) as raised:
        authorize(principal, "other", Permission.READ)
    assert raised.value.reason == "WRONG_APP"
    with pytest.raises(PermissionDenied) as raised:
        authorize(principal, "app", Permission.WRITE)
    assert raised.value.reason == "MISSING_SCOPE"
    with pytest.raises(InvalidArgument):
        authorize(principal, "bad app", Permission.READ)


async def test_bootstrap_key_is_created_once_or_taken_from_config() -> None:
    keys, users = FakeKeys(), FakeUsers(FakeCollaborators(FakeRepo()))
    first = await ensure_bootstrap_key(keys, users, "main", None)
    assert first is not None
    assert await ensure_bootstrap_key(keys, users, "main", None) is None
    assert len(keys.keys) == 1
    configured = "my-configured-key-123"
    assert await ensure_bootstrap_key(keys, users, "main", configured) == configured
    assert await ensure_bootstrap_key(keys, users, "main", configured) == configured
    assert len(keys.keys) == 2
    # Both are personal keys of the app's first owner, made once.
    owner = users.rows[("main", "owner")]
    assert (owner.role, owner.display_name) == (AppRole.OWNER, "App owner")
    assert list(users.rows) == [("main", "owner")]
    assert {(k.kind, k.user_id, k.created_by) for k in keys.keys} == {
        (KeyKind.PERSONAL, "owner", "")
    }
    auth = authenticator(keys, FixedClock(), users=users)
    for secret in (configured, first):
        principal = await auth.authenticate(secret)
        assert (principal.app_id, principal.user_id, principal.app_role) == (
            "main",
            "owner",
            AppRole.OWNER,
        )
    with pytest.raises(InvalidArgument):
        new_key("main", "short", "too-short")


async def test_personal_keys_carry_their_users_roles() -> None:
    keys, clock, datasets = FakeKeys(), FixedClock(), FakeRepo()
    users = FakeUsers(FakeCollaborators(datasets))
    await users.insert(User("app", "ann", role=AppRole.MEMBER))
    for dataset_id in ("d1", "d2"):
        await datasets.insert(Dataset("app", dataset_id))
    await users.collaborators.insert(Collaborator("app", "d1", "ann", DatasetRole.ADMIN))
    secret, key = new_key("app", "k")
    await keys.insert(dataclasses.replace(key, kind=KeyKind.PERSONAL, user_id="ann"))
    auth = authenticator(keys, clock, cache_seconds=60, users=users)
    principal = await auth.authenticate(secret)
    assert (principal.kind, principal.user_id, principal.app_role) == (
        KeyKind.PERSONAL,
        "ann",
        AppRole.MEMBER,
    )
    assert dict(principal.dataset_roles) == {"d1": DatasetRole.ADMIN}
    # Cached until invalidated: then the new role shows.
    await users.collaborators.insert(Collaborator("app", "d2", "ann", DatasetRole.VIEWER))
    assert "d2" not in (await auth.authenticate(secret)).dataset_roles
    auth.invalidate()
    assert (await auth.authenticate(secret)).dataset_roles["d2"] is DatasetRole.VIEWER
    # A personal key whose user is gone authenticates nobody.
    await users.delete("app", "ann")
    auth.invalidate()
    with pytest.raises(Unauthenticated):
        await auth.authenticate(secret)


async def test_scoped_keys_carry_their_datasets_and_creator() -> None:
    keys, clock = FakeKeys(), FixedClock()
    secret, key = new_key("app", "k")
    await keys.insert(
        dataclasses.replace(key, scopes=("read",), dataset_ids=("d1",), created_by="ann")
    )
    principal = await authenticator(keys, clock).authenticate(secret)
    assert (principal.kind, principal.user_id, principal.datasets, principal.scopes) == (
        KeyKind.SCOPED,
        "ann",
        frozenset({"d1"}),
        frozenset({"read"}),
    )
    whole, key = new_key("app", "whole")
    await keys.insert(key)
    assert (await authenticator(keys, clock).authenticate(whole)).datasets is None


async def test_last_use_is_recorded_at_most_once_a_minute() -> None:
    keys, clock = FakeKeys(), FixedClock()
    secret, key = new_key("app", "k")
    await keys.insert(key)
    auth = authenticator(keys, clock, cache_seconds=0)
    for _ in range(3):
        await auth.authenticate(secret)
    assert keys.touches == [(key.id, clock.current)]
    clock.current += timedelta(seconds=59)
    await auth.authenticate(secret)
    assert len(keys.touches) == 1
    clock.current += timedelta(seconds=2)
    await auth.authenticate(secret)
    assert keys.touches[-1] == (key.id, clock.current) and len(keys.touches) == 2
    # Another server recorded a use a moment ago: this one does not again.
    other, key2 = new_key("app", "k2")
    await keys.insert(dataclasses.replace(key2, last_used_at=clock.current))
    clock.current += timedelta(seconds=30)
    await auth.authenticate(other)
    assert len(keys.touches) == 2
