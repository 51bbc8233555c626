"""Keyset pages: a repository is asked for one row more than the page holds, and that
extra row tells whether another page follows."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def split_page(rows: list[tuple[int, T]], limit: int) -> tuple[list[T], int | None]:
    """The page's items and the sequence number to continue after, None on the last page.
    `rows` are (sequence number, item) pairs, fetched with a limit of `limit + 1`."""
    page = rows[:limit]
    last = page[-1][0] if len(rows) > limit and page else None
    return [item for _, item in page], last
