"""Authlib's ``AuthorizationServer`` on Starlette: requests, client authentication, grants.

:class:`IdpAuthorizationServer` is a framework integration of
:class:`authlib.oauth2.rfc6749.AuthorizationServer` (Authlib ships Flask and Django
ones; this is the Starlette one). Authlib is synchronous, so the app runs its calls in
a worker thread (:func:`starlette.concurrency.run_in_threadpool`) with an
:class:`IdpOAuth2Request` built from the already-read body.

Client authentication methods (RFC 6749 §2.3, RFC 7523, RFC 8705), in the order tried:
``tls_client_auth`` (the mTLS certificate must chain to our CA and carry the
client's registered SPIFFE ID), ``private_key_jwt`` (a signed assertion, ``jti``
single-use), ``client_secret_basic``, ``client_secret_post``; plus ``none`` for
public clients when a grant lists it. A method applies only when its credentials
are present; credentials for the wrong method, or wrong credentials, are an
``invalid_client`` error that says what went wrong.

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

import base64
import binascii
import contextvars
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote_plus

from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    ClientAuthentication,
    InvalidClientError,
    InvalidScopeError,
    OAuth2Error,
    OAuth2Request,
    UnauthorizedClientError,
    UnsupportedGrantTypeError,
)
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from cryptography import x509
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import delete, insert
from starlette.responses import JSONResponse, Response

from trustmesh.errors import ConflictError, PKIError
from trustmesh.pki import verify_chain
from trustmesh.store import idp_assertion_jtis

from ._clients import IdpClient, load_client
from ._context import IdpContext
from ._tokens import (
    certificate_thumbprint,
    find_refresh_token,
    is_access_token_revoked,
    mint_access_token,
    read_access_token,
    revoke_access_token,
    revoke_refresh_family,
)

__all__ = [
    "ASSERTION_ALGORITHMS",
    "CLIENT_AUTH_METHODS",
    "JWT_BEARER_ASSERTION",
    "IdpAuthorizationServer",
    "IdpClientCredentialsGrant",
    "IdpOAuth2Request",
    "InvalidTargetError",
    "create_server",
]

log = logging.getLogger("trustmesh.idp")

#: Client authentication methods of the token, introspection and revocation endpoints.
CLIENT_AUTH_METHODS = [
    "tls_client_auth",
    "private_key_jwt",
    "client_secret_basic",
    "client_secret_post",
]
#: ``client_assertion_type`` of private_key_jwt (RFC 7523 §2.2).
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Algorithms accepted on client assertions (never ``none`` nor HMAC).
ASSERTION_ALGORITHMS = ["ES256", "ES384", "RS256", "PS256", "EdDSA"]

_CURRENT: contextvars.ContextVar[IdpOAuth2Request | None] = contextvars.ContextVar(
    "trustmesh_idp_request", default=None
)


def _safe(text: str, limit: int = 400) -> str:
    """Make text fit error_description (RFC 6749 §5.2: printable ASCII but ``"`` and ``\\``).

    Descriptions quote what the client sent; Authlib refuses (ValueError) anything else.
    """
    cleaned = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)
    return cleaned[:limit]


class InvalidTargetError(OAuth2Error):
    """The requested ``resource``/``audience`` is not allowed (RFC 8707 §2)."""

    error = "invalid_target"


class _UnsupportedGrantTypeError(UnsupportedGrantTypeError):
    def __init__(self, grant_type: str | None, supported: list[str]) -> None:
        super().__init__(grant_type)
        self.supported = supported
        self.description = self.get_error_description()

    def get_error_description(self) -> str:
        given = (
            f"grant_type {self.grant_type!r} is not supported"
            if self.grant_type
            else ("grant_type is missing")
        )
        return _safe(f"{given}; use one of: {', '.join(self.supported)}.")


class _Payload(BasicOAuth2Payload):
    def __init__(self, values: Mapping[str, str], lists: Mapping[str, list[str]]) -> None:
        super().__init__(dict(values))
        self._lists: defaultdict[str, list[str]] = defaultdict(list, lists)

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._lists


class IdpOAuth2Request(OAuth2Request):
    """An OAuth request as Authlib sees it, plus what TLS told us.

    Args:
        method: HTTP method.
        uri: Full https URL.
        headers: Request headers (case-insensitive mapping).
        form: Parsed ``application/x-www-form-urlencoded`` body (single values).
        args: Query parameters.
        lists: Every value of every parameter (query and body).
        peer_der: The client's certificate (DER) if it sent one over TLS.
        client_host: The client's address.
    """

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Any,
        *,
        form: Mapping[str, str] | None = None,
        args: Mapping[str, str] | None = None,
        lists: Mapping[str, list[str]] | None = None,
        peer_der: bytes | None = None,
        client_host: str = "?",
    ) -> None:
        super().__init__(method, uri, headers=headers)
        self._form = dict(form or {})
        self._args = dict(args or {})
        self.payload = _Payload({**self._args, **self._form}, lists or {})
        self.peer_der = peer_der
        self.client_host = client_host
        #: ``x5t#S256`` of the certificate the client authenticated with (tls_client_auth).
        self.cnf_x5t: str | None = None
        #: Why authentication failed, for logs and metrics (never a secret).
        self.denial_reason: str | None = None
        #: Claims of the access token minted for this request (for the audit trail).
        self.minted_claims: dict[str, Any] | None = None

    @property
    def form(self) -> dict[str, str]:
        return self._form

    @property
    def args(self) -> dict[str, str]:
        return self._args

    def claimed_client_id(self) -> str | None:
        """The client_id the request names (not yet authenticated)."""
        basic_id, _ = basic_credentials(self.headers)
        return basic_id or self._form.get("client_id") or None


def basic_credentials(headers: Any) -> tuple[str | None, str | None]:
    """``(client_id, secret)`` from ``Authorization: Basic`` (RFC 6749 §2.3.1: each part
    form-urlencoded); ``(None, None)`` when absent or malformed (bad base64 or UTF-8)."""
    value = headers.get("Authorization") or ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None, None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None, None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        return None, None
    return unquote_plus(client_id) or None, unquote_plus(secret) or None


def _has_basic(request: IdpOAuth2Request) -> bool:
    value = request.headers.get("Authorization") or ""
    return bool(value.lower().startswith("basic "))


class _ClientAuthentication(ClientAuthentication):
    """Authlib's registry of methods, with errors that say what went wrong."""

    def authenticate(self, request: IdpOAuth2Request, methods: list[str], endpoint: str) -> Any:
        status = 401 if _has_basic(request) else 400
        for method in methods:
            func = self._methods.get(method)
            if func is None:
                continue
            client = func(self.query_client, request)
            if client is None:
                continue
            if method == "none" and not client.check_endpoint_auth_method("none", endpoint):
                continue
            if getattr(client, "auth_method", method) != method:
                registered = getattr(client, "auth_method", "another method")
                raise InvalidClientError(
                    status_code=status,
                    description=_safe(
                        f"Client {client.get_client_id()} must authenticate with "
                        f"{registered}, not {method}."
                    ),
                )
            if getattr(client, "disabled", False):
                raise InvalidClientError(
                    status_code=status,
                    description=_safe(f"Client {client.get_client_id()} is disabled."),
                )
            if not client.check_endpoint_auth_method(method, endpoint):
                raise InvalidClientError(
                    status_code=status,
                    description=_safe(
                        f"Client {client.get_client_id()} may not use {method} at {endpoint}."
                    ),
                )
            request.auth_method = method
            return client
        raise InvalidClientError(
            status_code=status,
            description=_safe(
                "No client authentication: send HTTP Basic credentials or use the "
                f"client's registered method (this endpoint accepts {', '.join(methods)})."
            ),
        )


def _secret_basic(query_client: Callable[[str], Any], request: IdpOAuth2Request) -> Any:
    if not _has_basic(request):
        return None
    client_id, secret = basic_credentials(request.headers)
    if not client_id or not secret:
        raise InvalidClientError(
            status_code=401,
            description=_safe(
                "Malformed HTTP Basic credentials: send base64(client_id:client_secret)."
            ),
        )
    if "client_secret" in request.form or "client_assertion" in request.form:
        raise InvalidClientError(
            status_code=401,
            description=_safe(
                "The request uses more than one client authentication method (HTTP Basic and "
                "body credentials); use only the client's registered one (RFC 6749 2.3)."
            ),
        )
    if request.form.get("client_id") not in (None, client_id):
        raise InvalidClientError(
            status_code=401,
            description=_safe("client_id in the body differs from the HTTP Basic client_id."),
        )
    return _check_secret(query_client, client_id, secret, 401, "client_secret_basic")


def _secret_post(query_client: Callable[[str], Any], request: IdpOAuth2Request) -> Any:
    secret = request.form.get("client_secret")
    if not secret:
        return None
    client_id = request.form.get("client_id")
    if not client_id:
        raise InvalidClientError(description=_safe("client_secret was sent without client_id."))
    return _check_secret(query_client, client_id, secret, 400, "client_secret_post")


def _check_secret(
    query_client: Callable[[str], Any], client_id: str, secret: str, status: int, method: str
) -> Any:
    client = query_client(client_id)
    if client is None or (client.auth_method == method and not client.check_client_secret(secret)):
        raise InvalidClientError(
            status_code=status,
            description=_safe(
                "Client authentication failed: unknown client_id or wrong "
                "client_secret. Check both, or rotate the secret with `trustmesh idp client "
                "rotate-secret`."
            ),
        )
    return client


class _ClientAuthMethods:
    """private_key_jwt and tls_client_auth, which need the server context."""

    def __init__(self, ctx: IdpContext) -> None:
        self.ctx = ctx

    def private_key_jwt(self, query_client: Callable[[str], Any], request: IdpOAuth2Request) -> Any:
        form = request.form
        assertion_type = form.get("client_assertion_type")
        assertion = form.get("client_assertion")
        if assertion_type is None and assertion is None:
            return None
        if assertion_type != JWT_BEARER_ASSERTION or not assertion:
            raise InvalidClientError(
                description=_safe(
                    f"private_key_jwt needs client_assertion_type={JWT_BEARER_ASSERTION}"
                    " and a client_assertion."
                ),
            )
        if len(assertion) > 8192:
            raise InvalidClientError(description=_safe("client_assertion is larger than 8 KiB."))
        try:
            unverified = json.loads(jws.extract_compact(assertion.encode()).payload)
        except (JoseError, ValueError, TypeError):
            raise InvalidClientError(
                description=_safe(
                    "client_assertion is not a compact JWS (header.payload.signature)."
                )
            ) from None
        if not isinstance(unverified, dict):
            raise InvalidClientError(
                description=_safe("client_assertion claims must be a JSON object.")
            )
        client_id = unverified.get("sub")
        if not isinstance(client_id, str) or unverified.get("iss") != client_id:
            raise InvalidClientError(
                description=_safe(
                    "client_assertion must have iss and sub both equal to the client_id."
                )
            )
        if form.get("client_id") not in (None, client_id):
            raise InvalidClientError(
                description=_safe("client_id does not match the client_assertion's sub.")
            )
        client = query_client(client_id)
        if client is None or client.auth_method != "private_key_jwt" or not client.jwks:
            raise InvalidClientError(
                description=_safe(f"Client {client_id} is not registered for private_key_jwt.")
            )
        try:
            keys = KeySet.import_key_set(client.jwks)
            token = jwt.decode(assertion, keys, algorithms=ASSERTION_ALGORITHMS)
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise InvalidClientError(
                description=_safe(
                    f"client_assertion signature check failed ({type(exc).__name__}): "
                    "sign it with a key registered with --jwks-file, using "
                    f"{'/'.join(ASSERTION_ALGORITHMS)}."
                )
            ) from None
        claims = token.claims
        self._check_assertion_claims(client_id, claims, request)
        return client

    def _check_assertion_claims(
        self, client_id: str, claims: Mapping[str, Any], request: IdpOAuth2Request
    ) -> None:
        settings = self.ctx.settings
        now = int(time.time())
        audiences = claims.get("aud")
        aud_list = [audiences] if isinstance(audiences, str) else audiences
        path = request.uri.split("?", 1)[0]
        allowed = {settings.issuer, settings.endpoint("/token"), path}
        if not isinstance(aud_list, list) or not allowed.intersection(
            a for a in aud_list if isinstance(a, str)
        ):
            raise InvalidClientError(
                description=_safe(
                    f"client_assertion aud must be the token endpoint "
                    f"{settings.endpoint('/token')} or the issuer {settings.issuer}."
                )
            )
        exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
        if not isinstance(exp, int):
            raise InvalidClientError(description=_safe("client_assertion has no numeric exp."))
        if exp <= now - settings.leeway:
            raise InvalidClientError(
                description=_safe("client_assertion has expired: mint a new one.")
            )
        start = iat if isinstance(iat, int) else now
        if exp - start > settings.assertion_max_lifetime:
            raise InvalidClientError(
                description=_safe(
                    f"client_assertion lives {exp - start} s; the limit is "
                    f"{settings.assertion_max_lifetime} s (exp - iat)."
                )
            )
        if isinstance(iat, int) and iat > now + settings.leeway:
            raise InvalidClientError(description=_safe("client_assertion iat is in the future."))
        if isinstance(nbf, int) and nbf > now + settings.leeway:
            raise InvalidClientError(description=_safe("client_assertion is not valid yet (nbf)."))
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 128:
            raise InvalidClientError(
                description=_safe("client_assertion needs a unique jti (at most 128 characters).")
            )
        try:
            with self.ctx.store.transaction() as conn:
                conn.execute(
                    delete(idp_assertion_jtis).where(idp_assertion_jtis.c.expires_at < now)
                )
                conn.execute(
                    insert(idp_assertion_jtis).values(
                        key=f"{client_id} {jti}"[:200], expires_at=exp + settings.leeway
                    )
                )
        except ConflictError:
            request.denial_reason = "assertion_replayed"
            raise InvalidClientError(
                description=_safe(
                    "client_assertion was already used (jti replayed): mint a new "
                    "assertion with a fresh jti for every request."
                )
            ) from None

    def tls_client_auth(self, query_client: Callable[[str], Any], request: IdpOAuth2Request) -> Any:
        form = request.form
        if _has_basic(request) or "client_secret" in form or "client_assertion" in form:
            return None
        client_id = form.get("client_id")
        if not client_id:
            return None
        client = query_client(client_id)
        if client is None or client.auth_method != "tls_client_auth":
            return None
        if request.peer_der is None:
            raise InvalidClientError(
                description=_safe(
                    f"Client {client_id} uses tls_client_auth: call over mTLS with "
                    f"the certificate of {client.tls_spiffe_id}."
                )
            )
        ca = self.ctx.ca
        try:
            cert = x509.load_der_x509_certificate(request.peer_der)
            spiffe_id = verify_chain(
                cert,
                [ca.intermediate],
                list(ca.bundle),
                usage="client",
                is_revoked=ca.is_revoked,
            )
        except (PKIError, ValueError) as exc:
            message = getattr(exc, "message", str(exc))
            raise InvalidClientError(
                description=_safe(f"The client certificate was refused: {message}"[:300])
            ) from None
        if str(spiffe_id) != client.tls_spiffe_id:
            raise InvalidClientError(
                description=_safe(
                    f"The client certificate is for {spiffe_id}, but client "
                    f"{client_id} is registered with {client.tls_spiffe_id}."
                )
            )
        request.cnf_x5t = certificate_thumbprint(cert)
        return client


class IdpClientCredentialsGrant(ClientCredentialsGrant):
    """client_credentials (RFC 6749 §4.4): scopes must be a subset of the client's."""

    TOKEN_ENDPOINT_AUTH_METHODS = CLIENT_AUTH_METHODS

    def validate_token_request(self) -> None:
        client = self.authenticate_token_endpoint_client()
        if not client.check_grant_type(self.GRANT_TYPE):
            raise UnauthorizedClientError(
                _safe(
                    f"Client {client.get_client_id()} may not use client_credentials; register "
                    f"it with --grant-type client_credentials."
                )
            )
        self.request.client = client
        requested = (self.request.payload.scope or "").split()
        extra = sorted(set(requested) - set(client.scopes))
        if extra:
            raise InvalidScopeError(
                _safe(
                    f"Client {client.get_client_id()} may not request scope(s) "
                    f"{' '.join(extra)}; allowed: {' '.join(client.scopes) or '(none)'}."
                )
            )

    def create_token_response(self) -> tuple[int, Any, Any]:
        scope = self.client.get_allowed_scope(self.request.payload.scope)
        token = self.generate_token(scope=scope, include_refresh_token=False)
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER


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


class _Introspection(IntrospectionEndpoint):
    """RFC 7662. Any authenticated client may introspect; foreign tokens are inactive."""

    CLIENT_AUTH_METHODS = CLIENT_AUTH_METHODS

    def __init__(self, server: IdpAuthorizationServer) -> None:
        super().__init__(server)
        self.ctx = server.ctx

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


class _Revocation(RevocationEndpoint):
    """RFC 7009: access tokens by ``jti``; refresh tokens with their whole family."""

    CLIENT_AUTH_METHODS = CLIENT_AUTH_METHODS

    def __init__(self, server: IdpAuthorizationServer) -> None:
        super().__init__(server)
        self.ctx = server.ctx

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
        self.register_endpoint(_Introspection(self))
        self.register_endpoint(_Revocation(self))

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
