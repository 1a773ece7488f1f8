"""trustmesh.relay against real servers: a relaying front and an upstream, both uvicorn
over real TLS on 127.0.0.1, with chunked streaming both ways, limits, timeouts and
connection failures."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Iterator, MutableMapping
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.http1 import Pool
from trustmesh.relay import (
    HOP_BY_HOP,
    BodyTooLarge,
    ClientDisconnected,
    UpstreamError,
    forward_headers,
    no_cookies,
    relay,
    send_problem,
)
from trustmesh.tls import client_context

from ._echo import CHUNK, WAIT, Upstream, read_body
from ._server import free_port
from ._services import Identity, bundle_pem, client, issue, serve_asgi


def _same(ctx: ssl.SSLContext) -> ssl.SSLContext:
    return ctx


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
        kind: str = "httpx",
    ) -> None:
        self.upstream = upstream
        self.bundle = bundle
        self.max_body = max_body
        self.timeout = httpx.Timeout(timeout) if timeout is not None else None
        self.seconds = timeout
        self.preread = preread
        self.outcomes: list[int | Exception] = []
        self.http: httpx.AsyncClient | None = None
        self.kind = kind
        self.pool: Pool | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    ctx = client_context(cadata=self.bundle)
                    self.http = httpx.AsyncClient(
                        verify=ctx, timeout=WAIT, trust_env=False, cookies=no_cookies()
                    )
                    address = urlsplit(self.upstream)
                    assert address.hostname is not None
                    assert address.port is not None
                    self.pool = Pool(
                        address.hostname,
                        address.port,
                        ssl_context=partial(_same, ctx),
                        timeout=WAIT,
                    )
                    await send({"type": "lifespan.startup.complete"})
                else:
                    assert self.http is not None
                    assert self.pool is not None
                    await self.http.aclose()
                    await self.pool.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert self.http is not None
        headers = forward_headers(scope["headers"], drop=lambda name: name == b"host")
        query = scope["query_string"].decode()
        url = self.upstream + scope["path"] + (f"?{query}" if query else "")
        body = await read_body(receive) if self.preread else None
        try:
            status = await relay(
                scope,
                receive,
                send,
                client=self.pool if self.kind == "pool" and self.pool else self.http,
                url=url,
                headers=headers,
                max_body=self.max_body,
                timeout=self.timeout if self.kind == "httpx" else self.seconds,
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


@pytest.fixture(params=["httpx", "pool"])
def kind(request: pytest.FixtureRequest) -> str:
    """The relay's upstream client: an httpx client or a trustmesh.http1 pool."""
    return str(request.param)


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
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any, kind: str
) -> None:
    """The upstream sees the request as sent; the client sees the upstream's answer
    without hop-by-hop headers and with the relay's own added."""
    _app, url = upstream
    front = Front(url, bundle_pem(ca), kind=kind)
    with _front(ca, identities, front) as front_url, client(ca, None) as http:
        del http.headers["accept-encoding"]
        response = http.post(
            f"{front_url}/items/1?x=1&y=%2F",
            content=b"hello",
            headers={
                "X-Test": "1",
                "Connection": "X-Test-Hop",
                "X-Test-Hop": "no",
                "User-Agent": "test-agent/1",
            },
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
    assert response.headers["set-cookie"] == "session=upstream; Path=/"
    # The relay's own client adds nothing and keeps nothing.
    assert [v for k, v in seen["headers"] if k == "user-agent"] == ["test-agent/1"]
    assert "accept-encoding" not in names
    assert front.http is not None
    assert len(front.http.cookies) == 0
    assert front.outcomes == [201]


def test_bodiless_requests_and_responses(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any, kind: str
) -> None:
    """A GET goes out without a body (not chunked); HEAD and 204 responses come back
    without a body and without hanging."""
    _app, url = upstream
    front = Front(url, bundle_pem(ca), kind=kind)
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
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any, kind: str
) -> None:
    """The upstream gets the first piece of a chunked upload while the client still
    holds back the rest (nothing is buffered whole)."""
    app, url = upstream
    front = Front(url, bundle_pem(ca), kind=kind)
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
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any, kind: str
) -> None:
    """The client reads the first piece of a response while the upstream holds back the
    rest until the client confirms it arrived."""
    app, url = upstream
    front = Front(url, bundle_pem(ca), kind=kind)
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
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any, kind: str
) -> None:
    """A declared Content-Length over the limit is refused with 413 and nothing reaches
    the upstream; a body within the limit passes."""
    app, url = upstream
    front = Front(url, bundle_pem(ca), kind=kind, max_body=1000)
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
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any, kind: str
) -> None:
    """A chunked body without Content-Length is counted as it streams and cut at the limit."""
    _app, url = upstream
    front = Front(url, bundle_pem(ca), kind=kind, max_body=CHUNK + 10)

    def body() -> Iterator[bytes]:
        yield b"x" * CHUNK
        yield b"y" * CHUNK

    with _front(ca, identities, front) as front_url, client(ca, None) as http:
        response = http.post(f"{front_url}/upload", content=body())
    assert response.status_code == 413
    assert response.json()["status"] == 413
    assert isinstance(front.outcomes[0], BodyTooLarge)


