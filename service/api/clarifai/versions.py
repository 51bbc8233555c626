"""V2 dataset version RPCs: PostDatasetVersions, ListDatasetVersions, GetDatasetVersion,
PatchDatasetVersions, DeleteDatasetVersions, PutDatasetVersionExports and
ListDatasetVersionMetricsGroups, on DatasetVersionService's native parts."""

from __future__ import annotations

import asyncio
import collections
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, cast

from clarifai_grpc.grpc.api import resources_pb2, service_pb2
from clarifai_grpc.grpc.api.status import status_code_pb2, status_pb2
from datasetd.v1 import dataset_version_pb2
from datasetd.v1 import dataset_version_service_pb2 as vapi
from datasetd.v1 import status_pb2 as native_status
from google.protobuf import field_mask_pb2, struct_pb2

from service.api.clarifai import status
from service.api.clarifai.convert import clarifai, native_all
from service.api.clarifai.datasets import user_of
from service.api.clarifai.paging import PageCursors, page_request
from service.api.clarifai.parts import NativeParts
from service.api.clarifai.scope import app_of
from service.api.interceptors import Context, current_principal
from service.api.versions import WHOLE_VERSION
from service.domain.errors import (
    DomainError,
    ErrorKind,
    FailedPrecondition,
    InvalidArgument,
    Violations,
)
from service.observability import REQUEST_ID

# Output-only fields a client echoes back (the SDK rebuilds versions from listings), and
# the origin marker: every datasetd version is made on request, Clarifai's MANUAL.
_IGNORED_VERSION_FIELDS = frozenset(
    {
        "user_id",
        "app_id",
        "dataset_id",
        "created_at",
        "modified_at",
        "status",
        "metrics",
        "export_info",
        "request_origin",
        "processing_info",
    }
)
_BUILDING = frozenset(
    {
        native_status.STATUS_CODE_DATASET_VERSION_PENDING,
        native_status.STATUS_CODE_DATASET_VERSION_IN_PROGRESS,
    }
)
_READY = native_status.STATUS_CODE_DATASET_VERSION_READY
# The formats of Clarifai's DatasetVersionExportFormat, which share datasetd's numbers.
EXPORT_FORMATS = {
    resources_pb2.CLARIFAI_DATA_PROTOBUF: dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF,
    resources_pb2.CLARIFAI_DATA_JSON: dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_JSON,
    resources_pb2.COCO: dataset_version_pb2.EXPORT_FORMAT_COCO,
}
_EXPORT_INFO_FIELDS = {
    dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF: "clarifai_data_protobuf",
    dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_JSON: "clarifai_data_json",
    dataset_version_pb2.EXPORT_FORMAT_COCO: "coco",
}
_MANUAL_ORIGINS = frozenset(
    {resources_pb2.DATASET_VERSION_REQUEST_ORIGIN_NOT_SET, resources_pb2.MANUAL}
)
# The parent path of the groups of the whole version (Clarifai's root).
ROOT = "/"
TOTAL = "total"


def version_out(
    version: dataset_version_pb2.DatasetVersion, user_id: str
) -> resources_pb2.DatasetVersion:
    converted = clarifai(version, resources_pb2.DatasetVersion)
    converted.user_id = user_id
    return converted


def metrics_out(
    metrics: dataset_version_pb2.DatasetVersionMetrics,
) -> resources_pb2.DatasetVersionMetrics:
    """Every count of `metrics`, with each wrapper set (0 included): the SDK reads the
    keys of `MessageToDict` and a missing one is its KeyError."""
    converted = resources_pb2.DatasetVersionMetrics()
    for descriptor in dataset_version_pb2.DatasetVersionMetrics.DESCRIPTOR.fields:
        getattr(converted, descriptor.name).value = getattr(metrics, descriptor.name).value
    return converted


_MEDIA = ("image", "video", "audio", "text")
_GEOMETRY_METRICS = (
    ("bounding_box", "bounding_boxes_count"),
    ("polygon", "polygons_count"),
    ("point", "points_count"),
    ("mask", "masks_count"),
)
# What a CONCEPT_ID group counts, each set even when 0 (the SDK reads
# boundingBoxesCount, positiveInputTagsCount and polygonsCount: absent is its KeyError).
CONCEPT_METRICS = (
    "inputs_count",
    "positive_input_tags_count",
    "positive_region_tags_count",
    "positive_frame_tags_count",
    "regions_count",
    *(metric for _, metric in _GEOMETRY_METRICS),
)
# Breakdowns kept in memory: a version never changes, so neither does its breakdown.
_REMEMBERED_BREAKDOWNS = 256
_SPOOL_BYTES = 32 << 20


