"""Ogg: Theora video, Vorbis and Opus audio, from the beginning-of-stream pages and (for
the duration) the last page's granule position."""

from __future__ import annotations

from dataclasses import dataclass

from service.media.binary import ALL_ONES, AV, Corrupt, Short, sint, uint


@dataclass
class _OggStream:
    serial: int
    codec: str
    rate: float = 0.0  # frames or samples per second
    granule_shift: int = 0
    pre_skip: int = 0
    nominal_bit_rate: int = 0
    width: int = 0
    height: int = 0


@dataclass
class _OggPage:
    flags: int
    granule: int
    serial: int
    body: int
    end: int
    lacing: bytes


def _ogg_page(data: bytes, pos: int) -> _OggPage:
    if data[pos : pos + 4] != b"OggS":
        raise Corrupt(f"Ogg page at byte {pos} lacks the OggS capture pattern")
    if uint(data, pos + 4, 1) != 0:
        raise Corrupt(f"Ogg page at byte {pos} has an unknown version")
    segments = uint(data, pos + 26, 1)
    lacing = data[pos + 27 : pos + 27 + segments]
    if len(lacing) < segments:
        raise Short
    body = pos + 27 + segments
    return _OggPage(
        flags=data[pos + 5],
        granule=uint(data, pos + 6, 8, "little"),
        serial=uint(data, pos + 14, 4, "little"),
        body=body,
        end=body + sum(lacing),
        lacing=lacing,
    )


def _first_packet(data: bytes, page: _OggPage) -> bytes:
    length = 0
    for value in page.lacing:
        length += value
        if value < 255:
            break
    return data[page.body : page.body + length]


def _ogg_stream(serial: int, packet: bytes) -> _OggStream:
    if packet.startswith(b"\x80theora") and len(packet) >= 42:
        stream = _OggStream(serial, "theora")
        stream.width = uint(packet, 14, 3)
        stream.height = uint(packet, 17, 3)
        numerator, denominator = uint(packet, 22, 4), uint(packet, 26, 4)
        stream.rate = numerator / denominator if denominator else 0.0
        stream.granule_shift = (uint(packet, 40, 2) >> 5) & 0x1F
        return stream
    if packet.startswith(b"\x01vorbis") and len(packet) >= 24:
        stream = _OggStream(serial, "vorbis", rate=uint(packet, 12, 4, "little"))
        stream.nominal_bit_rate = max(sint(packet, 20, 4, "little"), 0)
        return stream
    if packet.startswith(b"OpusHead") and len(packet) >= 19:
        # Opus always decodes at 48 kHz; the header's input rate is informational only.
        return _OggStream(serial, "opus", rate=48000, pre_skip=uint(packet, 10, 2, "little"))
    return _OggStream(serial, "other")


def parse_ogg(data: bytes, total: int | None) -> AV:
    streams: list[_OggStream] = []
    pos = 0
    # Every logical stream starts with a beginning-of-stream page, all before other pages.
    while pos < len(data) and data[pos : pos + 4] == b"OggS":
        page = _ogg_page(data, pos)
        if not page.flags & 0x02:
            break
        streams.append(_ogg_stream(page.serial, _first_packet(data, page)))
        pos = page.end
    if not streams:
        raise Corrupt("Ogg data does not begin with a beginning-of-stream page")
    codecs = {s.codec: s for s in streams}
    chosen = codecs.get("theora") or codecs.get("vorbis") or codecs.get("opus")
    if chosen is None:
        return AV("OGG", None)
    if chosen.codec == "theora":
        av = AV("OGG", "video", width=chosen.width, height=chosen.height, fps=chosen.rate)
    else:
        av = AV("OPUS" if chosen.codec == "opus" else "OGG", "audio")
        av.sample_rate = int(chosen.rate)
    granule = _last_granule(data, chosen.serial) if total == len(data) else None
    if granule is not None and chosen.rate:
        if chosen.codec == "theora":
            mask = (1 << chosen.granule_shift) - 1
            av.frames = (granule >> chosen.granule_shift) + (granule & mask)
            av.duration = av.frames / chosen.rate
        else:
            av.duration = max(granule - chosen.pre_skip, 0) / chosen.rate
    if av.kind == "audio":
        av.bit_rate = chosen.nominal_bit_rate
        if not av.bit_rate and total is not None and av.duration > 0:
            av.bit_rate = round(total * 8 / av.duration)
    return av


def _last_granule(data: bytes, serial: int) -> int | None:
    # An Ogg page is at most 65,307 bytes, so the last page of the stream starts within
    # the last two page lengths unless other streams' pages are interleaved at the end.
    low = max(0, len(data) - 2 * 65307)
    pos = data.rfind(b"OggS", low)
    while pos >= 0:
        try:
            page = _ogg_page(data, pos)
        except (Corrupt, Short):
            page = None  # "OggS" inside a packet, or a page cut off at the end
        if page is not None and page.serial == serial and page.granule not in ALL_ONES:
            return page.granule
        pos = data.rfind(b"OggS", low, pos)
    return None
