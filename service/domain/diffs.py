"""Diffs between two READY versions of a dataset.

Versions are compared input by input on their content hashes, in one ordered merge of
both versions' members by input id, a page at a time: neither version is ever held whole.
Only inputs whose content differs, or that are in one version only, are reported; their
labels come from their stored content, read through ContentConcepts (the domain never
sees the serialization). The summary counts, per concept, the inputs labelled with it in
each version.
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import KW_ONLY, dataclass, field
from typing import Protocol

from service.domain.auth import Permission, authorize
from service.domain.errors import Aborted, FailedPrecondition, NotFound
from service.domain.models import Principal, VersionStatus
from service.domain.ports import MembershipRepository, TransactionManager, VersionRepository
from service.domain.validation import require_ids

# Members read per step of the merge, from each version; also the most changes per batch.
PAGE_SIZE = 500
BATCH_SIZE = 500


class ChangeKind(enum.Enum):
    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"


@dataclass(frozen=True)
class InputChange:
    input_id: str
    kind: ChangeKind
    # CHANGED only: labels only the newer content has, and only the older one has.
    concepts_added: tuple[str, ...] = ()
    concepts_removed: tuple[str, ...] = ()


@dataclass(frozen=True)
class DiffSummary:
    added: int = 0
    removed: int = 0
    changed: int = 0
    unchanged: int = 0
    # Concept id -> (inputs labelled with it in the older version, in the newer one).
    concepts: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class VersionPair:
    """The two versions of a dataset that a diff compares."""

    app_id: str
    dataset_id: str
    from_version_id: str
    to_version_id: str


@dataclass(frozen=True)
class MemberPair:
    """One input id of the merge: whether each version has it, whether their content
    hashes agree, and the serialized content. An unchanged input's content is read once,
    in `to_data`; `from_data` is then None."""

    input_id: str
    in_from: bool
    in_to: bool
    same: bool
    from_data: bytes | None
    to_data: bytes | None


class VersionPairs(Protocol):
    """Both versions' members side by side (implemented in service.storage)."""

    async def existing(self, app_id: str, dataset_id: str, version_ids: list[str]) -> set[str]:
        """Which of the versions exist (in the transaction's snapshot)."""
        ...

    async def page(
        self, pair: VersionPair, after_input_id: str | None, limit: int
    ) -> list[MemberPair]:
        """The first `limit` input ids of either version after `after_input_id`, in
        byte order of the ids."""
        ...


class ContentConcepts(Protocol):
    """Reads a version member's serialized content (implemented in service.formats)."""

    def concepts(self, data: bytes) -> frozenset[str]:
        """The ids of the concepts the input is labelled with: positive concepts of the
        input itself, of its regions and of its video frames and their regions."""
        ...


