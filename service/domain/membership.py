"""Dataset membership use cases: which inputs a dataset holds, merge, delete by filter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.domain.access import Action, Resource, require
from service.domain.auth import Permission, authorize
from service.domain.datasets import DatasetChange, require_changeable
from service.domain.errors import NotFound
from service.domain.input_drafts import MAX_IDS_PER_CALL
from service.domain.inputs import InputService
from service.domain.models import DatasetMember, InputQuery, InputView, Principal
from service.domain.ports import InputRepository, MembershipRepository, TransactionManager
from service.domain.validation import check_id, checked_ids, require_ids


@dataclass(frozen=True)
class MembershipService:
    # For the views of member inputs (signed URLs) and the rules of input filters.
    inputs: InputService
    records: InputRepository
    members: MembershipRepository
    tx: TransactionManager

    async def add_to_dataset(
        self, principal: Principal, app_id: str, dataset_id: str, input_ids: Sequence[str]
    ) -> tuple[int, int, list[str]]:
        """(added, already present, unknown ids)."""
        authorize(principal, app_id, Permission.WRITE)
        unique = self._check_member_ids(dataset_id, input_ids)
        async with self.tx.transaction():
            await require_changeable(self.members, app_id, [dataset_id], DatasetChange.MEMBERSHIP)
            existing = await self.records.existing_ids(app_id, unique)
            known = [i for i in unique if i in existing]
            added = await self.members.add(app_id, dataset_id, known)
        return added, len(known) - added, [i for i in unique if i not in existing]

    async def list_members(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        after_seq: int | None,
        limit: int,
    ) -> tuple[list[tuple[DatasetMember, InputView]], int | None]:
        authorize(principal, app_id, Permission.READ)
        require_ids(("dataset_id", dataset_id))
        async with self.tx.read_transaction():
            await self._require_live_dataset(app_id, dataset_id, lock=False)
            rows = await self.members.page(app_id, dataset_id, after_seq, limit + 1)
        page = rows[:limit]
        views = await self.inputs.views([m.input for m in page])
        cursor = page[-1].seq if len(rows) > limit and page else None
        return list(zip(page, views, strict=True)), cursor

    async def get_member(
        self, principal: Principal, app_id: str, dataset_id: str, input_id: str
    ) -> tuple[DatasetMember, InputView]:
        authorize(principal, app_id, Permission.READ)
        require_ids(("dataset_id", dataset_id), ("input_id", input_id))
        async with self.tx.read_transaction():
            await self._require_live_dataset(app_id, dataset_id, lock=False)
            member = await self.members.get(app_id, dataset_id, input_id)
        if member is None:
            raise NotFound(
                f"input {input_id!r} is not in dataset {dataset_id!r}",
                reason="DATASET_INPUT_NOT_FOUND",
                metadata={"dataset_id": dataset_id, "input_id": input_id},
            )
        return member, (await self.inputs.views([member.input]))[0]

    async def remove_from_dataset(
        self, principal: Principal, app_id: str, dataset_id: str, input_ids: Sequence[str]
    ) -> int:
        authorize(principal, app_id, Permission.WRITE)
        unique = self._check_member_ids(dataset_id, input_ids)
        async with self.tx.transaction():
            await require_changeable(self.members, app_id, [dataset_id], DatasetChange.MEMBERSHIP)
            return await self.members.remove(app_id, dataset_id, unique)

    async def delete_by_filter(
        self, principal: Principal, query: InputQuery, *, dry_run: bool
    ) -> tuple[int, int]:
        """(matched, deleted) among the dataset's inputs."""
        authorize(principal, query.app_id, Permission.WRITE)
        assert query.dataset_id is not None
        self.inputs.check_query(query)
        async with self.tx.transaction():
            if dry_run:
                await self._require_live_dataset(query.app_id, query.dataset_id)
                return await self.records.count_matching(query), 0
            await require_changeable(
                self.members, query.app_id, [query.dataset_id], DatasetChange.MEMBERSHIP
            )
            deleted = await self.records.delete_matching(query)
            return deleted, deleted

    async def merge(
        self, principal: Principal, app_id: str, source_id: str, destination_id: str
    ) -> tuple[int, int]:
        authorize(principal, app_id, Permission.WRITE)
        violations = checked_ids(
            ("source_dataset_id", source_id), ("destination_dataset_id", destination_id)
        )
        if source_id == destination_id:
            violations.add("destination_dataset_id", "must differ from source_dataset_id")
        violations.raise_if_any()
        # The request names two datasets: the source is only read (its inputs join the
        # destination, which the RPC's rule checked for WRITE).
        require(principal, app_id, Action.READ, Resource.DATASETS, [source_id])
        async with self.tx.transaction():
            live = await self.members.live_datasets(app_id, sorted({source_id, destination_id}))
            for dataset_id in (source_id, destination_id):
                if dataset_id not in live:
                    raise NotFound.in_app("dataset", app_id, dataset_id)
            # The source only gives its members away: its flags do not matter.
            await require_changeable(
                self.members, app_id, [destination_id], DatasetChange.MEMBERSHIP
            )
            return await self.members.merge(app_id, source_id, destination_id)

    def _check_member_ids(self, dataset_id: str, input_ids: Sequence[str]) -> list[str]:
        violations = checked_ids(("dataset_id", dataset_id))
        if not input_ids or len(input_ids) > MAX_IDS_PER_CALL:
            violations.add("input_ids", f"must contain 1..{MAX_IDS_PER_CALL} ids")
        for index, input_id in enumerate(input_ids):
            check_id(violations, f"input_ids[{index}]", input_id)
        violations.raise_if_any()
        return list(dict.fromkeys(input_ids))

    async def _require_live_dataset(
        self, app_id: str, dataset_id: str, *, lock: bool = True
    ) -> None:
        if not await self.members.live_datasets(app_id, [dataset_id], lock=lock):
            raise NotFound.in_app("dataset", app_id, dataset_id)
