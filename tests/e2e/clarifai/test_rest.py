"""Clarifai's REST/JSON API on the HTTP port, over real HTTP; state is read back through
the native gRPC API."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import pytest
from clarifai_grpc.grpc.api.status import status_code_pb2
from datasetd.v1 import annotation_service_pb2 as aapi
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import dataset_version_service_pb2 as vapi
from datasetd.v1 import input_service_pb2 as iapi
from google.api import annotations_pb2  # type: ignore[import-untyped]
from multidict import CIMultiDict

from service.api.clarifai.parts import served_methods
from service.api.clarifai.rest import Routes, path_parts
from service.api.clarifai.service import V2
from service.app import Running
from service.observability import metrics
from service.storage.db import Database
from tests.conftest import Caller, new_caller
from tests.helpers import png_bytes
from tests.readme import fenced_block

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

SUCCESS = status_code_pb2.SUCCESS
PNG = base64.b64encode(png_bytes(16, 12)).decode()


@dataclass(frozen=True)
class Answer:
    http: int
    body: dict[str, Any]
    headers: CIMultiDict[str]

    @property
    def code(self) -> int:
        code: int = self.body["status"]["code"]
        return code

    def ids(self, field: str) -> list[str]:
        return [item["id"] for item in self.body.get(field, [])]


@dataclass(frozen=True)
class Rest:
    session: aiohttp.ClientSession
    base: str

    async def __call__(
        self,
        verb: str,
        path: str,
        caller: Caller | None,
        *,
        json: Any = None,
        data: bytes | None = None,
        params: Any = None,
        authorization: str | None = None,
    ) -> Answer:
        headers = {}
        if caller is not None:
            headers["Authorization"] = f"Key {caller.key}"
        if authorization is not None:
            headers["Authorization"] = authorization
        async with self.session.request(
            verb, self.base + path, json=json, data=data, params=params, headers=headers
        ) as response:
            body = await response.json(content_type=None)
            return Answer(response.status, body, CIMultiDict(response.headers))


@pytest.fixture
async def rest(server: Running) -> AsyncIterator[Rest]:
    async with aiohttp.ClientSession() as session:
        yield Rest(session, f"http://127.0.0.1:{server.http_port}")


def app_path(caller: Caller) -> str:
    return f"/v2/users/me/apps/{caller.app_id}"


async def native_dataset_ids(datasets: Datasets, caller: Caller) -> list[str]:
    listed = await datasets.ListDatasets(
        dapi.ListDatasetsRequest(app_id=caller.app_id, page_size=100), metadata=caller.metadata
    )
    return sorted(d.id for d in listed.datasets)


async def native_members(datasets: Datasets, caller: Caller, dataset_id: str) -> list[str]:
    listed = await datasets.ListDatasetInputs(
        dapi.ListDatasetInputsRequest(app_id=caller.app_id, dataset_id=dataset_id, page_size=100),
        metadata=caller.metadata,
    )
    return sorted(m.input.id for m in listed.dataset_inputs)


async def test_datasets_crud_and_pages(rest: Rest, datasets: Datasets, caller: Caller) -> None:
    base = app_path(caller)
    made = await rest(
        "POST",
        f"{base}/datasets",
        caller,
        json={"datasets": [{"id": f"d{i}", "description": f"number {i}"} for i in range(5)]},
    )
    assert (made.http, made.code) == (200, SUCCESS), made.body
    assert made.ids("datasets") == [f"d{i}" for i in range(5)]
    assert made.headers["X-Request-Id"] == made.body["status"]["req_id"]
    assert await native_dataset_ids(datasets, caller) == [f"d{i}" for i in range(5)]

    seen: list[str] = []
    for page in range(1, 5):
        listed = await rest(
            "GET",
            f"{base}/datasets",
            caller,
            params={"page": page, "per_page": 2, "sort_by_id": "true", "sort_ascending": "true"},
        )
        assert (listed.http, listed.code) == (200, SUCCESS), listed.body
        assert len(listed.ids("datasets")) == (2 if page < 3 else 1 if page == 3 else 0)
        seen += listed.ids("datasets")
    assert seen == [f"d{i}" for i in range(5)]

    got = await rest("GET", f"{base}/datasets/d3", caller)
    assert got.http == 200 and got.body["dataset"]["description"] == "number 3", got.body
    # The additional binding without user and app: the key's app.
    short = await rest("GET", "/v2/datasets/d2", caller)
    assert short.http == 200 and short.body["dataset"]["id"] == "d2", short.body

    patched = await rest(
        "PATCH",
        f"{base}/datasets",
        caller,
        json={"datasets": [{"id": "d1", "description": "changed"}], "action": "overwrite"},
    )
    assert (patched.http, patched.code) == (200, SUCCESS), patched.body
    native = await datasets.GetDataset(
        dapi.GetDatasetRequest(app_id=caller.app_id, dataset_id="d1"), metadata=caller.metadata
    )
    assert native.dataset.description == "changed"

    deleted = await rest("DELETE", f"{base}/datasets", caller, json={"dataset_ids": ["d0", "d4"]})
    assert (deleted.http, deleted.code) == (200, SUCCESS), deleted.body
    assert await native_dataset_ids(datasets, caller) == ["d1", "d2", "d3"]

    missing = await rest("GET", f"{base}/datasets/d0", caller)
    assert missing.http == 404 and missing.code == status_code_pb2.CONN_DOES_NOT_EXIST


async def test_trailing_slash_and_unknown_fields(
    rest: Rest, datasets: Datasets, caller: Caller, caplog: pytest.LogCaptureFixture
) -> None:
    base = app_path(caller)
    made = await rest(
        "POST",
        f"{base}/datasets/",
        caller,
        json={
            "datasets": [{"id": "kept", "description": "new", "no_such_field": {"x": 1}}],
            "not_a_request_field": True,
        },
    )
    assert (made.http, made.code) == (200, SUCCESS), made.body
    native = await datasets.GetDataset(
        dapi.GetDatasetRequest(app_id=caller.app_id, dataset_id="kept"), metadata=caller.metadata
    )
    assert native.dataset.description == "new"
    # Counted and logged as the gRPC call of the same method is.
    series = {"method": "clarifai.api.V2/GetDataset", "code": "OK"}
    before = metrics.REGISTRY.get_sample_value("datasetd_rpc_requests_total", series) or 0.0
    with caplog.at_level(logging.INFO, logger="datasetd.access"):
        got = await rest("GET", f"{base}/datasets/kept/", caller)
    assert got.http == 200 and got.body["dataset"]["id"] == "kept", got.body
    after = metrics.REGISTRY.get_sample_value("datasetd_rpc_requests_total", series)
    assert after == before + 1
    logged = [r for r in caplog.records if getattr(r, "method", "") == "/" + series["method"]]
    assert [getattr(r, "outcome", "") for r in logged] == ["OK"]
    # Unknown query parameters are ignored like unknown JSON fields; lowerCamelCase names
    # are the JSON names of the same fields.
    listed = await rest(
        "GET", f"{base}/datasets/", caller, params={"perPage": "1", "utm_source": "x"}
    )
    assert listed.http == 200 and listed.ids("datasets") == ["kept"], listed.body


async def test_unreadable_requests_are_400_naming_the_problem(
    rest: Rest, datasets: Datasets, caller: Caller
) -> None:
    base = app_path(caller)
    bad_json = await rest("POST", f"{base}/datasets", caller, data=b'{"datasets": [{"id": "x"')
    assert bad_json.http == 400, bad_json.body
    assert bad_json.code == status_code_pb2.CONN_BAD_REQUEST_FORMAT
    assert "not valid JSON" in bad_json.body["status"]["details"]
    not_object = await rest("POST", f"{base}/datasets", caller, json=[{"id": "x"}])
    assert not_object.http == 400 and "JSON object" in not_object.body["status"]["details"]
    wrong_type = await rest("POST", f"{base}/datasets", caller, json={"datasets": {"id": 3}})
    assert wrong_type.http == 400 and "datasets" in wrong_type.body["status"]["details"]
    bad_page = await rest("GET", f"{base}/datasets", caller, params={"page": "two"})
    assert bad_page.http == 400 and bad_page.code == status_code_pb2.CONN_BAD_REQUEST_FORMAT
    assert "page" in bad_page.body["status"]["details"]
    assert "'two'" in bad_page.body["status"]["details"]
    negative = await rest("GET", f"{base}/datasets", caller, params={"per_page": "-1"})
    assert negative.http == 400 and "per_page" in negative.body["status"]["details"]
    body_on_get = await rest("GET", f"{base}/datasets/x", caller, json={"dataset_id": "y"})
    assert body_on_get.http == 400 and "query parameters" in body_on_get.body["status"]["details"]
    # A value the method refuses (not the gateway) is the method's own in-band answer.
    refused = await rest("PATCH", f"{base}/datasets", caller, json={"action": "squash"})
    assert refused.http == 400 and refused.code == status_code_pb2.CONN_INVALID_REQUEST
    assert await native_dataset_ids(datasets, caller) == []


async def test_authentication(rest: Rest, db: Database, datasets: Datasets, caller: Caller) -> None:
    base = app_path(caller)
    body = {"datasets": [{"id": "nope"}]}
    for authorization in (None, "Key not-a-key-at-all-1234", f"Bearer {caller.key}", caller.key):
        answer = await rest(
            "POST", f"{base}/datasets", None, json=body, authorization=authorization
        )
        assert answer.http == 401, (authorization, answer.body)
        assert answer.code == status_code_pb2.CONN_KEY_INVALID
        assert answer.headers["X-Request-Id"] == answer.body["status"]["req_id"]
    other_app = await rest("POST", "/v2/users/me/apps/someone-else/datasets", caller, json=body)
    assert other_app.http == 401 and "someone-else" in other_app.body["status"]["details"]
    # A key without the `write` scope (of an app of its own).
    reader = await new_caller(db, ("read",))
    refused = await rest("POST", f"{app_path(reader)}/datasets", reader, json=body)
    assert refused.http == 403 and refused.code == status_code_pb2.CONN_INSUFFICIENT_SCOPES
    assert await native_dataset_ids(datasets, reader) == []
    # Its reads are let in (on the same kept-alive connection as the refusals above).
    listed = await rest("GET", f"{app_path(reader)}/datasets", reader)
    assert (listed.http, listed.code) == (200, SUCCESS), listed.body
    assert await native_dataset_ids(datasets, caller) == []


async def test_paths_outside_the_subset(rest: Rest, caller: Caller) -> None:
    base = app_path(caller)
    models = await rest("GET", f"{base}/models", caller)
    assert models.http == 501 and models.code == status_code_pb2.NOT_IMPLEMENTED, models.body
    assert "not supported by datasetd" in models.body["status"]["description"].lower()
    assert "ListModels" in models.body["status"]["details"]
    unknown = await rest("GET", "/v2/no/such/path", caller)
    assert unknown.http == 404 and unknown.code == status_code_pb2.CONN_DOES_NOT_EXIST
    assert "/v2/no/such/path" in unknown.body["status"]["details"]
    wrong_verb = await rest("PUT", f"{base}/datasets", caller, json={})
    assert wrong_verb.http == 405, wrong_verb.body
    assert set(wrong_verb.headers["Allow"].split(", ")) == {"GET", "POST", "PATCH", "DELETE"}


async def test_inputs_through_dataset_paths(
    rest: Rest, datasets: Datasets, inputs: Inputs, caller: Caller
) -> None:
    base = app_path(caller)
    made = await rest("POST", f"{base}/datasets", caller, json={"datasets": [{"id": "pets"}]})
    assert made.http == 200, made.body
    posted = await rest(
        "POST",
        f"{base}/inputs",
        caller,
        json={
            "inputs": [
                {"id": "cat", "data": {"image": {"base64": PNG}}},
                {"id": "note", "data": {"text": {"raw": "hello"}}},
                {"id": "loose", "data": {"text": {"raw": "not in the dataset"}}},
            ]
        },
    )
    assert (posted.http, posted.code) == (200, SUCCESS), posted.body
    assert posted.ids("inputs") == ["cat", "note", "loose"]
    stored = await inputs.GetInput(
        iapi.GetInputRequest(app_id=caller.app_id, input_id="cat"), metadata=caller.metadata
    )
    info = stored.input.data.image.image_info
    assert (info.width, info.height, info.format) == (16, 12, "PNG"), stored.input

    added = await rest(
        "POST",
        f"{base}/datasets/pets/inputs",
        caller,
        json={"dataset_inputs": [{"input": {"id": "cat"}}, {"input": {"id": "note"}}]},
    )
    assert (added.http, added.code) == (200, SUCCESS), added.body
    assert await native_members(datasets, caller, "pets") == ["cat", "note"]

    listed = await rest("GET", f"{base}/datasets/pets/inputs", caller, params={"per_page": 10})
    assert listed.http == 200, listed.body
    assert sorted(m["input"]["id"] for m in listed.body["dataset_inputs"]) == ["cat", "note"]
    member = await rest("GET", f"{base}/datasets/pets/inputs/note", caller)
    assert member.http == 200, member.body
    note = member.body["dataset_input"]["input"]
    assert note["id"] == "note" and note["dataset_ids"] == ["pets"], member.body
    assert note["data"]["text"]["text_info"]["char_count"] == len("hello")
    outside = await rest("GET", f"{base}/datasets/pets/inputs/loose", caller)
    assert outside.http == 404 and outside.code == status_code_pb2.CONN_DOES_NOT_EXIST

    # Repeated query parameters fill a repeated field.
    by_ids = await rest("GET", f"{base}/inputs", caller, params=[("ids", "cat"), ("ids", "loose")])
    assert by_ids.http == 200 and sorted(by_ids.ids("inputs")) == ["cat", "loose"], by_ids.body
    # Dotted names reach into a message field.
    stored_only = await rest(
        "GET",
        f"{base}/inputs",
        caller,
        params={"status.code": status_code_pb2.INPUT_DOWNLOAD_SUCCESS},
    )
    assert sorted(stored_only.ids("inputs")) == ["cat", "loose", "note"], stored_only.body
    pending = await rest(
        "GET",
        f"{base}/inputs",
        caller,
        params={"status.code": status_code_pb2.INPUT_DOWNLOAD_PENDING},
    )
    assert pending.http == 200 and pending.ids("inputs") == [], pending.body
    got = await rest("GET", f"{base}/inputs/loose", caller)
    assert got.http == 200 and got.body["input"]["id"] == "loose", got.body
    # `inputs/status` is GetInputCount, not GetInput of an input named "status".
    counted = await rest("GET", f"{base}/inputs/status", caller)
    assert counted.http == 200 and "counts" in counted.body and "input" not in counted.body

    removed = await rest(
        "DELETE", f"{base}/datasets/pets/inputs", caller, json={"input_ids": ["note"]}
    )
    assert (removed.http, removed.code) == (200, SUCCESS), removed.body
    assert await native_members(datasets, caller, "pets") == ["cat"]
    # Unlinked from the dataset, still in the app.
    await inputs.GetInput(
        iapi.GetInputRequest(app_id=caller.app_id, input_id="note"), metadata=caller.metadata
    )

    deleted = await rest("DELETE", f"{base}/inputs/loose", caller)
    assert (deleted.http, deleted.code) == (200, SUCCESS), deleted.body
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await inputs.GetInput(
            iapi.GetInputRequest(app_id=caller.app_id, input_id="loose"), metadata=caller.metadata
        )
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def native_annotations(annotations: Annotations, caller: Caller, input_id: str) -> list[str]:
    """The concept ids of the input's annotations, read through the native API."""
    listed = await annotations.ListAnnotations(
        aapi.ListAnnotationsRequest(app_id=caller.app_id, input_ids=[input_id], page_size=100),
        metadata=caller.metadata,
    )
    return sorted(c.id for a in listed.annotations for c in a.data.concepts)


