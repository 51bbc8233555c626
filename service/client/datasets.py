"""Synchronous DatasetService API: plain Python values in, frozen dataclasses out.

Synchronous on purpose: scripts and command-line tools should not need an
event loop to list or patch a dataset.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from datasetd.v1 import common_pb2, dataset_pb2, dataset_service_pb2
from google.protobuf import field_mask_pb2, json_format, struct_pb2

from service.client._rpc import Rpc, time_of
from service.client.bulk_delete import BulkDeletes
from service.client.exports import Exports

T = TypeVar("T")
PatchActionName = Literal["merge", "overwrite", "remove"]

_ACTIONS: dict[str, common_pb2.PatchAction.ValueType] = {
    "merge": common_pb2.PATCH_ACTION_MERGE,
    "overwrite": common_pb2.PATCH_ACTION_OVERWRITE,
    "remove": common_pb2.PATCH_ACTION_REMOVE,
}


@dataclass(frozen=True)
class Statistic:
    """Counts of a dataset's content (only GetDataset and mutations fill them)."""

    asset_total: int = 0
    asset_annotated: int = 0
    annotation_total: int = 0
    tags_count: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset as the server last returned it."""

    id: str
    app_id: str
    description: str
    notes: str
    metadata: dict[str, Any]
    visibility: str
    created_at: datetime | None
    modified_at: datetime | None
    etag: str
    statistic: Statistic

    def info(self) -> str:
        """Returns a readable summary and prints it, for interactive sessions."""
        stat = self.statistic
        lines = [
            f"Dataset {self.id} (app {self.app_id})",
            f"  description: {self.description or '-'}",
            f"  visibility:  {self.visibility}",
            f"  created:     {_show_time(self.created_at)}",
            f"  modified:    {_show_time(self.modified_at)}",
            f"  etag:        {self.etag}",
            f"  assets:      {stat.asset_total} ({stat.asset_annotated} annotated)",
            f"  annotations: {stat.annotation_total}",
        ]
        if stat.tags_count:
            tags = ", ".join(f"{tag}={n}" for tag, n in sorted(stat.tags_count.items()))
            lines.append(f"  tags:        {tags}")
        if self.metadata:
            lines.append(f"  metadata:    {json.dumps(self.metadata, sort_keys=True)}")
        if self.notes:
            lines.append("  notes:")
            lines.extend(f"    {line}" for line in self.notes.splitlines())
        text = "\n".join(lines)
        print(text)
        return text


@dataclass(frozen=True)
class Page:
    """One page of ListDatasets; `items` carry no statistics (the server omits them)."""

    items: list[DatasetInfo]
    next_page_token: str


@dataclass(frozen=True)
class Deleted:
    """Outcome of a delete: purged at once, or recoverable until `purge_time`."""

    purged: bool
    purge_time: datetime | None


def _show_time(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "-"


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def _to_info(message: dataset_pb2.Dataset) -> DatasetInfo:
    stats = message.statistics
    gettable = dataset_pb2.Visibility.Gettable.Name(message.visibility.gettable)
    metadata: dict[str, Any] = json_format.MessageToDict(message.metadata)
    return DatasetInfo(
        id=message.id,
        app_id=message.app_id,
        description=message.description,
        notes=message.notes,
        metadata=metadata,
        # The server treats UNSPECIFIED as PRIVATE, so show what it means.
        visibility="PRIVATE"
        if gettable == "GETTABLE_UNSPECIFIED"
        else gettable.removeprefix("GETTABLE_"),
        created_at=time_of(message, "created_at"),
        modified_at=time_of(message, "modified_at"),
        etag=message.etag,
        statistic=Statistic(
            asset_total=stats.inputs_count,
            asset_annotated=stats.annotated_inputs_count,
            annotation_total=stats.annotations_count,
            tags_count=dict(stats.concept_counts),
        ),
    )


class Datasets(Exports, BulkDeletes):
    """Dataset operations of one app; get it from `Client.datasets`. Exports and downloads
    (`create_export`, `download`, ...) come from `Exports`, `bulk_delete_assets` from
    `BulkDeletes`."""

    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self._stub = rpc.datasets

    def list(self, page_size: int = 50, query: str = "") -> Iterator[Page]:
        """Yields pages lazily, so a caller that stops early fetches no more."""
        for response in self._rpc.app_pages(
            self._stub.ListDatasets, dataset_service_pb2.ListDatasetsRequest, page_size, query=query
        ):
            yield Page([_to_info(d) for d in response.datasets], response.next_page_token)

    def all_items(self, page_size: int = 50, query: str = "") -> Iterator[DatasetInfo]:
        """Every dataset of the app, walking all pages."""
        for page in self.list(page_size=page_size, query=query):
            yield from page.items

    def _dataset(
        self, method: Callable[..., Any], request_type: type[Any], **fields: Any
    ) -> DatasetInfo:
        """Calls a method that answers with the dataset."""
        return _to_info(self._rpc.app_call(method, request_type, **fields).dataset)

    def get(self, dataset_id: str) -> DatasetInfo:
        return self._dataset(
            self._stub.GetDataset, dataset_service_pb2.GetDatasetRequest, dataset_id=dataset_id
        )

    def create(
        self,
        dataset_id: str = "",
        description: str = "",
        notes: str = "",
        metadata: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> DatasetInfo:
        """Creates a dataset; an empty `dataset_id` lets the server generate one."""
        dataset = dataset_pb2.Dataset(id=dataset_id, description=description, notes=notes)
        if metadata:
            dataset.metadata.CopyFrom(_struct(metadata))
        return self._dataset(
            self._stub.CreateDataset,
            dataset_service_pb2.CreateDatasetRequest,
            dataset=dataset,
            request_id=request_id,
        )

    def patch(
        self,
        dataset_id: str,
        action: PatchActionName = "merge",
        description: str | None = None,
        notes: str | None = None,
        metadata: dict[str, Any] | None = None,
        etag: str | None = None,
        request_id: str | None = None,
    ) -> DatasetInfo:
        """Applies the given fields with `action`; fields left as None are untouched.

        The update mask is built from the given fields rather than left empty,
        so that e.g. `description=""` with "overwrite" really clears it.
        """
        if action not in _ACTIONS:
            raise ValueError(f"action must be one of {sorted(_ACTIONS)}, not {action!r}")
        dataset = dataset_pb2.Dataset(id=dataset_id)
        paths: list[str] = []
        if description is not None:
            dataset.description = description
            paths.append("description")
        if notes is not None:
            dataset.notes = notes
            paths.append("notes")
        if metadata is not None:
            dataset.metadata.CopyFrom(_struct(metadata))
            paths.append("metadata")
        if not paths:
            raise ValueError("patch needs at least one of description, notes or metadata")
        return self._dataset(
            self._stub.UpdateDataset,
            dataset_service_pb2.UpdateDatasetRequest,
            dataset=dataset,
            action=_ACTIONS[action],
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            etag=etag,
            request_id=request_id,
        )

    def delete(
        self, dataset_id: str, force: bool = False, request_id: str | None = None
    ) -> Deleted:
        """Deletes a dataset; without `force` it can be undeleted until `purge_time`."""
        response = self._rpc.app_call(
            self._stub.DeleteDataset,
            dataset_service_pb2.DeleteDatasetRequest,
            dataset_id=dataset_id,
            force=force,
            request_id=request_id,
        )
        purge_time = (
            response.purge_time.ToDatetime(tzinfo=UTC) if response.HasField("purge_time") else None
        )
        return Deleted(response.purged, purge_time)

    def undelete(self, dataset_id: str, request_id: str | None = None) -> DatasetInfo:
        return self._dataset(
            self._stub.UndeleteDataset,
            dataset_service_pb2.UndeleteDatasetRequest,
            dataset_id=dataset_id,
            request_id=request_id,
        )
