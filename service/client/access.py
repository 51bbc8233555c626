"""Synchronous AccessService API: users, dataset collaborators, API keys and the audit log.

Roles, kinds and key rights are plain lower-case strings ("owner", "viewer", "personal",
"read_write") so that scripts need not import the generated enums.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import grpc
from datasetd.v1 import access_pb2, access_service_pb2_grpc
from datasetd.v1 import access_service_pb2 as api
from google.protobuf import field_mask_pb2, timestamp_pb2

from service.client._rpc import Rpc, time_of

AppRoleName = Literal["owner", "admin", "member"]
DatasetRoleName = Literal["viewer", "admin"]
KeyKindName = Literal["personal", "scoped"]
KeyAccessName = Literal["read", "read_write"]


def _names(enum: Any, prefix: str) -> dict[str, int]:
    """Lower-case names (without prefix) → numbers of a proto enum, UNSPECIFIED left out."""
    return {
        value.name.removeprefix(prefix).lower(): value.number
        for value in enum.DESCRIPTOR.values
        if value.number != 0
    }


_APP_ROLES = _names(access_pb2.AppRole, "APP_ROLE_")
_DATASET_ROLES = _names(access_pb2.DatasetRole, "DATASET_ROLE_")
_KINDS = _names(access_pb2.KeyKind, "KEY_KIND_")
_ACCESS = _names(access_pb2.KeyAccess, "KEY_ACCESS_")


def _number(table: dict[str, int], what: str, name: str) -> Any:
    number = table.get(name.lower())
    if number is None:
        raise ValueError(f"{what} must be one of {', '.join(table)}; got {name!r}")
    return number


def _name(table: dict[str, int], number: int) -> str:
    """The lower-case name of an enum number; "" for unset (or a number we do not know)."""
    return next((name for name, n in table.items() if n == number), "")


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    if value.tzinfo is None:
        raise ValueError(f"give times with a time zone (e.g. datetime.now(UTC)); got {value}")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value.astimezone(UTC))
    return stamp


@dataclass(frozen=True)
class UserInfo:
    """A user of the app."""

    id: str
    display_name: str
    # "owner", "admin" or "member".
    role: str
    created_at: datetime | None = None
    modified_at: datetime | None = None


@dataclass(frozen=True)
class CollaboratorInfo:
    """A user's role on one dataset."""

    dataset_id: str
    user_id: str
    # "viewer" or "admin".
    role: str
    # The user who added them; "" when a key without a user did.
    added_by: str = ""
    created_at: datetime | None = None
    modified_at: datetime | None = None


@dataclass(frozen=True)
class ApiKeyInfo:
    """An API key as the server lists it: never its secret."""

    id: str
    description: str
    # "personal" (acts as `user_id`) or "scoped" (`access` on `dataset_ids`, or the app).
    kind: str
    user_id: str
    # Scoped keys: "read" or "read_write"; personal keys: "".
    access: str
    # Scoped keys: the datasets it is bound to; empty means the whole app.
    dataset_ids: list[str] = field(default_factory=list)
    expires_at: datetime | None = None
    # The user who made it; "" for keys made against the database (bootstrap).
    created_by: str = ""
    created_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class NewApiKey:
    """A key just made, with its secret: shown this once, never again."""

    key: ApiKeyInfo
    secret: str


@dataclass(frozen=True)
class AuditEventInfo:
    """One audited call: a mutation (done or refused) or a refused read."""

    id: str
    time: datetime | None
    app_id: str
    # Full method, e.g. "/datasetd.v1.DatasetService/DeleteDataset".
    rpc: str
    # The status code name the caller got: "OK", "PERMISSION_DENIED", ...
    outcome: str
    user_id: str = ""
    key_id: str = ""
    dataset_ids: list[str] = field(default_factory=list)
    resource_ids: list[str] = field(default_factory=list)
    request_id: str = ""


@dataclass(frozen=True)
class AuditPage:
    """One page of ListAuditEvents, newest first."""

    events: list[AuditEventInfo]
    next_page_token: str


def _user(message: access_pb2.User) -> UserInfo:
    return UserInfo(
        id=message.id,
        display_name=message.display_name,
        role=_name(_APP_ROLES, message.role),
        created_at=time_of(message, "created_at"),
        modified_at=time_of(message, "modified_at"),
    )


def _collaborator(message: access_pb2.Collaborator) -> CollaboratorInfo:
    return CollaboratorInfo(
        dataset_id=message.dataset_id,
        user_id=message.user_id,
        role=_name(_DATASET_ROLES, message.role),
        added_by=message.added_by,
        created_at=time_of(message, "created_at"),
        modified_at=time_of(message, "modified_at"),
    )


def _key(message: access_pb2.ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=message.id,
        description=message.description,
        kind=_name(_KINDS, message.kind),
        user_id=message.user_id,
        access=_name(_ACCESS, message.access),
        dataset_ids=list(message.dataset_ids),
        expires_at=time_of(message, "expires_at"),
        created_by=message.created_by,
        created_at=time_of(message, "created_at"),
        last_used_at=time_of(message, "last_used_at"),
        revoked_at=time_of(message, "revoked_at"),
    )


