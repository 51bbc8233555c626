"""The README's Quick start, run as written by bash (the key's placeholder line dropped, the
server's address and key in the environment) against the real server: it leaves nothing in
the repository, and its `download` writes the COCO export it made before, as it says."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from service.app import Running
from tests.conftest import Caller
from tests.e2e.test_cli import CLI_TIMEOUT, cli_env
from tests.processes import ROOT
from tests.readme import fenced_block

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def top_level() -> set[str]:
    return {p.name for p in ROOT.iterdir()}


async def test_the_quick_start_runs_in_a_scratch_folder(
    server: Running, caller: Caller, tmp_path: Path
) -> None:
    block = fenced_block("sh", "datasetd download pets pets-v1")
    script = "\n".join(
        line for line in block.splitlines() if not line.startswith("export DATASETD_API_KEY=")
    )
    before = top_level()
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        cwd=ROOT,
        # mktemp -d makes the scratch folder under TMPDIR.
        env={**cli_env(server, caller), "TMPDIR": str(tmp_path)},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 4 * CLI_TIMEOUT)
    assert process.returncode == 0, stderr.decode()
    # Other tests may write into the repository meanwhile; the Quick start's folders are not there.
    assert not {"pets", "pets-v1"} & (top_level() - before)
    assert "Downloaded coco into" in stdout.decode()
    check_coco_download(tmp_path)


def check_coco_download(tmp_path: Path) -> None:
    """pets-v1 in the one scratch folder: the COCO export's splits, read by pycocotools."""
    (scratch,) = tmp_path.iterdir()
    downloaded = scratch / "pets-v1"
    assert sorted(p.name for p in downloaded.iterdir() if not p.name.startswith(".")) == [
        "train",
        "validation",
    ]
    images = 0
    for split in ("train", "validation"):
        reader = COCO(str(downloaded / split / "annotations.json"))
        for image in reader.loadImgs(reader.getImgIds()):
            assert (downloaded / split / "images" / image["file_name"]).is_file()
            images += 1
    assert images == 20
