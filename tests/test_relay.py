"""trustmesh.relay against real servers: a relaying front and an upstream, both uvicorn
over real TLS on 127.0.0.1, with chunked streaming both ways, limits, timeouts and
connection failures."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.relay import (
    HOP_BY_HOP,
    BodyTooLarge,
    ClientDisconnected,
    UpstreamError,
    forward_headers,
    relay,
    send_problem,
)
from trustmesh.tls import client_context

from ._server import free_port
from ._services import Identity, bundle_pem, client, issue, serve_asgi

CHUNK = 64 * 1024
WAIT = 20.0  # generous: the machine is shared


class Upstream:
    """An ASGI upstream whose paths exercise the relay; it records what it saw."""

    def __init__(self) -> None:
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
        body = await _read_body(receive)
        seen = {
            "method": scope["method"],
            "path": path,
            "query": scope["query_string"].decode(),
            "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
            "body": body.decode("latin-1"),
        }
        self.requests.append(seen)
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


async def _read_body(receive: Any) -> bytes:
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


class Front:
    """The relaying ASGI app: forwards everything to ``upstream`` through :func:`relay`."""

    def __init__(
        self,
        upstream: str,
        bundle: str,
        *,
        max_body: int | None = None,
        timeout: float | None = None,
        preread: bool = False,
    ) -> None:
        self.upstream = upstream
        self.bundle = bundle
        self.max_body = max_body
        self.timeout = httpx.Timeout(timeout) if timeout is not None else None
        self.preread = preread
        self.outcomes: list[int | Exception] = []
        self.http: httpx.AsyncClient | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    ctx = client_context(cadata=self.bundle)
                    self.http = httpx.AsyncClient(verify=ctx, timeout=WAIT, trust_env=False)
                    await send({"type": "lifespan.startup.complete"})
                else:
                    assert self.http is not None
                    await self.http.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert self.http is not None
        headers = forward_headers(scope["headers"], drop=lambda name: name == b"host")
        query = scope["query_string"].decode()
        url = self.upstream + scope["path"] + (f"?{query}" if query else "")
        body = await _read_body(receive) if self.preread else None
        try:
            status = await relay(
                scope,
                receive,
                send,
                client=self.http,
                url=url,
                headers=headers,
                max_body=self.max_body,
                timeout=self.timeout,
                response_headers=[(b"x-relayed", b"1")],
                body=body,
            )
        except UpstreamError as exc:
            self.outcomes.append(exc)
            await send_problem(
                send, exc.status, title="Upstream failed", detail=str(exc), reason=exc.reason
            )
            return
        except BodyTooLarge as exc:
            self.outcomes.append(exc)
            await send_problem(
                send,
                413,
                title="Request body too large",
                detail=str(exc),
                reason="body_too_large",
                headers=[(b"connection", b"close")],
            )
            return
        except ClientDisconnected as exc:
            self.outcomes.append(exc)
            return
        self.outcomes.append(status)


@pytest.fixture
def identities(ca: CertificateAuthority, tmp_path: Path) -> tuple[Identity, Identity]:
    front = issue(ca, "spiffe://example.org/front", tmp_path, ips=["127.0.0.1"])
    upstream = issue(ca, "spiffe://example.org/svc/upstream", tmp_path, ips=["127.0.0.1"])
    return front, upstream


@pytest.fixture
def upstream(
    ca: CertificateAuthority, identities: tuple[Identity, Identity]
) -> Iterator[tuple[Upstream, str]]:
    app = Upstream()
    with serve_asgi(app, ca, identities[1], client_cert="optional") as url:
        yield app, url


def _front(ca: CertificateAuthority, identities: tuple[Identity, Identity], front: Front) -> Any:
    return serve_asgi(front, ca, identities[0], client_cert="optional")


def test_forward_headers_drops_hop_by_hop_connection_listed_and_refused() -> None:
    """Hop-by-hop headers, those the Connection header names and those refused go."""
    raw = [
        (b"Host", b"a"),
        (b"Connection", b"keep-alive, X-Private , Upgrade"),
        (b"X-Private", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"TE", b"trailers"),
        (b"Upgrade", b"websocket"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"X-Drop-Me", b"1"),
        (b"Accept", b"*/*"),
        (b"accept", b"text/plain"),
    ]
    kept = forward_headers(raw, drop=lambda name: name == b"x-drop-me")
    assert kept == [(b"Host", b"a"), (b"Accept", b"*/*"), (b"accept", b"text/plain")]
    assert forward_headers(iter(raw[:1])) == [(b"Host", b"a")]
    assert all(name == name.lower() for name in HOP_BY_HOP)


def test_relays_method_path_query_headers_and_body(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any
) -> None:
    """The upstream sees the request as sent; the client sees the upstream's answer
    without hop-by-hop headers and with the relay's own added."""
    _app, url = upstream
    front = Front(url, bundle_pem(ca))
    with _front(ca, identities, front) as front_url, client(ca, None) as http:
        response = http.post(
            f"{front_url}/items/1?x=1&y=%2F",
            content=b"hello",
            headers={"X-Test": "1", "Connection": "X-Test-Hop", "X-Test-Hop": "no"},
        )
    assert response.status_code == 201
    seen = response.json()
    assert seen["method"] == "POST"
    assert seen["path"] == "/items/1"
    assert seen["query"] == "x=1&y=%2F"
    assert seen["body"] == "hello"
    names = {name for name, _ in seen["headers"]}
    assert "x-test" in names
    assert "x-test-hop" not in names
    assert ["host", url.removeprefix("https://")] in seen["headers"]
    assert response.headers["x-upstream"] == "yes"
    assert response.headers["x-relayed"] == "1"
    assert "x-hop-private" not in response.headers
    assert "keep-alive" not in response.headers
    assert front.outcomes == [201]


