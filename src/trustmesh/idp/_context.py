"""What every part of the identity server shares: settings, store, keys, metrics, audit.

One :class:`IdpContext` is built per server (``create_context``) and handed to the app,
the Authlib ``AuthorizationServer`` and every extension (the user side plugs in here).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from trustmesh.authority import CertificateAuthority
from trustmesh.errors import StoreError
from trustmesh.serving import LATENCY_BUCKETS
from trustmesh.store import Store

from ._keys import KeyRing
from ._oauth import IdpOAuth2Request

__all__ = [
    "METRICS_CONTENT_TYPE",
    "AuthorizationServerHandle",
    "IdpContext",
    "IdpMetrics",
    "IdpSettings",
]

log = logging.getLogger("trustmesh.idp")
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass
class IdpSettings:
    """Runtime settings of ``idp serve``.

    Args:
        issuer: The issuer URL (``iss``; no trailing slash).
        access_ttl: Access-token lifetime in seconds (default 10 min).
        leeway: Clock skew tolerated on client assertions, seconds.
        assertion_max_lifetime: Longest ``exp - iat`` of a private_key_jwt assertion.
        token_rate, token_burst: ``/token`` requests per second (and burst) per client.
        ip_rate, ip_burst: ``/token`` requests per second (and burst) per client address.
        max_body: Largest request body accepted, bytes (413 after).
        body_timeout: Seconds a request body may take to arrive.
        key_reload_interval: Seconds between reloads of the signing keys.
    """

    issuer: str
    access_ttl: int = 600
    leeway: int = 60
    assertion_max_lifetime: int = 300
    token_rate: float = 50.0
    token_burst: int = 100
    ip_rate: float = 200.0
    ip_burst: int = 400
    max_body: int = 32 * 1024
    body_timeout: float = 10.0
    key_reload_interval: float = 1.0

    def endpoint(self, path: str) -> str:
        """The absolute URL of a route of this server."""
        return f"{self.issuer}{path}"


class IdpMetrics:
    """Prometheus metrics of one server (own registry, so tests can build many)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.issued = Counter(
            "trustmesh_idp_tokens_issued",
            "Access tokens issued, by grant type",
            ["grant_type"],
            registry=self.registry,
        )
        self.denied = Counter(
            "trustmesh_idp_denials",
            "Requests refused, by route and reason (OAuth error code)",
            ["route", "reason"],
            registry=self.registry,
        )
        self.revoked = Counter(
            "trustmesh_idp_revocations",
            "Tokens revoked, by type",
            ["token_type"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "trustmesh_idp_request_seconds",
            "Request latency",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class AuthorizationServerHandle(Protocol):
    """What the context hands out of the Authlib server (``IdpAuthorizationServer``).

    The context holds this interface, not the server class, so the server module can
    import the context without a cycle; extensions see the server through it.
    """

    #: Called as ``listener(token_dict, request)`` after every issued token.
    token_listeners: list[Callable[[dict[str, Any], IdpOAuth2Request], None]]

    @property
    def grant_types_supported(self) -> list[str]: ...

    @property
    def response_types_supported(self) -> list[str]: ...

    @property
    def client_auth_methods(self) -> list[str]: ...

    def register_grant(self, grant_cls: Any, extensions: Any = None) -> None: ...

    def register_token_generator(self, grant_type: str, func: Callable[..., Any]) -> None: ...

    def get_authorization_grant(self, request: Any) -> Any: ...

    def generate_bearer_token(
        self,
        grant_type: str,
        client: Any,
        user: Any = None,
        scope: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]: ...


@dataclass
class IdpContext:
    """The identity server's shared state.

    Attributes:
        ca: The CA (its bundle and intermediate verify tls_client_auth certificates).
        store: The database (the CA's).
        keys: The signing keys.
        settings: Runtime settings.
        metrics: Prometheus metrics.
        metadata: Extra discovery fields extensions add (merged last).
        server: The Authlib authorization server (set by :func:`create_server`).
    """

    ca: CertificateAuthority
    store: Store
    keys: KeyRing
    settings: IdpSettings
    metrics: IdpMetrics = field(default_factory=IdpMetrics)
    metadata: dict[str, Any] = field(default_factory=dict)
    server: AuthorizationServerHandle | None = None
    # SQLite has one writer at a time and makes waiting writers sleep (busy timeout back-off);
    # queueing our own writers on a lock instead keeps p99 latency down.
    _writes: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def issuer(self) -> str:
        """The issuer URL."""
        return self.settings.issuer

    def authorization_server(self) -> AuthorizationServerHandle:
        """The Authlib server (raises if the app was not built yet)."""
        if self.server is None:
            raise RuntimeError("The AuthorizationServer is created by create_app().")
        return self.server

    def audit(
        self, action: str, subject: str, *, actor: str, details: dict[str, Any] | None = None
    ) -> None:
        """Append an event to the audit chain (its own transaction).

        A database failure is logged, not raised: the request it records already
        happened. ``details`` must never hold secrets or token contents.
        """
        try:
            lock = self._writes if self.store.dialect == "sqlite" else contextlib.nullcontext()
            with lock, self.store.transaction() as conn:
                self.store.append_audit(
                    conn,
                    at=datetime.fromtimestamp(int(time.time()), UTC),
                    actor=actor,
                    action=action,
                    subject=subject,
                    details=details,
                )
        except StoreError as exc:
            log.warning(
                "could not audit %s: %s", action, exc.message, extra={"event": "audit_failed"}
            )
