"""`datasetd keys|users|collaborators|audit …` and the typed confirmation of `datasets delete`,
run as separate processes against the real server (as test_cli.py runs the other commands)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pty
import secrets
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from service.app import Running
from service.client import Client
from service.domain.auth import new_key
from service.domain.models import KeyKind
from service.storage.api_keys import PgApiKeyRepository
from service.storage.db import Database
from tests.conftest import Caller, Stack, stack_env
from tests.e2e.test_cli import CLI_TIMEOUT, Cli, Ran, cli_env
from tests.e2e.test_grpcurl import grpcurl_path
from tests.e2e.test_newcomer_fixes import bash, for_server
from tests.processes import ROOT, clean_env
from tests.readme import fenced_block


def database_cli(server: Running, stack: Stack, app: str) -> Cli:
    """The CLI for `app` with the test database's settings and no key (the bootstrap path)."""
    return Cli(
        clean_env(
            COLUMNS="200",
            DATASETD_APP=app,
            DATASETD_ADDRESS=f"127.0.0.1:{server.port}",
            **{k: v for k, v in stack_env(stack).items() if k.startswith("DATASETD_")},
        )
    )


async def bootstrapped(server: Running, stack: Stack) -> tuple[Cli, Cli, dict[str, Any]]:
    """A new app's CLI without a key, its owner's CLI, and the bootstrap key made."""
    bare = database_cli(server, stack, "acl-" + secrets.token_hex(4))
    made = await bare.json("keys", "create")
    return bare, Cli({**bare.env, "DATASETD_API_KEY": made["key"]}), made


async def personal_key(db: Database, app_id: str, user_id: str) -> str:
    """A personal key for a user, written directly: AccessService makes personal keys only
    for the calling user, so a test user's first key comes from the database."""
    secret, key = new_key(app_id, f"{user_id}'s first key")
    await PgApiKeyRepository(db).insert(
        dataclasses.replace(key, kind=KeyKind.PERSONAL, user_id=user_id)
    )
    return secret


def refused(ran: Ran, code: str) -> None:
    assert ran.code == 1, f"exit {ran.code}: {ran.stdout} {ran.stderr}"
    assert code in ran.stderr, ran.stderr


async def test_the_database_path_only_bootstraps(server: Running, stack: Stack) -> None:
    bare, owner, made = await bootstrapped(server, stack)
    assert made["kind"] == "personal" and made["user_id"] == "owner" and made["bootstrap"]
    assert made["key"].startswith("dsd_")

    # The database path only bootstraps: the app has a user now.
    again = await bare("keys", "create")
    assert again.code == 1 and "already has users" in again.stderr
    forced = await owner("keys", "create", "--bootstrap")
    assert forced.code == 1 and "already has users" in forced.stderr
    scoped_offline = await bare("keys", "create", "--read")
    assert scoped_offline.code == 2 and "--key" in scoped_offline.stderr
    assert [k["id"] for k in await owner.json("keys", "list")] == [made["id"]]


