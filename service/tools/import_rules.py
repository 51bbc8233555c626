"""The import rules of the layers, checked by walking every module's AST (`make lint`).

Run `python -m service.tools.import_rules [root]`: it prints each broken rule as
`file:line: <package> must not import <module> (<why>)` and exits 1 when there is one.
Imports inside `if TYPE_CHECKING:` blocks count too: a type is a dependency."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

_SERVER = ("service.api", "service.domain", "service.storage", "service.app", "service.wiring")
_ADAPTERS = (
    "service.media",
    "service.formats",
    "service.wire",
    "service.devstack",
    "service.adapters",
    "service.jobs",
    "service.embedders",
)
_DRIVERS = ("grpc", "asyncpg", "minio", "PIL")
# Numeric libraries the embedders run on; the domain stays pure Python.
_NUMERIC = ("numpy", "onnxruntime", "onnx")


@dataclass(frozen=True)
class Rule:
    package: str
    forbidden: tuple[str, ...]
    why: str


RULES = (
    Rule(
        "service.domain",
        (*_DRIVERS, *_NUMERIC, "datasetd", "service.api", "service.storage", *_ADAPTERS),
        "the domain is use cases and rules; adapters implement its ports",
    ),
    Rule(
        "service.domain",
        ("service.observability", "prometheus_client", "opentelemetry"),
        "metrics and traces are recorded by the layers around the domain; a number only the "
        "domain knows reaches them through a callback it is given",
    ),
    Rule("service.storage", ("grpc", "service.api"), "storage sits below the transport"),
    Rule("service.formats", ("grpc", "service.api"), "archive formats sit below the transport"),
    Rule(
        "service.wire",
        ("grpc", "service.api"),
        "the data-model mapping is shared by api and formats",
    ),
    Rule(
        "service.media",
        ("grpc", "asyncpg", "minio", "service.api", "service.storage"),
        "probes are pure",
    ),
    Rule(
        "service.embedders",
        (
            "grpc",
            "asyncpg",
            "minio",
            "datasetd",
            "service.api",
            "service.storage",
            "service.wire",
            "service.formats",
            "service.jobs",
        ),
        "embedders compute vectors from bytes and texts (numpy, Pillow, onnxruntime); the "
        "embedding job in the domain reads and stores them",
    ),
    Rule(
        "service.client",
        (*_SERVER, *_ADAPTERS, "service.cli", "rich"),
        "the client library talks to the server only through its protos and reports progress "
        "through a callback; rich output belongs to the CLI",
    ),
    Rule(
        "datasetd.client",
        (*_SERVER, *_ADAPTERS, "service.cli", "rich"),
        "the published client library (sdk/datasetd/client) builds on service.client and the "
        "protos only",
    ),
)
# Hand-written source folders and the package root each one's modules are named from.
_SOURCES = ("service", "sdk/datasetd")


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    package: str
    module: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.package} must not import {self.module} ({self.why})"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: -node.level]
                base = ".".join([*package, base] if base else package)
            found.append((node.lineno, base))
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def check_file(root: Path, path: Path) -> list[Violation]:
    module = module_name(root, path)
    rules = [rule for rule in RULES if _within(module, rule.package)]
    if not rules:
        return []
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        Violation(path, line, rule.package, name, rule.why)
        for line, name in imported(tree, module)
        for rule in rules
        if any(_within(name, forbidden) for forbidden in rule.forbidden)
    ]


def check(root: Path) -> list[Violation]:
    """Every broken rule under `root` (the folder holding the `service` package and the
    client library's `sdk` folder)."""
    return [
        violation
        for source in _SOURCES
        for path in sorted((root / source).rglob("*.py"))
        if "gen" not in path.relative_to(root).parts
        for violation in check_file((root / source).parent, path)
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    violations = check(Path(args[0]) if args else Path.cwd())
    for violation in violations:
        print(violation, file=sys.stderr)
    if not violations:
        print(f"import rules: {len(RULES)} rules, no violation")
    return 1 if violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
