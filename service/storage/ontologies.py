"""PostgreSQL repository of ontologies: one row each, the class trees as jsonb."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import asyncpg

from service.domain.errors import AlreadyExists
from service.domain.models import (
    AttributeKind,
    Ontology,
    OntologyAttribute,
    OntologyClass,
    Shape,
)
from service.domain.ontologies import Trees, category_ids, number_classes, walk
from service.storage.db import Repository
from service.storage.rows import record

_COLUMNS = (
    "app_id, id, seq, description, classes, input_classifications, revision, created_at,"
    " modified_at, last_category_id"
)
INSERT = f"""
INSERT INTO ontologies (app_id, id, description, classes, input_classifications,
                        last_category_id)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (app_id, id) DO NOTHING
RETURNING {_COLUMNS}
"""
SELECT_ONE = f"SELECT {_COLUMNS} FROM ontologies WHERE app_id = $1 AND id = $2"
LOCK_ONE = SELECT_ONE + " FOR UPDATE"
PAGE = f"""
SELECT {_COLUMNS} FROM ontologies
WHERE app_id = $1 AND ($2::bigint IS NULL OR seq > $2::bigint)
ORDER BY seq LIMIT $3
"""
UPDATE = f"""
UPDATE ontologies SET description = $3, classes = $4, input_classifications = $5,
       last_category_id = $6, revision = revision + 1,
       modified_at = greatest(now(), modified_at + interval '1 microsecond')
WHERE app_id = $1 AND id = $2
RETURNING {_COLUMNS}
"""
DELETE = "DELETE FROM ontologies WHERE app_id = $1 AND id = $2"
PROJECTS_USING = "SELECT id FROM projects WHERE app_id = $1 AND ontology_id = $2 ORDER BY id"
# The ontology of the projects a dataset is attached to. The service lets a dataset be
# governed by one ontology at most; should the rows ever say otherwise, the project
# created first (lowest seq) decides, so that every reader picks the same one.
_O_COLUMNS = ", ".join(f"o.{name.strip()}" for name in _COLUMNS.split(","))
GOVERNING = f"""
SELECT {_O_COLUMNS}
FROM project_datasets pd
JOIN projects p ON p.app_id = pd.app_id AND p.id = pd.project_id
JOIN ontologies o ON o.app_id = p.app_id AND o.id = p.ontology_id
WHERE pd.app_id = $1 AND pd.dataset_id = $2
ORDER BY p.seq LIMIT 1
"""

# Annotations carrying a concept positively ($2: every concept concerned, through the
# concept index), as a removed class ($3) or drawn as a removed shape: ($4, $5) pairs of
# concept id and the jsonpath finding it on that shape.
IN_USE = """
SELECT count(*) FROM annotations a
WHERE a.app_id = $1 AND a.positive_concepts && $2::text[]
  AND (a.positive_concepts && $3::text[]
       OR EXISTS (SELECT 1 FROM unnest($4::text[], $5::text[]) AS s(concept, path)
                  WHERE jsonb_path_exists(a.data, s.path::jsonpath,
                                          jsonb_build_object('c', s.concept))))
