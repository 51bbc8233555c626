"""App-wide input operations: rename, and re-encoding videos to browser-playable MP4.

`reencode` queues a server job and, with `wait`, polls it until it ended: the returned
job lists each input's outcome (a corrupt video is FAILED with details and keeps its
media; the others now play in every browser)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from datasetd.v1 import common_pb2, input_pb2
from datasetd.v1 import input_service_pb2 as api
from google.protobuf import field_mask_pb2

from service.client._rpc import Rpc, time_of
from service.client.dataset import InputInfo, to_input_info
from service.client.errors import JobFailedError
from service.client.progress import Progress, reporter
from service.client.versions import wait_for

_STATE_PREFIX = "REENCODE_JOB_STATE_"
_OUTCOME_PREFIX = "REENCODE_OUTCOME_"
SUCCEEDED = "SUCCEEDED"


class ReencodeFailedError(JobFailedError):
    """A re-encode job failed as a whole or was cancelled; `job.details` says why."""

    def __init__(self, job: ReencodeJobInfo) -> None:
        super().__init__(
            f"re-encode job {job.id} ended {job.state}: {job.details or 'no details'}",
            "REENCODE_JOB_FAILED",
        )
        self.job = job


@dataclass(frozen=True)
class ReencodeResultInfo:
    input_id: str
    # PENDING, REENCODED or FAILED.
    outcome: str
    details: str = ""
    duration_seconds: float = 0.0
    fps: float = 0.0
    codec: str = ""
    size: int = 0
    sha256: str = ""


@dataclass(frozen=True)
class ReencodeJobInfo:
    id: str
    # PENDING, RUNNING, SUCCEEDED, FAILED or CANCELLED.
    state: str
    percent_completed: int
    details: str
    results: list[ReencodeResultInfo]
    created_at: datetime | None = None

    @property
    def status(self) -> str:
        """The state as wait_for reads it (PENDING and IN_PROGRESS are still running)."""
        return "IN_PROGRESS" if self.state == "RUNNING" else self.state

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result["created_at"] = self.created_at.isoformat() if self.created_at else None
        return result


@dataclass(frozen=True)
class ReencodeCandidateInfo:
    """A video a browser could not play as it is (a dry run's finding)."""

    input_id: str
    video_format: str
    codec: str
    reason: str


def to_job_info(message: api.ReencodeJob) -> ReencodeJobInfo:
    return ReencodeJobInfo(
        id=message.id,
        state=api.ReencodeJobState.Name(message.state).removeprefix(_STATE_PREFIX),
        percent_completed=message.percent_completed,
        details=message.details,
        results=[
            ReencodeResultInfo(
                input_id=r.input_id,
                outcome=api.ReencodeOutcome.Name(r.outcome).removeprefix(_OUTCOME_PREFIX),
                details=r.details,
                duration_seconds=r.duration_seconds,
                fps=r.fps,
                codec=r.codec,
                size=r.size,
                sha256=r.sha256,
            )
            for r in message.results
        ],
        created_at=time_of(message, "created_at"),
    )


class Inputs:
    """Inputs of the client's app, whatever datasets hold them (`Client.inputs`)."""

    def __init__(self, rpc: Rpc) -> None:
        self.rpc = rpc

    def rename(self, input_id: str, title: str, request_id: str | None = None) -> InputInfo:
        """Sets an input's title (UpdateInputs of the title alone)."""
        response = self.rpc.app_call(
            self.rpc.inputs.UpdateInputs,
            api.UpdateInputsRequest,
            inputs=[input_pb2.Input(id=input_id, title=title)],
            action=common_pb2.PATCH_ACTION_MERGE,
            update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            request_id=request_id,
        )
        return to_input_info(response.inputs[0])

    def reencode_candidates(self, input_ids: list[str]) -> list[ReencodeCandidateInfo]:
        """Dry run: which of the videos a browser could not play as they are, and why."""
        response = self.rpc.app_call(
            self.rpc.inputs.ReencodeInputs,
            api.ReencodeInputsRequest,
            input_ids=input_ids,
            dry_run=True,
        )
        return [
            ReencodeCandidateInfo(c.input_id, c.video_format, c.codec, c.reason)
            for c in response.candidates
        ]

    def reencode(
        self,
        input_ids: list[str],
        wait: bool = True,
        timeout: float = 3600,
        show_progress: bool = False,
        request_id: str | None = None,
        progress: Progress | None = None,
    ) -> ReencodeJobInfo:
        """Re-encodes videos to H.264/AAC MP4 in a server job; with `wait`, returns the job
        once every input was attempted, or raises ReencodeFailedError."""
        response = self.rpc.app_call(
            self.rpc.inputs.ReencodeInputs,
            api.ReencodeInputsRequest,
            input_ids=input_ids,
            request_id=request_id,
        )
        job = to_job_info(response.job)
        if not wait:
            return job
        return wait_for(
            lambda: self.get_reencode_job(job.id),
            SUCCEEDED,
            ReencodeFailedError,
            timeout,
            f"re-encoding {len(input_ids)} videos",
            reporter(show_progress, progress),
        )

    def get_reencode_job(self, job_id: str) -> ReencodeJobInfo:
        response = self.rpc.app_call(
            self.rpc.inputs.GetReencodeJob, api.GetReencodeJobRequest, job_id=job_id
        )
        return to_job_info(response.job)

    def cancel_reencode_job(self, job_id: str) -> ReencodeJobInfo:
        """Stops a job between inputs; FailedPreconditionError when it already ended."""
        response = self.rpc.app_call(
            self.rpc.inputs.CancelReencodeJob, api.CancelReencodeJobRequest, job_id=job_id
        )
        return to_job_info(response.job)
