"""`service.client`'s download against the real server: the archive's size and SHA-256
are checked before anything is unpacked (bytes damaged on the way leave nothing behind),
and progress is reported for the transfer and for the unpacking."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from service.app import Running
from service.client import Client, ExportSettings
from service.client._rpc import Rpc
from service.client.exports import ArchiveIntegrityError
from tests.conftest import Caller
from tests.e2e.test_client_exports import labelled_dataset, names_in, run
from tests.unit.test_unpack_archive import Recording

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs


def flip_last_byte(chunk: bytes) -> bytes:
    return chunk[:-1] + bytes([chunk[-1] ^ 1])


def drop_last_byte(chunk: bytes) -> bytes:
    return chunk[:-1]


@pytest.mark.parametrize(
    ("damage", "complaint"), [(flip_last_byte, "SHA-256"), (drop_last_byte, "received")]
)
async def test_bytes_damaged_on_the_way_are_refused_and_leave_nothing(
    server: Running,
    caller: Caller,
    datasets: Datasets,
    inputs: Inputs,
    annotations: Annotations,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    damage: Callable[[bytes], bytes],
    complaint: str,
) -> None:
    await labelled_dataset(datasets, inputs, annotations, caller)
    real_stream = Rpc.stream

    def damaged(self: Rpc, method: Any, request: Any) -> Iterator[Any]:
        # The transport between the server and the client, as a faulty network would.
        for message in real_stream(self, method, request):
            if message.chunk:
                message.chunk = damage(message.chunk)
            yield message

    monkeypatch.setattr(Rpc, "stream", damaged)
    target = tmp_path / "out"
    with Client(f"127.0.0.1:{server.port}", caller.key, caller.app_id) as client:
        with pytest.raises(ArchiveIntegrityError, match=complaint):
            await run(lambda: client.datasets.download("ds", target, show_progress=False))
        assert names_in(tmp_path) == []

        monkeypatch.setattr(Rpc, "stream", real_stream)
        result = await run(lambda: client.datasets.download("ds", target, show_progress=False))
    assert result.assets_count == 7 and names_in(tmp_path) == ["out"]


async def test_download_reports_the_transfer_then_the_unpacking(
    server: Running,
    caller: Caller,
    datasets: Datasets,
    inputs: Inputs,
    annotations: Annotations,
    tmp_path: Path,
) -> None:
    await labelled_dataset(datasets, inputs, annotations, caller)
    progress = Recording()
    with Client(f"127.0.0.1:{server.port}", caller.key, caller.app_id) as client:
        result = await run(
            lambda: client.datasets.download(
                "ds", tmp_path / "out", ExportSettings(format="vi_full"), progress=progress
            )
        )
        export = await run(lambda: client.datasets.get_export("ds", result.export_id))
    assert result.format == "vi_full" and result.media_files == 6
    # The export's wait, the transfer of its bytes, then one count per archive entry.
    assert [task[0] for task in progress.tasks][-2:] == ["downloading", "unpacking"]
    assert progress.tasks[-2] == ("downloading", export.size, "bytes")
    # Six images, the annotations of the split and metadata.json.
    assert progress.tasks[-1] == ("unpacking", 8, "files")
    assert progress.done["downloading"] == export.size and progress.done["unpacking"] == 8
    images = sorted((tmp_path / "out" / "assets").rglob("*.png"))
    assert len(images) == 6
    assert all(image.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for image in images)
