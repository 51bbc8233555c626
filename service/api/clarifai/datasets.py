"""V2 dataset RPCs: PostDatasets, GetDataset, ListDatasets, PatchDatasets, DeleteDatasets,
on DatasetService's native part."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from clarifai_grpc.grpc.api import resources_pb2, service_pb2
from clarifai_grpc.grpc.api.status import status_pb2
from datasetd.v1 import common_pb2, dataset_pb2, dataset_service_pb2

from service.api.clarifai import status
from service.api.clarifai.convert import clarifai, native_all
from service.api.clarifai.paging import PageCursors, page_request
from service.api.clarifai.parts import NativeParts
from service.api.clarifai.scope import app_of
from service.api.datasets import DatasetRpcs
from service.api.interceptors import Context, current_principal
from service.domain.errors import InvalidArgument, Violations
from service.observability import REQUEST_ID

# Output-only fields the SDK sends back when it rebuilds a dataset from a listing, and
# fields of the hosted product datasetd has no use for (stars, bookmarks): ignored, as the
# real API ignores output-only fields.
_IGNORED_DATASET_FIELDS = frozenset(
    {"user_id", "is_starred", "star_count", "bookmark_origin", "created_at", "modified_at"}
)
PATCH_ACTIONS = {
    "merge": common_pb2.PATCH_ACTION_MERGE,
    "overwrite": common_pb2.PATCH_ACTION_OVERWRITE,
    "remove": common_pb2.PATCH_ACTION_REMOVE,
}


def patch_action(action: str) -> common_pb2.PatchAction.ValueType:
    chosen = PATCH_ACTIONS.get(action or "merge")
    if chosen is None:
        raise InvalidArgument.field("action", f"must be merge, overwrite or remove, got {action!r}")
    return chosen


def dataset_out(dataset: dataset_pb2.Dataset, user_id: str) -> resources_pb2.Dataset:
    converted = clarifai(dataset, resources_pb2.Dataset)
    converted.user_id = user_id
    return converted


def user_of(request: object) -> str:
    """The user id a response names: the request's, `me` when it sent none."""
    return getattr(getattr(request, "user_app_id", None), "user_id", "") or "me"


@dataclass
class ClarifaiDatasets:
    parts: NativeParts
    cursors: PageCursors[dataset_pb2.Dataset] = field(default_factory=PageCursors)

    @property
    def native(self) -> DatasetRpcs:
        return self.parts.datasets

    async def PostDatasets(
        self, request: service_pb2.PostDatasetsRequest, context: Context | None
    ) -> service_pb2.MultiDatasetResponse:
        app_id = app_of(request)
        violations = Violations()
        datasets = native_all(
            request.datasets, dataset_pb2.Dataset, "datasets", violations, _IGNORED_DATASET_FIELDS
        )
        if not datasets:
            violations.add("datasets", "must name at least one dataset")
        violations.raise_if_any()
        # All or nothing, as the real API: each one is created only once every one was
        # decoded; a refusal of the n-th deletes the ones created before it.
        created: list[dataset_pb2.Dataset] = []
        try:
            for dataset in datasets:
                response = await self.native.CreateDataset(
                    dataset_service_pb2.CreateDatasetRequest(app_id=app_id, dataset=dataset),
                    cast(Context, context),
                )
                created.append(response.dataset)
        except Exception:
            for dataset in created:
                await self.native.DeleteDataset(
                    dataset_service_pb2.DeleteDatasetRequest(
                        app_id=app_id, dataset_id=dataset.id, force=True
                    ),
                    cast(Context, context),
                )
            raise
        user = user_of(request)
        return service_pb2.MultiDatasetResponse(
            status=status.ok(REQUEST_ID.get()),
            datasets=[dataset_out(d, user) for d in created],
        )

    async def GetDataset(
        self, request: service_pb2.GetDatasetRequest, context: Context | None
    ) -> service_pb2.SingleDatasetResponse:
        response = await self.native.GetDataset(
            dataset_service_pb2.GetDatasetRequest(
                app_id=app_of(request), dataset_id=request.dataset_id
            ),
            cast(Context, context),
        )
        return service_pb2.SingleDatasetResponse(
            status=status.ok(REQUEST_ID.get()),
            dataset=dataset_out(response.dataset, user_of(request)),
        )

    async def ListDatasets(
        self, request: service_pb2.ListDatasetsRequest, context: Context | None
    ) -> service_pb2.MultiDatasetResponse:
        app_id = app_of(request)
        page = page_request(request.page, request.per_page)
        sort_by = dataset_service_pb2.DATASET_SORT_FIELD_MODIFIED_AT
        if request.sort_by_created_at:
            sort_by = dataset_service_pb2.DATASET_SORT_FIELD_CREATED_AT
        elif request.sort_by_id:
            sort_by = dataset_service_pb2.DATASET_SORT_FIELD_ID
        order = (
            common_pb2.SORT_ORDER_ASCENDING
            if request.sort_ascending
            else (common_pb2.SORT_ORDER_DESCENDING)
        )
        query = request.search or request.id

        async def fetch(size: int, token: str) -> tuple[list[dataset_pb2.Dataset], str]:
            listed = await self.native.ListDatasets(
                dataset_service_pb2.ListDatasetsRequest(
                    app_id=app_id,
                    page_size=size,
                    page_token=token,
                    sort_by=sort_by,
                    sort_order=order,
                    query=query,
                ),
                cast(Context, context),
            )
            return list(listed.datasets), listed.next_page_token

        key = f"ListDatasets|{current_principal().key_id}|{app_id}|{sort_by}|{order}|{query}"
        items = await self.cursors.page(key, page, fetch)
        user = user_of(request)
        return service_pb2.MultiDatasetResponse(
            status=status.ok(REQUEST_ID.get()), datasets=[dataset_out(d, user) for d in items]
        )

    async def PatchDatasets(
        self, request: service_pb2.PatchDatasetsRequest, context: Context | None
    ) -> service_pb2.MultiDatasetResponse:
        app_id = app_of(request)
        action = patch_action(request.action)
        violations = Violations()
        datasets = native_all(
            request.datasets, dataset_pb2.Dataset, "datasets", violations, _IGNORED_DATASET_FIELDS
        )
        for index, dataset in enumerate(datasets):
            if not dataset.id:
                violations.add(f"datasets[{index}].id", "is required to patch a dataset")
        violations.raise_if_any()
        patched = []
        for dataset in datasets:
            response = await self.native.UpdateDataset(
                dataset_service_pb2.UpdateDatasetRequest(
                    app_id=app_id, dataset=dataset, action=action
                ),
                cast(Context, context),
            )
            patched.append(response.dataset)
        user = user_of(request)
        return service_pb2.MultiDatasetResponse(
            status=status.ok(REQUEST_ID.get()), datasets=[dataset_out(d, user) for d in patched]
        )

    async def DeleteDatasets(
        self, request: service_pb2.DeleteDatasetsRequest, context: Context | None
    ) -> status_pb2.BaseResponse:
        app_id = app_of(request)
        if not request.dataset_ids:
            raise InvalidArgument.field("dataset_ids", "must name at least one dataset")
        for dataset_id in request.dataset_ids:
            await self.native.DeleteDataset(
                dataset_service_pb2.DeleteDatasetRequest(app_id=app_id, dataset_id=dataset_id),
                cast(Context, context),
            )
        return status_pb2.BaseResponse(status=status.ok(REQUEST_ID.get()))
