"""Training loaders: the (image, annotations) samples of a Vi export, per split.

Two sources, one interface (`ViSamples`: iterable, and map-style with `len` and indexing):

* `ViSamples.from_folder(save_dir)`: a dataset downloaded in a Vi format
  (`client.datasets.download`, the default VI_FULL): `annotations/<split>.jsonl` beside
  `assets/<split>/...`.
* `ViSamples.from_server(client, dataset_id)`: a READY version streamed from the server
  (its VI_FULL export, made if needed) without unpacking anything to disk: the archive
  is held in memory (up to `memory_limit` bytes, beyond in one temporary file) and
  assets are read out of it as samples are asked for.

A sample is `Sample(image, annotations)`: `image` a loaded `PIL.Image.Image` (or the
file's bytes with `decode=False`), `annotations` the input's line of the Vi JSONL
(`asset_id`, `split`, `width`, `height`, `tags`, `annotations` with their geometry,
README "Export formats"). Only image assets are samples.

`torch_dataset(samples)` wraps them for `torch.utils.data.DataLoader` (torch is not a
dependency of datasetd; the adapter imports it when called).
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

from PIL import Image

from datasetd.client.client import Client
from datasetd.client.types import DatasetExportSettings
from service.client.exports import ExportInfo, fetch_into
from service.client.progress import reporter

Line = dict[str, Any]
ASSET_NAME = re.compile(r"^assets/[a-z0-9_-]{1,32}/[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}$")
# Archives up to this size stay in memory; larger ones go to one temporary file.
MEMORY_LIMIT = 1024 * 1024 * 1024


class Sample(NamedTuple):
    image: Any
    annotations: Line


def _lines(stream: IO[bytes], name: str, split: str | None) -> Iterator[Line]:
    for number, raw in enumerate(stream, 1):
        try:
            line = json.loads(raw)
        except ValueError as error:
            raise ValueError(f"line {number} of {name} is not JSON: {error}") from None
        if (split is None or line.get("split") == split) and line.get("media_type") == "image":
            yield line


def _split_names(names: list[str], split: str | None) -> list[str]:
    """Entries `annotations/<split>.jsonl` (of `split` only when given), sorted."""
    wanted = sorted(
        name
        for name in names
        if name.startswith("annotations/") and name.endswith(".jsonl") and name.count("/") == 1
    )
    if split is not None:
        wanted = [n for n in wanted if n == f"annotations/{split}.jsonl"]
    return wanted


class ViSamples:
    """The image samples of a Vi export; see the module docstring."""

    def __init__(
        self,
        lines: list[Line],
        read_asset: Callable[[str], bytes],
        decode: bool = True,
        transform: Callable[[Sample], Any] | None = None,
    ) -> None:
        self.lines = lines
        self._read_asset = read_asset
        self.decode = decode
        self.transform = transform

    @property
    def splits(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for line in self.lines:
            counts[line["split"]] = counts.get(line["split"], 0) + 1
        return counts

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> Any:
        line = self.lines[index]
        name = line.get("file_name")
        if not name:
            raise ValueError(
                f"asset {line.get('asset_id')!r} has no media in the export (VI_JSONL, or media "
                "only referenced by URL): load a VI_FULL export"
            )
        data = self._read_asset(name)
        image: Any = data
        if self.decode:
            image = Image.open(io.BytesIO(data))
            image.load()
        sample = Sample(image, line)
        return self.transform(sample) if self.transform else sample

    def __iter__(self) -> Iterator[Any]:
        for index in range(len(self.lines)):
            yield self[index]

    @classmethod
    def from_folder(
        cls,
        save_dir: str | os.PathLike[str],
        split: str | None = None,
        decode: bool = True,
        transform: Callable[[Sample], Any] | None = None,
    ) -> ViSamples:
        root = Path(save_dir)
        names = [f"annotations/{p.name}" for p in (root / "annotations").glob("*.jsonl")]
        if not names:
            raise ValueError(
                f"{root} has no annotations/<split>.jsonl: download it in a Vi format "
                "(DatasetExportFormat.VI_FULL, the default of client.datasets.download)"
            )
        lines: list[Line] = []
        for name in _split_names(names, split):
            with (root / name).open("rb") as stream:
                lines.extend(_lines(stream, str(root / name), split))

        def read_asset(name: str) -> bytes:
            # A line names its file: only a name of the layout, never a path out of it.
            if not ASSET_NAME.match(name):
                raise ValueError(f"asset name {name!r} is not assets/<split>/<file> of {root}")
            return (root / name).read_bytes()

        return cls(lines, read_asset, decode, transform)

    @classmethod
    def from_server(
        cls,
        client: Client,
        dataset_id: str,
        version_id: str | None = None,
        export_settings: DatasetExportSettings | None = None,
        split: str | None = None,
        decode: bool = True,
        transform: Callable[[Sample], Any] | None = None,
        memory_limit: int = MEMORY_LIMIT,
        show_progress: bool = False,
    ) -> ViSamples:
        """Streams the VI_FULL export of `version_id` (default: the newest READY version,
        built first when there is none) with `export_settings`' options."""
        native = client.native
        if version_id is None:
            version_id = native.dataset(dataset_id).latest_or_new().id
        export = client.datasets.create_export(dataset_id, export_settings, version_id=version_id)
        info = native.datasets.wait_export(
            dataset_id, export.dataset_export_id, version_id, show_progress=show_progress
        )
        if info.format != "vi_full":
            raise ValueError(f"streaming loads a vi_full export, not {info.format}")
        archive = _ArchiveSpool.fetch(client, info, memory_limit, show_progress)
        lines: list[Line] = []
        for name in _split_names(archive.names(), split):
            with archive.open(name) as stream:
                lines.extend(_lines(stream, name, split))
        return cls(lines, archive.read, decode, transform)


