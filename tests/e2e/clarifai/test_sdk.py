"""The unmodified `clarifai` SDK and clarifai-grpc's sync stub against the real server.

Each SDK call runs in its own process (sdk_calls.py): the SDK blocks, and the server runs
in this test's event loop; the process also gets an empty HOME and no CLARIFAI_* variable,
so only the arguments point it at datasetd. The SDK logs most failures instead of raising,
so after every call the server's state is read back through the native API.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import http.server
import itertools
import json
import os
import re
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from clarifai_grpc.channel.clarifai_channel import ClarifaiChannel
from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2
from datasetd.v1 import (
    annotation_pb2,
    annotation_service_pb2,
    annotation_service_pb2_grpc,
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    dataset_version_service_pb2,
    dataset_version_service_pb2_grpc,
    input_pb2,
    input_service_pb2,
    input_service_pb2_grpc,
    status_pb2,
)

from service.app import Running
from service.storage.db import Database
from tests.conftest import Caller, new_caller
from tests.e2e.test_upload import mp4_head
from tests.helpers import call_error, png_bytes
from tests.readme import fenced_block

if TYPE_CHECKING:  # the async stub types exist only in the generated stubs (.pyi)
    DatasetStub = dataset_service_pb2_grpc.DatasetServiceAsyncStub
    InputStub = input_service_pb2_grpc.InputServiceAsyncStub
    AnnotationStub = annotation_service_pb2_grpc.AnnotationServiceAsyncStub
    VersionStub = dataset_version_service_pb2_grpc.DatasetVersionServiceAsyncStub

SCRIPT = Path(__file__).with_name("sdk_calls.py")
SDK_TIMEOUT = 240.0
DUPLICATE = "Input has a duplicate ID."

CAT = png_bytes(32, 24, (10, 120, 200))
DOG = png_bytes(20, 30, (200, 120, 10))
NOTE = b"a short note about cats\n"
CLIP = mp4_head(320, 240, seconds=4) + struct.pack(">I", 8 + 1024) + b"mdat" + bytes(1024)
MEDIA = {
    "/cat.png": ("image/png", CAT),
    "/dog.png": ("image/png", DOG),
    "/note.txt": ("text/plain", NOTE),
    "/clip.mp4": ("video/mp4", CLIP),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- media over HTTP, for URL inputs ------------------------------------------------------


class _MediaHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        found = MEDIA.get(self.path)
        if found is None:
            self.send_error(404)
            return
        content_type, body = found
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def media() -> Iterator[str]:
    """Base URL of the test media. The in-process server does not fetch URLs
    (DATASETD_FETCH_URLS is off, and loopback would be refused anyway): URL inputs are
    kept as references, and the SDK's download_inputs fetches them from here."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MediaHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# --- the SDK in a subprocess ---------------------------------------------------------------


@dataclass
class Outcome:
    result: Any
    warnings: list[str]
    error: str | None


