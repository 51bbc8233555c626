"""DatasetService: decode, call the domain, encode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
from datasetd.v1 import common_pb2, dataset_service_pb2, dataset_service_pb2_grpc

from service.api.convert import (
    dataset_fields,
    dataset_to_proto,
    input_filter_query,
    input_to_proto,
)
from service.api.idempotency import run_once
from service.api.imports import ImportRpcs
from service.api.interceptors import current_principal
from service.api.pagination import PageTokens, page_size
from service.domain.auth import Permission, authorize
from service.domain.datasets import DatasetService
from service.domain.errors import InvalidArgument, Violations
from service.domain.idempotency import Idempotency
from service.domain.inputs import InputService
from service.domain.models import SortField
from service.domain.patch import PatchAction

_SORT_FIELDS = {
    dataset_service_pb2.DATASET_SORT_FIELD_UNSPECIFIED: SortField.CREATED_AT,
    dataset_service_pb2.DATASET_SORT_FIELD_CREATED_AT: SortField.CREATED_AT,
    dataset_service_pb2.DATASET_SORT_FIELD_MODIFIED_AT: SortField.MODIFIED_AT,
    dataset_service_pb2.DATASET_SORT_FIELD_ID: SortField.ID,
}
ACTIONS = {
    common_pb2.PATCH_ACTION_MERGE: PatchAction.MERGE,
    common_pb2.PATCH_ACTION_OVERWRITE: PatchAction.OVERWRITE,
    common_pb2.PATCH_ACTION_REMOVE: PatchAction.REMOVE,
}

Context = grpc.aio.ServicerContext[Any, Any]


def patch_action(
    violations: Violations, value: common_pb2.PatchAction.ValueType
) -> PatchAction | None:
    """The action of an Update request; None (and a violation) when it is not chosen."""
    action = ACTIONS.get(value)
    if action is None:
        violations.add(
            "action", "must be PATCH_ACTION_MERGE, PATCH_ACTION_OVERWRITE or PATCH_ACTION_REMOVE"
        )
    return action


class DatasetServicer(dataset_service_pb2_grpc.DatasetServiceServicer):
    def __init__(
        self,
        datasets: DatasetService,
        inputs: InputService,
        idempotency: Idempotency,
        tokens: PageTokens,
        *,
        imports: ImportRpcs,
    ) -> None:
        self._datasets = datasets
        self._inputs = inputs
        self._idempotency = idempotency
        self._tokens = tokens
        self._imports = imports

    async def CreateDataset(
        self, request: dataset_service_pb2.CreateDatasetRequest, context: Context
    ) -> dataset_service_pb2.CreateDatasetResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def create() -> dataset_service_pb2.CreateDatasetResponse:
            violations = Violations()
            fields = dataset_fields(request.dataset, None, violations)
            violations.raise_if_any()
            view = await self._datasets.create(
                principal, request.app_id, request.dataset.id, fields
            )
            return dataset_service_pb2.CreateDatasetResponse(dataset=dataset_to_proto(view))

        return await run_once(
            self._idempotency,
            "CreateDataset",
            request,
            dataset_service_pb2.CreateDatasetResponse,
            create,
        )

    async def GetDataset(
        self, request: dataset_service_pb2.GetDatasetRequest, context: Context
    ) -> dataset_service_pb2.GetDatasetResponse:
        view = await self._datasets.get(current_principal(), request.app_id, request.dataset_id)
        return dataset_service_pb2.GetDatasetResponse(dataset=dataset_to_proto(view))

    async def ListDatasets(
        self, request: dataset_service_pb2.ListDatasetsRequest, context: Context
    ) -> dataset_service_pb2.ListDatasetsResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.READ)
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
        }
        after = None
        if request.page_token:
            after = self._cursor(self._tokens.decode(request.page_token, scope), sort_field)
        views, more = await self._datasets.list(
            principal,
            request.app_id,
            sort_field=sort_field,
            descending=descending,
            text=request.query,
            limit=limit,
            after=after,
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
            response.next_page_token = self._tokens.encode(scope, [encoded, last.id])
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

    async def UpdateDataset(
        self, request: dataset_service_pb2.UpdateDatasetRequest, context: Context
    ) -> dataset_service_pb2.UpdateDatasetResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def update() -> dataset_service_pb2.UpdateDatasetResponse:
            violations = Violations()
            action = patch_action(violations, request.action)
            fields = dataset_fields(request.dataset, list(request.update_mask.paths), violations)
            violations.raise_if_any()
            assert action is not None
            view = await self._datasets.update(
                principal, request.app_id, request.dataset.id, action, fields, request.etag
            )
            return dataset_service_pb2.UpdateDatasetResponse(dataset=dataset_to_proto(view))

        return await run_once(
            self._idempotency,
            "UpdateDataset",
            request,
            dataset_service_pb2.UpdateDatasetResponse,
            update,
        )

    async def DeleteDataset(
        self, request: dataset_service_pb2.DeleteDatasetRequest, context: Context
    ) -> dataset_service_pb2.DeleteDatasetResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def delete() -> dataset_service_pb2.DeleteDatasetResponse:
            outcome = await self._datasets.delete(
                principal, request.app_id, request.dataset_id, force=request.force
            )
            response = dataset_service_pb2.DeleteDatasetResponse(purged=outcome.purged)
            if outcome.purge_after is not None:
                response.purge_time.FromDatetime(outcome.purge_after)
            return response

        return await run_once(
            self._idempotency,
            "DeleteDataset",
            request,
            dataset_service_pb2.DeleteDatasetResponse,
            delete,
        )

    async def UndeleteDataset(
        self, request: dataset_service_pb2.UndeleteDatasetRequest, context: Context
    ) -> dataset_service_pb2.UndeleteDatasetResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def undelete() -> dataset_service_pb2.UndeleteDatasetResponse:
            view = await self._datasets.undelete(principal, request.app_id, request.dataset_id)
            return dataset_service_pb2.UndeleteDatasetResponse(dataset=dataset_to_proto(view))

        return await run_once(
            self._idempotency,
            "UndeleteDataset",
            request,
            dataset_service_pb2.UndeleteDatasetResponse,
            undelete,
        )

    # --- membership --------------------------------------------------------------------------

    async def AddDatasetInputs(
        self, request: dataset_service_pb2.AddDatasetInputsRequest, context: Context
    ) -> dataset_service_pb2.AddDatasetInputsResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def add() -> dataset_service_pb2.AddDatasetInputsResponse:
            added, present, unknown = await self._inputs.add_to_dataset(
                principal, request.app_id, request.dataset_id, list(request.input_ids)
            )
            return dataset_service_pb2.AddDatasetInputsResponse(
                added_count=added, already_present_count=present, unknown_input_ids=unknown
            )

        return await run_once(
            self._idempotency,
            "AddDatasetInputs",
            request,
            dataset_service_pb2.AddDatasetInputsResponse,
            add,
        )

    async def ListDatasetInputs(
        self, request: dataset_service_pb2.ListDatasetInputsRequest, context: Context
    ) -> dataset_service_pb2.ListDatasetInputsResponse:
        limit = page_size(request.page_size)
        scope = {
            "method": "ListDatasetInputs",
            "app_id": request.app_id,
            "dataset_id": request.dataset_id,
        }
        after = self._tokens.decode_seq(request.page_token, scope)
        members, last = await self._inputs.list_members(
            current_principal(), request.app_id, request.dataset_id, after, limit
        )
        response = dataset_service_pb2.ListDatasetInputsResponse()
        for member, view in members:
            item = response.dataset_inputs.add()
            item.created_at.FromDatetime(member.added_at)
            item.input.CopyFrom(input_to_proto(view))
        if last is not None:
            response.next_page_token = self._tokens.encode(scope, [last])
        return response

    async def GetDatasetInput(
        self, request: dataset_service_pb2.GetDatasetInputRequest, context: Context
    ) -> dataset_service_pb2.GetDatasetInputResponse:
        member, view = await self._inputs.get_member(
            current_principal(), request.app_id, request.dataset_id, request.input_id
        )
        response = dataset_service_pb2.GetDatasetInputResponse()
        response.dataset_input.created_at.FromDatetime(member.added_at)
        response.dataset_input.input.CopyFrom(input_to_proto(view))
        return response

    async def RemoveDatasetInputs(
        self, request: dataset_service_pb2.RemoveDatasetInputsRequest, context: Context
    ) -> dataset_service_pb2.RemoveDatasetInputsResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def remove() -> dataset_service_pb2.RemoveDatasetInputsResponse:
            removed = await self._inputs.remove_from_dataset(
                principal, request.app_id, request.dataset_id, list(request.input_ids)
            )
            return dataset_service_pb2.RemoveDatasetInputsResponse(removed_count=removed)

        return await run_once(
            self._idempotency,
            "RemoveDatasetInputs",
            request,
            dataset_service_pb2.RemoveDatasetInputsResponse,
            remove,
        )

    async def DeleteDatasetInputsByFilter(
        self, request: dataset_service_pb2.DeleteDatasetInputsByFilterRequest, context: Context
    ) -> dataset_service_pb2.DeleteDatasetInputsByFilterResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def delete() -> dataset_service_pb2.DeleteDatasetInputsByFilterResponse:
            violations = Violations()
            if not request.dataset_id:
                violations.add("dataset_id", "is required")
            violations.raise_if_any()
            query = input_filter_query(
                request.app_id, request.filter, dataset_id=request.dataset_id
            )
            matched, deleted = await self._inputs.delete_by_filter(
                principal, query, dry_run=request.dry_run
            )
            return dataset_service_pb2.DeleteDatasetInputsByFilterResponse(
                matched_count=matched, deleted_count=deleted
            )

        return await run_once(
            self._idempotency,
            "DeleteDatasetInputsByFilter",
            request,
            dataset_service_pb2.DeleteDatasetInputsByFilterResponse,
            delete,
        )

    async def MergeDataset(
        self, request: dataset_service_pb2.MergeDatasetRequest, context: Context
    ) -> dataset_service_pb2.MergeDatasetResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)

        async def merge() -> dataset_service_pb2.MergeDatasetResponse:
            added, present = await self._inputs.merge(
                principal,
                request.app_id,
                request.source_dataset_id,
                request.destination_dataset_id,
            )
            return dataset_service_pb2.MergeDatasetResponse(
                added_count=added, already_present_count=present
            )

        return await run_once(
            self._idempotency,
            "MergeDataset",
            request,
            dataset_service_pb2.MergeDatasetResponse,
            merge,
        )

    async def ImportDataset(
        self,
        request_iterator: AsyncIterator[dataset_service_pb2.ImportDatasetRequest],
        context: Context,
    ) -> dataset_service_pb2.ImportDatasetResponse:
        return await self._imports.import_dataset(request_iterator)
