"""The ontology rules: every problem reported at once, each under its field path."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from service.domain.errors import FailedPrecondition, Violations
from service.domain.models import (
    AttributeKind,
    Ontology,
    OntologyAttribute,
    OntologyClass,
    Principal,
    Shape,
)
from service.domain.ontologies import (
    MAX_CLASSES,
    MAX_DEPTH,
    MAX_VIOLATIONS,
    OntologyFields,
    OntologyService,
    check_ontology,
    class_ids,
)

BOX = (Shape.BOUNDING_BOX,)


def problems(
    classes: Sequence[OntologyClass],
    input_classifications: Sequence[OntologyClass] = (),
    description: str = "",
) -> dict[str, str]:
    violations = Violations()
    check_ontology(violations, description, classes, input_classifications)
    return {v.field: v.description for v in violations.items}


def test_a_full_valid_ontology_has_no_problem() -> None:
    attributes = (
        OntologyAttribute("colour", "Colour", AttributeKind.ENUM, True, options=("red", "blue")),
        OntologyAttribute("parked", "Parked", AttributeKind.BOOLEAN),
        OntologyAttribute("speed", "Speed", AttributeKind.NUMBER, minimum=0.0, maximum=300.0),
        OntologyAttribute("plate", "Plate", AttributeKind.TEXT),
    )
    person = OntologyClass(
        "person", "Person", "#00ff00", (Shape.KEYPOINTS, Shape.BOUNDING_BOX), ("nose", "eye")
    )
    vehicle = OntologyClass(
        "vehicle",
        "Vehicle",
        "#FF8800",
        (Shape.POLYGON, Shape.MASK, Shape.VIDEO_TRACK),
        attributes=attributes,
        sub_classes=(OntologyClass("car", shapes=BOX),),
    )
    weather = OntologyClass(
        "weather",
        shapes=(Shape.CLASSIFICATION,),
        sub_classes=(OntologyClass("sunny", shapes=(Shape.CLASSIFICATION,)),),
    )
    assert problems([person, vehicle], [weather]) == {}


def test_duplicate_class_ids_anywhere_in_the_tree_are_named() -> None:
    tree = [
        OntologyClass("cat", shapes=BOX),
        OntologyClass("animal", shapes=BOX, sub_classes=(OntologyClass("cat", shapes=BOX),)),
    ]
    found = problems(tree, [OntologyClass("animal", shapes=(Shape.CLASSIFICATION,))])
    assert set(found) == {
        "ontology.classes[1].sub_classes[0].id",
        "ontology.input_classifications[0].id",
    }
    assert "also at ontology.classes[0]" in found["ontology.classes[1].sub_classes[0].id"]
    assert "unique in the whole ontology" in found["ontology.input_classifications[0].id"]


def test_an_enum_attribute_needs_options() -> None:
    item = OntologyClass(
        "car",
        shapes=BOX,
        attributes=(
            OntologyAttribute("ok", "Ok", AttributeKind.BOOLEAN),
            OntologyAttribute("colour", "Colour", AttributeKind.ENUM),
        ),
    )
    found = problems([OntologyClass("x", shapes=BOX), OntologyClass("y", shapes=BOX), item])
    assert list(found) == ["ontology.classes[2].attributes[1].enum_type.options"]
    assert "1..200 options" in found["ontology.classes[2].attributes[1].enum_type.options"]


def test_keypoints_need_keypoint_names() -> None:
    found = problems([OntologyClass("person", shapes=(Shape.KEYPOINTS,))])
    assert "required with SHAPE_KEYPOINTS" in found["ontology.classes[0].keypoint_names"]


def test_an_unspecified_or_repeated_shape_and_no_shape_are_refused() -> None:
    found = problems(
        [
            OntologyClass("a", shapes=(Shape.UNSPECIFIED,)),
            OntologyClass("b", shapes=(Shape.POINT, Shape.POINT)),
            OntologyClass("c"),
        ]
    )
    assert "allowed: SHAPE_CLASSIFICATION" in found["ontology.classes[0].shapes[0]"]
    assert "duplicate shape SHAPE_POINT" in found["ontology.classes[1].shapes[1]"]
    assert "is required" in found["ontology.classes[2].shapes"]


@pytest.mark.parametrize("color", ["red", "#FFF", "#GGGGGG", "FF8800", "#FF88000"])
def test_a_bad_colour_is_refused(color: str) -> None:
    found = problems([OntologyClass("a", color=color, shapes=BOX)])
    assert "#RRGGBB" in found["ontology.classes[0].color"]


def test_depth_is_bounded() -> None:
    leaf = OntologyClass("d5", shapes=BOX)
    for depth in range(MAX_DEPTH, 0, -1):
        leaf = OntologyClass(f"d{depth}", shapes=BOX, sub_classes=(leaf,))
    found = problems([leaf])
    deepest = "ontology.classes[0]" + ".sub_classes[0]" * (MAX_DEPTH - 1) + ".sub_classes"
    assert list(found) == [deepest]
    assert f"at most {MAX_DEPTH} deep" in found[deepest]
    # One level less is fine.
    assert problems([leaf.sub_classes[0]]) == {}


def test_size_is_bounded() -> None:
    classes = [OntologyClass(f"c{n}", shapes=BOX) for n in range(MAX_CLASSES + 1)]
    found = problems(classes)
    assert list(found) == ["ontology.classes"]
    assert problems(classes[:-1]) == {}


def test_input_classifications_are_classifications_only() -> None:
    found = problems(
        [],
        [
            OntologyClass(
                "w", shapes=(Shape.CLASSIFICATION, Shape.BOUNDING_BOX), keypoint_names=("a",)
            )
        ],
    )
    assert "only be SHAPE_CLASSIFICATION" in found["ontology.input_classifications[0].shapes[1]"]
    assert "no keypoints" in found["ontology.input_classifications[0].keypoint_names"]


def test_every_problem_is_reported_at_once() -> None:
    bad = OntologyClass(
        "",
        display_name="x" * 300,
        color="blue",
        shapes=(Shape.KEYPOINTS,),
        attributes=(
            OntologyAttribute("bad id!", "", AttributeKind.UNSPECIFIED),
            OntologyAttribute("n", "N", AttributeKind.NUMBER, minimum=5.0, maximum=1.0),
            OntologyAttribute("n", "Again", AttributeKind.ENUM, options=("a", "a", "")),
        ),
    )
    found = problems([bad], description="\x00")
    at = "ontology.classes[0]"
    assert set(found) == {
        "ontology.description",
        f"{at}.id",
        f"{at}.display_name",
        f"{at}.color",
        f"{at}.keypoint_names",
        f"{at}.attributes[0].id",
        f"{at}.attributes[0].name",
        f"{at}.attributes[0].kind",
        f"{at}.attributes[1].number.max",
        f"{at}.attributes[2].id",
        f"{at}.attributes[2].enum_type.options[1]",
        f"{at}.attributes[2].enum_type.options[2]",
    }
    assert "must not be below min" in found[f"{at}.attributes[1].number.max"]


def test_class_ids_covers_sub_classes() -> None:
    tree = [OntologyClass("a", sub_classes=(OntologyClass("b"),)), OntologyClass("c")]
    assert set(class_ids(tree)) == {"a", "b", "c"}


# --- the update rule -----------------------------------------------------------------------


class _Usage:
    """An ontology repository that holds one ontology and says every asked class is used
    `count` times; records what it was asked."""

    def __init__(self, current: Ontology, count: int) -> None:
        self.current = current
        self.count = count
        self.asked: list[tuple[list[str], list[tuple[str, Shape]]]] = []
        self.saved: Ontology | None = None

    async def get(self, app_id: str, ontology_id: str, *, lock: bool = False) -> Ontology | None:
        return self.current

    async def update(self, ontology: Ontology) -> Ontology:
        self.saved = ontology
        return ontology

    async def annotations_using(
        self, app_id: str, classes: Sequence[str], shapes: Sequence[tuple[str, Shape]]
    ) -> int:
        self.asked.append((list(classes), list(shapes)))
        return self.count


class _NoTransaction:
    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield

    def after_commit(self, hook: Callable[[], None]) -> None:
        hook()


PRINCIPAL = Principal(key_id="k", app_id="app", scopes=frozenset({"read", "write"}))
CURRENT = Ontology(
    app_id="app",
    id="o",
    classes=(
        OntologyClass(
            "animal",
            shapes=BOX,
            sub_classes=(OntologyClass("cat", shapes=(Shape.BOUNDING_BOX, Shape.POLYGON)),),
        ),
    ),
)


async def _update(usage: _Usage, classes: tuple[OntologyClass, ...]) -> Ontology:
    service = OntologyService(usage, _NoTransaction())  # type: ignore[arg-type]
    return await service.update(PRINCIPAL, "app", "o", OntologyFields(classes=classes), 0)


async def test_removing_a_parent_removes_its_sub_classes() -> None:
    usage = _Usage(CURRENT, 3)
    with pytest.raises(FailedPrecondition) as refused:
        await _update(usage, ())
    assert usage.asked == [(["animal", "cat"], [])]
    assert refused.value.metadata == {"annotations": "3"}
    assert refused.value.reason == "ONTOLOGY_CLASS_IN_USE"
    assert usage.saved is None


async def test_a_lost_shape_is_asked_about_unless_the_class_is_archived() -> None:
    usage = _Usage(CURRENT, 1)
    # cat moves to the top level and loses its polygon: not a removal, a lost shape.
    moved = (OntologyClass("animal", shapes=BOX), OntologyClass("cat", shapes=BOX))
    with pytest.raises(FailedPrecondition, match="removes SHAPE_POLYGON from class 'cat'"):
        await _update(usage, moved)
    assert usage.asked == [([], [("cat", Shape.POLYGON)])]

    archived = (
        OntologyClass("animal", shapes=BOX),
        OntologyClass("cat", archived=True, shapes=BOX),
    )
    saved = await _update(usage, archived)
    assert saved.classes[1].archived
    assert len(usage.asked) == 1  # nothing to ask: the archived class may lose shapes


async def test_an_unused_class_may_go() -> None:
    usage = _Usage(CURRENT, 0)
    saved = await _update(usage, (OntologyClass("animal", shapes=BOX),))
    assert [c.id for c in saved.classes] == ["animal"] and not saved.classes[0].sub_classes


def test_the_report_is_bounded() -> None:
    classes = [OntologyClass(f"c{n}", color="red", shapes=BOX) for n in range(300)]
    violations = Violations()
    check_ontology(violations, "", classes, [])
    assert len(violations.items) == MAX_VIOLATIONS + 1
    assert violations.items[-1].field == "ontology"
    assert "200 more problems" in violations.items[-1].description