def test_bodiless_requests_and_responses(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any
) -> None:
    """A GET goes out without a body (not chunked); HEAD and 204 responses come back
    without a body and without hanging."""
    _app, url = upstream
    front = Front(url, bundle_pem(ca))
    with _front(ca, identities, front) as front_url, client(ca, None) as http:
        get = http.get(f"{front_url}/echo")
        head = http.head(f"{front_url}/echo")
        empty = http.delete(f"{front_url}/empty")
    names = {name for name, _ in get.json()["headers"]}
    assert "transfer-encoding" not in names
    assert "content-length" not in names
    assert head.status_code == 201
    assert head.content == b""
    assert empty.status_code == 204
    assert front.outcomes == [201, 201, 204]


def test_upload_streams_before_the_client_finishes(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any
) -> None:
    """The upstream gets the first piece of a chunked upload while the client still
    holds back the rest (nothing is buffered whole)."""
    app, url = upstream
    front = Front(url, bundle_pem(ca))
    reached_early: list[bool] = []

    def body() -> Iterator[bytes]:
        yield b"x" * CHUNK
        reached_early.append(app.first_chunk.wait(WAIT))
        for _ in range(3):
            yield b"y" * CHUNK

    with _front(ca, identities, front) as front_url, client(ca, None, timeout=60) as http:
        response = http.put(f"{front_url}/upload", content=body())
    assert reached_early == [True]
    assert response.status_code == 200
    assert response.text == str(4 * CHUNK)


def test_download_streams_before_the_upstream_finishes(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any
) -> None:
    """The client reads the first piece of a response while the upstream holds back the
    rest until the client confirms it arrived."""
    app, url = upstream
    front = Front(url, bundle_pem(ca))
    with (
        _front(ca, identities, front) as front_url,
        client(ca, None, timeout=60) as http,
        http.stream("GET", f"{front_url}/download") as response,
    ):
        pieces = response.iter_raw()
        first = next(pieces)
        app.client_got_first.set()
        rest = b"".join(pieces)
    assert first.startswith(b"a")
    assert first + rest == b"a" * CHUNK + b"b" * CHUNK
    assert front.outcomes == [200]


def test_body_limit_by_content_length_refuses_before_forwarding(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any
) -> None:
    """A declared Content-Length over the limit is refused with 413 and nothing reaches
    the upstream; a body within the limit passes."""
    app, url = upstream
    front = Front(url, bundle_pem(ca), max_body=1000)
    with _front(ca, identities, front) as front_url, client(ca, None) as http:
        refused = http.post(f"{front_url}/echo", content=b"z" * 1001)
        allowed = http.post(f"{front_url}/echo", content=b"z" * 1000)
    assert refused.status_code == 413
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["reason"] == "body_too_large"
    assert allowed.status_code == 201
    assert [r["body"] for r in app.requests] == ["z" * 1000]
    assert isinstance(front.outcomes[0], BodyTooLarge)


def test_body_limit_counted_while_streaming(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any
) -> None:
    """A chunked body without Content-Length is counted as it streams and cut at the limit."""
    _app, url = upstream
    front = Front(url, bundle_pem(ca), max_body=CHUNK + 10)

    def body() -> Iterator[bytes]:
        yield b"x" * CHUNK
        yield b"y" * CHUNK

    with _front(ca, identities, front) as front_url, client(ca, None) as http:
        response = http.post(f"{front_url}/upload", content=body())
    assert response.status_code == 413
    assert response.json()["status"] == 413
    assert isinstance(front.outcomes[0], BodyTooLarge)


