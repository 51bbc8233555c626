"""The refused-field policy agrees with the protos' comments and with the domain's masks."""

from __future__ import annotations

import re
from pathlib import Path

from datasetd.v1 import (
    access_service_pb2,
    annotation_pb2,
    annotation_service_pb2,
    data_pb2,
    dataset_pb2,
    dataset_service_pb2,
    dataset_version_service_pb2,
    input_pb2,
    input_service_pb2,
    ontology_service_pb2,
    project_service_pb2,
)
from google.protobuf import descriptor_pool, field_mask_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from service.api import field_policy
from service.api.field_policy import OUTPUT_ONLY, UPDATE_MASKS, outside_mask, refusal
from service.domain import annotations as annotation_domain
from service.domain import inputs, ontologies, projects, versions
from service.wire.access import UPDATABLE_USER_FIELDS
from service.wire.datasets import PATCHABLE_DATASET_FIELDS

PROTOS = Path(__file__).resolve().parents[2] / "protos" / "datasetd" / "v1"
_MESSAGE = re.compile(r"^\s*message (\w+) \{")
_FIELD = re.compile(r"^\s*(?:repeated |optional )?[\w.<>, ]+ (\w+) = \d+")


def _commented_output_only() -> set[tuple[str, str]]:
    """(message, field) of every field whose comment begins "Output only"."""
    found: set[tuple[str, str]] = set()
    for proto in PROTOS.glob("*.proto"):
        stack: list[str] = []
        comment: list[str] = []
        for line in proto.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("//"):
                comment.append(stripped.removeprefix("//").strip())
                continue
            if match := _MESSAGE.match(line):
                stack.append(match.group(1))
            elif stripped.startswith(("enum ", "oneof ", "service ")):
                stack.append("")
            elif stripped == "}" and stack:
                stack.pop()
            elif (
                (match := _FIELD.match(line))
                and stack
                and stack[-1]
                and comment
                and comment[0].startswith("Output only")
            ):
                found.add((f"datasetd.v1.{stack[-1]}", match.group(1)))
            comment = []
    return found


def test_output_only_table_is_what_the_protos_say() -> None:
    commented = _commented_output_only()
    assert commented, "the comment parser found nothing"
    assert set(OUTPUT_ONLY) == commented


def test_output_only_table_names_existing_fields() -> None:
    pool = descriptor_pool.Default()
    for message, field in OUTPUT_ONLY:
        assert field in pool.FindMessageTypeByName(message).fields_by_name, (message, field)


def _request_paths() -> set[tuple[str, tuple[str, ...]]]:
    """Every (request type, field path) reachable from a request, Data nested twice."""
    found: set[tuple[str, tuple[str, ...]]] = set()

    def walk(request: str, message: Descriptor, path: tuple[str, ...], depth: int) -> None:
        for field in message.fields:
            found.add((request, (*path, field.name)))
            nested = field.message_type
            if nested is not None and nested.full_name.startswith("datasetd.") and depth < 8:
                walk(request, nested, (*path, field.name), depth + 1)

    for module in (
        access_service_pb2,
        dataset_service_pb2,
        input_service_pb2,
        annotation_service_pb2,
        dataset_version_service_pb2,
        ontology_service_pb2,
        project_service_pb2,
    ):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                walk(method.input_type.full_name, method.input_type, (), 0)
    return found


def test_per_request_rules_name_existing_paths() -> None:
    """A renamed field must not leave a rule that silently never matches."""
    paths = _request_paths()
    for request, rules in field_policy._PER_REQUEST.items():
        for path in rules:
            assert (request, path) in paths, (request, path)
    for request, data_path in field_policy._INPUT_DATA:
        assert (request, data_path) in paths, (request, data_path)


def test_update_masks_are_the_domains() -> None:
    assert tuple(UPDATE_MASKS["datasetd.v1.UpdateDatasetRequest"][1]) == PATCHABLE_DATASET_FIELDS
    assert tuple(UPDATE_MASKS["datasetd.v1.UpdateInputsRequest"][1]) == inputs.PATCHABLE_FIELDS
    assert (
        tuple(UPDATE_MASKS["datasetd.v1.UpdateAnnotationsRequest"][1])
        == annotation_domain.PATCHABLE_FIELDS
    )
    assert (
        tuple(UPDATE_MASKS["datasetd.v1.UpdateDatasetVersionRequest"][1])
        == versions.UPDATABLE_FIELDS
    )
    assert (
        tuple(UPDATE_MASKS["datasetd.v1.UpdateOntologyRequest"][1]) == ontologies.UPDATABLE_FIELDS
    )
    assert tuple(UPDATE_MASKS["datasetd.v1.UpdateProjectRequest"][1]) == projects.UPDATABLE_FIELDS
    assert tuple(UPDATE_MASKS["datasetd.v1.UpdateUserRequest"][1]) == UPDATABLE_USER_FIELDS
    paths = _request_paths()
    for request, (holder, names) in UPDATE_MASKS.items():
        for path in names.values():
            assert (request, (holder, *path)) in paths, (request, path)


