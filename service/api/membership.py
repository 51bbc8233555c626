"""The membership RPCs of DatasetService (which inputs a dataset holds, merge, delete by
filter): decode, call the domain, encode."""

from __future__ import annotations

from dataclasses import dataclass

from datasetd.v1 import dataset_service_pb2 as api

from service.api.interceptors import current_principal
from service.api.pagination import PageTokens
from service.api.rpc import Context, mutation
from service.domain.datasets import DatasetService
from service.domain.errors import InvalidArgument, Violations
from service.domain.idempotency import Idempotency
from service.domain.membership import MembershipService
from service.domain.models import Principal
from service.domain.search_jobs import SearchJobService
from service.wire.inputs import input_filter_query, input_to_proto
from service.wire.search import search_spec_from_proto


@dataclass(frozen=True)
class MembershipRpcs:
    members: MembershipService
    idempotency: Idempotency
    tokens: PageTokens
    # Records the reads of a dataset's inputs as reads of the dataset (last_accessed_at).
    datasets: DatasetService
    # AddDatasetInputs and DeleteDatasetInputsByFilter by search.
    searches: SearchJobService

    @mutation()
    async def AddDatasetInputs(
        self, request: api.AddDatasetInputsRequest, principal: Principal
    ) -> api.AddDatasetInputsResponse:
        by_search = request.HasField("search")
        violations = Violations()
        if by_search == bool(request.input_ids):
            for field in ("input_ids", "search"):
                violations.add(field, "set exactly one of input_ids and search")
        if request.dry_run and not by_search:
            violations.add("dry_run", "only with search: it counts the matches of the query")
        violations.raise_if_any()
        if by_search:
            spec = search_spec_from_proto(request.app_id, request.search, "search")
            outcome = await self.searches.add(
                principal, request.app_id, request.dataset_id, spec, dry_run=request.dry_run
            )
            return api.AddDatasetInputsResponse(
                added_count=outcome.added,
                already_present_count=outcome.present,
                matched_count=outcome.matched,
                job_id="" if outcome.job_id is None else str(outcome.job_id),
            )
        added, present, unknown = await self.members.add_to_dataset(
            principal, request.app_id, request.dataset_id, list(request.input_ids)
        )
        return api.AddDatasetInputsResponse(
            added_count=added, already_present_count=present, unknown_input_ids=unknown
        )

    async def ListDatasetInputs(
        self, request: api.ListDatasetInputsRequest, context: Context
    ) -> api.ListDatasetInputsResponse:
        page = self.tokens.page("ListDatasetInputs", request, dataset_id=request.dataset_id)
        members, last = await self.members.list_members(
            current_principal(), request.app_id, request.dataset_id, page.after, page.limit
        )
        response = api.ListDatasetInputsResponse(next_page_token=page.next_token(last))
        for member, view in members:
            item = response.dataset_inputs.add()
            item.created_at.FromDatetime(member.added_at)
            item.input.CopyFrom(input_to_proto(view))
        await self.datasets.touch(request.app_id, request.dataset_id)
        return response

    async def GetDatasetInput(
        self, request: api.GetDatasetInputRequest, context: Context
    ) -> api.GetDatasetInputResponse:
        member, view = await self.members.get_member(
            current_principal(), request.app_id, request.dataset_id, request.input_id
        )
        response = api.GetDatasetInputResponse()
        response.dataset_input.created_at.FromDatetime(member.added_at)
        response.dataset_input.input.CopyFrom(input_to_proto(view))
        await self.datasets.touch(request.app_id, request.dataset_id)
        return response

    @mutation()
    async def RemoveDatasetInputs(
        self, request: api.RemoveDatasetInputsRequest, principal: Principal
    ) -> api.RemoveDatasetInputsResponse:
        removed = await self.members.remove_from_dataset(
            principal, request.app_id, request.dataset_id, list(request.input_ids)
        )
        return api.RemoveDatasetInputsResponse(removed_count=removed)

    @mutation()
    async def DeleteDatasetInputsByFilter(
        self, request: api.DeleteDatasetInputsByFilterRequest, principal: Principal
    ) -> api.DeleteDatasetInputsByFilterResponse:
        if not request.dataset_id:
            raise InvalidArgument.field("dataset_id", "is required")
        if request.HasField("search"):
            if request.HasField("filter"):
                violations = Violations()
                for field in ("filter", "search"):
                    violations.add(field, "set at most one of filter and search")
                violations.raise_if_any()
            spec = search_spec_from_proto(request.app_id, request.search, "search")
            matched, deleted = await self.searches.delete(
                principal, request.app_id, request.dataset_id, spec, dry_run=request.dry_run
            )
            return api.DeleteDatasetInputsByFilterResponse(
                matched_count=matched, deleted_count=deleted
            )
        query = input_filter_query(request.app_id, request.filter, dataset_id=request.dataset_id)
        matched, deleted = await self.members.delete_by_filter(
            principal, query, dry_run=request.dry_run
        )
        return api.DeleteDatasetInputsByFilterResponse(matched_count=matched, deleted_count=deleted)

    @mutation()
    async def MergeDataset(
        self, request: api.MergeDatasetRequest, principal: Principal
    ) -> api.MergeDatasetResponse:
        added, present = await self.members.merge(
            principal, request.app_id, request.source_dataset_id, request.destination_dataset_id
        )
        return api.MergeDatasetResponse(added_count=added, already_present_count=present)