def test_preread_body_is_sent_as_given(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any
) -> None:
    """With ``body=`` the relay sends that body (the path a retry takes)."""
    app, url = upstream
    front = Front(url, bundle_pem(ca), preread=True)
    with _front(ca, identities, front) as front_url, client(ca, None) as http:
        response = http.put(f"{front_url}/echo", content=b"retry me")
    assert response.status_code == 201
    assert app.requests[-1]["body"] == "retry me"


def test_connection_refused_is_502_and_retryable(
    ca: CertificateAuthority, identities: tuple[Identity, Identity]
) -> None:
    """Nothing listening: 502 upstream_unavailable, marked retryable (no byte was sent)."""
    front = Front(f"https://127.0.0.1:{free_port()}", bundle_pem(ca))
    with _front(ca, identities, front) as front_url, client(ca, None) as http:
        response = http.post(f"{front_url}/echo", content=b"data")
    assert response.status_code == 502
    problem = response.json()
    assert problem["reason"] == "upstream_unavailable"
    assert problem["type"] == "about:blank"
    assert problem["title"] == "Upstream failed"
    error = front.outcomes[0]
    assert isinstance(error, UpstreamError)
    assert error.retryable
    assert error.status == 502


def test_tls_failure_is_502_retryable(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], tmp_path: Path
) -> None:
    """An upstream whose certificate the relay does not trust is never sent the request."""
    other_home = tmp_path / "other"
    with CertificateAuthority.init(
        other_home, trust_domain="example.org", passphrase=b"another passphrase"
    ) as other:
        stranger = issue(other, "spiffe://example.org/svc/upstream", tmp_path, ips=["127.0.0.1"])
        app = Upstream()
        with serve_asgi(app, other, stranger, client_cert="optional") as url:
            front = Front(url, bundle_pem(ca))
            with _front(ca, identities, front) as front_url, client(ca, None) as http:
                response = http.post(f"{front_url}/echo", content=b"secret")
    assert response.status_code == 502
    assert response.json()["reason"] == "upstream_unavailable"
    assert app.requests == []
    error = front.outcomes[0]
    assert isinstance(error, UpstreamError)
    assert error.retryable


def test_slow_upstream_is_504_not_retryable(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any
) -> None:
    """A response later than the timeout: 504 upstream_timeout; the request was sent,
    so it is not retryable."""
    _app, url = upstream
    front = Front(url, bundle_pem(ca), timeout=0.3)
    with _front(ca, identities, front) as front_url, client(ca, None) as http:
        response = http.get(f"{front_url}/slow")
    assert response.status_code == 504
    assert response.json()["reason"] == "upstream_timeout"
    error = front.outcomes[0]
    assert isinstance(error, UpstreamError)
    assert not error.retryable


def test_upstream_failure_mid_response_cuts_the_client(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any
) -> None:
    """Once the response started, an upstream failure cuts the client's connection
    (the client sees an incomplete response, never a clean end)."""
    _app, url = upstream
    front = Front(url, bundle_pem(ca))
    with (
        _front(ca, identities, front) as front_url,
        client(ca, None) as http,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        http.get(f"{front_url}/break")
    assert front.outcomes == [200]


def test_client_leaving_stops_the_upstream_transfer(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any
) -> None:
    """A client that leaves an endless stream makes the relay drop the upstream
    connection, so the upstream sees its client go."""
    app, url = upstream
    front = Front(url, bundle_pem(ca))
    with _front(ca, identities, front) as front_url:
        with client(ca, None) as http, http.stream("GET", f"{front_url}/endless") as response:
            assert next(response.iter_raw()).startswith(b"tick")
        assert app.disconnected.wait(WAIT)
        deadline = time.monotonic() + WAIT
        while not front.outcomes and time.monotonic() < deadline:
            time.sleep(0.02)
    assert front.outcomes == [200]


def test_send_problem_document() -> None:
    """send_problem writes one problem+json response with the reason member."""
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    asyncio.run(
        send_problem(
            send,
            429,
            title="Too many requests",
            detail="Slow down.",
            reason="rate_limited",
            headers=[(b"retry-after", b"2")],
        )
    )
    start, body = sent
    assert start["status"] == 429
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"retry-after"] == b"2"
    assert int(headers[b"content-length"]) == len(body["body"])
    assert json.loads(body["body"]) == {
        "type": "about:blank",
        "title": "Too many requests",
        "status": 429,
        "detail": "Slow down.",
        "reason": "rate_limited",
    }
