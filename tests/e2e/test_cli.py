"""The `datasetd` command-line tool, run as a separate process against the real server.

Standard input is /dev/null, as in CI: no terminal, so destructive commands
must refuse unless given --yes.
"""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from service.app import Running
from tests.conftest import Caller
from tests.helpers import png_bytes
from tests.processes import ROOT, clean_env

CLI_TIMEOUT = 120.0


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.code == 0, f"exit {self.code}: {self.stderr}"
        return json.loads(self.stdout)


@dataclass(frozen=True)
class Cli:
    env: dict[str, str]

    async def __call__(self, *args: str) -> Ran:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            *args,
            cwd=ROOT,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
        assert process.returncode is not None
        return Ran(process.returncode, stdout.decode(), stderr.decode())

    async def json(self, *args: str) -> Any:
        return (await self("--json", *args)).json()


def cli_env(server: Running, caller: Caller) -> dict[str, str]:
    return clean_env(
        DATASETD_ADDRESS=f"127.0.0.1:{server.port}",
        DATASETD_APP=caller.app_id,
        DATASETD_API_KEY=caller.key,
        # Wide enough that rich tables never wrap an id in the assertions below.
        COLUMNS="200",
    )


@pytest.fixture
def cli(server: Running, caller: Caller) -> Cli:
    return Cli(cli_env(server, caller))


async def test_datasets_lifecycle_as_json_and_tables(cli: Cli) -> None:
    created = await cli.json(
        "datasets", "create", "cats", "--description", "Cat photos", "--metadata", '{"k": 1}'
    )
    assert created["id"] == "cats" and created["metadata"] == {"k": 1}

    got = await cli.json("datasets", "get", "cats")
    assert got["description"] == "Cat photos"
    assert got["assets"] == 0 and got["annotations"] == 0

    patched = await cli.json(
        "datasets", "patch", "cats", "--action", "overwrite", "--description", "Cats"
    )
    assert patched["description"] == "Cats" and patched["etag"] != created["etag"]

    await cli.json("datasets", "create", "dogs")
    listed = await cli.json("datasets", "list")
    assert sorted(d["id"] for d in listed) == ["cats", "dogs"]

    table = await cli("datasets", "list")
    assert table.code == 0
    assert "cats" in table.stdout and "dogs" in table.stdout and "Cats" in table.stdout


async def test_global_options_after_the_command_and_from_flags(
    server: Running, caller: Caller
) -> None:
    bare = Cli(clean_env(COLUMNS="200"))
    ran = await bare(
        "datasets",
        "create",
        "flags",
        "--address",
        f"127.0.0.1:{server.port}",
        "--app",
        caller.app_id,
        "--key",
        caller.key,
        "--json",
    )
    assert ran.json()["id"] == "flags"


async def test_errors_are_reported_with_code_reason_and_fields(cli: Cli) -> None:
    missing = await cli("--json", "datasets", "get", "nope")
    assert missing.code == 1 and missing.stdout == ""
    error = json.loads(missing.stderr)["error"]
    assert error["code"] == "NOT_FOUND" and error["reason"]

    bad = await cli("datasets", "create", "bad id!")
    assert bad.code == 1
    assert "INVALID_ARGUMENT" in bad.stderr and "dataset.id" in bad.stderr

    bad_json = await cli("datasets", "create", "x", "--metadata", "[1]")
    assert bad_json.code == 2 and "JSON object" in bad_json.stderr


async def test_no_key_is_a_clear_error(server: Running) -> None:
    ran = await Cli(clean_env(DATASETD_ADDRESS=f"127.0.0.1:{server.port}"))("datasets", "list")
    assert ran.code == 2 and "DATASETD_API_KEY" in ran.stderr

    wrong = await Cli(
        clean_env(DATASETD_ADDRESS=f"127.0.0.1:{server.port}", DATASETD_API_KEY="dsd_wrong")
    )("datasets", "list")
    assert wrong.code == 1 and "UNAUTHENTICATED" in wrong.stderr


async def test_delete_refuses_without_a_terminal_and_deletes_with_yes(cli: Cli) -> None:
    await cli.json("datasets", "create", "doomed")

    refused = await cli("datasets", "delete", "doomed")
    assert refused.code == 2
    assert "0 assets and 0 annotations" in refused.stdout + refused.stderr
    assert "--yes" in refused.stderr
    assert (await cli.json("datasets", "get", "doomed"))["id"] == "doomed"

    deleted = await cli.json("datasets", "delete", "doomed", "--yes")
    assert deleted["purged"] is False and deleted["purge_time"]
    assert (await cli("datasets", "get", "doomed")).code == 1

    restored = await cli.json("datasets", "undelete", "doomed")
    assert restored["id"] == "doomed"

    # A deleted dataset can still be purged for good.
    await cli.json("datasets", "delete", "doomed", "--yes")
    purged = await cli.json("datasets", "delete", "doomed", "--force", "--yes")
    assert purged["purged"] is True
    assert (await cli("datasets", "undelete", "doomed")).code == 1


