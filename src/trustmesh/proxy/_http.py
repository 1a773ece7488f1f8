"""HTTP mode of ``proxy inbound``: an asyncio protocol that parses each request head with
httptools, applies the identity checks (caller, revocation, token and policy per request),
and relays each allowed request to the plain app over a keep-alive pool with headers the
app can trust. No ASGI server sits in between: the relay is the protocol.

Per request, in order (the same checks as :class:`trustmesh.middleware.MTLSMiddleware`,
through the same :class:`~trustmesh.middleware._core.Gate`): the caller's leaf from the
verified TLS chain must be a workload certificate of the trust domain, valid now and not
revoked (asked on every request, so a keep-alive connection of a revoked caller is refused
at its next request and closed); the bearer token is verified when present (or required);
the policy decides. An allowed decision for (caller, method, path) without a token is
remembered per connection until the policy in force changes (a reload). Refusals are
problem+json, counted and logged; allowed requests are logged at DEBUG only.

Limits: a request head larger than :data:`MAX_HEAD` bytes is answered 431, one not
complete :data:`HEAD_TIMEOUT` seconds after its first byte 408, a body larger than
:data:`MAX_BODY` 413; a request with both ``Content-Length`` and ``Transfer-Encoding``
(the request smuggling shape), several differing lengths or an unknown transfer coding
is refused 400; each closes the connection. Pipelined requests are answered in order.
``Expect: 100-continue`` is answered once the request passed the checks. An ``Upgrade``
(WebSocket, h2c) is not relayed: the request goes to the app as a plain request without
its hop-by-hop headers, as before, and the connection closes after the answer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import ssl
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import httptools
from cryptography import x509

from trustmesh.addresses import parse_listen, public_url
from trustmesh.errors import TrustmeshError, VerificationError
from trustmesh.headers import is_spoofable
from trustmesh.http1 import Http1Error, Pool
from trustmesh.middleware import FORWARDED_CALLER_HEADER, forwarded_certificate_header
from trustmesh.middleware._core import Gate, Refusal
from trustmesh.problems import PROBLEM_CONTENT_TYPE, problem_document
from trustmesh.tls import log_refused_handshakes

from ._sidecar import Connection, InboundSettings, Sidecar, Tracker, parse_target, peer_identity

__all__ = ["serve_inbound_http"]

log = logging.getLogger("trustmesh.proxy")

#: Largest request body relayed to the app.
MAX_BODY = 64 * 1024 * 1024
#: Largest request head (request line and headers).
MAX_HEAD = 64 * 1024
#: Seconds a request head may take from its first byte to its end.
HEAD_TIMEOUT = 10.0
#: Connections to the app open at once (more requests wait for one); idle ones close
#: after :data:`APP_IDLE` seconds.
POOL_SIZE = 1024
APP_IDLE = 30.0
#: Seconds to connect to the app.
APP_CONNECT_TIMEOUT = 10.0
#: Seconds an idle keep-alive connection from a caller stays open.
KEEP_ALIVE = 15
#: Requests parsed ahead of the one being answered before the socket stops being read.
MAX_PIPELINED = 16
#: Buffered request body above which the socket stops being read until the app takes it.
_READ_HIGH = 256 * 1024
#: Request bodies up to this size that arrived whole are sent to the app in one write.
_SMALL_BODY = 64 * 1024
#: Decisions remembered per connection.
_DECISIONS = 256
#: Seconds a closed, idle connection may wait for the client's close_notify in a drain.
IDLE_ABORT = 1.0

_MODE = "inbound-http"
_CALLER = FORWARDED_CALLER_HEADER.encode()
_CLIENT_CERT = b"client-cert"
_ENCODED_CACHE = 1024

#: Hop-by-hop headers (RFC 9110 section 7.6.1, plus ``keep-alive``, ``proxy-connection``)
#: and ``expect`` (answered here): never forwarded.
_HOP = frozenset(
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
_REQUEST_HOP = _HOP | {b"expect"}
_NO_BODY_STATUS = frozenset({204, 304})

_PAUSE_BODY = 1
_PAUSE_PIPELINE = 2
_PAUSE_STOPPED = 4

_reasons: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _reasons.get(status)
    if line is None:
        import http

        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = _reasons[status] = b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("latin-1"))
    return line


class _Problem(Exception):  # noqa: N818 - an answer, not our error
    """A request refused by the protocol itself (framing, limits): answered, then closed."""

    def __init__(self, status: int, reason: str, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.title = title
        self.detail = detail


class _BodyTooLarge(Exception):  # noqa: N818 - an event
    pass


class _ClientLeft(Exception):  # noqa: N818 - an event
    pass


class _Request:
    """One request: its head, and its body as the client sends it."""

    __slots__ = (
        "buffered",
        "chunked",
        "chunks",
        "complete",
        "error",
        "expect",
        "headers",
        "keep_alive",
        "length",
        "method",
        "problem",
        "queued",
        "size",
        "target",
        "version",
        "waiter",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.buffered = 0
        self.queued = False
        self.complete = False
        self.keep_alive = True
        self.expect = False
        self.chunked = False
        self.length: int | None = None
        self.error: Exception | None = None
        self.problem: _Problem | None = None
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Decisions(dict[tuple[str, str, str], Any]):
    """One connection's remembered policy decisions, for one policy object."""

    __slots__ = ("policy",)

    def __init__(self) -> None:
        super().__init__()
        self.policy: object = None


