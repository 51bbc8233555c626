"""Which set fields of a request the service refuses, and why (boundary.py asks).

The rule (issue 18): every field a caller sets is either accepted — stored and returned
by the matching Get/List — or refused with INVALID_ARGUMENT naming it. Nothing is
silently dropped. This module is the whole list of refusals, in three parts:

* `OUTPUT_ONLY`: fields the server sets (times, statuses, hosted URLs, probed media
  facts, statistics). They are refused wherever their message appears in a request,
  because a caller who sets one expects it kept. The proto comments say "Output only."
  for exactly these fields (tests/unit/test_field_policy.py keeps the two in step).
* `_refused_data_field`: `datasetd.v1.Data` is shared by inputs and annotations, and
  which of its fields are accepted depends on where it sits: media and geo belong to an
  input, regions and frames to an annotation (CreateInputs takes them too, as an
  annotation of the new input), and regions or frames do not nest.
* `_PER_REQUEST`: fields one request does not take though another does (an update
  cannot change media, memberships or the annotated input; an upload's media come as
  chunks). `Data.embeddings` is taken in an input's data only (CreateInputs,
  UpdateInputs, the UploadInput header), never in an annotation's, region's or frame's.

Everything else is accepted, request parameters (ids, page sizes, flags, masks,
`request_id`) included: the servicers consume them. `outside_mask` adds the one rule
that needs the request's values: with an update_mask, a patchable field set but not
named in the mask is refused rather than skipped.

The e2e test tests/e2e/test_field_roundtrip.py sets every field of every request and
checks each is either refused here or read back, so a field accepted and then lost
fails it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Final

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from service.domain.errors import FieldViolation
from service.domain.ontologies import UPDATABLE_FIELDS as UPDATABLE_ONTOLOGY_FIELDS
from service.domain.projects import UPDATABLE_FIELDS as UPDATABLE_PROJECT_FIELDS
from service.wire.access import UPDATABLE_USER_FIELDS
from service.wire.datasets import PATCHABLE_DATASET_FIELDS

_PACKAGE = "datasetd.v1."
OUTPUT = "output only: set by the server"
_TIMES = "output only: the server records when it happened"
_STATUS = "output only: the server reports the processing status"
_HOSTED = "output only: the server says where the stored media can be downloaded"
_PROBED = "output only: the server reads it from the stored media itself"
_STATISTICS = "output only: the server counts it"
# Issue 10, point 5: the size of a URL image the server never reads is the caller's to
# give (CreateInputs, `_DECLARED_SIZE`), so that its regions export in pixels; anywhere
# else (uploaded bytes, a dataset's cover, a mask) the server reads it from the image.
_SIZED = (
    "output only here: the server reads it from the image; give the width and height of "
    "a URL image in CreateInputs' inputs[].data.image.image_info"
)

# (message full name, field name) -> why a caller may not set it. Applies wherever the
# message appears in a request.
OUTPUT_ONLY: Final[Mapping[tuple[str, str], str]] = {
    **{
        (_PACKAGE + message, field): reason
        for message, fields in {
            "Input": {"created_at": _TIMES, "modified_at": _TIMES, "status": _STATUS},
            "Annotation": {
                "created_at": _TIMES,
                "modified_at": _TIMES,
                "status": _STATUS,
                "input_level": "output only: input-level concepts are set with the input's "
                "data.concepts (CreateInputs, UpdateInputs)",
            },
            "Image": {"hosted": _HOSTED, "image_info": _SIZED},
            "Video": {"hosted": _HOSTED, "video_info": _PROBED},
            "Audio": {"hosted": _HOSTED, "audio_info": _PROBED},
            "Text": {"hosted": _HOSTED, "text_info": _PROBED},
            "HostedURL": dict.fromkeys(("prefix", "suffix", "sizes"), _HOSTED),
            "ImageInfo": {
                **dict.fromkeys(("width", "height"), _SIZED),
                **dict.fromkeys(("format", "color_mode"), _PROBED),
            },
            "VideoInfo": dict.fromkeys(
                (
                    "width",
                    "height",
                    "fps",
                    "video_format",
                    "bit_rate",
                    "frame_count",
                    "duration_seconds",
                ),
                _PROBED,
            ),
            "AudioInfo": dict.fromkeys(
                ("audio_format", "sample_rate", "duration_seconds", "bit_rate"), _PROBED
            ),
            "TextInfo": dict.fromkeys(("char_count", "encoding"), _PROBED),
            "Concept": {
                "created_at": _TIMES,
                "app_id": "output only: a concept belongs to the request's app",
            },
            "Dataset": {
                "created_at": _TIMES,
                "modified_at": _TIMES,
                "app_id": "output only: the dataset belongs to the request's app_id",
                "version": "output only: create versions with CreateDatasetVersion",
                "statistics": _STATISTICS,
                "etag": "output only: pass it as UpdateDatasetRequest.etag to make an "
                "update conditional",
                "project_ids": "output only: attach datasets with ProjectService.AttachDataset",
                "last_accessed_at": "output only: the server records when the dataset "
                "was last read",
            },
            "DatasetStatistics": dict.fromkeys(
                ("inputs_count", "annotated_inputs_count", "annotations_count", "concept_counts"),
                _STATISTICS,
            ),
            "DatasetInput": {"created_at": _TIMES, "input": OUTPUT},
            # ListEmbeddingModels' and GetInputEmbeddings' answers.
            "EmbeddingModel": dict.fromkeys(
                (
                    "id",
                    "dimension",
                    "media_types",
                    "accepts_text_queries",
                    "source",
                    "description",
                    "embedded_count",
                ),
                OUTPUT,
            ),
            "InputEmbedding": dict.fromkeys(
                ("model_id", "state", "error", "vector", "updated_at"), OUTPUT
            ),
            # FindDuplicates' and GetSearchJob's answers.
            "DuplicateGroup": dict.fromkeys(("input_ids", "exact", "min_similarity"), OUTPUT),
            "SearchJob": dict.fromkeys(
                (
                    "id",
                    "dataset_id",
                    "state",
                    "percent",
                    "matched_count",
                    "added_count",
                    "already_present_count",
                    "error",
                    "created_at",
                    "finished_at",
                ),
                OUTPUT,
            ),
            "Ontology": {
                "app_id": "output only: the ontology belongs to the request's app_id",
                "revision": "output only: the server counts the changes; pass it as "
                "UpdateOntologyRequest.expected_revision to make an update conditional",
                "created_at": _TIMES,
                "modified_at": _TIMES,
            },
            "OntologyClass": {
                "category_id": "output only: the server numbers each class when it first "
                "appears and keeps the number (matched by class id); leave it unset",
            },
            "Project": {
                "app_id": "output only: the project belongs to the request's app_id",
                "dataset_ids": "output only: attach datasets with AttachDataset",
                "created_at": _TIMES,
                "modified_at": _TIMES,
            },
            "DatasetVersion": {
                "created_at": _TIMES,
                "modified_at": _TIMES,
                "app_id": "output only: the version belongs to the request's app_id",
                "dataset_id": "output only: the version belongs to the request's dataset_id",
                "status": _STATUS,
                "metrics": "output only: the build counts the version's content",
                "export_info": "output only: create exports with ExportDatasetVersion",
                "ontology": "output only: the build records the ontology governing the "
                "dataset (attach it to a project with ProjectService.AttachDataset)",
            },
            "VersionOntology": dict.fromkeys(
                ("ontology_id", "revision"), "output only: the build records it"
            ),
            "DatasetVersionMetrics": dict.fromkeys(
                (
                    "inputs_count",
                    "unlabeled_inputs_count",
                    "inputs_with_metadata_count",
                    "inputs_with_geo_count",
                    "regions_count",
                    "bounding_boxes_count",
                    "polygons_count",
                    "points_count",
                    "masks_count",
                    "frames_count",
                    "embeddings_count",
                    "positive_input_tags_count",
                    "positive_region_tags_count",
                    "positive_frame_tags_count",
                    "region_inputs_count",
                    "region_frames_count",
                    "frame_inputs_count",
                ),
                "output only: the build counts the version's content",
            ),
            "DatasetVersionExport": dict.fromkeys(("format", "status", "url", "size"), OUTPUT),
            "DatasetVersionExportInfo": dict.fromkeys(
                ("clarifai_data_protobuf", "coco", "clarifai_data_json", "vi_full", "vi_jsonl"),
                OUTPUT,
            ),
            "Status": dict.fromkeys(
                (
                    "code",
                    "description",
                    "details",
                    "percent_completed",
                    "time_remaining",
                    "req_id",
                ),
                _STATUS,
            ),
            # AccessService: the server keeps who, when and what.
            "User": {"created_at": _TIMES, "modified_at": _TIMES},
            "Collaborator": {
                "dataset_id": "output only: the collaborator belongs to the request's dataset_id",
                "added_by": "output only: the server records who added the collaborator",
                "created_at": _TIMES,
                "modified_at": _TIMES,
            },
            "ApiKey": {
                "id": "output only: the server names the key (use it to revoke the key)",
                "created_by": "output only: the server records who made the key",
                "created_at": _TIMES,
                "last_used_at": "output only: the server records when the key was last used",
                "revoked_at": "output only: revoke keys with RevokeApiKey",
            },
            "AuditEvent": dict.fromkeys(
                (
                    "id",
                    "time",
                    "user_id",
                    "key_id",
                    "rpc",
                    "app_id",
                    "dataset_ids",
                    "resource_ids",
                    "request_id",
                    "outcome",
                ),
                "output only: the server records audit events",
            ),
            "Export": dict.fromkeys(
                (
                    "id",
                    "dataset_id",
                    "version_id",
                    "format",
                    "options",
                    "status",
                    "size",
                    "url",
                    "url_expire_time",
                    "split_counts",
                    "fidelity",
                    "created_at",
                    "modified_at",
                ),
                OUTPUT,
            ),
        }.items()
        for field, reason in fields.items()
    }
}

_MEDIA: Final = ("image", "video", "audio", "text")
_ARE_ANNOTATIONS = (
    "{name} are annotations: send them with the new input in CreateInputs, or with "
    "CreateAnnotations (input_id = this input)"
)
_EMBEDDINGS = (
    "embeddings belong to the input: send them in its data.embeddings with CreateInputs, "
    "UpdateInputs or the UploadInput header"
)
_MEDIA_OF_INPUT = (
    "media belong to the input, not an annotation: send them with CreateInputs or UploadInput"
)
_GEO_OF_INPUT = (
    "the geo point belongs to the input, not an annotation: set it with CreateInputs "
    "or UpdateInputs"
)

# Where a Data message is the data of an input (as opposed to an annotation), by request
# type and the path of the Input message, and whether its regions and frames are taken:
# CreateInputs stores each as an annotation of the new input; a patch does not change
# annotations, and an upload's header is checked before its media (which the regions'
# coordinates are checked against) arrive.
_INPUT_DATA: Final[Mapping[tuple[str, tuple[str, ...]], bool]] = {
    ("datasetd.v1.CreateInputsRequest", ("inputs", "data")): True,
    ("datasetd.v1.UpdateInputsRequest", ("inputs", "data")): False,
    ("datasetd.v1.UploadInputRequest", ("header", "input", "data")): False,
}


def _refused_data_field(request_type: str, data_path: tuple[str, ...], name: str) -> str | None:
    """Why field `name` of the Data at `data_path` is refused in `request_type`."""
    takes_annotations = _INPUT_DATA.get((request_type, data_path))
    if name == "embeddings":
        return None if takes_annotations is not None else _EMBEDDINGS
    if takes_annotations is not None:
        if takes_annotations:
            return None
        return _ARE_ANNOTATIONS.format(name=name) if name in ("regions", "frames") else None
    # Annotation data (top level, or nested in a region or frame).
    if name in _MEDIA:
        return _MEDIA_OF_INPUT
    if name == "geo":
        return _GEO_OF_INPUT
    holder = data_path[-2] if len(data_path) >= 2 else ""
    if holder == "regions" and name in ("regions", "frames"):
        return f"{name} do not nest in a region: put them in the annotation's data"
    if holder == "frames" and name == "frames":
        return "frames do not nest: put them in the annotation's data.frames"
    return None


_MEDIA_NEVER_CHANGE = (
    "media never change by a patch: delete the input and create it again with the new media"
)
_UPLOAD_MEDIA = (
    "the media follow the header as chunks: send data.{medium} as an empty message to say "
    "which medium they are"
)

# Per request type: path -> why that request refuses a field other requests accept.
_PER_REQUEST: Final[Mapping[str, Mapping[tuple[str, ...], str]]] = {
    "datasetd.v1.UpdateInputsRequest": {
        **{("inputs", "data", medium): _MEDIA_NEVER_CHANGE for medium in _MEDIA},
        ("inputs", "dataset_ids"): "memberships change with AddDatasetInputs and "
        "RemoveDatasetInputs, not with UpdateInputs",
    },
    "datasetd.v1.UploadInputRequest": {
        ("header", "input", "data", medium, source): _UPLOAD_MEDIA.format(medium=medium)
        for medium in _MEDIA
        for source in ("raw" if medium == "text" else "base64", "url")
    },
}


# Output-only fields one request takes: (request type, path) of each.
_DECLARED_SIZE: Final[frozenset[tuple[str, tuple[str, ...]]]] = frozenset(
    ("datasetd.v1.CreateInputsRequest", ("inputs", "data", "image", *tail))
    for tail in (("image_info",), ("image_info", "width"), ("image_info", "height"))
)


def refusal(request_type: str, path: tuple[str, ...], field: FieldDescriptor) -> str | None:
    """Why a set field of a request is refused, or None when it is accepted.

    request_type: full name of the top-level request message, e.g.
        "datasetd.v1.CreateInputsRequest".
    path: field names from the request down to this field, without indexes or map keys,
        e.g. ("inputs", "data", "regions").
    field: the descriptor of the field itself."""
    # Every field of a message has its containing type; only extensions might not.
    owner = field.containing_type.full_name if field.containing_type is not None else ""
    if (request_type, path) in _DECLARED_SIZE:
        return None
    reason = OUTPUT_ONLY.get((owner, field.name))
    if reason is not None:
        return reason
    specific = _PER_REQUEST.get(request_type, {}).get(path)
    if specific is not None:
        return specific
    if owner == "datasetd.v1.Data":
        return _refused_data_field(request_type, path[:-1], field.name)
    return None


# --- update masks ------------------------------------------------------------------------

# Per Update request: the field holding the resource(s), and each update_mask name with
# the path (below the resource) of the field it names. The names are those the domain
# accepts (service/domain: PATCHABLE_FIELDS, UPDATABLE_FIELDS; a unit test compares).
UPDATE_MASKS: Final[Mapping[str, tuple[str, Mapping[str, tuple[str, ...]]]]] = {
    "datasetd.v1.UpdateDatasetRequest": (
        "dataset",
        {name: (name,) for name in PATCHABLE_DATASET_FIELDS},
    ),
    "datasetd.v1.UpdateInputsRequest": (
        "inputs",
        {
            "metadata": ("data", "metadata"),
            "concepts": ("data", "concepts"),
            "geo": ("data", "geo"),
            "title": ("title",),
            "embeddings": ("data", "embeddings"),
        },
    ),
    "datasetd.v1.UpdateAnnotationsRequest": (
        "annotations",
        {"data": ("data",), "annotation_info": ("annotation_info",)},
    ),
    "datasetd.v1.UpdateDatasetVersionRequest": (
        "version",
        {"description": ("description",), "metadata": ("metadata",)},
    ),
    "datasetd.v1.UpdateOntologyRequest": (
        "ontology",
        {name: (name,) for name in UPDATABLE_ONTOLOGY_FIELDS},
    ),
    "datasetd.v1.UpdateProjectRequest": (
        "project",
        {name: (name,) for name in UPDATABLE_PROJECT_FIELDS},
    ),
    "datasetd.v1.UpdateUserRequest": ("user", {name: (name,) for name in UPDATABLE_USER_FIELDS}),
}


def outside_mask(request: Message) -> Iterator[FieldViolation]:
    """Patchable fields set but not named in a non-empty update_mask.

    An update applies only the fields its mask names; one set beside them would be
    skipped without a word, so it is refused instead. With an empty mask every set
    patchable field applies and nothing is refused here."""
    found = UPDATE_MASKS.get(request.DESCRIPTOR.full_name)
    if found is None:
        return
    holder, names = found
    paths: list[str] = list(request.update_mask.paths)  # type: ignore[attr-defined]
    if not paths:
        return
    named = ", ".join(f'"{p}"' for p in paths)
    value = getattr(request, holder)
    resources: list[tuple[str, Message]] = (
        [(holder, value)]
        if isinstance(value, Message)
        else [(f"{holder}[{i}]", item) for i, item in enumerate(value)]
    )
    for at, resource in resources:
        for name, path in names.items():
            if name not in paths and _is_set(resource, path):
                yield FieldViolation(
                    f"{at}.{'.'.join(path)}",
                    f'not in update_mask ({named}): add "{name}" to update_mask, or leave '
                    "the field unset",
                )


def _is_set(message: Message, path: tuple[str, ...]) -> bool:
    """Whether the field at `path` is set as the walker sees it (present, non-default,
    non-empty)."""
    *parents, last = path
    for name in parents:
        if not message.HasField(name):
            return False
        message = getattr(message, name)
    return any(field.name == last for field, _ in message.ListFields())
