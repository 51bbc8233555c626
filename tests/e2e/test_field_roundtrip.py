"""Issue 18: nothing a caller sets is silently dropped.

For every RPC (discovered from the generated descriptors) and every field a caller can set
in its request (walked from the descriptor, nested messages included), the test sets a
valid value on top of a valid base request, calls the RPC, and then:

* the call failed with INVALID_ARGUMENT naming that field (or the message holding it):
  refused, fine; or
* the call succeeded and the field belongs to what the RPC stores: the value is read back
  through the matching Get and must be there; or
* the call succeeded and the field is a parameter of the call (an id, a page size, a flag,
  a filter): accepted, fine (what a parameter does is its RPC's own tests' business).

Anything else fails: a field accepted and missing from the read-back, an RPC with no case
below (add one: how to make a valid request and, if it stores something, how to read it
back), or a test value the service finds invalid (fix the value, not the rule).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import hashlib
import importlib
import itertools
import math
import pkgutil
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import datasetd.v1
import grpc
import pytest
from datasetd.v1 import (
    access_pb2,
    common_pb2,
    data_pb2,
    dataset_version_pb2,
    ontology_pb2,
    project_service_pb2,
    search_pb2,
    status_pb2,
)
from datasetd.v1 import dataset_version_service_pb2 as vapi
from google.protobuf import (
    descriptor_pool,
    field_mask_pb2,
    json_format,
    message_factory,
    struct_pb2,
    timestamp_pb2,
)
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from service.domain.auth import ensure_bootstrap_key
from service.storage.access import PgUserRepository
from service.storage.api_keys import PgApiKeyRepository
from service.storage.db import Database
from tests.conftest import Caller, new_caller
from tests.helpers import details_of, download, png_bytes
from tests.unit.test_media import mp4, wav

PNG = png_bytes(8, 6)
# A client embedding model of the shared app: its "img" input has a vector of it. An
# input's vectors come back by model id, and the generated ids ("v12") sort before it:
# the vector of a new model an update adds to "img" is the first one read back.
CLIENT_MODEL = "zz-shared"
TEXT = "The quick brown fox"
READY = status_pb2.STATUS_CODE_DATASET_VERSION_READY
EXPORTED = status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_SUCCESS
OVERWRITE = common_pb2.PATCH_ACTION_OVERWRITE
PROTOBUF = dataset_version_pb2.EXPORT_FORMAT_CLARIFAI_DATA_PROTOBUF
# Nested messages that refer to themselves (Data in a Region in Data...) are walked to
# this many occurrences of one type in a path: enough to reach a frame's region's data.
MAX_SAME_TYPE = 3
# Well-known types (Struct, Timestamp, FieldMask, wrappers) are set as a whole, not walked.
WELL_KNOWN = "google.protobuf."

Path = tuple[str, ...]


# --- discovery --------------------------------------------------------------------------------


def all_rpcs() -> list[MethodDescriptor]:
    """Every method of every service in the generated datasetd.v1 package."""
    methods: list[MethodDescriptor] = []
    for module_info in pkgutil.iter_modules(datasetd.v1.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"datasetd.v1.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            methods.extend(service.methods)
    return methods


def message_class(descriptor: Any) -> type[Message]:
    """The generated class of a message descriptor (of the pure or the upb runtime)."""
    made: type[Message] = message_factory.GetMessageClass(descriptor)
    return made


def nested(field: Any) -> Descriptor:
    """The message type of a message field."""
    assert field.message_type is not None, field.full_name
    found: Descriptor = field.message_type
    return found


def owner(field: Any) -> str:
    """Full name of the message declaring the field."""
    assert field.containing_type is not None, field.full_name
    return str(field.containing_type.full_name)


def _is_map(field: Any) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def leaves(descriptor: Descriptor, path: Path = (), seen: tuple[str, ...] = ()) -> Iterator[Path]:
    """Paths of every settable field: scalars, repeated scalars, maps and whole messages
    (Struct, Timestamp...); other messages are walked into."""
    for field in descriptor.fields:
        inner = field.message_type
        here = (*path, field.name)
        if inner is None or _is_map(field) or inner.full_name.startswith(WELL_KNOWN):
            yield here
        elif seen.count(inner.full_name) < MAX_SAME_TYPE:
            yield from leaves(inner, here, (*seen, inner.full_name))


def field_at(descriptor: Descriptor, path: Path) -> FieldDescriptor:
    field = descriptor.fields_by_name[path[0]]
    for name in path[1:]:
        field = nested(field).fields_by_name[name]
    return field


def shown(path: Path, descriptor: Descriptor) -> str:
    """The path as the service names it: index 0 after each repeated message field."""
    parts: list[str] = []
    for name in path:
        field = descriptor.fields_by_name[name]
        repeated_message = (
            field.is_repeated and field.message_type is not None and not _is_map(field)
        )
        parts.append(f"{name}[0]" if repeated_message and name != path[-1] else name)
        if field.message_type is not None:
            descriptor = field.message_type
    return ".".join(parts)


# --- valid values -----------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    """One app with a little of everything, shared by all the calls."""

    caller: Caller
    channel: grpc.aio.Channel
    db: Database
    ids: dict[str, str] = dataclasses.field(default_factory=dict)
    archive: bytes = b""
    counter: Iterator[int] = dataclasses.field(default_factory=itertools.count)
    # The app owner's personal key: AccessService manages nothing for `caller`, a scoped
    # key.
    owner: Caller | None = None

    def unique(self, prefix: str = "v") -> str:
        return f"{prefix}{next(self.counter)}"

    async def call(
        self, rpc: str, request: Message | list[Message], caller: Caller | None = None
    ) -> Any:
        """Calls `Service.Method` the way its descriptor says (unary, client or server
        streaming); a server stream's messages come back as a list."""
        method = RPCS[rpc]
        path = f"/{method.containing_service.full_name}/{method.name}"
        metadata = (caller or self.caller).metadata
        serialize = message_class(method.input_type).SerializeToString
        deserialize = message_class(method.output_type).FromString
        if method.client_streaming:
            assert isinstance(request, list)
            stream_unary = self.channel.stream_unary(path, serialize, deserialize)
            return await stream_unary(iter(request), metadata=metadata)
        assert isinstance(request, Message)
        if method.server_streaming:
            unary_stream = self.channel.unary_stream(path, serialize, deserialize)
            return [item async for item in unary_stream(request, metadata=metadata)]
        unary_unary = self.channel.unary_unary(path, serialize, deserialize)
        return await unary_unary(request, metadata=metadata)

    def request(self, rpc: str, **fields: Any) -> Message:
        message = message_class(RPCS[rpc].input_type)(**fields)
        if "app_id" in message.DESCRIPTOR.fields_by_name and "app_id" not in fields:
            message.app_id = self.caller.app_id  # type: ignore[attr-defined]
        return message

    async def send(self, rpc: str, **fields: Any) -> Any:
        """Calls `rpc` with `request(rpc, **fields)`, as the shared app's caller."""
        return await self.call(rpc, self.request(rpc, **fields))


RPCS = {f"{m.containing_service.name}.{m.name}": m for m in all_rpcs()}


