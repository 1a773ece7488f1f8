"""The gateway's ASGI app: one request, in the order the specification fixes.

Per request: header limits (431) -> route match on the normalised path (400 for an
ambiguous path, 404 no route, 405 wrong method) -> blocked source (403) -> the route's
CIDR lists (403) -> rate limit per IP (429) -> bearer token (401/503) -> rate limit per
client (429) -> the route's requirements and policy file (403) -> spoofable headers
stripped, the gateway's own forwarding headers added -> forwarded (502/504, retries for
idempotent methods, passive health) -> the response streamed back with security headers.
Every refusal is problem+json, counted in the metrics and toward alerts, and every
request gets one access-log line with its decision reason.

The configuration in force is a :class:`GatewayState`; a reload builds a new one and
swaps it in one assignment, so a request sees one configuration from start to end.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from trustmesh.policy import PathRefused, Policy, PolicyFile, normalize_path
from trustmesh.relay import (
    BodyTooLarge,
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    send_problem,
)
from trustmesh.tokens import AccessTokenClaims

from ._addresses import CidrList, TrustedProxies, client_address
from ._alerts import Alerts
from ._auth import Authenticator, AuthFailure, authorization_value, client_key, enforce
from ._config import GatewayConfig, RouteConfig
from ._headers import ERROR_RESPONSE_HEADERS, SECURITY_HEADERS, strip_inbound, vouched_headers
from ._metrics import GatewayMetrics
from ._ratelimit import Rate, RateLimits
from ._upstream import IDEMPOTENT_METHODS, UpstreamPool

__all__ = ["REPLAY_LIMIT", "CompiledRoute", "GatewayApp", "GatewayState"]

log = logging.getLogger("trustmesh.gateway")
access_log = logging.getLogger("trustmesh.gateway.access")

#: Bodies up to this size of idempotent requests are read first, so a retry can resend them.
REPLAY_LIMIT = 64 * 1024
#: An X-Request-Id from the client is kept only if it looks like this.
_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")
_HOST_PORT = re.compile(r"^\[?([^\]]*?)\]?(?::\d+)?$")
#: Request headers not forwarded besides the stripped ones: the upstream gets its own
#: Host (X-Forwarded-Host carries the client's), the gateway's request id, and no Expect
#: (uvicorn already answered it).
_NOT_FORWARDED = frozenset({b"host", b"x-request-id", b"expect"})
_PATH_SAFE = "/!$&'()*+,;=:@-._~"
#: A ``.`` or ``..`` segment with ``;`` parameters: Java servers (Tomcat, Jetty) drop the
#: parameters and resolve it, so ``/public/..;/admin`` would reach ``/admin`` upstream.
#: Control characters in a logged path are written as percent-escapes (no forged lines).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DOT_PARAMETERS = re.compile(r"(?:^|/)\.\.?;")


@dataclass(eq=False)
class CompiledRoute:
    """A route ready to serve: its config, pool, address lists, limits and policy."""

    config: RouteConfig
    pool: UpstreamPool
    cidrs: CidrList
    requirement: Policy | None
    policy_file: PolicyFile | None
    per_ip: Rate | None
    per_client: Rate | None
    #: Rate-limit key prefixes: a route with its own limit has its own buckets.
    ip_bucket: str
    client_bucket: str
    max_body: int
    host_exact: str | None = None
    host_suffix: str | None = None

    @property
    def token_required(self) -> bool:
        """A token must be sent (not a public route, and not ``required: false``)."""
        return not self.config.public and self.config.auth.get("required", True) is not False

    @property
    def name(self) -> str:
        return self.config.name

    def host_matches(self, host: str) -> bool:
        if self.host_exact is not None:
            return host == self.host_exact
        if self.host_suffix is not None:
            return host.endswith(self.host_suffix) and len(host) > len(self.host_suffix)
        return True

    def path_matches(self, path: str) -> bool:
        prefix = self.config.path
        if prefix == "/" or path == prefix:
            return True
        return path.startswith(prefix) and path[len(prefix)] == "/"

    def upstream_path(self, path: str) -> str:
        config = self.config
        if not config.strip_prefix and config.rewrite_prefix is None:
            return path
        rest = path[len(config.path) :] if config.path != "/" else path
        base = config.rewrite_prefix or ""
        if base == "/":
            base = ""
        joined = base + rest
        return joined or "/"


@dataclass(eq=False)
class GatewayState:
    """One configuration generation with everything built from it.

    Attributes:
        config: The configuration.
        routes: Compiled routes, most specific first (exact host, wildcard host, any
            host; then longer prefixes).
        trusted: Proxies whose X-Forwarded-For is believed.
        authenticator: Checks tokens (None without issuers).
        ratelimits: Token buckets.
        alerts: The deny rule (None without ``alerts``).
        generation: 1 at start, +1 per successful reload.
        inflight: Requests being handled with this state.
    """

    config: GatewayConfig
    routes: Sequence[CompiledRoute]
    trusted: TrustedProxies
    authenticator: Authenticator | None
    ratelimits: RateLimits
    alerts: Alerts | None
    generation: int = 1
    inflight: int = 0
    drained: Callable[[], None] | None = field(default=None, repr=False)


class _Refusal(Exception):  # noqa: N818 - a response, not an error
    __slots__ = ("detail", "headers", "reason", "status", "title")

    def __init__(
        self,
        status: int,
        reason: str,
        title: str,
        detail: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self.status = status
        self.reason = reason
        self.title = title
        self.detail = detail
        self.headers = headers


class _Entry:
    """What the access-log line says about one request."""

    __slots__ = (
        "attempts",
        "client_id",
        "detail",
        "ip",
        "reason",
        "request_id",
        "route",
        "status",
        "stripped",
        "sub",
        "upstream",
        "upstream_status",
    )

    def __init__(self) -> None:
        self.ip = ""
        self.route = "-"
        self.status = 500
        self.reason = "internal_error"
        self.request_id = ""
        self.sub: str | None = None
        self.client_id: str | None = None
        self.upstream: str | None = None
        self.upstream_status: int | None = None
        self.attempts = 0
        self.detail: str | None = None
        self.stripped: list[str] = []


def _request_id(headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if len(name) == 12 and name.lower() == b"x-request-id":
            if _SAFE_REQUEST_ID.fullmatch(value):
                return value
            break
    return os.urandom(16).hex().encode()


def _header(headers: Sequence[tuple[bytes, bytes]], wanted: bytes) -> bytes | None:
    size = len(wanted)
    for name, value in headers:
        if len(name) == size and name.lower() == wanted:
            return value
    return None


def _host_name(raw: bytes | None) -> str:
    if not raw:
        return ""
    text = raw.decode("latin-1").strip().lower()
    match = _HOST_PORT.match(text)
    return (match.group(1) if match else text).rstrip(".")


def _retry_after(seconds: float) -> tuple[bytes, bytes]:
    return (b"retry-after", str(max(1, int(seconds + 0.999))).encode())


class GatewayApp:
    """The gateway as an ASGI app (served by uvicorn over TLS; see ``_serve``).

    Args:
        state: The configuration generation to serve; replace :attr:`state` to reload.
        metrics: Where requests, denies and health are counted.
    """

    def __init__(self, state: GatewayState, metrics: GatewayMetrics) -> None:
        self.state = state
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            # WebSocket upgrades are not relayed: refuse before accepting (HTTP 403).
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            # The gateway's resources live in its state, built and closed by _serve.
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        state = self.state
        state.inflight += 1
        metrics = self.metrics
        metrics.inflight.inc()
        entry = _Entry()
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        entry.request_id = _request_id(headers).decode()
        try:
            try:
                await self._handle(state, scope, receive, send, headers, entry)
            except _Refusal as refusal:
                await self._refuse(state, send, entry, refusal)
            except AuthFailure as failure:
                entry.detail = failure.log_message
                await self._refuse(
                    state,
                    send,
                    entry,
                    _Refusal(
                        failure.status,
                        failure.reason,
                        failure.title,
                        failure.detail,
                        failure.headers,
                    ),
                )
        finally:
            state.inflight -= 1
            metrics.inflight.dec()
            elapsed = time.perf_counter() - start
            metrics.observe(entry.route, entry.status, entry.reason, elapsed)
            if state.config.access_log:
                _log_access(scope, entry, elapsed)
            if state.inflight == 0 and state.drained is not None:
                state.drained()

    async def _handle(
        self,
        state: GatewayState,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: list[tuple[bytes, bytes]],
        entry: _Entry,
    ) -> None:
        config = state.config
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        client = scope.get("client")
        peer = client[0] if client else ""
        ip = client_address(peer, headers, state.trusted)  # also canonical (::ffff:a.b.c.d)
        entry.ip = ip

        # 1. Header limits.
        size = len(method) + len(raw_path) + len(query) + 12
        for name, value in headers:
            size += len(name) + len(value) + 4
        if size > config.max_header_bytes:
            raise _Refusal(
                431,
                "headers_too_large",
                "Request header fields too large",
                f"The request line and headers are {size} bytes; the limit is "
                f"{config.max_header_bytes}.",
            )

        # 2. Route.
        try:
            path = normalize_path(raw_path.decode("latin-1"))
        except PathRefused as exc:
            raise _Refusal(
                400, "path_refused", "Bad request path", f"The path is refused: {exc}."
            ) from None
        if _DOT_PARAMETERS.search(path):
            raise _Refusal(
                400,
                "path_refused",
                "Bad request path",
                "The path is refused: a '.' or '..' segment carries ';' parameters, which "
                "some servers strip before resolving it.",
            )
        if sum(1 for name, _ in headers if len(name) == 4 and name.lower() == b"host") > 1:
            # RFC 9112 section 3.2: proxies that read another Host line would route elsewhere.
            raise _Refusal(
                400,
                "host_refused",
                "Bad Host header",
                "The request has more than one Host header; send exactly one.",
            )
        host = _host_name(_header(headers, b"host"))
        route = self._match(state, host, method, path)
        entry.route = route.name

        # 3. Blocked source.
        alerts = state.alerts
        if alerts is not None:
            blocked = alerts.blocked_for(f"ip:{ip}")
            if blocked > 0:
                raise _Refusal(
                    403,
                    "blocked",
                    "Client blocked",
                    "Too many refused requests came from this address; it is blocked for now.",
                    (_retry_after(blocked),),
                )

        # 4. CIDR lists.
        if route.cidrs:
            problem = route.cidrs.check(ip)
            if problem is not None:
                raise _Refusal(
                    403,
                    problem,
                    "Address not allowed",
                    "Requests from this address are not allowed on this route.",
                )

        # 5. Rate limit per IP.
        if route.per_ip is not None:
            wait = await state.ratelimits.take(f"{route.ip_bucket}ip:{ip}", route.per_ip)
            if wait > 0:
                raise _Refusal(
                    429,
                    "rate_limited",
                    "Too many requests",
                    "This address sent too many requests; retry after the Retry-After delay.",
                    (_retry_after(wait),),
                )

        # 6. Token.
        claims: AccessTokenClaims | None = None
        authorization = None if route.config.public else authorization_value(headers)
        if authorization is not None or route.token_required:
            authenticator = state.authenticator
            if authenticator is None:  # refused at load; kept as a guard
                raise _Refusal(503, "token_verifier_unavailable", "No issuers", "No issuers.")
            claims = await authenticator.authenticate(
                authorization, allowed_issuers=route.config.issuers
            )
            entry.sub = claims.subject
            entry.client_id = client_key(claims)
            if alerts is not None:
                blocked = alerts.blocked_for(f"client:{entry.client_id}")
                if blocked > 0:
                    raise _Refusal(
                        403,
                        "blocked",
                        "Client blocked",
                        "Too many refused requests came from this client; it is blocked for now.",
                        (_retry_after(blocked),),
                    )

            # 7. Rate limit per client.
            if route.per_client is not None:
                key = f"{route.client_bucket}client:{entry.client_id}"
                wait = await state.ratelimits.take(key, route.per_client)
                if wait > 0:
                    raise _Refusal(
                        429,
                        "rate_limited",
                        "Too many requests",
                        "This client sent too many requests; retry after the Retry-After delay.",
                        (_retry_after(wait),),
                    )

        # 8. Route requirements.
        if route.requirement is not None:
            enforce(route.requirement, method, path, claims)
        if route.policy_file is not None:
            enforce(route.policy_file.policy, method, path, claims, reason="policy_denied")
        entry.reason = "public" if route.config.public else "allowed"

        # 9. Headers: strip what the client may not say, add what the gateway vouches for.
        kept, removed = strip_inbound(headers)
        entry.stripped = removed
        forwarded = [item for item in kept if item[0].lower() not in _NOT_FORWARDED]
        request_id = entry.request_id.encode()
        forwarded.extend(
            vouched_headers(
                client_ip=ip, scheme=scope.get("scheme", "https"), host=host_raw(headers)
            )
        )
        forwarded.append((b"x-request-id", request_id))

        # 10. Forward.
        target = quote(route.upstream_path(path), safe=_PATH_SAFE)
        if query:
            target += "?" + query.decode("latin-1")
        pool = route.pool
        response_headers = [*SECURITY_HEADERS, (b"x-request-id", request_id)]
        try:
            body: bytes | None = None
            if method in IDEMPOTENT_METHODS and pool.config.retries > 0:
                body = await _read_replayable(headers, receive, route.max_body)
            outcome = await pool.forward(
                scope,
                receive,
                send,
                target=target,
                headers=forwarded,
                response_headers=response_headers,
                max_body=route.max_body,
                body=body,
            )
        except BodyTooLarge as exc:
            raise _too_large(exc.limit) from None
        except ClientDisconnected:
            entry.status, entry.reason = 499, "client_disconnected"
            return
        entry.upstream = outcome.endpoint.label
        entry.attempts = outcome.attempts
        if outcome.error is not None:
            error = outcome.error
            entry.detail = str(error)
            titles = {504: "Upstream timed out", 502: "Upstream unavailable"}
            entry.status, entry.reason = error.status, error.reason
            await send_problem(
                send,
                error.status,
                title=titles.get(error.status, "Upstream failed"),
                detail=_upstream_detail(error.reason, route.name),
                reason=error.reason,
                headers=[*SECURITY_HEADERS, *ERROR_RESPONSE_HEADERS, (b"x-request-id", request_id)],
            )
            return
        entry.upstream_status = outcome.status
        entry.status = outcome.status

    def _match(self, state: GatewayState, host: str, method: str, path: str) -> CompiledRoute:
        allowed: set[str] | None = None
        for route in state.routes:
            if not route.path_matches(path) or not route.host_matches(host):
                continue
            methods = route.config.methods
            if methods is not None and method not in methods:
                allowed = (allowed or set()) | methods
                continue
            return route
        if allowed is not None:
            raise _Refusal(
                405,
                "method_not_allowed",
                "Method not allowed",
                f"{method} is not allowed here; use {', '.join(sorted(allowed))}.",
                ((b"allow", ", ".join(sorted(allowed)).encode()),),
            )
        raise _Refusal(404, "no_route", "Not found", "No route matches this host and path.")

    async def _refuse(
        self, state: GatewayState, send: Send, entry: _Entry, refusal: _Refusal
    ) -> None:
        entry.status, entry.reason = refusal.status, refusal.reason
        if entry.detail is None:
            entry.detail = refusal.detail
        self.metrics.deny(refusal.reason)
        alerts = state.alerts
        if alerts is not None and refusal.reason != "blocked":
            fired = alerts.record_deny(f"ip:{entry.ip}", refusal.reason)
            if entry.client_id is not None:
                fired = alerts.record_deny(f"client:{entry.client_id}", refusal.reason) or fired
            if fired:
                self.metrics.alerts.inc()
        await send_problem(
            send,
            refusal.status,
            title=refusal.title,
            detail=refusal.detail,
            reason=refusal.reason,
            headers=[
                *refusal.headers,
                *SECURITY_HEADERS,
                *ERROR_RESPONSE_HEADERS,
                (b"x-request-id", entry.request_id.encode()),
            ],
        )


def host_raw(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The client's Host header as text ("" when absent)."""
    value = _header(headers, b"host")
    return value.decode("latin-1") if value else ""