@dataclass(frozen=True)
class Breakdown:
    """A version's counts per input type and per concept, read from its
    Clarifai-Data-Protobuf archive (the native metrics hold the whole version only)."""

    by_type: dict[str, int]
    by_concept: dict[str, Counter[str]]


def _positive(concepts: Iterable[resources_pb2.Concept]) -> set[str]:
    return {concept.id for concept in concepts if concept.value > 0}


def _count(item: resources_pb2.Input, breakdown: Breakdown) -> None:
    data = item.data
    kind = next((medium for medium in _MEDIA if data.HasField(medium)), None)
    if kind is not None:
        breakdown.by_type[kind] = breakdown.by_type.get(kind, 0) + 1
    tallies: dict[str, Counter[str]] = collections.defaultdict(Counter)
    for concept_id in _positive(data.concepts):
        tallies[concept_id]["positive_input_tags_count"] += 1
    for frame in data.frames:
        for concept_id in _positive(frame.data.concepts):
            tallies[concept_id]["positive_frame_tags_count"] += 1
    regions = [*data.regions, *(r for frame in data.frames for r in frame.data.regions)]
    for region in regions:
        for concept_id in _positive(region.data.concepts):
            tally = tallies[concept_id]
            tally["regions_count"] += 1
            tally["positive_region_tags_count"] += 1
            for geometry, metric in _GEOMETRY_METRICS:
                if region.region_info.HasField(geometry):
                    tally[metric] += 1
    for concept_id, tally in tallies.items():
        tally["inputs_count"] += 1
        breakdown.by_concept.setdefault(concept_id, Counter()).update(tally)


def breakdown_of(archive: IO[bytes]) -> Breakdown:
    """Counts the inputs of a Clarifai-Data-Protobuf archive, read as the SDK reads it
    (every entry but `mimetype` an InputBatch)."""
    breakdown = Breakdown({}, {})
    with zipfile.ZipFile(archive) as entries:
        for name in entries.namelist():
            if name == "mimetype" or name.endswith("/"):
                continue
            batch = resources_pb2.InputBatch.FromString(entries.read(name))
            for item in batch.inputs:
                _count(item, breakdown)
    return breakdown


def _group(
    kind: resources_pb2.DatasetVersionMetricsGroupType.ValueType,
    value: str,
    metrics: resources_pb2.DatasetVersionMetrics,
) -> resources_pb2.DatasetVersionMetricsGroup:
    return resources_pb2.DatasetVersionMetricsGroup(
        parent_path=ROOT, type=kind, value=struct_pb2.Value(string_value=value), metrics=metrics
    )


def metrics_groups(
    version: dataset_version_pb2.DatasetVersion, breakdown: Breakdown | None
) -> list[resources_pb2.DatasetVersionMetricsGroup]:
    """The groups of a READY version: the whole version as the INPUT_TYPE group
    "total" (which the SDK's upload status requires), then, with a breakdown, one
    INPUT_TYPE group per medium and one CONCEPT_ID group per concept."""
    groups = [_group(resources_pb2.INPUT_TYPE, TOTAL, metrics_out(version.metrics[WHOLE_VERSION]))]
    if breakdown is None:
        return groups
    for medium, count in sorted(breakdown.by_type.items()):
        metrics = resources_pb2.DatasetVersionMetrics()
        metrics.inputs_count.value = count
        groups.append(_group(resources_pb2.INPUT_TYPE, medium, metrics))
    for concept_id, tally in sorted(breakdown.by_concept.items()):
        metrics = resources_pb2.DatasetVersionMetrics()
        for name in CONCEPT_METRICS:
            getattr(metrics, name).value = tally[name]
        groups.append(_group(resources_pb2.CONCEPT_ID, concept_id, metrics))
    return groups


def _matches(
    group: resources_pb2.DatasetVersionMetricsGroup,
    request: service_pb2.ListDatasetVersionMetricsGroupsRequest,
) -> bool:
    if request.parent_paths and group.parent_path not in request.parent_paths:
        return False
    if request.types and group.type not in request.types:
        return False
    return not request.values or any(group.value == value for value in request.values)


