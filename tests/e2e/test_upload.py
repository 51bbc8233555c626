"""UploadInput and DownloadInput through the real server: streamed media of any size."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import io
import itertools
import os
import re
import struct
import tracemalloc
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import psutil
import pytest
from datasetd.v1 import data_pb2, input_pb2, input_service_pb2_grpc
from datasetd.v1 import input_service_pb2 as api
from PIL import Image

from service.app import Resources, Running, start
from service.config import Config
from service.domain.errors import InvalidArgument
from service.domain.input_drafts import InputSettings
from service.domain.inputs import InputService
from service.domain.models import Principal
from service.domain.ontology_check import OntologyGate
from service.domain.transfers import InputTransfers, TransferSettings, UploadHeader
from service.media.probe import MediaProbes
from service.storage.annotations import PgAnnotationRepository
from service.storage.blobs import UPLOADS_PREFIX, ContentAddressedBlobStore
from service.storage.db import Database
from service.storage.inputs import PgInputRepository, PgMembershipRepository
from service.storage.objectstore import ObjectStore
from service.storage.ontologies import PgOntologyRepository
from service.storage.projects import PgProjectRepository
from service.wire.inputs import input_draft
from tests.conftest import Caller, Stack, new_caller, object_store
from tests.e2e.test_inputs import create, metadata, new_dataset
from tests.helpers import CallError, call_error, details_of, download

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

MIB = 1024 * 1024


# --- synthetic media ----------------------------------------------------------------------


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def mp4_head(width: int = 640, height: int = 360, seconds: int = 10, fps: int = 30) -> bytes:
    """`ftyp` and a `moov` box with one video track: what probe_video reads of an MP4."""
    movie_scale, track_scale, frames = 1000, fps * 1000, seconds * fps
    mvhd = _box(
        b"mvhd",
        struct.pack(">5I", 0, 0, 0, movie_scale, seconds * movie_scale)
        + struct.pack(">IH", 0x10000, 0x100)
        + bytes(10)
        + _MATRIX
        + bytes(24)
        + struct.pack(">I", 2),
    )
    tkhd = _box(
        b"tkhd",
        struct.pack(">6I", 3, 0, 0, 1, 0, seconds * movie_scale)
        + bytes(16)
        + _MATRIX
        + struct.pack(">II", width << 16, height << 16),
    )
    mdhd = _box(b"mdhd", struct.pack(">5IHH", 0, 0, 0, track_scale, seconds * track_scale, 0, 0))
    hdlr = _box(b"hdlr", bytes(8) + b"vide" + bytes(12) + b"VideoHandler\0")
    stts = _box(b"stts", struct.pack(">4I", 0, 1, frames, track_scale // fps))
    minf = _box(b"minf", _box(b"stbl", stts))
    trak = _box(b"trak", tkhd + _box(b"mdia", mdhd + hdlr + minf))
    ftyp = _box(b"ftyp", b"isom" + struct.pack(">I", 512) + b"isomiso2avc1mp41")
    return ftyp + _box(b"moov", mvhd + trak)


def video_chunks(total: int, chunk: int = MIB) -> Iterator[bytes]:
    """A `total`-byte MP4: the header boxes, then an `mdat` box of fresh random bytes,
    generated chunk by chunk so that the test itself holds no more than a chunk."""
    head = mp4_head()
    prefix = head + struct.pack(">I", total - len(head)) + b"mdat"
    block = os.urandom(chunk)
    sent, counter = 0, 0
    while sent < total:
        size = min(chunk, total - sent)
        if sent == 0:
            piece = prefix + block[len(prefix) : size]
        else:
            # Unique per chunk, so equal blocks cannot shorten anything downstream.
            counter += 1
            piece = counter.to_bytes(8, "big") + block[8:size]
        sent += len(piece)
        yield piece


def video_bytes(total: int) -> bytes:
    return b"".join(video_chunks(total))


def noisy_png(width: int, height: int) -> bytes:
    """A PNG that does not compress: larger than the 1 MiB head the server keeps."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(
        buffer, format="PNG", compress_level=0
    )
    return buffer.getvalue()


