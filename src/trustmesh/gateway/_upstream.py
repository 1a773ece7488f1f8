"""Upstream pools: mTLS clients, round robin, passive health, retries.

Each route's upstream is one :class:`UpstreamPool`: one :class:`trustmesh.http1.Pool`
per endpoint (keep-alive HTTP/1.1, the relay's lean path) with the gateway's rotating
credentials, the upstream's SPIFFE ID checked and its certificate checked against the
revocation set right after each handshake (:class:`trustmesh.client.PeerCheck`), before
any request byte. Endpoints
are chosen round robin; connect failures and timeouts count against an endpoint, and
``eject_after`` of them in a row take it out of rotation for ``eject_for`` seconds, after
which one trial request decides whether it is back. When every endpoint is ejected the
pool ignores health and keeps trying them in turn (as Envoy's panic mode does): refusing
everything would turn a short blip into an outage.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from trustmesh.client import PeerCheck
from trustmesh.http1 import Pool
from trustmesh.relay import Receive, Scope, Send, UpstreamError, relay

from ._config import UpstreamConfig

__all__ = ["IDEMPOTENT_METHODS", "Endpoint", "Forwarded", "UpstreamPool"]

log = logging.getLogger("trustmesh.gateway")

#: Methods retried after a failure once the request may have reached the upstream
#: (RFC 9110 section 9.2.2); their bodies must have been read beforehand.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
#: The relay's status when the client left before the upstream answered.
CLIENT_LEFT = 499
#: Connections open at once per endpoint (more requests wait, up to the route's timeout)
#: and the idle expiry of keep-alive ones.
MAX_CONNECTIONS = 1000
KEEPALIVE_EXPIRY = 30.0


class Credentials(Protocol):
    """The gateway's rotating identity (``trustmesh.tls.RotatingCredentials``)."""

    @property
    def generation(self) -> int: ...

    def client_context(self, *, check_hostname: bool = True) -> ssl.SSLContext: ...


class Revocations(Protocol):
    """Revoked upstream serials (``trustmesh.tls.RevocationSet``)."""

    @property
    def cursor(self) -> int: ...

    def is_revoked(self, serial: int | str, /) -> bool: ...


