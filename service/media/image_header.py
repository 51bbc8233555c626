"""An image's size and format from its first bytes only (a ranged read of a URL image), so
that a URL input's regions can be exported in pixels without fetching the whole image."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from service.domain.errors import InvalidArgument
from service.media.binary import uint
from service.media.images import (
    IMAGE_FORMATS,
    MAX_IMAGE_PIXELS,
    ImageProbe,
    image_signature,
    probe_image,
)

__all__ = ["probe_image_head"]


def probe_image_head(data: bytes, field: str, *, complete: bool) -> ImageProbe | None:
    """Width, height, format and colour mode of the image `data` starts. With `complete`,
    `data` is the whole file and gets the full probe (truncation and structure checks
    included); otherwise None when its header runs past `data`. Refusals name `field`."""
    if complete:
        return probe_image(data, field)
    if not image_signature(data[:32]):
        raise InvalidArgument.field(
            field,
            f"is not a readable image; allowed formats: {', '.join(IMAGE_FORMATS)}",
            reason="INVALID_IMAGE",
        )
    probe = _webp_head(data) if data[8:12] == b"WEBP" else _pillow_head(data, field)
    if probe is not None and (
        probe.width <= 0 or probe.height <= 0 or probe.width * probe.height > MAX_IMAGE_PIXELS
    ):
        raise InvalidArgument.field(
            field,
            f"image is {probe.width}x{probe.height}; at most {MAX_IMAGE_PIXELS:,} pixels are "
            "allowed",
            reason="IMAGE_TOO_LARGE",
        )
    return probe


def _pillow_head(data: bytes, field: str) -> ImageProbe | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
                fmt, mode = image.format or "", image.mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidArgument.field(
            field,
            f"image has more than {MAX_IMAGE_PIXELS:,} pixels, the most allowed",
            reason="IMAGE_TOO_LARGE",
        ) from None
    except Exception:
        # A cut header and a corrupt one look the same from a prefix; the caller reads
        # more, and the whole file, when it fits, gets the full probe's explanation.
        return None
    return ImageProbe(width, height, fmt, mode, Image.MIME.get(fmt, "application/octet-stream"))


def _webp_head(data: bytes) -> ImageProbe | None:
    """The first chunk's canvas size: Pillow hands WEBP to libwebp, which wants the whole
    file. Layouts from the WebP container specification (RFC 9649)."""
    if len(data) < 30:
        return None
    chunk, payload = data[12:16], data[20:30]
    if chunk == b"VP8 " and payload[3:6] == b"\x9d\x01\x2a":
        width = uint(payload, 6, 2, "little") & 0x3FFF
        height = uint(payload, 8, 2, "little") & 0x3FFF
        mode = "RGB"
    elif chunk == b"VP8L" and payload[0] == 0x2F:
        bits = uint(payload, 1, 4, "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        mode = "RGBA" if bits >> 28 & 1 else "RGB"
    elif chunk == b"VP8X":
        width = uint(payload, 4, 3, "little") + 1
        height = uint(payload, 7, 3, "little") + 1
        mode = "RGBA" if payload[0] & 0x10 else "RGB"
    else:
        # Not a layout this reader knows; the full probe decides once the file is read.
        return None
    return ImageProbe(width, height, "WEBP", mode, "image/webp")
