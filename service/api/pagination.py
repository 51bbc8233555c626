"""Opaque, signed page tokens for keyset pagination.

A token carries the last row's sort key and a hash of the request's other
parameters, signed with an installation-wide key: a token cannot be forged,
altered, or replayed against a different query, app or server installation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, Protocol

from service.domain.errors import InvalidArgument

_MAC_BYTES = 16
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument.field(
            "page_size", f"must be 0 (default {DEFAULT_PAGE_SIZE}) or positive, got {value}"
        )
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _bad(description: str) -> InvalidArgument:
    return InvalidArgument.field("page_token", description, reason="INVALID_PAGE_TOKEN")


class PagedRequest(Protocol):
    @property
    def app_id(self) -> str: ...
    @property
    def page_size(self) -> int: ...
    @property
    def page_token(self) -> str: ...


@dataclass(frozen=True)
class Page:
    """One page of a List call: how many rows, the row it continues after, and the scope
    (method, app and filters) that its tokens are bound to."""

    limit: int
    after: int | None
    scope: dict[str, Any]
    tokens: PageTokens

    def next_token(self, last: int | None) -> str:
        """The token of the page after the row numbered `last`; empty on the last page."""
        return "" if last is None else self.tokens.encode(self.scope, [last])


class PageTokens:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @staticmethod
    def _scope_hash(scope: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(scope, sort_keys=True).encode()).hexdigest()[:32]

    def encode(self, scope: dict[str, Any], cursor: list[Any]) -> str:
        payload = json.dumps({"v": 1, "s": self._scope_hash(scope), "c": cursor}).encode()
        mac = hmac.new(self._secret, payload, hashlib.sha256).digest()[:_MAC_BYTES]
        return base64.urlsafe_b64encode(payload + mac).decode().rstrip("=")

    def decode(self, token: str, scope: dict[str, Any]) -> list[Any]:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError:
            raise _bad("is malformed; pass next_page_token unchanged") from None
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        expected = hmac.new(self._secret, payload, hashlib.sha256).digest()[:_MAC_BYTES]
        if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, expected):
            raise _bad(
                "is invalid (altered, or issued by another server); pass next_page_token unchanged"
            )
        try:
            data = json.loads(payload)
        except ValueError:
            raise _bad("is malformed; pass next_page_token unchanged") from None
        if data.get("s") != self._scope_hash(scope):
            raise _bad(
                "belongs to a different request; keep app_id, sort and query the same while paging"
            )
        cursor = data.get("c")
        if not isinstance(cursor, list):
            raise _bad("is malformed")
        return cursor

    def page(self, method: str, request: PagedRequest, **scope: Any) -> Page:
        """The page a List request asks for; `scope` holds the request's filters, so that
        a token is refused under other filters."""
        limit = page_size(request.page_size)
        bound = {"method": method, "app_id": request.app_id, **scope}
        return Page(limit, self.decode_seq(request.page_token, bound), bound, self)

    def decode_seq(self, token: str, scope: dict[str, Any]) -> int | None:
        """The sequence number a token continues after, or None without a token."""
        if not token:
            return None
        cursor = self.decode(token, scope)
        if len(cursor) != 1 or not isinstance(cursor[0], int):
            raise _bad("is malformed")
        return cursor[0]
