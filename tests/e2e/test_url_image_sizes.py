"""URL images with the size their caller declares (data.image.image_info), or that the server
reads from the image header with a ranged GET (DATASETD_FETCH_URLS=header): kept, shown, and
used by the COCO export to put their boxes in pixels (issue 10, point 5)."""

from __future__ import annotations

import http.server
import io
import re
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from datasetd.v1 import (
    data_pb2,
    dataset_service_pb2_grpc,
    dataset_version_service_pb2_grpc,
    input_pb2,
    input_service_pb2_grpc,
)
from datasetd.v1 import input_service_pb2 as api
from PIL import Image

from service.app import Resources, Running, start
from service.config import Config
from service.storage.db import Database
from tests.conftest import Caller, Stack, object_store
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
URL_FIELD = "data.image.url"


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


# --- sizes read from the image header (DATASETD_FETCH_URLS=header) -----------------------------

MIB = 1024 * 1024


def _jpeg_with_big_exif(width: int, height: int) -> bytes:
    """A photo-sized JPEG whose frame header (SOF) lies past the first 128 KiB, behind two
    APP1 segments as large as segments go (a camera's EXIF with its preview image)."""
    buffer = io.BytesIO()
    Image.effect_noise((width, height), 64).convert("RGB").save(buffer, "JPEG", quality=92)
    plain = buffer.getvalue()
    payload = b"Exif\x00\x00" + bytes(65533 - 6)
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    return plain[:2] + app1 + app1 + plain[2:]


def _image(fmt: str, width: int, height: int, noise: bool = False) -> bytes:
    buffer = io.BytesIO()
    picture = (
        Image.effect_noise((width, height), 64).convert("RGB")
        if noise
        else Image.new("RGB", (width, height), (40, 90, 160))
    )
    picture.save(buffer, fmt, **({"quality": 90} if fmt == "WEBP" else {}))
    return buffer.getvalue()


@dataclass
class Served:
    """One request the image server answered: its Range header and the body bytes it
    handed to the socket before the client hung up."""

    path: str
    range: str | None
    sent: int = 0
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class ImageServer:
    base: str
    files: dict[str, bytes]
    log: list[Served]

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def served(self, path: str) -> list[Served]:
        found = [s for s in self.log if s.path == path]
        for served in found:
            assert served.done.wait(10), f"{path} is still being sent"
        return found


