"""Ontologies: an app's label schemas (classes, how each may be drawn, typed attributes,
sub-classes, input-level classifications), their rules, and the use cases.

Every problem of an ontology is reported at once, each under the field path a caller
sent (`ontology.classes[2].attributes[0].enum_type.options`) with what is allowed."""

from __future__ import annotations

import dataclasses
import math
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from service.domain.annotation_rules import MAX_CONCEPT_ID_CHARS
from service.domain.auth import Permission, authorize
from service.domain.errors import Aborted, FailedPrecondition, NotFound, Violations
from service.domain.models import (
    AttributeKind,
    Ontology,
    OntologyAttribute,
    OntologyClass,
    Principal,
    Shape,
)
from service.domain.paging import split_page
from service.domain.ports import OntologyRepository, TransactionManager
from service.domain.validation import check_id, check_text, checked_ids, require_ids

DESCRIPTION_MAX_CHARS: Final = 1024
MAX_CLASSES: Final = 1000
MAX_DEPTH: Final = 4
# A class id is the concept id annotations carry, under the same rule.
CLASS_ID_MAX_CHARS: Final = MAX_CONCEPT_ID_CHARS
DISPLAY_NAME_MAX_CHARS: Final = 256
MAX_KEYPOINTS: Final = 100
KEYPOINT_NAME_MAX_CHARS: Final = 64
MAX_ATTRIBUTES: Final = 50
ATTRIBUTE_NAME_MAX_CHARS: Final = 256
MAX_OPTIONS: Final = 200
OPTION_MAX_CHARS: Final = 256
MAX_VIOLATIONS: Final = 100
UPDATABLE_FIELDS: Final = ("description", "classes", "input_classifications")
_COLOR: Final = re.compile(r"^#[0-9A-Fa-f]{6}$")


SHAPES: Final = tuple(shape for shape in Shape if shape is not Shape.UNSPECIFIED)
_SHAPE_NAMES: Final = ", ".join(shape.value for shape in SHAPES)


@dataclass(frozen=True)
class OntologyFields:
    """What a caller gave in a create or an update; None means not given."""

    description: str | None = None
    classes: tuple[OntologyClass, ...] | None = None
    input_classifications: tuple[OntologyClass, ...] | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))


# --- rules -------------------------------------------------------------------------------


def walk(
    classes: Sequence[OntologyClass], path: str, depth: int = 1
) -> Iterator[tuple[str, int, OntologyClass]]:
    """Every class of a tree with its field path and depth (a top-level class is 1),
    parents before their sub-classes; not below MAX_DEPTH + 1."""
    for index, item in enumerate(classes):
        here = f"{path}[{index}]"
        yield here, depth, item
        if depth <= MAX_DEPTH:
            yield from walk(item.sub_classes, f"{here}.sub_classes", depth + 1)


def check_ontology(
    violations: Violations,
    description: str,
    classes: Sequence[OntologyClass],
    input_classifications: Sequence[OntologyClass],
    path: str = "ontology",
) -> None:
    """Adds a violation for every problem of an ontology's content (at most
    MAX_VIOLATIONS, then one "... and more")."""
    check_text(violations, f"{path}.description", description, DESCRIPTION_MAX_CHARS)
    trees = (("classes", classes, False), ("input_classifications", input_classifications, True))
    total = sum(1 for _, tree, _ in trees for _ in walk(tree, ""))
    if total > MAX_CLASSES:
        # Checked no further: the size alone decides, and the rest would be noise.
        violations.add(
            f"{path}.classes",
            f"at most {MAX_CLASSES} classes in all (sub-classes and input_classifications "
            f"included), got {total}",
        )
        return
    found = Violations()
    seen: dict[str, str] = {}
    for field, tree, input_level in trees:
        for here, depth, item in walk(tree, f"{path}.{field}"):
            _check_class(found, here, item, input_level=input_level)
            if item.id:
                first = seen.setdefault(item.id, here)
                if first != here:
                    found.add(
                        f"{here}.id",
                        f"duplicate class id {item.id!r} (also at {first}); class ids must be "
                        "unique in the whole ontology, sub-classes and input_classifications "
                        "included",
                    )
            if depth == MAX_DEPTH and item.sub_classes:
                found.add(
                    f"{here}.sub_classes",
                    f"classes nest at most {MAX_DEPTH} deep (a top-level class is depth 1); "
                    f"this class is at depth {depth}",
                )
    violations.items.extend(found.items[:MAX_VIOLATIONS])
    if len(found.items) > MAX_VIOLATIONS:
        violations.add(
            path,
            f"... and {len(found.items) - MAX_VIOLATIONS} more problems: only the first "
            f"{MAX_VIOLATIONS} are reported",
        )


