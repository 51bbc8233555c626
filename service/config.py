"""Settings from DATASETD_* environment variables (all documented in the README)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
MAX_S3_OBJECT_BYTES = 5 * 1024**4


class ConfigError(ValueError):
    pass


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


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path(".data")
    database_url: str = ""
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "datasetd"
    s3_secure: bool = False
    s3_region: str = ""
    bootstrap_key: str = ""
    bootstrap_app: str = "main"
    delete_retention: timedelta = timedelta(days=7)
    orphan_grace: timedelta = timedelta(hours=1)
    request_id_ttl: timedelta = timedelta(hours=24)
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
    fetch_max_bytes: int = 64 * 1024 * 1024
    fetch_timeout: timedelta = timedelta(seconds=30)
    max_upload_bytes: int = 2 * 1024**3
    max_import_bytes: int = 2 * 1024**3
    job_lease: timedelta = timedelta(seconds=30)
    job_concurrency: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env

        def get(name: str, default: str) -> str:
            return env.get(f"DATASETD_{name}", default)

        config = cls(
            listen=get("LISTEN", cls.listen),
            data_dir=Path(get("DATA_DIR", str(cls.data_dir))),
            database_url=get("DATABASE_URL", ""),
            s3_endpoint=get("S3_ENDPOINT", ""),
            s3_access_key=get("S3_ACCESS_KEY", ""),
            s3_secret_key=get("S3_SECRET_KEY", ""),
            s3_bucket=get("S3_BUCKET", cls.s3_bucket),
            s3_secure=_bool("DATASETD_S3_SECURE", get("S3_SECURE", "false")),
            s3_region=get("S3_REGION", ""),
            bootstrap_key=get("BOOTSTRAP_KEY", ""),
            bootstrap_app=get("BOOTSTRAP_APP", cls.bootstrap_app),
            delete_retention=parse_duration(
                "DATASETD_DELETE_RETENTION", get("DELETE_RETENTION", "7d")
            ),
            orphan_grace=parse_duration("DATASETD_ORPHAN_GRACE", get("ORPHAN_GRACE", "1h")),
            request_id_ttl=parse_duration("DATASETD_REQUEST_ID_TTL", get("REQUEST_ID_TTL", "24h")),
            maintenance_interval=parse_duration(
                "DATASETD_MAINTENANCE_INTERVAL", get("MAINTENANCE_INTERVAL", "60s")
            ),
            download_url_ttl=parse_duration(
                "DATASETD_DOWNLOAD_URL_TTL", get("DOWNLOAD_URL_TTL", "1h")
            ),
            max_message_bytes=_int(
                "DATASETD_MAX_MESSAGE_BYTES",
                get("MAX_MESSAGE_BYTES", str(cls.max_message_bytes)),
                1024 * 1024,
            ),
            max_concurrent_rpcs=_int(
                "DATASETD_MAX_CONCURRENT_RPCS",
                get("MAX_CONCURRENT_RPCS", str(cls.max_concurrent_rpcs)),
                1,
            ),
            db_pool_size=_int("DATASETD_DB_POOL_SIZE", get("DB_POOL_SIZE", "10"), 2),
            shutdown_grace=parse_duration("DATASETD_SHUTDOWN_GRACE", get("SHUTDOWN_GRACE", "10s")),
            auth_cache_seconds=parse_duration(
                "DATASETD_AUTH_CACHE", get("AUTH_CACHE", "5s")
            ).total_seconds(),
            fetch_urls=_bool("DATASETD_FETCH_URLS", get("FETCH_URLS", "false")),
            fetch_max_bytes=_int(
                "DATASETD_FETCH_MAX_BYTES", get("FETCH_MAX_BYTES", str(cls.fetch_max_bytes)), 1
            ),
            fetch_timeout=parse_duration("DATASETD_FETCH_TIMEOUT", get("FETCH_TIMEOUT", "30s")),
            max_upload_bytes=_int(
                "DATASETD_MAX_UPLOAD_BYTES",
                get("MAX_UPLOAD_BYTES", str(cls.max_upload_bytes)),
                1,
            ),
            max_import_bytes=_int(
                "DATASETD_MAX_IMPORT_BYTES",
                get("MAX_IMPORT_BYTES", str(cls.max_import_bytes)),
                1,
            ),
            job_lease=parse_duration("DATASETD_JOB_LEASE", get("JOB_LEASE", "30s")),
            job_concurrency=_int("DATASETD_JOB_CONCURRENCY", get("JOB_CONCURRENCY", "1"), 1),
            log_level=get("LOG_LEVEL", "INFO"),
            log_format=get("LOG_FORMAT", "text"),
        )
        config.validate()
        return config

    def validate(self) -> None:
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
        if self.job_lease < timedelta(seconds=1):
            # Renewed every third of it: shorter would turn heartbeats into a busy loop.
            raise ConfigError("DATASETD_JOB_LEASE must be at least 1s")
        if self.bootstrap_key and len(self.bootstrap_key) < 16:
            raise ConfigError("DATASETD_BOOTSTRAP_KEY must be at least 16 characters")
