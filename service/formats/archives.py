"""The domain's ArchiveFormats and ArchiveReader: the format asked for picks the writer of
an export and the reader of an import."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from datetime import datetime
from typing import BinaryIO

from service.domain.imported import ArchiveLimits, ImportedInput, ImportFormat
from service.domain.models import ExportFormat, ExportOptions
from service.domain.ports import ArchiveWriter, ByteSink, MediaStreams
from service.formats.clarifai.reader import protobuf_batches
from service.formats.clarifai.writer import ClarifaiDataWriter
from service.formats.coco.reader import coco_batches
from service.formats.coco.writer import CocoWriter
from service.formats.safezip import SafeZip

_READERS: dict[ImportFormat, Callable[[SafeZip], Iterator[list[ImportedInput]]]] = {
    ImportFormat.CLARIFAI_DATA_PROTOBUF: protobuf_batches,
    ImportFormat.COCO: coco_batches,
}


class Archives:
    def __init__(self, streams: MediaStreams) -> None:
        # Where embedded media are read from.
        self._streams = streams

    def writer(
        self,
        export_format: ExportFormat,
        options: ExportOptions,
        splits: list[str],
        sink: ByteSink,
        modified: datetime,
    ) -> ArchiveWriter:
        if export_format is ExportFormat.COCO:
            return CocoWriter(
                options.embed_media, splits, sink, modified, self._streams, "datasetd export"
            )
        return ClarifaiDataWriter(export_format, options.embed_media, sink, modified, self._streams)


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
