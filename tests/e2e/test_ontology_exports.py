"""Exports carry the ontology (issue 13), as a caller sees it: the real server and job
runner, COCO archives read back with pycocotools and Clarifai archives with the reference
`clarifai_grpc` classes.

A version records the ontology governing its dataset (through the project it is attached
to) as it was when the build completed; COCO categories are its classes, numbered by the
category number each class keeps for good, and Clarifai archives name unnamed concepts
with the classes' display names."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from datasetd.v1 import (
    data_pb2,
    dataset_version_pb2,
    ontology_pb2,
    ontology_service_pb2,
    ontology_service_pb2_grpc,
    project_pb2,
    project_service_pb2,
    project_service_pb2_grpc,
)
from datasetd.v1 import dataset_version_service_pb2 as vapi
from google.protobuf import field_mask_pb2
from pycocotools.coco import COCO

from service.storage.db import Database
from tests.conftest import Caller
from tests.e2e.test_annotations import add, annotation, box, concepts
from tests.e2e.test_exports import JSON, PROTOBUF, RefInput, batches, by_id, coco, exported
from tests.e2e.test_inputs import create, image_input, new_dataset
from tests.e2e.test_versions import build, get_version
from tests.helpers import call_error

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs
    from datasetd.v1.ontology_service_pb2_grpc import OntologyServiceAsyncStub as Ontologies
    from datasetd.v1.project_service_pb2_grpc import ProjectServiceAsyncStub as Projects

# pycocotools' own use of numpy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
COCO_FORMAT = dataset_version_pb2.EXPORT_FORMAT_COCO
BOX = ontology_pb2.SHAPE_BOUNDING_BOX
TAG = ontology_pb2.SHAPE_CLASSIFICATION


@pytest.fixture(scope="session")
def ontologies(channel: grpc.aio.Channel) -> Ontologies:
    return ontology_service_pb2_grpc.OntologyServiceStub(channel)


@pytest.fixture(scope="session")
def projects(channel: grpc.aio.Channel) -> Projects:
    return project_service_pb2_grpc.ProjectServiceStub(channel)


def label(class_id: str, display_name: str = "", *sub_classes: Any) -> Any:
    return ontology_pb2.OntologyClass(
        id=class_id, display_name=display_name, shapes=[BOX], sub_classes=sub_classes
    )


def animals(*extra: Any, bird: bool = True) -> list[Any]:
    """animal > (cat, dog), then bird (unless left out), then `extra`."""
    tree = [label("animal", "Animal", label("cat", "Cat"), label("dog"))]
    if bird:
        tree.append(label("bird", "Bird"))
    return tree + list(extra)


INDOOR = ontology_pb2.OntologyClass(id="indoor", display_name="Indoors", shapes=[TAG])


async def create_ontology(stub: Ontologies, caller: Caller, ontology: Any) -> Any:
    response = await stub.CreateOntology(
        ontology_service_pb2.CreateOntologyRequest(app_id=caller.app_id, ontology=ontology),
        metadata=caller.metadata,
    )
    return response.ontology


async def replace_classes(stub: Ontologies, caller: Caller, ontology_id: str, classes: Any) -> Any:
    response = await stub.UpdateOntology(
        ontology_service_pb2.UpdateOntologyRequest(
            app_id=caller.app_id,
            ontology=ontology_pb2.Ontology(id=ontology_id, classes=classes),
            update_mask=field_mask_pb2.FieldMask(paths=["classes"]),
        ),
        metadata=caller.metadata,
    )
    return response.ontology


async def govern(
    ontologies: Ontologies, projects: Projects, caller: Caller, dataset_id: str, ontology: Any
) -> Any:
    """Creates the ontology and a project with it, and attaches the dataset."""
    created = await create_ontology(ontologies, caller, ontology)
    await projects.CreateProject(
        project_service_pb2.CreateProjectRequest(
            app_id=caller.app_id, project=project_pb2.Project(id="p", ontology_id=ontology.id)
        ),
        metadata=caller.metadata,
    )
    await projects.AttachDataset(
        project_service_pb2.AttachDatasetRequest(
            app_id=caller.app_id, project_id="p", dataset_id=dataset_id
        ),
        metadata=caller.metadata,
    )
    return created


def numbers(classes: Any) -> dict[str, int]:
    """Every class's category number, sub-classes included."""
    found: dict[str, int] = {}
    for item in classes:
        found[item.id] = item.category_id
        found.update(numbers(item.sub_classes))
    return found


