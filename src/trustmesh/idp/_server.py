"""Authlib's ``AuthorizationServer`` on Starlette: the server that ties the endpoints together.

:class:`IdpAuthorizationServer` is a framework integration of
:class:`authlib.oauth2.rfc6749.AuthorizationServer` (Authlib ships Flask and Django
ones; this is the Starlette one). Authlib is synchronous, so the app runs its calls in
a worker thread (:func:`starlette.concurrency.run_in_threadpool`) with an
:class:`IdpOAuth2Request` built from the already-read body.

The parts it registers live beside it: the request type and shared errors in
``_oauth``, client authentication in ``_client_auth``, the ``client_credentials``
grant in ``_grants``, introspection and revocation in ``_token_endpoints``.

The user side registers more grants with :meth:`IdpAuthorizationServer.register_grant`
(Authlib's API, e.g. ``AuthorizationCodeGrant`` with ``OpenIDCode`` and
``CodeChallenge``, and ``RefreshTokenGrant``). Their ``TOKEN_ENDPOINT_AUTH_METHODS``
should be :data:`CLIENT_AUTH_METHODS` (plus ``"none"`` for public clients). Tokens come
from :meth:`IdpAuthorizationServer.generate_token`, which mints an RFC 9068 access
token (``sub`` = ``user.get_user_id()`` for users, the client_id otherwise; ``roles``
from ``user.roles`` or the client's) and never a refresh token: the user side wraps
it (``server.register_token_generator("default", ...)``) to add refresh and ID
tokens, and adds a :attr:`IdpAuthorizationServer.token_listeners` entry (or its own
``save_token``) to store them.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import Any

from authlib.oauth2.rfc6749 import AuthorizationServer, OAuth2Error, UnsupportedGrantTypeError
from starlette.responses import JSONResponse, Response

from ._client_auth import (
    _ClientAuthentication,
    _ClientAuthMethods,
    _secret_basic,
    _secret_post,
)
from ._clients import IdpClient, load_client
from ._context import IdpContext
from ._grants import IdpClientCredentialsGrant
from ._oauth import IdpOAuth2Request, InvalidTargetError, _safe, _UnsupportedGrantTypeError
from ._token_endpoints import TokenIntrospection, TokenRevocation
from ._tokens import mint_access_token

__all__ = ["IdpAuthorizationServer", "create_server"]

log = logging.getLogger("trustmesh.idp")

_CURRENT: contextvars.ContextVar[IdpOAuth2Request | None] = contextvars.ContextVar(
    "trustmesh_idp_request", default=None
)


#: error_description for Authlib errors raised without one.
_DEFAULT_DESCRIPTIONS = {
    "invalid_request": "The request is missing a required parameter (for introspection and "
    "revocation: token) or has an invalid one.",
    "unsupported_token_type": "token_type_hint must be access_token or refresh_token.",
    "invalid_grant": "The grant is invalid, expired, revoked or issued to another client.",
    "unauthorized_client": "This client may not use this grant or act on this token.",
    "invalid_scope": "The requested scope is not allowed for this client.",
    "invalid_client": "Client authentication failed.",
}


class IdpAuthorizationServer(AuthorizationServer):
    """The Starlette integration of Authlib's AuthorizationServer (see module doc).

    Args:
        ctx: The server context.
    """

    def __init__(self, ctx: IdpContext) -> None:
        super().__init__()
        self.ctx = ctx
        #: Called as ``listener(token_dict, request)`` after every issued token.
        self.token_listeners: list[Callable[[dict[str, Any], IdpOAuth2Request], None]] = []
        self._client_auth = _ClientAuthentication(self.query_client)
        methods = _ClientAuthMethods(ctx)
        self.register_client_auth_method("client_secret_basic", _secret_basic)
        self.register_client_auth_method("client_secret_post", _secret_post)
        self.register_client_auth_method("private_key_jwt", methods.private_key_jwt)
        self.register_client_auth_method("tls_client_auth", methods.tls_client_auth)
        self.register_token_generator("default", self.generate_bearer_token)
        self.register_grant(IdpClientCredentialsGrant)
        self.register_endpoint(TokenIntrospection(self, ctx))
        self.register_endpoint(TokenRevocation(self, ctx))

    # -- what discovery advertises ---------------------------------------------------

    @property
    def grant_types_supported(self) -> list[str]:
        """``grant_type`` values of the registered token grants."""
        return [g.GRANT_TYPE for g, _ in self._token_grants if g.GRANT_TYPE]

    @property
    def response_types_supported(self) -> list[str]:
        """``response_type`` values of the registered authorization grants."""
        return sorted({rt for g, _ in self._authorization_grants for rt in g.RESPONSE_TYPES})

    @property
    def client_auth_methods(self) -> list[str]:
        """Client authentication methods the registered token grants accept."""
        wanted: list[str] = []
        for grant, _ in self._token_grants:
            for method in getattr(grant, "TOKEN_ENDPOINT_AUTH_METHODS", []):
                if method in self._client_auth._methods and method not in wanted:
                    wanted.append(method)
        return wanted

    def get_token_grant(self, request: IdpOAuth2Request) -> Any:
        """The registered grant for ``grant_type``, or a helpful unsupported_grant_type."""
        try:
            return super().get_token_grant(request)
        except UnsupportedGrantTypeError:
            raise _UnsupportedGrantTypeError(
                request.payload.grant_type, self.grant_types_supported
            ) from None

    # -- Authlib framework integration --------------------------------------------------

    def query_client(self, client_id: str) -> IdpClient | None:
        with self.ctx.store.reader() as conn:
            return load_client(conn, client_id)

    def create_oauth2_request(self, request: Any) -> IdpOAuth2Request:
        if isinstance(request, IdpOAuth2Request):
            return request
        raise TypeError("Build an IdpOAuth2Request (see trustmesh.idp.oauth_request).")

    def create_json_request(self, request: Any) -> Any:
        raise NotImplementedError("The identity server takes form-encoded requests only.")

    def handle_response(self, status: int, body: Any, headers: Any) -> Response:
        header_map = dict(headers or [])
        if isinstance(body, dict):
            header_map.setdefault("Cache-Control", "no-store")
            return JSONResponse(body, status_code=status, headers=header_map)
        return Response(body or b"", status_code=status, headers=header_map)

    def handle_error_response(self, request: IdpOAuth2Request, error: OAuth2Error) -> Response:
        if error.error == "unsupported_token_type":
            error.status_code = 400  # RFC 7009 §2.2.1 (Authlib answers 401)
        if not error.description:
            error.description = _DEFAULT_DESCRIPTIONS.get(
                error.error, "The request was refused; see RFC 6749 section 5.2."
            )
        route = request.uri.split("?", 1)[0].removeprefix(self.ctx.issuer) or "/"
        reason = request.denial_reason or error.error
        client_id = request.claimed_client_id()
        self.ctx.metrics.denied.labels(route=route, reason=reason).inc()
        log.info(
            "refused %s: %s",
            route,
            error.description or error.error,
            extra={
                "event": "deny",
                "route": route,
                "reason": reason,
                "status": error.status_code,
                "client": request.client_host,
                "client_id": client_id or "",
            },
        )
        self.ctx.audit(
            "idp.deny",
            client_id or request.client_host,
            actor=f"client:{client_id}" if client_id else f"ip:{request.client_host}",
            details={"route": route, "error": error.error, "reason": reason},
        )
        response: Response = super().handle_error_response(request, error)
        return response

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Authlib signals: nothing to do (issuance and revocation are audited)."""

    def create_token_response(self, request: Any = None) -> Response:
        """Run a token request (in a worker thread) with the request visible to generators."""
        reset = _CURRENT.set(self.create_oauth2_request(request))
        try:
            response: Response = super().create_token_response(request)
            return response
        finally:
            _CURRENT.reset(reset)

    def save_token(self, token: dict[str, Any], request: IdpOAuth2Request) -> None:
        """Audit, count and log an issued token; then call the token listeners."""
        client = request.client
        grant_type = request.payload.grant_type or "?"
        claims = request.minted_claims or {}
        self.ctx.metrics.issued.labels(grant_type=grant_type).inc()
        details = {
            "grant_type": grant_type,
            "jti": claims.get("jti"),
            "sub": claims.get("sub"),
            "aud": claims.get("aud"),
            "scope": claims.get("scope"),
            "auth_method": request.auth_method,
            "bound": "cnf" in claims,
        }
        self.ctx.audit(
            "idp.token",
            client.get_client_id(),
            actor=f"client:{client.get_client_id()}",
            details=details,
        )
        log.info(
            "issued an access token to %s",
            client.get_client_id(),
            extra={"event": "token", "client_id": client.get_client_id(), **details},
        )
        for listener in self.token_listeners:
            listener(token, request)

    # -- tokens ---------------------------------------------------------------------------

    def resolve_audience(self, client: IdpClient, request: IdpOAuth2Request | None) -> str:
        """``aud``: the ``resource``/``audience`` parameter if allowed, else the default.

        Raises:
            InvalidTargetError: The client may not ask for that audience.
        """
        if request is None:
            return client.default_audience
        wanted = request.form.get("resource") or request.form.get("audience")
        if not wanted:
            return client.default_audience
        allowed = client.audiences or (client.client_id,)
        if wanted not in allowed:
            raise InvalidTargetError(
                _safe(
                    f"Client {client.client_id} may not request audience {wanted!r}; allowed: "
                    f"{' '.join(allowed)}."
                )
            )
        return wanted

    def generate_bearer_token(
        self,
        grant_type: str,
        client: IdpClient,
        user: Any = None,
        scope: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        """Authlib token generator: an RFC 9068 access token (never a refresh token).

        ``sub`` is ``user.get_user_id()`` (users) or the client_id; ``roles`` come from
        ``user.roles`` or the client; the token is bound to the client certificate
        when the client authenticated with tls_client_auth.
        """
        request = _CURRENT.get()
        audience = self.resolve_audience(client, request)
        subject = str(user.get_user_id()) if user is not None else client.client_id
        roles = tuple(getattr(user, "roles", ())) if user is not None else client.roles
        minted = mint_access_token(
            self.ctx,
            client_id=client.client_id,
            subject=subject,
            audience=audience,
            scope=scope or "",
            roles=roles,
            cnf_thumbprint=request.cnf_x5t if request is not None else None,
            expires_in=expires_in,
        )
        token: dict[str, Any] = {
            "access_token": minted.token,
            "token_type": "Bearer",
            "expires_in": minted.expires_in,
            "scope": minted.claims["scope"],
        }
        if request is not None:
            request.minted_claims = minted.claims
        return token


def create_server(ctx: IdpContext) -> IdpAuthorizationServer:
    """Build the Authlib server for a context and attach it (``ctx.server``)."""
    server = IdpAuthorizationServer(ctx)
    ctx.server = server
    return server
