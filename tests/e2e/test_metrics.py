"""The HTTP port: /metrics in the Prometheus text format and /healthz; and a real
Prometheus server scraping a running datasetd and finding its series through its HTTP API."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
from datasetd.v1 import data_pb2, dataset_pb2, dataset_version_pb2, input_pb2
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import input_service_pb2 as iapi
from prometheus_client.parser import text_string_to_metric_families

from service.app import Resources, Running, banner, start
from service.config import Config
from service.storage.db import Database
from tests.conftest import Caller, Stack, object_store, stack_env
from tests.e2e.test_diff_import import import_archive, protobuf_archive, texts
from tests.e2e.test_exports import exported
from tests.e2e.test_versions import build
from tests.helpers import call_error, png_bytes
from tests.processes import free_port, run_server, stub_for

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

GET_DATASET = "datasetd.v1.DatasetService/GetDataset"
CREATE_DATASET = "datasetd.v1.DatasetService/CreateDataset"
CREATE_INPUTS = "datasetd.v1.InputService/CreateInputs"
PROMETHEUS_TIMEOUT = 30.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http_address: str) -> tuple[Samples, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{http_address}/metrics") as response,
    ):
        assert response.status == 200
        content_type = response.headers["Content-Type"]
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, content_type


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for found, labels in samples if found == name]


async def test_metrics_count_calls_by_method_and_code(
    server: Running, caller: Caller, db: Database, datasets: Datasets, inputs: Inputs
) -> None:
    # The session's server has served other tests: only the differences count.
    http = f"127.0.0.1:{server.http_port}"
    before, _ = await scrape(http)
    await datasets.CreateDataset(
        dapi.CreateDatasetRequest(app_id=caller.app_id, dataset=dataset_pb2.Dataset(id="d1")),
        metadata=caller.metadata,
    )
    for _ in range(2):
        await datasets.GetDataset(
            dapi.GetDatasetRequest(app_id=caller.app_id, dataset_id="d1"),
            metadata=caller.metadata,
        )
    missing = await call_error(
        datasets.GetDataset(
            dapi.GetDatasetRequest(app_id=caller.app_id, dataset_id="missing"),
            metadata=caller.metadata,
        )
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    # A color no other test used: the store gets a new object, not a duplicate.
    red, green, blue = secrets.token_bytes(3)
    image = png_bytes(10, 7, (red, green, blue))
    text = secrets.token_hex(8)
    await inputs.CreateInputs(
        iapi.CreateInputsRequest(
            app_id=caller.app_id,
            inputs=[
                input_pb2.Input(data=data_pb2.Data(image=data_pb2.Image(base64=image))),
                input_pb2.Input(data=data_pb2.Data(text=data_pb2.Text(raw=text))),
            ],
        ),
        metadata=caller.metadata,
    )
    after, content_type = await scrape(http)

    assert content_type.startswith("text/plain; version=0.0.4")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "datasetd_rpc_requests_total"
    assert delta(requests, method=CREATE_DATASET, code="OK") == 1
    assert delta(requests, method=GET_DATASET, code="OK") == 2
    assert delta(requests, method=GET_DATASET, code="NOT_FOUND") == 1
    assert delta(requests, method=CREATE_INPUTS, code="OK") == 1
    assert delta("datasetd_rpc_duration_seconds_count", method=GET_DATASET) == 3
    assert delta("datasetd_rpc_duration_seconds_bucket", method=GET_DATASET, le="60.0") == 3
    assert delta("datasetd_rpc_duration_seconds_bucket", method=GET_DATASET, le="+Inf") == 3
    assert delta("datasetd_rpc_duration_seconds_sum", method=GET_DATASET) > 0
    # Every call above has ended: none is in flight while this test runs alone.
    assert value(after, "datasetd_rpc_in_flight") == 0
    # Two inputs created, each with its media stored (the text's raw bytes too).
    assert delta("datasetd_ingest_items_total") == 2
    assert delta("datasetd_ingest_bytes_total") == len(image) + len(text)
    assert delta("datasetd_object_store_duration_seconds_count", operation="put") == 2
    assert {"operation": "put", "le": "+Inf"} in series(
        after, "datasetd_object_store_duration_seconds_bucket"
    )

    pool = db.pool
    assert value(after, "datasetd_db_pool_connections", pool="primary", state="max") == (
        pool.get_max_size()
    )
    in_use = value(after, "datasetd_db_pool_connections", pool="primary", state="in_use")
    idle = value(after, "datasetd_db_pool_connections", pool="primary", state="idle")
    assert in_use >= 0 and idle >= 0 and 1 <= in_use + idle <= pool.get_max_size()
    # Sampled at start-up: every job kind has a queue depth, even an empty one.
    kinds = {labels["kind"] for labels in series(after, "datasetd_jobs_queued")}
    assert {"build_version", "export_version"} <= kinds
    assert {
        labels["kind"] for labels in series(after, "datasetd_jobs_oldest_queued_age_seconds")
    } == (kinds)


async def poll_scrape(http: str, ready: Callable[[Samples], bool]) -> Samples:
    """The first scrape `ready` accepts: a job's duration is observed just after the job
    has made its result visible."""
    deadline = time.monotonic() + 15
    while True:
        samples, _ = await scrape(http)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.1)


async def test_imports_exports_and_jobs_are_counted(
    server: Running, caller: Caller, datasets: Datasets, versions: Versions
) -> None:
    http = f"127.0.0.1:{server.http_port}"
    before, _ = await scrape(http)
    await datasets.CreateDataset(
        dapi.CreateDatasetRequest(app_id=caller.app_id, dataset=dataset_pb2.Dataset(id="ie")),
        metadata=caller.metadata,
    )
    archive = protobuf_archive(texts(f"t{secrets.token_hex(4)}-", 3))
    assert (await import_archive(datasets, caller, "ie", archive)).inputs_created == 3
    await build(versions, caller, "ie", "v1")
    export, data = await exported(
        versions, caller, "ie", "v1", dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF
    )

    def delta(samples: Samples, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    runs = "datasetd_job_duration_seconds_count"
    after = await poll_scrape(
        http,
        lambda s: delta(s, runs, kind="export_version", outcome="succeeded") >= 1,
    )
    assert delta(after, "datasetd_ingest_items_total") == 3
    assert delta(after, "datasetd_ingest_bytes_total") == len(archive)
    assert delta(after, "datasetd_export_items_total") == 3
    assert delta(after, "datasetd_export_bytes_total") == len(data) == export.size
    # A version is READY when created: no build job ran for it.
    assert delta(after, runs, kind="build_version", outcome="succeeded") == 0
    assert delta(after, runs, kind="export_version", outcome="succeeded") >= 1
    assert (
        delta(
            after,
            "datasetd_job_duration_seconds_bucket",
            kind="export_version",
            outcome="succeeded",
            le="+Inf",
        )
        >= 1
    )


async def test_healthz_answers_200_while_serving(server: Running) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.http_port}/healthz") as response,
    ):
        assert response.status == 200
        assert await response.text() == "SERVING\n"
    shown = banner(server.config, server)
    assert f"metrics on http://127.0.0.1:{server.http_port}/metrics" in shown
    assert f"Clarifai REST and downloads on http://127.0.0.1:{server.http_port}/v2" in shown


async def test_healthz_answers_503_once_shutting_down_and_off_starts_no_port(
    stack: Stack,
) -> None:
    base = Config(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        data_dir=stack.data_dir,
        database_url=stack.dsn,
        s3_bucket=stack.s3.bucket,
        shutdown_grace=timedelta(0),
    )
    resources = Resources(await Database.connect(stack.dsn, min_size=1), object_store(stack))
    running = await start(base, resources)
    try:
        url = f"http://127.0.0.1:{running.http_port}/healthz"
        async with aiohttp.ClientSession() as session:
            await running.health_servicer.enter_graceful_shutdown()
            async with session.get(url) as response:
                assert response.status == 503
    finally:
        await running.stop()

    off = dataclasses.replace(base, http_listen="off")
    resources = Resources(await Database.connect(stack.dsn, min_size=1), object_store(stack))
    running = await start(off, resources)
    try:
        assert running.http is None and running.http_port == 0
        assert "http://" not in banner(off, running)
    finally:
        await running.stop()


# --- a real Prometheus ---------------------------------------------------------------------


@asynccontextmanager
async def prometheus(tmp_path: Path, target: str) -> AsyncIterator[str]:
    """The Debian `prometheus` binary scraping `target` every second; yields its address."""
    binary = shutil.which("prometheus")
    assert binary is not None, "prometheus is not installed: run `make prometheus`"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: datasetd\n"
        "    scrape_interval: 1s\n"
        "    scrape_timeout: 900ms\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    address = f"127.0.0.1:{free_port()}"
    log = (tmp_path / "prometheus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address={address}",
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + PROMETHEUS_TIMEOUT
        async with aiohttp.ClientSession() as session:
            while True:
                assert process.returncode is None, (tmp_path / "prometheus.log").read_text()
                try:
                    async with session.get(f"http://{address}/-/ready") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
                await asyncio.sleep(0.2)
        yield address
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


async def query(address: str, promql: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{address}/api/v1/query", params={"query": promql}) as response,
    ):
        body = await response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def poll(address: str, promql: str, expected: float) -> list[dict[str, Any]]:
    """The query's result once its single value is `expected` (Prometheus has scraped
    what the calls counted)."""
    deadline = time.monotonic() + PROMETHEUS_TIMEOUT
    while True:
        result = await query(address, promql)
        if len(result) == 1 and float(result[0]["value"][1]) == expected:
            return result
        assert time.monotonic() < deadline, f"{promql}: {result}"
        await asyncio.sleep(0.5)


async def test_prometheus_scrapes_datasetd_and_finds_its_series(
    stack: Stack, caller: Caller, tmp_path: Path
) -> None:
    async with (
        run_server(stack_env(stack)) as process,
        prometheus(tmp_path, process.http_address) as address,
        stub_for(process.address) as datasets,
    ):
        await datasets.CreateDataset(
            dapi.CreateDatasetRequest(app_id=caller.app_id, dataset=dataset_pb2.Dataset(id="p")),
            metadata=caller.metadata,
        )
        await datasets.GetDataset(
            dapi.GetDatasetRequest(app_id=caller.app_id, dataset_id="p"), metadata=caller.metadata
        )
        for missing in ("nope-1", "nope-2"):
            error = await call_error(
                datasets.GetDataset(
                    dapi.GetDatasetRequest(app_id=caller.app_id, dataset_id=missing),
                    metadata=caller.metadata,
                )
            )
            assert error.code == grpc.StatusCode.NOT_FOUND

        # A fresh process: the counts are exactly the calls above.
        found = await poll(
            address, f'datasetd_rpc_requests_total{{code="NOT_FOUND",method="{GET_DATASET}"}}', 2
        )
        assert found[0]["metric"]["job"] == "datasetd"
        assert found[0]["metric"]["instance"] == process.http_address
        await poll(address, f'datasetd_rpc_requests_total{{code="OK",method="{GET_DATASET}"}}', 1)
        await poll(address, f'datasetd_rpc_duration_seconds_count{{method="{GET_DATASET}"}}', 3)
        buckets = await query(
            address, f'datasetd_rpc_duration_seconds_bucket{{method="{GET_DATASET}"}}'
        )
        assert {b["metric"]["le"] for b in buckets} >= {"0.001", "1.0", "60.0", "+Inf"}
        await poll(address, 'datasetd_db_pool_connections{pool="primary",state="max"}', 10)
        await poll(address, 'up{job="datasetd"}', 1)
