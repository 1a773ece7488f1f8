"""Sidecar proxies for services that do not speak mTLS themselves.

``trustmesh proxy inbound`` terminates mTLS in front of a plain local port (TCP mode with
PROXY protocol v2, or HTTP mode with the full policy); ``trustmesh proxy outbound`` lets a
plain local client call an mTLS service. See docs/sidecars.md.
"""
