"""The hot CA routes (``POST /v1/renew``) served from the HTTP protocol, without ASGI.

uvicorn's httptools protocol still parses the request, keeps the connection alive,
queues pipelined requests and applies its concurrency limit and graceful shutdown;
:class:`DirectProtocol` only replaces what happens once a request's head is parsed on
one of the direct routes: instead of an ASGI task running the app stack (the timing
wrapper, the TLS-extension scope copy, Starlette's ``Request``, the body read through
``receive`` messages, the response through ``send`` messages), a task calls the very
endpoint the ASGI app dispatches that route to, with a :class:`DirectRequest` (what
the endpoint reads of a request, straight from uvicorn's request cycle), and writes
the ``Response`` it returns to the transport as uvicorn would (status line, uvicorn's
``server`` and ``date`` headers, the response's own headers, the body).

Every check stays the endpoint's own: the client certificate, the caller's chain and
revocation status, the CSR and identity rules, the body size and time bounds, the
audit record and event committed before the answer, the problem+json refusals, the
metrics and log lines. Every other route (and every request on a connection without
TLS, and any request when the concurrency limit is reached) goes through the ASGI app
as before. Tests compare the answers of both paths byte for byte
(tests/test_ca_direct.py); bench/RESULTS.md (issue 18) has what it saves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from starlette.datastructures import Address, Headers
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from trustmesh.serving import BodyTimeout, BodyTooLarge
from trustmesh.tls import TLSHttpToolsProtocol

from ._problems import problem

__all__ = ["DirectEndpoint", "DirectProtocol", "DirectRequest", "direct_protocol"]

log = logging.getLogger("trustmesh.ca_server")

#: An endpoint served directly: takes a request, returns the response to write.
DirectEndpoint = Callable[[Any], Awaitable[Response]]
#: ``(method, path, status, seconds)``, as :class:`trustmesh.serving.TimedApp` reports.
Observe = Callable[[str, str, int, float], None]


class _URL:
    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


class DirectRequest:
    """What the CA's endpoints read of a request (``method``, ``url.path``, ``client``,
    ``headers``, the TLS extension in ``scope``), taken from uvicorn's request cycle;
    the body through :meth:`bounded_body`, with the same bounds as
    :func:`trustmesh.serving.read_bounded_body`."""

    __slots__ = ("_cycle", "_headers", "client", "method", "scope", "url")

    def __init__(self, cycle: RequestResponseCycle, tls: dict[str, Any]) -> None:
        scope = cycle.scope
        self._cycle = cycle
        self._headers: Headers | None = None
        self.method: str = scope["method"]
        self.url = _URL(scope["path"])
        client = scope.get("client")
        self.client = Address(client[0], client[1]) if client else None
        self.scope: dict[str, Any] = {"extensions": {"tls": tls}}

    @property
    def headers(self) -> Headers:
        if self._headers is None:
            self._headers = Headers(raw=list(self._cycle.scope["headers"]))
        return self._headers

    async def bounded_body(self, *, limit: int, timeout: float) -> bytes:
        """The body, at most ``limit`` bytes, complete within ``timeout`` seconds.

        Raises:
            BodyTooLarge: ``Content-Length`` says more than ``limit`` (or is not a
                number), or more than ``limit`` bytes arrived.
            BodyTimeout: The body was not complete within ``timeout``.
            ClientDisconnect: The client went away before the body was complete.
        """
        declared = self.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise BodyTooLarge
        cycle = self._cycle
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        if cycle.more_body and not cycle.disconnected:
            # The common case (the body came with the head) never gets here.
            try:
                async with asyncio.timeout(timeout):
                    while cycle.more_body and not cycle.disconnected:
                        if len(cycle.body) > limit:
                            raise BodyTooLarge
                        cycle.flow.resume_reading()
                        await cycle.message_event.wait()
                        cycle.message_event.clear()
            except TimeoutError:
                raise BodyTimeout from None
        if cycle.disconnected:
            raise ClientDisconnect
        body = bytes(cycle.body)
        cycle.body = bytearray()
        if len(body) > limit:
            raise BodyTooLarge
        return body


async def _write(cycle: RequestResponseCycle, response: Response) -> None:
    """Write ``response`` whole, as uvicorn's ``send`` does for an ASGI response with a
    ``Content-Length`` (our responses always have one and only safe header values)."""
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected:
        return
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    content: list[bytes | memoryview] = [STATUS_LINE[response.status_code]]
    for name, value in cycle.default_headers:
        content += (name, b": ", value, b"\r\n")
    for name, value in response.raw_headers:
        if name == b"connection" and b"close" in value.lower():
            cycle.keep_alive = False
        content += (name, b": ", value, b"\r\n")
    if not cycle.keep_alive:
        content.append(b"connection: close\r\n")
    content += (b"\r\n", response.body)
    cycle.transport.write(b"".join(content))
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()


class DirectProtocol(TLSHttpToolsProtocol):
    """uvicorn's httptools protocol (with the ASGI TLS extension) serving the routes in
    ``direct`` (``(method, path) -> (endpoint, observe)``) without ASGI. Subclass it with
    the table set (:func:`direct_protocol`)."""

    direct: ClassVar[dict[tuple[str, str], tuple[DirectEndpoint, Observe]]] = {}
    #: Requests this class served directly (in this process).
    served: ClassVar[int] = 0
    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._tls = getattr(self.app, "extension", None)  # set by the TLS shim

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        scope = cycle.scope
        route = self.direct.get((scope["method"], scope["path"]))
        # Not under the concurrency limit (app is uvicorn's 503 then), nor without TLS.
        if route is None or app is not self.app or self._tls is None:
            super()._start_asgi_task(cycle, app)
            return
        type(self).served += 1
        task = self.loop.create_task(self._serve_direct(cycle, route, self._tls))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _serve_direct(
        self,
        cycle: RequestResponseCycle,
        route: tuple[DirectEndpoint, Observe],
        tls: dict[str, Any],
    ) -> None:
        endpoint, observe = route
        start = time.perf_counter()
        status = 500
        try:
            try:
                response = await endpoint(DirectRequest(cycle, tls))
            except Exception:
                log.exception("%s %s failed", cycle.scope["method"], cycle.scope["path"])
                response = problem(
                    500, "Internal server error", "The CA failed on this request; see its log."
                )
            status = response.status_code
            await _write(cycle, response)
        except BaseException:
            cycle.transport.close()  # as uvicorn does once a response may have started
            raise
        finally:
            cycle.on_response = lambda: None
            observe(cycle.scope["method"], cycle.scope["path"], status, time.perf_counter() - start)


def direct_protocol(
    direct: dict[tuple[str, str], tuple[DirectEndpoint, Observe]],
) -> type[DirectProtocol]:
    """A :class:`DirectProtocol` class serving ``direct`` (uvicorn's ``http=``)."""
    return type("CAHttpProtocol", (DirectProtocol,), {"direct": dict(direct)})
