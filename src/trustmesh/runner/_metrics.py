"""``trustmesh run --metrics-listen``: the service's Prometheus metrics and its health and
readiness answers, on a plain-HTTP side listener that never reaches the app or the policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from trustmesh.serving import RevocationCollector, metrics_app
from trustmesh.tls import RevocationSet, RotatingCredentials, add_refusal_listener

__all__ = ["RunMetrics"]


class RunMetrics:
    """Every metric ``trustmesh run`` exports, in its own registry.

    Metrics:
        ``trustmesh_service_requests_total{outcome,reason}``: requests decided by the
            identity middleware (``allow``/``deny``/``audit_deny`` and the reason code).
        ``trustmesh_run_handshake_failures_total{reason}``: refused TLS handshakes.
        ``trustmesh_run_certificate_expiry_seconds``: seconds until the served
            certificate expires (negative once it has).
        ``trustmesh_run_credentials_reloads`` / ``..._reload_failures``: certificate
            reloads that succeeded and that failed.
        ``trustmesh_run_revocation_*``: the revocation set (``connected``, ``healthy``,
            ``revoked``, ``events_total``...), when a feed is configured.
    """

    def __init__(self, credentials: RotatingCredentials, revocations: RevocationSet | None) -> None:
        self.registry = CollectorRegistry()
        self.credentials = credentials
        self.revocations = revocations
        self.handshake_failures = Counter(
            "trustmesh_run_handshake_failures",
            "TLS handshakes refused, by reason.",
            ("reason",),
            registry=self.registry,
        )
        expiry = Gauge(
            "trustmesh_run_certificate_expiry_seconds",
            "Seconds until the served certificate expires.",
            registry=self.registry,
        )
        expiry.set_function(self._expiry_seconds)
        Gauge(
            "trustmesh_run_credentials_reloads",
            "Certificate reloads that succeeded.",
            registry=self.registry,
        ).set_function(lambda: credentials.reloads)
        Gauge(
            "trustmesh_run_credentials_reload_failures",
            "Certificate reloads that failed (the previous certificate stays in use).",
            registry=self.registry,
        ).set_function(lambda: credentials.failures)
        if revocations is not None:
            self.registry.register(
                RevocationCollector(revocations.metrics, "trustmesh_run_revocation")
            )
        add_refusal_listener(lambda reason: self.handshake_failures.labels(reason).inc())

    def _expiry_seconds(self) -> float:
        return (self.credentials.leaf.not_valid_after_utc - datetime.now(UTC)).total_seconds()

    def readiness(self) -> tuple[bool, Mapping[str, object]]:
        """Ready while the certificate is valid and, with a feed, the feed is connected."""
        seconds = self._expiry_seconds()
        details: dict[str, object] = {
            "credentials": "loaded" if seconds > 0 else "expired",
            "spiffe_id": self.credentials.spiffe_id,
            "certificate_expires_in_s": int(seconds),
        }
        ready = seconds > 0
        if self.revocations is not None:
            connected = self.revocations.connected
            details["revocation_feed"] = "connected" if connected else "disconnected"
            ready = ready and connected
        return ready, details

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)

    def app(self) -> Any:
        """The side listener's ASGI app (``/metrics``, ``/healthz``, ``/readyz``)."""
        return metrics_app(self.render, readiness=self.readiness)
