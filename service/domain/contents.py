"""Input contents: each input's serialized snapshot (the input with its annotations
folded in, as exports write it), kept up to date in the transaction that changes the
input or its annotations, so that a version is a list of references taken at once.

Any write to an input's row or to its annotations makes its content stale (triggers of
migration 0014). The transaction that did it refreshes the content of those inputs just
before it commits (`refresh_own`, run by the storage's transaction); a version's creation
refreshes whatever is still stale among its members (`refresh_dataset`: paths that wrote
outside a transaction), and the maintenance loop refreshes the rest (`refresh_any`).

Content is content-addressed: identical content, e.g. an input unchanged between ten
versions, is stored once. Content that no input and no version refers to any more is
collected by the maintenance loop (`collect`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from dataclasses import dataclass

from service.domain.annotation_rules import summarize
from service.domain.models import (
    Annotation,
    AnnotationQuery,
    Input,
    InputContent,
    InputSnapshot,
    InputView,
)
from service.domain.ports import (
    AnnotationRepository,
    BlobStore,
    ContentRepository,
    InputRepository,
    InputSnapshotEncoder,
    TransactionManager,
)

ANNOTATION_PAGE_SIZE = 5000
# Stale inputs refreshed per statement by a version's creation and the maintenance loop.
REFRESH_PAGE = 1000
# Below this many inputs the encoding stays on the event loop: a thread hop costs more.
INLINE_ENCODE = 64
# The size name of stored originals in a HostedURL (see BlobStore.hosted).
ORIGINAL_SIZE = "orig"


@dataclass(frozen=True)
class ContentKeeper:
    contents: ContentRepository
    inputs: InputRepository
    annotations: AnnotationRepository
    blobs: BlobStore
    encoder: InputSnapshotEncoder
    tx: TransactionManager

    async def refresh_own(self) -> None:
        """In the caller's transaction, before it commits: the content of the inputs it
        changed."""
        await self._refresh(await self.contents.own_stale())

    async def store_new(self, items: list[tuple[Input, list[Annotation]]]) -> None:
        """In the caller's transaction: the content of inputs it has just created, from
        the rows it wrote (each with its creation time as stored, and its annotations but
        the input-level one, in creation order), instead of reading them back."""
        await self.contents.store(
            await self._encode_all(
                [(item, own, InputSnapshot(self._stable_view(item), own)) for item, own in items]
            )
        )

    async def refresh_dataset(self, app_id: str, dataset_id: str) -> int:
        """In the caller's transaction: the content of the dataset's stale members; how
        many there were."""
        total = 0
        while ids := await self.contents.dataset_stale(app_id, dataset_id, REFRESH_PAGE):
            await self._refresh([(app_id, input_id) for input_id in ids])
            total += len(ids)
            if len(ids) < REFRESH_PAGE:
                break
        return total

    async def refresh_any(self, limit: int = REFRESH_PAGE) -> int:
        """Up to `limit` stale inputs that no transaction holds, in a transaction of its
        own; how many."""
        async with self.tx.transaction():
            stale = await self.contents.any_stale(limit)
            await self._refresh(stale)
        return len(stale)

    async def collect(self, limit: int) -> int:
        return await self.contents.collect(limit)

    async def _refresh(self, stale: list[tuple[str, str]]) -> None:
        if not stale:
            return
        by_app: dict[str, list[str]] = defaultdict(list)
        for app_id, input_id in stale:
            by_app[app_id].append(input_id)
        snapshots: list[tuple[Input, list[Annotation], InputSnapshot]] = []
        for app_id, ids in by_app.items():
            found = await self.inputs.get_many(app_id, ids)
            annotations = await self._annotations_of(app_id, ids)
            for item in found:
                own = annotations.get(item.id, [])
                snapshots.append((item, own, InputSnapshot(self._stable_view(item), own)))
        await self.contents.store(await self._encode_all(snapshots))

    async def _encode_all(
        self, snapshots: list[tuple[Input, list[Annotation], InputSnapshot]]
    ) -> list[InputContent]:
        if len(snapshots) <= INLINE_ENCODE:
            return [_content(*entry, self.encoder) for entry in snapshots]
        # CPU-bound: in a thread, so that the event loop keeps serving calls meanwhile.
        return await asyncio.to_thread(
            lambda: [_content(*entry, self.encoder) for entry in snapshots]
        )

    def _stable_view(self, item: Input) -> InputView:
        """The input with a media reference that stays valid as long as a version refers
        to the content: the stored original's `s3://bucket/key` location (the version
        keeps that object alive), or the caller's own URL for inputs that only reference
        one. Presigned URLs expire; exports resolve references when they need bytes."""
        if item.blob is None:
            return InputView(item, item.source_url)
        prefix, suffix = self.blobs.hosted(item.blob)
        return InputView(item, f"{prefix}/{ORIGINAL_SIZE}/{suffix}", (prefix, suffix))

    async def _annotations_of(self, app_id: str, ids: list[str]) -> dict[str, list[Annotation]]:
        """Every annotation of these inputs but the input-level ones, in creation order."""
        grouped: dict[str, list[Annotation]] = defaultdict(list)
        after: int | None = None
        while True:
            rows = await self.annotations.page(
                AnnotationQuery(app_id, ids), after, ANNOTATION_PAGE_SIZE
            )
            for _, annotation in rows:
                if not annotation.input_level:
                    grouped[annotation.input_id].append(annotation)
            if len(rows) < ANNOTATION_PAGE_SIZE:
                return grouped
            after = rows[-1][0]


def _content(
    item: Input,
    annotations: list[Annotation],
    snapshot: InputSnapshot,
    encoder: InputSnapshotEncoder,
) -> InputContent:
    """The content and what search filters it by, both from the same reads
    (`annotations` without the input-level one, whose concepts are the input's)."""
    encoded = encoder.encode(snapshot)
    concepts = set(summarize({"concepts": item.concepts}).positive_concepts)
    for annotation in annotations:
        concepts |= summarize(annotation.data).positive_concepts
    return InputContent(
        app_id=item.app_id,
        input_id=item.id,
        data=encoded.data,
        content_hash=hashlib.sha256(encoded.data).digest(),
        metrics=encoded.metrics,
        media_type=item.media_type,
        metadata=item.metadata,
        concepts=tuple(sorted(concepts)),
        annotated=bool(item.concepts or annotations),
        geo=item.geo,
        created_at=item.created_at,
    )
