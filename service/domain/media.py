"""Reading what media are from their bytes, without decoding untrusted pixel or sample data.

Every probe looks only at container headers. Images are opened lazily by Pillow and their
container structure is checked so that a truncated upload is refused at upload time rather
than failing later in a training job. Video and audio are parsed by hand (no FFmpeg in the
service), best effort: the container is always identified, the numbers are filled in when
the headers that carry them are within the bytes at hand. The AV probes accept a prefix of
a streamed upload plus its total size, so their parsers never assume they hold the whole
file unless told so.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from service.domain.errors import InvalidArgument

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
VIDEO_FORMATS = ("MP4", "MOV", "3GP", "WEBM", "MATROSKA", "AVI", "MPEG-TS", "MPEG-PS", "FLV", "OGG")
AUDIO_FORMATS = ("WAV", "MP3", "FLAC", "OGG", "OPUS", "M4A", "AAC")
MAX_IMAGE_PIXELS = 85_000_000
_CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
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

MediaKind = Literal["image", "video", "audio"]


@dataclass(frozen=True)
class ImageProbe:
    width: int
    height: int
    format: str
    color_mode: str
    content_type: str


@dataclass(frozen=True)
class VideoProbe:
    format: str
    content_type: str
    width: int = 0
    height: int = 0
    duration_seconds: float = 0.0
    fps: float = 0.0
    frame_count: int = 0


@dataclass(frozen=True)
class AudioProbe:
    format: str
    content_type: str
    sample_rate: int = 0
    duration_seconds: float = 0.0
    bit_rate: int = 0


@dataclass(frozen=True)
class TextProbe:
    char_count: int
    encoding: str = "UTF-8"


# --- images ---------------------------------------------------------------------------------


def probe_image(data: bytes, field: str) -> ImageProbe:
    """Width, height and format from the header (Pillow opens lazily), plus a structural
    check that the file is complete, all without decoding pixel data."""
    allowed = ", ".join(IMAGE_FORMATS)
    problem: tuple[str, str] | None = None
    try:
        _precheck_image(data)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow warns about damage it skips over; what matters is reported below.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
                fmt = image.format or ""
                mode = image.mode
                if width <= 0 or height <= 0 or width * height > MAX_IMAGE_PIXELS:
                    problem = (
                        f"image is {width}x{height}; at most {MAX_IMAGE_PIXELS:,} pixels "
                        "are allowed",
                        "IMAGE_TOO_LARGE",
                    )
                else:
                    _check_image_structure(data, fmt, image)
    except UnidentifiedImageError:
        problem = (f"is not a readable image; allowed formats: {allowed}", "INVALID_IMAGE")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow refuses from the header alone, before allocating anything; its own limit
        # is above ours, so anything it refuses is over ours too.
        problem = (
            f"image has more than {MAX_IMAGE_PIXELS:,} pixels, the most allowed",
            "IMAGE_TOO_LARGE",
        )
    except _Corrupt as exc:
        problem = (f"is a corrupt image: {exc}", "INVALID_IMAGE")
    except _Short:
        problem = ("is a corrupt image: its header is cut off", "INVALID_IMAGE")
    except Exception as exc:
        # Pillow's plugins report malformed input through many exception types (OSError,
        # SyntaxError, struct.error, IndexError, ...); for untrusted bytes all mean the same.
        problem = (f"is a corrupt image ({exc})", "INVALID_IMAGE")
    if problem is not None:
        description, reason = problem
        raise InvalidArgument.field(field, description, reason=reason)
    return ImageProbe(width, height, fmt, mode, _CONTENT_TYPES.get(fmt, "application/octet-stream"))


def _precheck_image(data: bytes) -> None:
    """Checks that need only the raw bytes, run before Pillow so that a truncated file gets
    our explanation rather than a decoder library's (libwebp reports only "could not create
    decoder object")."""
    if data[:3] == b"\xff\xd8\xff":
        _check_jpeg(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        _check_webp(data)


def _check_image_structure(data: bytes, fmt: str, image: Image.Image) -> None:
    if fmt == "PNG":
        _check_png(data)
    elif fmt == "GIF":
        _check_gif(data)
    elif fmt == "BMP":
        _check_bmp(data)
    elif fmt == "TIFF":
        _check_tiff(data, image)


def _end_without_zero_padding(data: bytes, what: str) -> int:
    # Some writers pad files to a block size with zeros; look only at a bounded tail so an
    # all-zero upload cannot make this copy the whole buffer.
    tail_start = max(0, len(data) - 65536)
    tail = data[tail_start:].rstrip(b"\x00")
    if not tail and tail_start > 0:
        raise _Corrupt(f"{what} data ends with more than 64 KiB of zero bytes")
    return tail_start + len(tail)


def _check_jpeg(data: bytes) -> None:
    # Pillow has already parsed every segment up to the first scan; a cut in the entropy
    # coded data shows only as a missing end-of-image marker.
    end = _end_without_zero_padding(data, "JPEG")
    if data[end - 2 : end] != b"\xff\xd9":
        raise _Corrupt(
            "JPEG data does not end with the end-of-image marker FF D9 (the file is truncated)"
        )


def _check_png(data: bytes) -> None:
    pos = 8
    view = memoryview(data)
    while True:
        if pos + 8 > len(data):
            raise _Corrupt(f"PNG data ends at byte {len(data)} before the IEND chunk (truncated)")
        length = _uint(data, pos, 4)
        name = data[pos + 4 : pos + 8].decode("latin-1")
        if length > 0x7FFFFFFF:
            raise _Corrupt(f"PNG chunk {name!r} at byte {pos} has an invalid length")
        end = pos + 12 + length
        if end > len(data):
            raise _Corrupt(
                f"PNG chunk {name!r} at byte {pos} runs past the end of the data (truncated)"
            )
        if zlib.crc32(view[pos + 4 : end - 4]) != _uint(data, end - 4, 4):
            raise _Corrupt(f"PNG chunk {name!r} at byte {pos} has a bad CRC")
        if name == "IEND":
            return
        pos = end


def _check_gif(data: bytes) -> None:
    # Walk the block structure instead of only testing the last byte: a cut that happens to
    # leave 0x3B last would otherwise pass one time in 256.
    size = len(data)
    pos = 13
    flags = _uint(data, 10, 1)
    if flags & 0x80:
        pos += 3 << ((flags & 7) + 1)
    while pos < size:
        block = data[pos]
        if block == 0x3B:
            end = _end_without_zero_padding(data, "GIF")
            if end != pos + 1:
                raise _Corrupt(f"GIF data continues after the trailer at byte {pos}")
            return
        if block == 0x21:  # extension: label, then sub-blocks
            pos += 2
        elif block == 0x2C:  # image descriptor, optional local colour table, LZW code size
            if pos + 10 > size:
                break
            local = data[pos + 9]
            pos += 10
            if local & 0x80:
                pos += 3 << ((local & 7) + 1)
            pos += 1
        else:
            raise _Corrupt(f"GIF data has an unknown block type 0x{block:02X} at byte {pos}")
        while pos < size:
            length = data[pos]
            pos += 1 + length
            if length == 0:
                break
        else:
            break
    raise _Corrupt("GIF data ends before the trailer byte 0x3B (the file is truncated)")


def _check_webp(data: bytes) -> None:
    declared = _uint(data, 4, 4, "little") + 8
    if declared > len(data):
        raise _Corrupt(
            f"WEBP RIFF header declares {declared} bytes but the data has {len(data)} "
            "(the file is truncated)"
        )
    if declared < _end_without_zero_padding(data, "WEBP"):
        raise _Corrupt(
            f"WEBP RIFF header declares {declared} bytes but the data has {len(data)} "
            "(extra bytes after the image)"
        )
    pos = 12
    while pos < declared:
        if pos + 8 > declared:
            raise _Corrupt(f"WEBP chunk header at byte {pos} is cut off")
        size = _uint(data, pos + 4, 4, "little")
        # The pad byte of an odd-sized last chunk is often omitted; decoders accept that.
        if pos + 8 + size > declared:
            name = data[pos : pos + 4].decode("latin-1")
            raise _Corrupt(f"WEBP chunk {name!r} at byte {pos} runs past the RIFF container")
        pos += 8 + size + (size & 1)


def _check_bmp(data: bytes) -> None:
    file_size = _uint(data, 2, 4, "little")
    offset = _uint(data, 10, 4, "little")
    if file_size > len(data):
        raise _Corrupt(
            f"BMP header declares {file_size} bytes but the data has {len(data)} "
            "(the file is truncated)"
        )
    if not 14 < offset < len(data):
        raise _Corrupt(f"BMP pixel data offset {offset} lies outside the file")
    header_size = _uint(data, 14, 4, "little")
    if header_size == 12:
        width = _uint(data, 18, 2, "little")
        height = _uint(data, 20, 2, "little")
        bits = _uint(data, 24, 2, "little")
        compression = 0
    else:
        width = _sint(data, 18, 4, "little")
        height = _sint(data, 22, 4, "little")
        bits = _uint(data, 28, 2, "little")
        compression = _uint(data, 30, 4, "little")
    # Only uncompressed layouts have a size known from the header (RLE streams do not).
    if compression in (0, 3, 6):
        needed = offset + (abs(width) * bits + 31) // 32 * 4 * abs(height)
        if needed > len(data):
            raise _Corrupt(
                f"BMP pixel data needs {needed} bytes but the data has {len(data)} "
                "(the file is truncated)"
            )


_TIFF_MAX_PAGES = 1024


def _check_tiff(data: bytes, image: Image.Image) -> None:
    for page in range(_TIFF_MAX_PAGES):
        if page:
            try:
                image.seek(page)
            except EOFError:
                return
        tags: Any = getattr(image, "tag_v2", {})
        kind = "strip"
        offsets = _tiff_ints(tags.get(273))
        counts = _tiff_ints(tags.get(279))
        if not offsets:
            kind = "tile"
            offsets = _tiff_ints(tags.get(324))
            counts = _tiff_ints(tags.get(325))
        if not offsets:
            raise _Corrupt(f"TIFF page {page} has no strip or tile offsets")
        if counts and len(counts) != len(offsets):
            raise _Corrupt(
                f"TIFF page {page} has {len(offsets)} {kind} offsets but {len(counts)} byte counts"
            )
        for index, start in enumerate(offsets):
            end = start + (counts[index] if counts else 1)
            if end > len(data):
                raise _Corrupt(
                    f"TIFF page {page} {kind} {index} (bytes {start}..{end}) lies beyond the "
                    f"end of the data at {len(data)} (the file is truncated)"
                )


def _tiff_ints(value: object) -> tuple[int, ...]:
    values = value if isinstance(value, tuple) else () if value is None else (value,)
    if not all(isinstance(v, int) and v >= 0 for v in values):
        raise _Corrupt("TIFF strip or tile tags hold values that are not offsets")
    return tuple(int(v) for v in values)


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
    if _image_signature(head):
        return "image"
    try:
        av = _probe_av(head, None)
    except _Corrupt as exc:
        return exc.kind
    if av is None:
        return None
    if av.kind == "video" and av.format in VIDEO_FORMATS:
        return "video"
    if av.kind == "audio" and av.format in AUDIO_FORMATS:
        return "audio"
    return None


def _image_signature(head: bytes) -> bool:
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")):
        return True
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    # "BM" alone is too weak a signature; also require a known DIB header size.
    return head[:2] == b"BM" and head[14:18] in {
        n.to_bytes(4, "little") for n in (12, 40, 52, 56, 64, 108, 124)
    }


# --- video and audio ------------------------------------------------------------------------


def probe_video(data: bytes, field: str, total_size: int | None = None) -> VideoProbe:
    """Container format and, when its headers are within `data`, size, duration and rate.

    `data` may be the first bytes of a streamed upload whose length is `total_size`.
    """
    allowed = ", ".join(VIDEO_FORMATS)
    try:
        av = _probe_av(data, _total(data, total_size))
    except _Corrupt as exc:
        raise InvalidArgument.field(
            field, f"is a corrupt video: {exc}", reason="INVALID_VIDEO"
        ) from None
    if av is None or av.kind != "video" or av.format not in VIDEO_FORMATS:
        raise InvalidArgument.field(
            field,
            f"{_rejection(av, data, 'video')}; allowed formats: {allowed}",
            reason="INVALID_VIDEO",
        )
    return VideoProbe(
        format=av.format,
        content_type=_VIDEO_CONTENT_TYPES[av.format],
        width=_count(av.width),
        height=_count(av.height),
        duration_seconds=_seconds(av.duration),
        fps=_seconds(av.fps),
        frame_count=_count(av.frames),
    )


def probe_audio(data: bytes, field: str, total_size: int | None = None) -> AudioProbe:
    """Container format and, when its headers are within `data`, sample rate, duration and
    bit rate. `data` may be the first bytes of a streamed upload whose length is
    `total_size`."""
    allowed = ", ".join(AUDIO_FORMATS)
    try:
        av = _probe_av(data, _total(data, total_size))
    except _Corrupt as exc:
        raise InvalidArgument.field(
            field, f"is corrupt audio: {exc}", reason="INVALID_AUDIO"
        ) from None
    if av is None or av.kind != "audio" or av.format not in AUDIO_FORMATS:
        raise InvalidArgument.field(
            field,
            f"{_rejection(av, data, 'audio')}; allowed formats: {allowed}",
            reason="INVALID_AUDIO",
        )
    return AudioProbe(
        format=av.format,
        content_type=_AUDIO_CONTENT_TYPES[av.format],
        sample_rate=_count(av.sample_rate),
        duration_seconds=_seconds(av.duration),
        bit_rate=_count(av.bit_rate),
    )


def _total(data: bytes, total_size: int | None) -> int:
    return len(data) if total_size is None else max(total_size, len(data))


def _rejection(av: _AV | None, data: bytes, wanted: MediaKind) -> str:
    if av is None:
        if _image_signature(data):
            return f"is an image, not {wanted}"
        return f"is not in a recognised {wanted} format"
    if av.kind is None:
        return f"is in {av.format} format but has no supported video or audio stream"
    if av.kind != wanted:
        return f"is {av.kind} ({av.format}), not {wanted}"
    return f"is {av.kind} in {av.format} format, which is not supported"


def _seconds(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 0.0


def _count(value: int) -> int:
    return min(max(value, 0), 2**63 - 1)


class _Corrupt(Exception):
    """The bytes carry a known format's signature but break its rules."""

    def __init__(self, message: str, kind: MediaKind | None = None) -> None:
        super().__init__(message)
        self.kind = kind


class _Short(Exception):
    """A read went past the bytes at hand: a streamed prefix or a truncated file."""


@dataclass
class _AV:
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


_Parser = Callable[[bytes, int | None], _AV]


def _probe_av(data: bytes, total: int | None) -> _AV | None:
    """Identify the container by its signature, then parse it. `total` is the file's full
    length, or None when only a prefix of unknown length is at hand."""
    found = _identify(data)
    if found is None:
        return None
    name, kind, parser = found
    try:
        return parser(data, total)
    except _Short:
        raise _Corrupt(f"{name} data ends before its headers are complete", kind) from None
    except _Corrupt as exc:
        exc.kind = exc.kind or kind
        raise


def _identify(data: bytes) -> tuple[str, MediaKind, _Parser] | None:
    head = data[:16]
    if head[4:8] == b"ftyp" or (head[4:8] in (b"moov", b"mdat", b"wide") and _uint0(data) >= 8):
        if head[8:12] in _IMAGE_BRANDS:
            return None
        return "ISO BMFF", "video", _parse_isobmff
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "EBML", "video", _parse_ebml
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "WAV", "audio", _parse_wav
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI", "video", _parse_avi
    if len(data) >= 377 and data[0] == data[188] == data[376] == 0x47:
        return "MPEG-TS", "video", _parse_ts
    if head.startswith(b"\x00\x00\x01\xba"):
        return "MPEG-PS", "video", _parse_ps
    if head.startswith(b"FLV\x01"):
        return "FLV", "video", _parse_flv
    if head.startswith(b"OggS"):
        return "Ogg", "video" if b"\x80theora" in data[:4096] else "audio", _parse_ogg
    if head.startswith((b"ID3", b"fLaC")) or _mp3_at(data, 0) or _adts_at(data, 0):
        return "audio", "audio", _parse_plain_audio
    return None


def _uint0(data: bytes) -> int:
    return int.from_bytes(data[:4], "big") if len(data) >= 4 else 0


# ISO BMFF: MP4, MOV, 3GP, M4A


_IMAGE_BRANDS = frozenset({b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis", b"crx "})
_AUDIO_BRANDS = frozenset({b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "})
_ALL_ONES = frozenset({0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF})


@dataclass
class _Track:
    handler: bytes = b""
    width: int = 0
    height: int = 0
    timescale: int = 0
    duration: int = 0
    samples: int = 0
    sample_rate: int = 0


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of each box in data[start:end]. Box ends may lie
    beyond the bytes at hand; reading a header that does raises _Short."""
    pos = start
    while pos + 8 <= end:
        size = _uint(data, pos, 4)
        kind = data[pos + 4 : pos + 8]
        header = 8
        if size == 1:
            size = _uint(data, pos + 8, 8)
            header = 16
        elif size == 0:
            size = end - pos
        if size < header:
            raise _Corrupt(f"box {kind!r} at byte {pos} has an invalid size {size}")
        yield kind, pos + header, pos + size
        pos += size


def _child(data: bytes, start: int, end: int, *path: bytes) -> tuple[int, int] | None:
    for kind, payload, box_end in _boxes(data, start, end):
        if kind == path[0]:
            if box_end > end:
                raise _Corrupt(f"box {kind!r} at byte {payload} overruns its parent")
            if len(path) == 1:
                return payload, box_end
            return _child(data, payload, box_end, *path[1:])
    return None


def _parse_isobmff(data: bytes, total: int | None) -> _AV:
    brand = data[8:12] if data[4:8] == b"ftyp" else b"qt  "
    if data[4:8] == b"ftyp" and _uint(data, 0, 4) not in (0, 1) and _uint(data, 0, 4) < 16:
        raise _Corrupt("ftyp box is shorter than its 16-byte minimum")
    tracks: list[_Track] = []
    duration = 0.0
    try:
        for kind, payload, box_end in _boxes(data, 0, total if total is not None else 2**64):
            if kind == b"moov":
                # The moov box is often at the end of the file; a streamed prefix then
                # identifies the container but cannot give its numbers.
                if box_end <= len(data):
                    duration, tracks = _parse_moov(data, payload, box_end)
                break
    except _Short:
        pass
    video = [t for t in tracks if t.handler == b"vide"]
    audio = [t for t in tracks if t.handler == b"soun"]
    if tracks:
        is_video = bool(video) or (not audio and any(t.width for t in tracks))
        is_audio = not is_video and bool(audio)
    else:
        is_audio = brand in _AUDIO_BRANDS
        is_video = not is_audio
    if is_audio:
        av = _AV("M4A", "audio", duration=duration)
        if audio:
            av.sample_rate = audio[0].sample_rate or audio[0].timescale
        if total is not None and duration > 0:
            av.bit_rate = round(total * 8 / duration)
        return av
    fmt = "MOV" if brand == b"qt  " else "3GP" if brand.startswith(b"3g") else "MP4"
    av = _AV(fmt, "video" if is_video else None, duration=duration)
    track = video[0] if video else next((t for t in tracks if t.width), None)
    if track is not None:
        av.width, av.height, av.frames = track.width, track.height, track.samples
        if track.timescale and track.duration and track.samples:
            av.fps = track.samples * track.timescale / track.duration
    return av


def _parse_moov(data: bytes, start: int, end: int) -> tuple[float, list[_Track]]:
    duration = 0.0
    tracks: list[_Track] = []
    for kind, payload, box_end in _boxes(data, start, end):
        if box_end > end:
            raise _Corrupt(f"box {kind!r} at byte {payload} overruns the moov box")
        if kind == b"mvhd":
            timescale, length = _media_times(data, payload, box_end)
            if timescale and length not in _ALL_ONES:
                duration = length / timescale
        elif kind == b"trak":
            tracks.append(_parse_trak(data, payload, box_end))
    return duration, tracks


def _media_times(data: bytes, start: int, end: int) -> tuple[int, int]:
    """(timescale, duration) of an mvhd or mdhd full box."""
    if _uint(data, start, 1) == 1:
        if start + 32 > end:
            return 0, 0
        return _uint(data, start + 20, 4), _uint(data, start + 24, 8)
    if start + 20 > end:
        return 0, 0
    return _uint(data, start + 12, 4), _uint(data, start + 16, 4)


def _parse_trak(data: bytes, start: int, end: int) -> _Track:
    track = _Track()
    tkhd = _child(data, start, end, b"tkhd")
    if tkhd is not None:
        # Width and height follow the version-dependent times, 16 reserved/layer/volume
        # bytes and the 36-byte matrix; they are 16.16 fixed point.
        offset = tkhd[0] + (88 if _uint(data, tkhd[0], 1) == 1 else 76)
        if offset + 8 <= tkhd[1]:
            track.width = _uint(data, offset, 4) >> 16
            track.height = _uint(data, offset + 4, 4) >> 16
    mdia = _child(data, start, end, b"mdia")
    if mdia is None:
        return track
    hdlr = _child(data, *mdia, b"hdlr")
    if hdlr is not None and hdlr[0] + 12 <= hdlr[1]:
        track.handler = data[hdlr[0] + 8 : hdlr[0] + 12]
    mdhd = _child(data, *mdia, b"mdhd")
    if mdhd is not None:
        track.timescale, track.duration = _media_times(data, *mdhd)
        if track.duration in _ALL_ONES:
            track.duration = 0
    stbl = _child(data, *mdia, b"minf", b"stbl")
    if stbl is None:
        return track
    stts = _child(data, *stbl, b"stts")
    if stts is not None:
        entries = min(_uint(data, stts[0] + 4, 4), (stts[1] - stts[0] - 8) // 8)
        base = stts[0] + 8
        track.samples = sum(_uint(data, base + 8 * i, 4) for i in range(max(entries, 0)))
    stsd = _child(data, *stbl, b"stsd")
    if stsd is not None and track.handler == b"soun" and stsd[0] + 44 <= stsd[1]:
        # First sample entry: 8-byte box header, 8 bytes of SampleEntry, 16 bytes of
        # AudioSampleEntry fields, then the 16.16 sample rate.
        track.sample_rate = _uint(data, stsd[0] + 8 + 32, 4) >> 16
    return track


# Matroska and WebM

_EBML_DOCTYPE = 0x4282
_SEGMENT = 0x18538067
_INFO = 0x1549A966
_TRACKS = 0x1654AE6B
_CLUSTER = 0x1F43B675


def _vint(data: bytes, pos: int) -> tuple[int, int, int]:
    """(raw value with marker, value without marker, length) of an EBML varint."""
    first = _uint(data, pos, 1)
    if first == 0:
        raise _Corrupt(f"invalid EBML variable-length number at byte {pos}")
    length = 9 - first.bit_length()
    raw = _uint(data, pos, length)
    return raw, raw & ((1 << (7 * length)) - 1), length


def _elements(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int | None]]:
    """(id, payload start, payload end or None for unknown size) in data[start:end]."""
    pos = start
    while pos < end:
        element_id, _, id_length = _vint(data, pos)
        _, size, size_length = _vint(data, pos + id_length)
        payload = pos + id_length + size_length
        if size == (1 << (7 * size_length)) - 1:
            yield element_id, payload, None
            return
        yield element_id, payload, payload + size
        pos = payload + size


def _ebml_payload(data: bytes, start: int, end: int | None) -> bytes:
    if end is None or end > len(data):
        raise _Short
    return data[start:end]


def _ebml_uint(payload: bytes) -> int:
    # The format allows at most 8 bytes; longer payloads would make unbounded integers.
    if len(payload) > 8:
        raise _Corrupt("EBML integer element is longer than 8 bytes")
    return int.from_bytes(payload, "big")


def _ebml_float(payload: bytes) -> float:
    if len(payload) == 4:
        return float(struct.unpack(">f", payload)[0])
    if len(payload) == 8:
        return float(struct.unpack(">d", payload)[0])
    return 0.0


def _parse_ebml(data: bytes, total: int | None) -> _AV:
    _, _, id_length = _vint(data, 0)
    _, header_size, size_length = _vint(data, id_length)
    header_end = id_length + size_length + header_size
    doctype = ""
    for element_id, start, end in _elements(data, id_length + size_length, header_end):
        if element_id == _EBML_DOCTYPE:
            doctype = _ebml_payload(data, start, end).rstrip(b"\x00").decode("latin-1")
    if doctype not in ("webm", "matroska"):
        raise _Corrupt(f"EBML document type {doctype!r} is neither webm nor matroska")
    av = _AV("WEBM" if doctype == "webm" else "MATROSKA", "video")
    track_types: list[int] = []
    try:
        for element_id, start, end in _elements(data, header_end, len(data)):
            if element_id == _SEGMENT:
                _parse_segment(data, start, end, av, track_types)
                break
    except _Short:
        pass
    if track_types and 1 not in track_types:
        av.kind = "audio" if 2 in track_types else None
    return av


def _parse_segment(
    data: bytes, start: int, end: int | None, av: _AV, track_types: list[int]
) -> None:
    scale = 1_000_000
    duration = 0.0
    for element_id, child_start, child_end in _elements(data, start, end or len(data)):
        if element_id == _CLUSTER or child_end is None:
            break  # media data follows; the headers we use come before it
        if element_id == _INFO:
            for info_id, s, e in _elements(data, child_start, child_end):
                payload = _ebml_payload(data, s, e)
                if info_id == 0x2AD7B1:
                    scale = _ebml_uint(payload) or scale
                elif info_id == 0x4489:
                    duration = _ebml_float(payload)
            av.duration = duration * scale / 1e9
        elif element_id == _TRACKS:
            for entry_id, s, e in _elements(data, child_start, child_end):
                if entry_id == 0xAE:
                    track_types.append(_parse_track_entry(data, s, _ebml_end(e), av))


def _ebml_end(end: int | None) -> int:
    if end is None:
        raise _Short
    return end


def _parse_track_entry(data: bytes, start: int, end: int, av: _AV) -> int:
    track_type = 0
    default_duration = 0
    width = height = 0
    for element_id, s, e in _elements(data, start, end):
        payload = _ebml_payload(data, s, e)
        if element_id == 0x83:
            track_type = _ebml_uint(payload)
        elif element_id == 0x23E383:
            default_duration = _ebml_uint(payload)
        elif element_id == 0xE0:
            for video_id, vs, ve in _elements(data, s, _ebml_end(e)):
                if video_id == 0xB0:
                    width = _ebml_uint(_ebml_payload(data, vs, ve))
                elif video_id == 0xBA:
                    height = _ebml_uint(_ebml_payload(data, vs, ve))
        elif element_id == 0xE1:
            for audio_id, as_, ae in _elements(data, s, _ebml_end(e)):
                if audio_id == 0xB5 and not av.sample_rate:
                    rate = _ebml_float(_ebml_payload(data, as_, ae))
                    av.sample_rate = int(rate) if math.isfinite(rate) and 0 < rate < 2**31 else 0
    if track_type == 1 and not av.width:
        av.width, av.height = width, height
        if default_duration:
            av.fps = 1e9 / default_duration
    return track_type


# AVI, MPEG transport and program streams, FLV


def _riff_chunks(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    pos = start
    end = min(end, len(data))
    while pos + 8 <= end:
        size = _uint(data, pos + 4, 4, "little")
        yield data[pos : pos + 4], pos + 8, pos + 8 + size
        pos += 8 + size + (size & 1)


def _parse_avi(data: bytes, total: int | None) -> _AV:
    av = _AV("AVI", "video")
    stream_types: list[bytes] = []
    for chunk, start, end in _riff_chunks(data, 12, len(data)):
        if chunk != b"LIST":
            continue
        list_type = data[start : start + 4]
        if list_type == b"movi":
            break
        if list_type != b"hdrl":
            continue
        for sub, s, e in _riff_chunks(data, start + 4, end):
            if sub == b"avih" and s + 40 <= min(e, len(data)):
                per_frame = _uint(data, s, 4, "little")
                av.frames = _uint(data, s + 16, 4, "little")
                av.width = _uint(data, s + 32, 4, "little")
                av.height = _uint(data, s + 36, 4, "little")
                if per_frame:
                    av.fps = 1e6 / per_frame
            elif sub == b"LIST" and data[s : s + 4] == b"strl":
                strh = next((x for x in _riff_chunks(data, s + 4, e) if x[0] == b"strh"), None)
                if strh is None or strh[1] + 36 > len(data):
                    continue
                stream_types.append(data[strh[1] : strh[1] + 4])
                if stream_types[-1] == b"vids" and stream_types.count(b"vids") == 1:
                    scale = _uint(data, strh[1] + 20, 4, "little")
                    rate = _uint(data, strh[1] + 24, 4, "little")
                    if scale and rate:
                        av.fps = rate / scale
                        av.frames = _uint(data, strh[1] + 32, 4, "little") or av.frames
        break
    if av.fps and av.frames:
        av.duration = av.frames / av.fps
    if stream_types and b"vids" not in stream_types:
        av.kind = "audio" if b"auds" in stream_types else None
    return av


def _parse_ts(data: bytes, total: int | None) -> _AV:
    # Stream parameters sit in codec bitstreams inside PES packets; not worth parsing here.
    return _AV("MPEG-TS", "video")


_MPEG_FRAME_RATES = (0.0, 24000 / 1001, 24.0, 25.0, 30000 / 1001, 30.0, 50.0, 60000 / 1001, 60.0)


def _parse_ps(data: bytes, total: int | None) -> _AV:
    marker = _uint(data, 4, 1)
    if marker & 0xC0 != 0x40 and marker & 0xF0 != 0x20:
        raise _Corrupt("MPEG program stream pack header is neither MPEG-1 nor MPEG-2")
    av = _AV("MPEG-PS", "video")
    # The MPEG-1/2 video sequence header carries picture size and frame rate in the clear.
    pos = data.find(b"\x00\x00\x01\xb3", 0, 1 << 20)
    if pos >= 0 and pos + 8 <= len(data):
        av.width = (data[pos + 4] << 4) | (data[pos + 5] >> 4)
        av.height = ((data[pos + 5] & 0x0F) << 8) | data[pos + 6]
        code = data[pos + 7] & 0x0F
        av.fps = _MPEG_FRAME_RATES[code] if code < len(_MPEG_FRAME_RATES) else 0.0
    return av


def _parse_flv(data: bytes, total: int | None) -> _AV:
    flags = _uint(data, 4, 1)
    header_size = _uint(data, 5, 4)
    if header_size < 9:
        raise _Corrupt(f"FLV header size {header_size} is below the minimum of 9")
    # Flags say which streams exist; writers of live streams sometimes leave both unset.
    kind: MediaKind = "audio" if flags & 0x05 == 0x04 else "video"
    av = _AV("FLV", kind)
    tag = header_size + 4  # after PreviousTagSize0
    if _uint(data, tag, 1) == 18:  # script data: the onMetaData AMF0 object
        end = min(tag + 11 + _uint(data, tag + 1, 3), len(data))
        meta = _amf_numbers(data, tag + 11, end)
        av.duration = meta.get("duration", 0.0)
        av.fps = meta.get("framerate", 0.0)
        av.width = _float_int(meta.get("width", 0.0))
        av.height = _float_int(meta.get("height", 0.0))
        if av.duration > 0 and av.fps > 0:
            av.frames = _float_int(av.duration * av.fps)
    return av


def _amf_numbers(data: bytes, pos: int, end: int) -> dict[str, float]:
    """Number-valued entries of an AMF0 `onMetaData` object, up to the first value of a type
    we do not parse (those are nested objects that conventionally come last)."""
    numbers: dict[str, float] = {}
    if _uint(data, pos, 1) != 2:
        return numbers
    pos += 3 + _uint(data, pos + 1, 2)
    marker = _uint(data, pos, 1)
    if marker == 8:  # ECMA array: count, then like an object
        pos += 5
    elif marker == 3:
        pos += 1
    else:
        return numbers
    while pos + 3 <= end:
        key_length = _uint(data, pos, 2)
        key = data[pos + 2 : pos + 2 + key_length].decode("latin-1")
        pos += 2 + key_length
        value_type = _uint(data, pos, 1)
        pos += 1
        if value_type == 0:
            numbers[key] = (
                float(struct.unpack(">d", data[pos : pos + 8])[0]) if pos + 8 <= end else 0.0
            )
            pos += 8
        elif value_type == 1:
            pos += 1
        elif value_type == 2:
            pos += 2 + _uint(data, pos, 2)
        else:
            break
    return {k: v for k, v in numbers.items() if math.isfinite(v) and v >= 0}


def _float_int(value: float) -> int:
    return int(value) if math.isfinite(value) and 0 <= value < 2**62 else 0


# Ogg: Theora video, Vorbis and Opus audio


@dataclass
class _OggStream:
    serial: int
    codec: str
    rate: float = 0.0  # frames or samples per second
    granule_shift: int = 0
    pre_skip: int = 0
    nominal_bit_rate: int = 0
    width: int = 0
    height: int = 0


@dataclass
class _OggPage:
    flags: int
    granule: int
    serial: int
    body: int
    end: int
    lacing: bytes


def _ogg_page(data: bytes, pos: int) -> _OggPage:
    if data[pos : pos + 4] != b"OggS":
        raise _Corrupt(f"Ogg page at byte {pos} lacks the OggS capture pattern")
    if _uint(data, pos + 4, 1) != 0:
        raise _Corrupt(f"Ogg page at byte {pos} has an unknown version")
    segments = _uint(data, pos + 26, 1)
    lacing = data[pos + 27 : pos + 27 + segments]
    if len(lacing) < segments:
        raise _Short
    body = pos + 27 + segments
    return _OggPage(
        flags=data[pos + 5],
        granule=_uint(data, pos + 6, 8, "little"),
        serial=_uint(data, pos + 14, 4, "little"),
        body=body,
        end=body + sum(lacing),
        lacing=lacing,
    )


def _first_packet(data: bytes, page: _OggPage) -> bytes:
    length = 0
    for value in page.lacing:
        length += value
        if value < 255:
            break
    return data[page.body : page.body + length]


def _ogg_stream(serial: int, packet: bytes) -> _OggStream:
    if packet.startswith(b"\x80theora") and len(packet) >= 42:
        stream = _OggStream(serial, "theora")
        stream.width = _uint(packet, 14, 3)
        stream.height = _uint(packet, 17, 3)
        numerator, denominator = _uint(packet, 22, 4), _uint(packet, 26, 4)
        stream.rate = numerator / denominator if denominator else 0.0
        stream.granule_shift = (_uint(packet, 40, 2) >> 5) & 0x1F
        return stream
    if packet.startswith(b"\x01vorbis") and len(packet) >= 24:
        stream = _OggStream(serial, "vorbis", rate=_uint(packet, 12, 4, "little"))
        stream.nominal_bit_rate = max(_sint(packet, 20, 4, "little"), 0)
        return stream
    if packet.startswith(b"OpusHead") and len(packet) >= 19:
        # Opus always decodes at 48 kHz; the header's input rate is informational only.
        return _OggStream(serial, "opus", rate=48000, pre_skip=_uint(packet, 10, 2, "little"))
    return _OggStream(serial, "other")


def _parse_ogg(data: bytes, total: int | None) -> _AV:
    streams: list[_OggStream] = []
    pos = 0
    # Every logical stream starts with a beginning-of-stream page, all before other pages.
    while pos < len(data) and data[pos : pos + 4] == b"OggS":
        page = _ogg_page(data, pos)
        if not page.flags & 0x02:
            break
        streams.append(_ogg_stream(page.serial, _first_packet(data, page)))
        pos = page.end
    if not streams:
        raise _Corrupt("Ogg data does not begin with a beginning-of-stream page")
    codecs = {s.codec: s for s in streams}
    chosen = codecs.get("theora") or codecs.get("vorbis") or codecs.get("opus")
    if chosen is None:
        return _AV("OGG", None)
    if chosen.codec == "theora":
        av = _AV("OGG", "video", width=chosen.width, height=chosen.height, fps=chosen.rate)
    else:
        av = _AV("OPUS" if chosen.codec == "opus" else "OGG", "audio")
        av.sample_rate = int(chosen.rate)
    granule = _last_granule(data, chosen.serial) if total == len(data) else None
    if granule is not None and chosen.rate:
        if chosen.codec == "theora":
            mask = (1 << chosen.granule_shift) - 1
            av.frames = (granule >> chosen.granule_shift) + (granule & mask)
            av.duration = av.frames / chosen.rate
        else:
            av.duration = max(granule - chosen.pre_skip, 0) / chosen.rate
    if av.kind == "audio":
        av.bit_rate = chosen.nominal_bit_rate
        if not av.bit_rate and total is not None and av.duration > 0:
            av.bit_rate = round(total * 8 / av.duration)
    return av


def _last_granule(data: bytes, serial: int) -> int | None:
    # An Ogg page is at most 65,307 bytes, so the last page of the stream starts within
    # the last two page lengths unless other streams' pages are interleaved at the end.
    low = max(0, len(data) - 2 * 65307)
    pos = data.rfind(b"OggS", low)
    while pos >= 0:
        try:
            page = _ogg_page(data, pos)
        except (_Corrupt, _Short):
            page = None  # "OggS" inside a packet, or a page cut off at the end
        if page is not None and page.serial == serial and page.granule not in _ALL_ONES:
            return page.granule
        pos = data.rfind(b"OggS", low, pos)
    return None


# WAV


def _parse_wav(data: bytes, total: int | None) -> _AV:
    av = _AV("WAV", "audio")
    size = total if total is not None else len(data)
    byte_rate = 0
    seen_fmt = False
    rf64_data_size = 0
    for chunk, start, end in _riff_chunks(data, 12, len(data)):
        if chunk == b"ds64" and start + 24 <= len(data):
            rf64_data_size = _uint(data, start + 8, 8, "little")
        elif chunk == b"fmt ":
            if start + 16 > min(end, len(data)):
                raise _Corrupt("WAV fmt chunk is shorter than 16 bytes")
            channels = _uint(data, start + 2, 2, "little")
            av.sample_rate = _uint(data, start + 4, 4, "little")
            byte_rate = _uint(data, start + 8, 4, "little")
            block_align = _uint(data, start + 12, 2, "little")
            if not channels or not av.sample_rate:
                raise _Corrupt("WAV fmt chunk declares zero channels or a zero sample rate")
            byte_rate = byte_rate or block_align * av.sample_rate
            av.bit_rate = byte_rate * 8
            seen_fmt = True
        elif chunk == b"data":
            if not seen_fmt:
                raise _Corrupt("WAV data chunk comes before the fmt chunk")
            length = end - start
            if rf64_data_size and length == 0xFFFFFFFF:
                length = rf64_data_size
            # Streaming writers leave 0 or 0xFFFFFFFF as a placeholder; cut files overstate.
            if length in (0, 0xFFFFFFFF) or start + length > size:
                length = max(size - start, 0)
            if byte_rate:
                av.duration = length / byte_rate
            return av
    if not seen_fmt and total == len(data):
        raise _Corrupt("WAV data has no fmt chunk")
    return av


# MP3, AAC (ADTS) and FLAC, each possibly behind ID3v2 tags


_MP3_BIT_RATES = {
    3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_ADTS_SAMPLE_RATES = (
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
)  # fmt: skip
_SYNC_SEARCH = 64 * 1024
_ADTS_WALK_FRAMES = 4096


@dataclass(frozen=True)
class _Mp3Frame:
    version: int  # 3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5
    bit_rate: int
    sample_rate: int
    length: int
    samples: int
    mono: bool


def _mp3_frame(data: bytes, pos: int) -> _Mp3Frame | None:
    """The MPEG-1/2/2.5 Layer III frame header at `pos`, if one is there."""
    if pos < 0 or pos + 4 > len(data):
        return None
    header = _uint(data, pos, 4)
    version = (header >> 19) & 3
    layer = (header >> 17) & 3
    bit_index = (header >> 12) & 0xF
    rate_index = (header >> 10) & 3
    if header >> 21 != 0x7FF or version == 1 or layer != 1:
        return None
    if bit_index in (0, 15) or rate_index == 3:
        return None  # free-format or invalid; too rare to be worth a false positive
    bit_rate = _MP3_BIT_RATES[3 if version == 3 else 2][bit_index] * 1000
    sample_rate = _MP3_SAMPLE_RATES[version][rate_index]
    samples = 1152 if version == 3 else 576
    length = samples // 8 * bit_rate // sample_rate + ((header >> 9) & 1)
    return _Mp3Frame(version, bit_rate, sample_rate, length, samples, (header >> 6) & 3 == 3)


def _mp3_at(data: bytes, pos: int) -> bool:
    # Eleven sync bits occur by chance; a second header right after the first does not.
    frame = _mp3_frame(data, pos)
    if frame is None:
        return False
    following = pos + frame.length
    if following + 4 > len(data):
        return True
    after = _mp3_frame(data, following)
    return after is not None and after.sample_rate == frame.sample_rate


def _adts_frame(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """(sample rate, frame length, samples) of the ADTS header at `pos`, if one is there."""
    if pos < 0 or pos + 7 > len(data):
        return None
    b = data[pos : pos + 7]
    if b[0] != 0xFF or b[1] & 0xF6 != 0xF0:
        return None
    rate_index = (b[2] >> 2) & 0xF
    length = ((b[3] & 3) << 11) | (b[4] << 3) | (b[5] >> 5)
    if rate_index >= len(_ADTS_SAMPLE_RATES) or length < (7 if b[1] & 1 else 9):
        return None
    return _ADTS_SAMPLE_RATES[rate_index], length, 1024 * ((b[6] & 3) + 1)


def _adts_at(data: bytes, pos: int) -> bool:
    frame = _adts_frame(data, pos)
    if frame is None:
        return False
    following = pos + frame[1]
    if following + 7 > len(data):
        return True
    after = _adts_frame(data, following)
    return after is not None and after[0] == frame[0]


def _skip_id3(data: bytes) -> int:
    pos = 0
    while data[pos : pos + 3] == b"ID3":
        size_bytes = data[pos + 6 : pos + 10]
        if len(size_bytes) < 4:
            raise _Short
        if any(b & 0x80 for b in size_bytes):
            raise _Corrupt(f"ID3 tag at byte {pos} has an invalid size")
        size = (size_bytes[0] << 21) | (size_bytes[1] << 14) | (size_bytes[2] << 7) | size_bytes[3]
        footer = 10 if _uint(data, pos + 5, 1) & 0x10 else 0
        pos += 10 + size + footer
    return pos


def _parse_plain_audio(data: bytes, total: int | None) -> _AV:
    start = _skip_id3(data)
    if start + 16 > len(data) and total is not None and total > len(data):
        # Cover art can make the tag longer than a streamed prefix: ID3 says audio, and the
        # codec behind it cannot be seen yet.
        return _AV("MP3", "audio")
    if data[start : start + 4] == b"fLaC":
        return _parse_flac(data, start, total)
    if start and not (_mp3_at(data, start) or _adts_at(data, start)):
        # Some taggers leave padding between the tag and the first frame.
        for candidate in _sync_candidates(data, start):
            if _mp3_at(data, candidate) or _adts_at(data, candidate):
                start = candidate
                break
        else:
            raise _Corrupt("ID3 tag is not followed by MP3, AAC or FLAC audio")
    if _adts_at(data, start):
        return _parse_adts(data, start, total)
    return _parse_mp3(data, start, total)


def _sync_candidates(data: bytes, start: int) -> Iterator[int]:
    pos = data.find(b"\xff", start, start + _SYNC_SEARCH)
    while pos >= 0:
        yield pos
        pos = data.find(b"\xff", pos + 1, start + _SYNC_SEARCH)


def _parse_mp3(data: bytes, start: int, total: int | None) -> _AV:
    frame = _mp3_frame(data, start)
    if frame is None:
        raise _Corrupt(f"no MP3 frame header at byte {start}")
    av = _AV("MP3", "audio", sample_rate=frame.sample_rate, bit_rate=frame.bit_rate)
    # A VBR file announces its frame count in a Xing/Info or VBRI header inside the first
    # frame; without one the stream is constant bit rate and its size gives the duration.
    side_info = (
        (32 if not frame.mono else 17) if frame.version == 3 else (17 if not frame.mono else 9)
    )
    xing = start + 4 + side_info
    frames = stream_bytes = 0
    if data[xing : xing + 4] in (b"Xing", b"Info"):
        flags = _uint(data, xing + 4, 4)
        offset = xing + 8
        if flags & 1:
            frames = _uint(data, offset, 4)
            offset += 4
        if flags & 2:
            stream_bytes = _uint(data, offset, 4)
    elif data[start + 36 : start + 40] == b"VBRI":
        stream_bytes = _uint(data, start + 46, 4)
        frames = _uint(data, start + 50, 4)
    if frames:
        av.duration = frames * frame.samples / frame.sample_rate
        audio_bytes = stream_bytes or (total - start if total is not None else 0)
        if audio_bytes:
            av.bit_rate = round(audio_bytes * 8 / av.duration)
    elif total is not None:
        av.duration = (total - start) * 8 / frame.bit_rate
    return av


def _parse_adts(data: bytes, start: int, total: int | None) -> _AV:
    first = _adts_frame(data, start)
    if first is None:
        raise _Corrupt(f"no ADTS frame header at byte {start}")
    rate = first[0]
    av = _AV("AAC", "audio", sample_rate=rate)
    pos, samples, frames = start, 0, 0
    while frames < _ADTS_WALK_FRAMES:
        frame = _adts_frame(data, pos)
        if frame is None:
            break
        samples += frame[2]
        frames += 1
        pos += frame[1]
    walked = pos - start
    if total is None or not samples or not walked:
        return av
    if total == len(data) and pos >= len(data):
        av.duration = samples / rate
    else:
        # Estimate from the frames seen: their average size stands for the rest.
        av.duration = samples / rate * (total - start) / walked
    if av.duration > 0:
        av.bit_rate = round((total - start) * 8 / av.duration)
    return av


def _parse_flac(data: bytes, start: int, total: int | None) -> _AV:
    block = start + 4
    if _uint(data, block, 1) & 0x7F != 0 or _uint(data, block + 1, 3) != 34:
        raise _Corrupt("FLAC stream does not begin with a 34-byte STREAMINFO block")
    # After min/max block size (2+2) and min/max frame size (3+3): 20 bits sample rate,
    # 3 bits channels, 5 bits bits-per-sample, 36 bits total samples.
    packed = _uint(data, block + 4 + 10, 8)
    rate = packed >> 44
    total_samples = packed & ((1 << 36) - 1)
    if rate == 0:
        raise _Corrupt("FLAC STREAMINFO declares a sample rate of 0")
    av = _AV("FLAC", "audio", sample_rate=rate)
    if total_samples:
        av.duration = total_samples / rate
        if total is not None:
            av.bit_rate = round((total - start) * 8 / av.duration)
    return av


# --- bounded binary reads -------------------------------------------------------------------


def _uint(data: bytes, offset: int, size: int, order: Literal["big", "little"] = "big") -> int:
    if offset < 0 or offset + size > len(data):
        raise _Short
    return int.from_bytes(data[offset : offset + size], order)


def _sint(data: bytes, offset: int, size: int, order: Literal["big", "little"] = "big") -> int:
    if offset < 0 or offset + size > len(data):
        raise _Short
    return int.from_bytes(data[offset : offset + size], order, signed=True)