def _template(full_name: str) -> Message:
    """A valid instance of a nested message, so that setting one of its fields leaves the
    others valid (a region needs a geometry, a polygon three points)."""
    point = data_pb2.Point(row=0.25, col=0.25)
    box = data_pb2.BoundingBox(top_row=0.1, left_col=0.1, bottom_row=0.9, right_col=0.9)
    templates: dict[str, Callable[[], Message]] = {
        "Region": lambda: data_pb2.Region(region_info=data_pb2.RegionInfo(bounding_box=box)),
        "BoundingBox": lambda: box,
        "Polygon": lambda: data_pb2.Polygon(
            points=[
                data_pb2.Point(row=0.1, col=0.1),
                data_pb2.Point(row=0.1, col=0.9),
                data_pb2.Point(row=0.9, col=0.5),
            ]
        ),
        "Point": lambda: point,
        "Mask": lambda: data_pb2.Mask(image=data_pb2.Image(base64=PNG)),
        "Span": lambda: data_pb2.Span(char_start=0, char_end=3),
        "Frame": lambda: data_pb2.Frame(frame_info=data_pb2.FrameInfo()),
        "Image": lambda: data_pb2.Image(base64=PNG),
        "Video": lambda: data_pb2.Video(base64=mp4()),
        "Audio": lambda: data_pb2.Audio(base64=wav(0.1)),
        "Text": lambda: data_pb2.Text(raw=TEXT),
        "Geo": lambda: data_pb2.Geo(geo_point=data_pb2.GeoPoint(longitude=0.25, latitude=0.25)),
        "Concept": lambda: data_pb2.Concept(id="c-template", value=1.0),
        # The shared app's client model (one dimension; see shared_app).
        "Embedding": lambda: data_pb2.Embedding(model_id=CLIENT_MODEL, vector=[0.25]),
        "GeoRadius": lambda: search_pb2.GeoRadius(latitude=0, longitude=0, radius_km=1),
        "GeoBox": lambda: search_pb2.GeoBox(
            min_latitude=-1, max_latitude=1, min_longitude=-1, max_longitude=1
        ),
        "SplitOptions": _split_options,
        # A class id of its own each time: class ids are unique in the whole ontology.
        "OntologyClass": lambda: ontology_pb2.OntologyClass(
            id=f"class-{next(_CLASS_IDS)}", shapes=[ontology_pb2.SHAPE_CLASSIFICATION]
        ),
        "OntologyAttribute": lambda: ontology_pb2.OntologyAttribute(
            id="attr", name="Attr", boolean=ontology_pb2.BooleanAttribute()
        ),
    }
    make = templates.get(full_name.removeprefix("datasetd.v1."))
    return make() if make is not None else _empty(full_name)


_CLASS_IDS = itertools.count()


def _split_options() -> Message:
    return vapi.SplitOptions(ratios={"train": 1.0})


def _empty(name: str) -> Message:
    return message_class(descriptor_pool.Default().FindMessageTypeByName(name))()


# Fields of which one is set at a time: setting one clears the others.
EXCLUSIVE: Mapping[str, frozenset[str]] = {
    "datasetd.v1.RegionInfo": frozenset(
        {"bounding_box", "mask", "polygon", "point", "span", "keypoint_locations"}
    ),
    "datasetd.v1.Data": frozenset({"image", "video", "audio", "text"}),
    "datasetd.v1.Image": frozenset({"base64", "url"}),
    "datasetd.v1.Video": frozenset({"base64", "url"}),
    "datasetd.v1.Audio": frozenset({"base64", "url"}),
    "datasetd.v1.Text": frozenset({"raw", "url"}),
    "datasetd.v1.DeleteAnnotationsRequest": frozenset({"ids", "input_ids"}),
    "datasetd.v1.OntologyAttribute": frozenset({"enum_type", "boolean", "number", "text"}),
}

# Values that the per-type defaults would get wrong, by message and field.
VALUES: Mapping[tuple[str, str], Callable[[Env], Any]] = {
    ("datasetd.v1.Image", "url"): lambda env: "https://example.com/image.png",
    ("datasetd.v1.Video", "url"): lambda env: "https://example.com/video.mp4",
    ("datasetd.v1.Audio", "url"): lambda env: "https://example.com/audio.wav",
    ("datasetd.v1.Text", "url"): lambda env: "https://example.com/text.txt",
    ("datasetd.v1.Image", "base64"): lambda env: PNG,
    ("datasetd.v1.Video", "base64"): lambda env: mp4(),
    ("datasetd.v1.Audio", "base64"): lambda env: wav(0.1),
    ("datasetd.v1.Text", "raw"): lambda env: TEXT,
    # Within the template span 0..3 and the text.
    ("datasetd.v1.Span", "char_start"): lambda env: 1,
    ("datasetd.v1.Span", "char_end"): lambda env: 2,
    ("datasetd.v1.SplitOptions", "ratios"): lambda env: {"train": 1.0},
    ("datasetd.v1.Input", "dataset_ids"): lambda env: [env.ids["other"]],
    ("datasetd.v1.OntologyClass", "color"): lambda env: "#12AB9f",
    ("datasetd.v1.Project", "ontology_id"): lambda env: env.ids["onto2"],
    ("datasetd.v1.ApiKey", "dataset_ids"): lambda env: [env.ids["main"]],
    # Whole seconds: the time is stored to the microsecond.
    ("datasetd.v1.ApiKey", "expires_at"): lambda env: _whole_seconds(days=30),
    ("datasetd.v1.ListAuditEventsRequest", "key_id"): lambda env: "0123456789abcdef",
    ("datasetd.v1.ListAuditEventsRequest", "outcome"): lambda env: "OK",
}


def _whole_seconds(days: int) -> Message:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return timestamp_pb2.Timestamp(seconds=stamp.seconds + days * 86_400)


def default_value(env: Env, field: Any) -> Any:
    """A valid, non-default value of the field's type (unique for strings, which are often
    ids that must not collide)."""
    if _is_map(field):
        value_field = nested(field).fields_by_name["value"]
        return {env.unique("k"): default_value(env, value_field)}
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        name = nested(field).full_name
        if name == "google.protobuf.Struct":
            value = struct_pb2.Struct()
            value.update({"k": env.unique("v")})
            return value
        if name == "google.protobuf.Timestamp":
            value_time = message_class(nested(field))()
            value_time.GetCurrentTime()  # type: ignore[attr-defined]
            return value_time
        made = message_class(nested(field))()
        wrapped = made.DESCRIPTOR.fields_by_name.get("value")
        if name.startswith(WELL_KNOWN) and wrapped is not None:  # UInt64Value and the like
            made.value = default_value(env, wrapped)  # type: ignore[attr-defined]
        return made
    if kind == FieldDescriptor.TYPE_STRING:
        return env.unique()
    if kind == FieldDescriptor.TYPE_BYTES:
        return PNG
    if kind == FieldDescriptor.TYPE_BOOL:
        return True
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 0.5
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return next(v.number for v in field.enum_type.values if v.number != 0)
    return 1


# --- cases ------------------------------------------------------------------------------------

Values = Mapping[Path, Callable[["Env", Message], Awaitable[Any]]]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A valid request, and the caller to send it as."""

    request: Message
    caller: Caller | None = None


@dataclasses.dataclass(frozen=True)
class Case:
    """How to call one RPC validly and read back what it stores.

    base: a valid request; the fields it sets keep their values (they name existing
        things), every other field is set to a generated value in turn.
    stored: the field of the request holding what the call stores (repeated: each item),
        () when the call stores nothing a caller set (reads, deletes).
    read_back: the stored messages as the matching Get returns them, in request order.
    values: valid values of fields that depend on the app's content (page tokens, etags).
    messages: the stream of a client-streaming call, from its first message.
    adjust: fixes a request after a field is set (e.g. the input an annotation is on).
    ends: status codes that still show the call read its fields (a race it may lose).
    """

    base: Callable[[Env], Awaitable[Prepared]]
    stored: Path = ()
    # (env, request, response): the request is Any to read its generated fields.
    read_back: Callable[[Env, Any, Any], Awaitable[list[Message]]] | None = None
    values: Values = dataclasses.field(default_factory=dict)
    messages: Callable[[Env, Message], list[Message]] | None = None
    adjust: Callable[[Env, Message], None] | None = None
    ends: frozenset[grpc.StatusCode] = frozenset()


def fixed(rpc: str, **fields: Any) -> Callable[[Env], Awaitable[Prepared]]:
    """A base request; a string "@name" stands for the shared content's ids["name"]."""

    async def base(env: Env) -> Prepared:
        return Prepared(env.request(rpc, **_resolve(env, fields)))

    return base