def _handler(
    files: dict[str, bytes], log: list[Served]
) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        """/r/NAME honours Range (206 with Content-Range); /p/NAME ignores it (200 with the
        whole body, as many servers do)."""

        def do_GET(self) -> None:
            honours, _, name = self.path.lstrip("/").partition("/")
            body = files.get(name)
            if body is None:
                self.send_error(404)
                return
            served = Served(self.path, self.headers.get("Range"))
            log.append(served)
            start, end = 0, len(body)
            wanted = re.fullmatch(r"bytes=(\d+)-(\d+)", served.range or "")
            if honours == "r" and wanted:
                start, end = int(wanted[1]), min(int(wanted[2]) + 1, len(body))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
            else:
                self.send_response(200)
            kind = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
            self.send_header("Content-Type", kind.get(name.rpartition(".")[2], "text/html"))
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            try:
                for offset in range(start, end, 16384):
                    piece = body[offset : min(offset + 16384, end)]
                    self.wfile.write(piece)
                    served.sent += len(piece)
            except OSError:
                pass  # the client hung up, as a header read does
            finally:
                served.done.set()

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def image_server() -> Iterator[ImageServer]:
    photo = _jpeg_with_big_exif(2000, 1500)
    files = {
        "photo.jpg": photo,
        # Far more than socket buffers hold: a server ignoring Range is cut off early.
        "padded.jpg": photo + bytes(64 * MIB),
        "small.png": _image("PNG", 640, 480),
        "noisy.webp": _image("WEBP", 800, 600, noise=True),
        "page.html": b"<!doctype html><title>not an image</title>" + bytes(100_000),
    }
    log: list[Served] = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(files, log))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield ImageServer(f"http://127.0.0.1:{server.server_address[1]}", files, log)
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
async def header_reader(stack: Stack) -> AsyncIterator[Running]:
    """A server on the same stack that reads URL images' headers; loopback is allowed
    for the image server above (the SSRF guard refuses it otherwise)."""
    config = Config(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        data_dir=stack.data_dir,
        database_url=stack.dsn,
        s3_endpoint=stack.s3.endpoint,
        s3_access_key=stack.s3.access_key,
        s3_secret_key=stack.s3.secret_key,
        s3_bucket=stack.s3.bucket,
        auth_cache_seconds=0.0,
        fetch_url_headers=True,
        fetch_allowed_networks=("127.0.0.1/32",),
        fetch_timeout=timedelta(seconds=10),
    )
    running = await start(config, Resources(await Database.connect(stack.dsn), object_store(stack)))
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def stubs(header_reader: Running) -> AsyncIterator[tuple[Inputs, Datasets, Versions]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{header_reader.port}") as channel:
        yield (
            input_service_pb2_grpc.InputServiceStub(channel),
            dataset_service_pb2_grpc.DatasetServiceStub(channel),
            dataset_version_service_pb2_grpc.DatasetVersionServiceStub(channel),
        )


def linked_image(input_id: str, url: str, width: int = 0, height: int = 0) -> input_pb2.Input:
    item = url_image(input_id, width, height)
    item.data.image.url = url
    return item


async def test_header_sizes_come_from_a_ranged_read_and_put_every_box_into_coco(
    stubs: tuple[Inputs, Datasets, Versions],
    image_server: ImageServer,
    caller: Caller,
    tmp_path: Path,
) -> None:
    inputs, datasets, versions = stubs
    await new_dataset(datasets, caller, "urls")
    urls = {
        "photo": image_server.url("/r/photo.jpg"),
        "padded": image_server.url("/p/padded.jpg"),
        "small": image_server.url("/r/small.png"),
        "webp": image_server.url("/r/noisy.webp"),
        "declared": image_server.url("/r/small.png?declared"),
    }
    batch = [linked_image(i, url) for i, url in urls.items() if i != "declared"]
    batch.append(linked_image("declared", urls["declared"], 320, 240))
    response = await create(inputs, caller, batch)
    assert [r.outcome for r in response.results] == [CREATED] * 5, response.results

    # The Range server sent two ranges of the photo (its SOF is past the first 64 KiB), far
    # less than the file; the server that ignores Range was cut off after the same reads.
    photo = len(image_server.files["photo.jpg"])
    ranged = image_server.served("/r/photo.jpg")
    assert [s.range for s in ranged] == [f"bytes=0-{64 * 1024 - 1}", f"bytes=0-{MIB - 1}"]
    assert sum(s.sent for s in ranged) == 64 * 1024 + MIB < photo
    padded = image_server.served("/p/padded.jpg")
    assert [s.range for s in padded] == [f"bytes=0-{64 * 1024 - 1}", f"bytes=0-{MIB - 1}"]
    assert all(s.sent < len(image_server.files["padded.jpg"]) for s in padded)
    # A small file is read whole in the first range; the WEBP header is in its first bytes.
    assert [s.sent for s in image_server.served("/r/small.png")] == [
        len(image_server.files["small.png"])
    ]
    webp = image_server.served("/r/noisy.webp")
    assert len(webp) == 1 and webp[0].sent == 64 * 1024 < len(image_server.files["noisy.webp"])
    # A declared size is taken as given: nothing is read.
    assert image_server.served("/r/small.png?declared") == []

    expected = {
        "photo": (2000, 1500, "JPEG"),
        "padded": (2000, 1500, "JPEG"),
        "small": (640, 480, "PNG"),
        "webp": (800, 600, "WEBP"),
        "declared": (320, 240, ""),
    }
    for input_id, (width, height, fmt) in expected.items():
        got = await inputs.GetInput(
            api.GetInputRequest(app_id=caller.app_id, input_id=input_id),
            metadata=caller.metadata,
        )
        info = got.input.data.image.image_info
        assert (info.width, info.height, info.format) == (width, height, fmt), input_id
        # Still a reference: the URL is the caller's, nothing was stored.
        assert got.input.data.image.url == urls[input_id]
        assert not got.input.data.image.hosted.prefix

    await build(versions, caller, "urls", "v1")
    _, archive = await exported(versions, caller, "urls", "v1", COCO_FORMAT)
    loaded = coco(archive, tmp_path)
    images = {i["datasetd_input_id"]: i for i in loaded.loadImgs(loaded.getImgIds())}
    assert set(images) == set(expected)
    for input_id, (width, height, _) in expected.items():
        image = images[input_id]
        assert (image["width"], image["height"]) == (width, height)
        assert image["coco_url"] == urls[input_id]
        (box_annotation,) = loaded.loadAnns(loaded.getAnnIds(imgIds=[image["id"]]))
        # left 0.2, top 0.1, right 0.7, bottom 0.6, in pixels of this image.
        assert box_annotation["bbox"] == pytest.approx(
            [0.2 * width, 0.1 * height, 0.5 * width, 0.5 * height], abs=0.01
        )


async def test_unreadable_url_images_fail_their_input_by_url_field(
    stubs: tuple[Inputs, Datasets, Versions], image_server: ImageServer, caller: Caller
) -> None:
    inputs, datasets, _ = stubs
    await new_dataset(datasets, caller, "urls")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{closed.getsockname()[1]}/gone.jpg"
    batch = [
        linked_image("page", image_server.url("/r/page.html")),
        linked_image("unreachable", unreachable),
        linked_image("metadata", "http://169.254.169.254/latest/meta-data/x.jpg"),
        linked_image("private", "http://10.1.2.3/x.jpg"),
        linked_image("missing", image_server.url("/r/missing.jpg")),
        linked_image("fine", image_server.url("/p/small.png")),
    ]
    response = await create(inputs, caller, batch)
    assert [r.outcome for r in response.results] == [INVALID] * 5 + [CREATED]
    errors = [(e.field, e.description) for r in response.results[:5] for e in r.errors]
    assert [f for f, _ in errors] == [f"inputs[{i}].{URL_FIELD}" for i in range(5)]
    descriptions = [d for _, d in errors]
    assert "is not a readable image" in descriptions[0]
    assert "cannot connect" in descriptions[1]
    assert "cloud metadata" in descriptions[2]
    assert "private address" in descriptions[3]
    assert "HTTP 404" in descriptions[4]
    # The page was refused from its first bytes: no second, larger read.
    assert len(image_server.served("/r/page.html")) == 1
    assert await list_ids(inputs, caller) == ["fine"]
