"""Clarifai page numbers over native cursor pages (service/api/clarifai/paging.py)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from service.api.clarifai.paging import (
    DEFAULT_PER_PAGE,
    MAX_PER_PAGE,
    PageCursors,
    PageRequest,
    page_request,
)
from service.domain.errors import InvalidArgument


class Cursor:
    """A native list of `total` items with pages of at most `cap`, counting its fetches."""

    def __init__(self, total: int, cap: int = 1000) -> None:
        self.items = list(range(total))
        self.cap = cap
        self.fetches = 0

    async def fetch(self, size: int, token: str) -> tuple[Sequence[int], str]:
        self.fetches += 1
        start = int(token or 0)
        end = min(start + min(size, self.cap), len(self.items))
        return self.items[start:end], (str(end) if end < len(self.items) else "")


async def test_pages_in_order_cost_one_fetch_each() -> None:
    native, cursors = Cursor(25), PageCursors[int]()
    seen: list[int] = []
    for number in range(1, 5):
        seen += await cursors.page("q", PageRequest(number, 10), native.fetch)
    assert seen == list(range(25))
    # Pages 1-3 hold items, page 4 is past the end: its start was never remembered, so it
    # walks from page 3, whose cursor says the list ended.
    assert native.fetches == 4


async def test_a_page_asked_first_walks_from_the_start_and_is_exact() -> None:
    native, cursors = Cursor(95), PageCursors[int]()
    assert await cursors.page("q", PageRequest(4, 20), native.fetch) == list(range(60, 80))
    assert native.fetches == 4
    assert await cursors.page("q", PageRequest(5, 20), native.fetch) == list(range(80, 95))
    assert native.fetches == 5
    assert await cursors.page("q", PageRequest(9, 20), native.fetch) == []


async def test_pages_larger_than_a_native_page_are_filled() -> None:
    native, cursors = Cursor(300, cap=50), PageCursors[int]()
    assert await cursors.page("q", PageRequest(2, 128), native.fetch) == list(range(128, 256))


async def test_queries_do_not_share_cursors() -> None:
    first, second, cursors = Cursor(30), Cursor(30), PageCursors[int]()
    await cursors.page("a", PageRequest(1, 10), first.fetch)
    assert await cursors.page("b", PageRequest(2, 10), second.fetch) == list(range(10, 20))
    assert second.fetches == 2


async def test_remembered_cursors_are_bounded() -> None:
    native, cursors = Cursor(100), PageCursors[int](size=2)
    for number in range(1, 6):
        await cursors.page("q", PageRequest(number, 10), native.fetch)
    native.fetches = 0
    assert await cursors.page("q", PageRequest(2, 10), native.fetch) == list(range(10, 20))
    assert native.fetches == 2  # page 2's cursor was forgotten: walked from page 1


def test_defaults_and_limits() -> None:
    assert page_request(0, 0) == PageRequest(1, DEFAULT_PER_PAGE)
    with pytest.raises(InvalidArgument) as refused:
        page_request(1, MAX_PER_PAGE + 1)
    assert refused.value.violations[0].field == "per_page"
    with pytest.raises(InvalidArgument) as deep:
        page_request(100_000, 1000)
    assert "page * perPage cannot exceed" in deep.value.violations[0].description
