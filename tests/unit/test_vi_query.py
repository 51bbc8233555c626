"""The filter language of `datasetd.client`'s bulk_delete_assets, compiled into the server's
input filters (`service.client` criteria), and the import rule of the client's package."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasetd.client.query import compile_filter

from service.tools import import_rules


@pytest.mark.parametrize(
    ("given", "strict", "expected"),
    [
        ('{"status": "error"}', True, []),
        ('{"status": "uploaded"}', True, [{}]),
        (
            {"status": {"$in": ["annotated", "unannotated"]}},
            True,
            [{"annotated": True}, {"annotated": False}],
        ),
        ('{"metadata.annotations.total": 0}', False, [{"annotated": False}]),
        ({"metadata.annotations.total": {"$gt": 0}}, True, [{"annotated": True}]),
        ({"metadata.camera.side": "left"}, True, [{"metadata": {"camera": {"side": "left"}}}]),
        (
            {"metadata.a": {"$in": [1, 2]}, "tags": "cat"},
            True,
            [
                {"metadata": {"a": 1}, "concepts": ["cat"]},
                {"metadata": {"a": 2}, "concepts": ["cat"]},
            ],
        ),
        ({"media_type": {"$in": ["image", "video"]}}, True, [{"media_types": ["image", "video"]}]),
        # Lenient: a bare key is a metadata key, never ignored.
        ({"camera": "a"}, False, [{"metadata": {"camera": "a"}}]),
        # No input is both annotated and unannotated, nor has two values at one key.
        ({"status": "annotated", "metadata.annotations.total": 0}, True, []),
        ({"metadata.a": 1, "a": 2}, False, []),
        ({"metadata.a.b": 1, "metadata.a.c": 2}, True, [{"metadata": {"a": {"b": 1, "c": 2}}}]),
        ("", False, [{}]),
    ],
)
def test_filters_compile_to_server_filters(given: object, strict: bool, expected: object) -> None:
    assert compile_filter(given, strict) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "strict", "message"),
    [
        ("{}", True, "empty filter"),
        ('{"colour": "red"}', True, "unknown filter field 'colour'"),
        ('{"status": "gone"}', False, "status 'gone' is not one of"),
        ('{"metadata.annotations.total": 3}', False, "annotated or unannotated inputs only"),
        ('{"tags": {"$regex": "c"}}', False, "operator \\$regex"),
        ('{"tags": {"$in": []}}', False, "non-empty list"),
        ('{"media_type": "pdf"}', False, "media_type 'pdf'"),
        ("[1]", False, "JSON object"),
        ("{", False, "not JSON"),
        (
            {"metadata.k": {"$in": list(range(11))}, "tags": {"$in": list("abcdefghij")}},
            False,
            "more than 100",
        ),
    ],
)
def test_bad_filters_say_what_is_wrong(given: object, strict: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compile_filter(given, strict)  # type: ignore[arg-type]


def test_the_client_package_keeps_its_rule(tmp_path: Path) -> None:
    source = tmp_path / "sdk" / "datasetd" / "client" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "from service.domain.models import Dataset\nfrom service.client import Client\n"
    )
    (violation,) = import_rules.check(tmp_path)
    assert (violation.package, violation.module, violation.line) == (
        "datasetd.client",
        "service.domain.models",
        1,
    )
