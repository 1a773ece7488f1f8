"""A minimal ASGI→WSGI bridge so ``trustmesh run`` can serve Flask and other WSGI apps.

Each HTTP request's body is read in full, the WSGI app (already wrapped in
:class:`~trustmesh.middleware.MTLSWSGIMiddleware`) runs in a worker thread with the
peer leaf in ``environ["SSL_CLIENT_CERT"]`` (PEM, from the ASGI TLS extension our
protocol shim fills), and its response is sent back once the app has produced it.
Response bodies are buffered, not streamed: enough for request/response services.
The context (``trustmesh.context.inbound_token``) is copied into the thread, and
the middleware's ``Connection: close`` on a refusal reaches uvicorn, which then
closes the connection.
"""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import Callable, Iterable
from typing import Any

from trustmesh.middleware import MTLSWSGIMiddleware
from trustmesh.tokens import IssuerConfig, Verifier

__all__ = ["WSGIBridge", "is_wsgi_app", "protect_wsgi"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def is_wsgi_app(app: Any) -> bool:
    """True for a Flask app (or anything with ``wsgi_app``), else False."""
    return hasattr(app, "wsgi_app") and callable(app)


def protect_wsgi(app: WSGIApp, *, issuer: IssuerConfig | None, **options: Any) -> WSGIBridge:
    """The WSGI app behind :class:`MTLSWSGIMiddleware` (``options`` are its keyword
    arguments), served as ASGI; with ``issuer``, tokens are checked by a synchronous
    :class:`Verifier` closed at shutdown."""
    verifier = Verifier(issuer) if issuer is not None else None
    protected = MTLSWSGIMiddleware(app, verifier=verifier, **options)
    return WSGIBridge(protected, on_shutdown=verifier.close if verifier is not None else None)


class WSGIBridge:
    """An ASGI app that runs a WSGI app in a thread pool, one request at a time per call."""

    def __init__(self, app: WSGIApp, on_shutdown: Callable[[], None] | None = None) -> None:
        self.app = app
        self.on_shutdown = on_shutdown

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.on_shutdown is not None:
                        self.on_shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1003})
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        environ = _environ(scope, bytes(body))
        status, headers, chunks = await asyncio.to_thread(self._call, environ)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"".join(chunks)})

    def _call(self, environ: dict[str, Any]) -> tuple[int, list[tuple[bytes, bytes]], list[bytes]]:
        started: list[tuple[int, list[tuple[bytes, bytes]]]] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], None]:
            if exc_info is not None and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [
                (
                    int(status.split(" ", 1)[0]),
                    [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                )
            ]
            return chunks.append

        chunks: list[bytes] = []
        result = self.app(environ, start_response)
        try:
            for chunk in result:
                if chunk:
                    chunks.append(chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if not started:
            return 500, [(b"content-type", b"text/plain")], [b"WSGI app did not respond"]
        status, headers = started[0]
        return status, headers, chunks


def _environ(scope: dict[str, Any], body: bytes) -> dict[str, Any]:
    server = scope.get("server") or ("localhost", 443)
    client = scope.get("client") or ("", 0)
    raw_path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode().decode("latin-1"),
        "PATH_INFO": scope["path"].encode().decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "REQUEST_URI": (raw_path + (b"?" + query if query else b"")).decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": str(client[0]),
        "REMOTE_PORT": str(client[1]),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "https"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "CONTENT_LENGTH": str(len(body)),
    }
    for name, value in scope.get("headers", []):
        key = name.decode("latin-1").upper().replace("-", "_")
        text = value.decode("latin-1")
        if key == "CONTENT_TYPE":
            environ["CONTENT_TYPE"] = text
            continue
        if key == "CONTENT_LENGTH":
            continue
        key = "HTTP_" + key
        environ[key] = f"{environ[key]}, {text}" if key in environ else text
    chain = scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or []
    if chain:
        environ["SSL_CLIENT_CERT"] = chain[0]
    return environ
