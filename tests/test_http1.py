"""trustmesh.http1.Pool against real servers on 127.0.0.1: uvicorn over plain HTTP and
over TLS, and raw asyncio servers for the edge cases (keep-alive races, stalls, bad heads,
a listener that never accepts)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn

from trustmesh.authority import CertificateAuthority
from trustmesh.client import PeerCheck
from trustmesh.http1 import (
    ConnectError,
    ConnectTimeoutError,
    Http1Error,
    Pool,
    PoolTimeoutError,
    ProtocolError,
    Response,
    ResponseTimeoutError,
)
from trustmesh.tls import client_context, server_context

from ._echo import WAIT, Upstream
from ._server import free_port
from ._services import bundle_pem, issue, serve_asgi

T = TypeVar("T")
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(60):
            return await coro

    return asyncio.run(bounded())


async def body_of(response: Response) -> bytes:
    return b"".join([piece async for piece in response.aiter_bytes()])


async def pieces(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def header(response: Response, name: bytes) -> bytes | None:
    return next((v for k, v in response.headers if k.lower() == name), None)


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Echo the method, body and request framing; say which client port asked."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    seen = dict(scope["headers"])
    framing = b"chunked" if b"transfer-encoding" in seen else seen.get(b"content-length", b"-")
    headers = [(b"X-Peer-Port", str(scope["client"][1]).encode()), (b"x-framing", framing)]
    answer = scope["method"].encode() + b" " + body
    if scope["path"] == "/chunked":  # no Content-Length, two pieces: uvicorn chunks it
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer[:3], "more_body": True})
        await send({"type": "http.response.body", "body": answer[3:]})
        return
    headers.append((b"content-length", str(len(answer)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


@contextlib.asynccontextmanager
async def plain_uvicorn(app: Any) -> AsyncIterator[int]:
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        assert not serving.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await serving


class Raw:
    """A raw asyncio server: runs ``handler`` per connection and records the peers."""

    def __init__(self, handler: Handler, ssl_ctx: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl = ssl_ctx
        self.peers: list[int] = []
        self.received = b""
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername")[1])
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Raw:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and (Content-Length) body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%b\r\n%b" % (len(body), extra, body)


def test_keep_alive_reuse_and_framing_both_ways() -> None:
    """Sequential requests share one connection (the server sees one client port);
    bytes bodies go with Content-Length, streams chunked or with their declared length;
    Content-Length and chunked responses are read whole; names keep their case."""

    async def scenario() -> None:
        async with plain_uvicorn(echo_app) as port:
            pool = Pool("127.0.0.1", port)
            try:
                first = await pool.request(b"POST", b"/x", [], b"hello", timeout=WAIT)
                assert first.status == 200
                assert header(first, b"x-framing") == b"5"
                assert await body_of(first) == b"POST hello"
                second = await pool.request(
                    b"PUT", b"/chunked", [], pieces(b"ab", b"", b"cd"), timeout=WAIT
                )
                assert header(second, b"x-framing") == b"chunked"
                assert header(second, b"transfer-encoding") == b"chunked"
                assert await body_of(second) == b"PUT abcd"
                third = await pool.request(
                    b"PUT", b"/", [(b"Content-Length", b"4")], pieces(b"ab", b"cd"), timeout=WAIT
                )
                assert header(third, b"x-framing") == b"4"
                assert await body_of(third) == b"PUT abcd"
                get = await pool.request(b"GET", b"/", [], None, timeout=WAIT)
                assert header(get, b"x-framing") == b"-"  # no body, no framing header
                assert await body_of(get) == b"GET "
                ports = {header(r, b"x-peer-port") for r in (first, second, third, get)}
                assert len(ports) == 1
            finally:
                await pool.aclose()

    run(scenario())


def test_tls_check_peer_and_rotation(ca: CertificateAuthority, tmp_path: Path) -> None:
    """Over TLS: check_peer (the mTLS client's SPIFFE ID check) passes the right server;
    ssl_context is called per new connection, so a rotated client identity is used by
    the next new connection, while a pooled one keeps the identity it was made with."""
    server = issue(ca, "spiffe://example.org/svc/upstream", tmp_path, ips=["127.0.0.1"])
    alice = issue(ca, "spiffe://example.org/alice", tmp_path)
    bob = issue(ca, "spiffe://example.org/bob", tmp_path)
    alice_ctx, bob_ctx = (
        client_context(cadata=bundle_pem(ca), chain=who.chain, key=who.key) for who in (alice, bob)
    )
    current = [alice_ctx]
    made: list[ssl.SSLContext] = []
    generation = [0]

    def ssl_context() -> ssl.SSLContext:
        made.append(current[0])
        return current[0]

    app = Upstream()
    with serve_asgi(app, ca, server, client_cert="optional") as url:
        port = int(url.rsplit(":", 1)[1])
        check = PeerCheck("spiffe://example.org/svc/upstream")

        async def scenario() -> None:
            pool = Pool(
                "127.0.0.1",
                port,
                ssl_context=ssl_context,
                check_peer=lambda obj: check(obj, "127.0.0.1", port),
                generation=lambda: generation[0],
            )
            try:
                for _ in range(2):
                    await body_of(await pool.request(b"GET", b"/echo", [], None, timeout=WAIT))
                current[0] = bob_ctx  # rotate: pooled connection stays
                await body_of(await pool.request(b"GET", b"/echo", [], None, timeout=WAIT))
                generation[0] += 1  # a new generation: a new connection, the new identity
                await body_of(await pool.request(b"GET", b"/echo", [], None, timeout=WAIT))
            finally:
                await pool.aclose()

        run(scenario())
    callers = [seen["caller"] for seen in app.requests]
    assert callers == [*["spiffe://example.org/alice"] * 3, "spiffe://example.org/bob"]
    assert len(made) == 2


def test_check_peer_refusal_sends_nothing(ca: CertificateAuthority, tmp_path: Path) -> None:
    """A server whose SPIFFE ID is not the expected one is refused right after the
    handshake: the server receives no request byte; the error is retryable."""
    server = issue(ca, "spiffe://example.org/svc/impostor", tmp_path, ips=["127.0.0.1"])
    listener = server_context(
        server.chain, server.key, cadata=bundle_pem(ca), client_cert="optional"
    )
    ctx = client_context(cadata=bundle_pem(ca))
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        data = b""
        try:
            data = await reader.read(65536)
        finally:
            received.append(data)

    async def scenario() -> None:
        async with Raw(handler, listener) as raw:
            check = PeerCheck("spiffe://example.org/svc/upstream")
            pool = Pool(
                "127.0.0.1",
                raw.port,
                ssl_context=lambda: ctx,
                check_peer=lambda obj: check(obj, "127.0.0.1", raw.port),
            )
            with pytest.raises(ConnectError) as caught:
                await pool.request(b"POST", b"/secret", [], b"secret", timeout=WAIT)
            await asyncio.sleep(0.5)  # let the server notice the close
            await pool.aclose()
        error = caught.value
        assert (error.status, error.reason, error.retryable) == (502, "upstream_unavailable", True)
        assert "spiffe://example.org/svc/impostor" in str(error)

    run(scenario())
    assert b"".join(received) == b""  # the connection closed without a byte of the request


def test_response_streams_before_the_upstream_finishes() -> None:
    """The first body piece reaches the caller while the upstream holds back the rest;
    an upload's first piece reaches the upstream while the caller holds back the rest."""
    got_first = asyncio.Event()
    upstream_got_first = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"PUT"):  # chunked upload: wait for the first chunk
                assert b"transfer-encoding: chunked" in head
                await reader.readuntil(b"first\r\n")
                upstream_got_first.set()
                await reader.readuntil(b"0\r\n\r\n")
                writer.write(ok())
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await got_first.wait()
            writer.write(b"4\r\nrest\r\n0\r\n\r\n")

    async def upload() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.wait_for(upstream_got_first.wait(), WAIT)
        yield b"second"

    async def scenario() -> None:
        async with Raw(handler) as raw:
            pool = Pool("127.0.0.1", raw.port)
            response = await pool.request(b"GET", b"/", [], None, timeout=WAIT)
            assert response.headers == [(b"Transfer-Encoding", b"chunked")]  # as received
            stream = response.aiter_bytes()
            assert await anext(stream) == b"first"
            got_first.set()
            assert [piece async for piece in stream] == [b"rest"]
            put = await pool.request(b"PUT", b"/", [], upload(), timeout=WAIT)
            assert await body_of(put) == b"ok"
            assert len(raw.peers) == 1
            await pool.aclose()

    run(scenario())


