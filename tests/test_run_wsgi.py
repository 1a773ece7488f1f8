"""The ASGI→WSGI bridge `trustmesh run` uses for Flask apps (runner/_wsgi.py).

End to end (Flask under `trustmesh run`, real mTLS) is in tests/test_examples.py; this
checks the environ the WSGI app gets and the response that goes back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from trustmesh.context import inbound_token
from trustmesh.runner._wsgi import WSGIBridge, is_wsgi_app

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _call(app: Any, scope: dict[str, Any], body: bytes = b"") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body[:3], "more_body": True}]
    messages.append({"type": "http.request", "body": body[3:], "more_body": False})

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_environ_carries_request_headers_body_and_peer_certificate() -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        seen.update(environ)
        seen["body"] = environ["wsgi.input"].read()
        seen["token"] = inbound_token.get()
        start_response("201 Created", [("Content-Type", "text/plain"), ("Connection", "close")])
        return [b"made ", b"it"]

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/orders/1",
        "raw_path": b"/orders/%31",
        "query_string": b"x=1",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", b"9"),
            (b"x-trustmesh-caller", b"a"),
            (b"x_trustmesh_caller", b"b"),
        ],
        "server": ("127.0.0.1", 8443),
        "client": ("127.0.0.1", 50000),
        "extensions": {"tls": {"client_cert_chain": [PEM]}},
    }
    token = inbound_token.set("outer")
    try:
        sent = _call(WSGIBridge(app), scope, b'{"a": 1}!')
    finally:
        inbound_token.reset(token)
    assert sent[0] == {
        "type": "http.response.start",
        "status": 201,
        "headers": [(b"content-type", b"text/plain"), (b"connection", b"close")],
    }
    assert sent[1] == {"type": "http.response.body", "body": b"made it"}
    assert seen["REQUEST_METHOD"] == "POST"
    assert seen["PATH_INFO"] == "/orders/1"
    assert seen["REQUEST_URI"] == "/orders/%31?x=1"
    assert seen["QUERY_STRING"] == "x=1"
    assert seen["CONTENT_TYPE"] == "application/json"
    assert seen["CONTENT_LENGTH"] == "9"
    assert seen["body"] == b'{"a": 1}!'
    assert seen["SSL_CLIENT_CERT"] == PEM
    # both spellings fold into one key, joined, so the middleware sees a repeated header
    assert seen["HTTP_X_TRUSTMESH_CALLER"] == "a, b"
    # the worker thread runs in a copy of the request's context
    assert seen["token"] == "outer"


def test_no_peer_certificate_leaves_the_key_out() -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        seen.update(environ)
        start_response("200 OK", [])
        return []

    _call(WSGIBridge(app), {"type": "http", "method": "GET", "path": "/", "headers": []})
    assert "SSL_CLIENT_CERT" not in seen


def test_flask_apps_are_recognized_and_asgi_apps_are_not() -> None:
    from fastapi import FastAPI
    from flask import Flask

    assert is_wsgi_app(Flask("x"))
    assert not is_wsgi_app(FastAPI())
