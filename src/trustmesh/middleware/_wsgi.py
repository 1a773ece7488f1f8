"""The WSGI middleware: the same checks as the ASGI one, with the synchronous verifier."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from types import TracebackType
from typing import Any, Protocol

from cryptography import x509
from prometheus_client import CollectorRegistry

from trustmesh.context import inbound_token
from trustmesh.headers import is_spoofable
from trustmesh.tokens import AccessTokenClaims, InvalidTokenError

from ._core import (
    FORWARDED_CERT_CHAIN_HEADER,
    Caller,
    Gate,
    PolicyLike,
    Refusal,
    RequestIdentity,
    RevocationLike,
    is_identity_header,
    log,
    normalize_header,
)

__all__ = ["PEER_CERT_ENVIRON_KEY", "MTLSWSGIMiddleware", "TokenVerifier"]

#: Our own environ key for the peer leaf (PEM text or DER bytes), for servers
#: that do not set ``SSL_CLIENT_CERT``.
PEER_CERT_ENVIRON_KEY = "trustmesh.peer_certificate"

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | None
StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    503: "Service Unavailable",
}


class TokenVerifier(Protocol):
    """Verifies access tokens synchronously (``trustmesh.tokens.Verifier``)."""

    def verify_access_token(
        self, token: str | bytes, *, client_cert: x509.Certificate | bytes | None = None
    ) -> AccessTokenClaims: ...


class MTLSWSGIMiddleware:
    """The WSGI twin of :class:`MTLSMiddleware` (Flask: ``app.wsgi_app = MTLSWSGIMiddleware(
    app.wsgi_app, ...)``).

    The peer leaf comes from ``environ["SSL_CLIENT_CERT"]`` (PEM, as werkzeug's
    server with a client-certificate-requesting ``ssl_context`` and mod_wsgi set
    it) or ``environ["trustmesh.peer_certificate"]``. The app finds a
    :class:`RequestIdentity` at ``environ["trustmesh"]``; the verified token is
    in :data:`trustmesh.context.inbound_token` while the app is called (a
    streamed response body iterated later no longer sees it).

    WSGI servers fold ``X-Trustmesh-Caller`` and ``X_Trustmesh_Caller`` into the
    same ``HTTP_X_TRUSTMESH_CALLER`` key: from a peer that is not a trusted
    proxy every such key is removed, whichever spelling produced it.

    Args are those of :class:`MTLSMiddleware`, with a synchronous ``verifier``
    (``trustmesh.tokens.Verifier``).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        trust_domain: str,
        policy: PolicyLike | None,
        revocation: RevocationLike | None,
        verifier: TokenVerifier | None = None,
        require_token: bool = False,
        required_scopes: Collection[str] = (),
        trusted_proxies: Iterable[str] = (),
        trust_bundle: Sequence[x509.Certificate] = (),
        exempt_paths: Collection[str] = (),
        log_allowed: bool = True,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.app = app
        self.verifier = verifier
        self.gate = Gate(
            trust_domain=trust_domain,
            policy=policy,
            revocation=revocation,
            require_token=require_token,
            required_scopes=required_scopes,
            trusted_proxies=trusted_proxies,
            trust_bundle=trust_bundle,
            has_verifier=verifier is not None,
            log_allowed=log_allowed,
            kind="WSGI",
            metrics_registry=metrics_registry,
        )
        self.exempt_paths = frozenset(exempt_paths)
        if self.exempt_paths:
            log.warning(
                "WSGI middleware: paths served without checks: %s", sorted(self.exempt_paths)
            )

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET"))
        raw_path = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
        # PEP 3333: the path arrives as latin-1 decoded bytes.
        path = raw_path.encode("latin-1", "replace").decode("utf-8", "replace")
        # The policy decides on the raw path when the server gives it (werkzeug,
        # gunicorn: REQUEST_URI / RAW_URI); it refuses %2F and other ambiguity.
        raw = environ.get("REQUEST_URI") or environ.get("RAW_URI")
        policy_path = str(raw).partition("?")[0] if raw and str(raw).startswith("/") else path
        if path in self.exempt_paths:
            # No checks here, but no identity headers either: nobody vouched for them.
            for key in [k for k in environ if k.startswith("HTTP_") and is_spoofable(k[5:])]:
                del environ[key]
            return self.app(environ, start_response)
        gate = self.gate
        peer: Caller | None = None
        caller: Caller | None = None
        user: AccessTokenClaims | None = None
        token: str | None = None
        try:
            leaf = environ.get("SSL_CLIENT_CERT") or environ.get(PEER_CERT_ENVIRON_KEY)
            peer = gate.caller_from_peer(leaf if isinstance(leaf, str | bytes) else None)
            identity_keys = [
                k for k in environ if k.startswith("HTTP_") and is_identity_header(k[5:])
            ]
            caller = peer
            if gate.is_trusted_proxy(peer):
                # One key may hold several headers joined by ","; the gate refuses that.
                headers = {
                    normalize_header(k[5:]): (
                        [str(environ[k])]
                        if normalize_header(k[5:]) == FORWARDED_CERT_CHAIN_HEADER
                        else _split(str(environ[k]))
                    )
                    for k in identity_keys
                }
                caller = gate.forwarded_caller(peer, headers)
            else:
                # Identity, client-address and request-line override headers: only a
                # trusted proxy may set them (trustmesh.headers, as the gateway strips).
                for key in [k for k in environ if k.startswith("HTTP_") and is_spoofable(k[5:])]:
                    del environ[key]
            authorization = environ.get("HTTP_AUTHORIZATION")
            token = gate.bearer_token(_split(authorization) if authorization else [])
            if token is not None and self.verifier is not None:
                bound = caller.certificate or peer.certificate
                try:
                    user = self.verifier.verify_access_token(token, client_cert=bound)
                except InvalidTokenError as exc:
                    raise gate.token_refusal(exc) from None
                gate.check_scopes(user)
            decision = gate.decide(caller, user, method, policy_path)
        except Refusal as refusal:
            gate.log_decision(
                method=method,
                path=path,
                caller=caller,
                peer=peer,
                user=user,
                decision=None,
                refusal=refusal,
            )
            status = f"{refusal.status} {_REASONS.get(refusal.status, 'Refused')}"
            start_response(status, refusal.response_headers())
            return [refusal.body()]
        gate.log_decision(
            method=method,
            path=path,
            caller=caller,
            peer=peer,
            user=user,
            decision=decision,
            refusal=None,
        )
        environ["trustmesh"] = RequestIdentity(caller, user, decision)
        reset = inbound_token.set(token if user is not None else None)
        try:
            return self.app(environ, start_response)
        finally:
            inbound_token.reset(reset)


def _split(value: str) -> list[str]:
    # WSGI servers join repeated headers with ", ". A token, a SPIFFE ID or one
    # RFC 9440 certificate never holds ", " (Client-Cert-Chain, a list, is not split).
    return value.split(", ")
