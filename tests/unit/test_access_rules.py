"""service.domain.access over every kind of principal, action and resource."""

from __future__ import annotations

import itertools

import pytest

from service.domain.access import (
    Action,
    Resource,
    allows,
    denial,
    is_app_admin,
    readable_datasets,
    require,
)
from service.domain.errors import InvalidArgument, PermissionDenied
from service.domain.models import AppRole, DatasetRole, KeyKind, Principal

R, W, M = Action.READ, Action.WRITE, Action.MANAGE
D1, D2 = "d1", "d2"


def personal(role: AppRole, **roles: DatasetRole) -> Principal:
    return Principal(
        "k",
        "app",
        frozenset({"read", "write"}),
        user_id="u",
        kind=KeyKind.PERSONAL,
        app_role=role,
        dataset_roles=dict(roles),
    )


def scoped(scopes: tuple[str, ...], *datasets: str) -> Principal:
    return Principal(
        "k",
        "app",
        frozenset(scopes),
        user_id="creator",
        kind=KeyKind.SCOPED,
        datasets=frozenset(datasets) if datasets else None,
    )


# What each principal may do, written from the rules of issue 12 (not from the code):
# (action, resource, datasets named) triples; everything else is refused.
TARGETS: list[tuple[Resource, tuple[str, ...]]] = [
    (Resource.DATASETS, (D1,)),
    (Resource.DATASETS, (D2,)),
    (Resource.DATASETS, (D1, D2)),
    (Resource.APP, ()),
    (Resource.CATALOG, ()),
    (Resource.NEW_DATASET, ()),
    (Resource.USERS, ()),
]
Allowed = set[tuple[Action, Resource, tuple[str, ...]]]
EVERYTHING: Allowed = {(a, r, d) for a in Action for r, d in TARGETS}
CATALOG_READ: Allowed = {(R, Resource.CATALOG, ())}
MEMBER: Allowed = {
    (R, Resource.CATALOG, ()),
    (W, Resource.NEW_DATASET, ()),
    (R, Resource.USERS, ()),
}


def on(
    actions: tuple[Action, ...], *targets: tuple[Resource, tuple[str, ...]]
) -> set[tuple[Action, Resource, tuple[str, ...]]]:
    return {(a, r, d) for a in actions for r, d in targets}


ALL_DATASETS = [t for t in TARGETS if t[0] is Resource.DATASETS]
APP_WIDE = [*ALL_DATASETS, (Resource.APP, ()), (Resource.CATALOG, ())]

EXPECTED: dict[str, tuple[Principal, set[tuple[Action, Resource, tuple[str, ...]]]]] = {
    "app owner": (personal(AppRole.OWNER), EVERYTHING),
    "app admin": (personal(AppRole.ADMIN), EVERYTHING),
    "member without roles": (personal(AppRole.MEMBER), MEMBER),
    "member, Viewer of d1": (
        personal(AppRole.MEMBER, d1=DatasetRole.VIEWER),
        MEMBER | on((R,), (Resource.DATASETS, (D1,))),
    ),
    "member, Admin of d1": (
        personal(AppRole.MEMBER, d1=DatasetRole.ADMIN),
        MEMBER | on((R, W, M), (Resource.DATASETS, (D1,))),
    ),
    "member, Admin of d1 and Viewer of d2": (
        personal(AppRole.MEMBER, d1=DatasetRole.ADMIN, d2=DatasetRole.VIEWER),
        MEMBER
        | on((R, W, M), (Resource.DATASETS, (D1,)))
        | on((R,), (Resource.DATASETS, (D2,)), (Resource.DATASETS, (D1, D2))),
    ),
    "read key of the app": (scoped(("read",)), on((R,), *APP_WIDE)),
    "write key of the app": (
        scoped(("read", "write")),
        on((R, W), *APP_WIDE) | {(W, Resource.NEW_DATASET, ())},
    ),
    "read key of d1": (scoped(("read",), D1), CATALOG_READ | on((R,), (Resource.DATASETS, (D1,)))),
    "write key of d1": (
        scoped(("read", "write"), D1),
        CATALOG_READ | on((R, W), (Resource.DATASETS, (D1,))),
    ),
    "write key of d1 and d2": (
        scoped(("read", "write"), D1, D2),
        CATALOG_READ | on((R, W), *ALL_DATASETS),
    ),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_matrix(name: str) -> None:
    principal, expected = EXPECTED[name]
    wrong = []
    for action, (resource, datasets) in itertools.product(Action, TARGETS):
        allowed = allows(principal, action, resource, datasets)
        if allowed != ((action, resource, datasets) in expected):
            wrong.append((action.value, resource.value, datasets, allowed))
        if allowed:
            require(principal, "app", action, resource, datasets)
        else:
            with pytest.raises(PermissionDenied):
                require(principal, "app", action, resource, datasets)
    assert wrong == []


@pytest.mark.parametrize("name", list(EXPECTED))
def test_another_app_is_refused_whatever_the_rights(name: str) -> None:
    principal, _ = EXPECTED[name]
    for action, (resource, datasets) in itertools.product(Action, TARGETS):
        with pytest.raises(PermissionDenied) as raised:
            require(principal, "other", action, resource, datasets)
        assert raised.value.reason == "WRONG_APP"
    with pytest.raises(InvalidArgument):
        require(principal, "bad app", Action.READ, Resource.CATALOG)


def test_scoped_keys_never_manage() -> None:
    for principal in (scoped(("read", "write")), scoped(("read", "write"), D1)):
        for resource, datasets in TARGETS:
            assert not allows(principal, M, resource, datasets)
        error = denial(principal, M, Resource.DATASETS, [D1])
        assert error.reason == "PERSONAL_KEY_REQUIRED"


def test_denials_name_what_is_missing() -> None:
    read_key = scoped(("read",), D1)
    missing = denial(read_key, W, Resource.DATASETS, [D1])
    assert (missing.reason, missing.metadata["scope"]) == ("MISSING_SCOPE", "write")
    elsewhere = denial(read_key, R, Resource.DATASETS, [D1, D2])
    assert elsewhere.reason == "DATASET_ACCESS_DENIED"
    assert elsewhere.metadata["dataset_id"] == D2
    assert "bound to the datasets d1" in elsewhere.message
    viewer = personal(AppRole.MEMBER, d1=DatasetRole.VIEWER)
    error = denial(viewer, W, Resource.DATASETS, [D1])
    assert error.reason == "DATASET_ACCESS_DENIED" and "Admin role" in error.message
    app = denial(personal(AppRole.MEMBER), R, Resource.APP)
    assert (app.reason, app.metadata["resource"]) == ("APP_ACCESS_DENIED", "app")


def test_readable_datasets_and_app_admins() -> None:
    assert readable_datasets(personal(AppRole.OWNER)) is None
    assert readable_datasets(personal(AppRole.ADMIN)) is None
    assert readable_datasets(personal(AppRole.MEMBER)) == frozenset()
    roles = personal(AppRole.MEMBER, d1=DatasetRole.VIEWER, d2=DatasetRole.ADMIN)
    assert readable_datasets(roles) == frozenset({D1, D2})
    assert readable_datasets(scoped(("read",))) is None
    assert readable_datasets(scoped(("read",), D2)) == frozenset({D2})
    assert [is_app_admin(p) for p, _ in EXPECTED.values()] == [
        True,
        True,
        *[False] * (len(EXPECTED) - 2),
    ]