def split(data: bytes, chunk: int = MIB) -> list[bytes]:
    return [data[i : i + chunk] for i in range(0, len(data), chunk)]


# --- calls ------------------------------------------------------------------------------


def video_input(input_id: str = "", **fields: Any) -> input_pb2.Input:
    return input_pb2.Input(id=input_id, data=data_pb2.Data(video=data_pb2.Video()), **fields)


def header(caller: Caller, item: input_pb2.Input, **fields: Any) -> api.UploadInputRequest:
    return api.UploadInputRequest(
        header=api.UploadInputHeader(app_id=caller.app_id, input=item, **fields)
    )


def chunk(data: bytes) -> api.UploadInputRequest:
    return api.UploadInputRequest(chunk=data)


async def send(
    stub: Inputs, caller: Caller, messages: Iterable[api.UploadInputRequest]
) -> api.UploadInputResponse:
    async def stream() -> AsyncIterator[api.UploadInputRequest]:
        for message in messages:
            yield message

    response: api.UploadInputResponse = await stub.UploadInput(stream(), metadata=caller.metadata)
    return response


async def upload(
    stub: Inputs,
    caller: Caller,
    item: input_pb2.Input,
    chunks: Iterable[bytes],
    **header_fields: Any,
) -> api.UploadInputResponse:
    # Lazily: the generated stream must never be whole in this process either.
    first = [header(caller, item, **header_fields)]
    return await send(stub, caller, itertools.chain(first, map(chunk, chunks)))


async def refused(
    stub: input_service_pb2_grpc.InputServiceStub,
    caller: Caller,
    messages: Iterable[api.UploadInputRequest],
) -> CallError:
    """Sends an upload the server must refuse, and returns what the caller sees.

    Through the synchronous client: when a server ends a client-streaming call before the
    client has sent everything, grpc.aio clients up to at least grpcio 1.85 may replace
    the server's status with INTERNAL "Internal error from Core" (grpc/grpc#36066)."""

    def call() -> CallError:
        try:
            stub.UploadInput(iter(messages), metadata=caller.metadata)
        except grpc.RpcError as error:
            assert isinstance(error, grpc.Call)
            return details_of(error)
        raise AssertionError("the upload succeeded but was expected to fail")

    return await asyncio.to_thread(call)


