"""Fetching media from caller-supplied URLs without letting the caller reach our network.

A URL from a request is an instruction to make a connection from inside our network, so
every hop is checked before any packet is sent: the scheme, then every address the host
resolves to. The connection then goes to the checked address itself; resolving again
would let a DNS server that answers differently the second time (DNS rebinding) steer us
to an internal address. TLS still verifies the certificate against the original host
name, so pinning the address does not weaken https.

The HTTP/1.1 client is a small one on asyncio streams rather than http.client in a
thread: it can only be given a pre-resolved address through its internals, and a thread
blocked in recv() cannot be cancelled when the overall deadline passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, urljoin, urlsplit

from service.domain.errors import InvalidArgument

# The result type belongs to the domain's MediaFetcher port, so that UrlFetcher satisfies it;
# re-exported here for callers of this module.
from service.domain.input_drafts import FetchedMedia

__all__ = ["FetchedHead", "FetchedMedia", "UrlFetcher"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DEFAULT_PORTS = {"http": 80, "https": 443}
_METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
_CARRIER_GRADE_NAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_HEADER_BYTES = 64 * 1024
_MAX_TRAILER_LINES = 100
_READ_SIZE = 64 * 1024
# Characters left as they are when percent-encoding a request target: RFC 3986 reserved and
# unreserved characters plus "%" so that an already encoded URL is not encoded twice.
_TARGET_SAFE = "/?[]@!$&'()*+,;=-._~:%"
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_HOST_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
_T = TypeVar("_T")


@dataclass(frozen=True)
class _Target:
    url: str
    https: bool
    host: str  # IDNA-encoded name or an IP literal without brackets
    port: int
    host_header: str
    request_target: str


@dataclass(frozen=True)
class _Response:
    status: int
    reason: str
    headers: http.client.HTTPMessage


@dataclass(frozen=True)
class FetchedHead:
    """The first bytes of a body; `complete` when they are all of it."""

    data: bytes
    complete: bool
    final_url: str


# Reads the body of a successful answer: (reader, response, target of the last hop).
_BodyReader = Callable[[asyncio.StreamReader, _Response, _Target], Awaitable[_T]]


class UrlFetcher:
    """Downloads a URL's body under size, time and redirect limits, refusing any hop whose
    host resolves to a non-public address unless it lies in `allowed_networks`. At most
    `concurrency` requests are open at once; the others wait (outside their time limit)."""

    def __init__(
        self,
        *,
        max_bytes: int,
        timeout_seconds: float,
        max_redirects: int = 5,
        allowed_networks: Sequence[IPNetwork] = (),
        ssl_context: ssl.SSLContext | None = None,
        concurrency: int = 32,
    ) -> None:
        if max_bytes <= 0 or timeout_seconds <= 0 or max_redirects < 0 or concurrency <= 0:
            raise ValueError(
                "max_bytes, timeout_seconds and concurrency must be positive, max_redirects >= 0"
            )
        self._max_bytes = max_bytes
        self._timeout = timeout_seconds
        self._max_redirects = max_redirects
        self._allowed = tuple(allowed_networks)
        self._ssl = ssl_context or ssl.create_default_context()
        self._slots = asyncio.Semaphore(concurrency)

    async def fetch(self, url: str, field: str) -> FetchedMedia:
        async def read(
            reader: asyncio.StreamReader, response: _Response, target: _Target
        ) -> FetchedMedia:
            data = await self._read_body(reader, response.headers, target, field)
            content_type = (response.headers.get("Content-Type") or "").strip()
            return FetchedMedia(data, content_type or "application/octet-stream", target.url)

        return await self._limited(url, field, None, read)

    async def fetch_head(self, url: str, field: str, size: int) -> FetchedHead:
        """The first `size` bytes of the body (all of it when shorter), asked for with
        `Range: bytes=0-(size-1)`. A server that ignores Range answers 200 with the whole
        body, of which only the first `size` bytes are read before the connection is
        dropped. Every hop is checked exactly as for `fetch`."""
        if size <= 0:
            raise ValueError("size must be positive")

        async def read(
            reader: asyncio.StreamReader, response: _Response, target: _Target
        ) -> FetchedHead:
            return await self._read_head(reader, response, target, field, size)

        return await self._limited(url, field, size, read)

    async def _limited(
        self, url: str, field: str, first_bytes: int | None, read: _BodyReader[_T]
    ) -> _T:
        async with self._slots:
            try:
                async with asyncio.timeout(self._timeout):
                    return await self._request(url, field, first_bytes, read)
            except TimeoutError:
                raise _failed(
                    field, f"fetching {url} timed out after {self._timeout:g} seconds"
                ) from None

    async def _request(
        self, url: str, field: str, first_bytes: int | None, read: _BodyReader[_T]
    ) -> _T:
        current = url
        redirects = 0
        while True:
            target = _parse_target(current, field)
            addresses = await self._resolve(target, field)
            reader, writer = await self._connect(target, addresses, field)
            try:
                response = await _send_request(reader, writer, target, field, first_bytes)
                location = response.headers.get("Location")
                if response.status in _REDIRECT_STATUSES and location:
                    if redirects == self._max_redirects:
                        raise _failed(
                            field,
                            f"fetching {url} was redirected more than {self._max_redirects} times",
                        )
                    redirects += 1
                    current = urljoin(current, location.strip())
                    continue
                # 416 to a range from byte 0: the body is empty (_read_head says so).
                ranged_empty = first_bytes is not None and response.status == 416
                if not 200 <= response.status < 300 and not ranged_empty:
                    raise _failed(
                        field,
                        f"{current} answered HTTP {response.status} {response.reason}".rstrip(),
                    )
                return await read(reader, response, target)
            finally:
                # Abort rather than close: nothing more is wanted from the peer (a ranged
                # read may leave most of a body unread), and a TLS close handshake with a
                # misbehaving server could eat into the deadline.
                writer.transport.abort()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _resolve(self, target: _Target, field: str) -> list[IPAddress]:
        literal = _ip_literal(target.host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                infos = await asyncio.to_thread(
                    socket.getaddrinfo, target.host, target.port, type=socket.SOCK_STREAM
                )
            except (OSError, UnicodeError) as exc:
                raise _failed(field, f"cannot resolve {target.host}: {exc}") from None
            addresses = []
            for info in infos:
                address = _ip_literal(str(info[4][0]))
                if address is not None and address not in addresses:
                    addresses.append(address)
            if not addresses:
                raise _failed(field, f"{target.host} has no IP address")
        # Every address is checked, not just the one we would use: a name that resolves to
        # both a public and an internal address is an attack or a misconfiguration.
        for address in addresses:
            refusal = self._refusal(address)
            if refusal is not None:
                shown = "" if literal is not None else f"{target.host} resolves to "
                raise _forbidden(field, f"{target.url}: {shown}{address}, {refusal}")
        return addresses

    def _refusal(self, address: IPAddress) -> str | None:
        """Why connecting to `address` is not allowed, or None when it is."""
        embedded = _embedded_ipv4(address)
        for candidate in (address, embedded):
            if candidate is not None and any(candidate in network for network in self._allowed):
                return None
        if embedded is not None:
            why = _non_public(embedded)
            if why is not None:
                return f"an IPv4 address embedded in IPv6 that is {why}"
        why = _non_public(address)
        return None if why is None else f"which is {why}"

    async def _connect(
        self, target: _Target, addresses: list[IPAddress], field: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        errors: list[str] = []
        for address in addresses:
            # Connect to the checked address itself; an IPv4-mapped address goes out as
            # plain IPv4 so that it also works on hosts with IPv6 disabled.
            host = str(_mapped_ipv4(address) or address)
            try:
                return await asyncio.open_connection(
                    host,
                    target.port,
                    ssl=self._ssl if target.https else None,
                    server_hostname=target.host if target.https else None,
                    limit=_MAX_HEADER_BYTES,
                )
            except OSError as exc:
                errors.append(f"{address}: {exc}")
        raise _failed(field, f"cannot connect to {target.url}: {'; '.join(errors)}")

    async def _read_body(
        self,
        reader: asyncio.StreamReader,
        headers: http.client.HTTPMessage,
        target: _Target,
        field: str,
    ) -> bytes:
        with _reading(target, field):
            if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
                return await self._read_chunked(reader, target, field)
            lengths = {value.strip() for value in headers.get_all("Content-Length") or []}
            if lengths:
                length = _content_length(lengths)
                if length is None:
                    raise _failed(field, f"{target.url} sent an invalid Content-Length")
                if length > self._max_bytes:
                    raise self._too_large(field, target, f"{length} bytes")
                return await reader.readexactly(length)
            return await self._read_to_end(reader, target, field)

    async def _read_head(
        self,
        reader: asyncio.StreamReader,
        response: _Response,
        target: _Target,
        field: str,
        size: int,
    ) -> FetchedHead:
        if response.status == 416:
            return FetchedHead(b"", True, target.url)
        total: int | None = None
        if response.status == 206:
            span = _content_range(response.headers.get("Content-Range"))
            if span is None or span[0] != 0:
                raise _failed(
                    field, f"{target.url} answered the range request with an invalid Content-Range"
                )
            total = span[1]
        with _reading(target, field):
            data, ended = await _read_prefix(reader, response.headers, target, field, size)
        if response.status == 206:
            # A server may send less than asked; only the total tells where the body ends
            # (an unknown total: a short part must be the end).
            ended = len(data) >= total if total is not None else len(data) < size
        return FetchedHead(data, ended, target.url)

    async def _read_to_end(
        self, reader: asyncio.StreamReader, target: _Target, field: str
    ) -> bytes:
        body = bytearray()
        while chunk := await reader.read(_READ_SIZE):
            body += chunk
            if len(body) > self._max_bytes:
                raise self._too_large(field, target, "more")
        return bytes(body)

    async def _read_chunked(
        self, reader: asyncio.StreamReader, target: _Target, field: str
    ) -> bytes:
        body = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            size_text = line.split(b";", 1)[0].strip()
            # int(x, 16) would also take signs, "0x" and underscores; HTTP allows none.
            if not 0 < len(size_text) <= 16 or not _HEX_DIGITS.issuperset(size_text):
                raise _failed(field, f"{target.url} sent an invalid chunked body")
            size = int(size_text, 16)
            if size == 0:
                break
            if len(body) + size > self._max_bytes:
                raise self._too_large(field, target, "more")
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise _failed(field, f"{target.url} sent an invalid chunked body")
        for _ in range(_MAX_TRAILER_LINES):
            if await reader.readuntil(b"\r\n") == b"\r\n":
                return bytes(body)
        raise _failed(field, f"{target.url} sent too many trailer fields")

    def _too_large(self, field: str, target: _Target, size: str) -> InvalidArgument:
        return InvalidArgument.field(
            field,
            f"{target.url} is larger than the {self._max_bytes} bytes allowed ({size})",
            reason="URL_TOO_LARGE",
        )


async def _read_prefix(
    reader: asyncio.StreamReader,
    headers: http.client.HTTPMessage,
    target: _Target,
    field: str,
    size: int,
) -> tuple[bytes, bool]:
    """At most the first `size` bytes of a body, and whether the body ended within them."""
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        return await _read_chunked_prefix(reader, target, field, size)
    lengths = {value.strip() for value in headers.get_all("Content-Length") or []}
    if lengths:
        length = _content_length(lengths)
        if length is None:
            raise _failed(field, f"{target.url} sent an invalid Content-Length")
        return await reader.readexactly(min(length, size)), length <= size
    body = bytearray()
    while len(body) < size:
        chunk = await reader.read(size - len(body))
        if not chunk:
            return bytes(body), True
        body += chunk
    return bytes(body), False


async def _read_chunked_prefix(
    reader: asyncio.StreamReader, target: _Target, field: str, size: int
) -> tuple[bytes, bool]:
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line.split(b";", 1)[0].strip()
        if not 0 < len(size_text) <= 16 or not _HEX_DIGITS.issuperset(size_text):
            raise _failed(field, f"{target.url} sent an invalid chunked body")
        chunk_size = int(size_text, 16)
        if chunk_size == 0:
            return bytes(body), True
        wanted = min(chunk_size, size - len(body))
        body += await reader.readexactly(wanted)
        if len(body) >= size:
            return bytes(body), False
        if await reader.readexactly(2) != b"\r\n":
            raise _failed(field, f"{target.url} sent an invalid chunked body")


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """(first byte, complete length or None when unknown) of `bytes first-last/length`."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if match is None or int(match.group(2)) < int(match.group(1)):
        return None
    total = None if match.group(3) == "*" else int(match.group(3))
    if total is not None and int(match.group(2)) >= total:
        return None
    return int(match.group(1)), total


