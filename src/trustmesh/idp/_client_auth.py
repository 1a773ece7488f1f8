"""Client authentication (RFC 6749 §2.3, RFC 7523, RFC 8705) for every endpoint.

Methods, in the order tried: ``tls_client_auth`` (the mTLS certificate must chain to
our CA and carry the client's registered SPIFFE ID), ``private_key_jwt`` (a signed
assertion, ``jti`` single-use), ``client_secret_basic``, ``client_secret_post``; plus
``none`` for public clients when a grant lists it. A method applies only when its
credentials are present; credentials for the wrong method, or wrong credentials, are
an ``invalid_client`` error that says what went wrong.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from authlib.oauth2.rfc6749 import ClientAuthentication, InvalidClientError
from cryptography import x509
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import delete, insert

from trustmesh.errors import ConflictError, PKIError
from trustmesh.pki import verify_chain
from trustmesh.store import idp_assertion_jtis

from ._context import IdpContext
from ._oauth import IdpOAuth2Request, _safe, basic_credentials
from ._tokens import certificate_thumbprint

__all__ = ["ASSERTION_ALGORITHMS", "CLIENT_AUTH_METHODS", "JWT_BEARER_ASSERTION"]

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