def sync_stub(port: int) -> Iterator[input_service_pb2_grpc.InputServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield input_service_pb2_grpc.InputServiceStub(channel)


async def download_stream(
    stub: Inputs, caller: Caller, input_id: str
) -> list[api.DownloadInputResponse]:
    call = stub.DownloadInput(
        api.DownloadInputRequest(app_id=caller.app_id, input_id=input_id),
        metadata=caller.metadata,
    )
    return [message async for message in call]


async def leftovers(objects: ObjectStore) -> list[str]:
    """Temporary upload objects and unfinished multipart uploads: none may outlive a call."""
    keys = await objects.list_keys(UPLOADS_PREFIX)
    listing = await asyncio.to_thread(
        objects._client._list_multipart_uploads, objects.bucket, prefix=UPLOADS_PREFIX
    )
    return keys + [f"multipart:{u.object_name}" for u in listing.uploads]


@pytest.fixture(scope="module")
def blocking(server: Running) -> Iterator[input_service_pb2_grpc.InputServiceStub]:
    yield from sync_stub(server.port)


@pytest.fixture(scope="module")
def objects(stack: Stack) -> Iterator[ObjectStore]:
    store = object_store(stack)
    yield store
    store.close()


# --- the happy path -----------------------------------------------------------------------


async def test_video_upload_round_trip(
    inputs: Inputs, datasets: Datasets, caller: Caller, objects: ObjectStore
) -> None:
    await new_dataset(datasets, caller, "clips")
    data = video_bytes(25_000_000)
    digest = hashlib.sha256(data).hexdigest()
    item = video_input(
        "clip-1",
        title="clip.mp4",
        dataset_ids=["clips"],
    )
    item.data.concepts.append(data_pb2.Concept(id="street", value=1))
    item.data.metadata.CopyFrom(metadata({"camera": "north"}))
    response = await upload(
        inputs, caller, item, split(data), sha256=digest, content_length=len(data)
    )
    stored = response.input
    assert stored.id == "clip-1" and stored.title == "clip.mp4"
    assert list(stored.dataset_ids) == ["clips"]
    assert [c.id for c in stored.data.concepts] == ["street"]
    info = stored.data.video.video_info
    assert (info.video_format, info.width, info.height) == ("MP4", 640, 360)
    assert (info.frame_count, round(info.fps), round(info.duration_seconds)) == (300, 30, 10)
    assert stored.data.video.hosted.suffix.endswith(digest)
    assert list(stored.data.video.hosted.sizes) == ["orig"]

    got = (
        await inputs.GetInput(
            api.GetInputRequest(app_id=caller.app_id, input_id="clip-1"), metadata=caller.metadata
        )
    ).input
    assert got.data.video.video_info == info
    assert got.data.video.hosted == stored.data.video.hosted
    assert got.data.metadata["camera"] == "north"

    messages = await download_stream(inputs, caller, "clip-1")
    first = messages[0]
    assert (first.total_size, first.content_type, first.sha256) == (len(data), "video/mp4", digest)
    assert all(0 < len(m.chunk) <= MIB for m in messages)
    assert all(not m.total_size and not m.sha256 for m in messages[1:])
    streamed = hashlib.sha256()
    for message in messages:
        streamed.update(message.chunk)
    assert streamed.hexdigest() == digest

    fetched = await asyncio.to_thread(download, got.data.video.url)
    assert hashlib.sha256(fetched).hexdigest() == digest
    assert await leftovers(objects) == []


async def test_identical_bytes_are_stored_once(
    inputs: Inputs, caller: Caller, db: Database, objects: ObjectStore
) -> None:
    data = video_bytes(10 * MIB + 12345)  # more than one part of the multipart upload
    digest = hashlib.sha256(data).hexdigest()
    first = await upload(inputs, caller, video_input("same-1"), split(data))
    second = await upload(inputs, caller, video_input("same-2"), split(data, 3 * MIB))
    assert first.input.data.video.hosted == second.input.data.video.hosted
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM blobs WHERE sha256 = $1", digest) == 1
    stored = await objects.list_keys(f"blobs/orig/sha256/{digest[:2]}/{digest[2:4]}/{digest}")
    assert len(stored) == 1
    assert await leftovers(objects) == []


async def test_image_and_text_uploads_are_probed_whole(inputs: Inputs, caller: Caller) -> None:
    image = noisy_png(800, 600)
    assert len(image) > MIB  # read back from the store, not just the head
    response = await upload(
        inputs,
        caller,
        input_pb2.Input(id="big-png", data=data_pb2.Data(image=data_pb2.Image())),
        split(image),
    )
    info = response.input.data.image.image_info
    assert (info.width, info.height, info.format) == (800, 600, "PNG")
    text = "Grüße, ünïcödé! " * 150_000
    response = await upload(
        inputs,
        caller,
        input_pb2.Input(id="long-text", data=data_pb2.Data(text=data_pb2.Text())),
        split(text.encode()),
    )
    assert response.input.data.text.text_info.char_count == len(text)
    messages = await download_stream(inputs, caller, "long-text")
    assert messages[0].content_type.startswith("text/plain")
    assert b"".join(m.chunk for m in messages).decode() == text


# --- refusals -----------------------------------------------------------------------------


async def test_bad_streams_are_refused_and_leave_nothing(
    inputs: Inputs,
    blocking: input_service_pb2_grpc.InputServiceStub,
    caller: Caller,
    objects: ObjectStore,
) -> None:
    data = video_bytes(9 * MIB)
    digest = hashlib.sha256(data).hexdigest()
    head = header(caller, video_input("bad"))
    cases: list[tuple[list[api.UploadInputRequest], str, str]] = [
        ([], "INVALID_UPLOAD", "header"),
        ([chunk(data[:100])], "INVALID_UPLOAD", "header"),
        ([head, chunk(data[:MIB]), head], "INVALID_UPLOAD", "header"),
        ([head, chunk(data[:MIB]), api.UploadInputRequest()], "INVALID_UPLOAD", "chunk"),
        ([head, chunk(data[: 4 * MIB + 1])], "INVALID_UPLOAD", "chunk"),
        ([head], "INVALID_UPLOAD", "chunk"),
        (
            [header(caller, video_input("bad"), content_length=len(data) + 1)]
            + [chunk(c) for c in split(data)],
            "LENGTH_MISMATCH",
            "header.content_length",
        ),
        (
            [header(caller, video_input("bad"), content_length=len(data) - 1)]
            + [chunk(c) for c in split(data)],
            "LENGTH_MISMATCH",
            "header.content_length",
        ),
        (
            [
                header(
                    caller,
                    video_input("bad"),
                    sha256=digest.replace(digest[0], "0" if digest[0] != "0" else "1", 1),
                )
            ]
            + [chunk(c) for c in split(data)],
            "CHECKSUM_MISMATCH",
            "header.sha256",
        ),
        ([head, chunk(os.urandom(2 * MIB))], "INVALID_VIDEO", "chunk"),
        ([head, chunk(b"\0" * MIB)], "INVALID_VIDEO", "chunk"),
    ]
    for messages, reason, field in cases:
        error = await refused(blocking, caller, messages)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, (reason, error)
        assert (error.reason, list(error.fields)) == (reason, [field]), error
    # A failed upload creates nothing and leaves no temporary object or multipart upload.
    error = await call_error(
        inputs.GetInput(
            api.GetInputRequest(app_id=caller.app_id, input_id="bad"), metadata=caller.metadata
        )
    )
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert await leftovers(objects) == []


async def test_bad_headers_fail_before_the_bytes(
    inputs: Inputs,
    blocking: input_service_pb2_grpc.InputServiceStub,
    caller: Caller,
    db: Database,
    objects: ObjectStore,
) -> None:
    text = input_pb2.Input(id="taken", data=data_pb2.Data(text=data_pb2.Text(raw="x")))
    await create(inputs, caller, [text])
    small = video_bytes(64 * 1024)

    async def outcome(item: input_pb2.Input, **fields: Any) -> tuple[grpc.StatusCode, str, str]:
        error = await refused(blocking, caller, [header(caller, item, **fields), chunk(small)])
        assert len(error.fields) == 1, error
        return error.code, error.reason, next(iter(error.fields))

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    url_video = data_pb2.Data(video=data_pb2.Video(url="https://example.com/v.mp4"))
    assert await outcome(input_pb2.Input(id="x")) == (invalid, "INVALID_FIELD", "header.input.data")
    # The media's source in the header is refused by name: the bytes follow as chunks.
    assert await outcome(input_pb2.Input(data=url_video)) == (
        invalid,
        "INVALID_FIELD",
        "header.input.data.video.url",
    )
    assert await outcome(video_input("bad id!")) == (invalid, "INVALID_FIELD", "header.input.id")
    assert await outcome(video_input(dataset_ids=["no-such"])) == (
        invalid,
        "INVALID_FIELD",
        "header.input.dataset_ids[0]",
    )
    assert await outcome(video_input(), sha256="abc") == (invalid, "INVALID_FIELD", "header.sha256")
    assert await outcome(video_input(), content_length=-5) == (
        invalid,
        "INVALID_FIELD",
        "header.content_length",
    )
    assert await outcome(video_input(), request_id="no spaces") == (
        invalid,
        "INVALID_FIELD",
        "request_id",
    )
    exists = (grpc.StatusCode.ALREADY_EXISTS, "INPUT_EXISTS", "header.input.id")
    assert await outcome(video_input("taken")) == exists
    # With a request id the id is checked on creation: a retry must reach its replay.
    assert await outcome(video_input("taken"), request_id="dup-1") == exists
    # Images and texts are read whole, so a declared length over 64 MiB is refused at once.
    image = input_pb2.Input(data=data_pb2.Data(image=data_pb2.Image()))
    error = await refused(blocking, caller, [header(caller, image, content_length=64 * MIB + 1)])
    assert (error.reason, list(error.fields)) == ("UPLOAD_TOO_LARGE", ["header.content_length"])
    assert str(64 * MIB) in error.message
    other = await new_caller(db)
    error = await refused(blocking, other, [header(caller, video_input()), chunk(small)])
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert await leftovers(objects) == []


async def test_retry_with_the_same_request_id_replays(
    inputs: Inputs,
    blocking: input_service_pb2_grpc.InputServiceStub,
    caller: Caller,
    objects: ObjectStore,
) -> None:
    data = video_bytes(3 * MIB)
    first = await upload(inputs, caller, video_input(), split(data), request_id="up-1")
    # The optional checks do not change what was asked for.
    again = await upload(
        inputs,
        caller,
        video_input(),
        split(data, 512 * 1024),
        request_id="up-1",
        sha256=hashlib.sha256(data).hexdigest(),
    )
    assert again == first
    listed = await inputs.ListInputs(
        api.ListInputsRequest(app_id=caller.app_id), metadata=caller.metadata
    )
    assert [i.id for i in listed.inputs] == [first.input.id]
    other_bytes = [chunk(c) for c in split(video_bytes(3 * MIB))]
    error = await refused(
        blocking, caller, [header(caller, video_input(), request_id="up-1"), *other_bytes]
    )
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
    assert await leftovers(objects) == []


async def test_download_needs_stored_media(inputs: Inputs, caller: Caller) -> None:
    reference = input_pb2.Input(
        id="ref", data=data_pb2.Data(image=data_pb2.Image(url="https://example.com/cat.png"))
    )
    await create(inputs, caller, [reference])
    error = await call_error(download_stream(inputs, caller, "ref"))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_STORED_MEDIA")
    error = await call_error(download_stream(inputs, caller, "ghost"))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "INPUT_NOT_FOUND")