class _Recycling:
    """Credentials whose generation also moves when a revocation arrives.

    Each endpoint's pool closes the connections made before the generation changed
    (idle ones at once, busy ones when their response is done), so after a rotation or
    a revocation every upstream connection is made afresh, and the handshake check
    refuses a revoked upstream that an older keep-alive connection would still have
    reached.
    """

    def __init__(self, credentials: Credentials, revocations: Revocations | None) -> None:
        self._credentials = credentials
        self._revocations = revocations

    @property
    def generation(self) -> int:
        cursor = self._revocations.cursor if self._revocations is not None else 0
        return (self._credentials.generation << 40) + cursor

    def client_context(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        return self._credentials.client_context(check_hostname=check_hostname)


@dataclass(eq=False)
class Endpoint:
    """One upstream URL and its passive health.

    Attributes:
        url: ``https://host:port``.
        label: ``host:port`` (log and metrics label).
        failures: Connect failures/timeouts in a row.
        ejected_until: Monotonic time until which it is out of rotation (0: never ejected).
        trial: A trial request is in flight after an ejection ran out.
    """

    url: str
    label: str
    failures: int = 0
    ejected_until: float = 0.0
    trial: bool = False

    def healthy(self, eject_after: int) -> bool:
        """True unless ejected or on probation after an ejection."""
        return self.failures < eject_after


@dataclass(frozen=True, slots=True)
class Forwarded:
    """How forwarding went: the status sent (or to send, on error), where, and the error."""

    status: int
    endpoint: Endpoint
    attempts: int
    error: UpstreamError | None


#: Called with (route, endpoint label, healthy) when an endpoint's health changes.
HealthListener = Callable[[str, str, bool], None]
#: Called with (route, endpoint label, outcome) after each attempt: the status code, or
#: the failure reason.
AttemptListener = Callable[[str, str, str], None]


class UpstreamPool:
    """A route's endpoints with their client, rotation and health.

    Args:
        route: The route name (logs, metrics).
        config: The upstream block.
        credentials: The gateway's identity for mTLS.
        revocations: Revoked serials, checked at each upstream handshake (None: not
            checked, which the configuration must say explicitly).
        on_health: Told about every health change.
        on_attempt: Told about every forwarding attempt.
    """

    def __init__(
        self,
        route: str,
        config: UpstreamConfig,
        credentials: Credentials,
        revocations: Revocations | None,
        *,
        on_health: HealthListener | None = None,
        on_attempt: AttemptListener | None = None,
    ) -> None:
        self.route = route
        self.config = config
        self.endpoints = [Endpoint(url, _label(url)) for url in config.urls]
        recycling = _Recycling(credentials, revocations)
        check = PeerCheck(config.id, revocations)
        self.pools = {e: _endpoint_pool(e, config, recycling, check) for e in self.endpoints}
        self._next = 0
        self._on_health = on_health
        self._on_attempt = on_attempt
        self.inflight = 0
        for endpoint in self.endpoints:
            self._report(endpoint, True)

    def pick(self, tried: set[Endpoint], *, now: float | None = None) -> Endpoint:
        """Choose the next endpoint, round robin, preferring healthy ones not yet tried.

        An endpoint whose ejection ran out gets one trial request at a time. With no
        healthy endpoint left, endpoints are used in turn regardless of health.
        """
        current = time.monotonic() if now is None else now
        count = len(self.endpoints)
        eject_after = self.config.eject_after
        fallback: Endpoint | None = None
        for step in range(count):
            endpoint = self.endpoints[(self._next + step) % count]
            if endpoint in tried:
                continue
            if endpoint.healthy(eject_after):
                self._next = (self._next + step + 1) % count
                return endpoint
            if current >= endpoint.ejected_until and not endpoint.trial:
                endpoint.trial = True
                self._next = (self._next + step + 1) % count
                return endpoint
            if fallback is None or endpoint.ejected_until < fallback.ejected_until:
                fallback = endpoint
        if fallback is None:  # every endpoint was tried: go round again
            fallback = self.endpoints[self._next % count]
        self._next = (self.endpoints.index(fallback) + 1) % count
        return fallback

    def succeeded(self, endpoint: Endpoint) -> None:
        """The endpoint answered (any status): it is healthy."""
        endpoint.trial = False
        if endpoint.failures:
            recovered = not endpoint.healthy(self.config.eject_after)
            endpoint.failures = 0
            endpoint.ejected_until = 0.0
            if recovered:
                log.info(
                    "upstream %s of route %s is back",
                    endpoint.label,
                    self.route,
                    extra={
                        "event": "upstream_recovered",
                        "route": self.route,
                        "endpoint": endpoint.label,
                    },
                )
                self._report(endpoint, True)

    def failed(self, endpoint: Endpoint, error: UpstreamError, *, now: float | None = None) -> None:
        """Count a failure; connect failures and timeouts in a row eject the endpoint."""
        endpoint.trial = False
        if error.reason not in ("upstream_unavailable", "upstream_timeout"):
            return
        endpoint.failures += 1
        if endpoint.failures < self.config.eject_after:
            return
        current = time.monotonic() if now is None else now
        first = endpoint.failures == self.config.eject_after
        endpoint.ejected_until = current + self.config.eject_for
        log.warning(
            "upstream %s of route %s ejected for %gs after %d failures in a row (last: %s)",
            endpoint.label,
            self.route,
            self.config.eject_for,
            endpoint.failures,
            error,
            extra={"event": "upstream_ejected", "route": self.route, "endpoint": endpoint.label},
        )
        if first:
            self._report(endpoint, False)

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        target: str,
        headers: list[tuple[bytes, bytes]],
        response_headers: list[tuple[bytes, bytes]],
        max_body: int | None,
        body: bytes | None,
    ) -> Forwarded:
        """Relay the request to an endpoint, retrying where that is safe.

        A failed attempt is retried on another endpoint (up to ``retries`` more times)
        when no request byte can have reached the upstream (connect failures), or when
        the method is idempotent and the body was read whole beforehand (``body``).

        Args:
            target: Path and query for the upstream (already rewritten).
            headers: Request headers to send.
            response_headers: Added to the response.
            max_body: Body size limit (:class:`trustmesh.relay.BodyTooLarge`).
            body: The body, read beforehand, so the request can be replayed.

        Raises:
            BodyTooLarge: From the relay (nothing was sent to the client).
            ClientDisconnected: From the relay.
        """
        tried: set[Endpoint] = set()
        idempotent = body is not None and scope["method"] in IDEMPOTENT_METHODS
        attempts = 0
        while True:
            endpoint = self.pick(tried)
            tried.add(endpoint)
            attempts += 1
            try:
                status = await relay(
                    scope,
                    receive,
                    send,
                    client=self.pools[endpoint],
                    url=endpoint.url + target,
                    headers=headers,
                    max_body=max_body,
                    response_headers=response_headers,
                    body=body,
                )
            except UpstreamError as exc:
                self.failed(endpoint, exc)
                if self._on_attempt is not None:
                    self._on_attempt(self.route, endpoint.label, exc.reason)
                if attempts > self.config.retries or not (exc.retryable or idempotent):
                    return Forwarded(exc.status, endpoint, attempts, exc)
                log.info(
                    "route %s: %s failed (%s); retrying on another endpoint",
                    self.route,
                    endpoint.label,
                    exc.reason,
                    extra={
                        "event": "upstream_retry",
                        "route": self.route,
                        "endpoint": endpoint.label,
                    },
                )
                continue
            except BaseException:
                endpoint.trial = False
                raise
            if status == CLIENT_LEFT:
                endpoint.trial = False
            else:
                self.succeeded(endpoint)
            if self._on_attempt is not None:
                self._on_attempt(self.route, endpoint.label, str(status))
            return Forwarded(status, endpoint, attempts, None)

    def _report(self, endpoint: Endpoint, healthy: bool) -> None:
        if self._on_health is not None:
            self._on_health(self.route, endpoint.label, healthy)

    def health(self) -> dict[str, bool]:
        """Endpoint label -> in rotation."""
        eject_after = self.config.eject_after
        return {e.label: e.healthy(eject_after) for e in self.endpoints}

    async def aclose(self) -> None:
        """Close every endpoint's connections."""
        for pool in self.pools.values():
            await pool.aclose()


def _endpoint_pool(
    endpoint: Endpoint, config: UpstreamConfig, recycling: _Recycling, check: PeerCheck
) -> Pool:
    """The endpoint's connection pool: mTLS with the current credentials, the SPIFFE ID
    (not the host name) and revocation checked after each handshake."""
    parts = urlsplit(endpoint.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443

    def check_peer(ssl_object: ssl.SSLObject) -> None:
        check(ssl_object, host, port)

    def context() -> ssl.SSLContext:
        return recycling.client_context(check_hostname=False)

    return Pool(
        host,
        port,
        ssl_context=context,
        check_peer=check_peer,
        generation=lambda: recycling.generation,
        max_connections=MAX_CONNECTIONS,
        connect_timeout=config.connect_timeout,
        idle_timeout=KEEPALIVE_EXPIRY,
        timeout=config.timeout,
    )


def _label(url: str) -> str:
    return urlsplit(url).netloc
