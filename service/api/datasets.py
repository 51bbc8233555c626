"""The dataset RPCs of DatasetService: decode, call the domain, encode."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from datasetd.v1 import common_pb2, dataset_service_pb2

from service.api.interceptors import current_principal
from service.api.pagination import PageTokens, page_size
from service.api.rpc import Context, decoded, mutation, patch_request
from service.domain.datasets import DatasetService
from service.domain.errors import InvalidArgument
from service.domain.idempotency import Idempotency
from service.domain.models import Principal, SortField
from service.wire.datasets import dataset_fields, dataset_to_proto

_SORT_FIELDS = {
    dataset_service_pb2.DATASET_SORT_FIELD_UNSPECIFIED: SortField.CREATED_AT,
    dataset_service_pb2.DATASET_SORT_FIELD_CREATED_AT: SortField.CREATED_AT,
    dataset_service_pb2.DATASET_SORT_FIELD_MODIFIED_AT: SortField.MODIFIED_AT,
    dataset_service_pb2.DATASET_SORT_FIELD_ID: SortField.ID,
}


@dataclass(frozen=True)
class DatasetRpcs:
    datasets: DatasetService
    idempotency: Idempotency
    tokens: PageTokens

    @mutation()
    async def CreateDataset(
        self, request: dataset_service_pb2.CreateDatasetRequest, principal: Principal
    ) -> dataset_service_pb2.CreateDatasetResponse:
        fields = decoded(lambda violations: dataset_fields(request.dataset, None, violations))
        view = await self.datasets.create(principal, request.app_id, request.dataset.id, fields)
        return dataset_service_pb2.CreateDatasetResponse(dataset=dataset_to_proto(view))

    async def GetDataset(
        self, request: dataset_service_pb2.GetDatasetRequest, context: Context
    ) -> dataset_service_pb2.GetDatasetResponse:
        view = await self.datasets.get(current_principal(), request.app_id, request.dataset_id)
        return dataset_service_pb2.GetDatasetResponse(dataset=dataset_to_proto(view))

    async def ListDatasets(
        self, request: dataset_service_pb2.ListDatasetsRequest, context: Context
    ) -> dataset_service_pb2.ListDatasetsResponse:
        principal = current_principal()
        limit = page_size(request.page_size)
        sort_field = _SORT_FIELDS.get(request.sort_by)
        if sort_field is None:
            raise InvalidArgument.field("sort_by", f"unknown sort field {request.sort_by}")
        if request.sort_order == common_pb2.SORT_ORDER_UNSPECIFIED:
            descending = sort_field is not SortField.ID
        else:
            descending = request.sort_order == common_pb2.SORT_ORDER_DESCENDING
        scope = {
            "method": "ListDatasets",
            "app_id": request.app_id,
            "sort": sort_field.value,
            "descending": descending,
            "query": request.query,
            "include_hidden": request.include_hidden,
        }
        after = None
        if request.page_token:
            after = self._cursor(self.tokens.decode(request.page_token, scope), sort_field)
        views, more = await self.datasets.list(
            principal,
            request.app_id,
            sort_field=sort_field,
            descending=descending,
            text=request.query,
            limit=limit,
            after=after,
            include_hidden=request.include_hidden,
        )
        response = dataset_service_pb2.ListDatasetsResponse(
            datasets=[dataset_to_proto(view) for view in views]
        )
        if more and views:
            last = views[-1].dataset
            value: Any = {
                SortField.CREATED_AT: last.created_at,
                SortField.MODIFIED_AT: last.modified_at,
                SortField.ID: last.id,
            }[sort_field]
            encoded = value.isoformat() if isinstance(value, datetime) else value
            response.next_page_token = self.tokens.encode(scope, [encoded, last.id])
        return response

    @staticmethod
    def _cursor(cursor: list[Any], sort_field: SortField) -> tuple[Any, str]:
        try:
            value, last_id = cursor
            if not isinstance(value, str) or not isinstance(last_id, str):
                raise ValueError
            if sort_field is not SortField.ID:
                return datetime.fromisoformat(value), last_id
            return value, last_id
        except ValueError:
            raise InvalidArgument.field(
                "page_token", "is malformed", reason="INVALID_PAGE_TOKEN"
            ) from None

    @mutation()
    async def UpdateDataset(
        self, request: dataset_service_pb2.UpdateDatasetRequest, principal: Principal
    ) -> dataset_service_pb2.UpdateDatasetResponse:
        paths = list(request.update_mask.paths)
        action, fields = patch_request(
            request.action, lambda violations: dataset_fields(request.dataset, paths, violations)
        )
        view = await self.datasets.update(
            principal, request.app_id, request.dataset.id, action, fields, request.etag
        )
        return dataset_service_pb2.UpdateDatasetResponse(dataset=dataset_to_proto(view))

    @mutation()
    async def DeleteDataset(
        self, request: dataset_service_pb2.DeleteDatasetRequest, principal: Principal
    ) -> dataset_service_pb2.DeleteDatasetResponse:
        outcome = await self.datasets.delete(
            principal, request.app_id, request.dataset_id, force=request.force
        )
        response = dataset_service_pb2.DeleteDatasetResponse(purged=outcome.purged)
        if outcome.purge_after is not None:
            response.purge_time.FromDatetime(outcome.purge_after)
        return response

    @mutation()
    async def UndeleteDataset(
        self, request: dataset_service_pb2.UndeleteDatasetRequest, principal: Principal
    ) -> dataset_service_pb2.UndeleteDatasetResponse:
        view = await self.datasets.undelete(principal, request.app_id, request.dataset_id)
        return dataset_service_pb2.UndeleteDatasetResponse(dataset=dataset_to_proto(view))
