"""Clarifai's REST/JSON API on the HTTP port: the `google.api.http` rules of clarifai-grpc's
V2 descriptor, answered by the same V2 methods as the gRPC port.

A call goes through the interceptor's per-call part (`Call`): request id, authentication
(`Authorization: Key <api key>` only), the boundary check, in-band failures, the access log
and the RPC metrics, under the gRPC method name (`/clarifai.api.V2/ListDatasets`). The
response is the method's response as proto JSON (field names as in the protos, enums as
numbers), with the HTTP status of its Clarifai status code."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

from aiohttp import web
from google.api import annotations_pb2  # type: ignore[import-untyped]
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from service.api.access_policy import InputDatasets
from service.api.boundary import check_request
from service.api.clarifai import status
from service.api.clarifai.service import (
    SERVICE_NAME,
    V2,
    V2Handlers,
    in_band_failure,
    message_class,
)
from service.api.interceptors import Call
from service.domain.auth import Authenticator, parse_authorization
from service.domain.errors import DomainError, FieldViolation, InvalidArgument, Unauthenticated
from service.domain.ports import AuditRepository
from service.observability import REQUEST_ID

PREFIX = "/v2"
# A request the gateway cannot read (JSON, query values): CONN_BAD_REQUEST_FORMAT, where a
# value the method refuses is CONN_INVALID_REQUEST as on the gRPC port.
MALFORMED = "MALFORMED_REST_REQUEST"
_VARIABLE = re.compile(r"\{([\w.]+)\}")
_VERBS = ("get", "put", "post", "delete", "patch")
_CPP = FieldDescriptor
_INT_RANGES: dict[int, tuple[int, int, str]] = {
    _CPP.CPPTYPE_INT32: (-(2**31), 2**31 - 1, "a 32-bit integer"),
    _CPP.CPPTYPE_INT64: (-(2**63), 2**63 - 1, "a 64-bit integer"),
    _CPP.CPPTYPE_UINT32: (0, 2**32 - 1, "an unsigned 32-bit integer"),
    _CPP.CPPTYPE_UINT64: (0, 2**64 - 1, "an unsigned 64-bit integer"),
}
_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def malformed(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field}: {description}",
        reason=MALFORMED,
        violations=[FieldViolation(field, description)],
    )


@dataclass(frozen=True)
class Route:
    """One binding of a V2 method's http rule: `GET /v2/datasets/{dataset_id}`."""

    verb: str
    template: str
    # Per path segment: its literal text, or None where a variable is.
    segments: tuple[str | None, ...]
    # Segment index → the request field the variable fills (`user_app_id.app_id`).
    variables: tuple[tuple[int, str], ...]
    method: MethodDescriptor
    # "*" (the whole request is the JSON body) or "" (none; query parameters).
    body: str
    served: bool
    order: int

    @classmethod
    def parse(
        cls, verb: str, template: str, method: MethodDescriptor, body: str, served: bool, order: int
    ) -> Route:
        segments: list[str | None] = []
        variables: list[tuple[int, str]] = []
        for index, segment in enumerate(template.strip("/").split("/")):
            variable = _VARIABLE.fullmatch(segment)
            if variable is None:
                segments.append(segment)
            else:
                segments.append(None)
                variables.append((index, variable.group(1)))
        return cls(
            verb.upper(), template, tuple(segments), tuple(variables), method, body, served, order
        )

    @property
    def precedence(self) -> tuple[Any, ...]:
        """Sorts the routes that match a path best first: a literal segment beats a
        variable at the first place they differ (`inputs/status` before
        `inputs/{input_id}`), then a served method, then the descriptor's order."""
        return (tuple(s is None for s in self.segments), not self.served, self.order)

    def match(self, parts: Sequence[str]) -> dict[str, str] | None:
        """The path variables when `parts` (decoded segments) fit this template."""
        if len(parts) != len(self.segments):
            return None
        for part, literal in zip(parts, self.segments, strict=True):
            if (literal is None and not part) or (literal is not None and part != literal):
                return None
        return {name: parts[index] for index, name in self.variables}


class Routes:
    """Every binding of every V2 method, by path length."""

    def __init__(self, served: Collection[str]) -> None:
        by_length: defaultdict[int, list[Route]] = defaultdict(list)
        order = 0
        for method in V2.methods:
            rule = method.GetOptions().Extensions[annotations_pb2.http]
            for binding in (rule, *rule.additional_bindings):
                verb = binding.WhichOneof("pattern")
                if verb not in _VERBS:
                    continue  # `custom` verbs: none in V2
                route = Route.parse(
                    verb,
                    getattr(binding, verb),
                    method,
                    binding.body,
                    method.name in served,
                    order,
                )
                order += 1
                by_length[len(route.segments)].append(route)
        self._by_length = {n: sorted(rs, key=lambda r: r.precedence) for n, rs in by_length.items()}

    def find(self, verb: str, parts: Sequence[str]) -> tuple[Route, dict[str, str]] | list[str]:
        """The route for `verb` at `parts` and its variables, else the verbs that path
        takes (empty: no V2 method lives there)."""
        verbs: list[str] = []
        for route in self._by_length.get(len(parts), ()):
            params = route.match(parts)
            if params is None:
                continue
            if route.verb == verb:
                return route, params
            if route.verb not in verbs:
                verbs.append(route.verb)
        return verbs


