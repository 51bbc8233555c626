"""The domain's ArchiveFormats and ArchiveReader: the format asked for picks the writer of
an export and the reader of an import."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from datetime import datetime
from typing import BinaryIO

from service.domain.imported import ArchiveLimits, ImportedInput, ImportFormat
from service.domain.models import (
    ExportFormat,
    ExportOptions,
    FidelityReport,
    VersionMember,
    VersionOntology,
)
from service.domain.ports import ArchiveWriter, ByteSink, MediaStreams
from service.formats.clarifai.reader import protobuf_batches
from service.formats.clarifai.writer import ClarifaiDataWriter
from service.formats.coco.reader import coco_batches
from service.formats.coco.writer import CocoWriter
from service.formats.media_reads import READ_AHEAD, ReadAhead
from service.formats.safezip import SafeZip
from service.formats.vi.writer import ViWriter
from service.observability import metrics

_READERS: dict[ImportFormat, Callable[[SafeZip], Iterator[list[ImportedInput]]]] = {
    ImportFormat.CLARIFAI_DATA_PROTOBUF: protobuf_batches,
    ImportFormat.COCO: coco_batches,
}


class Archives:
    def __init__(self, streams: MediaStreams, reads: ReadAhead = READ_AHEAD) -> None:
        # Where embedded media are read from, and how far ahead of the archive.
        self._streams = streams
        self._reads = reads

    def writer(
        self,
        export_format: ExportFormat,
        options: ExportOptions,
        splits: list[str],
        sink: ByteSink,
        modified: datetime,
        ontology: VersionOntology | None = None,
        hosted_prefix: str | None = None,
    ) -> ArchiveWriter:
        counted = _CountingSink(sink)
        writer: ArchiveWriter
        if export_format is ExportFormat.COCO:
            writer = CocoWriter(
                options.embed_media,
                splits,
                counted,
                modified,
                self._streams,
                "datasetd export",
                ontology,
                self._reads,
            )
        elif export_format in (ExportFormat.VI_FULL, ExportFormat.VI_JSONL):
            writer = ViWriter(
                export_format is ExportFormat.VI_FULL,
                options.pixel_coordinates,
                splits,
                counted,
                modified,
                self._streams,
                ontology,
                self._reads,
            )
        else:
            writer = ClarifaiDataWriter(
                export_format,
                options.embed_media,
                counted,
                modified,
                self._streams,
                ontology,
                self._reads,
                hosted_prefix,
            )
        # COCO and Vi archives carry no `hosted`: their media are embedded or named by
        # file name, so the prefix is not theirs to use.
        return _CountedWriter(writer, counted)


class _CountingSink:
    def __init__(self, sink: ByteSink) -> None:
        self._sink = sink
        self.size = 0

    async def write(self, chunk: bytes) -> None:
        await self._sink.write(chunk)
        self.size += len(chunk)


class _CountedWriter:
    """Adds an archive's members and bytes to the export metrics once the archive is
    complete: a run that fails before its end counts nothing."""

    def __init__(self, writer: ArchiveWriter, sink: _CountingSink) -> None:
        self._writer = writer
        self._sink = sink
        self._members = 0

    @property
    def needs_census(self) -> bool:
        return self._writer.needs_census

    async def observe(self, members: list[VersionMember]) -> list[frozenset[str]]:
        return await self._writer.observe(members)

    async def labels(self, members: list[VersionMember]) -> list[frozenset[str]]:
        return await self._writer.labels(members)

    async def write(self, split: str, members: list[VersionMember]) -> int:
        written = await self._writer.write(split, members)
        self._members += written
        return written

    async def finish(self) -> FidelityReport:
        report = await self._writer.finish()
        metrics.exported(self._members, self._sink.size)
        return report


class ZipArchiveReader:
    """The domain's ArchiveReader."""

    def read(
        self, archive: BinaryIO, archive_format: ImportFormat, limits: ArchiveLimits
    ) -> Generator[list[ImportedInput], None, None]:
        archive_zip = SafeZip(archive, limits)
        try:
            yield from _READERS[archive_format](archive_zip)
        finally:
            archive_zip.close()