def test_preread_body_is_sent_as_given(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any, kind: str
) -> None:
    """With ``body=`` the relay sends that body (the path a retry takes)."""
    app, url = upstream
    front = Front(url, bundle_pem(ca), kind=kind, preread=True)
    with _front(ca, identities, front) as front_url, client(ca, None) as http:
        response = http.put(f"{front_url}/echo", content=b"retry me")
    assert response.status_code == 201
    assert app.requests[-1]["body"] == "retry me"


def test_connection_refused_is_502_and_retryable(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], kind: str
) -> None:
    """Nothing listening: 502 upstream_unavailable, marked retryable (no byte was sent)."""
    front = Front(f"https://127.0.0.1:{free_port()}", bundle_pem(ca), kind=kind)
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
    ca: CertificateAuthority, identities: tuple[Identity, Identity], tmp_path: Path, kind: str
) -> None:
    """An upstream whose certificate the relay does not trust is never sent the request."""
    other_home = tmp_path / "other"
    with CertificateAuthority.init(
        other_home, trust_domain="example.org", passphrase=b"another passphrase"
    ) as other:
        stranger = issue(other, "spiffe://example.org/svc/upstream", tmp_path, ips=["127.0.0.1"])
        app = Upstream()
        with serve_asgi(app, other, stranger, client_cert="optional") as url:
            front = Front(url, bundle_pem(ca), kind=kind)
            with _front(ca, identities, front) as front_url, client(ca, None) as http:
                response = http.post(f"{front_url}/echo", content=b"secret")
    assert response.status_code == 502
    assert response.json()["reason"] == "upstream_unavailable"
    assert app.requests == []
    error = front.outcomes[0]
    assert isinstance(error, UpstreamError)
    assert error.retryable


def test_slow_upstream_is_504_not_retryable(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any, kind: str
) -> None:
    """A response later than the timeout: 504 upstream_timeout; the request was sent,
    so it is not retryable."""
    _app, url = upstream
    front = Front(url, bundle_pem(ca), kind=kind, timeout=0.3)
    with _front(ca, identities, front) as front_url, client(ca, None) as http:
        response = http.get(f"{front_url}/slow")
    assert response.status_code == 504
    assert response.json()["reason"] == "upstream_timeout"
    error = front.outcomes[0]
    assert isinstance(error, UpstreamError)
    assert not error.retryable


def test_upstream_failure_mid_response_cuts_the_client(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any, kind: str
) -> None:
    """Once the response started, an upstream failure cuts the client's connection
    (the client sees an incomplete response, never a clean end)."""
    _app, url = upstream
    front = Front(url, bundle_pem(ca), kind=kind)
    with (
        _front(ca, identities, front) as front_url,
        client(ca, None) as http,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        http.get(f"{front_url}/break")
    assert front.outcomes == [200]


def test_client_leaving_stops_the_upstream_transfer(
    ca: CertificateAuthority, identities: tuple[Identity, Identity], upstream: Any, kind: str
) -> None:
    """A client that leaves an endless stream makes the relay drop the upstream
    connection, so the upstream sees its client go."""
    app, url = upstream
    front = Front(url, bundle_pem(ca), kind=kind)
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
