"""HTTP mode of ``proxy inbound``: uvicorn with the TLS shim, the identity middleware
(caller, revocation, token and policy per request), and a forwarder that relays each
allowed request to the plain app over a keep-alive pool with headers the app can trust.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import threading
import time
import weakref
from collections.abc import Callable, MutableMapping
from functools import partial
from types import FrameType
from typing import Any

import uvicorn
from cryptography import x509

from trustmesh.errors import TrustmeshError, VerificationError
from trustmesh.headers import is_spoofable
from trustmesh.http1 import Pool
from trustmesh.middleware import (
    FORWARDED_CALLER_HEADER,
    FORWARDED_CERT_HEADER,
    MTLSMiddleware,
    RequestIdentity,
    forwarded_certificate_header,
)
from trustmesh.policy import PolicyFile
from trustmesh.relay import (
    BodyTooLarge,
    ClientDisconnected,
    UpstreamError,
    forward_headers,
    relay,
    send_problem,
)
from trustmesh.serving import parse_listen, public_url, uvicorn_config
from trustmesh.tls import TLSHttpToolsProtocol, log_refused_handshakes
from trustmesh.tokens import AsyncVerifier, IssuerConfig

from ._callers import allow_ids_policy
from ._sidecar import (
    Connection,
    InboundSettings,
    Sidecar,
    Tracker,
    parse_target,
    peer_identity,
)

__all__ = ["serve_inbound_http"]

log = logging.getLogger("trustmesh.proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]

#: The ASGI scope extension that carries the sidecar's view of the connection.
CONNECTION_EXTENSION = "trustmesh.connection"
#: Largest request body relayed to the app.
MAX_BODY = 64 * 1024 * 1024
#: Connections to the app open at once (more requests wait for one); idle ones close
#: after :data:`APP_IDLE` seconds.
POOL_SIZE = 1024
APP_IDLE = 30.0
#: Seconds to connect to the app.
APP_CONNECT_TIMEOUT = 10.0
#: Seconds an idle keep-alive connection from a caller stays open.
KEEP_ALIVE = 15

#: Seconds a closed, idle connection may wait for the client's close_notify in a drain.
IDLE_ABORT = 1.0

_MODE = "inbound-http"
_CLIENT_CERT = FORWARDED_CERT_HEADER.encode()
_ENCODED_CACHE = 1024


class _ConnectionApp:
    """Adds the connection to each request's scope (extension ``trustmesh.connection``)."""

    def __init__(self, app: Any, conn: Connection) -> None:
        self.app = app
        self.conn = conn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["extensions"] = {**scope.get("extensions", {}), CONNECTION_EXTENSION: self.conn}
        await self.app(scope, receive, send)