async def test_annotations(rest: Rest, annotations: Annotations, caller: Caller) -> None:
    base = app_path(caller)
    posted = await rest(
        "POST",
        f"{base}/inputs",
        caller,
        json={"inputs": [{"id": "cat", "data": {"image": {"base64": PNG}}}]},
    )
    assert posted.http == 200, posted.body
    made = await rest(
        "POST",
        f"{base}/annotations",
        caller,
        json={
            "annotations": [
                {"input_id": "cat", "data": {"concepts": [{"id": "cat", "value": 1}]}},
                {"input_id": "cat", "data": {"concepts": [{"id": "pet", "value": 1}]}},
            ]
        },
    )
    assert (made.http, made.code) == (200, SUCCESS), made.body
    assert await native_annotations(annotations, caller, "cat") == ["cat", "pet"]
    first, second = made.ids("annotations")

    listed = await rest("GET", f"{base}/annotations", caller, params={"input_ids": "cat"})
    assert listed.http == 200, listed.body
    assert sorted(listed.ids("annotations")) == sorted([first, second])
    got = await rest("GET", f"{base}/inputs/cat/annotations/{first}", caller)
    assert got.http == 200 and got.body["annotation"]["data"]["concepts"][0]["id"] == "cat"

    deleted = await rest("DELETE", f"{base}/inputs/cat/annotations/{second}", caller)
    assert (deleted.http, deleted.code) == (200, SUCCESS), deleted.body
    assert await native_annotations(annotations, caller, "cat") == ["cat"]