def isolated_env(home: Path) -> dict[str, str]:
    """No CLARIFAI_* (the SDK reads them, some at import) and no proxy (the SDK's requests
    and gRPC calls go to loopback)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CLARIFAI_") and not key.lower().endswith("_proxy")
    }
    env["HOME"] = str(home)
    return env


@dataclass
class Sdk:
    port: int
    caller: Caller
    root: Path
    numbers: Iterator[int] = field(default_factory=itertools.count)
    # What the SDK logged at WARNING or above during the last call: where it reports the
    # failures it does not raise (assertion messages show them).
    warnings: list[str] = field(default_factory=list)

    async def outcome(self, op: str, **args: Any) -> Outcome:
        """Runs one SDK call; each in a fresh working directory (the SDK writes its upload
        logs into the CWD with one-second names)."""
        number = next(self.numbers)
        work = self.root / f"call-{number}-{op}"
        work.mkdir(parents=True)
        home = self.root / "home"
        home.mkdir(exist_ok=True)
        request, result = work / "request.json", work / "result.json"
        connection = {
            "base_url": f"http://127.0.0.1:{self.port}",
            "pat": self.caller.key,
            "user_id": "me",
            "app_id": self.caller.app_id,
        }
        request.write_text(json.dumps({"connection": connection, "op": op, "args": args}))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            str(request),
            str(result),
            cwd=work,
            env=isolated_env(home),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), SDK_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"SDK {op} still running after {SDK_TIMEOUT} s") from None
        if process.returncode != 0 or not result.exists():
            tail = output.decode(errors="replace")[-4000:]
            raise AssertionError(f"SDK {op} process failed ({process.returncode}):\n{tail}")
        answer = json.loads(result.read_text())
        self.warnings = answer["warnings"]
        error = answer.get("error")
        if error:
            error = f"{error}\n{answer['traceback']}"
        return Outcome(answer.get("result"), answer["warnings"], error)

    async def __call__(self, op: str, **args: Any) -> Any:
        """Runs one SDK call that must not raise; its result."""
        outcome = await self.outcome(op, **args)
        if outcome.error:
            warnings = "\n".join(outcome.warnings)
            raise AssertionError(f"SDK {op} raised {outcome.error}\nSDK warnings:\n{warnings}")
        return outcome.result


@pytest.fixture
def sdk(server: Running, caller: Caller, tmp_path: Path) -> Sdk:
    return Sdk(server.port, caller, tmp_path / "sdk")


# --- the server's state through the native API ---------------------------------------------


async def members(
    datasets: DatasetStub, caller: Caller, dataset_id: str
) -> dict[str, input_pb2.Input]:
    """The dataset's inputs by id."""
    found: dict[str, input_pb2.Input] = {}
    token = ""
    while True:
        page = await datasets.ListDatasetInputs(
            dataset_service_pb2.ListDatasetInputsRequest(
                app_id=caller.app_id, dataset_id=dataset_id, page_size=500, page_token=token
            ),
            metadata=caller.metadata,
        )
        found.update((item.input.id, item.input) for item in page.dataset_inputs)
        token = page.next_page_token
        if not token:
            return found


async def app_inputs(inputs: InputStub, caller: Caller) -> dict[str, input_pb2.Input]:
    found: dict[str, input_pb2.Input] = {}
    token = ""
    while True:
        page = await inputs.ListInputs(
            input_service_pb2.ListInputsRequest(
                app_id=caller.app_id, page_size=500, page_token=token
            ),
            metadata=caller.metadata,
        )
        found.update((item.id, item) for item in page.inputs)
        token = page.next_page_token
        if not token:
            return found


async def annotations_of(
    annotations: AnnotationStub, caller: Caller, input_ids: list[str]
) -> list[annotation_pb2.Annotation]:
    found: list[annotation_pb2.Annotation] = []
    token = ""
    while True:
        page = await annotations.ListAnnotations(
            annotation_service_pb2.ListAnnotationsRequest(
                app_id=caller.app_id, input_ids=input_ids, page_size=500, page_token=token
            ),
            metadata=caller.metadata,
        )
        found += page.annotations
        token = page.next_page_token
        if not token:
            return found


def region_concepts(found: list[annotation_pb2.Annotation]) -> list[tuple[str, str]]:
    """(input id, concept id) of every region, sorted."""
    return sorted(
        (a.input_id, c.id) for a in found for r in a.data.regions for c in r.data.concepts
    )


def input_concepts(found: dict[str, input_pb2.Input]) -> dict[str, list[str]]:
    return {key: sorted(c.id for c in item.data.concepts) for key, item in found.items()}


async def ready_version(
    versions: VersionStub, caller: Caller, dataset_id: str, version_id: str
) -> Any:
    """The version the SDK created, READY as soon as its call returned (a version is a
    snapshot by reference: there is no build to wait for, and the SDK never waits)."""
    got = await versions.GetDatasetVersion(
        dataset_version_service_pb2.GetDatasetVersionRequest(
            app_id=caller.app_id, dataset_id=dataset_id, version_id=version_id
        ),
        metadata=caller.metadata,
    )
    assert got.version.status.code == status_pb2.STATUS_CODE_DATASET_VERSION_READY, (
        got.version.status
    )
    return got.version


async def new_dataset(datasets: DatasetStub, caller: Caller, dataset_id: str) -> None:
    await datasets.CreateDataset(
        dataset_service_pb2.CreateDatasetRequest(
            app_id=caller.app_id, dataset=dataset_pb2.Dataset(id=dataset_id)
        ),
        metadata=caller.metadata,
    )


# --- App: datasets ----------------------------------------------------------------------------


