"""The RPCs of AccessService: decode, call the domain (AccessAdmin), encode."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from datasetd.v1 import access_service_pb2 as api

from service.api.interceptors import current_principal
from service.api.pagination import PageTokens, page_size
from service.api.rpc import Context, decoded, mutation
from service.domain.access_admin import AccessAdmin
from service.domain.auth import Permission, authorize
from service.domain.errors import InvalidArgument, Violations
from service.domain.idempotency import Idempotency
from service.domain.models import DatasetRole, Principal
from service.domain.ports import AuditQuery
from service.domain.validation import check_id
from service.wire.access import (
    api_key_to_proto,
    audit_event_to_proto,
    check_key_id,
    check_user_id,
    collaborator_to_proto,
    dataset_role,
    key_request,
    new_user,
    timestamp,
    user_change,
    user_to_proto,
)

# "/datasetd.v1.DatasetService/DeleteDataset" or "DeleteDataset".
_RPC_FILTER = re.compile(r"^(/[A-Za-z0-9_.]{1,200}/)?[A-Za-z0-9_]{1,100}$")
_OUTCOMES = frozenset(code.name for code in grpc.StatusCode)


def _malformed_token() -> InvalidArgument:
    return InvalidArgument.field(
        "page_token", "is malformed; pass next_page_token unchanged", reason="INVALID_PAGE_TOKEN"
    )


@dataclass(frozen=True)
class AccessRpcs:
    admin: AccessAdmin
    idempotency: Idempotency
    tokens: PageTokens

    # --- users ---------------------------------------------------------------------------

    @mutation()
    async def CreateUser(
        self, request: api.CreateUserRequest, principal: Principal
    ) -> api.CreateUserResponse:
        user = decoded(lambda violations: new_user(request.app_id, request.user, violations))
        created = await self.admin.create_user(principal, request.app_id, user)
        return api.CreateUserResponse(user=user_to_proto(created))

    async def ListUsers(
        self, request: api.ListUsersRequest, context: Context
    ) -> api.ListUsersResponse:
        limit = page_size(request.page_size)
        scope = {"method": "ListUsers", "app_id": request.app_id}
        after = self._after_id(request.page_token, scope)
        found = await self.admin.list_users(current_principal(), request.app_id, after, limit)
        page, more = found[:limit], len(found) > limit
        return api.ListUsersResponse(
            users=[user_to_proto(u) for u in page],
            next_page_token=self.tokens.encode(scope, [page[-1].id]) if more and page else "",
        )

    @mutation()
    async def UpdateUser(
        self, request: api.UpdateUserRequest, principal: Principal
    ) -> api.UpdateUserResponse:
        paths = list(request.update_mask.paths)
        change = decoded(lambda violations: user_change(request.user, paths, violations))
        updated = await self.admin.update_user(principal, request.app_id, request.user.id, change)
        return api.UpdateUserResponse(user=user_to_proto(updated))

    @mutation()
    async def DeleteUser(
        self, request: api.DeleteUserRequest, principal: Principal
    ) -> api.DeleteUserResponse:
        decoded(lambda violations: check_user_id(violations, "user_id", request.user_id))
        revoked = await self.admin.delete_user(principal, request.app_id, request.user_id)
        return api.DeleteUserResponse(revoked_key_count=revoked)

    # --- collaborators -------------------------------------------------------------------

    @mutation()
    async def AddCollaborator(
        self, request: api.AddCollaboratorRequest, principal: Principal
    ) -> api.AddCollaboratorResponse:
        def decode(violations: Violations) -> Any:
            check_id(violations, "dataset_id", request.dataset_id)
            check_user_id(violations, "collaborator.user_id", request.collaborator.user_id)
            return dataset_role(
                violations,
                "collaborator.role",
                request.collaborator.role,
                default=DatasetRole.VIEWER,
            )

        role = decoded(decode)
        added = await self.admin.add_collaborator(
            principal, request.app_id, request.dataset_id, request.collaborator.user_id, role
        )
        return api.AddCollaboratorResponse(collaborator=collaborator_to_proto(added))

    async def ListCollaborators(
        self, request: api.ListCollaboratorsRequest, context: Context
    ) -> api.ListCollaboratorsResponse:
        decoded(lambda violations: check_id(violations, "dataset_id", request.dataset_id))
        limit = page_size(request.page_size)
        scope = {
            "method": "ListCollaborators",
            "app_id": request.app_id,
            "dataset_id": request.dataset_id,
        }
        after = self._after_id(request.page_token, scope)
        found = await self.admin.list_collaborators(
            current_principal(), request.app_id, request.dataset_id, after, limit
        )
        page, more = found[:limit], len(found) > limit
        return api.ListCollaboratorsResponse(
            collaborators=[collaborator_to_proto(c) for c in page],
            next_page_token=self.tokens.encode(scope, [page[-1].user_id]) if more and page else "",
        )

    @mutation()
    async def UpdateCollaborator(
        self, request: api.UpdateCollaboratorRequest, principal: Principal
    ) -> api.UpdateCollaboratorResponse:
        def decode(violations: Violations) -> Any:
            check_id(violations, "dataset_id", request.dataset_id)
            check_user_id(violations, "user_id", request.user_id)
            return dataset_role(violations, "role", request.role, default=None)

        role = decoded(decode)
        updated = await self.admin.update_collaborator(
            principal, request.app_id, request.dataset_id, request.user_id, role
        )
        return api.UpdateCollaboratorResponse(collaborator=collaborator_to_proto(updated))

    @mutation()
    async def RemoveCollaborator(
        self, request: api.RemoveCollaboratorRequest, principal: Principal
    ) -> api.RemoveCollaboratorResponse:
        def decode(violations: Violations) -> None:
            check_id(violations, "dataset_id", request.dataset_id)
            check_user_id(violations, "user_id", request.user_id)

        decoded(decode)
        await self.admin.remove_collaborator(
            principal, request.app_id, request.dataset_id, request.user_id
        )
        return api.RemoveCollaboratorResponse()

    # --- keys ----------------------------------------------------------------------------

    # Not a @mutation: its response holds the secret, which the idempotency table would
    # keep (and replay to anyone retrying the request id); a retry makes another key.
    async def CreateApiKey(
        self, request: api.CreateApiKeyRequest, context: Context
    ) -> api.CreateApiKeyResponse:
        principal = current_principal()
        authorize(principal, request.app_id, Permission.WRITE)
        now = datetime.now(UTC)
        wanted = decoded(lambda violations: key_request(request.api_key, now, violations))
        made = await self.admin.create_key(principal, request.app_id, wanted)
        return api.CreateApiKeyResponse(api_key=api_key_to_proto(made.key), secret=made.secret)

    async def ListApiKeys(
        self, request: api.ListApiKeysRequest, context: Context
    ) -> api.ListApiKeysResponse:
        decoded(
            lambda violations: check_id(
                violations, "dataset_id", request.dataset_id, required=False
            )
        )
        limit = page_size(request.page_size)
        scope = {
            "method": "ListApiKeys",
            "app_id": request.app_id,
            "dataset_id": request.dataset_id,
            "include_revoked": request.include_revoked,
        }
        after = self._key_cursor(request.page_token, scope)
        found = await self.admin.list_keys(
            current_principal(),
            request.app_id,
            request.dataset_id or None,
            request.include_revoked,
            after,
            limit,
        )
        page, more = found[:limit], len(found) > limit
        token = ""
        if more and page and page[-1].created_at is not None:
            token = self.tokens.encode(scope, [page[-1].created_at.isoformat(), page[-1].id])
        return api.ListApiKeysResponse(
            api_keys=[api_key_to_proto(k) for k in page], next_page_token=token
        )

    @mutation()
    async def RevokeApiKey(
        self, request: api.RevokeApiKeyRequest, principal: Principal
    ) -> api.RevokeApiKeyResponse:
        decoded(lambda violations: check_key_id(violations, "key_id", request.key_id))
        revoked = await self.admin.revoke_key(principal, request.app_id, request.key_id)
        return api.RevokeApiKeyResponse(api_key=api_key_to_proto(revoked))

    # --- audit ---------------------------------------------------------------------------

    async def ListAuditEvents(
        self, request: api.ListAuditEventsRequest, context: Context
    ) -> api.ListAuditEventsResponse:
        query = decoded(lambda violations: _audit_query(request, violations))
        # The filters a token is bound to (the method and app are added by `page`).
        scope = {
            "dataset_id": request.dataset_id,
            "user_id": request.user_id,
            "key_id": request.key_id,
            "rpc": request.rpc,
            "outcome": request.outcome,
            "start": query.start.isoformat() if query.start else "",
            "end": query.end.isoformat() if query.end else "",
        }
        page = self.tokens.page("ListAuditEvents", request, **scope)
        found = await self.admin.list_audit_events(
            current_principal(),
            AuditQuery(
                app_id=query.app_id,
                dataset_id=query.dataset_id,
                user_id=query.user_id,
                key_id=query.key_id,
                rpc=query.rpc,
                outcome=query.outcome,
                start=query.start,
                end=query.end,
                before_id=page.after,
                # One more than the page: it tells that a page follows.
                limit=page.limit + 1,
            ),
        )
        events = list(found[: page.limit])
        more = len(found) > page.limit
        last = events[-1].id if more and events else None
        return api.ListAuditEventsResponse(
            events=[audit_event_to_proto(e) for e in events], next_page_token=page.next_token(last)
        )

    # --- page tokens ---------------------------------------------------------------------

    def _after_id(self, token: str, scope: dict[str, Any]) -> str | None:
        """The id a page continues after (lists ordered by id)."""
        if not token:
            return None
        cursor = self.tokens.decode(token, scope)
        if len(cursor) != 1 or not isinstance(cursor[0], str):
            raise _malformed_token()
        last: str = cursor[0]
        return last

    def _key_cursor(self, token: str, scope: dict[str, Any]) -> tuple[datetime, str] | None:
        """The (created_at, id) a page of keys, newest first, continues after."""
        if not token:
            return None
        cursor = self.tokens.decode(token, scope)
        try:
            created, key_id = cursor
            if not isinstance(created, str) or not isinstance(key_id, str):
                raise ValueError
            return datetime.fromisoformat(created), key_id
        except ValueError:
            raise _malformed_token() from None


def _audit_query(request: api.ListAuditEventsRequest, violations: Violations) -> AuditQuery:
    """The filters of ListAuditEvents (its page is added by the caller)."""
    check_id(violations, "dataset_id", request.dataset_id, required=False)
    check_user_id(violations, "user_id", request.user_id, required=False)
    check_key_id(violations, "key_id", request.key_id, required=False)
    if request.rpc and not _RPC_FILTER.match(request.rpc):
        violations.add(
            "rpc",
            'must be a full method ("/datasetd.v1.DatasetService/DeleteDataset") or a '
            'method name ("DeleteDataset")',
        )
    if request.outcome and request.outcome not in _OUTCOMES:
        violations.add(
            "outcome", 'must be a status code name: "OK", "PERMISSION_DENIED", "NOT_FOUND", ...'
        )
    start = end = None
    if request.HasField("start_time"):
        start = timestamp(violations, "start_time", request.start_time)
    if request.HasField("end_time"):
        end = timestamp(violations, "end_time", request.end_time)
    if start is not None and end is not None and end <= start:
        violations.add("end_time", "must be after start_time")
    return AuditQuery(
        app_id=request.app_id,
        dataset_id=request.dataset_id or None,
        user_id=request.user_id or None,
        key_id=request.key_id or None,
        rpc=request.rpc or None,
        outcome=request.outcome or None,
        start=start,
        end=end,
    )