async def test_versions_and_exports(
    rest: Rest, server: Running, versions: Versions, caller: Caller
) -> None:
    base = app_path(caller)
    await rest("POST", f"{base}/datasets", caller, json={"datasets": [{"id": "pets"}]})
    posted = await rest(
        "POST",
        f"{base}/inputs",
        caller,
        json={
            "inputs": [{"id": "cat", "data": {"image": {"base64": PNG}}, "dataset_ids": ["pets"]}]
        },
    )
    assert posted.http == 200, posted.body
    made = await rest(
        "POST",
        f"{base}/datasets/pets/versions",
        caller,
        json={"dataset_versions": [{"id": "v1", "description": "first"}]},
    )
    assert (made.http, made.code) == (200, SUCCESS), made.body
    assert made.ids("dataset_versions") == ["v1"]

    version: dict[str, Any] = {}
    for _ in range(200):
        got = await rest("GET", f"{base}/datasets/pets/versions/v1", caller)
        assert got.http == 200, got.body
        version = got.body["dataset_version"]
        if version["status"]["code"] == status_code_pb2.DATASET_VERSION_READY:
            break
        await asyncio.sleep(0.05)
    assert version["status"]["code"] == status_code_pb2.DATASET_VERSION_READY, version
    native = await versions.GetDatasetVersion(
        vapi.GetDatasetVersionRequest(app_id=caller.app_id, dataset_id="pets", version_id="v1"),
        metadata=caller.metadata,
    )
    assert native.version.description == "first"

    listed = await rest("GET", f"{base}/datasets/pets/versions", caller, params={"per_page": 5})
    assert listed.http == 200 and listed.ids("dataset_versions") == ["v1"], listed.body

    export: dict[str, Any] = {}
    for _ in range(200):
        put = await rest(
            "PUT",
            f"{base}/datasets/pets/versions/v1/exports",
            caller,
            json={"exports": [{"format": "CLARIFAI_DATA_PROTOBUF"}]},
        )
        assert (put.http, put.code) == (200, SUCCESS), put.body
        export = put.body["exports"][0]
        if export["status"]["code"] == status_code_pb2.DATASET_VERSION_EXPORT_SUCCESS:
            break
        await asyncio.sleep(0.05)
    assert export["status"]["code"] == status_code_pb2.DATASET_VERSION_EXPORT_SUCCESS, export
    exports = await versions.ListExports(
        vapi.ListExportsRequest(app_id=caller.app_id, dataset_id="pets", version_id="v1"),
        metadata=caller.metadata,
    )
    assert len(exports.exports) == 1 and exports.exports[0].size == int(export["size"])
    async with rest.session.get(export["url"]) as response:
        archive = await response.read()
    assert response.status == 200 and len(archive) == int(export["size"])
    with zipfile.ZipFile(io.BytesIO(archive)) as unpacked:
        assert "mimetype" in unpacked.namelist()

    bad_format = await rest(
        "PUT",
        f"{base}/datasets/pets/versions/v1/exports",
        caller,
        json={"exports": [{"format": "NOT_A_FORMAT"}]},
    )
    assert bad_format.http == 400 and "format" in bad_format.body["status"]["details"]


