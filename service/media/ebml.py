"""Matroska and WebM: the EBML header's document type, then the segment's info and tracks,
which writers put before the first cluster of media data."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator

from service.media.binary import AV, Corrupt, Short, uint

_EBML_DOCTYPE = 0x4282
_SEGMENT = 0x18538067
_INFO = 0x1549A966
_TRACKS = 0x1654AE6B
_CLUSTER = 0x1F43B675


def _vint(data: bytes, pos: int) -> tuple[int, int, int]:
    """(raw value with marker, value without marker, length) of an EBML varint."""
    first = uint(data, pos, 1)
    if first == 0:
        raise Corrupt(f"invalid EBML variable-length number at byte {pos}")
    length = 9 - first.bit_length()
    raw = uint(data, pos, length)
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
        raise Short
    return data[start:end]


def _ebml_uint(payload: bytes) -> int:
    # The format allows at most 8 bytes; longer payloads would make unbounded integers.
    if len(payload) > 8:
        raise Corrupt("EBML integer element is longer than 8 bytes")
    return int.from_bytes(payload, "big")


def _ebml_float(payload: bytes) -> float:
    if len(payload) == 4:
        return float(struct.unpack(">f", payload)[0])
    if len(payload) == 8:
        return float(struct.unpack(">d", payload)[0])
    return 0.0


def parse_ebml(data: bytes, total: int | None) -> AV:
    _, _, id_length = _vint(data, 0)
    _, header_size, size_length = _vint(data, id_length)
    header_end = id_length + size_length + header_size
    doctype = ""
    for element_id, start, end in _elements(data, id_length + size_length, header_end):
        if element_id == _EBML_DOCTYPE:
            doctype = _ebml_payload(data, start, end).rstrip(b"\x00").decode("latin-1")
    if doctype not in ("webm", "matroska"):
        raise Corrupt(f"EBML document type {doctype!r} is neither webm nor matroska")
    av = AV("WEBM" if doctype == "webm" else "MATROSKA", "video")
    track_types: list[int] = []
    try:
        for element_id, start, end in _elements(data, header_end, len(data)):
            if element_id == _SEGMENT:
                _parse_segment(data, start, end, av, track_types)
                break
    except Short:
        pass
    if track_types and 1 not in track_types:
        av.kind = "audio" if 2 in track_types else None
    return av


def _parse_segment(
    data: bytes, start: int, end: int | None, av: AV, track_types: list[int]
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
        raise Short
    return end


def _parse_track_entry(data: bytes, start: int, end: int, av: AV) -> int:
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
