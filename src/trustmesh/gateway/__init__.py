"""The edge gateway: user tokens in, mTLS out (``trustmesh gateway serve``).

Checks each user's bearer token against configured issuers, applies per-route rules
(scopes, roles, claims, CIDR lists, rate limits), strips every client-supplied identity
and forwarding header, and forwards to an upstream pool over mTLS with the gateway's own
identity, passing the user's token on. See docs/gateway.md.
"""

from ._app import GatewayApp, GatewayState
from ._config import (
    AlertsConfig,
    GatewayConfig,
    IssuerEntry,
    RateLimitsConfig,
    RateSpec,
    RouteConfig,
    UpstreamConfig,
    describe_config,
    load_config,
    parse_config,
)
from ._metrics import GatewayMetrics
from ._serve import Gateway, PublicCertificate, build_state, run_gateway
from ._upstream import UpstreamPool

__all__ = [
    "AlertsConfig",
    "Gateway",
    "GatewayApp",
    "GatewayConfig",
    "GatewayMetrics",
    "GatewayState",
    "IssuerEntry",
    "PublicCertificate",
    "RateLimitsConfig",
    "RateSpec",
    "RouteConfig",
    "UpstreamConfig",
    "UpstreamPool",
    "build_state",
    "describe_config",
    "load_config",
    "parse_config",
    "run_gateway",
]
