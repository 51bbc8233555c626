"""The client's upload engine against the real in-process server.

Every client call goes through `asyncio.to_thread`: the client blocks, and the
server runs on the test's event loop.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import itertools
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from datasetd.v1 import annotation_pb2, annotation_service_pb2, data_pb2, input_service_pb2

from service.app import Running
from service.client import Client, Dataset, NotFoundError, UploadItem, UploadResult, uploads
from service.client.sources import (
    BAD_SOURCE,
    CALL_FAILED,
    DUPLICATE,
    NOT_ATTEMPTED,
    UNREADABLE,
    read_coco,
)
from service.client.upload.calls import run_inputs
from service.client.upload.engine import Engine
from service.client.upload.messages import annotation_message
from service.observability import metrics
from tests.conftest import Caller
from tests.helpers import png_bytes

T = TypeVar("T")


async def run(call: Callable[[], T]) -> T:
    return await asyncio.to_thread(call)


@pytest.fixture
def client(server: Running, caller: Caller) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.port}", caller.key, caller.app_id) as opened:
        yield opened


async def new_dataset(client: Client, dataset_id: str = "ds") -> Dataset:
    await run(lambda: client.datasets.create(dataset_id))
    return client.dataset(dataset_id)


async def stored(dataset: Dataset) -> dict[str, list[str]]:
    return {i.id: sorted(i.concepts) for i in await run(lambda: list(dataset.list_inputs()))}


def log_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def run_states(folder: Path) -> list[Path]:
    """The run-token files of unfinished uploads whose failure log is in `folder`."""
    return sorted(folder.glob(".datasetd-upload-*.state"))


def png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color=(seed % 256, 7, 9)))
    return path


async def test_folder_upload_with_labels_and_re_runs_create_nothing_twice(
    client: Client, tmp_path: Path
) -> None:
    dataset = await new_dataset(client)
    root = tmp_path / "pets"
    for n in range(3):
        png(root / "cats" / f"cat {n}.png", n)
    png(root / "dogs" / "rex.PNG", 10)
    png(root / "dogs" / "puppies" / "tiny.png", 11)
    png(root / "top.png", 12)
    (root / "notes.md").write_text("not media")
    log = tmp_path / "failures.csv"

    def upload(batch_size: int) -> UploadResult:
        return dataset.upload_from_folder(
            root, labels=True, batch_size=batch_size, show_progress=False, failure_log=log
        )

    first = await run(lambda: upload(2))
    assert (first.total, first.created, first.failed, first.skipped) == (6, 6, 0, 1)
    assert first.failure_log is None and not log.exists()
    expected = {
        "cat_0": ["cats"],
        "cat_1": ["cats"],
        "cat_2": ["cats"],
        "rex": ["dogs"],
        "tiny": ["puppies"],
        "top": ["pets"],
    }
    assert await stored(dataset) == expected

    # The run finished cleanly, so its token is gone: a new run really uploads,
    # and finds every id taken instead of replaying "created".
    assert not run_states(tmp_path)
    again = await run(lambda: upload(2))
    assert (again.created, again.failed, again.already_exists) == (0, 6, 6)
    assert await stored(dataset) == expected

    # Other batches: other request ids too; the ids are taken, so nothing is duplicated.
    regrouped = await run(lambda: upload(5))
    assert (regrouped.created, regrouped.failed, regrouped.already_exists) == (0, 6, 6)
    assert await stored(dataset) == expected
    rows = log_rows(log)
    assert {r["input_id"] for r in rows} == set(expected)
    assert {r["code"] for r in rows} == {DUPLICATE}
    assert all(r["reason"].startswith("already exists") for r in rows)
    assert {r["dataset_id"] for r in rows} == {"ds"}

    # Retrying duplicates skips them unless asked; then they get new ids.
    skipped = await run(lambda: dataset.retry(log, show_progress=False))
    assert (skipped.created, skipped.skipped) == (0, 6)
    assert log.exists()
    copies = await run(lambda: dataset.retry(log, allow_duplicates=True, show_progress=False))
    assert (copies.created, copies.failed) == (6, 0)
    assert copies.failure_log is None and not log.exists()
    after = await stored(dataset)
    assert len(after) == 12
    assert sorted(i for i in after if i not in expected) == sorted(i for i in after if "-dup-" in i)
    assert {i.split("-dup-")[0] for i in after if "-dup-" in i} == set(expected)


async def test_csv_with_bad_rows_then_retry_after_fixing_a_file(
    client: Client, tmp_path: Path
) -> None:
    dataset = await new_dataset(client)
    png(tmp_path / "imgs" / "good.png", 1)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image at all")
    path = tmp_path / "data.csv"
    path.write_text(
        "inputid,input,concepts,metadata,geopoints\n"  # 1
        'good,imgs/good.png,"cat,cute","{\'note\': ""it\'s mine""}","10.5,20"\n'  # 2
        "missing,imgs/later.png,cat,,\n"  # 3
        'badgeo,imgs/good.png,,,"10,100"\n'  # 4
        'badmeta,imgs/good.png,,"{""a"":\n1",\n'  # 5-6
        "broken,imgs/broken.png,,,\n"  # 7
        ",imgs/good.png,dog,,\n",  # 8: derived id, same bytes as "good"
        encoding="utf-8",
    )
    log = tmp_path / "log.csv"
    result = await run(
        lambda: dataset.upload_from_csv(
            path, csv_type="file_path", batch_size=2, show_progress=False, failure_log=log
        )
    )
    assert (result.total, result.created, result.failed) == (6, 2, 4)
    inputs = await run(lambda: {i.id: i for i in dataset.list_inputs()})
    assert inputs["good"].concepts == ["cat", "cute"]
    assert inputs["good"].metadata == {"note": "it's mine"}
    derived = next(i for i in inputs if i != "good")
    assert derived.startswith("csv-") and inputs[derived].concepts == ["dog"]

    rows = {int(r["index"]): r for r in log_rows(log)}
    assert sorted(rows) == [3, 4, 5, 7]
    assert rows[3]["code"] == UNREADABLE and "later.png" in rows[3]["reason"]
    assert rows[3]["source"] == "data.csv:3"
    assert rows[4]["code"] == BAD_SOURCE and "latitude" in rows[4]["reason"]
    assert rows[5]["code"] == BAD_SOURCE and "metadata" in rows[5]["reason"]
    assert rows[7]["code"] == "invalid" and rows[7]["input_id"] == "broken"
    assert [f.index for f in result.failures] == [3, 4, 5, 7]

    # Fix the missing file and retry: only the failed rows are sent again.
    png(tmp_path / "imgs" / "later.png", 2)
    retried = await run(lambda: uploads.retry(client.rpc, log, show_progress=False))
    assert (retried.created, retried.failed, retried.skipped) == (1, 1, 2)
    assert set(await stored(dataset)) == {"good", derived, "missing"}
    # The log now holds what still fails: the bad rows and the corrupt image.
    assert sorted(int(r["index"]) for r in log_rows(log)) == [4, 5, 7]


async def test_coco_upload_stores_normalised_boxes(client: Client, tmp_path: Path) -> None:
    dataset = await new_dataset(client)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes(200, 100))
    (images / "b.png").write_bytes(png_bytes(50, 50))
    document: dict[str, Any] = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 200, "height": 100},
            {"id": 2, "file_name": "b.png", "width": 50, "height": 50},
        ],
        "categories": [{"id": 1, "name": "traffic light"}, {"id": 2, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 10, 100, 50]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 200, 100]},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [10, 10, 100, 10]},
        ],
    }
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(document))
    log = tmp_path / "coco-log.csv"

    def upload() -> UploadResult:
        return dataset.upload_coco(images, instances, show_progress=False, failure_log=log)

    result = await run(upload)
    assert (result.total, result.created, result.failed) == (2, 2, 0)
    assert (result.annotations_total, result.annotations_created) == (3, 2)
    assert result.annotations_failed == 1
    [bad] = log_rows(log)
    assert (bad["kind"], bad["index"], bad["input_id"]) == ("annotation", "3", "b")
    assert "outside" in bad["reason"]

    response = await run(
        lambda: client.rpc.call(
            client.rpc.annotations.ListAnnotations,
            annotation_service_pb2.ListAnnotationsRequest(
                app_id=client.app, input_ids=["a"], page_size=100
            ),
        )
    )
    boxes = {
        region.data.concepts[0].id: region.region_info.bounding_box
        for annotation in response.annotations
        for region in annotation.data.regions
    }
    assert set(boxes) == {"traffic_light", "cat"}
    light = boxes["traffic_light"]
    assert (light.left_col, light.top_row) == pytest.approx((0.1, 0.1))
    assert (light.right_col, light.bottom_row) == pytest.approx((0.6, 0.6))
    whole = boxes["cat"]
    assert (whole.left_col, whole.top_row, whole.right_col, whole.bottom_row) == pytest.approx(
        (0.0, 0.0, 1.0, 1.0)
    )
    info = await run(lambda: client.datasets.get("ds"))
    assert info.statistic.asset_total == 2

    # A re-run creates nothing twice: the failed box kept the run's token, so
    # the batches are replayed; the annotation ids are the same anyway.
    again = await run(upload)
    assert again.created == 2 and again.annotations_created == 2
    recount = await run(
        lambda: client.rpc.call(
            client.rpc.annotations.ListAnnotations,
            annotation_service_pb2.ListAnnotationsRequest(
                app_id=client.app, input_ids=["a", "b"], page_size=100
            ),
        )
    )
    assert sum(len(a.data.regions) for a in recount.annotations) == 2


async def test_upload_inputs_and_annotations_from_items(client: Client, tmp_path: Path) -> None:
    dataset = await new_dataset(client)
    items = [
        UploadItem("t1", "text", text="hello", concepts=("greeting",), geo=(1.5, 2.5)),
        UploadItem("i1", data=png_bytes(), metadata={"k": "v"}),
        UploadItem("bad", data=b"garbage"),
    ]
    log = tmp_path / "items.csv"
    result = await run(
        lambda: dataset.upload_inputs(items, batch_size=1, show_progress=False, failure_log=log)
    )
    assert (result.created, result.failed) == (2, 1)
    assert [(f.index, f.input_id) for f in result.failures] == [(3, "bad")]
    assert await stored(dataset) == {"t1": ["greeting"], "i1": []}

    notes = [
        uploads.AnnotationItem("i1", boxes=(uploads.Box("cat", 0.1, 0.1, 0.5, 0.5),)),
        uploads.AnnotationItem("nowhere", concepts=("cat",)),
    ]
    annotated = await run(
        lambda: dataset.upload_annotations(notes, show_progress=False, failure_log=log)
    )
    assert (annotated.total, annotated.created, annotated.failed) == (2, 1, 1)
    [row] = log_rows(log)
    assert (row["kind"], row["input_id"], row["code"]) == ("annotation", "nowhere", "invalid")
    # The same request is replayed; another one finds the derived annotation id taken.
    replayed = await run(
        lambda: dataset.upload_annotations(notes, show_progress=False, failure_log=log)
    )
    assert (replayed.created, replayed.failed) == (1, 1)
    alone = await run(
        lambda: dataset.upload_annotations(notes[:1], show_progress=False, failure_log=log)
    )
    assert (alone.created, alone.already_exists) == (0, 1)
    [row] = log_rows(log)
    assert (row["input_id"], row["code"]) == ("i1", DUPLICATE)


async def test_batch_size_and_dataset_are_checked_first(client: Client, tmp_path: Path) -> None:
    dataset = await new_dataset(client)
    for bad in (0, 129, -1):
        with pytest.raises(ValueError, match=r"batch_size must be 1\.\.128"):
            await run(functools.partial(dataset.upload_from_folder, tmp_path, batch_size=bad))
    with pytest.raises(ValueError, match="text inputs only"):
        await run(lambda: dataset.upload_from_csv(tmp_path / "x.csv", csv_type="raw"))
    png(tmp_path / "a.png", 1)
    missing = client.dataset("nope")
    with pytest.raises(NotFoundError):
        await run(lambda: missing.upload_from_folder(tmp_path, show_progress=False))


async def test_progress_and_summary_go_to_stderr(
    client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = await new_dataset(client)
    for n in range(3):
        png(tmp_path / "imgs" / f"{n}.png", n)
    result = await run(
        lambda: dataset.upload_from_folder(
            tmp_path / "imgs", failure_log=tmp_path / "log.csv", batch_size=2
        )
    )
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "created" in captured.err and "upload to ds" in captured.err
    assert result.to_dict()["created"] == 3
    assert "3 of 3 created" in result.summary()
    json.dumps(result.to_dict())


async def test_ctrl_c_writes_the_log_and_a_re_run_resumes(
    client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dataset = await new_dataset(client)
    for n in range(6):
        png(tmp_path / "imgs" / f"{n}.png", n)
    (tmp_path / "imgs" / "9.png").write_bytes(b"broken")
    real = run_inputs
    calls = 0

    def interrupted_on_third(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(uploads, "run_inputs", interrupted_on_third)
    log = tmp_path / "log.csv"

    def upload() -> UploadResult:
        return dataset.upload_from_folder(
            tmp_path / "imgs", batch_size=2, concurrency=1, show_progress=False, failure_log=log
        )

    with pytest.raises(KeyboardInterrupt):
        await run(upload)
    assert "interrupted; run the same command again to resume" in capsys.readouterr().err
    assert len(await stored(dataset)) == 4
    # What was never attempted is in the log, ready for `retry`.
    assert {r["code"] for r in log_rows(log)} == {NOT_ATTEMPTED}
    assert len(run_states(tmp_path)) == 1
    monkeypatch.setattr(uploads, "run_inputs", real)
    # Same command, same run token: the first batches are replayed, not duplicated.
    result = await run(upload)
    assert (result.created, result.failed) == (6, 1)
    assert sorted(await stored(dataset)) == [str(n) for n in range(6)]
    assert [r["input_id"] for r in log_rows(log)] == ["9"]


async def test_large_files_are_streamed_one_by_one(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = await new_dataset(client)
    # Lower thresholds stand in for 32 MB files, which would slow the suite down.
    monkeypatch.setattr(uploads, "STREAM_BYTES", 100)
    monkeypatch.setattr(uploads, "CHUNK_BYTES", 64)
    big = png_bytes(64, 64, (1, 2, 3))
    assert len(big) > 100
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "big.png").write_bytes(big)
    (tmp_path / "imgs" / "small.txt").write_text("small text")
    (tmp_path / "imgs" / "long.txt").write_text("long text " * 20)
    log = tmp_path / "log.csv"

    def upload(kind: str) -> UploadResult:
        return dataset.upload_from_folder(
            tmp_path / "imgs", input_type=kind, show_progress=False, failure_log=log
        )

    assert (await run(lambda: upload("image"))).created == 1
    assert (await run(lambda: upload("text"))).created == 2
    assert sorted(await stored(dataset)) == ["big", "long", "small"]
    got = await run(lambda: dataset.get_input("long"))
    assert got.media_type == "text"
    # A new run streams again and finds the id taken: nothing new is stored.
    again = await run(lambda: upload("image"))
    assert (again.created, again.already_exists) == (0, 1)
    assert len(await stored(dataset)) == 3


async def test_upload_after_deleting_the_inputs_stores_them_again(
    client: Client, tmp_path: Path
) -> None:
    dataset = await new_dataset(client)
    for n in range(5):
        png(tmp_path / "imgs" / f"{n}.png", n)
    log = tmp_path / "log.csv"

    def upload() -> UploadResult:
        return dataset.upload_from_folder(
            tmp_path / "imgs", batch_size=2, show_progress=False, failure_log=log
        )

    assert (await run(upload)).created == 5
    deleted, unknown = await run(lambda: dataset.delete_inputs([str(n) for n in range(5)]))
    assert (deleted, unknown) == (5, [])
    assert await stored(dataset) == {}
    # The same request bytes again: a replay would answer "created" and store nothing.
    result = await run(upload)
    assert (result.total, result.created, result.failed) == (5, 5, 0)
    assert sorted(await stored(dataset)) == [str(n) for n in range(5)]
    assert not run_states(tmp_path)


async def test_interrupted_retry_keeps_the_rows_never_attempted(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = await new_dataset(client)
    paths = [tmp_path / "imgs" / f"{n}.png" for n in range(10)]
    items = [UploadItem(p.stem, path=str(p)) for p in paths]
    log = tmp_path / "log.csv"
    first = await run(
        lambda: dataset.upload_inputs(items, batch_size=2, show_progress=False, failure_log=log)
    )
    assert first.failed == 10 and len(log_rows(log)) == 10
    for n, path in enumerate(paths):
        png(path, n)

    real = Engine.run

    def first_batch_then_ctrl_c(
        self: Any, label: str, units: Iterator[Any], total: int
    ) -> Iterator[Any]:
        # Only the first batch is ever sent; then Ctrl-C arrives in the loop
        # that consumes the outcomes, like a real one in the main thread.
        yield from real(self, label, itertools.islice(units, 1), total)
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "run", first_batch_then_ctrl_c)

    def retry() -> UploadResult:
        return dataset.retry(log, batch_size=2, concurrency=1, show_progress=False)

    with pytest.raises(KeyboardInterrupt):
        await run(retry)
    assert sorted(await stored(dataset)) == ["0", "1"]
    rows = log_rows(log)
    assert [r["input_id"] for r in rows] == [str(n) for n in range(2, 10)]
    assert {r["code"] for r in rows} == {NOT_ATTEMPTED}
    assert all(r["item"] for r in rows)

    monkeypatch.setattr(Engine, "run", real)
    again = await run(retry)
    assert (again.total, again.created, again.failed) == (8, 8, 0)
    assert not log.exists()
    assert sorted(await stored(dataset)) == [str(n) for n in range(10)]


async def test_an_error_in_a_worker_fails_its_batch_only(
    client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = await new_dataset(client)
    items = [
        UploadItem("t1", "text", text="one"),
        UploadItem("t2", "text", text="two", metadata={"at": datetime.now(UTC)}),
        UploadItem("t3", "text", text="three"),
    ]
    log = tmp_path / "log.csv"
    result = await run(lambda: dataset.upload_inputs(items, batch_size=2, failure_log=log))
    # Struct cannot hold a datetime: its batch fails, the other one is stored.
    assert (result.total, result.created, result.failed) == (3, 1, 2)
    assert sorted(await stored(dataset)) == ["t3"]
    rows = log_rows(log)
    assert [(r["input_id"], r["code"]) for r in rows] == [("t1", CALL_FAILED), ("t2", CALL_FAILED)]
    assert all(r["reason"].startswith(("ValueError: ", "TypeError: ")) for r in rows)
    assert "upload to ds" in capsys.readouterr().err  # the bar stopped, the summary printed


async def test_the_failure_log_folder_is_checked_before_uploading(
    client: Client, tmp_path: Path
) -> None:
    dataset = await new_dataset(client)
    png(tmp_path / "imgs" / "a.png", 1)
    missing = tmp_path / "nowhere" / "log.csv"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        await run(
            lambda: dataset.upload_from_folder(
                tmp_path / "imgs", show_progress=False, failure_log=missing
            )
        )
    assert await stored(dataset) == {}


# --- boxes in CreateInputs (issue 10, point 2) ----------------------------------------------


def calls(method: str) -> float:
    """How many calls of `method` the in-process server answered, by its RPC metrics."""
    total = 0.0
    for metric in metrics.REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == "datasetd_rpc_requests_total" and sample.labels["method"] == method:
                total += sample.value
    return total


CREATE_INPUTS = "datasetd.v1.InputService/CreateInputs"
CREATE_ANNOTATIONS = "datasetd.v1.AnnotationService/CreateAnnotations"


def coco_folder(tmp_path: Path, images: int, boxes_per_image: int) -> tuple[Path, Path]:
    """An images folder and its instances JSON: `boxes_per_image` boxes on each image."""
    folder = tmp_path / "images"
    folder.mkdir()
    document: dict[str, Any] = {
        "images": [],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [],
    }
    for n in range(images):
        (folder / f"{n}.png").write_bytes(png_bytes(40 + n, 30, color=(n % 256, 1, 2)))
        document["images"].append({"id": n, "file_name": f"{n}.png", "width": 40 + n, "height": 30})
        for b in range(boxes_per_image):
            document["annotations"].append(
                {
                    "id": len(document["annotations"]) + 1,
                    "image_id": n,
                    "category_id": 1 + b % 2,
                    "bbox": [b, b, 10, 10 + b],
                }
            )
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(document))
    return folder, instances


async def annotations_of(client: Client) -> list[annotation_pb2.Annotation]:
    def page(token: str) -> annotation_service_pb2.ListAnnotationsResponse:
        request = annotation_service_pb2.ListAnnotationsRequest(
            app_id=client.app, page_size=1000, page_token=token
        )
        return client.rpc.call(client.rpc.annotations.ListAnnotations, request)

    found: list[annotation_pb2.Annotation] = []
    token = ""
    while True:
        response = await run(functools.partial(page, token))
        found += response.annotations
        token = response.next_page_token
        if not token:
            return found


def as_read(found: list[annotation_pb2.Annotation]) -> dict[str, tuple[str, bytes]]:
    """Annotation id -> (input id, its data without region ids): what a reader compares
    (region ids are generated by the server when CreateAnnotations gets none)."""
    shown = {}
    for annotation in found:
        data = data_pb2.Data()
        data.CopyFrom(annotation.data)
        for region in data.regions:
            region.ClearField("id")
        shown[annotation.id] = (annotation.input_id, data.SerializeToString(deterministic=True))
    return shown


async def test_coco_boxes_travel_in_create_inputs_and_read_back_as_before(
    client: Client, tmp_path: Path
) -> None:
    dataset = await new_dataset(client)
    images, instances = coco_folder(tmp_path, images=5, boxes_per_image=2)
    log = tmp_path / "log.csv"

    def upload(**options: Any) -> UploadResult:
        return dataset.upload_coco(
            images, instances, batch_size=2, show_progress=False, failure_log=log, **options
        )

    inputs_before, annotations_before = calls(CREATE_INPUTS), calls(CREATE_ANNOTATIONS)
    result = await run(upload)
    assert (result.created, result.annotations_created, result.annotations_failed) == (5, 10, 0)
    # One CreateInputs per batch of two images, and no CreateAnnotations at all.
    assert calls(CREATE_INPUTS) - inputs_before == 3
    assert calls(CREATE_ANNOTATIONS) == annotations_before
    boxed = await annotations_of(client)
    # One annotation per box, named by the id CreateAnnotations would have got.
    scan = read_coco(images, instances, "ds")
    expected_ids = sorted(annotation_message(a).id for _, a in scan.annotations)
    assert sorted(a.id for a in boxed) == expected_ids
    assert all(len(a.data.regions) == 1 and a.data.regions[0].id == a.id for a in boxed)

    # The same boxes through CreateAnnotations (the route of existing inputs) read back
    # the same: ids, inputs, geometry and concepts.
    await run(
        lambda: client.rpc.call(
            client.rpc.inputs.DeleteInputs,
            input_service_pb2.DeleteInputsRequest(
                app_id=client.app, ids=[str(n) for n in range(5)]
            ),
        )
    )
    await run(lambda: dataset.upload_coco(images, instances, labels=False, show_progress=False))
    separately = await run(
        lambda: dataset.upload_annotations(
            [a for _, a in scan.annotations], show_progress=False, failure_log=log
        )
    )
    assert separately.created == 10
    assert as_read(await annotations_of(client)) == as_read(boxed)


async def test_re_runs_of_a_boxed_upload_neither_duplicate_nor_lose_boxes(
    client: Client, tmp_path: Path
) -> None:
    dataset = await new_dataset(client)
    images, instances = coco_folder(tmp_path, images=4, boxes_per_image=3)
    broken = images / "3.png"
    broken.write_bytes(b"not a png")
    log = tmp_path / "log.csv"

    def upload() -> UploadResult:
        return dataset.upload_coco(
            images, instances, batch_size=2, show_progress=False, failure_log=log
        )

    first = await run(upload)
    assert (first.created, first.failed, first.annotations_created) == (3, 1, 9)
    # The unreadable image's boxes wait in the log for it, as before.
    rows = log_rows(log)
    assert sorted((r["kind"], r["input_id"], r["code"]) for r in rows) == sorted(
        [("input", "3", "invalid")] + [("annotation", "3", NOT_ATTEMPTED)] * 3
    )
    # Same command: the run's token replays the answered batches, nothing is created twice.
    annotations_before = calls(CREATE_ANNOTATIONS)
    again = await run(upload)
    assert (again.created, again.annotations_created) == (3, 9)
    assert len(await annotations_of(client)) == 9
    # Fixed image, retry from the log: the input comes with its three boxes in one call.
    png(broken, 3)
    retried = await run(lambda: dataset.retry(log, show_progress=False))
    assert (retried.created, retried.annotations_created, retried.failed) == (1, 3, 0)
    assert calls(CREATE_ANNOTATIONS) == annotations_before
    assert len(await annotations_of(client)) == 12
    # The upload's own command again (its first run had failures, so its token is kept):
    # the first batch is replayed; the second, whose image changed, finds both inputs
    # there, so their boxes go through CreateAnnotations, which finds their ids taken.
    fresh = await run(upload)
    assert (fresh.created, fresh.already_exists, fresh.annotations_created) == (2, 2, 6)
    assert {f.code for f in fresh.failures} == {DUPLICATE}
    assert calls(CREATE_ANNOTATIONS) > annotations_before
    assert len(await annotations_of(client)) == 12


async def test_upload_inputs_with_boxes_fails_only_the_bad_box(
    client: Client, tmp_path: Path
) -> None:
    dataset = await new_dataset(client)
    items = [UploadItem(f"i{n}", data=png_bytes(20, 20, color=(n, 0, 0))) for n in range(3)]
    boxes = [
        uploads.AnnotationItem("i0", boxes=(uploads.Box("cat", 0.1, 0.1, 0.5, 0.5),)),
        uploads.AnnotationItem("i1", boxes=(uploads.Box("cat", 0.1, 0.1, 0.5, 0.5),)),
        # Right edge left of the left one: refused by the server's annotation rules.
        uploads.AnnotationItem("i1", boxes=(uploads.Box("dog", 0.6, 0.1, 0.2, 0.5),)),
        uploads.AnnotationItem("i2", concepts=("many",)),  # not a box: CreateAnnotations
    ]
    log = tmp_path / "log.csv"
    before = calls(CREATE_ANNOTATIONS)
    result = await run(
        # Through the dataset handle, as a user calls it.
        lambda: dataset.upload_inputs(items, boxes, show_progress=False, failure_log=log)
    )
    assert (result.created, result.failed) == (3, 0)
    assert (result.annotations_created, result.annotations_failed) == (3, 1)
    [row] = log_rows(log)
    assert (row["kind"], row["index"], row["input_id"], row["code"]) == (
        "annotation",
        "3",
        "i1",
        "invalid",
    )
    # i1 went again without its boxes, and they (and i2's concepts) through one call.
    assert calls(CREATE_ANNOTATIONS) - before == 1
    found = await annotations_of(client)
    assert sorted((a.input_id, len(a.data.regions)) for a in found) == [
        ("i0", 1),
        ("i1", 1),
        ("i2", 0),
    ]
