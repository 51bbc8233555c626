"""The media probes: what an upload is, read from its bytes without decoding untrusted
pixel or sample data, and refused with a field error when it is not what it claims.

`MediaProbes` implements the domain's `MediaProber` port; the functions are its parts,
public for callers (and tests) that want one kind of probe and its typed result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from service.domain.errors import InvalidArgument
from service.domain.models import MediaType
from service.media.av import probe_av, rejection
from service.media.binary import AV, Corrupt, MediaKind
from service.media.images import (
    IMAGE_FORMATS,
    MAX_IMAGE_PIXELS,
    ImageProbe,
    image_signature,
    probe_image,
)

__all__ = [
    "AUDIO_FORMATS",
    "IMAGE_FORMATS",
    "MAX_IMAGE_PIXELS",
    "VIDEO_FORMATS",
    "AudioProbe",
    "ImageProbe",
    "MediaKind",
    "MediaProbes",
    "TextProbe",
    "VideoProbe",
    "probe_audio",
    "probe_image",
    "probe_media",
    "probe_text",
    "probe_video",
    "sniff_media_type",
]

_VIDEO_CONTENT_TYPES = {
    "MP4": "video/mp4",
    "MOV": "video/quicktime",
    "3GP": "video/3gpp",
    "WEBM": "video/webm",
    "MATROSKA": "video/x-matroska",
    "AVI": "video/x-msvideo",
    "MPEG-TS": "video/mp2t",
    "MPEG-PS": "video/mpeg",
    "FLV": "video/x-flv",
    "OGG": "video/ogg",
}
_AUDIO_CONTENT_TYPES = {
    "WAV": "audio/wav",
    "MP3": "audio/mpeg",
    "FLAC": "audio/flac",
    "OGG": "audio/ogg",
    # RFC 7845: Opus in Ogg is audio/ogg; audio/opus names the RTP payload format.
    "OPUS": "audio/ogg",
    "M4A": "audio/mp4",
    "AAC": "audio/aac",
}
VIDEO_FORMATS = tuple(_VIDEO_CONTENT_TYPES)
AUDIO_FORMATS = tuple(_AUDIO_CONTENT_TYPES)


@dataclass(frozen=True)
class _TimedProbe:
    """What video and audio share: a container format and a duration (0 when unknown)."""

    format: str
    content_type: str
    duration_seconds: float = 0.0


@dataclass(frozen=True)
class VideoProbe(_TimedProbe):
    width: int = 0
    height: int = 0
    fps: float = 0.0
    frame_count: int = 0


@dataclass(frozen=True)
class AudioProbe(_TimedProbe):
    sample_rate: int = 0
    bit_rate: int = 0


@dataclass(frozen=True)
class TextProbe:
    char_count: int
    encoding: str = "UTF-8"
    content_type: ClassVar[str] = "text/plain; charset=utf-8"


class MediaProbes:
    """The media probes as the domain's MediaProber port."""

    def probe(
        self, media_type: MediaType, data: bytes, field: str, total_size: int | None = None
    ) -> tuple[str, dict[str, Any]]:
        return probe_media(media_type, data, field, total_size)


def probe_media(
    media_type: MediaType, data: bytes, field: str, total_size: int | None = None
) -> tuple[str, dict[str, Any]]:
    """Content type and media info of bytes, read from their headers only. For video and
    audio, `data` may be the first bytes of media `total_size` long."""
    probe, info_fields = _PROBES[media_type]
    result = probe(data, field, total_size)
    return result.content_type, {name: getattr(result, name) for name in info_fields}


# --- text -----------------------------------------------------------------------------------


def probe_text(data: bytes, field: str) -> TextProbe:
    """Strict UTF-8 without NUL characters (NUL truncates text in C-based tooling)."""
    nul = data.find(b"\x00")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not 0 <= nul < exc.start:
            raise InvalidArgument.field(
                field,
                f"is not valid UTF-8: {exc.reason} at byte offset {exc.start}",
                reason="INVALID_TEXT",
            ) from None
        text = ""
    if nul >= 0:
        raise InvalidArgument.field(
            field, f"contains a NUL character at byte offset {nul}", reason="INVALID_TEXT"
        )
    # A byte-order mark is an encoding signature, not content.
    return TextProbe(len(text) - (1 if text.startswith("\ufeff") else 0))


