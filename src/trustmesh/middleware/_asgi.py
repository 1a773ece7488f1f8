"""The ASGI middleware: the caller's identity, revocation, token and policy per request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, MutableMapping, Sequence
from typing import Any, Protocol

from cryptography import x509
from prometheus_client import CollectorRegistry

from trustmesh.context import inbound_token
from trustmesh.headers import is_spoofable
from trustmesh.tokens import AccessTokenClaims, InvalidTokenError

from ._core import (
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

__all__ = ["AsyncTokenVerifier", "MTLSMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# What the middleware does with a header, by its raw name (see _header_kind).
_KEEP, _AUTHORIZATION, _IDENTITY, _STRIPPED = 0, 1, 2, 3
_HEADER_KINDS_LIMIT = 4096  # callers choose the names: bounded, cleared when full
_header_kinds: dict[bytes, int] = {}


def _header_kind(raw_name: bytes) -> int:
    """Keep, Authorization, identity header (stripped unless from a trusted proxy) or
    another header only a trusted proxy may set (stripped); remembered per spelling."""
    kind = _header_kinds.get(raw_name)
    if kind is None:
        name = raw_name.decode("latin-1")
        if is_identity_header(name):
            kind = _IDENTITY
        elif is_spoofable(raw_name):
            kind = _STRIPPED
        elif name.lower() == "authorization":
            kind = _AUTHORIZATION
        else:
            kind = _KEEP
        if len(_header_kinds) >= _HEADER_KINDS_LIMIT:
            _header_kinds.clear()
        _header_kinds[raw_name] = kind
    return kind


class AsyncTokenVerifier(Protocol):
    """Verifies access tokens in the event loop (``trustmesh.tokens.AsyncVerifier``)."""

    async def verify_access_token(
        self, token: str | bytes, *, client_cert: x509.Certificate | bytes | None = None
    ) -> AccessTokenClaims: ...


class MTLSMiddleware:
    """Let only verified, allowed callers reach an ASGI app, and tell it who they are.

    Per request, in order: the caller's leaf from the ASGI TLS extension (filled
    by :class:`trustmesh.tls.TLSHttpToolsProtocol`) must be a workload
    certificate of ``trust_domain`` and not revoked (checked on every request, so
    a keep-alive connection of a revoked caller is refused at its next request
    and closed); identity headers are stripped unless the peer is a trusted
    proxy; the bearer token is verified when present (or required); the policy
    decides. The app then finds a :class:`RequestIdentity` at
    ``scope["trustmesh"]`` and the verified token in
    :data:`trustmesh.context.inbound_token`. Refusals are problem+json.

    Args:
        app: The ASGI app to protect.
        trust_domain: The trust domain callers must belong to.
        policy: Decides each request (``trustmesh.policy.Policy``); None allows every
            verified caller, which must be chosen explicitly and is logged.
        revocation: Revoked serials (``trustmesh.tls.RevocationSet``); None skips
            the check, which must be chosen explicitly and is logged.
        verifier: Verifies bearer tokens (``trustmesh.tokens.AsyncVerifier``).
        require_token: Refuse requests without a bearer token (401).
        required_scopes: Scopes every token must carry (403 insufficient_scope).
        trusted_proxies: SPIFFE IDs or globs of gateways/sidecars allowed to set
            identity headers (``X-Trustmesh-Caller``, ``Client-Cert``).
        trust_bundle: Certificates to verify a forwarded ``Client-Cert`` against.
        exempt_paths: Exact paths served without any check (e.g. ``/healthz``
            for a load balancer); logged at startup.
        log_allowed: Log allowed requests too, at DEBUG (denials are always logged, at
            WARNING).
        metrics_registry: A prometheus ``CollectorRegistry`` to count decisions in
            (``trustmesh_service_requests_total{outcome,reason}``); None counts nothing.

    Raises:
        ConfigError: A setting is unusable (the message says which).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        trust_domain: str,
        policy: PolicyLike | None,
        revocation: RevocationLike | None,
        verifier: AsyncTokenVerifier | None = None,
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
            kind="ASGI",
            metrics_registry=metrics_registry,
        )
        self.exempt_paths = frozenset(exempt_paths)
        if self.exempt_paths:
            log.warning(
                "ASGI middleware: paths served without checks: %s", sorted(self.exempt_paths)
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in {"http", "websocket"}:
            await self.app(scope, receive, send)
            return
        # A WebSocket handshake is a GET (RFC 6455); the policy decides on that.
        method = str(scope.get("method", "GET"))
        path = str(scope.get("path", ""))
        raw = scope.get("raw_path")
        # The policy decides on the raw path (it refuses %2F and other ambiguity).
        policy_path = raw.decode("latin-1").partition("?")[0] if isinstance(raw, bytes) else path
        if path in self.exempt_paths:
            # No checks here, but no identity headers either: nobody vouched for them.
            exempt = dict(scope)
            exempt["headers"] = [(k, v) for k, v in scope.get("headers", ()) if not is_spoofable(k)]
            await self.app(exempt, receive, send)
            return
        gate = self.gate
        peer: Caller | None = None
        caller: Caller | None = None
        user: AccessTokenClaims | None = None
        token: str | None = None
        try:
            tls = (scope.get("extensions") or {}).get("tls") or {}
            chain = tls.get("client_cert_chain") or []
            peer = gate.caller_from_peer(chain[0] if chain else None)
            headers = scope.get("headers", ())
            identity_headers: dict[str, list[str]] = {}
            authorization: list[str] = []
            stripped = False
            for raw_name, raw_value in headers:
                kind = _header_kind(raw_name)
                if kind == _KEEP:
                    continue
                if kind == _AUTHORIZATION:
                    authorization.append(raw_value.decode("latin-1"))
                    continue
                # Identity headers, client-address and request-line override headers:
                # only a trusted proxy may set them (trustmesh.headers, as the gateway
                # strips).
                stripped = True
                if kind == _IDENTITY:
                    identity_headers.setdefault(
                        normalize_header(raw_name.decode("latin-1")), []
                    ).append(raw_value.decode("latin-1"))
            # The common case (nothing to strip) passes the header list through as is.
            kept = (
                [(k, v) for k, v in headers if _header_kind(k) <= _AUTHORIZATION]
                if stripped
                else headers
            )
            caller = peer
            if gate.is_trusted_proxy(peer):
                caller = gate.forwarded_caller(peer, identity_headers)
                # The app sees what the trusted proxy sent (minus nothing).
                kept = list(headers)
            token = gate.bearer_token(authorization)
            if token is not None and self.verifier is not None:
                bound = caller.certificate or peer.certificate
                try:
                    user = await self.verifier.verify_access_token(token, client_cert=bound)
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
            await _refuse(scope, send, refusal)
            return
        gate.log_decision(
            method=method,
            path=path,
            caller=caller,
            peer=peer,
            user=user,
            decision=decision,
            refusal=None,
        )
        inner = dict(scope)
        inner["headers"] = kept
        inner["trustmesh"] = RequestIdentity(caller, user, decision)
        reset = inbound_token.set(token if user is not None else None)
        try:
            await self.app(inner, receive, send)
        finally:
            inbound_token.reset(reset)


async def _refuse(scope: Scope, send: Send, refusal: Refusal) -> None:
    if scope["type"] == "websocket":
        # Close before accepting: the client sees HTTP 403 (ASGI spec, websocket.close).
        await send({"type": "websocket.close", "code": 1008, "reason": refusal.reason})
        return
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in refusal.response_headers()]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": refusal.body()})