def _check_class(
    violations: Violations, path: str, item: OntologyClass, *, input_level: bool
) -> None:
    if not item.id:
        violations.add(
            f"{path}.id", f"is required: the concept id, 1..{CLASS_ID_MAX_CHARS} characters"
        )
    else:
        check_text(violations, f"{path}.id", item.id, CLASS_ID_MAX_CHARS)
    check_text(violations, f"{path}.display_name", item.display_name, DISPLAY_NAME_MAX_CHARS)
    if item.color and not _COLOR.match(item.color):
        violations.add(
            f"{path}.color", f"must be #RRGGBB (6 hex digits, e.g. #FF8800), got {item.color!r}"
        )
    _check_shapes(violations, path, item, input_level=input_level)
    _check_keypoints(violations, path, item, input_level=input_level)
    if len(item.attributes) > MAX_ATTRIBUTES:
        violations.add(
            f"{path}.attributes", f"at most {MAX_ATTRIBUTES} per class, got {len(item.attributes)}"
        )
    attribute_ids: dict[str, int] = {}
    for index, attribute in enumerate(item.attributes):
        where = f"{path}.attributes[{index}]"
        _check_attribute(violations, where, attribute)
        first = attribute_ids.setdefault(attribute.id, index)
        if attribute.id and first != index:
            violations.add(
                f"{where}.id",
                f"duplicate attribute id {attribute.id!r} (also attributes[{first}]); "
                "attribute ids must be unique within their class",
            )


def _check_shapes(
    violations: Violations, path: str, item: OntologyClass, *, input_level: bool
) -> None:
    if not item.shapes:
        allowed = Shape.CLASSIFICATION.value if input_level else f"one or more of {_SHAPE_NAMES}"
        violations.add(f"{path}.shapes", f"is required: {allowed}")
        return
    seen: set[Shape] = set()
    for index, shape in enumerate(item.shapes):
        where = f"{path}.shapes[{index}]"
        if shape is Shape.UNSPECIFIED:
            violations.add(where, f"{shape.value} is not a shape; allowed: {_SHAPE_NAMES}")
        elif input_level and shape is not Shape.CLASSIFICATION:
            violations.add(
                where,
                f"an input-level classification can only be {Shape.CLASSIFICATION.value}, "
                f"got {shape.value}",
            )
        elif shape in seen:
            violations.add(where, f"duplicate shape {shape.value}")
        seen.add(shape)


def _check_keypoints(
    violations: Violations, path: str, item: OntologyClass, *, input_level: bool
) -> None:
    where = f"{path}.keypoint_names"
    names = item.keypoint_names
    if input_level and names:
        violations.add(where, "an input-level classification has no keypoints")
        return
    if Shape.KEYPOINTS in item.shapes and not names:
        violations.add(
            where,
            f"is required with {Shape.KEYPOINTS.value}: 1..{MAX_KEYPOINTS} names of the "
            "keypoints, in order",
        )
    if len(names) > MAX_KEYPOINTS:
        violations.add(where, f"at most {MAX_KEYPOINTS} names, got {len(names)}")
    _check_names(violations, where, names, KEYPOINT_NAME_MAX_CHARS, "keypoint name")


def _check_names(
    violations: Violations, path: str, names: Sequence[str], max_chars: int, what: str
) -> None:
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        where = f"{path}[{index}]"
        if not name or len(name) > max_chars:
            violations.add(where, f"must be 1..{max_chars} characters, got {len(name)}")
        elif "\x00" in name:
            violations.add(where, "must not contain NUL characters")
        first = seen.setdefault(name, index)
        if first != index:
            violations.add(where, f"duplicate {what} {name!r} (also [{first}])")


