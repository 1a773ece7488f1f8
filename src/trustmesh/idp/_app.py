"""The identity server's HTTP app (Starlette): discovery, JWKS, token, introspection, revocation.

Routes (machine side): ``/.well-known/openid-configuration`` and
``/.well-known/oauth-authorization-server`` (the same metadata), ``/jwks``, ``/token``,
``/introspect``, ``/revoke``, ``/revoked`` (our revocation list), ``/healthz``,
``/metrics``. OAuth endpoints answer RFC 6749 §5.2 error JSON; the rest problem+json.

Extensions (the user side) plug in through :class:`IdpExtension`: ``create_app`` calls
each extension's ``install(ctx)`` after the Authlib server exists (so it can
``ctx.authorization_server().register_grant(...)`` and add discovery fields to
``ctx.metadata``) and mounts the routes it returns. Discovery is computed per request
from what is registered.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from trustmesh.errors import ConfigError, StoreError
from trustmesh.limits import RateLimiter
from trustmesh.serving import TimedApp

from ._context import METRICS_CONTENT_TYPE, IdpContext
from ._oauth import IdpOAuth2Request
from ._server import create_server
from ._tokens import revoked_access_tokens

__all__ = ["IdpExtension", "create_app", "oauth_error", "oauth_request", "problem"]

log = logging.getLogger("trustmesh.idp")


class IdpExtension(Protocol):
    """Something that adds grants, discovery fields and routes to the identity server."""

    def install(self, ctx: IdpContext) -> Sequence[BaseRoute]:
        """Register grants on ``ctx.authorization_server()``, add ``ctx.metadata``
        fields, and return the routes to mount."""
        ...


def oauth_error(
    status: int, error: str, description: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An RFC 6749 §5.2 error response."""
    return JSONResponse(
        {"error": error, "error_description": description},
        status_code=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def problem(status: int, title: str, detail: str) -> JSONResponse:
    """An RFC 9457 problem document (non-OAuth routes)."""
    return JSONResponse(
        {"type": "about:blank", "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type="application/problem+json",
    )


def _peer_der(request: Request) -> bytes | None:
    tls = request.scope.get("extensions", {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    if not chain:
        return None
    return ssl.PEM_cert_to_DER_cert(chain[0])


async def oauth_request(ctx: IdpContext, request: Request) -> IdpOAuth2Request | Response:
    """Read a request (form body for POST, size- and time-capped) into an Authlib request.

    Returns an OAuth error response instead for bodies that are too large, slow,
    not form-encoded, or that repeat a parameter (RFC 6749 §3.2).
    """
    settings = ctx.settings
    body = b""
    if request.method == "POST":
        declared = request.headers.get("content-length")
        too_large = oauth_error(
            413,
            "invalid_request",
            f"The request body is larger than {settings.max_body} bytes.",
        )
        if declared is not None and (not declared.isdigit() or int(declared) > settings.max_body):
            return too_large
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            return oauth_error(
                400,
                "invalid_request",
                "Send the parameters as application/x-www-form-urlencoded (got "
                f"{ctype or 'no content type'}).",
            )
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(settings.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > settings.max_body:
                        return too_large
                    chunks.append(chunk)
        except TimeoutError:
            return oauth_error(
                408,
                "invalid_request",
                f"The request body did not arrive within {settings.body_timeout:g} s.",
            )
        body = b"".join(chunks)
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=64)
        query = parse_qsl(request.url.query, keep_blank_values=True, max_num_fields=64)
    except (UnicodeDecodeError, ValueError):
        return oauth_error(
            400, "invalid_request", "The parameters are not valid UTF-8 form encoding."
        )
    lists: dict[str, list[str]] = {}
    for key, value in [*query, *pairs]:
        lists.setdefault(key, []).append(value)
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            return oauth_error(
                400, "invalid_request", f"Parameter {key!r} appears more than once; send it once."
            )
        form[key] = value
    args = {k: v for k, v in query}
    client = request.client.host if request.client else "?"
    return IdpOAuth2Request(
        request.method,
        str(request.url),
        request.headers,
        form=form,
        args=args,
        lists=lists,
        peer_der=_peer_der(request),
        client_host=client,
    )


def discovery_document(ctx: IdpContext) -> dict[str, Any]:
    """The authorization-server metadata (RFC 8414 / OIDC Discovery), from what is registered."""
    server = ctx.authorization_server()
    methods = server.client_auth_methods
    secret_methods = [m for m in methods if m in _ENDPOINT_METHODS]
    doc: dict[str, Any] = {
        "issuer": ctx.issuer,
        "jwks_uri": ctx.settings.endpoint("/jwks"),
        "token_endpoint": ctx.settings.endpoint("/token"),
        "introspection_endpoint": ctx.settings.endpoint("/introspect"),
        "revocation_endpoint": ctx.settings.endpoint("/revoke"),
        "revocation_list_endpoint": ctx.settings.endpoint("/revoked"),
        "grant_types_supported": server.grant_types_supported,
        "response_types_supported": server.response_types_supported,
        "token_endpoint_auth_methods_supported": methods,
        "token_endpoint_auth_signing_alg_values_supported": [
            "ES256",
            "ES384",
            "RS256",
            "PS256",
            "EdDSA",
        ],
        "introspection_endpoint_auth_methods_supported": secret_methods,
        "revocation_endpoint_auth_methods_supported": secret_methods,
        "tls_client_certificate_bound_access_tokens": True,
        "access_token_signing_alg_values_supported": ["ES256", "RS256"],
        "subject_types_supported": ["public"],
    }
    doc.update(ctx.metadata)
    return doc


_ENDPOINT_METHODS = {
    "tls_client_auth",
    "private_key_jwt",
    "client_secret_basic",
    "client_secret_post",
}


def create_app(ctx: IdpContext, extensions: Sequence[IdpExtension] = ()) -> ASGIApp:
    """Build the ASGI app: the machine routes plus each extension's routes.

    Creates the Authlib server (``ctx.server``) first, then installs the extensions.
    """
    server = create_server(ctx)
    settings = ctx.settings
    per_ip = RateLimiter(settings.ip_rate, settings.ip_burst)
    per_client = RateLimiter(settings.token_rate, settings.token_burst)

    async def discovery(_: Request) -> Response:
        return JSONResponse(discovery_document(ctx), headers={"Cache-Control": "max-age=60"})

    async def jwks(_: Request) -> Response:
        doc = await run_in_threadpool(ctx.keys.jwks)
        return JSONResponse(
            doc,
            media_type="application/jwk-set+json",
            headers={"Cache-Control": "max-age=60"},
        )

    async def guarded(func: Callable[..., Response], *args: Any) -> Response:
        """Run an Authlib call in a worker thread; a failing database is a 503, not a 500."""
        try:
            return await run_in_threadpool(func, *args)
        except (StoreError, ConfigError) as exc:
            log.error(
                "cannot serve a request: %s",
                exc.message,
                extra={"event": "unavailable", "reason": type(exc).__name__},
            )
            return oauth_error(
                503,
                "temporarily_unavailable",
                "The identity server cannot reach its database or keys right now; retry shortly.",
                headers={"Retry-After": "5"},
            )

    def limited(oreq: IdpOAuth2Request) -> Response | None:
        wait = per_ip.allow(f"ip:{oreq.client_host}")
        reason = "rate_limited_ip"
        client_id = oreq.claimed_client_id()
        if not wait and client_id:
            wait = per_client.allow(f"client:{client_id}")
            reason = "rate_limited_client"
        if not wait:
            return None
        ctx.metrics.denied.labels(route="/token", reason=reason).inc()
        log.info(
            "refused /token: rate limited",
            extra={
                "event": "deny",
                "route": "/token",
                "reason": reason,
                "status": 429,
                "client": oreq.client_host,
                "client_id": client_id or "",
            },
        )
        return oauth_error(
            429,
            "slow_down",
            "Too many token requests from this client or address; retry after "
            f"{max(1, int(wait + 0.999))} s and cache tokens until they expire.",
            headers={"Retry-After": str(max(1, int(wait + 0.999)))},
        )

    async def token(request: Request) -> Response:
        oreq = await oauth_request(ctx, request)
        if isinstance(oreq, Response):
            ctx.metrics.denied.labels(route="/token", reason=f"http_{oreq.status_code}").inc()
            return oreq
        refused = limited(oreq)
        if refused is not None:
            return refused
        return await guarded(server.create_token_response, oreq)

    async def endpoint(name: str, request: Request) -> Response:
        oreq = await oauth_request(ctx, request)
        if isinstance(oreq, Response):
            return oreq
        return await guarded(server.create_endpoint_response, name, oreq)

    async def introspect(request: Request) -> Response:
        return await endpoint("introspection", request)

    async def revoke(request: Request) -> Response:
        return await endpoint("revocation", request)

    async def revoked(_: Request) -> Response:
        entries = await run_in_threadpool(revoked_access_tokens, ctx)
        return JSONResponse(
            {"issuer": ctx.issuer, "generated_at": int(time.time()), "revoked": entries},
            headers={"Cache-Control": "max-age=5"},
        )

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(_: Request) -> Response:
        return Response(ctx.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def not_allowed(request: Request) -> Response:
        return oauth_error(
            405, "invalid_request", f"{request.url.path} takes POST with a form body."
        )

    routes: list[BaseRoute] = [
        Route("/.well-known/openid-configuration", discovery, methods=["GET"]),
        Route("/.well-known/oauth-authorization-server", discovery, methods=["GET"]),
        Route("/jwks", jwks, methods=["GET"]),
        Route("/token", token, methods=["POST"]),
        Route("/introspect", introspect, methods=["POST"]),
        Route("/revoke", revoke, methods=["POST"]),
        Route("/revoked", revoked, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    for extension in extensions:
        routes.extend(extension.install(ctx))
    routes += [Route(p, not_allowed, methods=["GET"]) for p in ("/token", "/introspect", "/revoke")]

    async def not_found(request: Request, _exc: Exception) -> Response:
        return problem(
            404,
            "Not found",
            f"No route {request.url.path}: see {ctx.issuer}/.well-known/openid-configuration.",
        )

    async def method_not_allowed(request: Request, _exc: Exception) -> Response:
        return problem(
            405, "Method not allowed", f"{request.method} is not allowed on {request.url.path}."
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error(
            "internal error on %s: %s",
            request.url.path,
            type(exc).__name__,
            exc_info=exc,
            extra={"event": "error", "route": request.url.path},
        )
        return oauth_error(500, "server_error", "The identity server failed; see its log.")

    app = Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error},
    )
    app.state.ctx = ctx
    known = {getattr(r, "path", "") for r in routes}

    def observe(method: str, path: str, status: int, seconds: float) -> None:
        route = path if path in known else "other"
        ctx.metrics.latency.labels(method, route, str(status)).observe(seconds)

    return TimedApp(app, observe)