async def test_keys_create_list_and_revoke_over_the_api(server: Running, stack: Stack) -> None:
    _, owner, _ = await bootstrapped(server, stack)
    await owner.json("datasets", "create", "cats")
    await owner.json("datasets", "create", "dogs")
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    reader = await owner.json(
        "keys",
        "create",
        "--read",
        "--dataset",
        "cats",
        "--expires",
        expires.isoformat(),
        "--description",
        "cats reader",
    )
    assert (reader["kind"], reader["access"], reader["dataset_ids"]) == ("scoped", "read", ["cats"])
    assert reader["created_by"] == "owner" and reader["expires_at"] == expires.isoformat()
    # Table mode: the secret alone on stdout, its id on stderr.
    writer_run = await owner("keys", "create", "--description", "ingest")
    assert writer_run.code == 0, writer_run.stderr
    writer_secret = writer_run.stdout.strip()
    assert writer_secret.startswith("dsd_") and "\n" not in writer_secret

    listed = await owner.json("keys", "list")
    by_description = {k["description"]: k for k in listed}
    assert set(by_description) == {"bootstrap", "cats reader", "ingest"}
    assert f"key id {by_description['ingest']['id']}" in writer_run.stderr
    assert by_description["ingest"]["access"] == "read_write"
    assert by_description["ingest"]["dataset_ids"] == []
    assert listed[0]["description"] == "ingest", "newest first"
    assert reader["key"] not in json.dumps(listed) and writer_secret not in json.dumps(listed)
    bound = await owner.json("keys", "list", "--dataset", "cats")
    assert [k["id"] for k in bound] == [reader["id"]]

    read_only = Cli({**owner.env, "DATASETD_API_KEY": reader["key"]})
    assert (await read_only.json("datasets", "get", "cats"))["id"] == "cats"
    refused(await read_only("datasets", "get", "dogs"), "PERMISSION_DENIED")
    refused(await read_only("datasets", "patch", "cats", "--notes", "x"), "PERMISSION_DENIED")
    # Scoped keys manage nothing.
    refused(await read_only("keys", "list"), "PERMISSION_DENIED")
    refused(await read_only("keys", "create", "--read"), "PERMISSION_DENIED")

    no_answer = await owner("keys", "revoke", reader["id"])
    assert no_answer.code == 2 and "--yes" in no_answer.stderr
    assert (await read_only.json("datasets", "get", "cats"))["id"] == "cats"
    revoked = await owner.json("keys", "revoke", reader["id"], "--yes")
    assert revoked["revoked"] is True and revoked["revoked_at"]
    refused(await read_only("datasets", "get", "cats"), "UNAUTHENTICATED")
    # Revoking again changes nothing and is not an error.
    twice = await owner.json("keys", "revoke", reader["id"], "--yes")
    assert twice["revoked_at"] == revoked["revoked_at"]
    assert reader["id"] not in [k["id"] for k in await owner.json("keys", "list")]
    with_revoked = await owner.json("keys", "list", "--include-revoked")
    assert {k["id"]: k["revoked_at"] for k in with_revoked}[reader["id"]] == revoked["revoked_at"]


async def test_keys_create_refusals(server: Running, stack: Stack) -> None:
    _, owner, _ = await bootstrapped(server, stack)
    past = await owner("keys", "create", "--read", "--expires", "2001-01-01")
    refused(past, "INVALID_ARGUMENT")
    assert "api_key.expires_at" in past.stderr
    unknown = await owner("keys", "create", "--read", "--dataset", "nope")
    assert unknown.code == 1 and "nope" in unknown.stderr
    bad_time = await owner("keys", "create", "--expires", "soon")
    assert bad_time.code == 2 and "duration" in bad_time.stderr


async def test_users_collaborators_and_the_audit_log(
    server: Running, stack: Stack, db: Database
) -> None:
    _, owner, made = await bootstrapped(server, stack)
    app = owner.env["DATASETD_APP"]
    await owner.json("datasets", "create", "cats")
    await owner.json("datasets", "create", "dogs")

    bob = "bob@example.com"
    created = await owner.json("users", "create", bob, "--display-name", "Bob")
    assert (created["id"], created["display_name"], created["role"]) == (bob, "Bob", "member")
    refused(await owner("users", "create", bob), "ALREADY_EXISTS")
    assert [u["id"] for u in await owner.json("users", "list")] == [bob, "owner"]
    assert (await owner.json("users", "update", bob, "--role", "admin"))["role"] == "admin"
    renamed = await owner.json("users", "update", bob, "--role", "member", "--display-name", "B.")
    assert (renamed["role"], renamed["display_name"]) == ("member", "B.")
    last_owner = await owner("users", "update", "owner", "--role", "member")
    refused(last_owner, "FAILED_PRECONDITION")
    assert "LAST_OWNER" in last_owner.stderr

    as_bob = Cli({**owner.env, "DATASETD_API_KEY": await personal_key(db, app, bob)})
    await collaborate(owner, as_bob, bob)
    await audit_log(owner, as_bob, bob, made["id"])

    no_answer = await owner("users", "delete", bob)
    assert no_answer.code == 2 and "--yes" in no_answer.stderr
    deleted = await owner.json("users", "delete", bob, "--yes")
    # The key written for him, the personal key he made and the read key he created.
    assert deleted == {"user_id": bob, "deleted": True, "revoked_key_count": 3}
    refused(await as_bob("datasets", "list"), "UNAUTHENTICATED")
    assert [u["id"] for u in await owner.json("users", "list")] == ["owner"]


