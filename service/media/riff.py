"""RIFF containers: AVI video and WAV (and RF64) audio."""

from __future__ import annotations

from collections.abc import Iterator

from service.media.binary import AV, Corrupt, uint


def _riff_chunks(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    pos = start
    end = min(end, len(data))
    while pos + 8 <= end:
        size = uint(data, pos + 4, 4, "little")
        yield data[pos : pos + 4], pos + 8, pos + 8 + size
        pos += 8 + size + (size & 1)


def parse_avi(data: bytes, total: int | None) -> AV:
    av = AV("AVI", "video")
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
                per_frame = uint(data, s, 4, "little")
                av.frames = uint(data, s + 16, 4, "little")
                av.width = uint(data, s + 32, 4, "little")
                av.height = uint(data, s + 36, 4, "little")
                if per_frame:
                    av.fps = 1e6 / per_frame
            elif sub == b"LIST" and data[s : s + 4] == b"strl":
                strh = next((x for x in _riff_chunks(data, s + 4, e) if x[0] == b"strh"), None)
                if strh is None or strh[1] + 36 > len(data):
                    continue
                stream_types.append(data[strh[1] : strh[1] + 4])
                if stream_types[-1] == b"vids" and stream_types.count(b"vids") == 1:
                    scale = uint(data, strh[1] + 20, 4, "little")
                    rate = uint(data, strh[1] + 24, 4, "little")
                    if scale and rate:
                        av.fps = rate / scale
                        av.frames = uint(data, strh[1] + 32, 4, "little") or av.frames
        break
    if av.fps and av.frames:
        av.duration = av.frames / av.fps
    if stream_types and b"vids" not in stream_types:
        av.kind = "audio" if b"auds" in stream_types else None
    return av


def parse_wav(data: bytes, total: int | None) -> AV:
    av = AV("WAV", "audio")
    size = total if total is not None else len(data)
    byte_rate = 0
    seen_fmt = False
    rf64_data_size = 0
    for chunk, start, end in _riff_chunks(data, 12, len(data)):
        if chunk == b"ds64" and start + 24 <= len(data):
            rf64_data_size = uint(data, start + 8, 8, "little")
        elif chunk == b"fmt ":
            if start + 16 > min(end, len(data)):
                raise Corrupt("WAV fmt chunk is shorter than 16 bytes")
            channels = uint(data, start + 2, 2, "little")
            av.sample_rate = uint(data, start + 4, 4, "little")
            byte_rate = uint(data, start + 8, 4, "little")
            block_align = uint(data, start + 12, 2, "little")
            if not channels or not av.sample_rate:
                raise Corrupt("WAV fmt chunk declares zero channels or a zero sample rate")
            byte_rate = byte_rate or block_align * av.sample_rate
            av.bit_rate = byte_rate * 8
            seen_fmt = True
        elif chunk == b"data":
            if not seen_fmt:
                raise Corrupt("WAV data chunk comes before the fmt chunk")
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
        raise Corrupt("WAV data has no fmt chunk")
    return av
