"""The token endpoints beside ``/token``: introspection (RFC 7662) and revocation (RFC 7009).

Both find a token the same way (an access token we signed, or a stored refresh
token) and authenticate the calling client with :data:`CLIENT_AUTH_METHODS`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from authlib.oauth2.rfc6749 import AuthorizationServer, UnauthorizedClientError
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7662 import IntrospectionEndpoint

from ._client_auth import CLIENT_AUTH_METHODS
from ._clients import IdpClient
from ._context import IdpContext
from ._oauth import _safe
from ._tokens import (
    find_refresh_token,
    is_access_token_revoked,
    read_access_token,
    revoke_access_token,
    revoke_refresh_family,
)

__all__ = ["TokenIntrospection", "TokenRevocation"]

log = logging.getLogger("trustmesh.idp")


class _TokenRef:
    """An access or refresh token found by introspection or revocation."""

    def __init__(
        self,
        kind: str,
        client_id: str,
        *,
        claims: dict[str, Any] | None = None,
        refresh: Any = None,
        revoked: bool = False,
    ) -> None:
        self.kind = kind
        self.client_id = client_id
        self.claims = claims or {}
        self.refresh = refresh
        self.revoked = revoked

    def check_client(self, client: IdpClient) -> bool:
        return bool(client.get_client_id() == self.client_id)

    def is_expired(self) -> bool:
        now = int(time.time())
        if self.kind == "access_token":
            return bool(self.claims.get("exp", 0) <= now)
        return bool(self.refresh.expires_at <= now)

    def is_revoked(self) -> bool:
        if self.kind == "access_token":
            return self.revoked
        return bool(self.refresh.revoked_at is not None or self.refresh.rotated_at is not None)


def _query_token(ctx: IdpContext, token: str, hint: str | None) -> _TokenRef | None:
    def access() -> _TokenRef | None:
        claims = read_access_token(ctx, token)
        if claims is None:
            return None
        revoked = is_access_token_revoked(ctx, str(claims["jti"]))
        return _TokenRef(
            "access_token", str(claims.get("client_id")), claims=claims, revoked=revoked
        )

    def refresh() -> _TokenRef | None:
        record = find_refresh_token(ctx, token)
        if record is None:
            return None
        return _TokenRef("refresh_token", record.client_id, refresh=record)

    first, second = (refresh, access) if hint == "refresh_token" else (access, refresh)
    return first() or second()


class TokenIntrospection(IntrospectionEndpoint):
    """RFC 7662. Any authenticated client may introspect; foreign tokens are inactive."""

    CLIENT_AUTH_METHODS = CLIENT_AUTH_METHODS

    def __init__(self, server: AuthorizationServer, ctx: IdpContext) -> None:
        super().__init__(server)
        self.ctx = ctx

    def query_token(self, token_string: str, token_type_hint: str | None) -> _TokenRef | None:
        return _query_token(self.ctx, token_string, token_type_hint)

    def check_permission(self, token: _TokenRef, client: IdpClient, request: Any) -> bool:
        return True

    def introspect_token(self, token: _TokenRef) -> dict[str, Any]:
        if token.kind == "access_token":
            c = token.claims
            body: dict[str, Any] = {
                k: c[k]
                for k in (
                    "scope",
                    "client_id",
                    "sub",
                    "aud",
                    "iss",
                    "exp",
                    "iat",
                    "nbf",
                    "jti",
                    "cnf",
                    "roles",
                )
                if k in c
            }
            return {"active": True, "token_type": "Bearer", **body}
        r = token.refresh
        return {
            "active": True,
            "token_type": "refresh_token",
            "client_id": r.client_id,
            "scope": r.scope,
            "sub": r.user_id or r.client_id,
            "iss": self.ctx.issuer,
            "exp": r.expires_at,
            "iat": r.created_at,
        }


class TokenRevocation(RevocationEndpoint):
    """RFC 7009: access tokens by ``jti``; refresh tokens with their whole family."""

    CLIENT_AUTH_METHODS = CLIENT_AUTH_METHODS

    def __init__(self, server: AuthorizationServer, ctx: IdpContext) -> None:
        super().__init__(server)
        self.ctx = ctx

    def authenticate_token(self, request: Any, client: IdpClient) -> _TokenRef | None:
        self.check_params(request, client)
        token: _TokenRef | None = self.query_token(
            request.form["token"], request.form.get("token_type_hint")
        )
        if token is not None and not token.check_client(client):
            raise UnauthorizedClientError(
                _safe(
                    f"The token was issued to another client; only {token.client_id} may revoke it."
                )
            )
        return token

    def query_token(self, token_string: str, token_type_hint: str | None) -> _TokenRef | None:
        return _query_token(self.ctx, token_string, token_type_hint)

    def revoke_token(self, token: _TokenRef, request: Any) -> None:
        if token.kind == "access_token":
            jti = str(token.claims["jti"])
            exp = int(token.claims["exp"])
            if exp > time.time():
                revoke_access_token(self.ctx, jti, exp)
            details: dict[str, Any] = {"token_type": "access_token", "jti": jti}
        else:
            count = revoke_refresh_family(self.ctx, token.refresh.family_id)
            details = {
                "token_type": "refresh_token",
                "family_id": token.refresh.family_id,
                "revoked": count,
            }
        self.ctx.metrics.revoked.labels(token_type=token.kind).inc()
        self.ctx.audit(
            "idp.revoke", token.client_id, actor=f"client:{token.client_id}", details=details
        )
        log.info(
            "revoked a %s of %s",
            token.kind,
            token.client_id,
            extra={"event": "revoke", "client_id": token.client_id, **details},
        )