async def collaborate(owner: Cli, as_bob: Cli, bob: str) -> None:
    """Bob as a Viewer, then an Admin of cats, then removed."""
    assert await as_bob.json("datasets", "list") == []
    refused(await as_bob("datasets", "get", "cats"), "PERMISSION_DENIED")

    added = await owner.json("collaborators", "add", "cats", bob)
    assert (added["user_id"], added["role"], added["added_by"]) == (bob, "viewer", "owner")
    assert [d["id"] for d in await as_bob.json("datasets", "list")] == ["cats"]
    refused(await as_bob("datasets", "patch", "cats", "--notes", "x"), "PERMISSION_DENIED")
    listed = await as_bob.json("collaborators", "list", "cats")
    assert [(c["user_id"], c["role"]) for c in listed] == [(bob, "viewer")]
    refused(await as_bob("collaborators", "add", "cats", "owner"), "PERMISSION_DENIED")

    promoted = await owner.json("collaborators", "promote", "cats", bob)
    assert promoted["role"] == "admin"
    assert (await owner.json("collaborators", "promote", "cats", bob))["role"] == "admin"
    patched = await as_bob.json("datasets", "patch", "cats", "--notes", "by bob")
    assert patched["notes"] == "by bob"
    # A personal key of bob's own, and a read key on the dataset he administers.
    own = await as_bob.json("keys", "create", "--personal", "--description", "laptop")
    assert (own["kind"], own["user_id"], own["access"]) == ("personal", bob, "")
    scoped = await as_bob.json("keys", "create", "--read", "--dataset", "cats")
    assert scoped["created_by"] == bob
    # Not on a dataset he has no role on, nor app-wide.
    refused(await as_bob("keys", "create", "--read", "--dataset", "dogs"), "PERMISSION_DENIED")
    refused(await as_bob("keys", "create", "--read"), "PERMISSION_DENIED")

    await owner.json("collaborators", "remove", "cats", bob)
    refused(await as_bob("datasets", "get", "cats"), "PERMISSION_DENIED")
    refused(await owner("collaborators", "remove", "cats", bob), "NOT_FOUND")


async def audit_log(owner: Cli, as_bob: Cli, bob: str, owner_key: str) -> None:
    """What `collaborate` left in the audit log, by its filters."""
    events = await owner.json("audit", "list", "--dataset", "cats")
    methods = [e["rpc"].rsplit("/", 1)[-1] for e in events]
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids, reverse=True), "newest first"
    for method in ("AddCollaborator", "UpdateCollaborator", "RemoveCollaborator", "UpdateDataset"):
        assert method in methods, methods
    bobs = await owner.json("audit", "list", "--user", bob, "--outcome", "PERMISSION_DENIED")
    assert bobs and {e["user_id"] for e in bobs} == {bob}
    assert {e["outcome"] for e in bobs} == {"PERMISSION_DENIED"}
    # Bob's refused AddCollaborator is there too, newest first.
    adds = await owner.json("audit", "list", "--rpc", "AddCollaborator")
    assert [(e["user_id"], e["outcome"], e["dataset_ids"]) for e in adds] == [
        (bob, "PERMISSION_DENIED", ["cats"]),
        ("owner", "OK", ["cats"]),
    ]
    assert adds[1]["rpc"] == "/datasetd.v1.AccessService/AddCollaborator"
    assert adds[1]["key_id"] == owner_key
    done = await owner.json("audit", "list", "--rpc", "AddCollaborator", "--outcome", "ok")
    assert done == adds[1:]
    assert len(await owner.json("audit", "list", "--limit", "2")) == 2
    assert await owner.json("audit", "list", "--since", "2001-01-01", "--until", "2001-01-02") == []
    assert await owner.json("audit", "list", "--since", "1h", "--dataset", "cats") == events
    table = await owner("audit", "list", "--rpc", "AddCollaborator")
    assert table.code == 0 and "AddCollaborator" in table.stdout and owner_key in table.stdout
    assert "/datasetd.v1." not in table.stdout
    refused(await as_bob("audit", "list", "--dataset", "dogs"), "PERMISSION_DENIED")


