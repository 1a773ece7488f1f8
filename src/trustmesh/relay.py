"""Relay one ASGI HTTP request to an upstream, streaming both ways.

The upstream is reached through an ``httpx.AsyncClient`` or, on the fast path, a
:class:`trustmesh.http1.Pool` (keep-alive HTTP/1.1 to one origin, a fraction of httpx's
CPU per request).

Small and generic: no routing, authentication or other gateway policy lives here (the
gateway and the sidecar proxy build on it). The request body goes to the upstream
piece by piece as the client sends it (or a pre-read body, for retries), and the
response comes back piece by piece as the upstream sends it; nothing is buffered
whole. Failures before the first response byte reach the client are exceptions the
caller turns into a response (:class:`UpstreamError`, :class:`BodyTooLarge`);
after that, an upstream failure can only cut the client's connection, which is logged.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any

import httpx

from trustmesh.http1 import Http1Error, Pool
from trustmesh.problems import PROBLEM_CONTENT_TYPE, problem_document

__all__ = [
    "HOP_BY_HOP",
    "BodyTooLarge",
    "ClientDisconnected",
    "UpstreamError",
    "forward_headers",
    "no_cookies",
    "relay",
    "send_problem",
]

log = logging.getLogger("trustmesh.relay")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = Iterable[tuple[bytes, bytes]]

#: Hop-by-hop headers (RFC 9110 section 7.6.1, plus the non-standard ``keep-alive`` and
#: ``proxy-connection``): they describe one connection and are never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


class UpstreamError(Exception):
    """The upstream could not be reached or failed before the response began.

    Attributes:
        status: The status to answer the client with: 502, or 504 for a timeout.
        reason: ``upstream_unavailable`` (no connection), ``upstream_timeout`` or
            ``upstream_error`` (the connection broke or the upstream answered nonsense).
        retryable: True when no byte of the request can have reached the upstream
            (connecting or the TLS handshake failed, or no pooled connection was
            free): any method may then be retried elsewhere.

    .. versionadded:: 0.1
    """

    def __init__(self, status: int, reason: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retryable = retryable


class BodyTooLarge(Exception):  # noqa: N818 - the name the gateway spec uses
    """The request body is larger than ``max_body`` (by Content-Length or as counted).

    Attributes:
        limit: The limit in bytes.

    .. versionadded:: 0.1
    """

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is larger than {limit} bytes.")
        self.limit = limit


class ClientDisconnected(Exception):  # noqa: N818 - an event, not our error
    """The client went away while its request body was being relayed.

    .. versionadded:: 0.1
    """


def no_cookies() -> http.cookiejar.CookieJar:
    """A cookie jar that never stores a cookie, for the relay's httpx client.

    httpx records every ``Set-Cookie`` of every response in its client's jar; a relay
    passes them on to its own client and must not keep (or grow with) them.

    .. versionadded:: 0.1
    """
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def forward_headers(
    raw: Headers, *, drop: Callable[[bytes], bool] | None = None
) -> list[tuple[bytes, bytes]]:
    """Return the headers worth forwarding: without hop-by-hop ones, those the
    ``Connection`` header names, and those ``drop`` refuses.

    Args:
        raw: Header pairs as ASGI or httpx give them (names in any case).
        drop: Called with each lower-cased name; True removes the header.

    .. versionadded:: 0.1
    """
    pairs = raw if isinstance(raw, list) else list(raw)
    named: set[bytes] = set()
    for name, value in pairs:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    kept: list[tuple[bytes, bytes]] = []
    for name, value in pairs:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named:
            continue
        if drop is not None and drop(lower):
            continue
        kept.append((name, value))
    return kept


async def send_problem(
    send: Send,
    status: int,
    *,
    title: str,
    detail: str,
    reason: str,
    headers: Headers = (),
) -> None:
    """Answer with an ``application/problem+json`` document (``type``, ``title``,
    ``status``, ``detail``, ``reason``).

    Args:
        send: The ASGI send callable (the response must not have started).
        status: The HTTP status.
        title: A short, fixed summary.
        detail: What happened and how to fix it.
        reason: The decision reason code (also in logs and metrics).
        headers: Extra response headers (``WWW-Authenticate``, ``Retry-After``...).

    .. versionadded:: 0.1
    """
    body = problem_document(status, title, detail, reason=reason)
    response_headers = [
        (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})


def _content_length(headers: Headers) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _chunked(headers: Headers) -> bool:
    return any(name.lower() == b"transfer-encoding" for name, _ in headers)


class _ClientWatch:
    """Notice a client that leaves while the upstream is working, and stop the transfer.

    Once the request body is read, the client's next ASGI message is ``http.disconnect``
    (sent when it leaves, or when the response is complete). A task waits for it and
    cancels the relaying task if it comes first: otherwise a long or endless response
    (server-sent events) would keep the upstream busy for nobody.
    """

    __slots__ = ("_receive", "_task", "_waiter", "active", "left")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task = asyncio.current_task()
        self._waiter: asyncio.Future[Message] | None = None
        self.active = True
        self.left = False

    def start(self) -> None:
        if self._waiter is None and self.active:
            self._waiter = asyncio.ensure_future(self._wait())
            self._waiter.add_done_callback(self._done)

    async def _wait(self) -> Message:
        # An unread empty body (a GET) comes first as http.request; skip it.
        while True:
            message = await self._receive()
            if message["type"] != "http.request":
                return message

    def _done(self, waiter: asyncio.Future[Message]) -> None:
        if waiter.cancelled() or waiter.exception() is not None or not self.active:
            return
        if waiter.result().get("type") == "http.disconnect":
            self.left = True
            if self._task is not None:
                self._task.cancel()

    def stop(self) -> None:
        self.active = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()


class _RequestBody:
    """The client's request body as an async iterator, counted against the limit."""

    __slots__ = ("_max", "_receive", "_watch", "size")

    def __init__(self, receive: Receive, max_body: int | None, watch: _ClientWatch) -> None:
        self._receive = receive
        self._max = max_body
        self._watch = watch
        self.size = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        receive, limit = self._receive, self._max
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected("The client disconnected while sending its body.")
            chunk: bytes = message.get("body", b"")
            if chunk:
                self.size += len(chunk)
                if limit is not None and self.size > limit:
                    raise BodyTooLarge(limit)
                yield chunk
            if not message.get("more_body", False):
                self._watch.start()
                return


