"""One call of the unmodified `clarifai` SDK against datasetd, in a process of its own.

`sdk_calls.py REQUEST RESULT`: REQUEST is a JSON file {"connection": {base_url, pat,
user_id, app_id}, "op": name, "args": {...}}; RESULT receives {"result": ...} or
{"error": ..., "traceback": ...}, with the SDK's warnings either way. The SDK reports
most failures as logged warnings only, so the test reads them from the result and asserts
on the server's state, never on this process's exit.

The test starts it with HOME pointing at an empty directory and no CLARIFAI_* variable:
the SDK reads both (at import time too), and the connection must come from the arguments.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import re
import sys
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from clarifai.client.app import App
from clarifai.client.dataset import Dataset
from clarifai.client.input import Inputs
from clarifai.datasets.export.inputs_annotations import DatasetExportReader
from clarifai.datasets.upload.base import ClarifaiDataLoader
from clarifai.datasets.upload.features import (
    TextFeatures,
    VisualClassificationFeatures,
    VisualDetectionFeatures,
    VisualSegmentationFeatures,
)
from clarifai.utils.logging import logger as sdk_logger
from clarifai_grpc.grpc.api import resources_pb2
from clarifai_grpc.grpc.api.status import status_code_pb2
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

Json = Any


@dataclass(frozen=True)
class Connection:
    base_url: str
    pat: str
    user_id: str
    app_id: str

    def auth(self) -> dict[str, str]:
        return {
            "base_url": self.base_url,
            "pat": self.pat,
            "user_id": self.user_id,
            "app_id": self.app_id,
        }


class Warnings(logging.Handler):
    """The SDK's warnings and errors: where it says what went wrong when it does not raise."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # The SDK colours its messages; the test shows them as text.
        self.messages.append(re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))


def as_dict(message: Message) -> Json:
    return MessageToDict(message, preserving_proto_field_name=True)


def media_kind(item: resources_pb2.Input) -> str:
    for kind in ("image", "video", "audio", "text"):
        if item.data.HasField(kind):
            return kind
    return ""


def summary(item: resources_pb2.Input) -> Json:
    """What a test checks of an input the SDK listed: id, media kind, its url, status."""
    kind = media_kind(item)
    return {
        "id": item.id,
        "kind": kind,
        "url": getattr(item.data, kind).url if kind else "",
        "status": item.status.code,
        "concepts": [c.id for c in item.data.concepts],
        "metadata": as_dict(item.data.metadata),
    }


# --- a data loader built from the request --------------------------------------------


class SpecLoader(ClarifaiDataLoader):  # type: ignore[misc]
    """A dataloader over items given in the request (paths are read when the SDK asks,
    so a file fixed between an upload and its retry is read fixed)."""

    def __init__(self, task: str, items: list[dict[str, Any]]) -> None:
        super().__init__()
        self._task = task
        self.items = items

    @property
    def task(self) -> str:
        return self._task

    def load_data(self) -> None:
        pass

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        item = dict(self.items[index])
        if self._task == "visual_detection":
            return VisualDetectionFeatures(**item)
        if self._task == "visual_segmentation":
            return VisualSegmentationFeatures(**item)
        if self._task == "text_classification":
            return TextFeatures(**item)
        return VisualClassificationFeatures(**item)


def log_files() -> set[str]:
    return {os.path.abspath(name) for name in glob.glob("Dataset_Upload*.log")}


# --- the operations ------------------------------------------------------------------


def app_of(conn: Connection) -> App:
    return App(app_id=conn.app_id, user_id=conn.user_id, pat=conn.pat, base_url=conn.base_url)


def dataset_of(conn: Connection, dataset_id: str, version_id: str | None = None) -> Dataset:
    return Dataset(dataset_id=dataset_id, dataset_version_id=version_id, **conn.auth())


def inputs_of(conn: Connection) -> Inputs:
    return Inputs(**conn.auth())


def create_dataset(conn: Connection, dataset_id: str, **fields: Any) -> Json:
    made = app_of(conn).create_dataset(dataset_id, **fields)
    return {"id": made.id}


def list_datasets(
    conn: Connection, page_no: int | None = None, per_page: int | None = None
) -> Json:
    return [d.id for d in app_of(conn).list_datasets(page_no=page_no, per_page=per_page)]


def get_dataset(conn: Connection, dataset_id: str) -> Json:
    got = app_of(conn).dataset(dataset_id)
    return {"id": got.id, "description": got.description, "notes": got.notes}


def patch_dataset(conn: Connection, dataset_id: str, action: str, **fields: Any) -> Json:
    patched = app_of(conn).patch_dataset(dataset_id, action=action, **fields)
    return {"id": patched.id}


def delete_dataset(conn: Connection, dataset_id: str) -> Json:
    app_of(conn).delete_dataset(dataset_id)
    return None


