"""Annotations checked against an ontology: the class of every concept is known and not
archived, drawn as a shape the class allows, with its attributes present and typed and
its keypoints named.

Where the parts of a label live in annotation content (`Data`, protobuf JSON):

* the class is a concept id (`concepts[*].id`), of the annotation itself, of a frame or
  of a region;
* the shape is where the concept sits: the annotation's or a frame's `concepts` are a
  classification (allowed for `input_classifications` and for classes offering
  SHAPE_CLASSIFICATION); a region's concepts take the shape of its geometry
  (`region_info.bounding_box` is SHAPE_BOUNDING_BOX, ...; a region without one is a
  classification), and a region with a `track_id` also needs SHAPE_VIDEO_TRACK;
* attribute values are the object `metadata.attributes` of the same `Data` as the
  concept (`{"<attribute id>": value}`), shared by the classes labelled there;
* keypoints are `region_info.keypoint_locations` in the order of the class's
  `keypoint_names`; `metadata.keypoint_names`, when given, names them one by one.

Each finding names the rule it breaks, so ValidateDataset can count them by rule."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from service.domain.annotation_fields import as_list
from service.domain.annotation_geometry import geometry_kind
from service.domain.errors import Violations
from service.domain.models import (
    AttributeKind,
    Ontology,
    OntologyAttribute,
    OntologyClass,
    OntologyRef,
    Shape,
)
from service.domain.ontologies import walk
from service.domain.ports import OntologyRepository, ProjectRepository

_REGION_SHAPES: Final[dict[str | None, Shape]] = {
    "bounding_box": Shape.BOUNDING_BOX,
    "polygon": Shape.POLYGON,
    "point": Shape.POINT,
    "keypoints": Shape.KEYPOINTS,
    "mask": Shape.MASK,
    "span": Shape.SPAN,
    None: Shape.CLASSIFICATION,
}
# Allowed values are listed up to this many, then "... (N in all)".
_SHOWN: Final = 20


class Rule(enum.Enum):
    """What a finding breaks; the values are the proto enum's names."""

    UNKNOWN_CLASS = "ONTOLOGY_RULE_UNKNOWN_CLASS"
    ARCHIVED_CLASS = "ONTOLOGY_RULE_ARCHIVED_CLASS"
    SHAPE_NOT_ALLOWED = "ONTOLOGY_RULE_SHAPE_NOT_ALLOWED"
    MISSING_ATTRIBUTE = "ONTOLOGY_RULE_MISSING_ATTRIBUTE"
    INVALID_ATTRIBUTE = "ONTOLOGY_RULE_INVALID_ATTRIBUTE"
    UNKNOWN_ATTRIBUTE = "ONTOLOGY_RULE_UNKNOWN_ATTRIBUTE"
    UNKNOWN_KEYPOINT = "ONTOLOGY_RULE_UNKNOWN_KEYPOINT"


@dataclass(frozen=True)
class Finding:
    rule: Rule
    field: str
    message: str
    # The class concerned, "" when none is known.
    class_id: str = ""


def _listed(values: Sequence[str]) -> str:
    shown = ", ".join(repr(v) for v in values[:_SHOWN])
    if len(values) > _SHOWN:
        shown += f", ... ({len(values)} in all)"
    return shown or "none"


