"""API keys: issuing, authenticating, and the access policy every RPC goes through."""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from service.domain.errors import InvalidArgument, PermissionDenied, Unauthenticated
from service.domain.models import ApiKey, KeyKind, Principal
from service.domain.ports import ApiKeyRepository, Clock
from service.domain.validation import require_ids

KEY_PREFIX = "dsd_"
MIN_SECRET_LENGTH = 16
BOOTSTRAP_DESCRIPTION = "bootstrap"


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


class Authenticator:
    """Turns a secret into a Principal. Results are cached for a few seconds so
    that a call does not cost a database round trip; revocation and expiry are
    therefore effective within `cache_seconds`."""

    def __init__(self, keys: ApiKeyRepository, clock: Clock, cache_seconds: float = 5.0) -> None:
        self._keys = keys
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._cache: dict[bytes, _CacheEntry] = {}

    async def authenticate(self, secret: str) -> Principal:
        digest = secret_hash(secret)
        now_mono = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached.until > now_mono:
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
            raise Unauthenticated("unknown, expired or revoked API key", reason="INVALID_API_KEY")
        principal = Principal(key_id=match.id, app_id=match.app_id, scopes=frozenset(match.scopes))
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = _CacheEntry(principal, now_mono + self._cache_seconds)
        return principal


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
    keys: ApiKeyRepository, app_id: str, configured_secret: str | None
) -> str | None:
    """Makes sure the app has a bootstrap key; returns the secret when it should be shown.

    A configured secret is (re)registered and always returned; otherwise a key is
    created on the first start only, because the secret is never stored.
    """
    if configured_secret:
        digest = secret_hash(configured_secret)
        existing = await keys.find_by_lookup(lookup_of(digest))
        if not any(hmac.compare_digest(k.secret_hash, digest) for k in existing):
            _, key = new_key(app_id, BOOTSTRAP_DESCRIPTION, configured_secret)
            await keys.insert(key)
        return configured_secret
    if await keys.find_by_description(app_id, BOOTSTRAP_DESCRIPTION) is not None:
        return None
    secret, key = new_key(app_id, BOOTSTRAP_DESCRIPTION)
    await keys.insert(key)
    return secret