def _too_large(limit: int) -> _Refusal:
    return _Refusal(
        413,
        "body_too_large",
        "Request body too large",
        f"The request body is larger than this route's limit of {limit} bytes.",
        ((b"connection", b"close"),),
    )


def _upstream_detail(reason: str, route: str) -> str:
    if reason == "upstream_timeout":
        return f"The service behind route {route!r} did not answer in time."
    if reason == "upstream_unavailable":
        return f"The service behind route {route!r} cannot be reached."
    return f"The service behind route {route!r} failed."


async def _read_replayable(
    headers: Sequence[tuple[bytes, bytes]], receive: Receive, max_body: int
) -> bytes | None:
    """Read a small body whole so the request can be retried; None to stream it instead."""
    if _header(headers, b"transfer-encoding") is not None:
        return None
    declared = _header(headers, b"content-length")
    if declared is None:
        length = 0
    else:
        try:
            length = int(declared)
        except ValueError:
            return None
    if length > REPLAY_LIMIT:
        return None
    if length > max_body:
        raise _too_large(max_body)
    if length == 0:
        return b""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("The client disconnected while sending its body.")
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return bytes(body)


def _log_access(scope: Scope, entry: _Entry, elapsed: float) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    method = scope["method"]
    path = _CONTROL.sub(lambda match: f"%{ord(match.group()):02X}", scope["path"])
    fields: dict[str, Any] = {
        "event": "access",
        "client_ip": entry.ip,
        "method": method,
        "path": path,
        "route": entry.route,
        "status": entry.status,
        "reason": entry.reason,
        "duration_ms": round(elapsed * 1000, 3),
        "request_id": entry.request_id,
    }
    if entry.sub is not None:
        fields["sub"] = entry.sub
        fields["client_id"] = entry.client_id
    if entry.upstream is not None:
        fields["upstream"] = entry.upstream
        fields["upstream_status"] = entry.upstream_status
        fields["attempts"] = entry.attempts
    if entry.detail is not None:
        fields["detail"] = entry.detail
    if entry.stripped:
        fields["stripped"] = ",".join(entry.stripped)
    access_log.info("%s %s %d %s", method, path, entry.status, entry.reason, extra=fields)
