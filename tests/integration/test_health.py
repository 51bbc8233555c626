"""Health reports SERVING only while PostgreSQL and the bucket answer."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from grpc_health.v1 import health, health_pb2

from service.app import Resources, _watch_health
from service.storage.db import Database
from service.storage.objectstore import ObjectStore
from tests.conftest import Stack, object_store


async def _status_after_first_probe(resources: Resources) -> int:
    servicer = health.aio.HealthServicer()
    task = asyncio.create_task(_watch_health(servicer, resources))
    try:
        for _ in range(200):
            await asyncio.sleep(0.05)
            with contextlib.suppress(Exception):
                # No context needed: Check only uses it to abort for unknown services.
                no_context: Any = None
                response = await servicer.Check(
                    health_pb2.HealthCheckRequest(service=""), no_context
                )
                return int(response.status)
        raise AssertionError("no health status was set")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_serving_when_database_and_bucket_answer(stack: Stack, db: Database) -> None:
    resources = Resources(db, object_store(stack))
    assert await _status_after_first_probe(resources) == health_pb2.HealthCheckResponse.SERVING


async def test_not_serving_when_the_bucket_is_unreachable(stack: Stack, db: Database) -> None:
    missing_bucket = ObjectStore(
        stack.s3.endpoint, stack.s3.access_key, stack.s3.secret_key, "no-such-bucket"
    )
    resources = Resources(db, missing_bucket)
    status = await _status_after_first_probe(resources)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
