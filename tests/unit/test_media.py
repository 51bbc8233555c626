"""Media probes on real files built here: valid, truncated, corrupt, oversized and random."""

from __future__ import annotations

import contextlib
import io
import struct
import time
import tracemalloc
import wave
import zlib
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, TiffImagePlugin

from service.domain.errors import InvalidArgument
from service.media.probe import (
    AUDIO_FORMATS,
    MAX_IMAGE_PIXELS,
    VIDEO_FORMATS,
    AudioProbe,
    TextProbe,
    VideoProbe,
    probe_audio,
    probe_image,
    probe_text,
    probe_video,
    sniff_media_type,
)

# --- builders -------------------------------------------------------------------------------


def image_bytes(fmt: str, size: tuple[int, int] = (50, 40), **options: object) -> bytes:
    out = io.BytesIO()
    # Noise rather than a flat colour, so compressed payloads span several blocks.
    Image.effect_noise(size, 64).convert("RGB").save(out, fmt, **options)
    return out.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR (with a correct CRC) claims the given size; no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def full_box(kind: bytes, payload: bytes, version: int = 0) -> bytes:
    return box(kind, bytes([version, 0, 0, 0]) + payload)


def trak(handler: bytes, *, width: int = 0, height: int = 0, sample_rate: int = 0) -> bytes:
    tkhd = full_box(
        b"tkhd",
        struct.pack(">IIIII", 0, 0, 1, 0, 2000)
        + bytes(16)  # reserved, layer, alternate group, volume, reserved
        + bytes(36)  # matrix
        + struct.pack(">II", width << 16, height << 16),
    )
    mdhd = full_box(b"mdhd", struct.pack(">IIII", 0, 0, 12800, 25600) + bytes(4))
    hdlr = full_box(b"hdlr", bytes(4) + handler + bytes(12) + b"\x00")
    stts = full_box(b"stts", struct.pack(">III", 1, 50, 512))
    entry = box(
        b"mp4a" if handler == b"soun" else b"avc1",
        bytes(6)
        + struct.pack(">H", 1)
        + bytes(8)
        + struct.pack(">HHHH", 2, 16, 0, 0)
        + struct.pack(">I", sample_rate << 16),
    )
    stsd = full_box(b"stsd", struct.pack(">I", 1) + entry)
    stbl = box(b"stbl", stsd + stts)
    mdia = box(b"mdia", mdhd + hdlr + box(b"minf", stbl))
    return box(b"trak", tkhd + mdia)


def mp4(
    brand: bytes = b"isom",
    tracks: tuple[bytes, ...] | None = None,
    *,
    moov_first: bool = True,
) -> bytes:
    """ftyp + moov (mvhd: 2 s; tracks) + mdat, like a faststart MP4 or, with moov last, like
    a camera recording."""
    if tracks is None:
        tracks = (trak(b"vide", width=640, height=360),)
    ftyp = box(b"ftyp", brand + struct.pack(">I", 0) + b"isomiso2mp41")
    mvhd = full_box(b"mvhd", struct.pack(">IIII", 0, 0, 1000, 2000) + bytes(80))
    moov = box(b"moov", mvhd + b"".join(tracks))
    mdat = box(b"mdat", bytes(4000))
    return ftyp + (moov + mdat if moov_first else mdat + moov)


