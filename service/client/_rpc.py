"""One connection's stubs, credentials and error mapping, shared by every client module."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from datasetd.v1 import (
    annotation_service_pb2_grpc,
    dataset_service_pb2_grpc,
    dataset_version_service_pb2_grpc,
    input_service_pb2_grpc,
    search_service_pb2_grpc,
)
from google.protobuf.message import Message

from service.client.errors import from_rpc_error

T = TypeVar("T")

# The server's WAL position after a call that wrote, and the position a read asks a read
# replica to have replayed: carrying one into the other lets this client read its own
# writes whichever server replica (and database replica) answers.
LSN_HEADER = "x-datasetd-lsn"
MIN_LSN_HEADER = "x-datasetd-min-lsn"


def _lsn(text: str) -> int | None:
    """A WAL position such as `16/B374D848` as a number; None when it is not one."""
    high, sep, low = text.partition("/")
    try:
        return int(high, 16) << 32 | int(low, 16) if sep else None
    except ValueError:
        return None


class Rpc:
    """Calls the server for one app with one key; failures raise `DatasetdError`s."""

    def __init__(self, channel: grpc.Channel, app_id: str, api_key: str) -> None:
        self.app = app_id
        self._credentials: tuple[tuple[str, str], ...] = (("authorization", f"Key {api_key}"),)
        # The newest position a call returned; uploads call from several threads.
        self._position: tuple[int, str] | None = None
        self._position_lock = threading.Lock()
        self.datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        self.inputs = input_service_pb2_grpc.InputServiceStub(channel)
        self.annotations = annotation_service_pb2_grpc.AnnotationServiceStub(channel)
        self.versions = dataset_version_service_pb2_grpc.DatasetVersionServiceStub(channel)
        self.search = search_service_pb2_grpc.SearchServiceStub(channel)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The credentials, and the position of this client's latest write if it has one."""
        position = self._position
        if position is None:
            return self._credentials
        return (*self._credentials, (MIN_LSN_HEADER, position[1]))

    def _saw(self, trailing: Sequence[tuple[str, str | bytes]] | None) -> None:
        for key, value in trailing or ():
            if key == LSN_HEADER and isinstance(value, str) and (lsn := _lsn(value)) is not None:
                with self._position_lock:
                    if self._position is None or lsn > self._position[0]:
                        self._position = (lsn, value)

    def call(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        """A unary call (or a client stream, given an iterator of requests)."""
        try:
            with_call = getattr(method, "with_call", None)
            if with_call is None:
                return method(request, metadata=self.metadata, timeout=timeout)
            response: T
            response, call = with_call(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as error:
            # `from None`: the typed error carries everything the RpcError did.
            raise from_rpc_error(error) from None
        self._saw(call.trailing_metadata())
        return response

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
