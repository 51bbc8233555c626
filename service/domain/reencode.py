"""Video re-encoding: ReencodeService (queue, dry run, follow, cancel) and Reencoder, the
REENCODE_VIDEOS job that turns stored videos into H.264/AAC MP4 that every browser plays.

The original of an input is never touched: the new media is written, verified and stored
under its own content address first, and only then does one transaction point the input
at it. Versions keep referencing the original (their `version_inputs.blob_key`), so the
orphan collector removes the old bytes only once nothing references them any more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from service.domain.auth import Permission, authorize
from service.domain.errors import (
    DomainError,
    FailedPrecondition,
    NotFound,
    Violations,
)
from service.domain.jobs import Job, JobFailed, JobKind, JobQueue, JobStatus, Progress
from service.domain.models import Input, MediaType, Principal, StoredBlob
from service.domain.ports import InputRepository, MediaProber, MediaStreams, TransactionManager
from service.domain.validation import check_batch_size, check_id

log = logging.getLogger(__name__)

MAX_INPUTS = 1000
# Bytes of the new file read for the probe: a faststart MP4 has its `moov` box up front.
PROBE_HEAD_BYTES = 8 * 1024 * 1024
DOWNLOAD_CHUNK = 1024 * 1024
# The largest output stored: the upload cap of the installation.
DEFAULT_MAX_OUTPUT_BYTES = 2 * 1024**3
OUTPUT_CODEC = "h264"
# ffmpeg reports durations to 1/100 s: the verification allows for that rounding.
DURATION_ROUNDING = 0.011
JOB_ID_MAX_DIGITS = 18


class ReencodeOutcome(enum.Enum):
    PENDING = "pending"
    REENCODED = "reencoded"
    FAILED = "failed"


@dataclass(frozen=True)
class ReencodeResult:
    input_id: str
    outcome: ReencodeOutcome = ReencodeOutcome.PENDING
    details: str = ""
    duration_seconds: float = 0.0
    fps: float = 0.0
    codec: str = ""
    size: int = 0
    sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        stored = dataclasses.asdict(self)
        stored["outcome"] = self.outcome.value
        del stored["input_id"]
        return stored

    @classmethod
    def from_json(cls, input_id: str, stored: dict[str, Any] | None) -> ReencodeResult:
        if not stored:
            return cls(input_id)
        names = {f.name for f in dataclasses.fields(cls)} - {"input_id", "outcome"}
        return cls(
            input_id,
            ReencodeOutcome(stored.get("outcome", "pending")),
            **{k: v for k, v in stored.items() if k in names},
        )


@dataclass(frozen=True)
class ReencodeJob:
    """A re-encode job as callers see it; state, percent and details are the job row's."""

    app_id: str
    job_id: int
    status: JobStatus
    percent: int
    details: str
    results: list[ReencodeResult]
    created_at: datetime | None = None


@dataclass(frozen=True)
class ReencodeCandidate:
    """A video a browser could not play as it is, and why."""

    input_id: str
    video_format: str
    codec: str
    reason: str


@dataclass(frozen=True)
class TranscodeReport:
    """What the transcoder learnt of the source while it read it."""

    source_duration: float = 0.0
    has_audio: bool = False


class TranscodeFailed(Exception):
    """The source could not be decoded or the output not written (the message says why)."""


class VideoTranscoder(Protocol):
    """Re-encodes a video file (implemented in service.media with the ffmpeg binary of the
    imageio-ffmpeg package)."""

    async def transcode(self, source: Path, target: Path) -> TranscodeReport:
        """Writes H.264/AAC MP4 with +faststart to `target`; TranscodeFailed when it cannot."""
        ...


class ReencodeRepository(Protocol):
    async def insert(self, app_id: str, job_id: int, input_ids: list[str]) -> None: ...

    async def get(self, app_id: str, job_id: int) -> ReencodeJob | None: ...

    async def record(self, app_id: str, job_id: int, result: ReencodeResult) -> None:
        """Stores the result of one input (replacing an earlier one)."""
        ...


class MediaReplacer(Protocol):
    async def replace_media(
        self, app_id: str, input_id: str, old: StoredBlob, new: StoredBlob, info: dict[str, Any]
    ) -> bool:
        """Points the input at `new` with its media info, if it still points at `old`;
        whether it did."""
        ...


def browser_problem(info: dict[str, Any]) -> str:
    """Why a browser could not play a video with this stored media info; "" when it can.
    Every browser plays H.264 in MP4; the stored info names the container (and the codec
    once re-encoded: MP4 of an unknown codec is taken as the H.264 most MP4 files hold)."""
    container = str(info.get("format", "")).upper()
    codec = str(info.get("codec", "")).lower()
    if container == "MP4":
        if codec and codec != OUTPUT_CODEC:
            return f"{codec} video in MP4 does not play in every browser; H.264 does"
        return ""
    if not container:
        return "the container is unknown; browsers play H.264/AAC in MP4"
    if container == "WEBM":
        return "WebM (VP8/VP9) does not play in every browser (Safari); H.264/AAC MP4 does"
    if container == "MOV":
        return "QuickTime (MOV) plays only in Safari; H.264/AAC MP4 plays everywhere"
    return f"{container} is not a container browsers play; H.264/AAC MP4 is"


