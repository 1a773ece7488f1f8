"""Request headers only a trusted hop may set: the one list the gateway, the sidecar and
the middleware strip from callers they cannot vouch for.

A caller can write any header. Those that name an identity (``X-User``, ``Client-Cert``,
``X-Trustmesh-*``), a client address or forwarding hop (``X-Forwarded-*``, ``Forwarded``,
``X-Real-IP``, ``True-Client-IP``, ``CF-Connecting-IP``) or an override of the request
line (``X-Original-URL``, ``X-Rewrite-URL``, ``X-HTTP-Method-Override``) would be believed
by an app written for a proxy that sets them. Paths and methods are what the policy
decides on, so an app that honours an override could be steered past it. Every spelling
counts: any case, ``_`` for ``-``, surrounding blanks.

This module imports nothing: the gateway (``gateway/_headers.py``), the sidecar
(``proxy/_http.py``) and the middleware all read it.

.. versionadded:: 0.1
"""

from __future__ import annotations

__all__ = [
    "IDENTITY_HEADERS",
    "IDENTITY_HEADER_PREFIX",
    "SPOOFABLE_HEADERS",
    "SPOOFABLE_PREFIXES",
    "is_spoofable",
    "is_spoofable_normalized",
    "normalize_header_name",
]

#: Every header starting with this is ours; only trusted proxies may send them.
IDENTITY_HEADER_PREFIX = "x-trustmesh-"
#: Identity headers proxies and servers commonly set. From a peer that is not a
#: trusted proxy they are removed before the app sees the request, in every
#: spelling (case, ``_`` for ``-``, repeated). Names are lower case with ``-``.
IDENTITY_HEADERS = frozenset(
    {
        "client-cert",  # RFC 9440
        "client-cert-chain",
        "x-forwarded-client-cert",
        "x-client-cert",
        "x-client-cert-chain",
        "x-ssl-client-cert",
        "ssl-client-cert",
        "x-ssl-client-verify",
        "x-client-verify",
        "x-ssl-client-dn",
        "x-ssl-client-s-dn",
        "x-client-dn",
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-preferred-username",
        "x-auth-request-user",
        "x-auth-request-email",
        "x-remote-user",
        "remote-user",
        "x-spiffe-id",
    }
)

#: Any header starting with one of these (lower case, ``-``) is refused from callers.
SPOOFABLE_PREFIXES: tuple[bytes, ...] = (
    b"x-forwarded",  # X-Forwarded-For/-Proto/-Host/-Port/-Prefix/-Server/-User/-Client-Cert
    b"x-original-",  # X-Original-URL/-Method/-Host/-Forwarded-For (rewrites, ingress hops)
    b"x-user",  # X-User, X-User-Id, X-Userinfo, ...
    b"x-client-",  # X-Client-Cert, X-Client-IP, X-Client-Verify, ...
    b"x-auth-",  # X-Auth-Request-User, X-Auth-User, ...
    b"x-remote-",  # X-Remote-User, X-Remote-Addr, ...
    b"x-envoy-",  # Envoy's internal and identity headers
    IDENTITY_HEADER_PREFIX.encode("ascii"),  # ours: x-trustmesh-
    # What well-known authenticating proxies put in front of apps (an app behind the
    # gateway may have been written for one of them and believe these):
    b"remote-",  # Authelia and others: Remote-User, Remote-Email, Remote-Groups
    b"x-amzn-oidc-",  # AWS ALB: X-Amzn-Oidc-Identity, -Data, -Accesstoken
    b"x-goog-authenticated-",  # Google IAP: X-Goog-Authenticated-User-Email/-Id
    b"x-goog-iap-",  # Google IAP: X-Goog-IAP-JWT-Assertion
    b"x-ms-client-principal",  # Azure App Service auth: X-MS-CLIENT-PRINCIPAL(-NAME/-ID)
    b"x-ms-token-",  # Azure App Service auth: X-MS-TOKEN-AAD-ACCESS-TOKEN, ...
    b"cf-access-",  # Cloudflare Access: Cf-Access-Jwt-Assertion, -Authenticated-User-Email
    b"x-pomerium-",  # Pomerium: X-Pomerium-Jwt-Assertion, X-Pomerium-Claim-*
    b"tailscale-user-",  # Tailscale serve: Tailscale-User-Login, -Name
    b"x-webauth-",  # Grafana-style auth proxies: X-WEBAUTH-USER
    b"x-azure-",  # Azure Front Door: X-Azure-ClientIP, X-Azure-SocketIP
)

#: Exact names refused from callers (lower case, ``-``), besides the prefixes.
SPOOFABLE_HEADERS: frozenset[bytes] = frozenset(
    {name.encode("ascii") for name in IDENTITY_HEADERS}
    | {
        # client addresses
        b"forwarded",
        b"x-real-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"x-cluster-client-ip",
        b"fastly-client-ip",
        b"x-originating-ip",
        b"x-proxyuser-ip",
        b"proxy-client-ip",
        b"wl-proxy-client-ip",
        b"x-client-ip",
        b"client-ip",
        # overrides of the request line
        b"x-host",
        b"x-rewrite-url",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-http-host-override",
        # identities
        b"client-cert",
        b"client-cert-chain",
        b"x-remote-user",
        b"remote-user",
        b"x-remote-addr",
        b"x-spiffe-id",
    }
)

# Answers remembered per raw spelling (bounded: callers choose the names).
_CACHE_LIMIT = 4096
_spoofable: dict[bytes | str, bool] = {}


def normalize_header_name(name: bytes) -> bytes:
    """The spelling every variant of a header name maps to: trimmed, lower case, ``-``."""
    return name.strip(b" \t").lower().replace(b"_", b"-")


def is_spoofable_normalized(norm: bytes) -> bool:
    """:func:`is_spoofable` for a name already through :func:`normalize_header_name`."""
    return norm in SPOOFABLE_HEADERS or norm.startswith(SPOOFABLE_PREFIXES)


def is_spoofable(name: bytes | str) -> bool:
    """Whether only a trusted hop may set this header (any case, ``_`` for ``-``).

    Args:
        name: The header name as received (bytes from ASGI; text from a WSGI
            ``HTTP_*`` key without the prefix works too).
    """
    found = _spoofable.get(name)
    if found is None:
        raw = name if isinstance(name, bytes) else name.encode("latin-1", "replace")
        norm = normalize_header_name(raw)
        found = is_spoofable_normalized(norm)
        if len(_spoofable) < _CACHE_LIMIT:
            _spoofable[name] = found
    return found
