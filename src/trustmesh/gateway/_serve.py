"""Running the gateway: listeners, state building, hot reload, and a draining stop.

:class:`Gateway` serves one configuration file in the current event loop: the public
HTTPS listener (uvicorn + httptools, TLS 1.2+, no client certificate requested), the
optional HTTP->HTTPS redirect listener and the optional plain-HTTP metrics listener on
loopback. Every second it looks at the configuration file (and the public certificate
files); a valid new configuration is built and swapped in at once, an invalid one is
logged with its line and key while the old one stays in force. Objects a reload no
longer uses (upstream pools, token verifiers, rate limiters, alerts) are closed once the
requests still using them are done. :meth:`Gateway.stop` (SIGTERM in the CLI) stops
accepting, lets in-flight requests finish, then closes everything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import signal
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from trustmesh.errors import ConfigError
from trustmesh.pki import pem_certificates
from trustmesh.policy import PolicyConfigError, PolicyFile
from trustmesh.problems import PROBLEM_CONTENT_TYPE, problem_document
from trustmesh.serving import (
    Keeper,
    is_loopback,
    metrics_app,
    parse_listen,
    public_url,
    start_keeper,
    start_server,
    stop_keeper,
    uvicorn_config,
)
from trustmesh.tls import TLS12_CIPHERS, RevocationSet, RotatingCredentials
from trustmesh.tokens import IntrospectionConfig, IssuerConfig

from ._addresses import CidrList, TrustedProxies
from ._alerts import AlertRule, Alerts
from ._app import CompiledRoute, GatewayApp, GatewayState
from ._auth import Authenticator, route_policy
from ._config import GatewayConfig, IssuerEntry, RateSpec, RouteConfig, load_config
from ._metrics import GatewayMetrics
from ._ratelimit import Rate, RateLimits
from ._upstream import Credentials, Revocations, UpstreamPool

__all__ = ["Gateway", "PublicCertificate", "build_state", "run_gateway"]

log = logging.getLogger("trustmesh.gateway")

#: Seconds between looks at the configuration and certificate files.
RELOAD_INTERVAL = 1.0
#: Seconds the gateway waits for the revocation feed before it starts serving.
REVOCATION_STARTUP_WAIT = 10.0
#: Seconds in-flight requests get to finish after stop() before they are cut.
DRAIN_TIMEOUT = 10
#: Settings a reload cannot change in a running process (listeners and identity).
_RESTART_ONLY = (
    "listen",
    "tls_cert",
    "tls_key",
    "redirect_http",
    "metrics_listen",
    "id",
    "ca",
    "dns",
    "ips",
    "check_revocation",
    "cert_dir",
)


class PublicCertificate:
    """The public listener's certificate, read from files and reloaded when they change.

    The listener context's ``sni_callback`` hands every new handshake the current
    context, so a renewed certificate applies to new connections without a restart. A
    reload that fails keeps the old certificate and logs why.

    Args:
        chain: PEM certificate chain, leaf first.
        key: PEM private key.
        provided: True for ``tls:`` files, False for the gateway's CA-issued identity
            (then a leaf without DNS/IP names is logged: browsers cannot check it).

    Raises:
        ConfigError: The files cannot be loaded now.
    """

    def __init__(self, chain: Path, key: Path, *, provided: bool) -> None:
        self.chain = chain
        self.key = key
        self.provided = provided
        self._signature = self._stat()
        try:
            self._current = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"Cannot load the public certificate {chain} with key {key}: {exc}. Give a "
                f"PEM chain and its matching key (tls: cert/key).",
                field="tls",
            ) from None
        self._listener = self._build()
        self._listener.sni_callback = self._switch
        self._check_names()

    def context(self) -> ssl.SSLContext:
        """The listener context (give it to the server once)."""
        return self._listener

    def poll(self) -> bool:
        """Reload the files if they changed; True when a new certificate is in use."""
        signature = self._stat()
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            self._current = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error(
                "gateway: the public certificate %s did not reload (%s); still serving the "
                "previous one",
                self.chain,
                exc,
                extra={"event": "public_certificate_reload_failed"},
            )
            return False
        log.info(
            "gateway: public certificate reloaded from %s",
            self.chain,
            extra={"event": "public_certificate_reloaded"},
        )
        self._check_names()
        return True

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in (self.chain, self.key):
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((0, 0, 0))
        return tuple(out)

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(TLS12_CIPHERS)
        ctx.options |= (
            ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
        )
        ctx.verify_mode = ssl.CERT_NONE  # public clients: users, not workloads
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.load_cert_chain(self.chain, self.key)
        return ctx

    def _switch(self, ssl_object: Any, _name: str | None, _ctx: ssl.SSLContext) -> None:
        ssl_object.context = self._current

    def _check_names(self) -> None:
        if self.provided:
            return
        try:
            leaf = x509.load_pem_x509_certificates(self.chain.read_bytes())[0]
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            hosts = names.get_values_for_type(x509.DNSName) + [
                str(ip) for ip in names.get_values_for_type(x509.IPAddress)
            ]
        except (OSError, ValueError, x509.ExtensionNotFound, IndexError):
            hosts = []
        if not hosts:
            log.warning(
                "gateway: the public listener presents the gateway's workload certificate, "
                "which names no host (only its SPIFFE ID): public clients cannot verify it by "
                "host name. Configure tls: {cert, key} with a certificate for the public name "
                "(docs/gateway.md).",
                extra={"event": "public_certificate_no_hostname"},
            )


def _rate(spec: RateSpec | None) -> Rate | None:
    return Rate(spec.rate, spec.burst) if spec is not None else None


def _issuer_config(entry: IssuerEntry, trust: ssl.SSLContext | None) -> IssuerConfig:
    introspection = None
    if entry.introspection is not None:
        path = entry.introspection.client_secret_file
        try:
            secret = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"Cannot read the introspection secret of {entry.issuer} from {path}: "
                f"{exc.strerror}.",
                field="introspection.client_secret_file",
            ) from None
        introspection = IntrospectionConfig(
            client_id=entry.introspection.client_id,
            client_secret=secret,
            url=entry.introspection.url,
        )
    kwargs: dict[str, Any] = {}
    if entry.algorithms is not None:
        kwargs["algorithms"] = entry.algorithms
    return IssuerConfig(
        entry.issuer,
        audiences=entry.audiences,
        discovery_url=entry.discovery,
        jwks_url=entry.jwks_uri,
        ca_bundle=entry.ca_bundle,
        ssl_context=trust if entry.ca_bundle is None else None,
        introspection=introspection,
        strict_rfc9068=entry.strict_rfc9068,
        **kwargs,
    )


def _issuer_trust(credentials: Any) -> ssl.SSLContext | None:
    """System CAs plus the gateway's own trust bundle (our identity server's CA)."""
    roots = getattr(credentials, "roots", None)
    ctx = ssl.create_default_context()
    if roots:
        ctx.load_verify_locations(cadata=pem_certificates(tuple(roots)).decode())
    return ctx


def _sort_key(route: RouteConfig) -> tuple[int, int]:
    host = route.host
    kind = 2 if host is None else (1 if host.startswith("*.") else 0)
    return (kind, -len(route.path))


async def build_state(
    config: GatewayConfig,
    *,
    credentials: Credentials,
    revocations: Revocations | None,
    metrics: GatewayMetrics,
    previous: GatewayState | None = None,
) -> GatewayState:
    """Build everything one configuration needs, reusing what ``previous`` has unchanged.

    Pools are reused when a route keeps its name and upstream block (connections and
    health survive a reload); verifiers, rate limits and alerts when their settings are
    unchanged.

    Raises:
        ConfigError: Something the file check could not see (a secret file unreadable...).
    """
    pools: dict[tuple[str, Any], UpstreamPool] = {}
    if previous is not None:
        pools = {(r.config.name, r.config.upstream): r.pool for r in previous.routes}
    check = revocations if config.check_revocation else None
    routes: list[CompiledRoute] = []
    for route in sorted(config.routes, key=_sort_key):
        pool = pools.get((route.name, route.upstream))
        if pool is None:
            pool = UpstreamPool(
                route.name,
                route.upstream,
                credentials,
                check,
                on_health=metrics.health,
                on_attempt=metrics.attempt,
            )
        try:
            requirement = None if route.public else route_policy(route.auth, name=route.name)
            policy_file = PolicyFile(route.policy) if route.policy is not None else None
        except PolicyConfigError as exc:
            raise ConfigError(
                f"{config.source}:{route.line}: routes ({route.name}): {exc.message}"
            ) from None
        own = route.rate_limits
        per_ip = own.per_ip if own is not None and own.per_ip is not None else None
        per_client = own.per_client if own is not None and own.per_client is not None else None
        host = route.host
        routes.append(
            CompiledRoute(
                config=route,
                pool=pool,
                cidrs=CidrList(route.allow_ips, route.deny_ips),
                requirement=requirement,
                policy_file=policy_file,
                per_ip=_rate(per_ip or config.rate_limits.per_ip),
                per_client=_rate(per_client or config.rate_limits.per_client),
                ip_bucket=f"route:{route.name}:" if per_ip is not None else "",
                client_bucket=f"route:{route.name}:" if per_client is not None else "",
                max_body=route.max_body_bytes
                if route.max_body_bytes is not None
                else config.max_body_bytes,
                host_exact=host if host is not None and not host.startswith("*.") else None,
                host_suffix=host[1:] if host is not None and host.startswith("*.") else None,
            )
        )
    authenticator: Authenticator | None
    if previous is not None and previous.config.issuers == config.issuers:
        authenticator = previous.authenticator
    elif config.issuers:
        trust = _issuer_trust(credentials)
        authenticator = Authenticator([_issuer_config(e, trust) for e in config.issuers])
    else:
        authenticator = None
    if previous is not None and previous.config.redis == config.redis:
        ratelimits = previous.ratelimits
    else:
        ratelimits = RateLimits(config.redis)
    alerts: Alerts | None
    if previous is not None and previous.config.alerts == config.alerts:
        alerts = previous.alerts
    elif config.alerts is not None:
        rule = config.alerts
        alerts = Alerts(
            AlertRule(rule.threshold, rule.window, rule.block_for, rule.webhook),
            gateway_id=config.id,
        )
        await alerts.start()
    else:
        alerts = None
    return GatewayState(
        config=config,
        routes=routes,
        trusted=TrustedProxies(config.trusted_proxies),
        authenticator=authenticator,
        ratelimits=ratelimits,
        alerts=alerts,
        generation=previous.generation + 1 if previous is not None else 1,
    )


async def close_state(old: GatewayState, new: GatewayState | None) -> None:
    """Close what ``old`` holds and ``new`` does not reuse."""
    keep_pools = {id(r.pool) for r in new.routes} if new is not None else set()
    for route in old.routes:
        if id(route.pool) not in keep_pools:
            await route.pool.aclose()
            keep_pools.add(id(route.pool))  # close each pool once
    if old.authenticator is not None and (
        new is None or new.authenticator is not old.authenticator
    ):
        await old.authenticator.aclose()
    if new is None or new.ratelimits is not old.ratelimits:
        await old.ratelimits.aclose()
    if old.alerts is not None and (new is None or new.alerts is not old.alerts):
        await old.alerts.aclose()


class Gateway:
    """One gateway process's serving loop.

    Args:
        config: The configuration (already validated).
        credentials: The gateway's identity (``RotatingCredentials``): mTLS to upstreams
            and, without ``tls:``, the public certificate too (``cert_dir``).
        cert_dir: The identity directory (its ``chain.pem``/``key.pem`` serve the public
            listener when ``tls:`` is not configured).
        revocations: Revoked serials (checked at every upstream handshake).
        config_path: The file to watch for changes (None: no hot reload).
        ready: Called with the public URL once every listener accepts connections.
        reload_interval: Seconds between looks at the files.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        credentials: Credentials,
        cert_dir: Path | None,
        revocations: Revocations | None,
        config_path: Path | None = None,
        ready: Callable[[str], None] | None = None,
        reload_interval: float = RELOAD_INTERVAL,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.config = config
        self.credentials = credentials
        self.revocations = revocations
        self.config_path = config_path
        self.ready = ready
        self.reload_interval = reload_interval
        self.metrics = metrics or GatewayMetrics()
        if config.tls_cert is not None and config.tls_key is not None:
            self.public = PublicCertificate(config.tls_cert, config.tls_key, provided=True)
        elif cert_dir is not None:
            self.public = PublicCertificate(
                cert_dir / "chain.pem", cert_dir / "key.pem", provided=False
            )
        else:
            raise ConfigError(
                "The public listener has no certificate: configure tls: {cert, key}, or give "
                "the gateway's identity directory (cert_dir / --cert-dir).",
                field="tls",
            )
        self.app: GatewayApp | None = None
        self.url: str | None = None
        self.metrics_url: str | None = None
        self.redirect_url: str | None = None
        self._servers: list[uvicorn.Server] = []
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signature = _stat(config_path) if config_path is not None else None
        self._retiring: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop accepting and drain; safe to call from any thread or a signal handler."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)

    async def serve(self) -> None:
        """Serve until :meth:`stop`, then drain and close.

        Raises:
            TrustmeshError: A listener could not start (the port is in use...).
        """
        from trustmesh.errors import TrustmeshError

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        config = self.config
        state = await build_state(
            config,
            credentials=self.credentials,
            revocations=self.revocations,
            metrics=self.metrics,
        )
        self.metrics.generation.set(state.generation)
        if self.revocations is not None and hasattr(self.revocations, "metrics"):
            self.metrics.add_revocations(self.revocations.metrics)
        self.app = app = GatewayApp(state, self.metrics)
        host, port = parse_listen(config.listen)
        public = uvicorn.Server(
            _uvicorn_config(
                app,
                host,
                port,
                ssl_context_factory=lambda _c, _d: self.public.context(),
                http=_guarded_protocol(lambda: app.state.config.max_header_bytes),
            )
        )
        servers = [public]
        if config.redirect_http is not None:
            rhost, rport = parse_listen(config.redirect_http)
            servers.append(uvicorn.Server(_uvicorn_config(_redirect_app(host, port), rhost, rport)))
        if config.metrics_listen is not None:
            mhost, mport = parse_listen(config.metrics_listen)
            if not is_loopback(mhost):
                log.warning(
                    "gateway: metrics are served on %s, which is not a loopback address: "
                    "anyone who reaches it can read them",
                    config.metrics_listen,
                )
            servers.append(
                uvicorn.Server(_uvicorn_config(metrics_app(self.metrics.render), mhost, mport))
            )
        self._servers = servers
        watcher: asyncio.Task[None] | None = None
        try:
            for server in servers:
                await start_server(server)
                if not server.started:
                    raise TrustmeshError(
                        f"The gateway could not listen on {server.config.host}:"
                        f"{server.config.port} (see the log above): is the port in use?"
                    )
            self.url = public_url(host, port)
            if config.redirect_http is not None:
                self.redirect_url = "http://" + config.redirect_http
            if config.metrics_listen is not None:
                self.metrics_url = f"http://{config.metrics_listen}/metrics"
            log.info(
                "gateway: listening on %s with %d routes",
                self.url,
                len(state.routes),
                extra={"event": "gateway_started", "routes": len(state.routes)},
            )
            if self.ready is not None:
                self.ready(self.url)
            watcher = asyncio.ensure_future(self._watch())
            await self._stop.wait()
            log.info(
                "gateway: stopping; draining in-flight requests",
                extra={"event": "gateway_stopping"},
            )
        finally:
            if watcher is not None:
                watcher.cancel()
            for server in servers:
                server.should_exit = True
            for server in servers:
                if server.started:
                    await server.shutdown()
            for task in list(self._retiring):
                await task
            if self.app is not None:
                await close_state(self.app.state, None)
            log.info("gateway: stopped", extra={"event": "gateway_stopped"})

    # -- reload --------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            try:
                self.public.poll()
                if self.config_path is not None:
                    signature = _stat(self.config_path)
                    if signature != self._signature:
                        self._signature = signature
                        await self.reload()
            except Exception:  # the watcher must survive anything; say what happened
                log.exception(
                    "gateway: the reload watcher failed; retrying", extra={"event": "reload_failed"}
                )

    async def reload(self) -> bool:
        """Load the configuration file again; swap it in if it is valid.

        Returns:
            True when the new configuration is in force.
        """
        app = self.app
        if app is None or self.config_path is None:
            return False
        old = app.state
        try:
            config = await asyncio.to_thread(load_config, self.config_path)
            config = self._keep_fixed(old.config, config)
            new = await build_state(
                config,
                credentials=self.credentials,
                revocations=self.revocations,
                metrics=self.metrics,
                previous=old,
            )
        except ConfigError as exc:
            self.metrics.reloads.labels("error").inc()
            log.error(
                "gateway: configuration not reloaded, keeping generation %d: %s",
                old.generation,
                exc.message,
                extra={
                    "event": "config_reload_failed",
                    "line": exc.details.get("line"),
                    "key": exc.details.get("field"),
                },
            )
            return False
        app.state = new
        self.config = config
        self.metrics.reloads.labels("ok").inc()
        self.metrics.generation.set(new.generation)
        kept = {r.name for r in new.routes}
        for route in old.routes:
            if route.name not in kept:
                self.metrics.forget_route(route.name, [e.label for e in route.pool.endpoints])
        log.info(
            "gateway: configuration reloaded (generation %d, %d routes)",
            new.generation,
            len(new.routes),
            extra={"event": "config_reloaded", "generation": new.generation},
        )
        task = asyncio.ensure_future(self._retire(old, new))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return True

    def _keep_fixed(self, old: GatewayConfig, new: GatewayConfig) -> GatewayConfig:
        changed = [name for name in _RESTART_ONLY if getattr(old, name) != getattr(new, name)]
        if not changed:
            return new
        log.warning(
            "gateway: %s changed in %s; that takes a restart, the running values stay",
            ", ".join(changed),
            new.source,
            extra={"event": "config_restart_needed"},
        )
        return dataclasses.replace(new, **{name: getattr(old, name) for name in changed})

    async def _retire(self, old: GatewayState, new: GatewayState) -> None:
        if old.inflight:
            drained = asyncio.Event()
            old.drained = drained.set
            if old.inflight:
                await drained.wait()
        await close_state(old, new)


