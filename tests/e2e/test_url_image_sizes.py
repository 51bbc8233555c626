"""URL images with the size their caller declares (data.image.image_info): kept, shown, and
used by the COCO export to put their boxes in pixels (issue 10, point 5)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from datasetd.v1 import data_pb2, input_pb2
from datasetd.v1 import input_service_pb2 as api

from tests.conftest import Caller
from tests.e2e.test_annotations import box
from tests.e2e.test_exports import COCO_FORMAT, coco, exported
from tests.e2e.test_inputs import CREATED, INVALID, create, image_input, list_ids, new_dataset
from tests.e2e.test_versions import build
from tests.helpers import call_error

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

# pycocotools' own use of numpy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
INFO = "data.image.image_info"


def url_image(input_id: str, width: int = 0, height: int = 0) -> input_pb2.Input:
    """A URL image with one box (and the given declared size, if any)."""
    image = data_pb2.Image(url=f"https://example.com/{input_id}.jpg")
    if width or height:
        image.image_info.width, image.image_info.height = width, height
    item = input_pb2.Input(id=input_id, dataset_ids=["urls"], data=data_pb2.Data(image=image))
    item.data.regions.append(
        box(f"{input_id}-box", "cat", top=0.1, left=0.2, bottom=0.6, right=0.7)
    )
    return item


async def test_declared_sizes_are_kept_and_put_url_boxes_into_the_coco_export(
    inputs: Inputs, datasets: Datasets, versions: Versions, caller: Caller, tmp_path: Path
) -> None:
    await new_dataset(datasets, caller, "urls")
    response = await create(inputs, caller, [url_image("sized", 640, 480), url_image("unsized")])
    assert [r.outcome for r in response.results] == [CREATED, CREATED]
    got = await inputs.GetInput(
        api.GetInputRequest(app_id=caller.app_id, input_id="sized"), metadata=caller.metadata
    )
    assert (got.input.data.image.image_info.width, got.input.data.image.image_info.height) == (
        640,
        480,
    )
    assert got.input.data.image.url == "https://example.com/sized.jpg"

    await build(versions, caller, "urls", "v1")
    _, archive = await exported(versions, caller, "urls", "v1", COCO_FORMAT)
    loaded = coco(archive, tmp_path)
    images = {i["datasetd_input_id"]: i for i in loaded.loadImgs(loaded.getImgIds())}
    assert (images["sized"]["width"], images["sized"]["height"]) == (640, 480)
    assert images["sized"]["coco_url"] == "https://example.com/sized.jpg"
    (annotation,) = loaded.loadAnns(loaded.getAnnIds(imgIds=[images["sized"]["id"]]))
    # left 0.2, top 0.1, right 0.7, bottom 0.6 of 640x480, in pixels.
    assert annotation["bbox"] == pytest.approx([128.0, 48.0, 320.0, 240.0], abs=0.01)
    assert loaded.loadCats(annotation["category_id"])[0]["name"] == "cat"
    # Without a size the box cannot be put in pixels: the image alone is exported.
    assert loaded.getAnnIds(imgIds=[images["unsized"]["id"]]) == []


async def test_bad_declared_sizes_fail_their_input_by_field(
    inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "urls")
    uploaded = image_input("uploaded")
    uploaded.data.image.image_info.width, uploaded.data.image.image_info.height = 16, 12
    batch = [
        url_image("good", 10, 10),
        url_image("one-side", 640, 0),
        url_image("negative", -1, 480),
        url_image("huge", 10_000, 10_000),
        uploaded,
    ]
    response = await create(inputs, caller, batch)
    assert [r.outcome for r in response.results] == [CREATED] + [INVALID] * 4
    fields = [[e.field for e in r.errors] for r in response.results]
    assert fields[1:] == [
        [f"inputs[1].{INFO}.height"],
        [f"inputs[2].{INFO}.width"],
        [f"inputs[3].{INFO}"],
        [f"inputs[4].{INFO}"],
    ]
    assert "uploaded bytes" in response.results[4].errors[0].description
    assert await list_ids(inputs, caller) == ["good"]


async def test_the_size_stays_output_only_where_the_server_reads_it(
    inputs: Inputs, caller: Caller
) -> None:
    sized = url_image("x", 640, 480)
    sized.data.image.image_info.format = "JPEG"
    error = await call_error(create(inputs, caller, [sized]))
    assert list(error.fields) == [f"inputs[0].{INFO}.format"]