def path_parts(raw_path: str) -> list[str]:
    """The decoded segments of a raw (percent-encoded) path; one trailing slash allowed."""
    parts = raw_path.split("/")[1:]
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    return [unquote(part) for part in parts]


def key_only(values: list[str]) -> str:
    """The secret of `Authorization: Key <api key>`, the one scheme of Clarifai's REST API."""
    secret = parse_authorization(values)
    if values[0].strip().partition(" ")[0].lower() != "key":
        raise Unauthenticated("`Authorization` must be `Key <api key>`", reason="MALFORMED_API_KEY")
    return secret


def _field(message: Message, name: str) -> FieldDescriptor | None:
    descriptor = message.DESCRIPTOR
    found = descriptor.fields_by_name.get(name) or descriptor.fields_by_camelcase_name.get(name)
    return cast(FieldDescriptor | None, found)


def _scalar(field: FieldDescriptor, name: str, value: str) -> Any:
    """`value` (text of a query parameter or path segment) as the value of `field`."""
    cpp = field.cpp_type
    if cpp == _CPP.CPPTYPE_STRING:
        if field.type != _CPP.TYPE_BYTES:
            return value
        # Standard or URL-safe alphabet, padded or not.
        text = value.replace("+", "-").replace("/", "_")
        try:
            return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
        except binascii.Error:
            raise malformed(name, f"{value!r} is not base64") from None
    if cpp == _CPP.CPPTYPE_BOOL:
        flag = _BOOLS.get(value.lower())
        if flag is None:
            raise malformed(name, f"{value!r} is not a boolean (true or false)")
        return flag
    if cpp in _INT_RANGES:
        low, high, what = _INT_RANGES[cpp]
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise malformed(name, f"{value!r} is not {what}")
        return number
    if cpp in (_CPP.CPPTYPE_DOUBLE, _CPP.CPPTYPE_FLOAT):
        try:
            return float(value)
        except ValueError:
            raise malformed(name, f"{value!r} is not a number") from None
    enum = field.enum_type
    if cpp == _CPP.CPPTYPE_ENUM and enum is not None:
        named = enum.values_by_name.get(value)
        if named is not None:
            return named.number
        if value.lstrip("-").isdigit() and int(value) in enum.values_by_number:
            return int(value)
        raise malformed(name, f"{value!r} is not a value of {enum.full_name}")
    raise malformed(name, "is a message: set its fields by their dotted names")


def assign(message: Message, name: str, values: Sequence[str]) -> bool:
    """Sets the field at dotted `name` (snake_case or lowerCamelCase) from text values;
    False when `message` has no such field."""
    target = message
    *path, last = name.split(".")
    for part in path:
        field = _field(target, part)
        if field is None:
            return False
        if field.message_type is None or field.is_repeated:
            raise malformed(name, f"{part} is not a single message: it has no fields to set")
        target = getattr(target, field.name)
    field = _field(target, last)
    if field is None:
        return False
    if field.is_repeated:
        if field.message_type is not None:
            raise malformed(name, "is a list of messages: send it in a JSON body")
        getattr(target, field.name).extend(_scalar(field, name, v) for v in values)
        return True
    if len(values) > 1:
        raise malformed(name, f"takes one value, got {len(values)}")
    setattr(target, field.name, _scalar(field, name, values[0]))
    return True


def parse_body(raw: bytes, message: Message) -> None:
    """Fills `message` from a JSON body; unknown fields are ignored, as Clarifai does."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise malformed("body", f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise malformed("body", f"must be a JSON object, got {type(data).__name__}")
    try:
        json_format.ParseDict(data, message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise malformed("body", str(exc)) from None


def build_request(
    route: Route, params: Mapping[str, str], body: bytes, query: Mapping[str, list[str]]
) -> Message:
    """The request message of `route`: the JSON body, then the query parameters, then
    the path variables (which win, as the URL names the resource)."""
    message = message_class(route.method.input_type)()
    if route.body:
        if body.strip():
            target = message if route.body == "*" else getattr(message, route.body)
            parse_body(body, target)
    elif body.strip() not in (b"", b"{}"):
        raise malformed(
            "body",
            f"{route.verb} {route.template} takes no body: send the fields as query parameters",
        )
    for name, values in query.items():
        # Unknown names are ignored like unknown JSON fields.
        assign(message, name, values)
    for name, value in params.items():
        assign(message, name, [value])
    return message


class _Headers:
    """The `Transport` of a REST call: its trailing metadata become response headers."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str]]) -> None:
        # Replaced whole, as gRPC's trailing metadata is (the last set wins).
        self.headers = dict(trailing_metadata)

    def code(self) -> None:
        return None

    async def abort(self, *args: object, **kwargs: object) -> Any:
        # Every REST call answers in-band; reaching here is a bug in the gateway.
        raise RuntimeError("a REST call cannot be aborted")


