"""A lean asyncio HTTP/1.1 client connection pool for one origin (the relay's fast path).

The relay's upstream hop (gateway to service, sidecar to its local app) needs one thing
from an HTTP client: write a request, read the response head, stream the body, keep the
connection for the next request. :class:`Pool` does just that on asyncio protocols with
``httptools`` parsing the responses, without the layers of a general client (no URL
objects, cookies, redirects, header dictionaries, per-request tasks).

Rules:

- One request at a time per connection (no pipelining); connections are reused last-in
  first-out and closed after ``idle_timeout`` seconds unused.
- ``ssl_context()`` is called for each new connection (rotated credentials apply to new
  connections); ``check_peer(ssl_object)`` runs right after the TLS handshake, before
  any request byte is written, and a refusal closes the connection.
- A connection goes back to the pool only when its response was read whole and both
  sides allow keep-alive; anything else closes it.
- The keep-alive race: a reused connection the peer closed before sending any response
  byte is retried once on a new connection, when the body is bytes or None (it can be
  sent again, and no answer was received, so the upstream did not process it — servers
  close idle connections, they do not close after reading a request without answering).
  A streamed body is never retried (it cannot be replayed); the error says so.

Errors are :class:`Http1Error` subclasses carrying ``status`` (502/504), ``reason``
(``upstream_unavailable``, ``upstream_timeout``, ``upstream_error``) and ``retryable``
(True only when no request byte can have reached the upstream), matching
``trustmesh.relay.UpstreamError`` one to one.

.. versionadded:: 0.1
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Callable

import httptools

__all__ = [
    "MAX_HEADER_BYTES",
    "ConnectError",
    "ConnectTimeoutError",
    "Http1Error",
    "Pool",
    "PoolTimeoutError",
    "ProtocolError",
    "Response",
    "ResponseTimeoutError",
]

#: Largest response head (status line and headers) accepted from the upstream.
MAX_HEADER_BYTES = 64 * 1024
#: Buffered response body above which the socket stops being read until the caller
#: catches up.
_READ_HIGH = 256 * 1024
#: Methods that carry ``Content-Length: 0`` when sent without a body (as httpx does).
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
_NO_BODY_STATUS = frozenset({204, 304})
_CRLF = b"\r\n"


class Http1Error(Exception):
    """The upstream could not be reached or failed.

    Attributes:
        status: 502, or 504 for a timeout.
        reason: ``upstream_unavailable``, ``upstream_timeout`` or ``upstream_error``.
        retryable: True when no request byte can have reached the upstream.

    .. versionadded:: 0.1
    """

    status = 502
    reason = "upstream_error"
    retryable = False


class ConnectError(Http1Error):
    """Connecting, the TLS handshake or the ``check_peer`` check failed."""

    reason = "upstream_unavailable"
    retryable = True


class ConnectTimeoutError(Http1Error):
    """Connecting and the handshake took longer than ``connect_timeout``."""

    status = 504
    reason = "upstream_timeout"
    retryable = True


class PoolTimeoutError(Http1Error):
    """No connection became free in time (``max_connections`` are busy)."""

    status = 504
    reason = "upstream_timeout"
    retryable = True


class ResponseTimeoutError(Http1Error):
    """The upstream took longer than ``timeout`` to answer or to send the next piece."""

    status = 504
    reason = "upstream_timeout"


class ProtocolError(Http1Error):
    """The connection broke or the upstream answered something that is not HTTP/1.1."""


class _ClosedError(ProtocolError):
    """The peer closed a connection before any response byte (the keep-alive race)."""


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _too_large() -> ProtocolError:
    return ProtocolError(f"The upstream's response head is larger than {MAX_HEADER_BYTES} bytes.")


class _Connection(asyncio.Protocol):
    """One upstream connection: the protocol, its parser state and flow control."""

    __slots__ = (
        "_clean",
        "_head_bytes",
        "_idle",
        "_parser",
        "_pool",
        "_read_paused",
        "_status",
        "_until_close",
        "_waiter",
        "_write_paused",
        "buffered",
        "chunks",
        "complete",
        "error",
        "generation",
        "head",
        "headers",
        "keep",
        "lost",
        "no_body",
        "reused",
        "started",
        "transport",
    )

    def __init__(self, pool: Pool, generation: int) -> None:
        self._pool = pool
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._idle: asyncio.TimerHandle | None = None
        self.lost = False
        self.reused = False
        self.error: Http1Error | None = None
        self._clean = False
        self._reset(False)

    def _reset(self, no_body: bool) -> None:
        # The parser is reused after a response it saw complete; otherwise (a HEAD
        # response, whose Content-Length announces no body on the wire, which the
        # parser cannot know) a fresh one is made.
        if not self._clean:
            self._parser = httptools.HttpResponseParser(self)
        self._clean = False
        self._head_bytes = 0
        self._status = 0
        self._until_close = False
        self.no_body = no_body
        self.started = False  # a response byte arrived
        self.head = False  # the response head is complete
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep = True

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._idle is not None:  # unasked-for bytes on an idle connection (a 408...)
            self.keep = False
            self.close()
            return
        self.started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("The upstream switched protocols, which is not relayed."))
            return
        except httptools.HttpParserError as exc:
            self._fail(self.error or ProtocolError(f"The upstream sent an invalid response: {exc}"))
            return
        if not self.head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self._fail(_too_large())

    def eof_received(self) -> bool | None:
        self._end()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._end()
        self._pool._forget(self)
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.headers = []
        self._until_close = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEADER_BYTES:
            self.error = _too_large()
            raise self.error
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._status = self._parser.get_status_code()
        if 100 <= status < 200:  # 100 Continue and friends: wait for the real answer
            return
        self.head = True
        if self.no_body or status in _NO_BODY_STATUS:
            # llhttp thinks a HEAD response without framing headers ends at close.
            self.complete = True
            self.keep = self.keep and self._parser.get_http_version() == "1.1"
            for name, value in self.headers:
                if name.lower() == b"connection" and b"close" in value.lower():
                    self.keep = False
        else:
            framed = False
            for name, _value in self.headers:
                lower = name.lower()
                if lower == b"content-length" or lower == b"transfer-encoding":
                    framed = True
                    break
            self._until_close = not framed
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _READ_HIGH and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            return
        self._clean = True
        if self.complete:
            return
        self.complete = True
        self.keep = self.keep and self._parser.should_keep_alive()
        self._wake()

    # internals

    def _end(self) -> None:
        """The peer closed its side: a body read until close is complete."""
        if self.head and self._until_close and not self.complete:
            self.complete = True
            self.keep = False
        elif not self.complete and self.error is None:
            if not self.started:
                self.error = _ClosedError("The upstream closed the connection before answering.")
            else:
                self.error = ProtocolError("The upstream closed the connection mid-response.")
        self.keep = False
        self._wake()

    def _fail(self, error: Http1Error) -> None:
        if self.error is None:
            self.error = error
        self.keep = False
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def reading(self) -> None:
        """The caller took buffered body pieces: read the socket again if it was paused."""
        if self._read_paused and self.buffered <= _READ_HIGH // 2 and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    async def wait(self, timeout: float | None) -> None:
        """Wait for the next event (data, completion, drain, close) or the timeout."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        handle = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    def write(self, data: bytes) -> None:
        assert self.transport is not None  # noqa: S101 - connected before use
        self.transport.write(data)

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    def idle(self, timeout: float) -> None:
        self._idle = asyncio.get_running_loop().call_later(timeout, self.close)

    def busy(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def usable(self) -> bool:
        transport = self.transport
        return not self.lost and transport is not None and not transport.is_closing()

    def close(self) -> None:
        self.busy()
        if self.transport is not None and not self.lost:
            self.transport.close()
        else:
            self._pool._forget(self)


class Response:
    """A response whose head arrived; read its body with :meth:`aiter_bytes`.

    Attributes:
        status: The status code.
        headers: ``(name, value)`` pairs as received (names in the upstream's case).

    .. versionadded:: 0.1
    """

    __slots__ = ("_conn", "_timeout", "headers", "status")

    def __init__(self, conn: _Connection, timeout: float | None) -> None:
        self.status = conn._status
        self.headers = conn.headers
        self._conn: _Connection | None = conn
        self._timeout = timeout

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """Yield the body as it arrives (Content-Length, chunked or until close).

        Raises:
            ResponseTimeoutError: No piece arrived within ``timeout`` seconds.
            ProtocolError: The connection broke or the upstream sent nonsense.
        """
        conn = self._conn
        if conn is None:
            return
        chunks = conn.chunks
        while True:
            if chunks:
                piece = chunks.popleft()
                conn.buffered -= len(piece)
                conn.reading()
                yield piece
            elif conn.complete:
                self._release()
                return
            elif conn.error is not None:
                error = conn.error
                self._discard()
                raise error
            else:
                try:
                    await conn.wait(self._timeout)
                except TimeoutError:
                    self._discard()
                    raise ResponseTimeoutError(
                        f"The upstream sent no more of its response for {self._timeout}s."
                    ) from None

    def _release(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn._pool._release(conn)

    def _discard(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.keep = False
            conn._pool._release(conn)

    async def aclose(self) -> None:
        """Give the connection back: to the pool when the body was read whole and both
        sides keep the connection alive, else closed."""
        conn = self._conn
        if conn is not None and not (conn.complete and not conn.chunks):
            self._discard()
        else:
            self._release()


class Pool:
    """Keep-alive HTTP/1.1 connections to one origin.

    Args:
        host: The upstream's host name or address.
        port: Its port.
        ssl_context: Called for each new connection; None for plain HTTP.
        server_hostname: The TLS server name (SNI and hostname check); default ``host``.
        check_peer: Called with the ``ssl.SSLObject`` right after each TLS handshake,
            before any request byte; raising refuses the connection.
        max_connections: Connections open at once; more requests wait for one.
        connect_timeout: Seconds for connecting and the TLS handshake.
        idle_timeout: Seconds an unused connection stays open.
        generation: Called when taking a connection; a change (rotated credentials,
            a new revocation) closes the connections made before it.
        timeout: The request timeout callers such as ``trustmesh.relay`` use when
            they are given none (the pool itself always takes it per request).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: Callable[[], ssl.SSLContext] | None = None,
        server_hostname: str | None = None,
        check_peer: Callable[[ssl.SSLObject], None] | None = None,
        max_connections: int = 100,
        connect_timeout: float = 5.0,
        idle_timeout: float = 30.0,
        generation: Callable[[], int] | None = None,
        timeout: float | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.host = host
        self.port = port
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self._check_peer = check_peer
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._generation = generation
        self._gen = generation() if generation is not None else 0
        self.timeout = timeout
        authority = host if ":" not in host else f"[{host}]"
        scheme_port = 443 if ssl_context is not None else 80
        name = (server_hostname or authority).encode("idna")
        self.host_header = name if port == scheme_port else name + b":%d" % port
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    @property
    def origin(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self.host_header.decode()}"

    def __repr__(self) -> str:
        return f"<Pool {self.origin} open={len(self._open)} idle={len(self._idle)}>"

    # connections

    def _forget(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            if conn in self._idle:
                self._idle.remove(conn)
            self._notify()

    def _notify(self) -> None:
        """A connection or a slot became free: wake the first waiter to take it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _release(self, conn: _Connection) -> None:
        if not conn.keep or not conn.usable() or self._closed or conn.generation != self._gen:
            conn.keep = False
            conn.close()
            return
        conn.reused = True
        self._idle.append(conn)
        conn.idle(self.idle_timeout)
        self._notify()

    def _recycle(self, generation: int) -> None:
        self._gen = generation
        for conn in list(self._idle):
            conn.close()

    async def _acquire(self, timeout: float | None, *, fresh: bool = False) -> _Connection:
        if self._closed:
            raise ConnectError(f"The pool for {self.origin} is closed.")
        if self._generation is not None:
            generation = self._generation()
            if generation != self._gen:
                self._recycle(generation)
        if fresh and len(self._open) < self.max_connections:
            return await self._connect()
        while True:
            idle = self._idle
            while idle:
                conn = idle.pop()
                if conn.usable():
                    conn.busy()
                    return conn
                conn.close()
            if len(self._open) < self.max_connections:
                return await self._connect()
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            loop = asyncio.get_running_loop()
            handle = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
            try:
                await waiter
            except TimeoutError:
                raise PoolTimeoutError(
                    f"No connection to {self.origin} became free within {timeout}s "
                    f"({self.max_connections} busy)."
                ) from None
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._notify()  # pass the wake-up on
                raise
            finally:
                if handle is not None:
                    handle.cancel()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self, self._gen)
        self._open.add(conn)
        ctx = self._ssl_context() if self._ssl_context is not None else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=ctx,
                    server_hostname=(self._server_hostname or self.host) if ctx else None,
                    ssl_handshake_timeout=self.connect_timeout if ctx else None,
                )
        except TimeoutError:
            conn.close()
            raise ConnectTimeoutError(
                f"Connecting to {self.origin} took longer than {self.connect_timeout}s."
            ) from None
        except OSError as exc:
            conn.close()
            raise ConnectError(f"Cannot connect to {self.origin}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        if self._check_peer is not None:
            assert conn.transport is not None  # noqa: S101 - set by connection_made
            try:
                self._check_peer(conn.transport.get_extra_info("ssl_object"))
            except Exception as exc:
                conn.transport.abort()
                self._forget(conn)
                raise ConnectError(f"Refused {self.origin}: {exc}") from exc
        return conn

    # requests

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None,
        *,
        timeout: float | None,
        host_header: bytes | None = None,
    ) -> Response:
        """Send one request and return once the response head is in.

        Args:
            method: The method, e.g. ``b"GET"``.
            target: Path and query, e.g. ``b"/items?x=1"``.
            headers: Headers to send as they are (no hop-by-hop ones). A ``Host`` among
                them is used; otherwise ``host_header`` or the pool's origin. Framing
                headers are the pool's: ``Content-Length`` for a bytes body, the given
                ``Content-Length`` or else ``Transfer-Encoding: chunked`` for a stream.
            body: None, bytes, or an async iterator streamed with backpressure.
            timeout: Seconds to wait for a free connection, for the response head and
                for each body piece (and each write stall); None waits for ever.
            host_header: The ``Host`` value when ``headers`` has none.

        Raises:
            Http1Error: See the module documentation for which ones are retryable.
        """
        head, stream, chunked = self._head(method, target, headers, body, host_header)
        no_body = method == b"HEAD"
        conn = await self._acquire(timeout)
        try:
            return await self._exchange(conn, head, body, stream, chunked, no_body, timeout)
        except _ClosedError:
            if not conn.reused or stream is not None:
                raise
        # The keep-alive race: the peer closed the idle connection as we wrote on it.
        conn = await self._acquire(timeout, fresh=True)
        return await self._exchange(conn, head, body, None, False, no_body, timeout)

    def _head(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None,
        host_header: bytes | None,
    ) -> tuple[bytes, AsyncIterator[bytes] | None, bool]:
        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
        has_host = False
        declared: bytes | None = None
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                declared = value
                continue
            if lower == b"transfer-encoding":
                continue
            if lower == b"host":
                has_host = True
            parts += (name, b": ", value, _CRLF)
        if not has_host:
            parts += (b"host: ", host_header or self.host_header, _CRLF)
        stream: AsyncIterator[bytes] | None = None
        if body is None or isinstance(body, bytes):
            if body:
                parts.append(b"content-length: %d\r\n" % len(body))
            elif method in _BODY_METHODS:
                parts.append(b"content-length: 0\r\n")
        else:
            stream = body
            if declared is not None:
                parts += (b"content-length: ", declared, _CRLF)
            else:
                parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(_CRLF)
        return b"".join(parts), stream, declared is None

    async def _exchange(
        self,
        conn: _Connection,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        stream: AsyncIterator[bytes] | None,
        chunked: bool,
        no_body: bool,
        timeout: float | None,
    ) -> Response:
        conn._reset(no_body)
        try:
            if stream is None:
                conn.write(head + body if isinstance(body, bytes) and body else head)
            else:
                conn.write(head)
                await self._send_body(conn, stream, chunked, timeout)
            while not conn.head:
                if conn.error is not None:
                    raise conn.error
                try:
                    await conn.wait(timeout)
                except TimeoutError:
                    raise ResponseTimeoutError(
                        f"{self.origin} did not answer within {timeout}s."
                    ) from None
        except BaseException:
            conn.keep = False
            conn.close()
            raise
        return Response(conn, timeout)

    async def _send_body(
        self, conn: _Connection, stream: AsyncIterator[bytes], chunked: bool, timeout: float | None
    ) -> None:
        async for piece in stream:
            if conn.head:  # the upstream answered early: stop sending, close afterwards
                conn.keep = False
                return
            if conn.error is not None:
                raise conn.error
            if not piece:
                continue
            if chunked:
                conn.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            else:
                conn.write(piece)
            while conn.write_paused and not conn.head:
                if conn.error is not None:
                    raise conn.error
                try:
                    await conn.wait(timeout)
                except TimeoutError:
                    raise ResponseTimeoutError(
                        f"{self.origin} did not read the request body for {timeout}s."
                    ) from None
        if chunked and not conn.head:
            conn.write(b"0\r\n\r\n")

    async def aclose(self) -> None:
        """Close every connection; later requests fail."""
        self._closed = True
        for conn in list(self._open):
            conn.busy()
            if conn.transport is not None and not conn.lost:
                conn.transport.abort()
            else:
                self._forget(conn)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectError(f"The pool for {self.origin} is closed."))
        for _ in range(2):  # let connection_lost run
            await asyncio.sleep(0)
