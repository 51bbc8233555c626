"""Server reflection that keeps the .proto comments of our own files.

The standard servicer (`grpc_reflection.v1alpha.reflection`) answers with
`FileDescriptorProto`s rebuilt by `FileDescriptor.CopyToProto`, which has no
`source_code_info` (and the generated `_pb2` modules embed none anyway), so
`grpcurl describe` shows no documentation. `service.tools.gen_protos` therefore
writes `datasetd/v1/descriptor_set.binpb`, our files as protoc compiled them, with
comments (and, like the `_pb2` modules, json_name only where a .proto sets it).
This servicer is the standard one with a filter on its answers: every file of that
set is replaced by its bytes from the set, unchanged; everything else (health,
reflection's own protos, well-known types) is served as the standard
implementation serves it.

grpcio-reflection only ships `grpc.reflection.v1alpha`; newer clients ask
`grpc.reflection.v1` first. The v1 protocol is the same messages under another
package, so the same servicer is registered under the v1 name too, and the v1
file (`grpc/reflection/v1/reflection.proto`, v1alpha's descriptor renamed) is added
to the pool so that reflection can describe it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

log = logging.getLogger(__name__)

V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1ALPHA_PACKAGE = reflection_pb2.DESCRIPTOR.package

DESCRIPTOR_SET_PACKAGE = "datasetd.v1"
DESCRIPTOR_SET_NAME = "descriptor_set.binpb"

_FILE_FIELD_TAG = 0x0A  # FileDescriptorSet.file: field 1, wire type 2 (length-delimited)


def load_descriptor_set() -> bytes:
    """The `FileDescriptorSet` with comments shipped next to the generated code."""
    return (resources.files(DESCRIPTOR_SET_PACKAGE) / DESCRIPTOR_SET_NAME).read_bytes()


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or malformed varint in descriptor set")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def split_descriptor_set(data: bytes) -> Iterator[bytes]:
    """Yields each serialized `FileDescriptorProto` of a `FileDescriptorSet` as is.

    Slicing the wire format, rather than parsing and reserializing, keeps the
    bytes exactly as `gen_protos` wrote them.
    """
    pos = 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        if tag != _FILE_FIELD_TAG:
            raise ValueError(f"unexpected field tag {tag} in descriptor set")
        length, pos = _read_varint(data, pos)
        if pos + length > len(data):
            raise ValueError("truncated descriptor set")
        yield data[pos : pos + length]
        pos += length


def commented_files(
    descriptor_set: bytes, pool: descriptor_pool.DescriptorPool
) -> dict[str, bytes]:
    """Maps file names to their serialized descriptors with comments.

    A file is only taken when, but for its comments, it is what the standard
    servicer would serve from `pool` (the code actually running): clients such as
    grpcurl encode requests with the descriptors they get, so a stale set must not
    win. Such files are served without comments.
    """
    files: dict[str, bytes] = {}
    for serialized in split_descriptor_set(descriptor_set):
        proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
        try:
            running = descriptor_pb2.FileDescriptorProto()
            pool.FindFileByName(proto.name).CopyToProto(running)
        except KeyError:
            # Not loaded here; the standard servicer answers NOT_FOUND for it anyway.
            continue
        without_comments = descriptor_pb2.FileDescriptorProto()
        without_comments.CopyFrom(proto)
        without_comments.ClearField("source_code_info")
        if without_comments != running:
            log.warning(
                "descriptor set entry %s differs from the loaded code (run `make proto`); "
                "reflection serves it without comments",
                proto.name,
            )
            continue
        files[proto.name] = serialized
    return files


# The grpc_reflection package has no type information, hence Any as base class.
class ReflectionServicer(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    """The standard grpc.aio reflection servicer, serving our files with comments.

    Only the public RPC method is wrapped: the standard implementation resolves
    every request (by file name, symbol or extension, with transitive
    dependencies, NOT_FOUND and errors included) and this replaces, in its file
    descriptor answers, the files found in the descriptor set.
    """

    def __init__(
        self,
        service_names: Iterable[str],
        *,
        descriptor_set: bytes | None = None,
        pool: descriptor_pool.DescriptorPool | None = None,
    ) -> None:
        pool = descriptor_pool.Default() if pool is None else pool
        super().__init__(service_names, pool=pool)
        if descriptor_set is None:
            descriptor_set = load_descriptor_set()
        self._commented = commented_files(descriptor_set, pool)

    def _file_containing_symbol(
        self, request: reflection_pb2.ServerReflectionRequest, fully_qualified_name: str
    ) -> reflection_pb2.ServerReflectionResponse:
        """Methods too (`pkg.Service.Method`, which grpcurl asks for to describe one):
        Python's descriptor pool finds services, messages and enums, not methods, so a
        method is answered with the file of its service."""
        response = super()._file_containing_symbol(request, fully_qualified_name)
        if not response.HasField("error_response"):
            return response
        service_name, _, method_name = fully_qualified_name.rpartition(".")
        try:
            service = self._pool.FindServiceByName(service_name)
        except KeyError:
            return response
        if method_name not in service.methods_by_name:
            return response
        return super()._file_containing_symbol(request, service_name)

    def _with_comments(self, serialized: bytes) -> bytes:
        name = descriptor_pb2.FileDescriptorProto.FromString(serialized).name
        return self._commented.get(name, serialized)

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        responses = super().ServerReflectionInfo(request_iterator, context)
        async for response in responses:
            if response.HasField("file_descriptor_response"):
                files = response.file_descriptor_response.file_descriptor_proto
                files[:] = [self._with_comments(serialized) for serialized in files]
            yield response


def v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """`grpc/reflection/v1/reflection.proto`: v1alpha's file under the v1 names (the
    messages, fields and numbers of the two are the same)."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{_V1ALPHA_PACKAGE}.", f".{V1_PACKAGE}."
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name.removeprefix(old)
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type.removeprefix(old)
            method.output_type = new + method.output_type.removeprefix(old)
    # The options of the official v1 file (v1alpha's say deprecated).
    proto.options.Clear()
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    return proto


def register_v1_file(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds the v1 file to `pool` unless some loaded code defines v1 already."""
    try:
        pool.FindFileContainingSymbol(V1_SERVICE_NAME)
        return
    except KeyError:
        pass
    pool.AddSerializedFile(v1_file_descriptor().SerializeToString())


def _v1_handler(servicer: ReflectionServicer) -> grpc.GenericRpcHandler:
    """The servicer under the v1 name. The v1alpha classes (de)serialize v1's messages:
    their wire format is the same."""
    return grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Like `reflection.enable_server_reflection`, with comments for our files, under
    both `grpc.reflection.v1alpha` and `grpc.reflection.v1`.

    Args:
        service_names: fully-qualified names of the services to list, reflection's
            own (`reflection.SERVICE_NAME`) included if it should be listed (v1 is
            then listed too).
        server: the grpc.aio server to add the reflection service to.
    """
    names = list(service_names)
    if reflection.SERVICE_NAME in names and V1_SERVICE_NAME not in names:
        names.append(V1_SERVICE_NAME)
    register_v1_file(descriptor_pool.Default())
    servicer = ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((_v1_handler(servicer),))