async def test_the_client_library_pages_the_audit_log(server: Running, stack: Stack) -> None:
    _, owner, _ = await bootstrapped(server, stack)
    app, key = owner.env["DATASETD_APP"], owner.env["DATASETD_API_KEY"]

    def use() -> None:
        with Client(f"127.0.0.1:{server.port}", key, app) as client:
            for name in ("a", "b", "c"):
                client.datasets.create(name)
            first = client.audit.page(rpc="CreateDataset", page_size=2)
            assert len(first.events) == 2 and first.next_page_token
            rest = client.audit.page(
                rpc="CreateDataset", page_size=2, page_token=first.next_page_token
            )
            assert len(rest.events) == 1 and not rest.next_page_token
            ids = [int(e.id) for e in first.events + rest.events]
            assert ids == sorted(ids, reverse=True) and len(set(ids)) == 3
            assert [e.id for e in client.audit.events(rpc="CreateDataset", page_size=1)] == [
                e.id for e in first.events + rest.events
            ]
            made = client.api_keys.create(access="read", dataset_ids=["a"], description="r")
            assert made.key.dataset_ids == ["a"] and made.secret.startswith("dsd_")
            assert made.key.id in [k.id for k in client.api_keys.list(page_size=1)]

    await asyncio.to_thread(use)

    # The README's example, pointed at this server and app (it works on dataset "cats").
    example = fenced_block("python", "client.collaborators.promote(")
    for placeholder in ('"127.0.0.1:50051"', '"dsd_..."', '"main"'):
        assert placeholder in example, placeholder
    code = (
        example.replace('"127.0.0.1:50051"', repr(f"127.0.0.1:{server.port}"))
        .replace('"dsd_..."', repr(key))
        .replace('"main"', repr(app))
    )
    await owner.json("datasets", "create", "cats")
    await asyncio.to_thread(exec, compile(code, "README.md", "exec"), {})
    (cy,) = [c for c in await owner.json("collaborators", "list", "cats")]
    assert (cy["user_id"], cy["role"]) == ("cy@example.com", "admin")
    keys = await owner.json("keys", "list", "--dataset", "cats", "--include-revoked")
    assert [(k["access"], bool(k["revoked_at"])) for k in keys] == [("read", True)]


async def typed(env: dict[str, str], answer: str, *args: str) -> Ran:
    """The CLI with a terminal on standard input, answering the prompt with `answer`."""
    main, terminal = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            *args,
            cwd=ROOT,
            env=env,
            stdin=terminal,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        os.close(terminal)
        terminal = -1
        os.write(main, answer.encode() + b"\n")
        stdout, stderr = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(main)
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