async def test_app_creates_lists_gets_patches_and_deletes_datasets(
    sdk: Sdk, datasets: DatasetStub, caller: Caller, db: Database
) -> None:
    for number in range(3):
        made = await sdk("create_dataset", dataset_id=f"birds-{number}", description=f"n{number}")
        assert made == {"id": f"birds-{number}"}
        got = await datasets.GetDataset(
            dataset_service_pb2.GetDatasetRequest(
                app_id=caller.app_id, dataset_id=f"birds-{number}"
            ),
            metadata=caller.metadata,
        )
        assert got.dataset.description == f"n{number}"

    # Without page numbers the SDK pages 1, 2, ... until an empty page; with them, one page.
    assert sorted(await sdk("list_datasets")) == ["birds-0", "birds-1", "birds-2"]
    first = await sdk("list_datasets", page_no=1, per_page=2)
    second = await sdk("list_datasets", page_no=2, per_page=2)
    assert (len(first), len(second)) == (2, 1)
    assert sorted(first + second) == ["birds-0", "birds-1", "birds-2"]

    got = await sdk("get_dataset", dataset_id="birds-1")
    assert got["id"] == "birds-1" and got["description"] == "n1"

    await sdk("patch_dataset", dataset_id="birds-1", action="merge", notes="seen at dawn")
    patched = await datasets.GetDataset(
        dataset_service_pb2.GetDatasetRequest(app_id=caller.app_id, dataset_id="birds-1"),
        metadata=caller.metadata,
    )
    assert (patched.dataset.notes, patched.dataset.description) == ("seen at dawn", "n1")
    await sdk("patch_dataset", dataset_id="birds-1", action="overwrite", description="new")
    overwritten = await datasets.GetDataset(
        dataset_service_pb2.GetDatasetRequest(app_id=caller.app_id, dataset_id="birds-1"),
        metadata=caller.metadata,
    )
    assert overwritten.dataset.description == "new"

    await sdk("delete_dataset", dataset_id="birds-2")
    gone = await call_error(
        datasets.GetDataset(
            dataset_service_pb2.GetDatasetRequest(app_id=caller.app_id, dataset_id="birds-2"),
            metadata=caller.metadata,
        )
    )
    assert gone.code == grpc.StatusCode.NOT_FOUND

    # A refusal reaches the SDK in-band: it raises with the status naming the problem.
    taken = await sdk.outcome("create_dataset", dataset_id="birds-0")
    assert taken.error is not None and "CONN_INVALID_REQUEST" in taken.error, taken
    # (The SDK raises the status in protobuf text form, where quotes are escaped.)
    assert "birds-0" in taken.error and "already exists" in taken.error, taken
    stranger = Sdk(sdk.port, Caller(caller.app_id, "dsd_not-a-key-at-all"), sdk.root / "other")
    refused = await stranger.outcome("list_datasets")
    assert refused.error is not None and "CONN_KEY_INVALID" in refused.error, refused
    reader = Sdk(sdk.port, await new_caller(db, ("read",)), sdk.root / "reader")
    denied = await reader.outcome("create_dataset", dataset_id="nope")
    assert denied.error is not None and "CONN_INSUFFICIENT_SCOPES" in denied.error, denied


# --- Dataset: bulk uploads ----------------------------------------------------------------


async def test_upload_from_folder_images_with_folder_labels_and_texts(
    sdk: Sdk, datasets: DatasetStub, caller: Caller, tmp_path: Path
) -> None:
    await new_dataset(datasets, caller, "pets")
    cats = tmp_path / "cats"
    cats.mkdir()
    (cats / "Cat.One.png").write_bytes(CAT)
    (cats / "cat two.png").write_bytes(DOG)
    (cats / "readme.md").write_text("not an image: the SDK skips it")
    await sdk(
        "upload_from_folder", dataset_id="pets", folder=str(cats), input_type="image", labels=True
    )
    found = await members(datasets, caller, "pets")
    # Ids are the SDK's clean_input_id of the file stem (before the first dot).
    assert input_concepts(found) == {"cat": ["cats"], "cat_two": ["cats"]}
    assert found["cat"].data.image.image_info.width == 32

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "first.txt").write_text("the first note")
    (notes / "second.txt").write_text("the second, longer note")
    await sdk(
        "upload_from_folder", dataset_id="pets", folder=str(notes), input_type="text", labels=False
    )
    found = await members(datasets, caller, "pets")
    assert set(found) == {"cat", "cat_two", "first", "second"}
    assert found["second"].data.text.text_info.char_count == len("the second, longer note")

    listed = await sdk("dataset_list_inputs", dataset_id="pets")
    assert sorted(item["id"] for item in listed) == ["cat", "cat_two", "first", "second"]
    texts = await sdk("dataset_list_inputs", dataset_id="pets", input_type="text")
    assert sorted(item["id"] for item in texts) == ["first", "second"]


