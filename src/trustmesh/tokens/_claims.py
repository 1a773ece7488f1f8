"""The typed result of a successful verification."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = ["AccessTokenClaims", "certificate_thumbprint"]


def certificate_thumbprint(cert: x509.Certificate | bytes) -> str:
    """Return ``x5t#S256`` for a certificate: base64url(SHA-256(DER)), RFC 8705 §3.1.

    Args:
        cert: The certificate, or its DER bytes.
    """
    der = cert if isinstance(cert, bytes) else cert.public_bytes(Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


class AccessTokenClaims(NamedTuple):
    """A verified access token (immutable: verified tokens are cached and shared).

    Attributes:
        issuer: ``iss``.
        subject: ``sub`` (the client id for machine tokens, the user id for users).
        audience: ``aud`` as a tuple.
        client_id: ``client_id``.
        expires_at: ``exp`` (UNIX seconds).
        issued_at: ``iat``.
        not_before: ``nbf`` when present.
        jwt_id: ``jti``.
        scopes: ``scope`` split on spaces.
        roles: ``roles``.
        certificate_thumbprint: ``cnf["x5t#S256"]`` for certificate-bound tokens.
        claims: Every claim as received (read-only).
        source: ``"jwt"`` or ``"introspection"``.

    .. versionadded:: 0.1
    """

    issuer: str
    subject: str
    audience: tuple[str, ...]
    client_id: str | None
    expires_at: int
    issued_at: int | None
    not_before: int | None
    jwt_id: str | None
    scopes: frozenset[str]
    roles: tuple[str, ...]
    certificate_thumbprint: str | None
    claims: Mapping[str, object]
    source: str = "jwt"

    def has_scope(self, scope: str) -> bool:
        """Whether the token grants ``scope``."""
        return scope in self.scopes

    def to_dict(self) -> dict[str, object]:
        """The claims as received, for JSON output."""
        return dict(self.claims)
