from __future__ import annotations

import json
import logging

from service.observability import REQUEST_ID, JsonFormatter, _RequestIdFilter


def test_json_log_lines_carry_the_request_id_and_extras() -> None:
    record = logging.makeLogRecord(
        {"name": "datasetd.access", "levelname": "INFO", "msg": "call %s", "args": ("x",)}
    )
    record.method = "/datasetd.v1.DatasetService/GetDataset"
    token = REQUEST_ID.set("req-42")
    try:
        assert _RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "call x"
    assert line["request_id"] == "req-42"
    assert line["method"] == "/datasetd.v1.DatasetService/GetDataset"
    assert line["level"] == "info"
