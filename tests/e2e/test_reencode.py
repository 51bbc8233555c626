"""Video re-encoding as a caller sees it: real WebM and AVI files made here with the same
ffmpeg binary, re-encoded by the real job runner, downloaded and decoded back."""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import imageio_ffmpeg  # type: ignore[import-untyped]
import pytest
from datasetd.v1 import data_pb2, input_pb2
from datasetd.v1 import input_service_pb2 as api

from service.app import Running
from service.domain.jobs import Job, JobKind
from service.domain.models import Principal
from service.domain.reencode import (
    ReencodeJob,
    ReencodeOutcome,
    Reencoder,
    ReencodeService,
    TranscodeReport,
)
from service.media.probe import MediaProbes
from service.media.transcode import FfmpegTranscoder
from service.storage.blobs import ContentAddressedBlobStore, content_key, content_suffix
from service.storage.db import Database
from service.storage.inputs import PgInputRepository
from service.storage.reencode import PgReencodeRepository
from tests.conftest import Caller, Stack, object_store
from tests.e2e.test_cli import Cli, cli_env
from tests.e2e.test_exports import PROTOBUF, batches, by_id, exported, options
from tests.e2e.test_inputs import create, image_input, new_dataset
from tests.e2e.test_versions import build
from tests.helpers import call_error
from tests.snapshots import HeldJobs

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
JOB_TIMEOUT_SECONDS = 60.0
RATE = 10
SECONDS = 2
_FRAMES = re.compile(r"frame=\s*(\d+)")
_DURATION = re.compile(r"Duration: (\d+):(\d{2}):(\d{2}(?:\.\d+)?)")


def make_video(tmp: Path, name: str, codec_args: list[str], *, audio: bool = False) -> bytes:
    path = tmp / name
    command = [FFMPEG, "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i"]
    command.append(f"testsrc=duration={SECONDS}:size=160x120:rate={RATE}")
    if audio:
        command += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={SECONDS}", "-shortest"]
    subprocess.run([*command, *codec_args, str(path)], check=True)
    return path.read_bytes()


def decode(tmp: Path, data: bytes) -> tuple[float, int, str]:
    """Duration and decoded video frame count of a file, and ffmpeg's description of it."""
    path = tmp / f"decode-{hashlib.sha256(data).hexdigest()[:12]}"
    path.write_bytes(data)
    done = subprocess.run(
        [FFMPEG, "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v:0", "-f", "null", "-"],
        capture_output=True,
        text=True,
        check=True,
    )
    match = _DURATION.search(done.stderr)
    assert match, done.stderr
    hours, minutes, seconds = match.groups()
    duration = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    frames = [int(f) for f in _FRAMES.findall(done.stderr)]
    assert frames, done.stderr
    return duration, frames[-1], done.stderr.split("Stream mapping:")[0]


def video_input(input_id: str, data: bytes, dataset_id: str = "") -> input_pb2.Input:
    item = input_pb2.Input(id=input_id, data=data_pb2.Data(video=data_pb2.Video(base64=data)))
    if dataset_id:
        item.dataset_ids.append(dataset_id)
    return item


async def reencode(
    stub: Inputs, caller: Caller, input_ids: list[str], *, dry_run: bool = False
) -> api.ReencodeInputsResponse:
    response: api.ReencodeInputsResponse = await stub.ReencodeInputs(
        api.ReencodeInputsRequest(app_id=caller.app_id, input_ids=input_ids, dry_run=dry_run),
        metadata=caller.metadata,
    )
    return response


async def get_job(stub: Inputs, caller: Caller, job_id: str) -> api.ReencodeJob:
    response = await stub.GetReencodeJob(
        api.GetReencodeJobRequest(app_id=caller.app_id, job_id=job_id), metadata=caller.metadata
    )
    return response.job


ENDED = (
    api.REENCODE_JOB_STATE_SUCCEEDED,
    api.REENCODE_JOB_STATE_FAILED,
    api.REENCODE_JOB_STATE_CANCELLED,
)


