"""Archives being imported, staged in anonymous temporary files on local disk.

An import reads its archive twice with random access (ZIP keeps its directory at the
end), which an object-store stream cannot give cheaply; a local file can. The file has no
name (tempfile.TemporaryFile unlinks it at once), so nothing is left behind if the
process dies, and no archive content ever decides a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import tempfile
from pathlib import Path
from typing import BinaryIO


class TempFileArchive:
    """The domain's StagedArchive."""

    def __init__(self, directory: Path | None) -> None:
        self._file: BinaryIO = tempfile.TemporaryFile(  # noqa: SIM115 (closed by discard)
            prefix="datasetd-import-", dir=directory
        )
        self._digest = hashlib.sha256()

    async def write(self, chunk: bytes) -> None:
        def write() -> None:
            self._file.write(chunk)
            self._digest.update(chunk)

        # Disk writes and hashing off the event loop; chunks are at most 4 MiB.
        await asyncio.to_thread(write)

    async def finish(self) -> str:
        await asyncio.to_thread(self._file.flush)
        return self._digest.hexdigest()

    def file(self) -> BinaryIO:
        self._file.seek(0)
        return self._file

    async def discard(self) -> None:
        # In a thread: closing waits for a read still running in a reader's thread.
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._file.close)


class TempFileArchives:
    """The domain's ArchiveStaging; `directory` None is the system's temporary directory."""

    def __init__(self, directory: Path | None = None) -> None:
        self._directory = directory

    def stage(self) -> TempFileArchive:
        return TempFileArchive(self._directory)
