"""FLAC: sample rate and length from the STREAMINFO block that must come first."""

from __future__ import annotations

from service.media.binary import AV, Corrupt, uint


def parse_flac(data: bytes, start: int, total: int | None) -> AV:
    block = start + 4
    if uint(data, block, 1) & 0x7F != 0 or uint(data, block + 1, 3) != 34:
        raise Corrupt("FLAC stream does not begin with a 34-byte STREAMINFO block")
    # After min/max block size (2+2) and min/max frame size (3+3): 20 bits sample rate,
    # 3 bits channels, 5 bits bits-per-sample, 36 bits total samples.
    packed = uint(data, block + 4 + 10, 8)
    rate = packed >> 44
    total_samples = packed & ((1 << 36) - 1)
    if rate == 0:
        raise Corrupt("FLAC STREAMINFO declares a sample rate of 0")
    av = AV("FLAC", "audio", sample_rate=rate)
    if total_samples:
        av.duration = total_samples / rate
        if total is not None:
            av.bit_rate = round((total - start) * 8 / av.duration)
    return av
