"""`datasetd ontologies …` and `datasetd projects …`, run as separate processes against the real
server, as test_cli.py runs the other commands (standard input is /dev/null: no terminal)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from datasetd.v1 import data_pb2, input_pb2, input_service_pb2

from service.app import Running
from tests.conftest import Caller
from tests.e2e.test_cli import CLI_TIMEOUT, Cli, cli_env
from tests.helpers import png_bytes
from tests.readme import fenced_block, street_ontology

if TYPE_CHECKING:
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub


@pytest.fixture
def cli(server: Running, caller: Caller) -> Cli:
    return Cli(cli_env(server, caller))


def write_json(path: Path, value: object) -> str:
    path.write_text(json.dumps(value))
    return str(path)


async def test_the_readme_example_runs_as_written(
    server: Running, caller: Caller, cli: Cli, tmp_path: Path
) -> None:
    script = fenced_block("sh", "cat > street-ontology.json <<'EOF'")
    # `datasetd` as the README says: the virtualenv's command, found on PATH.
    env = cli.env | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 10 * CLI_TIMEOUT)
    assert process.returncode == 0, stderr.decode()
    printed = stdout.decode()
    assert "street-labelling" in printed and "left_hand" in printed and "kind (enum" in printed
    # validate found the typo made before the attachment; the upload after it was refused.
    assert printed.count("exit status 1") == 2
    assert "UNKNOWN_CLASS" in printed and "note-2" in printed
    failures = (tmp_path / "datasetd-failures-street-photos.csv").read_text()
    assert "note-3,data.concepts[0].id: 'nigth' is not a class of ontology 'street'" in failures

    now = json.loads((tmp_path / "street-now.json").read_text())
    assert now["revision"] == 2 and now["app_id"] == caller.app_id
    bicycle = [c for c in now["classes"] if c["id"] == "bicycle"]
    assert bicycle[0]["archived"] is True
    project = await cli.json("projects", "get", "street-labelling")
    assert project["ontology_id"] == "street" and project["dataset_ids"] == ["street-photos"]
    assert project["description"] == "Street scenes"
    assert project["ontology"]["revision"] == 2


async def test_ontology_commands(cli: Cli, tmp_path: Path) -> None:
    ontology = street_ontology()
    path = write_json(tmp_path / "street.json", ontology)
    created = await cli.json("ontologies", "create", "street", "--file", path)
    assert created["id"] == "street" and created["revision"] == 1
    assert created["classes"][0]["attributes"][0]["enum_type"]["options"] == ["car", "bus", "truck"]
    assert (await cli.json("ontologies", "get", "street"))["classes"] == created["classes"]

    table = await cli("ontologies", "get", "street")
    assert table.code == 0
    for shown in ("vehicle", "kind (enum: car|bus|truck, required)", "head, left_hand", "night"):
        assert shown in table.stdout, table.stdout

    ontology["classes"] = ontology["classes"][:2]
    smaller = write_json(tmp_path / "smaller.json", ontology)
    updated = await cli.json(
        "ontologies", "update", "street", "--file", smaller, "--expected-revision", "1"
    )
    assert updated["revision"] == 2 and [c["id"] for c in updated["classes"]] == [
        "vehicle",
        "person",
    ]
    stale = await cli(
        "ontologies", "update", "street", "--file", smaller, "--expected-revision", "1"
    )
    assert stale.code == 1 and "ABORTED" in stale.stderr and "REVISION_MISMATCH" in stale.stderr

    archived = await cli.json("ontologies", "archive-class", "street", "person")
    assert archived["revision"] == 3 and archived["classes"][1]["archived"] is True
    # --editable prints what `update --file` takes back, so a schema round-trips through a file.
    editable = await cli("ontologies", "get", "street", "--editable")
    assert editable.code == 0 and "revision" not in json.loads(editable.stdout)
    (tmp_path / "edit.json").write_text(editable.stdout)
    again = await cli.json(
        "ontologies",
        "update",
        "street",
        "--file",
        str(tmp_path / "edit.json"),
        "--expected-revision",
        "3",
    )
    assert again["revision"] == 4 and again["classes"] == archived["classes"]
    unknown = await cli("ontologies", "archive-class", "street", "cta")
    assert unknown.code == 1
    assert "NOT_FOUND" in unknown.stderr and "no class 'cta'" in unknown.stderr
    assert "vehicle, person, night" in unknown.stderr

    await cli.json("ontologies", "create", "--file", write_json(tmp_path / "g.json", {}))
    listed = await cli.json("ontologies", "list")
    assert listed[0]["id"] == "street" and len(listed) == 2
    assert listed[0]["revision"] == 4 and listed[0]["classes"] == 3

    refused = await cli("ontologies", "delete", "street")
    assert refused.code == 2 and "--yes" in refused.stderr
    await cli.json("ontologies", "get", "street")
    deleted = await cli.json("ontologies", "delete", "street", "--yes")
    assert deleted == {"ontology_id": "street", "deleted": True}
    gone = await cli("ontologies", "get", "street")
    assert gone.code == 1 and "NOT_FOUND" in gone.stderr


async def test_bad_ontology_files_are_refused_with_their_path(cli: Cli, tmp_path: Path) -> None:
    missing = await cli("ontologies", "create", "pets", "--file", str(tmp_path / "nope.json"))
    assert missing.code == 2 and "nope.json" in missing.stderr

    not_json = tmp_path / "broken.json"
    not_json.write_text("{")
    broken = await cli("ontologies", "create", "pets", "--file", str(not_json))
    assert broken.code == 2 and "not valid JSON" in broken.stderr

    shape = write_json(
        tmp_path / "shape.json", {"classes": [{"id": "cat", "shapes": ["SHAPE_CIRCLE"]}]}
    )
    bad_shape = await cli("ontologies", "create", "pets", "--file", shape)
    assert bad_shape.code == 2
    assert "SHAPE_CIRCLE" in bad_shape.stderr and "classes[0]" in bad_shape.stderr

    duplicate = write_json(
        tmp_path / "duplicate.json",
        {
            "classes": [
                {"id": "cat", "shapes": ["SHAPE_BOUNDING_BOX"]},
                {"id": "cat", "shapes": ["SHAPE_POLYGON"]},
            ]
        },
    )
    refused = await cli("--json", "ontologies", "create", "pets", "--file", duplicate)
    assert refused.code == 1 and refused.stdout == ""
    error = json.loads(refused.stderr)["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert "duplicate class id 'cat'" in error["field_violations"]["ontology.classes[1].id"]
    shown = await cli("ontologies", "create", "pets", "--file", duplicate)
    assert shown.code == 1 and "ontology.classes[1].id: duplicate class id 'cat'" in shown.stderr

    other_id = write_json(tmp_path / "other.json", {"id": "dogs"})
    mismatch = await cli("ontologies", "update", "pets", "--file", other_id)
    assert mismatch.code == 2 and "'dogs' is not the ontology 'pets'" in mismatch.stderr
    assert await cli.json("ontologies", "list") == []


async def test_project_commands(cli: Cli, tmp_path: Path) -> None:
    unknown = await cli("projects", "create", "roads", "--ontology", "nope")
    assert unknown.code == 1
    assert "NOT_FOUND" in unknown.stderr and "project.ontology_id" in unknown.stderr

    await cli.json(
        "ontologies",
        "create",
        "street",
        "--file",
        write_json(tmp_path / "o.json", street_ontology()),
    )
    await cli.json("ontologies", "create", "spare", "--file", write_json(tmp_path / "s.json", {}))
    await cli.json("datasets", "create", "photos")
    created = await cli.json(
        "projects", "create", "roads", "--ontology", "street", "--description", "Roads"
    )
    assert created["ontology_id"] == "street" and created["dataset_ids"] == []

    attached = await cli.json("projects", "attach", "roads", "photos")
    assert attached["dataset_ids"] == ["photos"]
    table = await cli("projects", "get", "roads")
    assert table.code == 0
    for shown in ("photos", "ontology street (revision 1)", "vehicle", "(input) night"):
        assert shown in table.stdout, table.stdout
    no_dataset = await cli("projects", "attach", "roads", "nope")
    assert no_dataset.code == 1 and "dataset_id" in no_dataset.stderr

    updated = await cli.json("projects", "update", "roads", "--description", "")
    assert updated["description"] == "" and updated["ontology_id"] == "street"
    await cli.json("projects", "create", "other", "--ontology", "spare")
    listed = await cli.json("projects", "list")
    assert [p["id"] for p in listed] == ["roads", "other"]
    assert listed[0]["dataset_ids"] == ["photos"]

    detached = await cli.json("projects", "detach", "roads", "photos")
    assert detached["dataset_ids"] == []
    refused = await cli("projects", "delete", "roads")
    assert refused.code == 2 and "--yes" in refused.stderr
    deleted = await cli.json("projects", "delete", "roads", "--yes")
    assert deleted == {"project_id": "roads", "deleted": True}
    assert [p["id"] for p in await cli.json("projects", "list")] == ["other"]


async def test_validate_reports_labels_made_before_the_dataset_was_attached(
    cli: Cli, caller: Caller, inputs: InputServiceAsyncStub, tmp_path: Path
) -> None:
    await cli.json(
        "ontologies",
        "create",
        "street",
        "--file",
        write_json(tmp_path / "o.json", street_ontology()),
    )
    await cli.json("datasets", "create", "photos")
    await cli.json("projects", "create", "roads", "--ontology", "street")
    not_attached = await cli("projects", "validate", "photos")
    assert not_attached.code == 1 and "DATASET_NOT_IN_PROJECT" in not_attached.stderr

    # A typo ("cta") and a vehicle without its required kind, labelled before the attachment.
    box = data_pb2.RegionInfo(
        bounding_box=data_pb2.BoundingBox(top_row=0.1, left_col=0.1, bottom_row=0.5, right_col=0.5)
    )
    labelled = [("cta-1", "cta"), ("cta-2", "cta"), ("car-1", "vehicle")]
    await inputs.CreateInputs(
        input_service_pb2.CreateInputsRequest(
            app_id=caller.app_id,
            inputs=[
                input_pb2.Input(
                    id=input_id,
                    dataset_ids=["photos"],
                    data=data_pb2.Data(
                        image=data_pb2.Image(base64=png_bytes()),
                        regions=[
                            data_pb2.Region(
                                region_info=box,
                                data=data_pb2.Data(
                                    concepts=[data_pb2.Concept(id=concept, value=1)]
                                ),
                            )
                        ],
                    ),
                )
                for input_id, concept in labelled
            ],
            atomic=True,
        ),
        metadata=caller.metadata,
    )
    await cli.json("projects", "attach", "roads", "photos")

    report = await cli("--json", "projects", "validate", "photos")
    assert report.code == 1, report.stderr
    found = json.loads(report.stdout)
    assert (found["ontology_id"], found["ontology_revision"]) == ("street", 1)
    assert found["annotations_checked"] == 3 and found["annotations_invalid"] == 3
    counts = {r["rule"]: r["annotations_count"] for r in found["rules"]}
    assert counts == {"UNKNOWN_CLASS": 2, "MISSING_ATTRIBUTE": 1}
    unknown = [f for f in found["findings"] if f["rule"] == "UNKNOWN_CLASS"]
    assert sorted(f["input_id"] for f in unknown) == ["cta-1", "cta-2"]
    assert all("'cta' is not a class" in f["message"] for f in unknown)

    one_rule = await cli("--json", "projects", "validate", "photos", "--rule", "unknown_class")
    assert [f["input_id"] for f in json.loads(one_rule.stdout)["findings"]] == ["cta-1", "cta-2"]
    table = await cli("projects", "validate", "photos", "--page-size", "1")
    assert table.code == 1
    assert "UNKNOWN_CLASS" in table.stdout and "MISSING_ATTRIBUTE" in table.stdout
    assert "cta-1" in table.stdout and "cta-2" not in table.stdout
    bad_rule = await cli("projects", "validate", "photos", "--rule", "TYPO")
    assert bad_rule.code == 2 and "UNKNOWN_KEYPOINT" in bad_rule.stderr