class OntologyChecker:
    """The rules of one ontology revision, prepared once and applied to many
    annotations (a checker is cached per revision: building it walks the class tree)."""

    def __init__(self, ontology: Ontology) -> None:
        self.ontology = ontology
        self._where = f"ontology {ontology.id!r} (revision {ontology.revision})"
        self._region_classes = {item.id: item for _, _, item in walk(ontology.classes, "")}
        self._input_classes = {
            item.id: item for _, _, item in walk(ontology.input_classifications, "")
        }
        self._classes = {**self._region_classes, **self._input_classes}
        whole = [
            item
            for item in self._classes.values()
            if item.id in self._input_classes or Shape.CLASSIFICATION in item.shapes
        ]
        self._region_names = sorted(i for i, c in self._region_classes.items() if not c.archived)
        self._whole_names = sorted(c.id for c in whole if not c.archived)

    def check(
        self, path: str, data: Mapping[str, Any], *, allowed_archived: frozenset[str] = frozenset()
    ) -> list[Finding]:
        """Every finding of one annotation's `data` under `path` (e.g.
        `annotations[2].data`); classes in `allowed_archived` (those the annotation
        carried before an update) are accepted even though archived."""
        findings: list[Finding] = []
        self._labels(findings, path, data, None, allowed_archived)
        for index, frame in enumerate(as_list(data.get("frames"))):
            if isinstance(frame, dict) and isinstance(frame.get("data"), dict):
                self._labels(
                    findings, f"{path}.frames[{index}].data", frame["data"], None, allowed_archived
                )
        return findings

    def _labels(
        self,
        findings: list[Finding],
        path: str,
        data: Mapping[str, Any],
        region: Mapping[str, Any] | None,
        allowed_archived: frozenset[str],
    ) -> None:
        """The concepts of one Data (of an annotation, a frame or a region), its
        attributes, then its regions' own labels."""
        shapes = self._shapes(region) if region is not None else (Shape.CLASSIFICATION,)
        names = self._region_names if region is not None else self._whole_names
        labelled: list[OntologyClass] = []
        unknown = False
        for index, concept in enumerate(as_list(data.get("concepts"))):
            if not isinstance(concept, dict) or not isinstance(concept.get("id"), str):
                continue  # the content rules report malformed concepts
            where = f"{path}.concepts[{index}].id"
            found = self._class(findings, where, concept["id"], names, allowed_archived)
            if found is None:
                unknown = True
                continue
            labelled.append(found)
            if region is not None and found.id in self._input_classes:
                findings.append(
                    Finding(
                        Rule.SHAPE_NOT_ALLOWED,
                        where,
                        f"{found.id!r} is an input-level classification of {self._where}: it "
                        "labels a whole input (the annotation's or a frame's concepts), not a "
                        f"region; region classes: {_listed(self._region_names)}",
                        found.id,
                    )
                )
                continue
            for shape in shapes:
                if shape not in found.shapes:
                    findings.append(self._shape_refused(where, found, shape, region is not None))
            if region is not None and Shape.KEYPOINTS in shapes:
                self._keypoints(findings, path, data, region, found)
        if not unknown:
            # Attributes of an unknown class cannot be judged: the class is the finding.
            self._attributes(findings, path, data, labelled)
        if region is None:
            for index, item in enumerate(as_list(data.get("regions"))):
                if isinstance(item, dict):
                    inner = item.get("data")
                    self._labels(
                        findings,
                        f"{path}.regions[{index}].data",
                        inner if isinstance(inner, dict) else {},
                        item,
                        allowed_archived,
                    )

    @staticmethod
    def _shapes(region: Mapping[str, Any]) -> tuple[Shape, ...]:
        shape = _REGION_SHAPES[geometry_kind(region.get("region_info"))]
        if isinstance(region.get("track_id"), str) and region["track_id"]:
            return (shape, Shape.VIDEO_TRACK)
        return (shape,)

    def _class(
        self,
        findings: list[Finding],
        where: str,
        class_id: str,
        names: Sequence[str],
        allowed_archived: frozenset[str],
    ) -> OntologyClass | None:
        found = self._classes.get(class_id)
        if found is None:
            findings.append(
                Finding(
                    Rule.UNKNOWN_CLASS,
                    where,
                    f"{class_id!r} is not a class of {self._where}; allowed: {_listed(names)}",
                    class_id,
                )
            )
            return None
        if found.archived and class_id not in allowed_archived:
            findings.append(
                Finding(
                    Rule.ARCHIVED_CLASS,
                    where,
                    f"class {class_id!r} of {self._where} is archived: it is kept for existing "
                    f"labels but not offered for new ones; allowed: {_listed(names)}",
                    class_id,
                )
            )
        return found

    def _shape_refused(
        self, where: str, item: OntologyClass, shape: Shape, region: bool
    ) -> Finding:
        drawn = "in a region" if region else "on a whole input or frame"
        return Finding(
            Rule.SHAPE_NOT_ALLOWED,
            where,
            f"class {item.id!r} may not be drawn as {shape.value} ({drawn}); {self._where} "
            f"allows: {', '.join(s.value for s in item.shapes)}",
            item.id,
        )

    def _keypoints(
        self,
        findings: list[Finding],
        path: str,
        data: Mapping[str, Any],
        region: Mapping[str, Any],
        item: OntologyClass,
    ) -> None:
        info = region.get("region_info")
        locations = as_list(info.get("keypoint_locations")) if isinstance(info, dict) else []
        known = list(item.keypoint_names)
        region_path = path.removesuffix(".data")
        if len(locations) > len(known):
            findings.append(
                Finding(
                    Rule.UNKNOWN_KEYPOINT,
                    f"{region_path}.region_info.keypoint_locations",
                    f"{len(locations)} keypoints, but class {item.id!r} names {len(known)} "
                    f"({_listed(known)}), in that order",
                    item.id,
                )
            )
        metadata = data.get("metadata")
        given = metadata.get("keypoint_names") if isinstance(metadata, dict) else None
        if given is None:
            return
        where = f"{path}.metadata.keypoint_names"
        if not isinstance(given, list) or not all(isinstance(n, str) for n in given):
            findings.append(
                Finding(Rule.UNKNOWN_KEYPOINT, where, "must be a list of keypoint names", item.id)
            )
            return
        for index, name in enumerate(given):
            if name not in known:
                findings.append(
                    Finding(
                        Rule.UNKNOWN_KEYPOINT,
                        f"{where}[{index}]",
                        f"{name!r} is not a keypoint of class {item.id!r}; allowed: "
                        f"{_listed(known)}",
                        item.id,
                    )
                )
        if len(given) != len(locations):
            findings.append(
                Finding(
                    Rule.UNKNOWN_KEYPOINT,
                    where,
                    f"names {len(given)} keypoints but the region has {len(locations)} "
                    "keypoint_locations: one name per location, in order",
                    item.id,
                )
            )

    def _attributes(
        self,
        findings: list[Finding],
        path: str,
        data: Mapping[str, Any],
        labelled: list[OntologyClass],
    ) -> None:
        metadata = data.get("metadata")
        values = metadata.get("attributes") if isinstance(metadata, dict) else None
        where = f"{path}.metadata.attributes"
        if values is not None and not isinstance(values, dict):
            findings.append(
                Finding(
                    Rule.INVALID_ATTRIBUTE,
                    where,
                    'must be an object of attribute values by attribute id ({"<id>": value})',
                )
            )
            return
        given: Mapping[str, Any] = values or {}
        declared: dict[str, tuple[OntologyClass, OntologyAttribute]] = {}
        for item in labelled:
            for attribute in item.attributes:
                declared.setdefault(attribute.id, (item, attribute))
                if attribute.required and attribute.id not in given:
                    findings.append(
                        Finding(
                            Rule.MISSING_ATTRIBUTE,
                            f"{where}.{attribute.id}",
                            f"is required by class {item.id!r}: {_expected(attribute)}",
                            item.id,
                        )
                    )
        for attribute_id, value in given.items():
            known = declared.get(attribute_id)
            if known is None:
                allowed = sorted(declared)
                findings.append(
                    Finding(
                        Rule.UNKNOWN_ATTRIBUTE,
                        f"{where}.{attribute_id}",
                        f"is not an attribute of "
                        f"{_listed([c.id for c in labelled]) if labelled else 'any labelled class'}"
                        f"; allowed: {_listed(allowed)}",
                        labelled[0].id if labelled else "",
                    )
                )
                continue
            item, attribute = known
            problem = _attribute_problem(attribute, value)
            if problem:
                findings.append(
                    Finding(
                        Rule.INVALID_ATTRIBUTE,
                        f"{where}.{attribute_id}",
                        f"{problem} (attribute {attribute.name!r} of class {item.id!r}: "
                        f"{_expected(attribute)})",
                        item.id,
                    )
                )