# --- sniffing -------------------------------------------------------------------------------


def sniff_media_type(head: bytes) -> MediaKind | None:
    """Which probe applies to an upload, from its first bytes (a few KiB are enough for
    all formats but ISO BMFF audio, which needs its `moov` box or an M4A brand)."""
    if image_signature(head):
        return "image"
    try:
        av = probe_av(head, None)
    except Corrupt as exc:
        return exc.kind
    if av is not None and (_is(av, _VIDEO) or _is(av, _AUDIO)):
        return av.kind
    return None


# --- video and audio ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Wanted:
    """What a video or audio probe accepts, and how its refusals read."""

    kind: MediaKind
    content_types: dict[str, str]  # by format, for every format accepted
    corrupt: str
    reason: str


_VIDEO = _Wanted("video", _VIDEO_CONTENT_TYPES, "is a corrupt video", "INVALID_VIDEO")
_AUDIO = _Wanted("audio", _AUDIO_CONTENT_TYPES, "is corrupt audio", "INVALID_AUDIO")


def probe_video(data: bytes, field: str, total_size: int | None = None) -> VideoProbe:
    """Container format and, when its headers are within `data`, size, duration and rate.

    `data` may be the first bytes of a streamed upload whose length is `total_size`.
    """
    av = _probe_wanted(_VIDEO, data, field, total_size)
    return VideoProbe(
        *_timed(av, _VIDEO),
        width=_count(av.width),
        height=_count(av.height),
        fps=_seconds(av.fps),
        frame_count=_count(av.frames),
    )


def probe_audio(data: bytes, field: str, total_size: int | None = None) -> AudioProbe:
    """Container format and, when its headers are within `data`, sample rate, duration and
    bit rate. `data` may be the first bytes of a streamed upload whose length is
    `total_size`."""
    av = _probe_wanted(_AUDIO, data, field, total_size)
    return AudioProbe(
        *_timed(av, _AUDIO), sample_rate=_count(av.sample_rate), bit_rate=_count(av.bit_rate)
    )


def _timed(av: AV, wanted: _Wanted) -> tuple[str, str, float]:
    """The fields of _TimedProbe, in order."""
    return av.format, wanted.content_types[av.format], _seconds(av.duration)


def _probe_wanted(wanted: _Wanted, data: bytes, field: str, total_size: int | None) -> AV:
    total = len(data) if total_size is None else max(total_size, len(data))
    try:
        av = probe_av(data, total)
    except Corrupt as exc:
        raise InvalidArgument.field(
            field, f"{wanted.corrupt}: {exc}", reason=wanted.reason
        ) from None
    if av is None or not _is(av, wanted):
        allowed = ", ".join(wanted.content_types)
        raise InvalidArgument.field(
            field,
            f"{rejection(av, data, wanted.kind)}; allowed formats: {allowed}",
            reason=wanted.reason,
        )
    return av


def _is(av: AV, wanted: _Wanted) -> bool:
    return av.kind == wanted.kind and av.format in wanted.content_types


def _seconds(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 0.0


def _count(value: int) -> int:
    return min(max(value, 0), 2**63 - 1)


class _Probe(Protocol):
    @property
    def content_type(self) -> str: ...


# Per media type: its probe, and which of the result's fields make the input's media info
# (in the order the info has always listed them).
_PROBES: dict[MediaType, tuple[Callable[[bytes, str, int | None], _Probe], tuple[str, ...]]] = {
    MediaType.IMAGE: (
        lambda data, field, _: probe_image(data, field),
        ("width", "height", "format", "color_mode"),
    ),
    MediaType.VIDEO: (
        probe_video,
        ("format", "width", "height", "fps", "frame_count", "duration_seconds"),
    ),
    MediaType.AUDIO: (probe_audio, ("format", "sample_rate", "duration_seconds", "bit_rate")),
    MediaType.TEXT: (lambda data, field, _: probe_text(data, field), ("char_count", "encoding")),
}
