"""The client's channel credentials: plaintext, TLS, and the files TLS reads."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from service.client.transport import channel_credentials


def test_plaintext_unless_told_otherwise() -> None:
    assert channel_credentials() is None


def test_tls_a_ca_file_or_a_client_certificate_means_tls(tmp_path: Path) -> None:
    pem = tmp_path / "any.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    assert isinstance(channel_credentials(tls=True), grpc.ChannelCredentials)
    assert isinstance(channel_credentials(ca_file=str(pem)), grpc.ChannelCredentials)
    both = channel_credentials(client_cert=str(pem), client_key=str(pem))
    assert isinstance(both, grpc.ChannelCredentials)


@pytest.mark.parametrize(
    ("cert", "key"), [("client.pem", None), (None, "client-key.pem")], ids=["no key", "no cert"]
)
def test_a_client_certificate_needs_its_key(cert: str | None, key: str | None) -> None:
    with pytest.raises(ValueError, match="--client-cert and --client-key"):
        channel_credentials(client_cert=cert, client_key=key)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ValueError, match=r"--ca-file .*missing\.pem"):
        channel_credentials(ca_file=missing)
    with pytest.raises(ValueError, match="--client-key"):
        channel_credentials(client_cert=__file__, client_key=missing)