def test_head_204_304_have_no_body_and_keep_the_connection() -> None:
    """HEAD (with a Content-Length), 204 and 304 end at their head; the same connection
    then carries a normal response."""
    answers = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
        ok(b"after"),
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            await read_request(reader)
            writer.write(answer)

    async def scenario() -> None:
        async with Raw(handler) as raw:
            pool = Pool("127.0.0.1", raw.port)
            statuses = []
            for method in (b"HEAD", b"DELETE", b"GET"):
                response = await pool.request(method, b"/", [], None, timeout=WAIT)
                statuses.append(response.status)
                assert await body_of(response) == b""
            last = await pool.request(b"GET", b"/", [], None, timeout=WAIT)
            assert await body_of(last) == b"after"
            await pool.aclose()
            assert statuses == [200, 204, 304]
            assert len(raw.peers) == 1

    run(scenario())


def test_connection_close_and_body_until_close() -> None:
    """``Connection: close`` and a body delimited by the close are read whole, and the
    next request opens a new connection."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if b"/until-close" in head:
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        else:
            writer.write(ok(b"bye", b"Connection: close\r\n"))
        await writer.drain()

    async def scenario() -> None:
        async with Raw(handler) as raw:
            pool = Pool("127.0.0.1", raw.port)
            first = await pool.request(b"GET", b"/", [], None, timeout=WAIT)
            assert await body_of(first) == b"bye"
            second = await pool.request(b"GET", b"/until-close", [], None, timeout=WAIT)
            assert await body_of(second) == b"all of it"
            await pool.aclose()
            assert len(raw.peers) == 2

    run(scenario())


def test_pooled_connection_closed_by_the_server_is_retried_once() -> None:
    """The keep-alive race: the server closes a pooled connection as the next request
    arrives on it, before answering. A bytes body is retried on a new connection; a
    streamed body cannot be replayed and fails as upstream_error."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok())
        await reader.readuntil(b"\r\n\r\n")  # the next request's head: close instead

    async def scenario() -> None:
        async with Raw(handler) as raw:
            pool = Pool("127.0.0.1", raw.port)
            await body_of(await pool.request(b"GET", b"/", [], None, timeout=WAIT))
            retried = await pool.request(b"POST", b"/", [], b"again", timeout=WAIT)
            assert await body_of(retried) == b"ok"
            assert len(raw.peers) == 2
            with pytest.raises(ProtocolError) as caught:
                await pool.request(b"POST", b"/", [], pieces(b"once"), timeout=WAIT)
            assert (caught.value.reason, caught.value.retryable) == ("upstream_error", False)
            assert len(raw.peers) == 2  # not retried
            await pool.aclose()

    run(scenario())


