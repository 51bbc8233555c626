"""Settings from DATASETD_* environment variables (all documented in the README)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
# host:port, IPv6 hosts in brackets; the host may be empty (all interfaces).
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]*):(\d{1,5})$")
MAX_S3_OBJECT_BYTES = 5 * 1024**4
# Originals of one embedding batch are held in memory together.
MAX_EMBED_BATCH = 1024
# Server processes sharing the ports (DATASETD_WORKERS): each holds its own pool.
MAX_WORKERS = 64


class ConfigError(ValueError):
    pass


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota
    (a container limited to 2 CPUs on a 64-core host gets 2, not os.cpu_count()'s 64)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, min(cores, MAX_WORKERS))


def parse_duration(name: str, value: str) -> timedelta:
    match = _DURATION.match(value.strip())
    if not match:
        raise ConfigError(f"{name}={value!r}: expected a duration such as 30s, 15m, 12h or 7d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={value!r}: expected true or false")


def _int(name: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected an integer") from None
    if number < minimum:
        raise ConfigError(f"{name}={value!r}: must be at least {minimum}")
    return number


def _fetch_mode(name: str, value: str) -> str:
    """The mode of DATASETD_FETCH_URLS: store (fetch URL media and store them), header
    (read only the headers of URL images) or off; true and false keep their meaning."""
    if value.strip().lower() == "header":
        return "header"
    try:
        return "store" if _bool(name, value) else "off"
    except ConfigError:
        raise ConfigError(f"{name}={value!r}: expected true, false or header") from None


def _networks(name: str, value: str) -> tuple[str, ...]:
    networks = tuple(part.strip() for part in value.split(",") if part.strip())
    for network in networks:
        try:
            ipaddress.ip_network(network)
        except ValueError as exc:
            raise ConfigError(f"{name}: {network!r} is not a network ({exc})") from None
    return networks


@dataclass(frozen=True)
class _Env:
    """Typed reads of DATASETD_* variables; a bad value's error names its variable."""

    values: Mapping[str, str]

    def text(self, name: str, default: str = "") -> str:
        return self.values.get(f"DATASETD_{name}", default)

    def flag(self, name: str) -> bool:
        return _bool(f"DATASETD_{name}", self.text(name, "false"))

    def duration(self, name: str, default: str) -> timedelta:
        return parse_duration(f"DATASETD_{name}", self.text(name, default))

    def integer(self, name: str, default: int, minimum: int) -> int:
        return _int(f"DATASETD_{name}", self.text(name, str(default)), minimum)


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:50051"
    # The HTTP port (metrics, health, Clarifai REST, downloads); "off" starts none.
    http_listen: str = "127.0.0.1:8080"
    # The base URL clients reach the HTTP port at ("https://datasets.example.com"); download
    # links use it. Empty: the address the HTTP port listens on.
    public_url: str = ""
    data_dir: Path = Path(".data")
    database_url: str = ""
    # A streaming replica for read-only RPCs; empty sends every query to database_url.
    database_read_url: str = ""
    # A replica further behind the primary than this is not read from.
    read_max_lag: timedelta = timedelta(seconds=30)
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "datasetd"
    s3_secure: bool = False
    s3_region: str = ""
    s3_timeout: timedelta = timedelta(seconds=10)
    bootstrap_key: str = ""
    bootstrap_app: str = "main"
    delete_retention: timedelta = timedelta(days=7)
    orphan_grace: timedelta = timedelta(hours=1)
    request_id_ttl: timedelta = timedelta(hours=24)
    # How long audit events are kept before the maintenance loop purges them.
    audit_retention: timedelta = timedelta(days=90)
    maintenance_interval: timedelta = timedelta(minutes=1)
    download_url_ttl: timedelta = timedelta(hours=1)
    max_message_bytes: int = 136 * 1024 * 1024
    max_concurrent_rpcs: int = 256
    db_pool_size: int = 10
    shutdown_grace: timedelta = timedelta(seconds=10)
    auth_cache_seconds: float = 5.0
    log_level: str = "INFO"
    log_format: str = "text"
    fetch_urls: bool = False
    # DATASETD_FETCH_URLS=header: URL images keep their URL; only the first bytes of
    # their file are read, for their size (a ranged GET).
    fetch_url_headers: bool = False
    fetch_max_bytes: int = 64 * 1024 * 1024
    fetch_timeout: timedelta = timedelta(seconds=30)
    # URL reads open at once per server process (fetches and header reads).
    fetch_concurrency: int = 32
    # Networks URL fetches may reach although they are not public (CIDR, comma-separated).
    fetch_allowed_networks: tuple[str, ...] = ()
    max_upload_bytes: int = 2 * 1024**3
    max_import_bytes: int = 2 * 1024**3
    job_lease: timedelta = timedelta(seconds=30)
    job_concurrency: int = 1
    # The built-in embedding models (datasetd-image-v1, datasetd-text-v1); off: none.
    builtin_embedders: bool = True
    # An ONNX image model (path) and its preprocessing settings (JSON; default: the
    # model's path with .json).
    embedder_onnx: str = ""
    embedder_onnx_settings: str = ""
    # Inputs the embedding job embeds per batch (one transaction each).
    embed_batch: int = 64
    # TLS on the gRPC and HTTP ports: PEM certificate chain and private key paths; with
    # tls_client_ca (PEM CA certificates), clients must present a certificate it signed.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Server processes sharing the gRPC and HTTP ports under one supervisor (service.supervisor);
    # 1 runs today's single process. from_env defaults to the available cores.
    workers: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        get = _Env(os.environ if env is None else env)
        fetch_mode = _fetch_mode("DATASETD_FETCH_URLS", get.text("FETCH_URLS"))
        config = cls(
            listen=get.text("LISTEN", cls.listen),
            http_listen=get.text("HTTP_LISTEN", cls.http_listen),
            public_url=get.text("PUBLIC_URL").rstrip("/"),
            data_dir=Path(get.text("DATA_DIR", str(cls.data_dir))),
            database_url=get.text("DATABASE_URL"),
            database_read_url=get.text("DATABASE_READ_URL"),
            read_max_lag=get.duration("READ_MAX_LAG", "30s"),
            s3_endpoint=get.text("S3_ENDPOINT"),
            s3_access_key=get.text("S3_ACCESS_KEY"),
            s3_secret_key=get.text("S3_SECRET_KEY"),
            s3_bucket=get.text("S3_BUCKET", cls.s3_bucket),
            s3_secure=get.flag("S3_SECURE"),
            s3_region=get.text("S3_REGION"),
            s3_timeout=get.duration("S3_TIMEOUT", "10s"),
            bootstrap_key=get.text("BOOTSTRAP_KEY"),
            bootstrap_app=get.text("BOOTSTRAP_APP", cls.bootstrap_app),
            delete_retention=get.duration("DELETE_RETENTION", "7d"),
            orphan_grace=get.duration("ORPHAN_GRACE", "1h"),
            request_id_ttl=get.duration("REQUEST_ID_TTL", "24h"),
            audit_retention=get.duration("AUDIT_RETENTION", "90d"),
            maintenance_interval=get.duration("MAINTENANCE_INTERVAL", "60s"),
            download_url_ttl=get.duration("DOWNLOAD_URL_TTL", "1h"),
            max_message_bytes=get.integer("MAX_MESSAGE_BYTES", cls.max_message_bytes, 1024 * 1024),
            max_concurrent_rpcs=get.integer("MAX_CONCURRENT_RPCS", cls.max_concurrent_rpcs, 1),
            db_pool_size=get.integer("DB_POOL_SIZE", 10, 2),
            shutdown_grace=get.duration("SHUTDOWN_GRACE", "10s"),
            auth_cache_seconds=get.duration("AUTH_CACHE", "5s").total_seconds(),
            fetch_urls=fetch_mode == "store",
            fetch_url_headers=fetch_mode == "header",
            fetch_max_bytes=get.integer("FETCH_MAX_BYTES", cls.fetch_max_bytes, 1),
            fetch_timeout=get.duration("FETCH_TIMEOUT", "30s"),
            fetch_concurrency=get.integer("FETCH_CONCURRENCY", cls.fetch_concurrency, 1),
            fetch_allowed_networks=_networks(
                "DATASETD_FETCH_ALLOWED_NETWORKS", get.text("FETCH_ALLOWED_NETWORKS")
            ),
            max_upload_bytes=get.integer("MAX_UPLOAD_BYTES", cls.max_upload_bytes, 1),
            max_import_bytes=get.integer("MAX_IMPORT_BYTES", cls.max_import_bytes, 1),
            job_lease=get.duration("JOB_LEASE", "30s"),
            job_concurrency=get.integer("JOB_CONCURRENCY", 1, 1),
            builtin_embedders=_bool(
                "DATASETD_BUILTIN_EMBEDDERS", get.text("BUILTIN_EMBEDDERS", "on")
            ),
            embedder_onnx=get.text("EMBEDDER_ONNX"),
            embedder_onnx_settings=get.text("EMBEDDER_ONNX_SETTINGS"),
            embed_batch=get.integer("EMBED_BATCH", cls.embed_batch, 1),
            tls_cert=get.text("TLS_CERT"),
            tls_key=get.text("TLS_KEY"),
            tls_client_ca=get.text("TLS_CLIENT_CA"),
            workers=get.integer("WORKERS", available_cores(), 1),
            log_level=get.text("LOG_LEVEL", "INFO"),
            log_format=get.text("LOG_FORMAT", "text"),
        )
        config.validate()
        return config

    def validate(self) -> None:
        if self.database_read_url and not self.database_url:
            raise ConfigError(
                "DATASETD_DATABASE_READ_URL is set: DATASETD_DATABASE_URL (the primary) is "
                "required too"
            )
        listen = _HOST_PORT.match(self.http_listen)
        if self.http_listen != "off" and (listen is None or int(listen.group(2)) > 65535):
            raise ConfigError(
                f"DATASETD_HTTP_LISTEN={self.http_listen!r}: expected host:port (port 0 picks a "
                "free one) or off"
            )
        if self.read_max_lag <= timedelta(0):
            raise ConfigError("DATASETD_READ_MAX_LAG must be positive (such as 30s)")
        if self.s3_endpoint and not (self.s3_access_key and self.s3_secret_key):
            raise ConfigError(
                "DATASETD_S3_ENDPOINT is set: DATASETD_S3_ACCESS_KEY and DATASETD_S3_SECRET_KEY "
                "are required too"
            )
        if not 3 <= len(self.s3_bucket) <= 63:
            raise ConfigError("DATASETD_S3_BUCKET must be 3..63 characters (S3 bucket rules)")
        if self.log_format not in ("text", "json"):
            raise ConfigError("DATASETD_LOG_FORMAT must be text or json")
        if self.max_upload_bytes > MAX_S3_OBJECT_BYTES:
            raise ConfigError(
                "DATASETD_MAX_UPLOAD_BYTES must be at most 5 TiB (the largest S3 object)"
            )
        if self.audit_retention <= timedelta(0):
            raise ConfigError("DATASETD_AUDIT_RETENTION must be positive (such as 90d)")
        if self.s3_timeout <= timedelta(0):
            raise ConfigError("DATASETD_S3_TIMEOUT must be positive")
        if self.job_lease < timedelta(seconds=1):
            # Renewed every third of it: shorter would turn heartbeats into a busy loop.
            raise ConfigError("DATASETD_JOB_LEASE must be at least 1s")
        if self.embedder_onnx_settings and not self.embedder_onnx:
            raise ConfigError(
                "DATASETD_EMBEDDER_ONNX_SETTINGS is set: DATASETD_EMBEDDER_ONNX (the model) is "
                "required too"
            )
        if not 1 <= self.embed_batch <= MAX_EMBED_BATCH:
            raise ConfigError(f"DATASETD_EMBED_BATCH must be 1..{MAX_EMBED_BATCH}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"DATASETD_WORKERS={self.workers}: must be 1..{MAX_WORKERS}")
        self.check_tls()
        if self.bootstrap_key and len(self.bootstrap_key) < 16:
            raise ConfigError("DATASETD_BOOTSTRAP_KEY must be at least 16 characters")

    def check_tls(self) -> None:
        """The TLS variables that only make sense together (the files are read at start)."""
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = (
                ("TLS_CERT", "TLS_KEY (its private key)")
                if self.tls_cert
                else ("TLS_KEY", "TLS_CERT (its certificate)")
            )
            raise ConfigError(f"DATASETD_{given} is set: DATASETD_{missing} is required too")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError(
                "DATASETD_TLS_CLIENT_CA is set: client certificates need TLS, "
                "DATASETD_TLS_CERT and DATASETD_TLS_KEY are required too"
            )
