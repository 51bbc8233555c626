"""The pure parts of video re-encoding: which videos browsers play, job ids, the ffmpeg
command and what is read from ffmpeg's report."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.domain.errors import Violations
from service.domain.reencode import (
    ReencodeOutcome,
    ReencodeResult,
    browser_problem,
    parse_job_id,
)
from service.media.transcode import _report, ffmpeg_exe, reencode_command


@pytest.mark.parametrize(
    ("info", "playable"),
    [
        ({"format": "MP4"}, True),
        ({"format": "MP4", "codec": "h264"}, True),
        ({"format": "MP4", "codec": "hevc"}, False),
        ({"format": "WEBM"}, False),
        ({"format": "AVI"}, False),
        ({"format": "MOV"}, False),
        ({"format": "FLV"}, False),
        ({}, False),
    ],
)
def test_browser_problem(info: dict[str, str], playable: bool) -> None:
    problem = browser_problem(info)
    assert (problem == "") is playable
    if info.get("format") == "AVI":
        assert problem.startswith("AVI is not a container browsers play")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", 1), ("123456789012345678", 123456789012345678)],
)
def test_job_ids_are_decimal_numbers(text: str, expected: int) -> None:
    violations = Violations()
    assert parse_job_id(violations, text) == expected
    violations.raise_if_any()


@pytest.mark.parametrize("text", ["", "x1", "-1", "1.0", "١٢", "1" * 19, " 1"])
def test_bad_job_ids_name_the_field(text: str) -> None:
    violations = Violations()
    parse_job_id(violations, text)
    with pytest.raises(Exception) as raised:
        violations.raise_if_any()
    assert [v.field for v in raised.value.violations] == ["job_id"]  # type: ignore[attr-defined]


def test_results_round_trip_through_json() -> None:
    result = ReencodeResult("a", ReencodeOutcome.REENCODED, "", 2.0, 10.0, "h264", 5, "ab")
    assert ReencodeResult.from_json("a", result.to_json()) == result
    assert ReencodeResult.from_json("b", None) == ReencodeResult("b", ReencodeOutcome.PENDING)


def test_the_command_makes_browser_playable_mp4_with_the_packaged_ffmpeg() -> None:
    command = reencode_command(Path("in"), Path("out.mp4"))
    assert command[0] == ffmpeg_exe() and Path(command[0]).is_file()
    joined = " ".join(command)
    for part in ("-c:v libx264", "-pix_fmt yuv420p", "-c:a aac", "-movflags +faststart"):
        assert part in joined
    # Audio only when there is some: the `?` makes the map optional.
    assert "-map 0:a:0?" in joined


def test_report_reads_the_input_description_only() -> None:
    stderr = (
        b"Input #0, matroska,webm, from 'x':\n  Duration: 00:01:02.50, start: 0.0\n"
        b"  Stream #0:0: Video: vp9, yuv420p, 160x120\n"
        b"  Stream #0:1: Audio: opus, 48000 Hz\n"
        b"Stream mapping:\n  Stream #0:1 -> #0:1 (opus -> aac)\n"
        b"  Stream #0:1: Audio: aac (LC)\n  Duration: 00:00:09.00\n"
    )
    report = _report(stderr)
    assert report.source_duration == 62.5 and report.has_audio
    silent = _report(b"  Duration: N/A\n  Stream #0:0: Video: mjpeg\nStream mapping:\n")
    assert silent.source_duration == 0.0 and not silent.has_audio
