"""Downloading the original media of inputs to local files."""

from __future__ import annotations

import hashlib
import mimetypes
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from datasetd.v1 import input_service_pb2

from service.client._rpc import Rpc
from service.client.errors import FailedPreconditionError
from service.client.progress import Progress, reporter
from service.client.unpack import clean_name

# The server's own sniffed types, where `mimetypes` picks an odd extension.
_EXTENSIONS = {"image/jpeg": ".jpg", "text/plain": ".txt", "image/tiff": ".tiff"}


@dataclass(frozen=True)
class DownloadedInput:
    """One downloaded input; `path` is None when it has no stored media (URL-only)."""

    input_id: str
    path: Path | None
    size: int
    sha256: str


def extension_of(content_type: str) -> str:
    kind = content_type.split(";", maxsplit=1)[0].strip().lower()
    return _EXTENSIONS.get(kind) or mimetypes.guess_extension(kind) or ".bin"


def download_input(rpc: Rpc, input_id: str, save_dir: Path) -> DownloadedInput:
    """Streams one input's media to `save_dir/<input id><ext>`, checking size and SHA-256.

    The bytes go to a temporary name first, so an interrupted download never
    leaves a truncated file under the final name.
    """
    digest = hashlib.sha256()
    size, expected_size, expected_sha, content_type = 0, -1, "", ""
    # Ids are server-checked, but never trust a name from the wire as a path.
    stem = clean_name(input_id)
    partial = save_dir / f".{stem}.partial"
    try:
        with partial.open("wb") as out:
            for message in rpc.stream(
                rpc.inputs.DownloadInput,
                input_service_pb2.DownloadInputRequest(app_id=rpc.app, input_id=input_id),
            ):
                if message.content_type:
                    content_type = message.content_type
                    expected_size, expected_sha = message.total_size, message.sha256
                digest.update(message.chunk)
                size += len(message.chunk)
                out.write(message.chunk)
    except FailedPreconditionError as error:
        partial.unlink(missing_ok=True)
        if error.reason != "NO_STORED_MEDIA":
            raise
        return DownloadedInput(input_id, None, 0, "")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if size != expected_size or (expected_sha and digest.hexdigest() != expected_sha):
        partial.unlink(missing_ok=True)
        raise OSError(
            f"download of input {input_id} was damaged: got {size} bytes "
            f"(sha256 {digest.hexdigest()}), expected {expected_size} (sha256 {expected_sha})"
        )
    path = save_dir / f"{stem}{extension_of(content_type)}"
    os.replace(partial, path)
    return DownloadedInput(input_id, path, size, digest.hexdigest())


def download_inputs(
    rpc: Rpc,
    input_ids: Iterable[str],
    save_dir: str | os.PathLike[str],
    concurrency: int = 4,
    show_progress: bool = True,
    progress: Progress | None = None,
) -> list[DownloadedInput]:
    """Downloads inputs concurrently; results come back in the order of `input_ids`.

    Inputs created from an external URL have no stored media: they come back
    with `path` None instead of failing the whole download.
    """
    ids = list(input_ids)
    target = Path(save_dir)
    target.mkdir(parents=True, exist_ok=True)
    shown = reporter(show_progress, progress)

    def one(input_id: str) -> DownloadedInput:
        result = download_input(rpc, input_id, target)
        shown.advance()
        return result

    shown.start("downloading inputs", len(ids), "files")
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(one, ids))
    finally:
        shown.finish()
