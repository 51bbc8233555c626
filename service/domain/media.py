"""Reading what media are from their bytes, without decoding untrusted pixel data."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from service.domain.errors import InvalidArgument

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
MAX_IMAGE_PIXELS = 85_000_000
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
    """Width, height and format from the header (Pillow opens lazily)."""
    allowed = ", ".join(IMAGE_FORMATS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
                fmt = image.format or ""
                mode = image.mode
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidArgument.field(
            field, f"is not a readable image; allowed formats: {allowed}", reason="INVALID_IMAGE"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidArgument.field(
            field, f"is a corrupt image ({exc})", reason="INVALID_IMAGE"
        ) from None
    if width <= 0 or height <= 0 or width * height > MAX_IMAGE_PIXELS:
        raise InvalidArgument.field(
            field,
            f"image is {width}x{height}; at most {MAX_IMAGE_PIXELS:,} pixels are allowed",
            reason="IMAGE_TOO_LARGE",
        )
    return ImageProbe(width, height, fmt, mode, _CONTENT_TYPES.get(fmt, "application/octet-stream"))
