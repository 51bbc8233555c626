"""The ontology rules applied to annotation content (service/domain/ontology_check.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.domain.models import (
    AttributeKind,
    Ontology,
    OntologyAttribute,
    OntologyClass,
    OntologyRef,
    Shape,
)
from service.domain.ontology_check import (
    Finding,
    OntologyChecker,
    OntologyGate,
    Rule,
    Tally,
    check_all,
    class_ids_in,
)

SIZE = OntologyAttribute("size", "Size", AttributeKind.ENUM, required=True, options=("s", "l"))
VEHICLE = OntologyClass(
    id="vehicle",
    shapes=(Shape.BOUNDING_BOX,),
    sub_classes=(
        OntologyClass(
            id="truck", shapes=(Shape.BOUNDING_BOX, Shape.VIDEO_TRACK), attributes=(SIZE,)
        ),
    ),
)
ONTOLOGY = Ontology(
    app_id="app",
    id="o",
    revision=3,
    classes=(
        VEHICLE,
        OntologyClass(id="tag", shapes=(Shape.CLASSIFICATION, Shape.POINT)),
        OntologyClass(id="gone", shapes=(Shape.BOUNDING_BOX,), archived=True),
    ),
    input_classifications=(OntologyClass(id="indoor", shapes=(Shape.CLASSIFICATION,)),),
)
BOX = {"bounding_box": {"top_row": 0.1, "left_col": 0.1, "bottom_row": 0.5, "right_col": 0.5}}


def region(label: str, info: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"region_info": info or BOX, "data": {"concepts": [{"id": label, "value": 1}]}, **extra}


def rules(found: Sequence[Finding]) -> list[tuple[Rule, str]]:
    return [(f.rule, f.field) for f in found]


def check(data: dict[str, Any], **options: Any) -> list[tuple[Rule, str]]:
    return rules(OntologyChecker(ONTOLOGY).check("d", data, **options))


def test_sub_classes_are_classes_and_their_attributes_apply() -> None:
    ok = region("truck", track_id="t")
    ok["data"]["metadata"] = {"attributes": {"size": "l"}}
    assert check({"regions": [ok]}) == []
    assert check({"regions": [region("truck")]}) == [
        (Rule.MISSING_ATTRIBUTE, "d.regions[0].data.metadata.attributes.size")
    ]


def test_frames_are_checked_like_the_annotation() -> None:
    data = {
        "frames": [
            {"data": {"concepts": [{"id": "tag"}], "regions": [region("vehicle")]}},
            {"data": {"regions": [region("vehicel")]}},
        ]
    }
    assert check(data) == [(Rule.UNKNOWN_CLASS, "d.frames[1].data.regions[0].data.concepts[0].id")]


def test_shapes_come_from_the_geometry_and_the_track() -> None:
    point = {"point": {"row": 0.5, "col": 0.5}}
    assert check({"regions": [region("tag", point)]}) == []
    assert check({"regions": [region("vehicle", point)]}) == [
        (Rule.SHAPE_NOT_ALLOWED, "d.regions[0].data.concepts[0].id")
    ]
    assert check({"regions": [region("vehicle", track_id="t1")]}) == [
        (Rule.SHAPE_NOT_ALLOWED, "d.regions[0].data.concepts[0].id")
    ]
    # A whole-input label needs SHAPE_CLASSIFICATION or an input-level classification.
    assert check({"concepts": [{"id": "indoor"}, {"id": "tag"}, {"id": "vehicle"}]}) == [
        (Rule.SHAPE_NOT_ALLOWED, "d.concepts[2].id")
    ]
    assert check({"regions": [region("indoor")]}) == [
        (Rule.SHAPE_NOT_ALLOWED, "d.regions[0].data.concepts[0].id")
    ]


def test_archived_classes_only_where_they_were() -> None:
    data = {"regions": [region("gone")]}
    assert check(data) == [(Rule.ARCHIVED_CLASS, "d.regions[0].data.concepts[0].id")]
    assert check(data, allowed_archived=class_ids_in(data)) == []


def test_attribute_values_are_typed() -> None:
    number = OntologyAttribute("n", "N", AttributeKind.NUMBER, minimum=0.0, maximum=1.0)
    flag = OntologyAttribute("f", "F", AttributeKind.BOOLEAN)
    text = OntologyAttribute("t", "T", AttributeKind.TEXT)
    typed = Ontology(
        app_id="a",
        id="x",
        classes=(
            OntologyClass(id="c", shapes=(Shape.BOUNDING_BOX,), attributes=(number, flag, text)),
        ),
    )
    checker = OntologyChecker(typed)

    def with_values(values: Any) -> list[tuple[Rule, str]]:
        item = region("c")
        item["data"]["metadata"] = {"attributes": values}
        return rules(checker.check("d", {"regions": [item]}))

    assert with_values({"n": 0.5, "f": False, "t": "x"}) == []
    where = "d.regions[0].data.metadata.attributes"
    assert with_values({"n": True, "f": 1, "t": 2}) == [
        (Rule.INVALID_ATTRIBUTE, f"{where}.n"),
        (Rule.INVALID_ATTRIBUTE, f"{where}.f"),
        (Rule.INVALID_ATTRIBUTE, f"{where}.t"),
    ]
    assert with_values({"n": 1.5}) == [(Rule.INVALID_ATTRIBUTE, f"{where}.n")]
    assert with_values({"z": 1}) == [(Rule.UNKNOWN_ATTRIBUTE, f"{where}.z")]
    assert with_values(["n"]) == [(Rule.INVALID_ATTRIBUTE, where)]


def test_keypoints_follow_the_class_names() -> None:
    body = Ontology(
        app_id="a",
        id="k",
        classes=(OntologyClass(id="p", shapes=(Shape.KEYPOINTS,), keypoint_names=("a", "b")),),
    )
    points = {"keypoint_locations": [{"row": 0.1, "col": 0.1}, {"row": 0.2, "col": 0.2}]}
    named = region("p", points)
    named["data"]["metadata"] = {"keypoint_names": ["b", "c"]}
    found = rules(OntologyChecker(body).check("d", {"regions": [named]}))
    assert found == [(Rule.UNKNOWN_KEYPOINT, "d.regions[0].data.metadata.keypoint_names[1]")]
    three = region("p", {"keypoint_locations": [{"row": 0.1, "col": 0.1}] * 3})
    assert rules(OntologyChecker(body).check("d", {"regions": [three]})) == [
        (Rule.UNKNOWN_KEYPOINT, "d.regions[0].region_info.keypoint_locations")
    ]


def test_several_ontologies_report_a_finding_once() -> None:
    data = {"regions": [region("nope")]}
    checkers = [OntologyChecker(ONTOLOGY), OntologyChecker(ONTOLOGY)]
    assert len(check_all(checkers, "d", data)) == 1
    assert check_all([], "d", data) == []


def test_tally_counts_every_finding_and_pages_one_rule() -> None:
    unknown = Finding(Rule.UNKNOWN_CLASS, "f", "m")
    missing = Finding(Rule.MISSING_ATTRIBUTE, "g", "m")
    tally = Tally(Rule.UNKNOWN_CLASS, None, 2)
    for seq in range(1, 4):
        tally.add(seq, f"a{seq}", "i", [unknown, unknown, missing] if seq != 2 else [])
    result = tally.result(OntologyRef("o", 1))
    assert (result.annotations_checked, result.annotations_invalid) == (3, 2)
    (report,) = result.reports
    assert (report.rule, report.annotations, report.findings) == (Rule.UNKNOWN_CLASS, 2, 4)
    assert [f.annotation_id for f in report.page] == ["a1", "a1"]
    assert result.next_cursor == (1, 1)
    rest = Tally(Rule.UNKNOWN_CLASS, result.next_cursor, 2)
    for seq in range(1, 4):
        rest.add(seq, f"a{seq}", "i", [unknown, unknown, missing] if seq != 2 else [])
    last = rest.result(OntologyRef("o", 1))
    assert [f.annotation_id for f in last.reports[0].page] == ["a3", "a3"]
    assert last.next_cursor is None


class _Projects:
    async def ontologies_of_inputs(
        self, app_id: str, input_ids: Sequence[str]
    ) -> list[tuple[str, OntologyRef]]:
        return [(i, OntologyRef("o", 3)) for i in input_ids if i != "loose"]


class _Ontologies:
    def __init__(self) -> None:
        self.reads = 0

    async def get(self, app_id: str, ontology_id: str, *, lock: bool = False) -> Ontology | None:
        self.reads += 1
        return ONTOLOGY


async def test_the_gate_reads_an_ontology_revision_once() -> None:
    stored = _Ontologies()
    gate = OntologyGate(_Projects(), stored)  # type: ignore[arg-type]
    first = await gate.for_inputs("app", ["a", "b", "loose"])
    second = await gate.for_inputs("app", ["c"])
    assert sorted(first) == ["a", "b"] and first["a"][0] is second["c"][0]
    assert stored.reads == 1