class _SidecarProtocol(TLSHttpToolsProtocol):
    """uvicorn's protocol with the TLS shim, plus the sidecar's connection bookkeeping:
    open/close logs, the active gauge, the handshake histogram."""

    def __init__(
        self,
        *args: Any,
        tracker: Tracker,
        trust_domain: str,
        hellos: weakref.WeakKeyDictionary[Any, float],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._tracker = tracker
        self._trust_domain = trust_domain
        self._hellos = hellos
        self._conn: Connection | None = None
        self._lost = False

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        shown = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        conn = self._conn = Connection(_MODE, shown)
        tracker = self._tracker
        tracker.opened(conn)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            hello = self._hellos.pop(ssl_object, None)
            if hello is not None:
                tracker.metrics.handshake.labels(_MODE).observe(time.perf_counter() - hello)
            try:
                identity = peer_identity(
                    ssl_object.getpeercert(binary_form=True), self._trust_domain
                )
            except VerificationError:
                pass  # the middleware refuses its requests, with the reason
            else:
                conn.peer_id = identity.spiffe_id.uri
                conn.serial = identity.certificate.serial_number
                tracker.identified(conn)
        self.app = _ConnectionApp(self.app, conn)

    def data_received(self, data: bytes) -> None:
        if self._conn is not None:
            self._tracker.count(self._conn, received=len(data))
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        super().connection_lost(exc)
        if self._conn is not None:
            self._tracker.closed(self._conn)

    def shutdown(self) -> None:
        """Stop this connection for a drain without waiting on idle clients.

        uvicorn closes an idle connection, and a busy one once its response is complete.
        A TLS close then waits up to 30 s for the client's close_notify, which an idle
        pooled client never sends until it reads again: the drain would always last its
        whole timeout. A connection with nothing in flight is aborted
        :data:`IDLE_ABORT` seconds after its close instead.
        """
        super().shutdown()
        self._reap()

    def _reap(self) -> None:
        if self._lost:
            return
        cycle = self.cycle
        idle = cycle is None or cycle.response_complete
        loop = asyncio.get_running_loop()
        if idle and self.transport.is_closing():
            loop.call_later(IDLE_ABORT, self._abort)
        else:
            loop.call_later(0.1, self._reap)

    def _abort(self) -> None:
        if not self._lost:
            self.transport.abort()


class Forwarder:
    """The ASGI app behind the middleware: relay the allowed request to the plain app.

    Incoming headers only a trusted hop may set are removed, the same list the gateway
    strips (:mod:`trustmesh.headers`): identity headers (``X-Trustmesh-*``, ``Client-Cert``),
    client addresses (``X-Forwarded-*``, ``Forwarded``, ``X-Real-IP``, ``True-Client-IP``,
    ...) and request-line overrides (``X-Original-URL``, ``X-Rewrite-URL``,
    ``X-HTTP-Method-Override``, ...) that would steer the app past the policy, which
    decided on the method and path. ``X-Trustmesh-Caller``, ``Client-Cert`` (RFC 9440),
    ``X-Forwarded-For`` and ``X-Forwarded-Proto`` are set from the verified connection.
    """

    def __init__(self, target: str, pool: Pool, tracker: Tracker, max_age: float) -> None:
        self.base = f"http://{target}"
        self._encoded: dict[x509.Certificate, bytes] = {}
        self.pool = pool
        self.tracker = tracker
        self.max_age = max_age

    def _client_cert(self, cert: x509.Certificate) -> bytes:
        """The ``Client-Cert`` value, encoded once per certificate (callers reuse theirs)."""
        value = self._encoded.get(cert)
        if value is None:
            if len(self._encoded) >= _ENCODED_CACHE:
                self._encoded.clear()
            value = self._encoded[cert] = forwarded_certificate_header(cert).encode()
        return value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # websockets are not relayed: refuse the handshake
            await send({"type": "websocket.close", "code": 1003, "reason": "not relayed"})
            return
        identity: RequestIdentity = scope["trustmesh"]
        conn: Connection | None = (scope.get("extensions") or {}).get(CONNECTION_EXTENSION)
        headers = forward_headers(scope.get("headers", ()), drop=is_spoofable)
        caller = identity.caller
        headers.append((FORWARDED_CALLER_HEADER.encode(), caller.spiffe_id.uri.encode()))
        if caller.certificate is not None:
            headers.append((_CLIENT_CERT, self._client_cert(caller.certificate)))
        client = scope.get("client")
        if client:
            headers.append((b"x-forwarded-for", str(client[0]).encode()))
        headers.append((b"x-forwarded-proto", b"https"))
        extra: list[tuple[bytes, bytes]] = []
        if conn is not None and conn.age() > self.max_age:
            extra.append((b"connection", b"close"))
            conn.close_reason = "max_connection_age"
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string") or b""
        url = raw_path.decode("latin-1")  # the pool knows the origin
        if query:
            url += "?" + query.decode("latin-1")
        try:
            await relay(
                scope,
                receive,
                send,
                client=self.pool,
                url=url,
                headers=headers,
                max_body=MAX_BODY,
                response_headers=extra,
            )
        except UpstreamError as exc:
            log.error(
                "%s %s from %s: the app at %s failed: %s",
                scope["method"],
                scope["path"],
                caller,
                self.base,
                exc,
                extra={"event": "proxy_app_failed", "reason": exc.reason},
            )
            await send_problem(
                send,
                exc.status,
                title="The service behind the sidecar did not answer",
                detail=f"{exc} Check that the app listens on {self.base}.",
                reason=exc.reason,
            )
        except BodyTooLarge as exc:
            await send_problem(
                send,
                413,
                title="Request body too large",
                detail=f"{exc} Send a smaller body.",
                reason="body_too_large",
                headers=[(b"connection", b"close")],
            )
        except ClientDisconnected:
            pass


class _Counted:
    """Counts every answer by status (the middleware's refusals included)."""

    def __init__(self, app: Any, tracker: Tracker) -> None:
        self.app = app
        self.tracker = tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn: Connection | None = (scope.get("extensions") or {}).get(CONNECTION_EXTENSION)
        requests = self.tracker.metrics.requests

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                requests.labels(str(message["status"])).inc()
            elif message["type"] == "http.response.body" and conn is not None:
                self.tracker.count(conn, sent=len(message.get("body", b"")))
            await send(message)

        await self.app(scope, receive, counted)


def _exit_cleanly(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve_inbound_http(sidecar: Sidecar, ready: Callable[[str], None] | None) -> None:
    """Serve HTTP mode until SIGTERM, then let uvicorn drain (``--drain-timeout``)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        asyncio.run(_serve(sidecar, ready))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


async def _serve(sidecar: Sidecar, ready: Callable[[str], None] | None) -> None:
    settings = sidecar.settings
    assert isinstance(settings, InboundSettings)  # noqa: S101 - internal contract
    credentials = sidecar.credentials
    tracker = sidecar.tracker()
    policy: Any = (
        PolicyFile(settings.policy)
        if settings.policy is not None
        else allow_ids_policy(settings.allow_ids)
    )
    issuer = (
        IssuerConfig(
            settings.issuer,
            audiences=tuple(settings.audiences),
            ca_bundle=settings.cert_dir / "bundle.pem",
        )
        if settings.issuer is not None
        else None
    )
    verifier = AsyncVerifier(issuer) if issuer is not None else None
    # The lean HTTP/1.1 pool, not httpx: most of the sidecar's CPU per request was the
    # client stack. No read timeout: the app decides how long it takes (long polls,
    # streams); the caller's own timeouts apply.
    app_host, app_port = parse_target(settings.to)
    client = Pool(
        app_host,
        app_port,
        max_connections=POOL_SIZE,
        connect_timeout=APP_CONNECT_TIMEOUT,
        idle_timeout=APP_IDLE,
    )
    forwarder = Forwarder(settings.to, client, tracker, settings.max_connection_age)
    protected = MTLSMiddleware(
        forwarder,
        trust_domain=sidecar.trust_domain,
        policy=policy,
        revocation=sidecar.revocation,
        verifier=verifier,
        require_token=settings.require_token,
        trust_bundle=[*credentials.roots, *credentials.intermediates()],
        metrics_registry=sidecar.metrics.registry,
        log_allowed=False,  # one line per connection and per refusal, not per request
    )
    app = _Counted(protected, tracker)

    listener = credentials.server_context()
    hellos: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
    switch = listener.sni_callback

    def on_hello(ssl_object: Any, server_name: str | None, ctx: ssl.SSLContext) -> Any:
        hellos[ssl_object] = time.perf_counter()
        # server_name is None without SNI, which typeshed does not allow for.
        return switch(ssl_object, server_name, ctx) if switch is not None else None  # type: ignore[arg-type]

    listener.sni_callback = on_hello

    def context_factory(_config: Any, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return listener

    host, port = parse_listen(settings.listen)
    log_refused_handshakes()
    config = uvicorn_config(
        app,
        host=host,
        port=port,
        http=partial(
            _SidecarProtocol, tracker=tracker, trust_domain=sidecar.trust_domain, hellos=hellos
        ),
        ssl_context_factory=context_factory,
        timeout_keep_alive=KEEP_ALIVE,
        timeout_graceful_shutdown=int(max(1, settings.drain_timeout)),
        log_level="warning",
        access_log=False,
        lifespan="off",
        backlog=1024,
        # The caller's address is the TLS peer's: never taken from X-Forwarded-For.
        proxy_headers=False,
        server_header=False,
    )
    server = uvicorn.Server(config)
    description = f"inbound on {public_url(host, port)} (HTTP mode) to http://{settings.to}"
    try:
        serving = asyncio.ensure_future(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            log.info(
                "%s as %s", description, credentials.spiffe_id, extra={"event": "proxy_started"}
            )
            if ready is not None:
                ready(description)
        try:
            await serving
        except SystemExit:
            if server.started:
                raise
            failed = True
        else:
            failed = not server.started
        if failed:
            raise TrustmeshError(
                f"trustmesh proxy could not listen on {settings.listen} (see the log above): "
                f"is the port in use? Pick another --listen."
            )
    finally:
        await client.aclose()
        if verifier is not None:
            await verifier.aclose()
