"""One dataset's content: inputs, uploads, versions and merges; get it from `Client.dataset`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

from datasetd.v1 import dataset_service_pb2, input_pb2, input_service_pb2
from google.protobuf import json_format

from service.client import uploads as _uploads
from service.client._rpc import time_of
from service.client.media import DownloadedInput, download_inputs
from service.client.progress import Progress, reporter
from service.client.unpack import medium_of
from service.client.versions import Versions

if TYPE_CHECKING:
    # service.client.search builds on this module's InputInfo: imported where used.
    from service.client.search import AddFromSearchResult, DuplicatesResult, HitPage, QueryArgs


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


@dataclass(frozen=True)
class MergeResult:
    added: int
    already_present: int


def to_input_info(message: input_pb2.Input) -> InputInfo:
    kind = medium_of(message.data) or ""
    url = getattr(message.data, kind).url if kind else ""
    return InputInfo(
        id=message.id,
        media_type=kind,
        url=url,
        concepts=[c.id for c in message.data.concepts if c.value > 0],
        metadata=json_format.MessageToDict(message.data.metadata),
        dataset_ids=list(message.dataset_ids),
        created_at=time_of(message, "created_at"),
        title=message.title,
    )


class Dataset(Versions):
    """Operations on the content of one dataset of the client's app; its versions'
    methods (`create_version`, `list_versions`, ...) come from `Versions`."""

    # --- inputs -------------------------------------------------------------

    def list_inputs(self, page_size: int = 100) -> Iterator[InputInfo]:
        """Every input of the dataset, in the order they were added; pages are fetched lazily."""
        for response in self.rpc.app_pages(
            self.rpc.datasets.ListDatasetInputs,
            dataset_service_pb2.ListDatasetInputsRequest,
            page_size,
            dataset_id=self.id,
        ):
            for member in response.dataset_inputs:
                yield to_input_info(member.input)

    def get_input(self, input_id: str) -> InputInfo:
        response = self.rpc.app_call(
            self.rpc.datasets.GetDatasetInput,
            dataset_service_pb2.GetDatasetInputRequest,
            dataset_id=self.id,
            input_id=input_id,
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
        response = self.rpc.app_call(
            self.rpc.datasets.MergeDataset,
            dataset_service_pb2.MergeDatasetRequest,
            source_dataset_id=source_id,
            destination_dataset_id=self.id,
            request_id=request_id,
        )
        return MergeResult(response.added_count, response.already_present_count)

    def download_inputs(
        self,
        save_dir: str | os.PathLike[str],
        concurrency: int = 4,
        show_progress: bool = True,
        progress: Progress | None = None,
    ) -> list[DownloadedInput]:
        """Downloads the original media of every input as `save_dir/<input id><ext>`."""
        ids = [item.id for item in self.list_inputs(page_size=1000)]
        return download_inputs(self.rpc, ids, save_dir, concurrency, show_progress, progress)

    # --- search (service/client/search.py) -----------------------------------

    def search(
        self,
        version: str | None = None,
        limit: int | None = None,
        page_size: int = 100,
        **query: Unpack[QueryArgs],
    ) -> Iterator[HitPage]:
        """Pages of the dataset's inputs (or those of its READY `version`, as captured)
        matching `query` (see search.QueryArgs); fetched lazily, at most `limit` hits."""
        from service.client.search import Search, search_query

        return Search(self.rpc).pages(search_query(self.id, version, **query), limit, page_size)

    def add_from_search(
        self,
        from_dataset: str | None = None,
        from_version: str | None = None,
        dry_run: bool = False,
        wait: bool = True,
        timeout: float = 3600,
        show_progress: bool = False,
        progress: Progress | None = None,
        request_id: str | None = None,
        **query: Unpack[QueryArgs],
    ) -> AddFromSearchResult:
        """Adds every input of the app (or of `from_dataset`, or its `from_version`) that
        matches `query` to this dataset; `dry_run` only counts them. Many matches run as a
        server job, which this waits for with `wait` (SearchJobFailedError if it fails)."""
        from service.client.search import Search, search_query

        return Search(self.rpc).add(
            self.id,
            search_query(from_dataset, from_version, **query),
            dry_run,
            wait,
            timeout,
            reporter(show_progress, progress),
            request_id,
        )

    def duplicates(
        self,
        threshold: float | None = None,
        exact_only: bool = False,
        model_id: str = "",
        version: str | None = None,
    ) -> DuplicatesResult:
        """Groups of exact duplicates (same content) and near duplicates (cosine similarity
        at least `threshold`, 0.5..1, default 0.95) among the dataset's (or version's) inputs."""
        from service.client.search import Search

        return Search(self.rpc).duplicates(self.id, version, threshold, exact_only, model_id)

    # --- uploads (service/client/uploads.py) ---------------------------------
    # Options: batch_size, concurrency, show_progress, progress, failure_log (UploadOptions).

    def upload_from_folder(
        self,
        folder: str | Path,
        input_type: str = "image",
        labels: bool = False,
        **options: Unpack[_uploads.UploadOptions],
    ) -> _uploads.UploadResult:
        """Uploads the media files under `folder` (recursively); see uploads.upload_from_folder."""
        return _uploads.upload_from_folder(self.rpc, self.id, folder, input_type, labels, **options)

    def upload_from_csv(
        self,
        path: str | Path,
        input_type: str = "image",
        csv_type: str = "url",
        labels: bool = True,
        **options: Unpack[_uploads.UploadOptions],
    ) -> _uploads.UploadResult:
        """Uploads the rows of a CSV file; bad rows go to the failure log with their line."""
        return _uploads.upload_from_csv(
            self.rpc, self.id, path, input_type, csv_type, labels, **options
        )

    def upload_inputs(
        self,
        inputs: _uploads.InputItems,
        annotations: _uploads.AnnotationItems = (),
        **options: Unpack[_uploads.UploadOptions],
    ) -> _uploads.UploadResult:
        """Uploads `UploadItem`s (or `input_pb2.Input` messages) into this dataset, and
        `annotations` on them: the boxes of new inputs travel in their CreateInputs."""
        return _uploads.upload_inputs(self.rpc, self.id, inputs, annotations, **options)

    def upload_annotations(
        self, annotations: _uploads.AnnotationItems, **options: Unpack[_uploads.UploadOptions]
    ) -> _uploads.UploadResult:
        """Creates `AnnotationItem`s (or `annotation_pb2.Annotation`s) on existing inputs."""
        return _uploads.upload_annotations(self.rpc, self.id, annotations, **options)

    def upload_coco(
        self,
        images_dir: str | Path,
        annotations_json: str | Path,
        labels: bool = True,
        **options: Unpack[_uploads.UploadOptions],
    ) -> _uploads.UploadResult:
        """Uploads a COCO detection dataset: the images with their boxes."""
        return _uploads.upload_coco(
            self.rpc, self.id, images_dir, annotations_json, labels, **options
        )

    def retry(
        self,
        failure_log: str | Path,
        allow_duplicates: bool = False,
        **options: Unpack[_uploads.RetryOptions],
    ) -> _uploads.UploadResult:
        """Uploads the rows of a failure log again; the log must be of this dataset."""
        logged, _ = _uploads.read_failure_log(failure_log)
        if logged != self.id:
            raise ValueError(f"{failure_log} is a log of dataset {logged!r}, not {self.id!r}")
        return _uploads.retry(self.rpc, failure_log, allow_duplicates, **options)