def _expected(attribute: OntologyAttribute) -> str:
    kind = attribute.kind
    if kind is AttributeKind.ENUM:
        return f"one of {_listed(attribute.options)}"
    if kind is AttributeKind.BOOLEAN:
        return "true or false"
    if kind is AttributeKind.NUMBER:
        low = "-inf" if attribute.minimum is None else f"{attribute.minimum:g}"
        high = "inf" if attribute.maximum is None else f"{attribute.maximum:g}"
        return f"a number in [{low}, {high}]"
    return "a string"


def _attribute_problem(attribute: OntologyAttribute, value: Any) -> str:
    """Why `value` does not fit the attribute, "" when it does."""
    kind = attribute.kind
    if kind is AttributeKind.BOOLEAN:
        return "" if isinstance(value, bool) else f"got {value!r}"
    if kind is AttributeKind.NUMBER:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"got {value!r}"
        if not math.isfinite(value):
            return f"got {value!r}: must be finite"
        low, high = attribute.minimum, attribute.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            return f"{value:g} is out of range"
        return ""
    if not isinstance(value, str):
        return f"got {value!r}"
    if kind is AttributeKind.ENUM and value not in attribute.options:
        return f"{value!r} is not an option"
    return ""


def class_ids_in(data: Mapping[str, Any]) -> frozenset[str]:
    """Every concept id an annotation's data carries, at any depth."""
    return frozenset(_concept_ids(data))


def _concept_ids(data: Any) -> Iterator[str]:
    if not isinstance(data, dict):
        return
    for concept in as_list(data.get("concepts")):
        if isinstance(concept, dict) and isinstance(concept.get("id"), str):
            yield concept["id"]
    for region in as_list(data.get("regions")):
        if isinstance(region, dict):
            yield from _concept_ids(region.get("data"))
    for frame in as_list(data.get("frames")):
        if isinstance(frame, dict):
            yield from _concept_ids(frame.get("data"))


def add_findings(violations: Violations, findings: Sequence[Finding]) -> None:
    for finding in findings:
        violations.add(finding.field, finding.message)


# Checkers kept per process; an ontology revision never changes, so they never go stale.
_CACHED_CHECKERS: Final = 256


