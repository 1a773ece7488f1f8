"""The edge gateway: user tokens in, mTLS out (``trustmesh gateway serve``).

Checks each user's bearer token against configured issuers, applies per-route rules
(scopes, roles, claims, CIDR lists, rate limits), strips every client-supplied identity
and forwarding header, and forwards to an upstream pool over mTLS with the gateway's own
identity, passing the user's token on. See docs/gateway.md.
"""