def _upstream_error(exc: httpx.HTTPError | Http1Error, url: str) -> UpstreamError:
    if isinstance(exc, Http1Error):
        return UpstreamError(exc.status, exc.reason, f"{url}: {exc}", retryable=exc.retryable)
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamError(
            504, "upstream_timeout", f"Connecting to {url} timed out.", retryable=True
        )
    if isinstance(exc, httpx.PoolTimeout):
        return UpstreamError(
            504,
            "upstream_timeout",
            f"No connection to {url} became free in time (the pool is exhausted).",
            retryable=True,
        )
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(
            504, "upstream_timeout", f"{url} did not answer in time.", retryable=False
        )
    if isinstance(exc, httpx.ConnectError):
        return UpstreamError(
            502, "upstream_unavailable", f"Cannot connect to {url}: {exc}", retryable=True
        )
    return UpstreamError(
        502, "upstream_error", f"{url} failed: {type(exc).__name__}: {exc}", retryable=False
    )


async def relay(
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    client: httpx.AsyncClient | Pool,
    url: str,
    headers: Headers,
    max_body: int | None,
    timeout: httpx.Timeout | float | None = None,
    response_headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes | None = None,
) -> int:
    """Forward one ASGI HTTP request to ``url`` and stream the answer back.

    Args:
        scope: The ASGI scope (its ``method`` is used).
        receive: The ASGI receive callable (unused for the body when ``body`` is given).
        send: The ASGI send callable.
        client: The httpx client (its transport decides TLS and pooling; its default
            headers and cookies are not used; give it a cookie jar that stores nothing,
            :func:`no_cookies`, as responses pass through it), or a
            :class:`trustmesh.http1.Pool` for the upstream's origin (the fast path).
        url: The full upstream URL, query included. With a pool only its path and
            query are used (the pool decides the origin); a bare ``/path?query``
            is accepted too.
        headers: The request headers to send as they are (see
            :func:`forward_headers`); without ``Host`` the client sets the upstream's.
        max_body: Refuse bodies larger than this many bytes (by ``Content-Length``
            up front, and as counted while streaming); None for no limit.
        timeout: Timeouts for this request: httpx timeouts (connect, and read/write
            between pieces), or seconds; None keeps the client's (a pool's
            ``timeout``). A pool uses the read timeout for the response head and for
            each body piece (its own ``connect_timeout`` for connecting).
        response_headers: Added to the upstream's response headers (after hop-by-hop
            headers are removed from those), except names the upstream already sent.
        body: The request body, already read (to retry a request); ``receive`` is
            then not read for it.

    Returns:
        The upstream's status code.

    Raises:
        UpstreamError: The upstream failed before any response byte was sent.
        BodyTooLarge: The body exceeds ``max_body`` (nothing was sent to the client).
        ClientDisconnected: The client went away while sending its body.

    .. versionadded:: 0.1
    """
    watch = _ClientWatch(receive)
    content: bytes | _RequestBody
    if body is not None:
        if max_body is not None and len(body) > max_body:
            raise BodyTooLarge(max_body)
        content = body
        watch.start()
    else:
        declared = _content_length(headers)
        if max_body is not None and declared is not None and declared > max_body:
            raise BodyTooLarge(max_body)
        if not declared and not _chunked(scope.get("headers", ())):
            # HTTP/1.1: no Content-Length and no Transfer-Encoding means no body (a GET);
            # a streamed one would go out chunked, which some servers refuse on a GET.
            content = b""
            watch.start()
        else:
            content = _RequestBody(receive, max_body, watch)
    # nginx's 499 "client closed request" until a response status was sent.
    sent = 499

    async def start(status: int, out: list[tuple[bytes, bytes]]) -> None:
        nonlocal sent
        await send({"type": "http.response.start", "status": status, "headers": out})
        sent = status

    try:
        args = (scope["method"], url, list(headers), content, timeout)
        status, raw, stream, close = await (
            _fetch_pool(client, *args) if isinstance(client, Pool) else _fetch_httpx(client, *args)
        )
        try:
            return await _stream_response(status, raw, stream, send, start, url, response_headers)
        finally:
            await close()
    except asyncio.CancelledError:
        if not _client_left(watch, url):
            raise
        return sent
    finally:
        watch.stop()