@dataclass(frozen=True)
class DiffService:
    versions: VersionRepository
    members: MembershipRepository
    pairs: VersionPairs
    content: ContentConcepts
    tx: TransactionManager
    _: KW_ONLY
    page_size: int = PAGE_SIZE
    batch_size: int = BATCH_SIZE

    async def diff(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        from_version_id: str,
        to_version_id: str,
    ) -> AsyncGenerator[list[InputChange] | DiffSummary, None]:
        """Batches of at most `batch_size` changes in input id order, then the summary.
        The checks run before anything is yielded, so a bad request fails the call
        before its stream starts."""
        authorize(principal, app_id, Permission.READ)
        require_ids(
            ("dataset_id", dataset_id),
            ("from_version_id", from_version_id),
            ("to_version_id", to_version_id),
        )
        pair = VersionPair(app_id, dataset_id, from_version_id, to_version_id)
        await self._require_ready(pair)
        return self._stream(pair)

    async def _require_ready(self, pair: VersionPair) -> None:
        app_id, dataset_id = pair.app_id, pair.dataset_id
        from_version_id, to_version_id = pair.from_version_id, pair.to_version_id
        async with self.tx.read_transaction():
            if not await self.members.live_datasets(app_id, [dataset_id], lock=False):
                raise NotFound.in_app("dataset", app_id, dataset_id)
            for name, version_id in (
                ("from_version_id", from_version_id),
                ("to_version_id", to_version_id),
            ):
                version = await self.versions.get(app_id, dataset_id, version_id)
                if version is None:
                    raise NotFound.within("version", version_id, "dataset", dataset_id)
                if version.status is not VersionStatus.READY:
                    raise FailedPrecondition(
                        f"{name}: version {version_id!r} is {version.status.value}; only "
                        "READY versions can be compared (wait for the build to finish)",
                        reason="VERSION_NOT_READY",
                        metadata={"version_id": version_id, "status": version.status.value},
                    )

    async def _stream(
        self, pair: VersionPair
    ) -> AsyncGenerator[list[InputChange] | DiffSummary, None]:
        counts = {kind: 0 for kind in (*ChangeKind, None)}
        from_concepts: Counter[str] = Counter()
        to_concepts: Counter[str] = Counter()
        pending: list[InputChange] = []
        after: str | None = None
        wanted = sorted({pair.from_version_id, pair.to_version_id})
        while True:
            # One snapshot per page: a version the check sees keeps all its members for the
            # page's read, however soon it is deleted, and the next page's check notices.
            async with self.tx.read_transaction():
                found = await self.pairs.existing(pair.app_id, pair.dataset_id, wanted)
                if len(found) < len(wanted):
                    raise Aborted(
                        "a version was deleted while the diff was being streamed; the "
                        "changes sent so far are incomplete",
                        reason="VERSION_DELETED_CONCURRENTLY",
                    )
                page = await self.pairs.page(pair, after, self.page_size)
            if not page:
                break
            # Parsing is CPU-bound: in a thread, so that other calls are served meanwhile.
            compared = await asyncio.to_thread(self._compare, page)
            for change, older, newer in compared:
                counts[change.kind if change is not None else None] += 1
                from_concepts.update(older)
                to_concepts.update(newer)
                if change is not None:
                    pending.append(change)
            while len(pending) >= self.batch_size:
                yield pending[: self.batch_size]
                pending = pending[self.batch_size :]
            after = page[-1].input_id
        if pending:
            yield pending
        yield DiffSummary(
            added=counts[ChangeKind.ADDED],
            removed=counts[ChangeKind.REMOVED],
            changed=counts[ChangeKind.CHANGED],
            unchanged=counts[None],
            concepts={
                concept: (from_concepts[concept], to_concepts[concept])
                for concept in sorted(from_concepts.keys() | to_concepts.keys())
            },
        )

    def _compare(
        self, page: list[MemberPair]
    ) -> list[tuple[InputChange | None, frozenset[str], frozenset[str]]]:
        """Per member: its change (None when unchanged) and its labels in each version."""
        result: list[tuple[InputChange | None, frozenset[str], frozenset[str]]] = []
        none: frozenset[str] = frozenset()
        for pair in page:
            newer = self._labels(pair.to_data) if pair.in_to else none
            if pair.same:
                result.append((None, newer, newer))
                continue
            older = self._labels(pair.from_data) if pair.in_from else none
            if not pair.in_from:
                change = InputChange(pair.input_id, ChangeKind.ADDED)
            elif not pair.in_to:
                change = InputChange(pair.input_id, ChangeKind.REMOVED)
            else:
                change = InputChange(
                    pair.input_id,
                    ChangeKind.CHANGED,
                    concepts_added=tuple(sorted(newer - older)),
                    concepts_removed=tuple(sorted(older - newer)),
                )
            result.append((change, older, newer))
        return result

    def _labels(self, data: bytes | None) -> frozenset[str]:
        if data is None:
            # READY versions have content for every member; the builder guarantees it.
            raise RuntimeError("a member of a READY version has no content")
        return self.content.concepts(data)