def _parse_target(url: str, field: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _forbidden(field, f"{url!r} is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise _forbidden(
            field, f"{url!r}: scheme {scheme or '(none)'!r} is not allowed; use http or https"
        )
    if parts.username is not None or parts.password is not None:
        # Credentials in URLs end up in logs, and "http://trusted@other/" misleads readers.
        raise _forbidden(field, f"{url!r}: credentials in URLs are not allowed")
    name = parts.hostname or ""
    if not name:
        raise _forbidden(field, f"{url!r} has no host")
    literal = _ip_literal(name)
    if literal is None:
        try:
            host = name.encode("idna").decode("ascii").lower()
        except UnicodeError:
            host = ""
        # The name goes into the Host header and to the resolver; anything beyond DNS
        # characters could split the request or mean something special to a resolver.
        if not host or not _HOST_NAME_CHARACTERS.issuperset(host):
            raise _forbidden(field, f"{url!r}: {name!r} is not a valid host name")
    else:
        host = str(literal)
    default_port = _DEFAULT_PORTS[scheme]
    if port == 0:
        raise _forbidden(field, f"{url!r}: port 0 is not allowed")
    port = port or default_port
    host_header = f"[{host}]" if ":" in host else host
    if port != default_port:
        host_header = f"{host_header}:{port}"
    target = parts.path or "/"
    if parts.query:
        target = f"{target}?{parts.query}"
    return _Target(
        url=url,
        https=scheme == "https",
        host=host,
        port=port,
        host_header=host_header,
        request_target=quote(target, safe=_TARGET_SAFE),
    )


async def _send_request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    target: _Target,
    field: str,
    first_bytes: int | None = None,
) -> _Response:
    wanted = "" if first_bytes is None else f"Range: bytes=0-{first_bytes - 1}\r\n"
    request = (
        f"GET {target.request_target} HTTP/1.1\r\n"
        f"Host: {target.host_header}\r\n"
        "User-Agent: datasetd\r\n"
        "Accept: */*\r\n"
        # Compressed bodies would need decoding and would defeat the size cap (and a
        # range of a compressed body is not the start of the image).
        "Accept-Encoding: identity\r\n"
        f"{wanted}"
        "Connection: close\r\n\r\n"
    )
    try:
        writer.write(request.encode("ascii"))
        await writer.drain()
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            response = _parse_head(head)
            if response is None:
                raise _failed(field, f"{target.url} sent an invalid HTTP response")
            # Interim responses (103 Early Hints, 100 Continue) precede the real one.
            if not 100 <= response.status < 200:
                return response
    except asyncio.IncompleteReadError:
        raise _failed(field, f"{target.url} closed the connection without a response") from None
    except asyncio.LimitOverrunError:
        raise _failed(field, f"{target.url} sent response headers over 64 KiB") from None
    except OSError as exc:
        raise _failed(field, f"requesting {target.url} failed: {exc}") from None


