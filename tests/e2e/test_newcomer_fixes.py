"""Issue 15's newcomer fixes on the server and CLI side, each as a newcomer meets it: the
README's examples run twice, the CLI found through DATASETD_LISTEN, the key id printed by
`keys create`, folder labels with names, and downloaded annotation lines that the reference
`clarifai` classes parse."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from clarifai_grpc.grpc.api import resources_pb2
from datasetd.client import Client as ViClient
from datasetd.v1 import input_pb2
from datasetd.v1 import input_service_pb2 as iapi
from google.protobuf import json_format

from service.app import Running
from service.client.unpack import unpack_clarifai
from tests.conftest import Caller, Stack, stack_env
from tests.e2e.test_annotations import add, annotation, box
from tests.e2e.test_cli import Cli, cli_env
from tests.e2e.test_exports import PROTOBUF, exported, options
from tests.e2e.test_grpcurl import grpcurl_path
from tests.e2e.test_inputs import create, image_input, new_dataset, text_input
from tests.e2e.test_versions import build
from tests.helpers import png_bytes
from tests.processes import clean_env
from tests.readme import fenced_block
from tests.unit.test_media import mp4

if TYPE_CHECKING:
    from datasetd.v1.annotation_service_pb2_grpc import AnnotationServiceAsyncStub as Annotations
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.dataset_version_service_pb2_grpc import (
        DatasetVersionServiceAsyncStub as Versions,
    )
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

README_ADDRESS = "127.0.0.1:50051"


def for_server(example: str, server: Running, caller: Caller) -> str:
    """A README example pointed at the test server and the caller's app."""
    assert README_ADDRESS in example and '"main"' in example
    return example.replace(README_ADDRESS, f"127.0.0.1:{server.port}").replace(
        '"main"', json.dumps(caller.app_id)
    )


