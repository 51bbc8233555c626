"""Downloads over the HTTP port (service.api.downloads) as HTTP clients see them: signed
links without a key, `Authorization: Key`, byte ranges, HEAD, Clarifai's JSON refusals;
and DATASETD_PUBLIC_URL turning the native API's URLs into such links. Stored originals
by the `hosted` suffix export archives carry, fetched by Clarifai's SDK export reader;
ranges read from the object store from their first byte.

The bytes are checked against what the native DownloadExport / DownloadInput RPCs stream."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import socket
import urllib.request
import zipfile
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import pytest
import requests
import yarl
from clarifai.datasets.export.inputs_annotations import (
    DatasetExportReader,
    InputAnnotationDownloader,
)
from clarifai_grpc.channel.clarifai_channel import ClarifaiChannel
from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2
from datasetd.v1 import data_pb2, dataset_version_pb2, input_pb2
from datasetd.v1 import dataset_version_service_pb2 as vapi
from datasetd.v1 import input_service_pb2 as iapi
from datasetd.v1 import input_service_pb2_grpc as igrpc
from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceStub
from datasetd.v1.dataset_version_service_pb2_grpc import DatasetVersionServiceStub
from google.protobuf import json_format
from multidict import CIMultiDict
from PIL import Image

from service.api.links import DownloadLinks
from service.app import Resources, Running, start
from service.config import Config
from service.domain.models import (
    Export,
    ExportFormat,
    ExportOptions,
    OntologyClass,
    Shape,
    StoredBlob,
    VersionMember,
    VersionOntology,
)
from service.domain.ontologies import number_classes
from service.domain.ports import StagedUpload
from service.formats.archives import Archives
from service.observability.metrics import REGISTRY
from service.storage.blobs import ContentAddressedBlobStore, content_key
from service.storage.db import Database, server_secret
from service.storage.exports import PgExportRepository
from tests.conftest import Caller, Stack, new_caller, object_store
from tests.e2e.test_exports import download_stream, finished, request_export
from tests.e2e.test_inputs import create, image_input, new_dataset, text_input
from tests.e2e.test_versions import build
from tests.helpers import download

if TYPE_CHECKING:
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

PROTOBUF = dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF
JSON = dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_JSON
MODIFIED = datetime(2024, 1, 1, tzinfo=UTC)
CHUNK = 1024 * 1024


def noise_png(side: int) -> bytes:
    """An incompressible PNG over a megabyte: its download spans several stream chunks."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Content:
    """An app with a big image, a text, an image referenced by URL, a ready version of
    them and its finished export."""

    caller: Caller
    other: Caller
    image: bytes
    export: vapi.Export
    archive: bytes
    links: DownloadLinks


@pytest.fixture(scope="module")
async def content(server: Running, db: Database, channel: grpc.aio.Channel) -> Content:
    caller, other = await new_caller(db), await new_caller(db)
    datasets = DatasetServiceStub(channel)
    inputs = igrpc.InputServiceStub(channel)
    versions = DatasetVersionServiceStub(channel)
    await new_dataset(datasets, caller, "d")
    image = noise_png(700)
    assert len(image) > CHUNK
    big = image_input("big")
    big.data.image.base64 = image
    words = text_input("words", "some stored words")
    # Referenced by URL, not fetched (DATASETD_FETCH_URLS is off): nothing stored.
    linked = image_input("linked")
    linked.data.image.ClearField("base64")
    linked.data.image.url = "https://example.com/elsewhere.png"
    for item in (big, words, linked):
        item.dataset_ids.append("d")
    made = await create(inputs, caller, [big, words, linked])
    assert [r.input_id for r in made.results] == ["big", "words", "linked"]
    await build(versions, caller, "d", "v1")
    started = await request_export(versions, caller, "d", "v1", PROTOBUF)
    export = await finished(versions, caller, "d", "v1", started.id)
    first, archive = await download_stream(versions, caller, "d", "v1", export.id)
    assert first.sha256 == hashlib.sha256(archive).hexdigest()
    # The links the server makes: same secret, the address its HTTP port listens on.
    links = DownloadLinks(
        await server_secret(db, "download_links"),
        timedelta(hours=1),
        base_url=f"http://127.0.0.1:{server.http_port}",
    )
    return Content(caller, other, image, export, archive, links)


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # auto_decompress off: the bytes as sent, whatever a server might encode.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@dataclass(frozen=True)
class Answer:
    status: int
    # Case-insensitive, as HTTP header names are.
    headers: CIMultiDict[str]
    body: bytes

    @property
    def clarifai(self) -> dict[str, Any]:
        assert self.headers["Content-Type"].startswith("application/json"), self.headers
        parsed: dict[str, Any] = json.loads(self.body)["status"]
        return parsed


