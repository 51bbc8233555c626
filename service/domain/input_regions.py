"""The annotations that the regions and frames sent with a new input (CreateInputs
data.regions / data.frames) become.

Granularity: ONE annotation per region and one per frame, as CreateAnnotations stores
what the client library sends for each box and as Clarifai's SDK posts detections (one
annotation per bounding box). So the same boxes give the same annotations whether they
travel inside CreateInputs or in a separate CreateAnnotations call.

Ids: the annotation of a region or frame is named by that region's or frame's id when
the caller set one (so it can address the annotation without listing it first), else
by an id derived from the input id and the item's position, which then also becomes the
region's or frame's id. Derived ids make a re-run of the same request produce the same
ids: an annotation can be refused as a duplicate, never created twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from service.domain.annotation_rules import MAX_ANNOTATIONS_PER_INPUT, check_annotation_data
from service.domain.annotations import media_context, with_generated_ids
from service.domain.errors import FieldViolation, Violations
from service.domain.models import AnnotatedMedia, Annotation

# The input-level annotation (the input's concepts) takes one place of the limit.
MAX_ITEMS_PER_INPUT = MAX_ANNOTATIONS_PER_INPUT - 1


def derived_id(input_id: str, kind: str, position: int) -> str:
    """32 hex characters, like the ids the server generates, but the same on every run."""
    return hashlib.sha256(f"{input_id}\x1f{kind}\x1f{position}".encode()).hexdigest()[:32]


def region_annotations(
    app_id: str, input_id: str, path: str, data: dict[str, Any], media: AnnotatedMedia
) -> list[Annotation]:
    """Checks `data` (regions and frames, in the JSON form of Data) by the rules of
    CreateAnnotations against the input's media, and splits it into one annotation per
    region and per frame, in request order (regions first). Raises InvalidArgument
    naming the fields under `path`, the input's path in the request."""
    violations = Violations()
    check_annotation_data(violations, f"{path}.data", data, media_context(media))
    regions: list[dict[str, Any]] = list(data.get("regions") or [])
    frames: list[dict[str, Any]] = list(data.get("frames") or [])
    if len(regions) + len(frames) > MAX_ITEMS_PER_INPUT:
        violations.add(
            f"{path}.data",
            f"has {len(regions)} regions and {len(frames)} frames; each becomes an annotation "
            f"of the input, which holds at most {MAX_ANNOTATIONS_PER_INPUT} (one is its "
            "input-level annotation): send the rest with CreateAnnotations",
        )
    violations.raise_if_any()
    annotations: list[Annotation] = []
    for kind, items in (("regions", regions), ("frames", frames)):
        for position, item in enumerate(items):
            given = item.get("id") or ""
            annotation_id = given or derived_id(input_id, kind, position)
            # Nested regions of a frame get generated ids as in CreateAnnotations.
            body = with_generated_ids({kind: [{**item, "id": annotation_id}]})
            annotations.append(Annotation(app_id, annotation_id, input_id, body))
    return annotations


def annotation_fields(path: str, annotations: Sequence[Annotation]) -> list[tuple[str, str]]:
    """(annotation id, the field of the region or frame it came from) of one input's
    annotations; `path` is the input's path in the request."""
    fields: list[tuple[str, str]] = []
    counters = {"regions": 0, "frames": 0}
    for annotation in annotations:
        kind = "regions" if "regions" in annotation.data else "frames"
        fields.append((annotation.id, f"{path}.data.{kind}[{counters[kind]}].id"))
        counters[kind] += 1
    return fields


def repeated_ids(
    path: str, annotations: Sequence[Annotation], seen: dict[str, str]
) -> tuple[FieldViolation, ...]:
    """The annotation ids of one input that an earlier input of the request, or another
    region or frame of this one, already uses; when there are none, records this
    input's ids in `seen` (id -> field)."""
    mine: dict[str, str] = {}
    repeated: list[FieldViolation] = []
    for annotation_id, field in annotation_fields(path, annotations):
        first = seen.get(annotation_id) or mine.get(annotation_id)
        if first is not None:
            repeated.append(
                FieldViolation(field, f"{annotation_id!r} is also the annotation id of {first}")
            )
        else:
            mine[annotation_id] = field
    if not repeated:
        seen.update(mine)
    return tuple(repeated)