# --- limits -------------------------------------------------------------------------------

SMALL_CAP = 12 * MIB


@pytest.fixture(scope="module")
async def capped(stack: Stack) -> AsyncIterator[Running]:
    """A second server on the same stack with DATASETD_MAX_UPLOAD_BYTES at 12 MiB: more
    than one part, so an upload over the cap has a multipart upload to abort."""
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
        max_upload_bytes=SMALL_CAP,
    )
    running: Running = await start(
        config, Resources(await Database.connect(stack.dsn), object_store(stack))
    )
    try:
        yield running
    finally:
        await running.stop()


async def test_uploads_over_the_cap_are_refused(
    capped: Running, caller: Caller, objects: ObjectStore
) -> None:
    for stub in sync_stub(capped.port):
        declared = header(caller, video_input(), content_length=SMALL_CAP + 1)
        error = await refused(stub, caller, [declared])
        assert (error.reason, list(error.fields)) == (
            "UPLOAD_TOO_LARGE",
            ["header.content_length"],
        )
        assert str(SMALL_CAP) in error.message and "12 MiB" in error.message
        streamed = itertools.chain(
            [header(caller, video_input("big"))], map(chunk, video_chunks(20 * MIB))
        )
        error = await refused(stub, caller, streamed)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert (error.reason, list(error.fields)) == ("UPLOAD_TOO_LARGE", ["chunk"])
        assert str(SMALL_CAP) in error.message
        assert await leftovers(objects) == []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{capped.port}") as channel:
        stub = input_service_pb2_grpc.InputServiceStub(channel)
        exact = await upload(stub, caller, video_input("at-cap"), video_chunks(SMALL_CAP))
    assert exact.input.id == "at-cap"


