"""Authorization codes and refresh tokens of users: stored hashed, single use, rotated.

Codes live 60 seconds and are claimed with one conditional ``UPDATE``, so two
concurrent redemptions can never both succeed. A code presented again after it was
used is a replay (RFC 6749 section 4.1.2: "the authorization server MUST deny the
request and SHOULD revoke ... all tokens previously issued based on that
authorization code"): the refresh token family and the access token minted from it
are revoked.

Each code redemption starts a refresh token *family*. Every refresh rotates: the
presented token is marked ``rotated_at`` (again one conditional ``UPDATE``) and a
new token of the same family is issued. Presenting a rotated token is reuse (the
token leaked, or an attacker raced the client), so the whole family is revoked
(``revoked_at``) and the caller must sign in again (RFC 9700 section 4.14.2).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, insert, select, update

from trustmesh.store import (
    Store,
    idp_authorization_codes,
    idp_refresh_tokens,
    idp_revoked_tokens,
    token_hash,
)

__all__ = [
    "CODE_LIFETIME",
    "REFRESH_TOKEN_LIFETIME",
    "SESSION_MAX_LIFETIME",
    "AuthorizationCode",
    "RefreshToken",
    "claim_code",
    "claim_refresh_token",
    "find_refresh_token",
    "new_secret",
    "revoke_code_access_token",
    "revoke_family",
    "save_code",
    "save_refresh_token",
    "set_code_family",
]

#: How long an authorization code can be redeemed.
CODE_LIFETIME = timedelta(seconds=60)
#: How long a refresh token stays usable if not used (each rotation starts anew).
REFRESH_TOKEN_LIFETIME = timedelta(days=14)
#: No refresh past this long after the sign-in (``auth_time``): then sign in again.
SESSION_MAX_LIFETIME = timedelta(days=30)


def _ts(value: datetime) -> int:
    return int(value.timestamp())


def new_secret() -> str:
    """Return a fresh code or refresh token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class AuthorizationCode:
    """A stored code (Authlib's ``AuthorizationCodeMixin``)."""

    code_hash: str
    client_id: str
    user_id: str
    redirect_uri: str
    scope: str
    nonce: str | None
    code_challenge: str
    code_challenge_method: str
    auth_time: int
    expires_at: int
    used_at: int | None
    family_id: str | None
    access_jti: str | None = None
    access_expires_at: int | None = None

    def get_redirect_uri(self) -> str:
        """Return the redirect URI the code was issued for."""
        return self.redirect_uri

    def get_scope(self) -> str:
        """Return the granted scope."""
        return self.scope

    def get_nonce(self) -> str | None:
        """Return the OIDC nonce of the authorization request."""
        return self.nonce

    def get_auth_time(self) -> int:
        """Return when the user signed in (Unix seconds)."""
        return self.auth_time

    def get_acr(self) -> str | None:
        """No authentication context classes."""
        return None

    def get_amr(self) -> list[str] | None:
        """Signed in with a password."""
        return ["pwd"]


@dataclass(frozen=True)
class RefreshToken:
    """A stored refresh token (what Authlib's refresh grant needs of it)."""

    token_hash: str
    family_id: str
    client_id: str
    user_id: str | None
    scope: str
    auth_time: int | None
    created_at: int
    expires_at: int
    rotated_at: int | None
    revoked_at: int | None

    def check_client(self, client: Any) -> bool:
        """Return True if the token was issued to ``client``."""
        return bool(client.get_client_id() == self.client_id)

    def get_scope(self) -> str:
        """Return the scope granted with the token."""
        return self.scope

    def is_expired(self, now: datetime) -> bool:
        """True past the token's own expiry or the session's maximum lifetime."""
        at = _ts(now)
        limit = (
            self.auth_time + int(SESSION_MAX_LIFETIME.total_seconds())
            if self.auth_time is not None
            else self.expires_at
        )
        return at >= self.expires_at or at >= limit


def save_code(
    conn: Connection,
    code: str,
    *,
    client_id: str,
    user_id: str,
    redirect_uri: str,
    scope: str,
    nonce: str | None,
    code_challenge: str,
    code_challenge_method: str,
    auth_time: datetime,
    now: datetime,
    lifetime: timedelta = CODE_LIFETIME,
) -> None:
    """Store a new code (its SHA-256 only)."""
    conn.execute(
        insert(idp_authorization_codes).values(
            code_hash=token_hash(code),
            client_id=client_id,
            user_id=user_id,
            redirect_uri=redirect_uri,
            scope=scope,
            nonce=nonce,
            code_challenge=code_challenge,
            code_challenge_method=code_challenge_method,
            auth_time=_ts(auth_time),
            created_at=_ts(now),
            expires_at=_ts(now + lifetime),
        )
    )


def _code(row: Any) -> AuthorizationCode:
    return AuthorizationCode(
        code_hash=row.code_hash,
        client_id=row.client_id,
        user_id=row.user_id,
        redirect_uri=row.redirect_uri,
        scope=row.scope,
        nonce=row.nonce,
        code_challenge=row.code_challenge,
        code_challenge_method=row.code_challenge_method,
        auth_time=int(row.auth_time),
        expires_at=int(row.expires_at),
        used_at=row.used_at,
        family_id=row.family_id,
        access_jti=row.access_jti,
        access_expires_at=row.access_expires_at,
    )


