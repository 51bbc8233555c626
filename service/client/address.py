"""Where the CLI and the library find the server when not told: one variable moves both."""

from __future__ import annotations

from collections.abc import Mapping

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Listening on every interface is reached through the loopback one.
_WILDCARD_HOSTS = ("", "0.0.0.0", "[::]", "::")


def default_address(env: Mapping[str, str]) -> str:
    """DATASETD_ADDRESS, else the address of DATASETD_LISTEN (what `serve` binds), else
    DEFAULT_ADDRESS."""
    if address := env.get("DATASETD_ADDRESS", ""):
        return address
    listen = env.get("DATASETD_LISTEN", "")
    host, colon, port = listen.rpartition(":")
    if not colon or not port.isdigit():
        return DEFAULT_ADDRESS
    return f"{'127.0.0.1' if host in _WILDCARD_HOSTS else host}:{port}"
