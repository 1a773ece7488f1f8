"""What both sidecars share: settings, metrics, the table of live connections (with its
watchdog for connection age, peer expiry, revocation and retired issuers), and the process
around them (credentials, revocation feed, metrics endpoint, the identity keeper)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from trustmesh.addresses import LATENCY_BUCKETS, parse_listen
from trustmesh.errors import ConfigError, TrustmeshError, VerificationError
from trustmesh.pki import SpiffeID, spiffe_id_of
from trustmesh.tls import RevocationSet, RotatingCredentials, issuer_withdrawn

__all__ = [
    "Connection",
    "InboundSettings",
    "Keeper",
    "OutboundSettings",
    "ProxyMetrics",
    "ProxySettings",
    "Sidecar",
    "Tracker",
    "check_common",
    "parse_target",
    "peer_identity",
]

log = logging.getLogger("trustmesh.proxy")

#: Keeps the identity files fresh until the event is set (the in-process agent).
Keeper = Callable[[threading.Event], None]

#: Seconds the sidecar waits for the revocation feed before it accepts connections.
REVOCATION_STARTUP_WAIT = 10.0
#: Seconds between two rounds of the watchdog over live connections.
WATCH_INTERVAL = 1.0
#: A TCP connection past its maximum age is closed once it has been idle this long...
MAX_AGE_IDLE = 1.0
#: ...and at the latest this many seconds after its maximum age.
MAX_AGE_GRACE = 30.0
#: Seconds closed connections get to say goodbye (TLS close_notify) at the end of a drain.
CLOSE_WAIT = 3.0


@dataclass(frozen=True)
class ProxySettings:
    """What both sidecars take.

    Attributes:
        spiffe_id: The sidecar's own identity (the files in ``cert_dir`` must carry it).
        cert_dir: The identity directory kept by an agent (``key.pem``, ``chain.pem``,
            ``bundle.pem``).
        listen: ``HOST:PORT`` to accept connections on.
        to: ``HOST:PORT`` to forward them to.
        ca_url: The CA for the revocation feed.
        no_revocation: Run without revocation checks (logged).
        max_connection_age: Seconds after which a connection is closed.
        drain_timeout: Seconds open connections get to finish after SIGTERM.
        metrics: ``HOST:PORT`` of the plain-HTTP Prometheus endpoint, or None.
    """

    spiffe_id: str
    cert_dir: Path
    listen: str
    to: str
    ca_url: str | None = None
    no_revocation: bool = False
    max_connection_age: float = 600.0
    drain_timeout: float = 15.0
    metrics: str | None = None


@dataclass(frozen=True)
class InboundSettings(ProxySettings):
    """``proxy inbound``: mTLS in front of a plain local service.

    Attributes:
        http: HTTP mode (full policy per request, identity headers) instead of TCP mode.
        policy: The policy file (TCP mode uses its callers only).
        allow_ids: Caller SPIFFE IDs or globs allowed (instead of a policy file).
        proxy_protocol: TCP mode: send a PROXY v2 header to the app first.
        issuer: HTTP mode: verify bearer tokens against this issuer.
        audiences: HTTP mode: accepted token audiences.
        require_token: HTTP mode: refuse requests without a bearer token.
    """

    http: bool = False
    policy: Path | None = None
    allow_ids: tuple[str, ...] = ()
    proxy_protocol: bool = True
    issuer: str | None = None
    audiences: tuple[str, ...] = ()
    require_token: bool = False


@dataclass(frozen=True)
class OutboundSettings(ProxySettings):
    """``proxy outbound``: a plain local port that calls an mTLS service.

    Attributes:
        expect_id: The server's SPIFFE ID (or glob) that must answer at ``to``.
        allow_remote: Accept connections on a non-loopback ``listen`` address.
    """

    expect_id: str = ""
    allow_remote: bool = False


def check_common(settings: ProxySettings) -> None:
    """Refuse settings both sidecars would fail on.

    Raises:
        ConfigError: What is wrong and how to fix it.
    """
    try:
        SpiffeID.parse(settings.spiffe_id)
    except TrustmeshError as exc:
        raise ConfigError(f"--id: {exc.message}", field="id") from None
    parse_listen(settings.listen)
    parse_target(settings.to)
    if settings.metrics is not None:
        try:
            parse_listen(settings.metrics)
        except ConfigError:
            raise ConfigError(
                f"--metrics {settings.metrics!r} is not HOST:PORT, e.g. 127.0.0.1:9464.",
                field="metrics",
            ) from None
    if settings.max_connection_age <= 0:
        raise ConfigError("--max-connection-age must be positive, e.g. 10m.", field="age")
    if settings.drain_timeout < 0:
        raise ConfigError("--drain-timeout must be 0 or more, e.g. 15s.", field="drain")


def parse_target(value: str) -> tuple[str, int]:
    """Parse ``--to HOST:PORT``.

    Raises:
        ConfigError: Not HOST:PORT.
    """
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--to {value!r} is not HOST:PORT, e.g. 127.0.0.1:3000.", field="to")
    return host, int(port)


# -- metrics ------------------------------------------------------------------------------


class ProxyMetrics:
    """The sidecar's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.connections = Counter(
            "trustmesh_proxy_connections", "Connections accepted", ["mode"], registry=registry
        )
        self.active = Gauge(
            "trustmesh_proxy_connections_active",
            "Connections open now",
            ["mode"],
            registry=registry,
        )
        self.bytes = Counter(
            "trustmesh_proxy_bytes",
            "Bytes relayed: in = from the connecting peer, out = to it",
            ["mode", "direction"],
            registry=registry,
        )
        self.refusals = Counter(
            "trustmesh_proxy_refusals",
            "Connections or requests refused, by reason",
            ["mode", "reason"],
            registry=registry,
        )
        self.handshake = Histogram(
            "trustmesh_proxy_handshake_seconds",
            "TLS handshake duration",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "trustmesh_proxy_requests",
            "HTTP mode: requests answered, by status",
            ["status"],
            registry=registry,
        )
        self.generation = Gauge(
            "trustmesh_proxy_credentials_generation",
            "How many times the sidecar's own credentials were loaded",
            registry=registry,
        )

    def serve(self, listen: str) -> None:
        """Start the plain-HTTP ``/metrics`` endpoint in a daemon thread."""
        host, port = parse_listen(listen)
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"--metrics {listen}: cannot listen there ({exc.strerror}); pick a free port.",
                field="metrics",
            ) from None
        log.info("metrics on http://%s:%d/metrics", host, port, extra={"event": "metrics_started"})


