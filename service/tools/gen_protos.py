"""Generate Python code and typed stubs from protos/ (the only way to make service/gen).

Besides the `_pb2` modules it writes DESCRIPTOR_SET, a `FileDescriptorSet` of our
own .proto files *with* their comments (`--include_source_info`); the generated
`_pb2` modules embed descriptors without them. Server reflection serves it (see
service/api/reflection.py) so that `grpcurl describe` shows the documentation.

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
from collections.abc import Iterable
from pathlib import Path

import grpc_tools
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
# Relative to the output directory; shipped as package data of `datasetd.v1`.
DESCRIPTOR_SET = Path("datasetd/v1/descriptor_set.binpb")
# `datasetd` holds the generated `datasetd.v1` and the hand-written client library
# `datasetd.client` (sdk/datasetd/client): two source folders, one package. A built wheel
# merges them into one folder; a checkout or an editable install has two, which this
# pkgutil-style __init__ (the same text as sdk/datasetd/__init__.py) joins.
SHARED_PACKAGE_INIT = (
    '"""datasetd: the generated protos (datasetd.v1) and the client library (datasetd.client)."""'
    "\n\nfrom pkgutil import extend_path\n\n__path__ = extend_path(__path__, __name__)\n"
)


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent
    descriptor_set = out_dir / DESCRIPTOR_SET
    descriptor_set.parent.mkdir(parents=True, exist_ok=True)
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
        # One protoc run for code and descriptor set, so they cannot disagree. No
        # --include_imports: the set holds only our files (all listed below), and the
        # well-known types are served from the runtime's own descriptor pool, which
        # may differ from the copies bundled with grpc_tools. protoc writes the files
        # in command-line (sorted) order, dependencies first, with paths relative to
        # --proto_path, so the output is reproducible for `--check`.
        "--include_source_info",
        f"--descriptor_set_out={descriptor_set}",
        *protos,
    ]
    # mypy-protobuf's plugin announces every file it writes on the inherited stderr: two
    # dozen lines at every `make run` and `make test` that regenerate nothing. Kept aside
    # and shown only when protoc fails.
    with tempfile.TemporaryFile() as said:
        saved = os.dup(2)
        os.dup2(said.fileno(), 2)
        try:
            failed = protoc.main(args) != 0
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if failed:
            said.seek(0)
            sys.stderr.write(said.read().decode(errors="replace"))
            raise SystemExit("protoc failed")
    strip_default_json_names(descriptor_set)
    # Namespace packages confuse setuptools' editable install; mark them.
    for directory in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        if directory != out_dir:
            (directory / "__init__.py").touch()
    (out_dir / "datasetd" / "__init__.py").write_text(SHARED_PACKAGE_INIT)


def _default_json_name(name: str) -> str:
    """protoc's json_name for a field without the option: `foo_bar` -> `fooBar`."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _strip_fields(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in (*message.field, *message.extension):
            if field.json_name == _default_json_name(field.name):
                field.ClearField("json_name")
        _strip_fields(message.nested_type)


def strip_default_json_names(descriptor_set: Path) -> None:
    """Removes the json_name protoc fills in for every field unless set explicitly.

    The descriptors embedded in the _pb2 modules, and so those the standard
    reflection serves, have json_name only where a .proto sets it. grpcurl prints
    JSON with json_name when present and the .proto name otherwise, so keeping
    protoc's would turn `app_id` into `appId` in grpcurl's output. Stripped, the
    set differs from the served descriptors by its comments only.
    """
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    for file in files.file:
        _strip_fields(file.message_type)
        for extension in file.extension:
            if extension.json_name == _default_json_name(extension.name):
                extension.ClearField("json_name")
    descriptor_set.write_bytes(files.SerializeToString(deterministic=True))


def differences(a: Path, b: Path) -> list[str]:
    files_a = {
        p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    files_b = {
        p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
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