def claim_code(
    store: Store, code: str, *, client_id: str, now: datetime
) -> tuple[AuthorizationCode | None, str]:
    """Use up a code; return it and ``ok``, or None and why not.

    Reasons: ``unknown``, ``wrong_client``, ``expired``, ``replayed`` (the code was
    already used: the caller revokes its family, see :func:`revoke_family`).
    A code presented by another client is not spent, so a guessing client cannot
    burn the legitimate client's code.
    """
    digest = token_hash(code)
    with store.transaction() as conn:
        row = conn.execute(
            select(idp_authorization_codes).where(idp_authorization_codes.c.code_hash == digest)
        ).first()
        if row is None:
            return None, "unknown"
        record = _code(row)
        if record.client_id != client_id:
            return record, "wrong_client"
        if record.used_at is not None:
            return record, "replayed"
        claimed = conn.execute(
            update(idp_authorization_codes)
            .where(idp_authorization_codes.c.code_hash == digest)
            .where(idp_authorization_codes.c.used_at.is_(None))
            .values(used_at=_ts(now))
        ).rowcount
        if claimed != 1:
            return record, "replayed"
        if record.expires_at <= _ts(now):
            return record, "expired"
        return record, "ok"


def set_code_family(
    conn: Connection,
    code_hash: str,
    family_id: str,
    *,
    access_jti: str | None = None,
    access_expires_at: int | None = None,
) -> None:
    """Remember what a code produced (refresh family, access token) for replay revocation."""
    conn.execute(
        update(idp_authorization_codes)
        .where(idp_authorization_codes.c.code_hash == code_hash)
        .values(
            family_id=family_id,
            access_jti=access_jti[:64] if access_jti else None,
            access_expires_at=access_expires_at,
        )
    )


def revoke_code_access_token(conn: Connection, code: AuthorizationCode, *, now: datetime) -> bool:
    """Put the access token a code produced on the revocation list (if unexpired)."""
    if not code.access_jti or not code.access_expires_at or code.access_expires_at <= _ts(now):
        return False
    listed = conn.execute(
        select(idp_revoked_tokens.c.jti).where(idp_revoked_tokens.c.jti == code.access_jti)
    ).first()
    if listed is None:
        conn.execute(
            insert(idp_revoked_tokens).values(
                jti=code.access_jti, expires_at=code.access_expires_at, revoked_at=_ts(now)
            )
        )
    return listed is None


def save_refresh_token(
    conn: Connection,
    token: str,
    *,
    family_id: str,
    client_id: str,
    user_id: str | None,
    scope: str,
    auth_time: int | None,
    now: datetime,
    lifetime: timedelta = REFRESH_TOKEN_LIFETIME,
) -> None:
    """Store a new refresh token (its SHA-256 only)."""
    conn.execute(
        insert(idp_refresh_tokens).values(
            token_hash=token_hash(token),
            family_id=family_id,
            client_id=client_id,
            user_id=user_id,
            scope=scope,
            auth_time=auth_time,
            created_at=_ts(now),
            expires_at=_ts(now + lifetime),
        )
    )


def _refresh(row: Any) -> RefreshToken:
    return RefreshToken(
        token_hash=row.token_hash,
        family_id=row.family_id,
        client_id=row.client_id,
        user_id=row.user_id,
        scope=row.scope,
        auth_time=row.auth_time,
        created_at=int(row.created_at),
        expires_at=int(row.expires_at),
        rotated_at=row.rotated_at,
        revoked_at=row.revoked_at,
    )


def find_refresh_token(store: Store, token: str) -> RefreshToken | None:
    """Return the stored refresh token, or None."""
    with store.transaction() as conn:
        row = conn.execute(
            select(idp_refresh_tokens).where(idp_refresh_tokens.c.token_hash == token_hash(token))
        ).first()
    return None if row is None else _refresh(row)


def claim_refresh_token(conn: Connection, record: RefreshToken, *, now: datetime) -> bool:
    """Mark a refresh token rotated; False if it already was (a concurrent reuse)."""
    result = conn.execute(
        update(idp_refresh_tokens)
        .where(idp_refresh_tokens.c.token_hash == record.token_hash)
        .where(idp_refresh_tokens.c.rotated_at.is_(None))
        .where(idp_refresh_tokens.c.revoked_at.is_(None))
        .values(rotated_at=_ts(now))
    )
    return bool(result.rowcount == 1)


def revoke_family(conn: Connection, family_id: str, *, now: datetime) -> int:
    """Revoke every not yet revoked token of a family; return how many."""
    result = conn.execute(
        update(idp_refresh_tokens)
        .where(idp_refresh_tokens.c.family_id == family_id)
        .where(idp_refresh_tokens.c.revoked_at.is_(None))
        .values(revoked_at=_ts(now))
    )
    return int(result.rowcount or 0)


def utcnow() -> datetime:
    """The current time, timezone-aware."""
    return datetime.now(UTC)
