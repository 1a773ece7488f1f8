"""Structured logs: one JSON object per line with the extra fields."""

from __future__ import annotations

import json
import logging
import sys

from trustmesh.logs import JSONFormatter, TextFormatter


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


def test_text_formatter_cannot_be_made_to_forge_a_line() -> None:
    """A decoded request path with CR/LF (``/x%0d%0a...``) stays on its line; a traceback
    after the message keeps its own lines."""
    record = logging.makeLogRecord(
        {
            "name": "trustmesh.middleware",
            "levelname": "WARNING",
            "levelno": 30,
            "msg": "deny GET %s from %s",
            "args": ("/x\r\n2026 trustmesh allow GET /admin", "a"),
        }
    )
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert "\r" not in line
    assert "/x\\x0d\\x0a2026 trustmesh allow GET /admin from a" in line
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    assert "Traceback (most recent call last):\n" in TextFormatter().format(record)
