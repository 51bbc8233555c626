"""Bulk deletes of a dataset's inputs by filter: the filter's validation and the call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datasetd.v1 import common_pb2
from datasetd.v1 import dataset_service_pb2 as dapi
from google.protobuf import struct_pb2

from service.client._rpc import Rpc


@dataclass(frozen=True)
class BulkDeleteResult:
    matched: int
    deleted: int
    dry_run: bool = False


FILTER_KEYS = ("concepts", "not_concepts", "metadata", "media_types", "annotated")
_MEDIA_TYPES = {
    "image": common_pb2.MEDIA_TYPE_IMAGE,
    "video": common_pb2.MEDIA_TYPE_VIDEO,
    "audio": common_pb2.MEDIA_TYPE_AUDIO,
    "text": common_pb2.MEDIA_TYPE_TEXT,
}


def _strings(key: str, value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple | set | frozenset) or not all(
        isinstance(item, str) and item for item in items
    ):
        raise ValueError(f"filter {key!r} must be a list of non-empty strings, not {value!r}")
    return sorted(items) if isinstance(items, set | frozenset) else list(items)


def input_filter(criteria: Mapping[str, Any] | None) -> common_pb2.InputFilter:
    """An InputFilter from `{"concepts", "not_concepts", "metadata", "media_types",
    "annotated"}`; unknown keys and wrong types are ValueErrors."""
    criteria = dict(criteria or {})
    unknown = sorted(set(criteria) - set(FILTER_KEYS))
    if unknown:
        raise ValueError(
            f"unknown filter key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(FILTER_KEYS)}"
        )
    message = common_pb2.InputFilter()
    if criteria.get("concepts") is not None:
        message.concept_ids.extend(_strings("concepts", criteria["concepts"]))
    if criteria.get("not_concepts") is not None:
        message.negative_concept_ids.extend(_strings("not_concepts", criteria["not_concepts"]))
    metadata = criteria.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise ValueError(f"filter 'metadata' must be a JSON object, not {metadata!r}")
        if metadata:
            struct = struct_pb2.Struct()
            struct.update(dict(metadata))
            message.metadata.CopyFrom(struct)
    if criteria.get("media_types") is not None:
        for kind in _strings("media_types", criteria["media_types"]):
            if kind.lower() not in _MEDIA_TYPES:
                raise ValueError(f"unknown media type {kind!r}; allowed: {', '.join(_MEDIA_TYPES)}")
            message.media_types.append(_MEDIA_TYPES[kind.lower()])
    annotated = criteria.get("annotated")
    if annotated is not None:
        if not isinstance(annotated, bool):
            raise ValueError(f"filter 'annotated' must be True or False, not {annotated!r}")
        message.annotation_state = (
            common_pb2.ANNOTATION_STATE_ANNOTATED
            if annotated
            else common_pb2.ANNOTATION_STATE_UNANNOTATED
        )
    return message


class BulkDeletes:
    """Deletes of a dataset's inputs by filter; `Datasets` inherits this method."""

    _rpc: Rpc

    def bulk_delete_assets(
        self,
        dataset_id: str,
        filter_criteria: Mapping[str, Any] | None = None,
        strict_query: bool = False,
        dry_run: bool = False,
        request_id: str | None = None,
    ) -> BulkDeleteResult:
        """Deletes the dataset's inputs (from the app, with their annotations) matching
        `filter_criteria`: keys `concepts`, `not_concepts`, `metadata`, `media_types`,
        `annotated`. An empty filter matches every input; `strict_query=True` refuses it
        (ValueError)."""
        message = input_filter(filter_criteria)
        if strict_query and message == common_pb2.InputFilter():
            raise ValueError(
                "strict_query=True refuses an empty filter, which would match every input of "
                f"dataset {dataset_id}; give a filter, or strict_query=False to delete them all"
            )
        response = self._rpc.app_call(
            self._rpc.datasets.DeleteDatasetInputsByFilter,
            dapi.DeleteDatasetInputsByFilterRequest,
            dataset_id=dataset_id,
            filter=message,
            dry_run=dry_run,
            request_id=request_id,
        )
        return BulkDeleteResult(response.matched_count, response.deleted_count, dry_run)
