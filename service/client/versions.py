"""Dataset versions: create (and wait for the build), get, list, delete, latest READY.

A version is built by a background job on the server; `create_version` polls it until it
is READY or FAILED, so that callers get a usable version or a typed error, never a
PENDING one they have to watch themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from datasetd.v1 import dataset_version_pb2, status_pb2
from datasetd.v1 import dataset_version_service_pb2 as api
from google.protobuf import json_format

from service.client._rpc import Rpc, time_of
from service.client.errors import JobFailedError
from service.client.progress import Progress, reporter

_PREFIX = "STATUS_CODE_DATASET_VERSION_"
READY = "READY"
FAILED = "FAILURE"
_RUNNING = ("PENDING", "IN_PROGRESS")
# Polling starts fast (small exports finish in well under a second) and backs off.
POLL_FIRST_SECONDS = 0.05
# Polls grow by a quarter up to half a second: a job is seen done at most ~25% (or 0.5 s)
# after it ended, for a few cheap Get calls more.
POLL_GROWTH = 1.25
POLL_MAX_SECONDS = 0.5


class VersionFailedError(JobFailedError):
    """A version build ended in FAILURE; `version.details` holds the server's explanation."""

    def __init__(self, version: VersionInfo) -> None:
        what = f"version {version.id} of dataset {version.dataset_id}"
        super().__init__(
            f"{what} failed to build: {version.details or 'no details'}", "VERSION_BUILD_FAILED"
        )
        self.version = version


@dataclass(frozen=True)
class VersionInfo:
    """A dataset version as the server last returned it."""

    id: str
    dataset_id: str
    # The status code without its prefix: PENDING, IN_PROGRESS, READY or FAILURE.
    status: str
    description: str
    inputs_count: int
    # Counters of DatasetVersionMetrics by metrics key ("/" is the whole version).
    metrics: dict[str, dict[str, int]]
    created_at: datetime | None
    modified_at: datetime | None = None
    percent_completed: int = 0
    details: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.status == READY

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        for name in ("created_at", "modified_at"):
            value = result[name]
            result[name] = value.isoformat() if value else None
        return result


def status_name(code: int, prefix: str) -> str:
    """`STATUS_CODE_<prefix><NAME>` as NAME; unknown codes as their number."""
    try:
        name = status_pb2.StatusCode.Name(code)  # type: ignore[arg-type]
    except ValueError:
        return str(code)
    return name.removeprefix(prefix)


def to_version_info(message: dataset_version_pb2.DatasetVersion) -> VersionInfo:
    metrics = {
        key: {f.name: getattr(value, f.name).value for f in value.DESCRIPTOR.fields}
        for key, value in message.metrics.items()
    }
    whole = metrics.get("/", {})
    return VersionInfo(
        id=message.id,
        dataset_id=message.dataset_id,
        status=status_name(message.status.code, _PREFIX),
        description=message.description,
        inputs_count=whole.get("inputs_count", 0),
        metrics=metrics,
        created_at=time_of(message, "created_at"),
        modified_at=time_of(message, "modified_at"),
        percent_completed=message.status.percent_completed,
        details=message.status.details,
        metadata=json_format.MessageToDict(message.metadata),
    )


class _Job(Protocol):
    """A server job as last fetched: a version build or an export."""

    @property
    def status(self) -> str: ...

    @property
    def percent_completed(self) -> int: ...


J = TypeVar("J", bound=_Job)


