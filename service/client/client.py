"""The entry point of the client library."""

from __future__ import annotations

from types import TracebackType

import grpc

from service.client._rpc import Rpc
from service.client.access import ApiKeys, Audit, Collaborators, Users
from service.client.dataset import Dataset
from service.client.datasets import Datasets
from service.client.inputs import Inputs
from service.client.ontologies import Ontologies
from service.client.projects import Projects
from service.client.search import Searches
from service.client.transport import channel_credentials, open_channel


class Client(Searches):
    """Connection to a datasetd server for one app and API key; app-wide search
    (`search`, `embedding_models`, `input_embeddings`) comes from `Searches`.

    Use as a context manager (or call `close()`) so the channel is released.
    """

    def __init__(
        self,
        address: str,
        api_key: str,
        app: str,
        tls: bool = False,
        *,
        ca_file: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
    ) -> None:
        """`tls`: verify the server against the system's CAs, or against `ca_file` (PEM;
        given, TLS is on); `client_cert` and `client_key` (PEM) for a server that asks
        for client certificates (mutual TLS)."""
        # Unbounded messages on our side: the server enforces its own limits
        # and reports them as errors a caller can read.
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        credentials = channel_credentials(tls, ca_file, client_cert, client_key)
        self._channel: grpc.Channel = open_channel(address, credentials, options)
        self.app = app
        self.rpc = Rpc(self._channel, app, api_key)
        self.datasets = Datasets(self.rpc)
        self.inputs = Inputs(self.rpc)
        self.ontologies = Ontologies(self.rpc, self._channel)
        self.projects = Projects(self.rpc, self._channel)
        self.users = Users(self.rpc, self._channel)
        self.collaborators = Collaborators(self.rpc, self._channel)
        self.api_keys = ApiKeys(self.rpc, self._channel)
        self.audit = Audit(self.rpc, self._channel)

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
