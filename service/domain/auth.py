"""API keys: issuing, authenticating, and the access policy every RPC goes through."""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from service.domain.errors import InvalidArgument, PermissionDenied, Unauthenticated
from service.domain.models import ApiKey, AppRole, KeyKind, Principal, User
from service.domain.ports import ApiKeyRepository, Clock, CollaboratorRepository, UserRepository
from service.domain.validation import require_ids

KEY_PREFIX = "dsd_"
MIN_SECRET_LENGTH = 16
BOOTSTRAP_DESCRIPTION = "bootstrap"
# The user the bootstrap key belongs to: the app's first owner.
BOOTSTRAP_USER = "owner"

log = logging.getLogger(__name__)


class Permission(enum.Enum):
    READ = "read"
    WRITE = "write"


def secret_hash(secret: str) -> bytes:
    # Keys are random (or, for a configured bootstrap key, at least 16
    # characters), so a fast hash is enough; a slow KDF would cost every call.
    return hashlib.sha256(secret.encode()).digest()


def lookup_of(digest: bytes) -> str:
    """A short, non-secret prefix of the hash to find candidate rows by index."""
    return digest[:6].hex()


def new_key(app_id: str, description: str, secret: str | None = None) -> tuple[str, ApiKey]:
    secret = secret or KEY_PREFIX + secrets.token_urlsafe(32)
    if len(secret) < MIN_SECRET_LENGTH:
        raise InvalidArgument.field("secret", f"must be at least {MIN_SECRET_LENGTH} characters")
    digest = secret_hash(secret)
    key = ApiKey(
        id=secrets.token_hex(8),
        app_id=app_id,
        lookup=lookup_of(digest),
        secret_hash=digest,
        description=description,
    )
    return secret, key


def parse_authorization(values: list[str]) -> str:
    """The secret from `authorization: Key <secret>` or `Bearer <secret>`."""
    if not values:
        raise Unauthenticated(
            "missing `authorization` metadata; send `authorization: Key <api key>`",
            reason="MISSING_API_KEY",
        )
    if len(values) > 1:
        raise Unauthenticated("more than one `authorization` value", reason="MALFORMED_API_KEY")
    scheme, _, secret = values[0].strip().partition(" ")
    if scheme.lower() not in ("key", "bearer") or not secret.strip():
        raise Unauthenticated(
            "`authorization` must be `Key <api key>` or `Bearer <api key>`",
            reason="MALFORMED_API_KEY",
        )
    return secret.strip()


@dataclass
class _CacheEntry:
    principal: Principal
    until: float


# A key's last use is recorded at most this often (per key and server).
TOUCH_INTERVAL = timedelta(minutes=1)


