"""The Kubernetes manifests and docker-compose.yml against their schemas and against the service's
own configuration: variable names, ports, probes and the shutdown timing."""

from __future__ import annotations

import base64
import copy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.api.server import LIVENESS_SERVICE
from service.app import STOP_STEP_SECONDS
from service.config import Config, parse_duration
from service.tools import validate_manifests as vm

OVERLAYS = {path.name: path for path in vm.overlays()}
Document = dict[str, Any]
# What Running.stop needs beyond the grace of in-flight calls in a normal stop (cancelling the
# background tasks, closing the pool): a fraction of the STOP_STEP_SECONDS a hung step may take.
STOP_MARGIN_SECONDS = 10


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Document]]:
    return {name: vm.render(path) for name, path in OVERLAYS.items()}


@pytest.fixture(scope="module")
def schemas() -> dict[vm.SchemaKey, Document]:
    return vm.crd_schemas()


def one(docs: list[Document], kind: str, name: str | None = None) -> Document:
    found = [
        doc
        for doc in docs
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def config_map(docs: list[Document]) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap")["data"]
    return data


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def server_container(docs: list[Document]) -> Document:
    container: Document = one(docs, "Deployment", "datasetd")["spec"]["template"]["spec"][
        "containers"
    ][0]
    return container


def test_both_overlays_exist() -> None:
    assert set(OVERLAYS) == {"dev", "production"}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rendered_overlay_validates(
    overlay: str, rendered: dict[str, list[Document]], schemas: dict[vm.SchemaKey, Document]
) -> None:
    docs = rendered[overlay]
    kinds = {doc["kind"] for doc in docs}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Job",
        "ServiceAccount",
        "ConfigMap",
        "Cluster",
        "ScheduledBackup",
        "ObjectStore",
        "Tenant",
    } <= kinds
    # Every custom resource has a vendored schema: none falls through to "unchecked".
    custom = {(doc["apiVersion"], doc["kind"]) for doc in docs if not vm.is_core(doc)}
    assert custom <= schemas.keys()
    assert [str(p) for p in vm.validate_documents(overlay, docs, schemas)] == []


def test_compose_file_validates() -> None:
    assert [str(p) for p in vm.validate_compose()] == []


def test_the_variables_the_service_reads_are_found_by_asking_it() -> None:
    # Found by recording what Config.from_env looks up, so a new setting needs no list here.
    known = vm.config_variables()
    assert {"DATASETD_LISTEN", "DATASETD_HTTP_LISTEN", "DATASETD_DATABASE_READ_URL"} <= known
    assert all(name.startswith("DATASETD_") for name in known)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_manifests_set_only_variables_the_service_reads(
    overlay: str, rendered: dict[str, list[Document]]
) -> None:
    known = vm.config_variables()
    assert {"DATASETD_LISTEN", "DATASETD_DATABASE_URL", "DATASETD_SHUTDOWN_GRACE"} <= known
    docs = rendered[overlay]
    for doc in docs:
        if doc["kind"] not in vm.WORKLOAD_KINDS:
            continue
        for container in vm.containers(doc):
            names = set(vm.container_environment(container, docs))
            unknown = {
                name
                for name in names - known
                if name not in vm.LIBPQ_VARIABLES and not name.startswith(vm.OTEL_PREFIX)
            }
            assert unknown == set(), f"{doc['kind']}/{container['name']}"
    server = set(vm.container_environment(server_container(docs), docs))
    assert {
        "DATASETD_DATABASE_URL",
        "DATASETD_DATABASE_READ_URL",
        "DATASETD_S3_ENDPOINT",
        "DATASETD_S3_ACCESS_KEY",
        "DATASETD_S3_SECRET_KEY",
        "DATASETD_S3_BUCKET",
        "DATASETD_SHUTDOWN_GRACE",
    } <= server
    # The read URL names no credentials: asyncpg must find them in PGUSER/PGPASSWORD.
    assert server >= vm.LIBPQ_VARIABLES