def image_folder(root: Path, counts: dict[str, int], offset: int = 0) -> Path:
    """Distinct PNGs in one sub-folder per label (distinct bytes: the store de-duplicates)."""
    n = offset
    for label, count in counts.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / label / f"{label}-{i:04d}.png").write_bytes(
                png_bytes(color=(n % 256, n // 256 % 256, 77))
            )
            n += 1
    return root


async def dataset_inputs(cli: Cli, dataset: str) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = await cli.json("inputs", "list", dataset)
    return listed


async def test_upload_folder_versions_export_download_and_merge(cli: Cli, tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "pets", {"cat": 3, "dog": 2})
    await cli.json("datasets", "create", "pets")
    uploaded = await cli.json("upload", "folder", "pets", str(folder), "--labels")
    assert uploaded["created"] == 5 and uploaded["failed"] == 0

    inputs = await dataset_inputs(cli, "pets")
    assert {i["id"]: i["concepts"] for i in inputs} == {
        "cat-0000": ["cat"],
        "cat-0001": ["cat"],
        "cat-0002": ["cat"],
        "dog-0000": ["dog"],
        "dog-0001": ["dog"],
    }
    got = await cli.json("inputs", "get", "pets", "dog-0001")
    assert got["media_type"] == "image" and got["concepts"] == ["dog"]
    stats = await cli.json("datasets", "get", "pets")
    assert stats["assets"] == 5 and stats["tags"] == {"cat": 3, "dog": 2}

    version = await cli.json("versions", "create", "pets", "--id", "v1")
    assert version["id"] == "v1" and version["status"] == "READY"
    listed = await cli.json("versions", "list", "pets")
    assert [v["id"] for v in listed] == ["v1"]
    assert (await cli.json("versions", "get", "pets", "v1"))["status"] == "READY"

    exported = await cli.json("export", "pets", "--split", "train=0.6,validation=0.4")
    assert exported["status"] == "SUCCESS" and exported["size"] > 0
    assert sum(exported["split_counts"].values()) == 5

    save_dir = tmp_path / "download"
    downloaded = await cli.json(
        "download", "pets", str(save_dir), "--split", "train=0.6,validation=0.4"
    )
    assert downloaded["assets_count"] == 5
    assert sum(downloaded["splits"].values()) == 5
    media = sorted(p.name for p in save_dir.rglob("*.png"))
    assert media == sorted(f"{i['id']}.png" for i in inputs)
    again = await cli("download", "pets", str(save_dir))
    assert again.code == 2 and "overwrite" in again.stderr

    await cli.json("datasets", "create", "more")
    await cli.json(
        "upload", "folder", "more", str(image_folder(tmp_path / "more", {"cow": 2}, 100))
    )
    merged = await cli.json("merge", "pets", "more")
    assert merged == {"destination": "pets", "source": "more", "added": 2, "already_present": 0}
    assert len(await dataset_inputs(cli, "pets")) == 7

    await cli.json("versions", "create", "pets", "--id", "v2")
    older = await cli.json("download", "pets", str(tmp_path / "v1"), "--version", "v1")
    newer = await cli.json("download", "pets", str(tmp_path / "v2"))
    assert (older["version_id"], older["assets_count"]) == ("v1", 5)
    assert (newer["version_id"], newer["assets_count"]) == ("v2", 7)

    refused = await cli("versions", "delete", "pets", "v1")
    assert refused.code == 2 and "--yes" in refused.stderr
    await cli.json("versions", "delete", "pets", "v1", "--yes")
    assert [v["id"] for v in await cli.json("versions", "list", "pets")] == ["v2"]

    refused = await cli("inputs", "delete", "pets", "cow-0000")
    assert refused.code == 2
    assert (await cli.json("inputs", "delete", "pets", "cow-0000", "--yes"))["deleted"] == 1
    assert len(await dataset_inputs(cli, "pets")) == 6


async def test_csv_with_bad_rows_then_retry_from_the_log(cli: Cli, tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.png").write_bytes(png_bytes(color=(ord(name), 1, 2)))
    table = tmp_path / "inputs.csv"
    rows = [
        ["inputid", "input", "concepts", "metadata", "geopoints"],
        # The reference docs' single-quoted dict style, with an apostrophe in a value.
        ["a", "a.png", "cat", """{'source': 'local', 'note': "it's ok"}""", "10.5,20.25"],
        ["b", "missing.png", "cat", "", ""],
        ["c", "c.png", "cat,dog", "{not json}", ""],
        ["d", "b.png", "dog", "", "500,1"],
    ]
    with table.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    await cli.json("datasets", "create", "rows")
    log = tmp_path / "failures.csv"
    ran = await cli(
        "--json",
        "upload",
        "csv",
        "rows",
        str(table),
        "--csv-type",
        "file_path",
        "--failure-log",
        str(log),
    )
    assert ran.code == 1, ran.stderr
    result = json.loads(ran.stdout)
    assert result["created"] == 1 and result["failed"] == 3
    with log.open() as f:
        failed = {row["input_id"]: row for row in csv.DictReader(f)}
    assert set(failed) == {"b", "c", "d"}
    # Index is the CSV line (the header is line 1).
    assert {k: row["index"] for k, row in failed.items()} == {"b": "3", "c": "4", "d": "5"}
    assert "metadata" in failed["c"]["reason"] and "longitude" in failed["d"]["reason"]
    stored = await dataset_inputs(cli, "rows")
    assert [(i["id"], i["metadata"]) for i in stored] == [
        ("a", {"source": "local", "note": "it's ok"})
    ]

    # Fix the missing file; the other two rows are still bad and stay in the log.
    (tmp_path / "missing.png").write_bytes(png_bytes(color=(9, 9, 9)))
    retried = await cli("--json", "retry", str(log))
    assert retried.code == 1, "rows left in the log are not a success"
    assert json.loads(retried.stdout)["created"] == 1
    with log.open() as f:
        assert sorted(row["input_id"] for row in csv.DictReader(f)) == ["c", "d"]
    assert sorted(i["id"] for i in await dataset_inputs(cli, "rows")) == ["a", "b"]


async def test_killed_upload_resumes_without_duplicates(cli: Cli, tmp_path: Path) -> None:
    total = 600
    folder = image_folder(tmp_path / "many", {"x": total})
    await cli.json("datasets", "create", "many")
    command = [
        "upload",
        "folder",
        "many",
        str(folder),
        "--batch-size",
        "2",
        "--concurrency",
        "2",
        "--no-progress",
    ]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *command,
        cwd=ROOT,
        env=cli.env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        count = 0
        while count < 40:
            await asyncio.sleep(0.05)
            count = (await cli.json("datasets", "get", "many"))["assets"]
            assert process.returncode is None, "the upload finished before it could be killed"
        process.kill()
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    at_kill = (await cli.json("datasets", "get", "many"))["assets"]
    assert 40 <= at_kill < total

    resumed = await cli.json(*command)
    assert resumed["failed"] == 0 and resumed["created"] == total
    ids = [i["id"] for i in await dataset_inputs(cli, "many")]
    assert len(ids) == total and len(set(ids)) == total


async def test_upload_coco_and_download_original_inputs(cli: Cli, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    originals = {"a": png_bytes(200, 100, (1, 2, 3)), "b": png_bytes(50, 50, (4, 5, 6))}
    for name, data in originals.items():
        (images / f"{name}.png").write_bytes(data)
    instances = tmp_path / "instances.json"
    instances.write_text(
        json.dumps(
            {
                "images": [
                    {"id": 1, "file_name": "a.png", "width": 200, "height": 100},
                    {"id": 2, "file_name": "b.png", "width": 50, "height": 50},
                ],
                "categories": [{"id": 7, "name": "cat"}],
                "annotations": [
                    {"id": 1, "image_id": 1, "category_id": 7, "bbox": [20, 10, 100, 50]},
                    {"id": 2, "image_id": 2, "category_id": 7, "bbox": [0, 0, 25, 25]},
                ],
            }
        )
    )
    await cli.json("datasets", "create", "coco")
    uploaded = await cli.json("upload", "coco", "coco", str(images), str(instances))
    assert (uploaded["created"], uploaded["failed"]) == (2, 0)
    assert uploaded["annotations_created"] == 2
    assert (await cli.json("datasets", "get", "coco"))["annotations"] >= 2

    # An input created from a URL has no stored media to download.
    urls = tmp_path / "urls.csv"
    urls.write_text("inputid,input\nremote,https://example.com/remote.png\n")
    assert (await cli.json("upload", "csv", "coco", str(urls)))["created"] == 1

    save_dir = tmp_path / "originals"
    downloaded = await cli.json("inputs", "download", "coco", str(save_dir))
    assert sorted((d["input_id"], d["path"] and Path(d["path"]).name) for d in downloaded) == [
        ("a", "a.png"),
        ("b", "b.png"),
        ("remote", None),
    ]
    for name, data in originals.items():
        assert (save_dir / f"{name}.png").read_bytes() == data
    assert not [p for p in save_dir.iterdir() if p.name.startswith(".")]