@dataclass(frozen=True)
class OntologyGate:
    """Which ontologies govern inputs and datasets (those of the projects their datasets
    are attached to), as prepared checkers."""

    projects: ProjectRepository
    ontologies: OntologyRepository
    _cache: dict[tuple[str, str, int], OntologyChecker] = field(default_factory=dict)

    async def for_inputs(
        self, app_id: str, input_ids: Sequence[str]
    ) -> dict[str, list[OntologyChecker]]:
        """The checkers of each input that is in a dataset attached to a project."""
        refs = await self.projects.ontologies_of_inputs(app_id, input_ids)
        return await self._resolve(app_id, refs)

    async def for_datasets(
        self, app_id: str, dataset_ids: Sequence[str]
    ) -> dict[str, list[OntologyChecker]]:
        """The checkers of each dataset attached to a project."""
        refs = await self.projects.ontologies_of_datasets(app_id, dataset_ids)
        return await self._resolve(app_id, refs)

    async def _resolve(
        self, app_id: str, refs: Sequence[tuple[str, OntologyRef]]
    ) -> dict[str, list[OntologyChecker]]:
        checkers: dict[OntologyRef, OntologyChecker] = {}
        for ref in {ref for _, ref in refs}:
            checker = await self._checker(app_id, ref)
            if checker is not None:
                checkers[ref] = checker
        found: dict[str, list[OntologyChecker]] = {}
        for key, ref in refs:
            if ref in checkers:
                found.setdefault(key, []).append(checkers[ref])
        return found

    async def _checker(self, app_id: str, ref: OntologyRef) -> OntologyChecker | None:
        key = (app_id, ref.id, ref.revision)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        ontology = await self.ontologies.get(app_id, ref.id)
        if ontology is None:
            # Deleted since the reference was read, so no project uses it any more.
            return None
        checker = OntologyChecker(ontology)
        if len(self._cache) >= _CACHED_CHECKERS:
            self._cache.pop(next(iter(self._cache)))
        self._cache[(app_id, ontology.id, ontology.revision)] = checker
        return checker


def check_all(
    checkers: Sequence[OntologyChecker],
    path: str,
    data: Mapping[str, Any],
    *,
    allowed_archived: frozenset[str] = frozenset(),
) -> list[Finding]:
    """The findings of `data` under every checker, each once."""
    found: dict[tuple[str, str], Finding] = {}
    for checker in checkers:
        for finding in checker.check(path, data, allowed_archived=allowed_archived):
            found.setdefault((finding.field, finding.message), finding)
    return list(found.values())


@dataclass(frozen=True)
class LocatedFinding:
    """A finding of ValidateDataset, with the label it is on."""

    annotation_id: str
    input_id: str
    finding: Finding


@dataclass(frozen=True)
class RuleReport:
    rule: Rule
    annotations: int
    findings: int
    page: tuple[LocatedFinding, ...]


@dataclass(frozen=True)
class DatasetValidation:
    ontology: OntologyRef
    annotations_checked: int
    annotations_invalid: int
    reports: tuple[RuleReport, ...]
    # With a rule asked for: the (annotation seq, finding number) the next page follows.
    next_cursor: tuple[int, int] | None


class Tally:
    """Counts findings by rule over a scan and keeps one page of each."""

    def __init__(self, rule: Rule | None, after: tuple[int, int] | None, limit: int) -> None:
        self.rule, self.after, self.limit = rule, after, limit
        self.checked = self.invalid = 0
        self.annotations: dict[Rule, int] = {}
        self.findings: dict[Rule, int] = {}
        self.pages: dict[Rule, list[LocatedFinding]] = {}
        self.more = False
        self.last: tuple[int, int] | None = None

    def add(self, seq: int, annotation_id: str, input_id: str, found: list[Finding]) -> None:
        self.checked += 1
        if not found:
            return
        self.invalid += 1
        for rule in {f.rule for f in found}:
            self.annotations[rule] = self.annotations.get(rule, 0) + 1
        for number, finding in enumerate(found):
            rule = finding.rule
            self.findings[rule] = self.findings.get(rule, 0) + 1
            if self.rule is not None and rule is not self.rule:
                continue
            if self.after is not None and (seq, number) <= self.after:
                continue
            page = self.pages.setdefault(rule, [])
            if len(page) < self.limit:
                page.append(LocatedFinding(annotation_id, input_id, finding))
                self.last = (seq, number)
            else:
                self.more = True

    def result(self, ontology: OntologyRef) -> DatasetValidation:
        reports = tuple(
            RuleReport(
                rule, self.annotations[rule], self.findings[rule], tuple(self.pages.get(rule, []))
            )
            for rule in Rule
            if rule in self.findings and (self.rule is None or rule is self.rule)
        )
        return DatasetValidation(
            ontology,
            self.checked,
            self.invalid,
            reports,
            self.last if self.rule is not None and self.more else None,
        )
