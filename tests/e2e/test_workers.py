"""`serve` with DATASETD_WORKERS above 1: a supervisor and worker processes sharing the ports.

Run as `make run` runs it (`python -m service serve`), over real connections: both workers
answer, the metrics of all of them are in every scrape, a SIGKILLed worker is replaced
while the other serves on, SIGTERM stops everything with exit code 0, and a killed
supervisor takes its workers with it."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import psutil
import pytest
from datasetd.v1 import dataset_pb2
from datasetd.v1 import dataset_service_pb2 as api
from prometheus_client.parser import text_string_to_metric_families

from service.app import WORKER_HEADER
from service.config import Config, available_cores
from tests.conftest import Stack, stack_env
from tests.processes import ServerProcess, clean_env, run_server, start_serve, stub_for

GET_DATASET = "datasetd.v1.DatasetService/GetDataset"
# Connections land on the workers by the kernel's hash of their addresses: this many fresh
# ones miss a worker with a chance of 2**-40.
TRIES = 40


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return ""


def workers_of(server: ServerProcess) -> set[int]:
    return {p.pid for p in server.descendants() if "service.worker" in _cmdline(p)}


async def answering_pid(http_address: str) -> int:
    """The pid of the worker that answers /healthz on a new connection."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"http://{http_address}/healthz") as response,
    ):
        assert response.status == 200, await response.text()
        return int(response.headers[WORKER_HEADER])


async def answering_pids(http_address: str) -> set[int]:
    return {await answering_pid(http_address) for _ in range(TRIES)}


