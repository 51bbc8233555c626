"""The start-up banner of `serve`, printed by the single server process or by the
supervisor of several (kept apart from service.app so the supervisor imports nothing heavy)."""

from __future__ import annotations

from service.config import Config


def banner_text(
    config: Config,
    port: int,
    http_port: int | None,
    bootstrap_secret: str | None,
    workers: int = 1,
) -> str:
    """What `serve` prints once it serves: the addresses, the bootstrap key (when this
    start created it or it is configured), a grpcurl call to paste. `http_port`: None with
    DATASETD_HTTP_LISTEN=off."""
    host = config.listen.rsplit(":", 1)[0]
    address = f"{host}:{port}"
    key = bootstrap_secret
    lines = [f"datasetd is serving on {address} (app {config.bootstrap_app!r})"]
    tls = bool(config.tls_cert)
    if tls:
        mutual = " (client certificates required)" if config.tls_client_ca else ""
        lines.append(f"TLS on the gRPC and HTTP ports{mutual}")
    if workers > 1:
        lines.append(f"{workers} worker processes share the ports (DATASETD_WORKERS)")
    if http_port is not None:
        http_host = config.http_listen.rsplit(":", 1)[0] or "0.0.0.0"
        scheme = "https" if tls else "http"
        lines.append(f"metrics on {scheme}://{http_host}:{http_port}/metrics")
        lines.append(
            f"Clarifai REST and downloads on {scheme}://{http_host}:{http_port}/v2 "
            "(clarifai.api.V2 also on the gRPC port)"
        )
    if key:
        lines.append(f"bootstrap API key for app {config.bootstrap_app!r}: {key}")
        if not config.bootstrap_key:
            lines.append("  (created now and shown only once: store it somewhere safe)")
    else:
        key = "<your key>"
        lines.append(
            "bootstrap API key: shown on first start only; lost it? set DATASETD_BOOTSTRAP_KEY "
            "(16 characters or more) and restart: it becomes a key of user owner too"
        )
    lines += [
        "try it:",
        f"  .venv/bin/grpcurl {_grpcurl_transport(config)} -H 'authorization: Key {key}' "
        f'-d \'{{"app_id": "{config.bootstrap_app}"}}\' {address} '
        "datasetd.v1.DatasetService/ListDatasets",
    ]
    if tls:
        lines.append(
            "  (-cacert: the CA that signed DATASETD_TLS_CERT; the certificate itself when "
            "it is self-signed)"
        )
    if config.tls_client_ca:
        lines.append(
            "  (-cert, -key: a client certificate signed by a CA of DATASETD_TLS_CLIENT_CA, "
            "and its key)"
        )
    lines.append("stop with Ctrl-C")
    return "\n".join(lines)


def _grpcurl_transport(config: Config) -> str:
    """grpcurl's options for the gRPC port's transport."""
    if not config.tls_cert:
        return "-plaintext"
    options = f"-cacert {config.tls_cert}"
    if config.tls_client_ca:
        options += " -cert client.pem -key client-key.pem"
    return options
