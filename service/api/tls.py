"""TLS of the gRPC and HTTP ports (DATASETD_TLS_CERT, DATASETD_TLS_KEY, DATASETD_TLS_CLIENT_CA).

The files are read and checked once, at start: a missing file, a file that is not PEM or a key
that does not belong to the certificate stops the start with a ConfigError naming the
variable, before anything is opened."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from service.config import Config, ConfigError

_CERT = "DATASETD_TLS_CERT"
_KEY = "DATASETD_TLS_KEY"
_CLIENT_CA = "DATASETD_TLS_CLIENT_CA"


@dataclass(frozen=True)
class ServerTls:
    """The PEM bytes of the server's certificate chain and key, and of the CAs whose client
    certificates are required (None: no client certificate asked for)."""

    cert_path: str
    key_path: str
    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None
    client_ca_path: str = ""

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """For the HTTP port (aiohttp)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_path, self.key_path)
        if self.client_ca is not None:
            context.load_verify_locations(cadata=self.client_ca.decode("ascii"))
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def _read(variable: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{variable}={path!r}: cannot read the file ({exc.strerror})") from None


def _certificates(variable: str, path: str, data: bytes) -> None:
    """PEM certificates, at least one (OpenSSL parses them, as gRPC will)."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"{variable}={path!r}: not a PEM certificate (no BEGIN CERTIFICATE)")
    try:
        ssl.create_default_context().load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{variable}={path!r}: not a valid PEM certificate ({exc})") from None


def load_server_tls(config: Config) -> ServerTls | None:
    """The TLS material of the ports, checked; None when TLS is off."""
    config.check_tls()
    if not config.tls_cert:
        return None
    cert = _read(_CERT, config.tls_cert)
    key = _read(_KEY, config.tls_key)
    _certificates(_CERT, config.tls_cert, cert)
    if b"PRIVATE KEY-----" not in key:
        raise ConfigError(f"{_KEY}={config.tls_key!r}: not a PEM private key")
    if b"ENCRYPTED" in key:
        # OpenSSL would prompt for the passphrase on the terminal.
        raise ConfigError(
            f"{_KEY}={config.tls_key!r}: the private key is encrypted; give it unencrypted "
            "(protect the file instead)"
        )

    def no_passphrase() -> str:
        raise ConfigError(f"{_KEY}={config.tls_key!r}: the private key is encrypted")

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            config.tls_cert, config.tls_key, password=no_passphrase
        )
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{_KEY}={config.tls_key!r}: not a valid PEM private key of the certificate in "
            f"{_CERT} ({exc.reason or exc})"
        ) from None
    client_ca = None
    if config.tls_client_ca:
        client_ca = _read(_CLIENT_CA, config.tls_client_ca)
        _certificates(_CLIENT_CA, config.tls_client_ca, client_ca)
    return ServerTls(config.tls_cert, config.tls_key, cert, key, client_ca, config.tls_client_ca)
