"""S3 through minio: the async ObjectStore facade and its streaming ObjectWriter."""

from service.storage.objectstore.store import ObjectStore
from service.storage.objectstore.writer import (
    DEFAULT_PART_BYTES,
    MAX_PARTS,
    MIN_PART_BYTES,
    ObjectWriter,
    part_size_for,
)

__all__ = [
    "DEFAULT_PART_BYTES",
    "MAX_PARTS",
    "MIN_PART_BYTES",
    "ObjectStore",
    "ObjectWriter",
    "part_size_for",
]
