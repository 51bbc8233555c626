"""The entry point of the client library."""

from __future__ import annotations

from types import TracebackType

import grpc

from service.client._rpc import Rpc
from service.client.dataset import Dataset
from service.client.datasets import Datasets
from service.client.inputs import Inputs
from service.client.ontologies import Ontologies
from service.client.projects import Projects
from service.client.search import Searches


class Client(Searches):
    """Connection to a datasetd server for one app and API key; app-wide search
    (`search`, `embedding_models`, `input_embeddings`) comes from `Searches`.

    Use as a context manager (or call `close()`) so the channel is released.
    """

    def __init__(self, address: str, api_key: str, app: str, tls: bool = False) -> None:
        # Unbounded messages on our side: the server enforces its own limits
        # and reports them as errors a caller can read.
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self._channel: grpc.Channel = (
            grpc.secure_channel(address, grpc.ssl_channel_credentials(), options=options)
            if tls
            else grpc.insecure_channel(address, options=options)
        )
        self.app = app
        self.rpc = Rpc(self._channel, app, api_key)
        self.datasets = Datasets(self.rpc)
        self.inputs = Inputs(self.rpc)
        self.ontologies = Ontologies(self.rpc, self._channel)
        self.projects = Projects(self.rpc, self._channel)

    def dataset(self, dataset_id: str) -> Dataset:
        """Operations on one dataset's content: uploads, inputs, versions, merge."""
        return Dataset(self.rpc, dataset_id)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