#: What a fetch returns: status, raw headers, the body stream, and how to close it.
_Fetched = tuple[int, Headers, AsyncIterator[bytes], Callable[[], Awaitable[None]]]


async def _fetch_httpx(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    headers: list[tuple[bytes, bytes]],
    content: bytes | _RequestBody,
    timeout: httpx.Timeout | float | None,
) -> _Fetched:
    # A bare Request, not client.build_request(): the client's default headers (its
    # User-Agent, Accept-Encoding: gzip...) and cookie jar must not change what the
    # client asked for.
    if timeout is not None and not isinstance(timeout, httpx.Timeout):
        timeout = httpx.Timeout(timeout)
    request = httpx.Request(
        method,
        url,
        headers=headers,
        content=content,
        extensions={"timeout": (timeout or client.timeout).as_dict()},
    )
    try:
        response = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise _upstream_error(exc, url) from exc
    return response.status_code, response.headers.raw, response.aiter_raw(), response.aclose


async def _fetch_pool(
    pool: Pool,
    method: str,
    url: str,
    headers: list[tuple[bytes, bytes]],
    content: bytes | _RequestBody,
    timeout: httpx.Timeout | float | None,
) -> _Fetched:
    seconds = timeout.read if isinstance(timeout, httpx.Timeout) else timeout
    try:
        response = await pool.request(
            method.encode("latin-1"),
            _target(url),
            headers,
            content if isinstance(content, bytes) else content.__aiter__(),
            timeout=pool.timeout if seconds is None else seconds,
        )
    except Http1Error as exc:
        raise _upstream_error(exc, url) from exc
    return response.status, response.headers, response.aiter_bytes(), response.aclose


def _client_left(watch: _ClientWatch, url: str) -> bool:
    """The relaying task was cancelled: True (and logged, the cancel undone) when the
    client watch did it because the client left."""
    if not watch.left:
        return False
    current = asyncio.current_task()
    if current is not None:
        current.uncancel()
    log.info(
        "relay: the client left while %s was answering; transfer stopped",
        url,
        extra={"event": "relay_client_left", "upstream": url},
    )
    return True


def _target(url: str) -> bytes:
    """The request target (path and query) of a full URL, or ``url`` if it is one."""
    if not url.startswith("/"):
        slash = url.find("/", url.find("//") + 2)
        url = url[slash:] if slash >= 0 else "/"
    return url.encode("latin-1")


async def _stream_response(
    status: int,
    raw: Headers,
    stream: AsyncIterator[bytes],
    send: Send,
    start: Callable[[int, list[tuple[bytes, bytes]]], Awaitable[None]],
    url: str,
    extra: Sequence[tuple[bytes, bytes]],
) -> int:
    out = forward_headers(raw)
    if extra:
        present = {name.lower() for name, _ in out}
        out.extend(item for item in extra if item[0].lower() not in present)
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        await start(status, out)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return status
    except (httpx.HTTPError, Http1Error) as exc:
        raise _upstream_error(exc, url) from exc
    await start(status, out)
    await send({"type": "http.response.body", "body": first, "more_body": True})
    try:
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except (httpx.HTTPError, Http1Error) as exc:
        log.warning(
            "relay: %s failed while its response was streaming (%s: %s); the client's "
            "connection is cut",
            url,
            type(exc).__name__,
            exc,
            extra={"event": "relay_aborted", "upstream": url},
        )
        return status
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return status
