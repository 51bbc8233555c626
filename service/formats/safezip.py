"""ZIP archives from anyone, read defensively (export-formats.md §5); the format readers
(service.formats.clarifai.reader, service.formats.coco.reader) read their entries through it.

* entry names are only ever compared with other strings, never used as paths; names with
  "..", absolute names, backslashes and control characters are refused all the same, as
  a sign of a hostile archive;
* the entry count and the size of the central directory are read from its end record
  and checked before zipfile builds its list of entries (whose memory they decide);
* every entry's declared size and compression ratio are checked before it is read, and
  the bytes actually inflated are counted while it is read (per entry and in total), so
  that a lying header cannot get past the caps either;
* only stored and deflated, unencrypted entries are read.

Problems raise InvalidArgument naming the entry (`archive["all/batch-000000_n3"]`) and,
within it, the input, image or annotation.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
import zlib
from typing import BinaryIO

from service.domain.errors import InvalidArgument
from service.domain.imported import ARCHIVE_FIELD, ArchiveLimits

READ_CHUNK_BYTES = 1024 * 1024
# A central directory record is 46 bytes plus name, extra field and comment; this
# allows ordinary names and extras while bounding what a directory of N entries costs.
_DIRECTORY_BYTES_PER_ENTRY = 1024
_MAX_NAME_CHARS = 1024
_SHOWN_NAME_CHARS = 200
_READABLE_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_DRIVE = re.compile(r"^[A-Za-z]:")

# End of central directory records (APPNOTE.TXT 4.3.14-16).
_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"


def entry_path(name: str) -> str:
    """How errors name an entry: JSON-quoted, so that any name reads unambiguously."""
    shown = name if len(name) <= _SHOWN_NAME_CHARS else name[: _SHOWN_NAME_CHARS - 3] + "..."
    return f"archive[{json.dumps(shown)}]"


def invalid_archive(
    field: str, description: str, reason: str = "INVALID_ARCHIVE"
) -> InvalidArgument:
    return InvalidArgument.field(field, description, reason=reason)


def archive_too_large(field: str, description: str) -> InvalidArgument:
    return invalid_archive(field, description, "ARCHIVE_TOO_LARGE")


def _directory_size(file: BinaryIO) -> tuple[int, int] | None:
    """(entries, central directory bytes) from the end records; None when there are none."""
    file.seek(0, io.SEEK_END)
    size = file.tell()
    tail_size = min(size, _EOCD.size + 0xFFFF)
    file.seek(size - tail_size)
    tail = file.read(tail_size)
    at = tail.rfind(_EOCD_SIGNATURE)
    if at < 0 or len(tail) - at < _EOCD.size:
        return None
    _, _, _, _, entries, directory, _, _ = _EOCD.unpack_from(tail, at)
    if entries != 0xFFFF and directory != 0xFFFFFFFF:
        return entries, directory
    # ZIP64: the real numbers are in a record the locator before the end record points at.
    locator_at = size - tail_size + at - _ZIP64_LOCATOR.size
    if locator_at < 0:
        return None
    file.seek(locator_at)
    signature, _, record_at, _ = _ZIP64_LOCATOR.unpack(file.read(_ZIP64_LOCATOR.size))
    if signature != _ZIP64_LOCATOR_SIGNATURE or record_at > size - _ZIP64_EOCD.size:
        return None
    file.seek(record_at)
    record = _ZIP64_EOCD.unpack(file.read(_ZIP64_EOCD.size))
    if record[0] != _ZIP64_EOCD_SIGNATURE:
        return None
    return record[7], record[8]


def _name_problem(info: zipfile.ZipInfo) -> str | None:
    # orig_filename: zipfile cuts `filename` at a NUL, which would hide one.
    name = info.orig_filename
    if not name:
        return "has an empty name"
    if len(name) > _MAX_NAME_CHARS:
        return f"has a name of {len(name)} characters; at most {_MAX_NAME_CHARS} are allowed"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "has control characters in its name"
    if "\\" in name:
        return "has a backslash in its name; ZIP names separate directories with '/'"
    if name.startswith("/") or _DRIVE.match(name):
        return "has an absolute name; names in an archive are relative"
    if ".." in name.split("/"):
        return "has a '..' component in its name"
    return None


class SafeZip:
    """A ZIP archive read within limits (see the module documentation)."""

    def __init__(self, file: BinaryIO, limits: ArchiveLimits) -> None:
        self._limits = limits
        self._inflated = 0
        found = _directory_size(file)
        if found is None:
            raise invalid_archive(
                ARCHIVE_FIELD, "is not a ZIP archive (it has no end of central directory)"
            )
        entries, directory = found
        self._check_count(entries)
        if directory > limits.max_entries * _DIRECTORY_BYTES_PER_ENTRY:
            raise archive_too_large(
                ARCHIVE_FIELD,
                f"has a central directory of {directory} bytes, more than "
                f"{_DIRECTORY_BYTES_PER_ENTRY} bytes for each of at most "
                f"{limits.max_entries} entries",
            )
        try:
            self._zip = zipfile.ZipFile(file)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, struct.error) as exc:
            raise invalid_archive(ARCHIVE_FIELD, f"is not a readable ZIP archive ({exc})") from exc
        infos = self._zip.infolist()
        # The end record may understate the count; zipfile's list is what is read.
        self._check_count(len(infos))
        self._entries = self._checked(infos)
        self._by_name = {info.filename: info for info in self._entries}

    @property
    def entries(self) -> list[zipfile.ZipInfo]:
        """The file entries (not directories), in archive order."""
        return self._entries

    def find(self, name: str) -> zipfile.ZipInfo | None:
        return self._by_name.get(name)

    def close(self) -> None:
        self._zip.close()

    def _check_count(self, count: int) -> None:
        if count > self._limits.max_entries:
            raise archive_too_large(
                ARCHIVE_FIELD,
                f"has {count} entries; at most {self._limits.max_entries} are allowed",
            )

    def _checked(self, infos: list[zipfile.ZipInfo]) -> list[zipfile.ZipInfo]:
        limits = self._limits
        seen: set[str] = set()
        files: list[zipfile.ZipInfo] = []
        declared = 0
        for info in infos:
            name = info.orig_filename
            where = entry_path(name)
            problem = _name_problem(info)
            if problem is not None:
                raise invalid_archive(where, problem)
            if name in seen:
                raise invalid_archive(where, "appears more than once in the archive")
            seen.add(name)
            if info.flag_bits & 0x1:
                raise invalid_archive(where, "is encrypted; encrypted entries cannot be imported")
            if info.is_dir():
                if info.file_size:
                    raise invalid_archive(where, "is a directory entry with content")
                continue
            if info.compress_type not in _READABLE_METHODS:
                raise invalid_archive(
                    where,
                    f"uses ZIP compression method {info.compress_type}; only stored and "
                    "deflate entries can be imported",
                )
            self._check_size(where, info, info.file_size)
            declared += info.file_size
            if declared > limits.max_total_bytes:
                raise archive_too_large(
                    ARCHIVE_FIELD,
                    f"declares more than {limits.max_total_bytes} bytes uncompressed in total "
                    f"(reached at {where}); at most {limits.max_total_bytes} are allowed",
                )
            files.append(info)
        return files

    def _check_size(self, where: str, info: zipfile.ZipInfo, size: int) -> None:
        """`size` uncompressed bytes of the entry (declared, or inflated so far)."""
        limits = self._limits
        if size > limits.max_entry_bytes:
            raise archive_too_large(
                where,
                f"is more than {limits.max_entry_bytes} bytes uncompressed; entries may be at "
                f"most {limits.max_entry_bytes} bytes",
            )
        if size > limits.ratio_floor_bytes and size > limits.max_ratio * max(info.compress_size, 1):
            raise archive_too_large(
                where,
                f"inflates {info.compress_size} compressed bytes to {size} or more "
                f"(over {limits.max_ratio}:1); entries over {limits.ratio_floor_bytes} bytes "
                f"may compress at most {limits.max_ratio}:1",
            )

    def read(self, info: zipfile.ZipInfo) -> bytearray:
        """The entry's bytes, counted as they are inflated."""
        where = entry_path(info.orig_filename)
        content = bytearray()
        try:
            with self._zip.open(info) as stream:
                while chunk := stream.read(READ_CHUNK_BYTES):
                    content += chunk
                    if len(content) > info.file_size:
                        raise invalid_archive(
                            where, f"holds more than the {info.file_size} bytes it declares"
                        )
                    self._check_size(where, info, len(content))
                    self._inflated += len(chunk)
                    if self._inflated > self._limits.max_total_bytes:
                        raise archive_too_large(
                            ARCHIVE_FIELD,
                            f"inflates to more than {self._limits.max_total_bytes} bytes in "
                            f"total (reached at {where})",
                        )
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
            raise invalid_archive(where, f"is corrupt ({exc})") from exc
        if len(content) != info.file_size:
            raise invalid_archive(
                where, f"holds {len(content)} bytes but declares {info.file_size}"
            )
        return content
