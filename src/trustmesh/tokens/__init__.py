"""Access-token verification: JWTs (RFC 9068) against pinned JWKS keys, opaque
tokens by introspection (RFC 7662), certificate binding (RFC 8705).

::

    config = IssuerConfig("https://idp.example:9443", audiences=["orders"],
                          ca_bundle=Path("bundle.pem"))
    async with AsyncVerifier(config) as verifier:
        claims = await verifier.verify_access_token(token, client_cert=peer_cert)

Every refusal is an :class:`InvalidTokenError` whose ``.reason`` is one of
:data:`REASONS`. This package fetches keys with httpx and imports no web
framework, database or CLI library.
"""

from ._claims import AccessTokenClaims, certificate_thumbprint
from ._config import (
    DEFAULT_ALGORITHMS,
    DEFAULT_LEEWAY,
    DEFAULT_MAX_LIFETIME,
    MAX_TOKEN_BYTES,
    IntrospectionConfig,
    IssuerConfig,
)
from ._errors import REASONS, ExpiredTokenError, InvalidTokenError, TokenVerifierUnavailableError
from ._keys import ASYMMETRIC_ALGORITHMS, KeySet, VerificationKey, load_jwk, load_jwks
from ._svid import (
    JWT_SVID_ALGORITHMS,
    JWT_SVID_LEEWAY,
    JWT_SVID_MAX_LIFETIME,
    VerifiedJWTSVID,
    jwt_svid_keys,
    verify_jwt_svid,
)
from ._verifier import DEFAULT_TOKEN_CACHE_SIZE, AsyncVerifier, Verifier

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DEFAULT_ALGORITHMS",
    "DEFAULT_LEEWAY",
    "DEFAULT_MAX_LIFETIME",
    "DEFAULT_TOKEN_CACHE_SIZE",
    "JWT_SVID_ALGORITHMS",
    "JWT_SVID_LEEWAY",
    "JWT_SVID_MAX_LIFETIME",
    "MAX_TOKEN_BYTES",
    "REASONS",
    "AccessTokenClaims",
    "AsyncVerifier",
    "ExpiredTokenError",
    "IntrospectionConfig",
    "InvalidTokenError",
    "IssuerConfig",
    "KeySet",
    "TokenVerifierUnavailableError",
    "VerificationKey",
    "VerifiedJWTSVID",
    "Verifier",
    "certificate_thumbprint",
    "jwt_svid_keys",
    "load_jwk",
    "load_jwks",
    "verify_jwt_svid",
]
