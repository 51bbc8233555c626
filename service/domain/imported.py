"""What an import is made of: the request, the archive's inputs and annotations as an
ArchiveReader yields them, and the ports that stage and read an untrusted archive."""

from __future__ import annotations

import enum
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from service.domain.input_drafts import InputDraft

_MIB = 1024 * 1024
# Errors name the archive's content "archive" (or an entry in it); the stream that
# carries it, "chunk".
ARCHIVE_FIELD = "archive"
CHUNK_FIELD = "chunk"


class ImportFormat(enum.Enum):
    CLARIFAI_DATA_PROTOBUF = "clarifai_data_protobuf"
    COCO = "coco"


@dataclass(frozen=True)
class ArchiveLimits:
    """What a reader accepts of an archive. Entries below `ratio_floor_bytes` are not held
    to the ratio (tiny entries compress unpredictably); the entry count caps what they
    can add up to."""

    max_entries: int = 100_000
    max_total_bytes: int = 8 * 1024 * _MIB
    max_entry_bytes: int = 256 * _MIB
    max_ratio: int = 100
    ratio_floor_bytes: int = 64 * 1024


@dataclass(frozen=True)
class ImportSettings:
    max_archive_bytes: int = 2 * 1024 * _MIB
    max_inputs: int = 1_000_000
    max_entries: int = 100_000
    max_entry_bytes: int = 256 * _MIB
    max_ratio: int = 100

    @property
    def limits(self) -> ArchiveLimits:
        # Uncompressed, an archive may be four times its size: ordinary data compresses
        # far less, and a bomb is stopped long before it fills the disk or memory.
        return ArchiveLimits(
            max_entries=self.max_entries,
            max_total_bytes=4 * self.max_archive_bytes,
            max_entry_bytes=self.max_entry_bytes,
            max_ratio=self.max_ratio,
        )


@dataclass(frozen=True)
class ImportRequest:
    """The header of an import; `format` None means not given."""

    app_id: str
    dataset_id: str
    format: ImportFormat | None


@dataclass(frozen=True)
class ImportedAnnotation:
    """One annotation of an imported input. `path` names where it sits in the archive;
    `root` is the part of a field path, relative to the annotation's data, that `path`
    stands for (an annotation made of region 5 of an input has the data
    {"regions": [region]}: its ".regions[0]" is the archive's "...data.regions[5]")."""

    path: str
    data: dict[str, Any]
    root: str = ""

    def locate(self, relative: str) -> str:
        """The archive location of a field given relative to the annotation's data."""
        if relative.startswith(self.root):
            relative = relative[len(self.root) :]
        return self.path + relative


@dataclass(frozen=True)
class ImportedInput:
    """One input read from an archive. `path` names it in errors (for example
    `archive["all/batch-000000_n3"].inputs[2]`); `declared_size` is the (width, height)
    the archive states for an image, checked against its bytes."""

    path: str
    draft: InputDraft
    annotations: tuple[ImportedAnnotation, ...] = ()
    declared_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class ImportResult:
    inputs_created: int
    annotations_created: int


class StagedArchive(Protocol):
    """An archive written to temporary storage as it arrives."""

    async def write(self, chunk: bytes) -> None: ...

    async def finish(self) -> str:
        """Completes the archive; returns the hex SHA-256 of its bytes."""
        ...

    def file(self) -> BinaryIO:
        """The finished archive, positioned at its start (one reader at a time)."""
        ...

    async def discard(self) -> None:
        """Removes the archive. Safe at any point and more than once; never raises."""
        ...


class ArchiveStaging(Protocol):
    def stage(self) -> StagedArchive: ...


class ArchiveReader(Protocol):
    """Parses archives (implemented in service.formats)."""

    def read(
        self, archive: BinaryIO, archive_format: ImportFormat, limits: ArchiveLimits
    ) -> Generator[list[ImportedInput], None, None]:
        """The archive's inputs, in archive order, in batches. Raises InvalidArgument
        naming the entry for anything that is not a well-formed archive of the format
        within the limits, when it reaches it."""
        ...
