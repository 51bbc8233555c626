"""The import-rule checker of `make lint`: it finds a wrong arrow and names the file, the
line and the import; and the real tree keeps the rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.tools import import_rules

ROOT = Path(__file__).resolve().parents[2]


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("path", "source", "package", "module"),
    [
        ("service/domain/rules.py", "import grpc\n", "service.domain", "grpc"),
        ("service/domain/rules.py", "from PIL import Image\n", "service.domain", "PIL"),
        ("service/domain/x/deep.py", "import asyncpg.pool\n", "service.domain", "asyncpg.pool"),
        (
            "service/domain/rules.py",
            "from ..storage.db import Database\n",
            "service.domain",
            "service.storage.db",
        ),
        (
            "service/domain/rules.py",
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from service.api import rpc\n",
            "service.domain",
            "service.api",
        ),
        (
            "service/storage/repo.py",
            "from service.api.rpc import x\n",
            "service.storage",
            "service.api.rpc",
        ),
        (
            "service/formats/coco/w.py",
            "import service.api.convert\n",
            "service.formats",
            "service.api.convert",
        ),
        ("service/wire/inputs.py", "from service.api import rpc\n", "service.wire", "service.api"),
        (
            "service/client/up.py",
            "from service.domain.models import X\n",
            "service.client",
            "service.domain.models",
        ),
        (
            "service/client/up.py",
            "from rich.progress import Progress\n",
            "service.client",
            "rich.progress",
        ),
    ],
)
def test_a_broken_rule_names_the_file_the_line_and_the_import(
    tmp_path: Path, path: str, source: str, package: str, module: str
) -> None:
    root = _tree(tmp_path, {path: "'''A module.'''\n" + source})
    violations = import_rules.check(root)
    assert [(v.path, v.package, v.module) for v in violations] == [(root / path, package, module)]
    # The import is the last line of the file, after its docstring line.
    assert violations[0].line == 1 + source.count("\n")
    assert str(violations[0]).startswith(f"{root / path}:{violations[0].line}: {package} must not")
    assert import_rules.main([str(root)]) == 1


def test_allowed_arrows_pass(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "service/api/rpc.py": "import grpc\nfrom service.domain.models import X\n",
            "service/storage/db.py": "import asyncpg\nfrom service.domain.ports import Y\n",
            "service/formats/coco/r.py": "from service.wire.inputs import z\n",
            "service/media/images.py": "from PIL import Image\n",
            "service/domain/models.py": "from service.domain.errors import E\nimport json\n",
            "service/cli/out.py": "import rich\nfrom service.client import Client\n",
            "service/gen/datasetd/v1/x_pb2.py": "import grpc\n",
        },
    )
    assert import_rules.check(root) == []
    assert import_rules.main([str(root)]) == 0


def test_the_repository_keeps_the_rules() -> None:
    assert [str(v) for v in import_rules.check(ROOT)] == []
