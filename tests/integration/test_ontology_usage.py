"""Which annotations use a class as a shape, as PostgreSQL counts them (the jsonpaths of
PgOntologyRepository.annotations_using) on annotation data as the service stores it."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest

from service.domain.models import Shape
from service.storage.db import Database
from service.storage.ontologies import PgOntologyRepository

BOX = {"bounding_box": {"top_row": 0.1, "left_col": 0.1, "bottom_row": 0.5, "right_col": 0.5}}


def _region(region_info: dict[str, Any], concept: str, value: float = 1.0, **extra: Any) -> Any:
    return {
        "region_info": region_info,
        "data": {"concepts": [{"id": concept, "value": value}]},
        **extra,
    }


# Annotation data by name; each uses "cat" in one way only.
DATA: dict[str, dict[str, Any]] = {
    "tag": {"concepts": [{"id": "cat", "value": 1.0}]},
    "negative-tag": {"concepts": [{"id": "cat", "value": 0.0}], "regions": [_region(BOX, "x")]},
    "box": {"regions": [_region(BOX, "cat")]},
    "polygon": {
        "regions": [
            _region(
                {"polygon": {"points": [{"row": 0.1, "col": 0.1}, {"row": 0.2, "col": 0.9}]}},
                "cat",
            )
        ]
    },
    "point": {"regions": [_region({"point": {"row": 0.5, "col": 0.5}}, "cat")]},
    "keypoints": {"regions": [_region({"keypoint_locations": [{"row": 0.5, "col": 0.5}]}, "cat")]},
    "mask": {"regions": [_region({"mask": {"image": {"url": "https://x/m.png"}}}, "cat")]},
    "span": {"regions": [_region({"span": {"char_start": 0, "char_end": 3}}, "cat")]},
    "frame-box": {
        "frames": [{"frame_info": {"index": 1}, "data": {"regions": [_region(BOX, "cat")]}}]
    },
    "frame-tag": {"frames": [{"data": {"concepts": [{"id": "cat", "value": 1.0}]}}]},
    "track": {"regions": [_region({"point": {"row": 0.5, "col": 0.5}}, "cat", track_id="t1")]},
    # A box labelled dog beside a cat tag: cat is not drawn as a box here.
    "box-of-another": {
        "concepts": [{"id": "cat", "value": 1.0}],
        "regions": [_region(BOX, "dog")],
    },
}


def _positive(data: dict[str, Any]) -> list[str]:
    found: set[str] = set()

    def visit(node: dict[str, Any]) -> None:
        found.update(c["id"] for c in node.get("concepts", []) if c.get("value", 0) > 0)
        for region in node.get("regions", []):
            visit(region.get("data", {}))
        for frame in node.get("frames", []):
            visit(frame.get("data", {}))

    visit(data)
    return sorted(found)


@pytest.fixture
async def app(db: Database) -> str:
    app_id = "app-" + secrets.token_hex(6)
    await db.execute(
        "INSERT INTO inputs (app_id, id, media_type, text_raw) VALUES ($1, 'in', 'text', 'x')",
        app_id,
    )
    for name, data in DATA.items():
        await db.execute(
            "INSERT INTO annotations (app_id, id, input_id, data, positive_concepts)"
            " VALUES ($1, $2, 'in', $3::text::jsonb, $4)",
            app_id,
            name,
            json.dumps(data),
            _positive(data),
        )
    return app_id


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (Shape.CLASSIFICATION, 3),  # tag, frame-tag, box-of-another
        (Shape.BOUNDING_BOX, 2),  # box, frame-box
        (Shape.POLYGON, 1),
        (Shape.POINT, 2),  # point, track
        (Shape.KEYPOINTS, 1),
        (Shape.MASK, 1),
        (Shape.SPAN, 1),
        (Shape.VIDEO_TRACK, 1),
        (Shape.POLYLINE, 0),
    ],
)
async def test_a_shape_counts_the_annotations_drawing_the_class_so(
    db: Database, app: str, shape: Shape, expected: int
) -> None:
    repository = PgOntologyRepository(db)
    assert await repository.annotations_using(app, [], [("cat", shape)]) == expected
    assert await repository.annotations_using(app, [], [("lion", shape)]) == 0


async def test_a_removed_class_counts_each_annotation_once(db: Database, app: str) -> None:
    repository = PgOntologyRepository(db)
    # Every annotation but the negative tag carries cat positively.
    assert await repository.annotations_using(app, ["cat"], []) == len(DATA) - 1
    assert await repository.annotations_using(app, ["cat", "dog"], [("cat", Shape.MASK)]) == (
        len(DATA) - 1
    )
    assert await repository.annotations_using(app, ["dog"], [("cat", Shape.MASK)]) == 2
    assert await repository.annotations_using("another-app", ["cat"], []) == 0
