"""Downloads over the HTTP port: a finished export's archive and an input's stored original.

`GET|HEAD /v2/downloads/apps/{app_id}/exports/{export_id}` and
`GET|HEAD /v2/downloads/apps/{app_id}/inputs/{input_id}`, authorized by a signed link
(`expires` + `signature`, see service.api.links) or by `Authorization: Key <secret>` of a
key of the app, as the gRPC port authorizes. Clarifai clients GET these URLs with their
key, so refusals are Clarifai's JSON (`{"status": {"code": ..., ...}}`).

`GET|HEAD /v2/downloads/apps/{app_id}/blobs/orig/{suffix}` serves a stored original by the
`hosted` suffix export archives carry (their `hosted.prefix` is this route's prefix), to a
key of an app that holds it only: a URL inside an archive cannot carry a signed link, and
another app's key gets NOT_FOUND whether or not the blob exists.

The bytes come from the same domain calls as the DownloadExport / DownloadInput RPCs and
are streamed as they arrive; a single byte range is honoured (resumed downloads), read
from the store from its first byte on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web
from clarifai_grpc.grpc.api.status import status_code_pb2, status_pb2
from google.protobuf import json_format

from service.api.clarifai import status
from service.api.links import (
    BLOBS,
    DOWNLOADS_PREFIX,
    EXPORTS,
    HOSTED_SIZE,
    INPUTS,
    DownloadLinks,
    LinkProblem,
)
from service.domain.auth import Authenticator, Permission, authorize, parse_authorization
from service.domain.errors import DomainError, ErrorKind, Unauthenticated
from service.domain.exports import ARCHIVE_CONTENT_TYPE, ExportService
from service.domain.models import ExportStatus, Principal, StoredBlob
from service.domain.transfers import InputTransfers

log = logging.getLogger(__name__)

# The principal of a caller holding a valid signed link: it may read that one resource.
LINK_KEY_ID = "signed-link"
# How soon a client polling an unfinished export may try again.
RETRY_AFTER_SECONDS = 2

_HTTP_OF_KIND = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.ALREADY_EXISTS: 409,
    ErrorKind.PERMISSION_DENIED: 403,
    ErrorKind.UNAUTHENTICATED: 401,
    # The resource exists but has nothing to download yet (or at all).
    ErrorKind.FAILED_PRECONDITION: 409,
    ErrorKind.ABORTED: 409,
    ErrorKind.RESOURCE_EXHAUSTED: 429,
    ErrorKind.UNAVAILABLE: 503,
}
_EXPORT_NOT_READY = {
    ExportStatus.PENDING.value: status_code_pb2.DATASET_VERSION_EXPORT_PENDING,
    ExportStatus.IN_PROGRESS.value: status_code_pb2.DATASET_VERSION_EXPORT_IN_PROGRESS,
    ExportStatus.FAILED.value: status_code_pb2.DATASET_VERSION_EXPORT_FAILED,
}


class _Refused(Exception):
    """Answered with Clarifai's JSON status and an HTTP status, before any byte is sent."""

    def __init__(
        self, http: int, payload: status_pb2.Status, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(payload.details or payload.description)
        self.http = http
        self.payload = payload
        self.headers = headers or {}


def _refused(
    http: int, code: int, description: str, details: str, req_id: str, **headers: str
) -> _Refused:
    payload = status.make(code, description, details, req_id)
    payload.http_status_code = http
    return _Refused(http, payload, headers)


def _of_error(error: DomainError, req_id: str) -> _Refused:
    http = _HTTP_OF_KIND.get(error.kind, 400)
    if error.reason == "EXPORT_NOT_READY":
        # The export's own state, as GetDatasetVersion reports it: clients that poll
        # know the codes.
        state = error.metadata.get("status", "")
        code = _EXPORT_NOT_READY.get(state, status_code_pb2.DATASET_VERSION_EXPORT_PENDING)
        retry = (
            {} if state == ExportStatus.FAILED.value else {"Retry-After": str(RETRY_AFTER_SECONDS)}
        )
        return _refused(http, code, "Export is not ready", error.message, req_id, **retry)
    payload = status.of_error(error, req_id)
    payload.http_status_code = http
    return _Refused(http, payload)


def _error_response(refused: _Refused) -> web.Response:
    body = {
        "status": json_format.MessageToDict(
            refused.payload, preserving_proto_field_name=True, use_integers_for_enums=True
        )
    }
    return web.json_response(body, status=refused.http, headers=refused.headers)


class UnsatisfiableRange(Exception):
    pass


# One range of RFC 9110's grammar: `bytes=first-last`, `bytes=first-` or `bytes=-suffix`.
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$", re.ASCII | re.IGNORECASE)


def _range_spec(header: str | None) -> tuple[int | None, int] | tuple[int, None] | None:
    """The single range `header` asks for, before the size is known: (first, last or
    None) or (None, suffix length); None for no header or one this server ignores
    (malformed or several ranges, as RFC 9110 allows)."""
    match = _RANGE.match(header.replace(" ", "")) if header is not None else None
    if match is None or not any(match.groups()):
        return None
    first_text, last_text = match.groups()
    if not first_text:
        return None, int(last_text)
    first = int(first_text)
    if not last_text:
        return first, None
    if int(last_text) < first:
        return None
    return first, int(last_text)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The single range `header` asks for as (first, last) byte positions, clamped to
    `size`; None to send everything (no header, or one this server ignores: malformed or
    several ranges, as RFC 9110 allows). UnsatisfiableRange when no byte of it exists."""
    spec = _range_spec(header)
    if spec is None:
        return None
    first, last = spec
    if first is None:
        assert last is not None
        if last == 0 or size == 0:
            raise UnsatisfiableRange
        return max(size - last, 0), size - 1
    if first >= size:
        raise UnsatisfiableRange
    return first, min(last, size - 1) if last is not None else size - 1


def read_window(header: str | None) -> tuple[int, int | None]:
    """(offset, length) of the stream to ask the domain for, so that the store is read
    from the range's first byte: a negative offset counts from the end (a suffix range),
    length None is to the end. Whatever the size turns out to be, the stream holds the
    bytes byte_range() names (or none, when that is unsatisfiable and no byte is read)."""
    spec = _range_spec(header)
    if spec is None:
        return 0, None
    first, last = spec
    if first is None:
        assert last is not None
        return -last, None
    return first, None if last is None else last - first + 1


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


@dataclass(frozen=True)
class _Download:
    blob: StoredBlob
    stream: AsyncGenerator[bytes, None]
    content_type: str
    disposition: str


@dataclass(frozen=True)
class Downloads:
    """The two routes, over the domain calls of the native download RPCs."""

    exports: ExportService
    transfers: InputTransfers
    authenticator: Authenticator
    links: DownloadLinks

    async def export(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, EXPORTS, self._export)

    async def media(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, INPUTS, self._media)

    async def hosted(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, BLOBS, self._hosted)

    async def _export(
        self, principal: Principal, app_id: str, export_id: str, window: _Window
    ) -> _Download:
        export, blob, stream = await self.exports.download_by_id(
            principal, app_id, export_id, *window
        )
        name = _safe_name(f"{export.dataset_id}_{export.version_id}_{export.format.value}")
        return _Download(blob, stream, ARCHIVE_CONTENT_TYPE, f'attachment; filename="{name}.zip"')

    async def _media(
        self, principal: Principal, app_id: str, input_id: str, window: _Window
    ) -> _Download:
        blob, stream = await self.transfers.download(principal, app_id, input_id, *window)
        return _Download(blob, stream, *_inline(blob, input_id))

    async def _hosted(
        self, principal: Principal, app_id: str, suffix: str, window: _Window
    ) -> _Download:
        blob, stream = await self.transfers.download_hosted(principal, app_id, suffix, *window)
        return _Download(blob, stream, *_inline(blob, blob.sha256))

    async def _principal(self, request: web.Request, kind: str, req_id: str) -> Principal:
        """The caller: a signed link of this resource, else the app's key. A request that
        carries both (Clarifai's SDK sends its key to every URL) is let in by either.
        Blobs are never linked: only a key lets in."""
        app_id, resource_id = request.match_info["app_id"], request.match_info["resource_id"]
        query = request.query
        problem = None
        if kind != BLOBS and ("signature" in query or "expires" in query):
            path = self.links.path(app_id, kind, resource_id)
            problem = self.links.problem(path, query.get("expires", ""), query.get("signature", ""))
            if problem is None:
                return Principal(LINK_KEY_ID, app_id, frozenset({Permission.READ.value}))
        header = request.headers.getall("Authorization", [])
        if header or problem is None:
            try:
                secret = parse_authorization(list(header))
            except Unauthenticated as exc:
                raise Unauthenticated(
                    f"{exc.message}, or use a signed link (the `url` the API answers with)",
                    reason=exc.reason,
                ) from None
            principal = await self.authenticator.authenticate(secret)
            if kind != BLOBS:
                # The domain authorizes blobs itself: another app's key is told NOT_FOUND.
                authorize(principal, app_id, Permission.READ)
            return principal
        if problem is LinkProblem.EXPIRED:
            expired = datetime.fromtimestamp(int(query["expires"]), UTC).isoformat()
            raise _refused(
                401,
                status_code_pb2.CONN_TOKEN_INVALID,
                "Download link expired",
                f"the link expired at {expired}; ask the API for the resource again for a "
                "fresh url, or send `Authorization: Key <api key>`",
                req_id,
            )
        raise _refused(
            403,
            status_code_pb2.CONN_TOKEN_INVALID,
            "Download link signature invalid",
            "`signature` does not sign this path and `expires` (the link was changed or not "
            "issued by this server); use the url exactly as the API answered it",
            req_id,
        )

    async def _serve(
        self,
        request: web.Request,
        kind: str,
        find: Callable[[Principal, str, str, _Window], Awaitable[_Download]],
    ) -> web.StreamResponse:
        req_id = uuid.uuid4().hex
        app_id, resource_id = request.match_info["app_id"], request.match_info["resource_id"]
        try:
            principal = await self._principal(request, kind, req_id)
            window = read_window(_wanted_range(request))
            found = await find(principal, app_id, resource_id, window)
            if window != _WHOLE and _wanted_range(request, _etag(found.blob)) is None:
                # If-Range named other bytes: they get all of these, from the start. Rare
                # (the object changed under a resumed download): found again, not skipped
                # through, so a matching resume never reads what precedes its range.
                await found.stream.aclose()
                found = await find(principal, app_id, resource_id, _WHOLE)
        except _Refused as refused:
            return _error_response(refused)
        except DomainError as exc:
            return _error_response(_of_error(exc, req_id))
        except Exception:
            log.exception("download %s failed (request id %s)", request.path, req_id)
            return _error_response(_server_error(req_id))
        return await self._send(request, found, req_id)

    async def _send(
        self, request: web.Request, found: _Download, req_id: str
    ) -> web.StreamResponse:
        blob, stream = found.blob, found.stream
        etag = _etag(blob)
        # Opened at the range's first byte, which the store reads from (read_window).
        header = _wanted_range(request, etag)
        try:
            wanted = byte_range(header, blob.size)
        except UnsatisfiableRange:
            await stream.aclose()
            return _error_response(
                _refused(
                    416,
                    status_code_pb2.CONN_INVALID_RANGE,
                    "Range not satisfiable",
                    f"`Range: {header}` asks for no byte of the {blob.size} there are",
                    req_id,
                    **{"Content-Range": f"bytes */{blob.size}", "Accept-Ranges": "bytes"},
                )
            )
        first, last = wanted if wanted is not None else (0, blob.size - 1)
        response = web.StreamResponse(status=200 if wanted is None else 206)
        response.headers["Content-Type"] = found.content_type
        response.headers["Content-Disposition"] = found.disposition
        response.headers["Accept-Ranges"] = "bytes"
        response.headers["ETag"] = etag
        # Links carry their own credentials: no shared cache may keep the bytes.
        response.headers["Cache-Control"] = "private, no-store"
        if wanted is not None:
            response.headers["Content-Range"] = f"bytes {first}-{last}/{blob.size}"
        response.content_length = last - first + 1
        if request.method == "HEAD":
            await stream.aclose()
            await response.prepare(request)
            await response.write_eof()
            return response
        chunks = stream
        async with contextlib.aclosing(chunks):
            # The first chunk is read before the headers go: the store failing now still
            # gets a JSON answer.
            try:
                pending = await anext(chunks, b"")
            except DomainError as exc:
                return _error_response(_of_error(exc, req_id))
            except Exception:
                log.exception("download %s failed (request id %s)", request.path, req_id)
                return _error_response(_server_error(req_id))
            await response.prepare(request)
            try:
                await _write_all(response, pending, chunks)
            except ConnectionResetError:
                # The client went away; the store connection is released on exit.
                return response
        await response.write_eof()
        return response


async def _write_all(
    response: web.StreamResponse, pending: bytes, chunks: AsyncIterator[bytes]
) -> None:
    """Writes `pending`, then the rest of `chunks`, reading the next chunk from the store
    while the previous one goes to the client (one chunk ahead: bounded memory)."""
    while pending:
        ahead = asyncio.ensure_future(anext(chunks, b""))
        try:
            await response.write(pending)
        except BaseException:
            ahead.cancel()
            # The read is finished or cancelled before the stream is closed under it.
            await asyncio.gather(ahead, return_exceptions=True)
            raise
        pending = await ahead


# The (offset, length) of the bytes a route asks the domain for (see read_window).
_Window = tuple[int, int | None]
_WHOLE: _Window = (0, None)


def _etag(blob: StoredBlob) -> str:
    return f'"{blob.sha256}"'


def _wanted_range(request: web.Request, etag: str | None = None) -> str | None:
    """The Range header to honour. A resumed download of other bytes than those it started
    with (If-Range not the ETag) gets them all. Before the ETag is known an If-Range is
    taken as matching: the stream is then opened at the range, and _send finds out."""
    header = request.headers.get("Range")
    if_range = request.headers.get("If-Range")
    if etag is not None and if_range is not None and if_range.strip() != etag:
        return None
    return header


def _inline(blob: StoredBlob, name: str) -> tuple[str, str]:
    """The content type and disposition of a stored original named `name`."""
    content_type = blob.content_type or "application/octet-stream"
    extension = mimetypes.guess_extension(content_type.split(";")[0].strip()) or ""
    return content_type, f'inline; filename="{_safe_name(name + extension)}"'


def _server_error(req_id: str) -> _Refused:
    payload = status.of_error(RuntimeError(), req_id)
    payload.http_status_code = 500
    return _Refused(500, payload)


def add_download_routes(app: web.Application, downloads: Downloads) -> None:
    """GET (and HEAD, which aiohttp adds to every GET route) of both kinds of links, and
    of stored originals by their `hosted` suffix (which holds slashes; the domain checks
    its shape)."""
    base = f"{DOWNLOADS_PREFIX}/{{app_id}}"
    app.router.add_get(f"{base}/{EXPORTS}/{{resource_id}}", downloads.export)
    app.router.add_get(f"{base}/{INPUTS}/{{resource_id}}", downloads.media)
    app.router.add_get(f"{base}/{BLOBS}/{HOSTED_SIZE}/{{resource_id:.+}}", downloads.hosted)
