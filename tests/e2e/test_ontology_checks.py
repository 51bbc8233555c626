"""Labels on inputs of datasets attached to a project are checked against the project's
ontology (issue 13): CreateAnnotations, UpdateAnnotations, CreateInputs (concepts, regions),
UpdateInputs (concepts) and ImportDataset refuse what the ontology does not allow, naming
the field and the allowed values; ValidateDataset reports the labels made before."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import pytest
from datasetd.v1 import annotation_service_pb2 as aapi
from datasetd.v1 import (
    common_pb2,
    data_pb2,
    input_pb2,
    input_service_pb2_grpc,
    ontology_pb2,
    ontology_service_pb2_grpc,
    project_pb2,
    project_service_pb2_grpc,
)
from datasetd.v1 import input_service_pb2 as iapi
from datasetd.v1 import ontology_service_pb2 as oapi
from datasetd.v1 import project_service_pb2 as papi
from google.protobuf import json_format

from service.app import Running
from tests.conftest import Caller
from tests.e2e.test_annotations import CREATED, INVALID, add, annotation, box, concepts, patch
from tests.e2e.test_annotations import get as get_annotation
from tests.e2e.test_diff_import import (
    COCO,
    COCO_IMAGES,
    coco_archive,
    coco_document,
    import_archive,
    refused,
)
from tests.e2e.test_inputs import create, image_input, new_dataset
from tests.e2e.test_upload import chunk, header
from tests.e2e.test_upload import refused as refused_upload
from tests.helpers import call_error, png_bytes

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs
    from datasetd.v1.ontology_service_pb2_grpc import OntologyServiceAsyncStub as Ontologies
    from datasetd.v1.project_service_pb2_grpc import ProjectServiceAsyncStub as Projects

MERGE = common_pb2.PATCH_ACTION_MERGE
Rule = papi.OntologyRule

ROADS: dict[str, Any] = {
    "classes": [
        {
            "id": "car",
            "display_name": "Car",
            "shapes": ["SHAPE_BOUNDING_BOX", "SHAPE_VIDEO_TRACK"],
            "attributes": [
                {
                    "id": "color",
                    "name": "Colour",
                    "required": True,
                    "enum_type": {"options": ["red", "blue"]},
                },
                {"id": "occluded", "name": "Occluded", "boolean": {}},
                {"id": "speed", "name": "Speed", "number": {"min": 0, "max": 200}},
            ],
        },
        {
            "id": "person",
            "shapes": ["SHAPE_KEYPOINTS", "SHAPE_BOUNDING_BOX"],
            "keypoint_names": ["head", "left_hand", "right_hand"],
        },
        {"id": "bike", "shapes": ["SHAPE_BOUNDING_BOX"]},
        {"id": "cat", "shapes": ["SHAPE_BOUNDING_BOX"]},
    ],
    "input_classifications": [{"id": "daytime", "shapes": ["SHAPE_CLASSIFICATION"]}],
}


@pytest.fixture(scope="session")
def ontologies(channel: grpc.aio.Channel) -> Ontologies:
    return ontology_service_pb2_grpc.OntologyServiceStub(channel)


@pytest.fixture(scope="session")
def projects(channel: grpc.aio.Channel) -> Projects:
    return project_service_pb2_grpc.ProjectServiceStub(channel)


def labelled_box(
    label: str, attributes: dict[str, Any] | None = None, track_id: str = ""
) -> data_pb2.Region:
    region = box("", label, top=0.1, left=0.1, bottom=0.5, right=0.5)
    region.track_id = track_id
    if attributes is not None:
        region.data.metadata.update({"attributes": attributes})
    return region


def keypoints(label: str, count: int, names: list[str] | None = None) -> data_pb2.Region:
    located = [data_pb2.Point(row=0.1 * (n + 1), col=0.2) for n in range(count)]
    region = data_pb2.Region(
        region_info=data_pb2.RegionInfo(keypoint_locations=located),
        data=data_pb2.Data(concepts=concepts(label)),
    )
    if names is not None:
        region.data.metadata.update({"keypoint_names": names})
    return region


async def new_ontology(
    stub: Ontologies, caller: Caller, ontology_id: str, content: dict[str, Any]
) -> ontology_pb2.Ontology:
    message = json_format.ParseDict({"id": ontology_id, **content}, ontology_pb2.Ontology())
    response = await stub.CreateOntology(
        oapi.CreateOntologyRequest(app_id=caller.app_id, ontology=message),
        metadata=caller.metadata,
    )
    return response.ontology


async def project_on(
    projects: Projects, caller: Caller, project_id: str, ontology_id: str, *datasets: str
) -> None:
    await projects.CreateProject(
        papi.CreateProjectRequest(
            app_id=caller.app_id,
            project=project_pb2.Project(id=project_id, ontology_id=ontology_id),
        ),
        metadata=caller.metadata,
    )
    for dataset_id in datasets:
        await projects.AttachDataset(
            papi.AttachDatasetRequest(
                app_id=caller.app_id, project_id=project_id, dataset_id=dataset_id
            ),
            metadata=caller.metadata,
        )


async def in_ds(inputs: Inputs, caller: Caller, *input_ids: str) -> None:
    """Images in dataset "ds"."""
    items = [image_input(i, color=(n * 40, 10, 10)) for n, i in enumerate(input_ids)]
    await create(inputs, caller, [in_dataset(item) for item in items])


def in_dataset(item: input_pb2.Input) -> input_pb2.Input:
    item.dataset_ids.append("ds")
    return item


def errors_of(result: Any) -> dict[str, str]:
    return {e.field: e.description for e in result.errors}


async def test_create_annotations_checks_class_shape_attributes_and_keypoints(
    annotations: Annotations,
    inputs: Inputs,
    datasets: Datasets,
    ontologies: Ontologies,
    projects: Projects,
    caller: Caller,
) -> None:
    await new_dataset(datasets, caller, "ds")
    await in_ds(inputs, caller, "img")
    await create(inputs, caller, [image_input("free")])
    await new_ontology(ontologies, caller, "roads", ROADS)
    await project_on(projects, caller, "p", "roads", "ds")
    polygon = data_pb2.Region(
        region_info=data_pb2.RegionInfo(
            polygon=data_pb2.Polygon(
                points=[
                    data_pb2.Point(row=r, col=c) for r, c in ((0.1, 0.1), (0.2, 0.5), (0.6, 0.3))
                ]
            )
        ),
        data=data_pb2.Data(concepts=concepts("car")),
    )
    polygon.data.metadata.update({"attributes": {"color": "red"}})
    items = [
        annotation("img", regions=[labelled_box("car", {"color": "red", "speed": 80})]),
        annotation("img", regions=[labelled_box("cra", {"color": "red"})]),
        annotation("img", regions=[polygon]),
        annotation("img", regions=[labelled_box("car", {"occluded": True})]),
        annotation("img", regions=[labelled_box("car", {"color": "green", "speed": 300})]),
        annotation("img", regions=[labelled_box("car", {"color": "red", "speed": "fast"})]),
        annotation("img", regions=[labelled_box("car", {"color": "red", "wheels": 4})]),
        annotation("img", regions=[keypoints("person", 4)]),
        annotation("img", regions=[keypoints("person", 2, ["head", "tail"])]),
        annotation("img", concepts=concepts("daytime")),
        annotation("img", regions=[labelled_box("daytime")]),
        annotation("img", concepts=concepts("bike")),
        annotation("img", regions=[labelled_box("bike", track_id="t1")]),
        annotation("img", regions=[labelled_box("car", {"color": "blue"}, track_id="t1")]),
        # Not in an attached dataset: no ontology applies.
        annotation("free", regions=[labelled_box("cra")]),
    ]
    response = await add(annotations, caller, items)
    outcomes = [r.outcome for r in response.results]
    assert outcomes == [
        CREATED, INVALID, INVALID, INVALID, INVALID, INVALID, INVALID, INVALID, INVALID,
        CREATED, INVALID, INVALID, INVALID, CREATED, CREATED,
    ]  # fmt: skip
    errors = [errors_of(r) for r in response.results]
    concept = "data.regions[0].data.concepts[0].id"
    attributes = "data.regions[0].data.metadata.attributes"
    typo = errors[1][f"annotations[1].{concept}"]
    assert "'cra' is not a class of ontology 'roads'" in typo
    assert "'bike', 'car', 'cat', 'person'" in typo
    shape = errors[2][f"annotations[2].{concept}"]
    assert "SHAPE_POLYGON" in shape and "SHAPE_BOUNDING_BOX, SHAPE_VIDEO_TRACK" in shape
    assert "is required by class 'car'" in errors[3][f"annotations[3].{attributes}.color"]
    assert "'green' is not an option" in errors[4][f"annotations[4].{attributes}.color"]
    assert "one of 'red', 'blue'" in errors[4][f"annotations[4].{attributes}.color"]
    assert "300 is out of range" in errors[4][f"annotations[4].{attributes}.speed"]
    assert "[0, 200]" in errors[4][f"annotations[4].{attributes}.speed"]
    assert "got 'fast'" in errors[5][f"annotations[5].{attributes}.speed"]
    assert "'color', 'occluded', 'speed'" in errors[6][f"annotations[6].{attributes}.wheels"]
    kp = errors[7]["annotations[7].data.regions[0].region_info.keypoint_locations"]
    assert "4 keypoints" in kp and "'head', 'left_hand', 'right_hand'" in kp
    names = "annotations[8].data.regions[0].data.metadata.keypoint_names[1]"
    assert "'tail' is not a keypoint of class 'person'" in errors[8][names]
    assert "input-level classification" in errors[10][f"annotations[10].{concept}"]
    assert "SHAPE_CLASSIFICATION" in errors[11]["annotations[11].data.concepts[0].id"]
    assert "SHAPE_VIDEO_TRACK" in errors[12][f"annotations[12].{concept}"]

    # Atomic: the whole batch fails with every problem named, nothing stored.
    error = await call_error(add(annotations, caller, items[:2], atomic=True))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"annotations[1].{concept}" in error.fields


async def test_updates_of_annotations_and_inputs_are_checked_and_archived_classes_kept(
    annotations: Annotations,
    inputs: Inputs,
    datasets: Datasets,
    ontologies: Ontologies,
    projects: Projects,
    caller: Caller,
) -> None:
    await new_dataset(datasets, caller, "ds")
    await in_ds(inputs, caller, "img")
    await new_ontology(ontologies, caller, "roads", ROADS)
    await project_on(projects, caller, "p", "roads", "ds")
    created = await add(
        annotations, caller, [annotation("img", "a1", regions=[labelled_box("cat")])]
    )
    assert created.results[0].outcome == CREATED
    region_id = created.results[0].annotation.data.regions[0].id

    typo = labelled_box("dgo")
    error = await call_error(
        patch(annotations, caller, MERGE, [annotation("img", "a1", regions=[typo])])
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "'dgo' is not a class" in error.fields["annotations[0].data.regions[1].data.concepts[0].id"]
    )

    # Archive "cat": the existing label stays editable; a new one is refused.
    archived = json_format.ParseDict({"id": "roads", **ROADS}, ontology_pb2.Ontology())
    for item in archived.classes:
        if item.id == "cat":
            item.archived = True
    await ontologies.UpdateOntology(
        oapi.UpdateOntologyRequest(app_id=caller.app_id, ontology=archived),
        metadata=caller.metadata,
    )
    moved = box(region_id, "cat", top=0.2, left=0.2, bottom=0.4, right=0.4)
    await patch(annotations, caller, MERGE, [annotation("img", "a1", regions=[moved])])
    stored = await get_annotation(annotations, caller, "a1")
    assert stored.data.regions[0].region_info.bounding_box.top_row == pytest.approx(0.2)
    fresh = await add(annotations, caller, [annotation("img", regions=[labelled_box("cat")])])
    assert fresh.results[0].outcome == INVALID
    assert "archived" in next(iter(errors_of(fresh.results[0]).values()))

    # An input's own concepts are input-level classifications.
    error = await call_error(
        inputs.UpdateInputs(
            iapi.UpdateInputsRequest(
                app_id=caller.app_id,
                inputs=[input_pb2.Input(id="img", data=data_pb2.Data(concepts=concepts("night")))],
                action=MERGE,
            ),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'daytime'" in error.fields["inputs[0].data.concepts[0].id"]
    await inputs.UpdateInputs(
        iapi.UpdateInputsRequest(
            app_id=caller.app_id,
            inputs=[input_pb2.Input(id="img", data=data_pb2.Data(concepts=concepts("daytime")))],
            action=MERGE,
        ),
        metadata=caller.metadata,
    )


async def test_create_inputs_checks_concepts_and_regions_per_input(
    inputs: Inputs,
    datasets: Datasets,
    ontologies: Ontologies,
    projects: Projects,
    caller: Caller,
) -> None:
    await new_dataset(datasets, caller, "ds")
    await new_ontology(ontologies, caller, "roads", ROADS)
    await project_on(projects, caller, "p", "roads", "ds")
    good = image_input("good", concepts=concepts("daytime"))
    good.data.regions.append(labelled_box("car", {"color": "blue"}))
    typo = image_input("typo", concepts=concepts("daytiem"))
    shape = image_input("shape")
    shape.data.regions.append(keypoints("car", 2))
    response = await create(inputs, caller, [in_dataset(i) for i in (good, typo, shape)])
    assert [r.outcome for r in response.results] == [CREATED, INVALID, INVALID]
    assert "'daytime'" in errors_of(response.results[1])["inputs[1].data.concepts[0].id"]
    assert (
        "SHAPE_KEYPOINTS"
        in errors_of(response.results[2])["inputs[2].data.regions[0].data.concepts[0].id"]
    )
    # The same inputs outside the dataset are not checked.
    loose = await create(inputs, caller, [image_input("typo", concepts=concepts("daytiem"))])
    assert loose.results[0].outcome == CREATED


async def test_import_into_an_attached_dataset_is_checked(
    server: Running,
    datasets: Datasets,
    ontologies: Ontologies,
    projects: Projects,
    caller: Caller,
) -> None:
    await new_dataset(datasets, caller, "ds")
    await new_ontology(ontologies, caller, "roads", ROADS)
    await project_on(projects, caller, "p", "roads", "ds")
    # Category 2 is "dog", which the ontology does not have.
    document = coco_document(
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [4, 3, 8, 6]},
        {"id": 11, "image_id": 2, "category_id": 2, "bbox": [1, 1, 4, 4]},
    )
    error = await refused(
        server.port, caller, "ds", coco_archive(document, COCO_IMAGES), archive_format=COCO
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    (field,) = error.fields
    assert field.startswith('archive["annotations/instances_train.json"].annotations[1]')
    assert "'dog' is not a class of ontology 'roads'" in error.fields[field]

    cats_only = coco_document({"id": 10, "image_id": 1, "category_id": 1, "bbox": [4, 3, 8, 6]})
    result = await import_archive(
        datasets, caller, "ds", coco_archive(cats_only, COCO_IMAGES), archive_format=COCO
    )
    assert result.annotations_created == 1


async def test_a_dataset_follows_one_ontology(
    datasets: Datasets, ontologies: Ontologies, projects: Projects, caller: Caller
) -> None:
    await new_dataset(datasets, caller, "ds")
    await new_dataset(datasets, caller, "other")
    await new_ontology(ontologies, caller, "roads", ROADS)
    await new_ontology(
        ontologies, caller, "pets", {"classes": [{"id": "cat", "shapes": ["SHAPE_POINT"]}]}
    )
    await project_on(projects, caller, "p1", "roads", "ds")
    await project_on(projects, caller, "p2", "roads", "ds", "other")
    await project_on(projects, caller, "p3", "pets")
    error = await call_error(
        projects.AttachDataset(
            papi.AttachDatasetRequest(app_id=caller.app_id, project_id="p3", dataset_id="ds"),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "DATASET_HAS_OTHER_ONTOLOGY"
    assert "dataset 'ds' is attached to project 'p1' (ontology 'roads')" in error.message

    # p2 cannot move to "pets" while "ds" is also in p1 (on "roads").
    error = await call_error(
        projects.UpdateProject(
            papi.UpdateProjectRequest(
                app_id=caller.app_id, project=project_pb2.Project(id="p2", ontology_id="pets")
            ),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "DATASET_HAS_OTHER_ONTOLOGY"


async def validate(
    projects: Projects, caller: Caller, **params: Any
) -> papi.ValidateDatasetResponse:
    response: papi.ValidateDatasetResponse = await projects.ValidateDataset(
        papi.ValidateDatasetRequest(app_id=caller.app_id, **params), metadata=caller.metadata
    )
    return response


async def test_validate_dataset_reports_labels_made_before_attaching(
    annotations: Annotations,
    inputs: Inputs,
    datasets: Datasets,
    ontologies: Ontologies,
    projects: Projects,
    caller: Caller,
) -> None:
    await new_dataset(datasets, caller, "ds")
    await in_ds(inputs, caller, "img", "img2")
    made = [
        annotation("img", "ok", regions=[labelled_box("car", {"color": "red"})]),
        annotation("img", "typo1", regions=[labelled_box("cra", {"color": "red"})]),
        annotation("img2", "typo2", concepts=concepts("nigth")),
        annotation("img2", "typo3", regions=[labelled_box("bik"), labelled_box("dgo")]),
        annotation("img2", "nocolor", regions=[labelled_box("car")]),
    ]
    assert all(r.outcome == CREATED for r in (await add(annotations, caller, made)).results)
    error = await call_error(validate(projects, caller, dataset_id="ds"))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "DATASET_NOT_IN_PROJECT"

    await new_ontology(ontologies, caller, "roads", ROADS)
    await project_on(projects, caller, "p", "roads", "ds")
    report = await validate(projects, caller, dataset_id="ds")
    assert (report.ontology_id, report.ontology_revision) == ("roads", 1)
    assert (report.annotations_checked, report.annotations_invalid) == (5, 4)
    by_rule = {r.rule: r for r in report.rules}
    assert sorted(by_rule) == [
        Rule.ONTOLOGY_RULE_UNKNOWN_CLASS,
        Rule.ONTOLOGY_RULE_MISSING_ATTRIBUTE,
    ]
    unknown = by_rule[Rule.ONTOLOGY_RULE_UNKNOWN_CLASS]
    assert (unknown.annotations_count, unknown.findings_count) == (3, 4)
    assert [(f.annotation_id, f.field) for f in unknown.findings] == [
        ("typo1", "data.regions[0].data.concepts[0].id"),
        ("typo2", "data.concepts[0].id"),
        ("typo3", "data.regions[0].data.concepts[0].id"),
        ("typo3", "data.regions[1].data.concepts[0].id"),
    ]
    missing = by_rule[Rule.ONTOLOGY_RULE_MISSING_ATTRIBUTE]
    assert [(f.annotation_id, f.input_id) for f in missing.findings] == [("nocolor", "img2")]

    # One rule, a page at a time: every finding once, in order.
    pages: list[tuple[str, str]] = []
    token = ""
    while True:
        page = await validate(
            projects,
            caller,
            dataset_id="ds",
            rule=Rule.ONTOLOGY_RULE_UNKNOWN_CLASS,
            page_size=1,
            page_token=token,
        )
        (only,) = page.rules
        assert only.findings_count == 4
        pages += [(f.annotation_id, f.field) for f in only.findings]
        token = page.next_page_token
        if not token:
            break
    assert pages == [(f.annotation_id, f.field) for f in unknown.findings]

    bad_token = await call_error(
        validate(projects, caller, dataset_id="ds", page_token=page.next_page_token or "x")
    )
    assert bad_token.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in bad_token.fields

    # Once the offending labels are gone, the report is empty.
    await annotations.DeleteAnnotations(
        aapi.DeleteAnnotationsRequest(
            app_id=caller.app_id, ids=["typo1", "typo2", "typo3", "nocolor"]
        ),
        metadata=caller.metadata,
    )
    clean = await validate(projects, caller, dataset_id="ds")
    assert (clean.annotations_checked, clean.annotations_invalid, list(clean.rules)) == (1, 0, [])


async def test_a_streamed_upload_is_refused_by_its_header(
    server: Running,
    datasets: Datasets,
    ontologies: Ontologies,
    projects: Projects,
    caller: Caller,
) -> None:
    await new_dataset(datasets, caller, "ds")
    await new_ontology(ontologies, caller, "roads", ROADS)
    await project_on(projects, caller, "p", "roads", "ds")
    item = input_pb2.Input(
        id="streamed",
        data=data_pb2.Data(image=data_pb2.Image(), concepts=concepts("nigth")),
        dataset_ids=["ds"],
    )
    image = png_bytes(64, 48)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = input_service_pb2_grpc.InputServiceStub(channel)
        error = await refused_upload(stub, caller, [header(caller, item), chunk(image)])
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    (field,) = error.fields
    assert field.endswith("data.concepts[0].id")
    assert "'daytime'" in error.fields[field]
