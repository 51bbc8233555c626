"""Typed domain errors with stable reasons; the transport maps them to status codes."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: `field` is a path such as `dataset.metadata` or `inputs[3].id`."""

    field: str
    description: str


class DomainError(Exception):
    kind: ErrorKind = ErrorKind.INVALID_ARGUMENT

    def __init_subclass__(cls, kind: ErrorKind | None = None, **kwargs: object) -> None:
        # `class NotFound(DomainError, kind=ErrorKind.NOT_FOUND)`: a kind per subclass.
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind = kind

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        violations: Iterable[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.violations = tuple(violations)
        self.metadata = dict(metadata or {})


class InvalidArgument(DomainError, kind=ErrorKind.INVALID_ARGUMENT):
    @classmethod
    def field(
        cls, field: str, description: str, *, reason: str = "INVALID_FIELD"
    ) -> InvalidArgument:
        return cls(
            f"{field}: {description}",
            reason=reason,
            violations=[FieldViolation(field, description)],
        )


class NotFound(DomainError, kind=ErrorKind.NOT_FOUND):
    @classmethod
    def in_app(cls, resource: str, app_id: str, resource_id: str) -> NotFound:
        """`resource` ("input", "dataset", ...) `resource_id` does not exist in the app."""
        return cls(
            f"{resource} {resource_id!r} not found in app {app_id!r}",
            reason=f"{resource.upper()}_NOT_FOUND",
            metadata={f"{resource}_id": resource_id},
        )

    @classmethod
    def within(cls, resource: str, resource_id: str, parent: str, parent_id: str) -> NotFound:
        """`resource` ("version", ...) `resource_id` of `parent` `parent_id` does not exist."""
        return cls(
            f"{resource} {resource_id!r} of {parent} {parent_id!r} not found",
            reason=f"{resource.upper()}_NOT_FOUND",
            metadata={f"{parent}_id": parent_id, f"{resource}_id": resource_id},
        )


def the_one(found: Sequence[T], resource: str, app_id: str, resource_id: str) -> T:
    """The single row a lookup by id found; NotFound naming the resource when none."""
    if not found:
        raise NotFound.in_app(resource, app_id, resource_id)
    return found[0]


class AlreadyExists(DomainError, kind=ErrorKind.ALREADY_EXISTS): ...


class PermissionDenied(DomainError, kind=ErrorKind.PERMISSION_DENIED): ...


class Unauthenticated(DomainError, kind=ErrorKind.UNAUTHENTICATED): ...


class FailedPrecondition(DomainError, kind=ErrorKind.FAILED_PRECONDITION): ...


class Aborted(DomainError, kind=ErrorKind.ABORTED): ...


class ResourceExhausted(DomainError, kind=ErrorKind.RESOURCE_EXHAUSTED): ...


class Unavailable(DomainError, kind=ErrorKind.UNAVAILABLE): ...


class Violations:
    """Collects every problem of a request so the caller sees them all at once."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self, reason: str = "INVALID_FIELD") -> None:
        if not self.items:
            return
        summary = "; ".join(f"{v.field}: {v.description}" for v in self.items)
        raise InvalidArgument(summary, reason=reason, violations=self.items)
