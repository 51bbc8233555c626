from __future__ import annotations

import pytest

from service.api.pagination import PageTokens
from service.domain.errors import InvalidArgument

SCOPE = {"app_id": "a", "sort": "id", "query": ""}


def test_round_trip() -> None:
    tokens = PageTokens(b"k" * 32)
    token = tokens.encode(SCOPE, ["2026-01-01T00:00:00+00:00", "id-1"])
    assert tokens.decode(token, dict(SCOPE)) == ["2026-01-01T00:00:00+00:00", "id-1"]


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t + "x",
        lambda t: t[:-2],
        lambda t: "A" + t[1:] if t[0] != "A" else "B" + t[1:],
        lambda t: "",
        lambda t: "%%%",
    ],
)
def test_tampered_tokens_are_rejected(mangle: object) -> None:
    tokens = PageTokens(b"k" * 32)
    token = tokens.encode(SCOPE, ["v", "id"])
    with pytest.raises(InvalidArgument) as raised:
        tokens.decode(mangle(token), SCOPE)  # type: ignore[operator]
    assert raised.value.reason == "INVALID_PAGE_TOKEN"


def test_token_of_another_server_or_request_is_rejected() -> None:
    token = PageTokens(b"k" * 32).encode(SCOPE, ["v", "id"])
    with pytest.raises(InvalidArgument):
        PageTokens(b"j" * 32).decode(token, SCOPE)
    with pytest.raises(InvalidArgument) as raised:
        PageTokens(b"k" * 32).decode(token, {**SCOPE, "query": "other"})
    assert "different request" in raised.value.violations[0].description