def test_connect_refused_and_connect_timeout_are_retryable() -> None:
    """Nothing listening: 502 upstream_unavailable; a listener whose backlog is full
    (it never accepts): 504 upstream_timeout after connect_timeout. Both retryable."""

    async def scenario() -> None:
        refused = Pool("127.0.0.1", free_port())
        with pytest.raises(ConnectError) as caught:
            await refused.request(b"GET", b"/", [], None, timeout=WAIT)
        assert (caught.value.status, caught.value.reason) == (502, "upstream_unavailable")
        assert caught.value.retryable
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            fillers = []
            for _ in range(3):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(listener.getsockname())
                fillers.append(filler)
            stuck = Pool("127.0.0.1", listener.getsockname()[1], connect_timeout=0.5)
            with pytest.raises(ConnectTimeoutError) as timed_out:
                await stuck.request(b"GET", b"/", [], None, timeout=WAIT)
            for filler in fillers:
                filler.close()
        assert (timed_out.value.status, timed_out.value.reason) == (504, "upstream_timeout")
        assert timed_out.value.retryable

    run(scenario())


def test_response_head_and_body_gap_timeouts_are_not_retryable() -> None:
    """No answer within ``timeout``: 504, not retryable (the request was sent); a body
    that stalls longer than ``timeout`` between pieces fails the same way."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if b"/stall-body" in head:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\npart")
        await asyncio.sleep(WAIT)

    async def scenario() -> None:
        async with Raw(handler) as raw:
            pool = Pool("127.0.0.1", raw.port)
            with pytest.raises(ResponseTimeoutError) as caught:
                await pool.request(b"GET", b"/", [], None, timeout=0.3)
            assert (caught.value.status, caught.value.retryable) == (504, False)
            response = await pool.request(b"GET", b"/stall-body", [], None, timeout=0.3)
            stream = response.aiter_bytes()
            assert await anext(stream) == b"part"
            with pytest.raises(ResponseTimeoutError):
                await anext(stream)
            await pool.aclose()

    run(scenario())


def test_oversized_response_head_is_upstream_error() -> None:
    """A response head over 64 KiB is refused (upstream_error), in one header or many."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if b"/one" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK")
            for i in range(80):
                writer.write(b"\r\nx-h%d: %b" % (i, b"b" * 1000))
                await writer.drain()
            writer.write(b"\r\n\r\n")
        await asyncio.sleep(1)

    async def scenario() -> None:
        async with Raw(handler) as raw:
            pool = Pool("127.0.0.1", raw.port)
            for path in (b"/one", b"/many"):
                with pytest.raises(ProtocolError) as caught:
                    await pool.request(b"GET", path, [], None, timeout=WAIT)
                assert caught.value.reason == "upstream_error"
                assert "larger than 65536 bytes" in str(caught.value)
            await pool.aclose()

    run(scenario())