async def calls_total(http_address: str, method: str) -> float:
    """datasetd_rpc_requests_total{method, code=OK} in one scrape (of whichever worker)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{http_address}/metrics") as response,
    ):
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "datasetd_rpc_requests_total" and sample.labels == {
                "method": method,
                "code": "OK",
            }:
                return sample.value
    return 0.0


async def until(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"not within {seconds:.0f}s: {what}"
        await asyncio.sleep(0.2)


async def get_dataset(address: str, app: str, key: str, dataset: str) -> None:
    """One GetDataset on a channel of its own: a new connection, to either worker."""
    async with stub_for(address) as stub:
        await stub.GetDataset(
            api.GetDatasetRequest(app_id=app, dataset_id=dataset),
            metadata=(("authorization", f"Key {key}"),),
            timeout=10,
        )


def gone(processes: list[psutil.Process]) -> bool:
    def alive(process: psutil.Process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return not any(alive(p) for p in processes)


async def test_workers_share_the_ports_survive_a_killed_worker_and_stop_cleanly(
    tmp_path: Path,
) -> None:
    """With the embedded stack, as `make run` on a machine of two cores or more."""
    key = "workers-bootstrap-" + secrets.token_hex(8)
    env = clean_env(
        DATASETD_DATA_DIR=str(tmp_path),
        DATASETD_WORKERS="2",
        DATASETD_BOOTSTRAP_KEY=key,
        DATASETD_BUILTIN_EMBEDDERS="off",
        DATASETD_SHUTDOWN_GRACE="5s",
    )
    async with run_server(env) as server:
        assert "2 worker processes share the ports" in server.banner
        workers = workers_of(server)
        assert len(workers) == 2
        names = [_cmdline(p) for p in server.descendants()]
        # One embedded stack for both workers.
        assert sum("postgres -D" in name for name in names) == 1
        assert sum("weed" in name and " mini " in name for name in names) == 1
        assert await answering_pids(server.http_address) == workers

        async with stub_for(server.address) as stub:
            await stub.CreateDataset(
                api.CreateDatasetRequest(app_id="main", dataset=dataset_pb2.Dataset(id="d")),
                metadata=(("authorization", f"Key {key}"),),
            )
        before = await calls_total(server.http_address, GET_DATASET)
        for _ in range(10):
            await get_dataset(server.address, "main", key, "d")
        # Whichever worker answers the scrape counts the calls of both.
        for _ in range(4):
            assert await calls_total(server.http_address, GET_DATASET) == before + 10

        victim = max(workers)
        survivor = min(workers)
        psutil.Process(victim).kill()
        killed_at = time.monotonic()
        # Calls on new connections go to the surviving worker, then to both. A connection
        # the kernel queued on the killed worker's socket in the instant before it closed
        # is reset (UNAVAILABLE, which clients retry); only in that instant.
        served = 0
        deadline = time.monotonic() + 60
        replaced: set[int] = set()
        while not replaced:
            try:
                await get_dataset(server.address, "main", key, "d")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert time.monotonic() - killed_at < 5, f"still refused after 5 s: {exc}"
                continue
            served += 1
            replaced = workers_of(server) - workers
            assert time.monotonic() < deadline, "the killed worker was not replaced"
        assert survivor in workers_of(server) and victim not in workers_of(server)

        async def both_answer() -> bool:
            return await answering_pids(server.http_address) == {survivor, *replaced}

        await until(both_answer, 60, "the new worker answers beside the old one")
        # The killed worker's counts are kept: the counters only grow.
        assert await calls_total(server.http_address, GET_DATASET) >= before + 10 + served

        children = server.descendants()
        assert await server.stop(signal.SIGTERM) == 0
        assert gone(children), [_cmdline(p) for p in children]


async def test_a_killed_supervisor_takes_its_workers(stack: Stack, tmp_path: Path) -> None:
    env = {
        **clean_env(),
        **{k: v for k, v in stack_env(stack).items() if k.startswith("DATASETD_")},
        "DATASETD_DATA_DIR": str(tmp_path / "unused"),
        "DATASETD_WORKERS": "2",
        "DATASETD_BUILTIN_EMBEDDERS": "off",
        "DATASETD_SHUTDOWN_GRACE": "5s",
    }
    async with run_server(env) as server:
        workers = [psutil.Process(pid) for pid in workers_of(server)]
        assert len(workers) == 2
        # An external stack: the supervisor starts nothing but the workers.
        assert len(server.descendants()) == 2
        server.process.kill()
        await server.process.wait()

        async def all_gone() -> bool:
            return gone(workers)

        await until(all_gone, 45, "the workers exit once their supervisor is gone")


def test_the_default_is_the_cores_available() -> None:
    default = Config.from_env({}).workers
    assert default == available_cores()
    assert 1 <= default <= min(len(os.sched_getaffinity(0)), 64)
    assert Config.from_env({"DATASETD_WORKERS": "3"}).workers == 3
    # Built in-process (the tests' servers): one process, as before.
    assert Config().workers == 1


@pytest.mark.parametrize("value", ["0", "65", "all"])
async def test_a_bad_workers_value_stops_the_start(value: str) -> None:
    process = await start_serve(clean_env(DATASETD_WORKERS=value), stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    told = stderr.decode()
    assert "configuration error" in told and "DATASETD_WORKERS" in told, told
    assert "Traceback" not in told
    assert b"serving" not in stdout


async def test_a_worker_that_cannot_start_stops_the_start(stack: Stack, tmp_path: Path) -> None:
    """Worker 0's own refusal (a TLS file it cannot read) reaches the operator."""
    env = {
        **clean_env(),
        **{k: v for k, v in stack_env(stack).items() if k.startswith("DATASETD_")},
        "DATASETD_WORKERS": "2",
        "DATASETD_LISTEN": "127.0.0.1:0",
        "DATASETD_HTTP_LISTEN": "off",
        "DATASETD_BUILTIN_EMBEDDERS": "off",
        "DATASETD_TLS_CERT": str(tmp_path / "missing.pem"),
        "DATASETD_TLS_KEY": str(tmp_path / "missing-key.pem"),
    }
    process = await start_serve(env, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    told = stderr.decode()
    assert process.returncode == 1, told
    assert "configuration error" in told and "DATASETD_TLS_CERT" in told, told
    assert "worker 0" in told and "before serving" in told, told
    assert "Traceback" not in told


async def test_grpc_calls_reach_both_workers(stack: Stack, tmp_path: Path) -> None:
    """The gRPC port is shared too: with one worker stopped (SIGSTOP), the calls on new
    connections that land on it time out and the others succeed on the running one."""
    app = "workers-" + secrets.token_hex(4)
    key = "workers-bootstrap-" + secrets.token_hex(8)
    env = {
        **clean_env(),
        **{k: v for k, v in stack_env(stack).items() if k.startswith("DATASETD_")},
        "DATASETD_DATA_DIR": str(tmp_path / "unused"),
        "DATASETD_WORKERS": "2",
        "DATASETD_BOOTSTRAP_KEY": key,
        "DATASETD_BOOTSTRAP_APP": app,
        "DATASETD_BUILTIN_EMBEDDERS": "off",
        "DATASETD_SHUTDOWN_GRACE": "5s",
    }
    async with run_server(env) as server:
        async with stub_for(server.address) as stub:
            await stub.CreateDataset(
                api.CreateDatasetRequest(app_id=app, dataset=dataset_pb2.Dataset(id="d")),
                metadata=(("authorization", f"Key {key}"),),
            )
        paused = psutil.Process(min(workers_of(server)))
        paused.suspend()
        try:
            outcomes: list[bool] = []
            for _ in range(TRIES):
                try:
                    async with stub_for(server.address) as stub:
                        await stub.GetDataset(
                            api.GetDatasetRequest(app_id=app, dataset_id="d"),
                            metadata=(("authorization", f"Key {key}"),),
                            timeout=0.5,
                        )
                    outcomes.append(True)
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
                    outcomes.append(False)
        finally:
            paused.resume()
        # Some connections went to the paused worker, the others to the running one.
        assert any(outcomes) and not all(outcomes), outcomes
        assert await server.stop(signal.SIGTERM) == 0
