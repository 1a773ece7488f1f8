"""The gateway's Prometheus metrics, and the plain-HTTP app that serves them.

Served only on the separate ``metrics.listen`` listener (loopback), never on the public
port. Label children are cached so counting a request costs a few dictionary lookups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from trustmesh.serving import LATENCY_BUCKETS, RevocationCollector

__all__ = ["GatewayMetrics"]


class GatewayMetrics:
    """Every metric the gateway exports, in its own registry.

    Metrics:
        ``trustmesh_gateway_requests_total{route,status,reason}``: requests answered.
        ``trustmesh_gateway_request_duration_seconds{route}``: time to the last byte.
        ``trustmesh_gateway_denies_total{reason}``: refusals by the gateway itself.
        ``trustmesh_gateway_alerts_total``: alerts fired by the deny rule.
        ``trustmesh_gateway_upstream_requests_total{route,endpoint,outcome}``: forwarding
            attempts (``outcome`` is the status code or the failure reason).
        ``trustmesh_gateway_upstream_healthy{route,endpoint}``: 1 in rotation, 0 ejected.
        ``trustmesh_gateway_upstream_ejections_total{route,endpoint}``.
        ``trustmesh_gateway_inflight_requests``.
        ``trustmesh_gateway_config_reloads_total{outcome}`` (``ok``/``error``) and
        ``trustmesh_gateway_config_generation``.
        ``trustmesh_gateway_revocation_*``: the upstream revocation set (healthy,
            connected, revoked serials, events...).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "trustmesh_gateway_requests_total",
            "Requests answered by the gateway, by route, status and decision reason.",
            ("route", "status", "reason"),
            registry=r,
        )
        self.duration = Histogram(
            "trustmesh_gateway_request_duration_seconds",
            "Time from the request to the response's last byte.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.denies = Counter(
            "trustmesh_gateway_denies_total",
            "Requests the gateway refused, by reason.",
            ("reason",),
            registry=r,
        )
        self.alerts = Counter(
            "trustmesh_gateway_alerts_total", "Alerts fired by the deny rule.", registry=r
        )
        self.upstream = Counter(
            "trustmesh_gateway_upstream_requests_total",
            "Forwarding attempts by route, endpoint and outcome (status or failure reason).",
            ("route", "endpoint", "outcome"),
            registry=r,
        )
        self.healthy = Gauge(
            "trustmesh_gateway_upstream_healthy",
            "1 while an upstream endpoint is in rotation, 0 while ejected.",
            ("route", "endpoint"),
            registry=r,
        )
        self.ejections = Counter(
            "trustmesh_gateway_upstream_ejections_total",
            "Times an upstream endpoint was taken out of rotation.",
            ("route", "endpoint"),
            registry=r,
        )
        self.inflight = Gauge(
            "trustmesh_gateway_inflight_requests", "Requests being handled.", registry=r
        )
        self.reloads = Counter(
            "trustmesh_gateway_config_reloads_total",
            "Configuration reloads by outcome (ok, error).",
            ("outcome",),
            registry=r,
        )
        self.generation = Gauge(
            "trustmesh_gateway_config_generation",
            "The configuration generation in force (1 at start, +1 per successful reload).",
            registry=r,
        )
        self._request_children: dict[tuple[str, int, str], Any] = {}
        self._duration_children: dict[str, Any] = {}
        self._upstream_children: dict[tuple[str, str, str], Any] = {}

    def observe(self, route: str, status: int, reason: str, seconds: float) -> None:
        """Count one answered request."""
        key = (route, status, reason)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(route, str(status), reason)
        child.inc()
        timer = self._duration_children.get(route)
        if timer is None:
            timer = self._duration_children[route] = self.duration.labels(route)
        timer.observe(seconds)

    def deny(self, reason: str) -> None:
        """Count one refusal."""
        self.denies.labels(reason).inc()

    def attempt(self, route: str, endpoint: str, outcome: str) -> None:
        """Count one forwarding attempt."""
        key = (route, endpoint, outcome)
        child = self._upstream_children.get(key)
        if child is None:
            child = self._upstream_children[key] = self.upstream.labels(route, endpoint, outcome)
        child.inc()

    def health(self, route: str, endpoint: str, healthy: bool) -> None:
        """Record an endpoint's health change."""
        self.healthy.labels(route, endpoint).set(1 if healthy else 0)
        if not healthy:
            self.ejections.labels(route, endpoint).inc()

    def forget_route(self, route: str, endpoints: list[str]) -> None:
        """Drop the health gauges of a route that a reload removed."""
        for endpoint in endpoints:
            try:
                self.healthy.remove(route, endpoint)
            except KeyError:
                pass

    def add_revocations(self, source: Callable[[], Mapping[str, float]]) -> None:
        """Export a revocation set's counters (``RevocationSet.metrics``)."""
        self.registry.register(RevocationCollector(source, "trustmesh_gateway_revocation"))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
