"""`Client`: the entry point, constructed like the Vi SDK's (a secret key, an organization,
an endpoint), each falling back to the `datasetd` command's environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from datasetd.client.datasets import ViDatasets
from datasetd.client.types import DatasetDownloadResult
from service.client import Client as NativeClient
from service.client.address import default_address
from service.client.dataset import Dataset as NativeDataset

DEFAULT_APP = "main"


class Client:
    """A connection to datasetd for one app with one API key.

    * `secret_key`: the API key (`dsd_...`); default `DATASETD_API_KEY`.
    * `organization_id`: the app (datasetd's tenant, Vi's organization); default
      `DATASETD_APP`, else "main".
    * `endpoint`: host:port of the gRPC server; default `DATASETD_ADDRESS`, else the
      address of `DATASETD_LISTEN` (as the `datasetd` command), else 127.0.0.1:50051.
      `tls`: default `DATASETD_TLS=1`; `ca_file` (PEM, the server's CA; implies TLS), and
      `client_cert` with `client_key` (PEM) for a server that asks for client
      certificates: default `DATASETD_CA_FILE`, `DATASETD_CLIENT_CERT`,
      `DATASETD_CLIENT_KEY`, as the `datasetd` command reads them.

    `client.datasets` has the Vi SDK's dataset methods; `client.native` is the full
    `service.client` library on the same connection (uploads, versions, inputs, ...).
    Use as a context manager, or call `close()`.
    """

    def __init__(
        self,
        secret_key: str | None = None,
        organization_id: str | None = None,
        endpoint: str | None = None,
        tls: bool | None = None,
        ca_file: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
    ) -> None:
        key = secret_key or os.environ.get("DATASETD_API_KEY")
        if not key:
            raise ValueError("no secret_key given and DATASETD_API_KEY is not set")
        self.organization_id = organization_id or os.environ.get("DATASETD_APP") or DEFAULT_APP
        self.endpoint = endpoint or default_address(os.environ)
        secure = tls if tls is not None else os.environ.get("DATASETD_TLS") == "1"
        self.native = NativeClient(
            self.endpoint,
            key,
            self.organization_id,
            tls=secure,
            ca_file=ca_file or os.environ.get("DATASETD_CA_FILE") or None,
            client_cert=client_cert or os.environ.get("DATASETD_CLIENT_CERT") or None,
            client_key=client_key or os.environ.get("DATASETD_CLIENT_KEY") or None,
        )
        self.datasets = ViDatasets(self.native)

    def dataset(self, dataset_id: str) -> NativeDataset:
        """One dataset's content (uploads, inputs, versions): `service.client`'s Dataset."""
        return self.native.dataset(dataset_id)

    def get_dataset(
        self,
        dataset_id: str,
        save_path: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        show_progress: bool = True,
    ) -> DatasetDownloadResult:
        """`datasets.download(dataset_id, save_dir=save_path)` with the default settings."""
        return self.datasets.download(
            dataset_id,
            save_dir=Path(save_path) if save_path is not None else None,
            overwrite=overwrite,
            show_progress=show_progress,
        )

    def close(self) -> None:
        self.native.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