async def fetch(
    http: aiohttp.ClientSession, url: str | yarl.URL, method: str = "GET", **headers: str
) -> Answer:
    async with http.request(method, url, headers=headers) as response:
        return Answer(response.status, CIMultiDict(response.headers), await response.read())


def key(caller: Caller) -> dict[str, str]:
    return {"Authorization": f"Key {caller.key}"}


def bare(content: Content, kind: str, resource_id: str) -> str:
    """The URL without a signature."""
    return content.links.base_url + content.links.path(content.caller.app_id, kind, resource_id)


async def test_a_signed_link_downloads_the_archive_with_a_plain_client(content: Content) -> None:
    url = content.links.export_url(content.caller.app_id, content.export.id)

    def plain() -> tuple[int, dict[str, str], bytes]:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()

    status, headers, body = await asyncio.to_thread(plain)
    assert status == 200
    assert body == content.archive
    assert headers["Content-Type"] == "application/zip"
    assert int(headers["Content-Length"]) == content.export.size == len(content.archive)
    assert (
        headers["Content-Disposition"] == 'attachment; filename="d_v1_clarifai_data_protobuf.zip"'
    )
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["ETag"] == f'"{hashlib.sha256(content.archive).hexdigest()}"'


async def test_expired_and_tampered_links_are_refused_in_clarifai_json(
    content: Content, http: aiohttp.ClientSession
) -> None:
    app_id, export_id = content.caller.app_id, content.export.id
    expired = DownloadLinks(
        content.links.secret, timedelta(seconds=-5), base_url=content.links.base_url
    ).export_url(app_id, export_id)
    answer = await fetch(http, expired)
    assert answer.status == 401
    assert answer.clarifai["code"] == status_code_pb2.CONN_TOKEN_INVALID
    assert "expired" in answer.clarifai["details"]

    good = content.links.export_url(app_id, export_id)
    path, _, query = good.partition("?")
    expires, signature = (part.split("=", 1)[1] for part in query.split("&"))
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    later = str(int(expires) + 3600)
    for tampered in (
        f"{path}?expires={expires}&signature={flipped}",
        # A longer life under the old signature.
        f"{path}?expires={later}&signature={signature}",
        # The signature of this export on another resource of the app.
        f"{bare(content, 'inputs', 'big')}?expires={expires}&signature={signature}",
        f"{path}?expires=soon&signature={signature}",
        f"{path}?signature={signature}",
    ):
        answer = await fetch(http, tampered)
        assert answer.status == 403, tampered
        assert answer.clarifai["code"] == status_code_pb2.CONN_TOKEN_INVALID
        assert answer.clarifai["http_status_code"] == 403
        assert "signature" in answer.clarifai["details"]


async def test_the_key_of_the_app_and_only_it_lets_in(
    content: Content, http: aiohttp.ClientSession
) -> None:
    url = bare(content, "exports", content.export.id)
    answer = await fetch(http, url, **key(content.caller))
    assert answer.status == 200 and answer.body == content.archive

    other = await fetch(http, url, **key(content.other))
    assert other.status == 403
    assert other.clarifai["code"] == status_code_pb2.CONN_INSUFFICIENT_SCOPES
    assert content.caller.app_id in other.clarifai["details"]

    wrong = await fetch(http, url, Authorization="Key not-a-key-of-anyone-1234")
    assert wrong.status == 401
    assert wrong.clarifai["code"] == status_code_pb2.CONN_KEY_INVALID

    nothing = await fetch(http, url)
    assert nothing.status == 401
    assert nothing.clarifai["code"] == status_code_pb2.CONN_KEY_INVALID
    assert (
        "Authorization" in nothing.clarifai["details"]
        or "authorization" in (nothing.clarifai["details"])
    )
    assert "signed link" in nothing.clarifai["details"]

    # Clarifai's SDK sends its key to every URL: a valid link lets it in whatever the key.
    signed = content.links.export_url(content.caller.app_id, content.export.id)
    both = await fetch(http, signed, Authorization="Key some-clarifai-pat-0000")
    assert both.status == 200 and both.body == content.archive
    # A key of the app lets in even through a link that has expired.
    expired = DownloadLinks(
        content.links.secret, timedelta(seconds=-5), base_url=content.links.base_url
    ).export_url(content.caller.app_id, content.export.id)
    keyed = await fetch(http, expired, **key(content.caller))
    assert keyed.status == 200 and keyed.body == content.archive


