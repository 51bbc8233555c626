"""Per-item results of batch RPCs (CreateInputs, CreateAnnotations): an item's outcome
and the errors that explain it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from datasetd.v1 import errors_pb2

from service.domain.errors import FieldViolation
from service.domain.input_drafts import Outcome

OUTCOMES = {
    Outcome.CREATED: errors_pb2.ITEM_OUTCOME_CREATED,
    Outcome.DUPLICATE_ID: errors_pb2.ITEM_OUTCOME_DUPLICATE_ID,
    Outcome.INVALID: errors_pb2.ITEM_OUTCOME_INVALID,
    Outcome.NOT_ATTEMPTED: errors_pb2.ITEM_OUTCOME_NOT_ATTEMPTED,
}


def field_errors(violations: Iterable[FieldViolation]) -> list[errors_pb2.FieldError]:
    return [errors_pb2.FieldError(field=v.field, description=v.description) for v in violations]


class _Outcome(Protocol):
    @property
    def outcome(self) -> Outcome: ...


class _BatchResponse(Protocol):
    created_count: int
    failed_count: int


def count_outcomes(response: _BatchResponse, outcomes: Sequence[_Outcome]) -> None:
    response.created_count = sum(o.outcome is Outcome.CREATED for o in outcomes)
    response.failed_count = len(outcomes) - response.created_count
