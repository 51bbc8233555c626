"""The server as a process: start-up banner, embedded and external stacks, signals.

These run `python -m service serve` exactly as `make run` does and talk to it
over a real channel.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
from pathlib import Path

import psutil
import pytest
from datasetd.v1 import common_pb2, data_pb2, dataset_pb2
from datasetd.v1 import dataset_service_pb2 as api

from service.storage.db import Database
from tests.conftest import Stack, stack_env
from tests.helpers import download, png_bytes
from tests.processes import clean_env, create_key, run_server, start_serve, stub_for


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.NoSuchProcess:
        return []


async def test_embedded_stack_starts_persists_and_stops_cleanly(tmp_path: Path) -> None:
    env = clean_env(DATASETD_DATA_DIR=str(tmp_path), DATASETD_SHUTDOWN_GRACE="5s")
    cover = png_bytes(12, 9)
    async with run_server(env) as server:
        assert f"serving on {server.address}" in server.banner
        assert "shown only once" in server.banner
        key = next(
            line.rsplit(" ", 1)[-1]
            for line in server.banner.splitlines()
            if line.startswith("bootstrap API key for app")
        )
        assert f"grpcurl -plaintext -H 'authorization: Key {key}'" in server.banner
        children = server.descendants()
        # PostgreSQL forks short-lived backends and workers, so a child listed
        # a moment ago may be gone by the time it is read.
        names = " ".join(" ".join(_cmdline(p)) for p in children)
        assert "weed" in names and "postgres" in names
        for child in children:
            try:
                listening = [
                    c for c in child.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
                ]
            except psutil.NoSuchProcess:
                continue
            for conn in listening:
                assert conn.laddr.ip == "127.0.0.1", (_cmdline(child), conn)
        metadata = (("authorization", f"Key {key}"),)
        async with stub_for(server.address) as stub:
            await stub.CreateDataset(
                api.CreateDatasetRequest(
                    app_id="main",
                    dataset=dataset_pb2.Dataset(
                        id="kept", description="survives", image=data_pb2.Image(base64=cover)
                    ),
                ),
                metadata=metadata,
            )
        assert await server.stop(signal.SIGINT) == 0
        assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    offline_key = await create_key(env, "offline-app")
    async with run_server(env) as server:
        assert "shown on first start only" in server.banner
        assert key not in server.banner
        online_key = await create_key(env, "online-app")
        async with stub_for(server.address) as stub:
            for app, secret in (("offline-app", offline_key), ("online-app", online_key)):
                await stub.ListDatasets(
                    api.ListDatasetsRequest(app_id=app),
                    metadata=(("authorization", f"Key {secret}"),),
                )
            got = await stub.GetDataset(
                api.GetDatasetRequest(app_id="main", dataset_id="kept"), metadata=metadata
            )
            assert got.dataset.description == "survives"
            assert got.dataset.image.image_info.width == 12
            data = await asyncio.to_thread(download, got.dataset.image.url)
            assert data == cover
        children = server.descendants()
        assert await server.stop(signal.SIGTERM) == 0
        assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


async def test_external_stack_starts_nothing_and_drains_in_flight_calls(
    stack: Stack, db: Database, tmp_path: Path
) -> None:
    app = "proc-" + secrets.token_hex(4)
    key = "configured-bootstrap-" + secrets.token_hex(8)
    env = {
        **clean_env(),
        **{k: v for k, v in stack_env(stack).items() if k.startswith("DATASETD_")},
        "DATASETD_DATA_DIR": str(tmp_path / "unused"),
        "DATASETD_BOOTSTRAP_KEY": key,
        "DATASETD_BOOTSTRAP_APP": app,
        "DATASETD_SHUTDOWN_GRACE": "20s",
    }
    metadata = (("authorization", f"Bearer {key}"),)
    async with run_server(env) as server:
        assert key in server.banner
        assert server.descendants() == []
        assert not (tmp_path / "unused").exists()
        async with stub_for(server.address) as stub:
            await stub.CreateDataset(
                api.CreateDatasetRequest(app_id=app, dataset=dataset_pb2.Dataset(id="busy")),
                metadata=metadata,
            )
            # Hold the row lock so that an update is in flight when the signal comes.
            async with db.transaction(), db.connection() as conn:
                await conn.execute(
                    "SELECT 1 FROM datasets WHERE app_id = $1 AND id = 'busy' FOR UPDATE", app
                )
                in_flight = asyncio.ensure_future(
                    stub.UpdateDataset(
                        api.UpdateDatasetRequest(
                            app_id=app,
                            dataset=dataset_pb2.Dataset(id="busy", description="finished"),
                            action=common_pb2.PATCH_ACTION_MERGE,
                        ),
                        metadata=metadata,
                    )
                )
                await asyncio.sleep(1.0)
                assert not in_flight.done()
                server.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(1.0)
                assert server.process.returncode is None
            response = await asyncio.wait_for(in_flight, 20)
            assert response.dataset.description == "finished"
        assert await asyncio.wait_for(server.process.wait(), 20) == 0
    async with db.connection() as conn:
        stored = await conn.fetchval(
            "SELECT description FROM datasets WHERE app_id = $1 AND id = 'busy'", app
        )
    assert stored == "finished"


@pytest.mark.parametrize(
    ("env", "message"),
    [({"DATASETD_S3_ENDPOINT": "127.0.0.1:1"}, "DATASETD_S3_ACCESS_KEY")],
)
async def test_bad_configuration_exits_with_a_clear_message(
    env: dict[str, str], message: str
) -> None:
    process = await start_serve(clean_env(**env), stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert message in stderr.decode()