def parse_job_id(violations: Violations, value: str) -> int:
    if not value:
        violations.add("job_id", "is required: the job.id of a ReencodeInputs response")
        return 0
    if not value.isascii() or not value.isdigit() or len(value) > JOB_ID_MAX_DIGITS:
        shown = value if len(value) <= 40 else value[:37] + "..."
        violations.add("job_id", f"must be a job id (decimal digits), got {shown!r}")
        return 0
    return int(value)


@dataclass(frozen=True)
class ReencodeService:
    inputs: InputRepository
    jobs: ReencodeRepository
    queue: JobQueue
    tx: TransactionManager

    async def start(
        self, principal: Principal, app_id: str, input_ids: list[str], *, dry_run: bool
    ) -> ReencodeJob | list[ReencodeCandidate]:
        """The queued job, or for a dry run the videos a browser could not play."""
        authorize(principal, app_id, Permission.WRITE)
        check_batch_size("input_ids", "input id", len(input_ids), MAX_INPUTS)
        violations = Violations()
        first: dict[str, int] = {}
        for index, input_id in enumerate(input_ids):
            check_id(violations, f"input_ids[{index}]", input_id)
            if input_id in first:
                violations.add(f"input_ids[{index}]", f"duplicate of input_ids[{first[input_id]}]")
            first.setdefault(input_id, index)
        violations.raise_if_any()
        async with self.tx.transaction():
            found = {i.id: i for i in await self.inputs.get_many(app_id, input_ids)}
            videos = self._check_videos(app_id, input_ids, found)
            if dry_run:
                return [
                    ReencodeCandidate(
                        video.id,
                        str(video.media_info.get("format", "")),
                        str(video.media_info.get("codec", "")),
                        problem,
                    )
                    for video in videos
                    if (problem := browser_problem(video.media_info))
                ]
            job_id = await self.queue.enqueue(
                JobKind.REENCODE_VIDEOS, app_id, {"input_ids": input_ids}
            )
            await self.jobs.insert(app_id, job_id, input_ids)
            job = await self.jobs.get(app_id, job_id)
        assert job is not None
        return job

    @staticmethod
    def _check_videos(app_id: str, input_ids: list[str], found: dict[str, Input]) -> list[Input]:
        violations = Violations()
        videos = []
        for index, input_id in enumerate(input_ids):
            item = found.get(input_id)
            field = f"input_ids[{index}]"
            if item is None:
                continue
            if item.media_type is not MediaType.VIDEO:
                violations.add(field, f"input {input_id!r} is {item.media_type.value}, not video")
            elif item.blob is None:
                violations.add(
                    field, f"input {input_id!r} references a video by URL; none is stored"
                )
            else:
                videos.append(item)
        missing = [i for i in input_ids if i not in found]
        if missing:
            raise NotFound.in_app("input", app_id, missing[0])
        violations.raise_if_any("NOT_A_STORED_VIDEO")
        return videos

    async def get(self, principal: Principal, app_id: str, job_id: str) -> ReencodeJob:
        authorize(principal, app_id, Permission.READ)
        number = self._job_number(job_id)
        async with self.tx.transaction():
            return await self._require(app_id, number)

    async def cancel(self, principal: Principal, app_id: str, job_id: str) -> ReencodeJob:
        authorize(principal, app_id, Permission.WRITE)
        number = self._job_number(job_id)
        async with self.tx.transaction():
            current = await self._require(app_id, number)
            if not await self.queue.cancel(number):
                raise FailedPrecondition(
                    f"re-encode job {job_id} already ended ({current.status.value}); "
                    "there is nothing to cancel",
                    reason="REENCODE_JOB_ENDED",
                    metadata={"status": current.status.value},
                )
            return await self._require(app_id, number)

    @staticmethod
    def _job_number(job_id: str) -> int:
        violations = Violations()
        number = parse_job_id(violations, job_id)
        violations.raise_if_any()
        return number

    async def _require(self, app_id: str, job_id: int) -> ReencodeJob:
        job = await self.jobs.get(app_id, job_id)
        if job is None:
            raise NotFound.in_app("reencode_job", app_id, str(job_id))
        return job


class _InputFailed(Exception):
    """One input cannot be re-encoded; the job reports it and goes on."""


