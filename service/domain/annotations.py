"""Annotation use cases: batch create, get, list, patch, delete.

Annotation content is the protobuf JSON form of `Data` (see annotation_fields), so the
same rules check it on create and after every patch.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.domain.annotation_fields import MediaContext
from service.domain.annotation_rules import (
    MAX_ANNOTATIONS_PER_INPUT,
    check_annotation_data,
    is_empty,
)
from service.domain.auth import Permission, authorize
from service.domain.errors import (
    AlreadyExists,
    DomainError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Violations,
    the_one,
)
from service.domain.input_drafts import MAX_IDS_PER_CALL, Outcome
from service.domain.models import AnnotatedMedia, Annotation, AnnotationQuery, MediaType, Principal
from service.domain.ontology_check import (
    OntologyChecker,
    OntologyGate,
    add_findings,
    check_all,
    class_ids_in,
)
from service.domain.paging import split_page
from service.domain.patch import PatchAction, apply_json
from service.domain.ports import AnnotationRepository, MembershipRepository, TransactionManager
from service.domain.validation import (
    ID_PATTERN,
    check_batch_size,
    check_id,
    check_metadata,
    require_ids,
)

MAX_BATCH_ANNOTATIONS = 128
# How many problems an atomic failure spells out in its message; the details list them all.
_SUMMARY_VIOLATIONS = 10


@dataclass(frozen=True)
class AnnotationDraft:
    """An annotation as a caller gave it; `annotation_info` is None when not given."""

    id: str = ""
    input_id: str = ""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    annotation_info: dict[str, Any] | None = None


@dataclass(frozen=True)
class AnnotationOutcome:
    index: int
    annotation_id: str
    outcome: Outcome
    violations: tuple[FieldViolation, ...] = ()
    annotation: Annotation | None = None


@dataclass(frozen=True)
class AnnotationPatch:
    """The fields of one annotation an update applies; None means not given."""

    id: str
    data: dict[str, Any] | None = None
    annotation_info: dict[str, Any] | None = None
    # When given, the input the caller believes the annotation is on (clients written for
    # clarifai.api send it with every patch); it must be the one it is on.
    input_id: str = ""


def media_context(media: AnnotatedMedia) -> MediaContext:
    """What the rules check against. Probes report 0 for what a header did not say, and
    an unknown length must not reject every span or frame, so 0 means unknown."""
    info = media.media_info

    def known(key: str) -> float | None:
        value = info.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)
        return None

    kind = media.media_type
    chars = info.get("char_count") if kind is MediaType.TEXT else None
    frames = known("frame_count") if kind is MediaType.VIDEO else None
    seconds = known("duration_seconds") if kind in (MediaType.VIDEO, MediaType.AUDIO) else None
    return MediaContext(
        media_type=kind.value,
        # An empty text has a length of 0, which is known, unlike a frame count of 0.
        text_length=chars if isinstance(chars, int) else None,
        frame_count=int(frames) if frames is not None else None,
        # Rounded up: the last frame of a 2.0004 s video is at 2000.4 ms, not past 2000 ms.
        duration_ms=math.ceil(seconds * 1000) if seconds is not None else None,
    )


def with_generated_ids(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of `data` in which every region and frame has an id, so that later
    updates can address it (MERGE merges and REMOVE deletes them by id)."""

    def identified(items: Any) -> Any:
        if not isinstance(items, list):
            return items
        return [
            {**item, "id": uuid.uuid4().hex}
            if isinstance(item, dict) and not item.get("id")
            else item
            for item in items
        ]

    def with_region_ids(node: dict[str, Any]) -> dict[str, Any]:
        return {**node, "regions": identified(node["regions"])} if "regions" in node else node

    result = with_region_ids(dict(data))
    if isinstance(result.get("frames"), list):
        result["frames"] = [
            {**frame, "data": with_region_ids(frame["data"])}
            if isinstance(frame, dict) and isinstance(frame.get("data"), dict)
            else frame
            for frame in identified(result["frames"])
        ]
    return result


def _check_input_level(violations: Violations, path: str, data: dict[str, Any]) -> None:
    # The input's concepts are this row's concepts, and UpdateInputs rewrites the row's
    # data as {"concepts": ...}: anything else stored here would be lost silently.
    for key in data:
        if key != "concepts":
            violations.add(
                f"{path}.data.{key}",
                "the input-level annotation carries only the input's concepts; "
                f"put {key} in a separate annotation of the input",
            )


