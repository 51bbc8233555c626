"""AccessService over a real channel: users, collaborators and their roles, API keys
(personal keys acting as their user, secrets shown once, revocation, no key above its
creator), the audit log's access, and the bad input of each field the issue names."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from datasetd.v1 import (
    access_pb2,
    access_service_pb2,
    access_service_pb2_grpc,
    dataset_pb2,
    dataset_service_pb2,
)
from google.protobuf import field_mask_pb2, timestamp_pb2

from service.app import Running
from service.domain.auth import ensure_bootstrap_key, new_key
from service.domain.models import KeyKind
from service.storage.access import PgUserRepository
from service.storage.api_keys import PgApiKeyRepository
from service.storage.db import Database
from tests.conftest import Caller, new_caller
from tests.e2e.test_grpcurl import grpcurl, target
from tests.helpers import call_error

if TYPE_CHECKING:
    from datasetd.v1.access_service_pb2_grpc import AccessServiceAsyncStub as Access
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets

VIEWER = access_pb2.DATASET_ROLE_VIEWER
ADMIN = access_pb2.DATASET_ROLE_ADMIN
PERSONAL = access_pb2.KEY_KIND_PERSONAL
SCOPED = access_pb2.KEY_KIND_SCOPED
READ = access_pb2.KEY_ACCESS_READ
READ_WRITE = access_pb2.KEY_ACCESS_READ_WRITE


@pytest.fixture(scope="module")
def access(channel: grpc.aio.Channel) -> Access:
    return access_service_pb2_grpc.AccessServiceStub(channel)


@dataclasses.dataclass(frozen=True)
class App:
    """An app with its owner's personal key and one dataset, `ds`."""

    owner: Caller
    access: Access
    datasets: Datasets
    db: Database

    @property
    def app_id(self) -> str:
        return self.owner.app_id

    async def user(
        self, user_id: str, role: access_pb2.AppRole.ValueType = access_pb2.APP_ROLE_UNSPECIFIED
    ) -> Caller:
        """A new user of the app, and a personal key of theirs made through the
        repositories (a personal key is made by its own user over the API)."""
        await self.access.CreateUser(
            access_service_pb2.CreateUserRequest(
                app_id=self.app_id, user=access_pb2.User(id=user_id, role=role)
            ),
            metadata=self.owner.metadata,
        )
        secret, key = new_key(self.app_id, f"personal key of {user_id}")
        await PgApiKeyRepository(self.db).insert(
            dataclasses.replace(key, kind=KeyKind.PERSONAL, user_id=user_id)
        )
        return Caller(self.app_id, secret)

    async def collaborate(
        self, user_id: str, role: access_pb2.DatasetRole.ValueType, dataset_id: str = "ds"
    ) -> None:
        await self.access.AddCollaborator(
            access_service_pb2.AddCollaboratorRequest(
                app_id=self.app_id,
                dataset_id=dataset_id,
                collaborator=access_pb2.Collaborator(user_id=user_id, role=role),
            ),
            metadata=self.owner.metadata,
        )

    async def new_dataset(self, dataset_id: str) -> None:
        await self.datasets.CreateDataset(
            dataset_service_pb2.CreateDatasetRequest(
                app_id=self.app_id, dataset=dataset_pb2.Dataset(id=dataset_id)
            ),
            metadata=self.owner.metadata,
        )

    async def create_key(
        self, caller: Caller, **fields: Any
    ) -> access_service_pb2.CreateApiKeyResponse:
        response: access_service_pb2.CreateApiKeyResponse = await self.access.CreateApiKey(
            access_service_pb2.CreateApiKeyRequest(
                app_id=self.app_id, api_key=access_pb2.ApiKey(**fields)
            ),
            metadata=caller.metadata,
        )
        return response


async def owner_key(db: Database) -> Caller:
    """A new app and its owner's personal key, as the bootstrap path makes them."""
    app_id = "app-" + secrets.token_hex(6)
    async with db.transaction():
        secret = await ensure_bootstrap_key(
            PgApiKeyRepository(db), PgUserRepository(db), app_id, None
        )
    assert secret is not None
    return Caller(app_id, secret)