"""
_LABELLED = "exists(@.data.concepts[*] ? (@.id == $c && @.value > 0))"
_CONCEPT = "[*] ? (@.id == $c && @.value > 0)"


def _regions(condition: str) -> tuple[str, ...]:
    """The jsonpaths of regions (of the annotation and of its frames) meeting
    `condition` and labelled with the concept `$c`."""
    test = f"({condition} && {_LABELLED})"
    return (f"$.regions[*] ? {test}", f"$.frames[*].data.regions[*] ? {test}")


# Where an annotation's data (protobuf JSON, proto field names) uses a concept as a shape.
SHAPE_PATHS: Final[dict[Shape, tuple[str, ...]]] = {
    Shape.CLASSIFICATION: (f"$.concepts{_CONCEPT}", f"$.frames[*].data.concepts{_CONCEPT}"),
    Shape.BOUNDING_BOX: _regions("exists(@.region_info.bounding_box)"),
    Shape.POLYGON: _regions("exists(@.region_info.polygon)"),
    Shape.POINT: _regions("exists(@.region_info.point)"),
    Shape.KEYPOINTS: _regions("exists(@.region_info.keypoint_locations)"),
    Shape.MASK: _regions("exists(@.region_info.mask)"),
    Shape.SPAN: _regions("exists(@.region_info.span)"),
    Shape.VIDEO_TRACK: _regions('@.track_id != ""'),
    # No region kind carries polylines: nothing can use the shape.
    Shape.POLYLINE: (),
    Shape.UNSPECIFIED: (),
}


def _attribute_json(attribute: OntologyAttribute) -> dict[str, Any]:
    found: dict[str, Any] = {
        "id": attribute.id,
        "name": attribute.name,
        "kind": attribute.kind.value,
        "required": attribute.required,
    }
    if attribute.kind is AttributeKind.ENUM:
        found["options"] = list(attribute.options)
    if attribute.minimum is not None:
        found["min"] = attribute.minimum
    if attribute.maximum is not None:
        found["max"] = attribute.maximum
    return found


def class_json(item: OntologyClass) -> dict[str, Any]:
    """A class as stored in jsonb (its sub-classes nested)."""
    return {
        "id": item.id,
        "display_name": item.display_name,
        "color": item.color,
        "shapes": [shape.value for shape in item.shapes],
        "keypoint_names": list(item.keypoint_names),
        "attributes": [_attribute_json(a) for a in item.attributes],
        "sub_classes": [class_json(c) for c in item.sub_classes],
        "archived": item.archived,
        "category_id": item.category_id,
    }


def _attribute(value: dict[str, Any]) -> OntologyAttribute:
    return OntologyAttribute(
        id=value["id"],
        name=value["name"],
        kind=AttributeKind(value["kind"]),
        required=value["required"],
        options=tuple(value.get("options", ())),
        minimum=value.get("min"),
        maximum=value.get("max"),
    )


def stored_class(value: dict[str, Any]) -> OntologyClass:
    """A class as class_json stored it."""
    return OntologyClass(
        id=value["id"],
        display_name=value["display_name"],
        color=value["color"],
        shapes=tuple(Shape(s) for s in value["shapes"]),
        keypoint_names=tuple(value["keypoint_names"]),
        attributes=tuple(_attribute(a) for a in value["attributes"]),
        sub_classes=tuple(stored_class(c) for c in value["sub_classes"]),
        archived=value["archived"],
        # Rows stored before classes had numbers have none: numbered on read.
        category_id=value.get("category_id", 0),
    )


def stored_trees(
    classes: list[dict[str, Any]], input_classifications: list[dict[str, Any]], last: int
) -> tuple[Trees, int]:
    """Both class trees as stored, and the highest category number. Classes stored
    without a number (rows older than the numbers) get one here, as the service would
    have given it, and keep it: the next update stores it."""
    trees = (
        tuple(stored_class(c) for c in classes),
        tuple(stored_class(c) for c in input_classifications),
    )
    known = category_ids(trees)
    highest = max(last, *known.values(), 0)
    if len(known) == sum(1 for tree in trees for _ in walk(tree, "")):
        return trees, highest
    return number_classes(trees, known, highest)


def _row_to_ontology(row: asyncpg.Record) -> Ontology:
    (classes, input_classifications), last = stored_trees(
        row["classes"], row["input_classifications"], row["last_category_id"]
    )
    return record(
        Ontology,
        row,
        classes=classes,
        input_classifications=input_classifications,
        last_category_id=last,
    )


def _values(ontology: Ontology) -> tuple[Any, ...]:
    """$1 to $6 of INSERT and UPDATE."""
    return (
        ontology.app_id,
        ontology.id,
        ontology.description,
        [class_json(c) for c in ontology.classes],
        [class_json(c) for c in ontology.input_classifications],
        ontology.last_category_id,
    )


class PgOntologyRepository(Repository):
    async def insert(self, ontology: Ontology) -> Ontology:
        found = await self._one(_row_to_ontology, INSERT, *_values(ontology))
        if found is None:
            raise AlreadyExists(
                f"ontology {ontology.id!r} already exists in app {ontology.app_id!r}",
                reason="ONTOLOGY_EXISTS",
                metadata={"ontology_id": ontology.id},
            )
        return found

    async def get(self, app_id: str, ontology_id: str, *, lock: bool = False) -> Ontology | None:
        return await self._one(
            _row_to_ontology, LOCK_ONE if lock else SELECT_ONE, app_id, ontology_id
        )

    async def page(
        self, app_id: str, after_seq: int | None, limit: int
    ) -> list[tuple[int, Ontology]]:
        return await self._page(_row_to_ontology, PAGE, app_id, after_seq, limit)

    async def update(self, ontology: Ontology) -> Ontology:
        found = await self._one(_row_to_ontology, UPDATE, *_values(ontology))
        if found is None:
            raise RuntimeError(f"ontology {ontology.app_id}/{ontology.id} vanished during update")
        return found

    async def delete(self, app_id: str, ontology_id: str) -> bool:
        return await self._db.affected(DELETE, app_id, ontology_id) > 0

    async def governing(self, app_id: str, dataset_id: str) -> Ontology | None:
        return await self._one(_row_to_ontology, GOVERNING, app_id, dataset_id)

    async def projects_using(self, app_id: str, ontology_id: str) -> list[str]:
        rows = await self._db.fetch(PROJECTS_USING, app_id, ontology_id)
        return [row["id"] for row in rows]

    async def annotations_using(
        self, app_id: str, classes: Sequence[str], shapes: Sequence[tuple[str, Shape]]
    ) -> int:
        pairs = [(concept, path) for concept, shape in shapes for path in SHAPE_PATHS[shape]]
        concerned = sorted({*classes, *(concept for concept, _ in pairs)})
        if not concerned:
            return 0
        count: int = await self._db.fetchval(
            IN_USE,
            app_id,
            concerned,
            list(classes),
            [concept for concept, _ in pairs],
            [path for _, path in pairs],
        )
        return count
