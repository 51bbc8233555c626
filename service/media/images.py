"""Images: size and format from the header (Pillow opens lazily, never decoding pixel data),
and per-format structure checks so that a truncated upload is refused at upload time rather
than failing later in a training job."""

from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from service.domain import input_drafts
from service.domain.errors import InvalidArgument
from service.media.binary import Corrupt, Short, sint, uint

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# One limit for uploaded images and for the sizes callers declare for URL images.
MAX_IMAGE_PIXELS = input_drafts.MAX_IMAGE_PIXELS
_CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}


@dataclass(frozen=True)
class ImageProbe:
    width: int
    height: int
    format: str
    color_mode: str
    content_type: str


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
    except Corrupt as exc:
        problem = (f"is a corrupt image: {exc}", "INVALID_IMAGE")
    except Short:
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
        raise Corrupt(f"{what} data ends with more than 64 KiB of zero bytes")
    return tail_start + len(tail)


def _check_jpeg(data: bytes) -> None:
    # Pillow has already parsed every segment up to the first scan; a cut in the entropy
    # coded data shows only as a missing end-of-image marker.
    end = _end_without_zero_padding(data, "JPEG")
    if data[end - 2 : end] != b"\xff\xd9":
        raise Corrupt(
            "JPEG data does not end with the end-of-image marker FF D9 (the file is truncated)"
        )


def _check_png(data: bytes) -> None:
    pos = 8
    view = memoryview(data)
    while True:
        if pos + 8 > len(data):
            raise Corrupt(f"PNG data ends at byte {len(data)} before the IEND chunk (truncated)")
        length = uint(data, pos, 4)
        name = data[pos + 4 : pos + 8].decode("latin-1")
        if length > 0x7FFFFFFF:
            raise Corrupt(f"PNG chunk {name!r} at byte {pos} has an invalid length")
        end = pos + 12 + length
        if end > len(data):
            raise Corrupt(
                f"PNG chunk {name!r} at byte {pos} runs past the end of the data (truncated)"
            )
        if zlib.crc32(view[pos + 4 : end - 4]) != uint(data, end - 4, 4):
            raise Corrupt(f"PNG chunk {name!r} at byte {pos} has a bad CRC")
        if name == "IEND":
            return
        pos = end


def _check_gif(data: bytes) -> None:
    # Walk the block structure instead of only testing the last byte: a cut that happens to
    # leave 0x3B last would otherwise pass one time in 256.
    size = len(data)
    pos = 13
    flags = uint(data, 10, 1)
    if flags & 0x80:
        pos += 3 << ((flags & 7) + 1)
    while pos < size:
        block = data[pos]
        if block == 0x3B:
            end = _end_without_zero_padding(data, "GIF")
            if end != pos + 1:
                raise Corrupt(f"GIF data continues after the trailer at byte {pos}")
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
            raise Corrupt(f"GIF data has an unknown block type 0x{block:02X} at byte {pos}")
        while pos < size:
            length = data[pos]
            pos += 1 + length
            if length == 0:
                break
        else:
            break
    raise Corrupt("GIF data ends before the trailer byte 0x3B (the file is truncated)")


def _check_webp(data: bytes) -> None:
    declared = uint(data, 4, 4, "little") + 8
    if declared > len(data):
        raise Corrupt(
            f"WEBP RIFF header declares {declared} bytes but the data has {len(data)} "
            "(the file is truncated)"
        )
    if declared < _end_without_zero_padding(data, "WEBP"):
        raise Corrupt(
            f"WEBP RIFF header declares {declared} bytes but the data has {len(data)} "
            "(extra bytes after the image)"
        )
    pos = 12
    while pos < declared:
        if pos + 8 > declared:
            raise Corrupt(f"WEBP chunk header at byte {pos} is cut off")
        size = uint(data, pos + 4, 4, "little")
        # The pad byte of an odd-sized last chunk is often omitted; decoders accept that.
        if pos + 8 + size > declared:
            name = data[pos : pos + 4].decode("latin-1")
            raise Corrupt(f"WEBP chunk {name!r} at byte {pos} runs past the RIFF container")
        pos += 8 + size + (size & 1)


def _check_bmp(data: bytes) -> None:
    file_size = uint(data, 2, 4, "little")
    offset = uint(data, 10, 4, "little")
    if file_size > len(data):
        raise Corrupt(
            f"BMP header declares {file_size} bytes but the data has {len(data)} "
            "(the file is truncated)"
        )
    if not 14 < offset < len(data):
        raise Corrupt(f"BMP pixel data offset {offset} lies outside the file")
    header_size = uint(data, 14, 4, "little")
    if header_size == 12:
        width = uint(data, 18, 2, "little")
        height = uint(data, 20, 2, "little")
        bits = uint(data, 24, 2, "little")
        compression = 0
    else:
        width = sint(data, 18, 4, "little")
        height = sint(data, 22, 4, "little")
        bits = uint(data, 28, 2, "little")
        compression = uint(data, 30, 4, "little")
    # Only uncompressed layouts have a size known from the header (RLE streams do not).
    if compression in (0, 3, 6):
        needed = offset + (abs(width) * bits + 31) // 32 * 4 * abs(height)
        if needed > len(data):
            raise Corrupt(
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
            raise Corrupt(f"TIFF page {page} has no strip or tile offsets")
        if counts and len(counts) != len(offsets):
            raise Corrupt(
                f"TIFF page {page} has {len(offsets)} {kind} offsets but {len(counts)} byte counts"
            )
        for index, start in enumerate(offsets):
            end = start + (counts[index] if counts else 1)
            if end > len(data):
                raise Corrupt(
                    f"TIFF page {page} {kind} {index} (bytes {start}..{end}) lies beyond the "
                    f"end of the data at {len(data)} (the file is truncated)"
                )


def _tiff_ints(value: object) -> tuple[int, ...]:
    values = value if isinstance(value, tuple) else () if value is None else (value,)
    if not all(isinstance(v, int) and v >= 0 for v in values):
        raise Corrupt("TIFF strip or tile tags hold values that are not offsets")
    return tuple(int(v) for v in values)


def image_signature(head: bytes) -> bool:
    """Whether `head` starts like one of IMAGE_FORMATS (so that refusals can say "is an
    image" and sniffing need not try the AV parsers)."""
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