def _parse_head(head: bytes) -> _Response | None:
    status_line, _, rest = head.partition(b"\r\n")
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        return None
    if len(parts[1]) != 3 or not parts[1].isdigit():
        return None
    try:
        headers = http.client.parse_headers(io.BytesIO(rest))
    except http.client.HTTPException:
        return None
    return _Response(int(parts[1]), parts[2].strip() if len(parts) > 2 else "", headers)


def _content_length(values: set[str]) -> int | None:
    # Differing duplicate lengths are a request-smuggling signature; refuse them.
    if len(values) != 1:
        return None
    value = next(iter(values))
    return int(value) if value.isascii() and value.isdigit() else None


def _ip_literal(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _mapped_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    return address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address that traffic to an IPv6 address would reach through a translator:
    IPv4-mapped, 6to4 and NAT64 addresses all lead to their embedded IPv4 address."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _non_public(address: IPAddress) -> str | None:
    if address in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in _CARRIER_GRADE_NAT:
        return "a carrier-grade NAT address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    # Catches the rest of the special-purpose registry: documentation, benchmarking,
    # Teredo and other ranges that are never a legitimate public media host.
    if not address.is_global:
        return "not a public address"
    return None


def _forbidden(field: str, description: str) -> InvalidArgument:
    return InvalidArgument.field(field, description, reason="URL_FORBIDDEN")


@contextlib.contextmanager
def _reading(target: _Target, field: str) -> Iterator[None]:
    """A read of the response body: a connection that ends early or fails is the input's
    error, naming `field`."""
    try:
        yield
    except asyncio.IncompleteReadError as exc:
        raise _failed(
            field,
            f"{target.url} closed the connection after {len(exc.partial)} of "
            f"{exc.expected} expected bytes",
        ) from None
    except (OSError, asyncio.LimitOverrunError, ValueError) as exc:
        raise _failed(field, f"reading {target.url} failed: {exc}") from None


def _failed(field: str, description: str) -> InvalidArgument:
    return InvalidArgument.field(field, description, reason="URL_FETCH_FAILED")
