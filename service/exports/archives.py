"""The domain's ArchiveFormats: one writer per export format."""

from __future__ import annotations

from datetime import datetime

from service.domain.models import ExportFormat, ExportOptions
from service.domain.ports import ArchiveWriter, ByteSink, MediaStreams
from service.exports.clarifai import ClarifaiDataWriter
from service.exports.coco import CocoWriter


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
