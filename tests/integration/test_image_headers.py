"""Ranged reads of URL images (UrlFetcher.fetch_head, UrlImageHeaders) against a local HTTP
server that answers in every way the client must cope with: 206, 200 without Range,
chunked, 416, unknown totals, redirects, and headers past the bytes read."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import ipaddress
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from service.adapters.image_headers import UrlImageHeaders
from service.adapters.url_fetch import UrlFetcher
from service.domain.errors import InvalidArgument
from service.domain.input_drafts import InputDraft, Outcome
from service.domain.models import MediaType, Principal
from service.storage.db import Database
from tests.conftest import Stack
from tests.helpers import png_bytes
from tests.integration.test_url_inputs import service

LOOPBACK_ONLY = [ipaddress.ip_network("127.0.0.1/32")]
FIELD = "inputs[0].data.image.url"


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR (valid CRC) claiming `width`x`height`, then the start of
    an IDAT chunk larger than anything read."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = 2_000_000
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", idat) + b"IDAT" + bytes(idat)


def _webp_canvas(width: int, height: int) -> bytes:
    """A WEBP whose VP8X chunk declares a `width`x`height` canvas, then filler."""
    vp8x = bytes(4) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x + bytes(100_000)
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def _jpeg_behind(segments: int) -> bytes:
    """A small JPEG with `segments` APP1 segments of 64 KiB before its frame header."""
    buffer = io.BytesIO()
    Image.new("RGB", (320, 200), (1, 2, 3)).save(buffer, "JPEG")
    payload = b"Exif\x00\x00" + bytes(65527)
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    plain = buffer.getvalue()
    return plain[:2] + app1 * segments + plain[2:]


FILES = {
    "behind.jpg": _jpeg_behind(3),
    "too-far.jpg": _jpeg_behind(17),
    "huge.png": _png_header(9500, 9500),
    "huge.webp": _webp_canvas(12_000, 9_000),
    "data.bin": bytes(range(256)) * 1024,
    "small.png": png_bytes(30, 20),
    "note.txt": b"a note by URL",
}


class Server(ThreadingHTTPServer):
    daemon_threads = True
    ranges: list[str | None]
    open_now: int
    most_open: int
    hold_until: int
    lock: threading.Lock


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.ranges.append(self.headers.get("Range"))
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        name = url.path.rsplit("/", 1)[1]
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            getattr(self, "route_" + url.path.strip("/").split("/")[0])(name, query)

    def _head(self, status: int, **headers: str) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()

    def route_ranged(self, name: str, query: dict[str, str]) -> None:
        body = FILES[name]
        last = int((self.headers.get("Range") or "").rpartition("-")[2])
        part = body[: last + 1]
        self._head(
            206,
            Content_Range=f"bytes 0-{len(part) - 1}/{query.get('total', len(body))}",
            Content_Length=str(len(part)),
        )
        self.wfile.write(part)

    def route_whole(self, name: str, query: dict[str, str]) -> None:
        body = FILES[name]
        self._head(200, Content_Length=str(len(body)))
        self.wfile.write(body)

    def route_chunked(self, name: str, query: dict[str, str]) -> None:
        body = FILES[name]
        self._head(200, Transfer_Encoding="chunked")
        for start in range(0, len(body), 10_000):
            chunk = body[start : start + 10_000]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def route_empty(self, name: str, query: dict[str, str]) -> None:
        self._head(416, Content_Range="bytes */0", Content_Length="0")

    def route_offset(self, name: str, query: dict[str, str]) -> None:
        self._head(206, Content_Range="bytes 10-19/100", Content_Length="10")
        self.wfile.write(bytes(10))

    def route_redirect(self, name: str, query: dict[str, str]) -> None:
        self._head(302, Location=query["to"], Content_Length="0")

    def route_slow(self, name: str, query: dict[str, str]) -> None:
        """Holds the read 0.5 s, or, with `hold_until` set, until that many are open at
        once (reads made one after another never get there: each is held 10 s)."""
        with self.server.lock:
            self.server.open_now += 1
            self.server.most_open = max(self.server.most_open, self.server.open_now)
        wanted = self.server.hold_until
        deadline = time.monotonic() + (10 if wanted else 0.5)
        while time.monotonic() < deadline:
            with self.server.lock:
                if wanted and self.server.most_open >= wanted:
                    break
            time.sleep(0.02)
        with self.server.lock:
            self.server.open_now -= 1
        self.route_ranged(name, query)


@pytest.fixture
def http_server() -> Iterator[tuple[Server, str]]:
    running = Server(("127.0.0.1", 0), Handler)
    running.ranges, running.open_now, running.most_open, running.hold_until = [], 0, 0, 0
    running.lock = threading.Lock()
    thread = threading.Thread(target=running.serve_forever, daemon=True)
    thread.start()
    yield running, f"http://127.0.0.1:{running.server_address[1]}"
    running.shutdown()
    running.server_close()


def fetcher(**options: Any) -> UrlFetcher:
    settings: dict[str, Any] = {
        "max_bytes": 1 << 20,
        "timeout_seconds": 5,
        "allowed_networks": LOOPBACK_ONLY,
    }
    return UrlFetcher(**(settings | options))


async def refusal(headers: UrlImageHeaders, url: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        await headers.image_info(url, FIELD)
    assert [v.field for v in caught.value.violations] == [FIELD]
    return caught.value


async def test_prefixes_of_every_answer_shape(http_server: tuple[Server, str]) -> None:
    running, base = http_server
    fetch = fetcher()
    body = FILES["data.bin"]

    ranged = await fetch.fetch_head(f"{base}/ranged/data.bin", FIELD, 1000)
    assert (ranged.data, ranged.complete) == (body[:1000], False)
    whole = await fetch.fetch_head(f"{base}/ranged/data.bin", FIELD, len(body) + 5)
    assert (whole.data, whole.complete) == (body, True)
    # An unknown total: only a part shorter than asked is known to be the end.
    unknown = await fetch.fetch_head(f"{base}/ranged/data.bin?total=*", FIELD, 1000)
    assert (unknown.data, unknown.complete) == (body[:1000], False)

    chunked = await fetch.fetch_head(f"{base}/chunked/data.bin", FIELD, 25_000)
    assert (chunked.data, chunked.complete) == (body[:25_000], False)
    all_chunks = await fetch.fetch_head(f"{base}/chunked/data.bin", FIELD, 1 << 20)
    assert (all_chunks.data, all_chunks.complete) == (body, True)

    empty = await fetch.fetch_head(f"{base}/empty/x", FIELD, 1000)
    assert (empty.data, empty.complete) == (b"", True)
    assert running.ranges == [
        "bytes=0-999",
        f"bytes=0-{len(body) + 4}",
        "bytes=0-999",
        "bytes=0-24999",
        f"bytes=0-{(1 << 20) - 1}",
        "bytes=0-999",
    ]

    with pytest.raises(InvalidArgument) as caught:
        await fetch.fetch_head(f"{base}/offset/x", FIELD, 1000)
    assert caught.value.reason == "URL_FETCH_FAILED"
    assert "Content-Range" in caught.value.violations[0].description


async def test_redirects_keep_the_range_and_the_guard(http_server: tuple[Server, str]) -> None:
    running, base = http_server
    headers = UrlImageHeaders(fetcher())
    target = f"{base}/ranged/behind.jpg"
    info = await headers.image_info(f"{base}/redirect/x?to={target}", FIELD)
    assert (info["width"], info["height"], info["format"]) == (320, 200, "JPEG")
    # Its frame header is past 192 KiB: the first 64 KiB were not enough, 1 MiB was.
    assert running.ranges == ["bytes=0-65535"] * 2 + ["bytes=0-1048575"] * 2

    metadata = "http://169.254.169.254/latest/x.jpg"
    error = await refusal(headers, f"{base}/redirect/x?to={metadata}")
    assert error.reason == "URL_FORBIDDEN"
    assert "cloud metadata" in error.violations[0].description


async def test_headers_past_the_most_bytes_and_oversized_images_are_refused(
    http_server: tuple[Server, str],
) -> None:
    running, base = http_server
    headers = UrlImageHeaders(fetcher())
    error = await refusal(headers, f"{base}/ranged/too-far.jpg")
    assert error.reason == "URL_TOO_LARGE"
    assert "first 1,048,576 bytes" in error.violations[0].description
    assert "data.image.image_info" in error.violations[0].description
    assert running.ranges == ["bytes=0-65535", "bytes=0-1048575"]

    huge = await refusal(headers, f"{base}/ranged/huge.png")
    assert huge.reason == "IMAGE_TOO_LARGE"
    assert "85,000,000 pixels" in huge.violations[0].description
    webp = await refusal(headers, f"{base}/ranged/huge.webp")
    assert webp.reason == "IMAGE_TOO_LARGE"
    assert "12000x9000" in webp.violations[0].description

    empty = await refusal(headers, f"{base}/empty/x")
    assert empty.reason == "INVALID_IMAGE"


async def test_reads_wait_for_a_free_slot(http_server: tuple[Server, str]) -> None:
    running, base = http_server
    fetch = fetcher(concurrency=2)
    url = f"{base}/slow/data.bin"
    heads = await asyncio.gather(*(fetch.fetch_head(url, FIELD, 100) for _ in range(6)))
    assert all(h.data == FILES["data.bin"][:100] for h in heads)
    assert running.most_open == 2


async def test_a_batch_reads_its_url_images_concurrently(
    db: Database, stack: Stack, http_server: tuple[Server, str]
) -> None:
    running, base = http_server
    running.hold_until = 8
    app = "headers-" + secrets.token_hex(4)
    principal = Principal("k", app, frozenset({"read", "write"}))
    inputs = dataclasses.replace(
        service(db, stack, fetcher()),
        fetcher=None,
        image_headers=UrlImageHeaders(fetcher(concurrency=8)),
    )
    drafts = [
        InputDraft(id=f"i{n}", media=(MediaType.IMAGE,), url=f"{base}/slow/small.png?n={n}")
        for n in range(8)
    ]
    drafts.append(
        InputDraft(id="sized", media=(MediaType.IMAGE,), url=f"{base}/slow/x", image_size=(4, 3))
    )
    drafts.append(InputDraft(id="text", media=(MediaType.TEXT,), url=f"{base}/whole/note.txt"))
    outcomes = await inputs.create_batch(principal, app, drafts, atomic=False)
    assert [o.outcome for o in outcomes] == [Outcome.CREATED] * 10
    for outcome in outcomes[:8]:
        assert outcome.view is not None and outcome.view.input.blob is None
        assert outcome.view.input.media_info == {
            "width": 30,
            "height": 20,
            "format": "PNG",
            "color_mode": "RGB",
        }
    sized = outcomes[8].view
    assert sized is not None and sized.input.media_info == {"width": 4, "height": 3}
    # Header reads are for images only: a text URL stays an unread reference.
    text = outcomes[9].view
    assert text is not None and text.input.blob is None and text.input.media_info == {}
    # The eight slow reads were all open at the same moment: the server counted them.
    assert running.most_open == 8
    assert len(running.ranges) == 8


async def test_fetching_a_batch_still_fetches_every_medium(
    db: Database, stack: Stack, http_server: tuple[Server, str]
) -> None:
    _, base = http_server
    app = "fetch-" + secrets.token_hex(4)
    principal = Principal("k", app, frozenset({"read", "write"}))
    inputs = service(db, stack, fetcher())
    drafts = [
        InputDraft(id="text", media=(MediaType.TEXT,), url=f"{base}/whole/note.txt"),
        InputDraft(id="image", media=(MediaType.IMAGE,), url=f"{base}/whole/small.png"),
        InputDraft(id="broken", media=(MediaType.IMAGE,), url=f"{base}/whole/note.txt"),
    ]
    outcomes = await inputs.create_batch(principal, app, drafts, atomic=False)
    assert [o.outcome for o in outcomes] == [Outcome.CREATED] * 2 + [Outcome.INVALID]
    text, image = outcomes[0].view, outcomes[1].view
    assert text is not None and text.input.text == "a note by URL" and text.input.blob
    assert image is not None and image.input.blob and image.input.media_info["width"] == 30
    assert [v.field for v in outcomes[2].violations] == ["inputs[2].data.image.url"]