def categories(reader: COCO) -> dict[int, tuple[str, str]]:
    """Category id -> (name, supercategory), as pycocotools reads them."""
    return {c["id"]: (c["name"], c["supercategory"]) for c in reader.loadCats(reader.getCatIds())}


def labelled(reader: COCO) -> dict[str, set[str]]:
    """Per input id, the names of the categories of its annotations."""
    names = {c["id"]: c["name"] for c in reader.loadCats(reader.getCatIds())}
    found: dict[str, set[str]] = {}
    for image in reader.loadImgs(reader.getImgIds()):
        annotations = reader.loadAnns(reader.getAnnIds(imgIds=[image["id"]]))
        found[image["datasetd_input_id"]] = {names[a["category_id"]] for a in annotations}
    return found


async def coco_of(
    versions: Versions,
    caller: Caller,
    version_id: str,
    tmp_path: Path,
    export_options: vapi.ExportOptions | None = None,
    split: str = "all",
) -> COCO:
    _, archive = await exported(versions, caller, "ds", version_id, COCO_FORMAT, export_options)
    folder = tmp_path / f"{version_id}-{split}-{secrets.token_hex(4)}"
    await asyncio.to_thread(folder.mkdir)
    return coco(archive, folder, split)


async def labelled_images(inputs: Inputs, annotations: Annotations, caller: Caller) -> None:
    """img1: a cat and the input-level concept indoor; img2: a dog and a zebra, which no
    ontology knows (labelled before the dataset is attached)."""
    images = [image_input("img1", concepts=concepts("indoor")), image_input("img2", (200, 100, 0))]
    for image in images:
        image.dataset_ids.append("ds")
    await create(inputs, caller, images)
    edges = {"top": 0.1, "left": 0.1, "bottom": 0.5, "right": 0.6}
    await add(
        annotations,
        caller,
        [
            annotation("img1", regions=[box("r1", "cat", **edges)]),
            annotation("img2", regions=[box("r2", "dog", **edges), box("r3", "zebra", **edges)]),
        ],
    )