async def test_byte_ranges(content: Content, http: aiohttp.ClientSession) -> None:
    url = content.links.export_url(content.caller.app_id, content.export.id)
    archive, size = content.archive, len(content.archive)
    for header, first, last in (
        ("bytes=10-19", 10, 19),
        (f"bytes={size - 7}-", size - 7, size - 1),
        ("bytes=-25", size - 25, size - 1),
        (f"bytes=0-{size + 100}", 0, size - 1),
        (f"bytes=-{size + 100}", 0, size - 1),
    ):
        answer = await fetch(http, url, Range=header)
        assert answer.status == 206, header
        assert answer.body == archive[first : last + 1], header
        assert answer.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
        assert int(answer.headers["Content-Length"]) == last - first + 1

    for header in (f"bytes={size}-", f"bytes={size + 5}-{size + 9}", "bytes=-0"):
        refused = await fetch(http, url, Range=header)
        assert refused.status == 416, header
        assert refused.headers["Content-Range"] == f"bytes */{size}"
        assert refused.clarifai["code"] == status_code_pb2.CONN_INVALID_RANGE

    # Ranges this server does not serve (several, malformed, reversed) get everything.
    for header in ("bytes=0-1,5-6", "bytes=a-b", "lines=1-2", "bytes=9-3", "bytes=\u00b2-"):
        whole = await fetch(http, url, Range=header)
        assert whole.status == 200 and whole.body == archive, header
    # A resumed download of other bytes than it started with gets them all.
    stale = await fetch(http, url, Range="bytes=10-19", **{"If-Range": '"0123"'})
    assert stale.status == 200 and stale.body == archive
    etag = stale.headers["ETag"]
    same = await fetch(http, url, Range="bytes=10-19", **{"If-Range": etag})
    assert same.status == 206 and same.body == archive[10:20]


async def test_media_ranges_across_chunks_and_head(
    content: Content, http: aiohttp.ClientSession, channel: grpc.aio.Channel
) -> None:
    inputs = igrpc.InputServiceStub(channel)
    streamed = [
        message
        async for message in inputs.DownloadInput(
            iapi.DownloadInputRequest(app_id=content.caller.app_id, input_id="big"),
            metadata=content.caller.metadata,
        )
    ]
    original = b"".join(m.chunk for m in streamed)
    assert original == content.image
    url = content.links.media_url(content.caller.app_id, "big")
    whole = await fetch(http, url)
    assert whole.status == 200 and whole.body == original
    assert whole.headers["Content-Type"] == "image/png"
    assert whole.headers["Content-Disposition"] == 'inline; filename="big.png"'
    for first, last in ((CHUNK - 10, CHUNK + 9), (CHUNK, CHUNK), (1, len(original) - 2)):
        part = await fetch(http, url, Range=f"bytes={first}-{last}")
        assert part.status == 206 and part.body == original[first : last + 1], (first, last)

    head = await fetch(http, url, "HEAD")
    assert head.status == 200 and head.body == b""
    assert int(head.headers["Content-Length"]) == len(original)
    assert head.headers["Accept-Ranges"] == "bytes"
    ranged_head = await fetch(http, url, "HEAD", Range="bytes=-100")
    assert ranged_head.status == 206 and ranged_head.body == b""
    size = len(original)
    assert ranged_head.headers["Content-Range"] == f"bytes {size - 100}-{size - 1}/{size}"
    export_head = await fetch(
        http, content.links.export_url(content.caller.app_id, content.export.id), "HEAD"
    )
    assert export_head.status == 200 and export_head.body == b""
    assert export_head.headers["Content-Type"] == "application/zip"
    assert int(export_head.headers["Content-Length"]) == len(content.archive)