async def bash(script: str, cwd: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-e",
        "-c",
        script,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_the_readme_grpcurl_examples_can_be_run_again(
    server: Running, caller: Caller, tmp_path: Path
) -> None:
    example = fenced_block("sh", '"request_id": "create-cats-')
    script = for_server(example, server, caller).replace(".venv/bin/grpcurl", grpcurl_path())
    script = "\n".join(
        f"KEY={caller.key}" if line.startswith("KEY=") else line for line in script.splitlines()
    )
    # The example ends by purging the dataset it created: run again, it must create it
    # again (a fixed request_id would replay the first answer, and the Get after it fail).
    for attempt in (1, 2):
        code, out = await bash(script, tmp_path)
        assert code == 0, f"run {attempt} of the README example failed:\n{out}"
        assert '"purged": true' in out


async def test_the_readme_upload_example_can_be_run_again(
    server: Running,
    caller: Caller,
    inputs: Inputs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    example = for_server(fenced_block("python", "def upload(stub, path, input_id)"), server, caller)
    clip, copy = tmp_path / "clip.mp4", tmp_path / "clip-copy.mp4"
    for name, path in (("clip.mp4", clip), ("clip-copy.mp4", copy)):
        assert f'"{name}"' in example
        example = example.replace(f'"{name}"', repr(str(path)))
    clip.write_bytes(mp4())
    monkeypatch.setenv("DATASETD_KEY", caller.key)

    def run() -> None:
        exec(compile(example, "README.md", "exec"), {})

    await asyncio.to_thread(run)
    assert copy.read_bytes() == mp4()
    await inputs.DeleteInputs(
        iapi.DeleteInputsRequest(app_id=caller.app_id, ids=["clip-1"]), metadata=caller.metadata
    )
    copy.unlink()
    # Uploaded again, not an earlier upload's answer replayed for an input that is gone.
    await asyncio.to_thread(run)
    assert copy.read_bytes() == mp4()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_one_variable_moves_the_server_and_the_cli(server: Running, caller: Caller) -> None:
    base = cli_env(server, caller)
    del base["DATASETD_ADDRESS"]
    # What `serve` binds is where the client commands go.
    for listen in (f"0.0.0.0:{server.port}", f"127.0.0.1:{server.port}", f":{server.port}"):
        listed = await Cli({**base, "DATASETD_LISTEN": listen}).json("datasets", "list")
        assert listed == [], listen
    nowhere = await Cli({**base, "DATASETD_LISTEN": f"127.0.0.1:{_free_port()}"})(
        "datasets", "list"
    )
    assert nowhere.code != 0 and "UNAVAILABLE" in nowhere.stderr
    # DATASETD_ADDRESS, when set, still wins.
    both = {
        **base,
        "DATASETD_LISTEN": "127.0.0.1:1",
        "DATASETD_ADDRESS": f"127.0.0.1:{server.port}",
    }
    assert await Cli(both).json("datasets", "list") == []


async def test_the_library_follows_the_same_variable(
    server: Running, caller: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATASETD_ADDRESS", raising=False)
    monkeypatch.setenv("DATASETD_LISTEN", f"0.0.0.0:{server.port}")

    def listed() -> list[str]:
        with ViClient(secret_key=caller.key, organization_id=caller.app_id) as client:
            assert client.endpoint == f"127.0.0.1:{server.port}"
            return [d.dataset_id for d in client.datasets.list().all_items()]

    assert await asyncio.to_thread(listed) == []


async def test_keys_create_prints_the_key_id_beside_the_secret(
    server: Running, stack: Stack
) -> None:
    admin = Cli(
        clean_env(
            DATASETD_APP="keys-id-app",
            **{k: v for k, v in stack_env(stack).items() if k.startswith("DATASETD_")},
        )
    )
    created = await admin("keys", "create", "--description", "printed")
    assert created.code == 0, created.stderr
    # stdout stays the secret alone (KEY=$(datasetd keys create ...)).
    secret = created.stdout.strip()
    assert secret.startswith("dsd_") and "\n" not in secret
    # Listing is an API call, with the key just made (the owner's: the app had no users).
    owner = Cli(
        {**admin.env, "DATASETD_API_KEY": secret, "DATASETD_ADDRESS": f"127.0.0.1:{server.port}"}
    )
    listed = await owner.json("keys", "list")
    (key,) = [k for k in listed if k["description"] == "printed"]
    assert f"key id {key['id']}" in created.stderr
    assert f"datasetd keys revoke --app keys-id-app {key['id']}" in created.stderr


async def test_folder_labels_name_their_concepts_after_the_folder(
    server: Running, caller: Caller, inputs: Inputs, tmp_path: Path
) -> None:
    cli = Cli(cli_env(server, caller))
    for folder, color in (("Maine Coon", (1, 2, 3)), ("tabby", (4, 5, 6))):
        (tmp_path / "photos" / folder).mkdir(parents=True)
        (tmp_path / "photos" / folder / f"{folder[:4]}.png").write_bytes(png_bytes(8, 6, color))
    assert (await cli("datasets", "create", "cats")).code == 0
    uploaded = await cli("upload", "folder", "cats", str(tmp_path / "photos"), "--labels")
    assert uploaded.code == 0, uploaded.stderr
    listed = await inputs.ListInputs(
        iapi.ListInputsRequest(app_id=caller.app_id), metadata=caller.metadata
    )
    concepts = {item.id: [(c.id, c.name) for c in item.data.concepts] for item in listed.inputs}
    assert concepts == {"Main": [("Maine Coon", "Maine Coon")], "tabb": [("tabby", "tabby")]}


async def test_downloaded_lines_parse_with_the_reference_classes(
    datasets: Datasets,
    inputs: Inputs,
    annotations: Annotations,
    versions: Versions,
    caller: Caller,
    tmp_path: Path,
) -> None:
    await new_dataset(datasets, caller, "titled")
    items = [image_input("photo"), text_input("note", "a cat")]
    items[0].title, items[1].title = "cat on a mat.png", "note.txt"
    for item in items:
        item.dataset_ids.append("titled")
    await create(inputs, caller, items)
    cat = box("r1", "cat", top=0.1, left=0.1, bottom=0.5, right=0.5)
    await add(annotations, caller, [annotation("photo", "a1", regions=[cat])])
    await build(versions, caller, "titled", "v1")
    _, archive = await exported(
        versions, caller, "titled", "v1", PROTOBUF, options(embed_media=True)
    )
    (tmp_path / "archive.zip").write_bytes(archive)
    out = tmp_path / "out"
    out.mkdir()
    unpack_clarifai(tmp_path / "archive.zip", out, "clarifai_data_protobuf", None, False)

    lines = [
        json.loads(line) for line in (out / "all" / "annotations.jsonl").read_text().splitlines()
    ]
    titles: dict[str, Any] = {}
    for line in lines:
        # Strict parsing: a field the reference model does not have is an error.
        reference = json_format.ParseDict(line["input"], resources_pb2.Input())
        ours = json_format.ParseDict(line["input"], input_pb2.Input())
        assert reference.id == ours.id == line["input_id"]
        titles[line["input_id"]] = line.get("title")
    assert titles == {"photo": "cat on a mat.png", "note": "note.txt"}
    (photo,) = [line for line in lines if line["input_id"] == "photo"]
    parsed = json_format.ParseDict(photo["input"], resources_pb2.Input())
    assert [c.id for c in parsed.data.regions[0].data.concepts] == ["cat"]
