"""ISO base media files (MP4, MOV, 3GP, M4A): the box tree down to the track headers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from service.media.binary import ALL_ONES, AV, Corrupt, Short, uint

# HEIF and AVIF images share the container; they are not video.
IMAGE_BRANDS = frozenset({b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis", b"crx "})


_AUDIO_BRANDS = frozenset({b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "})


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
    beyond the bytes at hand; reading a header that does raises Short."""
    pos = start
    while pos + 8 <= end:
        size = uint(data, pos, 4)
        kind = data[pos + 4 : pos + 8]
        header = 8
        if size == 1:
            size = uint(data, pos + 8, 8)
            header = 16
        elif size == 0:
            size = end - pos
        if size < header:
            raise Corrupt(f"box {kind!r} at byte {pos} has an invalid size {size}")
        yield kind, pos + header, pos + size
        pos += size


def _child(data: bytes, start: int, end: int, *path: bytes) -> tuple[int, int] | None:
    for kind, payload, box_end in _boxes(data, start, end):
        if kind == path[0]:
            if box_end > end:
                raise Corrupt(f"box {kind!r} at byte {payload} overruns its parent")
            if len(path) == 1:
                return payload, box_end
            return _child(data, payload, box_end, *path[1:])
    return None


def parse_isobmff(data: bytes, total: int | None) -> AV:
    brand = data[8:12] if data[4:8] == b"ftyp" else b"qt  "
    if data[4:8] == b"ftyp" and uint(data, 0, 4) not in (0, 1) and uint(data, 0, 4) < 16:
        raise Corrupt("ftyp box is shorter than its 16-byte minimum")
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
    except Short:
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
        av = AV("M4A", "audio", duration=duration)
        if audio:
            av.sample_rate = audio[0].sample_rate or audio[0].timescale
        if total is not None and duration > 0:
            av.bit_rate = round(total * 8 / duration)
        return av
    fmt = "MOV" if brand == b"qt  " else "3GP" if brand.startswith(b"3g") else "MP4"
    av = AV(fmt, "video" if is_video else None, duration=duration)
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
            raise Corrupt(f"box {kind!r} at byte {payload} overruns the moov box")
        if kind == b"mvhd":
            timescale, length = _media_times(data, payload, box_end)
            if timescale and length not in ALL_ONES:
                duration = length / timescale
        elif kind == b"trak":
            tracks.append(_parse_trak(data, payload, box_end))
    return duration, tracks


def _media_times(data: bytes, start: int, end: int) -> tuple[int, int]:
    """(timescale, duration) of an mvhd or mdhd full box."""
    if uint(data, start, 1) == 1:
        if start + 32 > end:
            return 0, 0
        return uint(data, start + 20, 4), uint(data, start + 24, 8)
    if start + 20 > end:
        return 0, 0
    return uint(data, start + 12, 4), uint(data, start + 16, 4)


def _parse_trak(data: bytes, start: int, end: int) -> _Track:
    track = _Track()
    tkhd = _child(data, start, end, b"tkhd")
    if tkhd is not None:
        # Width and height follow the version-dependent times, 16 reserved/layer/volume
        # bytes and the 36-byte matrix; they are 16.16 fixed point.
        offset = tkhd[0] + (88 if uint(data, tkhd[0], 1) == 1 else 76)
        if offset + 8 <= tkhd[1]:
            track.width = uint(data, offset, 4) >> 16
            track.height = uint(data, offset + 4, 4) >> 16
    mdia = _child(data, start, end, b"mdia")
    if mdia is None:
        return track
    hdlr = _child(data, *mdia, b"hdlr")
    if hdlr is not None and hdlr[0] + 12 <= hdlr[1]:
        track.handler = data[hdlr[0] + 8 : hdlr[0] + 12]
    mdhd = _child(data, *mdia, b"mdhd")
    if mdhd is not None:
        track.timescale, track.duration = _media_times(data, *mdhd)
        if track.duration in ALL_ONES:
            track.duration = 0
    stbl = _child(data, *mdia, b"minf", b"stbl")
    if stbl is None:
        return track
    stts = _child(data, *stbl, b"stts")
    if stts is not None:
        entries = min(uint(data, stts[0] + 4, 4), (stts[1] - stts[0] - 8) // 8)
        base = stts[0] + 8
        track.samples = sum(uint(data, base + 8 * i, 4) for i in range(max(entries, 0)))
    stsd = _child(data, *stbl, b"stsd")
    if stsd is not None and track.handler == b"soun" and stsd[0] + 44 <= stsd[1]:
        # First sample entry: 8-byte box header, 8 bytes of SampleEntry, 16 bytes of
        # AudioSampleEntry fields, then the 16.16 sample rate.
        track.sample_rate = uint(data, stsd[0] + 8 + 32, 4) >> 16
    return track
