"""UrlFetcher against real local HTTP(S) servers, with every connection and DNS lookup
watched: nothing in this module may send a packet to a non-loopback address."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from service.adapters.url_fetch import FetchedMedia, UrlFetcher
from service.domain.errors import InvalidArgument

LOOPBACK_ONLY = [ipaddress.ip_network("127.0.0.1/32")]
BODY = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2


class RecordingServer(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[str]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RecordingServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        route = getattr(self, "route_" + url.path.strip("/").split("/")[0].replace("-", "_"), None)
        if route is None:
            self.reply(404, b"not found")
            return
        # The client hangs up on purpose in some tests (size cap, timeout).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
            route(url.path, query)

    def reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str, status: int = 302) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_ok(self, path: str, query: dict[str, str]) -> None:
        self.reply(200, BODY, "image/png")

    def route_host(self, path: str, query: dict[str, str]) -> None:
        self.reply(200, (self.headers.get("Host") or "").encode())

    def route_sized(self, path: str, query: dict[str, str]) -> None:
        self.reply(200, b"x" * int(query["n"]))

    def route_stream(self, path: str, query: dict[str, str]) -> None:
        # No length: the body ends when the connection closes, and this one never ends.
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for _ in range(100_000):
            self.wfile.write(b"y" * 65536)

    def route_chunked(self, path: str, query: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        count = int(query.get("chunks", "3"))
        for index in range(count):
            chunk = bytes([65 + index % 26]) * 100
            self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")

    def route_slow(self, path: str, query: dict[str, str]) -> None:
        time.sleep(3)
        self.reply(200, b"too late")

    def route_drip(self, path: str, query: dict[str, str]) -> None:
        # Each byte arrives well within any per-read timeout; only a whole-fetch deadline
        # stops this.
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        for _ in range(100):
            self.wfile.write(b"z")
            self.wfile.flush()
            time.sleep(0.05)

    def route_redirect(self, path: str, query: dict[str, str]) -> None:
        self.redirect(query["to"], int(query.get("status", "302")))

    def route_chain(self, path: str, query: dict[str, str]) -> None:
        remaining = int(path.rsplit("/", 1)[1])
        self.redirect("/ok" if remaining == 0 else f"/chain/{remaining - 1}")

    def route_not_modified(self, path: str, query: dict[str, str]) -> None:
        self.send_response(304)
        self.end_headers()


@dataclass
class Server:
    host: str
    port: int
    httpd: RecordingServer
    scheme: str = "http"

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests


def serve(host: str, context: ssl.SSLContext | None = None) -> Iterator[Server]:
    httpd = RecordingServer((host, 0), Handler)
    httpd.requests = []
    if context is not None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(host, httpd.server_address[1], httpd, "https" if context else "http")
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    yield from serve("127.0.0.1")


@pytest.fixture(scope="module")
def other_server() -> Iterator[Server]:
    """On 127.0.0.2: loopback, but outside the fetcher's allowed network."""
    yield from serve("127.0.0.2")


@pytest.fixture(autouse=True)
def clear_requests(server: Server, other_server: Server) -> None:
    server.requests.clear()
    other_server.requests.clear()


