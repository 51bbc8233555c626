"""`datasetd search`, `datasetd duplicates` and `datasetd datasets add-from-search`, run as
separate processes against the real server (as test_cli.py runs the other commands). The
inputs are those of test_client_search.py: four texts with vectors of a client model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.app import Running
from service.client import Client
from tests.conftest import Caller
from tests.e2e.test_cli import CLI_TIMEOUT, Cli, cli_env
from tests.e2e.test_client import run
from tests.e2e.test_client_search import MODEL, VECTORS, pets
from tests.e2e.test_grpcurl import grpcurl_path
from tests.e2e.test_newcomer_fixes import bash, for_server
from tests.helpers import png_bytes
from tests.processes import ROOT
from tests.readme import fenced_block


@pytest.fixture
def cli(server: Running, caller: Caller) -> Cli:
    return Cli(cli_env(server, caller))


@pytest.fixture
def client(server: Running, caller: Caller) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.port}", caller.key, caller.app_id) as opened:
        yield opened


def hit_ids(document: Any) -> list[str]:
    return [hit["input"]["id"] for hit in document]


async def test_search_ranks_filters_and_prints_a_table(
    cli: Cli, client: Client, tmp_path: Path
) -> None:
    await pets(client)
    as_json = tmp_path / "v.json"
    as_json.write_text("[1, 0, 0, 0]")
    as_lines = tmp_path / "v.txt"
    as_lines.write_text("1\n0\n0\n0\n")
    ranked = await cli.json(
        "search", "--dataset", "pets", "--vector-file", str(as_json), "--model", MODEL
    )
    assert hit_ids(ranked) == ["a", "d", "b", "c"]
    assert ranked[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert ranked[0]["input"]["metadata"] == {"camera": "x", "n": 1}
    by_lines = await cli.json(
        "search", "--vector-file", str(as_lines), "--model", MODEL, "--limit", "2"
    )
    assert hit_ids(by_lines) == ["a", "d"]

    similar = await cli.json(
        "search", "--dataset", "pets", "--similar-to", "a", "--model", MODEL, "--min-score", "0.7"
    )
    assert hit_ids(similar) == ["d", "b"]
    for flags, expected in (
        (["--concept", "cat", "--not-concept", "dog"], ["a"]),
        (["--metadata", '{"camera": "y"}'], ["b", "c"]),
        (["--near", "48.85,2.35,50"], ["a"]),
        (["--box", "51,52,-1,0"], ["b"]),
        (["--media-type", "image", "--media-type", "text"], ["a", "b", "c", "d"]),
        (["--created-after", "2999-01-01"], []),
        (["--created-before", "2999-01-01T00:00:00+02:00", "--limit", "1"], ["a"]),
    ):
        assert hit_ids(await cli.json("search", "--dataset", "pets", *flags)) == expected, flags

    table = await cli("search", "--dataset", "pets", "--similar-to", "a", "--model", MODEL)
    assert table.code == 0, table.stderr
    assert "3 hits in dataset pets" in table.stdout
    assert "score" in table.stdout and "0.8" in table.stdout

    await run(lambda: client.dataset("pets").create_version("v1"))
    in_version = await cli.json(
        "search", "--dataset", "pets", "--version", "v1", "--concept", "dog"
    )
    assert hit_ids(in_version) == ["b", "c"]


async def test_duplicates_and_add_from_search(cli: Cli, client: Client) -> None:
    await pets(client)
    exact = await cli.json("duplicates", "--dataset", "pets", "--exact-only")
    assert exact["groups"] == [{"input_ids": ["a", "d"], "exact": True, "min_similarity": 1.0}]
    assert exact["scanned"] == 4
    table = await cli("duplicates", "--dataset", "pets", "--exact-only")
    assert table.code == 0 and "1 duplicate groups among 4 inputs of pets" in table.stdout
    assert "exact" in table.stdout

    await cli.json("datasets", "create", "picked")
    dry = await cli.json(
        "datasets",
        "add-from-search",
        "picked",
        "--from-dataset",
        "pets",
        "--concept",
        "cat",
        "--dry-run",
    )
    assert dry == {
        "dataset_id": "picked",
        "matched": 2,
        "added": 0,
        "already_present": 0,
        "dry_run": True,
        "job_id": None,
    }
    done = await cli("datasets", "add-from-search", "picked", "--concept", "cat")
    assert done.code == 0, done.stderr
    assert "2 inputs matched: 2 added to picked, 0 already present." in done.stdout
    members = await cli.json("inputs", "list", "picked")
    assert sorted(m["id"] for m in members) == ["a", "b"]


async def test_bad_flags_name_the_flag(cli: Cli, client: Client, tmp_path: Path) -> None:
    await pets(client)
    bad_vector = tmp_path / "bad.txt"
    bad_vector.write_text("1\nzero\n")
    for args, code, shown in (
        (["--near", "1,2"], 2, "argument --near: expected LAT,LON,KM"),
        (["--box", "1,2,x,4"], 2, "argument --box: MINLON is not a number"),
        (["--similar-to", "a", "--text", "cat"], 2, "not allowed with argument"),
        (["--min-score", "0.5"], 2, "--min-score needs a rank"),
        (["--created-after", "yesterday"], 2, "not an ISO 8601 date"),
        (["--media-type", "picture"], 2, "invalid choice: 'picture'"),
        (["--metadata", "[1]"], 2, "JSON object"),
        (["--vector-file", str(bad_vector), "--model", MODEL], 2, "line 2: not a number"),
        (["--vector-file", str(tmp_path / "none.json")], 2, "cannot read it"),
        (["--near", "91,0,1"], 1, "query.geo_radius.latitude"),
        (["--vector-file", str(tmp_path / "v3.json"), "--model", MODEL], 1, "INVALID_ARGUMENT"),
    ):
        (tmp_path / "v3.json").write_text(json.dumps(list(VECTORS["a"][:3])))
        ran = await cli("search", "--dataset", "pets", *args)
        assert ran.code == code, (args, ran.stderr)
        assert shown in ran.stderr, (args, ran.stderr)
    # An image query is embedded by the built-in image model; the texts have no image
    # vectors, so nothing is found, but the bytes were read and accepted.
    image = tmp_path / "query.png"
    image.write_bytes(png_bytes(32, 24))
    assert await cli.json("search", "--image", str(image)) == []
    unreadable = await cli("search", "--image", str(tmp_path / "none.png"))
    assert unreadable.code == 2 and "--image" in unreadable.stderr
    no_dataset = await cli("search", "--version", "v1")
    assert no_dataset.code == 2 and "--version needs --dataset" in no_dataset.stderr
    missing = await cli("duplicates")
    assert missing.code == 2 and "--dataset" in missing.stderr


async def test_the_readme_cli_example_runs_as_written(
    server: Running, caller: Caller, tmp_path: Path
) -> None:
    block = fenced_block("sh", "datasetd search --dataset memos")
    script = "\n".join(
        line for line in block.splitlines() if not line.startswith("export DATASETD_API_KEY=")
    )
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        cwd=ROOT,
        env={**cli_env(server, caller), "TMPDIR": str(tmp_path)},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 4 * CLI_TIMEOUT)
    assert process.returncode == 0, stderr.decode()
    printed = stdout.decode()
    assert "3 hits in dataset memos" in printed  # mat, sun and mat-copy: the cats
    assert "1 duplicate groups among 4 inputs of memos" in printed
    assert "3 inputs match; nothing was added (--dry-run)." in printed
    assert "3 inputs matched: 3 added to cat-memos, 0 already present." in printed
    # The ranked search ran against the built-in text model (what it found depends on how
    # far the background embedding got in the example's pause).
    assert printed.count("hits in dataset memos") == 2


async def test_the_readme_grpcurl_example_runs_and_runs_again(
    server: Running, caller: Caller, tmp_path: Path
) -> None:
    example = fenced_block("sh", "SearchService/SearchInputs")
    script = for_server(example, server, caller).replace(".venv/bin/grpcurl", grpcurl_path())
    script = "\n".join(
        f"KEY={caller.key}" if line.startswith("KEY=") else line for line in script.splitlines()
    )
    # Each call prints one JSON document; -e stops at the first failing call.
    for attempt in (1, 2):
        code, out = await bash(script, tmp_path)
        assert code == 0, f"run {attempt} of the README example failed:\n{out}"
        decoder = json.JSONDecoder()
        documents: list[Any] = []
        position = 0
        while position < len(out):
            if out[position].isspace():
                position += 1
                continue
            document, position = decoder.raw_decode(out, position)
            documents.append(document)
        searches = [d["hits"] for d in documents if "hits" in d]
        assert [[h["input"]["id"] for h in hits] for hits in searches] == [
            ["shot-1", "shot-2"],
            ["shot-1"],
            ["shot-2"],
        ]
        counts = [d for d in documents if "matched_count" in d]
        assert len(counts) == 2, out
        assert counts[0]["matched_count"] == "2" and "added_count" not in counts[0]
        assert counts[1]["added_count"] == 2
        groups = next(d["groups"] for d in documents if "groups" in d)
        assert groups == [{"input_ids": ["shot-1", "shot-2"], "min_similarity": pytest.approx(0.8)}]
        models = next(d["models"] for d in documents if "models" in d)
        mine = next(m for m in models if m["id"] == "my-clip")
        assert (mine["dimension"], mine["source"]) == (4, "EMBEDDING_SOURCE_CLIENT")
        assert sum(1 for d in documents if d.get("purged")) == 2
