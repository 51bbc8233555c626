from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

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
from service.domain.models import ApiKey, Principal


class FakeKeys:
    def __init__(self) -> None:
        self.keys: list[ApiKey] = []

    async def insert(self, key: ApiKey) -> None:
        self.keys.append(key)

    async def find_by_lookup(self, lookup: str) -> list[ApiKey]:
        return [k for k in self.keys if k.lookup == lookup]

    async def find_by_description(self, app_id: str, description: str) -> ApiKey | None:
        return next(
            (k for k in self.keys if k.app_id == app_id and k.description == description), None
        )


class FixedClock:
    def __init__(self) -> None:
        self.current = datetime(2026, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current


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
    auth = Authenticator(keys, clock, cache_seconds=0)
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
    auth = Authenticator(keys, clock, cache_seconds=60)
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
    keys = FakeKeys()
    first = await ensure_bootstrap_key(keys, "main", None)
    assert first is not None
    assert await ensure_bootstrap_key(keys, "main", None) is None
    assert len(keys.keys) == 1
    configured = "my-configured-key-123"
    assert await ensure_bootstrap_key(keys, "main", configured) == configured
    assert await ensure_bootstrap_key(keys, "main", configured) == configured
    assert len(keys.keys) == 2
    auth = Authenticator(keys, FixedClock())
    assert (await auth.authenticate(configured)).app_id == "main"
    assert (await auth.authenticate(first)).app_id == "main"
    with pytest.raises(InvalidArgument):
        new_key("main", "short", "too-short")
