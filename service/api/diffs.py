"""DiffDatasetVersions of DatasetVersionService: decode, call the domain, encode."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from datasetd.v1 import dataset_version_service_pb2 as api

from service.api.interceptors import current_principal
from service.api.rpc import Context
from service.domain.diffs import ChangeKind, DiffService, DiffSummary, InputChange

_KINDS = {
    ChangeKind.ADDED: api.INPUT_CHANGE_KIND_ADDED,
    ChangeKind.REMOVED: api.INPUT_CHANGE_KIND_REMOVED,
    ChangeKind.CHANGED: api.INPUT_CHANGE_KIND_CHANGED,
}


def _changes(changes: list[InputChange]) -> api.DiffDatasetVersionsResponse:
    return api.DiffDatasetVersionsResponse(
        changes=api.InputChanges(
            changes=[
                api.InputChange(
                    input_id=change.input_id,
                    kind=_KINDS[change.kind],
                    concepts_added=change.concepts_added,
                    concepts_removed=change.concepts_removed,
                )
                for change in changes
            ]
        )
    )


def _summary(summary: DiffSummary) -> api.DiffDatasetVersionsResponse:
    message = api.DiffSummary(
        added=summary.added,
        removed=summary.removed,
        changed=summary.changed,
        unchanged=summary.unchanged,
    )
    for concept, (before, after) in summary.concepts.items():
        message.concepts[concept].from_count = before
        message.concepts[concept].to_count = after
    return api.DiffDatasetVersionsResponse(summary=message)


@dataclass(frozen=True)
class DiffRpcs:
    diffs: DiffService

    async def DiffDatasetVersions(
        self, request: api.DiffDatasetVersionsRequest, context: Context
    ) -> AsyncIterator[api.DiffDatasetVersionsResponse]:
        parts = await self.diffs.diff(
            current_principal(),
            request.app_id,
            request.dataset_id,
            request.from_version_id,
            request.to_version_id,
        )
        async with contextlib.aclosing(parts):
            async for part in parts:
                yield _summary(part) if isinstance(part, DiffSummary) else _changes(part)
