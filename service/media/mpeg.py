"""MPEG streams: transport and program streams (video), and MP3 and AAC (ADTS) audio
possibly behind ID3v2 tags (which may also front FLAC)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from service.media.binary import AV, Corrupt, Short, uint
from service.media.flac import parse_flac


def parse_ts(data: bytes, total: int | None) -> AV:
    # Stream parameters sit in codec bitstreams inside PES packets; not worth parsing here.
    return AV("MPEG-TS", "video")


_MPEG_FRAME_RATES = (0.0, 24000 / 1001, 24.0, 25.0, 30000 / 1001, 30.0, 50.0, 60000 / 1001, 60.0)


def parse_ps(data: bytes, total: int | None) -> AV:
    marker = uint(data, 4, 1)
    if marker & 0xC0 != 0x40 and marker & 0xF0 != 0x20:
        raise Corrupt("MPEG program stream pack header is neither MPEG-1 nor MPEG-2")
    av = AV("MPEG-PS", "video")
    # The MPEG-1/2 video sequence header carries picture size and frame rate in the clear.
    pos = data.find(b"\x00\x00\x01\xb3", 0, 1 << 20)
    if pos >= 0 and pos + 8 <= len(data):
        av.width = (data[pos + 4] << 4) | (data[pos + 5] >> 4)
        av.height = ((data[pos + 5] & 0x0F) << 8) | data[pos + 6]
        code = data[pos + 7] & 0x0F
        av.fps = _MPEG_FRAME_RATES[code] if code < len(_MPEG_FRAME_RATES) else 0.0
    return av


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
class _Frame:
    """An MP3 or ADTS frame header: what both formats tell of their frames."""

    sample_rate: int
    length: int  # of the whole frame, header included
    samples: int


@dataclass(frozen=True)
class _Mp3Frame(_Frame):
    version: int  # 3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5
    bit_rate: int
    mono: bool


def _mp3_frame(data: bytes, pos: int) -> _Mp3Frame | None:
    """The MPEG-1/2/2.5 Layer III frame header at `pos`, if one is there."""
    if pos < 0 or pos + 4 > len(data):
        return None
    header = uint(data, pos, 4)
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
    mono = (header >> 6) & 3 == 3
    return _Mp3Frame(sample_rate, length, samples, version=version, bit_rate=bit_rate, mono=mono)


def mp3_at(data: bytes, pos: int) -> bool:
    return _frames_at(_mp3_frame, 4, data, pos)


def _adts_frame(data: bytes, pos: int) -> _Frame | None:
    """The ADTS frame header at `pos`, if one is there."""
    if pos < 0 or pos + 7 > len(data):
        return None
    b = data[pos : pos + 7]
    if b[0] != 0xFF or b[1] & 0xF6 != 0xF0:
        return None
    rate_index = (b[2] >> 2) & 0xF
    length = ((b[3] & 3) << 11) | (b[4] << 3) | (b[5] >> 5)
    if rate_index >= len(_ADTS_SAMPLE_RATES) or length < (7 if b[1] & 1 else 9):
        return None
    return _Frame(_ADTS_SAMPLE_RATES[rate_index], length, 1024 * ((b[6] & 3) + 1))


def adts_at(data: bytes, pos: int) -> bool:
    return _frames_at(_adts_frame, 7, data, pos)


def _frames_at(
    read: Callable[[bytes, int], _Frame | None], header_size: int, data: bytes, pos: int
) -> bool:
    # Sync bits occur by chance; a second header right after the first does not (unless
    # the first frame runs to the end of the bytes at hand).
    frame = read(data, pos)
    if frame is None:
        return False
    following = pos + frame.length
    if following + header_size > len(data):
        return True
    after = read(data, following)
    return after is not None and after.sample_rate == frame.sample_rate


def _skip_id3(data: bytes) -> int:
    pos = 0
    while data[pos : pos + 3] == b"ID3":
        size_bytes = data[pos + 6 : pos + 10]
        if len(size_bytes) < 4:
            raise Short
        if any(b & 0x80 for b in size_bytes):
            raise Corrupt(f"ID3 tag at byte {pos} has an invalid size")
        size = (size_bytes[0] << 21) | (size_bytes[1] << 14) | (size_bytes[2] << 7) | size_bytes[3]
        footer = 10 if uint(data, pos + 5, 1) & 0x10 else 0
        pos += 10 + size + footer
    return pos


def parse_plain_audio(data: bytes, total: int | None) -> AV:
    start = _skip_id3(data)
    if start + 16 > len(data) and total is not None and total > len(data):
        # Cover art can make the tag longer than a streamed prefix: ID3 says audio, and the
        # codec behind it cannot be seen yet.
        return AV("MP3", "audio")
    if data[start : start + 4] == b"fLaC":
        return parse_flac(data, start, total)
    if start and not (mp3_at(data, start) or adts_at(data, start)):
        # Some taggers leave padding between the tag and the first frame.
        for candidate in _sync_candidates(data, start):
            if mp3_at(data, candidate) or adts_at(data, candidate):
                start = candidate
                break
        else:
            raise Corrupt("ID3 tag is not followed by MP3, AAC or FLAC audio")
    if adts_at(data, start):
        return _parse_adts(data, start, total)
    return _parse_mp3(data, start, total)


def _sync_candidates(data: bytes, start: int) -> Iterator[int]:
    pos = data.find(b"\xff", start, start + _SYNC_SEARCH)
    while pos >= 0:
        yield pos
        pos = data.find(b"\xff", pos + 1, start + _SYNC_SEARCH)


def _parse_mp3(data: bytes, start: int, total: int | None) -> AV:
    frame = _mp3_frame(data, start)
    if frame is None:
        raise Corrupt(f"no MP3 frame header at byte {start}")
    av = AV("MP3", "audio", sample_rate=frame.sample_rate, bit_rate=frame.bit_rate)
    # A VBR file announces its frame count in a Xing/Info or VBRI header inside the first
    # frame; without one the stream is constant bit rate and its size gives the duration.
    side_info = (
        (32 if not frame.mono else 17) if frame.version == 3 else (17 if not frame.mono else 9)
    )
    xing = start + 4 + side_info
    frames = stream_bytes = 0
    if data[xing : xing + 4] in (b"Xing", b"Info"):
        flags = uint(data, xing + 4, 4)
        offset = xing + 8
        if flags & 1:
            frames = uint(data, offset, 4)
            offset += 4
        if flags & 2:
            stream_bytes = uint(data, offset, 4)
    elif data[start + 36 : start + 40] == b"VBRI":
        stream_bytes = uint(data, start + 46, 4)
        frames = uint(data, start + 50, 4)
    if frames:
        av.duration = frames * frame.samples / frame.sample_rate
        audio_bytes = stream_bytes or (total - start if total is not None else 0)
        if audio_bytes:
            av.bit_rate = round(audio_bytes * 8 / av.duration)
    elif total is not None:
        av.duration = (total - start) * 8 / frame.bit_rate
    return av


def _parse_adts(data: bytes, start: int, total: int | None) -> AV:
    first = _adts_frame(data, start)
    if first is None:
        raise Corrupt(f"no ADTS frame header at byte {start}")
    rate = first.sample_rate
    av = AV("AAC", "audio", sample_rate=rate)
    pos, samples, frames = start, 0, 0
    while frames < _ADTS_WALK_FRAMES:
        frame = _adts_frame(data, pos)
        if frame is None:
            break
        samples += frame.samples
        frames += 1
        pos += frame.length
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
