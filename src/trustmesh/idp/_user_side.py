"""The user side as an :class:`~trustmesh.idp.IdpExtension`: what ``idp serve`` mounts.

:class:`UserSideExtension` registers the user grants (authorization code + PKCE,
refresh with rotation, ID tokens) on the server's Authlib ``AuthorizationServer``,
adds the discovery fields, and returns the ``/authorize`` and ``/userinfo`` routes.
"""

from __future__ import annotations

import ssl
import time
from datetime import UTC, datetime
from typing import Any

from argon2 import PasswordHasher
from joserfc import jwt
from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from trustmesh.errors import TokenError, TokenExpiredError

from ._authorize import AuthorizeEndpoint
from ._client_auth import CLIENT_AUTH_METHODS
from ._context import IdpContext
from ._keys import SIGNING_ALGORITHMS
from ._login import FormSigner
from ._tokens import certificate_thumbprint, is_access_token_revoked, read_access_token
from ._user_grants import UserSide, at_hash, user_grants
from ._userinfo import UserinfoEndpoint, user_discovery
from ._users import DEFAULT_LOCKOUT, LockoutPolicy, UserStore

__all__ = ["UserSideExtension", "sign_id_token", "verify_user_access_token"]

#: JOSE ``typ`` of ID tokens (never ``at+jwt``: verifiers refuse them as access tokens).
ID_TOKEN_TYPE = "JWT"  # noqa: S105 - a media type, not a secret


def sign_id_token(ctx: IdpContext, claims: dict[str, Any], access_token: str | None) -> str:
    """Sign ID token claims with the server's current key (header ``typ`` ``JWT``).

    Adds ``at_hash`` for ``access_token``, computed with the signing key's algorithm.
    """
    key = ctx.keys.signing_key()
    body = dict(claims)
    if access_token:
        body["at_hash"] = at_hash(access_token, key.info.alg)
    header = {"alg": key.info.alg, "typ": ID_TOKEN_TYPE, "kid": key.info.kid}
    return jwt.encode(header, body, key.key, algorithms=[key.info.alg])


def _peer_thumbprint(request: Request) -> str | None:
    tls = request.scope.get("extensions", {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    if not chain:
        return None
    return certificate_thumbprint(ssl.PEM_cert_to_DER_cert(chain[0]))


def verify_user_access_token(ctx: IdpContext, token: str, request: Request) -> dict[str, Any]:
    """Check an access token this server issued; return its claims.

    Signature with a published key, ``typ`` ``at+jwt``, ``iss``, ``exp``, not revoked,
    and for certificate-bound tokens (``cnf``) the caller's TLS certificate.

    Raises:
        TokenError: Which check failed.
    """
    claims = read_access_token(ctx, token)
    if claims is None:
        raise TokenError(
            "it is not an access token signed by this server (bad signature, unknown key, "
            "other issuer, or not typ at+jwt)"
        )
    if int(claims["exp"]) <= int(time.time()):
        raise TokenExpiredError("it expired; refresh it or sign in again")
    if is_access_token_revoked(ctx, str(claims["jti"])):
        raise TokenError("it was revoked")
    bound = (claims.get("cnf") or {}).get("x5t#S256")
    if bound is not None and bound != _peer_thumbprint(request):
        raise TokenError(
            "it is bound to a client certificate (cnf) that this connection did not present"
        )
    return claims


class UserSideExtension:
    """Mount users, the login page, code + PKCE, refresh, ID tokens and userinfo.

    Args:
        lockout: Failed sign-in limits (default :data:`~trustmesh.idp.DEFAULT_LOCKOUT`).
        hasher: The argon2 password hasher (default: argon2id, RFC 9106 low-memory).
        form_secret: HMAC key of login form tokens (default: random per process).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        *,
        lockout: LockoutPolicy = DEFAULT_LOCKOUT,
        hasher: PasswordHasher | None = None,
        form_secret: bytes | None = None,
    ) -> None:
        self.lockout = lockout
        self.hasher = hasher
        self.form_secret = form_secret
        self.side: UserSide | None = None

    def install(self, ctx: IdpContext) -> list[BaseRoute]:
        """Register the grants and discovery fields; return the routes."""
        users = UserStore(ctx.store, lockout=self.lockout, hasher=self.hasher)
        side = UserSide(
            store=ctx.store,
            users=users,
            issuer=ctx.issuer,
            sign_id_token=lambda claims, access: sign_id_token(ctx, claims, access),
            forms=FormSigner(self.form_secret),
            clock=lambda: datetime.now(UTC),
        )
        self.side = side
        server = ctx.authorization_server()
        for grant, extensions in user_grants(side, auth_methods=[*CLIENT_AUTH_METHODS, "none"]):
            server.register_grant(grant, extensions)
        ctx.metadata.update(user_discovery(ctx.issuer, id_token_algs=list(SIGNING_ALGORITHMS)))
        authorize = AuthorizeEndpoint(ctx, side)
        userinfo = UserinfoEndpoint(
            side, lambda token, request: verify_user_access_token(ctx, token, request)
        )
        return [
            Route("/authorize", authorize.__call__, methods=["GET", "POST"]),
            Route("/userinfo", userinfo.__call__, methods=["GET", "POST"]),
        ]
