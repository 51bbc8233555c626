"""The access rule of every RPC: what it does (Action) to which resource (Resource), and
where its request names the datasets it touches.

`Call` (interceptors.py) looks the rule up once per call, right after authentication, and
checks each request message (every message of a client stream) against it with
`service.domain.access.require`; a method without a rule is refused. The rules are a dict
of full method names: the check costs a lookup and a few field reads, and no database
round trip (the Principal carries its roles) but for inputs named by callers bound to
datasets (below).

Objects that live in a dataset are reached through the request's dataset field (versions,
exports, dataset inputs). Inputs and annotations belong to the app (an input may be in
several datasets or none): a request that names them by id (`inputs=`) is allowed to app
owners and admins and whole-app keys at once, and to other callers when every named input
(an annotation: its input) is in a dataset where they have the action; deleting an input
(`every=True`) removes it from every dataset, so it needs the action on each of them
(datasets in the trash included: undeleting one would bring it back without the input).
That takes one query (`InputDatasets`), made by `Call.admitted` after the cheap checks.
An id that does not exist is PERMISSION_DENIED to such callers, like an input of a
dataset they cannot reach (NOT_FOUND would tell the two apart, and so whether an input of
another dataset exists); app-wide callers still get the use case's NOT_FOUND. Lists and
jobs over the app (ListInputs without a dataset, re-encode jobs) stay APP.
Where the rule depends on what the request asks of the domain (keys, the audit log,
search jobs), the rule only requires an authenticated caller of the app (`domain=True`)
and the use case decides with `service.domain.access.require`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from clarifai_grpc.grpc.api import service_pb2 as v2_service_pb2
from datasetd.v1 import (
    access_service_pb2,
    annotation_service_pb2,
    dataset_service_pb2,
    dataset_version_service_pb2,
    input_service_pb2,
    ontology_service_pb2,
    project_service_pb2,
    search_service_pb2,
)
from google.protobuf.message import Message

from service.domain.access import Action, Resource, dataset_allows, denial
from service.domain.errors import PermissionDenied
from service.domain.models import KeyKind, Principal

R, W, M = Action.READ, Action.WRITE, Action.MANAGE

# Reads the datasets a request names; None when it names none (then `fallback` applies).
DatasetIds = Callable[[Any], tuple[str, ...] | None]

# What an audit event keeps of the other ids a request names.
MAX_RESOURCE_IDS = 100
# Fields that are not ids of resources (or are recorded elsewhere in the event).
_NOT_RESOURCES = frozenset(
    {"app_id", "dataset_id", "dataset_ids", "request_id", "user_app_id", "page_token"}
)
# Where a request carries bytes or free-form values (never ids worth recording), or the
# datasets it creates or changes (recorded as its datasets).
_OPAQUE = frozenset(
    {"data", "chunk", "metadata", "query", "filter", "search", "rank", "dataset", "datasets"}
)


def _get(message: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        message = getattr(message, name)
    return message


def one(path: str) -> DatasetIds:
    """A single dataset field (`dataset_id`, `dataset.id`, `query.scope.dataset_id`)."""
    parts = tuple(path.split("."))

    def read(request: Any) -> tuple[str, ...] | None:
        value = _get(request, parts)
        return (value,) if value else None

    return read


def many(path: str) -> DatasetIds:
    """A repeated dataset id field (`dataset_ids`)."""
    parts = tuple(path.split("."))

    def read(request: Any) -> tuple[str, ...] | None:
        values = tuple(dict.fromkeys(_get(request, parts)))
        return values or None

    return read


def each(items: str, path: str) -> DatasetIds:
    """Dataset ids in every item of a repeated field (`inputs[].dataset_ids`,
    `datasets[].id`). An item naming none makes the request app-wide (None)."""
    parts = tuple(path.split("."))

    def read(request: Any) -> tuple[str, ...] | None:
        found: dict[str, None] = {}
        entries = getattr(request, items)
        if not entries:
            return None
        for entry in entries:
            value = _get(entry, parts)
            values = (value,) if isinstance(value, str) else tuple(value)
            values = tuple(v for v in values if v)
            if not values:
                return None
            found.update(dict.fromkeys(values))
        return tuple(found)

    return read


def _none(request: Any) -> tuple[str, ...] | None:
    return None


@dataclass(frozen=True)
class Named:
    """The inputs and annotations a request names by id."""

    inputs: tuple[str, ...] = ()
    annotations: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.inputs or self.annotations)


# Reads the inputs and annotations a request names; empty when it names none (then the
# rule is the app's).
NamedIds = Callable[[Any], Named]


def _values(message: Any, path: tuple[str, ...]) -> tuple[str, ...]:
    value = _get(message, path)
    values = (value,) if isinstance(value, str) else tuple(value)
    # An empty id names nothing (the use case refuses it).
    return tuple(v for v in values if v)


def _reader(spec: str) -> Callable[[Any], tuple[str, ...]]:
    """`field`, `a.b` or `items[].field`: the ids at that path."""
    items, _, rest = spec.rpartition("[].")
    parts = tuple(rest.split("."))
    if not items:
        return lambda request: _values(request, parts)
    holder = tuple(items.split("."))

    def read(request: Any) -> tuple[str, ...]:
        found: list[str] = []
        for entry in _get(request, holder):
            found.extend(_values(entry, parts))
        return tuple(found)

    return read


def named(inputs: Sequence[str] = (), annotations: Sequence[str] = ()) -> NamedIds:
    """Where the request names inputs and annotations (paths as `_reader` reads them)."""
    input_readers = tuple(_reader(spec) for spec in inputs)
    annotation_readers = tuple(_reader(spec) for spec in annotations)

    def read(request: Any) -> Named:
        return Named(
            tuple(dict.fromkeys(i for r in input_readers for i in r(request))),
            tuple(dict.fromkeys(a for r in annotation_readers for a in r(request))),
        )

    return read


class InputDatasets(Protocol):
    """The port `Call` resolves named inputs through (storage's PgMembershipRepository)."""

    async def datasets_of_inputs(
        self,
        app_id: str,
        input_ids: Sequence[str],
        annotation_ids: Sequence[str],
        *,
        trashed: bool = False,
    ) -> tuple[Mapping[str, frozenset[str]], Mapping[str, frozenset[str]]]:
        """In one query: the datasets holding each existing input, and holding the input
        of each existing annotation (live datasets; with `trashed`, deleted ones too).
        An id that does not exist is absent from its mapping."""
        ...


def reaches_named(principal: Principal, action: Action) -> bool:
    """Whether any dataset could give a caller who is not app-wide the action on a named
    input (when none can, no query is worth making)."""
    if principal.kind is KeyKind.PERSONAL:
        candidates: Iterable[str] = principal.dataset_roles
    else:
        if action is Action.MANAGE or action.value not in principal.scopes:
            return False
        candidates = principal.datasets or ()
    return any(dataset_allows(principal, action, d) for d in candidates)


def placed_allows(
    principal: Principal, action: Action, datasets: frozenset[str] | None, every: bool
) -> bool:
    """Whether an input in `datasets` (None: it does not exist) allows the action: one of
    them giving it is enough, or with `every` each of them must (an input in no dataset
    is the app's alone)."""
    if not datasets:
        return False
    if every:
        return all(dataset_allows(principal, action, d) for d in datasets)
    return any(dataset_allows(principal, action, d) for d in datasets)


def check_named(
    principal: Principal,
    rule: Rule,
    ids: Named,
    placement: tuple[Mapping[str, frozenset[str]], Mapping[str, frozenset[str]]] | None,
) -> None:
    """Raises PermissionDenied naming the first input or annotation the caller may not
    act on; without a placement (no port wired) only app-wide callers pass."""
    action = rule.action
    if placement is None:
        raise denial(principal, action, Resource.APP)
    inputs, annotations = placement
    for kind, wanted, found in (
        ("input", ids.inputs, inputs),
        ("annotation", ids.annotations, annotations),
    ):
        for item in wanted:
            if placed_allows(principal, action, found.get(item), rule.every):
                continue
            where = (
                "each dataset holding it (deleting an input removes it from all of them)"
                if rule.every
                else "a dataset holding it"
            )
            raise PermissionDenied(
                f"the caller may not {action.value} {kind} {item!r}: it needs "
                f"{action.value} access to {where}",
                reason="INPUT_ACCESS_DENIED",
                metadata={f"{kind}_id": item, "action": action.value},
            )


@dataclass(frozen=True)
class Rule:
    action: Action
    resource: Resource
    # For DATASETS: where the request names them; when it names none, `fallback` (the
    # app by default).
    datasets: DatasetIds = _none
    fallback: Resource | None = None
    # Datasets the call only reads while it writes others (MergeDataset's source).
    reads: DatasetIds = _none
    # Datasets the audit event names when the rule itself reads none (keys bound to
    # datasets, a project's datasets).
    names: DatasetIds = _none
    # Only an authenticated caller of the app; the use case decides the rest.
    domain: bool = False
    # Whether the call changes something (its audit event is written for every outcome);
    # by default, WRITE and MANAGE.
    mutation: bool | None = None
    # For a client stream: the field of the message that names the app and dataset (the
    # header); messages without it (chunks) need no check.
    header: str = ""
    # The app field of the request ("" for Clarifai's `user_app_id`).
    app_field: str = "app_id"
    # For APP rules over inputs and annotations named by id: where the request names
    # them (callers who are not app-wide pass through the datasets holding them; an
    # unknown id is PERMISSION_DENIED to them, see the module's docstring).
    inputs: NamedIds | None = None
    # With `inputs`: the action is needed on every dataset holding each input (deletes).
    every: bool = False

    @property
    def mutates(self) -> bool:
        if self.mutation is not None:
            return self.mutation
        return self.action is not Action.READ

    def subject(self, request: Any) -> Any | None:
        """The part of the message the rule reads, or None for a stream message without
        the header."""
        if not self.header:
            return request
        if not request.HasField(self.header):
            return None
        return getattr(request, self.header)

    def app_id(self, subject: Any) -> str:
        if self.app_field:
            return str(getattr(subject, self.app_field, ""))
        return str(getattr(getattr(subject, "user_app_id", None), "app_id", ""))

    def audited_datasets(self, subject: Any, named: tuple[str, ...]) -> tuple[str, ...]:
        more = (self.reads(subject) or ()) + (self.names(subject) or ())
        return tuple(dict.fromkeys(named + more)) if more else named

    def target(self, subject: Any) -> tuple[Resource, tuple[str, ...]]:
        """The resource the call acts on and the datasets it names."""
        if self.resource is not Resource.DATASETS:
            return self.resource, ()
        named = self.datasets(subject)
        if named is None:
            # Naming no dataset is never a way around the rule: it is the whole app
            # (callers of the app's data alone get past it, to hear what is missing).
            return (self.fallback or Resource.APP), ()
        return Resource.DATASETS, named


def _dataset(action: Action, path: str = "dataset_id", **kwargs: Any) -> Rule:
    return Rule(action, Resource.DATASETS, one(path), **kwargs)


def _dataset_or_app(action: Action, datasets: DatasetIds, **kwargs: Any) -> Rule:
    return Rule(action, Resource.DATASETS, datasets, fallback=Resource.APP, **kwargs)


def _named(action: Action, *inputs: str, annotations: Sequence[str] = (), **kwargs: Any) -> Rule:
    return Rule(action, Resource.APP, inputs=named(inputs, annotations), **kwargs)


CATALOG_READ = Rule(R, Resource.CATALOG)
CATALOG_WRITE = Rule(W, Resource.CATALOG)
APP_READ = Rule(R, Resource.APP)
APP_WRITE = Rule(W, Resource.APP)


def _domain(action: Action, names: DatasetIds = _none) -> Rule:
    return Rule(action, Resource.APP, names=names, domain=True)


def _service(descriptor_module: Any, service: str, rules: Mapping[str, Rule]) -> dict[str, Rule]:
    descriptor = descriptor_module.DESCRIPTOR.services_by_name[service]
    unknown = set(rules) - set(descriptor.methods_by_name)
    if unknown:
        raise RuntimeError(f"access rules for methods {service} lacks: {sorted(unknown)}")
    return {f"/{descriptor.full_name}/{name}": rule for name, rule in rules.items()}


_DATASETD: dict[str, Rule] = {
    **_service(
        dataset_service_pb2,
        "DatasetService",
        {
            "CreateDataset": Rule(W, Resource.NEW_DATASET, names=one("dataset.id")),
            "GetDataset": _dataset(R),
            "ListDatasets": CATALOG_READ,
            "UpdateDataset": _dataset(W, "dataset.id"),
            "DeleteDataset": _dataset(W),
            "UndeleteDataset": _dataset(W),
            # A search's scope is read: MembershipService/SearchJobService check it.
            "AddDatasetInputs": _dataset(W),
            "ListDatasetInputs": _dataset(R),
            "GetDatasetInput": _dataset(R),
            "RemoveDatasetInputs": _dataset(W),
            "DeleteDatasetInputsByFilter": _dataset(W),
            "MergeDataset": _dataset(W, "destination_dataset_id", reads=one("source_dataset_id")),
            "ImportDataset": _dataset(W, header="header"),
        },
    ),
    **_service(
        dataset_version_service_pb2,
        "DatasetVersionService",
        {
            "CreateDatasetVersion": _dataset(W),
            "GetDatasetVersion": _dataset(R),
            "ListDatasetVersions": _dataset(R),
            "UpdateDatasetVersion": _dataset(W),
            "DeleteDatasetVersion": _dataset(W),
            "CancelDatasetVersionBuild": _dataset(W),
            "ExportDatasetVersion": _dataset(W),
            "GetExport": _dataset(R),
            "ListExports": _dataset(R),
            "DownloadExport": _dataset(R),
            "DiffDatasetVersions": _dataset(R),
        },
    ),
    **_service(
        input_service_pb2,
        "InputService",
        {
            "CreateInputs": _dataset_or_app(W, each("inputs", "dataset_ids")),
            "UploadInput": _dataset_or_app(W, many("input.dataset_ids"), header="header"),
            "GetInput": _named(R, "input_id"),
            "ListInputs": _dataset_or_app(R, one("dataset_id")),
            "UpdateInputs": _named(W, "inputs[].id"),
            "DeleteInputs": _named(W, "ids", every=True),
            "DownloadInput": _named(R, "input_id"),
            "GetInputDownloadUrl": _named(R, "input_id"),
            "ReencodeInputs": _named(W, "input_ids"),
            "GetReencodeJob": APP_READ,
            "CancelReencodeJob": APP_WRITE,
        },
    ),
    **_service(
        annotation_service_pb2,
        "AnnotationService",
        {
            "CreateAnnotations": _named(W, "annotations[].input_id"),
            "GetAnnotation": _named(R, annotations=("annotation_id",)),
            # A dataset's annotations, else those of the inputs named, else the app's.
            "ListAnnotations": _dataset_or_app(R, one("dataset_id"), inputs=named(("input_ids",))),
            "UpdateAnnotations": _named(
                W, "annotations[].input_id", annotations=("annotations[].id",)
            ),
            "DeleteAnnotations": _named(W, "input_ids", annotations=("ids",)),
        },
    ),
    **_service(
        ontology_service_pb2,
        "OntologyService",
        {
            "CreateOntology": CATALOG_WRITE,
            "GetOntology": CATALOG_READ,
            "ListOntologies": CATALOG_READ,
            "UpdateOntology": CATALOG_WRITE,
            "DeleteOntology": CATALOG_WRITE,
        },
    ),
    **_service(
        project_service_pb2,
        "ProjectService",
        {
            "CreateProject": Rule(W, Resource.CATALOG, names=many("project.dataset_ids")),
            "GetProject": CATALOG_READ,
            "ListProjects": CATALOG_READ,
            "UpdateProject": Rule(W, Resource.CATALOG, names=many("project.dataset_ids")),
            "DeleteProject": CATALOG_WRITE,
            "AttachDataset": Rule(W, Resource.CATALOG, names=one("dataset_id")),
            "DetachDataset": Rule(W, Resource.CATALOG, names=one("dataset_id")),
            "ValidateDataset": _dataset(R),
        },
    ),
    **_service(
        search_service_pb2,
        "SearchService",
        {
            "SearchInputs": _dataset_or_app(R, one("query.scope.dataset_id")),
            "FindDuplicates": _dataset_or_app(R, one("scope.dataset_id")),
            "ListEmbeddingModels": CATALOG_READ,
            "GetInputEmbeddings": _named(R, "input_id"),
            # A job is named by its own id: SearchJobService checks its dataset.
            "GetSearchJob": _domain(R),
        },
    ),
    **_service(
        access_service_pb2,
        "AccessService",
        {
            "CreateUser": Rule(W, Resource.USERS),
            "ListUsers": Rule(R, Resource.USERS),
            "UpdateUser": Rule(W, Resource.USERS),
            "DeleteUser": Rule(W, Resource.USERS),
            "AddCollaborator": _dataset(M),
            "ListCollaborators": _dataset(R),
            "UpdateCollaborator": _dataset(M),
            "RemoveCollaborator": _dataset(M),
            # What a caller may do with keys and the audit log depends on the key or
            # dataset asked for: AccessAdmin decides.
            "CreateApiKey": _domain(M, many("api_key.dataset_ids")),
            "ListApiKeys": _domain(R, one("dataset_id")),
            "RevokeApiKey": _domain(M),
            "ListAuditEvents": _domain(R, one("dataset_id")),
        },
    ),
}


def _v2(action: Action, resource: Resource, **kwargs: Any) -> Rule:
    return Rule(action, resource, app_field="", **kwargs)


def _v2_named(action: Action, *inputs: str, annotations: Sequence[str] = (), **kwargs: Any) -> Rule:
    return _v2(action, Resource.APP, inputs=named(inputs, annotations), **kwargs)


def _v2_dataset(action: Action, datasets: DatasetIds | None = None) -> Rule:
    return _v2(action, Resource.DATASETS, datasets=datasets or one("dataset_id"))


# The implemented methods of clarifai.api.V2 (the others answer NOT_IMPLEMENTED in-band
# and touch nothing: see UNSUPPORTED_V2).
_CLARIFAI: dict[str, Rule] = _service(
    v2_service_pb2,
    "V2",
    {
        "PostAnnotations": _v2_named(W, "annotations[].input_id"),
        "GetAnnotation": _v2_named(R, "input_id", annotations=("annotation_id",)),
        "ListAnnotations": _v2_named(R, "input_ids", annotations=("ids",)),
        "PatchAnnotations": _v2_named(
            W, "annotations[].input_id", annotations=("annotations[].id",)
        ),
        "DeleteAnnotation": _v2_named(W, "input_id", annotations=("annotation_id",)),
        "DeleteAnnotations": _v2_named(W, "input_ids", annotations=("ids",)),
        # The key's own app and the user the client names: nothing of a dataset.
        "GetApp": _v2(R, Resource.CATALOG),
        "GetUser": _v2(R, Resource.CATALOG),
        "PostApps": _v2(R, Resource.CATALOG),
        "ListConcepts": _v2(R, Resource.CATALOG),
        "GetConcept": _v2(R, Resource.CATALOG),
        "PostConcepts": _v2(W, Resource.CATALOG),
        "PatchConcepts": _v2(W, Resource.CATALOG),
        "PostDatasetInputs": _v2_dataset(W),
        "ListDatasetInputs": _v2_dataset(R),
        "GetDatasetInput": _v2_dataset(R),
        "DeleteDatasetInputs": _v2_dataset(W),
        "PostDatasets": _v2(W, Resource.NEW_DATASET, names=each("datasets", "id")),
        "GetDataset": _v2_dataset(R),
        "ListDatasets": _v2(R, Resource.CATALOG),
        "PatchDatasets": _v2_dataset(W, each("datasets", "id")),
        "DeleteDatasets": _v2_dataset(W, many("dataset_ids")),
        "PostInputs": _v2(
            W, Resource.DATASETS, datasets=each("inputs", "dataset_ids"), fallback=Resource.APP
        ),
        "GetInputsAddJob": _v2(R, Resource.APP),
        "CancelInputsAddJob": _v2(W, Resource.APP),
        "ListInputsAddJobs": _v2(R, Resource.APP),
        "GetInput": _v2_named(R, "input_id"),
        "ListInputs": _v2(R, Resource.APP),
        "StreamInputs": _v2(R, Resource.APP),
        "GetInputCount": _v2(R, Resource.APP),
        "PatchInputs": _v2_named(W, "inputs[].id"),
        "DeleteInput": _v2_named(W, "input_id", every=True),
        "DeleteInputs": _v2_named(W, "ids", every=True),
        "PostDatasetVersions": _v2_dataset(W),
        "ListDatasetVersions": _v2_dataset(R),
        "GetDatasetVersion": _v2_dataset(R),
        "PatchDatasetVersions": _v2_dataset(W),
        "DeleteDatasetVersions": _v2_dataset(W),
        "PutDatasetVersionExports": _v2_dataset(W),
        "ListDatasetVersionMetricsGroups": _v2_dataset(R),
    },
)

# A V2 method datasetd does not implement answers NOT_IMPLEMENTED and touches nothing:
# an authenticated caller of the app may hear so.
UNSUPPORTED_V2 = _v2(R, Resource.APP, domain=True)
_V2_PREFIX = "/" + v2_service_pb2.DESCRIPTOR.services_by_name["V2"].full_name + "/"

RULES: Mapping[str, Rule] = {**_DATASETD, **_CLARIFAI}
IMPLEMENTED_V2: frozenset[str] = frozenset(name.rsplit("/", 1)[1] for name in _CLARIFAI)


@dataclass(frozen=True)
class Policy:
    """The rules a server enforces (tests give their own methods rules)."""

    rules: Mapping[str, Rule] = field(default_factory=lambda: RULES)

    def rule(self, method: str) -> Rule | None:
        found = self.rules.get(method)
        unsupported = method.startswith(_V2_PREFIX) and (
            method[len(_V2_PREFIX) :] not in IMPLEMENTED_V2
        )
        if found is None and unsupported:
            return UNSUPPORTED_V2
        return found


POLICY = Policy()


def check_v2_rules(implemented: Iterable[str]) -> None:
    """Refuses to start a server whose V2 parts implement a method without its rule (it
    would otherwise pass as an unsupported method)."""
    missing = sorted(set(implemented) - IMPLEMENTED_V2)
    if missing:
        raise RuntimeError(f"V2 methods without an access rule: {missing}")


def resource_ids(request: Message, limit: int = MAX_RESOURCE_IDS) -> tuple[str, ...]:
    """The ids a request names other than its app and datasets (inputs, versions,
    annotations, users, keys...), at most `limit`, for the audit log."""
    found: dict[str, None] = {}
    _collect(request, found, limit, 0)
    return tuple(found)


def _collect(message: Message, found: dict[str, None], limit: int, depth: int) -> None:
    for descriptor, value in message.ListFields():
        if len(found) >= limit:
            return
        name = descriptor.name
        if name in _NOT_RESOURCES or name in _OPAQUE:
            continue
        if descriptor.message_type is not None:
            kind = descriptor.message_type
            if depth >= 2 or kind.full_name.startswith("google.") or kind.GetOptions().map_entry:
                continue
            items = value if descriptor.is_repeated else (value,)
            for item in items:
                _collect(item, found, limit, depth + 1)
                if len(found) >= limit:
                    return
            continue
        if not (name in {"id", "ids"} or name.endswith(("_id", "_ids"))):
            continue
        values = value if descriptor.is_repeated else (value,)
        for item in values:
            if isinstance(item, str) and item:
                found[item] = None
                if len(found) >= limit:
                    return