def _check_attribute(violations: Violations, path: str, attribute: OntologyAttribute) -> None:
    check_id(violations, f"{path}.id", attribute.id)
    if not attribute.name:
        violations.add(f"{path}.name", f"is required: 1..{ATTRIBUTE_NAME_MAX_CHARS} characters")
    else:
        check_text(violations, f"{path}.name", attribute.name, ATTRIBUTE_NAME_MAX_CHARS)
    kind = attribute.kind
    if kind is AttributeKind.UNSPECIFIED:
        violations.add(f"{path}.kind", "is required: set one of enum_type, boolean, number or text")
    elif kind is AttributeKind.ENUM:
        where = f"{path}.enum_type.options"
        options = attribute.options
        if not options:
            violations.add(where, f"an enum attribute needs 1..{MAX_OPTIONS} options, got none")
        elif len(options) > MAX_OPTIONS:
            violations.add(where, f"at most {MAX_OPTIONS} options, got {len(options)}")
        _check_names(violations, where, options, OPTION_MAX_CHARS, "option")
    elif kind is AttributeKind.NUMBER:
        low, high = attribute.minimum, attribute.maximum
        for name, value in (("min", low), ("max", high)):
            if value is not None and not math.isfinite(value):
                violations.add(f"{path}.number.{name}", "must be a finite number")
        if low is not None and high is not None and low > high:
            violations.add(f"{path}.number.max", f"must not be below min ({low}), got {high}")


def class_ids(classes: Sequence[OntologyClass]) -> dict[str, OntologyClass]:
    """Every class of a tree by id."""
    return {item.id: item for _, _, item in walk(classes, "")}


# --- category numbers --------------------------------------------------------------------

Trees = tuple[tuple[OntologyClass, ...], tuple[OntologyClass, ...]]


def category_ids(trees: Trees) -> dict[str, int]:
    """The category number of every numbered class of both trees, by class id."""
    return {
        item.id: item.category_id
        for tree in trees
        for _, _, item in walk(tree, "")
        if item.category_id
    }


def number_classes(trees: Trees, known: Mapping[str, int], last: int) -> tuple[Trees, int]:
    """Both trees (`classes`, `input_classifications`) with every class numbered, and
    the new highest number. A class in `known` keeps its number whatever it carries;
    any other gets the next number above `last`, in tree order (a class before its
    sub-classes, `classes` before `input_classifications`). Numbers are never reused:
    `last` only grows, and a removed class's number stays below it."""
    counter = last

    def numbered(item: OntologyClass) -> OntologyClass:
        nonlocal counter
        number = known.get(item.id)
        if number is None:
            counter += 1
            number = counter
        # Parent first: its number comes before those of its sub-classes.
        children = tuple(numbered(c) for c in item.sub_classes)
        return dataclasses.replace(item, category_id=number, sub_classes=children)

    classes, input_classifications = trees
    result = (
        tuple(numbered(c) for c in classes),
        tuple(numbered(c) for c in input_classifications),
    )
    return result, max(counter, last, *known.values(), 0)


def _numbered(draft: Ontology, known: Mapping[str, int]) -> Ontology:
    (classes, input_classifications), last = number_classes(
        (draft.classes, draft.input_classifications), known, draft.last_category_id
    )
    return dataclasses.replace(
        draft,
        classes=classes,
        input_classifications=input_classifications,
        last_category_id=last,
    )


