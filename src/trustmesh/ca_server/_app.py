"""The CA's HTTP API (Starlette): bundle, enrollment, renewal, revocation, CRL, OCSP.

Every route answers JSON or a standard binary format; every error is an RFC 9457
``application/problem+json`` document whose ``detail`` says what to do. Bad input is
always a 4xx. Routes that need an identity read the client certificate the TLS layer
verified (ASGI TLS extension, filled by :mod:`trustmesh.tls`) and check it again
against the store (revocation) before acting.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import anyio.to_thread
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from trustmesh.acme import ACMEConfig, ACMEServer, sealing_key
from trustmesh.authority import CertificateAuthority, Issued
from trustmesh.errors import (
    ConfigError,
    ScopeError,
    StoreError,
    TrustmeshError,
    VerificationError,
)
from trustmesh.limits import RateLimiter
from trustmesh.pki import (
    SpiffeID,
    glob_match,
    match_spiffe_pattern,
    parse_duration,
    pem_certificates,
    pem_crls,
)
from trustmesh.serving import (
    LATENCY_BUCKETS,
    BodyTimeout,
    BodyTooLarge,
    TimedApp,
    read_bounded_body,
)
from trustmesh.store import token_hash

from ._clock import ClockWatch
from ._direct import DirectRequest
from ._feed import RevocationHub
from ._ocsp import answer_ocsp, decode_ocsp_path
from ._offload import Offload
from ._openapi import openapi_response
from ._problems import (
    DATABASE_UNAVAILABLE,
    is_database_failure,
    is_driver_conflict,
    problem,
    problem_for,
)

__all__ = ["MAX_BODY", "ServerSettings", "create_app"]

log = logging.getLogger("trustmesh.ca_server")

#: Worker threads of the API (blocking work: the database, signing); the store's pool
#: keeps as many connections (trustmesh.store._store.POOL_SIZE).
THREADS = 16
#: Request bodies larger than this are refused with 413.
MAX_BODY = 64 * 1024
#: A request body must arrive within this many seconds (slow senders get 408).
BODY_TIMEOUT = 10.0


@dataclass
class ServerSettings:
    """Runtime settings of ``ca serve``.

    Args:
        admins: SPIFFE IDs (or globs) allowed to revoke any certificate.
        crl_max_age: Seconds a built CRL is reused while nothing was revoked.
        enroll_rate_per_ip, enroll_burst_per_ip: Token bucket for enrollments per
            client address.
        enroll_rate_per_token, enroll_burst_per_token: Token bucket per join token.
        feed_heartbeat: Seconds between keep-alive comments on the event stream.
        body_timeout: Seconds a request body may take to arrive (408 after).
        acme: ACME provisioners served under ``/acme`` (none: no ACME).
    """

    admins: tuple[str, ...] = ()
    crl_max_age: int = 300
    enroll_rate_per_ip: float = 5.0
    enroll_burst_per_ip: int = 20
    enroll_rate_per_token: float = 1.0
    enroll_burst_per_token: int = 5
    feed_heartbeat: float = 15.0
    body_timeout: float = BODY_TIMEOUT
    acme: ACMEConfig | None = None
    _crl_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _crl_cache: dict[str, tuple[tuple[int, int, int], float, bytes, int]] = field(
        default_factory=dict, repr=False
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwk(cert: x509.Certificate) -> dict[str, Any]:
    key = cert.public_key()
    jwk: dict[str, Any] = {
        "use": "x509-svid",
        "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()],
    }
    if isinstance(key, ec.EllipticCurvePublicKey):
        size = (key.curve.key_size + 7) // 8
        numbers = key.public_numbers()
        jwk |= {
            "kty": "EC",
            "crv": {"secp256r1": "P-256", "secp384r1": "P-384"}.get(key.curve.name, key.curve.name),
            "x": _b64url(numbers.x.to_bytes(size, "big")),
            "y": _b64url(numbers.y.to_bytes(size, "big")),
        }
    elif isinstance(key, rsa.RSAPublicKey):
        numbers_rsa = key.public_numbers()
        jwk |= {
            "kty": "RSA",
            "n": _b64url(numbers_rsa.n.to_bytes((numbers_rsa.n.bit_length() + 7) // 8, "big")),
            "e": _b64url(numbers_rsa.e.to_bytes((numbers_rsa.e.bit_length() + 7) // 8, "big")),
        }
    elif isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk |= {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}
    return jwk


@functools.lru_cache(maxsize=16)
def _ca_pem(certs: tuple[x509.Certificate, ...]) -> str:
    # The intermediate and the bundle are the same in every answer: encoded once.
    return pem_certificates(certs).decode()


def _issued_json(issued: Issued) -> dict[str, Any]:
    record = issued.record
    leaf = record.pem  # the record holds the leaf's PEM already
    return {
        "spiffe_id": record.spiffe_id,
        "serial": record.serial,
        "not_after": record.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "certificate": leaf,
        "chain": leaf + _ca_pem(tuple(issued.chain[1:])),
        "bundle": _ca_pem(tuple(issued.bundle)),
    }


async def _read_body(request: Request, timeout: float = BODY_TIMEOUT) -> bytes | Response:
    try:
        if isinstance(request, DirectRequest):  # served without ASGI (_direct.py)
            return await request.bounded_body(limit=MAX_BODY, timeout=timeout)
        return await read_bounded_body(request, limit=MAX_BODY, timeout=timeout)
    except BodyTooLarge:
        return problem(
            413, "Request body too large", f"Request bodies are limited to {MAX_BODY} bytes."
        )
    except BodyTimeout:
        return problem(
            408,
            "Request timeout",
            f"The request body did not arrive within {timeout:g} s; send it at once.",
        )


async def _json_body(
    request: Request, *fields: str, timeout: float = BODY_TIMEOUT
) -> dict[str, Any] | Response:
    body = await _read_body(request, timeout)
    if isinstance(body, Response):
        return body
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return problem(400, "Bad request", "The body is not JSON: send a JSON object.")
    if not isinstance(data, dict):
        return problem(400, "Bad request", "The body must be a JSON object.")
    missing = [f for f in fields if not isinstance(data.get(f), str) or not data.get(f)]
    if missing:
        return problem(
            400, "Bad request", f"Missing or non-string field(s) {missing}: send {list(fields)}."
        )
    return data


@functools.lru_cache(maxsize=4096)
def _load_peer(pem: str) -> x509.Certificate:
    # Parsed once per client certificate, not once per request on a kept-alive connection.
    return x509.load_pem_x509_certificate(pem.encode())


def _peer_certificate(request: Request) -> x509.Certificate | None:
    tls = request.scope.get("extensions", {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    if not chain:
        return None
    return _load_peer(chain[0])


_ROUTE_TEMPLATES = ("/v1/ocsp/",)
_ENTRY_ROUTE = "/v1/entries/{entry_id}"
#: What a GET on the plain listener must look like to be read as an OCSP request
#: (RFC 6960 A.1: the base64 DER appended to the responder URL; even the smallest
#: request is longer than this).
_OCSP_GET_PATH = re.compile(r"[A-Za-z0-9+/=_-]{40,}")
_PLAIN_ONLY = (
    "This listener serves only OCSP (POST / with a DER request, or GET /BASE64) and the "
    "CRLs at /crl (leaves, DER), /crl/root (intermediates, DER) and /crl/chain (both, "
    "PEM); everything else is on the HTTPS API."
)
#: Refusals on these routes are also written to the audit chain.
_AUDITED_DENIALS = {
    "/v1/enroll",
    "/v1/renew",
    "/v1/revoke",
    "/v1/entries",
    "/v1/entries/svid",
    "/v1/entries/jwt-svid",
}


class _Metrics:
    """Prometheus metrics of one app (own registry, so tests can build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.issued = Counter(
            "trustmesh_ca_certificates_issued",
            "Certificates issued over the API",
            ["kind"],
            registry=self.registry,
        )
        self.revoked = Counter(
            "trustmesh_ca_revocations",
            "Certificates revoked over the API",
            ["reason"],
            registry=self.registry,
        )
        self.denied = Counter(
            "trustmesh_ca_denials",
            "Requests refused, by route and reason",
            ["route", "reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "trustmesh_ca_request_seconds",
            "Request latency",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )

        self.expiry = Gauge(
            "trustmesh_ca_certificate_expiry_seconds",
            "Seconds until the CA's own certificate of this role expires (negative: expired)",
            ["role"],
            registry=self.registry,
        )

    def watch_expiry(self, ca: CertificateAuthority) -> None:
        """Compute the expiry gauges on each scrape, so they never go stale."""

        def left(role: str) -> Callable[[], float]:
            return lambda: next(e.seconds_left for e in ca.issuer_expiry() if e.role == role)

        for item in ca.issuer_expiry():
            self.expiry.labels(role=item.role).set_function(left(item.role))

    def render(self) -> bytes:
        return generate_latest(self.registry)


#: The ACME resources (``/acme/PROVISIONER/RESOURCE``) counted as their own metric series.
_ACME_RESOURCES = frozenset(
    {
        "directory",
        "new-nonce",
        "new-account",
        "account",
        "new-order",
        "order",
        "authz",
        "chall",
        "cert",
        "revoke-cert",
        "key-change",
        "renewal-info",
    }
)


def _observer(metrics: _Metrics) -> Callable[[str, str, int, float], None]:
    """Record request latency by route template and status (never per raw path)."""
    # The histogram child of each known (method, route, status): a label lookup per
    # request costs more than the observation (bench/RESULTS.md, issue 18).
    known: dict[tuple[str, str, int], Any] = {}

    def observe(method: str, path: str, status: int, seconds: float) -> None:
        child = known.get((method, path, status))
        if child is not None:
            child.observe(seconds)
            return
        route = next((t + "{request}" for t in _ROUTE_TEMPLATES if path.startswith(t)), path)
        if path.startswith("/v1/entries/") and path not in _KNOWN_ROUTES:
            route = _ENTRY_ROUTE
        if path.startswith("/acme/"):
            # /acme/PROVISIONER/RESOURCE[/ID]: one series per known resource, never per ID
            # or per name a caller made up (the label set stays bounded).
            parts = path.split("/")
            resource = parts[3] if len(parts) > 3 else ""
            route = f"/acme/{{provisioner}}/{resource if resource in _ACME_RESOURCES else 'other'}"
        if (
            route not in _KNOWN_ROUTES
            and not route.startswith("/acme/")
            and not route.endswith(("{request}", "{entry_id}"))
        ):
            route = "other"
        if not path.endswith("/stream"):
            child = metrics.latency.labels(method, route, str(status))
            if path == route and len(known) < 1024:  # known routes only: bounded
                known[(method, path, status)] = child
            child.observe(seconds)

    return observe


_KNOWN_ROUTES = {
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/bundle",
    "/v1/crl",
    "/v1/crl/chain",
    "/v1/crl/root",
    "/v1/ocsp",
    "/v1/enroll",
    "/v1/renew",
    "/v1/revoke",
    "/v1/revocations",
    "/v1/certificates",
    "/v1/entries",
    "/v1/entries/svid",
    "/v1/entries/jwt-svid",
    "/v1/openapi.json",
}


_T = TypeVar("_T")
_Endpoint = Callable[[Request], Awaitable[Response]]


class _CAApp(Starlette):
    """Starlette, with the hottest routes (renewal) dispatched straight to their
    endpoint: the middleware stack and the router cost more than the endpoint's own
    HTTP work (bench/RESULTS.md, issue 18). The endpoint still answers every refusal
    itself (``guarded``); anything else it raises becomes a generic 500 here, with
    the cause in the log, as ServerErrorMiddleware would.
    """

    def __init__(self, direct: dict[tuple[str, str], _Endpoint], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.direct = direct

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = (
            self.direct.get((scope["method"], scope["path"])) if scope["type"] == "http" else None
        )
        if endpoint is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        try:
            response = await endpoint(Request(scope, receive, send))
        except Exception:
            log.exception("%s %s failed", scope["method"], scope["path"])
            response = problem(
                500, "Internal server error", "The CA failed on this request; see its log."
            )
        await response(scope, receive, send)


def create_app(ca: CertificateAuthority, settings: ServerSettings | None = None) -> TimedApp:
    """Build the ASGI app for an open CA (its signing key unlocked).

    ``app.state.plain_app`` is the read-only plain-HTTP app of OCSP and the CRLs
    (``ca serve --ocsp-listen``), built from the same handlers.
    """
    opts = settings or ServerSettings()
    hub = RevocationHub(ca)
    metrics = _Metrics()
    metrics.watch_expiry(ca)
    renewed = metrics.issued.labels(kind="renew")
    per_ip = RateLimiter(opts.enroll_rate_per_ip, opts.enroll_burst_per_ip)
    per_token = RateLimiter(opts.enroll_rate_per_token, opts.enroll_burst_per_token)
    clock = ClockWatch(ca.config.backdate)
    # The hot routes' blocking work (renew, enroll, the caller check) hops to these
    # threads: cheaper than anyio's run_sync (once the largest single item of a
    # renewal's CPU) and than run_in_executor, finished jobs handed back to the loop
    # in batches (_offload.py; bench/RESULTS.md, issue 18).
    pool = Offload(THREADS, "ca-api")

    async def offload(fn: Callable[[], _T]) -> _T:
        return await pool(fn)

    def is_admin(spiffe_id: SpiffeID) -> bool:
        return any(match_spiffe_pattern(spiffe_id, p) for p in opts.admins)

    def peer(request: Request) -> x509.Certificate:
        cert = _peer_certificate(request)
        if cert is None:
            raise VerificationError(
                "This route needs a client certificate: call it over mTLS with your "
                "current identity (e.g. curl --cert chain.pem --key key.pem).",
                reason="no_client_certificate",
            )
        return cert

    async def caller(request: Request) -> tuple[x509.Certificate, SpiffeID]:
        cert = peer(request)
        # The chain is verified once per certificate; its revocation status is looked
        # up on every request (a database read: off the loop).
        spiffe_id, _ = await offload(lambda: ca.verify_caller(cert))
        return cert, spiffe_id

    def ttl_field(data: dict[str, Any]) -> timedelta | None:
        value = data.get("ttl")
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError("'ttl' must be a duration string such as '1h'.", reason="bad_ttl")
        return parse_duration(value, field="ttl")

    async def guarded(request: Request, work: Callable[[], Awaitable[Response]]) -> Response:
        clock.observe(
            request.headers.get("date"),
            peer=request.client.host if request.client else "?",
            route=request.url.path,
        )
        try:
            return await work()
        except TrustmeshError as exc:
            response = problem_for(exc)
            reason = str(exc.details.get("reason") or type(exc).__name__)
            route = request.url.path
            client = request.client.host if request.client else "?"
            metrics.denied.labels(route=route, reason=reason).inc()
            if is_database_failure(exc) or is_driver_conflict(exc):
                # The caller sees a generic detail; the cause (URL, driver error) is here.
                log.error(
                    "database %s on %s %s: %s",
                    "failure" if is_database_failure(exc) else "conflict",
                    request.method,
                    route,
                    exc.message,
                    extra={
                        "event": "database_error",
                        "route": route,
                        "status": response.status_code,
                        "client": client,
                    },
                )
            else:
                log.info(
                    "denied %s %s: %s",
                    request.method,
                    route,
                    exc.message,
                    extra={
                        "event": "deny",
                        "route": route,
                        "reason": reason,
                        "status": response.status_code,
                        "client": client,
                    },
                )
            if route in _AUDITED_DENIALS and not isinstance(exc, StoreError):
                peer = _peer_certificate(request)
                actor = f"{route}:{client}" if peer is None else f"serial:{peer.serial_number:x}"
                try:
                    await run_in_threadpool(
                        lambda: ca.record_denial(route, reason, actor=actor, subject=reason)
                    )
                except StoreError as store_exc:
                    log.warning("could not audit a denial: %s", store_exc.message)
            return response

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        def check() -> None:
            with ca.store.engine.connect() as conn:
                conn.execute(text("SELECT 1"))

        try:
            await run_in_threadpool(check)
        except Exception as exc:  # any database failure means not ready
            log.error(
                "not ready: the database at %s failed: %s",
                ca.store.url,
                getattr(exc, "orig", exc),
                extra={"event": "database_error", "route": "/readyz"},
            )
            return problem(503, "Not ready", DATABASE_UNAVAILABLE, reason="database_unavailable")
        ready: dict[str, Any] = {"status": "ready", "database": "ok", "keys": "loaded"}
        skew = clock.recent()
        if skew is not None:
            ready["clock_skew"] = skew
        return JSONResponse(ready)

    async def bundle(request: Request) -> Response:
        fmt = request.query_params.get("format", "pem")
        sequence = ca.bundle_sequence
        # Short caching: a rotation step must reach pollers within the overlap.
        headers = {"Cache-Control": "max-age=30", "ETag": f'"bundle-{sequence}"'}
        if fmt == "spiffe":
            jwt_keys = await run_in_threadpool(ca.jwt_keys)
            doc = {
                "keys": [_jwk(c) for c in ca.bundle] + jwt_keys,
                "spiffe_refresh_hint": 60,
                "spiffe_sequence": sequence,
            }
            return JSONResponse(doc, headers=headers)
        if fmt == "intermediates":
            return Response(
                pem_certificates(ca.chain_certificates),
                media_type="application/x-pem-file",
                headers=headers,
            )
        if fmt != "pem":
            return problem(
                400,
                "Bad request",
                f"Unknown format {fmt!r}: use 'pem', 'spiffe' or 'intermediates'.",
            )
        return Response(
            pem_certificates(ca.bundle), media_type="application/x-pem-file", headers=headers
        )

    def current_crl(issuer: str | None = None) -> tuple[bytes, int]:
        state = (*ca.store.revocation_state(), ca.bundle_sequence)
        key = issuer or ca.issuer_id
        with opts._crl_lock:
            cached = opts._crl_cache.get(key)
            if (
                cached is not None
                and cached[0] == state
                and time.monotonic() - cached[1] < opts.crl_max_age
            ):
                return cached[2], cached[3]
            crl = ca.crl(issuer=key, actor="ca-server")
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            der = crl.public_bytes(serialization.Encoding.DER)
            opts._crl_cache[key] = (state, time.monotonic(), der, number)
            return der, number

    async def crl(request: Request) -> Response:
        return await guarded(request, lambda: crl_response(request))

    async def crl_response(request: Request) -> Response:
        issuer = request.query_params.get("issuer")
        der, number = await run_in_threadpool(current_crl, issuer)
        etag = f'"crl-{number}"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        return Response(
            der,
            media_type="application/pkix-crl",
            headers={"Cache-Control": f"max-age={min(opts.crl_max_age, 60)}", "ETag": etag},
        )

    def root_crl_der() -> bytes:
        return ca.root_crl(actor="ca-server").public_bytes(serialization.Encoding.DER)

    async def root_crl(request: Request) -> Response:
        try:
            der = await run_in_threadpool(root_crl_der)
        except ConfigError as exc:
            log.error("cannot serve the root CRL: %s", exc.message)
            return problem(503, "Root CRL unavailable", exc.message)
        return Response(
            der,
            media_type="application/pkix-crl",
            headers={"Cache-Control": "max-age=3600"},
        )

    def root_crl_of(ski: str) -> x509.CertificateRevocationList:
        return ca.root_crl(root=ski, actor="ca-server")

    async def crl_chain(request: Request) -> Response:
        async def work() -> Response:
            issuers = ca.issuers
            leaves = [
                await run_in_threadpool(current_crl, i.ski) for i in issuers.live("intermediate")
            ]
            try:
                roots = [await run_in_threadpool(root_crl_of, r.ski) for r in issuers.live("root")]
            except ConfigError as exc:
                log.error("cannot serve the chain CRLs: %s", exc.message)
                return problem(503, "Root CRL unavailable", exc.message)
            numbers = [str(n) for _, n in leaves] + [
                str(r.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
                for r in roots
            ]
            etag = f'"crl-{"-".join(numbers)}"'
            if request.headers.get("if-none-match") == etag:
                return Response(status_code=304, headers={"ETag": etag})
            return Response(
                pem_crls([x509.load_der_x509_crl(der) for der, _ in leaves] + roots),
                media_type="application/x-pem-file",
                headers={"Cache-Control": f"max-age={min(opts.crl_max_age, 60)}", "ETag": etag},
            )

        return await guarded(request, work)

    async def ocsp_get(request: Request) -> Response:
        der = decode_ocsp_path(request.path_params["request"])
        if isinstance(der, Response):
            return der
        return await answer_ocsp(ca, der)

    async def ocsp_post(request: Request) -> Response:
        body = await _read_body(request, opts.body_timeout)
        if isinstance(body, Response):
            return body
        return await answer_ocsp(ca, body)

    async def enroll(request: Request) -> Response:
        async def work() -> Response:
            data = await _json_body(request, "token", "csr", timeout=opts.body_timeout)
            if isinstance(data, Response):
                return data
            client = request.client.host if request.client else "?"
            wait = max(per_ip.allow(client), per_token.allow(token_hash(data["token"])))
            if wait > 0:
                metrics.denied.labels(route="/v1/enroll", reason="rate_limited").inc()
                return problem(
                    429,
                    "Too many enrollments",
                    f"Slow down: retry in {wait:.1f} s.",
                    reason="rate_limited",
                    headers={"Retry-After": str(max(1, round(wait)))},
                )
            issued = await offload(
                lambda: ca.enroll(
                    data["token"],
                    data["csr"].encode(),
                    ttl=ttl_field(data),
                    actor=f"enroll:{client}",
                )
            )
            metrics.issued.labels(kind="enroll").inc()
            log.info(
                "enrolled %s serial %s",
                issued.record.spiffe_id,
                issued.record.serial,
                extra={
                    "event": "enroll",
                    "spiffe_id": issued.record.spiffe_id,
                    "serial": issued.record.serial,
                    "client": client,
                },
            )
            return JSONResponse(_issued_json(issued), status_code=201)

        return await guarded(request, work)

    async def renew(request: Request) -> Response:
        async def work() -> Response:
            cert = peer(request)  # ca.renew verifies it (ca.verify_caller)
            data = await _json_body(request, "csr", timeout=opts.body_timeout)
            if isinstance(data, Response):
                return data
            ttl = ttl_field(data)
            issued = await offload(lambda: ca.renew(cert, data["csr"].encode(), ttl=ttl))
            renewed.inc()
            log.info(
                "renewed %s serial %s",
                issued.record.spiffe_id,
                issued.record.serial,
                extra={
                    "event": "renew",
                    "spiffe_id": issued.record.spiffe_id,
                    "serial": issued.record.serial,
                },
            )
            return JSONResponse(_issued_json(issued), status_code=201)

        return await guarded(request, work)

    async def revoke(request: Request) -> Response:
        async def work() -> Response:
            _, spiffe_id = await caller(request)
            data = await _json_body(request, timeout=opts.body_timeout)
            if isinstance(data, Response):
                return data
            serial, target = data.get("serial"), data.get("spiffe_id")
            if (serial is None) == (target is None) or not all(
                isinstance(v, str) for v in (serial, target) if v is not None
            ):
                return problem(400, "Bad request", "Send exactly one of 'serial' or 'spiffe_id'.")
            reason = data.get("reason", "unspecified")
            if not isinstance(reason, str):
                return problem(400, "Bad request", "'reason' must be a string.")
            if not is_admin(spiffe_id):
                if target is not None:
                    owner = str(target)
                else:
                    owner = (
                        await run_in_threadpool(ca.store.get_certificate, str(serial))
                    ).spiffe_id
                if owner != spiffe_id.uri:
                    raise ScopeError(
                        f"{spiffe_id} may revoke only its own certificates; ask an admin "
                        f"(one of {list(opts.admins)}) to revoke others.",
                        reason="not_owner",
                    )
            records = await run_in_threadpool(
                lambda: ca.revoke(serial, spiffe_id=target, reason=reason, actor=str(spiffe_id))
            )
            for record in records:
                metrics.revoked.labels(reason=record.revocation_reason or "unspecified").inc()
                log.info(
                    "revoked %s serial %s",
                    record.spiffe_id,
                    record.serial,
                    extra={
                        "event": "revoke",
                        "spiffe_id": record.spiffe_id,
                        "serial": record.serial,
                        "reason": record.revocation_reason,
                        "caller": str(spiffe_id),
                    },
                )
            await hub.bump(await run_in_threadpool(ca.store.latest_revocation_cursor))
            return JSONResponse({"revoked": [r.to_json() for r in records]})

        return await guarded(request, work)

    def cursor_param(request: Request) -> int:
        raw = request.query_params.get("since") or request.headers.get("last-event-id") or "0"
        if not raw.isdigit():
            raise ConfigError(
                f"since={raw!r} is not a cursor: pass the last cursor you saw (an integer), "
                f"or 0 for everything.",
                reason="bad_cursor",
            )
        return int(raw)

    async def revocations(request: Request) -> Response:
        async def work() -> Response:
            await caller(request)
            since = cursor_param(request)
            raw_limit = request.query_params.get("limit", "1000")
            if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
                raise ConfigError("limit must be an integer from 1 to 1000.", reason="bad_limit")
            events = await run_in_threadpool(ca.revocations_since, since, limit=int(raw_limit))
            cursor = events[-1].cursor if events else max(since, 0)
            return JSONResponse(
                {"events": [e.to_json() for e in events], "cursor": cursor},
                headers={"Cache-Control": "no-store"},
            )

        return await guarded(request, work)

    async def revocation_stream(request: Request) -> Response:
        async def work() -> Response:
            subscriber, _ = await caller(request)
            subscriber_serial = format(subscriber.serial_number, "x")
            since = cursor_param(request)
            # Subscribers that follow trust changes pass the bundle sequence they hold
            # (0: none): they get a bundle event now if theirs is not the current one,
            # and one after every rotation step.
            raw_bundle = request.query_params.get("bundle")
            if raw_bundle is not None and not raw_bundle.isdigit():
                raise ConfigError(
                    f"bundle={raw_bundle!r} is not a bundle sequence: pass the sequence of "
                    f"the bundle you hold (an integer), or 0.",
                    reason="bad_bundle_sequence",
                )
            held = None if raw_bundle is None else int(raw_bundle)

            def bundle_event() -> str:
                data = {
                    "sequence": ca.bundle_sequence,
                    "bundle": pem_certificates(ca.bundle).decode(),
                    "intermediates": pem_certificates(ca.chain_certificates).decode(),
                }
                return f"event: bundle\ndata: {json.dumps(data)}\n\n"

            async def events() -> AsyncIterator[str]:
                nonlocal held
                cursor = since
                yield "retry: 1000\n: trustmesh revocation feed\n\n"
                while True:
                    if held is not None and held != hub.bundle_sequence:
                        held = hub.bundle_sequence
                        yield bundle_event()
                    batch = await hub.events_since(cursor)
                    for event in batch:
                        cursor = event.cursor
                        yield (
                            f"id: {event.cursor}\nevent: revocation\n"
                            f"data: {json.dumps(event.to_json())}\n\n"
                        )
                        if event.serial == subscriber_serial:
                            # The subscriber itself was revoked: the stream ends here.
                            yield 'event: closed\ndata: {"reason": "revoked"}\n\n'
                            return
                    if len(batch) == 1000:
                        continue
                    if not await hub.wait_beyond(cursor, opts.feed_heartbeat, held):
                        if hub.closing:
                            return  # the server is stopping: subscribers reconnect
                        yield ": keep-alive\n\n"
                    if await request.is_disconnected():
                        return

            return StreamingResponse(
                events(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )

        return await guarded(request, work)

    async def certificates(request: Request) -> Response:
        async def work() -> Response:
            _, spiffe_id = await caller(request)
            if not is_admin(spiffe_id):
                raise ScopeError(
                    f"Listing certificates is for admins ({list(opts.admins)}); {spiffe_id} "
                    f"is not one.",
                    reason="not_admin",
                )
            query = request.query_params
            limit_raw, offset_raw = query.get("limit", "100"), query.get("offset", "0")
            if not (limit_raw.isdigit() and 1 <= int(limit_raw) <= 1000 and offset_raw.isdigit()):
                raise ConfigError(
                    "limit must be 1-1000 and offset a non-negative integer.", reason="bad_paging"
                )
            limit, offset = int(limit_raw), int(offset_raw)
            revoked_raw = query.get("revoked")
            revoked = None if revoked_raw is None else revoked_raw.lower() in {"1", "true", "yes"}
            pattern = query.get("id")
            exact = pattern if pattern and "*" not in pattern else None

            def fetch() -> list[dict[str, Any]]:
                records = ca.store.find_certificates(
                    spiffe_id=exact,
                    revoked=revoked,
                    limit=None if pattern and not exact else offset + limit,
                )
                if pattern and not exact:
                    records = [r for r in records if glob_match(r.spiffe_id, pattern, sep="/")]
                return [r.to_json() for r in records[offset : offset + limit]]

            items = await run_in_threadpool(fetch)
            next_offset = offset + limit if len(items) == limit else None
            return JSONResponse({"certificates": items, "next_offset": next_offset})

        return await guarded(request, work)

    def require_admin(spiffe_id: SpiffeID, what: str) -> None:
        if not is_admin(spiffe_id):
            raise ScopeError(
                f"{what} is for admins ({list(opts.admins)}); {spiffe_id} is not one.",
                reason="not_admin",
            )

    async def entries(request: Request) -> Response:
        async def work() -> Response:
            _, spiffe_id = await caller(request)
            if request.method == "POST":
                require_admin(spiffe_id, "Creating registration entries")
                return await create_entry(request, spiffe_id)
            node = request.query_params.get("node")
            if not is_admin(spiffe_id):
                if node is not None and node != spiffe_id.uri:
                    raise ScopeError(
                        f"{spiffe_id} may list only its own entries (node={spiffe_id.uri}).",
                        reason="not_admin",
                    )
                node = spiffe_id.uri  # a node sees its own entries
            found = await run_in_threadpool(lambda: ca.list_entries(node_id=node))
            return JSONResponse(
                {"entries": [e.to_json() for e in found]}, headers={"Cache-Control": "no-store"}
            )

        return await guarded(request, work)

    async def create_entry(request: Request, spiffe_id: SpiffeID) -> Response:
        data = await _json_body(request, "spiffe_id", "node_id", timeout=opts.body_timeout)
        if isinstance(data, Response):
            return data
        selectors, dns = data.get("selectors"), data.get("dns", [])
        for name, value in (("selectors", selectors), ("dns", dns)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(
                    f"'{name}' must be a list of strings, e.g. [\"unix:uid:1001\"].",
                    reason="bad_entry",
                )
        entry = await run_in_threadpool(
            lambda: ca.create_entry(
                data["spiffe_id"],
                node_id=data["node_id"],
                selectors=selectors or [],
                dns=dns,
                ttl=ttl_field(data),
                actor=str(spiffe_id),
            )
        )
        log.info(
            "created entry %s for %s on %s",
            entry.entry_id,
            entry.spiffe_id,
            entry.node_id,
            extra={"event": "entry-create", "entry_id": entry.entry_id},
        )
        return JSONResponse(entry.to_json(), status_code=201)

    async def entry_item(request: Request) -> Response:
        async def work() -> Response:
            _, spiffe_id = await caller(request)
            entry_id = request.path_params["entry_id"]
            if request.method == "DELETE":
                require_admin(spiffe_id, "Deleting registration entries")
                gone = await run_in_threadpool(
                    lambda: ca.delete_entry(entry_id, actor=str(spiffe_id))
                )
                return JSONResponse({"deleted": gone.to_json()})
            entry = await run_in_threadpool(ca.get_entry, entry_id)
            if not is_admin(spiffe_id) and entry.node_id != spiffe_id.uri:
                raise ScopeError(
                    f"Entry {entry.entry_id} belongs to node {entry.node_id}; {spiffe_id} "
                    f"may read only its own entries.",
                    reason="wrong_node",
                )
            return JSONResponse(entry.to_json())

        return await guarded(request, work)

    async def entry_svid(request: Request) -> Response:
        async def work() -> Response:
            cert = peer(request)  # ca.sign_entry verifies it (chain, expiry, revocation)
            data = await _json_body(request, "entry_id", "csr", timeout=opts.body_timeout)
            if isinstance(data, Response):
                return data
            issued = await run_in_threadpool(
                lambda: ca.sign_entry(cert, data["entry_id"], data["csr"].encode())
            )
            metrics.issued.labels(kind="entry").inc()
            log.info(
                "issued %s serial %s for entry %s",
                issued.record.spiffe_id,
                issued.record.serial,
                data["entry_id"],
                extra={
                    "event": "entry-svid",
                    "spiffe_id": issued.record.spiffe_id,
                    "serial": issued.record.serial,
                },
            )
            return JSONResponse(_issued_json(issued), status_code=201)

        return await guarded(request, work)

    async def entry_jwt_svid(request: Request) -> Response:
        async def work() -> Response:
            cert = peer(request)  # ca.sign_jwt_svid verifies it (chain, expiry, revocation)
            data = await _json_body(request, "entry_id", timeout=opts.body_timeout)
            if isinstance(data, Response):
                return data
            audience = data.get("audience")
            if not isinstance(audience, list) or not all(isinstance(a, str) for a in audience):
                raise ConfigError(
                    "'audience' must be a list of strings, e.g. [\"spiffe://example.org/db\"].",
                    reason="bad_audience",
                )
            token, expires = await run_in_threadpool(
                lambda: ca.sign_jwt_svid(cert, data["entry_id"], audience)
            )
            metrics.issued.labels(kind="jwt-svid").inc()
            return JSONResponse(
                {"token": token, "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ")},
                status_code=201,
                headers={"Cache-Control": "no-store"},
            )

        return await guarded(request, work)

    async def metrics_endpoint(_: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    acme: ACMEServer | None = None
    if opts.acme is not None and opts.acme.provisioners:

        async def acme_revoked() -> None:
            await hub.bump(await run_in_threadpool(ca.store.latest_revocation_cursor))

        acme = ACMEServer(ca, opts.acme, eab_key=sealing_key(ca), on_revoked=acme_revoked)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        # As many threads as the store pools connections (anyio's default is 40): on
        # two cores more threads only queue for the GIL and open pool overflow.
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        await hub.start()
        if acme is not None:
            await acme.start()
        try:
            yield
        finally:
            if acme is not None:
                await acme.stop()
            await hub.stop()
            pool.shutdown()

    app = _CAApp(
        {("POST", "/v1/renew"): renew},
        lifespan=lifespan,
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/v1/bundle", bundle),
            Route("/v1/crl", crl),
            Route("/v1/crl/chain", crl_chain),
            Route("/v1/crl/root", root_crl),
            Route("/v1/ocsp", ocsp_post, methods=["POST"]),
            Route("/v1/ocsp/{request:path}", ocsp_get),
            Route("/v1/enroll", enroll, methods=["POST"]),
            Route("/v1/renew", renew, methods=["POST"]),
            Route("/v1/revoke", revoke, methods=["POST"]),
            Route("/v1/revocations", revocations),
            Route("/v1/revocations/stream", revocation_stream),
            Route("/v1/certificates", certificates),
            Route("/v1/entries", entries, methods=["GET", "POST"]),
            Route("/v1/entries/svid", entry_svid, methods=["POST"]),
            Route("/v1/entries/jwt-svid", entry_jwt_svid, methods=["POST"]),
            Route("/v1/entries/{entry_id}", entry_item, methods=["GET", "DELETE"]),
            Route("/metrics", metrics_endpoint),
            Route("/v1/openapi.json", openapi_response),
            *([Mount("/acme", app=acme.app)] if acme is not None else []),
        ],
    )
    app.state.hub = hub
    app.state.acme = acme

    # The plain-HTTP listener (``ca serve --ocsp-listen``): the same OCSP and CRL
    # handlers, nothing else. Plain HTTP is what RFC 6960 and RFC 5280 peers fetch
    # (nginx ssl_ocsp_responder speaks only http://); every answer is signed.
    async def plain_ocsp_get(request: Request) -> Response:
        if not _OCSP_GET_PATH.fullmatch(request.path_params["request"]):
            return problem(404, "Not found", _PLAIN_ONLY)
        return await ocsp_get(request)

    async def plain_refusal(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        title = "Method not allowed" if status == 405 else "Not found"
        headers = getattr(exc, "headers", None)
        return problem(status, title, _PLAIN_ONLY, headers=headers)

    plain = Starlette(
        routes=[
            Route("/crl", crl),
            Route("/crl/root", root_crl),
            Route("/crl/chain", crl_chain),
            Route("/", ocsp_post, methods=["POST"]),
            Route("/{request:path}", plain_ocsp_get),
        ],
        exception_handlers={404: plain_refusal, 405: plain_refusal},
    )
    observe = _observer(metrics)

    def observe_plain(method: str, path: str, status: int, seconds: float) -> None:
        route = path if path in ("/crl", "/crl/root", "/crl/chain") else "/ (ocsp)"
        metrics.latency.labels(method, f"http:{route}", str(status)).observe(seconds)

    app.state.plain_app = TimedApp(plain, observe_plain)
    # The routes ``ca serve`` answers from the HTTP protocol, without ASGI (_direct.py):
    # the same endpoints, timed into the same histogram.
    app.state.direct = {("POST", "/v1/renew"): (renew, observe)}
    return TimedApp(app, observe)
