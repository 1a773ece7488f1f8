"""Sidecar proxies for services that do not speak mTLS themselves.

``trustmesh proxy inbound`` terminates mTLS in front of a plain local port (TCP mode with
PROXY protocol v2, or HTTP mode with the full policy); ``trustmesh proxy outbound`` lets a
plain local client call an mTLS service. See docs/sidecars.md.
"""

import sys

if "httpx" not in sys.modules:
    # The revocation feed's client is httpx, whose package imports its own command line
    # (rich and pygments, ~5 MB resident) whenever they are installed. A sidecar never
    # runs that command line: its import fails quietly and httpx.main says so if called.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

from ._proxy_protocol import (
    PP2_SIGNATURE,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_SPIFFE_ID,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    TLSInfo,
    proxy_v2_header,
)
from ._run import run_inbound, run_outbound, validate_inbound, validate_outbound
from ._sidecar import InboundSettings, OutboundSettings, ProxySettings

__all__ = [
    "PP2_SIGNATURE",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_SPIFFE_ID",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "InboundSettings",
    "OutboundSettings",
    "ProxySettings",
    "TLSInfo",
    "proxy_v2_header",
    "run_inbound",
    "run_outbound",
    "validate_inbound",
    "validate_outbound",
]
