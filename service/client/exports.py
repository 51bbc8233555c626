"""Exports and downloads of dataset versions.

`Datasets` delegates to the functions here; they take the shared `Rpc`.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import grpc
from datasetd.v1 import dataset_version_pb2
from datasetd.v1 import dataset_version_service_pb2 as api

from service.client._rpc import Rpc, time_of
from service.client.errors import JobFailedError, NotFoundError
from service.client.progress import Progress, reporter, text_table
from service.client.unpack import SPLIT, unpack
from service.client.versions import READY, Versions, status_name, wait_for

FORMATS: dict[str, dataset_version_pb2.ExportFormat.ValueType] = {
    "clarifai_data_protobuf": dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF,
    "clarifai_data_json": dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_JSON,
    "coco": dataset_version_pb2.EXPORT_FORMAT_COCO,
    "vi_full": dataset_version_pb2.EXPORT_FORMAT_VI_FULL,
    "vi_jsonl": dataset_version_pb2.EXPORT_FORMAT_VI_JSONL,
}
# The Datature Vi layouts: coordinates chosen by the server, media always (full) or never.
VI_FORMATS = ("vi_full", "vi_jsonl")
_FORMAT_NAMES = {value: name for name, value in FORMATS.items()}
_PREFIX = "STATUS_CODE_DATASET_VERSION_EXPORT_"
SUCCESS = "SUCCESS"
DEFAULT_SPLIT_NAMES = ("train", "validation", "test")
MIB = 1024 * 1024


# --- settings and results --------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSettings:
    """How to export a version; validated on construction (ValueError).

    * `format`: "clarifai_data_protobuf" (default), "clarifai_data_json" or "coco".
    * `normalized`: coordinates of the unpacked annotations (download only). None keeps the
      format's own (Clarifai formats: normalized [0, 1]; COCO: pixels). True with COCO
      divides bbox, polygon segmentation and area by the image size; False with the
      Clarifai formats multiplies boxes, polygons and points by the image (or video) size
      the archive records, and fails for an input with regions but no recorded size.
    * `split_ratio`: {"train": 0.8, "validation": 0.2}, or 2 or 3 ratios mapped to
      train/validation(/test); each > 0, summing to 1. None: one split named "all".
    * `seed`: of the deterministic, concept-stratified split.
    * `embed_media`: media bytes inside the archive. None: embedded by `download` (unless
      `annotations_only`), referenced by `create_export`. The Vi formats decide it
      themselves: "vi_full" always embeds, "vi_jsonl" never.
    * `pixel_coordinates`: "vi_full" and "vi_jsonl" only: the server writes pixels instead
      of normalized [0, 1] coordinates.
    """

    format: str = "clarifai_data_protobuf"
    normalized: bool | None = None
    split_ratio: Mapping[str, float] | Sequence[float] | None = None
    seed: int = 0
    embed_media: bool | None = None
    pixel_coordinates: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(
                f"export format must be one of {', '.join(FORMATS)}, not {self.format!r}"
            )
        if self.normalized not in (None, True, False):
            raise ValueError(f"normalized must be True, False or None, not {self.normalized!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, not {self.seed!r}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in 0..2**64-1, not {self.seed}")
        if self.pixel_coordinates and self.format not in VI_FORMATS:
            raise ValueError(
                f"pixel_coordinates is for the formats {', '.join(VI_FORMATS)}, not {self.format!r}"
            )
        self.ratios()

    def ratios(self) -> dict[str, float]:
        """The split as named ratios ({} without a split)."""
        given = self.split_ratio
        if given is None:
            return {}
        if isinstance(given, Mapping):
            named = dict(given)
        elif isinstance(given, Sequence) and not isinstance(given, str):
            if not 2 <= len(given) <= 3:
                raise ValueError(
                    f"split_ratio as a list needs 2 or 3 ratios (train, validation, test), "
                    f"not {len(given)}"
                )
            named = dict(zip(DEFAULT_SPLIT_NAMES, given, strict=False))
        else:
            raise ValueError(f"split_ratio must be a dict or a list of ratios, not {given!r}")
        if not named:
            raise ValueError("split_ratio needs at least one split")
        for name, ratio in named.items():
            if not isinstance(name, str) or not SPLIT.match(name):
                raise ValueError(
                    f"split name {name!r} must be 1..32 characters of lowercase a-z, 0-9, _ or -"
                )
            if (
                isinstance(ratio, bool)
                or not isinstance(ratio, int | float)
                or not math.isfinite(ratio)
                or ratio <= 0
            ):
                raise ValueError(f"split ratio of {name!r} must be a number > 0, not {ratio!r}")
        total = sum(float(r) for r in named.values())
        if abs(total - 1) > 1e-6:
            raise ValueError(f"split ratios must sum to 1, not {total:g}")
        return {name: float(ratio) for name, ratio in named.items()}

    def embed(self, default: bool) -> bool:
        """Whether the export embeds the media, `default` unless the settings decide."""
        if self.format in VI_FORMATS:
            return self.format == "vi_full"
        return default if self.embed_media is None else self.embed_media

    def options(self, embed_media: bool) -> api.ExportOptions:
        message = api.ExportOptions(
            embed_media=embed_media, pixel_coordinates=self.pixel_coordinates
        )
        ratios = self.ratios()
        if ratios:
            message.split.ratios.update(ratios)
            message.split.seed = self.seed
        return message


@dataclass(frozen=True)
class ExportInfo:
    """An export of a version as the server last returned it."""

    id: str
    dataset_id: str
    version_id: str
    format: str
    # PENDING, IN_PROGRESS, SUCCESS, FAILED or UNEXPECTED_ERROR.
    status: str
    percent_completed: int
    details: str
    size: int
    url: str
    url_expires_at: datetime | None
    split_counts: dict[str, int]
    # {"dropped": {kind: count}, "notes": [...]}: what the format could not carry.
    fidelity: dict[str, Any]
    embed_media: bool
    split_ratio: dict[str, float]
    seed: int
    created_at: datetime | None
    modified_at: datetime | None
    pixel_coordinates: bool = False

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCESS

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        for name in ("url_expires_at", "created_at", "modified_at"):
            value = result[name]
            result[name] = value.isoformat() if value else None
        return result


# `Datasets.list` shadows the builtin inside that class.
ExportList = list[ExportInfo]


class ExportFailedError(JobFailedError):
    """An export ended FAILED (or UNEXPECTED_ERROR); `export.details` says why."""

    def __init__(self, export: ExportInfo) -> None:
        what = f"export {export.id} of version {export.version_id}"
        super().__init__(f"{what} failed: {export.details or export.status}", "EXPORT_FAILED")
        self.export = export


class ArchiveIntegrityError(OSError):
    """The downloaded archive does not have the size or SHA-256 the server announced."""


@dataclass(frozen=True)
class DownloadResult:
    """What `download` wrote into `save_dir` (see docs for the layout)."""

    save_dir: Path
    # Size of the downloaded archive in MiB.
    size_mb: float
    splits: dict[str, int]
    assets_count: int
    annotations_count: int
    format: str
    version_id: str
    export_id: str
    size_bytes: int = 0
    sha256: str = ""
    media_files: int = 0
    # Inputs whose media the archive only references, so no file was written.
    media_missing: list[str] = field(default_factory=list)

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [
            ("format", self.format),
            ("version", self.version_id),
            ("export", self.export_id),
            ("size", f"{self.size_mb:.2f} MiB"),
            ("assets", str(self.assets_count)),
            ("media files", str(self.media_files)),
            ("annotations", str(self.annotations_count)),
        ]
        rows += [(f"split {split}", str(count)) for split, count in self.splits.items()]
        if self.media_missing:
            rows.append(("media not in archive", str(len(self.media_missing))))
        return rows

    def summary_title(self) -> str:
        return f"Downloaded {self.format} into {self.save_dir}"

    def summary(self) -> str:
        return text_table(self.summary_title(), self.summary_rows())

    def info(self) -> str:
        """Prints the summary and returns it."""
        text = self.summary()
        print(text)
        return text

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result["save_dir"] = str(self.save_dir)
        return result


def to_export_info(message: api.Export) -> ExportInfo:
    return ExportInfo(
        id=message.id,
        dataset_id=message.dataset_id,
        version_id=message.version_id,
        format=_FORMAT_NAMES.get(message.format, str(message.format)),
        status=status_name(message.status.code, _PREFIX),
        percent_completed=message.status.percent_completed,
        details=message.status.details,
        size=message.size,
        url=message.url,
        url_expires_at=time_of(message, "url_expire_time"),
        split_counts=dict(message.split_counts),
        fidelity={
            "dropped": dict(message.fidelity.dropped),
            "notes": list(message.fidelity.notes),
        },
        embed_media=message.options.embed_media,
        split_ratio=dict(message.options.split.ratios),
        seed=message.options.split.seed,
        created_at=time_of(message, "created_at"),
        modified_at=time_of(message, "modified_at"),
        pixel_coordinates=message.options.pixel_coordinates,
    )


# --- download --------------------------------------------------------------------------------


# Written into every download, so that `overwrite` never deletes anything else.
DOWNLOAD_MARKER = ".datasetd-download"


def _check_target(save_dir: Path, overwrite: bool) -> None:
    if save_dir.exists() or save_dir.is_symlink():
        if not save_dir.is_dir():
            raise FileExistsError(f"{save_dir} exists and is not a directory")
        if not any(save_dir.iterdir()):
            return
        if not overwrite:
            raise FileExistsError(
                f"{save_dir} is not empty; pass overwrite=True to replace its content"
            )
        # Overwrite replaces the whole folder, so only ever one this client wrote.
        if not (save_dir / DOWNLOAD_MARKER).is_file():
            raise FileExistsError(
                f"{save_dir} is not an earlier datasetd download (it has no {DOWNLOAD_MARKER}); "
                "refusing to replace it even with overwrite: choose another save_dir"
            )


def _fetch(rpc: Rpc, export: ExportInfo, path: Path, progress: Progress) -> tuple[int, str]:
    """Streams the archive into `path`; returns its size and SHA-256 once both match what
    the server announced. Not fsynced: the file is read back at once and then deleted, so
    its durability buys nothing (it cost a quarter of the fetch)."""
    with path.open("wb") as sink:
        return fetch_into(rpc, export, sink, progress)


def fetch_into(
    rpc: Rpc, export: ExportInfo, sink: IO[bytes], progress: Progress
) -> tuple[int, str]:
    """Streams the archive into `sink`; returns its size and SHA-256 once both match what
    the server announced (ArchiveIntegrityError otherwise)."""
    digest = hashlib.sha256()
    size, announced_size, announced_sha = 0, -1, ""
    request = api.DownloadExportRequest(
        app_id=rpc.app,
        dataset_id=export.dataset_id,
        version_id=export.version_id,
        export_id=export.id,
    )
    progress.start("downloading", export.size or None, "bytes")
    try:
        for index, message in enumerate(rpc.stream(rpc.versions.DownloadExport, request)):
            if index == 0:
                announced_size, announced_sha = message.total_size, message.sha256
            sink.write(message.chunk)
            digest.update(message.chunk)
            size += len(message.chunk)
            progress.advance(len(message.chunk))
    finally:
        progress.finish()
    if size != announced_size or (export.size and size != export.size):
        raise ArchiveIntegrityError(
            f"export {export.id}: received {size} bytes, the server announced {announced_size}"
        )
    if digest.hexdigest() != announced_sha:
        raise ArchiveIntegrityError(
            f"export {export.id}: SHA-256 {digest.hexdigest()} differs from the announced "
            f"{announced_sha}"
        )
    return size, announced_sha


# --- exports ---------------------------------------------------------------------------------


class Exports:
    """Exports and downloads of a dataset's versions; `Datasets` inherits these methods."""

    _rpc: Rpc

    def create_export(
        self,
        dataset_id: str,
        export_settings: ExportSettings | None = None,
        version_id: str | None = None,
        request_id: str | None = None,
    ) -> ExportInfo:
        """Exports `version_id` (default: the newest READY version, or a new one, built
        first); returns at once (the export may still be PENDING), see `wait_export`;
        idempotent."""
        settings = export_settings or ExportSettings()
        if version_id is None:
            version_id = Versions(self._rpc, dataset_id).latest_or_new().id
        # Unset `embed_media`: referenced, the server's default.
        return self._export(dataset_id, settings, version_id, settings.embed(False), request_id)

    def _export(
        self,
        dataset_id: str,
        settings: ExportSettings,
        version_id: str,
        embed_media: bool,
        request_id: str | None = None,
    ) -> ExportInfo:
        response = self._rpc.app_call(
            self._rpc.versions.ExportDatasetVersion,
            api.ExportDatasetVersionRequest,
            dataset_id=dataset_id,
            version_id=version_id,
            format=FORMATS[settings.format],
            options=settings.options(embed_media),
            request_id=request_id,
        )
        return to_export_info(response.export)

    def _get(self, dataset_id: str, version_id: str, export_id: str) -> ExportInfo:
        response = self._rpc.app_call(
            self._rpc.versions.GetExport,
            api.GetExportRequest,
            dataset_id=dataset_id,
            version_id=version_id,
            export_id=export_id,
        )
        return to_export_info(response.export)

    def get_export(
        self, dataset_id: str, export_id: str, version_id: str | None = None
    ) -> ExportInfo:
        """The export; without `version_id` the dataset's versions are searched, newest
        first."""
        if version_id is not None:
            return self._get(dataset_id, version_id, export_id)
        for version in Versions(self._rpc, dataset_id).list_versions():
            if version.status != READY:
                continue
            try:
                return self._get(dataset_id, version.id, export_id)
            except NotFoundError:
                continue
        raise NotFoundError(
            grpc.StatusCode.NOT_FOUND,
            f"no version of dataset {dataset_id} has an export {export_id}",
            reason="EXPORT_NOT_FOUND",
        )

    def list_exports(self, dataset_id: str, version_id: str | None = None) -> ExportList:
        """The exports of `version_id` (default: the newest READY version; [] if none)."""
        if version_id is None:
            latest = Versions(self._rpc, dataset_id).latest_version()
            if latest is None:
                return []
            version_id = latest.id
        pages = self._rpc.app_pages(
            self._rpc.versions.ListExports,
            api.ListExportsRequest,
            1000,
            dataset_id=dataset_id,
            version_id=version_id,
        )
        return [to_export_info(e) for response in pages for e in response.exports]

    def find_export(
        self,
        dataset_id: str,
        version_id: str,
        export_format: str | None = None,
        split_ratio: Mapping[str, float] | Sequence[float] | None = None,
        embed_media: bool | None = None,
    ) -> ExportInfo | None:
        """The newest successful export of the version with the given format, split ratios
        (as ExportSettings reads them) and media embedding; None given matches any."""
        ratios = None if split_ratio is None else ExportSettings(split_ratio=split_ratio).ratios()
        matching = [
            export
            for export in self.list_exports(dataset_id, version_id)
            if export.succeeded
            and export_format in (None, export.format)
            and ratios in (None, export.split_ratio)
            and embed_media in (None, export.embed_media)
        ]
        if not matching:
            return None
        return max(matching, key=lambda e: e.created_at.timestamp() if e.created_at else 0.0)

    def wait_export(
        self,
        dataset_id: str,
        export_id: str,
        version_id: str | None = None,
        timeout: float = 600,
        show_progress: bool = False,
        progress: Progress | None = None,
    ) -> ExportInfo:
        """Waits until the export ended: SUCCESS is returned, a failure raised
        (ExportFailedError), TimeoutError after `timeout` seconds."""
        if version_id is None:
            version_id = self.get_export(dataset_id, export_id).version_id
        version = version_id
        return wait_for(
            lambda: self._get(dataset_id, version, export_id),
            SUCCESS,
            ExportFailedError,
            timeout,
            f"exporting version {version_id}",
            reporter(show_progress, progress),
        )

    def download(
        self,
        dataset_id: str,
        save_dir: str | os.PathLike[str],
        export_settings: ExportSettings | None = None,
        annotations_only: bool = False,
        overwrite: bool = False,
        show_progress: bool = True,
        version_id: str | None = None,
        timeout: float = 600,
        progress: Progress | None = None,
        export_id: str | None = None,
    ) -> DownloadResult:
        """Downloads an export of a version and unpacks it into `save_dir` as media files
        plus annotation files per split.

        The export: `export_id` when given (of `version_id`, or searched for); else one of
        `version_id` (default: the newest READY version; one still building is waited for;
        with none, a new one is created). Without `export_settings` that is the newest
        finished export of the version carrying what the download needs (the media, unless
        `annotations_only`), whatever its format, so that a download after an export writes
        that export; with settings, or when none matches, the export of those settings
        (default Clarifai-Data-Protobuf), made now or reused (the server keeps one per
        version, format and options). `result.format` says which format was written."""
        target = Path(save_dir).expanduser().absolute()
        _check_target(target, overwrite)
        chosen: ExportInfo | None = None
        if export_id is not None:
            chosen = self.get_export(dataset_id, export_id, version_id)
            version_id = chosen.version_id
        elif version_id is None:
            versions = Versions(self._rpc, dataset_id)
            version_id = versions.latest_or_new(timeout, show_progress, progress).id
        if chosen is None and export_settings is None:
            chosen = self.find_export(
                dataset_id, version_id, embed_media=None if annotations_only else True
            )
        if chosen is None:
            settings = export_settings or ExportSettings()
            chosen = self._export(
                dataset_id, settings, version_id, settings.embed(not annotations_only)
            )
        export = self.wait_export(
            dataset_id, chosen.id, version_id, timeout, show_progress, progress
        )
        normalized = export_settings.normalized if export_settings else None
        target.parent.mkdir(parents=True, exist_ok=True)
        # Next to the target, so that the final renames stay on one file system.
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.download-", dir=target.parent))
        try:
            archive = work / "export.zip"
            shown = reporter(show_progress, progress)
            size, sha256 = _fetch(self._rpc, export, archive, shown)
            content = work / "content"
            content.mkdir()
            stats = unpack(archive, content, export.format, normalized, annotations_only, shown)
            archive.unlink()
            (content / DOWNLOAD_MARKER).write_text(f"{dataset_id} {version_id} {export.id}\n")
            _check_target(target, overwrite)
            if target.exists():
                # The old content goes into the work directory, removed below with it.
                target.rename(work / "previous")
            content.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return DownloadResult(
            save_dir=target,
            size_mb=round(size / MIB, 3),
            format=export.format,
            version_id=version_id,
            export_id=export.id,
            size_bytes=size,
            sha256=sha256,
            **asdict(stats),
        )