@dataclass
class ClarifaiVersions:
    parts: NativeParts
    cursors: PageCursors[dataset_version_pb2.DatasetVersion] = field(default_factory=PageCursors)
    breakdowns: collections.OrderedDict[str, Breakdown] = field(
        default_factory=collections.OrderedDict
    )

    async def PostDatasetVersions(
        self, request: service_pb2.PostDatasetVersionsRequest, context: Context | None
    ) -> service_pb2.MultiDatasetVersionResponse:
        app_id = app_of(request)
        violations = Violations()
        versions = native_all(
            request.dataset_versions,
            dataset_version_pb2.DatasetVersion,
            "dataset_versions",
            violations,
            _IGNORED_VERSION_FIELDS,
        )
        if not versions:
            # The SDK's create_version always sends one; an empty list still makes one.
            versions = [dataset_version_pb2.DatasetVersion()]
        violations.raise_if_any()
        # All or nothing, like PostDatasets: a refusal of the n-th deletes the ones made
        # before it. Each is READY when it returns (a snapshot by reference).
        created: list[dataset_version_pb2.DatasetVersion] = []
        try:
            for given in versions:
                wanted = dataset_version_pb2.DatasetVersion(
                    id=given.id, description=given.description
                )
                if given.HasField("metadata"):
                    wanted.metadata.CopyFrom(given.metadata)
                response = await self.parts.versions.CreateDatasetVersion(
                    vapi.CreateDatasetVersionRequest(
                        app_id=app_id, dataset_id=request.dataset_id, version=wanted
                    ),
                    cast(Context, context),
                )
                created.append(response.version)
        except Exception:
            for version in created:
                await self.parts.versions.DeleteDatasetVersion(
                    vapi.DeleteDatasetVersionRequest(
                        app_id=app_id, dataset_id=request.dataset_id, version_id=version.id
                    ),
                    cast(Context, context),
                )
            raise
        user = user_of(request)
        return service_pb2.MultiDatasetVersionResponse(
            status=status.ok(REQUEST_ID.get()),
            dataset_versions=[version_out(v, user) for v in created],
        )

    async def ListDatasetVersions(
        self, request: service_pb2.ListDatasetVersionsRequest, context: Context | None
    ) -> service_pb2.MultiDatasetVersionResponse:
        app_id = app_of(request)
        page = page_request(request.page, request.per_page)
        if request.request_origins and not _MANUAL_ORIGINS.intersection(request.request_origins):
            # Every datasetd version was asked for (MANUAL); none came from training or
            # evaluation. The dataset must still exist.
            await self._version_list_page(app_id, request.dataset_id, 1, "", context)
            return service_pb2.MultiDatasetVersionResponse(status=status.ok(REQUEST_ID.get()))

        async def fetch(
            size: int, token: str
        ) -> tuple[list[dataset_version_pb2.DatasetVersion], str]:
            return await self._version_list_page(app_id, request.dataset_id, size, token, context)

        key = f"ListDatasetVersions|{current_principal().key_id}|{app_id}|{request.dataset_id}"
        items = await self.cursors.page(key, page, fetch)
        user = user_of(request)
        return service_pb2.MultiDatasetVersionResponse(
            status=status.ok(REQUEST_ID.get()),
            dataset_versions=[version_out(v, user) for v in items],
        )

    async def _version_list_page(
        self, app_id: str, dataset_id: str, size: int, token: str, context: Context | None
    ) -> tuple[list[dataset_version_pb2.DatasetVersion], str]:
        listed = await self.parts.versions.ListDatasetVersions(
            vapi.ListDatasetVersionsRequest(
                app_id=app_id, dataset_id=dataset_id, page_size=size, page_token=token
            ),
            cast(Context, context),
        )
        return list(listed.versions), listed.next_page_token

    async def _version(
        self, app_id: str, dataset_id: str, version_id: str, context: Context | None
    ) -> dataset_version_pb2.DatasetVersion:
        got = await self.parts.versions.GetDatasetVersion(
            vapi.GetDatasetVersionRequest(
                app_id=app_id, dataset_id=dataset_id, version_id=version_id
            ),
            cast(Context, context),
        )
        return got.version

    async def GetDatasetVersion(
        self, request: service_pb2.GetDatasetVersionRequest, context: Context | None
    ) -> service_pb2.SingleDatasetVersionResponse:
        app_id = app_of(request)
        version = await self._version(
            app_id, request.dataset_id, request.dataset_version_id, context
        )
        converted = version_out(version, user_of(request))
        await self._link_export_info(app_id, version, converted, context)
        return service_pb2.SingleDatasetVersionResponse(
            status=status.ok(REQUEST_ID.get()), dataset_version=converted
        )

    async def _link_export_info(
        self,
        app_id: str,
        version: dataset_version_pb2.DatasetVersion,
        converted: resources_pb2.DatasetVersion,
        context: Context | None,
    ) -> None:
        """Points each finished export of `export_info` at datasetd's own download link
        (the native URL is the object store's, which clients may not reach)."""
        if not any(getattr(version.export_info, name).url for name in _EXPORT_INFO_FIELDS.values()):
            return
        # export_info holds the most recently requested export of each format: the last
        # one of that format in ListExports (oldest first).
        latest: dict[int, vapi.Export] = {}
        token = ""
        while True:
            listed = await self.parts.exports.ListExports(
                vapi.ListExportsRequest(
                    app_id=app_id,
                    dataset_id=version.dataset_id,
                    version_id=version.id,
                    page_size=1000,
                    page_token=token,
                ),
                cast(Context, context),
            )
            for export in listed.exports:
                latest[export.format] = export
            token = listed.next_page_token
            if not token:
                break
        for export_format, name in _EXPORT_INFO_FIELDS.items():
            info = getattr(converted.export_info, name)
            found = latest.get(export_format)
            if info.url and found is not None and found.url:
                info.url = self.parts.links.export_url(app_id, found.id)

    async def PatchDatasetVersions(
        self, request: service_pb2.PatchDatasetVersionsRequest, context: Context | None
    ) -> service_pb2.MultiDatasetVersionResponse:
        app_id = app_of(request)
        if request.action != "overwrite":
            raise InvalidArgument.field(
                "action",
                "must be overwrite (description and metadata are replaced), "
                f"got {request.action!r}",
            )
        violations = Violations()
        versions = native_all(
            request.dataset_versions,
            dataset_version_pb2.DatasetVersion,
            "dataset_versions",
            violations,
            _IGNORED_VERSION_FIELDS,
        )
        if not versions:
            violations.add("dataset_versions", "must name at least one version")
        for index, version in enumerate(versions):
            if not version.id:
                violations.add(f"dataset_versions[{index}].id", "is required to patch a version")
        violations.raise_if_any()
        patched = []
        for version in versions:
            wanted = dataset_version_pb2.DatasetVersion(
                id=version.id, description=version.description, metadata=version.metadata
            )
            response = await self.parts.versions.UpdateDatasetVersion(
                vapi.UpdateDatasetVersionRequest(
                    app_id=app_id,
                    dataset_id=request.dataset_id,
                    version=wanted,
                    # Overwrite: both are replaced, an absent one by empty.
                    update_mask=field_mask_pb2.FieldMask(paths=["description", "metadata"]),
                ),
                cast(Context, context),
            )
            patched.append(response.version)
        user = user_of(request)
        return service_pb2.MultiDatasetVersionResponse(
            status=status.ok(REQUEST_ID.get()),
            dataset_versions=[version_out(v, user) for v in patched],
        )

    async def DeleteDatasetVersions(
        self, request: service_pb2.DeleteDatasetVersionsRequest, context: Context | None
    ) -> status_pb2.BaseResponse:
        app_id = app_of(request)
        if not request.dataset_version_ids:
            raise InvalidArgument.field("dataset_version_ids", "must name at least one version")
        for version_id in request.dataset_version_ids:
            await self.parts.versions.DeleteDatasetVersion(
                vapi.DeleteDatasetVersionRequest(
                    app_id=app_id, dataset_id=request.dataset_id, version_id=version_id
                ),
                cast(Context, context),
            )
        return status_pb2.BaseResponse(status=status.ok(REQUEST_ID.get()))

    async def PutDatasetVersionExports(
        self, request: service_pb2.PutDatasetVersionExportsRequest, context: Context | None
    ) -> service_pb2.MultiDatasetVersionExportResponse:
        """Idempotent: the SDK re-sends it every second as its poll, so asking again
        returns the same export's progress; SUCCESS at the top while it is written."""
        app_id = app_of(request)
        violations = Violations()
        formats: list[int] = []
        for index, given in enumerate(request.exports):
            chosen = EXPORT_FORMATS.get(given.format)
            if chosen is None:
                violations.add(
                    f"exports[{index}].format",
                    "must be CLARIFAI_DATA_PROTOBUF, CLARIFAI_DATA_JSON or COCO",
                )
            else:
                formats.append(chosen)
            if given.include_embeddings:
                violations.add(
                    f"exports[{index}].include_embeddings",
                    "is not supported: datasetd keeps no embeddings",
                )
        if not request.exports:
            violations.add("exports", "must name at least one export format")
        violations.raise_if_any()
        version = await self._version(
            app_id, request.dataset_id, request.dataset_version_id, context
        )
        response = service_pb2.MultiDatasetVersionExportResponse(status=status.ok(REQUEST_ID.get()))
        if version.status.code in _BUILDING:
            # The SDK exports right after create_version: the export is pending on the
            # build, and the SDK's poll asks again.
            for export_format in formats:
                response.exports.add(
                    format=cast(resources_pb2.DatasetVersionExportFormat.ValueType, export_format),
                    status=status.make(
                        status_code_pb2.DATASET_VERSION_EXPORT_PENDING,
                        "Export is waiting for the dataset version to be built",
                        f"version {version.id!r} is {version.status.description.lower()}",
                        REQUEST_ID.get(),
                    ),
                )
            return response
        if version.status.code != _READY:
            raise FailedPrecondition(
                f"dataset_version_id: version {version.id!r} cannot be exported: its build "
                f"failed ({version.status.details or 'no details'}); create a new version",
                reason="VERSION_NOT_READY",
            )
        for export_format in formats:
            made = await self.parts.exports.ExportDatasetVersion(
                vapi.ExportDatasetVersionRequest(
                    app_id=app_id,
                    dataset_id=request.dataset_id,
                    version_id=version.id,
                    format=cast(dataset_version_pb2.ExportFormat.ValueType, export_format),
                ),
                cast(Context, context),
            )
            export = made.export
            item = response.exports.add(
                format=cast(resources_pb2.DatasetVersionExportFormat.ValueType, export_format),
                status=clarifai(export.status, status_pb2.Status),
                size=export.size,
            )
            item.status.req_id = REQUEST_ID.get()
            if export.status.code == native_status.STATUS_CODE_DATASET_VERSION_EXPORT_SUCCESS:
                item.url = self.parts.links.export_url(app_id, export.id)
        return response

    async def ListDatasetVersionMetricsGroups(
        self,
        request: service_pb2.ListDatasetVersionMetricsGroupsRequest,
        context: Context | None,
    ) -> service_pb2.MultiDatasetVersionMetricsGroupResponse:
        app_id = app_of(request)
        page = page_request(request.page, request.per_page)
        version = await self._version(
            app_id, request.dataset_id, request.dataset_version_id, context
        )
        answer = service_pb2.MultiDatasetVersionMetricsGroupResponse(
            status=status.ok(REQUEST_ID.get())
        )
        if version.status.code in _BUILDING:
            # No metrics before the build ends: an empty list is what the SDK's upload
            # status waits on ("crunching the dataset metrics").
            return answer
        if version.status.code != _READY:
            raise FailedPrecondition(
                f"dataset_version_id: version {version.id!r} has no metrics: its build "
                f"failed ({version.status.details or 'no details'})",
                reason="VERSION_NOT_READY",
            )
        breakdown = await self._breakdown(app_id, version, context)
        if breakdown is _WRITING:
            return answer
        groups = [g for g in metrics_groups(version, breakdown) if _matches(g, request)]
        start = (page.page - 1) * page.per_page
        answer.dataset_version_metrics_groups.extend(groups[start : start + page.per_page])
        return answer

    async def _breakdown(
        self,
        app_id: str,
        version: dataset_version_pb2.DatasetVersion,
        context: Context | None,
    ) -> Breakdown | None:
        """The version's breakdown, from its protobuf export (made when missing, the
        same export PutDatasetVersionExports gives): `_WRITING` while the export is
        written, None when the caller may not make it (a read-only key: the "total"
        group alone)."""
        try:
            made = await self.parts.exports.ExportDatasetVersion(
                vapi.ExportDatasetVersionRequest(
                    app_id=app_id,
                    dataset_id=version.dataset_id,
                    version_id=version.id,
                    format=dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF,
                ),
                cast(Context, context),
            )
        except DomainError as error:
            if error.kind is ErrorKind.PERMISSION_DENIED:
                return None
            raise
        export = made.export
        if export.status.code != native_status.STATUS_CODE_DATASET_VERSION_EXPORT_SUCCESS:
            return _WRITING
        key = f"{app_id}/{version.dataset_id}/{version.id}/{export.id}"
        known = self.breakdowns.get(key)
        if known is not None:
            self.breakdowns.move_to_end(key)
            return known
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as archive:
            async for message in self.parts.exports.DownloadExport(
                vapi.DownloadExportRequest(
                    app_id=app_id,
                    dataset_id=version.dataset_id,
                    version_id=version.id,
                    export_id=export.id,
                ),
                cast(Context, context),
            ):
                archive.write(message.chunk)
            archive.seek(0)
            # CPU-bound parsing: in a thread, so the event loop keeps serving calls.
            breakdown = await asyncio.to_thread(breakdown_of, cast(IO[bytes], archive))
        self.breakdowns[key] = breakdown
        while len(self.breakdowns) > _REMEMBERED_BREAKDOWNS:
            self.breakdowns.popitem(last=False)
        return breakdown


# The breakdown of a version whose export is still being written.
_WRITING = Breakdown({}, {})