def ebml_element(element_id: int, payload: bytes) -> bytes:
    raw_id = element_id.to_bytes((element_id.bit_length() + 7) // 8, "big")
    return raw_id + b"\x01" + len(payload).to_bytes(7, "big") + payload


def webm(doctype: bytes = b"webm", track_type: int = 1, *, unknown_size: bool = False) -> bytes:
    header = ebml_element(0x1A45DFA3, ebml_element(0x4286, b"\x01") + ebml_element(0x4282, doctype))
    info = ebml_element(
        0x1549A966,
        ebml_element(0x2AD7B1, (1_000_000).to_bytes(3, "big"))
        + ebml_element(0x4489, struct.pack(">d", 3000.0)),
    )
    video = ebml_element(
        0xE0, ebml_element(0xB0, (320).to_bytes(2, "big")) + ebml_element(0xBA, b"\x00\xf0")
    )
    entry = ebml_element(
        0xAE,
        ebml_element(0xD7, b"\x01")
        + ebml_element(0x83, bytes([track_type]))
        + ebml_element(0x23E383, (40_000_000).to_bytes(4, "big"))
        + (video if track_type == 1 else b""),
    )
    cluster = ebml_element(0x1F43B675, ebml_element(0xE7, b"\x00") + bytes(500))
    body = ebml_element(0x1654AE6B, entry)
    segment_payload = info + body + cluster
    if unknown_size:
        segment = b"\x18\x53\x80\x67\x01\xff\xff\xff\xff\xff\xff\xff" + segment_payload
    else:
        segment = ebml_element(0x18538067, segment_payload)
    return header + segment


def riff_chunk(kind: bytes, payload: bytes) -> bytes:
    pad = b"\x00" if len(payload) % 2 else b""
    return kind + struct.pack("<I", len(payload)) + payload + pad


def avi() -> bytes:
    avih = riff_chunk(
        b"avih", struct.pack("<10I", 40000, 0, 0, 0, 75, 0, 1, 0, 320, 240) + bytes(16)
    )
    strh = riff_chunk(
        b"strh",
        b"vids"
        + b"H264"
        + struct.pack("<IHHIIIIIIII", 0, 0, 0, 0, 1, 25, 0, 75, 0, 0, 0)
        + bytes(8),
    )
    hdrl = riff_chunk(b"LIST", b"hdrl" + avih + riff_chunk(b"LIST", b"strl" + strh))
    movi = riff_chunk(b"LIST", b"movi" + riff_chunk(b"00dc", bytes(100)))
    body = b"AVI " + hdrl + movi
    return b"RIFF" + struct.pack("<I", len(body)) + body


def mpeg_ts() -> bytes:
    return b"".join(
        b"\x47" + bytes([0x40 if i == 0 else 0, 0x00, 0x10]) + bytes(184) for i in range(4)
    )


def mpeg_ps() -> bytes:
    pack = b"\x00\x00\x01\xba\x44\x00\x04\x00\x04\x01\x01\x89\xc3\xf8"
    sequence = b"\x00\x00\x01\xb3\x14\x00\xf0\x13\xff\xff\xe0\x18"
    return pack + sequence + bytes(200)


def flv() -> bytes:
    def amf_number(key: bytes, value: float) -> bytes:
        return struct.pack(">H", len(key)) + key + b"\x00" + struct.pack(">d", value)

    meta = (
        b"\x02\x00\x0aonMetaData\x08"
        + struct.pack(">I", 4)
        + amf_number(b"duration", 4.0)
        + amf_number(b"width", 640.0)
        + amf_number(b"height", 480.0)
        + amf_number(b"framerate", 30.0)
        + b"\x00\x00\x09"
    )
    tag = b"\x12" + len(meta).to_bytes(3, "big") + bytes(4) + bytes(3) + meta
    return b"FLV\x01\x05" + struct.pack(">I", 9) + struct.pack(">I", 0) + tag


def ogg_crc(page: bytes) -> int:
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = (crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def ogg_page(packet: bytes, *, serial: int, sequence: int, granule: int, flags: int) -> bytes:
    lacing = bytes([255] * (len(packet) // 255) + [len(packet) % 255])
    header = (
        b"OggS\x00"
        + bytes([flags])
        + struct.pack("<QIII", granule, serial, sequence, 0)
        + bytes([len(lacing)])
        + lacing
    )
    page = header + packet
    crc = ogg_crc(page)
    return page[:22] + struct.pack("<I", crc) + page[26:]


def theora_header() -> bytes:
    return (
        b"\x80theora\x03\x02\x01"
        + struct.pack(">HH", 20, 15)
        + (320).to_bytes(3, "big")
        + (240).to_bytes(3, "big")
        + b"\x00\x00"
        + struct.pack(">II", 25, 1)
        + (1).to_bytes(3, "big")
        + (1).to_bytes(3, "big")
        + b"\x00"
        + (0).to_bytes(3, "big")
        + struct.pack(">H", 6 << 5)  # quality 0, keyframe granule shift 6
    )


def vorbis_header() -> bytes:
    return b"\x01vorbis" + struct.pack("<IBIiiiBB", 0, 2, 44100, 0, 128000, 0, 0xB8, 1)


def opus_header() -> bytes:
    return b"OpusHead" + struct.pack("<BBHIhB", 1, 2, 312, 48000, 0, 0)


def ogg(first_packet: bytes, last_granule: int) -> bytes:
    return ogg_page(first_packet, serial=7, sequence=0, granule=0, flags=0x02) + ogg_page(
        bytes(300), serial=7, sequence=1, granule=last_granule, flags=0x04
    )


def wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(b"\x01\x00" * int(rate * seconds))
    return out.getvalue()


def flac(total_samples: int = 441000) -> bytes:
    packed = (44100 << 44) | (1 << 41) | (15 << 36) | total_samples
    streaminfo = struct.pack(">HH", 4096, 4096) + bytes(6) + struct.pack(">Q", packed) + bytes(16)
    return b"fLaC" + bytes([0x80]) + (34).to_bytes(3, "big") + streaminfo + bytes(1000)


def id3(size: int) -> bytes:
    syncsafe = bytes((size >> shift) & 0x7F for shift in (21, 14, 7, 0))
    return b"ID3\x04\x00\x00" + syncsafe + bytes(size)


MP3_FRAME_LENGTH = 417  # MPEG-1 Layer III, 128 kbit/s, 44.1 kHz, no padding


def mp3(frames: int = 100, *, xing_frames: int = 0) -> bytes:
    first = bytearray(b"\xff\xfb\x90\x00" + bytes(MP3_FRAME_LENGTH - 4))
    if xing_frames:
        first[36:48] = b"Xing" + struct.pack(">II", 1, xing_frames)
    frame = b"\xff\xfb\x90\x00" + bytes(MP3_FRAME_LENGTH - 4)
    return bytes(first) + frame * (frames - 1)


def adts(frames: int = 43, length: int = 200) -> bytes:
    header = bytes(
        [
            0xFF,
            0xF1,  # MPEG-4, no CRC
            (1 << 6) | (4 << 2),  # AAC LC, 44.1 kHz
            (2 << 6) | (length >> 11),  # two channels
            (length >> 3) & 0xFF,
            ((length & 7) << 5) | 0x1F,
            0xFC,
        ]
    )
    return (header + bytes(length - 7)) * frames


# --- images ---------------------------------------------------------------------------------

IMAGE_CASES = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]


@pytest.mark.parametrize("fmt", IMAGE_CASES)
def test_valid_images_are_probed(fmt: str) -> None:
    data = image_bytes(fmt)
    probe = probe_image(data, "image")
    assert (probe.width, probe.height, probe.format) == (50, 40, fmt)
    assert probe.content_type == f"image/{fmt.lower()}"
    assert sniff_media_type(data[:64]) == "image"


@pytest.mark.parametrize("fmt", IMAGE_CASES)
@pytest.mark.parametrize("keep", [0.98, 0.75, 0.5])
def test_truncated_images_are_rejected(fmt: str, keep: float) -> None:
    data = image_bytes(fmt, (120, 90))
    with pytest.raises(InvalidArgument) as info:
        probe_image(data[: int(len(data) * keep)], "image")
    assert info.value.reason == "INVALID_IMAGE"
    assert "image" in info.value.violations[0].field


def test_truncated_images_say_what_is_wrong() -> None:
    jpeg = image_bytes("JPEG", (120, 90))
    png = image_bytes("PNG", (120, 90))
    gif = image_bytes("GIF", (120, 90))
    cases = {
        jpeg[:-2]: "end-of-image marker FF D9",
        png[:-12]: "before the IEND chunk",
        gif[:-1]: "trailer byte 0x3B",
        image_bytes("WEBP", (120, 90))[:-8]: "RIFF header declares",
        image_bytes("BMP", (120, 90))[:-8]: "BMP header declares",
        image_bytes("TIFF", (120, 90))[:-8]: "TIFF page 0 strip",
    }
    for data, expected in cases.items():
        with pytest.raises(InvalidArgument) as info:
            probe_image(data, "f")
        assert expected in info.value.message


def test_corrupt_png_crc_is_rejected() -> None:
    data = bytearray(image_bytes("PNG", (60, 60)))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF
    with pytest.raises(InvalidArgument) as info:
        probe_image(bytes(data), "f")
    assert "'IDAT'" in info.value.message
    assert "bad CRC" in info.value.message


def test_bmp_with_correct_size_field_but_missing_pixels_is_rejected() -> None:
    data = bytearray(image_bytes("BMP", (64, 64)))
    short = data[:-1000]
    short[2:6] = struct.pack("<I", len(short))  # a writer that "fixed" the size field
    with pytest.raises(InvalidArgument) as info:
        probe_image(bytes(short), "f")
    assert "pixel data needs" in info.value.message


def test_zero_padding_after_jpeg_and_gif_is_accepted() -> None:
    assert probe_image(image_bytes("JPEG") + bytes(100), "f").format == "JPEG"
    assert probe_image(image_bytes("GIF") + bytes(3), "f").format == "GIF"


def test_bytes_after_the_gif_trailer_are_rejected() -> None:
    with pytest.raises(InvalidArgument) as info:
        probe_image(image_bytes("GIF") + b"junk", "f")
    assert "after the trailer" in info.value.message


def test_multipage_tiff_checks_every_page() -> None:
    out = io.BytesIO()
    pages = [Image.new("RGB", (40, 40), c) for c in ("red", "green", "blue")]
    pages[0].save(out, "TIFF", save_all=True, append_images=pages[1:])
    data = out.getvalue()
    assert probe_image(data, "f").format == "TIFF"
    # Point the last page's strip past the end without touching the first page.
    image = Image.open(io.BytesIO(data))
    assert isinstance(image, TiffImagePlugin.TiffImageFile)
    image.seek(2)
    offset = image.tag_v2[273][0]
    assert data.count(struct.pack("<I", offset)) == 1
    broken = data.replace(struct.pack("<I", offset), struct.pack("<I", len(data) + 10))
    with pytest.raises(InvalidArgument) as info:
        probe_image(broken, "f")
    assert "TIFF page 2" in info.value.message


def test_huge_png_header_is_rejected_quickly_without_allocating() -> None:
    data = png_header_only(20000, 20000)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(InvalidArgument) as info:
            probe_image(data, "f")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 4 * 1024 * 1024  # the pixels would need 1.2 GB
    assert info.value.reason == "IMAGE_TOO_LARGE"


def test_png_just_over_our_limit_but_under_pillows_is_rejected() -> None:
    side = int(MAX_IMAGE_PIXELS**0.5) + 10
    with pytest.raises(InvalidArgument) as info:
        probe_image(png_header_only(side, side), "f")
    assert info.value.reason == "IMAGE_TOO_LARGE"
    assert f"{side}x{side}" in info.value.message


def test_unsupported_image_names_the_allowed_formats() -> None:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "ICO")
    with pytest.raises(InvalidArgument) as info:
        probe_image(out.getvalue(), "f")
    assert info.value.reason == "INVALID_IMAGE"
    assert "JPEG, PNG, WEBP, GIF, BMP, TIFF" in info.value.message


# --- video ----------------------------------------------------------------------------------


def test_mp4_with_moov_gives_size_duration_and_rate() -> None:
    probe = probe_video(mp4(), "video")
    assert probe == VideoProbe(
        format="MP4",
        content_type="video/mp4",
        width=640,
        height=360,
        duration_seconds=2.0,
        fps=25.0,
        frame_count=50,
    )
    assert sniff_media_type(mp4()[:32]) == "video"


def test_mov_and_3gp_brands() -> None:
    assert probe_video(mp4(b"qt  "), "v").content_type == "video/quicktime"
    assert probe_video(mp4(b"3gp5"), "v").format == "3GP"


def test_mp4_with_moov_at_the_end_streamed_prefix() -> None:
    data = mp4(moov_first=False)
    prefix = data[:1024]
    probe = probe_video(prefix, "v", total_size=len(data))
    assert probe == VideoProbe(format="MP4", content_type="video/mp4")
    assert probe_video(data, "v").width == 640  # with the whole file the moov is found


def test_mp4_prefix_ending_inside_moov_is_best_effort() -> None:
    data = mp4()
    assert probe_video(data[:60], "v", total_size=len(data)).format == "MP4"


def test_mp4_with_audio_track_as_well_is_video() -> None:
    data = mp4(tracks=(trak(b"soun", sample_rate=44100), trak(b"vide", width=320, height=240)))
    probe = probe_video(data, "v")
    assert (probe.width, probe.height) == (320, 240)


def test_mp4_without_video_track_is_not_video() -> None:
    data = mp4(tracks=(trak(b"soun", sample_rate=44100),))
    with pytest.raises(InvalidArgument) as info:
        probe_video(data, "v")
    assert info.value.reason == "INVALID_VIDEO"
    assert "audio (M4A), not video" in info.value.message
    assert sniff_media_type(data) == "audio"


def test_mp4_with_bad_box_size_is_corrupt() -> None:
    data = bytearray(mp4())
    moov = data.index(b"moov") - 4
    data[moov : moov + 4] = struct.pack(">I", 3)
    with pytest.raises(InvalidArgument) as info:
        probe_video(bytes(data), "v")
    assert "invalid size" in info.value.message


def test_heif_image_is_not_video() -> None:
    data = box(b"ftyp", b"heic" + bytes(4) + b"mif1heic") + box(b"meta", bytes(20))
    with pytest.raises(InvalidArgument):
        probe_video(data, "v")
    assert sniff_media_type(data) is None


@pytest.mark.parametrize(
    ("doctype", "fmt", "content_type"),
    [(b"webm", "WEBM", "video/webm"), (b"matroska", "MATROSKA", "video/x-matroska")],
)
def test_webm_and_matroska(doctype: bytes, fmt: str, content_type: str) -> None:
    probe = probe_video(webm(doctype), "v")
    assert probe == VideoProbe(
        format=fmt, content_type=content_type, width=320, height=240, duration_seconds=3.0, fps=25.0
    )


def test_webm_with_unknown_segment_size_as_written_by_live_encoders() -> None:
    assert probe_video(webm(unknown_size=True), "v").width == 320


def test_webm_header_alone_identifies_the_format() -> None:
    data = webm()
    segment = data.index(b"\x18\x53\x80\x67")
    assert probe_video(data[: segment + 20], "v", total_size=len(data)).format == "WEBM"


def test_ebml_with_other_doctype_is_rejected() -> None:
    with pytest.raises(InvalidArgument) as info:
        probe_video(webm(b"other"), "v")
    assert "neither webm nor matroska" in info.value.message


def test_audio_only_webm_is_neither_video_nor_supported_audio() -> None:
    data = webm(track_type=2)
    with pytest.raises(InvalidArgument):
        probe_video(data, "v")
    with pytest.raises(InvalidArgument):
        probe_audio(data, "a")


def test_avi() -> None:
    probe = probe_video(avi(), "v")
    assert probe == VideoProbe(
        format="AVI",
        content_type="video/x-msvideo",
        width=320,
        height=240,
        duration_seconds=3.0,
        fps=25.0,
        frame_count=75,
    )


def test_mpeg_ts_ps_and_flv() -> None:
    assert probe_video(mpeg_ts(), "v").content_type == "video/mp2t"
    ps = probe_video(mpeg_ps(), "v")
    assert (ps.format, ps.width, ps.height, ps.fps) == ("MPEG-PS", 320, 240, 25.0)
    probe = probe_video(flv(), "v")
    assert probe == VideoProbe(
        format="FLV",
        content_type="video/x-flv",
        width=640,
        height=480,
        duration_seconds=4.0,
        fps=30.0,
        frame_count=120,
    )


def test_ogg_theora() -> None:
    data = ogg(theora_header(), 50 << 6)
    probe = probe_video(data, "v")
    assert probe == VideoProbe(
        format="OGG",
        content_type="video/ogg",
        width=320,
        height=240,
        duration_seconds=2.0,
        fps=25.0,
        frame_count=50,
    )
    assert sniff_media_type(data) == "video"


def test_unknown_video_names_the_allowed_formats() -> None:
    with pytest.raises(InvalidArgument) as info:
        probe_video(b"just some bytes, certainly no video" * 20, "inputs[0].video")
    error = info.value
    assert error.reason == "INVALID_VIDEO"
    assert error.violations[0].field == "inputs[0].video"
    assert ", ".join(VIDEO_FORMATS) in error.message


def test_image_passed_as_video_says_so() -> None:
    with pytest.raises(InvalidArgument) as info:
        probe_video(image_bytes("PNG"), "v")
    assert "is an image, not video" in info.value.message


# --- audio ----------------------------------------------------------------------------------


def test_wav() -> None:
    data = wav(1.5)
    assert probe_audio(data, "a") == AudioProbe(
        format="WAV",
        content_type="audio/wav",
        sample_rate=16000,
        duration_seconds=1.5,
        bit_rate=256000,
    )
    assert probe_audio(data[:2000], "a", total_size=len(data)).duration_seconds == 1.5
    assert sniff_media_type(data[:64]) == "audio"


def test_wav_from_a_streaming_writer_with_placeholder_size() -> None:
    data = bytearray(wav(1.0))
    position = data.index(b"data") + 4
    data[position : position + 4] = b"\xff\xff\xff\xff"
    assert probe_audio(bytes(data), "a").duration_seconds == pytest.approx(1.0)


def test_wav_with_zero_sample_rate_is_corrupt() -> None:
    data = bytearray(wav())
    fmt = data.index(b"fmt ") + 8
    data[fmt + 4 : fmt + 8] = bytes(4)
    with pytest.raises(InvalidArgument) as info:
        probe_audio(bytes(data), "a")
    assert info.value.reason == "INVALID_AUDIO"
    assert "sample rate" in info.value.message


def test_mp3_constant_bit_rate() -> None:
    data = mp3(100)
    probe = probe_audio(data, "a")
    assert (probe.format, probe.content_type, probe.sample_rate) == ("MP3", "audio/mpeg", 44100)
    assert probe.bit_rate == 128000
    assert probe.duration_seconds == pytest.approx(100 * MP3_FRAME_LENGTH * 8 / 128000)
    assert sniff_media_type(data[:1024]) == "audio"


def test_mp3_with_id3_tag_and_xing_header() -> None:
    data = id3(5000) + mp3(50, xing_frames=1000)
    probe = probe_audio(data, "a")
    assert probe.duration_seconds == pytest.approx(1000 * 1152 / 44100)
    assert sniff_media_type(data) == "audio"


def test_mp3_whose_cover_art_outgrows_the_streamed_prefix() -> None:
    data = id3(2 << 20) + mp3(10)
    probe = probe_audio(data[: 1 << 20], "a", total_size=len(data))
    assert probe.format == "MP3"


def test_id3_tag_followed_by_nothing_audio_is_corrupt() -> None:
    with pytest.raises(InvalidArgument) as info:
        probe_audio(id3(100) + b"not audio at all" * 10, "a")
    assert "ID3 tag is not followed by" in info.value.message


def test_flac() -> None:
    probe = probe_audio(flac(), "a")
    assert (probe.format, probe.sample_rate, probe.duration_seconds) == ("FLAC", 44100, 10.0)
    assert probe.content_type == "audio/flac"


def test_flac_without_streaminfo_is_corrupt() -> None:
    data = bytearray(flac())
    data[4] = 0x84  # first block claims to be a VORBIS_COMMENT
    with pytest.raises(InvalidArgument) as info:
        probe_audio(bytes(data), "a")
    assert "STREAMINFO" in info.value.message


def test_ogg_vorbis_and_opus() -> None:
    vorbis = probe_audio(ogg(vorbis_header(), 44100 * 3), "a")
    assert vorbis == AudioProbe(
        format="OGG",
        content_type="audio/ogg",
        sample_rate=44100,
        duration_seconds=3.0,
        bit_rate=128000,
    )
    opus = probe_audio(ogg(opus_header(), 48000 * 2 + 312), "a")
    assert (opus.format, opus.sample_rate, opus.duration_seconds) == ("OPUS", 48000, 2.0)


def test_m4a() -> None:
    data = mp4(b"M4A ", tracks=(trak(b"soun", sample_rate=44100),))
    probe = probe_audio(data, "a")
    assert (probe.format, probe.content_type, probe.sample_rate) == ("M4A", "audio/mp4", 44100)
    assert probe.duration_seconds == 2.0
    # An M4A brand identifies audio even before the moov box arrives.
    head = mp4(b"M4A ", moov_first=False)[:64]
    assert probe_audio(head, "a", total_size=10_000).format == "M4A"


def test_isom_with_audio_track_only_is_audio() -> None:
    data = mp4(b"isom", tracks=(trak(b"soun", sample_rate=22050),))
    assert probe_audio(data, "a").sample_rate == 22050


def test_mp4_video_is_not_audio() -> None:
    with pytest.raises(InvalidArgument) as info:
        probe_audio(mp4(), "a")
    assert "video (MP4), not audio" in info.value.message


def test_aac_adts() -> None:
    data = adts(43)
    probe = probe_audio(data, "a")
    assert (probe.format, probe.content_type, probe.sample_rate) == ("AAC", "audio/aac", 44100)
    assert probe.duration_seconds == pytest.approx(43 * 1024 / 44100)
    streamed = probe_audio(data[:1000], "a", total_size=len(data))
    assert streamed.duration_seconds == pytest.approx(probe.duration_seconds)
    assert sniff_media_type(data[:100]) == "audio"


def test_unknown_audio_names_the_allowed_formats() -> None:
    with pytest.raises(InvalidArgument) as info:
        probe_audio(b"\x00" * 100, "a")
    assert info.value.reason == "INVALID_AUDIO"
    assert ", ".join(AUDIO_FORMATS) in info.value.message


def test_sniff_unknown() -> None:
    assert sniff_media_type(b"") is None
    assert sniff_media_type(b"hello world") is None
    assert sniff_media_type(b"BM" + bytes(30)) is None  # "BM" alone is not a bitmap


# --- text -----------------------------------------------------------------------------------


def test_text() -> None:
    assert probe_text("héllo wörld ✓".encode(), "t") == TextProbe(char_count=13)
    assert probe_text(b"\xef\xbb\xbfabc", "t").char_count == 3  # the BOM is not content
    assert probe_text(b"", "t").char_count == 0


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b"abc\xffdef", 3),
        (b"ok \xc3\x28", 3),  # bad continuation byte
        (b"12345\xed\xa0\x80", 5),  # UTF-16 surrogate encoded in UTF-8
        (b"\xc0\xaf", 0),  # overlong
        ("ab€".encode()[:-1], 2),  # cut inside a character
    ],
)
def test_invalid_utf8_names_the_offset(data: bytes, offset: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        probe_text(data, "t")
    assert info.value.reason == "INVALID_TEXT"
    assert f"byte offset {offset}" in info.value.message


def test_nul_is_rejected_and_the_first_problem_wins() -> None:
    with pytest.raises(InvalidArgument) as info:
        probe_text(b"ab\x00cd\xff", "t")
    assert "NUL character at byte offset 2" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        probe_text(b"ab\xffcd\x00", "t")
    assert "byte offset 2" in info.value.message
    assert "NUL" not in info.value.message


# --- arbitrary bytes ------------------------------------------------------------------------

Probe = Callable[[bytes, str], object]
PROBES: list[Probe] = [probe_image, probe_video, probe_audio, probe_text]


def samples() -> list[bytes]:
    return [
        image_bytes("JPEG", (16, 16)),
        image_bytes("PNG", (16, 16)),
        image_bytes("WEBP", (16, 16)),
        image_bytes("GIF", (16, 16)),
        image_bytes("BMP", (8, 8)),
        image_bytes("TIFF", (8, 8)),
        mp4(),
        mp4(b"M4A ", tracks=(trak(b"soun", sample_rate=44100),)),
        webm(),
        avi(),
        mpeg_ts(),
        mpeg_ps(),
        flv(),
        ogg(theora_header(), 64),
        ogg(vorbis_header(), 44100),
        ogg(opus_header(), 48000),
        wav(0.01),
        flac(),
        id3(20) + mp3(3, xing_frames=3),
        adts(3),
    ]


SAMPLES = samples()


def only_invalid_argument(data: bytes) -> None:
    for probe in PROBES:
        with contextlib.suppress(InvalidArgument):
            probe(data, "f")
    for total in (None, len(data) * 3 + 1):
        for av_probe in (probe_video, probe_audio):
            with contextlib.suppress(InvalidArgument):
                av_probe(data, "f", total_size=total)
    assert sniff_media_type(data) in {"image", "video", "audio", None}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_raise_invalid_argument(data: bytes) -> None:
    only_invalid_argument(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SAMPLES),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=8),
    st.integers(min_value=0),
)
def test_mutated_files_only_raise_invalid_argument(
    sample: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(sample)
    for position, value in flips:
        data[position % len(data)] = value
    only_invalid_argument(bytes(data[: len(data) - cut % (len(data) + 1)]))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([s[:16] for s in SAMPLES]), st.binary(max_size=1024))
def test_signature_then_garbage_only_raises_invalid_argument(head: bytes, tail: bytes) -> None:
    only_invalid_argument(head + tail)
