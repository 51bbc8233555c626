"""Reading COCO import archives (export-formats.md §5): each
`annotations/instances_<split>.json` with the images it names, as drafts whose boxes,
polygons and RLE masks become region annotations.

A document is checked whole before anything of it is imported: every problem found is
reported at once (the first hundred), naming the image or annotation.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
from collections.abc import Iterator
from typing import Any, cast

from service.domain.errors import InvalidArgument, Violations
from service.domain.imported import ARCHIVE_FIELD, ImportedAnnotation, ImportedInput
from service.domain.input_drafts import InputDraft
from service.domain.models import MediaType
from service.domain.validation import ID_PATTERN
from service.formats.coco.rle import rle_png
from service.formats.safezip import SafeZip, entry_path, invalid_archive

# COCO images per batch handed to the importer.
COCO_BATCH_IMAGES = 100
# Pixel coordinates written from normalised float32 values may overshoot an edge by a
# rounding error.
_EDGE_TOLERANCE_PX = 1e-3
_INSTANCES = re.compile(r"^annotations/instances_([^/]+)\.json$")


def coco_batches(archive: SafeZip) -> Iterator[list[ImportedInput]]:
    documents = [info for info in archive.entries if _INSTANCES.match(info.filename)]
    if not documents:
        raise invalid_archive(
            ARCHIVE_FIELD,
            'has no "annotations/instances_<split>.json"; a COCO archive has one per split '
            "and the images under images/",
        )
    for info in documents:
        where = entry_path(info.orig_filename)
        try:
            document = json.loads(archive.read(info))
        except (ValueError, RecursionError) as exc:
            raise invalid_archive(where, f"is not valid JSON ({exc})") from exc
        split = _INSTANCES.match(info.filename)
        assert split is not None
        yield from _CocoDocument(archive, where, split.group(1), document).batches()


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _key(value: Any) -> int | str | None:
    """A COCO id: an integer or a string (some tools write strings)."""
    if isinstance(value, int | str) and not isinstance(value, bool):
        return value
    return None


@dataclasses.dataclass(frozen=True)
class _Image:
    index: int
    id: int | str
    file_name: str
    width: int
    height: int
    url: str
    input_id: str
    concepts: list[dict[str, Any]]


class _CocoDocument:
    """One annotations/instances_<split>.json with the images it names."""

    def __init__(self, archive: SafeZip, where: str, split: str, document: Any) -> None:
        self._archive = archive
        self._where = where
        self._split = split
        self._problems = Violations()
        if not isinstance(document, dict):
            raise invalid_archive(
                where, "must be a JSON object with images, annotations and categories"
            )
        self._categories = self._read_categories(self._list(document, "categories"))
        self._images = self._read_images(self._list(document, "images"))
        self._regions = self._read_annotations(self._list(document, "annotations"))
        if self._problems.items:
            raise InvalidArgument(
                f"{where} has {len(self._problems.items)} problem(s); nothing was imported: "
                + "; ".join(f"{v.field}: {v.description}" for v in self._problems.items[:10]),
                reason="INVALID_ARCHIVE",
                violations=self._problems.items[:100],
            )

    def batches(self) -> Iterator[list[ImportedInput]]:
        images = list(self._images.values())
        for start in range(0, len(images), COCO_BATCH_IMAGES):
            yield [self._input(image) for image in images[start : start + COCO_BATCH_IMAGES]]

    def _list(self, document: dict[str, Any], key: str) -> list[Any]:
        value = document.get(key, [])
        if not isinstance(value, list):
            self._problems.add(f"{self._where}.{key}", "must be a list")
            return []
        return value

    def _read_categories(self, items: list[Any]) -> dict[int | str, str]:
        found: dict[int | str, str] = {}
        for index, item in enumerate(items):
            field = f"{self._where}.categories[{index}]"
            key = _key(item.get("id")) if isinstance(item, dict) else None
            name = item.get("name") if isinstance(item, dict) else None
            if key is None or not isinstance(name, str) or not name:
                self._problems.add(field, "must be an object with an id and a non-empty name")
            elif key in found:
                self._problems.add(f"{field}.id", f"category id {key!r} repeats")
            else:
                found[key] = name
        return found

    def _read_images(self, items: list[Any]) -> dict[int | str, _Image]:
        found: dict[int | str, _Image] = {}
        for index, item in enumerate(items):
            field = f"{self._where}.images[{index}]"
            if not isinstance(item, dict):
                self._problems.add(field, "must be an object")
                continue
            key = _key(item.get("id"))
            file_name = item.get("file_name")
            width, height = _positive_int(item.get("width")), _positive_int(item.get("height"))
            if key is None:
                self._problems.add(f"{field}.id", "must be an integer or a string")
            elif key in found:
                self._problems.add(f"{field}.id", f"image id {key!r} repeats")
            if not isinstance(file_name, str) or not file_name:
                self._problems.add(f"{field}.file_name", "must be a non-empty string")
            if width is None or height is None:
                self._problems.add(field, "must have a positive integer width and height")
            if key is None or key in found or not isinstance(file_name, str) or not file_name:
                continue
            if width is None or height is None:
                continue
            # Any scheme: a URL that cannot be referenced is reported as a CreateInputs
            # input's would be.
            url = next(
                (v for v in (item.get("coco_url"), item.get("flickr_url")) if isinstance(v, str)),
                "",
            )
            found[key] = _Image(
                index,
                key,
                file_name,
                width,
                height,
                url,
                _input_id(item.get("datasetd_input_id"), file_name),
                self._input_concepts(f"{field}.datasetd_concepts", item.get("datasetd_concepts")),
            )
        return found

    def _input_concepts(self, field: str, value: Any) -> list[dict[str, Any]]:
        """Input-level concepts, where a datasetd export keeps them."""
        if value is None:
            return []
        concepts = []
        for index, item in enumerate(value if isinstance(value, list) else [None]):
            concept_id = item.get("concept_id") if isinstance(item, dict) else None
            number = _number(item.get("value", 1.0)) if isinstance(item, dict) else None
            if not isinstance(concept_id, str) or number is None:
                self._problems.add(
                    f"{field}[{index}]", "must be an object with a concept_id and a numeric value"
                )
                continue
            concepts.append({"id": concept_id, "value": number})
        return concepts

    def _read_annotations(self, items: list[Any]) -> dict[int | str, list[ImportedAnnotation]]:
        found: dict[int | str, list[ImportedAnnotation]] = {}
        for index, item in enumerate(items):
            field = f"{self._where}.annotations[{index}]"
            if not isinstance(item, dict):
                self._problems.add(field, "must be an object")
                continue
            annotation_id = item.get("id")
            named = f"annotation {annotation_id!r}" if _key(annotation_id) is not None else field
            image_key, category_key = _key(item.get("image_id")), _key(item.get("category_id"))
            image = None if image_key is None else self._images.get(image_key)
            category = None if category_key is None else self._categories.get(category_key)
            if image is None:
                self._problems.add(
                    f"{field}.image_id", f"{named}: no image with id {item.get('image_id')!r}"
                )
                continue
            if category is None:
                self._problems.add(
                    f"{field}.category_id",
                    f"{named}: no category with id {item.get('category_id')!r}",
                )
                continue
            regions = self._regions_of(field, named, item, image)
            if not regions:
                continue
            concept = {"id": category, "name": category, "value": 1.0}
            # The region's own id where a datasetd export kept it, else the annotation's.
            named_region = item.get("datasetd_region_id")
            base_id = named_region if isinstance(named_region, str) else annotation_id
            for number, region in enumerate(regions):
                region["data"] = {"concepts": [concept]}
                if _key(base_id) is not None:
                    suffix = "" if len(regions) == 1 else f"-{number}"
                    region_id = f"{base_id}{suffix}"
                    if ID_PATTERN.match(region_id):
                        region["id"] = region_id
            found.setdefault(image.id, []).append(ImportedAnnotation(field, {"regions": regions}))
        return found

    def _regions_of(
        self, field: str, named: str, item: dict[str, Any], image: _Image
    ) -> list[dict[str, Any]]:
        """The annotation's regions, normalised: its polygons or RLE mask when it has a
        segmentation (the box is derived from it), else its box."""
        segmentation = item.get("segmentation")
        if isinstance(segmentation, dict):
            mask = self._mask(f"{field}.segmentation", named, segmentation, image)
            return [] if mask is None else [{"region_info": {"mask": mask}}]
        if isinstance(segmentation, list) and segmentation:
            polygons = []
            for ring_index, ring in enumerate(segmentation):
                polygon = self._polygon(f"{field}.segmentation[{ring_index}]", named, ring, image)
                if polygon is None:
                    return []
                polygons.append({"region_info": {"polygon": polygon}})
            return polygons
        if segmentation not in (None, []):
            self._problems.add(
                f"{field}.segmentation", f"{named}: must be a list of polygons or an RLE object"
            )
            return []
        box = self._box(f"{field}.bbox", named, item.get("bbox"), image)
        return [] if box is None else [{"region_info": {"bounding_box": box}}]

    def _box(self, field: str, named: str, value: Any, image: _Image) -> dict[str, float] | None:
        numbers = [_number(v) for v in value] if isinstance(value, list) else []
        if len(numbers) != 4 or any(n is None for n in numbers):
            self._problems.add(
                field, f"{named}: must be [x, y, width, height] in pixels, got {value!r}"[:300]
            )
            return None
        x, y, width, height = cast(list[float], numbers)
        tolerance = _EDGE_TOLERANCE_PX
        if width <= 0 or height <= 0:
            self._problems.add(field, f"{named}: the box {value!r} has no area")
            return None
        if (
            x < -tolerance
            or y < -tolerance
            or x + width > image.width + tolerance
            or y + height > image.height + tolerance
        ):
            self._problems.add(
                field,
                f"{named}: the box {value!r} lies outside its {image.width}x{image.height} "
                f"image {image.id!r}",
            )
            return None
        return {
            "top_row": _unit(y / image.height),
            "left_col": _unit(x / image.width),
            "bottom_row": _unit((y + height) / image.height),
            "right_col": _unit((x + width) / image.width),
        }

    def _polygon(self, field: str, named: str, ring: Any, image: _Image) -> dict[str, Any] | None:
        numbers = [_number(v) for v in ring] if isinstance(ring, list) else []
        if len(numbers) < 6 or len(numbers) % 2 or any(n is None for n in numbers):
            self._problems.add(
                field, f"{named}: a polygon is [x1, y1, x2, y2, ...] with at least 3 points"
            )
            return None
        coordinates = cast(list[float], numbers)
        points = []
        for x, y in zip(coordinates[::2], coordinates[1::2], strict=True):
            tolerance = _EDGE_TOLERANCE_PX
            if not (
                -tolerance <= x <= image.width + tolerance
                and -tolerance <= y <= image.height + tolerance
            ):
                self._problems.add(
                    field,
                    f"{named}: the point ({x:g}, {y:g}) lies outside its "
                    f"{image.width}x{image.height} image {image.id!r}",
                )
                return None
            points.append({"row": _unit(y / image.height), "col": _unit(x / image.width)})
        return {"points": points}

    def _mask(
        self, field: str, named: str, rle: dict[str, Any], image: _Image
    ) -> dict[str, Any] | None:
        size = rle.get("size")
        if size != [image.height, image.width]:
            self._problems.add(
                f"{field}.size",
                f"{named}: must be [{image.height}, {image.width}], the image's height and "
                f"width, got {size!r}"[:300],
            )
            return None
        try:
            png = rle_png(rle.get("counts"), image.height, image.width)
        except ValueError as exc:
            self._problems.add(f"{field}.counts", f"{named}: {exc}")
            return None
        return {"image": {"base64": base64.b64encode(png).decode()}}

    def _input(self, image: _Image) -> ImportedInput:
        path = f"{self._where}.images[{image.index}]"
        data = self._image_bytes(image)
        if data is None and not image.url:
            raise invalid_archive(
                f"{path}.file_name",
                f"image {image.id!r}: {image.file_name!r} is neither under "
                f"images/{self._split}/ nor under images/ in the archive, and the image has "
                "no coco_url",
            )
        draft = InputDraft(
            id=image.input_id,
            media=(MediaType.IMAGE,),
            data=data or b"",
            url="" if data is not None else image.url,
            concepts=image.concepts,
            title=image.file_name.rsplit("/", 1)[-1],
        )
        return ImportedInput(
            path,
            draft,
            tuple(self._regions.get(image.id, ())),
            declared_size=(image.width, image.height) if data is not None else None,
        )

    def _image_bytes(self, image: _Image) -> bytes | None:
        for name in (
            f"images/{self._split}/{image.file_name}",
            f"images/{image.file_name}",
            image.file_name,
        ):
            info = self._archive.find(name)
            if info is not None:
                return bytes(self._archive.read(info))
        return None


def _input_id(given: Any, file_name: str) -> str:
    """The id a datasetd export recorded, else the file's stem (as folder uploads name
    inputs); empty (generated) when neither is a valid id."""
    base_name = file_name.rsplit("/", 1)[-1]
    stem = base_name.rsplit(".", 1)[0] if "." in base_name else base_name
    for candidate in (given, stem):
        if isinstance(candidate, str) and ID_PATTERN.match(candidate):
            return candidate
    return ""


def _unit(value: float) -> float:
    """Clamped to 0..1: within the edge tolerance, a coordinate may overshoot."""
    return min(1.0, max(0.0, value))