def _event(message: access_pb2.AuditEvent) -> AuditEventInfo:
    return AuditEventInfo(
        id=message.id,
        time=time_of(message, "time"),
        app_id=message.app_id,
        rpc=message.rpc,
        outcome=message.outcome,
        user_id=message.user_id,
        key_id=message.key_id,
        dataset_ids=list(message.dataset_ids),
        resource_ids=list(message.resource_ids),
        request_id=message.request_id,
    )


class _AccessPart:
    def __init__(self, rpc: Rpc, channel: grpc.Channel) -> None:
        self._rpc = rpc
        self._stub = access_service_pb2_grpc.AccessServiceStub(channel)


class Users(_AccessPart):
    """Users of the client's app (`Client.users`); managed by app owners and admins."""

    def create(
        self,
        user_id: str,
        display_name: str = "",
        role: AppRoleName = "member",
        request_id: str | None = None,
    ) -> UserInfo:
        """Adds a user (AlreadyExistsError when the id is taken); only an owner makes owners."""
        user = access_pb2.User(
            id=user_id, display_name=display_name, role=_number(_APP_ROLES, "role", role)
        )
        response = self._rpc.app_call(
            self._stub.CreateUser, api.CreateUserRequest, user=user, request_id=request_id
        )
        return _user(response.user)

    def list(self, page_size: int = 100) -> Iterator[UserInfo]:
        """Every user of the app by id; pages are fetched as the caller goes."""
        for response in self._rpc.app_pages(self._stub.ListUsers, api.ListUsersRequest, page_size):
            yield from (_user(u) for u in response.users)

    def update(
        self,
        user_id: str,
        display_name: str | None = None,
        role: AppRoleName | None = None,
        request_id: str | None = None,
    ) -> UserInfo:
        """Replaces the given fields; None leaves one as it is (`display_name=""` clears it).
        FailedPreconditionError (LAST_OWNER) when it would leave the app without an owner."""
        user = access_pb2.User(id=user_id)
        paths: list[str] = []
        if display_name is not None:
            user.display_name = display_name
            paths.append("display_name")
        if role is not None:
            user.role = _number(_APP_ROLES, "role", role)
            paths.append("role")
        if not paths:
            raise ValueError("update needs at least one of display_name or role")
        response = self._rpc.app_call(
            self._stub.UpdateUser,
            api.UpdateUserRequest,
            user=user,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            request_id=request_id,
        )
        return _user(response.user)

    def delete(self, user_id: str, request_id: str | None = None) -> int:
        """Removes a user with their collaborations; how many of their keys were revoked."""
        response = self._rpc.app_call(
            self._stub.DeleteUser, api.DeleteUserRequest, user_id=user_id, request_id=request_id
        )
        return response.revoked_key_count


class Collaborators(_AccessPart):
    """Users' roles on datasets (`Client.collaborators`); managed by the dataset's Admins."""

    def add(
        self,
        dataset_id: str,
        user_id: str,
        role: DatasetRoleName = "viewer",
        request_id: str | None = None,
    ) -> CollaboratorInfo:
        """Gives a user of the app a role on the dataset (AlreadyExistsError if they have one)."""
        collaborator = access_pb2.Collaborator(
            user_id=user_id, role=_number(_DATASET_ROLES, "role", role)
        )
        response = self._rpc.app_call(
            self._stub.AddCollaborator,
            api.AddCollaboratorRequest,
            dataset_id=dataset_id,
            collaborator=collaborator,
            request_id=request_id,
        )
        return _collaborator(response.collaborator)

    def list(self, dataset_id: str, page_size: int = 100) -> Iterator[CollaboratorInfo]:
        """The dataset's collaborators by user id (a Viewer may list them)."""
        for response in self._rpc.app_pages(
            self._stub.ListCollaborators,
            api.ListCollaboratorsRequest,
            page_size,
            dataset_id=dataset_id,
        ):
            yield from (_collaborator(c) for c in response.collaborators)

    def update(
        self,
        dataset_id: str,
        user_id: str,
        role: DatasetRoleName,
        request_id: str | None = None,
    ) -> CollaboratorInfo:
        """Sets the role: Viewer → Admin only; an Admin made a Viewer is
        FailedPreconditionError (ADMIN_CANNOT_BE_DEMOTED: remove and add them again)."""
        response = self._rpc.app_call(
            self._stub.UpdateCollaborator,
            api.UpdateCollaboratorRequest,
            dataset_id=dataset_id,
            user_id=user_id,
            role=_number(_DATASET_ROLES, "role", role),
            request_id=request_id,
        )
        return _collaborator(response.collaborator)

    def promote(
        self, dataset_id: str, user_id: str, request_id: str | None = None
    ) -> CollaboratorInfo:
        """Turns a Viewer into an Admin (an Admin stays one)."""
        return self.update(dataset_id, user_id, "admin", request_id=request_id)

    def remove(self, dataset_id: str, user_id: str, request_id: str | None = None) -> None:
        """Ends the user's role on the dataset (NotFoundError when they have none)."""
        self._rpc.app_call(
            self._stub.RemoveCollaborator,
            api.RemoveCollaboratorRequest,
            dataset_id=dataset_id,
            user_id=user_id,
            request_id=request_id,
        )


