"""Use cases of AccessService: users, collaborators, API keys and the audit log.

CONTRACT SKELETON (issue 12): signatures are the contract between the servicer and
the domain; the bodies are being written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from service.domain.models import (
    ApiKey,
    AppRole,
    AuditEvent,
    Collaborator,
    DatasetRole,
    KeyKind,
    Principal,
    User,
)
from service.domain.ports import (
    ApiKeyRepository,
    AuditQuery,
    AuditRepository,
    Clock,
    CollaboratorRepository,
    DatasetRepository,
    TransactionManager,
    UserRepository,
)

MAX_KEY_DATASETS = 100


@dataclass(frozen=True)
class UserChange:
    """What UpdateUser replaces: None leaves a field as it is."""

    display_name: str | None = None
    role: AppRole | None = None


@dataclass(frozen=True)
class KeyRequest:
    """What CreateApiKey asks for (validated by the servicer's decoder for shape; the
    rules about rights are checked here)."""

    kind: KeyKind
    description: str = ""
    # Scoped keys: ("read",) or ("read", "write"); personal keys: ().
    scopes: tuple[str, ...] = ()
    dataset_ids: tuple[str, ...] = ()
    expires_at: datetime | None = None


@dataclass(frozen=True)
class NewKey:
    key: ApiKey
    # Shown once.
    secret: str


@dataclass
class AccessAdmin:
    tx: TransactionManager
    users: UserRepository
    collaborators: CollaboratorRepository
    keys: ApiKeyRepository
    audit: AuditRepository
    datasets: DatasetRepository
    clock: Clock
    # Called after every committed change of users, roles or keys, so that this
    # server's authentication cache forgets what it knew.
    changed: Callable[[], None] = lambda: None

    async def create_user(self, principal: Principal, app_id: str, user: User) -> User:
        raise NotImplementedError

    async def list_users(
        self, principal: Principal, app_id: str, after: str | None, limit: int
    ) -> list[User]:
        """`limit + 1` rows at most (the extra one tells that a page follows)."""
        raise NotImplementedError

    async def update_user(
        self, principal: Principal, app_id: str, user_id: str, change: UserChange
    ) -> User:
        raise NotImplementedError

    async def delete_user(self, principal: Principal, app_id: str, user_id: str) -> int:
        """Deletes the user; how many keys were revoked with them."""
        raise NotImplementedError

    async def add_collaborator(
        self, principal: Principal, app_id: str, dataset_id: str, user_id: str, role: DatasetRole
    ) -> Collaborator:
        raise NotImplementedError

    async def list_collaborators(
        self, principal: Principal, app_id: str, dataset_id: str, after: str | None, limit: int
    ) -> list[Collaborator]:
        raise NotImplementedError

    async def update_collaborator(
        self, principal: Principal, app_id: str, dataset_id: str, user_id: str, role: DatasetRole
    ) -> Collaborator:
        raise NotImplementedError

    async def remove_collaborator(
        self, principal: Principal, app_id: str, dataset_id: str, user_id: str
    ) -> None:
        raise NotImplementedError

    async def create_key(self, principal: Principal, app_id: str, request: KeyRequest) -> NewKey:
        raise NotImplementedError

    async def list_keys(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str | None,
        include_revoked: bool,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[ApiKey]:
        raise NotImplementedError

    async def revoke_key(self, principal: Principal, app_id: str, key_id: str) -> ApiKey:
        raise NotImplementedError

    async def list_audit_events(
        self, principal: Principal, query: AuditQuery
    ) -> Sequence[AuditEvent]:
        raise NotImplementedError
