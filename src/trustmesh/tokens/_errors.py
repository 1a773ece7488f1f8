"""Why a token was refused: typed errors with a machine-readable reason code."""

from __future__ import annotations

from trustmesh.errors import TokenError, TokenExpiredError

__all__ = [
    "REASONS",
    "ExpiredTokenError",
    "InvalidTokenError",
    "TokenVerifierUnavailableError",
]

#: Every reason code a refusal can carry, with the check that produced it.
REASONS: dict[str, str] = {
    "too_large": "the token is longer than the size cap (8 KiB) and was not parsed",
    "malformed": "not a compact JWS of three base64url parts with JSON objects",
    "bad_header": "the header has a parameter we refuse (crit extensions, non-string kid)",
    "alg_not_allowed": "the header alg is none, HMAC, or not in the issuer's allowed list",
    "alg_mismatch": "the header alg is not the algorithm pinned to the key the kid names",
    "not_access_token": "typ is not at+jwt (RFC 9068) or the token is an ID token",
    "bad_issuer": "iss is missing or not exactly a configured issuer",
    "missing_kid": "no kid and more than one candidate key",
    "unknown_kid": "no key with this kid in the issuer's JWKS, even after a refetch",
    "bad_signature": "the signature does not verify with the pinned key",
    "missing_aud": "aud is absent or empty",
    "bad_audience": "none of the token's audiences is an expected one",
    "missing_exp": "exp is absent",
    "missing_claim": "a claim RFC 9068 requires (sub, client_id, iat, jti) is absent",
    "bad_claim": "a claim has the wrong JSON type",
    "expired": "exp is in the past, beyond the leeway",
    "not_yet_valid": "nbf or iat is in the future, beyond the leeway",
    "lifetime_too_long": "exp - iat exceeds the issuer's maximum lifetime",
    "revoked": "the jti is on the issuer's revocation list",
    "cnf_missing_cert": "a certificate-bound token arrived without the caller's certificate",
    "cnf_mismatch": "the caller's certificate is not the one the token is bound to",
    "cnf_unsupported": "cnf names a confirmation method other than x5t#S256",
    "unbound": "the issuer requires certificate-bound tokens and this one is not bound",
    "inactive": "the introspection endpoint says the opaque token is not active",
    "opaque_unsupported": "an opaque token, and no issuer has introspection configured",
    "keys_unavailable": "the issuer's keys could not be fetched and none are cached",
    "revocation_unavailable": "the revocation list is older than its maximum staleness",
    "introspection_unavailable": "the introspection endpoint could not be reached",
}


class InvalidTokenError(TokenError):
    """A token was refused.

    Args:
        reason: Machine-readable code, one of :data:`REASONS`.
        message: One line saying which check failed, expected vs. found, and a fix.
        **details: Structured context (``issuer=``, ``kid=``, ``claim=``...).

    .. versionadded:: 0.1
    """

    def __init__(self, reason: str, message: str, **details: str | int | None) -> None:
        super().__init__(message, reason=reason, **details)
        self.reason = reason


class ExpiredTokenError(InvalidTokenError, TokenExpiredError):
    """The token is expired or not yet valid (reasons ``expired``, ``not_yet_valid``)."""


class TokenVerifierUnavailableError(InvalidTokenError):
    """The verifier could not decide because the issuer was unreachable.

    Reasons ``keys_unavailable``, ``revocation_unavailable``,
    ``introspection_unavailable``: a gateway answers 503, not 401.
    """