class ApiKeys(_AccessPart):
    """API keys of the app (`Client.api_keys`)."""

    def create(
        self,
        kind: KeyKindName = "scoped",
        access: KeyAccessName | None = None,
        dataset_ids: Sequence[str] = (),
        description: str = "",
        expires_at: datetime | None = None,
        user_id: str | None = None,
    ) -> NewApiKey:
        """Makes a key and returns its secret, this once.

        A personal key acts as the caller (who must be a user: call with a personal key), or
        as `user_id` when an app owner or admin makes a user's key (their first one, say).
        A scoped key has `access` ("read" or "read_write") on `dataset_ids`, or on the whole
        app when none are given. A key never grants more than its creator holds
        (PermissionDeniedError). There is no request id: a retry makes another key.
        """
        key = access_pb2.ApiKey(
            kind=_number(_KINDS, "kind", kind),
            description=description,
            dataset_ids=list(dataset_ids),
            user_id=user_id or "",
        )
        if access is not None:
            key.access = _number(_ACCESS, "access", access)
        if expires_at is not None:
            key.expires_at.CopyFrom(_timestamp(expires_at))
        response = self._rpc.app_call(self._stub.CreateApiKey, api.CreateApiKeyRequest, api_key=key)
        return NewApiKey(_key(response.api_key), response.secret)

    def list(
        self, dataset_id: str | None = None, include_revoked: bool = False, page_size: int = 100
    ) -> Iterator[ApiKeyInfo]:
        """Keys newest first. With `dataset_id` the keys bound to it (Admin on it needed);
        without, every key for app owners and admins, the caller's own keys for others."""
        for response in self._rpc.app_pages(
            self._stub.ListApiKeys,
            api.ListApiKeysRequest,
            page_size,
            dataset_id=dataset_id,
            include_revoked=include_revoked,
        ):
            yield from (_key(k) for k in response.api_keys)

    def revoke(self, key_id: str, request_id: str | None = None) -> ApiKeyInfo:
        """Revokes a key; revoking a revoked key changes nothing (its first `revoked_at`)."""
        response = self._rpc.app_call(
            self._stub.RevokeApiKey, api.RevokeApiKeyRequest, key_id=key_id, request_id=request_id
        )
        return _key(response.api_key)


class Audit(_AccessPart):
    """The audit log (`Client.audit`): Admin on the dataset, or app owner/admin for the app."""

    def page(
        self,
        dataset_id: str | None = None,
        user_id: str | None = None,
        key_id: str | None = None,
        rpc: str | None = None,
        outcome: str | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> AuditPage:
        """One page of events, newest first; the filters combine with AND. `rpc` is a full
        method or a bare method name ("DeleteDataset"), `outcome` a status code name,
        `start_time` inclusive and `end_time` exclusive."""
        request = self._request(
            dataset_id, user_id, key_id, rpc, outcome, start_time, end_time, page_size, page_token
        )
        response = self._rpc.call(self._stub.ListAuditEvents, request)
        return AuditPage([_event(e) for e in response.events], response.next_page_token)

    def events(
        self,
        dataset_id: str | None = None,
        user_id: str | None = None,
        key_id: str | None = None,
        rpc: str | None = None,
        outcome: str | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 100,
    ) -> Iterator[AuditEventInfo]:
        """Every matching event, newest first, fetching pages as the caller goes."""
        for response in self._rpc.pages(
            self._stub.ListAuditEvents,
            lambda token: self._request(
                dataset_id, user_id, key_id, rpc, outcome, start_time, end_time, page_size, token
            ),
        ):
            yield from (_event(e) for e in response.events)

    def _request(
        self,
        dataset_id: str | None,
        user_id: str | None,
        key_id: str | None,
        rpc: str | None,
        outcome: str | None,
        start_time: datetime | None,
        end_time: datetime | None,
        page_size: int,
        page_token: str = "",
    ) -> api.ListAuditEventsRequest:
        request = api.ListAuditEventsRequest(
            app_id=self._rpc.app,
            dataset_id=dataset_id or "",
            user_id=user_id or "",
            key_id=key_id or "",
            rpc=rpc or "",
            outcome=(outcome or "").upper(),
            page_size=page_size,
            page_token=page_token,
        )
        if start_time is not None:
            request.start_time.CopyFrom(_timestamp(start_time))
        if end_time is not None:
            request.end_time.CopyFrom(_timestamp(end_time))
        return request
