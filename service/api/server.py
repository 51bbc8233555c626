"""The grpc.aio server with our services, health checking and reflection."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from datasetd.v1 import (
    access_service_pb2,
    access_service_pb2_grpc,
    annotation_service_pb2,
    annotation_service_pb2_grpc,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    dataset_version_service_pb2,
    dataset_version_service_pb2_grpc,
    input_pb2,  # noqa: F401  (registered so reflection can describe Input, InputBatch)
    input_service_pb2,
    input_service_pb2_grpc,
    ontology_service_pb2,
    ontology_service_pb2_grpc,
    project_service_pb2,
    project_service_pb2_grpc,
    search_service_pb2,
    search_service_pb2_grpc,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.access_policy import InputDatasets, check_v2_rules
from service.api.clarifai.service import SERVICE_NAME as CLARIFAI_V2
from service.api.clarifai.service import V2Handlers, in_band_failure
from service.api.interceptors import RequestInterceptor
from service.api.reflection import enable_reflection
from service.api.rpc import compose
from service.domain.auth import Authenticator
from service.domain.ports import AuditRepository

DATASETS = dataset_service_pb2.DESCRIPTOR.services_by_name["DatasetService"]
INPUTS = input_service_pb2.DESCRIPTOR.services_by_name["InputService"]
ANNOTATIONS = annotation_service_pb2.DESCRIPTOR.services_by_name["AnnotationService"]
VERSIONS = dataset_version_service_pb2.DESCRIPTOR.services_by_name["DatasetVersionService"]
ONTOLOGIES = ontology_service_pb2.DESCRIPTOR.services_by_name["OntologyService"]
PROJECTS = project_service_pb2.DESCRIPTOR.services_by_name["ProjectService"]
SEARCH = search_service_pb2.DESCRIPTOR.services_by_name["SearchService"]
ACCESS = access_service_pb2.DESCRIPTOR.services_by_name["AccessService"]
SERVICE_NAMES: Sequence[str] = tuple(
    service.full_name
    for service in (DATASETS, INPUTS, ANNOTATIONS, VERSIONS, ONTOLOGIES, PROJECTS, SEARCH, ACCESS)
)
# A health service name that is SERVING as long as the process serves, whatever PostgreSQL
# and the object store do: for liveness probes, which must not restart every replica
# during a database outage ("" and the API services follow the dependencies).
LIVENESS_SERVICE = "datasetd.liveness"


def build_server(
    *,
    authenticator: Authenticator,
    datasets: Sequence[object],
    inputs: Sequence[object],
    annotations: Sequence[object],
    versions: Sequence[object],
    ontologies: Sequence[object],
    projects: Sequence[object],
    search: Sequence[object],
    access: Sequence[object],
    clarifai: V2Handlers,
    health_servicer: health.aio.HealthServicer,
    max_message_bytes: int,
    max_concurrent_rpcs: int,
    audit: AuditRepository | None = None,
    input_datasets: InputDatasets | None = None,
    reuse_port: bool = False,
) -> grpc.aio.Server:
    """`reuse_port`: the port is shared with the other worker processes of the
    installation (DATASETD_WORKERS); off, a second server on the port fails to start."""
    check_v2_rules(clarifai.handlers)
    server = grpc.aio.server(
        interceptors=[
            RequestInterceptor(authenticator, in_band_failure, audit=audit, inputs=input_datasets)
        ],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", int(reuse_port)),
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    # Each service is served by parts (a part per resource), composed into one servicer.
    dataset_service_pb2_grpc.add_DatasetServiceServicer_to_server(
        compose(DATASETS, *datasets), server
    )
    input_service_pb2_grpc.add_InputServiceServicer_to_server(compose(INPUTS, *inputs), server)
    annotation_service_pb2_grpc.add_AnnotationServiceServicer_to_server(
        compose(ANNOTATIONS, *annotations), server
    )
    dataset_version_service_pb2_grpc.add_DatasetVersionServiceServicer_to_server(
        compose(VERSIONS, *versions), server
    )
    ontology_service_pb2_grpc.add_OntologyServiceServicer_to_server(
        compose(ONTOLOGIES, *ontologies), server
    )
    project_service_pb2_grpc.add_ProjectServiceServicer_to_server(
        compose(PROJECTS, *projects), server
    )
    search_service_pb2_grpc.add_SearchServiceServicer_to_server(compose(SEARCH, *search), server)
    access_service_pb2_grpc.add_AccessServiceServicer_to_server(compose(ACCESS, *access), server)
    # Clarifai's V2 on the same port, its parts mapped onto the native ones.
    server.add_generic_rpc_handlers((clarifai.generic_handler(),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(
        (
            *SERVICE_NAMES,
            CLARIFAI_V2,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server
