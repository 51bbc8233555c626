"""Flash video: the header's stream flags and the numbers of its onMetaData script tag."""

from __future__ import annotations

import math
import struct

from service.media.binary import AV, Corrupt, MediaKind, uint


def parse_flv(data: bytes, total: int | None) -> AV:
    flags = uint(data, 4, 1)
    header_size = uint(data, 5, 4)
    if header_size < 9:
        raise Corrupt(f"FLV header size {header_size} is below the minimum of 9")
    # Flags say which streams exist; writers of live streams sometimes leave both unset.
    kind: MediaKind = "audio" if flags & 0x05 == 0x04 else "video"
    av = AV("FLV", kind)
    tag = header_size + 4  # after PreviousTagSize0
    if uint(data, tag, 1) == 18:  # script data: the onMetaData AMF0 object
        end = min(tag + 11 + uint(data, tag + 1, 3), len(data))
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
    if uint(data, pos, 1) != 2:
        return numbers
    pos += 3 + uint(data, pos + 1, 2)
    marker = uint(data, pos, 1)
    if marker == 8:  # ECMA array: count, then like an object
        pos += 5
    elif marker == 3:
        pos += 1
    else:
        return numbers
    while pos + 3 <= end:
        key_length = uint(data, pos, 2)
        key = data[pos + 2 : pos + 2 + key_length].decode("latin-1")
        pos += 2 + key_length
        value_type = uint(data, pos, 1)
        pos += 1
        if value_type == 0:
            numbers[key] = (
                float(struct.unpack(">d", data[pos : pos + 8])[0]) if pos + 8 <= end else 0.0
            )
            pos += 8
        elif value_type == 1:
            pos += 1
        elif value_type == 2:
            pos += 2 + uint(data, pos, 2)
        else:
            break
    return {k: v for k, v in numbers.items() if math.isfinite(v) and v >= 0}


def _float_int(value: float) -> int:
    return int(value) if math.isfinite(value) and 0 <= value < 2**62 else 0
