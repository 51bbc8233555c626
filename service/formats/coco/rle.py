"""COCO run-length encoded masks <-> the PNG mask images of datasetd regions.

COCO RLE runs go down the columns (column-major) and start with a background run;
pycocotools also writes them compressed into a string.
"""

from __future__ import annotations

import io
import re
from typing import Any

from PIL import Image

_RUNS = re.compile(rb"\x00+|\xff+")


def mask_rle(png: bytes, width: int, height: int) -> tuple[dict[str, Any], int, list[int]] | None:
    """(uncompressed RLE, area, bbox) of a mask image scaled to the image's size; None when
    the mask has no foreground pixel or cannot be read."""
    try:
        with Image.open(io.BytesIO(png)) as opened:
            has_alpha = opened.mode in ("RGBA", "LA", "PA") or "transparency" in opened.info
            source = opened.convert("RGBA").getchannel("A") if has_alpha else opened.convert("L")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    binary = source.point(lambda v: 255 if v else 0)
    if binary.size != (width, height):
        binary = binary.resize((width, height), Image.Resampling.NEAREST)
    box = binary.getbbox()
    if box is None:
        return None
    # Transposed, the bytes run down the columns: COCO's order.
    columns = binary.transpose(Image.Transpose.TRANSPOSE).tobytes()
    counts: list[int] = []
    area = 0
    for run in _RUNS.finditer(columns):
        length = run.end() - run.start()
        if not counts and columns[0]:
            counts.append(0)
        counts.append(length)
        if columns[run.start()]:
            area += length
    left, top, right, bottom = box
    return (
        {"counts": counts, "size": [height, width]},
        area,
        [left, top, right - left, bottom - top],
    )


def rle_counts(counts: Any) -> list[int]:
    """The run lengths of a COCO RLE: a list of integers, or pycocotools' compressed
    string (6-bit groups offset by 48; runs after the second are deltas of the run two
    before)."""
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError("RLE counts must be non-negative integers")
        return counts
    if not isinstance(counts, str):
        raise ValueError("RLE counts must be a list of integers or a compressed string")
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value = shift = 0
        more = True
        while more:
            if position >= len(counts):
                raise ValueError("the compressed RLE string ends inside a number")
            group = ord(counts[position]) - 48
            if not 0 <= group < 64:
                raise ValueError("the compressed RLE string has a character outside its alphabet")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError("the compressed RLE string decodes to a negative run")
        runs.append(value)
    return runs


def rle_png(counts: Any, height: int, width: int) -> bytes:
    """A COCO RLE mask (column-major runs, starting with background) as a PNG."""
    runs = rle_counts(counts)
    if sum(runs) != height * width:
        raise ValueError(f"the RLE runs cover {sum(runs)} pixels, not the image's {height}x{width}")
    pixels = bytearray(height * width)
    position = 0
    for index, run in enumerate(runs):
        if index % 2:
            pixels[position : position + run] = b"\xff" * run
        position += run
    # Column-major: read as an image `height` wide, then transposed.
    mask = Image.frombytes("L", (height, width), bytes(pixels)).transpose(Image.Transpose.TRANSPOSE)
    buffer = io.BytesIO()
    mask.convert("1").save(buffer, format="PNG")
    return buffer.getvalue()
