"""The HTTP port (DATASETD_HTTP_LISTEN): Prometheus metrics and a health probe, served by
aiohttp on the event loop of the gRPC server.

`build_application` returns a plain aiohttp Application so that more routes (REST) can be
added to it before it starts."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from service.observability.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"


def build_application(
    metrics: Callable[[], bytes], serving: Callable[[], Awaitable[bool]]
) -> web.Application:
    """`metrics` renders the Prometheus text; `serving` tells whether the gRPC health
    service says SERVING (then /healthz answers 200, else 503)."""

    async def get_metrics(request: web.Request) -> web.Response:
        response = web.Response(body=metrics())
        # Set whole: aiohttp's content_type argument refuses the version parameter.
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def get_health(request: web.Request) -> web.Response:
        if await serving():
            return web.Response(text="SERVING\n")
        return web.Response(status=503, text="NOT_SERVING\n")

    app = web.Application()
    app.router.add_get(METRICS_PATH, get_metrics)
    app.router.add_get(HEALTH_PATH, get_health)
    return app


def split_listen(listen: str) -> tuple[str, int]:
    """ "host:port" (IPv6 in brackets) as aiohttp's TCPSite takes it."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def http_address(listen: str, port: int) -> str:
    """The "host:port" a client reaches a port bound per `listen` at (a wildcard bind is
    reached on loopback)."""
    host, _ = split_listen(listen)
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class HttpServer:
    runner: web.AppRunner
    port: int

    @classmethod
    async def start(
        cls,
        app: web.Application,
        listen: str,
        ssl_context: ssl.SSLContext | None = None,
        *,
        reuse_port: bool = False,
    ) -> HttpServer:
        """Serves `app` on `listen` ("host:port"; port 0 picks a free one), over TLS with
        `ssl_context`; `reuse_port` shares the port with the other worker processes."""
        host, port = split_listen(listen)
        # No access log: a Prometheus scrape every few seconds would flood it.
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(
                runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port or None
            )
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        bound: int = runner.addresses[0][1]
        return cls(runner, bound)

    async def stop(self) -> None:
        await self.runner.cleanup()