async def test_coco_categories_are_the_ontology_classes_with_stable_ids(
    inputs: Inputs,
    datasets: Datasets,
    annotations: Annotations,
    versions: Versions,
    ontologies: Ontologies,
    projects: Projects,
    caller: Caller,
    tmp_path: Path,
) -> None:
    await new_dataset(datasets, caller, "ds")
    await labelled_images(inputs, annotations, caller)
    before = await build(versions, caller, "ds", "v0")
    assert not before.HasField("ontology")  # no project: no ontology, categories as ever
    plain = categories(await coco_of(versions, caller, "v0", tmp_path))
    assert plain == {1: ("cat", ""), 2: ("dog", ""), 3: ("indoor", ""), 4: ("zebra", "")}

    created = await govern(
        ontologies,
        projects,
        caller,
        "ds",
        ontology_pb2.Ontology(id="zoo", classes=animals(), input_classifications=[INDOOR]),
    )
    expected = {"animal": 1, "cat": 2, "dog": 3, "bird": 4, "indoor": 5}
    assert numbers([*created.classes, *created.input_classifications]) == expected

    first = await build(versions, caller, "ds", "v1")
    assert (first.ontology.ontology_id, first.ontology.revision) == ("zoo", 1)
    assert (await get_version(versions, caller, "ds", "v1")).ontology == first.ontology
    listed = await versions.ListDatasetVersions(
        vapi.ListDatasetVersionsRequest(app_id=caller.app_id, dataset_id="ds"),
        metadata=caller.metadata,
    )
    assert {v.id: v.HasField("ontology") for v in listed.versions} == {"v0": False, "v1": True}

    v1_categories = {
        1: ("animal", ""),
        2: ("cat", "animal"),
        3: ("dog", "animal"),
        4: ("bird", ""),
        5: ("indoor", ""),
        6: ("zebra", ""),  # outside the ontology: above its highest number
    }
    reader = await coco_of(versions, caller, "v1", tmp_path)
    assert categories(reader) == v1_categories
    assert labelled(reader) == {"img1": {"cat"}, "img2": {"dog", "zebra"}}
    assert {c["name"]: c.get("display_name") for c in reader.dataset["categories"]} == {
        "animal": "Animal",
        "cat": "Cat",
        "dog": "",
        "bird": "Bird",
        "indoor": "Indoors",
        "zebra": None,
    }
    (image1,) = [i for i in reader.dataset["images"] if i["datasetd_input_id"] == "img1"]
    assert image1["datasetd_concepts"] == [{"concept_id": "indoor", "category_id": 5, "value": 1}]
    embedded = await coco_of(versions, caller, "v1", tmp_path, vapi.ExportOptions(embed_media=True))
    assert categories(embedded) == v1_categories

    # A class added (first, at the top), one removed: the others keep their numbers, the
    # new one gets the next, and nothing reuses bird's.
    updated = await replace_classes(
        ontologies, caller, "zoo", [label("fox", "Fox"), *animals(bird=False)]
    )
    assert updated.revision == 2
    assert numbers(updated.classes) == {"fox": 6, "animal": 1, "cat": 2, "dog": 3}
    await add(
        annotations,
        caller,
        [annotation("img1", regions=[box("r4", "fox", top=0.2, left=0.2, bottom=0.4, right=0.4)])],
    )
    second = await build(versions, caller, "ds", "v2")
    assert (second.ontology.ontology_id, second.ontology.revision) == ("zoo", 2)
    reader = await coco_of(versions, caller, "v2", tmp_path)
    assert categories(reader) == {
        1: ("animal", ""),
        2: ("cat", "animal"),
        3: ("dog", "animal"),
        5: ("indoor", ""),
        6: ("fox", ""),
        7: ("zebra", ""),
    }
    assert labelled(reader) == {"img1": {"cat", "fox"}, "img2": {"dog", "zebra"}}

    # v1 keeps the ontology it was built with: a new export of it (split in two) still
    # has bird and no fox, under the same numbers.
    split = vapi.ExportOptions()
    split.split.ratios.update({"train": 0.5, "test": 0.5})
    found: dict[str, set[str]] = {}
    for name in ("train", "test"):
        part = await coco_of(versions, caller, "v1", tmp_path, split, name)
        assert categories(part) == v1_categories
        found |= labelled(part)
    assert found == {"img1": {"cat"}, "img2": {"dog", "zebra"}}
    assert (await get_version(versions, caller, "ds", "v1")).ontology.revision == 1