def _stat(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


#: Seconds a client has, from connecting or from the first byte of a request, to send the
#: whole request line and headers; a slowloris client trickling bytes is answered 408.
HEAD_TIMEOUT = 10.0


def _guarded_protocol(max_head: Callable[[], int]) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the head limits enforced while reading.

    httptools buffers a request's head without limit and uvicorn waits for it without a
    deadline; the app's own 431 check only runs once the head is complete. This answers
    431 as soon as more than ``max_head()`` bytes of head arrived, and 408 when the head
    is not complete :data:`HEAD_TIMEOUT` seconds after it began, then closes.
    """

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes = 0
        _in_head = False
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._begin_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._begin_head()

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._cancel_head_timer()
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():
                self._head_bytes += len(data)
                limit = max_head()
                if self._head_bytes > limit:
                    self._refuse_head(
                        431,
                        "Request header fields too large",
                        f"The request line and headers exceed the limit of {limit} bytes.",
                        "headers_too_large",
                    )

        def _begin_head(self) -> None:
            if not self._in_head:
                self._in_head, self._head_bytes = True, 0
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_expired)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if not self._in_head or self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                # A pipelined head waits behind a response in progress: not the client's fault.
                self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_expired)
                return
            self._refuse_head(
                408,
                "Request timeout",
                f"The request line and headers did not arrive within {HEAD_TIMEOUT:g} s.",
                "header_timeout",
            )

        def _refuse_head(self, status: int, title: str, detail: str, reason: str) -> None:
            self._in_head = False
            self._cancel_head_timer()
            client = self.client[0] if self.client else "-"
            log.warning(
                "gateway: %s from %s: %s",
                reason,
                client,
                detail,
                extra={"event": "gateway_head_refused", "reason": reason, "client_ip": client},
            )
            body = problem_document(status, title, detail, reason=reason)
            head = (
                f"HTTP/1.1 {status} {title}\r\ncontent-type: {PROBLEM_CONTENT_TYPE}\r\n"
                f"content-length: {len(body)}\r\ncache-control: no-store\r\n"
                "connection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
            self.transport.close()

    return GuardedHttpToolsProtocol


def _uvicorn_config(
    app: Any, host: str, port: int, *, http: Any = "httptools", **extra: Any
) -> uvicorn.Config:
    return uvicorn_config(
        app,
        host=host,
        port=port,
        http=http,
        ws="none",  # upgrades are not relayed: Upgrade is hop-by-hop and removed
        lifespan="off",
        access_log=False,
        server_header=False,
        # uvicorn would believe X-Forwarded-For from 127.0.0.1 and rewrite the client
        # address; the gateway decides that itself from trusted_proxies.
        proxy_headers=False,
        timeout_keep_alive=15,
        timeout_graceful_shutdown=DRAIN_TIMEOUT,
        **extra,
    )


_HOST_HEADER = re.compile(rb"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]")


def _redirect_app(https_host: str, https_port: int) -> Callable[..., Any]:
    """Plain-HTTP app answering every request with a 308 to the HTTPS listener."""
    fallback = public_url(https_host, https_port)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        host = b""
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.rsplit(b":", 1)[0] if not value.endswith(b"]") else value
                break
        if host and _HOST_HEADER.fullmatch(host):
            port = "" if https_port == 443 else f":{https_port}"
            base = f"https://{host.decode('ascii')}{port}"
        else:
            base = fallback
        target = scope.get("raw_path") or scope["path"].encode()
        location = base + target.decode("latin-1")
        if scope.get("query_string"):
            location += "?" + scope["query_string"].decode("latin-1")
        await send(
            {
                "type": "http.response.start",
                "status": 308,
                "headers": [
                    (b"location", location.encode("latin-1")),
                    (b"content-length", b"0"),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    return app


def run_gateway(
    config_path: Path,
    *,
    cert_dir: Path,
    keeper: Keeper | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the gateway configured in ``config_path`` until SIGTERM/SIGINT, then drain.

    Args:
        config_path: The YAML file (watched for changes).
        cert_dir: The gateway's identity directory (``key.pem``, ``chain.pem``,
            ``bundle.pem``); it must hold a valid identity now.
        keeper: Keeps ``cert_dir`` fresh in a thread while serving (the in-process agent).
        ready: Called with the public URL once every listener accepts connections.

    Raises:
        ConfigError: The configuration or the identity files are unusable.
        TrustmeshError: A listener could not start.
    """
    config = load_config(config_path)
    credentials = RotatingCredentials(cert_dir, expect_id=config.id)
    revocations: RevocationSet | None = None
    if config.check_revocation and config.ca is not None:
        revocations = RevocationSet(
            config.ca, credentials.client_context, issuers=credentials.intermediates
        )
    else:
        log.warning(
            "gateway: upstream certificates are NOT checked for revocation "
            "(check_revocation: false): a revoked service is reached until its "
            "certificate expires",
            extra={"event": "upstream_revocation_off"},
        )
    gateway = Gateway(
        config,
        credentials=credentials,
        cert_dir=cert_dir,
        revocations=revocations,
        config_path=config_path,
        ready=ready,
    )
    stop = threading.Event()
    thread = start_keeper(keeper, stop, name="trustmesh-gateway-identity")
    credentials.start()
    try:
        if revocations is not None:
            revocations.start()
            # An empty set would let an already-revoked upstream be reached: wait for it.
            if not revocations.wait_connected(REVOCATION_STARTUP_WAIT):
                log.error(
                    "gateway: revocation feed at %s not connected after %g s; serving anyway, "
                    "refusing every upstream once its grace runs out",
                    config.ca,
                    REVOCATION_STARTUP_WAIT,
                    extra={"event": "revocation_feed_unavailable"},
                )
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve_until_signal(gateway))
    finally:
        if revocations is not None:
            revocations.stop()
        credentials.stop()
        stop_keeper(thread, stop)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (measured faster: its transports and TLS
    cost less per request), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve_until_signal(gateway: Gateway) -> None:
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, gateway.stop)
            handled.append(sig)
    try:
        await gateway.serve()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
