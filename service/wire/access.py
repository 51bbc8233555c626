"""Access messages (users, collaborators, API keys, audit events) <-> the domain's."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime

from datasetd.v1 import access_pb2
from google.protobuf import timestamp_pb2

from service.domain.access_admin import MAX_KEY_DATASETS, KeyRequest, UserChange
from service.domain.errors import Violations
from service.domain.models import (
    ApiKey,
    AppRole,
    AuditEvent,
    Collaborator,
    DatasetRole,
    KeyKind,
    User,
)
from service.domain.validation import check_id, check_text
from service.wire.masks import given_fields
from service.wire.timestamps import set_times, set_timestamp

USER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.@+-]{1,254}$")
USER_ID_RULE = "must be 1..254 characters of [A-Za-z0-9_.@+-]"
KEY_ID_PATTERN = re.compile(r"^[0-9a-f]{16}$")
KEY_ID_RULE = "must be a key id: 16 characters of [0-9a-f]"
MAX_TEXT_CHARS = 200
# UpdateUser's update_mask names (field_policy.py refuses the others set beside a mask).
UPDATABLE_USER_FIELDS = ("display_name", "role")

_APP_ROLE_NUMBERS: dict[AppRole, access_pb2.AppRole.ValueType] = {
    AppRole.OWNER: access_pb2.APP_ROLE_OWNER,
    AppRole.ADMIN: access_pb2.APP_ROLE_ADMIN,
    AppRole.MEMBER: access_pb2.APP_ROLE_MEMBER,
}
APP_ROLES: dict[int, AppRole] = {n: role for role, n in _APP_ROLE_NUMBERS.items()}
_DATASET_ROLE_NUMBERS: dict[DatasetRole, access_pb2.DatasetRole.ValueType] = {
    DatasetRole.VIEWER: access_pb2.DATASET_ROLE_VIEWER,
    DatasetRole.ADMIN: access_pb2.DATASET_ROLE_ADMIN,
}
DATASET_ROLES: dict[int, DatasetRole] = {n: role for role, n in _DATASET_ROLE_NUMBERS.items()}
_KEY_KIND_NUMBERS: dict[KeyKind, access_pb2.KeyKind.ValueType] = {
    KeyKind.PERSONAL: access_pb2.KEY_KIND_PERSONAL,
    KeyKind.SCOPED: access_pb2.KEY_KIND_SCOPED,
}
KEY_KINDS: dict[int, KeyKind] = {n: kind for kind, n in _KEY_KIND_NUMBERS.items()}
KEY_ACCESS: dict[int, tuple[str, ...]] = {
    access_pb2.KEY_ACCESS_READ: ("read",),
    access_pb2.KEY_ACCESS_READ_WRITE: ("read", "write"),
}


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def check_user_id(violations: Violations, field: str, value: str, *, required: bool = True) -> None:
    if not value:
        if required:
            violations.add(field, f"is required and {USER_ID_RULE}")
        return
    if not USER_ID_PATTERN.match(value):
        violations.add(field, f"{USER_ID_RULE}, got {_shown(value)} ({len(value)} characters)")


def check_key_id(violations: Violations, field: str, value: str, *, required: bool = True) -> None:
    if not value:
        if required:
            violations.add(field, f"is required and {KEY_ID_RULE}")
        return
    if not KEY_ID_PATTERN.match(value):
        violations.add(field, f"{KEY_ID_RULE}, got {_shown(value)}")


def _names(numbers: Sequence[int], enum_name: str) -> str:
    descriptor = access_pb2.DESCRIPTOR.enum_types_by_name[enum_name]
    return ", ".join(descriptor.values_by_number[n].name for n in numbers)


def app_role(
    violations: Violations, field: str, value: int, *, default: AppRole | None
) -> AppRole | None:
    """The role a request names; `default` when unset (None: the role is required)."""
    if value == access_pb2.APP_ROLE_UNSPECIFIED and default is not None:
        return default
    role = APP_ROLES.get(value)
    if role is None:
        violations.add(field, f"must be one of {_names(list(APP_ROLES), 'AppRole')}")
    return role


def dataset_role(
    violations: Violations, field: str, value: int, *, default: DatasetRole | None
) -> DatasetRole | None:
    """The role a request names; `default` when unset (None: the role is required)."""
    if value == access_pb2.DATASET_ROLE_UNSPECIFIED and default is not None:
        return default
    role = DATASET_ROLES.get(value)
    if role is None:
        violations.add(field, f"must be one of {_names(list(DATASET_ROLES), 'DatasetRole')}")
    return role


def timestamp(
    violations: Violations, field: str, stamp: timestamp_pb2.Timestamp
) -> datetime | None:
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        violations.add(field, "must be a timestamp between 0001-01-01 and 9999-12-31")
        return None


def new_user(app_id: str, message: access_pb2.User, violations: Violations) -> User:
    """The user CreateUser makes (MEMBER unless a role is given)."""
    check_user_id(violations, "user.id", message.id)
    check_text(violations, "user.display_name", message.display_name, MAX_TEXT_CHARS)
    role = app_role(violations, "user.role", message.role, default=AppRole.MEMBER)
    return User(
        app_id=app_id, id=message.id, display_name=message.display_name, role=role or AppRole.MEMBER
    )


def user_change(
    message: access_pb2.User, paths: Sequence[str], violations: Violations
) -> UserChange:
    """What UpdateUser replaces: the fields its mask names, or with an empty mask those set
    to a non-default value."""
    check_user_id(violations, "user.id", message.id)
    given = given_fields(
        paths,
        UPDATABLE_USER_FIELDS,
        {
            "display_name": bool(message.display_name),
            "role": message.role != access_pb2.APP_ROLE_UNSPECIFIED,
        },
        violations,
    )
    if not given:
        violations.add(
            "update_mask",
            "names no field and no field of `user` is set: set user.display_name or user.role",
        )
    display_name = None
    if "display_name" in given:
        check_text(violations, "user.display_name", message.display_name, MAX_TEXT_CHARS)
        display_name = message.display_name
    role = None
    if "role" in given:
        role = app_role(violations, "user.role", message.role, default=None)
    return UserChange(display_name=display_name, role=role)


def key_request(message: access_pb2.ApiKey, now: datetime, violations: Violations) -> KeyRequest:
    """What CreateApiKey asks for, its shape checked (the rights are the domain's)."""
    kind = KEY_KINDS.get(message.kind)
    if kind is None:
        violations.add("api_key.kind", f"is required: one of {_names(list(KEY_KINDS), 'KeyKind')}")
    check_text(violations, "api_key.description", message.description, MAX_TEXT_CHARS)
    scopes: tuple[str, ...] = ()
    if kind is KeyKind.PERSONAL:
        if message.access != access_pb2.KEY_ACCESS_UNSPECIFIED:
            violations.add(
                "api_key.access",
                "must be unset for a personal key: it acts with its user's roles",
            )
        if message.dataset_ids:
            violations.add(
                "api_key.dataset_ids",
                "must be empty for a personal key: it acts on what its user may reach; "
                "make a KEY_KIND_SCOPED key to bind datasets",
            )
    elif message.user_id:
        violations.add(
            "api_key.user_id",
            "must be empty for a scoped key: it acts with its own rights, not a user's",
        )
    if kind is KeyKind.SCOPED:
        found = KEY_ACCESS.get(message.access)
        if found is None:
            violations.add(
                "api_key.access",
                "is required for a scoped key: KEY_ACCESS_READ or KEY_ACCESS_READ_WRITE",
            )
        else:
            scopes = found
    dataset_ids = tuple(message.dataset_ids)
    if len(dataset_ids) > MAX_KEY_DATASETS:
        violations.add(
            "api_key.dataset_ids",
            f"must name at most {MAX_KEY_DATASETS} datasets, got {len(dataset_ids)} "
            "(an empty list binds the key to the whole app)",
        )
    else:
        seen: set[str] = set()
        for index, dataset_id in enumerate(dataset_ids):
            field = f"api_key.dataset_ids[{index}]"
            check_id(violations, field, dataset_id)
            if dataset_id in seen:
                violations.add(field, f"repeats dataset {dataset_id!r}")
            seen.add(dataset_id)
    expires_at = None
    if message.HasField("expires_at"):
        expires_at = timestamp(violations, "api_key.expires_at", message.expires_at)
        if expires_at is not None and expires_at <= now:
            violations.add(
                "api_key.expires_at",
                f"must be in the future, got {expires_at.isoformat()} (now is "
                f"{now.isoformat(timespec='seconds')}); leave it unset for a key that "
                "never expires",
            )
    return KeyRequest(
        kind=kind or KeyKind.SCOPED,
        description=message.description,
        scopes=scopes,
        dataset_ids=dataset_ids,
        expires_at=expires_at,
        user_id=message.user_id or None,
    )


def user_to_proto(user: User) -> access_pb2.User:
    message = access_pb2.User(
        id=user.id, display_name=user.display_name, role=_APP_ROLE_NUMBERS[user.role]
    )
    set_times(message, user.created_at, user.modified_at)
    return message


def collaborator_to_proto(collaborator: Collaborator) -> access_pb2.Collaborator:
    message = access_pb2.Collaborator(
        user_id=collaborator.user_id,
        role=_DATASET_ROLE_NUMBERS[collaborator.role],
        dataset_id=collaborator.dataset_id,
        added_by=collaborator.added_by,
    )
    set_times(message, collaborator.created_at, collaborator.modified_at)
    return message


def api_key_to_proto(key: ApiKey) -> access_pb2.ApiKey:
    """A key without its secret (the hash and lookup never leave the server either)."""
    access = access_pb2.KEY_ACCESS_UNSPECIFIED
    if key.kind is KeyKind.SCOPED:
        access = (
            access_pb2.KEY_ACCESS_READ_WRITE
            if "write" in key.scopes
            else access_pb2.KEY_ACCESS_READ
        )
    message = access_pb2.ApiKey(
        id=key.id,
        description=key.description,
        kind=_KEY_KIND_NUMBERS[key.kind],
        user_id=key.user_id or "",
        access=access,
        dataset_ids=key.dataset_ids,
        created_by=key.created_by,
    )
    for name, value in (
        ("expires_at", key.expires_at),
        ("created_at", key.created_at),
        ("last_used_at", key.last_used_at),
        ("revoked_at", key.revoked_at),
    ):
        if value is not None:
            set_timestamp(getattr(message, name), value)
    return message


def audit_event_to_proto(event: AuditEvent) -> access_pb2.AuditEvent:
    message = access_pb2.AuditEvent(
        id="" if event.id is None else str(event.id),
        user_id=event.user_id,
        key_id=event.key_id,
        rpc=event.rpc,
        app_id=event.app_id,
        dataset_ids=event.dataset_ids,
        resource_ids=event.resource_ids,
        request_id=event.request_id,
        outcome=event.outcome,
    )
    if event.at is not None:
        set_timestamp(message.time, event.at)
    return message