async def test_readme_curl_examples(
    server: Running, datasets: Datasets, inputs: Inputs, versions: Versions, caller: Caller
) -> None:
    """The README's block, run as written but for the address, the app and the key."""
    block = fenced_block("sh", 'curl -s -H "$AUTH"')
    script = (
        block.replace("DATASETD_API_KEY=dsd_...", f"DATASETD_API_KEY={caller.key}")
        .replace("http://127.0.0.1:8080/", f"http://127.0.0.1:{server.http_port}/")
        .replace("/apps/main\n", f"/apps/{caller.app_id}\n")
    )
    # One answer per line (curl prints the body without a newline).
    wrapped = 'curl() { command curl "$@"; echo; }\nset -e\n' + script
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", wrapped, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    answers = [json.loads(line) for line in out.decode().splitlines() if line]
    assert len(answers) == block.count("curl -s"), out.decode()
    assert [a["status"]["code"] for a in answers] == [SUCCESS] * len(answers), answers
    assert answers[-1]["dataset"]["description"] == "Hello only"

    assert await native_dataset_ids(datasets, caller) == ["rest-demo"]
    assert await native_members(datasets, caller, "rest-demo") == ["hello"]
    kept = await inputs.GetInput(
        iapi.GetInputRequest(app_id=caller.app_id, input_id="bye"), metadata=caller.metadata
    )
    assert kept.input.id == "bye"
    version = await versions.GetDatasetVersion(
        vapi.GetDatasetVersionRequest(
            app_id=caller.app_id, dataset_id="rest-demo", version_id="v1"
        ),
        metadata=caller.metadata,
    )
    assert version.version.id == "v1"


def test_every_binding_of_a_served_method_reaches_it() -> None:
    """No path of a served method is taken by another method's binding (a literal segment
    wins over a variable: `inputs/status` is GetInputCount, not GetInput)."""
    served = served_methods()
    routes = Routes(served)
    reached = set()
    for method in V2.methods:
        if method.name not in served:
            continue
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        for binding in (rule, *rule.additional_bindings):
            verb = binding.WhichOneof("pattern")
            template = getattr(binding, verb)
            path = re.sub(r"\{[^}]+\}", "x-1", template) + "/"
            found = routes.find(verb.upper(), path_parts(path))
            assert not isinstance(found, list), (method.name, template, found)
            route, params = found
            assert route.method.name == method.name, (template, route.template)
            assert set(params.values()) <= {"x-1"}
            reached.add(method.name)
    assert reached == served
    count = routes.find("GET", path_parts("/v2/users/me/apps/a/inputs/status"))
    assert not isinstance(count, list) and count[0].method.name == "GetInputCount"
    assert routes.find("GET", path_parts("/v2/no/such/path")) == []
