"""Video and audio containers: which one the bytes are in, by signature, and what its
parser makes of them.

Parsed by hand (no FFmpeg in the service), best effort: the container is always
identified, the numbers are filled in when the headers that carry them are within the bytes
at hand. Parsers accept a prefix of a streamed upload plus its total size, so they never
assume they hold the whole file unless told so.
"""

from __future__ import annotations

from service.media.binary import AV, Corrupt, MediaKind, Parser, Short
from service.media.ebml import parse_ebml
from service.media.flv import parse_flv
from service.media.images import image_signature
from service.media.isobmff import IMAGE_BRANDS, parse_isobmff
from service.media.mpeg import adts_at, mp3_at, parse_plain_audio, parse_ps, parse_ts
from service.media.ogg import parse_ogg
from service.media.riff import parse_avi, parse_wav


def probe_av(data: bytes, total: int | None) -> AV | None:
    """Identify the container by its signature, then parse it. `total` is the file's full
    length, or None when only a prefix of unknown length is at hand."""
    found = _identify(data)
    if found is None:
        return None
    name, kind, parser = found
    try:
        return parser(data, total)
    except Short:
        raise Corrupt(f"{name} data ends before its headers are complete", kind) from None
    except Corrupt as exc:
        exc.kind = exc.kind or kind
        raise


def rejection(av: AV | None, data: bytes, wanted: MediaKind) -> str:
    """Why bytes that are not `wanted` media were refused (the start of a field message)."""
    if av is None:
        if image_signature(data):
            return f"is an image, not {wanted}"
        return f"is not in a recognised {wanted} format"
    if av.kind is None:
        return f"is in {av.format} format but has no supported video or audio stream"
    if av.kind != wanted:
        return f"is {av.kind} ({av.format}), not {wanted}"
    return f"is {av.kind} in {av.format} format, which is not supported"


def _identify(data: bytes) -> tuple[str, MediaKind, Parser] | None:
    head = data[:16]
    if head[4:8] == b"ftyp" or (head[4:8] in (b"moov", b"mdat", b"wide") and _uint0(data) >= 8):
        if head[8:12] in IMAGE_BRANDS:
            return None
        return "ISO BMFF", "video", parse_isobmff
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "EBML", "video", parse_ebml
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "WAV", "audio", parse_wav
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI", "video", parse_avi
    if len(data) >= 377 and data[0] == data[188] == data[376] == 0x47:
        return "MPEG-TS", "video", parse_ts
    if head.startswith(b"\x00\x00\x01\xba"):
        return "MPEG-PS", "video", parse_ps
    if head.startswith(b"FLV\x01"):
        return "FLV", "video", parse_flv
    if head.startswith(b"OggS"):
        return "Ogg", "video" if b"\x80theora" in data[:4096] else "audio", parse_ogg
    if head.startswith((b"ID3", b"fLaC")) or mp3_at(data, 0) or adts_at(data, 0):
        return "audio", "audio", parse_plain_audio
    return None


def _uint0(data: bytes) -> int:
    return int.from_bytes(data[:4], "big") if len(data) >= 4 else 0
