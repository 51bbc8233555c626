"""The embedding job (EMBED_INPUTS): embeds the inputs the installation's models have not
embedded yet, in the background, never on a request's path.

`EmbeddingScheduler` queues it from the transaction that inserts inputs (CreateInputs,
UploadInput, imports all insert through InputService), and at startup for the inputs
that exist already (backfill, and every input again after a model's fingerprint changed).
`EmbeddingIndexer` is its handler: per model, batches of pending inputs are read, embedded
in a worker thread and stored with their failures in one transaction each, until none is
pending. It is idempotent: a vector or a failure once stored takes the input out of
`pending`, so a crash reruns only what was not committed.

The repository's `pending` spans every app, so one queued job embeds every app's inputs:
the scheduler queues a job only when none is waiting already.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from service.domain.embeddings import (
    Embedder,
    EmbeddingModel,
    EmbeddingRepository,
    EmbeddingSource,
    PendingInput,
)
from service.domain.errors import DomainError
from service.domain.input_drafts import MediaFetcher
from service.domain.jobs import Job, JobFailed, JobKind, JobScheduler, JobStatus, Progress
from service.domain.models import MediaType, StoredBlob
from service.domain.ports import TransactionManager

log = logging.getLogger(__name__)

DEFAULT_BATCH = 64
# Bytes of media held before they are embedded: a batch of large originals is embedded in
# slices so that the job's memory stays bounded.
MAX_SLICE_BYTES = 64 * 1024 * 1024
# Originals read from the store at once.
READ_CONCURRENCY = 4
# When every read of a batch fails, the store is taken to be down and the job is retried;
# from this attempt on, the inputs are recorded as failed instead, so that one unreadable
# object cannot stall every app's embeddings.
RECORD_READ_FAILURES_FROM_ATTEMPT = 2
URL_FETCHING_OFF = "URL input not fetched: URL fetching is off"


class MediaReader(Protocol):
    async def read(self, blob: StoredBlob) -> bytes: ...


@dataclass
class EmbeddingScheduler:
    """Queues the embedding job. One waiting job covers every app and every input
    committed before it starts, so another is queued only when none is pending; the
    job id remembered here is checked against the queue, which is the truth (a job of
    a rolled-back transaction does not exist, one already running does not count)."""

    jobs: JobScheduler
    # The media types some installation model embeds (empty: never queue).
    media_types: frozenset[MediaType]
    _waiting: int | None = field(default=None, init=False)

    async def inputs_added(self, app_id: str, media_types: Iterable[MediaType]) -> None:
        """Called in the transaction that inserts inputs: the job runs once it commits."""
        if not self.media_types.intersection(media_types):
            return
        await self.queue(app_id)

    async def queue(self, app_id: str) -> int:
        waiting = self._waiting
        if waiting is not None and await self.jobs.status(waiting) is JobStatus.PENDING:
            return waiting
        self._waiting = await self.jobs.enqueue(JobKind.EMBED_INPUTS, app_id, {})
        return self._waiting


@dataclass(frozen=True)
class EmbeddingStartup:
    """At startup: registers the installation's models (a changed fingerprint clears
    their vectors) and queues the job when any input waits for a model."""

    embeddings: EmbeddingRepository
    embedders: Sequence[Embedder]
    scheduler: EmbeddingScheduler
    tx: TransactionManager

    async def run(self) -> list[EmbeddingModel]:
        models = await self.embeddings.sync_installation_models([e.spec for e in self.embedders])
        apps: list[str] = []
        for model in models:
            if model.id in {e.spec.id for e in self.embedders}:
                apps += await self.embeddings.apps_with_pending(model)
        if apps:
            async with self.tx.transaction():
                await self.scheduler.queue(sorted(apps)[0])
            log.info("embedding backfill queued: inputs of %d app(s) wait", len(set(apps)))
        return models


@dataclass(frozen=True)
class _Item:
    pending: PendingInput
    data: bytes | None = None
    error: str = ""


@dataclass(frozen=True)
class EmbeddingIndexer:
    """The EMBED_INPUTS job handler."""

    embeddings: EmbeddingRepository
    embedders: Sequence[Embedder]
    media: MediaReader
    tx: TransactionManager
    # None: URL fetching is off, and URL-only images are recorded as not fetched.
    fetcher: MediaFetcher | None = None
    batch: int = DEFAULT_BATCH

    async def run(self, job: Job, progress: Progress) -> None:
        models = await self._models(job.app_id)
        stored = 0
        for position, (model, embedder) in enumerate(models):
            stored += await self._embed_model(job, model, embedder, progress, position, len(models))
        if stored:
            # Outside any transaction: an index is built concurrently.
            await self.embeddings.ensure_indexes()
        await progress(100)
        log.info("embedding job %s: %d vector(s) stored", job.id, stored)

    async def failed(self, job: Job, message: str) -> None:
        """Nothing to undo: each batch committed on its own, and what is still pending
        is picked up by the next job."""

    async def _models(self, app_id: str) -> list[tuple[EmbeddingModel, Embedder]]:
        registered = {
            m.id: m
            for m in await self.embeddings.models(app_id)
            if m.source is not EmbeddingSource.CLIENT
        }
        pairs = []
        for embedder in self.embedders:
            model = registered.get(embedder.spec.id)
            if model is None:
                # Not registered yet (the startup sync failed): register now.
                synced = await self.embeddings.sync_installation_models(
                    [e.spec for e in self.embedders]
                )
                registered = {m.id: m for m in synced}
                model = registered.get(embedder.spec.id)
            if model is None:
                raise JobFailed(f"embedding model {embedder.spec.id!r} could not be registered")
            if model.dimension != embedder.spec.dimension:
                # Another replica registered another version of the model: its vectors
                # are not ours to mix with.
                raise JobFailed(
                    f"embedding model {model.id!r} is registered with {model.dimension} "
                    f"dimensions; this server's has {embedder.spec.dimension}"
                )
            pairs.append((model, embedder))
        return pairs

    async def _embed_model(
        self,
        job: Job,
        model: EmbeddingModel,
        embedder: Embedder,
        progress: Progress,
        position: int,
        count: int,
    ) -> int:
        seen: set[tuple[str, str]] = set()
        stored = 0
        while True:
            # Raises JobCancelled between batches once the job was cancelled.
            await progress(min(99, (position * 100 + min(90, len(seen) // self.batch)) // count))
            if self.fetcher is None:
                # URL-only inputs cannot be read: all of them fail at once, not per batch.
                async with self.tx.transaction():
                    await self.embeddings.fail_unfetched(model, URL_FETCHING_OFF)
            batch = await self.embeddings.pending(model, self.batch)
            if not batch:
                return stored
            keys = {(p.app_id, p.input_id) for p in batch}
            if keys <= seen:
                # Stored but still pending: looping again would never end.
                raise JobFailed(
                    f"inputs embedded with {model.id!r} are still reported pending "
                    f"(such as {batch[0].app_id}/{batch[0].input_id})"
                )
            seen |= keys
            vectors, failures = await self._embed_batch(job, model, embedder, batch)
            async with self.tx.transaction():
                if vectors:
                    await self.embeddings.put_many(model, vectors)
                if failures:
                    await self.embeddings.record_failures(model, failures)
            stored += len(vectors)
            if failures:
                log.info(
                    "embedding job %s: %s could not embed %d input(s), such as %s/%s: %s",
                    job.id,
                    model.id,
                    len(failures),
                    *failures[0],
                )

    async def _embed_batch(
        self, job: Job, model: EmbeddingModel, embedder: Embedder, batch: Sequence[PendingInput]
    ) -> tuple[list[tuple[str, str, Sequence[float]]], list[tuple[str, str, str]]]:
        """Vectors and failures of a batch. Media are read a few at a time and embedded
        once MAX_SLICE_BYTES of them are held, so that memory stays bounded whatever the
        originals weigh."""
        vectors: list[tuple[str, str, Sequence[float]]] = []
        failures: list[tuple[str, str, str]] = []
        held: list[_Item] = []
        read = unreadable = 0
        for start in range(0, len(batch), READ_CONCURRENCY):
            group = batch[start : start + READ_CONCURRENCY]
            for item in await asyncio.gather(*(self._read_one(p) for p in group)):
                if item.pending.blob_key is not None:
                    read += 1
                    unreadable += item.data is None
                if item.error:
                    failures.append((item.pending.app_id, item.pending.input_id, item.error))
                else:
                    held.append(item)
            if sum(len(i.data or b"") for i in held) >= MAX_SLICE_BYTES:
                await self._embed(model, embedder, held, vectors, failures)
                held = []
        if read and unreadable == read and job.attempts < RECORD_READ_FAILURES_FROM_ATTEMPT:
            # No original of the batch could be read: the store is down, not the inputs.
            raise RuntimeError(f"no stored original could be read: {failures[0][2]}")
        await self._embed(model, embedder, held, vectors, failures)
        return vectors, failures

    async def _read_one(self, pending: PendingInput) -> _Item:
        if pending.media_type is MediaType.TEXT and pending.text is not None:
            return _Item(pending, pending.text.encode("utf-8"))
        if pending.blob_key is not None:
            try:
                # The store reads an object by its key alone.
                data = await self.media.read(StoredBlob(pending.blob_key, "", 0, ""))
            except Exception as exc:
                return _Item(pending, error=f"the stored original cannot be read: {exc}")
            return _Item(pending, data)
        if pending.source_url:
            if self.fetcher is None:
                return _Item(pending, error=URL_FETCHING_OFF)
            try:
                fetched = await self.fetcher.fetch(pending.source_url, "source_url")
            except DomainError as exc:
                return _Item(pending, error=f"URL input not fetched: {exc}")
            return _Item(pending, fetched.data)
        return _Item(pending, error="the input has no media to embed")

    @staticmethod
    async def _embed(
        model: EmbeddingModel,
        embedder: Embedder,
        items: Sequence[_Item],
        vectors: list[tuple[str, str, Sequence[float]]],
        failures: list[tuple[str, str, str]],
    ) -> None:
        if not items:
            return
        results = await asyncio.to_thread(_embed_part, embedder, items)
        for item, result in zip(items, results, strict=True):
            key = (item.pending.app_id, item.pending.input_id)
            problem = result if isinstance(result, str) else _check(result, model)
            if problem:
                failures.append((*key, problem[:1000]))
            else:
                assert not isinstance(result, str)
                vectors.append((*key, result))


def _embed_part(embedder: Embedder, part: Sequence[_Item]) -> list[list[float] | str]:
    """Runs in a worker thread: texts and images of a slice, results in its order."""
    results: list[list[float] | str] = ["" for _ in part]
    texts = [n for n, i in enumerate(part) if i.pending.media_type is MediaType.TEXT]
    images = [n for n, i in enumerate(part) if i.pending.media_type is not MediaType.TEXT]
    if texts:
        embedded = embedder.embed_texts(
            [(part[n].data or b"").decode("utf-8", errors="replace") for n in texts]
        )
        for n, result in zip(texts, embedded, strict=True):
            results[n] = result
    if images:
        embedded = embedder.embed_images([part[n].data or b"" for n in images])
        for n, result in zip(images, embedded, strict=True):
            results[n] = result
    return results


def _check(vector: Sequence[float], model: EmbeddingModel) -> str:
    if len(vector) != model.dimension:
        return f"the embedder returned {len(vector)} dimensions, the model has {model.dimension}"
    if not all(math.isfinite(v) for v in vector):
        return "the embedder returned a non-finite vector"
    return ""