def _failed(
    index: int, annotation_id: str, outcome: Outcome, field: str, description: str
) -> AnnotationOutcome:
    return AnnotationOutcome(
        index,
        annotation_id,
        outcome,
        (FieldViolation(f"annotations[{index}].{field}", description),),
    )


def _already_exists(index: int, annotation_id: str) -> AnnotationOutcome:
    return _failed(
        index, annotation_id, Outcome.DUPLICATE_ID, "id", f"{annotation_id!r} already exists"
    )


def _admit(
    candidates: list[tuple[int, Annotation]],
    counts: dict[str, int],
    taken: set[str],
    outcomes: dict[int, AnnotationOutcome],
) -> list[tuple[int, Annotation]]:
    """The candidates that fit their locked input (stored `counts`, `taken` ids); an
    outcome for each of the others."""
    added = dict.fromkeys(counts, 0)
    accepted: list[tuple[int, Annotation]] = []
    for index, annotation in candidates:
        input_id = annotation.input_id
        if annotation.id in taken:
            outcomes[index] = _already_exists(index, annotation.id)
        elif input_id not in counts:
            outcomes[index] = _failed(
                index,
                annotation.id,
                Outcome.INVALID,
                "input_id",
                f"input {input_id!r} was deleted meanwhile",
            )
        elif counts[input_id] + added[input_id] >= MAX_ANNOTATIONS_PER_INPUT:
            earlier = ""
            if added[input_id]:
                earlier = f" and {added[input_id]} earlier in this request"
            outcomes[index] = _failed(
                index,
                annotation.id,
                Outcome.INVALID,
                "input_id",
                f"input {input_id!r} would have more than {MAX_ANNOTATIONS_PER_INPUT} "
                f"annotations ({counts[input_id]} stored{earlier})",
            )
        else:
            added[input_id] += 1
            accepted.append((index, annotation))
    return accepted


def _batch_failure(total: int, outcomes: dict[int, AnnotationOutcome]) -> DomainError:
    violations = [v for i in sorted(outcomes) for v in outcomes[i].violations]
    duplicates_only = all(o.outcome is Outcome.DUPLICATE_ID for o in outcomes.values())
    error = AlreadyExists if duplicates_only else InvalidArgument
    return error(
        f"{len(outcomes)} of {total} annotations failed; nothing was stored (atomic batch): "
        + "; ".join(f"{v.field}: {v.description}" for v in violations[:_SUMMARY_VIOLATIONS]),
        reason="ANNOTATION_EXISTS" if duplicates_only else "INVALID_ANNOTATION",
        violations=violations,
    )


def _not_found(missing: Sequence[str], paths: dict[str, str]) -> NotFound:
    return NotFound(
        f"annotations not found: {', '.join(missing[:20])}; nothing was changed",
        reason="ANNOTATION_NOT_FOUND",
        violations=[FieldViolation(paths[m], f"no annotation {m!r}") for m in missing],
    )


def _check_ids(violations: Violations, field: str, ids: Sequence[str]) -> None:
    if not ids or len(ids) > MAX_IDS_PER_CALL:
        violations.add(field, f"must contain 1..{MAX_IDS_PER_CALL} ids, got {len(ids)}")
    for index, value in enumerate(ids[:MAX_IDS_PER_CALL]):
        check_id(violations, f"{field}[{index}]", value)


def _check_patches(
    action: PatchAction, patches: Sequence[AnnotationPatch], *, delete_if_empty: bool
) -> dict[str, str]:
    """Raises unless the request is well-formed; returns the field path of each id."""
    violations = Violations()
    if not patches or len(patches) > MAX_BATCH_ANNOTATIONS:
        violations.add(
            "annotations",
            f"must contain 1..{MAX_BATCH_ANNOTATIONS} annotations, got {len(patches)}",
        )
    if delete_if_empty and action is not PatchAction.REMOVE:
        violations.add("delete_if_empty", "only applies to PATCH_ACTION_REMOVE")
    paths: dict[str, str] = {}
    for index, patch in enumerate(patches):
        path = f"annotations[{index}]"
        check_id(violations, f"{path}.id", patch.id)
        if patch.id in paths:
            violations.add(f"{path}.id", f"{patch.id!r} repeats within the request")
        paths.setdefault(patch.id, f"{path}.id")
        if patch.data is None and patch.annotation_info is None:
            violations.add(path, "nothing to update: set data or annotation_info")
    violations.raise_if_any()
    return paths