def write_csv(path: Path, rows: list[dict[str, str]]) -> str:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), quoting=csv.QUOTE_ALL)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


async def test_upload_from_csv_of_each_type_with_labels_metadata_and_geopoints(
    sdk: Sdk, datasets: DatasetStub, caller: Caller, tmp_path: Path, media: str
) -> None:
    await new_dataset(datasets, caller, "csv")
    raw = write_csv(
        tmp_path / "raw.csv",
        [
            {
                "inputid": "t1",
                "input": "hello world",
                "concepts": "greeting,short",
                "metadata": "{'lang': 'en', 'n': 1}",
                "geopoints": "-122.4,37.8",
            },
            {
                "inputid": "t2",
                "input": "goodbye",
                "concepts": "farewell",
                "metadata": "{'lang': 'en'}",
                "geopoints": "2.35,48.85",
            },
        ],
    )
    await sdk(
        "upload_from_csv",
        dataset_id="csv",
        csv_path=raw,
        input_type="text",
        csv_type="raw",
        labels=True,
    )
    found = await members(datasets, caller, "csv")
    assert input_concepts(found) == {"t1": ["greeting", "short"], "t2": ["farewell"]}
    t1 = found["t1"].data
    assert dict(t1.metadata) == {"lang": "en", "n": 1.0}
    assert (t1.geo.geo_point.longitude, t1.geo.geo_point.latitude) == pytest.approx((-122.4, 37.8))
    assert t1.text.text_info.char_count == len("hello world")

    urls = write_csv(
        tmp_path / "urls.csv",
        [
            {"inputid": "u1", "input": f"{media}/cat.png", "concepts": "cat"},
            {"inputid": "u2", "input": f"{media}/dog.png", "concepts": "dog"},
        ],
    )
    await sdk(
        "upload_from_csv",
        dataset_id="csv",
        csv_path=urls,
        input_type="image",
        csv_type="url",
        labels=True,
    )
    found = await members(datasets, caller, "csv")
    assert input_concepts(found)["u1"] == ["cat"] and input_concepts(found)["u2"] == ["dog"]
    assert found["u1"].data.HasField("image")

    (tmp_path / "cat.png").write_bytes(CAT)
    files = write_csv(
        tmp_path / "files.csv",
        [
            {
                "inputid": "f1",
                "input": str(tmp_path / "cat.png"),
                "concepts": "cat",
                "metadata": "{'source': 'disk'}",
                "geopoints": "10.5,-20.25",
            }
        ],
    )
    await sdk(
        "upload_from_csv",
        dataset_id="csv",
        csv_path=files,
        input_type="image",
        csv_type="file_path",
        labels=True,
    )
    found = await members(datasets, caller, "csv")
    assert set(found) == {"t1", "t2", "u1", "u2", "f1"}
    f1 = found["f1"].data
    assert input_concepts(found)["f1"] == ["cat"] and dict(f1.metadata) == {"source": "disk"}
    assert (f1.geo.geo_point.longitude, f1.geo.geo_point.latitude) == pytest.approx((10.5, -20.25))
    assert f1.image.image_info.width == 32


def write(path: str, data: bytes) -> None:
    Path(path).write_bytes(data)


def read(path: str) -> str:
    return Path(path).read_text()