@dataclass
class Network:
    """Records every connection and name lookup the fetcher makes. Connections to anything
    but loopback fail the test instead of being made; names resolve only from `names`."""

    connections: list[str] = field(default_factory=list)
    lookups: list[str] = field(default_factory=list)
    names: dict[str, list[list[str]]] = field(default_factory=dict)

    def answer(self, name: str, *answers: list[str]) -> None:
        self.names[name] = list(answers)


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Network:
    watched = Network()
    real_open = asyncio.open_connection
    real_getaddrinfo = socket.getaddrinfo

    async def open_connection(host: str, port: int, **kwargs: Any) -> Any:
        watched.connections.append(host)
        if not ipaddress.ip_address(host).is_loopback:
            raise AssertionError(f"the fetcher tried to connect to {host}")
        return await real_open(host, port, **kwargs)

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        watched.lookups.append(host)
        if host in watched.names:
            answers = watched.names[host]
            addresses = answers.pop(0) if len(answers) > 1 else answers[0]
            return [
                (
                    socket.AF_INET6 if ":" in a else socket.AF_INET,
                    socket.SOCK_STREAM,
                    6,
                    "",
                    (a, port),
                )
                for a in addresses
            ]
        if host == "localhost":
            return real_getaddrinfo("127.0.0.1", port, *args, **kwargs)
        # Numeric forms only ("2130706433", "127.1"): no query leaves the machine.
        kwargs["flags"] = socket.AI_NUMERICHOST
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(asyncio, "open_connection", open_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return watched


def fetcher(**options: Any) -> UrlFetcher:
    settings: dict[str, Any] = {
        "max_bytes": 4096,
        "timeout_seconds": 5.0,
        "allowed_networks": LOOPBACK_ONLY,
    }
    settings.update(options)
    return UrlFetcher(**settings)


async def refused(fetch: UrlFetcher, url: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        await fetch.fetch(url, "inputs[0].data.image.url")
    assert info.value.violations[0].field == "inputs[0].data.image.url"
    return info.value


# --- allowed fetches ------------------------------------------------------------------------


async def test_fetch_returns_body_type_and_final_url(server: Server, network: Network) -> None:
    result = await fetcher().fetch(server.url("/ok"), "url")
    assert result == FetchedMedia(BODY, "image/png", server.url("/ok"))
    assert network.connections == ["127.0.0.1"]


async def test_chunked_body_with_extensions_and_trailers(server: Server, network: Network) -> None:
    result = await fetcher().fetch(server.url("/chunked?chunks=3"), "url")
    assert result.data == b"A" * 100 + b"B" * 100 + b"C" * 100
    assert result.content_type == "application/octet-stream"


async def test_body_of_exactly_max_bytes_is_accepted(server: Server, network: Network) -> None:
    result = await fetcher(max_bytes=1000).fetch(server.url("/sized?n=1000"), "url")
    assert len(result.data) == 1000


async def test_relative_redirects_are_followed(server: Server, network: Network) -> None:
    result = await fetcher(max_redirects=5).fetch(server.url("/chain/4"), "url")
    assert result.final_url == server.url("/ok")
    assert result.data == BODY
    assert len(server.requests) == 6  # five redirects, then the body


async def test_redirect_into_another_allowed_network_is_rechecked_and_followed(
    server: Server, other_server: Server, network: Network
) -> None:
    both = [*LOOPBACK_ONLY, ipaddress.ip_network("127.0.0.2/32")]
    target = other_server.url("/ok")
    result = await fetcher(allowed_networks=both).fetch(
        server.url(f"/redirect?to={quote(target)}&status=307"), "url"
    )
    assert result.final_url == target
    assert network.connections == ["127.0.0.1", "127.0.0.2"]


async def test_host_header_keeps_the_name_while_the_checked_address_is_dialled(
    server: Server, network: Network
) -> None:
    # A rebinding DNS server answers 127.0.0.1 first, an internal address afterwards.
    network.answer("media.test", ["127.0.0.1"], ["10.9.9.9"])
    result = await fetcher().fetch(server.url("/host", host="media.test"), "url")
    assert result.data == f"media.test:{server.port}".encode()
    assert network.lookups == ["media.test"]
    assert network.connections == ["127.0.0.1"]


async def test_host_resolving_to_several_allowed_addresses_tries_the_next_one(
    server: Server, network: Network
) -> None:
    network.answer("multi.test", ["::1", "127.0.0.1"])
    allowed = [*LOOPBACK_ONLY, ipaddress.ip_network("::1/128")]
    result = await fetcher(allowed_networks=allowed).fetch(
        server.url("/ok", host="multi.test"), "url"
    )
    assert result.data == BODY
    assert network.connections == ["::1", "127.0.0.1"]  # nothing listens on [::1]:port


# --- failures -------------------------------------------------------------------------------


async def test_http_error_status_fails_naming_the_status(server: Server, network: Network) -> None:
    error = await refused(fetcher(), server.url("/missing"))
    assert error.reason == "URL_FETCH_FAILED"
    assert "HTTP 404" in error.message


async def test_non_success_status_without_location_fails(server: Server, network: Network) -> None:
    error = await refused(fetcher(), server.url("/not-modified"))
    assert error.reason == "URL_FETCH_FAILED"
    assert "HTTP 304" in error.message


async def test_declared_length_over_the_cap_is_refused_before_reading(
    server: Server, network: Network
) -> None:
    error = await refused(fetcher(max_bytes=1000), server.url("/sized?n=1001"))
    assert error.reason == "URL_TOO_LARGE"
    assert "1001 bytes" in error.message


async def test_endless_body_is_cut_off_at_the_cap(server: Server, network: Network) -> None:
    started = time.perf_counter()
    error = await refused(fetcher(max_bytes=100_000, timeout_seconds=10), server.url("/stream"))
    assert error.reason == "URL_TOO_LARGE"
    assert time.perf_counter() - started < 5  # the stream would run for 6.5 GB


async def test_endless_chunked_body_is_cut_off_at_the_cap(server: Server, network: Network) -> None:
    error = await refused(fetcher(max_bytes=1000), server.url("/chunked?chunks=1000000"))
    assert error.reason == "URL_TOO_LARGE"


async def test_slow_server_times_out(server: Server, network: Network) -> None:
    started = time.perf_counter()
    error = await refused(fetcher(timeout_seconds=0.3), server.url("/slow"))
    assert time.perf_counter() - started < 2
    assert error.reason == "URL_FETCH_FAILED"
    assert "timed out" in error.message


async def test_dripping_body_hits_the_whole_fetch_deadline(
    server: Server, network: Network
) -> None:
    started = time.perf_counter()
    error = await refused(fetcher(timeout_seconds=0.5), server.url("/drip"))
    assert time.perf_counter() - started < 2
    assert "timed out" in error.message


async def test_connection_refused_fails(network: Network) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: nothing answers there
        error = await refused(fetcher(), f"http://127.0.0.1:{port}/")
    assert error.reason == "URL_FETCH_FAILED"
    assert "cannot connect" in error.message


async def test_unresolvable_host_fails(network: Network) -> None:
    error = await refused(fetcher(), "http://no-such-host.test/x")
    assert error.reason == "URL_FETCH_FAILED"
    assert "cannot resolve" in error.message


async def test_redirect_to_a_forbidden_address_is_refused_before_connecting(
    server: Server, other_server: Server, network: Network
) -> None:
    target = other_server.url("/ok")
    error = await refused(fetcher(), server.url(f"/redirect?to={quote(target)}"))
    assert error.reason == "URL_FORBIDDEN"
    assert "127.0.0.2" in error.message
    assert other_server.requests == []
    assert network.connections == ["127.0.0.1"]


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://internal.test/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
    ],
)
async def test_redirect_to_internal_or_odd_targets_is_refused(
    server: Server, network: Network, target: str
) -> None:
    network.answer("internal.test", ["192.168.0.10"])
    error = await refused(fetcher(), server.url(f"/redirect?to={quote(target)}"))
    assert error.reason == "URL_FORBIDDEN"
    assert network.connections == ["127.0.0.1"]