async def test_images_and_texts_over_the_whole_read_limit_are_refused(
    db: Database, stack: Stack, objects: ObjectStore
) -> None:
    """The 64 MiB limit on images and texts, exercised with a small one at the domain."""
    app = "whole-" + os.urandom(4).hex()
    principal = Principal("k", app, frozenset({"read", "write"}))
    blobs = ContentAddressedBlobStore(db, objects)
    inputs = InputService(
        PgInputRepository(db),
        PgMembershipRepository(db),
        blobs,
        db,
        InputSettings(),
        MediaProbes(),
        PgAnnotationRepository(db),
        OntologyGate(PgProjectRepository(db), PgOntologyRepository(db)),
    )
    transfers = InputTransfers(
        inputs, blobs, TransferSettings(max_whole_bytes=2 * MIB), MediaProbes()
    )

    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        for piece in split(data):
            yield piece

    image = input_pb2.Input(data=data_pb2.Data(image=data_pb2.Image()))
    too_big = noisy_png(1000, 1000)
    assert len(too_big) > 2 * MIB
    with pytest.raises(InvalidArgument) as raised:
        await transfers.receive(principal, UploadHeader(app, input_draft(image)), chunks(too_big))
    assert raised.value.reason == "UPLOAD_TOO_LARGE"
    assert "image uploads are checked whole" in raised.value.message
    fits = noisy_png(600, 600)
    assert MIB < len(fits) < 2 * MIB
    media = await transfers.receive(principal, UploadHeader(app, input_draft(image)), chunks(fits))
    view = await transfers.create(principal, UploadHeader(app, input_draft(image)), media)
    assert view.input.media_info["width"] == 600
    # A video of the same size is not read whole, so the limit does not apply to it.
    video = await transfers.receive(
        principal, UploadHeader(app, input_draft(video_input())), chunks(video_bytes(3 * MIB))
    )
    assert video.blob.size == 3 * MIB
    assert await leftovers(objects) == []


