"""Who may do what: the access rules every RPC is checked against.

A call acts on a resource of one of these kinds:
- DATASETS: the datasets a request names (each one is checked);
- APP: the app's own data (its inputs, a search over the app, jobs over it);
- CATALOG: what every user of the app shares (ontologies, projects, embedding models,
  the list of datasets, which is filtered to what the caller may read);
- NEW_DATASET: creating a dataset;
- USERS: the app's users (reads need a personal key, changes an app owner or admin).

and needs one of three actions: READ, WRITE (add, change and delete data, settings,
versions, exports) or MANAGE (collaborators, keys, audit log).

A personal key acts as its user. App owners and admins may do everything in their
app; members read the catalog, create datasets, and on a dataset have what their role
gives (Viewer: READ; Admin: READ, WRITE, MANAGE). A scoped key has READ, or READ and
WRITE, on the datasets it is bound to (plus catalog reads) or on the whole app; it
never MANAGEs.
"""

from __future__ import annotations

import enum
from collections.abc import Collection

from service.domain.errors import PermissionDenied
from service.domain.models import AppRole, DatasetRole, KeyKind, Principal
from service.domain.validation import require_ids


class Action(enum.Enum):
    READ = "read"
    WRITE = "write"
    MANAGE = "manage"


class Resource(enum.Enum):
    DATASETS = "datasets"
    APP = "app"
    CATALOG = "catalog"
    NEW_DATASET = "new_dataset"
    USERS = "users"


_ROLE_ACTIONS = {
    DatasetRole.VIEWER: frozenset({Action.READ}),
    DatasetRole.ADMIN: frozenset({Action.READ, Action.WRITE, Action.MANAGE}),
}
APP_ADMINS = frozenset({AppRole.OWNER, AppRole.ADMIN})


def is_app_admin(principal: Principal) -> bool:
    return principal.kind is KeyKind.PERSONAL and principal.app_role in APP_ADMINS


def _key_allows(principal: Principal, action: Action) -> bool:
    """What a scoped key's own rights allow, whatever the resource."""
    if action is Action.MANAGE:
        return False
    return action.value in principal.scopes


def dataset_allows(principal: Principal, action: Action, dataset_id: str) -> bool:
    if principal.kind is KeyKind.PERSONAL:
        if principal.app_role in APP_ADMINS:
            return True
        role = principal.dataset_roles.get(dataset_id)
        return role is not None and action in _ROLE_ACTIONS[role]
    if principal.datasets is not None and dataset_id not in principal.datasets:
        return False
    return _key_allows(principal, action)


def allows(
    principal: Principal, action: Action, resource: Resource, datasets: Collection[str] = ()
) -> bool:
    """Whether the principal may do `action` on the resource (every dataset in `datasets`
    for DATASETS). The app itself is checked by `require`."""
    personal = principal.kind is KeyKind.PERSONAL
    if personal and principal.app_role in APP_ADMINS:
        return True
    if resource is Resource.DATASETS:
        return all(dataset_allows(principal, action, d) for d in datasets)
    if resource is Resource.USERS:
        return personal and action is Action.READ
    if resource is Resource.CATALOG and action is Action.READ:
        return personal or action.value in principal.scopes
    if resource is Resource.NEW_DATASET:
        # Creating is a write; reading or managing a dataset not yet made means nothing.
        if action is not Action.WRITE:
            return False
        if personal:
            return True
        return principal.datasets is None and _key_allows(principal, Action.WRITE)
    # APP, and catalog changes: app owners and admins (above), or a whole-app key.
    if personal:
        return False
    return principal.datasets is None and _key_allows(principal, action)


def require_app(principal: Principal, app_id: str) -> None:
    require_ids(("app_id", app_id))
    if principal.app_id != app_id:
        raise PermissionDenied(
            f"this API key belongs to app {principal.app_id!r}, not to app {app_id!r}",
            reason="WRONG_APP",
            metadata={"app_id": app_id},
        )


def require(
    principal: Principal,
    app_id: str,
    action: Action,
    resource: Resource,
    datasets: Collection[str] = (),
) -> None:
    """Raises PermissionDenied naming what the caller lacks."""
    require_app(principal, app_id)
    if allows(principal, action, resource, datasets):
        return
    raise denial(principal, action, resource, datasets)


def denial(
    principal: Principal, action: Action, resource: Resource, datasets: Collection[str] = ()
) -> PermissionDenied:
    """The error for a refused action, naming the first thing the caller lacks."""
    if principal.kind is KeyKind.SCOPED and action is Action.MANAGE:
        return PermissionDenied(
            "scoped API keys cannot manage users, collaborators, keys or the audit log; "
            "use a personal key of a dataset Admin or app admin",
            reason="PERSONAL_KEY_REQUIRED",
        )
    if principal.kind is KeyKind.SCOPED and action.value not in principal.scopes:
        return PermissionDenied(
            f"this API key lacks the {action.value!r} scope",
            reason="MISSING_SCOPE",
            metadata={"scope": action.value},
        )
    if resource is Resource.DATASETS:
        for dataset_id in datasets:
            if not dataset_allows(principal, action, dataset_id):
                return PermissionDenied(
                    f"the caller may not {action.value} dataset {dataset_id!r}"
                    + _how(principal, action),
                    reason="DATASET_ACCESS_DENIED",
                    metadata={"dataset_id": dataset_id, "action": action.value},
                )
    what = {
        Resource.APP: "the app's data (inputs and searches across the app)",
        Resource.CATALOG: "the app's ontologies and projects",
        Resource.NEW_DATASET: "new datasets",
        Resource.USERS: "the app's users",
        Resource.DATASETS: "these datasets",
    }[resource]
    return PermissionDenied(
        f"the caller may not {action.value} {what}" + _how(principal, action),
        reason="APP_ACCESS_DENIED",
        metadata={"resource": resource.value, "action": action.value},
    )


def _how(principal: Principal, action: Action) -> str:
    if principal.kind is KeyKind.PERSONAL:
        needed = "Viewer" if action is Action.READ else "Admin"
        return f" (needs the {needed} role on the dataset, or app owner or admin)"
    return " (this key is bound to " + (
        "the datasets " + ", ".join(sorted(principal.datasets)) + ")"
        if principal.datasets is not None
        else "the whole app)"
    )


def readable_datasets(principal: Principal) -> frozenset[str] | None:
    """The datasets a listing may show; None means all of the app's."""
    if principal.kind is KeyKind.PERSONAL:
        if principal.app_role in APP_ADMINS:
            return None
        return frozenset(principal.dataset_roles)
    return principal.datasets