class Authenticator:
    """Turns a secret into a Principal: the key's own rights and, for a personal key, its
    user's app role and dataset roles. Results are cached for a few seconds so that a
    call does not cost a database round trip; revocation, expiry and role changes made
    on another server are therefore effective within `cache_seconds` (`invalidate`
    makes this server's own changes effective at once)."""

    def __init__(
        self,
        keys: ApiKeyRepository,
        clock: Clock,
        cache_seconds: float = 5.0,
        *,
        users: UserRepository,
        collaborators: CollaboratorRepository,
    ) -> None:
        self._keys = keys
        self._users = users
        self._collaborators = collaborators
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._cache: dict[bytes, _CacheEntry] = {}
        self._touched: dict[str, datetime] = {}

    def invalidate(self) -> None:
        """Forgets every cached principal (after a change of users, roles or keys)."""
        self._cache.clear()

    async def authenticate(self, secret: str) -> Principal:
        digest = secret_hash(secret)
        now_mono = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached.until > now_mono:
            await self._touch(cached.principal.key_id, None)
            return cached.principal
        match = None
        for candidate in await self._keys.find_by_lookup(lookup_of(digest)):
            if hmac.compare_digest(candidate.secret_hash, digest):
                match = candidate
        now = self._clock.now()
        if (
            match is None
            or match.revoked_at is not None
            or (match.expires_at is not None and match.expires_at <= now)
        ):
            self._cache.pop(digest, None)
            raise _invalid()
        principal = await self._principal(match)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = _CacheEntry(principal, now_mono + self._cache_seconds)
        await self._touch(match.id, match.last_used_at)
        return principal

    async def _principal(self, key: ApiKey) -> Principal:
        if key.kind is KeyKind.SCOPED:
            return Principal(
                key_id=key.id,
                app_id=key.app_id,
                scopes=frozenset(key.scopes),
                user_id=key.created_by,
                kind=KeyKind.SCOPED,
                datasets=frozenset(key.dataset_ids) if key.dataset_ids else None,
            )
        user = await self._users.get(key.app_id, key.user_id) if key.user_id else None
        if user is None:
            # The key's user was deleted (which revokes their keys; this is the race).
            raise _invalid()
        roles = await self._collaborators.roles_of(key.app_id, user.id)
        return Principal(
            key_id=key.id,
            app_id=key.app_id,
            scopes=frozenset(key.scopes),
            user_id=user.id,
            kind=KeyKind.PERSONAL,
            app_role=user.role,
            dataset_roles=roles,
        )

    async def _touch(self, key_id: str, recorded: datetime | None) -> None:
        """Records the key's use unless this server (or, by `recorded`, any server) did
        within TOUCH_INTERVAL."""
        now = self._clock.now()
        last = self._touched.get(key_id, recorded)
        if recorded is not None and last is not None and recorded > last:
            last = recorded
        if last is not None and now - last < TOUCH_INTERVAL:
            return
        # Marked before the write: concurrent calls of the key do not write too.
        if len(self._touched) > 10_000:
            self._touched.clear()
        self._touched[key_id] = now
        try:
            await self._keys.touch(key_id, now)
        except Exception as exc:
            # Bookkeeping only: a call is not refused because its key's last use could
            # not be recorded; the next call after the interval tries again.
            log.warning("recording the use of key %s failed: %s", key_id, exc)


def _invalid() -> Unauthenticated:
    return Unauthenticated("unknown, expired or revoked API key", reason="INVALID_API_KEY")


def authorize(principal: Principal, app_id: str, permission: Permission) -> None:
    """Every use case calls this first: the app, and a scoped key's own rights. What the
    call may touch (datasets, roles) was checked by the API layer against the RPC's rule
    (`service.domain.access`)."""
    require_ids(("app_id", app_id))
    if principal.app_id != app_id:
        raise PermissionDenied(
            f"this API key belongs to app {principal.app_id!r}, not to app {app_id!r}",
            reason="WRONG_APP",
            metadata={"app_id": app_id},
        )
    if principal.kind is KeyKind.SCOPED and permission.value not in principal.scopes:
        raise PermissionDenied(
            f"this API key lacks the {permission.value!r} scope",
            reason="MISSING_SCOPE",
            metadata={"scope": permission.value},
        )


async def ensure_bootstrap_key(
    keys: ApiKeyRepository, users: UserRepository, app_id: str, configured_secret: str | None
) -> str | None:
    """Makes sure the app has a bootstrap key; returns the secret when it should be shown.

    The key is the personal key of the app's first owner, user `owner` (made when
    missing). A configured secret is (re)registered and always returned; otherwise a key
    is created on the first start only, because the secret is never stored. Call it
    inside a transaction: the user and the key are written together.
    """
    if configured_secret:
        digest = secret_hash(configured_secret)
        existing = await keys.find_by_lookup(lookup_of(digest))
        if not any(hmac.compare_digest(k.secret_hash, digest) for k in existing):
            await _insert_bootstrap(keys, users, app_id, configured_secret)
        return configured_secret
    if await keys.find_by_description(app_id, BOOTSTRAP_DESCRIPTION) is not None:
        return None
    return await _insert_bootstrap(keys, users, app_id, None)


async def _insert_bootstrap(
    keys: ApiKeyRepository, users: UserRepository, app_id: str, secret: str | None
) -> str:
    secret, key = new_key(app_id, BOOTSTRAP_DESCRIPTION, secret)
    if await users.get(app_id, BOOTSTRAP_USER) is None:
        await users.insert(
            User(app_id=app_id, id=BOOTSTRAP_USER, display_name="App owner", role=AppRole.OWNER)
        )
    await keys.insert(replace(key, kind=KeyKind.PERSONAL, user_id=BOOTSTRAP_USER))
    return secret