# -- live connections ---------------------------------------------------------------------


def new_connection_id() -> str:
    """A short random id that names one connection in every log line about it."""
    return secrets.token_hex(8)


@dataclass(eq=False)
class Connection:
    """One accepted connection, as the logs and the watchdog see it."""

    mode: str
    peer: str
    id: str = field(default_factory=new_connection_id)
    started: float = field(default_factory=time.monotonic)
    peer_id: str | None = None
    serial: int | None = None
    not_after: datetime | None = None
    #: The peer's leaf, for the watchdog's issuer check (TCP mode).
    certificate: x509.Certificate | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    #: When bytes last came from the connecting peer, and last went to it.
    last_in: float = 0.0
    last_out: float = 0.0
    close_reason: str | None = None
    #: Closes the connection from outside (the watchdog, the drain); None in HTTP mode.
    closer: Callable[[], None] | None = None

    def age(self, now: float | None = None) -> float:
        return (now if now is not None else time.monotonic()) - self.started

    def close(self, reason: str) -> None:
        """Close it now for ``reason`` (the first reason given is the one logged)."""
        if self.close_reason is None:
            self.close_reason = reason
        if self.closer is not None:
            self.closer()


class Tracker:
    """The live connections of one sidecar: metrics, open/close logs and the watchdog.

    The watchdog closes TCP connections older than ``max_age`` (once idle for a second,
    at the latest :data:`MAX_AGE_GRACE` seconds later), whose peer certificate expired,
    whose peer serial the revocation set now lists, or whose peer leaf was signed by an
    intermediate the CA no longer publishes.
    """

    def __init__(
        self, metrics: ProxyMetrics, *, max_age: float, revocation: RevocationSet | None
    ) -> None:
        self.metrics = metrics
        self.max_age = max_age
        self.revocation = revocation
        self.live: set[Connection] = set()
        self._byte_counters: dict[tuple[str, str], Any] = {}
        self._empty = asyncio.Event()
        self._empty.set()

    def opened(self, conn: Connection) -> None:
        self.live.add(conn)
        self._empty.clear()
        self.metrics.connections.labels(conn.mode).inc()
        self.metrics.active.labels(conn.mode).inc()

    def identified(self, conn: Connection) -> None:
        """Log the connection once its peer is known and allowed."""
        log.info(
            "%s connection %s from %s (%s) open",
            conn.mode,
            conn.id,
            conn.peer,
            conn.peer_id,
            extra={
                "event": "proxy_connection_open",
                "mode": conn.mode,
                "connection": conn.id,
                "peer": conn.peer,
                "peer_id": conn.peer_id,
                "serial": format(conn.serial, "x") if conn.serial is not None else None,
            },
        )

    def closed(self, conn: Connection) -> None:
        if conn not in self.live:
            return
        self.live.discard(conn)
        if not self.live:
            self._empty.set()
        self.metrics.active.labels(conn.mode).dec()
        if conn.peer_id is None:  # refused before it was identified: logged as a refusal
            return
        log.info(
            "%s connection %s from %s (%s) closed after %.3fs: %d bytes in, %d out (%s)",
            conn.mode,
            conn.id,
            conn.peer,
            conn.peer_id,
            conn.age(),
            conn.bytes_in,
            conn.bytes_out,
            conn.close_reason or "done",
            extra={
                "event": "proxy_connection_closed",
                "mode": conn.mode,
                "connection": conn.id,
                "peer": conn.peer,
                "peer_id": conn.peer_id,
                "bytes_in": conn.bytes_in,
                "bytes_out": conn.bytes_out,
                "duration": round(conn.age(), 6),
                "reason": conn.close_reason or "done",
            },
        )

    def refused(self, conn: Connection, reason: str, detail: str) -> None:
        """Count and log one refused connection (or request) with its reason."""
        self.metrics.refusals.labels(conn.mode, reason).inc()
        log.warning(
            "%s connection %s from %s refused: %s (%s)",
            conn.mode,
            conn.id,
            conn.peer,
            reason,
            detail,
            extra={
                "event": "proxy_refused",
                "mode": conn.mode,
                "connection": conn.id,
                "peer": conn.peer,
                "peer_id": conn.peer_id,
                "reason": reason,
                "detail": detail,
            },
        )

    def count(self, conn: Connection, received: int = 0, sent: int = 0) -> None:
        """Add relayed bytes (``received`` from the connecting peer, ``sent`` to it)."""
        conn.last_activity = now = time.monotonic()
        if received:
            conn.last_in = now
            conn.bytes_in += received
            self._bytes(conn.mode, "in").inc(received)
        if sent:
            conn.last_out = now
            conn.bytes_out += sent
            self._bytes(conn.mode, "out").inc(sent)

    def _bytes(self, mode: str, direction: str) -> Any:
        # The labelled child, looked up once: this runs for every chunk relayed.
        child = self._byte_counters.get((mode, direction))
        if child is None:
            child = self._byte_counters[mode, direction] = self.metrics.bytes.labels(
                mode, direction
            )
        return child

    def sweep(self, now: float | None = None) -> None:
        """One round of the watchdog: close what must not stay open."""
        now = now if now is not None else time.monotonic()
        wall = datetime.now(UTC)
        for conn in list(self.live):
            if conn.closer is None or conn.peer_id is None:
                continue
            if conn.serial is not None and self.revocation is not None:
                if self.revocation.is_revoked(conn.serial):
                    self.refused(
                        conn,
                        "revoked",
                        f"certificate {conn.serial:x} of {conn.peer_id} is revoked (or the "
                        f"revocation feed is lost and the sidecar fails closed); closing",
                    )
                    conn.close("revoked")
                    continue
            if conn.certificate is not None and issuer_withdrawn(self.revocation, conn.certificate):
                self.refused(
                    conn,
                    "issuer_retired",
                    f"certificate {conn.serial or 0:x} of {conn.peer_id} was signed by "
                    f"{conn.certificate.issuer.rfc4514_string()}, an intermediate the CA no "
                    f"longer publishes; closing",
                )
                conn.close("issuer_retired")
                continue
            if conn.not_after is not None and wall > conn.not_after:
                conn.close("peer_certificate_expired")
                continue
            age = conn.age(now)
            if age > self.max_age and (
                now - conn.last_activity >= MAX_AGE_IDLE or age > self.max_age + MAX_AGE_GRACE
            ):
                conn.close("max_connection_age")

    async def watch(self) -> None:
        """Run :meth:`sweep` every second until cancelled."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                self.sweep()
            except Exception:  # the watchdog must not die
                log.exception("connection watchdog failed")

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the live connections to end, then close
        the rest."""
        if self.live:
            log.info(
                "draining %d open connections for up to %gs",
                len(self.live),
                timeout,
                extra={"event": "proxy_draining", "connections": len(self.live)},
            )
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            for conn in list(self.live):
                conn.close("drain_timeout")
            # Let each connection's handler finish closing (and log) before the loop ends.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), CLOSE_WAIT)


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The verified peer of a TLS connection."""

    spiffe_id: SpiffeID
    certificate: x509.Certificate


def peer_identity(der: bytes | None, trust_domain: str) -> PeerIdentity:
    """Read the SPIFFE ID from a verified peer leaf (DER) and check its trust domain.

    Raises:
        VerificationError: No certificate, no single SPIFFE ID, or another trust domain;
            ``reason`` is a short code for logs and metrics.
    """
    if not der:
        raise VerificationError("the peer presented no certificate", reason="no_certificate")
    cert = x509.load_der_x509_certificate(der)
    spiffe_id = spiffe_id_of(cert)
    if not spiffe_id.member_of(trust_domain):
        raise VerificationError(
            f"{spiffe_id} is outside the trust domain {trust_domain}",
            reason="foreign_trust_domain",
        )
    return PeerIdentity(spiffe_id, cert)


# -- the process --------------------------------------------------------------------------


class Sidecar:
    """The parts every sidecar process runs: its credentials, the revocation set, the
    metrics endpoint and the identity keeper (the in-process agent)."""

    def __init__(self, settings: ProxySettings, keeper: Keeper | None) -> None:
        self.settings = settings
        self.keeper = keeper
        self.metrics = ProxyMetrics()
        self.credentials: RotatingCredentials
        self.revocation: RevocationSet | None = None
        self.trust_domain = SpiffeID.parse(settings.spiffe_id).trust_domain

    @contextmanager
    def running(self) -> Iterator[Sidecar]:
        stop = threading.Event()
        thread = None
        if self.keeper is not None:
            keeper = self.keeper

            def keep() -> None:
                try:
                    keeper(stop)
                except Exception:  # a dead keeper must be loud: the certificate will expire
                    log.exception(
                        "the identity keeper stopped; using the current certificate until it "
                        "expires",
                        extra={"event": "keeper_failed"},
                    )

            thread = threading.Thread(target=keep, name="trustmesh-proxy-identity", daemon=True)
            thread.start()
        try:
            self.credentials = RotatingCredentials(
                self.settings.cert_dir, expect_id=self.settings.spiffe_id
            )
            self.metrics.generation.set(self.credentials.generation)
            self.credentials.add_listener(self.metrics.generation.set)
            self.credentials.start()
            try:
                self._start_revocation()
                if self.settings.metrics is not None:
                    self.metrics.serve(self.settings.metrics)
                yield self
            finally:
                if self.revocation is not None:
                    self.revocation.stop()
                self.credentials.stop()
        finally:
            stop.set()
            if thread is not None:
                thread.join(timeout=10)

    def _start_revocation(self) -> None:
        settings = self.settings
        if settings.no_revocation or settings.ca_url is None:
            return
        credentials = self.credentials
        self.revocation = RevocationSet(
            settings.ca_url, credentials.client_context, issuers=credentials.intermediates
        )
        self.revocation.start()
        # Until the first page of the feed arrives the set is empty: accepting then would
        # let an already-revoked peer in.
        if not self.revocation.wait_connected(REVOCATION_STARTUP_WAIT):
            log.error(
                "revocation feed at %s not connected after %g s; accepting anyway, and "
                "refusing every peer once its grace runs out",
                settings.ca_url,
                REVOCATION_STARTUP_WAIT,
                extra={"event": "revocation_feed_unavailable"},
            )

    def tracker(self) -> Tracker:
        return Tracker(
            self.metrics,
            max_age=self.settings.max_connection_age,
            revocation=self.revocation,
        )
