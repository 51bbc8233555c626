"""OntologyService as a caller sees it: real server, real channel, generated stubs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import pytest
from datasetd.v1 import (
    annotation_pb2,
    annotation_service_pb2,
    data_pb2,
    input_pb2,
    input_service_pb2,
    ontology_pb2,
    ontology_service_pb2_grpc,
)
from datasetd.v1 import ontology_service_pb2 as api
from google.protobuf import field_mask_pb2, json_format

from tests.conftest import Caller
from tests.helpers import call_error, png_bytes

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub
    from datasetd.v1.ontology_service_pb2_grpc import OntologyServiceAsyncStub as Stub

BOX = ontology_pb2.SHAPE_BOUNDING_BOX
POLYGON = ontology_pb2.SHAPE_POLYGON
KEYPOINTS = ontology_pb2.SHAPE_KEYPOINTS
CLASSIFICATION = ontology_pb2.SHAPE_CLASSIFICATION


@pytest.fixture(scope="session")
def ontologies(channel: grpc.aio.Channel) -> Stub:
    return ontology_service_pb2_grpc.OntologyServiceStub(channel)


def full_ontology(ontology_id: str = "") -> ontology_pb2.Ontology:
    attributes = [
        ontology_pb2.OntologyAttribute(
            id="colour",
            name="Colour",
            required=True,
            enum_type=ontology_pb2.EnumAttribute(options=["red", "blue"]),
        ),
        ontology_pb2.OntologyAttribute(
            id="parked", name="Parked", boolean=ontology_pb2.BooleanAttribute()
        ),
        ontology_pb2.OntologyAttribute(
            id="speed", name="Speed", number=ontology_pb2.NumberAttribute(min=0, max=300.5)
        ),
        ontology_pb2.OntologyAttribute(id="plate", name="Plate", text=ontology_pb2.TextAttribute()),
    ]
    return ontology_pb2.Ontology(
        id=ontology_id,
        description="road scenes",
        classes=[
            ontology_pb2.OntologyClass(
                id="vehicle",
                display_name="Vehicle",
                color="#FF8800",
                shapes=[BOX, POLYGON, ontology_pb2.SHAPE_VIDEO_TRACK],
                attributes=attributes,
                sub_classes=[
                    ontology_pb2.OntologyClass(id="car", shapes=[BOX], archived=True),
                ],
            ),
            ontology_pb2.OntologyClass(
                id="person", shapes=[KEYPOINTS], keypoint_names=["nose", "left_eye"]
            ),
        ],
        input_classifications=[
            ontology_pb2.OntologyClass(id="night", display_name="Night", shapes=[CLASSIFICATION])
        ],
    )


async def create(stub: Stub, caller: Caller, ontology: ontology_pb2.Ontology) -> Any:
    response = await stub.CreateOntology(
        api.CreateOntologyRequest(app_id=caller.app_id, ontology=ontology),
        metadata=caller.metadata,
    )
    return response.ontology


async def get(stub: Stub, caller: Caller, ontology_id: str) -> Any:
    response = await stub.GetOntology(
        api.GetOntologyRequest(app_id=caller.app_id, ontology_id=ontology_id),
        metadata=caller.metadata,
    )
    return response.ontology


async def update(
    stub: Stub, caller: Caller, ontology: ontology_pb2.Ontology, *paths: str, revision: int = 0
) -> Any:
    response = await stub.UpdateOntology(
        api.UpdateOntologyRequest(
            app_id=caller.app_id,
            ontology=ontology,
            update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
            expected_revision=revision,
        ),
        metadata=caller.metadata,
    )
    return response.ontology


async def listed(stub: Stub, caller: Caller) -> list[str]:
    response = await stub.ListOntologies(
        api.ListOntologiesRequest(app_id=caller.app_id), metadata=caller.metadata
    )
    return [o.id for o in response.ontologies]


def content(ontology: Any) -> dict[str, Any]:
    """What a caller set: the message without its output-only fields."""
    found: dict[str, Any] = json_format.MessageToDict(ontology)
    for name in ("appId", "revision", "createdAt", "modifiedAt"):
        found.pop(name, None)
    for tree in ("classes", "inputClassifications"):
        _drop_category_ids(found.get(tree, []))
    return found


def _drop_category_ids(classes: list[dict[str, Any]]) -> None:
    for item in classes:
        item.pop("categoryId", None)
        _drop_category_ids(item.get("subClasses", []))


async def test_create_get_and_delete(ontologies: Stub, caller: Caller) -> None:
    sent = full_ontology("roads")
    created = await create(ontologies, caller, sent)
    assert created.app_id == caller.app_id
    assert created.revision == 1
    assert created.HasField("created_at") and created.HasField("modified_at")
    assert content(created) == content(sent)
    assert created.classes[0].attributes[2].number.HasField("min")  # 0 is kept, not dropped
    assert await get(ontologies, caller, "roads") == created

    generated = await create(ontologies, caller, ontology_pb2.Ontology(description="x"))
    assert len(generated.id) == 32

    taken = await call_error(create(ontologies, caller, full_ontology("roads")))
    assert taken.code == grpc.StatusCode.ALREADY_EXISTS

    await ontologies.DeleteOntology(
        api.DeleteOntologyRequest(app_id=caller.app_id, ontology_id="roads"),
        metadata=caller.metadata,
    )
    gone = await call_error(get(ontologies, caller, "roads"))
    assert gone.code == grpc.StatusCode.NOT_FOUND
    again = await call_error(
        ontologies.DeleteOntology(
            api.DeleteOntologyRequest(app_id=caller.app_id, ontology_id="roads"),
            metadata=caller.metadata,
        )
    )
    assert again.code == grpc.StatusCode.NOT_FOUND


async def test_list_pages_oldest_first(ontologies: Stub, caller: Caller) -> None:
    for name in ("o1", "o2", "o3"):
        await create(ontologies, caller, ontology_pb2.Ontology(id=name))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        response = await ontologies.ListOntologies(
            api.ListOntologiesRequest(app_id=caller.app_id, page_size=2, page_token=token),
            metadata=caller.metadata,
        )
        pages += 1
        seen.extend(o.id for o in response.ontologies)
        token = response.next_page_token
        if not token:
            break
    assert seen == ["o1", "o2", "o3"]
    assert pages == 2
    bad = await call_error(
        ontologies.ListOntologies(
            api.ListOntologiesRequest(app_id=caller.app_id, page_token="garbage"),
            metadata=caller.metadata,
        )
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in bad.fields


async def test_update_replaces_named_fields_and_counts_revisions(
    ontologies: Stub, caller: Caller
) -> None:
    created = await create(ontologies, caller, full_ontology("upd"))
    described = await update(ontologies, caller, ontology_pb2.Ontology(id="upd", description="new"))
    assert described.revision == 2
    assert described.description == "new"
    assert len(described.classes) == 2  # not named: unchanged
    assert described.modified_at.ToDatetime() > created.modified_at.ToDatetime()

    stale = await call_error(
        update(ontologies, caller, ontology_pb2.Ontology(id="upd", description="x"), revision=1)
    )
    assert stale.code == grpc.StatusCode.ABORTED and stale.reason == "REVISION_MISMATCH"

    # A mask clears a field; nothing uses the classes, so removing them is allowed.
    cleared = await update(
        ontologies, caller, ontology_pb2.Ontology(id="upd"), "classes", revision=2
    )
    assert cleared.revision == 3
    assert not cleared.classes
    assert len(cleared.input_classifications) == 1
    assert await get(ontologies, caller, "upd") == cleared

    outside = await call_error(
        update(ontologies, caller, ontology_pb2.Ontology(id="upd", description="y"), "classes")
    )
    assert "not in update_mask" in outside.fields["ontology.description"]
    unknown = await call_error(
        update(ontologies, caller, ontology_pb2.Ontology(id="upd"), "revision")
    )
    assert "update_mask.paths[0]" in unknown.fields
    nothing = await call_error(update(ontologies, caller, ontology_pb2.Ontology(id="upd")))
    assert "nothing to update" in nothing.fields["ontology"]
    missing = await call_error(
        update(ontologies, caller, ontology_pb2.Ontology(id="nope", description="z"))
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    # A class id clashing with the unchanged input classifications.
    clash = await call_error(
        update(
            ontologies,
            caller,
            ontology_pb2.Ontology(
                id="upd", classes=[ontology_pb2.OntologyClass(id="night", shapes=[BOX])]
            ),
        )
    )
    assert "duplicate class id 'night'" in clash.fields["ontology.input_classifications[0].id"]
    assert (await get(ontologies, caller, "upd")).revision == 3


def _cls(class_id: str, *shapes: int, **fields: Any) -> ontology_pb2.OntologyClass:
    # Any shape number, declared or not: the boundary's refusal is tested too.
    return ontology_pb2.OntologyClass(id=class_id, shapes=shapes, **fields)  # type: ignore[arg-type]


def _deep(depth: int) -> ontology_pb2.OntologyClass:
    item = _cls(f"d{depth}", BOX)
    for level in range(depth - 1, 0, -1):
        item = _cls(f"d{level}", BOX, sub_classes=[item])
    return item


BAD = {
    "duplicate class ids": (
        [_cls("cat", BOX), _cls("animal", BOX, sub_classes=[_cls("cat", BOX)])],
        {"ontology.classes[1].sub_classes[0].id": "duplicate class id 'cat'"},
    ),
    "an empty enum": (
        [
            _cls("a", BOX),
            _cls("b", BOX),
            _cls(
                "car",
                BOX,
                attributes=[
                    ontology_pb2.OntologyAttribute(
                        id="colour", name="Colour", enum_type=ontology_pb2.EnumAttribute()
                    )
                ],
            ),
        ],
        {"ontology.classes[2].attributes[0].enum_type.options": "needs 1..200 options"},
    ),
    "keypoints without names": (
        [_cls("person", KEYPOINTS)],
        {"ontology.classes[0].keypoint_names": "required with SHAPE_KEYPOINTS"},
    ),
    "an unknown shape number": (
        [_cls("cat", BOX, 99)],
        {"ontology.classes[0].shapes[1]": "unknown Shape value 99"},
    ),
    "an unspecified shape": (
        [_cls("cat", ontology_pb2.SHAPE_UNSPECIFIED)],
        {"ontology.classes[0].shapes[0]": "SHAPE_UNSPECIFIED is not a shape"},
    ),
    "a bad colour": (
        [_cls("cat", BOX, color="orange")],
        {"ontology.classes[0].color": "must be #RRGGBB"},
    ),
    "too deep": (
        [_deep(5)],
        {"ontology.classes[0]" + ".sub_classes[0]" * 3 + ".sub_classes": "at most 4 deep"},
    ),
    "too many classes": (
        [_cls(f"c{n}", BOX) for n in range(1001)],
        {"ontology.classes": "at most 1000 classes"},
    ),
    "every problem at once": (
        [
            _cls("cat", KEYPOINTS, color="blue"),
            _cls(
                "cat",
                BOX,
                attributes=[
                    ontology_pb2.OntologyAttribute(
                        id="n", name="N", number=ontology_pb2.NumberAttribute(min=2, max=1)
                    )
                ],
            ),
        ],
        {
            "ontology.classes[0].color": "#RRGGBB",
            "ontology.classes[0].keypoint_names": "required",
            "ontology.classes[1].id": "duplicate",
            "ontology.classes[1].attributes[0].number.max": "must not be below min",
        },
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
async def test_bad_ontologies_are_refused_by_path_and_nothing_is_written(
    ontologies: Stub, caller: Caller, case: str
) -> None:
    classes, expected = BAD[case]
    ontology = ontology_pb2.Ontology(id="bad", classes=classes)
    error = await call_error(create(ontologies, caller, ontology))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    for field, text in expected.items():
        assert text in error.fields.get(field, ""), (field, error.fields)
    assert set(error.fields) == set(expected)
    assert await listed(ontologies, caller) == []
    # The same content as an update of an existing ontology changes nothing either.
    await create(ontologies, caller, ontology_pb2.Ontology(id="kept", description="kept"))
    error = await call_error(update(ontologies, caller, ontology, "classes"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(error.fields) == set(expected)
    kept = await get(ontologies, caller, "kept")
    assert kept.revision == 1 and not kept.classes


async def test_input_classifications_are_classifications(ontologies: Stub, caller: Caller) -> None:
    error = await call_error(
        create(
            ontologies,
            caller,
            ontology_pb2.Ontology(input_classifications=[_cls("night", BOX)]),
        )
    )
    assert (
        "only be SHAPE_CLASSIFICATION"
        in error.fields["ontology.input_classifications[0].shapes[0]"]
    )


async def _annotate(
    inputs: InputServiceAsyncStub, annotations: AnnotationServiceAsyncStub, caller: Caller
) -> None:
    """Two annotations: a box labelled cat, and an input-level tag night."""
    await inputs.CreateInputs(
        input_service_pb2.CreateInputsRequest(
            app_id=caller.app_id,
            inputs=[
                input_pb2.Input(
                    id="img", data=data_pb2.Data(image=data_pb2.Image(base64=png_bytes()))
                )
            ],
        ),
        metadata=caller.metadata,
    )
    region = data_pb2.Region(
        region_info=data_pb2.RegionInfo(
            bounding_box=data_pb2.BoundingBox(
                top_row=0.1, left_col=0.1, bottom_row=0.5, right_col=0.5
            )
        ),
        data=data_pb2.Data(concepts=[data_pb2.Concept(id="cat", value=1.0)]),
    )
    await annotations.CreateAnnotations(
        annotation_service_pb2.CreateAnnotationsRequest(
            app_id=caller.app_id,
            annotations=[
                annotation_pb2.Annotation(input_id="img", data=data_pb2.Data(regions=[region])),
                annotation_pb2.Annotation(
                    input_id="img",
                    data=data_pb2.Data(concepts=[data_pb2.Concept(id="night", value=1.0)]),
                ),
            ],
        ),
        metadata=caller.metadata,
    )


async def test_removing_a_class_or_shape_in_use_is_refused_unless_archived(
    ontologies: Stub,
    inputs: InputServiceAsyncStub,
    annotations: AnnotationServiceAsyncStub,
    caller: Caller,
) -> None:
    await _annotate(inputs, annotations, caller)
    cat = _cls("cat", BOX, POLYGON)
    dog = _cls("dog", BOX)
    night = _cls("night", CLASSIFICATION)
    await create(
        ontologies,
        caller,
        ontology_pb2.Ontology(id="pets", classes=[cat, dog], input_classifications=[night]),
    )

    removed = await call_error(
        update(ontologies, caller, ontology_pb2.Ontology(id="pets", classes=[dog]))
    )
    assert removed.code == grpc.StatusCode.FAILED_PRECONDITION
    assert removed.reason == "ONTOLOGY_CLASS_IN_USE"
    assert "removes class 'cat'" in removed.message
    assert "used by 1 annotation(s)" in removed.message
    assert "archive the class instead" in removed.message

    no_box = await call_error(
        update(
            ontologies,
            caller,
            ontology_pb2.Ontology(id="pets", classes=[_cls("cat", POLYGON), dog]),
        )
    )
    assert no_box.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "removes SHAPE_BOUNDING_BOX from class 'cat'" in no_box.message

    untagged = await call_error(
        update(ontologies, caller, ontology_pb2.Ontology(id="pets"), "input_classifications")
    )
    assert untagged.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "removes class 'night'" in untagged.message

    # Both at once: one count of distinct annotations.
    both = await call_error(
        update(
            ontologies,
            caller,
            ontology_pb2.Ontology(id="pets", classes=[dog]),
            "classes",
            "input_classifications",
        )
    )
    assert "used by 2 annotation(s)" in both.message
    assert (await get(ontologies, caller, "pets")).revision == 1

    # Unused: dog goes, and cat loses the polygon no annotation draws.
    kept = await update(
        ontologies, caller, ontology_pb2.Ontology(id="pets", classes=[_cls("cat", BOX)])
    )
    assert kept.revision == 2 and [c.id for c in kept.classes] == ["cat"]

    # Archived instead: the class stays, and may lose its shapes.
    archived = await update(
        ontologies,
        caller,
        ontology_pb2.Ontology(id="pets", classes=[_cls("cat", POLYGON, archived=True)]),
    )
    assert archived.revision == 3
    assert archived.classes[0].archived and list(archived.classes[0].shapes) == [POLYGON]


async def test_another_apps_ontologies_are_not_reachable(
    ontologies: Stub, caller: Caller, db: Any
) -> None:
    from tests.conftest import new_caller

    await create(ontologies, caller, ontology_pb2.Ontology(id="mine"))
    stranger = await new_caller(db)
    error = await call_error(
        ontologies.GetOntology(
            api.GetOntologyRequest(app_id=caller.app_id, ontology_id="mine"),
            metadata=stranger.metadata,
        )
    )
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert await listed(ontologies, stranger) == []
