"""What every container parser shares: bounded reads, the two ways a parse fails, and the
record a video or audio parser fills in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

MediaKind = Literal["image", "video", "audio"]
ByteOrder = Literal["big", "little"]
# Size fields set to all ones mean "unknown" in several formats (MP4 durations, Ogg granules).
ALL_ONES = frozenset({0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF})


class Corrupt(Exception):
    """The bytes carry a known format's signature but break its rules."""

    def __init__(self, message: str, kind: MediaKind | None = None) -> None:
        super().__init__(message)
        self.kind = kind


class Short(Exception):
    """A read went past the bytes at hand: a streamed prefix or a truncated file."""


@dataclass
class AV:
    """What a video or audio parser learnt; fields stay zero when their header is not
    within the bytes at hand."""

    format: str
    kind: MediaKind | None  # None: a container with no stream we support (e.g. Ogg Speex)
    width: int = 0
    height: int = 0
    duration: float = 0.0
    fps: float = 0.0
    frames: int = 0
    sample_rate: int = 0
    bit_rate: int = 0


# A parser gets the bytes at hand and the file's full length (None: a prefix of unknown length).
Parser = Callable[[bytes, int | None], AV]


def uint(data: bytes, offset: int, size: int, order: ByteOrder = "big") -> int:
    return int.from_bytes(_field(data, offset, size), order)


def sint(data: bytes, offset: int, size: int, order: ByteOrder = "big") -> int:
    return int.from_bytes(_field(data, offset, size), order, signed=True)


def _field(data: bytes, offset: int, size: int) -> bytes:
    # Slicing alone would silently return fewer bytes; a short read must be noticed.
    if offset < 0 or offset + size > len(data):
        raise Short
    return data[offset : offset + size]
