"""Video re-encoding with the ffmpeg binary that the imageio-ffmpeg package ships (installed
with the service from PyPI; nothing is downloaded at run time).

The output is what every browser plays: H.264 (yuv420p, even dimensions) with AAC audio
when the source has audio, in MP4 with the `moov` box up front (`+faststart`) so that
playback starts before the download ends."""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path

import imageio_ffmpeg  # type: ignore[import-untyped]

from service.domain.reencode import TranscodeFailed, TranscodeReport

# The last lines of ffmpeg's report say why it failed.
ERROR_TAIL_CHARS = 400
_DURATION = re.compile(rb"Duration: (\d+):(\d{2}):(\d{2}(?:\.\d+)?)")
_INPUT_AUDIO = re.compile(rb"Stream #0:\d+.*?: Audio: ")


def ffmpeg_exe() -> str:
    exe: str = imageio_ffmpeg.get_ffmpeg_exe()
    return exe


def reencode_command(source: Path, target: Path) -> list[str]:
    return [
        ffmpeg_exe(),
        "-nostdin",
        "-hide_banner",
        "-y",
        "-i",
        str(source),
        # The first video stream and, when there is one, the first audio stream.
        "-map",
        "0:v:0",
        "-map",
        "0:a:0?",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        # yuv420p needs even dimensions; full-range sources (MJPEG decodes to yuvj420p)
        # are converted to the limited range, or the output would stay yuvj420p.
        "-vf",
        "scale=trunc(iw/2)*2:trunc(ih/2)*2:out_range=tv,format=yuv420p",
        "-c:a",
        "aac",
        "-movflags",
        "+faststart",
        "-f",
        "mp4",
        str(target),
    ]


def _report(stderr: bytes) -> TranscodeReport:
    # ffmpeg describes its input first ("Input #0"), then how streams map to the output.
    described = stderr.split(b"Stream mapping:", 1)[0]
    duration = 0.0
    if match := _DURATION.search(described):
        hours, minutes, seconds = match.groups()
        duration = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return TranscodeReport(duration, _INPUT_AUDIO.search(described) is not None)


class FfmpegTranscoder:
    """The domain's VideoTranscoder, one ffmpeg process per video."""

    async def transcode(self, source: Path, target: Path) -> TranscodeReport:
        process = await asyncio.create_subprocess_exec(
            *reencode_command(source, target),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, stderr = await process.communicate()
        except BaseException:
            # Cancelled (the job stopped): the process must not outlive it.
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            tail = stderr.decode("utf-8", "replace").strip()[-ERROR_TAIL_CHARS:]
            last = tail.splitlines()[-1] if tail else f"exit status {process.returncode}"
            raise TranscodeFailed(f"ffmpeg could not decode it ({last})")
        return _report(stderr)
