"""The video re-encode RPCs of InputService: decode, call the domain, encode."""

from __future__ import annotations

from dataclasses import dataclass

from datasetd.v1 import input_service_pb2 as api

from service.api.interceptors import current_principal
from service.api.rpc import Context, mutation
from service.domain.idempotency import Idempotency
from service.domain.jobs import JobStatus
from service.domain.models import Principal
from service.domain.reencode import (
    ReencodeCandidate,
    ReencodeJob,
    ReencodeOutcome,
    ReencodeResult,
    ReencodeService,
)
from service.wire.timestamps import set_timestamp

STATES = {
    JobStatus.PENDING: api.REENCODE_JOB_STATE_PENDING,
    JobStatus.RUNNING: api.REENCODE_JOB_STATE_RUNNING,
    JobStatus.SUCCEEDED: api.REENCODE_JOB_STATE_SUCCEEDED,
    JobStatus.FAILED: api.REENCODE_JOB_STATE_FAILED,
    JobStatus.CANCELLED: api.REENCODE_JOB_STATE_CANCELLED,
}
OUTCOMES = {
    ReencodeOutcome.PENDING: api.REENCODE_OUTCOME_PENDING,
    ReencodeOutcome.REENCODED: api.REENCODE_OUTCOME_REENCODED,
    ReencodeOutcome.FAILED: api.REENCODE_OUTCOME_FAILED,
}


def _result(result: ReencodeResult) -> api.ReencodeResult:
    return api.ReencodeResult(
        input_id=result.input_id,
        outcome=OUTCOMES[result.outcome],
        details=result.details,
        duration_seconds=result.duration_seconds,
        fps=result.fps,
        codec=result.codec,
        size=result.size,
        sha256=result.sha256,
    )


def job_to_proto(job: ReencodeJob) -> api.ReencodeJob:
    message = api.ReencodeJob(
        id=str(job.job_id),
        state=STATES[job.status],
        percent_completed=job.percent,
        details=job.details,
        results=[_result(r) for r in job.results],
    )
    if job.created_at is not None:
        set_timestamp(message.created_at, job.created_at)
    return message


def _candidate(candidate: ReencodeCandidate) -> api.ReencodeCandidate:
    return api.ReencodeCandidate(
        input_id=candidate.input_id,
        video_format=candidate.video_format,
        codec=candidate.codec,
        reason=candidate.reason,
    )


@dataclass(frozen=True)
class ReencodeRpcs:
    reencodes: ReencodeService
    idempotency: Idempotency

    @mutation()
    async def ReencodeInputs(
        self, request: api.ReencodeInputsRequest, principal: Principal
    ) -> api.ReencodeInputsResponse:
        started = await self.reencodes.start(
            principal, request.app_id, list(request.input_ids), dry_run=request.dry_run
        )
        if isinstance(started, ReencodeJob):
            return api.ReencodeInputsResponse(job=job_to_proto(started))
        return api.ReencodeInputsResponse(candidates=[_candidate(c) for c in started])

    async def GetReencodeJob(
        self, request: api.GetReencodeJobRequest, context: Context
    ) -> api.GetReencodeJobResponse:
        job = await self.reencodes.get(current_principal(), request.app_id, request.job_id)
        return api.GetReencodeJobResponse(job=job_to_proto(job))

    @mutation()
    async def CancelReencodeJob(
        self, request: api.CancelReencodeJobRequest, principal: Principal
    ) -> api.CancelReencodeJobResponse:
        job = await self.reencodes.cancel(principal, request.app_id, request.job_id)
        return api.CancelReencodeJobResponse(job=job_to_proto(job))
