"""Category numbers of ontology classes: given once, in tree order, kept by each class id
across updates, never given to another class; rows stored before the numbers get them on
read."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from service.domain.models import Ontology, OntologyClass, Principal, Shape
from service.domain.ontologies import (
    OntologyFields,
    OntologyService,
    category_ids,
    number_classes,
)
from service.storage.ontologies import class_json, stored_trees

BOX = (Shape.BOUNDING_BOX,)
TAG = (Shape.CLASSIFICATION,)
PRINCIPAL = Principal(key_id="k", app_id="app", scopes=frozenset({"read", "write"}))


def box(class_id: str, *sub_classes: OntologyClass, category_id: int = 0) -> OntologyClass:
    return OntologyClass(class_id, shapes=BOX, sub_classes=sub_classes, category_id=category_id)


def numbers(ontology: Ontology) -> dict[str, int]:
    return category_ids((ontology.classes, ontology.input_classifications))


class _Ontologies:
    """An ontology repository of one app holding at most one ontology; no class is in use."""

    def __init__(self) -> None:
        self.stored: Ontology | None = None

    async def insert(self, ontology: Ontology) -> Ontology:
        self.stored = ontology
        return ontology

    async def get(self, app_id: str, ontology_id: str, *, lock: bool = False) -> Ontology | None:
        return self.stored

    async def update(self, ontology: Ontology) -> Ontology:
        self.stored = ontology
        return ontology

    async def annotations_using(
        self, app_id: str, classes: Sequence[str], shapes: Sequence[tuple[str, Shape]]
    ) -> int:
        return 0


class _NoTransaction:
    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield


def service(repository: _Ontologies) -> OntologyService:
    return OntologyService(repository, _NoTransaction())  # type: ignore[arg-type]


async def update(repository: _Ontologies, *classes: OntologyClass) -> Ontology:
    return await service(repository).update(
        PRINCIPAL, "app", "o", OntologyFields(classes=classes), 0
    )


def test_new_classes_are_numbered_in_tree_order() -> None:
    trees = (
        (box("vehicle", box("car"), box("bus")), box("person")),
        (OntologyClass("night", shapes=TAG),),
    )
    numbered, last = number_classes(trees, {}, 0)
    assert category_ids(numbered) == {"vehicle": 1, "car": 2, "bus": 3, "person": 4, "night": 5}
    assert last == 5


def test_known_classes_keep_their_numbers_whatever_they_carry() -> None:
    trees = ((box("b", category_id=99), box("new", category_id=1)), ())
    numbered, last = number_classes(trees, {"b": 2, "gone": 7}, 7)
    # "new" carried 1 (a caller's value): ignored, it gets the next number above 7.
    assert category_ids(numbered) == {"b": 2, "new": 8}
    assert last == 8


async def test_create_numbers_both_trees_from_one() -> None:
    repository = _Ontologies()
    created = await service(repository).create(
        PRINCIPAL,
        "app",
        "o",
        OntologyFields(
            classes=(box("cat"), box("dog", box("puppy"))),
            input_classifications=(OntologyClass("indoor", shapes=TAG),),
        ),
    )
    assert numbers(created) == {"cat": 1, "dog": 2, "puppy": 3, "indoor": 4}
    assert created.last_category_id == 4
    assert repository.stored == created


async def test_updates_keep_numbers_and_never_reuse_a_removed_one() -> None:
    repository = _Ontologies()
    await service(repository).create(
        PRINCIPAL, "app", "o", OntologyFields(classes=(box("cat"), box("dog"), box("bird")))
    )
    # Reordered, "dog" removed, "fox" added first: the kept classes keep theirs, "fox" is
    # numbered above everything given so far.
    second = await update(repository, box("fox"), box("bird"), box("cat"))
    assert numbers(second) == {"fox": 4, "bird": 3, "cat": 1}
    assert second.last_category_id == 4
    # "dog" (2) is not given back, not even to "dog" itself: it is a new class now.
    third = await update(repository, box("cat"), box("dog"), box("fox", box("kit")))
    assert numbers(third) == {"cat": 1, "dog": 5, "fox": 4, "kit": 6}
    assert third.last_category_id == 6


async def test_an_update_of_the_description_alone_changes_no_number() -> None:
    repository = _Ontologies()
    created = await service(repository).create(
        PRINCIPAL, "app", "o", OntologyFields(classes=(box("a", box("b")),))
    )
    updated = await service(repository).update(
        PRINCIPAL, "app", "o", OntologyFields(description="new words"), 0
    )
    assert numbers(updated) == numbers(created) == {"a": 1, "b": 2}
    assert updated.last_category_id == 2


def _legacy(item: OntologyClass) -> dict[str, object]:
    """A class as rows stored it before classes had numbers."""
    stored = class_json(item)
    del stored["category_id"]
    stored["sub_classes"] = [_legacy(c) for c in item.sub_classes]
    return stored


def test_rows_stored_without_numbers_are_numbered_on_read_in_tree_order() -> None:
    classes = [_legacy(box("vehicle", box("car"))), _legacy(box("person"))]
    inputs = [_legacy(OntologyClass("night", shapes=TAG))]
    trees, last = stored_trees(classes, inputs, 0)
    assert category_ids(trees) == {"vehicle": 1, "car": 2, "person": 3, "night": 4}
    assert last == 4


def test_stored_numbers_round_trip_and_a_missing_one_goes_above_them() -> None:
    stored = [class_json(box("cat", category_id=3)), _legacy(box("dog"))]
    trees, last = stored_trees(stored, [], 5)
    assert category_ids(trees) == {"cat": 3, "dog": 6}
    assert last == 6
    complete = [class_json(c) for c in trees[0]]
    again, last_again = stored_trees(complete, [], last)
    assert again == trees
    assert last_again == 6