def test_pool_limit_waits_then_times_out_or_gets_the_connection() -> None:
    """With max_connections=1, a second request waits for the first to finish: it times
    out (retryable 504) if that takes too long, else it reuses the freed connection."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(ok())

    async def scenario() -> None:
        async with Raw(handler) as raw:
            pool = Pool("127.0.0.1", raw.port, max_connections=1)
            busy = await pool.request(b"GET", b"/", [], None, timeout=WAIT)
            with pytest.raises(PoolTimeoutError) as caught:
                await pool.request(b"GET", b"/", [], None, timeout=0.2)
            assert (caught.value.status, caught.value.retryable) == (504, True)
            waiting = asyncio.ensure_future(pool.request(b"GET", b"/", [], None, timeout=WAIT))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            assert await body_of(busy) == b"ok"  # read whole: the connection is free
            assert await body_of(await waiting) == b"ok"
            assert len(raw.peers) == 1
            await pool.aclose()

    run(scenario())


def test_idle_timeout_and_aclose_close_connections() -> None:
    """Idle connections close after idle_timeout; aclose closes the rest and later
    requests fail."""
    closed: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await read_request(reader)
                writer.write(ok())
        finally:
            closed.append(writer.get_extra_info("peername")[1])

    async def scenario() -> None:
        async with Raw(handler) as raw:
            pool = Pool("127.0.0.1", raw.port, idle_timeout=0.2)
            await body_of(await pool.request(b"GET", b"/", [], None, timeout=WAIT))
            for _ in range(100):
                if closed:
                    break
                await asyncio.sleep(0.02)
            assert closed == raw.peers
            await body_of(await pool.request(b"GET", b"/", [], None, timeout=WAIT))
            await pool.aclose()
            for _ in range(100):
                if len(closed) == 2:
                    break
                await asyncio.sleep(0.02)
            assert closed == raw.peers
            with pytest.raises(Http1Error):
                await pool.request(b"GET", b"/", [], None, timeout=WAIT)

    run(scenario())


def test_bytes_on_an_idle_connection_retire_it() -> None:
    """A server that sends something on an idle pooled connection (a 408, garbage) gets
    that connection closed; the next request uses a new one and reads its own answer."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"first"))
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
        with contextlib.suppress(asyncio.IncompleteReadError):
            await read_request(reader)
            writer.write(ok(b"stale connection"))

    async def scenario() -> None:
        async with Raw(handler) as raw:
            pool = Pool("127.0.0.1", raw.port)
            assert await body_of(await pool.request(b"GET", b"/", [], None, timeout=WAIT)) == (
                b"first"
            )
            await asyncio.sleep(0.4)
            second = await pool.request(b"GET", b"/", [], None, timeout=WAIT)
            assert (second.status, await body_of(second)) == (200, b"first")
            assert len(raw.peers) == 2
            await pool.aclose()

    run(scenario())


def test_streamed_body_waits_for_a_slow_reader() -> None:
    """Backpressure: while the upstream reads nothing, the pool stops pulling the body
    iterator (once the socket buffers are full) instead of buffering it all; it resumes
    when the upstream reads, and the whole body arrives."""
    total = 256  # pieces of 64 KiB: 16 MiB, more than loopback socket buffers hold
    pulled = 0
    read_now = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"content-length: %d" % (total * 65536) in head.lower()
        await read_now.wait()
        await reader.readexactly(total * 65536)
        writer.write(ok(b"all read"))

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(total):
            pulled += 1
            yield b"z" * 65536

    async def scenario() -> None:
        async with Raw(handler) as raw:
            pool = Pool("127.0.0.1", raw.port)
            headers = [(b"content-length", str(total * 65536).encode())]
            sending = asyncio.ensure_future(
                pool.request(b"PUT", b"/", headers, body(), timeout=WAIT)
            )
            await asyncio.sleep(0.5)
            assert not sending.done()
            assert pulled < total  # held back, not buffered whole
            read_now.set()
            assert await body_of(await sending) == b"all read"
            assert pulled == total
            await pool.aclose()

    run(scenario())
