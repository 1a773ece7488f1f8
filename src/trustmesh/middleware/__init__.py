"""Identity in the app: ASGI and WSGI middleware that admit only verified, allowed callers.

::

    app = MTLSMiddleware(app, trust_domain="example.org", policy=policy,
                         revocation=revocations, verifier=AsyncVerifier(issuer))

Each request's caller (SPIFFE ID, serial, leaf) and user (verified token claims)
are at ``scope["trustmesh"]`` / ``environ["trustmesh"]``; FastAPI and Flask
helpers live in :mod:`trustmesh.middleware.fastapi` and
:mod:`trustmesh.middleware.flask`. See docs/services.md.
"""

from ._asgi import AsyncTokenVerifier, MTLSMiddleware
from ._core import (
    FORWARDED_CALLER_HEADER,
    FORWARDED_CERT_CHAIN_HEADER,
    FORWARDED_CERT_HEADER,
    IDENTITY_HEADER_PREFIX,
    IDENTITY_HEADERS,
    Caller,
    DecisionLike,
    PolicyLike,
    RequestIdentity,
    RevocationLike,
    forwarded_certificate_header,
    is_identity_header,
)
from ._wsgi import PEER_CERT_ENVIRON_KEY, MTLSWSGIMiddleware, TokenVerifier

__all__ = [
    "FORWARDED_CALLER_HEADER",
    "FORWARDED_CERT_CHAIN_HEADER",
    "FORWARDED_CERT_HEADER",
    "IDENTITY_HEADERS",
    "IDENTITY_HEADER_PREFIX",
    "PEER_CERT_ENVIRON_KEY",
    "AsyncTokenVerifier",
    "Caller",
    "DecisionLike",
    "MTLSMiddleware",
    "MTLSWSGIMiddleware",
    "PolicyLike",
    "RequestIdentity",
    "RevocationLike",
    "TokenVerifier",
    "forwarded_certificate_header",
    "is_identity_header",
]
