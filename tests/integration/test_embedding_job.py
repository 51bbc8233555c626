"""The embedding job against the real PostgreSQL (pgvector) and S3: the built-in models
embed stored originals and texts, record why others cannot be embedded, build their
indexes, rerun idempotently, re-embed after a fingerprint change, and are queued once.

A database of its own: the session server's runner embeds pending inputs of every app,
and would race these tests for them. The last test goes through that server instead: an
input created with CreateInputs gets its vectors without anything else asking for them."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from datasetd.v1 import data_pb2, input_pb2
from datasetd.v1 import input_service_pb2 as api
from PIL import Image

from service.domain.embedding_job import (
    URL_FETCHING_OFF,
    EmbeddingIndexer,
    EmbeddingScheduler,
    EmbeddingStartup,
)
from service.domain.embeddings import EmbeddingModel, EmbeddingSource, EmbeddingState
from service.domain.input_drafts import FetchedMedia
from service.domain.jobs import Job, JobCancelled, JobKind, JobScheduler, JobStatus
from service.domain.models import Input, MediaType
from service.embedders.builtin import (
    IMAGE_MODEL_ID,
    TEXT_MODEL_ID,
    BuiltinImageEmbedder,
    BuiltinTextEmbedder,
)
from service.embedders.onnx import OnnxImageEmbedder
from service.storage.blobs import ContentAddressedBlobStore
from service.storage.db import Database
from service.storage.embeddings import PgEmbeddingRepository
from service.storage.inputs import PgInputRepository
from service.storage.jobs import PgJobQueue
from service.storage.objectstore import ObjectStore
from tests.conftest import Caller, Stack, object_store
from tests.scratch import migrated_database
from tests.unit.test_embedders import build_conv_model, write_settings

if TYPE_CHECKING:
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub

EMBEDDERS = (BuiltinImageEmbedder(), BuiltinTextEmbedder())


@pytest.fixture(scope="module")
async def own_db(stack: Stack) -> AsyncIterator[Database]:
    async with migrated_database(stack.dsn, "embed") as database:
        yield database


@dataclasses.dataclass
class World:
    db: Database
    repo: PgEmbeddingRepository
    blobs: ContentAddressedBlobStore
    inputs: PgInputRepository
    queue: PgJobQueue
    objects: ObjectStore


@pytest.fixture
async def world(own_db: Database, stack: Stack) -> AsyncIterator[World]:
    db = own_db
    objects = object_store(stack)
    yield World(
        db,
        PgEmbeddingRepository(db),
        ContentAddressedBlobStore(db, objects),
        PgInputRepository(db),
        PgJobQueue(db),
        objects,
    )
    # Each test starts from no input: pending() spans every app.
    await db.execute("DELETE FROM inputs")
    await db.execute("UPDATE jobs SET status = 'cancelled' WHERE status IN ('pending', 'running')")


def _close(stored: tuple[float, ...] | None, expected: list[float] | str) -> None:
    assert stored is not None
    assert not isinstance(expected, str), expected
    np.testing.assert_allclose(np.asarray(stored), np.asarray(expected), rtol=1e-5, atol=1e-6)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


async def _add(world: World, app_id: str, items: list[Input]) -> None:
    async with world.db.transaction():
        assert set(await world.inputs.insert_many(items)) == {i.id for i in items}


async def _image(world: World, app_id: str, input_id: str, data: bytes) -> Input:
    blob = await world.blobs.put(data, "image/png")
    return Input(app_id, input_id, MediaType.IMAGE, blob=blob)


def _job(app_id: str = "app", attempts: int = 1) -> Job:
    return Job(id=1, kind=JobKind.EMBED_INPUTS, app_id=app_id, attempts=attempts)


class Progress:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.reported: list[int] = []
        self._cancel_after = cancel_after

    async def __call__(self, percent: int) -> None:
        if self._cancel_after is not None and len(self.reported) >= self._cancel_after:
            raise JobCancelled()
        self.reported.append(percent)


class Fetcher:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.urls: list[str] = []

    async def fetch(self, url: str, field: str) -> FetchedMedia:
        self.urls.append(url)
        return FetchedMedia(self.data, "image/png", url)


async def _models(world: World) -> dict[str, EmbeddingModel]:
    return {m.id: m for m in await world.repo.sync_installation_models([e.spec for e in EMBEDDERS])}


def _indexer(world: World, *, batch: int = 64, fetcher: Fetcher | None = None) -> EmbeddingIndexer:
    return EmbeddingIndexer(world.repo, EMBEDDERS, world.blobs, world.db, fetcher, batch)


async def test_the_job_embeds_stored_images_and_texts_and_records_failures(
    world: World,
) -> None:
    app_id = "app-" + secrets.token_hex(3)
    pictures = [_png(seed) for seed in range(5)]
    images = [await _image(world, app_id, f"img{n}", data) for n, data in enumerate(pictures)]
    junk = await _image(world, app_id, "junk", b"this is not an image")
    texts = [
        Input(app_id, "t1", MediaType.TEXT, text="a black cat on the sofa"),
        Input(app_id, "t2", MediaType.TEXT, text="?!"),
    ]
    by_url = Input(app_id, "url", MediaType.IMAGE, source_url="https://example.com/a.png")
    video = Input(app_id, "vid", MediaType.VIDEO, source_url="https://example.com/a.mp4")
    await _add(world, app_id, [*images, junk, *texts, by_url, video])
    models = await _models(world)

    progress = Progress()
    # Batches of 2: the job loops until nothing is pending.
    await _indexer(world, batch=2).run(_job(app_id), progress)

    assert progress.reported[-1] == 100
    assert progress.reported == sorted(progress.reported)
    assert len(progress.reported) > 5
    for model in models.values():
        assert await world.repo.pending(model, 10) == []
    image_model = models[IMAGE_MODEL_ID]
    for item, data in zip(images, pictures, strict=True):
        stored = await world.repo.vector_of(app_id, item.id, image_model)
        _close(stored, BuiltinImageEmbedder().embed_images([data])[0])
    _close(
        await world.repo.vector_of(app_id, "t1", models[TEXT_MODEL_ID]),
        BuiltinTextEmbedder().embed_texts(["a black cat on the sofa"])[0],
    )

    states = {
        input_id: {s.model_id: s for s in await world.repo.states(app_id, input_id, vectors=False)}
        for input_id in ("img0", "junk", "t2", "url", "vid")
    }
    assert states["img0"][IMAGE_MODEL_ID].state is EmbeddingState.READY
    assert states["junk"][IMAGE_MODEL_ID].state is EmbeddingState.FAILED
    assert "not a readable image" in states["junk"][IMAGE_MODEL_ID].error
    assert states["t2"][TEXT_MODEL_ID].state is EmbeddingState.FAILED
    assert states["url"][IMAGE_MODEL_ID].error == URL_FETCHING_OFF
    # No installation model embeds videos: nothing waits for one.
    assert states["vid"] == {}

    # The models' HNSW indexes were built once vectors were stored.
    indexes = {
        r["indexname"]
        for r in await world.db.fetch(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'embeddings'"
        )
    }
    assert {f"embeddings_hnsw_{m.number}" for m in models.values()} <= indexes

    # A rerun (a crash after the last commit) finds nothing to do and changes nothing.
    before = await world.db.fetch("SELECT id, replaced_at FROM embeddings ORDER BY id")
    await _indexer(world).run(_job(app_id), Progress())
    assert await world.db.fetch("SELECT id, replaced_at FROM embeddings ORDER BY id") == before


async def test_url_inputs_are_fetched_when_fetching_is_on(world: World) -> None:
    app_id = "app-" + secrets.token_hex(3)
    data = _png(42)
    await _add(
        world, app_id, [Input(app_id, "u", MediaType.IMAGE, source_url="https://example.com/u.png")]
    )
    models = await _models(world)
    fetcher = Fetcher(data)
    await _indexer(world, fetcher=fetcher).run(_job(app_id), Progress())
    assert fetcher.urls == ["https://example.com/u.png"]
    stored = await world.repo.vector_of(app_id, "u", models[IMAGE_MODEL_ID])
    _close(stored, BuiltinImageEmbedder().embed_images([data])[0])


async def test_a_cancelled_job_keeps_its_batches_and_a_rerun_finishes(world: World) -> None:
    app_id = "app-" + secrets.token_hex(3)
    await _add(world, app_id, [await _image(world, app_id, f"i{n}", _png(n)) for n in range(6)])
    models = await _models(world)
    image_model = models[IMAGE_MODEL_ID]
    with pytest.raises(JobCancelled):
        await _indexer(world, batch=2).run(_job(app_id), Progress(cancel_after=2))
    left = await world.repo.pending(image_model, 10)
    assert len(left) == 2
    await _indexer(world, batch=2).run(_job(app_id, attempts=2), Progress())
    assert await world.repo.pending(image_model, 10) == []


async def test_an_unreadable_store_is_retried_before_inputs_are_failed(world: World) -> None:
    app_id = "app-" + secrets.token_hex(3)
    blob = await world.blobs.put(_png(7) + secrets.token_bytes(8), "image/png")
    # Registered, but its object is gone (a bucket restored from an older backup).
    await world.objects.delete(blob.key)
    await _add(world, app_id, [Input(app_id, "gone", MediaType.IMAGE, blob=blob)])
    models = await _models(world)
    # Every read of the batch failed: an outage, retried without recording anything.
    with pytest.raises(RuntimeError, match="no stored original could be read"):
        await _indexer(world).run(_job(app_id, attempts=1), Progress())
    assert len(await world.repo.pending(models[IMAGE_MODEL_ID], 10)) == 1
    # A later attempt records it, so that one lost object cannot stall every app.
    await _indexer(world).run(_job(app_id, attempts=2), Progress())
    (state,) = await world.repo.states(app_id, "gone", vectors=False)
    assert state.state is EmbeddingState.FAILED
    assert "cannot be read" in state.error


async def test_a_new_fingerprint_embeds_every_input_again(world: World) -> None:
    app_id = "app-" + secrets.token_hex(3)
    await _add(world, app_id, [await _image(world, app_id, "p", _png(3))])
    models = await _models(world)
    await _indexer(world).run(_job(app_id), Progress())
    assert await world.repo.pending(models[IMAGE_MODEL_ID], 10) == []

    changed = dataclasses.replace(BuiltinImageEmbedder.spec, fingerprint="builtin-image-test")
    synced = await world.repo.sync_installation_models([changed, BuiltinTextEmbedder.spec])
    image_model = next(m for m in synced if m.id == IMAGE_MODEL_ID)
    assert [p.input_id for p in await world.repo.pending(image_model, 10)] == ["p"]
    # Back to the real spec (what the next start registers), and embedded again.
    await _models(world)
    await _indexer(world).run(_job(app_id), Progress())
    assert await world.repo.vector_of(app_id, "p", image_model) is not None


async def test_one_job_is_queued_until_it_starts(world: World) -> None:
    woken: list[int] = []
    scheduler = EmbeddingScheduler(
        JobScheduler(world.queue, world.db, lambda: woken.append(1)),
        frozenset({MediaType.IMAGE, MediaType.TEXT}),
    )
    async with world.db.transaction():
        # No model embeds videos: nothing is queued for them.
        await scheduler.inputs_added("a", [MediaType.VIDEO])
        await scheduler.inputs_added("a", [MediaType.IMAGE])
        await scheduler.inputs_added("b", [MediaType.TEXT, MediaType.VIDEO])
    first = await world.db.fetch(
        "SELECT id, app_id, status FROM jobs WHERE kind = 'embed_inputs' AND status = 'pending'"
    )
    assert [(r["app_id"], r["status"]) for r in first] == [("a", "pending")]
    assert woken
    # Once it runs, inputs added meanwhile need a new job (it may be past them).
    claimed = await world.queue.claim([JobKind.EMBED_INPUTS], "worker", timedelta(seconds=30))
    assert claimed is not None and claimed.id == first[0]["id"]
    async with world.db.transaction():
        await scheduler.inputs_added("a", [MediaType.IMAGE])
    second = await world.db.fetch(
        "SELECT id FROM jobs WHERE kind = 'embed_inputs' AND status = 'pending'"
    )
    assert len(second) == 1 and second[0]["id"] != first[0]["id"]
    # A job of a rolled-back transaction does not exist: the next insert queues one.
    await world.db.execute("UPDATE jobs SET status = 'cancelled' WHERE kind = 'embed_inputs'")
    with pytest.raises(RuntimeError):
        async with world.db.transaction():
            await scheduler.inputs_added("a", [MediaType.IMAGE])
            raise RuntimeError("rolled back")
    async with world.db.transaction():
        await scheduler.inputs_added("a", [MediaType.IMAGE])
    assert await world.queue.status(scheduler._waiting or 0) is JobStatus.PENDING


async def test_startup_registers_the_models_and_queues_the_backfill(world: World) -> None:
    scheduler = EmbeddingScheduler(
        JobScheduler(world.queue, world.db, lambda: None), frozenset({MediaType.IMAGE})
    )
    startup = EmbeddingStartup(world.repo, EMBEDDERS, scheduler, world.db)
    await startup.run()
    assert (
        await world.db.fetchval(
            "SELECT count(*) FROM jobs WHERE kind = 'embed_inputs' AND status = 'pending'"
        )
        == 0
    )
    app_id = "app-" + secrets.token_hex(3)
    await _add(world, app_id, [await _image(world, app_id, "old", _png(9))])
    models = await startup.run()
    assert {m.id for m in models} >= {IMAGE_MODEL_ID, TEXT_MODEL_ID}
    queued = await world.db.fetch(
        "SELECT app_id FROM jobs WHERE kind = 'embed_inputs' AND status = 'pending'"
    )
    assert [r["app_id"] for r in queued] == [app_id]


async def test_the_server_embeds_what_create_inputs_stores(
    db: Database, inputs: InputServiceAsyncStub, caller: Caller
) -> None:
    picture = _png(123) + secrets.token_bytes(4)
    await inputs.CreateInputs(
        api.CreateInputsRequest(
            app_id=caller.app_id,
            inputs=[
                input_pb2.Input(id="pic", data=data_pb2.Data(image=data_pb2.Image(base64=picture))),
                input_pb2.Input(
                    id="memo", data=data_pb2.Data(text=data_pb2.Text(raw="a red kite"))
                ),
            ],
        ),
        metadata=caller.metadata,
    )
    repo = PgEmbeddingRepository(db)
    models = {m.id: m for m in await repo.models(caller.app_id)}
    async with asyncio.timeout(30):
        while True:
            image = await repo.vector_of(caller.app_id, "pic", models[IMAGE_MODEL_ID])
            text = await repo.vector_of(caller.app_id, "memo", models[TEXT_MODEL_ID])
            if image is not None and text is not None:
                break
            await asyncio.sleep(0.1)
    _close(image, BuiltinImageEmbedder().embed_images([picture])[0])
    _close(text, BuiltinTextEmbedder().embed_texts(["a red kite"])[0])


async def test_an_onnx_model_embeds_through_the_same_job(world: World, tmp_path: Path) -> None:
    model_path = tmp_path / "conv.onnx"
    build_conv_model(model_path)
    write_settings(tmp_path / "conv.json", model_id="test-conv-" + secrets.token_hex(3))
    onnx = OnnxImageEmbedder(model_path, tmp_path / "conv.json")
    app_id = "app-" + secrets.token_hex(3)
    picture = _png(77)
    await _add(world, app_id, [await _image(world, app_id, "o", picture)])
    (model,) = await world.repo.sync_installation_models([onnx.spec])
    assert (model.source, model.dimension) == (EmbeddingSource.ONNX, 6)
    indexer = EmbeddingIndexer(world.repo, [onnx], world.blobs, world.db)
    await indexer.run(_job(app_id), Progress())
    _close(await world.repo.vector_of(app_id, "o", model), onnx.embed_images([picture])[0])
