"""One connection's stubs, credentials and error mapping, shared by every client module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from datasetd.v1 import (
    annotation_service_pb2_grpc,
    dataset_service_pb2_grpc,
    dataset_version_service_pb2_grpc,
    input_service_pb2_grpc,
)
from google.protobuf.message import Message

from service.client.errors import from_rpc_error

T = TypeVar("T")


class Rpc:
    """Calls the server for one app with one key; failures raise `DatasetdError`s."""

    def __init__(self, channel: grpc.Channel, app_id: str, api_key: str) -> None:
        self.app = app_id
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Key {api_key}"),)
        self.datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        self.inputs = input_service_pb2_grpc.InputServiceStub(channel)
        self.annotations = annotation_service_pb2_grpc.AnnotationServiceStub(channel)
        self.versions = dataset_version_service_pb2_grpc.DatasetVersionServiceStub(channel)

    def call(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        """A unary call (or a client stream, given an iterator of requests)."""
        try:
            return method(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as error:
            # `from None`: the typed error carries everything the RpcError did.
            raise from_rpc_error(error) from None

    def pages(self, method: Callable[..., T], request_for: Callable[[str], Any]) -> Iterator[T]:
        """The responses of a paginated list call, fetched lazily, one page token after another."""
        token = ""
        while True:
            response = self.call(method, request_for(token))
            yield response
            token = response.next_page_token  # type: ignore[attr-defined]
            if not token:
                return

    def app_call(self, method: Callable[..., T], request_type: type[Any], **fields: Any) -> T:
        """A unary call with a `request_type` request for this app; fields given as None
        (an optional request id or etag) stay unset."""
        return self.call(method, request_type(app_id=self.app, **fields))

    def app_pages(
        self, method: Callable[..., T], request_type: type[Any], page_size: int, **fields: Any
    ) -> Iterator[T]:
        """The pages of a list call for this app, as `pages` walks them."""
        return self.pages(
            method,
            lambda token: request_type(
                app_id=self.app, page_size=page_size, page_token=token, **fields
            ),
        )

    def stream(self, method: Callable[..., Iterator[T]], request: Any) -> Iterator[T]:
        """A server-streaming call; errors raised mid-stream are typed too."""
        try:
            yield from method(request, metadata=self.metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


def time_of(message: Message, name: str) -> datetime | None:
    """A Timestamp field as an aware datetime; None when unset (not the epoch)."""
    if not message.HasField(name):
        return None
    result: datetime = getattr(message, name).ToDatetime(tzinfo=UTC)
    return result