def _resolve(env: Env, value: Any) -> Any:
    if isinstance(value, str) and value.startswith("@"):
        return env.ids[value[1:]]
    if isinstance(value, dict):
        return {k: _resolve(env, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(env, v) for v in value]
    return value


def page_token(rpc: str) -> Callable[[Env, Message], Awaitable[Any]]:
    """The next_page_token of the request's first page of one item."""

    async def value(env: Env, request: Message) -> Any:
        first = copy.deepcopy(request)
        first.page_size = 1  # type: ignore[attr-defined]
        response = await env.call(rpc, first)
        assert response.next_page_token, f"{rpc}: the shared content must fill two pages"
        return response.next_page_token

    return value


def constant(value: Any) -> Callable[[Env, Message], Awaitable[Any]]:
    async def given(env: Env, request: Message) -> Any:
        return _resolve(env, value)

    return given


def mask(*paths: str) -> Callable[[Env, Message], Awaitable[Any]]:
    """An update_mask naming `paths` (which the base request sets)."""
    return constant(field_mask_pb2.FieldMask(paths=list(paths)))


async def get_dataset(env: Env, dataset_id: str) -> Message:
    response = await env.send("DatasetService.GetDataset", dataset_id=dataset_id)
    dataset: Message = response.dataset
    return dataset


async def get_input(env: Env, input_id: str) -> Message:
    response = await env.send("InputService.GetInput", input_id=input_id)
    found: Message = response.input
    return found


async def get_annotation(env: Env, annotation_id: str) -> Message:
    response = await env.send("AnnotationService.GetAnnotation", annotation_id=annotation_id)
    found: Message = response.annotation
    return found


async def get_version(env: Env, dataset_id: str, version_id: str) -> Message:
    response = await env.send(
        "DatasetVersionService.GetDatasetVersion", dataset_id=dataset_id, version_id=version_id
    )
    found: Message = response.version
    return found


def _annotation_target(annotation: Message) -> str:
    """Which shared input an annotation's content fits: spans need a text, frames a video."""
    body = json_format.MessageToJson(annotation.data)  # type: ignore[attr-defined]
    # Frames first: a span in a frame fits no input, and the service says so by name.
    if '"frames"' in body:
        return "vid"
    if '"span"' in body:
        return "txt"
    return "img"


def _on_fitting_input(env: Env, request: Message) -> None:
    for annotation in request.annotations:  # type: ignore[attr-defined]
        annotation.input_id = env.ids[_annotation_target(annotation)]


def _on_fitting_annotation(env: Env, request: Message) -> None:
    for annotation in request.annotations:  # type: ignore[attr-defined]
        annotation.id = env.ids["a-" + _annotation_target(annotation)]


def _ranked_in_the_shared_model(env: Env, request: Any) -> None:
    """A rank needs a target, and a vector or an input's vector a model: the shared
    client model, whose dimension the generated vector has."""
    if not request.query.HasField("rank"):
        return
    rank = request.query.rank
    if rank.WhichOneof("target") is None:
        rank.vector.values.append(0.5)
    if rank.WhichOneof("target") in ("vector", "input_id") and not rank.model_id:
        rank.model_id = CLIENT_MODEL


def _upload_stream(env: Env, first: Message) -> list[Message]:
    """The header, then the bytes of the medium it names."""
    data = first.header.input.data  # type: ignore[attr-defined]
    medium = next((m for m in ("video", "audio", "text") if data.HasField(m)), "image")
    chunk = {"video": mp4(), "audio": wav(0.1), "text": TEXT.encode()}.get(medium, PNG)
    chunk_message = message_class(first.DESCRIPTOR)()
    chunk_message.chunk = chunk  # type: ignore[attr-defined]
    return [first, chunk_message]


def _import_stream(env: Env, first: Message) -> list[Message]:
    chunk_message = message_class(first.DESCRIPTOR)()
    chunk_message.chunk = env.archive  # type: ignore[attr-defined]
    return [first, chunk_message]


async def _fresh_dataset(env: Env, deleted: bool = False) -> str:
    dataset_id = env.unique("fresh-")
    await env.send("DatasetService.CreateDataset", dataset={"id": dataset_id})
    if deleted:
        await env.send("DatasetService.DeleteDataset", dataset_id=dataset_id)
    return dataset_id


async def _fresh_input(env: Env) -> str:
    input_id = env.unique("fresh-")
    await env.send(
        "InputService.CreateInputs",
        inputs=[{"id": input_id, "data": {"text": {"raw": TEXT}}}],
        atomic=True,
    )
    return input_id


def _reencode_job(rpc: str) -> Callable[[Env], Awaitable[Prepared]]:
    """A request about a new re-encode job (of a new video input)."""

    async def base(env: Env) -> Prepared:
        input_id = env.unique("fresh-")
        await env.send(
            "InputService.CreateInputs",
            inputs=[{"id": input_id, "data": {"video": {"base64": mp4()}}}],
            atomic=True,
        )
        started = await env.send("InputService.ReencodeInputs", input_ids=[input_id])
        return Prepared(env.request(rpc, job_id=started.job.id))

    return base


async def _fresh_version(env: Env) -> str:
    version_id = env.unique("fresh-")
    await env.send(
        "DatasetVersionService.CreateDatasetVersion",
        dataset_id=env.ids["empty"],
        version={"id": version_id},
    )
    return version_id


def _version_request(rpc: str, **fields: Any) -> Callable[[Env], Awaitable[Prepared]]:
    return fixed(rpc, dataset_id="@main", version_id="@v1", **fields)


async def _delete_dataset(env: Env) -> Prepared:
    return Prepared(
        env.request("DatasetService.DeleteDataset", dataset_id=await _fresh_dataset(env))
    )


async def _undelete_dataset(env: Env) -> Prepared:
    dataset_id = await _fresh_dataset(env, deleted=True)
    return Prepared(env.request("DatasetService.UndeleteDataset", dataset_id=dataset_id))


async def _import_dataset(env: Env) -> Prepared:
    # An app of its own each time: the archive's input ids exist in the shared app.
    caller = await new_caller(env.db)
    dataset = env.request("DatasetService.CreateDataset", dataset={"id": "target"})
    dataset.app_id = caller.app_id  # type: ignore[attr-defined]
    await env.call("DatasetService.CreateDataset", dataset, caller)
    request = message_class(RPCS["DatasetService.ImportDataset"].input_type)()
    header = request.header  # type: ignore[attr-defined]
    header.app_id, header.dataset_id, header.format = caller.app_id, "target", 1
    return Prepared(request, caller)


async def _delete_inputs(env: Env) -> Prepared:
    return Prepared(env.request("InputService.DeleteInputs", ids=[await _fresh_input(env)]))


async def _delete_annotations(env: Env) -> Prepared:
    input_id = await _fresh_input(env)
    response = await env.send(
        "AnnotationService.CreateAnnotations",
        annotations=[{"input_id": input_id, "data": {"concepts": [{"id": "c", "value": 1}]}}],
        atomic=True,
    )
    request = env.request(
        "AnnotationService.DeleteAnnotations", ids=[response.results[0].annotation_id]
    )
    env.ids["fresh-input"] = input_id
    return Prepared(request)


async def _version_of_empty(rpc: str, env: Env) -> Prepared:
    version_id = await _fresh_version(env)
    return Prepared(env.request(rpc, dataset_id=env.ids["empty"], version_id=version_id))


async def get_ontology(env: Env, ontology_id: str) -> Message:
    response = await env.send("OntologyService.GetOntology", ontology_id=ontology_id)
    found: Message = response.ontology
    return found


async def _revision(env: Env, request: Message) -> Any:
    return (await get_ontology(env, env.ids["onto"])).revision  # type: ignore[attr-defined]


async def _delete_ontology(env: Env) -> Prepared:
    ontology_id = env.unique("fresh-")
    await env.send("OntologyService.CreateOntology", ontology={"id": ontology_id})
    return Prepared(env.request("OntologyService.DeleteOntology", ontology_id=ontology_id))


async def get_project(env: Env, project_id: str) -> Message:
    response = await env.send("ProjectService.GetProject", project_id=project_id)
    found: Message = response.project
    return found


async def _delete_project(env: Env) -> Prepared:
    project_id = env.unique("fresh-")
    await env.send(
        "ProjectService.CreateProject", project={"id": project_id, "ontology_id": env.ids["onto"]}
    )
    return Prepared(env.request("ProjectService.DeleteProject", project_id=project_id))


async def _etag(env: Env, request: Message) -> Any:
    dataset_id = request.dataset.id  # type: ignore[attr-defined]
    return (await get_dataset(env, dataset_id)).etag  # type: ignore[attr-defined]


async def _update_dataset(env: Env) -> Prepared:
    # A dataset per call: `locked`, set by one field's call, would refuse the next one's.
    dataset_id = await _fresh_dataset(env)
    return Prepared(
        env.request(
            "DatasetService.UpdateDataset",
            dataset={"id": dataset_id, "description": "base"},
            action=OVERWRITE,
        )
    )


def _upload_bytes(env: Env, request: Message) -> bytes:
    chunk: bytes = _upload_stream(env, request)[1].chunk  # type: ignore[attr-defined]
    return chunk


async def _upload_length(env: Env, request: Message) -> Any:
    return len(_upload_bytes(env, request))


async def _upload_sha256(env: Env, request: Message) -> Any:
    return hashlib.sha256(_upload_bytes(env, request)).hexdigest()


async def _results_inputs_with_regions(env: Env, request: Message, response: Any) -> list[Message]:
    """Each created input as GetInput returns it, with the regions and frames of its
    annotations (ListAnnotations) in its data: those sent with an input are stored as
    its annotation, not in the input."""
    found = []
    for result in response.results:
        stored: Any = await get_input(env, result.input_id)
        listed = await env.send("AnnotationService.ListAnnotations", input_ids=[result.input_id])
        for annotation in listed.annotations:
            stored.data.regions.extend(annotation.data.regions)
            stored.data.frames.extend(annotation.data.frames)
        found.append(stored)
    return found


def _on_fitting_medium(env: Env, request: Message) -> None:
    """An input sent with frames is a video, with a span a text (as _on_fitting_input)."""
    media: dict[str, tuple[str, Message]] = {
        "vid": ("video", data_pb2.Video(base64=mp4())),
        "txt": ("text", data_pb2.Text(raw=TEXT)),
    }
    for item in request.inputs:  # type: ignore[attr-defined]
        fitting = media.get(_annotation_target(item))
        if fitting is not None:
            name, medium = fitting
            _exclusive(item.data, name)
            getattr(item.data, name).CopyFrom(medium)


async def _results_annotations(env: Env, request: Message, response: Any) -> list[Message]:
    return [await get_annotation(env, r.annotation_id) for r in response.results]


CASES: Mapping[str, Case] = {
    # --- DatasetService
    "DatasetService.CreateDataset": Case(
        fixed("DatasetService.CreateDataset", dataset={}),
        stored=("dataset",),
        read_back=lambda env, req, resp: _one(get_dataset(env, resp.dataset.id)),
    ),
    "DatasetService.GetDataset": Case(fixed("DatasetService.GetDataset", dataset_id="@main")),
    "DatasetService.ListDatasets": Case(
        fixed("DatasetService.ListDatasets"),
        values={("page_token",): page_token("DatasetService.ListDatasets")},
    ),
    "DatasetService.UpdateDataset": Case(
        _update_dataset,
        stored=("dataset",),
        read_back=lambda env, req, resp: _one(get_dataset(env, req.dataset.id)),
        values={("etag",): _etag, ("update_mask",): mask("description")},
    ),
    "DatasetService.DeleteDataset": Case(_delete_dataset),
    "DatasetService.UndeleteDataset": Case(_undelete_dataset),
    "DatasetService.AddDatasetInputs": Case(
        fixed("DatasetService.AddDatasetInputs", dataset_id="@other", input_ids=["@img"])
    ),
    "DatasetService.ListDatasetInputs": Case(
        fixed("DatasetService.ListDatasetInputs", dataset_id="@main"),
        values={("page_token",): page_token("DatasetService.ListDatasetInputs")},
    ),
    "DatasetService.GetDatasetInput": Case(
        fixed("DatasetService.GetDatasetInput", dataset_id="@main", input_id="@img")
    ),
    "DatasetService.RemoveDatasetInputs": Case(
        fixed("DatasetService.RemoveDatasetInputs", dataset_id="@other", input_ids=["@img"])
    ),
    "DatasetService.DeleteDatasetInputsByFilter": Case(
        # The empty dataset: whatever the filter, nothing shared is deleted.
        fixed("DatasetService.DeleteDatasetInputsByFilter", dataset_id="@empty", filter={})
    ),
    "DatasetService.MergeDataset": Case(
        fixed(
            "DatasetService.MergeDataset",
            source_dataset_id="@main",
            destination_dataset_id="@other",
        )
    ),
    "DatasetService.ImportDataset": Case(
        # The archive's bytes follow the header (see messages).
        _import_dataset,
        messages=_import_stream,
        values={("chunk",): constant(None)},
    ),
    # --- InputService
    "InputService.CreateInputs": Case(
        fixed(
            "InputService.CreateInputs", inputs=[{"data": {"image": {"base64": PNG}}}], atomic=True
        ),
        stored=("inputs",),
        read_back=_results_inputs_with_regions,
        adjust=_on_fitting_medium,
    ),
    "InputService.UploadInput": Case(
        fixed(
            "InputService.UploadInput", header={"app_id": "@app", "input": {"data": {"image": {}}}}
        ),
        stored=("header", "input"),
        read_back=lambda env, req, resp: _one(get_input(env, resp.input.id)),
        messages=_upload_stream,
        values={
            ("header", "content_length"): _upload_length,
            ("header", "sha256"): _upload_sha256,
            # The stream's bytes: sent after the header (see messages), read back by
            # DownloadInput in test_upload.py.
            ("chunk",): constant(None),
        },
    ),
    "InputService.GetInput": Case(fixed("InputService.GetInput", input_id="@img")),
    "InputService.ListInputs": Case(
        fixed("InputService.ListInputs"),
        values={
            ("page_token",): page_token("InputService.ListInputs"),
            ("ids",): constant(["@img"]),
            ("dataset_id",): constant("@main"),
        },
    ),
    "InputService.UpdateInputs": Case(
        fixed(
            "InputService.UpdateInputs", inputs=[{"id": "@img", "title": "base"}], action=OVERWRITE
        ),
        stored=("inputs",),
        read_back=lambda env, req, resp: _all(get_input(env, i.id) for i in req.inputs),
        values={("update_mask",): mask("title")},
    ),
    "InputService.DeleteInputs": Case(_delete_inputs),
    "InputService.DownloadInput": Case(fixed("InputService.DownloadInput", input_id="@img")),
    "InputService.GetInputDownloadUrl": Case(
        fixed("InputService.GetInputDownloadUrl", input_id="@img")
    ),
    "InputService.ReencodeInputs": Case(
        # A dry run: a real job would re-encode the shared video other cases rely on.
        fixed("InputService.ReencodeInputs", input_ids=["@vid"], dry_run=True)
    ),
    "InputService.GetReencodeJob": Case(_reencode_job("InputService.GetReencodeJob")),
    # No add-by-search job exists in the shared app (its matches are added in the call).
    "SearchService.GetSearchJob": Case(
        fixed("SearchService.GetSearchJob", job_id="1"),
        ends=frozenset({grpc.StatusCode.NOT_FOUND}),
    ),
    "SearchService.SearchInputs": Case(
        fixed("SearchService.SearchInputs"),
        values={
            ("query", "scope", "dataset_id"): constant("@main"),
            ("query", "rank", "input_id"): constant("@img"),
            ("query", "rank", "model_id"): constant(CLIENT_MODEL),
            ("page_token",): page_token("SearchService.SearchInputs"),
        },
        adjust=_ranked_in_the_shared_model,
        # A version of `main` built by another case: none may exist yet.
        ends=frozenset({grpc.StatusCode.NOT_FOUND}),
    ),
    "SearchService.ListEmbeddingModels": Case(fixed("SearchService.ListEmbeddingModels")),
    "SearchService.GetInputEmbeddings": Case(
        fixed("SearchService.GetInputEmbeddings", input_id="@img")
    ),
    "SearchService.FindDuplicates": Case(
        fixed("SearchService.FindDuplicates", scope={"dataset_id": "@main"}, exact_only=True),
        values={("scope", "version_id"): constant("v1")},
    ),
    "InputService.CancelReencodeJob": Case(
        _reencode_job("InputService.CancelReencodeJob"),
        # The job may have ended before the cancel comes.
        ends=frozenset({grpc.StatusCode.FAILED_PRECONDITION}),
    ),
    # --- AnnotationService
    "AnnotationService.CreateAnnotations": Case(
        fixed(
            "AnnotationService.CreateAnnotations",
            annotations=[{"input_id": "@img", "data": {"concepts": [{"id": "c1", "value": 1}]}}],
            atomic=True,
        ),
        stored=("annotations",),
        read_back=_results_annotations,
        adjust=_on_fitting_input,
    ),
    "AnnotationService.GetAnnotation": Case(
        fixed("AnnotationService.GetAnnotation", annotation_id="@a-img")
    ),
    "AnnotationService.ListAnnotations": Case(
        fixed("AnnotationService.ListAnnotations", dataset_id="@main"),
        values={
            ("page_token",): page_token("AnnotationService.ListAnnotations"),
            ("input_ids",): constant(["@img"]),
        },
    ),
    "AnnotationService.UpdateAnnotations": Case(
        fixed(
            "AnnotationService.UpdateAnnotations",
            annotations=[{"id": "@a-img", "data": {"concepts": [{"id": "c1", "value": 1}]}}],
            action=OVERWRITE,
        ),
        stored=("annotations",),
        read_back=lambda env, req, resp: _all(get_annotation(env, a.id) for a in req.annotations),
        values={("update_mask",): mask("data")},
        adjust=_on_fitting_annotation,
    ),
    "AnnotationService.DeleteAnnotations": Case(
        _delete_annotations, values={("input_ids",): constant(["@fresh-input"])}
    ),
    # --- DatasetVersionService
    "DatasetVersionService.CreateDatasetVersion": Case(
        fixed("DatasetVersionService.CreateDatasetVersion", dataset_id="@empty", version={}),
        stored=("version",),
        read_back=lambda env, req, resp: _one(get_version(env, req.dataset_id, resp.version.id)),
    ),
    "DatasetVersionService.GetDatasetVersion": Case(
        _version_request("DatasetVersionService.GetDatasetVersion")
    ),
    "DatasetVersionService.ListDatasetVersions": Case(
        fixed("DatasetVersionService.ListDatasetVersions", dataset_id="@main"),
        values={("page_token",): page_token("DatasetVersionService.ListDatasetVersions")},
    ),
    "DatasetVersionService.UpdateDatasetVersion": Case(
        fixed(
            "DatasetVersionService.UpdateDatasetVersion",
            dataset_id="@main",
            version={"id": "@v1", "description": "base"},
        ),
        stored=("version",),
        read_back=lambda env, req, resp: _one(get_version(env, req.dataset_id, req.version.id)),
        values={("update_mask",): mask("description")},
    ),
    "DatasetVersionService.DeleteDatasetVersion": Case(
        lambda env: _version_of_empty("DatasetVersionService.DeleteDatasetVersion", env)
    ),
    "DatasetVersionService.CancelDatasetVersionBuild": Case(
        lambda env: _version_of_empty("DatasetVersionService.CancelDatasetVersionBuild", env),
        # A version is READY when created: the cancel, once it has read its fields, always
        # ends in VERSION_BUILD_ENDED.
        ends=frozenset({grpc.StatusCode.FAILED_PRECONDITION}),
    ),
    "DatasetVersionService.ExportDatasetVersion": Case(
        _version_request("DatasetVersionService.ExportDatasetVersion", format=PROTOBUF),
        stored=("options",),
        read_back=lambda env, req, resp: _one(_export_options(env, resp.export.id)),
    ),
    "DatasetVersionService.GetExport": Case(
        _version_request("DatasetVersionService.GetExport", export_id="@x1")
    ),
    "DatasetVersionService.ListExports": Case(
        _version_request("DatasetVersionService.ListExports"),
        values={("page_token",): page_token("DatasetVersionService.ListExports")},
    ),
    "DatasetVersionService.DownloadExport": Case(
        _version_request("DatasetVersionService.DownloadExport", export_id="@x1")
    ),
    "DatasetVersionService.DiffDatasetVersions": Case(
        fixed(
            "DatasetVersionService.DiffDatasetVersions",
            dataset_id="@main",
            from_version_id="@v1",
            to_version_id="@v2",
        )
    ),
    # --- OntologyService
    "OntologyService.CreateOntology": Case(
        fixed("OntologyService.CreateOntology", ontology={}),
        stored=("ontology",),
        read_back=lambda env, req, resp: _one(get_ontology(env, resp.ontology.id)),
    ),
    "OntologyService.GetOntology": Case(fixed("OntologyService.GetOntology", ontology_id="@onto")),
    "OntologyService.ListOntologies": Case(
        fixed("OntologyService.ListOntologies"),
        values={("page_token",): page_token("OntologyService.ListOntologies")},
    ),
    "OntologyService.UpdateOntology": Case(
        fixed("OntologyService.UpdateOntology", ontology={"id": "@onto", "description": "base"}),
        stored=("ontology",),
        read_back=lambda env, req, resp: _one(get_ontology(env, req.ontology.id)),
        values={("expected_revision",): _revision, ("update_mask",): mask("description")},
    ),
    "OntologyService.DeleteOntology": Case(_delete_ontology),
    # --- ProjectService
    "ProjectService.CreateProject": Case(
        fixed("ProjectService.CreateProject", project={"ontology_id": "@onto"}),
        stored=("project",),
        read_back=lambda env, req, resp: _one(get_project(env, resp.project.id)),
    ),
    "ProjectService.GetProject": Case(fixed("ProjectService.GetProject", project_id="@proj")),
    "ProjectService.ListProjects": Case(
        fixed("ProjectService.ListProjects"),
        values={("page_token",): page_token("ProjectService.ListProjects")},
    ),
    "ProjectService.UpdateProject": Case(
        fixed("ProjectService.UpdateProject", project={"id": "@proj", "description": "base"}),
        stored=("project",),
        read_back=lambda env, req, resp: _one(get_project(env, req.project.id)),
        values={("update_mask",): mask("description")},
    ),
    "ProjectService.DeleteProject": Case(_delete_project),
    "ProjectService.AttachDataset": Case(
        fixed("ProjectService.AttachDataset", project_id="@proj", dataset_id="@main")
    ),
    "ProjectService.DetachDataset": Case(
        fixed("ProjectService.DetachDataset", project_id="@proj2", dataset_id="@main")
    ),
    "ProjectService.ValidateDataset": Case(
        # Pages continue one rule; "checked" has two labels its (empty) ontology lacks.
        fixed(
            "ProjectService.ValidateDataset",
            dataset_id="@checked",
            rule=project_service_pb2.ONTOLOGY_RULE_UNKNOWN_CLASS,
        ),
        values={("page_token",): page_token("ProjectService.ValidateDataset")},
    ),
}


# --- AccessService: called as the app owner -------------------------------------------------


def _owner(env: Env) -> Caller:
    assert env.owner is not None
    return env.owner


def as_owner(rpc: str, **fields: Any) -> Callable[[Env], Awaitable[Prepared]]:
    """A base request sent with the owner's personal key."""

    async def base(env: Env) -> Prepared:
        return Prepared(env.request(rpc, **_resolve(env, fields)), _owner(env))

    return base


def owner_page_token(rpc: str) -> Callable[[Env, Message], Awaitable[Any]]:
    """`page_token`, as the owner sees the pages."""

    async def value(env: Env, request: Message) -> Any:
        first = copy.deepcopy(request)
        first.page_size = 1  # type: ignore[attr-defined]
        response = await env.call(rpc, first, _owner(env))
        assert response.next_page_token, f"{rpc}: the shared content must fill two pages"
        return response.next_page_token

    return value


async def _fresh_user(env: Env) -> str:
    user_id = env.unique("user-")
    await env.call(
        "AccessService.CreateUser",
        env.request("AccessService.CreateUser", user={"id": user_id}),
        _owner(env),
    )
    return user_id


async def _fresh_collaborator(env: Env) -> str:
    user_id = await _fresh_user(env)
    await env.call(
        "AccessService.AddCollaborator",
        env.request(
            "AccessService.AddCollaborator",
            dataset_id=env.ids["main"],
            collaborator={"user_id": user_id},
        ),
        _owner(env),
    )
    return user_id


async def _fresh_key(env: Env) -> str:
    made = await env.call(
        "AccessService.CreateApiKey",
        env.request(
            "AccessService.CreateApiKey",
            api_key={"kind": access_pb2.KEY_KIND_SCOPED, "access": access_pb2.KEY_ACCESS_READ},
        ),
        _owner(env),
    )
    key_id: str = made.api_key.id
    return key_id


async def _users_named(env: Env, request: Any, response: Any) -> list[Message]:
    listed = await env.call(
        "AccessService.ListUsers",
        env.request("AccessService.ListUsers", page_size=1000),
        _owner(env),
    )
    return [u for u in listed.users if u.id == request.user.id]


async def _collaborators_named(env: Env, request: Any, response: Any) -> list[Message]:
    listed = await env.call(
        "AccessService.ListCollaborators",
        env.request(
            "AccessService.ListCollaborators", dataset_id=request.dataset_id, page_size=1000
        ),
        _owner(env),
    )
    return [c for c in listed.collaborators if c.user_id == request.collaborator.user_id]


async def _key_made(env: Env, request: Any, response: Any) -> list[Message]:
    listed = await env.call(
        "AccessService.ListApiKeys",
        env.request("AccessService.ListApiKeys", page_size=1000),
        _owner(env),
    )
    return [k for k in listed.api_keys if k.id == response.api_key.id]


def _user_request(rpc: str) -> Callable[[Env], Awaitable[Prepared]]:
    """A request naming a user of its own (deleting it must not hurt the next field)."""

    async def base(env: Env) -> Prepared:
        return Prepared(env.request(rpc, user_id=await _fresh_user(env)), _owner(env))

    return base


def _collaborator_request(rpc: str, **fields: Any) -> Callable[[Env], Awaitable[Prepared]]:
    async def base(env: Env) -> Prepared:
        user_id = await _fresh_collaborator(env)
        request = env.request(rpc, dataset_id=env.ids["main"], user_id=user_id, **fields)
        return Prepared(request, _owner(env))

    return base


async def _new_user(env: Env) -> Prepared:
    request = env.request("AccessService.CreateUser", user={"id": env.unique("new-")})
    return Prepared(request, _owner(env))


async def _add_collaborator(env: Env) -> Prepared:
    request = env.request(
        "AccessService.AddCollaborator",
        dataset_id=env.ids["main"],
        collaborator={"user_id": await _fresh_user(env)},
    )
    return Prepared(request, _owner(env))


async def _revoke_key(env: Env) -> Prepared:
    request = env.request("AccessService.RevokeApiKey", key_id=await _fresh_key(env))
    return Prepared(request, _owner(env))


ACCESS_CASES: Mapping[str, Case] = {
    "AccessService.CreateUser": Case(_new_user, stored=("user",), read_back=_users_named),
    "AccessService.ListUsers": Case(
        as_owner("AccessService.ListUsers"),
        values={("page_token",): owner_page_token("AccessService.ListUsers")},
    ),
    "AccessService.UpdateUser": Case(
        as_owner("AccessService.UpdateUser", user={"id": "@member", "display_name": "base"}),
        stored=("user",),
        read_back=_users_named,
        values={("update_mask",): mask("display_name")},
    ),
    "AccessService.DeleteUser": Case(_user_request("AccessService.DeleteUser")),
    "AccessService.AddCollaborator": Case(
        _add_collaborator, stored=("collaborator",), read_back=_collaborators_named
    ),
    "AccessService.ListCollaborators": Case(
        as_owner("AccessService.ListCollaborators", dataset_id="@main"),
        values={("page_token",): owner_page_token("AccessService.ListCollaborators")},
    ),
    "AccessService.UpdateCollaborator": Case(
        _collaborator_request(
            "AccessService.UpdateCollaborator", role=access_pb2.DATASET_ROLE_ADMIN
        )
    ),
    "AccessService.RemoveCollaborator": Case(
        _collaborator_request("AccessService.RemoveCollaborator")
    ),
    "AccessService.CreateApiKey": Case(
        as_owner(
            "AccessService.CreateApiKey",
            api_key={"kind": access_pb2.KEY_KIND_SCOPED, "access": access_pb2.KEY_ACCESS_READ},
        ),
        stored=("api_key",),
        read_back=_key_made,
    ),
    "AccessService.ListApiKeys": Case(
        as_owner("AccessService.ListApiKeys"),
        values={("page_token",): owner_page_token("AccessService.ListApiKeys")},
    ),
    "AccessService.RevokeApiKey": Case(_revoke_key),
    "AccessService.ListAuditEvents": Case(
        as_owner("AccessService.ListAuditEvents"),
        values={("page_token",): owner_page_token("AccessService.ListAuditEvents")},
    ),
}
# Beside the others: their helpers need the owner, whom shared_app makes last.
CASES = {**CASES, **ACCESS_CASES}


async def _one(found: Awaitable[Message]) -> list[Message]:
    return [await found]


async def _all(found: Iterator[Awaitable[Message]]) -> list[Message]:
    return [await item for item in found]


async def _export_options(env: Env, export_id: str) -> Message:
    export: Any = await _get_export(env, export_id)
    options: Message = export.options
    return options


# --- one field --------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    path: str
    verdict: str  # "stored", "refused", "parameter", "covered" (by a refused parent)
    detail: str = ""
    refused_at: tuple[str, ...] = ()


def _holder(message: Message, path: Path, *, through_unset: bool) -> Message | None:
    """The message holding the last field of `path`, through the first item of each
    repeated field on the way: None where one is empty, or where a message on the way is
    not set, unless `through_unset` (its defaults are read then)."""
    for name in path[:-1]:
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.is_repeated:
            items = getattr(message, name)
            if not items:
                return None
            message = items[0]
        elif through_unset or message.HasField(name):
            message = getattr(message, name)
        else:
            return None
    return message


def _is_set_in(message: Message, path: Path) -> bool:
    holder = _holder(message, path, through_unset=False)
    return holder is not None and any(f.name == path[-1] for f, _ in holder.ListFields())


def _set(env: Env, message: Message, path: Path, value: Any) -> None:
    """Sets the field at `path`, creating valid parents from templates on the way."""
    for name in path[:-1]:
        _exclusive(message, name)
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.is_repeated:
            items = getattr(message, name)
            if not items:
                items.append(_template(nested(field).full_name))
            message = items[0]
        else:
            if not message.HasField(name):
                getattr(message, name).CopyFrom(_template(nested(field).full_name))
            message = getattr(message, name)
    name = path[-1]
    _exclusive(message, name)
    field = message.DESCRIPTOR.fields_by_name[name]
    target = getattr(message, name)
    if _is_map(field):
        target.clear()
        for key, item in value.items():
            if isinstance(item, Message):
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        del target[:]
        target.extend(value if isinstance(value, list) else [value])
    elif isinstance(value, Message):
        target.CopyFrom(value)
    else:
        setattr(message, name, value)


def _exclusive(message: Message, name: str) -> None:
    group = EXCLUSIVE.get(message.DESCRIPTOR.full_name, frozenset())
    if name in group:
        for other in group - {name}:
            message.ClearField(other)


def _get(message: Message, path: Path) -> Any:
    holder = _holder(message, path, through_unset=True)
    return None if holder is None else getattr(holder, path[-1])


def _same(given: Any, found: Any) -> bool:
    if found is None:  # a repeated message on the way is empty: nothing was kept
        return False
    if isinstance(given, Message) and isinstance(found, Message):
        return json_format.MessageToDict(given) == json_format.MessageToDict(found)
    if isinstance(given, float) and isinstance(found, float):
        return math.isclose(given, found, rel_tol=1e-6)
    if hasattr(given, "items"):
        return _same_map(given, found)
    if hasattr(given, "__len__") and not isinstance(given, (str, bytes)):
        return len(given) == len(found) and all(
            _same(a, b) for a, b in zip(given, found, strict=True)
        )
    return bool(given == found)


def _same_map(given: Any, found: Any) -> bool:
    return set(given) == set(found) and all(_same(given[k], found[k]) for k in given)


async def _stored_media(stored: Message, path: Path, given: Any) -> bool:
    """Media bytes are not echoed: they are there when the medium's download URL serves
    them (inputs and dataset covers answer with that URL)."""
    if path[-1] not in ("base64", "raw"):
        return False
    medium = _get(stored, (*path[:-1], "url"))
    if not medium:
        return False
    expected = given.encode() if isinstance(given, str) else given
    return bool(await asyncio.to_thread(download, medium) == expected)


def _violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return details_of(error).fields


def _names(violation: str, path: str) -> bool:
    """Whether a violation at `violation` names the field at `path` (or the field holding
    it, or something inside it)."""
    plain = re.sub(r"\[[^\]]*\]", "", violation)
    target = re.sub(r"\[[^\]]*\]", "", path)
    return plain == target or target.startswith(plain + ".") or plain.startswith(target + ".")


def _within(path: str, parent: str) -> bool:
    """Whether `path` is `parent` or inside it."""
    return path == parent or path.startswith((parent + ".", parent + "["))


async def check_field(env: Env, rpc: str, case: Case, path: Path) -> Outcome:
    method = RPCS[rpc]
    where = shown(path, method.input_type)
    prepared = await case.base(env)
    request = copy.deepcopy(prepared.request)
    if not _is_set_in(request, path):
        provider = case.values.get(path)
        if provider is not None:
            value = await provider(env, request)
            if value is None:
                return Outcome(where, "parameter", "set by the stream")
        else:
            field = field_at(method.input_type, path)
            make = VALUES.get((owner(field), field.name))
            value = make(env) if make is not None else default_value(env, field)
        _set(env, request, path, value)
    if case.adjust is not None:
        case.adjust(env, request)
    sent: Message | list[Message] = (
        case.messages(env, request) if case.messages is not None else request
    )
    try:
        response = await env.call(rpc, sent, prepared.caller)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            named = {v: d for v, d in _violations(error).items() if _names(v, where)}
            if named:
                detail = "; ".join(f"{v}: {d}" for v, d in named.items())
                return Outcome(where, "refused", detail, tuple(named))
        if error.code() in case.ends:
            return Outcome(where, "parameter", error.code().name)
        raise AssertionError(
            f"{rpc} with {where} set: {error.code().name} {error.details()} "
            f"{_violations(error)}; the test's value is wrong (fix VALUES or the case)"
        ) from None
    stored = case.stored
    if not stored or path[: len(stored)] != stored:
        return Outcome(where, "parameter")
    assert case.read_back is not None, f"{rpc} stores {stored} but has no read_back"
    given_holder = request
    for name in stored:
        given_holder = getattr(given_holder, name)
    holders = list(given_holder) if not isinstance(given_holder, Message) else [given_holder]
    found = await case.read_back(env, request, response)
    inner = path[len(stored) :]
    for index, (given, read) in enumerate(zip(holders, found, strict=True)):
        value = _get(given, inner)
        if _same(value, _get(read, inner)) or await _stored_media(read, inner, value):
            continue
        raise AssertionError(
            f"{rpc}: {where} was accepted but is not returned (item {index}): sent "
            f"{value!r}, read back {_get(read, inner)!r}"
        )
    return Outcome(where, "stored")


async def check_rpc(env: Env, rpc: str) -> list[Outcome]:
    case = CASES.get(rpc)
    assert case is not None, (
        f"{rpc} has no case in test_field_roundtrip.CASES: add how to make a valid request "
        "and, if it stores something, how to read it back"
    )
    outcomes: list[Outcome] = []
    refused: list[str] = []
    descriptor = RPCS[rpc].input_type
    for path in leaves(descriptor):
        where = shown(path, descriptor)
        # A field inside a refused one is refused with it: a caller cannot set it alone.
        if any(_within(where, parent) for parent in refused):
            outcomes.append(Outcome(where, "covered"))
            continue
        try:
            outcome = await check_field(env, rpc, case, path)
        except AssertionError as failure:
            outcome = Outcome(where, "failed", str(failure))
        refused.extend(outcome.refused_at)
        outcomes.append(outcome)
    return outcomes


# --- the shared app ---------------------------------------------------------------------------


async def shared_app(channel: grpc.aio.Channel, db: Database) -> Env:
    env = Env(await new_caller(db), channel, db)
    env.ids["app"] = env.caller.app_id
    async with db.transaction():
        secret = await ensure_bootstrap_key(
            PgApiKeyRepository(db), PgUserRepository(db), env.caller.app_id, None
        )
    assert secret is not None
    env.owner = Caller(env.caller.app_id, secret)
    for name in ("main", "other", "empty", "patched"):
        env.ids[name] = name
        await env.send("DatasetService.CreateDataset", dataset={"id": name})
    media = {
        "img": {
            "image": {"base64": PNG},
            "embeddings": [{"model_id": CLIENT_MODEL, "vector": [0.5]}],
        },
        "txt": {"text": {"raw": TEXT}},
        "vid": {"video": {"base64": mp4()}},
    }
    await env.send(
        "InputService.CreateInputs",
        inputs=[
            {"id": name, "data": data, "dataset_ids": ["main", "other"]}
            for name, data in media.items()
        ],
        atomic=True,
    )
    for name in media:
        env.ids[name] = name
        env.ids[f"a-{name}"] = f"a-{name}"
    await env.send(
        "AnnotationService.CreateAnnotations",
        annotations=[
            {
                "id": f"a-{name}",
                "input_id": name,
                "data": {"concepts": [{"id": "c1", "value": 1}]},
            }
            for name in media
        ],
        atomic=True,
    )
    for ontology_id in ("onto", "onto2"):
        env.ids[ontology_id] = ontology_id
        await env.send("OntologyService.CreateOntology", ontology={"id": ontology_id})
    for project_id in ("proj", "proj2"):
        env.ids[project_id] = project_id
        await env.send(
            "ProjectService.CreateProject", project={"id": project_id, "ontology_id": "onto"}
        )
    # A dataset of its own inputs, labelled before it joins a project whose ontology lacks
    # the label: what ValidateDataset reports.
    env.ids["checked"] = "checked"
    await env.send("DatasetService.CreateDataset", dataset={"id": "checked"})
    await env.send(
        "InputService.CreateInputs",
        inputs=[
            {"id": f"checked-{n}", "data": media["img"], "dataset_ids": ["checked"]}
            for n in range(2)
        ],
        atomic=True,
    )
    await env.send(
        "AnnotationService.CreateAnnotations",
        annotations=[
            {"input_id": f"checked-{n}", "data": {"concepts": [{"id": "c1", "value": 1}]}}
            for n in range(2)
        ],
        atomic=True,
    )
    await env.send("ProjectService.CreateProject", project={"id": "checker", "ontology_id": "onto"})
    await env.send("ProjectService.AttachDataset", project_id="checker", dataset_id="checked")
    for version_id in ("v1", "v2"):
        env.ids[version_id] = version_id
        await env.send(
            "DatasetVersionService.CreateDatasetVersion",
            dataset_id="main",
            version={"id": version_id},
        )
        await _until(functools.partial(get_version, env, "main", version_id), READY)
    exports = {}
    for name, export_format in (("x1", PROTOBUF), ("x2", dataset_version_pb2.EXPORT_FORMAT_COCO)):
        response = await env.send(
            "DatasetVersionService.ExportDatasetVersion",
            dataset_id="main",
            version_id="v1",
            format=export_format,
            # Embedded media make the archive importable (references are not URLs).
            options={"embed_media": True},
        )
        env.ids[name] = response.export.id
        exports[name] = await _until(functools.partial(_get_export, env, env.ids[name]), EXPORTED)
    env.archive = await asyncio.to_thread(download, exports["x1"].url)
    # Users, collaborators and keys filling two pages each.
    env.ids["member"] = await _fresh_user(env)
    for _ in range(2):
        await _fresh_collaborator(env)
    await _fresh_key(env)
    return env


async def _get_export(env: Env, export_id: str) -> Message:
    response = await env.send(
        "DatasetVersionService.GetExport", dataset_id="main", version_id="v1", export_id=export_id
    )
    export: Message = response.export
    return export


async def _until(get: Callable[[], Awaitable[Any]], wanted: int) -> Any:
    """Polls a version or an export until its status code is `wanted`."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        found = await get()
        if found.status.code == wanted:
            return found
        assert asyncio.get_running_loop().time() < deadline, f"still {found}"
        await asyncio.sleep(0.05)


# --- the test ---------------------------------------------------------------------------------


async def test_every_request_field_is_stored_or_refused(
    channel: grpc.aio.Channel, db: Database
) -> None:
    env = await shared_app(channel, db)
    missing = sorted(set(RPCS) - set(CASES))
    assert not missing, f"RPCs with no case in CASES (add one): {missing}"
    stale = sorted(set(CASES) - set(RPCS))
    assert not stale, f"CASES for RPCs that no longer exist: {stale}"
    # RPCs run two at a time; the fields of one RPC one after another, because the
    # updates of one RPC patch the same shared resource and read it back.
    limit = asyncio.Semaphore(2)

    async def one(rpc: str) -> list[Outcome]:
        async with limit:
            return await check_rpc(env, rpc)

    results = await asyncio.gather(*(one(rpc) for rpc in RPCS))
    by_rpc = dict(zip(RPCS, results, strict=True))
    verdicts = [o.verdict for outcomes in results for o in outcomes]
    print(
        f"{len(RPCS)} RPCs, {len(verdicts)} fields: "
        + ", ".join(f"{v} {verdicts.count(v)}" for v in sorted(set(verdicts)))
    )
    failures = [o.detail for outcomes in results for o in outcomes if o.verdict == "failed"]
    assert not failures, f"{len(failures)} fields failed:\n" + "\n".join(failures)
    # The issue's own examples, so that a loosened policy cannot pass unnoticed.
    create_inputs = {o.path: o for o in by_rpc["InputService.CreateInputs"]}
    # Regions and frames sent with an input are its annotation (issue 10).
    for path in ("inputs[0].data.regions[0].id", "inputs[0].data.frames[0].id"):
        assert create_inputs[path].verdict == "stored", create_inputs[path]
    patched_regions = [
        o
        for o in by_rpc["InputService.UpdateInputs"]
        if o.path.startswith("inputs[0].data.regions")
    ]
    assert patched_regions[0].verdict == "refused", patched_regions[0]
    assert "CreateAnnotations" in patched_regions[0].detail, patched_regions[0]
    # A size is the caller's to give for URL images only (issue 10): these are bytes.
    image_info = create_inputs["inputs[0].data.image.image_info.width"]
    assert image_info.verdict == "refused" and "uploaded bytes" in image_info.detail, image_info
    # Vectors of client models are the input's (issue 11), never an annotation's.
    embeddings = create_inputs["inputs[0].data.embeddings[0].vector"]
    assert embeddings.verdict == "stored", embeddings
    in_region = create_inputs["inputs[0].data.regions[0].data.embeddings[0].vector"]
    assert in_region.verdict == "refused", in_region
    assert create_inputs["inputs[0].data.metadata"].verdict == "stored"
    create_annotations = {o.path: o for o in by_rpc["AnnotationService.CreateAnnotations"]}
    assert create_annotations["annotations[0].data.regions[0].id"].verdict == "stored"


@pytest.mark.parametrize(
    ("rpc", "resource", "set_field", "mask_path"),
    [
        ("DatasetService.UpdateDataset", ("dataset",), ("notes",), "description"),
        ("InputService.UpdateInputs", ("inputs",), ("data", "metadata"), "title"),
        ("AnnotationService.UpdateAnnotations", ("annotations",), ("annotation_info",), "data"),
        ("DatasetVersionService.UpdateDatasetVersion", ("version",), ("metadata",), "description"),
        ("OntologyService.UpdateOntology", ("ontology",), ("description",), "classes"),
        ("ProjectService.UpdateProject", ("project",), ("description",), "ontology_id"),
    ],
)
async def test_a_field_outside_the_update_mask_is_refused(
    channel: grpc.aio.Channel,
    db: Database,
    rpc: str,
    resource: Path,
    set_field: Path,
    mask_path: str,
) -> None:
    """With an update_mask, a patchable field set beside it is refused, not skipped."""
    env = Env(await new_caller(db), channel, db)
    env.ids.update({k: k for k in ("patched", "main", "img", "a-img", "v1", "onto", "proj")})
    env.ids["app"] = env.caller.app_id
    case = CASES[rpc]
    request = copy.deepcopy((await case.base(env)).request)
    request.update_mask.paths.append(mask_path)  # type: ignore[attr-defined]
    descriptor = RPCS[rpc].input_type
    path = (*resource, *set_field)
    field = field_at(descriptor, path)
    make = VALUES.get((owner(field), field.name))
    _set(env, request, path, make(env) if make is not None else default_value(env, field))
    try:
        await env.call(rpc, request)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        where = shown(path, descriptor)
        assert "not in update_mask" in _violations(error).get(where, ""), _violations(error)
        return
    raise AssertionError(f"{rpc} accepted {path} outside update_mask {mask_path!r}")
