"""Structured logs: one JSON object per line with the extra fields."""

from __future__ import annotations

import json
import logging

from trustmesh.logs import JSONFormatter


def test_json_formatter_keeps_extra_fields() -> None:
    record = logging.makeLogRecord(
        {
            "name": "trustmesh.ca_server",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "denied %s",
            "args": ("POST /v1/enroll",),
            "event": "deny",
            "reason": "token_used",
            "status": 401,
        }
    )
    entry = json.loads(JSONFormatter().format(record))
    assert entry["msg"] == "denied POST /v1/enroll"
    assert entry["level"] == "info"
    assert entry["logger"] == "trustmesh.ca_server"
    assert (entry["event"], entry["reason"], entry["status"]) == ("deny", "token_used", 401)
    assert entry["ts"].endswith("+00:00")
    assert "args" not in entry
