"""`clarifai.api.V2` on the gRPC server: every method of the service answers, those of the
subset from the parts that implement them, every other one in-band with NOT_IMPLEMENTED
("not supported by datasetd"), never gRPC's bare UNIMPLEMENTED, which the SDK raises from a
worker thread."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from clarifai_grpc.grpc.api import service_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from service.api.clarifai import status
from service.api.interceptors import Context
from service.api.links import DownloadLinks
from service.observability import REQUEST_ID

V2 = service_pb2.DESCRIPTOR.services_by_name["V2"]
SERVICE_NAME = V2.full_name
PATH_PREFIX = f"/{SERVICE_NAME}/"

Handler = Callable[[Any, Context | None], Awaitable[Message]]


def message_class(descriptor: Any) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def method_of(path: str) -> MethodDescriptor | None:
    """The V2 method of a gRPC path (`/clarifai.api.V2/PostInputs`)."""
    if not path.startswith(PATH_PREFIX):
        return None
    method: MethodDescriptor | None = V2.methods_by_name.get(path[len(PATH_PREFIX) :])
    return method


def in_band_failure(path: str) -> Callable[[Exception], Message] | None:
    """For a V2 path, how a failed call answers: its response type with the status of
    the error (authentication failures included); None for any other path."""
    method = method_of(path)
    if method is None:
        return None
    response_type = message_class(method.output_type)
    invalid = invalid_code(method.name)

    def respond(error: Exception) -> Message:
        return status.with_status(
            response_type, status.of_error(error, REQUEST_ID.get(), invalid=invalid)
        )

    return respond


def invalid_code(method: str) -> int:
    """The code of a refused value in a request of `method`: Clarifai has one per resource
    (a NaN in a box of PostAnnotations is ANNOTATION_INVALID_ARGUMENT), the generic
    CONN_INVALID_REQUEST elsewhere."""
    code: int = status.INVALID_REQUEST
    if "Annotation" in method:
        code = status.ANNOTATION_INVALID_ARGUMENT
    elif "Input" in method and "Dataset" not in method:
        code = status.INPUT_INVALID_ARGUMENT
    return code


def _with_links(handler: Handler) -> Handler:
    """Clarifai clients get media as links of the HTTP port (fetched with their key), so
    the native parts beneath do not presign object-store URLs for them."""

    @functools.wraps(handler)
    async def linked(request: Any, context: Context | None) -> Message:
        with DownloadLinks.wanted():
            return await handler(request, context)

    return linked


class V2Handlers:
    """The V2 methods of the parts (each method owned by exactly one part)."""

    def __init__(self, parts: Iterable[object]) -> None:
        self.handlers: dict[str, Handler] = {}
        for method in V2.methods:
            owners = [part for part in parts if callable(getattr(part, method.name, None))]
            if len(owners) > 1:
                raise RuntimeError(f"{method.full_name} is implemented by {len(owners)} parts")
            if owners:
                self.handlers[method.name] = _with_links(getattr(owners[0], method.name))

    def handler(self, method: MethodDescriptor) -> Handler:
        own = self.handlers.get(method.name)
        if own is not None:
            return own
        response_type = message_class(method.output_type)

        async def unsupported(request: Any, context: Context | None) -> Message:
            return status.with_status(
                response_type, status.not_supported(method.name, REQUEST_ID.get())
            )

        return unsupported

    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers = {method.name: self._rpc_handler(method) for method in V2.methods}
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    def _rpc_handler(self, method: MethodDescriptor) -> grpc.RpcMethodHandler[Any, Any]:
        codec: dict[str, Any] = {
            "request_deserializer": message_class(method.input_type).FromString,
            "response_serializer": message_class(method.output_type).SerializeToString,
        }
        if not method.client_streaming and not method.server_streaming:
            return grpc.unary_unary_rpc_method_handler(self.handler(method), **codec)
        # The streaming methods (model outputs, logs, uploads of models) are all outside
        # the subset: one in-band answer each.
        unsupported = self.handler(method)

        async def answer_stream(request: Any, context: Context) -> AsyncIterator[Message]:
            yield await unsupported(request, context)

        if method.server_streaming and method.client_streaming:
            return grpc.stream_stream_rpc_method_handler(answer_stream, **codec)
        if method.server_streaming:
            return grpc.unary_stream_rpc_method_handler(answer_stream, **codec)
        return grpc.stream_unary_rpc_method_handler(unsupported, **codec)