@pytest.fixture
async def app(db: Database, access: Access, datasets: Datasets) -> App:
    made = App(await owner_key(db), access, datasets, db)
    await made.new_dataset("ds")
    return made


def _future(days: int = 1) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(days=days))
    return stamp


# --- users -------------------------------------------------------------------------------


async def test_users_are_created_listed_updated_and_deleted(app: App) -> None:
    md = app.owner.metadata
    created = await app.access.CreateUser(
        access_service_pb2.CreateUserRequest(
            app_id=app.app_id, user=access_pb2.User(id="alice@example.com", display_name="Alice")
        ),
        metadata=md,
    )
    assert created.user.id == "alice@example.com"
    assert created.user.role == access_pb2.APP_ROLE_MEMBER, "MEMBER unless a role is given"
    assert created.user.HasField("created_at")
    taken = await call_error(
        app.access.CreateUser(
            access_service_pb2.CreateUserRequest(
                app_id=app.app_id, user=access_pb2.User(id="alice@example.com")
            ),
            metadata=md,
        )
    )
    assert taken.code == grpc.StatusCode.ALREADY_EXISTS
    for user_id in ("bob", "carol+1"):
        await app.access.CreateUser(
            access_service_pb2.CreateUserRequest(
                app_id=app.app_id, user=access_pb2.User(id=user_id)
            ),
            metadata=md,
        )

    # Page by page, by id.
    seen: list[str] = []
    token = ""
    while True:
        page = await app.access.ListUsers(
            access_service_pb2.ListUsersRequest(app_id=app.app_id, page_size=2, page_token=token),
            metadata=md,
        )
        assert len(page.users) <= 2
        seen += [u.id for u in page.users]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(["alice@example.com", "bob", "carol+1", "owner"])

    updated = await app.access.UpdateUser(
        access_service_pb2.UpdateUserRequest(
            app_id=app.app_id,
            user=access_pb2.User(id="bob", display_name="Bob", role=access_pb2.APP_ROLE_ADMIN),
        ),
        metadata=md,
    )
    assert (updated.user.display_name, updated.user.role) == ("Bob", access_pb2.APP_ROLE_ADMIN)
    # With a mask, only the named field changes (clearing is possible).
    cleared = await app.access.UpdateUser(
        access_service_pb2.UpdateUserRequest(
            app_id=app.app_id,
            user=access_pb2.User(id="bob"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=md,
    )
    assert (cleared.user.display_name, cleared.user.role) == ("", access_pb2.APP_ROLE_ADMIN)

    gone = await app.access.DeleteUser(
        access_service_pb2.DeleteUserRequest(app_id=app.app_id, user_id="carol+1"), metadata=md
    )
    assert gone.revoked_key_count == 0
    again = await call_error(
        app.access.DeleteUser(
            access_service_pb2.DeleteUserRequest(app_id=app.app_id, user_id="carol+1"),
            metadata=md,
        )
    )
    assert again.code == grpc.StatusCode.NOT_FOUND


async def test_the_last_owner_stays(app: App) -> None:
    md = app.owner.metadata
    removed = await call_error(
        app.access.DeleteUser(
            access_service_pb2.DeleteUserRequest(app_id=app.app_id, user_id="owner"), metadata=md
        )
    )
    assert (removed.code, removed.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LAST_OWNER")
    demoted = await call_error(
        app.access.UpdateUser(
            access_service_pb2.UpdateUserRequest(
                app_id=app.app_id,
                user=access_pb2.User(id="owner", role=access_pb2.APP_ROLE_MEMBER),
            ),
            metadata=md,
        )
    )
    assert (demoted.code, demoted.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LAST_OWNER")
    # With a second owner, the first may go.
    await app.user("second", access_pb2.APP_ROLE_OWNER)
    await app.access.UpdateUser(
        access_service_pb2.UpdateUserRequest(
            app_id=app.app_id, user=access_pb2.User(id="owner", role=access_pb2.APP_ROLE_MEMBER)
        ),
        metadata=md,
    )


async def test_a_users_keys_go_with_them(app: App) -> None:
    dana = await app.user("dana")
    made = await app.create_key(dana, kind=PERSONAL, description="dana's laptop")
    gone = await app.access.DeleteUser(
        access_service_pb2.DeleteUserRequest(app_id=app.app_id, user_id="dana"),
        metadata=app.owner.metadata,
    )
    assert gone.revoked_key_count == 2
    for secret in (dana.key, made.secret):
        refused = await call_error(
            app.datasets.GetDataset(
                dataset_service_pb2.GetDatasetRequest(app_id=app.app_id, dataset_id="ds"),
                metadata=Caller(app.app_id, secret).metadata,
            )
        )
        assert refused.code == grpc.StatusCode.UNAUTHENTICATED


async def test_a_request_id_replays_a_user_change(app: App) -> None:
    request = access_service_pb2.CreateUserRequest(
        app_id=app.app_id, user=access_pb2.User(id="erin"), request_id="create-erin"
    )
    first = await app.access.CreateUser(request, metadata=app.owner.metadata)
    second = await app.access.CreateUser(request, metadata=app.owner.metadata)
    assert first == second


# --- collaborators -----------------------------------------------------------------------


async def test_collaborators_are_invited_promoted_never_demoted_and_removed(app: App) -> None:
    md = app.owner.metadata
    await app.user("vic@example.com")
    added = await app.access.AddCollaborator(
        access_service_pb2.AddCollaboratorRequest(
            app_id=app.app_id,
            dataset_id="ds",
            collaborator=access_pb2.Collaborator(user_id="vic@example.com"),
        ),
        metadata=md,
    )
    collaborator = added.collaborator
    assert collaborator.role == VIEWER, "Viewer by default"
    assert (collaborator.dataset_id, collaborator.added_by) == ("ds", "owner")
    twice = await call_error(app.collaborate("vic@example.com", ADMIN))
    assert twice.code == grpc.StatusCode.ALREADY_EXISTS

    listed = await app.access.ListCollaborators(
        access_service_pb2.ListCollaboratorsRequest(app_id=app.app_id, dataset_id="ds"),
        metadata=md,
    )
    assert [(c.user_id, c.role) for c in listed.collaborators] == [("vic@example.com", VIEWER)]

    def update(
        role: access_pb2.DatasetRole.ValueType,
    ) -> Awaitable[access_service_pb2.UpdateCollaboratorResponse]:
        return app.access.UpdateCollaborator(
            access_service_pb2.UpdateCollaboratorRequest(
                app_id=app.app_id, dataset_id="ds", user_id="vic@example.com", role=role
            ),
            metadata=md,
        )

    assert (await update(VIEWER)).collaborator.role == VIEWER, "the same role changes nothing"
    assert (await update(ADMIN)).collaborator.role == ADMIN
    demoted = await call_error(update(VIEWER))
    assert (demoted.code, demoted.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ADMIN_CANNOT_BE_DEMOTED",
    )
    assert "remove" in demoted.message

    await app.access.RemoveCollaborator(
        access_service_pb2.RemoveCollaboratorRequest(
            app_id=app.app_id, dataset_id="ds", user_id="vic@example.com"
        ),
        metadata=md,
    )
    again = await call_error(
        app.access.RemoveCollaborator(
            access_service_pb2.RemoveCollaboratorRequest(
                app_id=app.app_id, dataset_id="ds", user_id="vic@example.com"
            ),
            metadata=md,
        )
    )
    assert again.code == grpc.StatusCode.NOT_FOUND
    # Removed, then invited again: a Viewer once more.
    await app.collaborate("vic@example.com", VIEWER)


async def test_unknown_users_and_datasets_are_not_found(app: App) -> None:
    await app.user("known")
    nobody = await call_error(app.collaborate("nobody", VIEWER))
    assert nobody.code == grpc.StatusCode.NOT_FOUND
    assert "nobody" in nobody.message
    no_dataset = await call_error(app.collaborate("known", VIEWER, dataset_id="missing"))
    assert no_dataset.code == grpc.StatusCode.NOT_FOUND
    assert "missing" in no_dataset.message


# --- keys --------------------------------------------------------------------------------


async def test_a_personal_key_acts_as_its_user(app: App) -> None:
    viewer = await app.user("viewer")
    await app.collaborate("viewer", VIEWER)
    get = dataset_service_pb2.GetDatasetRequest(app_id=app.app_id, dataset_id="ds")
    assert (await app.datasets.GetDataset(get, metadata=viewer.metadata)).dataset.id == "ds"
    # A personal key the viewer makes over the API acts as the viewer too.
    made = await app.create_key(viewer, kind=PERSONAL)
    assert (made.api_key.kind, made.api_key.user_id, made.api_key.created_by) == (
        PERSONAL,
        "viewer",
        "viewer",
    )
    own = Caller(app.app_id, made.secret)
    assert (await app.datasets.GetDataset(get, metadata=own.metadata)).dataset.id == "ds"
    for caller in (viewer, own):
        refused = await call_error(
            app.datasets.UpdateDataset(
                dataset_service_pb2.UpdateDatasetRequest(
                    app_id=app.app_id,
                    dataset=dataset_pb2.Dataset(id="ds", description="changed by a viewer"),
                ),
                metadata=caller.metadata,
            )
        )
        assert refused.code == grpc.StatusCode.PERMISSION_DENIED
    found = await app.datasets.GetDataset(get, metadata=app.owner.metadata)
    assert found.dataset.description != "changed by a viewer"


async def test_an_admin_makes_a_new_users_first_key(app: App) -> None:
    await app.access.CreateUser(
        access_service_pb2.CreateUserRequest(app_id=app.app_id, user=access_pb2.User(id="new")),
        metadata=app.owner.metadata,
    )
    await app.collaborate("new", VIEWER)
    made = await app.create_key(app.owner, kind=PERSONAL, user_id="new")
    assert (made.api_key.user_id, made.api_key.created_by) == ("new", "owner")
    first = Caller(app.app_id, made.secret)
    get = dataset_service_pb2.GetDatasetRequest(app_id=app.app_id, dataset_id="ds")
    assert (await app.datasets.GetDataset(get, metadata=first.metadata)).dataset.id == "ds"
    # A member cannot make keys for someone else.
    member = await app.user("member")
    refused = await call_error(app.create_key(member, kind=PERSONAL, user_id="new"))
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED
    bad = await call_error(
        app.create_key(
            app.owner,
            kind=access_pb2.KEY_KIND_SCOPED,
            access=access_pb2.KEY_ACCESS_READ,
            user_id="new",
        )
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "api_key.user_id" in bad.fields


async def test_the_secret_is_returned_once_and_never_listed(app: App) -> None:
    made = await app.create_key(
        app.owner,
        kind=SCOPED,
        access=READ,
        dataset_ids=["ds"],
        description="ci reader",
        expires_at=_future(),
    )
    assert made.secret
    key = made.api_key
    assert (key.kind, key.access, list(key.dataset_ids)) == (SCOPED, READ, ["ds"])
    assert (key.user_id, key.created_by, key.description) == ("", "owner", "ci reader")
    assert key.HasField("expires_at") and key.HasField("created_at")
    assert not key.HasField("revoked_at")

    reader = Caller(app.app_id, made.secret)
    get = dataset_service_pb2.GetDatasetRequest(app_id=app.app_id, dataset_id="ds")
    assert (await app.datasets.GetDataset(get, metadata=reader.metadata)).dataset.id == "ds"

    listed = await app.access.ListApiKeys(
        access_service_pb2.ListApiKeysRequest(app_id=app.app_id), metadata=app.owner.metadata
    )
    assert key.id in [k.id for k in listed.api_keys]
    assert made.secret.encode() not in listed.SerializeToString()
    # Not kept for a replay either: CreateApiKey takes no request id.
    stored = await app.db.fetchval(
        "SELECT count(*) FROM idempotency"
        " WHERE app_id = $1 AND position($2::bytea in response) > 0",
        app.app_id,
        made.secret.encode(),
    )
    assert stored == 0


async def test_keys_are_listed_newest_first_page_by_page(app: App) -> None:
    made = [
        (await app.create_key(app.owner, kind=SCOPED, access=READ, description=f"k{n}")).api_key.id
        for n in range(3)
    ]
    seen: list[str] = []
    token = ""
    while True:
        page = await app.access.ListApiKeys(
            access_service_pb2.ListApiKeysRequest(app_id=app.app_id, page_size=2, page_token=token),
            metadata=app.owner.metadata,
        )
        seen += [k.id for k in page.api_keys]
        token = page.next_page_token
        if not token:
            break
    # The owner's bootstrap key is the oldest.
    assert seen[:3] == made[::-1]
    assert len(seen) == 4


async def test_revoking_is_idempotent_and_takes_effect(app: App) -> None:
    made = await app.create_key(app.owner, kind=SCOPED, access=READ_WRITE)
    revoke = access_service_pb2.RevokeApiKeyRequest(app_id=app.app_id, key_id=made.api_key.id)
    first = await app.access.RevokeApiKey(revoke, metadata=app.owner.metadata)
    assert first.api_key.HasField("revoked_at")
    second = await app.access.RevokeApiKey(revoke, metadata=app.owner.metadata)
    assert second.api_key.revoked_at == first.api_key.revoked_at, "the first revocation's time"
    refused = await call_error(
        app.datasets.GetDataset(
            dataset_service_pb2.GetDatasetRequest(app_id=app.app_id, dataset_id="ds"),
            metadata=Caller(app.app_id, made.secret).metadata,
        )
    )
    assert refused.code == grpc.StatusCode.UNAUTHENTICATED
    active = await app.access.ListApiKeys(
        access_service_pb2.ListApiKeysRequest(app_id=app.app_id), metadata=app.owner.metadata
    )
    assert made.api_key.id not in [k.id for k in active.api_keys]
    everything = await app.access.ListApiKeys(
        access_service_pb2.ListApiKeysRequest(app_id=app.app_id, include_revoked=True),
        metadata=app.owner.metadata,
    )
    assert made.api_key.id in [k.id for k in everything.api_keys]
    unknown = await call_error(
        app.access.RevokeApiKey(
            access_service_pb2.RevokeApiKeyRequest(app_id=app.app_id, key_id="0" * 16),
            metadata=app.owner.metadata,
        )
    )
    assert unknown.code == grpc.StatusCode.NOT_FOUND


async def test_a_key_cannot_exceed_its_creator(app: App) -> None:
    await app.new_dataset("other")
    member = await app.user("member")
    await app.collaborate("member", VIEWER)
    # A Viewer reads the dataset but may not hand out keys to it, least of all writing ones.
    for access in (READ, READ_WRITE):
        refused = await call_error(
            app.create_key(member, kind=SCOPED, access=access, dataset_ids=["ds"])
        )
        assert refused.code == grpc.StatusCode.PERMISSION_DENIED, access
    await app.access.UpdateCollaborator(
        access_service_pb2.UpdateCollaboratorRequest(
            app_id=app.app_id, dataset_id="ds", user_id="member", role=ADMIN
        ),
        metadata=app.owner.metadata,
    )
    made = await app.create_key(member, kind=SCOPED, access=READ_WRITE, dataset_ids=["ds"])
    assert made.api_key.created_by == "member"
    # Not on a dataset the member has no role on, nor on the whole app.
    other = await call_error(
        app.create_key(member, kind=SCOPED, access=READ, dataset_ids=["ds", "other"])
    )
    assert other.code == grpc.StatusCode.PERMISSION_DENIED
    assert "other" in other.message
    whole_app = await call_error(app.create_key(member, kind=SCOPED, access=READ))
    assert whole_app.code == grpc.StatusCode.PERMISSION_DENIED
    # A scoped key makes no keys at all.
    scoped = Caller(app.app_id, made.secret)
    by_key = await call_error(app.create_key(scoped, kind=SCOPED, access=READ, dataset_ids=["ds"]))
    assert by_key.code == grpc.StatusCode.PERMISSION_DENIED
    # The member sees the keys they made, not the owner's.
    listed = await app.access.ListApiKeys(
        access_service_pb2.ListApiKeysRequest(app_id=app.app_id), metadata=member.metadata
    )
    assert made.api_key.id in [k.id for k in listed.api_keys]
    assert all("member" in (k.user_id, k.created_by) for k in listed.api_keys)


async def test_keys_name_datasets_of_their_own_app(app: App, db: Database) -> None:
    stranger = await owner_key(db)
    await app.datasets.CreateDataset(
        dataset_service_pb2.CreateDatasetRequest(
            app_id=stranger.app_id, dataset=dataset_pb2.Dataset(id="theirs")
        ),
        metadata=stranger.metadata,
    )
    refused = await call_error(
        app.create_key(app.owner, kind=SCOPED, access=READ, dataset_ids=["ds", "theirs"])
    )
    assert refused.code == grpc.StatusCode.NOT_FOUND
    assert "theirs" in refused.message


# --- audit log ---------------------------------------------------------------------------


async def test_the_audit_log_needs_admin_rights(app: App) -> None:
    page = await app.access.ListAuditEvents(
        access_service_pb2.ListAuditEventsRequest(app_id=app.app_id, dataset_id="ds"),
        metadata=app.owner.metadata,
    )
    assert all("ds" in e.dataset_ids for e in page.events)
    member = await app.user("auditor")
    await app.collaborate("auditor", VIEWER)
    for request in (
        access_service_pb2.ListAuditEventsRequest(app_id=app.app_id),
        access_service_pb2.ListAuditEventsRequest(app_id=app.app_id, dataset_id="ds"),
    ):
        refused = await call_error(app.access.ListAuditEvents(request, metadata=member.metadata))
        assert refused.code == grpc.StatusCode.PERMISSION_DENIED


async def test_audit_events_are_listed_newest_first_page_by_page(app: App) -> None:
    for user_id in ("a1", "a2", "a3"):
        await app.user(user_id)
    await app.collaborate("a1", VIEWER)
    filtered = access_service_pb2.ListAuditEventsRequest(
        app_id=app.app_id, rpc="CreateUser", outcome="OK", page_size=2
    )
    seen: list[access_pb2.AuditEvent] = []
    tokens: list[str] = []
    while True:
        page = await app.access.ListAuditEvents(filtered, metadata=app.owner.metadata)
        assert len(page.events) <= 2
        seen += page.events
        if not page.next_page_token:
            break
        tokens.append(page.next_page_token)
        filtered.page_token = page.next_page_token
    assert len(tokens) == 1
    assert [int(e.id) for e in seen] == sorted((int(e.id) for e in seen), reverse=True)
    assert [e.rpc for e in seen] == ["/datasetd.v1.AccessService/CreateUser"] * 3
    assert {(e.user_id, e.outcome, e.app_id) for e in seen} == {("owner", "OK", app.app_id)}
    # A token belongs to its filters.
    other = await call_error(
        app.access.ListAuditEvents(
            access_service_pb2.ListAuditEventsRequest(
                app_id=app.app_id, rpc="DeleteUser", page_token=tokens[0]
            ),
            metadata=app.owner.metadata,
        )
    )
    assert (other.code, other.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    assert "different request" in other.message
    on_dataset = await app.access.ListAuditEvents(
        access_service_pb2.ListAuditEventsRequest(app_id=app.app_id, dataset_id="ds"),
        metadata=app.owner.metadata,
    )
    rpcs = [e.rpc.rsplit("/", 1)[1] for e in on_dataset.events]
    assert "AddCollaborator" in rpcs and "CreateUser" not in rpcs
    assert all("ds" in e.dataset_ids for e in on_dataset.events)


# --- bad input ---------------------------------------------------------------------------


def _past() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    return stamp


Call = Callable[["Access", str], Awaitable[Any]]


def _create_user(**user: Any) -> Call:
    return lambda stub, app_id: stub.CreateUser(
        access_service_pb2.CreateUserRequest(app_id=app_id, user=access_pb2.User(**user))
    )


def _update_user(paths: tuple[str, ...] = (), **user: Any) -> Call:
    return lambda stub, app_id: stub.UpdateUser(
        access_service_pb2.UpdateUserRequest(
            app_id=app_id,
            user=access_pb2.User(**user),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        )
    )


def _add(**collaborator: Any) -> Call:
    return lambda stub, app_id: stub.AddCollaborator(
        access_service_pb2.AddCollaboratorRequest(
            app_id=app_id, dataset_id="ds", collaborator=access_pb2.Collaborator(**collaborator)
        )
    )


def _key(**key: Any) -> Call:
    return lambda stub, app_id: stub.CreateApiKey(
        access_service_pb2.CreateApiKeyRequest(app_id=app_id, api_key=access_pb2.ApiKey(**key))
    )


def _audit(**fields: Any) -> Call:
    return lambda stub, app_id: stub.ListAuditEvents(
        access_service_pb2.ListAuditEventsRequest(app_id=app_id, **fields)
    )


BAD_INPUT: dict[str, tuple[Call, str]] = {
    "user id with a space": (_create_user(id="a b"), "user.id"),
    "user id too long": (_create_user(id="u" * 255), "user.id"),
    "user id missing": (_create_user(display_name="x"), "user.id"),
    "display name too long": (_create_user(id="ok", display_name="x" * 201), "user.display_name"),
    "app role not declared": (_create_user(id="ok", role=9), "user.role"),
    "user time set": (
        _create_user(id="ok", created_at=timestamp_pb2.Timestamp(seconds=1)),
        "user.created_at",
    ),
    "update names an immutable field": (_update_user(("id",), id="member"), "update_mask.paths[0]"),
    "update sets a field outside its mask": (
        _update_user(("display_name",), id="member", role=access_pb2.APP_ROLE_ADMIN),
        "user.role",
    ),
    "update clears the role": (_update_user(("role",), id="member"), "user.role"),
    "update changes nothing": (_update_user((), id="member"), "update_mask"),
    "collaborator without a user": (_add(role=VIEWER), "collaborator.user_id"),
    "collaborator role outside Viewer/Admin": (_add(user_id="member", role=5), "collaborator.role"),
    "collaborator dataset set": (
        _add(user_id="member", dataset_id="ds"),
        "collaborator.dataset_id",
    ),
    "update to no role": (
        lambda stub, app_id: stub.UpdateCollaborator(
            access_service_pb2.UpdateCollaboratorRequest(
                app_id=app_id, dataset_id="ds", user_id="member"
            )
        ),
        "role",
    ),
    "remove with a bad dataset id": (
        lambda stub, app_id: stub.RemoveCollaborator(
            access_service_pb2.RemoveCollaboratorRequest(
                app_id=app_id, dataset_id="no such/id", user_id="member"
            )
        ),
        "dataset_id",
    ),
    "key without a kind": (_key(access=READ), "api_key.kind"),
    "scoped key without access": (_key(kind=SCOPED), "api_key.access"),
    "personal key with access": (_key(kind=PERSONAL, access=READ), "api_key.access"),
    "personal key with datasets": (_key(kind=PERSONAL, dataset_ids=["ds"]), "api_key.dataset_ids"),
    "key access not declared": (_key(kind=SCOPED, access=7), "api_key.access"),
    "key on too many datasets": (
        _key(kind=SCOPED, access=READ, dataset_ids=[f"d{n}" for n in range(101)]),
        "api_key.dataset_ids",
    ),
    "key on a malformed dataset id": (
        _key(kind=SCOPED, access=READ, dataset_ids=["ds", "bad id"]),
        "api_key.dataset_ids[1]",
    ),
    "key on a dataset twice": (
        _key(kind=SCOPED, access=READ, dataset_ids=["ds", "ds"]),
        "api_key.dataset_ids[1]",
    ),
    "key description too long": (
        _key(kind=SCOPED, access=READ, description="d" * 201),
        "api_key.description",
    ),
    "key expiring in the past": (
        _key(kind=SCOPED, access=READ, expires_at=_past()),
        "api_key.expires_at",
    ),
    "key expiry out of range": (
        _key(kind=SCOPED, access=READ, expires_at=timestamp_pb2.Timestamp(seconds=2**40)),
        "api_key.expires_at",
    ),
    "key id set": (_key(kind=SCOPED, access=READ, id="0123456789abcdef"), "api_key.id"),
    "key revocation set": (
        _key(kind=SCOPED, access=READ, revoked_at=timestamp_pb2.Timestamp(seconds=1)),
        "api_key.revoked_at",
    ),
    "revoke a malformed key id": (
        lambda stub, app_id: stub.RevokeApiKey(
            access_service_pb2.RevokeApiKeyRequest(app_id=app_id, key_id="nope")
        ),
        "key_id",
    ),
    "users page size negative": (
        lambda stub, app_id: stub.ListUsers(
            access_service_pb2.ListUsersRequest(app_id=app_id, page_size=-1)
        ),
        "page_size",
    ),
    "users page token forged": (
        lambda stub, app_id: stub.ListUsers(
            access_service_pb2.ListUsersRequest(app_id=app_id, page_token="forged")
        ),
        "page_token",
    ),
    "audit outcome unknown": (_audit(outcome="FINE"), "outcome"),
    "audit rpc malformed": (_audit(rpc="Delete Dataset"), "rpc"),
    "audit user malformed": (_audit(user_id="a b"), "user_id"),
    "audit times reversed": (
        _audit(start_time=_future(2), end_time=_future(1)),
        "end_time",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
async def test_bad_input_names_the_field(case: str, db: Database, access: Access) -> None:
    call, field = BAD_INPUT[case]
    owner = await owner_key(db)
    error = await call_error(_with_metadata(access, owner.metadata, call, owner.app_id))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert field in error.fields, (field, error.fields)


def _with_metadata(
    access: Access, metadata: tuple[tuple[str, str], ...], call: Call, app_id: str
) -> Awaitable[Any]:
    """The call, sent with the owner's key."""

    class Bound:
        def __getattr__(self, name: str) -> Callable[..., Any]:
            method = getattr(access, name)
            return lambda request: method(request, metadata=metadata)

    return call(Bound(), app_id)  # type: ignore[arg-type]


async def test_scoped_test_keys_still_work(db: Database, access: Access) -> None:
    """Keys made by tests and the CLI with `new_key` (whole-app scoped keys) manage
    nothing, and say why."""
    caller = await new_caller(db)
    refused = await call_error(
        access.CreateUser(
            access_service_pb2.CreateUserRequest(
                app_id=caller.app_id, user=access_pb2.User(id="x")
            ),
            metadata=caller.metadata,
        )
    )
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED


async def test_reflection_describes_the_service_with_its_comments(server: Running) -> None:
    code, out, err = await grpcurl(*target(server), "list")
    assert code == 0, err
    assert "datasetd.v1.AccessService" in out.split()
    code, out, err = await grpcurl(
        *target(server), "describe", "datasetd.v1.AccessService.CreateApiKey"
    )
    assert code == 0, err
    assert "returns its secret, this once" in out, out