def upload_from_folder(
    conn: Connection, dataset_id: str, folder: str, input_type: str, labels: bool
) -> Json:
    dataset_of(conn, dataset_id).upload_from_folder(folder, input_type=input_type, labels=labels)
    return None


def upload_from_csv(
    conn: Connection, dataset_id: str, csv_path: str, input_type: str, csv_type: str, labels: bool
) -> Json:
    dataset_of(conn, dataset_id).upload_from_csv(
        csv_path, input_type=input_type, csv_type=csv_type, labels=labels
    )
    return None


def upload_dataset(
    conn: Connection,
    dataset_id: str,
    task: str,
    items: list[dict[str, Any]],
    get_upload_status: bool = False,
    log_warnings: bool = False,
    batch_size: int = 32,
) -> Json:
    before = log_files()
    dataset_of(conn, dataset_id).upload_dataset(
        SpecLoader(task, items),
        batch_size=batch_size,
        get_upload_status=get_upload_status,
        log_warnings=log_warnings,
    )
    return {"logs": sorted(log_files() - before)}


def upload_status(conn: Connection, dataset_id: str) -> Json:
    """The counts get_upload_status shows, as it computes them (from a new version's
    metrics groups)."""
    inputs, annotations = dataset_of(conn, dataset_id).get_upload_status(pre_upload=True)
    return {
        "inputs": {key: int(value) for key, value in inputs.items()},
        "annotations": annotations,
    }


def retry_upload_from_logs(
    conn: Connection,
    dataset_id: str,
    log_file: str,
    task: str,
    items: list[dict[str, Any]],
    retry_duplicates: bool,
) -> Json:
    dataset_of(conn, dataset_id).retry_upload_from_logs(
        log_file, SpecLoader(task, items), retry_duplicates=retry_duplicates
    )
    return None


def merge_dataset(conn: Connection, dataset_id: str, source_id: str) -> Json:
    dataset_of(conn, dataset_id).merge_dataset(source_id)
    return None


def create_version(conn: Connection, dataset_id: str, **fields: Any) -> Json:
    made = dataset_of(conn, dataset_id).create_version(**fields)
    return {"id": made.version.id}


def list_versions(conn: Connection, dataset_id: str) -> Json:
    return [v.version.id for v in dataset_of(conn, dataset_id).list_versions()]


def delete_version(conn: Connection, dataset_id: str, version_id: str) -> Json:
    dataset_of(conn, dataset_id).delete_version(version_id)
    return None


def export(conn: Connection, dataset_id: str, version_id: str, save_path: str) -> Json:
    """`Dataset.export()` into a local zip, then the archive read again on its own with
    `DatasetExportReader` (what the export() above did internally, checked separately)."""
    dataset = dataset_of(conn, dataset_id, version_id)
    dataset.export(save_path=save_path)
    with zipfile.ZipFile(save_path) as written:
        entries = sorted(written.namelist())
        annotation_files = {
            name: json.loads(written.read(name))
            for name in entries
            if name.startswith("all/annotations/")
        }
    session = requests.Session()
    session.headers.update({"Authorization": f"Key {conn.pat}"})
    read: list[Json] = []
    with DatasetExportReader(session=session, archive_url=dataset.archive_zip()) as reader:
        for item in reader:
            read.append(
                {
                    "id": item.id,
                    "concepts": sorted(c.id for c in item.data.concepts),
                    "regions": len(item.data.regions),
                    "hosted": bool(getattr(item.data, media_kind(item)).hosted.prefix),
                }
            )
    return {"entries": entries, "annotations": annotation_files, "read": read}


def dataset_list_inputs(conn: Connection, dataset_id: str, input_type: str | None = None) -> Json:
    listed = dataset_of(conn, dataset_id).list_inputs(input_type=input_type)
    return [summary(item) for item in listed]


def list_inputs(
    conn: Connection, dataset_id: str | None = None, input_type: str | None = None
) -> Json:
    listed = inputs_of(conn).list_inputs(dataset_id=dataset_id, input_type=input_type)
    return [summary(item) for item in listed]