async def finished(stub: Inputs, caller: Caller, job_id: str) -> api.ReencodeJob:
    deadline = asyncio.get_running_loop().time() + JOB_TIMEOUT_SECONDS
    while True:
        job = await get_job(stub, caller, job_id)
        if job.state in ENDED:
            return job
        assert asyncio.get_running_loop().time() < deadline, f"job still {job}"
        await asyncio.sleep(0.1)


async def download_input(stub: Inputs, caller: Caller, input_id: str) -> tuple[str, bytes]:
    messages = [
        m
        async for m in stub.DownloadInput(
            api.DownloadInputRequest(app_id=caller.app_id, input_id=input_id),
            metadata=caller.metadata,
        )
    ]
    return messages[0].content_type, b"".join(m.chunk for m in messages)


async def get_input(stub: Inputs, caller: Caller, input_id: str) -> input_pb2.Input:
    response = await stub.GetInput(
        api.GetInputRequest(app_id=caller.app_id, input_id=input_id), metadata=caller.metadata
    )
    return response.input


async def test_webm_and_avi_become_browser_playable_mp4_and_versions_keep_the_originals(
    stack: Stack,
    db: Database,
    inputs: Inputs,
    datasets: Datasets,
    versions: Versions,
    caller: Caller,
    tmp_path: Path,
) -> None:
    originals = {
        "webm": make_video(
            tmp_path,
            "a.webm",
            ["-c:v", "libvpx-vp9", "-b:v", "200k", "-c:a", "libopus"],
            audio=True,
        ),
        "avi": make_video(tmp_path, "b.avi", ["-c:v", "mjpeg"]),
    }
    await new_dataset(datasets, caller, "ds")
    created = await create(
        inputs, caller, [video_input(k, v, "ds") for k, v in originals.items()], atomic=True
    )
    assert created.created_count == 2
    await build(versions, caller, "ds", "before")

    # The dry run names both, with their container and why, and queues nothing.
    dry = await reencode(inputs, caller, ["webm", "avi"], dry_run=True)
    assert not dry.HasField("job")
    assert [(c.input_id, c.video_format) for c in dry.candidates] == [
        ("webm", "WEBM"),
        ("avi", "AVI"),
    ]
    assert "Safari" in dry.candidates[0].reason
    assert "AVI is not a container browsers play" in dry.candidates[1].reason

    started = await reencode(inputs, caller, ["webm", "avi"])
    assert started.job.id and not started.candidates
    assert [r.input_id for r in started.job.results] == ["webm", "avi"]
    job = await finished(inputs, caller, started.job.id)
    assert job.state == api.REENCODE_JOB_STATE_SUCCEEDED, job
    assert job.percent_completed == 100

    for result in job.results:
        assert result.outcome == api.REENCODE_OUTCOME_REENCODED, result
        assert result.codec == "h264"
        content_type, data = await download_input(inputs, caller, result.input_id)
        assert content_type == "video/mp4"
        assert len(data) == result.size and hashlib.sha256(data).hexdigest() == result.sha256
        duration, frames, described = decode(tmp_path, data)
        # yuv420p, not the full-range yuvj420p an MJPEG source decodes to.
        assert re.search(r"Video: h264 .*, yuv420p[(,]", described), described
        if result.input_id == "webm":
            assert "Audio: aac" in described
        # faststart: the moov box comes before the media data.
        assert 0 <= data.find(b"moov") < data.find(b"mdat")
        original_duration, original_frames, _ = decode(tmp_path, originals[result.input_id])
        assert abs(frames - original_frames) <= 1, (frames, original_frames)
        assert abs(duration - original_duration) <= 1 / RATE + 0.011
        assert abs(result.duration_seconds - SECONDS) <= 1 / RATE
        assert result.fps == RATE
        stored = await get_input(inputs, caller, result.input_id)
        info = stored.data.video.video_info
        assert info.video_format == "MP4"
        assert abs(info.duration_seconds - SECONDS) <= 1 / RATE and info.fps == RATE
        assert (info.width, info.height) == (160, 120)

    # Now playable: a dry run lists nothing.
    assert not (await reencode(inputs, caller, ["webm", "avi"], dry_run=True)).candidates

    # The version made before still holds the original bytes, even once the orphan
    # collector has run past the grace period of the originals.
    keys = [content_key(hashlib.sha256(data).hexdigest()) for data in originals.values()]
    await db.execute(
        "UPDATE blobs SET last_seen = now() - interval '1 day' WHERE key = ANY($1::text[])", keys
    )
    await ContentAddressedBlobStore(db, object_store(stack)).collect_orphans(
        timedelta(hours=1), 10_000
    )
    assert await db.fetchval("SELECT count(*) FROM blobs WHERE key = ANY($1::text[])", keys) == 2
    _, archive = await exported(
        versions, caller, "ds", "before", PROTOBUF, options(embed_media=True)
    )
    kept = by_id(batches(archive, PROTOBUF)["all"])
    assert {k: kept[k].data.video.base64 for k in originals} == originals


