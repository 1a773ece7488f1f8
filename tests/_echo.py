"""An ASGI upstream for relay and gateway tests: echoes what it received (method, path,
query, headers, body, the caller's certificate) and has paths for streaming both ways,
slow answers, failures mid-response and endless streams. Served with
``tests/_services.serve_asgi`` over real TLS."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from typing import Any

from cryptography import x509

CHUNK = 64 * 1024
WAIT = 20.0  # generous: the machine is shared


def caller_id(scope: dict[str, Any]) -> str | None:
    """The SPIFFE ID in the caller's certificate (from the TLS shim's ASGI extension)."""
    chain = ((scope.get("extensions") or {}).get("tls") or {}).get("client_cert_chain") or []
    if not chain:
        return None
    cert = x509.load_der_x509_certificate(ssl.PEM_cert_to_DER_cert(chain[0]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


class Upstream:
    """An ASGI upstream whose paths exercise the relay; it records what it saw.

    Args:
        name: Echoed as ``upstream`` (tells endpoints of one pool apart).
        delay: Seconds every echo waits before answering (a slow endpoint).
    """

    def __init__(self, name: str = "upstream", delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.first_chunk = threading.Event()  # /upload got its first piece
        self.client_got_first = threading.Event()  # set by the test for /download
        self.disconnected = threading.Event()  # /endless saw its client leave
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path == "/upload":
            await self._upload(receive, send)
            return
        if path == "/endless":
            await self._endless(receive, send)
            return
        body = await read_body(receive)
        seen = {
            "method": scope["method"],
            "path": path,
            "query": scope["query_string"].decode(),
            "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
            "body": body.decode("latin-1"),
            "upstream": self.name,
            "caller": caller_id(scope),
        }
        self.requests.append(seen)
        if self.delay:
            await asyncio.sleep(self.delay)
        if path == "/download":
            await self._download(send)
        elif path == "/slow":
            await asyncio.sleep(2)
            await _answer(send, 200, b"late")
        elif path == "/break":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise RuntimeError("upstream dies mid-response (expected in this test)")
        elif path == "/empty":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        else:
            headers = [
                (b"content-type", b"application/json"),
                (b"connection", b"x-hop-private"),
                (b"x-hop-private", b"secret"),
                (b"keep-alive", b"timeout=5"),
                (b"x-upstream", b"yes"),
                (b"set-cookie", b"session=upstream; Path=/"),
            ]
            await _answer(send, 201, json.dumps(seen).encode(), headers)

    async def _upload(self, receive: Any, send: Any) -> None:
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if size:
                self.first_chunk.set()
            if not message.get("more_body"):
                break
        await _answer(send, 200, str(size).encode())

    async def _download(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a" * CHUNK, "more_body": True})
        deadline = time.monotonic() + WAIT
        while not self.client_got_first.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"b" * CHUNK})

    async def _endless(self, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        left = asyncio.ensure_future(receive())
        deadline = time.monotonic() + WAIT
        while not left.done() and time.monotonic() < deadline:
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await asyncio.sleep(0.02)
        if left.done() and left.result()["type"] == "http.disconnect":
            self.disconnected.set()
        else:
            left.cancel()
            await send({"type": "http.response.body", "body": b""})


async def read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        chunk: bytes = message.get("body", b"")
        body += chunk
        if not message.get("more_body"):
            return body


async def _answer(
    send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers or []})
    await send({"type": "http.response.body", "body": body})