async def test_missing_unfinished_and_mediumless_resources(
    content: Content, http: aiohttp.ClientSession, db: Database
) -> None:
    app_id = content.caller.app_id
    for kind, missing in (("exports", "nothing-here"), ("inputs", "nobody")):
        answer = await fetch(http, content.links.link(app_id, kind, missing))
        assert answer.status == 404, kind
        assert answer.clarifai["code"] == status_code_pb2.CONN_DOES_NOT_EXIST
        assert missing in answer.clarifai["details"]

    # An export whose job has not run: recorded, never queued.
    pending = Export(app_id, "d", "v1", "pending-export", ExportFormat.COCO, ExportOptions())
    assert await PgExportRepository(db).insert(pending) is not None
    answer = await fetch(http, content.links.export_url(app_id, "pending-export"))
    assert answer.status == 409
    assert answer.clarifai["code"] == status_code_pb2.DATASET_VERSION_EXPORT_PENDING
    assert "pending" in answer.clarifai["details"]
    assert answer.headers["Retry-After"] == "2"

    text = await fetch(http, content.links.media_url(app_id, "words"))
    assert text.status == 200 and text.body == b"some stored words"
    assert text.headers["Content-Type"].startswith("text/plain")
    linked = await fetch(http, content.links.media_url(app_id, "linked"))
    assert linked.status == 409
    assert linked.clarifai["code"] == status_code_pb2.CONN_INVALID_REQUEST
    assert "no stored media" in linked.clarifai["details"]
    assert "https://example.com/elsewhere.png" in linked.clarifai["details"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
async def public(stack: Stack, server: Running) -> AsyncIterator[tuple[Running, str]]:
    """A second server on the same database and bucket, with DATASETD_PUBLIC_URL set (a
    name of the loopback address, so that links and the listening address differ)."""
    port = free_port()
    public_url = f"http://localhost:{port}"
    config = Config(
        listen="127.0.0.1:0",
        http_listen=f"127.0.0.1:{port}",
        public_url=public_url,
        data_dir=stack.data_dir,
        database_url=stack.dsn,
        s3_endpoint=stack.s3.endpoint,
        s3_access_key=stack.s3.access_key,
        s3_secret_key=stack.s3.secret_key,
        s3_bucket=stack.s3.bucket,
        auth_cache_seconds=0.0,
    )
    resources = Resources(await Database.connect(stack.dsn), object_store(stack))
    running = await start(config, resources)
    try:
        yield running, public_url
    finally:
        await running.stop()


async def test_public_url_makes_native_urls_links_of_the_http_port(
    content: Content,
    public: tuple[Running, str],
    channel: grpc.aio.Channel,
) -> None:
    running, public_url = public
    caller = content.caller
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as other:
        versions: Versions = DatasetVersionServiceStub(other)
        inputs: Inputs = igrpc.InputServiceStub(other)
        export = (
            await versions.GetExport(
                vapi.GetExportRequest(
                    app_id=caller.app_id,
                    dataset_id="d",
                    version_id="v1",
                    export_id=content.export.id,
                ),
                metadata=caller.metadata,
            )
        ).export
        listed = await versions.ListExports(
            vapi.ListExportsRequest(app_id=caller.app_id, dataset_id="d", version_id="v1"),
            metadata=caller.metadata,
        )
        version = await versions.GetDatasetVersion(
            vapi.GetDatasetVersionRequest(app_id=caller.app_id, dataset_id="d", version_id="v1"),
            metadata=caller.metadata,
        )
        media = await inputs.GetInputDownloadUrl(
            iapi.GetInputDownloadUrlRequest(app_id=caller.app_id, input_id="big"),
            metadata=caller.metadata,
        )
        got = await inputs.GetInput(
            iapi.GetInputRequest(app_id=caller.app_id, input_id="big"), metadata=caller.metadata
        )
        page = await inputs.ListInputs(
            iapi.ListInputsRequest(app_id=caller.app_id), metadata=caller.metadata
        )
    prefix = f"{public_url}/v2/downloads/apps/{caller.app_id}"
    assert export.url.startswith(f"{prefix}/exports/{export.id}?expires=")
    assert [e.url.split("?")[0] for e in listed.exports if e.id == export.id] == [
        export.url.split("?")[0]
    ]
    assert version.version.export_info.clarifai_data_protobuf.url.startswith(
        f"{prefix}/exports/{export.id}?"
    )
    assert media.url.startswith(f"{prefix}/inputs/big?expires=")
    assert got.input.data.image.url.startswith(f"{prefix}/inputs/big?")
    by_id = {i.id: i for i in page.inputs}
    assert by_id["big"].data.image.url.startswith(f"{prefix}/inputs/big?")
    assert by_id["words"].data.text.url.startswith(f"{prefix}/inputs/words?")
    # An input that references a URL keeps it: datasetd stores nothing to link to.
    assert by_id["linked"].data.image.url == "https://example.com/elsewhere.png"

    archive = await asyncio.to_thread(download, export.url)
    assert archive == content.archive
    assert await asyncio.to_thread(download, media.url) == content.image

    # Without DATASETD_PUBLIC_URL the native URLs are the object store's, as before.
    own = DatasetVersionServiceStub(channel)
    plain = (
        await own.GetExport(
            vapi.GetExportRequest(
                app_id=caller.app_id, dataset_id="d", version_id="v1", export_id=export.id
            ),
            metadata=caller.metadata,
        )
    ).export
    assert "/v2/downloads/" not in plain.url and "X-Amz-Signature" in plain.url
    assert await asyncio.to_thread(download, plain.url) == content.archive


# --- Stored originals by their `hosted` suffix (what export archives reference) ---------


def archive_inputs(archive: bytes) -> dict[str, input_pb2.Input]:
    """The inputs of a protobuf export archive, by id."""
    found: dict[str, input_pb2.Input] = {}
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        for name in opened.namelist():
            if name != "mimetype":
                for item in input_pb2.InputBatch.FromString(opened.read(name)).inputs:
                    found[item.id] = item
    return found


def hosted_url(hosted: data_pb2.HostedURL) -> str:
    """Where Clarifai's export reader fetches an input's media from."""
    return f"{hosted.prefix}/orig/{hosted.suffix}"


def blob_url(content: Content, app_id: str, suffix: str) -> str:
    return f"{content.links.base_url}/v2/downloads/apps/{app_id}/blobs/orig/{suffix}"


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").tobytes()


def sdk_download(archive_url: str, api_key: str, save_path: Path) -> dict[str, bytes]:
    """What Clarifai's SDK does in Dataset.export: its reader downloads the archive, its
    downloader fetches every input's media from `hosted`, both with the key's header.
    Returns the entries of the archive the downloader writes."""
    session = requests.Session()
    session.headers.update({"Authorization": f"Key {api_key}"})
    with DatasetExportReader(session=session, archive_url=archive_url) as reader:
        InputAnnotationDownloader(session, reader, num_workers=2).download_archive(
            save_path=str(save_path), split="all"
        )
    with zipfile.ZipFile(save_path) as written:
        return {name: written.read(name) for name in written.namelist()}


def assert_sdk_media(content: Content, written: dict[str, bytes]) -> None:
    # The SDK re-encodes images as PNG: the pixels are the original's.
    assert pixels(written["all/inputs/big.png"]) == pixels(content.image)
    assert written["all/inputs/words.txt"] == b"some stored words"
    # An input that only references a URL has no hosted media: the SDK skips it.
    assert not [name for name in written if "linked" in name]


async def test_archives_name_media_under_the_http_port_and_the_sdk_fetches_them(
    content: Content, tmp_path: Path
) -> None:
    app_id = content.caller.app_id
    exported = archive_inputs(content.archive)
    prefix = f"{content.links.base_url}/v2/downloads/apps/{app_id}/blobs"
    big, words = exported["big"].data.image.hosted, exported["words"].data.text.hosted
    assert (big.prefix, words.prefix) == (prefix, prefix)
    assert list(big.sizes) == ["orig"]
    digest = hashlib.sha256(content.image).hexdigest()
    assert big.suffix == f"sha256/{digest[:2]}/{digest[2:4]}/{digest}"
    assert not exported["linked"].data.image.HasField("hosted")

    url = bare(content, "exports", content.export.id)
    written = await asyncio.to_thread(sdk_download, url, content.caller.key, tmp_path / "a.zip")
    assert_sdk_media(content, written)


async def test_a_v2_export_is_read_back_by_the_sdk_with_its_media(
    content: Content, server: Running, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    caller = content.caller
    await build(DatasetVersionServiceStub(channel), caller, "d", "v2")
    ClarifaiChannel.get_insecure_grpc_channel(base="127.0.0.1", port=server.port).close()
    v2 = service_pb2_grpc.V2Stub(channel)
    request = service_pb2.PutDatasetVersionExportsRequest(
        user_app_id=resources_pb2.UserAppIDSet(user_id="me", app_id=caller.app_id),
        dataset_id="d",
        dataset_version_id="v2",
        exports=[resources_pb2.DatasetVersionExport(format=resources_pb2.CLARIFAI_DATA_PROTOBUF)],
    )
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        answer = await v2.PutDatasetVersionExports(request, metadata=caller.metadata)
        assert answer.status.code == status_code_pb2.SUCCESS, answer.status
        (export,) = answer.exports
        if export.status.code == status_code_pb2.DATASET_VERSION_EXPORT_SUCCESS:
            break
        assert asyncio.get_running_loop().time() < deadline, export.status
        await asyncio.sleep(0.1)
    assert export.url
    written = await asyncio.to_thread(sdk_download, export.url, caller.key, tmp_path / "b.zip")
    assert_sdk_media(content, written)


async def test_json_archives_carry_the_http_prefix_too(
    content: Content, channel: grpc.aio.Channel, http: aiohttp.ClientSession
) -> None:
    versions = DatasetVersionServiceStub(channel)
    caller = content.caller
    started = await request_export(versions, caller, "d", "v1", JSON)
    export = await finished(versions, caller, "d", "v1", started.id)
    _, archive = await download_stream(versions, caller, "d", "v1", export.id)
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        documents = [json.loads(opened.read(n)) for n in opened.namelist() if n != "mimetype"]
    by_id = {item["id"]: item["data"] for document in documents for item in document["inputs"]}
    prefix = f"{content.links.base_url}/v2/downloads/apps/{caller.app_id}/blobs"
    assert by_id["big"]["image"]["hosted"]["prefix"] == prefix
    assert by_id["words"]["text"]["hosted"]["prefix"] == prefix
    fetched = await fetch(
        http,
        hosted_url(json_format.ParseDict(by_id["big"]["image"]["hosted"], data_pb2.HostedURL())),
        **key(caller),
    )
    assert fetched.status == 200 and fetched.body == content.image
    assert fetched.headers["Content-Type"] == "image/png"


async def test_only_a_key_of_an_app_holding_the_blob_gets_it(
    content: Content, http: aiohttp.ClientSession, channel: grpc.aio.Channel
) -> None:
    caller, other = content.caller, content.other
    hosted = archive_inputs(content.archive)["big"].data.image.hosted
    url = hosted_url(hosted)
    mine = await fetch(http, url, **key(caller))
    assert mine.status == 200 and mine.body == content.image
    assert mine.headers["ETag"] == f'"{hashlib.sha256(content.image).hexdigest()}"'
    part = await fetch(http, url, Range="bytes=-100", **key(caller))
    assert part.status == 206 and part.body == content.image[-100:]
    head = await fetch(http, url, "HEAD", **key(caller))
    assert head.status == 200 and int(head.headers["Content-Length"]) == len(content.image)

    # Another app's key: NOT_FOUND, on this app's path and on its own alike, the answer
    # a blob that exists nowhere gets.
    nowhere = "sha256/00/00/" + "0" * 64
    for app_id, suffix in (
        (caller.app_id, hosted.suffix),
        (other.app_id, hosted.suffix),
        (caller.app_id, nowhere),
    ):
        refused = await fetch(http, blob_url(content, app_id, suffix), **key(other))
        assert refused.status == 404, (app_id, suffix)
        assert refused.clarifai["code"] == status_code_pb2.CONN_DOES_NOT_EXIST
        assert refused.clarifai["details"] == f"app {app_id!r} has no stored original {suffix!r}"
    # No key, or a signed link's parameters only: blobs are never linked.
    assert (await fetch(http, url)).status == 401
    signed = content.links.export_url(caller.app_id, content.export.id).partition("?")[2]
    assert (await fetch(http, f"{url}?{signed}")).status == 401

    # The other app's own stored original, asked for through this app's path.
    inputs = igrpc.InputServiceStub(channel)
    theirs = image_input("theirs", (1, 2, 3))
    made = await create(inputs, other, [theirs])
    assert [r.input_id for r in made.results] == ["theirs"]
    got = await inputs.GetInput(
        iapi.GetInputRequest(app_id=other.app_id, input_id="theirs"), metadata=other.metadata
    )
    their_suffix = got.input.data.image.hosted.suffix
    assert (
        await fetch(http, blob_url(content, other.app_id, their_suffix), **key(other))
    ).body == (theirs.data.image.base64)
    stolen = await fetch(http, blob_url(content, caller.app_id, their_suffix), **key(caller))
    assert stolen.status == 404 and stolen.body != theirs.data.image.base64
    assert stolen.clarifai["code"] == status_code_pb2.CONN_DOES_NOT_EXIST


async def test_suffixes_of_any_other_shape_are_refused(
    content: Content, http: aiohttp.ClientSession
) -> None:
    caller = content.caller
    suffix = archive_inputs(content.archive)["big"].data.image.hosted.suffix
    digest = suffix.rsplit("/", 1)[1]
    base = f"{content.links.base_url}/v2/downloads/apps/{caller.app_id}/blobs/orig/"
    for bad in (
        f"sha256/{digest[:2]}/{digest[2:4]}/{digest.upper()}",
        f"sha256/{digest[2:4]}/{digest[:2]}/{digest}",
        f"sha256/{digest}",
        f"{suffix}/extra",
        f"md5/{digest[:2]}/{digest[2:4]}/{digest}",
        # Dot segments the server sees (encoded: no client or server resolves them).
        f"sha256%2F..%2F..%2Fexports%2F{content.export.id}",
        f"{suffix}%2F..%2F..%2F..%2F..%2F..%2Fexports%2F{content.export.id}",
    ):
        answer = await fetch(http, yarl.URL(base + bad, encoded=True), **key(caller))
        assert answer.status == 400, bad
        assert answer.clarifai["code"] == status_code_pb2.CONN_INVALID_REQUEST
        assert "sha256/<2 hex>/<2 hex>/<64 lowercase hex>" in answer.clarifai["details"]
    # Traversal as clients send it, unnormalized (dot segments, encoded or not): never the
    # bytes of another resource.
    for raw in (
        f"{suffix}/../../../../exports/{content.export.id}",
        f"sha256/../../exports/{content.export.id}",
        f"%2e%2e/%2e%2e/exports/{content.export.id}",
        f"..%2f..%2fexports%2f{content.export.id}",
    ):
        async with http.get(yarl.URL(base + raw, encoded=True), headers=key(caller)) as response:
            body = await response.read()
            assert response.status in (400, 404), raw
            assert body not in (content.archive, content.image)


async def test_a_version_keeps_its_blobs_reachable_after_the_input_is_deleted(
    content: Content, http: aiohttp.ClientSession, channel: grpc.aio.Channel
) -> None:
    caller = content.caller
    inputs = igrpc.InputServiceStub(channel)
    await new_dataset(DatasetServiceStub(channel), caller, "kept")
    kept, dropped = image_input("kept-1", (7, 8, 9)), image_input("dropped-1", (9, 8, 7))
    kept.dataset_ids.append("kept")
    made = await create(inputs, caller, [kept, dropped])
    assert [r.input_id for r in made.results] == ["kept-1", "dropped-1"]
    await build(DatasetVersionServiceStub(channel), caller, "kept", "v1")
    suffixes = {}
    for input_id in ("kept-1", "dropped-1"):
        got = await inputs.GetInput(
            iapi.GetInputRequest(app_id=caller.app_id, input_id=input_id),
            metadata=caller.metadata,
        )
        suffixes[input_id] = got.input.data.image.hosted.suffix
    deleted = await inputs.DeleteInputs(
        iapi.DeleteInputsRequest(app_id=caller.app_id, ids=["kept-1", "dropped-1"]),
        metadata=caller.metadata,
    )
    # Deleted from the app; the version still holds the first, nothing holds the second.
    assert deleted.deleted_count == 2
    still = await fetch(http, blob_url(content, caller.app_id, suffixes["kept-1"]), **key(caller))
    assert still.status == 200 and still.body == kept.data.image.base64
    lost = await fetch(http, blob_url(content, caller.app_id, suffixes["dropped-1"]), **key(caller))
    assert lost.status == 404


# --- Ranges read from their first byte --------------------------------------------------


def store_calls(operation: str) -> float:
    """How many object-store calls of `operation` this process has made."""
    count = REGISTRY.get_sample_value(
        "datasetd_object_store_duration_seconds_count", {"operation": operation}
    )
    return count or 0.0


async def test_a_range_at_the_end_of_a_large_export_reads_only_its_bytes(
    content: Content, channel: grpc.aio.Channel, http: aiohttp.ClientSession
) -> None:
    versions = DatasetVersionServiceStub(channel)
    caller = content.caller
    options = vapi.ExportOptions(embed_media=True)
    started = await request_export(versions, caller, "d", "v1", PROTOBUF, options)
    export = await finished(versions, caller, "d", "v1", started.id)
    first, archive = await download_stream(versions, caller, "d", "v1", export.id)
    # The embedded image makes the archive span chunks: read from its start, a range at
    # its end would cost a chunk read per MiB before it.
    assert len(archive) > CHUNK + 100
    url = content.links.export_url(caller.app_id, export.id)
    for header, expected in (
        ("bytes=-100", archive[-100:]),
        (f"bytes={len(archive) - 50}-{len(archive) - 11}", archive[-50:-10]),
        (f"bytes={CHUNK + 1}-", archive[CHUNK + 1 :]),
    ):
        opened, chunks = store_calls("get_stream"), store_calls("read_chunk")
        answer = await fetch(http, url, Range=header)
        assert answer.status == 206 and answer.body == expected, header
        # One ranged GET whose first read held every byte asked for: nothing before them
        # was read (the whole archive would have taken one more read per MiB).
        assert store_calls("get_stream") == opened + 1, header
        assert store_calls("read_chunk") == chunks, header
    # The native DownloadExport still streams it whole, from the start.
    assert hashlib.sha256(archive).hexdigest() == first.sha256


async def test_the_blob_store_streams_windows_of_the_stored_object(
    stack: Stack, db: Database, content: Content, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = object_store(stack)
    try:
        blobs = ContentAddressedBlobStore(db, objects)
        digest = hashlib.sha256(content.image).hexdigest()
        blob = StoredBlob(content_key(digest), digest, len(content.image), "image/png")
        size = blob.size
        asked: list[tuple[int, int]] = []
        get_object = objects._client.get_object

        def spy(bucket: str, key: str, offset: int = 0, length: int = 0) -> Any:
            asked.append((offset, length))
            return get_object(bucket, key, offset=offset, length=length)

        monkeypatch.setattr(objects._client, "get_object", spy)
        for offset, length, first, stop in (
            (0, None, 0, size),
            (size - 10, None, size - 10, size),
            (CHUNK - 3, 7, CHUNK - 3, CHUNK + 4),
            (-25, None, size - 25, size),
            (-(size + 9), None, 0, size),
            (5, size * 2, 5, size),
        ):
            asked.clear()
            chunks = [c async for c in blobs.stream(blob, 4096, offset, length)]
            assert b"".join(chunks) == content.image[first:stop], (offset, length)
            assert max(len(c) for c in chunks) <= 4096
            # The store was asked for exactly these bytes.
            assert asked == [(first, stop - first)], (offset, length)
        asked.clear()
        assert [c async for c in blobs.stream(blob, 4096, size, None)] == []
        assert [c async for c in blobs.stream(blob, 4096, 3, 0)] == []
        assert asked == []
    finally:
        objects.close()


# --- The writers' substitution of `hosted.prefix`, over every medium --------------------

OBJECT_PREFIX = "s3://bucket/blobs"
HTTP_PREFIX = "http://datasetd.example:8080/v2/downloads/apps/app-1/blobs"


class NoMedia:
    """Media are referenced, never read: the writers must not stream any."""

    def stage(self, max_size: int) -> StagedUpload:
        raise AssertionError("no upload here")

    def stream(
        self, blob: StoredBlob, chunk_size: int, offset: int = 0, length: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        raise AssertionError(f"{blob.key} read though media are referenced")


class Collected:
    def __init__(self) -> None:
        self.data = bytearray()

    async def write(self, chunk: bytes) -> None:
        self.data += chunk


def stored_member(position: int, medium: str) -> VersionMember:
    """A member as a version stores it: its medium's `hosted` the object store's."""
    digest = hashlib.sha256(medium.encode()).hexdigest()
    suffix = f"sha256/{digest[:2]}/{digest[2:4]}/{digest}"
    message = input_pb2.Input(id=f"{medium}-input")
    media = getattr(message.data, medium)
    media.url = f"{OBJECT_PREFIX}/orig/{suffix}"
    media.hosted.prefix, media.hosted.suffix = OBJECT_PREFIX, suffix
    media.hosted.sizes.append("orig")
    message.data.concepts.add(id="night", value=1.0)
    region = message.data.regions.add(id=f"r{position}")
    region.data.concepts.add(id="car", value=1.0)
    message.title = "a title"
    blob = StoredBlob(f"blobs/orig/{suffix}", digest, 10, "application/octet-stream")
    return VersionMember(position, message.id, message.SerializeToString(deterministic=True), blob)


async def written_inputs(
    export_format: ExportFormat,
    members: list[VersionMember],
    hosted_prefix: str | None,
    governing: VersionOntology | None = None,
    options: ExportOptions | None = None,
) -> dict[str, resources_pb2.Input]:
    sink = Collected()
    writer = Archives(NoMedia()).writer(
        export_format, options or ExportOptions(), ["all"], sink, MODIFIED, governing, hosted_prefix
    )
    await writer.write("all", members)
    await writer.finish()
    batch = resources_pb2.InputBatch()
    with zipfile.ZipFile(io.BytesIO(bytes(sink.data))) as opened:
        (entry,) = [n for n in opened.namelist() if n != "mimetype"]
        raw = opened.read(entry)
    if export_format is ExportFormat.CLARIFAI_DATA_PROTOBUF:
        batch.MergeFromString(raw)
    else:
        json_format.Parse(raw, batch)
    return {item.id: item for item in batch.inputs}


async def test_the_clarifai_writers_put_the_http_prefix_into_every_hosted() -> None:
    media = ("image", "video", "audio", "text")
    members = [stored_member(n, medium) for n, medium in enumerate(media)]
    # One without a stored original (it references a URL): nothing to rewrite.
    linked = input_pb2.Input(id="linked")
    linked.data.image.url = "https://example.com/x.png"
    members.append(VersionMember(9, "linked", linked.SerializeToString(), None))
    classes = (OntologyClass("car", "Car", shapes=(Shape.BOUNDING_BOX,)),)
    (numbered, inputs), last = number_classes((classes, ()), {}, 0)
    naming = VersionOntology("o", 1, numbered, inputs, last)
    expected_stored = {
        medium: input_pb2.Input.FromString(member.data)
        for medium, member in zip(media, members, strict=False)
    }
    for export_format in (ExportFormat.CLARIFAI_DATA_PROTOBUF, ExportFormat.CLARIFAI_DATA_JSON):
        # Copied stored bytes, then parsed ones (the ontology names "car": reserialized).
        for governing in (None, naming):
            found = await written_inputs(export_format, members, HTTP_PREFIX, governing)
            case = (export_format, governing is not None)
            for medium in media:
                read = found[f"{medium}-input"]
                hosted = getattr(read.data, medium).hosted
                stored = getattr(expected_stored[medium].data, medium).hosted
                assert hosted.prefix == HTTP_PREFIX, (medium, case)
                assert (hosted.suffix, list(hosted.sizes)) == (stored.suffix, ["orig"]), case
                # Everything else as stored: one medium, the concepts and regions.
                assert [m for m in media if read.data.HasField(m)] == [medium], case
                assert [c.id for c in read.data.concepts] == ["night"], case
                names = [c.name for c in read.data.regions[0].data.concepts]
                assert names == (["Car"] if governing else [""]), case
            assert not found["linked"].data.image.HasField("hosted"), case
            assert found["linked"].data.image.url == "https://example.com/x.png"
        # Without a prefix (no HTTP address known) `hosted` is as the version recorded it.
        plain = await written_inputs(export_format, members, None)
        assert plain["video-input"].data.video.hosted.prefix == OBJECT_PREFIX
    # With embed_media, a stored text without raw content is not embedded: it keeps its
    # `hosted`, under the HTTP prefix too; embedded media carry none.
    for export_format in (ExportFormat.CLARIFAI_DATA_PROTOBUF, ExportFormat.CLARIFAI_DATA_JSON):
        embedded = ExportOptions(embed_media=True)
        found = await written_inputs(
            export_format, [members[3], members[-1]], HTTP_PREFIX, options=embedded
        )
        text = found["text-input"].data.text
        assert text.hosted.prefix == HTTP_PREFIX, export_format