async def test_a_corrupt_video_is_reported_and_kept(
    inputs: Inputs, caller: Caller, tmp_path: Path
) -> None:
    good = make_video(tmp_path, "good.avi", ["-c:v", "mjpeg"])
    webm = make_video(tmp_path, "c.webm", ["-c:v", "libvpx", "-b:v", "200k"])
    noise = random.Random(7)
    # The headers stay intact (the upload's probe accepts it); the frames are noise.
    corrupt = webm[:1000] + bytes(noise.randrange(256) for _ in range(len(webm) - 1000))
    await create(inputs, caller, [video_input("bad", corrupt), video_input("good", good)])
    started = await reencode(inputs, caller, ["bad", "good"])
    job = await finished(inputs, caller, started.job.id)
    assert job.state == api.REENCODE_JOB_STATE_SUCCEEDED
    bad, ok = job.results
    assert bad.outcome == api.REENCODE_OUTCOME_FAILED and bad.details
    assert ok.outcome == api.REENCODE_OUTCOME_REENCODED
    content_type, data = await download_input(inputs, caller, "bad")
    assert (content_type, data) == ("video/webm", corrupt)
    assert (await download_input(inputs, caller, "good"))[0] == "video/mp4"


async def test_bad_requests_name_the_field(inputs: Inputs, caller: Caller, tmp_path: Path) -> None:
    video = make_video(tmp_path, "v.avi", ["-c:v", "mjpeg"])
    await create(inputs, caller, [video_input("vid", video), image_input("img")])

    error = await call_error(reencode(inputs, caller, ["vid", "img"]))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not video" in error.fields["input_ids[1]"]
    error = await call_error(reencode(inputs, caller, ["img"], dry_run=True))
    assert "input_ids[0]" in error.fields
    error = await call_error(reencode(inputs, caller, []))
    assert "input_ids" in error.fields
    error = await call_error(reencode(inputs, caller, ["vid", "vid", "no such"]))
    assert error.fields == {
        "input_ids[1]": "duplicate of input_ids[0]",
        "input_ids[2]": error.fields["input_ids[2]"],
    }
    error = await call_error(reencode(inputs, caller, ["vid"] * 1001))
    assert error.reason == "BATCH_TOO_LARGE"
    assert (await call_error(reencode(inputs, caller, ["gone"]))).code == grpc.StatusCode.NOT_FOUND
    error = await call_error(get_job(inputs, caller, "x1"))
    assert "job_id" in error.fields
    assert (await call_error(get_job(inputs, caller, "999999999"))).code == (
        grpc.StatusCode.NOT_FOUND
    )
    # Nothing was queued and the video is untouched.
    assert await download_input(inputs, caller, "vid") == ("video/x-msvideo", video)