class _PolicySource:
    """Which policy object is in force: a policy file's current one (checked for changes
    as the file itself does), or the fixed ``--allow-id`` policy. The decisions a
    connection remembers are dropped when this object changes."""

    def __init__(self, policy: Any) -> None:
        self.source = policy
        self._file = hasattr(policy, "generation") and hasattr(policy, "policy")

    def current(self) -> Any:
        return self.source.policy if self._file else self.source


class _Shared:
    """What every connection of one sidecar uses."""

    def __init__(
        self,
        *,
        gate: Gate,
        policy: _PolicySource,
        verifier: Any,
        pool: Pool,
        tracker: Tracker,
        trust_domain: str,
        target: str,
        max_age: float,
        hellos: weakref.WeakKeyDictionary[Any, float],
    ) -> None:
        self.gate = gate
        self.policy = policy
        self.verifier = verifier
        self.pool = pool
        self.tracker = tracker
        self.trust_domain = trust_domain
        self.base = f"http://{target}"
        self.max_age = max_age
        self.hellos = hellos
        self.connections: set[_InboundProtocol] = set()
        self.draining = False
        self._encoded: dict[x509.Certificate, bytes] = {}
        self._statuses: dict[int, Any] = {}
        requests = tracker.metrics.requests
        self._requests = requests

    def client_cert(self, cert: x509.Certificate) -> bytes:
        """The ``Client-Cert`` value, encoded once per certificate (callers reuse theirs)."""
        value = self._encoded.get(cert)
        if value is None:
            if len(self._encoded) >= _ENCODED_CACHE:
                self._encoded.clear()
            value = self._encoded[cert] = forwarded_certificate_header(cert).encode()
        return value

    def answered(self, status: int) -> None:
        child = self._statuses.get(status)
        if child is None:
            child = self._statuses[status] = self._requests.labels(str(status))
        child.inc()


