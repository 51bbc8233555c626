"""Use cases of AccessService: users, collaborators, API keys and the audit log.

Who may do what is `service.domain.access`; the rules only these use cases know (the
owner role, the last owner, Admins staying Admins, keys never exceeding their creator)
are here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from service.domain.access import (
    Action,
    Resource,
    allows,
    dataset_allows,
    denial,
    is_app_admin,
    require,
    require_app,
)
from service.domain.auth import new_key
from service.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Violations,
)
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
from service.domain.validation import check_id, check_text, require_ids

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
    # Personal keys: the user the key acts as when an app owner or admin makes the key
    # for someone else (how a new user gets a first key); None: the caller.
    user_id: str | None = None


@dataclass(frozen=True)
class NewKey:
    key: ApiKey
    # Shown once.
    secret: str


USER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.@+-]{1,254}$")
USER_ID_RULE = "must be 1..254 characters of [A-Za-z0-9_.@+-]"
DISPLAY_NAME_MAX_CHARS = 200
DESCRIPTION_MAX_CHARS = 200
KEY_SCOPES = (("read",), ("read", "write"))


def check_user_id(violations: Violations, field: str, value: str) -> None:
    if not USER_ID_PATTERN.match(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        violations.add(field, f"is required and {USER_ID_RULE}, got {shown!r}")


def _missing(field: str, resource: str, app_id: str, resource_id: str) -> NotFound:
    found = NotFound.in_app(resource, app_id, resource_id)
    return NotFound(
        f"{field}: {found.message}",
        reason=found.reason,
        metadata={**found.metadata, "field": field},
    )


def _require_personal(principal: Principal) -> None:
    if principal.kind is not KeyKind.PERSONAL:
        raise denial(principal, Action.MANAGE, Resource.USERS)


def _require_owner_for(principal: Principal, what: str) -> None:
    if principal.app_role is not AppRole.OWNER:
        raise PermissionDenied(
            f"only an app owner may {what}", reason="OWNER_REQUIRED", metadata={"role": "owner"}
        )


def _last_owner(app_id: str, user_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"user {user_id!r} is the last owner of app {app_id!r}; make another user owner first",
        reason="LAST_OWNER",
        metadata={"user_id": user_id},
    )


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

    def _committed(self) -> None:
        # An outer transaction (a request id's) may still roll the change back.
        self.tx.after_commit(self.changed)

    # Users

    async def create_user(self, principal: Principal, app_id: str, user: User) -> User:
        require(principal, app_id, Action.MANAGE, Resource.USERS)
        violations = Violations()
        check_user_id(violations, "user.id", user.id)
        check_text(violations, "user.display_name", user.display_name, DISPLAY_NAME_MAX_CHARS)
        violations.raise_if_any()
        if user.role is AppRole.OWNER:
            _require_owner_for(principal, "make owners")
        async with self.tx.transaction():
            created = await self.users.insert(
                User(app_id=app_id, id=user.id, display_name=user.display_name, role=user.role)
            )
            self._committed()
        return created

    async def list_users(
        self, principal: Principal, app_id: str, after: str | None, limit: int
    ) -> list[User]:
        """`limit + 1` rows at most (the extra one tells that a page follows)."""
        require(principal, app_id, Action.READ, Resource.USERS)
        return await self.users.list_page(app_id, after, limit + 1)

    async def update_user(
        self, principal: Principal, app_id: str, user_id: str, change: UserChange
    ) -> User:
        require(principal, app_id, Action.MANAGE, Resource.USERS)
        violations = Violations()
        check_user_id(violations, "user.id", user_id)
        if change.display_name is None and change.role is None:
            violations.add("user", "nothing to update: set display_name or role")
        if change.display_name is not None:
            check_text(violations, "user.display_name", change.display_name, DISPLAY_NAME_MAX_CHARS)
        violations.raise_if_any()
        async with self.tx.transaction():
            # Owners are locked before the user, in one order, so that two demotions
            # cannot both see another owner left (nor deadlock).
            owners = (
                await self.users.owner_ids(app_id, for_update=True)
                if change.role is not None
                else []
            )
            current = await self.users.get(app_id, user_id, for_update=True)
            if current is None:
                raise _missing("user.id", "user", app_id, user_id)
            role = change.role if change.role is not None else current.role
            if role is not current.role and AppRole.OWNER in (role, current.role):
                _require_owner_for(principal, "grant or take away the owner role")
                if current.role is AppRole.OWNER and [o for o in owners if o != user_id] == []:
                    raise _last_owner(app_id, user_id)
            display_name = (
                change.display_name if change.display_name is not None else current.display_name
            )
            if role is current.role and display_name == current.display_name:
                return current
            updated = await self.users.update(
                replace(current, display_name=display_name, role=role)
            )
            self._committed()
        return updated

    async def delete_user(self, principal: Principal, app_id: str, user_id: str) -> int:
        """Deletes the user; how many keys were revoked with them."""
        require(principal, app_id, Action.MANAGE, Resource.USERS)
        violations = Violations()
        check_user_id(violations, "user_id", user_id)
        violations.raise_if_any()
        async with self.tx.transaction():
            owners = await self.users.owner_ids(app_id, for_update=True)
            current = await self.users.get(app_id, user_id, for_update=True)
            if current is None:
                raise _missing("user_id", "user", app_id, user_id)
            if current.role is AppRole.OWNER:
                _require_owner_for(principal, "remove an owner")
                if [o for o in owners if o != user_id] == []:
                    raise _last_owner(app_id, user_id)
            revoked = await self.keys.revoke_for_user(app_id, user_id)
            await self.users.delete(app_id, user_id)
            self._committed()
        return revoked

    # Collaborators

    async def _require_dataset(self, app_id: str, dataset_id: str, field: str) -> None:
        dataset = await self.datasets.get(app_id, dataset_id)
        if dataset is None or dataset.deleted_at is not None:
            raise _missing(field, "dataset", app_id, dataset_id)

    async def _require_user(self, app_id: str, user_id: str, field: str) -> None:
        if await self.users.get(app_id, user_id) is None:
            raise _missing(field, "user", app_id, user_id)

    async def add_collaborator(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str,
        user_id: str,
        role: DatasetRole = DatasetRole.VIEWER,
    ) -> Collaborator:
        require_app(principal, app_id)
        violations = Violations()
        check_id(violations, "dataset_id", dataset_id)
        check_user_id(violations, "collaborator.user_id", user_id)
        violations.raise_if_any()
        require(principal, app_id, Action.MANAGE, Resource.DATASETS, [dataset_id])
        async with self.tx.transaction():
            await self._require_dataset(app_id, dataset_id, "dataset_id")
            await self._require_user(app_id, user_id, "collaborator.user_id")
            added = await self.collaborators.insert(
                Collaborator(
                    app_id=app_id,
                    dataset_id=dataset_id,
                    user_id=user_id,
                    role=role,
                    added_by=principal.user_id,
                )
            )
            self._committed()
        return added

    async def list_collaborators(
        self, principal: Principal, app_id: str, dataset_id: str, after: str | None, limit: int
    ) -> list[Collaborator]:
        """`limit + 1` rows at most."""
        require_app(principal, app_id)
        require_ids(("dataset_id", dataset_id))
        require(principal, app_id, Action.READ, Resource.DATASETS, [dataset_id])
        async with self.tx.read_transaction():
            await self._require_dataset(app_id, dataset_id, "dataset_id")
            return await self.collaborators.list_page(app_id, dataset_id, after, limit + 1)

    async def update_collaborator(
        self, principal: Principal, app_id: str, dataset_id: str, user_id: str, role: DatasetRole
    ) -> Collaborator:
        require_app(principal, app_id)
        violations = Violations()
        check_id(violations, "dataset_id", dataset_id)
        check_user_id(violations, "user_id", user_id)
        violations.raise_if_any()
        require(principal, app_id, Action.MANAGE, Resource.DATASETS, [dataset_id])
        async with self.tx.transaction():
            await self._require_dataset(app_id, dataset_id, "dataset_id")
            current = await self.collaborators.get(app_id, dataset_id, user_id, for_update=True)
            if current is None:
                raise _no_collaborator(dataset_id, user_id)
            if current.role is role:
                return current
            if current.role is DatasetRole.ADMIN:
                raise FailedPrecondition(
                    f"user {user_id!r} is an Admin of dataset {dataset_id!r} and an Admin "
                    "cannot be demoted to Viewer: remove the collaborator and add them again "
                    "as a Viewer",
                    reason="ADMIN_CANNOT_BE_DEMOTED",
                    metadata={"dataset_id": dataset_id, "user_id": user_id},
                )
            updated = await self.collaborators.set_role(replace(current, role=role))
            self._committed()
        return updated

    async def remove_collaborator(
        self, principal: Principal, app_id: str, dataset_id: str, user_id: str
    ) -> None:
        require_app(principal, app_id)
        violations = Violations()
        check_id(violations, "dataset_id", dataset_id)
        check_user_id(violations, "user_id", user_id)
        violations.raise_if_any()
        require(principal, app_id, Action.MANAGE, Resource.DATASETS, [dataset_id])
        async with self.tx.transaction():
            await self._require_dataset(app_id, dataset_id, "dataset_id")
            if not await self.collaborators.delete(app_id, dataset_id, user_id):
                raise _no_collaborator(dataset_id, user_id)
            self._committed()

    # API keys

    async def create_key(self, principal: Principal, app_id: str, request: KeyRequest) -> NewKey:
        require_app(principal, app_id)
        # Scoped keys manage nothing, and a personal key needs a user to act as.
        _require_personal(principal)
        self._check_key_request(request)
        personal = request.kind is KeyKind.PERSONAL
        if not personal:
            self._check_key_rights(principal, request)
        holder = request.user_id or principal.user_id
        async with self.tx.transaction():
            if holder != principal.user_id:
                await self._check_key_holder(principal, app_id, holder)
            for index, dataset_id in enumerate(request.dataset_ids):
                await self._require_dataset(app_id, dataset_id, f"api_key.dataset_ids[{index}]")
            secret, draft = new_key(app_id, request.description)
            key = replace(
                draft,
                kind=request.kind,
                scopes=("read", "write") if personal else request.scopes,
                user_id=holder if personal else None,
                dataset_ids=() if personal else request.dataset_ids,
                expires_at=request.expires_at,
                created_by=principal.user_id,
            )
            await self.keys.insert(key)
            stored = await self.keys.get(app_id, key.id)
            self._committed()
        return NewKey(stored or key, secret)

    async def _check_key_holder(self, principal: Principal, app_id: str, user_id: str) -> None:
        """A key for another user acts as them: only app owners and admins make one, and
        only owners make one for an owner (a key never exceeds its creator)."""
        if not is_app_admin(principal):
            raise PermissionDenied(
                "api_key.user_id: only app owners and admins make keys for other users",
                reason="APP_ACCESS_DENIED",
                metadata={"field": "api_key.user_id", "action": Action.MANAGE.value},
            )
        user = await self.users.get(app_id, user_id)
        if user is None:
            raise _missing("api_key.user_id", "user", app_id, user_id)
        if user.role is AppRole.OWNER:
            _require_owner_for(principal, "make keys for an owner")

    def _check_key_request(self, request: KeyRequest) -> None:
        violations = Violations()
        check_text(violations, "api_key.description", request.description, DESCRIPTION_MAX_CHARS)
        if request.expires_at is not None and request.expires_at <= self.clock.now():
            violations.add("api_key.expires_at", "must be in the future")
        if request.kind is KeyKind.PERSONAL:
            if request.scopes:
                violations.add("api_key.access", "must be unset for personal keys")
            if request.dataset_ids:
                violations.add("api_key.dataset_ids", "must be empty for personal keys")
            if request.user_id is not None:
                check_user_id(violations, "api_key.user_id", request.user_id)
        else:
            if request.user_id is not None:
                violations.add("api_key.user_id", "must be unset for scoped keys")
            if request.scopes not in KEY_SCOPES:
                violations.add("api_key.access", "must be READ or READ_WRITE for scoped keys")
            if len(request.dataset_ids) > MAX_KEY_DATASETS:
                violations.add(
                    "api_key.dataset_ids",
                    f"must name at most {MAX_KEY_DATASETS} datasets, "
                    f"got {len(request.dataset_ids)}",
                )
            seen: set[str] = set()
            for index, dataset_id in enumerate(request.dataset_ids):
                field = f"api_key.dataset_ids[{index}]"
                check_id(violations, field, dataset_id)
                if dataset_id in seen:
                    violations.add(field, f"names {dataset_id!r} twice")
                seen.add(dataset_id)
        violations.raise_if_any()

    @staticmethod
    def _check_key_rights(principal: Principal, request: KeyRequest) -> None:
        """A scoped key never grants more than its creator holds, and binding a key to a
        dataset is managing it."""
        actions = [Action(scope) for scope in request.scopes]
        if not request.dataset_ids:
            if not is_app_admin(principal) or not all(
                allows(principal, a, Resource.APP) for a in actions
            ):
                raise PermissionDenied(
                    "only app owners and admins may make keys for the whole app; "
                    "name the datasets the key is for in api_key.dataset_ids",
                    reason="APP_ACCESS_DENIED",
                    metadata={"field": "api_key.dataset_ids", "action": Action.MANAGE.value},
                )
            return
        for index, dataset_id in enumerate(request.dataset_ids):
            field = f"api_key.dataset_ids[{index}]"
            if not dataset_allows(principal, Action.MANAGE, dataset_id):
                raise PermissionDenied(
                    f"{field}: making a key for dataset {dataset_id!r} needs the Admin role "
                    "on it (or app owner or admin)",
                    reason="DATASET_ACCESS_DENIED",
                    metadata={"dataset_id": dataset_id, "field": field, "action": "manage"},
                )
            for action in actions:
                if not dataset_allows(principal, action, dataset_id):
                    raise PermissionDenied(
                        f"api_key.access: the caller may not {action.value} dataset "
                        f"{dataset_id!r}, so no key of theirs may",
                        reason="DATASET_ACCESS_DENIED",
                        metadata={"dataset_id": dataset_id, "field": "api_key.access"},
                    )

    async def list_keys(
        self,
        principal: Principal,
        app_id: str,
        dataset_id: str | None,
        include_revoked: bool,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[ApiKey]:
        """`limit + 1` rows at most."""
        require_app(principal, app_id)
        _require_personal(principal)
        owned_by: str | None = None
        if dataset_id:
            require_ids(("dataset_id", dataset_id))
            require(principal, app_id, Action.MANAGE, Resource.DATASETS, [dataset_id])
        elif not is_app_admin(principal):
            owned_by = principal.user_id
        return await self.keys.list_page(
            app_id,
            dataset_id=dataset_id or None,
            owned_by=owned_by,
            include_revoked=include_revoked,
            after=after,
            limit=limit + 1,
        )

    async def revoke_key(self, principal: Principal, app_id: str, key_id: str) -> ApiKey:
        require_app(principal, app_id)
        require_ids(("key_id", key_id))
        _require_personal(principal)
        async with self.tx.transaction():
            key = await self.keys.get(app_id, key_id)
            if key is None:
                raise _missing("key_id", "key", app_id, key_id)
            if not _may_revoke(principal, key):
                raise PermissionDenied(
                    f"the caller may not revoke key {key_id!r}: it is neither theirs nor made "
                    "by them, and they are not an Admin of every dataset it is bound to "
                    "(nor app owner or admin)",
                    reason="KEY_ACCESS_DENIED",
                    metadata={"key_id": key_id},
                )
            if key.revoked_at is not None:
                return key
            revoked = await self.keys.revoke_key(app_id, key_id)
            if revoked is None:
                raise _missing("key_id", "key", app_id, key_id)
            self._committed()
        return revoked

    # Audit log

    async def list_audit_events(
        self, principal: Principal, query: AuditQuery
    ) -> Sequence[AuditEvent]:
        require_app(principal, query.app_id)
        _require_personal(principal)
        if query.dataset_id:
            require_ids(("dataset_id", query.dataset_id))
            require(principal, query.app_id, Action.MANAGE, Resource.DATASETS, [query.dataset_id])
        elif not is_app_admin(principal):
            raise PermissionDenied(
                "reading the whole app's audit log needs app owner or admin; set dataset_id "
                "to a dataset you are an Admin of",
                reason="APP_ACCESS_DENIED",
                metadata={"resource": "audit", "action": Action.MANAGE.value},
            )
        if query.start is not None and query.end is not None and query.end <= query.start:
            raise InvalidArgument.field("end_time", "must be after start_time")
        return await self.audit.list_page(query)


def _no_collaborator(dataset_id: str, user_id: str) -> NotFound:
    return NotFound(
        f"user_id: user {user_id!r} is not a collaborator of dataset {dataset_id!r}",
        reason="COLLABORATOR_NOT_FOUND",
        metadata={"dataset_id": dataset_id, "user_id": user_id, "field": "user_id"},
    )


def _may_revoke(principal: Principal, key: ApiKey) -> bool:
    if is_app_admin(principal):
        return True
    if principal.user_id and principal.user_id in (key.user_id, key.created_by):
        return True
    return bool(key.dataset_ids) and all(
        dataset_allows(principal, Action.MANAGE, d) for d in key.dataset_ids
    )