def _check_inputs_unchanged(
    current: dict[str, Annotation], patches: Sequence[AnnotationPatch]
) -> None:
    violations = Violations()
    for index, patch in enumerate(patches):
        on = current[patch.id].input_id
        if patch.input_id and patch.input_id != on:
            violations.add(
                f"annotations[{index}].input_id",
                f"annotation {patch.id!r} is on input {on!r}, not {patch.input_id!r}; an "
                "annotation stays on its input: leave input_id empty or set it to "
                f"{on!r}, or delete the annotation and create it on the other input",
            )
    violations.raise_if_any()


# What UpdateAnnotations may change.
PATCHABLE_FIELDS = ("data", "annotation_info")


@dataclass(frozen=True)
class AnnotationService:
    annotations: AnnotationRepository
    members: MembershipRepository
    tx: TransactionManager
    # The ontologies of the projects an input's datasets are attached to.
    gate: OntologyGate

    # --- create ----------------------------------------------------------------------------

    async def create_batch(
        self,
        principal: Principal,
        app_id: str,
        drafts: Sequence[AnnotationDraft],
        *,
        atomic: bool,
    ) -> list[AnnotationOutcome]:
        """Validates every annotation against its input, then writes the valid ones in one
        transaction; with `atomic`, any failure fails the whole batch."""
        authorize(principal, app_id, Permission.WRITE)
        check_batch_size("annotations", "annotation", len(drafts), MAX_BATCH_ANNOTATIONS)
        # Media never change after an input is created, so the (CPU-bound) content checks
        # run before the input rows are locked; only the counts need the lock.
        media = await self.annotations.input_media(
            app_id, sorted({d.input_id for d in drafts if ID_PATTERN.match(d.input_id)})
        )
        outcomes: dict[int, AnnotationOutcome] = {}
        candidates = self._candidates(app_id, drafts, media, outcomes)
        candidates = await self._governed(app_id, candidates, outcomes)
        if atomic and outcomes:
            raise _batch_failure(len(drafts), outcomes)
        if candidates:
            await self._insert(app_id, candidates, outcomes, atomic=atomic, total=len(drafts))
        return [outcomes[i] for i in range(len(drafts))]

    @classmethod
    def _candidates(
        cls,
        app_id: str,
        drafts: Sequence[AnnotationDraft],
        media: dict[str, AnnotatedMedia],
        outcomes: dict[int, AnnotationOutcome],
    ) -> list[tuple[int, Annotation]]:
        """The drafts that passed validation, as annotations with their request index;
        an outcome for each of the others."""
        candidates: list[tuple[int, Annotation]] = []
        seen: set[str] = set()
        for index, draft in enumerate(drafts):
            annotation_id = draft.id or uuid.uuid4().hex
            if draft.id in seen:
                outcomes[index] = _failed(
                    index,
                    annotation_id,
                    Outcome.DUPLICATE_ID,
                    "id",
                    f"{draft.id!r} repeats within the request",
                )
                continue
            seen.add(annotation_id)
            violations = cls._check_draft(app_id, f"annotations[{index}]", draft, media)
            if violations.items:
                outcomes[index] = AnnotationOutcome(
                    index, annotation_id, Outcome.INVALID, tuple(violations.items)
                )
                continue
            annotation = Annotation(
                app_id=app_id,
                id=annotation_id,
                input_id=draft.input_id,
                data=with_generated_ids(draft.data),
                annotation_info=draft.annotation_info or {},
            )
            candidates.append((index, annotation))
        return candidates

    async def _governed(
        self,
        app_id: str,
        candidates: list[tuple[int, Annotation]],
        outcomes: dict[int, AnnotationOutcome],
    ) -> list[tuple[int, Annotation]]:
        """The candidates whose labels fit the ontologies of their inputs' projects; an
        outcome for each of the others."""
        if not candidates:
            return candidates
        gates = await self.gate.for_inputs(app_id, sorted({a.input_id for _, a in candidates}))
        if not gates:
            return candidates
        kept: list[tuple[int, Annotation]] = []
        for index, annotation in candidates:
            findings = check_all(
                gates.get(annotation.input_id, []), f"annotations[{index}].data", annotation.data
            )
            if findings:
                outcomes[index] = AnnotationOutcome(
                    index,
                    annotation.id,
                    Outcome.INVALID,
                    tuple(FieldViolation(f.field, f.message) for f in findings),
                )
            else:
                kept.append((index, annotation))
        return kept

    @staticmethod
    def _check_draft(
        app_id: str, path: str, draft: AnnotationDraft, media: dict[str, AnnotatedMedia]
    ) -> Violations:
        violations = Violations()
        check_id(violations, f"{path}.id", draft.id, required=False)
        target = media.get(draft.input_id)
        if target is None:
            if ID_PATTERN.match(draft.input_id):
                violations.add(f"{path}.input_id", f"no input {draft.input_id!r} in app {app_id!r}")
            else:
                check_id(violations, f"{path}.input_id", draft.input_id)
        else:
            check_annotation_data(violations, f"{path}.data", draft.data, media_context(target))
        if draft.annotation_info is not None:
            check_metadata(violations, f"{path}.annotation_info", draft.annotation_info)
        return violations

    async def _insert(
        self,
        app_id: str,
        candidates: list[tuple[int, Annotation]],
        outcomes: dict[int, AnnotationOutcome],
        *,
        atomic: bool,
        total: int,
    ) -> None:
        async with self.tx.transaction():
            # The lock serializes writers per input, so two concurrent batches cannot both
            # see 999 annotations and each add one.
            counts, taken = await self.annotations.lock_inputs(
                app_id,
                sorted({a.input_id for _, a in candidates}),
                [a.id for _, a in candidates],
            )
            accepted = _admit(candidates, counts, taken, outcomes)
            if atomic and outcomes:
                raise _batch_failure(total, outcomes)
            stored = {a.id: a for a in await self.annotations.insert_many([a for _, a in accepted])}
            # Only an insert of the same id by a concurrent call gets here, after the check.
            for index, annotation in accepted:
                if annotation.id not in stored:
                    outcomes[index] = _already_exists(index, annotation.id)
            if atomic and outcomes:
                raise _batch_failure(total, outcomes)
        for index, annotation in accepted:
            if annotation.id in stored:
                outcomes[index] = AnnotationOutcome(
                    index, annotation.id, Outcome.CREATED, annotation=stored[annotation.id]
                )

    # --- read ------------------------------------------------------------------------------

    async def get(self, principal: Principal, app_id: str, annotation_id: str) -> Annotation:
        authorize(principal, app_id, Permission.READ)
        require_ids(("annotation_id", annotation_id))
        found = await self.annotations.get_many(app_id, [annotation_id])
        return the_one(found, "annotation", app_id, annotation_id)

    async def list_annotations(
        self,
        principal: Principal,
        app_id: str,
        *,
        input_ids: Sequence[str] | None,
        dataset_id: str | None,
        after_seq: int | None,
        limit: int,
    ) -> tuple[list[Annotation], int | None]:
        """A page, oldest first, and the cursor of its last row when more rows follow.
        Without input ids and dataset, every annotation of the app."""
        authorize(principal, app_id, Permission.READ)
        violations = Violations()
        if input_ids is not None:
            _check_ids(violations, "input_ids", input_ids)
        if dataset_id is not None:
            check_id(violations, "dataset_id", dataset_id)
        violations.raise_if_any()
        async with self.tx.read_transaction():
            if dataset_id is not None and not await self.members.live_datasets(
                app_id, [dataset_id], lock=False
            ):
                raise NotFound.in_app("dataset", app_id, dataset_id)
            query = AnnotationQuery(
                app_id, list(input_ids) if input_ids is not None else None, dataset_id
            )
            rows = await self.annotations.page(query, after_seq, limit + 1)
        return split_page(rows, limit)

    # --- update and delete -----------------------------------------------------------------

    async def update(
        self,
        principal: Principal,
        app_id: str,
        action: PatchAction,
        patches: Sequence[AnnotationPatch],
        *,
        delete_if_empty: bool,
    ) -> tuple[list[Annotation], list[str]]:
        """Patches annotations, all-or-nothing; returns the updated annotations in request
        order and the ids of those deleted because REMOVE left them empty."""
        authorize(principal, app_id, Permission.WRITE)
        paths = _check_patches(action, patches, delete_if_empty=delete_if_empty)
        ids = [p.id for p in patches]
        async with self.tx.transaction():
            current = {a.id: a for a in await self.annotations.get_many(app_id, ids, lock=True)}
            missing = [i for i in ids if i not in current]
            if missing:
                raise _not_found(missing, paths)
            _check_inputs_unchanged(current, patches)
            inputs = sorted({a.input_id for a in current.values()})
            media = await self.annotations.input_media(app_id, inputs)
            gates = await self.gate.for_inputs(app_id, inputs)
            changed, emptied = self._patched(
                current, media, gates, action, patches, delete_if_empty=delete_if_empty
            )
            stored = {a.id: a for a in await self.annotations.update_many(changed)}
            if emptied:
                await self.annotations.delete(app_id, emptied)
        return [stored[i] for i in ids if i in stored], emptied

    @classmethod
    def _patched(
        cls,
        current: dict[str, Annotation],
        media: dict[str, AnnotatedMedia],
        gates: dict[str, list[OntologyChecker]],
        action: PatchAction,
        patches: Sequence[AnnotationPatch],
        *,
        delete_if_empty: bool,
    ) -> tuple[list[Annotation], list[str]]:
        """The patched annotations, checked like new ones, and the ids of those REMOVE
        emptied when they are to be deleted; raises if any patch breaks the rules. An
        archived class the annotation carried before may stay: archiving keeps labels."""
        violations = Violations()
        changed: list[Annotation] = []
        emptied: list[str] = []
        for index, patch in enumerate(patches):
            path = f"annotations[{index}]"
            before = current[patch.id]
            after = cls._apply(before, action, patch, path)
            if delete_if_empty and is_empty(after.data):
                emptied.append(patch.id)
                continue
            if before.input_level:
                _check_input_level(violations, path, after.data)
            check_annotation_data(
                violations, f"{path}.data", after.data, media_context(media[before.input_id])
            )
            add_findings(
                violations,
                check_all(
                    gates.get(before.input_id, []),
                    f"{path}.data",
                    after.data,
                    allowed_archived=class_ids_in(before.data),
                ),
            )
            if patch.annotation_info is not None:
                check_metadata(violations, f"{path}.annotation_info", after.annotation_info)
            changed.append(after)
        violations.raise_if_any()
        return changed, emptied

    @staticmethod
    def _apply(
        current: Annotation, action: PatchAction, patch: AnnotationPatch, path: str
    ) -> Annotation:
        changes: dict[str, Any] = {}
        if patch.data is not None:
            given = patch.data
            if action is not PatchAction.REMOVE:
                # Ids first: a MERGE patch mixing new (id-less) and existing regions must
                # still merge by id, which needs every item to carry one.
                given = with_generated_ids(given)
            changes["data"] = apply_json(action, current.data, given, f"{path}.data")
        if patch.annotation_info is not None:
            changes["annotation_info"] = apply_json(
                action, current.annotation_info, patch.annotation_info, f"{path}.annotation_info"
            )
        return dataclasses.replace(current, **changes)

    async def delete(
        self,
        principal: Principal,
        app_id: str,
        *,
        ids: Sequence[str],
        input_ids: Sequence[str],
    ) -> int:
        """Deletes annotations by id, or every annotation of the inputs (input-level
        concepts included); unknown ids are skipped. Returns how many were deleted."""
        authorize(principal, app_id, Permission.WRITE)
        violations = Violations()
        if bool(ids) == bool(input_ids):
            violations.add("ids", "set exactly one of ids and input_ids")
        elif ids:
            _check_ids(violations, "ids", ids)
        else:
            _check_ids(violations, "input_ids", input_ids)
        violations.raise_if_any()
        async with self.tx.transaction():
            if ids:
                return await self.annotations.delete(app_id, list(dict.fromkeys(ids)))
            return await self.annotations.delete_for_inputs(app_id, list(dict.fromkeys(input_ids)))
