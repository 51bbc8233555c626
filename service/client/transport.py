"""The channel to the server: plaintext, TLS (the system's CAs or a CA file) or mutual TLS."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc


def _read(option: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{option} {path!r}: cannot read the file ({exc.strerror})") from None


def channel_credentials(
    tls: bool = False,
    ca_file: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
) -> grpc.ChannelCredentials | None:
    """The credentials of a TLS channel, or None for plaintext. A CA file or a client
    certificate implies TLS; a client certificate needs its key and the other way round."""
    if bool(client_cert) != bool(client_key):
        raise ValueError(
            "a client certificate needs its key: give both (--client-cert and --client-key)"
        )
    if not (tls or ca_file or client_cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read("--ca-file", ca_file) if ca_file else None,
        private_key=_read("--client-key", client_key) if client_key else None,
        certificate_chain=_read("--client-cert", client_cert) if client_cert else None,
    )


def open_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    options: Sequence[tuple[str, int]] = (),
) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)