async def test_clarifai_archives_name_concepts_from_the_ontology(
    inputs: Inputs,
    datasets: Datasets,
    annotations: Annotations,
    versions: Versions,
    ontologies: Ontologies,
    projects: Projects,
    caller: Caller,
) -> None:
    await new_dataset(datasets, caller, "ds")
    await labelled_images(inputs, annotations, caller)
    # A concept that has a name of its own keeps it.
    edges = {"top": 0.6, "left": 0.6, "bottom": 0.9, "right": 0.9}
    named = box("r5", **edges)
    named.data.concepts.append(data_pb2.Concept(id="cat", name="Tabby", value=1.0))
    await add(annotations, caller, [annotation("img2", regions=[named])])
    await govern(
        ontologies,
        projects,
        caller,
        "ds",
        ontology_pb2.Ontology(id="zoo", classes=animals(), input_classifications=[INDOOR]),
    )
    await build(versions, caller, "ds", "v1")
    # Renamed after the build: the version's exports keep the names it was built with.
    await replace_classes(
        ontologies, caller, "zoo", [label("animal", "Beast", label("cat", "Kitty"), label("dog"))]
    )

    for export_format in (PROTOBUF, JSON):
        _, archive = await exported(versions, caller, "ds", "v1", export_format)
        found = by_id(batches(archive, export_format)["all"])

        def region_names(item: RefInput) -> dict[str, tuple[str, str]]:
            return {r.id: (c.id, c.name) for r in item.data.regions for c in r.data.concepts}

        assert [(c.id, c.name) for c in found["img1"].data.concepts] == [("indoor", "Indoors")]
        assert region_names(found["img1"]) == {"r1": ("cat", "Cat")}
        # dog's class has no display name, zebra has no class: both stay unnamed.
        assert region_names(found["img2"]) == {
            "r2": ("dog", ""),
            "r3": ("zebra", ""),
            "r5": ("cat", "Tabby"),
        }


async def test_category_numbers_are_output_only(
    ontologies: Ontologies, caller: Caller, db: Database
) -> None:
    sent = ontology_pb2.Ontology(id="o", classes=[label("a", "", label("b"))])
    sent.classes[0].sub_classes[0].category_id = 7
    refused = await call_error(create_ontology(ontologies, caller, sent))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "ontology.classes[0].sub_classes[0].category_id" in refused.fields
    sent.classes[0].sub_classes[0].category_id = 0
    created = await create_ontology(ontologies, caller, sent)
    assert numbers(created.classes) == {"a": 1, "b": 2}
    # Stored, not only answered: the row holds the numbers and the highest one.
    row = await db.fetchrow(
        "SELECT classes, last_category_id FROM ontologies WHERE app_id = $1 AND id = 'o'",
        caller.app_id,
    )
    assert row is not None and row["last_category_id"] == 2
    assert row["classes"][0]["category_id"] == 1
    assert row["classes"][0]["sub_classes"][0]["category_id"] == 2


async def test_an_ontology_stored_before_the_numbers_gets_them_in_tree_order(
    ontologies: Ontologies, caller: Caller, db: Database
) -> None:
    def legacy(class_id: str, *sub_classes: dict[str, Any]) -> dict[str, Any]:
        """A class as rows stored it before migration 0010: no category_id."""
        return {
            "id": class_id,
            "display_name": "",
            "color": "",
            "shapes": ["SHAPE_BOUNDING_BOX"],
            "keypoint_names": [],
            "attributes": [],
            "sub_classes": list(sub_classes),
            "archived": False,
        }

    await db.execute(
        "INSERT INTO ontologies (app_id, id, classes) VALUES ($1, 'old', $2)",
        caller.app_id,
        [legacy("vehicle", legacy("car")), legacy("person")],
    )
    response = await ontologies.GetOntology(
        ontology_service_pb2.GetOntologyRequest(app_id=caller.app_id, ontology_id="old"),
        metadata=caller.metadata,
    )
    assert numbers(response.ontology.classes) == {"vehicle": 1, "car": 2, "person": 3}
    updated = await replace_classes(ontologies, caller, "old", [label("bike"), label("person")])
    # vehicle (and car with it) removed: its numbers are not given to bike.
    assert numbers(updated.classes) == {"bike": 4, "person": 3}
    row = await db.fetchrow(
        "SELECT classes, last_category_id FROM ontologies WHERE app_id = $1 AND id = 'old'",
        caller.app_id,
    )
    assert row is not None and row["last_category_id"] == 4
    assert [c["category_id"] for c in row["classes"]] == [4, 3]
