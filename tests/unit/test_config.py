from __future__ import annotations

from datetime import timedelta

import pytest

from service.config import Config, ConfigError, parse_duration


def test_durations() -> None:
    assert parse_duration("X", "7d") == timedelta(days=7)
    assert parse_duration("X", "90") == timedelta(seconds=90)
    assert parse_duration("X", "1.5h") == timedelta(minutes=90)
    assert parse_duration("X", "250ms") == timedelta(milliseconds=250)
    with pytest.raises(ConfigError, match="X="):
        parse_duration("X", "soon")


def test_defaults_and_overrides() -> None:
    default = Config.from_env({})
    assert default.listen == "127.0.0.1:50051"
    assert default.delete_retention == timedelta(days=7)
    assert not default.database_url and not default.s3_endpoint
    custom = Config.from_env(
        {
            "DATASETD_DELETE_RETENTION": "1h",
            "DATASETD_S3_ENDPOINT": "minio:9000",
            "DATASETD_S3_ACCESS_KEY": "a",
            "DATASETD_S3_SECRET_KEY": "b",
            "DATASETD_S3_SECURE": "true",
            "DATASETD_MAX_CONCURRENT_RPCS": "8",
        }
    )
    assert custom.delete_retention == timedelta(hours=1)
    assert custom.s3_secure and custom.max_concurrent_rpcs == 8


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATASETD_S3_ENDPOINT": "x:1"}, "ACCESS_KEY"),
        ({"DATASETD_S3_BUCKET": "ab"}, "3..63"),
        ({"DATASETD_LOG_FORMAT": "xml"}, "text or json"),
        ({"DATASETD_BOOTSTRAP_KEY": "short"}, "16"),
        ({"DATASETD_S3_SECURE": "maybe"}, "true or false"),
        ({"DATASETD_DB_POOL_SIZE": "1"}, "at least 2"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_env(env)


def test_upload_cap_defaults_to_2_gib_and_stays_within_s3_limits() -> None:
    assert Config.from_env({}).max_upload_bytes == 2 * 1024**3
    assert Config.from_env({"DATASETD_MAX_UPLOAD_BYTES": "1048576"}).max_upload_bytes == 1 << 20
    for value, message in [("0", "at least 1"), ("2G", "integer"), (str(5 * 1024**4 + 1), "5 TiB")]:
        with pytest.raises(ConfigError, match=f"DATASETD_MAX_UPLOAD_BYTES.*{message}"):
            Config.from_env({"DATASETD_MAX_UPLOAD_BYTES": value})


def test_import_cap_defaults_to_2_gib() -> None:
    assert Config.from_env({}).max_import_bytes == 2 * 1024**3
    assert Config.from_env({"DATASETD_MAX_IMPORT_BYTES": "1048576"}).max_import_bytes == 1 << 20
    with pytest.raises(ConfigError, match=r"DATASETD_MAX_IMPORT_BYTES.*at least 1"):
        Config.from_env({"DATASETD_MAX_IMPORT_BYTES": "0"})