def _in_band(method: MethodDescriptor) -> Callable[[Exception], Message]:
    """As the gRPC path answers a failure of `method`, but an unreadable body or query is
    CONN_BAD_REQUEST_FORMAT."""
    path = f"/{SERVICE_NAME}/{method.name}"
    respond = in_band_failure(path)
    assert respond is not None
    response_type = message_class(method.output_type)

    def answer(error: Exception) -> Message:
        if isinstance(error, InvalidArgument) and error.reason == MALFORMED:
            unreadable = status.of_error(error, REQUEST_ID.get(), invalid=status.BAD_REQUEST_FORMAT)
            return status.with_status(response_type, unreadable)
        return respond(error)

    return answer


def as_json(message: Message) -> dict[str, Any]:
    """Proto JSON with the protos' field names and enums as numbers, as Clarifai's REST
    API answers (clients compare `status.code` with 10000)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, use_integers_for_enums=True
    )


def _json(message: Message, http_status: int, headers: Mapping[str, str]) -> web.Response:
    return web.json_response(as_json(message), status=http_status, headers=headers)


class RestGateway:
    def __init__(
        self,
        handlers: V2Handlers,
        authenticator: Authenticator,
        max_body_bytes: int,
        audit: AuditRepository | None = None,
        inputs: InputDatasets | None = None,
    ) -> None:
        self.handlers = handlers
        self.authenticator = authenticator
        self.max_body_bytes = max_body_bytes
        self.audit = audit
        self.inputs = inputs
        self.routes = Routes(handlers.handlers)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        found = self.routes.find(request.method, path_parts(request.rel_url.raw_path))
        if isinstance(found, list):
            return self._no_route(request, found)
        route, params = found
        # A task of its own: the call sets context variables (caller, request id) that
        # must not outlive it on a kept-alive connection.
        return await asyncio.create_task(self._call(route, params, request))

    def _no_route(self, request: web.Request, verbs: list[str]) -> web.Response:
        request_id = uuid.uuid4().hex
        where = f"{request.method} {request.rel_url.path}"
        if verbs:
            answer = status.make(
                status.INVALID_REQUEST,
                "Method not allowed",
                f"{where}: this path takes {', '.join(verbs)}",
                request_id,
            )
            answer.http_status_code = 405
            headers = {"X-Request-Id": request_id, "Allow": ", ".join(verbs)}
        else:
            answer = status.make(
                status.DOES_NOT_EXIST,
                "Not found",
                f"{where}: no Clarifai API method at this path",
                request_id,
            )
            headers = {"X-Request-Id": request_id}
        body = {"status": as_json(answer)}
        return web.json_response(body, status=answer.http_status_code, headers=headers)

    async def _call(
        self, route: Route, params: dict[str, str], request: web.Request
    ) -> web.Response:
        method = route.method
        transport = _Headers()
        metadata = tuple((k.lower(), v) for k, v in request.headers.items())
        call = Call(
            self.authenticator,
            f"/{SERVICE_NAME}/{method.name}",
            metadata,
            _in_band(method),
            parse=key_only,
            audit=self.audit,
            inputs=self.inputs,
        )
        with contextlib.suppress(DomainError, ValueError, TypeError):
            # The app the path names, to record a call refused before authentication.
            call.note_request(build_request(route, params, b"", {}))
        answer: Message | None = None
        async with call.running(transport) as began:
            if began:
                body = await self._body(request)
                query = {k: request.rel_url.query.getall(k) for k in request.rel_url.query}
                message = await call.admitted(build_request(route, params, body, query))
                check_request(message)
                answer = call.answered(await self.handlers.handler(method)(message, None))
        if answer is None:
            answer = call.answer
        assert answer is not None  # `running` sets it on every failure
        code: int = answer.status.code  # type: ignore[attr-defined]
        return _json(answer, status.http_status(code), transport.headers)

    async def _body(self, request: web.Request) -> bytes:
        limit = self.max_body_bytes
        too_large = malformed("body", f"is larger than {limit} bytes (DATASETD_MAX_MESSAGE_BYTES)")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        # Read from the stream: aiohttp's read() stops at client_max_size (1 MiB), far
        # below a batch of inputs with their bytes inline.
        data = bytearray()
        async for chunk in request.content.iter_chunked(1 << 16):
            data += chunk
            if len(data) > limit:
                raise too_large
        return bytes(data)


def add_rest_routes(
    app: web.Application,
    handlers: V2Handlers,
    authenticator: Authenticator,
    max_body_bytes: int,
    audit: AuditRepository | None = None,
    inputs: InputDatasets | None = None,
) -> None:
    """Serves Clarifai's REST paths (under /v2) on `app`."""
    gateway = RestGateway(handlers, authenticator, max_body_bytes, audit, inputs)
    app.router.add_route("*", PREFIX, gateway.handle)
    app.router.add_route("*", PREFIX + "/{tail:.*}", gateway.handle)
