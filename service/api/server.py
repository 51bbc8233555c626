"""The grpc.aio server with our services, health checking and reflection."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from datasetd.v1 import (
    annotation_service_pb2,
    annotation_service_pb2_grpc,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    dataset_version_service_pb2,
    dataset_version_service_pb2_grpc,
    input_pb2,  # noqa: F401  (registered so reflection can describe Input, InputBatch)
    input_service_pb2,
    input_service_pb2_grpc,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.annotations import AnnotationServicer
from service.api.datasets import DatasetServicer
from service.api.inputs import InputServicer
from service.api.interceptors import RequestInterceptor
from service.api.reflection import enable_reflection
from service.api.versions import DatasetVersionServicer
from service.domain.auth import Authenticator

SERVICE_NAMES: Sequence[str] = (
    dataset_service_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name,
    input_service_pb2.DESCRIPTOR.services_by_name["InputService"].full_name,
    annotation_service_pb2.DESCRIPTOR.services_by_name["AnnotationService"].full_name,
    dataset_version_service_pb2.DESCRIPTOR.services_by_name["DatasetVersionService"].full_name,
)


def build_server(
    *,
    authenticator: Authenticator,
    datasets: DatasetServicer,
    inputs: InputServicer,
    annotations: AnnotationServicer,
    versions: DatasetVersionServicer,
    health_servicer: health.aio.HealthServicer,
    max_message_bytes: int,
    max_concurrent_rpcs: int,
) -> grpc.aio.Server:
    server = grpc.aio.server(
        interceptors=[RequestInterceptor(authenticator)],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    dataset_service_pb2_grpc.add_DatasetServiceServicer_to_server(datasets, server)
    input_service_pb2_grpc.add_InputServiceServicer_to_server(inputs, server)
    annotation_service_pb2_grpc.add_AnnotationServiceServicer_to_server(annotations, server)
    dataset_version_service_pb2_grpc.add_DatasetVersionServiceServicer_to_server(versions, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server
