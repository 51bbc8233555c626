"""Vi's `PaginatedResponse`: the first page at once, the next ones fetched when reached."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]


class PaginatedResponse(Generic[T]):
    """`.items` is the first page; iterating yields the pages (fetched lazily, each once,
    so iterating twice costs no second call); `.all_items()` yields every item."""

    def __init__(self, pages: Iterator[list[T]]) -> None:
        self._pages = pages
        self._fetched: list[Page[T]] = [Page(next(pages, []))]

    @property
    def items(self) -> list[T]:
        return self._fetched[0].items

    def __iter__(self) -> Iterator[Page[T]]:
        index = 0
        while True:
            if index == len(self._fetched):
                following = next(self._pages, None)
                if following is None:
                    return
                self._fetched.append(Page(following))
            yield self._fetched[index]
            index += 1

    def all_items(self) -> Iterator[T]:
        for page in self:
            yield from page.items


def chunked(items: Iterator[T], size: int) -> Iterator[list[T]]:
    """Pages of `size` items from a lazy sequence (the last may be shorter, none empty)."""
    page: list[T] = []
    for item in items:
        page.append(item)
        if len(page) == size:
            yield page
            page = []
    if page:
        yield page
