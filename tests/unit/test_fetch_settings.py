"""DATASETD_FETCH_URLS and the settings of URL reads."""

from __future__ import annotations

import pytest

from service.config import Config, ConfigError


@pytest.mark.parametrize(
    ("value", "store", "header"),
    [
        ("", False, False),
        ("false", False, False),
        ("true", True, False),
        ("on", True, False),
        ("header", False, True),
        (" Header ", False, True),
    ],
)
def test_fetch_modes(value: str, store: bool, header: bool) -> None:
    config = Config.from_env({"DATASETD_FETCH_URLS": value})
    assert (config.fetch_urls, config.fetch_url_headers) == (store, header)


def test_fetch_settings_and_their_refusals() -> None:
    config = Config.from_env(
        {
            "DATASETD_FETCH_CONCURRENCY": "8",
            "DATASETD_FETCH_ALLOWED_NETWORKS": " 10.20.0.0/16, fd00:1::/64 ,",
        }
    )
    assert config.fetch_concurrency == 8
    assert config.fetch_allowed_networks == ("10.20.0.0/16", "fd00:1::/64")
    assert Config.from_env({}).fetch_concurrency == 32
    with pytest.raises(ConfigError, match=r"DATASETD_FETCH_URLS='headers'.*true, false or header"):
        Config.from_env({"DATASETD_FETCH_URLS": "headers"})
    with pytest.raises(ConfigError, match=r"DATASETD_FETCH_ALLOWED_NETWORKS: '10\.0\.0\.1/8'"):
        Config.from_env({"DATASETD_FETCH_ALLOWED_NETWORKS": "10.0.0.1/8"})
    with pytest.raises(ConfigError, match=r"DATASETD_FETCH_CONCURRENCY.*at least 1"):
        Config.from_env({"DATASETD_FETCH_CONCURRENCY": "0"})