async def test_cancel_stops_between_inputs(inputs: Inputs, caller: Caller, tmp_path: Path) -> None:
    ids = [f"v{n}" for n in range(10)]
    originals = {}
    for n, input_id in enumerate(ids):
        originals[input_id] = make_video(
            tmp_path, f"{input_id}.avi", ["-c:v", "mjpeg", "-q:v", str(2 + n)]
        )
    await create(inputs, caller, [video_input(i, originals[i]) for i in ids], atomic=True)
    started = await reencode(inputs, caller, ids)
    # Cancelled while it runs: once the first input is done.
    deadline = asyncio.get_running_loop().time() + JOB_TIMEOUT_SECONDS
    while not any(
        r.outcome == api.REENCODE_OUTCOME_REENCODED
        for r in (await get_job(inputs, caller, started.job.id)).results
    ):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    cancelled = await inputs.CancelReencodeJob(
        api.CancelReencodeJobRequest(app_id=caller.app_id, job_id=started.job.id),
        metadata=caller.metadata,
    )
    assert cancelled.job.state == api.REENCODE_JOB_STATE_CANCELLED
    job = await finished(inputs, caller, started.job.id)
    assert job.state == api.REENCODE_JOB_STATE_CANCELLED
    pending = [r.input_id for r in job.results if r.outcome == api.REENCODE_OUTCOME_PENDING]
    done = [r.input_id for r in job.results if r.outcome == api.REENCODE_OUTCOME_REENCODED]
    # Stopped between inputs: what was done stays done, the rest was never started.
    assert done and pending and len(done) + len(pending) == len(ids), job
    assert ids[: len(done)] == done
    for input_id in done:
        assert (await download_input(inputs, caller, input_id))[0] == "video/mp4"
    for input_id in pending:
        assert (await download_input(inputs, caller, input_id))[1] == originals[input_id]
    error = await call_error(
        inputs.CancelReencodeJob(
            api.CancelReencodeJobRequest(app_id=caller.app_id, job_id=started.job.id),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_cli_reencode_dry_run_job_and_rename(
    server: Running, inputs: Inputs, caller: Caller, tmp_path: Path
) -> None:
    cli = Cli(cli_env(server, caller))
    video = make_video(tmp_path, "cli.avi", ["-c:v", "mjpeg"])
    await create(inputs, caller, [video_input("clip", video), image_input("img")])

    found = await cli.json("inputs", "reencode", "clip", "--dry-run")
    assert [(c["input_id"], c["video_format"]) for c in found] == [("clip", "AVI")]
    job = await cli.json("inputs", "reencode", "clip", "--no-progress")
    assert [(r["input_id"], r["outcome"], r["codec"]) for r in job] == [
        ("clip", "REENCODED", "h264")
    ]
    assert await cli.json("inputs", "reencode", "clip", "--dry-run") == []
    refused = await cli("inputs", "reencode", "img")
    assert refused.code != 0 and "input_ids[0]" in refused.stderr

    renamed = await cli.json("inputs", "rename", "clip", "A clip")
    assert renamed["title"] == "A clip"
    assert (await get_input(inputs, caller, "clip")).title == "A clip"


async def test_a_version_created_right_after_the_reencode_holds_the_new_media(
    db: Database,
    inputs: Inputs,
    datasets: Datasets,
    versions: Versions,
    caller: Caller,
    tmp_path: Path,
) -> None:
    """The re-encode's transaction refreshes the input's content: a version created as soon
    as the job ends refers to the new media, in its content and in the original it keeps
    alive, and exports it (versions are READY when created: there is no later build that
    could read the input between the two)."""
    original = make_video(tmp_path, "late.avi", ["-c:v", "mjpeg"])
    await new_dataset(datasets, caller, "ds")
    await create(inputs, caller, [video_input("late", original, "ds")])
    started = await reencode(inputs, caller, ["late"])
    result = (await finished(inputs, caller, started.job.id)).results[0]
    assert result.outcome == api.REENCODE_OUTCOME_REENCODED
    await build(versions, caller, "ds", "late")

    row = await db.fetchrow(
        "SELECT v.blob_key, c.data FROM version_inputs v"
        " JOIN input_contents c ON c.hash = v.content_hash"
        " WHERE v.app_id = $1 AND v.dataset_id = 'ds' AND v.version_id = 'late'",
        caller.app_id,
    )
    assert row is not None and row["blob_key"] == content_key(result.sha256)
    assert content_suffix(result.sha256).encode() in row["data"]
    assert content_suffix(hashlib.sha256(original).hexdigest()).encode() not in row["data"]
    _, archive = await exported(versions, caller, "ds", "late", PROTOBUF, options(embed_media=True))
    captured = by_id(batches(archive, PROTOBUF)["all"])["late"].data.video
    assert hashlib.sha256(captured.base64).hexdigest() == result.sha256
    assert captured.video_info.video_format == "MP4"


class CountingTranscoder(FfmpegTranscoder):
    def __init__(self) -> None:
        self.sources: list[Path] = []

    async def transcode(self, source: Path, target: Path) -> TranscodeReport:
        self.sources.append(source)
        return await super().transcode(source, target)


async def test_a_rerun_after_a_crash_reencodes_only_what_is_left(
    server: Running, inputs: Inputs, caller: Caller, tmp_path: Path
) -> None:
    db = server.resources.db
    videos = {
        f"r{n}": make_video(tmp_path, f"r{n}.avi", ["-c:v", "mjpeg", "-q:v", str(3 + n)])
        for n in range(2)
    }
    await create(inputs, caller, [video_input(k, v) for k, v in videos.items()], atomic=True)
    reencodes = PgReencodeRepository(db)
    service = ReencodeService(PgInputRepository(db), reencodes, HeldJobs(db), db)
    principal = Principal("test", caller.app_id, frozenset({"read", "write"}))
    queued = await service.start(principal, caller.app_id, list(videos), dry_run=False)
    assert isinstance(queued, ReencodeJob)
    job = Job(queued.job_id, JobKind.REENCODE_VIDEOS, caller.app_id, {"input_ids": list(videos)})

    def handler(transcoder: FfmpegTranscoder) -> Reencoder:
        blobs = ContentAddressedBlobStore(db, server.resources.objects)
        inputs_repo = PgInputRepository(db)
        return Reencoder(inputs_repo, inputs_repo, reencodes, blobs, MediaProbes(), transcoder, db)

    reports: list[int] = []

    async def crash_after_the_first(percent: int) -> None:
        reports.append(percent)
        if len(reports) == 2:
            raise RuntimeError("the process died")

    first = CountingTranscoder()
    with pytest.raises(RuntimeError):
        await handler(first).run(job, crash_after_the_first)
    assert reports == [0, 50] and len(first.sources) == 1
    halfway = await reencodes.get(caller.app_id, job.id)
    assert halfway is not None
    assert [r.outcome for r in halfway.results] == [
        ReencodeOutcome.REENCODED,
        ReencodeOutcome.PENDING,
    ]
    done_first = halfway.results[0]

    second = CountingTranscoder()
    await handler(second).run(job, no_progress_until_done)
    assert len(second.sources) == 1  # r0 was not re-encoded again
    ended = await reencodes.get(caller.app_id, job.id)
    assert ended is not None
    assert [r.outcome for r in ended.results] == [ReencodeOutcome.REENCODED] * 2
    assert ended.results[0] == done_first
    for result in ended.results:
        content_type, data = await download_input(inputs, caller, result.input_id)
        assert content_type == "video/mp4"
        assert hashlib.sha256(data).hexdigest() == result.sha256


async def no_progress_until_done(percent: int) -> None:
    assert 0 <= percent <= 100
