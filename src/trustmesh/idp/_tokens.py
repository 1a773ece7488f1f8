"""Access tokens (RFC 9068 JWTs): minted, read back, revoked; refresh tokens looked up.

Access tokens are signed by the current key of the :class:`~trustmesh.idp.KeyRing`
with header ``{"alg", "typ": "at+jwt", "kid"}`` and claims ``iss``, ``aud`` (one
string), ``sub``, ``client_id``, ``iat``, ``nbf``, ``exp``, ``jti``, ``scope``,
``roles`` and, for certificate-bound tokens, ``cnf: {"x5t#S256": ...}`` (RFC 8705).

Refresh tokens are opaque; the store keeps ``token_hash(token)`` (SHA-256 hex,
:func:`trustmesh.store.token_hash`) in ``idp_refresh_tokens``. Introspection and
revocation find them by that hash, so the user side must store them the same way.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import delete, insert, select, update

from trustmesh.errors import ConflictError
from trustmesh.store import idp_refresh_tokens, idp_revoked_tokens, token_hash
from trustmesh.tokens import MAX_TOKEN_BYTES, certificate_thumbprint

from ._context import IdpContext

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "MAX_TOKEN_SIZE",
    "MintedToken",
    "RefreshTokenRecord",
    "certificate_thumbprint",
    "find_refresh_token",
    "is_access_token_revoked",
    "mint_access_token",
    "read_access_token",
    "revoke_access_token",
    "revoke_refresh_family",
    "revoked_access_tokens",
]

#: JOSE ``typ`` of access tokens (RFC 9068 §2.1).
ACCESS_TOKEN_TYPE = "at+jwt"  # noqa: S105 - a media type, not a secret
#: Tokens longer than this are not even parsed (the verifiers' cap).
MAX_TOKEN_SIZE = MAX_TOKEN_BYTES


@dataclass(frozen=True)
class MintedToken:
    """A signed access token and what it says."""

    token: str
    claims: dict[str, Any]
    expires_in: int
    kid: str


def mint_access_token(
    ctx: IdpContext,
    *,
    client_id: str,
    subject: str,
    audience: str,
    scope: str,
    roles: Sequence[str] = (),
    cnf_thumbprint: str | None = None,
    expires_in: int | None = None,
    extra: Mapping[str, Any] | None = None,
    now: int | None = None,
) -> MintedToken:
    """Sign an RFC 9068 access token with the current key.

    Args:
        ctx: The server context (keys, issuer, default TTL).
        client_id: The client it is issued to.
        subject: ``sub``: the client_id for machine tokens, the user_id for users.
        audience: ``aud`` (one string).
        scope: Space-separated scopes.
        roles: The ``roles`` claim.
        cnf_thumbprint: Binds the token to a certificate (``cnf.x5t#S256``).
        expires_in: Lifetime in seconds (default: the server's access TTL).
        extra: More claims (they cannot override the registered ones above).
        now: Issue time (Unix seconds), for tests.
    """
    issued = int(time.time()) if now is None else now
    lifetime = expires_in or ctx.settings.access_ttl
    key = ctx.keys.signing_key(issued)
    claims: dict[str, Any] = dict(extra or {})
    claims.update(
        {
            "iss": ctx.issuer,
            "aud": audience,
            "sub": subject,
            "client_id": client_id,
            "iat": issued,
            "nbf": issued,
            "exp": issued + lifetime,
            "jti": secrets.token_urlsafe(18),
            "scope": scope,
            "roles": list(roles),
        }
    )
    if cnf_thumbprint is not None:
        claims["cnf"] = {"x5t#S256": cnf_thumbprint}
    header = {"alg": key.info.alg, "typ": ACCESS_TOKEN_TYPE, "kid": key.info.kid}
    token = jwt.encode(header, claims, key.key, algorithms=[key.info.alg])
    return MintedToken(token, claims, lifetime, key.info.kid)


def read_access_token(ctx: IdpContext, token: str) -> dict[str, Any] | None:
    """Claims of an access token this server signed (expired ones included), else None.

    None for garbage, oversized tokens, other ``typ``, unknown ``kid``, bad
    signatures and other issuers. The caller checks ``exp`` and revocation.
    """
    if not token or len(token) > MAX_TOKEN_SIZE or token.count(".") != 2:
        return None
    keys = ctx.keys.published()
    if not keys:
        return None
    keyset = KeySet([k.key for k in keys])
    try:
        decoded = jwt.decode(token, keyset, algorithms=sorted({k.info.alg for k in keys}))
    except (JoseError, ValueError, TypeError, KeyError):
        return None
    header = decoded.header
    claims = decoded.claims
    signer = next((k for k in keys if k.info.kid == header.get("kid")), None)
    if (
        signer is None
        or header.get("alg") != signer.info.alg
        or header.get("typ") != ACCESS_TOKEN_TYPE
        or claims.get("iss") != ctx.issuer
        or not isinstance(claims.get("exp"), int)
        or not isinstance(claims.get("jti"), str)
    ):
        return None
    return dict(claims)


def revoke_access_token(ctx: IdpContext, jti: str, expires_at: int) -> bool:
    """Put an access token on the revocation list; False if it already was."""
    now = int(time.time())
    try:
        with ctx.store.transaction() as conn:
            # Expired entries can no longer matter: drop them as new ones arrive.
            conn.execute(delete(idp_revoked_tokens).where(idp_revoked_tokens.c.expires_at <= now))
            conn.execute(
                insert(idp_revoked_tokens).values(
                    jti=jti[:64], expires_at=expires_at, revoked_at=now
                )
            )
    except ConflictError:  # already listed
        return False
    return True


def is_access_token_revoked(ctx: IdpContext, jti: str) -> bool:
    """True if the token with this ``jti`` was revoked."""
    with ctx.store.reader() as conn:
        row = conn.execute(
            select(idp_revoked_tokens.c.jti).where(idp_revoked_tokens.c.jti == jti[:64])
        ).first()
    return row is not None


def revoked_access_tokens(ctx: IdpContext, now: int | None = None) -> list[dict[str, Any]]:
    """Revoked access tokens that have not expired: ``[{"jti", "exp"}]``."""
    at = int(time.time()) if now is None else now
    with ctx.store.reader() as conn:
        rows = conn.execute(
            select(idp_revoked_tokens.c.jti, idp_revoked_tokens.c.expires_at)
            .where(idp_revoked_tokens.c.expires_at > at)
            .order_by(idp_revoked_tokens.c.expires_at, idp_revoked_tokens.c.jti)
        ).all()
    return [{"jti": r.jti, "exp": int(r.expires_at)} for r in rows]


@dataclass(frozen=True)
class RefreshTokenRecord:
    """A stored refresh token (by hash)."""

    token_hash: str
    family_id: str
    client_id: str
    user_id: str | None
    scope: str
    created_at: int
    expires_at: int
    rotated_at: int | None
    revoked_at: int | None

    def is_active(self, now: int | None = None) -> bool:
        """Not rotated, not revoked, not expired."""
        at = int(time.time()) if now is None else now
        return self.rotated_at is None and self.revoked_at is None and self.expires_at > at


def find_refresh_token(ctx: IdpContext, token: str) -> RefreshTokenRecord | None:
    """The stored refresh token ``token`` hashes to, if any."""
    if not token or len(token) > MAX_TOKEN_SIZE:
        return None
    with ctx.store.reader() as conn:
        row = conn.execute(
            select(idp_refresh_tokens).where(idp_refresh_tokens.c.token_hash == token_hash(token))
        ).first()
    if row is None:
        return None
    return RefreshTokenRecord(
        token_hash=row.token_hash,
        family_id=row.family_id,
        client_id=row.client_id,
        user_id=row.user_id,
        scope=row.scope,
        created_at=int(row.created_at),
        expires_at=int(row.expires_at),
        rotated_at=None if row.rotated_at is None else int(row.rotated_at),
        revoked_at=None if row.revoked_at is None else int(row.revoked_at),
    )


def revoke_refresh_family(ctx: IdpContext, family_id: str) -> int:
    """Revoke every refresh token of a family; return how many were still unrevoked."""
    with ctx.store.transaction() as conn:
        result = conn.execute(
            update(idp_refresh_tokens)
            .where(idp_refresh_tokens.c.family_id == family_id)
            .where(idp_refresh_tokens.c.revoked_at.is_(None))
            .values(revoked_at=int(time.time()))
        )
    return int(result.rowcount or 0)
