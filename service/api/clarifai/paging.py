"""Clarifai's numbered pages (`page` from 1, `per_page`) over datasetd's cursor pages.

A native page token is a stable cursor, so page N+1 follows from the token that ended
page N. Clients list page 1, 2, 3, ...: the tokens that start each page are remembered
(per caller key and query, a bounded LRU), so listing everything costs one native page
per page, not a walk from the start each time. A page nobody asked for the start of is
reached by walking from the nearest remembered page."""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from service.domain.errors import InvalidArgument

T = TypeVar("T")

DEFAULT_PER_PAGE = 128
MAX_PER_PAGE = 1000
# Clarifai refuses deep windows with this text (the SDK matches it); datasetd allows more,
# but a page that far would walk too many cursors.
MAX_WINDOW = 1_000_000
_REMEMBERED = 4096

# page_size, page_token → (items, next_page_token)
Fetch = Callable[[int, str], Awaitable[tuple[Sequence[T], str]]]


@dataclass(frozen=True)
class PageRequest:
    page: int
    per_page: int


def page_request(page: int, per_page: int) -> PageRequest:
    """`page` 0 means 1, `per_page` 0 means 128 (the proto comments' defaults)."""
    page = page or 1
    per_page = per_page or DEFAULT_PER_PAGE
    if per_page > MAX_PER_PAGE:
        raise InvalidArgument.field("per_page", f"must be at most {MAX_PER_PAGE}, got {per_page}")
    if page * per_page > MAX_WINDOW:
        raise InvalidArgument.field(
            "page", f"page * perPage cannot exceed {MAX_WINDOW} (got {page} * {per_page})"
        )
    return PageRequest(page, per_page)


class PageCursors(Generic[T]):
    """Remembers which native token starts page N of a query."""

    def __init__(self, size: int = _REMEMBERED) -> None:
        self._starts: collections.OrderedDict[tuple[str, int, int], str] = collections.OrderedDict()
        self._size = size

    def _remember(self, key: tuple[str, int, int], token: str) -> None:
        self._starts[key] = token
        self._starts.move_to_end(key)
        while len(self._starts) > self._size:
            self._starts.popitem(last=False)

    async def page(self, query: str, request: PageRequest, fetch: Fetch[T]) -> list[T]:
        """The items of page `request.page` of `query` (any string that identifies the
        caller and every filter of the list), fetched with `fetch`."""
        query = hashlib.sha256(query.encode()).hexdigest()
        per_page = request.per_page
        number, token = 1, ""
        for candidate in range(request.page, 1, -1):
            remembered = self._starts.get((query, per_page, candidate))
            if remembered is not None:
                number, token = candidate, remembered
                break
        while True:
            items, following = await _gather(fetch, per_page, token)
            if following:
                self._remember((query, per_page, number + 1), following)
            if number == request.page:
                return items
            if not following:
                return []
            number, token = number + 1, following


async def _gather(fetch: Fetch[T], wanted: int, token: str) -> tuple[list[T], str]:
    """`wanted` items from `token` on, over as many native pages as that takes."""
    items: list[T] = []
    while True:
        got, token = await fetch(wanted - len(items), token)
        items.extend(got)
        if len(items) >= wanted or not token:
            return items, token