async def test_datasets_delete_asks_to_type_the_dataset_id(server: Running, caller: Caller) -> None:
    cli = Cli(cli_env(server, caller))
    await cli.json("datasets", "create", "doomed")

    no_terminal = await cli("datasets", "delete", "doomed")
    assert no_terminal.code == 2 and "pass --yes" in no_terminal.stderr

    said_yes = await typed(cli.env, "y", "datasets", "delete", "doomed")
    assert said_yes.code == 2, said_yes.stderr
    assert "Type doomed to confirm" in said_yes.stdout and "cancelled" in said_yes.stderr
    assert (await cli.json("datasets", "get", "doomed"))["id"] == "doomed"

    confirmed = await typed(cli.env, "doomed", "datasets", "delete", "doomed")
    assert confirmed.code == 0, confirmed.stderr
    assert "was deleted" in confirmed.stdout
    assert (await cli("datasets", "get", "doomed")).code == 1


async def test_the_readme_cli_example_runs_as_written(
    server: Running, stack: Stack, tmp_path: Path
) -> None:
    block = fenced_block("sh", "datasetd users create ann@example.com")
    app = "readme-" + secrets.token_hex(4)
    assert "export DATASETD_APP=studio\n" in block
    script = block.replace("export DATASETD_APP=studio\n", f"export DATASETD_APP={app}\n")
    # The owner's key, for the checks after the script.
    script += 'echo "owner key: $DATASETD_API_KEY"\n'
    # `datasetd` and `python` as the README says: the virtualenv's, found on PATH.
    env = database_cli(server, stack, app).env | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    }
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 10 * CLI_TIMEOUT)
    assert process.returncode == 0, stderr.decode() + stdout.decode()
    printed = stdout.decode()
    assert "refused: exit status 1" in printed and "PERMISSION_DENIED" in stderr.decode()
    assert "ann@example.com" in printed and "is revoked" in printed
    for method in ("AddCollaborator", "UpdateCollaborator", "GetDataset"):
        assert method in printed, method

    owner_key = printed.rsplit("owner key: ", 1)[1].strip()
    owner = Cli(env | {"DATASETD_API_KEY": owner_key})
    with_revoked = await owner.json("keys", "list", "--include-revoked")
    assert sorted((k["description"], k["revoked_at"] is None) for k in with_revoked) == [
        ("Ann's laptop", True),
        ("owner's laptop", True),
        ("training", False),
    ]
    anns = next(k for k in with_revoked if k["description"] == "Ann's laptop")
    assert (anns["kind"], anns["user_id"]) == ("personal", "ann@example.com"), anns
    collaborators = await owner.json("collaborators", "list", "street-photos")
    assert [(c["user_id"], c["role"]) for c in collaborators] == [("ann@example.com", "admin")]
    # Ann's key changed the dataset she is Admin of.
    assert (await owner.json("datasets", "get", "street-photos"))["description"] == "street scenes"


async def test_the_readme_grpcurl_example_runs_and_runs_again(
    server: Running, stack: Stack, tmp_path: Path
) -> None:
    _, owner, _ = await bootstrapped(server, stack)
    caller = Caller(owner.env["DATASETD_APP"], owner.env["DATASETD_API_KEY"])
    example = fenced_block("sh", "datasetd.v1.AccessService/CreateUser")
    script = (
        for_server(example, server, caller)
        .replace(".venv/bin/grpcurl", grpcurl_path())
        .replace(".venv/bin/python", sys.executable)
    )
    script = "\n".join(
        f"KEY={caller.key}" if line.startswith("KEY=") else line for line in script.splitlines()
    )
    for attempt in (1, 2):
        code, out = await bash(script, tmp_path)
        assert code == 0, f"run {attempt} of the README example failed:\n{out}"
        assert '"secret": "dsd_' in out and '"revoked_at"' in out
        assert '"DATASET_ROLE_ADMIN"' in out and '"purged": true' in out
        assert '"rpc": "/datasetd.v1.AccessService/AddCollaborator"' in out
    # Both runs revoked the key they made; the owner's stays.
    keys = await owner.json("keys", "list", "--include-revoked")
    assert sorted((k["description"], k["revoked_at"] is None) for k in keys) == [
        ("bootstrap", True),
        ("labelling tool", False),
        ("labelling tool", False),
    ]