async def test_redirect_chain_longer_than_the_limit_fails(server: Server, network: Network) -> None:
    error = await refused(fetcher(max_redirects=5), server.url("/chain/5"))
    assert error.reason == "URL_FETCH_FAILED"
    assert "redirected more than 5 times" in error.message
    assert len(server.requests) == 6  # the sixth redirect is not followed


async def test_no_redirects_allowed(server: Server, network: Network) -> None:
    error = await refused(fetcher(max_redirects=0), server.url("/chain/0"))
    assert "more than 0 times" in error.message


# --- refusals with the default (empty) allow-list -------------------------------------------

FORBIDDEN_ADDRESSES = [
    ("http://10.0.0.1/", "private"),
    ("http://192.168.1.20:8080/x", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://169.254.169.254/latest/meta-data", "cloud metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data", "cloud metadata"),
    ("http://169.254.10.10/", "link-local"),
    ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:169.254.169.254]/", "cloud metadata"),
    ("http://[::ffff:10.1.1.1]/", "private"),
    ("http://[2002:a00:1::1]/", "private"),  # 6to4 wrapping 10.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/", "cloud metadata"),  # NAT64 wrapping 169.254.169.254
    ("http://[fe80::1%25eth0]/", "link-local"),
    ("http://[fc00::1]/", "private"),
    ("http://224.0.0.1/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://192.0.2.1/", "private"),  # documentation range
    ("http://2130706433/", "loopback"),  # 127.0.0.1 as one decimal number
    ("http://0x7f000001/", "loopback"),
    ("https://127.1/", "loopback"),
]