class _ArchiveSpool:
    """An export archive held in memory or in one temporary file, read as a ZIP; a
    process forked from this one (a DataLoader worker) opens its own handle."""

    def __init__(
        self, data: bytes | None, path: Path | None, handle: IO[bytes] | None = None
    ) -> None:
        self._data = data
        self._path = path
        # Kept open: a temporary file disappears when its handle is closed (collected).
        self._handle = handle
        self._lock = threading.Lock()
        self._zip: tuple[int, zipfile.ZipFile] | None = None

    @classmethod
    def fetch(
        cls, client: Client, export: ExportInfo, memory_limit: int, show_progress: bool
    ) -> _ArchiveSpool:
        progress = reporter(show_progress, None)
        if export.size <= memory_limit:
            buffer = io.BytesIO()
            fetch_into(client.native.rpc, export, buffer, progress)
            return cls(buffer.getvalue(), None)
        handle = tempfile.NamedTemporaryFile(prefix="datasetd-stream-", suffix=".zip")  # noqa: SIM115
        fetch_into(client.native.rpc, export, handle, progress)
        handle.flush()
        return cls(None, Path(handle.name), handle)

    def _archive(self) -> zipfile.ZipFile:
        pid = os.getpid()
        if self._zip is None or self._zip[0] != pid:
            if self._data is not None:
                self._zip = (pid, zipfile.ZipFile(io.BytesIO(self._data)))
            else:
                assert self._path is not None
                self._zip = (pid, zipfile.ZipFile(self._path))
        return self._zip[1]

    def names(self) -> list[str]:
        with self._lock:
            return self._archive().namelist()

    def open(self, name: str) -> IO[bytes]:
        with self._lock:
            return io.BytesIO(self._archive().read(name))

    def read(self, name: str) -> bytes:
        with self._lock:
            return self._archive().read(name)


def torch_dataset(samples: ViSamples) -> Any:
    """`samples` as a `torch.utils.data.Dataset` (map-style: shuffling and workers work);
    set `samples.transform` to turn a Sample into tensors, or pass a `collate_fn`."""
    from torch.utils.data import Dataset as TorchDataset

    class _Samples(TorchDataset[Any]):  # type: ignore[misc,unused-ignore]
        def __len__(self) -> int:
            return len(samples)

        def __getitem__(self, index: int) -> Any:
            return samples[index]

    return _Samples()


def torch_iterable(samples: ViSamples) -> Any:
    """`samples` as a `torch.utils.data.IterableDataset`, each DataLoader worker taking
    every n-th sample."""
    from torch.utils.data import IterableDataset, get_worker_info

    class _Stream(IterableDataset[Any]):  # type: ignore[misc,unused-ignore]
        def __iter__(self) -> Iterator[Any]:
            worker = get_worker_info()
            start, step = (worker.id, worker.num_workers) if worker else (0, 1)
            for index in range(start, len(samples), step):
                yield samples[index]

    return _Stream()