def _field(message: type[object], name: str) -> FieldDescriptor:
    descriptor: Descriptor = message.DESCRIPTOR  # type: ignore[attr-defined]
    return descriptor.fields_by_name[name]


def test_data_fields_depend_on_where_the_data_is() -> None:
    regions = _field(data_pb2.Data, "regions")
    image = _field(data_pb2.Data, "image")
    create_inputs = "datasetd.v1.CreateInputsRequest"
    create_annotations = "datasetd.v1.CreateAnnotationsRequest"
    # CreateInputs stores an input's regions as its annotation; a patch or an upload
    # header does not take them.
    assert refusal(create_inputs, ("inputs", "data", "regions"), regions) is None
    assert "CreateAnnotations" in str(
        refusal("datasetd.v1.UpdateInputsRequest", ("inputs", "data", "regions"), regions)
    )
    upload_data = ("header", "input", "data", "regions")
    assert refusal("datasetd.v1.UploadInputRequest", upload_data, regions) is not None
    nested = ("inputs", "data", "regions", "data", "regions")
    assert refusal(create_inputs, nested, regions) is not None
    assert refusal(create_inputs, ("inputs", "data", "regions", "data", "image"), image)
    assert refusal(create_annotations, ("annotations", "data", "regions"), regions) is None
    assert refusal(create_inputs, ("inputs", "data", "image"), image) is None
    assert "input" in str(refusal(create_annotations, ("annotations", "data", "image"), image))
    in_region = ("annotations", "data", "regions", "data", "regions")
    in_frame = ("annotations", "data", "frames", "data", "regions")
    assert refusal(create_annotations, in_region, regions) is not None
    assert refusal(create_annotations, in_frame, regions) is None
    embeddings = _field(data_pb2.Data, "embeddings")
    assert refusal(create_annotations, ("annotations", "data", "embeddings"), embeddings)
    assert refusal(create_inputs, ("inputs", "data", "embeddings"), embeddings) is None
    update_inputs = "datasetd.v1.UpdateInputsRequest"
    assert refusal(update_inputs, ("inputs", "data", "embeddings"), embeddings) is None
    in_input_region = ("inputs", "data", "regions", "data", "embeddings")
    assert refusal(create_inputs, in_input_region, embeddings)


def test_output_only_fields_are_refused_everywhere() -> None:
    created_at = _field(input_pb2.Input, "created_at")
    assert refusal("datasetd.v1.CreateInputsRequest", ("inputs", "created_at"), created_at)
    hosted = _field(data_pb2.Image, "hosted")
    path = ("dataset", "image", "hosted")
    assert refusal("datasetd.v1.CreateDatasetRequest", path, hosted)
    assert (
        refusal(
            "datasetd.v1.ListDatasetsRequest",
            ("query",),
            _field(dataset_service_pb2.ListDatasetsRequest, "query"),
        )
        is None
    )


def test_fields_outside_a_mask_are_refused() -> None:
    request = dataset_service_pb2.UpdateDatasetRequest(
        dataset=dataset_pb2.Dataset(id="d", description="x", notes="y"),
        update_mask=field_mask_pb2.FieldMask(paths=["description"]),
    )
    (violation,) = outside_mask(request)
    assert violation.field == "dataset.notes"
    assert "not in update_mask" in violation.description

    patched = input_pb2.Input(id="i", title="t")
    patched.data.metadata.update({"a": 1})
    request_inputs = input_service_pb2.UpdateInputsRequest(
        inputs=[input_pb2.Input(id="h"), patched],
        update_mask=field_mask_pb2.FieldMask(paths=["title"]),
    )
    assert [v.field for v in outside_mask(request_inputs)] == ["inputs[1].data.metadata"]

    request_annotations = annotation_service_pb2.UpdateAnnotationsRequest(
        annotations=[annotation_pb2.Annotation(id="a", data=data_pb2.Data())],
        update_mask=field_mask_pb2.FieldMask(paths=["annotation_info"]),
    )
    assert [v.field for v in outside_mask(request_annotations)] == ["annotations[0].data"]


def test_an_empty_mask_refuses_nothing() -> None:
    request = dataset_service_pb2.UpdateDatasetRequest(
        dataset=dataset_pb2.Dataset(id="d", description="x", notes="y")
    )
    assert list(outside_mask(request)) == []
    assert list(outside_mask(dataset_service_pb2.GetDatasetRequest(app_id="a"))) == []