@dataclass(frozen=True)
class Reencoder:
    """The REENCODE_VIDEOS job handler.

    Inputs are done one at a time, each committed on its own (its result with the input's
    new media), so a rerun after a crash skips those already re-encoded. Cancellation is
    noticed at the progress report between inputs."""

    inputs: InputRepository
    media: MediaReplacer
    jobs: ReencodeRepository
    streams: MediaStreams
    prober: MediaProber
    transcoder: VideoTranscoder
    tx: TransactionManager
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES

    async def run(self, job: Job, progress: Progress) -> None:
        input_ids = job.payload.get("input_ids")
        if not isinstance(input_ids, list) or not all(isinstance(i, str) for i in input_ids):
            raise JobFailed(f"malformed re-encode job payload {job.payload!r}")
        current = await self.jobs.get(job.app_id, job.id)
        if current is None:
            raise JobFailed(f"re-encode job {job.id} has no record")
        done = {r.input_id for r in current.results if r.outcome is not ReencodeOutcome.PENDING}
        for index, input_id in enumerate(input_ids):
            # Raises JobCancelled once the job was cancelled: between inputs, never within.
            await progress(index * 100 // len(input_ids))
            if input_id in done:
                continue
            try:
                result = await self._reencode(job.app_id, job.id, input_id)
            except _InputFailed as failed:
                result = ReencodeResult(input_id, ReencodeOutcome.FAILED, str(failed))
                await self.jobs.record(job.app_id, job.id, result)
            log.info("re-encode job %s: %s %s", job.id, input_id, result.outcome.value)
        await progress(100)

    async def failed(self, job: Job, message: str) -> None:
        """Nothing to record: the job row carries the failure, and each input keeps the
        media it had unless its re-encode committed."""

    async def _reencode(self, app_id: str, job_id: int, input_id: str) -> ReencodeResult:
        found = await self.inputs.get_many(app_id, [input_id])
        if not found:
            raise _InputFailed("the input was deleted")
        original = found[0]
        if original.media_type is not MediaType.VIDEO or original.blob is None:
            raise _InputFailed("the input has no stored video")
        old = original.blob
        with tempfile.TemporaryDirectory(prefix="datasetd-reencode-") as workdir:
            source, target = Path(workdir) / "source", Path(workdir) / "output.mp4"
            await self._download(old, source)
            try:
                report = await self.transcoder.transcode(source, target)
            except TranscodeFailed as exc:
                raise _InputFailed(f"cannot be re-encoded: {exc}") from None
            info = self._verify(original, target, report)
            new = await self._store(target, info["content_type"])
        media_info = {k: v for k, v in info.items() if k != "content_type"}
        result = ReencodeResult(
            input_id,
            ReencodeOutcome.REENCODED,
            duration_seconds=float(media_info.get("duration_seconds", 0.0)),
            fps=float(media_info.get("fps", 0.0)),
            codec=OUTPUT_CODEC,
            size=new.size,
            sha256=new.sha256,
        )
        async with self.tx.transaction():
            if not await self.media.replace_media(app_id, input_id, old, new, media_info):
                raise _InputFailed("the input was deleted or its media changed meanwhile")
            await self.jobs.record(app_id, job_id, result)
        return result

    async def _download(self, blob: StoredBlob, path: Path) -> None:
        with path.open("wb") as out:
            async with contextlib.aclosing(self.streams.stream(blob, DOWNLOAD_CHUNK)) as chunks:
                async for chunk in chunks:
                    out.write(chunk)

    def _verify(self, original: Input, target: Path, report: TranscodeReport) -> dict[str, Any]:
        """The media info of the output, probed with the service's own probes; the output
        must be non-empty and last as long as the original, within one frame."""
        size = target.stat().st_size if target.exists() else 0
        if size == 0:
            raise _InputFailed("the re-encoded file is empty")
        if size > self.max_output_bytes:
            raise _InputFailed(f"the re-encoded file has {size} bytes, over the cap")
        with target.open("rb") as handle:
            head = handle.read(PROBE_HEAD_BYTES)
        try:
            content_type, info = self.prober.probe(MediaType.VIDEO, head, "output", size)
        except DomainError as exc:
            raise _InputFailed(f"the re-encoded file does not probe as video: {exc}") from None
        if info.get("format") != "MP4":
            raise _InputFailed(f"the re-encoded file is {info.get('format')!r}, not MP4")
        duration = float(info.get("duration_seconds") or 0.0)
        expected = float(original.media_info.get("duration_seconds") or 0.0)
        expected = expected or report.source_duration
        fps = float(info.get("fps") or 0.0) or float(original.media_info.get("fps") or 0.0)
        frame = 1.0 / fps if fps > 0 else 0.1
        if duration <= 0:
            raise _InputFailed("the re-encoded file has no duration: nothing was decoded")
        if expected > 0 and abs(duration - expected) > frame + DURATION_ROUNDING:
            raise _InputFailed(
                f"the re-encoded file lasts {duration:.3f} s, the original {expected:.3f} s "
                f"(more than one frame apart): the original is damaged"
            )
        info["codec"] = OUTPUT_CODEC
        info["audio_codec"] = "aac" if report.has_audio else ""
        info["size"] = size
        info["content_type"] = content_type
        return info

    async def _store(self, path: Path, content_type: str) -> StoredBlob:
        """Streams the file to a temporary object, then publishes it under its content
        address (its blobs row is touched before the object appears)."""
        staged = self.streams.stage(self.max_output_bytes)
        try:
            with path.open("rb") as handle:
                while chunk := handle.read(DOWNLOAD_CHUNK):
                    await staged.write(chunk)
            await staged.finish()
            return await staged.publish(content_type)
        except BaseException:
            await staged.discard()
            raise