def image_files(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        path = folder / f"img{number}.png"
        path.write_bytes(png_bytes(16 + number, 12, (number * 40 % 256, 90, 160)))
        paths.append(str(path))
    return paths


async def test_upload_dataset_detection_segmentation_classification_with_status(
    sdk: Sdk,
    datasets: DatasetStub,
    annotations: AnnotationStub,
    versions: VersionStub,
    caller: Caller,
    tmp_path: Path,
) -> None:
    paths = image_files(tmp_path / "images", 3)
    await new_dataset(datasets, caller, "det")
    detection = [
        {
            "image_path": paths[0],
            "labels": ["cat", "dog"],
            "bboxes": [[0.1, 0.2, 0.5, 0.6], [0.5, 0.5, 0.9, 0.95]],
            "id": 0,
            "geo_info": [-122.4, 37.8],
        },
        {"image_path": paths[1], "labels": ["cat"], "bboxes": [[0.0, 0.0, 1.0, 1.0]], "id": 1},
    ]
    # get_upload_status: a throw-away version before and after, then its metrics summary.
    await sdk(
        "upload_dataset",
        dataset_id="det",
        task="visual_detection",
        items=detection,
        get_upload_status=True,
    )
    found = await members(datasets, caller, "det")
    assert set(found) == {"det-0", "det-1"}
    assert dict(found["det-0"].data.metadata) == {"filename": "img0.png"}
    point = found["det-0"].data.geo.geo_point
    assert (point.longitude, point.latitude) == pytest.approx((-122.4, 37.8))
    boxes = await annotations_of(annotations, caller, ["det-0", "det-1"])
    assert region_concepts(boxes) == [("det-0", "cat"), ("det-0", "dog"), ("det-1", "cat")]
    first = next(
        r.region_info.bounding_box
        for a in boxes
        for r in a.data.regions
        if a.input_id == "det-0" and r.data.concepts[0].id == "cat"
    )
    assert (first.top_row, first.left_col, first.bottom_row, first.right_col) == pytest.approx(
        (0.2, 0.1, 0.6, 0.5)
    )
    made = await versions.ListDatasetVersions(
        dataset_version_service_pb2.ListDatasetVersionsRequest(
            app_id=caller.app_id, dataset_id="det"
        ),
        metadata=caller.metadata,
    )
    assert [v.description for v in made.versions] == ["SDK Upload Status"] * 2
    counted = await sdk("upload_status", dataset_id="det")
    assert counted == {
        "inputs": {"total": 2, "image": 2},
        "annotations": {"concepts": 0, "bboxes": 3, "polygons": 0},
    }

    await new_dataset(datasets, caller, "seg")
    polygon = [[0.1, 0.1], [0.9, 0.1], [0.9, 0.8], [0.1, 0.8]]
    segmentation = [
        {"image_path": paths[2], "labels": ["road"], "polygons": [polygon], "id": "a"},
    ]
    await sdk("upload_dataset", dataset_id="seg", task="visual_segmentation", items=segmentation)
    masks = await annotations_of(annotations, caller, ["seg-a"])
    assert region_concepts(masks) == [("seg-a", "road")]
    points = next(r for a in masks for r in a.data.regions).region_info.polygon.points
    assert [c for p in points for c in (p.col, p.row)] == pytest.approx(
        [c for p in polygon for c in p]
    )

    await new_dataset(datasets, caller, "cls")
    classification = [
        {"image_path": paths[0], "labels": ["cat"], "id": 0},
        {"image_path": paths[1], "labels": ["dog", "puppy"], "id": 1, "metadata": {"k": "v"}},
    ]
    # One input per chunk: the SDK uploads the chunks from concurrent threads, each with its
    # own inputs-add job.
    await sdk(
        "upload_dataset",
        dataset_id="cls",
        task="visual_classification",
        items=classification,
        batch_size=1,
    )
    found = await members(datasets, caller, "cls")
    assert input_concepts(found) == {"cls-0": ["cat"], "cls-1": ["dog", "puppy"]}
    assert dict(found["cls-1"].data.metadata) == {"k": "v"}


async def test_retry_upload_from_logs_failed_inputs_and_duplicates(
    sdk: Sdk, datasets: DatasetStub, caller: Caller, tmp_path: Path
) -> None:
    paths = image_files(tmp_path / "images", 3)
    # Not an image: the server refuses this input, the SDK retries it twice, then logs it.
    write(paths[1], b"this is not an image at all")
    items = [{"image_path": path, "labels": ["pet"], "id": n} for n, path in enumerate(paths)]
    await new_dataset(datasets, caller, "pets")
    uploaded = await sdk(
        "upload_dataset",
        dataset_id="pets",
        task="visual_classification",
        items=items,
        log_warnings=True,
    )
    assert set(await members(datasets, caller, "pets")) == {"pets-0", "pets-2"}
    (log,) = uploaded["logs"]
    failed_rows = re.findall(r"\| +(\d+) +\| +(\S+) +\| +(.+?) +\|", read(log))
    assert [(index, input_id) for index, input_id, _ in failed_rows] == [("1", "pets-1")]
    # The server's per-input details (the log's Status column) name the refused field.
    assert "data.image.base64" in failed_rows[0][2], failed_rows

    # Fixed on disk, the failed index goes up again.
    write(paths[1], png_bytes(10, 10))
    await sdk(
        "retry_upload_from_logs",
        dataset_id="pets",
        log_file=log,
        task="visual_classification",
        items=items,
        retry_duplicates=False,
    )
    found = await members(datasets, caller, "pets")
    assert input_concepts(found) == {"pets-0": ["pet"], "pets-1": ["pet"], "pets-2": ["pet"]}

    # The same upload again: every id is taken, logged as duplicates by the server's text.
    again = await sdk(
        "upload_dataset",
        dataset_id="pets",
        task="visual_classification",
        items=items,
        log_warnings=True,
    )
    (duplicates_log,) = again["logs"]
    text = read(duplicates_log)
    assert text.count(DUPLICATE) == 3, text
    assert set(await members(datasets, caller, "pets")) == {"pets-0", "pets-1", "pets-2"}

    await sdk(
        "retry_upload_from_logs",
        dataset_id="pets",
        log_file=duplicates_log,
        task="visual_classification",
        items=items,
        retry_duplicates=False,
    )
    assert len(await members(datasets, caller, "pets")) == 3

    # retry_duplicates: the same items again under fresh uuid ids.
    await sdk(
        "retry_upload_from_logs",
        dataset_id="pets",
        log_file=duplicates_log,
        task="visual_classification",
        items=items,
        retry_duplicates=True,
    )
    found = await members(datasets, caller, "pets")
    fresh = {key for key in found if key not in {"pets-0", "pets-1", "pets-2"}}
    assert len(fresh) == 3 and all(re.fullmatch("[0-9a-f]{32}", key) for key in fresh), found
    assert all(input_concepts(found)[key] == ["pet"] for key in fresh)


# --- Dataset: merge, versions, export ------------------------------------------------------


async def test_merge_versions_and_export_read_back_by_the_sdk_reader(
    sdk: Sdk,
    datasets: DatasetStub,
    versions: VersionStub,
    caller: Caller,
    tmp_path: Path,
) -> None:
    paths = image_files(tmp_path / "images", 3)
    await new_dataset(datasets, caller, "a")
    await new_dataset(datasets, caller, "b")
    await sdk(
        "upload_dataset",
        dataset_id="a",
        task="visual_detection",
        items=[
            {"image_path": paths[0], "labels": ["cat"], "bboxes": [[0.1, 0.1, 0.4, 0.4]], "id": 0},
            {"image_path": paths[1], "labels": ["dog"], "bboxes": [[0.2, 0.2, 0.6, 0.9]], "id": 1},
        ],
    )
    await sdk(
        "upload_dataset",
        dataset_id="b",
        task="visual_classification",
        items=[{"image_path": paths[2], "labels": ["bird"], "id": 0}],
    )
    await sdk("merge_dataset", dataset_id="a", source_id="b")
    assert set(await members(datasets, caller, "a")) == {"a-0", "a-1", "b-0"}
    assert set(await members(datasets, caller, "b")) == {"b-0"}

    made = await sdk("create_version", dataset_id="a", id="v1", description="first cut")
    assert made == {"id": "v1"}
    # As a script does: export at once; the SDK polls PutDatasetVersionExports while the
    # version builds and the archive is written, then downloads it and every input's media.
    save = tmp_path / "export.zip"
    exported = await sdk("export", dataset_id="a", version_id="v1", save_path=str(save))
    troubles = [w for w in sdk.warnings if "rror" in w or "ailed" in w]
    assert not troubles, "\n".join(troubles)
    assert exported["entries"] == sorted(
        [f"all/inputs/{key}.png" for key in ("a-0", "a-1", "b-0")]
        + [f"all/annotations/{key}.json" for key in ("a-0", "a-1", "b-0")]
    ), exported
    read = {item["id"]: item for item in exported["read"]}
    assert set(read) == {"a-0", "a-1", "b-0"}
    assert read["b-0"]["concepts"] == ["bird"] and read["a-0"]["regions"] == 1
    assert all(item["hosted"] for item in read.values())
    a0 = exported["annotations"]["all/annotations/a-0.json"]
    assert a0[0] == {"metadata": {"filename": "img0.png"}}
    assert a0[1]["data"]["concepts"][0]["id"] == "cat"
    version = await ready_version(versions, caller, "a", "v1")
    assert version.description == "first cut"

    other = await sdk("create_version", dataset_id="a", description="scratch")
    assert sorted(await sdk("list_versions", dataset_id="a")) == sorted(["v1", other["id"]])
    await sdk("delete_version", dataset_id="a", version_id=other["id"])
    listed = await versions.ListDatasetVersions(
        dataset_version_service_pb2.ListDatasetVersionsRequest(
            app_id=caller.app_id, dataset_id="a"
        ),
        metadata=caller.metadata,
    )
    assert [v.id for v in listed.versions] == ["v1"]


# --- Inputs ------------------------------------------------------------------------------


async def test_inputs_upload_annotate_list_download_and_delete(
    sdk: Sdk,
    datasets: DatasetStub,
    inputs: InputStub,
    annotations: AnnotationStub,
    caller: Caller,
    media: str,
) -> None:
    await new_dataset(datasets, caller, "media")
    for input_id, kind, path in (
        ("img-url", "image_url", "/cat.png"),
        ("vid-url", "video_url", "/clip.mp4"),
        ("txt-url", "text_url", "/note.txt"),
    ):
        done = await sdk(
            "upload_from_url", input_id=input_id, dataset_id="media", **{kind: media + path}
        )
        assert done["input"]["id"] == input_id
        assert done["input"]["status"] == status_code_pb2.INPUT_DOWNLOAD_SUCCESS
    uploaded = await sdk(
        "upload_from_bytes",
        input_id="img-bytes",
        kind="image",
        data_b64=base64.b64encode(DOG).decode(),
        dataset_id="media",
    )
    assert uploaded["code"] == status_code_pb2.SUCCESS
    found = await members(datasets, caller, "media")
    assert set(found) == {"img-url", "vid-url", "txt-url", "img-bytes"}
    assert found["img-bytes"].data.image.image_info.width == 20
    assert found["vid-url"].data.HasField("video") and found["txt-url"].data.HasField("text")

    posted = await sdk(
        "upload_annotations",
        annotations=[
            {"kind": "bbox", "input_id": "img-bytes", "label": "dog", "bbox": [0.1, 0.2, 0.3, 0.4]},
            {
                "kind": "polygon",
                "input_id": "img-url",
                "label": "cat",
                "points": [[0.1, 0.1], [0.5, 0.1], [0.3, 0.6]],
            },
            {
                "kind": "frames",
                "input_id": "vid-url",
                "label": "car",
                "frames": [
                    {"index": 0, "time_ms": 0, "bbox": [0.1, 0.1, 0.2, 0.2], "track_id": "t1"},
                    {"index": 30, "time_ms": 1000, "bbox": [0.2, 0.1, 0.3, 0.2], "track_id": "t1"},
                ],
            },
        ],
    )
    assert posted == {"retry": 0}, sdk.warnings
    # A refused annotation comes back for the SDK's retry, and its status names the input.
    refused = await sdk(
        "upload_annotations",
        annotations=[{"kind": "bbox", "input_id": "nope", "label": "x", "bbox": [0, 0, 1, 1]}],
    )
    assert refused == {"retry": 1}
    assert any("nope" in warning for warning in sdk.warnings), sdk.warnings
    marked = await annotations_of(annotations, caller, ["img-bytes", "img-url", "vid-url"])
    assert region_concepts(marked) == [("img-bytes", "dog"), ("img-url", "cat")]
    polygon = next(r for a in marked if a.input_id == "img-url" for r in a.data.regions)
    assert len(polygon.region_info.polygon.points) == 3
    frames = [f for a in marked if a.input_id == "vid-url" for f in a.data.frames]
    assert [(f.frame_info.index, f.frame_info.time) for f in frames] == [(0, 0), (30, 1000)]
    assert {r.track_id for f in frames for r in f.data.regions} == {"t1"}

    listed = await sdk("list_inputs")
    assert sorted(item["id"] for item in listed) == sorted(await app_inputs(inputs, caller))
    videos = await sdk("list_inputs", input_type="video")
    assert [item["id"] for item in videos] == ["vid-url"]
    in_dataset = await sdk("list_inputs", dataset_id="media")
    assert len(in_dataset) == 4

    downloaded = await sdk("download_inputs", input_ids=["img-url", "img-bytes", "txt-url"])
    assert downloaded["sha256"] == sorted([sha256(CAT), sha256(DOG), sha256(NOTE)]), downloaded

    deleted = await sdk("delete_inputs", input_ids=["img-bytes", "txt-url"])
    assert sorted(deleted) == ["img-bytes", "txt-url"]
    assert set(await app_inputs(inputs, caller)) == {"img-url", "vid-url"}
    gone = await call_error(
        inputs.GetInput(
            input_service_pb2.GetInputRequest(app_id=caller.app_id, input_id="img-bytes"),
            metadata=caller.metadata,
        )
    )
    assert gone.code == grpc.StatusCode.NOT_FOUND


# --- clarifai-grpc's sync stub -----------------------------------------------------------


def stub_calls(port: int, caller: Caller) -> dict[str, Any]:
    """What a clarifai-grpc script does, on its own (sync) channel."""
    channel = ClarifaiChannel.get_insecure_grpc_channel(base="127.0.0.1", port=port)
    try:
        stub = service_pb2_grpc.V2Stub(channel)
        scope = resources_pb2.UserAppIDSet(user_id="me", app_id=caller.app_id)
        meta = caller.metadata
        made = stub.PostDatasets(
            service_pb2.PostDatasetsRequest(
                user_app_id=scope, datasets=[resources_pb2.Dataset(id="grpc")]
            ),
            metadata=meta,
        )
        posted = stub.PostInputs(
            service_pb2.PostInputsRequest(
                user_app_id=scope,
                inputs=[
                    resources_pb2.Input(
                        id="hello",
                        dataset_ids=["grpc"],
                        data=resources_pb2.Data(
                            text=resources_pb2.Text(raw="hello there"),
                            concepts=[resources_pb2.Concept(id="greeting", value=1.0)],
                        ),
                    )
                ],
            ),
            metadata=meta,
        )
        got = stub.GetInput(
            service_pb2.GetInputRequest(user_app_id=scope, input_id="hello"), metadata=meta
        )
        # Any user id names the key's app: datasetd has no users.
        anyone = resources_pb2.UserAppIDSet(user_id="alice", app_id=caller.app_id)
        listed = stub.ListDatasetInputs(
            service_pb2.ListDatasetInputsRequest(user_app_id=anyone, dataset_id="grpc"),
            metadata=meta,
        )
        missing = stub.GetInput(
            service_pb2.GetInputRequest(user_app_id=scope, input_id="nope"), metadata=meta
        )
        return {
            "made": made.status.code,
            "posted": posted.status.code,
            "got": (got.status.code, got.input.id),
            "listed": (listed.status.code, [d.input.id for d in listed.dataset_inputs]),
            "missing": missing.status.code,
        }
    finally:
        channel.close()


async def test_clarifai_grpc_sync_stub(
    server: Running, datasets: DatasetStub, inputs: InputStub, caller: Caller
) -> None:
    seen = await asyncio.to_thread(stub_calls, server.port, caller)
    assert seen == {
        "made": status_code_pb2.SUCCESS,
        "posted": status_code_pb2.SUCCESS,
        "got": (status_code_pb2.SUCCESS, "hello"),
        "listed": (status_code_pb2.SUCCESS, ["hello"]),
        "missing": status_code_pb2.CONN_DOES_NOT_EXIST,
    }
    found = await members(datasets, caller, "grpc")
    assert input_concepts(found) == {"hello": ["greeting"]}
    assert found["hello"].data.text.text_info.char_count == len("hello there")


# --- the README's examples ----------------------------------------------------------------


def readme_example(containing: str, port: int, app_id: str) -> tuple[str, list[str]]:
    """The README's python block containing `containing`, pointed at this server and app,
    and the output its `print(...)  # output` comments promise."""
    code = fenced_block("python", containing)
    code = code.replace("127.0.0.1:50051", f"127.0.0.1:{port}").replace(
        "port=50051", f"port={port}"
    )
    code = code.replace('app_id="main"', f'app_id="{app_id}"')
    promised = [
        line.split("  # ", 1)[1] for line in code.splitlines() if line.lstrip().startswith("print(")
    ]
    return code, promised


async def test_readme_examples_run_as_written(
    sdk: Sdk, server: Running, datasets: DatasetStub, versions: VersionStub, caller: Caller
) -> None:
    code, promised = readme_example(
        'pat=os.environ["DATASETD_API_KEY"]', server.port, caller.app_id
    )
    assert await sdk("run_example", code=code) == promised
    found = await members(datasets, caller, "notes")
    assert input_concepts(found) == {"note-1": ["cat"], "note-2": ["dog"]}
    version = await ready_version(versions, caller, "notes", "v1")
    assert version.description == "first cut"

    code, promised = readme_example(
        "stub = service_pb2_grpc.V2Stub(channel)", server.port, caller.app_id
    )
    assert await sdk("run_example", code=code) == promised
