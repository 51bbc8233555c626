"""Streamed media: UploadInput's bytes into the blob store and DownloadInput's out of it,
neither ever whole in memory.

An upload is checked in three stages, each as early as it can be: the header before any
byte is accepted (so a bad id or an oversized declared length costs the caller nothing);
the stream while it flows (chunk size, caps, declared length); the bytes once complete
(checksum, then the media probe). Only media that pass all three reach the
content-addressed store, and the input is then created through InputService like any
other, so the rules for ids, metadata, concepts and datasets are the same everywhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass
from typing import Any

from service.domain.auth import Permission, authorize
from service.domain.errors import InvalidArgument, Violations
from service.domain.input_drafts import InputDraft, StoredMedia
from service.domain.inputs import InputService
from service.domain.models import InputView, MediaType, Principal, StoredBlob
from service.domain.ports import MediaProber, MediaStreams, StagedUpload

_MIB = 1024 * 1024
MAX_CHUNK_BYTES = 4 * _MIB
# The video and audio probes read container headers, which sit at the start of a file
# (or, for MP4 with a trailing moov box, are not needed to identify it).
HEAD_BYTES = _MIB
DOWNLOAD_CHUNK_BYTES = _MIB
# Field paths in errors: the header's input, and the media bytes.
HEADER_INPUT = "header.input"
MEDIA_FIELD = "chunk"
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class TransferSettings:
    max_upload_bytes: int = 2 * 1024 * _MIB
    # Images and texts are checked whole (a truncated image shows only at its end), so
    # they are read back into memory; this bounds that.
    max_whole_bytes: int = 64 * _MIB


@dataclass(frozen=True)
class UploadHeader:
    """The first message of an upload. `content_length` 0 and `sha256` "" mean not given."""

    app_id: str
    draft: InputDraft
    content_length: int = 0
    sha256: str = ""
    request_id: str = ""


def size_text(count: int) -> str:
    """A byte count as people read it in an error message ("4 MiB")."""
    for unit, scale in (("GiB", 1024**3), ("MiB", _MIB), ("KiB", 1024)):
        if count >= scale:
            return f"{count / scale:.4g} {unit}"
    return f"{count} bytes"


def require_bytes(size: int, field: str, what: str, reason: str) -> None:
    """Refuses a client stream that ended right after its header."""
    if size == 0:
        raise InvalidArgument.field(
            field,
            f"no {what} bytes followed the header; send the {what} as chunk messages",
            reason=reason,
        )


def check_chunk(chunk: bytes, field: str, reason: str) -> None:
    """Refuses a chunk of a client stream larger than MAX_CHUNK_BYTES."""
    if len(chunk) > MAX_CHUNK_BYTES:
        raise InvalidArgument.field(
            field,
            f"a chunk of {len(chunk)} bytes arrived; chunks are at most "
            f"{MAX_CHUNK_BYTES} bytes ({size_text(MAX_CHUNK_BYTES)})",
            reason=reason,
        )


@dataclass(frozen=True)
class InputTransfers:
    inputs: InputService
    streams: MediaStreams
    settings: TransferSettings
    prober: MediaProber

    # --- upload ----------------------------------------------------------------------------

    async def receive(
        self, principal: Principal, header: UploadHeader, chunks: AsyncIterable[bytes]
    ) -> StoredMedia:
        """Checks the header, streams the chunks to a temporary object, checks and probes
        the bytes, and stores them under their content address. Whatever fails, no
        temporary object is left behind."""
        authorize(principal, header.app_id, Permission.WRITE)
        media_type = self._check_header(header)
        # With a request id, a retry of an upload that succeeded must reach the replay,
        # which needs the bytes' hash; the id and datasets are checked on creation then.
        await self.inputs.check_draft(
            principal,
            header.app_id,
            header.draft,
            path=HEADER_INPUT,
            check_state=not header.request_id,
        )
        limit = self._limit(media_type)
        staged = self.streams.stage(limit)
        try:
            head, size = await self._stream(staged, chunks, header, media_type, limit)
            digest = await staged.finish()
            if header.sha256 and digest != header.sha256.lower():
                raise InvalidArgument.field(
                    "header.sha256",
                    f"is {header.sha256.lower()} but the {size_text(size)} received hash to "
                    f"{digest}; the media were corrupted on the way or the header is wrong",
                    reason="CHECKSUM_MISMATCH",
                )
            content_type, info, text = await self._probe(media_type, head, size, staged)
            blob = await staged.publish(content_type)
        except BaseException:
            # Shielded: a cancelled call (the client went away) still cleans up.
            await asyncio.shield(staged.discard())
            raise
        return StoredMedia(blob, info, text)

    async def create(
        self, principal: Principal, header: UploadHeader, media: StoredMedia
    ) -> InputView:
        """Creates the input of a received upload, atomically, as CreateInputs would."""
        draft = dataclasses.replace(header.draft, stored=media)
        return await self.inputs.create_one(principal, header.app_id, draft, path=HEADER_INPUT)

    def _check_header(self, header: UploadHeader) -> MediaType:
        violations = Violations()
        draft = header.draft
        if not draft.media:
            violations.add(
                f"{HEADER_INPUT}.data",
                "names no medium: set the one that follows to an empty message "
                "(data.video, data.audio, data.image or data.text)",
            )
        elif len(draft.media) == 1 and (draft.data or draft.url or draft.text):
            violations.add(
                f"{HEADER_INPUT}.data.{draft.media[0].value}",
                "must be an empty message in an upload: the media follow as chunks",
            )
        if header.content_length < 0:
            violations.add("header.content_length", "must not be negative")
        if header.sha256 and not _SHA256.match(header.sha256):
            violations.add(
                "header.sha256", "must be the hex SHA-256 of the media (64 hexadecimal digits)"
            )
        violations.raise_if_any()
        media_type = draft.media[0]
        limit = self._limit(media_type)
        if header.content_length > limit:
            raise self._too_large("header.content_length", media_type, limit)
        return media_type

    def _limit(self, media_type: MediaType) -> int:
        if media_type in (MediaType.IMAGE, MediaType.TEXT):
            return min(self.settings.max_upload_bytes, self.settings.max_whole_bytes)
        return self.settings.max_upload_bytes

    def _too_large(self, field: str, media_type: MediaType, limit: int) -> InvalidArgument:
        if limit < self.settings.max_upload_bytes:
            why = f"{media_type.value} uploads are checked whole and may be at most"
        else:
            why = "uploads may be at most"
        return InvalidArgument.field(
            field,
            f"{why} {limit} bytes ({size_text(limit)}) on this server",
            reason="UPLOAD_TOO_LARGE",
        )

    async def _stream(
        self,
        staged: StagedUpload,
        chunks: AsyncIterable[bytes],
        header: UploadHeader,
        media_type: MediaType,
        limit: int,
    ) -> tuple[bytes, int]:
        """Writes the chunks; returns the first HEAD_BYTES and the size."""
        head = bytearray()
        size = 0
        expected = header.content_length
        async for chunk in chunks:
            check_chunk(chunk, MEDIA_FIELD, "INVALID_UPLOAD")
            size += len(chunk)
            # Both fail as soon as the excess arrives, not after the rest of the stream.
            if size > limit:
                raise self._too_large(MEDIA_FIELD, media_type, limit)
            if expected and size > expected:
                raise _length_mismatch(expected, f"more than {expected} bytes arrived")
            if len(head) < HEAD_BYTES:
                head += chunk[: HEAD_BYTES - len(head)]
            await staged.write(chunk)
        require_bytes(size, MEDIA_FIELD, "media", "INVALID_UPLOAD")
        if expected and size != expected:
            raise _length_mismatch(expected, f"the stream ended after {size} bytes")
        return bytes(head), size

    async def _probe(
        self, media_type: MediaType, head: bytes, size: int, staged: StagedUpload
    ) -> tuple[str, dict[str, Any], str | None]:
        """Content type, media info and (for text) the text of the received bytes."""
        if media_type in (MediaType.VIDEO, MediaType.AUDIO):
            content_type, info = self.prober.probe(media_type, head, MEDIA_FIELD, size)
            return content_type, info, None
        # Bounded by max_whole_bytes; the head is the whole of a small upload.
        data = head if size == len(head) else await staged.read()
        return await asyncio.to_thread(self._probe_whole, media_type, data)

    def _probe_whole(
        self, media_type: MediaType, data: bytes
    ) -> tuple[str, dict[str, Any], str | None]:
        # Runs in a worker thread: a 64 MiB image or text takes tens of milliseconds.
        content_type, info = self.prober.probe(media_type, data, MEDIA_FIELD)
        return content_type, info, data.decode() if media_type is MediaType.TEXT else None

    # --- download --------------------------------------------------------------------------

    async def download(
        self,
        principal: Principal,
        app_id: str,
        input_id: str,
        offset: int = 0,
        length: int | None = None,
    ) -> tuple[StoredBlob, AsyncGenerator[bytes, None]]:
        """The stored original and its bytes from `offset` (`length` of them, all when
        None) in chunks of at most DOWNLOAD_CHUNK_BYTES. FAILED_PRECONDITION for inputs
        whose media are only referenced by URL."""
        _, blob = await self.inputs.stored_media(principal, app_id, input_id)
        return blob, self.streams.stream(blob, DOWNLOAD_CHUNK_BYTES, offset, length)

    async def download_hosted(
        self,
        principal: Principal,
        app_id: str,
        suffix: str,
        offset: int = 0,
        length: int | None = None,
    ) -> tuple[StoredBlob, AsyncGenerator[bytes, None]]:
        """`download` of the stored original a `hosted` suffix names (what export archives
        reference), when the app holds it."""
        blob = await self.inputs.held_blob(principal, app_id, suffix)
        return blob, self.streams.stream(blob, DOWNLOAD_CHUNK_BYTES, offset, length)


def _length_mismatch(expected: int, what: str) -> InvalidArgument:
    return InvalidArgument.field(
        "header.content_length",
        f"is {expected} but {what}; the stream was cut short or the header is wrong",
        reason="LENGTH_MISMATCH",
    )