def wait_until_ready(inputs: Inputs, input_id: str, timeout: float = 60.0) -> Json:
    """Polls get_input as a script waiting for Clarifai's processing does."""
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        polls += 1
        got = inputs.get_input(input_id)
        if got.status.code == status_code_pb2.INPUT_DOWNLOAD_SUCCESS:
            return {"input": summary(got), "polls": polls}
        if got.status.code not in (
            status_code_pb2.INPUT_DOWNLOAD_PENDING,
            status_code_pb2.INPUT_DOWNLOAD_IN_PROGRESS,
        ):
            raise RuntimeError(f"input {input_id} ended as {got.status}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"input {input_id} still {got.status} after {timeout} s")
        time.sleep(0.2)


def upload_from_url(conn: Connection, input_id: str, **urls: Any) -> Json:
    inputs = inputs_of(conn)
    _job, response = inputs.upload_from_url(input_id, **urls)
    return {"code": response.status.code, **wait_until_ready(inputs, input_id)}


def upload_from_bytes(
    conn: Connection, input_id: str, kind: str, data_b64: str, dataset_id: str | None = None
) -> Json:
    inputs = inputs_of(conn)
    data = base64.b64decode(data_b64)
    _job, response = inputs.upload_from_bytes(
        input_id, dataset_id=dataset_id, **{f"{kind}_bytes": data}
    )
    return {"code": response.status.code, **wait_until_ready(inputs, input_id)}


def region(spec: dict[str, Any]) -> resources_pb2.Region:
    xmin, ymin, xmax, ymax = spec["bbox"]
    return resources_pb2.Region(
        region_info=resources_pb2.RegionInfo(
            bounding_box=resources_pb2.BoundingBox(
                top_row=ymin, left_col=xmin, bottom_row=ymax, right_col=xmax
            )
        ),
        data=resources_pb2.Data(
            concepts=[resources_pb2.Concept(id=spec["label"], name=spec["label"], value=1.0)]
        ),
        track_id=spec.get("track_id", ""),
    )


def annotation(spec: dict[str, Any]) -> resources_pb2.Annotation:
    """Boxes and polygons as the SDK's own helpers build them; video frames from raw protos,
    as the SDK has no helper for them."""
    if spec["kind"] == "bbox":
        built: resources_pb2.Annotation = Inputs.get_bbox_proto(
            input_id=spec["input_id"], label=spec["label"], bbox=spec["bbox"]
        )
        return built
    if spec["kind"] == "polygon":
        built = Inputs.get_mask_proto(
            input_id=spec["input_id"], label=spec["label"], polygons=spec["points"]
        )
        return built
    frames = [
        resources_pb2.Frame(
            frame_info=resources_pb2.FrameInfo(index=frame["index"], time=frame["time_ms"]),
            data=resources_pb2.Data(regions=[region({**frame, "label": spec["label"]})]),
        )
        for frame in spec["frames"]
    ]
    return resources_pb2.Annotation(
        input_id=spec["input_id"], data=resources_pb2.Data(frames=frames)
    )


def upload_annotations(conn: Connection, annotations: list[dict[str, Any]]) -> Json:
    retry = inputs_of(conn).upload_annotations([annotation(a) for a in annotations])
    return {"retry": len(retry)}


def selected(conn: Connection, input_ids: list[str]) -> list[resources_pb2.Input]:
    wanted = set(input_ids)
    return [item for item in inputs_of(conn).list_inputs() if item.id in wanted]


def download_inputs(conn: Connection, input_ids: list[str]) -> Json:
    chosen = selected(conn, input_ids)
    bodies = inputs_of(conn).download_inputs(chosen)
    return {
        "listed": [summary(item) for item in chosen],
        "sha256": sorted(hashlib.sha256(body).hexdigest() for body in bodies),
    }


def delete_inputs(conn: Connection, input_ids: list[str]) -> Json:
    chosen = selected(conn, input_ids)
    inputs_of(conn).delete_inputs(chosen)
    return [item.id for item in chosen]


def run_example(conn: Connection, code: str) -> Json:
    """A README example as a reader runs it (with DATASETD_API_KEY exported): its output lines."""
    os.environ["DATASETD_API_KEY"] = conn.pat
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    return printed.getvalue().splitlines()


OPS: dict[str, Callable[..., Json]] = {
    op.__name__: op
    for op in (
        create_dataset,
        list_datasets,
        get_dataset,
        patch_dataset,
        delete_dataset,
        upload_from_folder,
        upload_from_csv,
        upload_dataset,
        upload_status,
        retry_upload_from_logs,
        merge_dataset,
        create_version,
        list_versions,
        delete_version,
        export,
        dataset_list_inputs,
        list_inputs,
        upload_from_url,
        upload_from_bytes,
        upload_annotations,
        download_inputs,
        delete_inputs,
        run_example,
    )
}


def main(request_path: str, result_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    warnings = Warnings()
    sdk_logger.addHandler(warnings)
    outcome: dict[str, Any]
    try:
        result = OPS[request["op"]](Connection(**request["connection"]), **request["args"])
        outcome = {"result": result}
    except Exception as error:  # the test reports what the SDK raised, with its warnings
        outcome = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    outcome["warnings"] = warnings.messages
    Path(result_path).write_text(json.dumps(outcome))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # The SDK's worker pools may leave non-daemon threads behind after a failure.
    os._exit(0)
