"""What every trustmesh HTTPS server shares: the listen address, its own identity, its URL,
and running it on uvicorn with the TLS shim."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE

from trustmesh.addresses import LATENCY_BUCKETS, is_loopback, parse_listen, public_url
from trustmesh.authority import CertificateAuthority
from trustmesh.errors import ConfigError, TrustmeshError
from trustmesh.files import atomic_write
from trustmesh.pki import dump_private_key, pem_certificates
from trustmesh.tls import TLSHttpToolsProtocol, log_refused_handshakes, server_context

__all__ = [
    "LATENCY_BUCKETS",
    "Keeper",
    "RevocationCollector",
    "TimedApp",
    "check_metrics_listen",
    "is_loopback",
    "issue_server_identity",
    "metrics_app",
    "parse_listen",
    "public_url",
    "run_https",
    "start_keeper",
    "start_server",
    "stop_keeper",
    "uvicorn_config",
]

log = logging.getLogger("trustmesh.serving")

#: Keeps identity files fresh until the event is set (e.g. the agent's loop).
Keeper = Callable[[threading.Event], None]


def issue_server_identity(
    ca: CertificateAuthority,
    host: str,
    directory: Path,
    *,
    path: str,
    actor: str = "ca-server",
    ttl: timedelta | None = None,
) -> tuple[Path, Path]:
    """Issue a server's own certificate (SPIFFE ID path ``path``) into ``directory``.

    It names ``localhost``, ``127.0.0.1`` and the listen address; the key is mode 0600.
    ``ttl``: its lifetime (default: 7 days, capped by the default profile's max_ttl).
    Returns the chain and key paths.
    """
    ips: list[str] = []
    try:
        address = ipaddress.ip_address(host)
        if not address.is_unspecified:
            ips.append(host)
    except ValueError:
        pass
    dns = ["localhost"]
    if not ips and host not in {"localhost", "0.0.0.0", "::"}:  # noqa: S104 - names only
        dns.append(host)
    ips.append("127.0.0.1") if "127.0.0.1" not in ips else None
    issued = ca.issue(
        f"spiffe://{ca.config.trust_domain}{path}",
        dns=dns,
        ips=ips,
        ttl=ttl or min(timedelta(days=7), ca.config.profile(None).max_ttl),
        actor=actor,
    )
    assert issued.key is not None  # noqa: S101 - issue() always generates one
    chain, key = directory / "chain.pem", directory / "key.pem"
    atomic_write(key, dump_private_key(issued.key), mode=0o600)
    atomic_write(chain, pem_certificates(issued.chain))
    return chain, key


def uvicorn_config(app: Any, **options: Any) -> uvicorn.Config:
    """``uvicorn.Config(app, **options)`` for every trustmesh server: uvicorn's own logging
    setup off, so its records ("Started server process", errors) go through the handler
    :func:`trustmesh.logs.configure_logging` installed, JSON lines included.
    """
    return uvicorn.Config(app, log_config=None, **options)


def _exit_cleanly(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def run_https(
    app: Any,
    *,
    listen: str,
    chain: Path,
    key: Path,
    roots: str,
    name: str,
    log_level: str = "info",
    context: Callable[[], ssl.SSLContext] | None = None,
    sockets: Sequence[socket.socket] | None = None,
    started: Callable[[], None] | None = None,
    on_exit: Callable[[], None] | None = None,
    ready: Callable[[], None] | None = None,
    protocol: type[asyncio.Protocol] | None = None,
) -> None:
    """Serve ``app`` on uvicorn over HTTPS until SIGINT/SIGTERM, then shut down gracefully.

    Client certificates are requested (verified against ``roots``), not required; the
    TLS shim hands them to the app in the ASGI ``tls`` extension. ``context`` (when
    given) builds the listener context instead, e.g. one whose ``sni_callback``
    swaps in a re-issued certificate. A SIGTERM ends with exit status 0, so
    supervisors see a clean stop. ``sockets`` are already bound listening sockets to
    serve on instead of binding ``listen`` (worker processes); ``started`` is called
    once the server accepts connections (the worker supervisor's signal). ``on_exit`` is
    called (in the signal handler, so it must only schedule work) when the stop begins,
    before uvicorn waits for open connections: endless responses (event streams) end
    there. ``ready`` is called once the socket is bound and the server accepts
    connections (the operator's ready line). ``protocol`` is the HTTP protocol class
    (default :class:`trustmesh.tls.TLSHttpToolsProtocol`; a subclass of it, e.g. one
    serving hot routes without ASGI).

    Raises:
        TrustmeshError: The server could not start (the port is in use, say); the
            message names ``name`` and ``listen``.
    """
    host, port = parse_listen(listen)

    def context_factory(_config: Any, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        if context is not None:
            return context()
        return server_context(chain, key, cadata=roots, client_cert="optional")

    log_refused_handshakes()
    config = uvicorn_config(
        app,
        host=host,
        port=port,
        http=protocol or TLSHttpToolsProtocol,
        # The stdlib event loop, not uvloop: refused handshakes are logged by a hook on
        # asyncio's SSLProtocol (trustmesh.tls.log_refused_handshakes), which uvloop's
        # own TLS transport never calls.
        loop="asyncio",
        ssl_certfile=str(chain),
        ssl_keyfile=str(key),
        ssl_context_factory=context_factory,
        timeout_keep_alive=15,
        timeout_graceful_shutdown=10,
        limit_concurrency=1000,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        # Not uvicorn's default: X-Forwarded-For from 127.0.0.1 would set the client
        # address that per-address rate limits key on.
        proxy_headers=False,
    )
    server = _Server(config, on_exit, ready, started)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it; exit 0 instead of
    # dying by the signal.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        server.run(sockets=None if sockets is None else list(sockets))
    except SystemExit as exc:
        if exc.code == STARTUP_FAILURE and not server.started:
            raise TrustmeshError(
                f"The {name} could not start on {listen} (see the log above): "
                "is the port in use? Pick another --listen."
            ) from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Server(uvicorn.Server):
    """uvicorn's server, calling ``started`` and ``ready`` once it listens and ``on_exit``
    once when SIGINT/SIGTERM begins the stop."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_exit: Callable[[], None] | None,
        ready: Callable[[], None] | None = None,
        started: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._ready = ready
        self._on_started = started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            if self._on_started is not None:
                self._on_started()
            if self._ready is not None:
                self._ready()

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._on_exit is not None and not self.should_exit:
            self._on_exit()
        super().handle_exit(sig, frame)


class BodyTooLarge(Exception):  # noqa: N818 - a refusal, mapped to 413 by each API
    """The request body is (or declares itself) larger than the limit."""


class BodyTimeout(Exception):  # noqa: N818 - a refusal, mapped to 408 by each API
    """The request body did not arrive within the time bound."""


async def read_bounded_body(request: Request, *, limit: int, timeout: float) -> bytes:
    """Read ``request``'s body, at most ``limit`` bytes, within ``timeout`` seconds of the
    head: the one bound every API of ``ca serve`` (``/v1/*``, ACME) puts on bodies.

    Raises:
        BodyTooLarge: ``Content-Length`` says more than ``limit`` (or is not a number),
            or more than ``limit`` bytes arrived.
        BodyTimeout: The body was not complete within ``timeout``.
    """
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout from None
    return b"".join(chunks)


class TimedApp:
    """ASGI wrapper that times every HTTP request and reports it with its status.

    Args:
        app: The Starlette app (its ``state`` and ``routes`` stay reachable).
        observe: Called with ``(method, path, status, seconds)`` after each request
            (a request that raised is reported with status 500).
    """

    def __init__(self, app: Starlette, observe: Callable[[str, str, int, float], None]) -> None:
        self.app = app
        self.observe = observe
        self.state = app.state
        self.routes = app.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            elapsed = time.perf_counter() - start
            self.observe(str(scope.get("method", "")), str(scope.get("path", "")), status, elapsed)


def start_keeper(
    keeper: Keeper | None, stop: threading.Event, *, name: str
) -> threading.Thread | None:
    """Run ``keeper(stop)`` in a daemon thread (None: nothing to run).

    A keeper that dies is logged loudly: the certificate it kept will expire.
    """
    if keeper is None:
        return None

    def keep() -> None:
        try:
            keeper(stop)
        except Exception:
            log.exception(
                "the identity keeper stopped; serving the current certificate until it expires",
                extra={"event": "keeper_failed"},
            )

    thread = threading.Thread(target=keep, name=name, daemon=True)
    thread.start()
    return thread


def stop_keeper(thread: threading.Thread | None, stop: threading.Event) -> None:
    """Ask the keeper to stop and wait a little for it."""
    stop.set()
    if thread is not None:
        thread.join(timeout=10)


# -- the plain-HTTP metrics and health listener -------------------------------------------


def check_metrics_listen(listen: str, *, allow_remote: bool, option: str, allow_flag: str) -> None:
    """Refuse a metrics listener that is not HOST:PORT, or not on loopback unless allowed.

    Raises:
        ConfigError: What is wrong and how to fix it.
    """
    try:
        host, _ = parse_listen(listen)
    except ConfigError:
        raise ConfigError(
            f"{option} {listen!r} is not HOST:PORT, e.g. 127.0.0.1:9464.", field="metrics"
        ) from None
    if not is_loopback(host) and not allow_remote:
        raise ConfigError(
            f"{option} {listen} is not a loopback address: metrics are served over plain "
            f"HTTP to anyone who reaches it. Listen on 127.0.0.1, or pass {allow_flag} if "
            f"the network is yours alone.",
            field="metrics",
        )
    if not is_loopback(host):
        log.warning(
            "metrics are served on %s (%s), which is not a loopback address: anyone who "
            "reaches it can read them",
            listen,
            allow_flag,
            extra={"event": "metrics_remote_listen"},
        )


#: ``(ready, details)``: whether the server is ready, and what ``/readyz`` shows.
Readiness = Callable[[], tuple[bool, Mapping[str, object]]]


def metrics_app(render: Callable[[], bytes], *, readiness: Readiness | None = None) -> Any:
    """A tiny ASGI app for a plain-HTTP side listener: ``GET /metrics`` answers
    ``render()`` (Prometheus text); with ``readiness``, ``GET /healthz`` answers 200 while
    the process runs and ``GET /readyz`` 200 or 503 with the details; anything else 404.
    """
    paths = "GET /metrics" + (", /healthz, /readyz" if readiness is not None else "")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # served with lifespan off
            return
        path, method = scope["path"], scope["method"]
        status, kind = 200, b"application/json"
        if method not in ("GET", "HEAD"):
            body, status, kind = f"not found: {paths}\n".encode(), 404, b"text/plain"
        elif path == "/metrics":
            body, kind = render(), CONTENT_TYPE_LATEST.encode()
        elif path == "/healthz" and readiness is not None:
            body = b'{"status": "ok"}'
        elif path == "/readyz" and readiness is not None:
            ready, details = readiness()
            status = 200 if ready else 503
            body = json.dumps({"status": "ready" if ready else "not ready", **details}).encode()
        else:
            body, status, kind = f"not found: {paths}\n".encode(), 404, b"text/plain"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", kind),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body if method == "GET" else b""})

    return app


class RevocationCollector(Collector):
    """Export a revocation set's counters (``RevocationSet.metrics``) as gauges named
    ``{prefix}_{name}``."""

    def __init__(self, source: Callable[[], Mapping[str, float]], prefix: str) -> None:
        self._source = source
        self._prefix = prefix

    def collect(self) -> Any:
        for name, value in self._source().items():
            yield GaugeMetricFamily(
                f"{self._prefix}_{name}",
                f"Revocation set: {name.replace('_', ' ')}.",
                value=value,
            )


async def start_server(server: uvicorn.Server) -> None:
    """Start ``server`` in the running loop without its signal handlers (for a side
    listener next to the main one); ``server.started`` tells whether it listens.
    Stop it with ``await server.shutdown()``."""
    config = server.config
    if not config.loaded:
        config.load()
    server.lifespan = config.lifespan_class(config)
    try:
        await server.startup()
    except SystemExit:
        server.started = False