@pytest.mark.parametrize(("url", "why"), FORBIDDEN_ADDRESSES)
async def test_internal_addresses_are_refused_without_connecting(
    network: Network, url: str, why: str
) -> None:
    error = await refused(UrlFetcher(max_bytes=1000, timeout_seconds=2), url)
    assert error.reason == "URL_FORBIDDEN"
    assert why in error.message
    assert network.connections == []


async def test_loopback_server_is_refused_without_connecting(
    server: Server, network: Network
) -> None:
    fetch = UrlFetcher(max_bytes=1000, timeout_seconds=2)
    for url in (server.url("/ok"), server.url("/ok", host="localhost")):
        error = await refused(fetch, url)
        assert error.reason == "URL_FORBIDDEN"
        assert "loopback" in error.message
    assert network.connections == []
    assert server.requests == []


async def test_name_resolving_to_any_forbidden_address_is_refused(network: Network) -> None:
    network.answer("internal.test", ["10.20.30.40"])
    network.answer("mixed.test", ["127.0.0.1", "10.20.30.40"])
    fetch = fetcher()
    error = await refused(fetch, "http://internal.test/a.jpg")
    assert "internal.test resolves to 10.20.30.40" in error.message
    error = await refused(fetch, "http://mixed.test/a.jpg")
    assert "10.20.30.40" in error.message
    assert network.connections == []


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/a.jpg",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "data:image/png;base64,AAAA",
        "//example.com/a.jpg",
        "example.com/a.jpg",
        "http:///a.jpg",
        "http://user:secret@example.com/a.jpg",
        "http://example.com:99999/",
        "http://example.com:0/",
        "http://exa mple.com/",
        "http://[::1/",
    ],
)
async def test_unsupported_or_malformed_urls_are_refused_before_any_lookup(
    network: Network, url: str
) -> None:
    error = await refused(fetcher(), url)
    assert error.reason == "URL_FORBIDDEN"
    assert network.lookups == []
    assert network.connections == []


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        UrlFetcher(max_bytes=0, timeout_seconds=1)
    with pytest.raises(ValueError):
        UrlFetcher(max_bytes=1, timeout_seconds=0)
    with pytest.raises(ValueError):
        UrlFetcher(max_bytes=1, timeout_seconds=1, max_redirects=-1)


# --- https ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=media.test", "-addext", "subjectAltName=DNS:media.test",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tls_server(certificate: tuple[Path, Path]) -> Iterator[Server]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    yield from serve("127.0.0.1", context)


async def test_https_verifies_the_certificate_against_the_url_host(
    tls_server: Server, certificate: tuple[Path, Path], network: Network
) -> None:
    network.answer("media.test", ["127.0.0.1"])
    trusting = ssl.create_default_context(cafile=str(certificate[0]))
    fetch = fetcher(ssl_context=trusting)
    result = await fetch.fetch(tls_server.url("/host", host="media.test"), "url")
    assert result.data == f"media.test:{tls_server.port}".encode()
    assert network.connections == ["127.0.0.1"]
    # The same server by address: the certificate does not name 127.0.0.1.
    error = await refused(fetch, tls_server.url("/host", host="127.0.0.1"))
    assert error.reason == "URL_FETCH_FAILED"
    assert "certificate" in error.message.lower()
