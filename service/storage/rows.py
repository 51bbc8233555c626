"""Rows to domain dataclasses: the columns named like a dataclass's fields fill them.

The repositories select columns under their field names, so only the fields whose
stored form differs (an enum's value, a joined blob, a renamed column) are spelled out.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from service.domain.models import StoredBlob

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

D = TypeVar("D", bound="DataclassInstance")

# The columns of a blob joined as `b.key AS blob_key, b.sha256 AS blob_sha256, ...`.
BLOB_COLUMNS = ("blob_key", "blob_sha256", "blob_size", "blob_content_type")


@functools.cache
def _field_names(cls: type[DataclassInstance]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def record(cls: type[D], row: asyncpg.Record, **converted: Any) -> D:
    """`cls` built from `row`: `converted` gives the fields the caller maps itself,
    every other field is the column of its name (a missing one is a KeyError)."""
    values = {name: row[name] for name in _field_names(cls) if name not in converted}
    return cls(**values, **converted)


def stored_blob(row: asyncpg.Record, columns: tuple[str, str, str, str]) -> StoredBlob | None:
    """The blob of a LEFT JOIN, None where the row has none; `columns` name its
    key, sha256, size and content type."""
    key, sha256, size, content_type = columns
    if row[key] is None:
        return None
    return StoredBlob(row[key], row[sha256], row[size], row[content_type])
