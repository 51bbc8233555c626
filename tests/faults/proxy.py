"""A small asyncio TCP proxy that injects network faults between datasetd and a dependency.

It listens on a loopback port and forwards every connection to an upstream (a TCP address,
or a unix socket: the embedded PostgreSQL listens on one only). At any moment it is in one
of three modes, plus an added latency:

- `pass_through()`: bytes flow both ways (delayed by `latency` seconds, if set);
- `blackhole()`: connections are accepted and kept open, but nothing is forwarded either
  way until the mode changes (bytes already sent wait, as in a network partition: they
  arrive once it heals). The peer sees neither an error nor an answer, only silence;
- `reset()`: every open connection is closed with a TCP RST, and new ones are accepted and
  reset at once, as by a dependency that has crashed or a firewall that rejects.

Used by the fault tests and by bench/bench_faults.py; it is test tooling, not a service.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import socket
import struct
from collections.abc import Awaitable, Callable

_CHUNK = 64 * 1024


class Mode(enum.Enum):
    PASS = "pass"
    BLACKHOLE = "blackhole"
    RESET = "reset"


@dataclasses.dataclass(frozen=True)
class Upstream:
    """Where the proxy forwards to: `host:port`, or a unix socket path."""

    host: str = ""
    port: int = 0
    unix_path: str = ""

    @classmethod
    def tcp(cls, endpoint: str) -> Upstream:
        host, _, port = endpoint.rpartition(":")
        return cls(host=host, port=int(port))

    @classmethod
    def unix(cls, path: str) -> Upstream:
        return cls(unix_path=path)

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.unix_path:
            return await asyncio.open_unix_connection(self.unix_path)
        return await asyncio.open_connection(self.host, self.port)


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Closes the connection with a RST instead of a FIN: SO_LINGER with a zero timeout
    makes the kernel drop the connection and reset the peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter) -> None:
        self._proxy = proxy
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        _abort_with_rst(self.client)
        if self.upstream is not None:
            self.upstream.transport.abort()
        for task in self.tasks:
            task.cancel()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copies one direction. A reader task and a writer task joined by a queue, so
        that added latency delays every chunk by the same amount without cutting the
        throughput: chunks read during the delay are on their way too."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def read() -> None:
            while True:
                await self._proxy.flowing()
                try:
                    data = await reader.read(_CHUNK)
                except OSError:
                    # A reset from this side ends the direction like an EOF (b""): the
                    # writer must not wait forever for bytes that will never come.
                    data = b""
                await queue.put((loop.time() + self._proxy.latency, data))
                if not data:
                    return

        async def write() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                # A chunk read before a blackhole began is held too.
                await self._proxy.flowing()
                if not data:
                    return
                writer.write(data)
                await writer.drain()

        reading = asyncio.create_task(read())
        try:
            await write()
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading


class FaultProxy:
    """See the module docstring. `async with FaultProxy(upstream) as proxy:` listens on
    127.0.0.1:`proxy.port` until the block ends."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.mode = Mode.PASS
        self.latency = 0.0
        self.accepted = 0  # connections accepted since start, for the tests' own checks
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "the proxy is not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def resetting(self) -> bool:
        # A property, so that a check after an await sees the mode of now.
        return self.mode is Mode.RESET

    @property
    def open_connections(self) -> int:
        return len(self._links)

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.reset()
        await asyncio.sleep(0)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- faults -----------------------------------------------------------------------

    def pass_through(self) -> None:
        self.mode = Mode.PASS
        self._flowing.set()

    def blackhole(self) -> None:
        self.mode = Mode.BLACKHOLE
        self._flowing.clear()

    def reset(self) -> None:
        self.mode = Mode.RESET
        # Held bytes are dropped with their connections; new ones never flow.
        self._flowing.set()
        for link in list(self._links):
            link.reset()

    def set_latency(self, seconds: float) -> None:
        self.latency = seconds

    async def flowing(self) -> None:
        await self._flowing.wait()

    # --- connections ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode is Mode.RESET:
            _abort_with_rst(writer)
            return
        link = _Link(self, writer)
        self._links.add(link)
        try:
            # In a blackhole the client waits, connected, for an upstream it never gets.
            await self.flowing()
            if self.resetting:
                return
            try:
                up_reader, up_writer = await self.upstream.open()
            except OSError:
                # The dependency is down: the client sees its connection reset, as it
                # would reaching the dependency directly.
                return
            link.upstream = up_writer
            await _first_done(
                link,
                lambda: link.pump(reader, up_writer),
                lambda: link.pump(up_reader, writer),
            )
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._links.discard(link)
            if link.upstream is not None:
                link.upstream.transport.abort()
            if self.resetting or link.upstream is None:
                _abort_with_rst(writer)
            else:
                writer.close()


async def _first_done(link: _Link, *directions: Callable[[], Awaitable[None]]) -> None:
    """Runs both directions until either ends (EOF or error): a connection closed on one
    side is closed on the other, as neither PostgreSQL's protocol nor HTTP half-closes."""

    async def run(direction: Callable[[], Awaitable[None]]) -> None:
        await direction()

    link.tasks = [asyncio.create_task(run(d)) for d in directions]
    try:
        await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in link.tasks:
            task.cancel()
        await asyncio.gather(*link.tasks, return_exceptions=True)
