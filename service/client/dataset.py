"""One dataset's content: inputs, uploads, versions and merges; get it from `Client.dataset`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from datasetd.v1 import dataset_service_pb2, input_pb2, input_service_pb2
from google.protobuf import json_format

from service.client._rpc import Rpc

MEDIA_KINDS = ("image", "video", "audio", "text")


@dataclass(frozen=True)
class InputInfo:
    """An input as the server returned it (media are referenced, never embedded)."""

    id: str
    media_type: str
    url: str
    concepts: list[str]
    metadata: dict[str, Any]
    dataset_ids: list[str]
    created_at: datetime | None
    title: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeResult:
    added: int
    already_present: int


@dataclass(frozen=True)
class DownloadedInput:
    input_id: str
    path: Path
    size: int
    sha256: str


def media_type_of(message: input_pb2.Input) -> str:
    for kind in MEDIA_KINDS:
        if message.data.HasField(kind):  # type: ignore[arg-type]
            return kind
    return ""


def to_input_info(message: input_pb2.Input) -> InputInfo:
    kind = media_type_of(message)
    url = getattr(message.data, kind).url if kind else ""
    return InputInfo(
        id=message.id,
        media_type=kind,
        url=url,
        concepts=[c.id for c in message.data.concepts if c.value > 0],
        metadata=json_format.MessageToDict(message.data.metadata),
        dataset_ids=list(message.dataset_ids),
        created_at=message.created_at.ToDatetime(tzinfo=UTC)
        if message.HasField("created_at")
        else None,
        title=message.title,
    )


class Dataset:
    """Operations on the content of one dataset of the client's app."""

    def __init__(self, rpc: Rpc, dataset_id: str) -> None:
        self.rpc = rpc
        self.id = dataset_id

    # --- inputs -------------------------------------------------------------

    def list_inputs(self, page_size: int = 100) -> Iterator[InputInfo]:
        """Every input of the dataset, in the order they were added; pages are fetched lazily."""
        token = ""
        while True:
            response = self.rpc.call(
                self.rpc.datasets.ListDatasetInputs,
                dataset_service_pb2.ListDatasetInputsRequest(
                    app_id=self.rpc.app, dataset_id=self.id, page_size=page_size, page_token=token
                ),
            )
            for member in response.dataset_inputs:
                yield to_input_info(member.input)
            token = response.next_page_token
            if not token:
                return

    def get_input(self, input_id: str) -> InputInfo:
        response = self.rpc.call(
            self.rpc.datasets.GetDatasetInput,
            dataset_service_pb2.GetDatasetInputRequest(
                app_id=self.rpc.app, dataset_id=self.id, input_id=input_id
            ),
        )
        return to_input_info(response.dataset_input.input)

    def delete_inputs(self, input_ids: list[str]) -> tuple[int, list[str]]:
        """Deletes inputs (from every dataset); returns (deleted, unknown ids)."""
        deleted, unknown = 0, list[str]()
        for start in range(0, len(input_ids), 128):
            response = self.rpc.call(
                self.rpc.inputs.DeleteInputs,
                input_service_pb2.DeleteInputsRequest(
                    app_id=self.rpc.app, ids=input_ids[start : start + 128]
                ),
            )
            deleted += response.deleted_count
            unknown.extend(response.unknown_ids)
        return deleted, unknown

    def merge_dataset(self, source_id: str, request_id: str | None = None) -> MergeResult:
        """Adds every input of `source_id` to this dataset; the source is unchanged."""
        response = self.rpc.call(
            self.rpc.datasets.MergeDataset,
            dataset_service_pb2.MergeDatasetRequest(
                app_id=self.rpc.app,
                source_dataset_id=source_id,
                destination_dataset_id=self.id,
                request_id=request_id or "",
            ),
        )
        return MergeResult(response.added_count, response.already_present_count)

    # --- uploads (service/client/uploads.py) ---------------------------------

    # --- versions (service/client/versions.py) -------------------------------
