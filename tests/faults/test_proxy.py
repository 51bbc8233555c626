"""The fault proxy itself, against a local echo server: each mode does what it says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.faults.proxy import FaultProxy, Upstream, _abort_with_rst


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FaultProxy(Upstream.tcp(f"127.0.0.1:{port}")) as proxy:
        yield proxy
    server.close()


async def _round_trip(proxy: FaultProxy, payload: bytes, within: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), within)
    finally:
        writer.close()


async def test_passes_bytes_through_both_ways(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: several chunks each way
    assert await _round_trip(proxy, payload) == payload


async def test_latency_delays_each_direction(proxy: FaultProxy) -> None:
    proxy.set_latency(0.3)
    started = time.monotonic()
    assert await _round_trip(proxy, b"ping") == b"ping"
    # Once on the way up, once on the way down.
    assert time.monotonic() - started >= 0.6
    proxy.set_latency(0.0)
    started = time.monotonic()
    assert await _round_trip(proxy, b"ping") == b"ping"
    assert time.monotonic() - started < 0.3


async def test_blackhole_holds_bytes_until_it_heals(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"before")
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"before"
    proxy.blackhole()
    writer.write(b"during")
    await writer.drain()
    # The connection stays open, silent: neither an answer nor an error.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(6), 0.5)
    # New connections are accepted, and silent as well.
    _, other = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), 2)
    proxy.pass_through()
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"during"
    writer.close()
    other.close()


async def test_reset_drops_open_connections_and_refuses_new_ones(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
    proxy.reset()
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError, BrokenPipeError)):
        await _round_trip(proxy, b"y")
    assert proxy.open_connections == 0
    proxy.pass_through()
    assert await _round_trip(proxy, b"z") == b"z"


async def test_an_unreachable_upstream_closes_the_client_connection() -> None:
    with_nothing = Upstream.unix("/nonexistent/.s.PGSQL.5432")
    async with FaultProxy(with_nothing) as proxy:
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError, BrokenPipeError)):
            await _round_trip(proxy, b"hello")


async def test_an_upstream_reset_closes_the_client_connection() -> None:
    """An upstream that dies with a RST (as a killed PostgreSQL backend can) must not leave
    the client waiting on a connection that looks open."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FaultProxy(Upstream.tcp(f"127.0.0.1:{port}")) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"query")
        await writer.drain()
        for _ in range(100):
            if accepted:
                break
            await asyncio.sleep(0.01)
        _abort_with_rst(accepted[0])
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 5)
        writer.close()
    server.close()
