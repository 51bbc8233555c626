"""`datasetd keys|users|collaborators|audit …`: access control, over AccessService.

Every command calls the server with the caller's key, except `keys create` for an app
that has no users yet (or with `--bootstrap`): that one writes the app's first owner and
their personal key straight into the database, so that a new installation or app can
get its first key without a server. Once the app has a user, keys are made over the API.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from service.cli.commands import _config, client_of, fields_of
from service.cli.output import Output, confirm
from service.client.access import ApiKeyInfo, KeyAccessName

if TYPE_CHECKING:
    from service.cli.main import CommandTree
    from service.config import Config
    from service.domain.models import ApiKey

# As the server's bootstrap names the app's first owner (migration 0013 too).
BOOTSTRAP_USER_NAME = "App owner"

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class BootstrapRefused(Exception):
    """The app already has users: its keys are made over the API."""


def _moment(text: str) -> datetime:
    """A time: ISO 8601 (UTC without an offset) or a duration from now such as 30d, 12h."""
    if match := _DURATION.match(text.strip()):
        amount, unit = match.groups()
        return datetime.now(UTC) + timedelta(**{_UNITS[unit]: int(amount)})
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (ISO 8601 such as 2030-01-31 or 2030-01-31T12:00:00+02:00, "
            "or a duration from now such as 90m, 12h, 30d, 4w)"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _ago(text: str) -> datetime:
    """Like `_moment`, but a duration counts back from now (`--since 1d`)."""
    if match := _DURATION.match(text.strip()):
        amount, unit = match.groups()
        return datetime.now(UTC) - timedelta(**{_UNITS[unit]: int(amount)})
    return _moment(text)


def add_commands(tree: CommandTree) -> None:
    from service.cli.main import add_confirm_option, positive_int

    keys = tree.section(
        "keys",
        "API keys: make, list and revoke them over the API (an app without users gets its "
        "first key from the database)",
    )
    sub = tree.command(
        keys,
        "create",
        keys_create,
        "make an API key for --app and print its secret once; without --key (or with "
        "--bootstrap) the first owner's key of an app that has no users yet, written to the "
        "database (DATASETD_DATABASE_URL, or the embedded one)",
    )
    sub.add_argument("--description", default="", help="what the key is for")
    kind = sub.add_mutually_exclusive_group()
    kind.add_argument(
        "--personal",
        dest="kind",
        action="store_const",
        const="personal",
        help="a key that acts as you, with your roles as they are at each call",
    )
    kind.add_argument(
        "--read",
        dest="kind",
        action="store_const",
        const="read",
        help="a scoped key that only reads",
    )
    kind.add_argument(
        "--read-write",
        dest="kind",
        action="store_const",
        const="read_write",
        help="a scoped key that reads and writes (the default)",
    )
    sub.add_argument(
        "--user",
        default=None,
        metavar="USER",
        help="with --personal: make the key for this user (app owners and admins; a new "
        "user's first key); default: yourself",
    )
    sub.add_argument(
        "--dataset",
        dest="datasets",
        action="append",
        default=[],
        metavar="DATASET",
        help="bind a scoped key to this dataset (repeat for several; default: the whole app)",
    )
    sub.add_argument(
        "--expires",
        type=_moment,
        default=None,
        help="when the key stops working: ISO 8601 or a duration such as 30d (default: never)",
    )
    sub.add_argument(
        "--bootstrap",
        action="store_true",
        help="write the owner's key of an app without users to the database (no server, no key)",
    )
    sub = tree.command(keys, "list", keys_list, "list keys of --app, newest first (no secrets)")
    sub.add_argument("--dataset", default=None, help="only keys bound to this dataset")
    sub.add_argument("--include-revoked", action="store_true", help="also revoked keys")
    sub = tree.command(keys, "revoke", keys_revoke, "revoke a key of --app by its id")
    sub.add_argument("key_id", help="the key's id, from `datasetd keys list`")
    add_confirm_option(sub)

    users = tree.section("users", "users of the app and their app roles")
    sub = tree.command(users, "create", users_create, "add a user to the app", "user")
    sub.add_argument("--display-name", default="")
    sub.add_argument("--role", choices=("owner", "admin", "member"), default="member")
    tree.command(users, "list", users_list, "list the app's users by id")
    sub = tree.command(
        users, "update", users_update, "change a user's display name or role", "user"
    )
    sub.add_argument("--display-name", default=None)
    sub.add_argument("--role", choices=("owner", "admin", "member"), default=None)
    sub = tree.command(
        users,
        "delete",
        users_delete,
        "remove a user: their collaborations end and their keys are revoked",
        "user",
    )
    add_confirm_option(sub)

    collaborators = tree.section("collaborators", "users' roles on a dataset (Viewer, Admin)")
    sub = tree.command(
        collaborators,
        "add",
        collaborators_add,
        "give a user a role on a dataset (Viewer unless --role admin)",
        "dataset",
        "user",
    )
    sub.add_argument("--role", choices=("viewer", "admin"), default="viewer")
    tree.command(
        collaborators,
        "list",
        collaborators_list,
        "list a dataset's collaborators by user id",
        "dataset",
    )
    tree.command(
        collaborators,
        "promote",
        collaborators_promote,
        "make a Viewer an Admin of the dataset (Admins cannot be demoted: remove and re-add)",
        "dataset",
        "user",
    )
    tree.command(
        collaborators,
        "remove",
        collaborators_remove,
        "end a user's role on a dataset",
        "dataset",
        "user",
    )

    audit = tree.section("audit", "the audit log: mutations and refused calls")
    sub = tree.command(audit, "list", audit_list, "list audit events, newest first")
    sub.add_argument("--dataset", default=None, help="events naming this dataset")
    sub.add_argument("--user", default=None, help="events of this user")
    sub.add_argument("--key-id", default=None, help="events of this key (its id)")
    sub.add_argument("--rpc", default=None, help="a method, e.g. DeleteDataset")
    sub.add_argument("--outcome", default=None, help="a status code, e.g. OK, PERMISSION_DENIED")
    sub.add_argument(
        "--since", type=_ago, default=None, help="at or after: ISO 8601, or a duration ago (1d)"
    )
    sub.add_argument("--until", type=_ago, default=None, help="before: as --since")
    sub.add_argument("--limit", type=positive_int, default=100, help="show at most this many (100)")


# --- keys --------------------------------------------------------------------

_KEY_COLUMNS = (
    "id",
    "kind",
    "access",
    "dataset_ids",
    "user_id",
    "description",
    "created_by",
    "created_at",
    "expires_at",
    "last_used_at",
    "revoked_at",
)


def _key_row(key: ApiKeyInfo, app_id: str) -> dict[str, Any]:
    return {"app_id": app_id} | fields_of(key)


def _show_secret(output: Output, document: dict[str, Any], secret: str) -> None:
    if output.as_json:
        output.document(document | {"key": secret})
        return
    # The secret alone on stdout, so that KEY=$(datasetd keys create ...) keeps working;
    # the id (what `keys list` shows and `keys revoke` takes) beside it on stderr.
    app, key_id = document["app_id"], document["id"]
    print(secret)
    print(
        f"key id {key_id} (app {app}): the secret above is shown only once; "
        f"revoke it with `datasetd keys revoke --app {app} {key_id}`",
        file=sys.stderr,
    )


def keys_create(args: argparse.Namespace, output: Output) -> int:
    if args.bootstrap or not args.key:
        return _keys_bootstrap(args, output)
    personal = args.kind == "personal"
    if args.user is not None and not personal:
        output.errors.print(
            "error: --user makes a personal key for that user: pass --personal with it",
            highlight=False,
            markup=False,
        )
        return 2
    access: KeyAccessName = "read" if args.kind == "read" else "read_write"
    with client_of(args) as client:
        made = client.api_keys.create(
            kind="personal" if personal else "scoped",
            access=None if personal else access,
            dataset_ids=args.datasets,
            description=args.description,
            expires_at=args.expires,
            user_id=args.user,
        )
    _show_secret(output, _key_row(made.key, args.app), made.secret)
    return 0


def _keys_bootstrap(args: argparse.Namespace, output: Output) -> int:
    from service.domain.errors import InvalidArgument, Violations
    from service.domain.validation import check_id

    if args.kind or args.datasets or args.expires:
        output.errors.print(
            "error: the database path only makes the first owner's personal key of an app "
            "without users; for --personal, --read, --read-write, --dataset or --expires pass "
            "the key of a user (--key or DATASETD_API_KEY) and a running server",
            highlight=False,
            markup=False,
        )
        return 2
    violations = Violations()
    check_id(violations, "--app", args.app)
    try:
        violations.raise_if_any()
    except InvalidArgument as error:
        output.errors.print(f"error: {error}", highlight=False, markup=False)
        return 2
    config = _config(output)
    if config is None:
        return 2
    try:
        secret, key = asyncio.run(_bootstrap(config, args.app, args.description or "bootstrap"))
    except BootstrapRefused as refused:
        output.errors.print(f"error: {refused}", highlight=False, markup=False)
        return 1
    document = {
        "id": key.id,
        "app_id": key.app_id,
        "kind": key.kind.value,
        "user_id": key.user_id,
        "description": key.description,
        "bootstrap": True,
    }
    _show_secret(output, document, secret)
    return 0


async def _bootstrap(config: Config, app_id: str, description: str) -> tuple[str, ApiKey]:
    """The app's first owner and their personal key, in one transaction; refused when the
    app has users (then an owner or admin makes keys over the API)."""
    from service.app import open_database
    from service.domain.auth import BOOTSTRAP_USER, new_key
    from service.domain.errors import AlreadyExists
    from service.domain.models import AppRole, KeyKind, User
    from service.storage.access import PgUserRepository
    from service.storage.api_keys import PgApiKeyRepository
    from service.storage.db import migrate

    refused = BootstrapRefused(
        f"app {app_id} already has users: make its keys over the API with the key of a user "
        "(--key or DATASETD_API_KEY; `datasetd keys create --personal`, `--read`, "
        "`--read-write`); the database path only gives an app without users its first owner"
    )
    async with open_database(config) as db:
        async with db.connection() as conn:
            await migrate(conn)
        users, keys = PgUserRepository(db), PgApiKeyRepository(db)
        secret, draft = new_key(app_id, description)
        key = replace(draft, kind=KeyKind.PERSONAL, user_id=BOOTSTRAP_USER)
        try:
            async with db.transaction():
                if await users.exists_any(app_id):
                    raise refused
                owner = User(app_id, BOOTSTRAP_USER, BOOTSTRAP_USER_NAME, AppRole.OWNER)
                await users.insert(owner)
                await keys.insert(key)
        except AlreadyExists:
            # Another bootstrap of the same app committed first.
            raise refused from None
    return secret, key


def keys_list(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        rows = [
            _key_row(k, args.app)
            for k in client.api_keys.list(
                dataset_id=args.dataset, include_revoked=args.include_revoked
            )
        ]
    title = f"keys of {args.app}" + (f" bound to dataset {args.dataset}" if args.dataset else "")
    output.table(rows, _KEY_COLUMNS, title)
    return 0


def keys_revoke(args: argparse.Namespace, output: Output) -> int:
    confirm(output, f"Key {args.key_id} of app {args.app} will stop working.", args.yes)
    with client_of(args) as client:
        key = client.api_keys.revoke(args.key_id)
    output.outcome(
        _key_row(key, args.app) | {"revoked": True},
        f"Key {args.key_id} of app {args.app} is revoked "
        f"(since {key.revoked_at.isoformat(timespec='seconds') if key.revoked_at else '-'}).",
    )
    return 0


# --- users -------------------------------------------------------------------

_USER_COLUMNS = ("id", "display_name", "role", "created_at", "modified_at")


def users_create(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        user = client.users.create(args.user, display_name=args.display_name, role=args.role)
    output.record(user, f"created user {user.id}")
    return 0


def users_list(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        rows = [fields_of(u) for u in client.users.list()]
    output.table(rows, _USER_COLUMNS, f"users of app {args.app}")
    return 0


def users_update(args: argparse.Namespace, output: Output) -> int:
    if args.display_name is None and args.role is None:
        raise ValueError("nothing to change: pass --display-name or --role")
    with client_of(args) as client:
        user = client.users.update(args.user, display_name=args.display_name, role=args.role)
    output.record(user, f"updated user {user.id}")
    return 0


def users_delete(args: argparse.Namespace, output: Output) -> int:
    confirm(
        output,
        f"User {args.user} will be removed from app {args.app}: their roles on datasets end and "
        "every key they own or created is revoked.",
        args.yes,
    )
    with client_of(args) as client:
        revoked = client.users.delete(args.user)
    output.outcome(
        {"user_id": args.user, "deleted": True, "revoked_key_count": revoked},
        f"User {args.user} was removed; {revoked} keys were revoked.",
    )
    return 0


# --- collaborators -----------------------------------------------------------

_COLLABORATOR_COLUMNS = ("user_id", "role", "added_by", "created_at", "modified_at")


def collaborators_add(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        added = client.collaborators.add(args.dataset, args.user, role=args.role)
    output.record(added, f"{added.user_id} on dataset {added.dataset_id}")
    return 0


def collaborators_list(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        rows = [fields_of(c) for c in client.collaborators.list(args.dataset)]
    output.table(rows, _COLLABORATOR_COLUMNS, f"collaborators of dataset {args.dataset}")
    return 0


def collaborators_promote(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        promoted = client.collaborators.promote(args.dataset, args.user)
    output.record(promoted, f"{promoted.user_id} on dataset {promoted.dataset_id}")
    return 0


def collaborators_remove(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        client.collaborators.remove(args.dataset, args.user)
    output.outcome(
        {"dataset_id": args.dataset, "user_id": args.user, "removed": True},
        f"{args.user} no longer has a role on dataset {args.dataset}.",
    )
    return 0


# --- audit -------------------------------------------------------------------

_EVENT_COLUMNS = (
    "id",
    "time",
    "rpc",
    "outcome",
    "user_id",
    "key_id",
    "dataset_ids",
    "resource_ids",
    "request_id",
)


def audit_list(args: argparse.Namespace, output: Output) -> int:
    rows: list[dict[str, Any]] = []
    with client_of(args) as client:
        events = client.audit.events(
            dataset_id=args.dataset,
            user_id=args.user,
            key_id=args.key_id,
            rpc=args.rpc,
            outcome=args.outcome,
            start_time=args.since,
            end_time=args.until,
            page_size=min(args.limit, 1000),
        )
        for event in events:
            row = fields_of(event)
            # The method's name is what people read; JSON keeps the full one.
            if not output.as_json:
                row["rpc"] = event.rpc.rsplit("/", 1)[-1]
            rows.append(row)
            if len(rows) >= args.limit:
                break
    output.table(rows, _EVENT_COLUMNS, f"audit events of app {args.app}, newest first")
    return 0