class _InboundProtocol(asyncio.Protocol):
    """One caller's connection: parse, check, relay, answer; requests in order."""

    def __init__(self, shared: _Shared) -> None:
        self.s = shared
        self.transport: asyncio.Transport | None = None
        self.conn: Connection | None = None
        self.der: bytes | None = None
        self.client_ip = b""
        self.parser = httptools.HttpRequestParser(self)
        self.current: _Request | None = None
        self.queue: collections.deque[_Request] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.decisions = _Decisions()
        self.head_bytes = 0
        self.closing = False
        self.lost = False
        self.stopped = False
        self._paused = 0
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        # Timers are armed rarely, not per request: the idle check re-arms itself for the
        # rest of the keep-alive time, and the head timer starts only when a head is split
        # over several reads.
        self._idle_timer: asyncio.TimerHandle | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._head_started = 0.0
        self._problem: _Problem | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's transport (uvloop's TLS transport is no asyncio.Transport).
        self.transport = transport  # type: ignore[assignment]
        shared = self.s
        shared.connections.add(self)
        peer = transport.get_extra_info("peername")
        shown = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        self.client_ip = str(peer[0]).encode() if isinstance(peer, tuple) else b""
        conn = self.conn = Connection(_MODE, shown)
        tracker = shared.tracker
        tracker.opened(conn)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            hello = shared.hellos.pop(ssl_object, None)
            if hello is not None:
                tracker.metrics.handshake.labels(_MODE).observe(time.perf_counter() - hello)
            self.der = ssl_object.getpeercert(binary_form=True)
            try:
                identity = peer_identity(self.der, shared.trust_domain)
            except VerificationError:
                pass  # the gate refuses its requests, with the reason
            else:
                conn.peer_id = identity.spiffe_id.uri
                conn.serial = identity.certificate.serial_number
                tracker.identified(conn)
        loop = asyncio.get_running_loop()
        self._idle_since = loop.time()
        self._idle_timer = loop.call_later(KEEP_ALIVE, self._idle_check)
        if shared.draining:
            self.shutdown()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None:
            self.s.tracker.count(conn, received=len(data))
        if self.stopped:
            return
        try:
            self.parser.feed_data(data)
            request = self.current
            if request is not None and not request.queued and self._head_timer is None:
                # A head split over reads: it gets HEAD_TIMEOUT from its first byte.
                loop = asyncio.get_running_loop()
                left = HEAD_TIMEOUT - (loop.time() - self._head_started)
                self._head_timer = loop.call_later(max(left, 0.0), self._head_timeout)
        except httptools.HttpParserUpgrade:
            # Not relayed as an upgrade: the request went to the queue as a plain one (its
            # Upgrade and Connection headers are hop-by-hop); the connection closes after
            # its answer, and nothing after the head is read.
            self._stop()
        except httptools.HttpParserError as exc:
            self._stop()
            problem = self._problem or _Problem(
                400,
                "bad_request",
                "Malformed request: send valid HTTP/1.1",
                f"The request could not be parsed: {exc}.",
            )
            request = self.current
            if request is not None and request.queued:
                # The head was fine, the body is not (a bad chunk): the relay fails.
                request.error = problem
                request.wake()
            else:
                self._refuse_next(problem)

    def eof_received(self) -> bool | None:
        request = self.current
        if request is not None and not request.complete:
            request.error = _ClientLeft()
            request.wake()
        self._stop()
        return None  # TLS has no half-close: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        for timer in (self._idle_timer, self._head_timer):
            if timer is not None:
                timer.cancel()
        self.s.connections.discard(self)
        for request in (self.current, *self.queue):
            if request is not None:
                request.error = _ClientLeft()
                request.wake()
        if self.task is not None:
            self.task.cancel()
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)
        if self.conn is not None:
            self.s.tracker.closed(self.conn)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = _Request()
        self.head_bytes = 0
        self._head_started = asyncio.get_running_loop().time()

    def on_url(self, url: bytes) -> None:
        request = self.current
        assert request is not None  # noqa: S101 - after on_message_begin
        request.target += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.current
        assert request is not None  # noqa: S101 - after on_message_begin
        self._count_head(len(name) + len(value) + 4)
        request.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.current
        assert request is not None  # noqa: S101 - after on_message_begin
        parser = self.parser
        request.method = parser.get_method()
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        try:
            self._framing(request)
        except _Problem as problem:
            self._problem = problem
            raise
        if request.length is not None and request.length > MAX_BODY:
            request.problem = _Problem(
                413,
                "body_too_large",
                "Request body too large",
                f"The request body is larger than {MAX_BODY} bytes. Send a smaller body.",
            )
            self._stop()
        request.queued = True
        self.queue.append(request)
        if len(self.queue) > MAX_PIPELINED:
            self._pause(_PAUSE_PIPELINE)
        if self.task is None:
            self.task = asyncio.ensure_future(self._serve())

    def on_body(self, body: bytes) -> None:
        request = self.current
        assert request is not None  # noqa: S101 - after on_message_begin
        request.size += len(body)
        if request.size > MAX_BODY:
            request.error = _BodyTooLarge()
            request.chunks.clear()
            self._stop()
            request.wake()
            return
        request.chunks.append(body)
        request.buffered += len(body)
        if request.buffered > _READ_HIGH:
            self._pause(_PAUSE_BODY)
        request.wake()

    def on_message_complete(self) -> None:
        request = self.current
        if request is not None:
            self._finish_message(request)
        if request is not None and not request.keep_alive:
            self._stop()

    # -- parsing helpers --------------------------------------------------------------

    def _finish_message(self, request: _Request) -> None:
        request.complete = True
        self.current = None
        request.wake()

    def _count_head(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD:
            self._problem = _Problem(
                431,
                "head_too_large",
                "Request head too large",
                f"The request line and headers are larger than {MAX_HEAD} bytes.",
            )
            raise self._problem

    @staticmethod
    def _framing(request: _Request) -> None:
        lengths: set[bytes] = set()
        codings: list[bytes] = []
        for name, value in request.headers:
            lower = name.lower()
            if lower == b"content-length":
                lengths.add(value.strip())
            elif lower == b"transfer-encoding":
                codings += (c.strip().lower() for c in value.split(b","))
            elif lower == b"expect":
                if value.strip().lower() != b"100-continue":
                    raise _Problem(
                        417,
                        "expectation_failed",
                        "Expectation not supported: only 100-continue is",
                        f"The Expect value {value.decode('latin-1')!r} is not supported.",
                    )
                request.expect = True
        if lengths and codings:
            raise _Problem(
                400,
                "ambiguous_framing",
                "Content-Length and Transfer-Encoding together: send one of them",
                "The request carries both Content-Length and Transfer-Encoding, which "
                "proxies and apps may read differently (request smuggling); it is refused.",
            )
        if codings:
            if codings != [b"chunked"]:
                raise _Problem(
                    400,
                    "unsupported_transfer_coding",
                    "Unsupported Transfer-Encoding: send chunked or a Content-Length",
                    f"Transfer-Encoding {b', '.join(codings).decode('latin-1')!r} is not "
                    f"accepted; only 'chunked' is.",
                )
            request.chunked = True
        if lengths:
            if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
                raise _Problem(
                    400,
                    "bad_content_length",
                    "Invalid Content-Length: send one decimal length",
                    "The request carries several or non-numeric Content-Length values.",
                )
            request.length = int(next(iter(lengths)))

    def _refuse_next(self, problem: _Problem) -> None:
        """Answer ``problem`` after what is in flight, then close."""
        refused = _Request()
        refused.problem = problem
        refused.complete = True
        refused.keep_alive = False
        self.current = None
        self.queue.append(refused)
        if self.task is None:
            self.task = asyncio.ensure_future(self._serve())

    def _stop(self) -> None:
        """Parse nothing more from this connection (it closes after its answers)."""
        self.stopped = True
        self.closing = True
        self._pause(_PAUSE_STOPPED)

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None and not self.lost:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self.lost:
            self.transport.resume_reading()

    # -- timers -----------------------------------------------------------------------

    def _idle_check(self) -> None:
        """Close a connection idle (nothing in flight, no head begun) for KEEP_ALIVE s."""
        self._idle_timer = None
        if self.lost:
            return
        loop = asyncio.get_running_loop()
        busy = self.task is not None or self.current is not None or bool(self.queue)
        idle = 0.0 if busy else loop.time() - self._idle_since
        if idle >= KEEP_ALIVE:
            self._close()
            return
        self._idle_timer = loop.call_later(KEEP_ALIVE - idle, self._idle_check)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.current is not None and not self.lost:
            self._stop()
            self._refuse_next(
                _Problem(
                    408,
                    "head_timeout",
                    "Request head too slow",
                    f"The request line and headers did not arrive within {HEAD_TIMEOUT:g}s.",
                )
            )

    # -- answering --------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.lost:
            raise _ClientLeft()
        transport.write(data)

    async def drain(self) -> None:
        while self._write_paused and not self.lost:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        if self.lost:
            raise _ClientLeft()

    def _close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()

    def shutdown(self) -> None:
        """Stop this connection for a drain: close it now when idle, else after its
        answer; a closed connection is aborted :data:`IDLE_ABORT` seconds later (a pooled
        client never sends its close_notify until it reads again)."""
        self.closing = True
        if self.task is None and not self.queue:
            self._stop()
            self._close()
        self._reap()

    def _reap(self) -> None:
        if self.lost:
            return
        loop = asyncio.get_running_loop()
        if self.transport is not None and self.transport.is_closing():
            loop.call_later(IDLE_ABORT, self._abort)
        else:
            loop.call_later(0.1, self._reap)

    def _abort(self) -> None:
        if not self.lost and self.transport is not None:
            self.transport.abort()

    async def _serve(self) -> None:
        try:
            while self.queue and not self.lost:
                request = self.queue.popleft()
                if self._paused & _PAUSE_PIPELINE and len(self.queue) <= MAX_PIPELINED // 2:
                    self._resume(_PAUSE_PIPELINE)
                await self._answer(request)
                if not request.complete or not request.keep_alive:
                    self.closing = True
                if self.closing:
                    break
        except _ClientLeft:
            pass
        except asyncio.CancelledError:
            if not self.lost:
                raise
        except Exception:  # a bug must cost one connection, not the process
            log.exception("inbound-http: answering a request failed")
            self.closing = True
        finally:
            self.task = None
        if self.lost:
            return
        if self.closing:
            self._stop()
            self._close()
        else:
            self._idle_since = asyncio.get_running_loop().time()

    async def _answer(self, request: _Request) -> None:
        if request.problem is not None and request.problem.status != 413:
            self._send_problem(request.problem)
            self.closing = True
            return
        shared = self.s
        gate = shared.gate
        conn = self.conn
        assert conn is not None  # noqa: S101 - set in connection_made
        method = request.method.decode("latin-1")
        target = request.target
        if not target.startswith(b"/"):
            origin_form = self._origin_form(target)
            if origin_form is None:
                self._send_problem(
                    _Problem(
                        400,
                        "bad_request_target",
                        "Invalid request target: send a path such as /items",
                        f"The request target {request.target[:200].decode('latin-1')!r} is "
                        f"not a path.",
                    )
                )
                self.closing = True
                return
            target = origin_form
        raw_path = target.partition(b"?")[0].decode("latin-1")
        caller = None
        user = None
        kept: list[tuple[bytes, bytes]] = []
        try:
            caller = gate.caller_from_peer(self.der)
            named: set[bytes] | None = None
            authorization: list[str] = []
            headers = request.headers
            for name, value in headers:
                lower = name.lower()
                if lower == b"connection":
                    named = named or set()
                    named.update(t.strip().lower() for t in value.split(b","))
            for name, value in headers:
                lower = name.lower()
                if lower in _REQUEST_HOP or (named is not None and lower in named):
                    continue
                if is_spoofable(name):
                    continue
                if lower == b"authorization":
                    authorization.append(value.decode("latin-1"))
                kept.append((name, value))
            token = gate.bearer_token(authorization)
            if token is not None and shared.verifier is not None:
                from trustmesh.tokens import InvalidTokenError

                try:
                    user = await shared.verifier.verify_access_token(
                        token, client_cert=caller.certificate
                    )
                except InvalidTokenError as exc:
                    raise gate.token_refusal(exc) from None
                gate.check_scopes(user)
            decision = self._decide(caller, user, method, raw_path)
        except Refusal as refusal:
            gate.log_decision(
                method=method,
                path=_decoded(raw_path),
                caller=caller,
                peer=caller,
                user=user,
                decision=None,
                refusal=refusal,
            )
            self._send_refusal(refusal, close=refusal.close or not request.complete)
            return
        gate.log_decision(
            method=method,
            path=raw_path,
            caller=caller,
            peer=caller,
            user=user,
            decision=decision,
            refusal=None,
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "allow %s %s from %s: %s",
                method,
                raw_path,
                caller,
                decision.reason if decision is not None else "no policy configured",
                extra={"event": "proxy_request_allowed", "connection": conn.id},
            )
        if request.problem is not None:  # 413 by Content-Length, after the checks
            self._send_problem(request.problem)
            self.closing = True
            return
        kept.append((_CALLER, caller.spiffe_id.uri.encode()))
        if caller.certificate is not None:
            kept.append((_CLIENT_CERT, shared.client_cert(caller.certificate)))
        if self.client_ip:
            kept.append((b"x-forwarded-for", self.client_ip))
        kept.append((b"x-forwarded-proto", b"https"))
        if conn.age() > shared.max_age:
            self.closing = True
            conn.close_reason = "max_connection_age"
        await self._relay(request, target, kept)

    def _decide(self, caller: Any, user: Any, method: str, path: str) -> Any:
        """The gate's policy decision; an allowed one without a token is remembered for
        this connection while the policy object in force stays the same (a reloaded file
        is a new object), so the next request for it skips the policy. Refusals are never
        remembered: each is decided, logged and counted again."""
        gate = self.s.gate
        if user is not None:
            return gate.decide(caller, user, method, path)
        decisions = self.decisions
        current = self.s.policy.current()
        if decisions.policy is not current:
            decisions.clear()
            decisions.policy = current
        key = (caller.spiffe_id.uri, method, path)
        decision = decisions.get(key)
        if decision is None:
            decision = gate.decide(caller, user, method, path)
            if len(decisions) < _DECISIONS:
                decisions[key] = decision
        return decision

    @staticmethod
    def _origin_form(target: bytes) -> bytes | None:
        if target == b"*":
            return None
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            return None
        path = url.path or b"/"
        return path + b"?" + url.query if url.query else path

    async def _relay(
        self, request: _Request, target: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        shared = self.s
        body: bytes | AsyncIterator[bytes] | None
        if not request.chunked and not request.length:
            body = None
        elif request.complete and request.size <= _SMALL_BODY and request.error is None:
            body = b"".join(request.chunks)
            request.chunks.clear()
            request.buffered = 0
        else:
            if request.expect and not request.complete and request.version == "1.1":
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = self._body(request)
        try:
            response = await shared.pool.request(
                request.method, target, headers, body, timeout=None
            )
        except Http1Error as exc:
            log.error(
                "%s %s from %s: the app at %s failed: %s",
                request.method.decode("latin-1"),
                target.partition(b"?")[0].decode("latin-1"),
                self.conn.peer_id if self.conn is not None else "?",
                shared.base,
                exc,
                extra={"event": "proxy_app_failed", "reason": exc.reason},
            )
            self._send_problem(
                _Problem(
                    exc.status,
                    exc.reason,
                    "The service behind the sidecar did not answer",
                    f"{target.decode('latin-1')[:200]}: {exc} Check that the app listens on "
                    f"{shared.base}.",
                )
            )
            return
        except _Problem as problem:  # the body broke off mid-way (a bad chunk)
            self._send_problem(problem)
            self.closing = True
            return
        except _BodyTooLarge:
            self._send_problem(
                _Problem(
                    413,
                    "body_too_large",
                    "Request body too large",
                    f"The request body is larger than {MAX_BODY} bytes. Send a smaller body.",
                )
            )
            self.closing = True
            return
        try:
            await self._respond(request, response)
        finally:
            await response.aclose()

    async def _body(self, request: _Request) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        chunks = request.chunks
        while True:
            if chunks:
                piece = chunks.popleft()
                request.buffered -= len(piece)
                if self._paused & _PAUSE_BODY and request.buffered <= _READ_HIGH // 2:
                    self._resume(_PAUSE_BODY)
                yield piece
                continue
            if request.error is not None:
                raise request.error
            if request.complete:
                return
            request.waiter = loop.create_future()
            try:
                await request.waiter
            finally:
                request.waiter = None

    async def _respond(self, request: _Request, response: Any) -> None:
        shared = self.s
        status: int = response.status
        named: set[bytes] = set()
        for name, value in response.headers:
            if name.lower() == b"connection":
                named.update(t.strip().lower() for t in value.split(b","))
        parts = [_status_line(status)]
        has_length = False
        for name, value in response.headers:
            lower = name.lower()
            if lower in _HOP or lower in named:
                continue
            if lower == b"content-length":
                has_length = True
            parts += (name, b": ", value, b"\r\n")
        no_body = request.method == b"HEAD" or status in _NO_BODY_STATUS or status < 200
        chunked = False
        if not no_body and not has_length:
            if request.version == "1.1":
                chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                self.closing = True
        if self.closing or not request.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        stream = response.aiter_bytes()
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            shared.answered(status)
            self._send(head + (b"0\r\n\r\n" if chunked else b""), 0)
            return
        except Http1Error as exc:
            log.error(
                "%s %s: the app at %s failed: %s",
                request.method.decode("latin-1"),
                request.target.decode("latin-1")[:200],
                shared.base,
                exc,
                extra={"event": "proxy_app_failed", "reason": exc.reason},
            )
            self._send_problem(
                _Problem(
                    exc.status,
                    exc.reason,
                    "The service behind the sidecar did not answer",
                    f"{exc} Check that the app listens on {shared.base}.",
                )
            )
            return
        shared.answered(status)
        if chunked:
            self._send(head + b"%x\r\n%b\r\n" % (len(first), first), len(first))
        else:
            self._send(head + first, len(first))
        try:
            async for piece in stream:
                if chunked:
                    self._send(b"%x\r\n%b\r\n" % (len(piece), piece), len(piece))
                else:
                    self._send(piece, len(piece))
                if self._write_paused:
                    await self.drain()
        except Http1Error as exc:
            log.warning(
                "relay: %s%s failed while its response was streaming (%s: %s); the client's "
                "connection is cut",
                shared.base,
                request.target.decode("latin-1")[:200],
                type(exc).__name__,
                exc,
                extra={"event": "relay_aborted", "upstream": shared.base},
            )
            self._stop()
            if self.transport is not None:
                self.transport.abort()
            raise _ClientLeft() from None
        if chunked:
            self._send(b"0\r\n\r\n", 0)

    def _send(self, data: bytes, body: int) -> None:
        """Write to the caller; ``body`` response body bytes of it are counted as sent."""
        self.write(data)
        if self.conn is not None:
            self.s.tracker.count(self.conn, sent=body)

    def _send_problem(self, problem: _Problem) -> None:
        body = problem_document(
            problem.status, problem.title, problem.detail, reason=problem.reason
        )
        close = self.closing or problem.status in (400, 408, 413, 417, 431, 405)
        if close:
            self.closing = True
        self._send_answer(
            problem.status,
            [
                (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                (b"content-length", b"%d" % len(body)),
            ],
            body,
        )

    def _send_refusal(self, refusal: Refusal, *, close: bool) -> None:
        if close:
            self.closing = True
        headers = [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in refusal.response_headers()
        ]
        if any(k == b"connection" for k, _ in headers):
            self.closing = True
            headers = [(k, v) for k, v in headers if k != b"connection"]
        self._send_answer(refusal.status, headers, refusal.body())

    def _send_answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        parts = [_status_line(status)]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if self.closing:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", body)
        self.s.answered(status)
        self._send(b"".join(parts), len(body))


def _decoded(raw_path: str) -> str:
    from urllib.parse import unquote

    return unquote(raw_path)


def serve_inbound_http(sidecar: Sidecar, ready: Callable[[str], None] | None) -> None:
    """Serve HTTP mode until SIGTERM/SIGINT, then drain (``--drain-timeout``)."""
    asyncio.run(_serve(sidecar, ready))


async def _serve(sidecar: Sidecar, ready: Callable[[str], None] | None) -> None:
    settings = sidecar.settings
    assert isinstance(settings, InboundSettings)  # noqa: S101 - internal contract
    credentials = sidecar.credentials
    tracker = sidecar.tracker()
    if settings.policy is not None:
        from trustmesh.policy import PolicyFile

        source: Any = PolicyFile(settings.policy)
    else:
        from ._callers import allow_ids_policy

        source = allow_ids_policy(settings.allow_ids)
    policy = _PolicySource(source)
    verifier = None
    if settings.issuer is not None:
        from trustmesh.tokens import AsyncVerifier, IssuerConfig

        verifier = AsyncVerifier(
            IssuerConfig(
                settings.issuer,
                audiences=tuple(settings.audiences),
                ca_bundle=settings.cert_dir / "bundle.pem",
            )
        )
    # No read timeout to the app: it decides how long it takes (long polls, streams);
    # the caller's own timeouts apply.
    app_host, app_port = parse_target(settings.to)
    pool = Pool(
        app_host,
        app_port,
        max_connections=POOL_SIZE,
        connect_timeout=APP_CONNECT_TIMEOUT,
        idle_timeout=APP_IDLE,
    )
    gate = Gate(
        trust_domain=sidecar.trust_domain,
        policy=source,
        revocation=sidecar.revocation,
        require_token=settings.require_token,
        required_scopes=(),
        trusted_proxies=(),
        trust_bundle=[*credentials.roots, *credentials.intermediates()],
        has_verifier=verifier is not None,
        log_allowed=False,  # one line per connection and per refusal, not per request
        kind="ASGI",
        metrics_registry=sidecar.metrics.registry,
    )
    listener = credentials.server_context()
    hellos: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
    switch = listener.sni_callback

    def on_hello(ssl_object: Any, server_name: str | None, ctx: ssl.SSLContext) -> Any:
        hellos[ssl_object] = time.perf_counter()
        # server_name is None without SNI, which typeshed does not allow for.
        return switch(ssl_object, server_name, ctx) if switch is not None else None  # type: ignore[arg-type]

    listener.sni_callback = on_hello
    shared = _Shared(
        gate=gate,
        policy=policy,
        verifier=verifier,
        pool=pool,
        tracker=tracker,
        trust_domain=sidecar.trust_domain,
        target=settings.to,
        max_age=settings.max_connection_age,
        hellos=hellos,
    )
    host, port = parse_listen(settings.listen)
    log_refused_handshakes()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
    description = f"inbound on {public_url(host, port)} (HTTP mode) to http://{settings.to}"
    try:
        try:
            server = await loop.create_server(
                lambda: _InboundProtocol(shared), host, port, ssl=listener, backlog=1024
            )
        except OSError as exc:
            raise TrustmeshError(
                f"trustmesh proxy could not listen on {settings.listen} ({exc.strerror}): "
                f"is the port in use? Pick another --listen."
            ) from None
        log.info("%s as %s", description, credentials.spiffe_id, extra={"event": "proxy_started"})
        if ready is not None:
            ready(description)
        await stop.wait()
        server.close()
        shared.draining = True
        for protocol in list(shared.connections):
            protocol.shutdown()
        await _drain(shared, settings.drain_timeout)
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        await pool.aclose()
        if verifier is not None:
            await verifier.aclose()


async def _drain(shared: _Shared, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for open connections to finish, then cut the rest."""
    deadline = time.monotonic() + max(timeout, 0.0)
    while shared.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for protocol in list(shared.connections):
        if protocol.conn is not None and protocol.conn.close_reason is None:
            protocol.conn.close_reason = "drain_timeout"
        protocol._abort()
    for _ in range(3):  # let connection_lost run (and log)
        await asyncio.sleep(0)