def test_compose_sets_only_variables_the_service_reads() -> None:
    compose = yaml.safe_load(vm.COMPOSE_FILE.read_text())
    names = set(vm.compose_environment(compose["services"]["datasetd"]))
    assert names
    assert names <= vm.config_variables()


def environment_of(container: Document, docs: list[Document]) -> dict[str, str]:
    """The container's variables as the kubelet would set them; a value from a secret not
    rendered here (the Cluster's, the Tenant's, production's) is a placeholder."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            name = source["secretRef"]["name"]
            secrets = [
                doc for doc in docs if doc["kind"] == "Secret" and doc["metadata"]["name"] == name
            ]
            for secret in secrets:
                env.update(
                    {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
                )
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", f"placeholder-from-a-secret-{entry['name']}")
    return env


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_container_environment_is_accepted_by_the_service(
    overlay: str, rendered: dict[str, list[Document]]
) -> None:
    docs = rendered[overlay]
    for doc in docs:
        if doc["kind"] in vm.WORKLOAD_KINDS:
            for container in vm.containers(doc):
                Config.from_env(environment_of(container, docs))
    config = Config.from_env(environment_of(server_container(docs), docs))
    assert config.database_url
    assert config.s3_endpoint == "minio:80"
    assert config.log_format == "json"
    cluster = one(docs, "Cluster", "datasetd-db")
    if cluster["spec"]["instances"] > 1:
        assert config.database_read_url == "postgresql://datasetd-db-ro:5432/datasetd"
    else:
        # A lone instance has no read-only service to send reads to.
        assert config.database_read_url == ""


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_ports_and_probes_match_the_configured_listeners(
    overlay: str, rendered: dict[str, list[Document]]
) -> None:
    docs = rendered[overlay]
    settings = config_map(docs)
    grpc_port = port_of(settings["DATASETD_LISTEN"])
    http_port = port_of(settings["DATASETD_HTTP_LISTEN"])
    container = server_container(docs)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": grpc_port, "http": http_port}
    for probe in ("startupProbe", "readinessProbe"):
        # The standard gRPC health service, overall status (""): PostgreSQL and S3 answer.
        assert container[probe]["grpc"] == {"port": grpc_port, "service": ""}, probe
    # The process alone: a database outage must not restart every replica.
    assert container["livenessProbe"]["grpc"] == {
        "port": grpc_port,
        "service": LIVENESS_SERVICE,
    }
    for service in (doc for doc in docs if doc["kind"] == "Service"):
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, service["metadata"]["name"]
    headless = one(docs, "Service", "datasetd-headless")
    assert headless["spec"]["clusterIP"] == "None"
    policy = one(docs, "NetworkPolicy", "datasetd")
    allowed = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert allowed == {grpc_port, http_port}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_termination_grace_covers_pre_stop_and_shutdown_grace(
    overlay: str, rendered: dict[str, list[Document]]
) -> None:
    docs = rendered[overlay]
    pod = one(docs, "Deployment", "datasetd")["spec"]["template"]["spec"]
    pre_stop = server_container(docs)["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = parse_duration("DATASETD_SHUTDOWN_GRACE", config_map(docs)["DATASETD_SHUTDOWN_GRACE"])
    assert pre_stop >= 1
    needed = pre_stop + grace.total_seconds() + STOP_MARGIN_SECONDS
    assert pod["terminationGracePeriodSeconds"] >= needed
    assert STOP_MARGIN_SECONDS <= STOP_STEP_SECONDS


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_pods_run_non_root_with_a_read_only_root(
    overlay: str, rendered: dict[str, list[Document]]
) -> None:
    docs = rendered[overlay]
    for kind, name in (("Deployment", "datasetd"), ("Job", "datasetd-migrate")):
        pod = one(docs, kind, name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            # Writable places are volumes: /tmp at least.
            mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
            assert "/tmp" in mounts
            assert container["resources"]["requests"] and container["resources"]["limits"]
    server = server_container(docs)
    data_dir = config_map(docs)["DATASETD_DATA_DIR"]
    assert data_dir in {mount["mountPath"] for mount in server["volumeMounts"]}
    job = one(docs, "Job", "datasetd-migrate")["spec"]["template"]["spec"]["containers"][0]
    assert job["args"] == ["migrate"]


def test_overlay_sizes(rendered: dict[str, list[Document]]) -> None:
    dev, production = rendered["dev"], rendered["production"]
    # The autoscaler owns the replica count; a count in the Deployment would fight it.
    assert "replicas" not in one(dev, "Deployment")["spec"]
    assert "replicas" not in one(production, "Deployment")["spec"]
    assert one(dev, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 1
    assert one(production, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3
    assert one(dev, "Cluster")["spec"]["instances"] == 1
    assert one(production, "Cluster")["spec"]["instances"] == 3
    pool = one(production, "Tenant")["spec"]["pools"][0]
    assert (pool["servers"], pool["volumesPerServer"]) == (4, 4)
    initdb = one(production, "Cluster")["spec"]["bootstrap"]["initdb"]
    assert "CREATE EXTENSION IF NOT EXISTS vector" in initdb["postInitApplicationSQL"]


# --- the validator can fail ----------------------------------------------------


def broken(docs: list[Document], kind: str) -> tuple[list[Document], Document]:
    copied = copy.deepcopy(docs)
    return copied, one(copied, kind)


def test_an_unknown_field_in_a_deployment_is_a_problem(
    rendered: dict[str, list[Document]], schemas: dict[vm.SchemaKey, Document]
) -> None:
    docs, deployment = broken(rendered["production"], "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    problems = [str(p) for p in vm.validate_documents("production", docs, schemas)]
    assert len(problems) == 1
    assert problems[0].startswith("production/Deployment/datasetd: ")
    assert "livenesProbe" in problems[0]


def test_a_wrong_type_in_the_cluster_spec_is_a_problem(
    rendered: dict[str, list[Document]], schemas: dict[vm.SchemaKey, Document]
) -> None:
    docs, cluster = broken(rendered["production"], "Cluster")
    cluster["spec"]["instances"] = "three"
    cluster["spec"]["storage"]["sise"] = "1Gi"
    problems = [str(p) for p in vm.validate_documents("production", docs, schemas)]
    assert problems == [
        "production/Cluster/datasetd-db: spec.instances: 'three' is not of type 'integer'",
        "production/Cluster/datasetd-db: spec.storage: Additional properties are not allowed "
        "('sise' was unexpected)",
    ]


def test_a_duplicate_pool_in_the_tenant_is_a_problem(
    rendered: dict[str, list[Document]], schemas: dict[vm.SchemaKey, Document]
) -> None:
    docs, tenant = broken(rendered["dev"], "Tenant")
    tenant["spec"]["pools"].append(copy.deepcopy(tenant["spec"]["pools"][0]))
    problems = [str(p) for p in vm.validate_documents("dev", docs, schemas)]
    assert problems == [
        "dev/Tenant/datasetd-minio: spec.pools: x-kubernetes-list-type map: two with "
        "{'name': 'pool-0'}"
    ]


def test_a_misspelt_variable_is_a_problem(
    rendered: dict[str, list[Document]], schemas: dict[vm.SchemaKey, Document]
) -> None:
    docs, settings = broken(rendered["production"], "ConfigMap")
    settings["data"]["DATASETD_SHUTDOWN_GRAEC"] = "30s"
    problems = [str(p) for p in vm.validate_documents("production", docs, schemas)]
    assert len(problems) == 2  # the Deployment and the migration Job both read the ConfigMap
    assert all("DATASETD_SHUTDOWN_GRAEC" in problem for problem in problems)


def test_a_resource_without_a_vendored_crd_is_a_problem(
    schemas: dict[vm.SchemaKey, Document],
) -> None:
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "datasetd"},
    }
    problems = [str(p) for p in vm.validate_documents("dev", [monitor], schemas)]
    assert problems == [
        "dev/PodMonitor/datasetd: no vendored CRD for monitoring.coreos.com/v1 PodMonitor "
        "in deploy/kubernetes/crds"
    ]


def test_a_compose_file_without_its_services_is_a_problem(tmp_path: Path) -> None:
    compose = yaml.safe_load(vm.COMPOSE_FILE.read_text())
    del compose["services"]["minio"]
    del compose["services"]["postgres"]["healthcheck"]
    compose["services"]["datasetd"]["environment"]["DATASETD_S3_ENDPIONT"] = "minio:9000"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(compose))
    problems = [str(p) for p in vm.validate_compose(path)]
    assert problems == [
        "docker-compose.yml: service minio is missing",
        "docker-compose.yml/postgres: no healthcheck",
        "docker-compose.yml/datasetd: DATASETD_S3_ENDPIONT is not a variable service/config.py "
        "reads",
    ]
    path.write_text("services: [unclosed")
    assert [p.message.split(":")[0] for p in vm.validate_compose(path)] == ["not readable YAML"]


def test_compose_health_check_follows_the_grpc_health_service() -> None:
    compose = yaml.safe_load(vm.COMPOSE_FILE.read_text())
    command = compose["services"]["datasetd"]["healthcheck"]["test"]
    assert command[:3] == ["CMD", "python", "-c"]
    listen = compose["services"]["datasetd"]["environment"]["DATASETD_LISTEN"]
    assert f"127.0.0.1:{port_of(listen)}" in command[3]
    servicer = health.HealthServicer()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    script = command[3].replace(f"127.0.0.1:{port_of(listen)}", f"127.0.0.1:{port}")

    def check() -> int:
        argv = [sys.executable, "-c", script]
        return subprocess.run(argv, check=False, capture_output=True, timeout=30).returncode

    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check() == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check() == 1
    finally:
        server.stop(None)
    assert check() != 0


def test_a_missing_kubectl_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(vm.RenderError, match="kubectl not found"):
        vm.render(OVERLAYS["dev"])
    assert vm.main([]) == 2


def test_a_kustomization_that_does_not_render_is_a_problem(tmp_path: Path) -> None:
    overlay = tmp_path / "overlays" / "bad"
    overlay.mkdir(parents=True)
    (overlay / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    (tmp_path / "crds").mkdir()
    problems = vm.validate_all(tmp_path)
    assert len(problems) == 1
    assert problems[0].where == "bad"
    assert "kubectl kustomize" in problems[0].message


def test_the_image_matches_the_manifests(rendered: dict[str, list[Document]]) -> None:
    dockerfile = (vm.ROOT / "deploy" / "Dockerfile").read_text().splitlines()
    final = dockerfile[max(i for i, line in enumerate(dockerfile) if line.startswith("FROM ")) :]
    instructions = {
        line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in final if line[:1].isupper()
    }
    docs = rendered["production"]
    pod = one(docs, "Deployment", "datasetd")["spec"]["template"]["spec"]
    user = pod["securityContext"]["runAsUser"]
    assert instructions["USER"] == f"{user}:{pod['securityContext']['runAsGroup']}"
    settings = config_map(docs)
    exposed = {int(port) for port in instructions["EXPOSE"].split()}
    assert exposed == {
        port_of(settings["DATASETD_LISTEN"]),
        port_of(settings["DATASETD_HTTP_LISTEN"]),
    }
    assert instructions["ENTRYPOINT"] == '["python", "-m", "service"]'
    assert instructions["CMD"] == '["serve"]'
    assert instructions["FROM"] == "python:3.11-slim"
