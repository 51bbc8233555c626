"""The SearchService RPCs over the search use cases that change or group inputs:
FindDuplicates and GetSearchJob (AddDatasetInputs by search is in membership.py)."""

from __future__ import annotations

from dataclasses import dataclass

from datasetd.v1 import search_pb2
from datasetd.v1 import search_service_pb2 as api

from service.api.interceptors import current_principal
from service.api.rpc import Context
from service.domain.search_jobs import SearchJob, SearchJobService, SearchJobState
from service.wire.timestamps import set_timestamp

STATES = {
    SearchJobState.QUEUED: search_pb2.SEARCH_JOB_STATE_QUEUED,
    SearchJobState.RUNNING: search_pb2.SEARCH_JOB_STATE_RUNNING,
    SearchJobState.DONE: search_pb2.SEARCH_JOB_STATE_DONE,
    SearchJobState.FAILED: search_pb2.SEARCH_JOB_STATE_FAILED,
}


def search_job_to_proto(job: SearchJob) -> search_pb2.SearchJob:
    message = search_pb2.SearchJob(
        id=str(job.job_id),
        dataset_id=job.dataset_id,
        state=STATES[job.state],
        percent=job.percent,
        matched_count=job.matched_count,
        added_count=job.added_count,
        already_present_count=job.present_count,
        error=job.message,
    )
    set_timestamp(message.created_at, job.created_at)
    if job.finished_at is not None:
        set_timestamp(message.finished_at, job.finished_at)
    return message


@dataclass(frozen=True)
class SearchJobRpcs:
    search_jobs: SearchJobService

    async def FindDuplicates(
        self, request: api.FindDuplicatesRequest, context: Context
    ) -> api.FindDuplicatesResponse:
        found = await self.search_jobs.duplicates(
            current_principal(),
            request.app_id,
            request.scope.dataset_id,
            request.scope.version_id,
            threshold=request.threshold,
            model_id=request.model_id,
            exact_only=request.exact_only,
        )
        response = api.FindDuplicatesResponse(
            scanned_count=found.scanned, not_embedded_count=found.not_embedded
        )
        for group in found.groups:
            response.groups.add(
                input_ids=group.input_ids, exact=group.exact, min_similarity=group.min_similarity
            )
        return response

    async def GetSearchJob(
        self, request: api.GetSearchJobRequest, context: Context
    ) -> api.GetSearchJobResponse:
        job = await self.search_jobs.get_job(current_principal(), request.app_id, request.job_id)
        return api.GetSearchJobResponse(job=search_job_to_proto(job))
