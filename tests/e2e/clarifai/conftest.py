"""What the V2 tests share: clarifai-grpc's own stub over a channel to the real server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from clarifai_grpc.channel.clarifai_channel import ClarifaiChannel
from clarifai_grpc.grpc.api import service_pb2_grpc

from service.app import Running


@pytest.fixture(scope="session")
async def v2(server: Running) -> AsyncIterator[service_pb2_grpc.V2Stub]:
    # clarifai-grpc's stub needs one of its channels made first (its response
    # deserializer wrapper is a module global set there); that channel is never used.
    ClarifaiChannel.get_insecure_grpc_channel(base="127.0.0.1", port=server.port).close()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield service_pb2_grpc.V2Stub(channel)