def wait_for(
    fetch: Callable[[], J],
    ok: str,
    failed: Callable[[J], Exception],
    timeout: float,
    label: str,
    progress: Progress,
) -> J:
    """Fetches the job until it left PENDING and IN_PROGRESS, reporting its percentage:
    status `ok` is returned, any other raised as `failed(job)`; TimeoutError after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = POLL_FIRST_SECONDS
    shown = 0
    progress.start(label, 100, "percent")
    try:
        while True:
            current = fetch()
            finished = current.status not in _RUNNING
            reached = 100 if finished else current.percent_completed
            progress.advance(max(reached - shown, 0))
            shown = max(reached, shown)
            if finished:
                break
            if time.monotonic() + delay > deadline:
                raise TimeoutError(f"{label}: still not finished after {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * POLL_GROWTH, POLL_MAX_SECONDS)
    finally:
        progress.finish()
    if current.status != ok:
        raise failed(current)
    return current


class Versions:
    """The versions of one dataset; `Dataset` inherits these methods."""

    def __init__(self, rpc: Rpc, dataset_id: str) -> None:
        self.rpc = rpc
        self.id = dataset_id

    def create_version(
        self,
        version_id: str = "",
        description: str = "",
        metadata: dict[str, Any] | None = None,
        wait: bool = True,
        timeout: float = 600,
        show_progress: bool = False,
        request_id: str | None = None,
        progress: Progress | None = None,
    ) -> VersionInfo:
        """Creates a version; with `wait`, returns it READY or raises VersionFailedError."""
        version = dataset_version_pb2.DatasetVersion(id=version_id, description=description)
        if metadata:
            version.metadata.update(metadata)
        response = self.rpc.app_call(
            self.rpc.versions.CreateDatasetVersion,
            api.CreateDatasetVersionRequest,
            dataset_id=self.id,
            version=version,
            request_id=request_id,
        )
        created = to_version_info(response.version)
        if not wait:
            return created
        if created.status == READY:
            # A snapshot by reference is READY when created: nothing to wait for.
            return created
        return self.wait_version(created.id, timeout, show_progress, progress)

    def wait_version(
        self,
        version_id: str,
        timeout: float = 600,
        show_progress: bool = False,
        progress: Progress | None = None,
    ) -> VersionInfo:
        """Waits until the version left PENDING and IN_PROGRESS (a version created by a
        release that built versions in the background); READY is returned, FAILURE raised."""
        return wait_for(
            lambda: self.get_version(version_id),
            READY,
            VersionFailedError,
            timeout,
            f"building version {version_id}",
            reporter(show_progress, progress),
        )

    def get_version(self, version_id: str) -> VersionInfo:
        response = self.rpc.app_call(
            self.rpc.versions.GetDatasetVersion,
            api.GetDatasetVersionRequest,
            dataset_id=self.id,
            version_id=version_id,
        )
        return to_version_info(response.version)

    def list_versions(self, page_size: int = 50) -> Iterator[VersionInfo]:
        """Newest first; pages are fetched lazily."""
        for response in self.rpc.app_pages(
            self.rpc.versions.ListDatasetVersions,
            api.ListDatasetVersionsRequest,
            page_size,
            dataset_id=self.id,
        ):
            for message in response.versions:
                yield to_version_info(message)

    def delete_version(self, version_id: str, request_id: str | None = None) -> None:
        self.rpc.app_call(
            self.rpc.versions.DeleteDatasetVersion,
            api.DeleteDatasetVersionRequest,
            dataset_id=self.id,
            version_id=version_id,
            request_id=request_id,
        )

    def latest_version(self) -> VersionInfo | None:
        """The newest READY version, or None."""
        return next((v for v in self.list_versions() if v.status == READY), None)

    def latest_or_new(
        self, timeout: float = 600, show_progress: bool = False, progress: Progress | None = None
    ) -> VersionInfo:
        """The newest READY version; else the newest one still building, once built; else
        a new one. Versions that failed are skipped."""
        building: VersionInfo | None = None
        for version in self.list_versions():
            if version.status == READY:
                return version
            if building is None and version.status in _RUNNING:
                building = version
        if building is not None:
            try:
                return self.wait_version(building.id, timeout, show_progress, progress)
            except VersionFailedError:
                pass
        return self.create_version(timeout=timeout, show_progress=show_progress, progress=progress)
