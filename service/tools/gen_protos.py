"""Generate Python code and typed stubs from protos/ (the only way to make service/gen).

`--check` regenerates into a temporary directory and fails when the committed
tree differs, so stale generated code cannot land.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Namespace packages confuse setuptools' editable install; mark them.
    for directory in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        if directory != out_dir:
            (directory / "__init__.py").touch()


def differences(a: Path, b: Path) -> list[str]:
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    diff = sorted(str(p) for p in files_a ^ files_b)
    diff += sorted(
        str(p) for p in files_a & files_b if not filecmp.cmp(a / p, b / p, shallow=False)
    )
    return diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--check", action="store_true", help="fail if out_dir is stale")
    opts = parser.parse_args()
    out_dir: Path = opts.out_dir.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if opts.check:
            stale = differences(fresh, out_dir) if out_dir.exists() else ["(missing)"]
            if stale:
                print(f"generated code in {out_dir} is stale: {', '.join(stale)}", file=sys.stderr)
                print("run `make proto` and commit the result", file=sys.stderr)
                return 1
            return 0
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(fresh, out_dir)
        os.utime(out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