# --- use cases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OntologyService:
    ontologies: OntologyRepository
    tx: TransactionManager

    async def create(
        self, principal: Principal, app_id: str, ontology_id: str, fields: OntologyFields
    ) -> Ontology:
        authorize(principal, app_id, Permission.WRITE)
        draft = Ontology(
            app_id=app_id,
            id=ontology_id or uuid.uuid4().hex,
            description=fields.description or "",
            classes=fields.classes or (),
            input_classifications=fields.input_classifications or (),
        )
        violations = Violations()
        check_id(violations, "ontology.id", ontology_id, required=False)
        check_ontology(violations, draft.description, draft.classes, draft.input_classifications)
        violations.raise_if_any()
        return await self.ontologies.insert(_numbered(draft, {}))

    async def get(self, principal: Principal, app_id: str, ontology_id: str) -> Ontology:
        authorize(principal, app_id, Permission.READ)
        return await self._require(app_id, ontology_id)

    async def list(
        self, principal: Principal, app_id: str, after_seq: int | None, limit: int
    ) -> tuple[list[Ontology], int | None]:
        """A page, oldest first, and the cursor of its last row when more rows follow."""
        authorize(principal, app_id, Permission.READ)
        rows = await self.ontologies.page(app_id, after_seq, limit + 1)
        return split_page(rows, limit)

    async def update(
        self,
        principal: Principal,
        app_id: str,
        ontology_id: str,
        fields: OntologyFields,
        expected_revision: int,
    ) -> Ontology:
        authorize(principal, app_id, Permission.WRITE)
        violations = checked_ids(("ontology.id", ontology_id))
        if fields.is_empty():
            violations.add(
                "ontology",
                "nothing to update: set the fields to change or name them in update_mask "
                f"({', '.join(UPDATABLE_FIELDS)})",
            )
        if expected_revision < 0:
            violations.add("expected_revision", f"must be 0 or positive, got {expected_revision}")
        # The given parts alone first: their problems need no database.
        check_ontology(
            violations,
            fields.description or "",
            fields.classes or (),
            fields.input_classifications or (),
        )
        violations.raise_if_any()
        async with self.tx.transaction():
            current = await self._require(app_id, ontology_id, lock=True)
            if expected_revision and expected_revision != current.revision:
                raise Aborted(
                    f"ontology {ontology_id!r} is at revision {current.revision}, not "
                    f"{expected_revision}; get it again and retry",
                    reason="REVISION_MISMATCH",
                    metadata={"current_revision": str(current.revision)},
                )
            updated = dataclasses.replace(
                current,
                **{
                    name: getattr(fields, name)
                    for name in UPDATABLE_FIELDS
                    if getattr(fields, name) is not None
                },
            )
            # The whole result: a class id may now clash with one of the unchanged part.
            violations = Violations()
            check_ontology(
                violations,
                updated.description,
                updated.classes,
                updated.input_classifications,
            )
            violations.raise_if_any()
            await self._refuse_breaking(current, updated)
            # Matched by class id: a caller's classes carry no numbers (output only).
            known = category_ids((current.classes, current.input_classifications))
            return await self.ontologies.update(_numbered(updated, known))

    async def delete(self, principal: Principal, app_id: str, ontology_id: str) -> None:
        authorize(principal, app_id, Permission.WRITE)
        async with self.tx.transaction():
            # Locked: a project created meanwhile either commits first (and is seen
            # here) or finds the ontology gone.
            await self._require(app_id, ontology_id, lock=True)
            projects = await self.ontologies.projects_using(app_id, ontology_id)
            if projects:
                shown = ", ".join(repr(p) for p in projects[:MAX_VIOLATIONS])
                more = len(projects) - MAX_VIOLATIONS
                raise FailedPrecondition(
                    f"ontology {ontology_id!r} is used by project(s) {shown}"
                    + (f" and {more} more" if more > 0 else "")
                    + ": point them at another ontology (UpdateProject) or delete them first",
                    reason="ONTOLOGY_IN_USE",
                    metadata={"projects": ",".join(projects[:MAX_VIOLATIONS])},
                )
            if not await self.ontologies.delete(app_id, ontology_id):
                raise NotFound.in_app("ontology", app_id, ontology_id)

    async def _refuse_breaking(self, current: Ontology, updated: Ontology) -> None:
        """FAILED_PRECONDITION when the update removes a class, or a shape of a class that
        stays unarchived, that annotations of the app use."""
        before = {**class_ids(current.classes), **class_ids(current.input_classifications)}
        after = {**class_ids(updated.classes), **class_ids(updated.input_classifications)}
        removed = sorted(set(before) - set(after))
        lost_shapes = [
            (class_id, shape)
            for class_id, kept in after.items()
            if class_id in before and not kept.archived
            for shape in before[class_id].shapes
            if shape not in kept.shapes
        ]
        if not removed and not lost_shapes:
            return
        count = await self.ontologies.annotations_using(current.app_id, removed, lost_shapes)
        if not count:
            return
        changes = [f"removes class {class_id!r}" for class_id in removed] + [
            f"removes {shape.value} from class {class_id!r}" for class_id, shape in lost_shapes
        ]
        raise FailedPrecondition(
            f"the update {'; '.join(changes)}, used by {count} annotation(s) of app "
            f"{current.app_id!r}: archive the class instead (archived: true), or change "
            "those annotations first",
            reason="ONTOLOGY_CLASS_IN_USE",
            metadata={"annotations": str(count)},
        )

    async def _require(self, app_id: str, ontology_id: str, *, lock: bool = False) -> Ontology:
        require_ids(("ontology_id", ontology_id))
        found = await self.ontologies.get(app_id, ontology_id, lock=lock)
        if found is None:
            raise NotFound.in_app("ontology", app_id, ontology_id)
        return found