# --- memory -------------------------------------------------------------------------------


@dataclasses.dataclass
class Footprint:
    python_peak: int = 0
    rss_growth: int = 0


@contextlib.asynccontextmanager
async def footprint() -> AsyncIterator[Footprint]:
    """Memory this process (client and server both) needed over a block.

    `python_peak` is the peak of Python allocations (tracemalloc): every buffer the
    service holds, deterministic. `rss_growth` is the growth of the resident set, which
    also covers gRPC's C buffers but includes allocator noise: a first 200 MiB stream in
    a process grows it by some 25 MiB through gRPC alone. The resident set is read as the
    kernel's high-water mark where that can be reset, else sampled from the event loop."""
    result = Footprint()
    process = psutil.Process()
    gc.collect()
    exact = _reset_high_water_mark()
    baseline = peak = process.memory_info().rss

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, process.memory_info().rss)
            await asyncio.sleep(0.01)

    sampler = None if exact else asyncio.create_task(sample())
    tracemalloc.start()
    try:
        yield result
    finally:
        result.python_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        result.rss_growth = (_high_water_mark() if exact else peak) - baseline


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _high_water_mark() > 0


def _high_water_mark() -> int:
    try:
        found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return 0
    return int(found.group(1)) * 1024 if found else 0


async def test_memory_stays_flat_while_streaming_200_mb(
    inputs: Inputs, caller: Caller, objects: ObjectStore
) -> None:
    # Thread pools, connections and gRPC's buffers reach their steady size first.
    await upload(inputs, caller, video_input("warm-up"), video_chunks(20 * MIB))
    total = 200 * MIB
    digest = hashlib.sha256()

    def counted() -> Iterator[bytes]:
        for piece in video_chunks(total):
            digest.update(piece)
            yield piece

    async with footprint() as uploading:
        response = await upload(inputs, caller, video_input("huge"), counted())
    assert response.input.data.video.hosted.suffix.endswith(digest.hexdigest())
    # Two 8 MiB part buffers, the 1 MiB head and a few chunks in flight; not 200 MiB.
    assert uploading.python_peak < 40 * MIB, f"{uploading.python_peak / MIB:.1f} MiB"
    assert uploading.rss_growth < 100 * MIB, f"{uploading.rss_growth / MIB:.1f} MiB"

    async with footprint() as downloading:
        call = inputs.DownloadInput(
            api.DownloadInputRequest(app_id=caller.app_id, input_id="huge"),
            metadata=caller.metadata,
        )
        streamed, size = hashlib.sha256(), 0
        async for message in call:
            assert len(message.chunk) <= MIB
            streamed.update(message.chunk)
            size += len(message.chunk)
    assert (size, streamed.hexdigest()) == (total, digest.hexdigest())
    assert downloading.python_peak < 40 * MIB, f"{downloading.python_peak / MIB:.1f} MiB"
    assert downloading.rss_growth < 100 * MIB, f"{downloading.rss_growth / MIB:.1f} MiB"
    assert await leftovers(objects) == []
