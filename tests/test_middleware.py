"""The identity middleware over real mTLS: uvicorn with our TLS shim (and werkzeug for WSGI)
on 127.0.0.1, certificates from a real CA, tokens from a real `idp serve`.

Every refusal is checked three ways: the status, the problem+json reason, and the one
structured log line the middleware writes for it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from fastapi import FastAPI
from flask import Flask
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from trustmesh.authority import CertificateAuthority
from trustmesh.context import current_inbound_token
from trustmesh.errors import ConfigError
from trustmesh.middleware import (
    MTLSMiddleware,
    MTLSWSGIMiddleware,
    RequestIdentity,
    forwarded_certificate_header,
)
from trustmesh.middleware.fastapi import CallerDep, UserDep
from trustmesh.middleware.flask import current_caller, current_user
from trustmesh.pki import KeyType
from trustmesh.policy import PolicyFile
from trustmesh.tokens import AsyncVerifier, IssuerConfig, Verifier

from ._idp import Idp, running_idp
from ._services import (
    SERVER_ID,
    CallablePolicy,
    Identity,
    RevokedSerials,
    allow_all,
    client,
    forge,
    issue,
    serve_asgi,
    serve_wsgi,
)
from .conftest import PASSPHRASE

ORDERS = "spiffe://example.org/svc/orders"
GATEWAY = "spiffe://example.org/gateway"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("home")
    CertificateAuthority.init(
        path, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    return path


@pytest.fixture(scope="module")
def ca(home: Path) -> Iterator[CertificateAuthority]:
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as authority:
        yield authority


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ids")


@pytest.fixture(scope="module")
def server_id(ca: CertificateAuthority, workdir: Path) -> Identity:
    return issue(ca, SERVER_ID, workdir, dns=["localhost"], ips=["127.0.0.1"])


@pytest.fixture(scope="module")
def orders(ca: CertificateAuthority, workdir: Path) -> Identity:
    return issue(ca, ORDERS, workdir)


@pytest.fixture(scope="module")
def idp(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Idp]:
    with running_idp(home, tmp_path_factory.mktemp("idp"), log_level="warning") as server:
        yield server


async def _echo(request: Request) -> JSONResponse:
    who: RequestIdentity = request.scope["trustmesh"]
    return JSONResponse(
        {
            "caller": str(who.caller),
            "serial": who.caller.serial_hex,
            "via": str(who.caller.via) if who.caller.via else None,
            "user": who.user.subject if who.user else None,
            "headers": [k.decode("latin-1") for k, _ in request.scope["headers"]],
            "token_in_context": current_inbound_token() is not None,
        }
    )


def echo_app(verifier: AsyncVerifier | None = None) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        if verifier is not None:
            await verifier.aclose()

    return Starlette(
        routes=[Route("/{path:path}", _echo, methods=["GET", "POST", "DELETE"])],
        lifespan=lifespan,
    )


def protect(app: Any, **options: Any) -> MTLSMiddleware:
    options.setdefault("trust_domain", "example.org")
    options.setdefault("policy", allow_all())
    options.setdefault("revocation", RevokedSerials())
    return MTLSMiddleware(app, **options)


def decisions(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The middleware's structured log lines (one per request)."""
    return [
        {k: getattr(r, k, None) for k in ("outcome", "reason", "caller", "status", "path")}
        for r in caplog.records
        if r.name == "trustmesh.middleware" and getattr(r, "event", None) == "trustmesh.request"
    ]


def refused(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["reason"] == reason
    assert body["status"] == status
    assert body["title"]
    return body


@pytest.fixture(autouse=True)
def _log_level(caplog: pytest.LogCaptureFixture) -> None:
    # Allowed requests are logged at DEBUG (denials at WARNING): see every line.
    caplog.set_level(logging.DEBUG, logger="trustmesh.middleware")


# -- the caller's certificate -----------------------------------------------------------


def test_verified_caller_reaches_the_app(
    ca: CertificateAuthority,
    server_id: Identity,
    orders: Identity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A caller with a certificate of the trust domain is let through; the app sees its ID."""
    with serve_asgi(protect(echo_app()), ca, server_id) as url, client(ca, orders) as http:
        r = http.get(f"{url}/items")
    assert r.status_code == 200, r.text
    assert r.json()["caller"] == ORDERS
    assert r.json()["serial"] == format(orders.serial, "x")
    assert decisions(caplog)[-1]["outcome"] == "allow"


def test_no_certificate_is_refused_by_the_handshake_or_the_middleware(
    ca: CertificateAuthority, server_id: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a client certificate: the handshake fails (required), or 403 (optional)."""
    app = protect(echo_app())
    with serve_asgi(app, ca, server_id) as url, client(ca, None) as http:
        with pytest.raises(httpx.TransportError):
            http.get(f"{url}/items")
    with serve_asgi(app, ca, server_id, client_cert="optional") as url, client(ca, None) as http:
        refused(http.get(f"{url}/items"), 403, "no_client_certificate")
    assert decisions(caplog)[-1]["reason"] == "no_client_certificate"


def test_foreign_ca_is_refused_by_the_handshake(
    ca: CertificateAuthority, server_id: Identity, tmp_path: Path
) -> None:
    """A certificate from another CA (same trust domain name) fails the handshake."""
    with CertificateAuthority.init(
        tmp_path / "other", trust_domain="example.org", passphrase=PASSPHRASE
    ) as other:
        stranger = issue(other, ORDERS, tmp_path)
    with serve_asgi(protect(echo_app()), ca, server_id) as url, client(ca, stranger) as http:
        with pytest.raises(httpx.TransportError):
            http.get(f"{url}/items")


@pytest.mark.parametrize(
    "shift", [timedelta(hours=-3), timedelta(hours=2)], ids=["expired", "future"]
)
def test_expired_and_not_yet_valid_are_refused_by_the_handshake(
    ca: CertificateAuthority, server_id: Identity, workdir: Path, shift: timedelta
) -> None:
    """OpenSSL refuses a leaf outside its validity period before the app runs."""
    leaf = issue(ca, ORDERS, workdir, ttl=timedelta(hours=1), now=datetime.now(UTC) + shift)
    with serve_asgi(protect(echo_app()), ca, server_id) as url, client(ca, leaf) as http:
        with pytest.raises(httpx.TransportError):
            http.get(f"{url}/items")


@pytest.mark.slow
def test_certificate_expiring_on_an_open_connection_is_refused(
    ca: CertificateAuthority, server_id: Identity, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A keep-alive connection outliving its leaf is refused at its next request and closed."""
    lifetime = timedelta(hours=1)
    leaf = issue(
        ca, ORDERS, workdir, ttl=lifetime, now=datetime.now(UTC) - lifetime + timedelta(seconds=3)
    )
    with serve_asgi(protect(echo_app()), ca, server_id) as url, client(ca, leaf) as http:
        assert http.get(f"{url}/items").status_code == 200
        remaining = (leaf.cert.not_valid_after_utc - datetime.now(UTC)).total_seconds()
        time.sleep(max(0.0, remaining) + 1.1)
        r = http.get(f"{url}/items")
    refused(r, 403, "expired")
    assert r.headers["connection"] == "close"
    assert decisions(caplog)[-1]["reason"] == "expired"


def test_revoked_caller_is_refused_on_a_new_connection(
    ca: CertificateAuthority,
    server_id: Identity,
    orders: Identity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A revoked serial is refused (403) and the connection closed."""
    revoked = RevokedSerials({orders.serial})
    app = protect(echo_app(), revocation=revoked)
    with serve_asgi(app, ca, server_id) as url, client(ca, orders) as http:
        r = http.get(f"{url}/items")
    refused(r, 403, "revoked")
    assert r.headers["connection"] == "close"
    assert decisions(caplog)[-1] == {
        "outcome": "deny",
        "reason": "revoked",
        "caller": ORDERS,
        "status": 403,
        "path": "/items",
    }


def test_revoked_caller_is_cut_on_its_open_keep_alive_connection(
    ca: CertificateAuthority,
    server_id: Identity,
    orders: Identity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same connection that just worked is refused at its next request once revoked."""
    revoked = RevokedSerials()
    app = protect(echo_app(), revocation=revoked)
    ports: list[int] = []

    def local_port(response: httpx.Response) -> None:
        stream = response.extensions["network_stream"]
        ports.append(stream.get_extra_info("client_addr")[1])

    with (
        serve_asgi(app, ca, server_id) as url,
        client(ca, orders, event_hooks={"response": [local_port]}) as http,
    ):
        assert http.get(f"{url}/items").status_code == 200
        assert http.get(f"{url}/items").status_code == 200
        revoked.serials.add(orders.serial)
        r = http.get(f"{url}/items")
        refused(r, 403, "revoked")
        assert r.headers["connection"] == "close"
        again = http.get(f"{url}/items")
    # The first three requests shared one connection; the server closed it after the refusal.
    assert ports[0] == ports[1] == ports[2]
    assert ports[3] != ports[2]
    refused(again, 403, "revoked")
    assert revoked.asked == 4
    assert [d["reason"] for d in decisions(caplog)[-2:]] == ["revoked", "revoked"]


def test_server_auth_only_certificate_is_refused_as_a_client(
    ca: CertificateAuthority, server_id: Identity, workdir: Path
) -> None:
    """A leaf without clientAuth is refused by OpenSSL's purpose check at the handshake."""
    leaf = forge(ca, workdir, [ORDERS], eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    with serve_asgi(protect(echo_app()), ca, server_id) as url, client(ca, leaf) as http:
        with pytest.raises(httpx.TransportError):
            http.get(f"{url}/items")


def test_ca_certificate_is_refused_as_a_client(
    ca: CertificateAuthority, server_id: Identity, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The intermediate (a valid chain to the root) cannot call as a workload."""
    from trustmesh.tls import client_context

    from ._services import bundle_pem, save_identity

    as_client = save_identity(workdir, "", [ca.intermediate], ca.signing_key)
    ctx = client_context(cadata=bundle_pem(ca), chain=as_client.chain, key=as_client.key)
    with serve_asgi(protect(echo_app()), ca, server_id) as url:
        with httpx.Client(verify=ctx, timeout=10) as http:
            refused(http.get(f"{url}/items"), 403, "ca_as_client")
    assert decisions(caplog)[-1]["reason"] == "ca_as_client"


@pytest.mark.parametrize(
    ("uris", "reason"),
    [
        ([ORDERS, "spiffe://example.org/svc/billing"], "uri_san_count"),
        (["spiffe://other.org/svc/orders"], "foreign_trust_domain"),
        (["https://example.org/svc/orders"], "no_spiffe_id"),
    ],
    ids=["two-uri-sans", "other-trust-domain", "not-spiffe"],
)
def test_leaf_that_is_not_a_workload_identity_of_the_trust_domain_is_refused(
    ca: CertificateAuthority,
    server_id: Identity,
    workdir: Path,
    caplog: pytest.LogCaptureFixture,
    uris: list[str],
    reason: str,
) -> None:
    """Certificates our CA signed but that are not X.509-SVIDs of example.org get 403."""
    leaf = forge(ca, workdir, uris)
    with serve_asgi(protect(echo_app()), ca, server_id) as url, client(ca, leaf) as http:
        body = refused(http.get(f"{url}/items"), 403, reason)
    assert "Caller" in body["title"] or "workload" in body["title"]
    assert decisions(caplog)[-1]["reason"] == reason


def test_settings_are_checked_at_startup() -> None:
    """A required token without a verifier, or a bad trust domain, is a ConfigError."""
    with pytest.raises(ConfigError, match="require_token=True needs a token verifier"):
        protect(echo_app(), require_token=True)
    with pytest.raises(ConfigError, match=r"trust_domain 'Example\.ORG'"):
        protect(echo_app(), trust_domain="Example.ORG")
    with pytest.raises(ConfigError, match="trusted proxy 'gateway'"):
        protect(echo_app(), trusted_proxies=["gateway"])


# -- trusted-proxy mode -----------------------------------------------------------------

SPOOFED = [
    ("X-Trustmesh-Caller", "spiffe://example.org/admin"),
    ("x-trustmesh-caller", "spiffe://example.org/admin"),
    ("X_Trustmesh_Caller", "spiffe://example.org/admin"),
    ("X-TRUSTMESH-CALLER", "spiffe://example.org/admin"),
    ("x-trustmesh_caller", "spiffe://example.org/admin"),
    ("X-Trustmesh-Anything", "1"),
    ("Client-Cert", ":AAAA:"),
    ("client_cert", ":AAAA:"),
    ("X-Forwarded-Client-Cert", "By=x;URI=spiffe://example.org/admin"),
    ("X-SSL-Client-Cert", "x"),
    ("X-Forwarded-User", "admin"),
]


def test_identity_headers_from_a_peer_that_is_not_a_proxy_are_stripped(
    ca: CertificateAuthority, server_id: Identity, orders: Identity
) -> None:
    """Every spelling and repetition of an identity header is removed; the caller stays real."""
    app = protect(echo_app(), trusted_proxies=[GATEWAY])
    with serve_asgi(app, ca, server_id) as url, client(ca, orders) as http:
        r = http.get(f"{url}/items", headers=[*SPOOFED, ("X-Kept", "yes")])
    assert r.status_code == 200, r.text
    assert r.json()["caller"] == ORDERS
    assert r.json()["via"] is None
    seen = r.json()["headers"]
    assert sorted(seen) == [
        "accept",
        "accept-encoding",
        "connection",
        "host",
        "user-agent",
        "x-kept",
    ]


def test_identity_headers_from_the_trusted_proxy_are_believed(
    ca: CertificateAuthority,
    server_id: Identity,
    orders: Identity,
    workdir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The gateway's X-Trustmesh-Caller and RFC 9440 Client-Cert become the caller."""
    gateway = issue(ca, GATEWAY, workdir)
    revoked = RevokedSerials()
    app = protect(
        echo_app(),
        trusted_proxies=["spiffe://example.org/gate*"],
        trust_bundle=[ca.intermediate, *ca.bundle],
        revocation=revoked,
    )
    cert_header = forwarded_certificate_header(orders.cert)
    with serve_asgi(app, ca, server_id) as url, client(ca, gateway) as http:
        named = http.get(f"{url}/a", headers={"X-Trustmesh-Caller": ORDERS})
        with_cert = http.get(
            f"{url}/b", headers={"Client-Cert": cert_header, "X-Trustmesh-Caller": ORDERS}
        )
        alone = http.get(f"{url}/c")
        twice = http.get(
            f"{url}/d", headers=[("X-Trustmesh-Caller", ORDERS), ("X_Trustmesh_Caller", ORDERS)]
        )
        mismatch = http.get(
            f"{url}/e",
            headers={"Client-Cert": cert_header, "X-Trustmesh-Caller": GATEWAY},
        )
        server_only = forge(ca, workdir, [ORDERS], eku=[ExtendedKeyUsageOID.SERVER_AUTH])
        wrong_eku = http.get(
            f"{url}/f", headers={"Client-Cert": forwarded_certificate_header(server_only.cert)}
        )
        revoked.serials.add(orders.serial)
        was_revoked = http.get(f"{url}/g", headers={"Client-Cert": cert_header})
    assert named.json()["caller"] == ORDERS
    assert named.json()["via"] == GATEWAY
    assert named.json()["serial"] is None
    assert with_cert.json()["caller"] == ORDERS
    assert with_cert.json()["serial"] == format(orders.serial, "x")
    assert "client-cert" in with_cert.json()["headers"]
    assert alone.json()["caller"] == GATEWAY
    refused(twice, 400, "bad_forwarded_identity")
    refused(mismatch, 400, "bad_forwarded_identity")
    refused(wrong_eku, 403, "wrong_eku")
    refused(was_revoked, 403, "revoked")
    assert [d["reason"] for d in decisions(caplog)[-4:]] == [
        "bad_forwarded_identity",
        "bad_forwarded_identity",
        "wrong_eku",
        "revoked",
    ]


def test_wsgi_strips_identity_headers_and_sees_the_caller(
    ca: CertificateAuthority, server_id: Identity, orders: Identity
) -> None:
    """Flask under werkzeug: SSL_CLIENT_CERT gives the caller; spoofed headers are gone."""
    flask_app = Flask("svc")

    @flask_app.get("/items")
    def items() -> dict[str, Any]:
        from flask import request

        return {
            "caller": str(current_caller()),
            "user": current_user(),
            "spoofed": [k for k in request.environ if "TRUSTMESH" in k or "CLIENT_CERT" in k],
        }

    flask_app.wsgi_app = MTLSWSGIMiddleware(  # type: ignore[method-assign]
        flask_app.wsgi_app,
        trust_domain="example.org",
        policy=allow_all(),
        revocation=RevokedSerials(),
    )
    with serve_wsgi(flask_app, ca, server_id) as url, client(ca, orders) as http:
        r = http.get(
            f"{url}/items",
            headers=[
                ("X-Trustmesh-Caller", "spiffe://example.org/admin"),
                ("x-TRUSTMESH-caller", "spiffe://example.org/admin"),
                ("X_Trustmesh_Caller", "spiffe://example.org/admin"),
                ("Client-Cert", ":AAAA:"),
            ],
        )
    assert r.status_code == 200, r.text
    assert r.json() == {"caller": ORDERS, "user": None, "spoofed": ["SSL_CLIENT_CERT"]}


def _steering() -> list[tuple[str, str]]:
    from .test_proxy_inbound import STEERING, spellings

    return [(spelled, value) for name, value in STEERING for spelled in spellings(name)]


def test_override_and_address_headers_follow_the_sidecar_rules(
    ca: CertificateAuthority, server_id: Identity, orders: Identity, workdir: Path
) -> None:
    """The headers the sidecar and gateway strip (trustmesh.headers: request-line overrides,
    client addresses) are stripped from a peer that is not a trusted proxy, in every
    spelling; a trusted proxy's (which vouches for them) reach the app, as its identity
    headers do."""
    from trustmesh.headers import is_spoofable

    gateway = issue(ca, GATEWAY, workdir)
    app = protect(echo_app(), trusted_proxies=[GATEWAY])
    sent = [*_steering(), ("X-Kept", "yes")]
    vouched = [(k, v) for k, v in sent if "trustmesh" not in k.lower()]
    with serve_asgi(app, ca, server_id) as url:
        with client(ca, orders) as http:
            direct = http.get(f"{url}/items", headers=sent)
        with client(ca, gateway) as http:
            proxied = http.get(f"{url}/items", headers=[*vouched, ("X-Trustmesh-Caller", ORDERS)])
    assert direct.status_code == 200, direct.text
    assert direct.json()["caller"] == ORDERS
    seen = direct.json()["headers"]
    assert "x-kept" in seen
    assert [name for name in seen if is_spoofable(name)] == []
    assert proxied.status_code == 200, proxied.text
    assert proxied.json()["caller"] == ORDERS
    assert proxied.json()["via"] == GATEWAY
    spoofable = [name for name in proxied.json()["headers"] if is_spoofable(name)]
    assert len(spoofable) == len(vouched) - 1 + 1  # all but X-Kept, plus X-Trustmesh-Caller


def test_wsgi_strips_override_and_address_headers(
    ca: CertificateAuthority, server_id: Identity, orders: Identity
) -> None:
    """Under werkzeug the same list goes from the environ of a peer that is no proxy."""
    from trustmesh.headers import is_spoofable

    flask_app = Flask("svc")

    @flask_app.get("/items")
    def items() -> dict[str, Any]:
        from flask import request

        return {"kept": sorted(k for k in request.environ if k.startswith("HTTP_"))}

    flask_app.wsgi_app = MTLSWSGIMiddleware(  # type: ignore[method-assign]
        flask_app.wsgi_app,
        trust_domain="example.org",
        policy=allow_all(),
        revocation=RevokedSerials(),
    )
    with serve_wsgi(flask_app, ca, server_id) as url, client(ca, orders) as http:
        r = http.get(f"{url}/items", headers=[*_steering(), ("X-Kept", "yes")])
    assert r.status_code == 200, r.text
    kept = r.json()["kept"]
    assert "HTTP_X_KEPT" in kept
    assert [k for k in kept if is_spoofable(k[5:])] == []


# -- policy -----------------------------------------------------------------------------


def test_policy_allows_denies_and_audits(
    ca: CertificateAuthority,
    server_id: Identity,
    orders: Identity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Enforce mode refuses 403 with the policy's reason; audit mode logs and lets through."""

    def reads_only(request: Any) -> str | None:
        return "reads" if request.method == "GET" and request.caller == ORDERS else None

    enforce = CallablePolicy(reads_only)
    audit = CallablePolicy(reads_only, mode="audit")
    registry = CollectorRegistry()
    with client(ca, orders) as http:
        app = protect(echo_app(), policy=enforce, metrics_registry=registry)
        with serve_asgi(app, ca, server_id) as url:
            assert http.get(f"{url}/items").status_code == 200
            body = refused(http.delete(f"{url}/items/1"), 403, "policy_denied")
        with serve_asgi(protect(echo_app(), policy=audit), ca, server_id) as url:
            assert http.delete(f"{url}/items/1").status_code == 200
    counted = "trustmesh_service_requests_total"
    assert registry.get_sample_value(counted, {"outcome": "allow", "reason": "allowed"}) == 1
    assert registry.get_sample_value(counted, {"outcome": "deny", "reason": "policy_denied"}) == 1
    assert "no rule allows" in body["detail"]
    assert enforce.seen[0].path == "/items"
    assert enforce.seen[1].method == "DELETE"
    outcomes = [(d["outcome"], d["reason"]) for d in decisions(caplog)]
    assert outcomes[-3:] == [
        ("allow", "rule 'reads' allows it"),
        ("deny", "policy_denied"),
        ("audit_deny", f"no rule allows {ORDERS} to DELETE /items/1"),
    ]


def test_cached_policy_decisions_still_deny_log_and_follow_a_reload(
    ca: CertificateAuthority,
    server_id: Identity,
    orders: Identity,
    workdir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With a PolicyFile (whose decisions are cached per caller, method and path), every
    repeat of a denied request on one keep-alive connection is refused, logged at WARNING
    and counted; after the file is reloaded the cached allow no longer answers: the same
    request on the same connection is refused by the new rules."""
    path = workdir / "cached-policy.yaml"
    path.write_text(f'rules:\n  - {{name: reads, callers: ["{ORDERS}"], methods: [GET]}}\n')
    policy = PolicyFile(path, check_interval=3600)  # reloaded by reload() below only
    registry = CollectorRegistry()
    app = protect(echo_app(), policy=policy, metrics_registry=registry)
    with serve_asgi(app, ca, server_id) as url, client(ca, orders) as http:
        for _ in range(3):
            assert http.get(f"{url}/items/1").status_code == 200
            body = refused(http.delete(f"{url}/items/1"), 403, "policy_denied")
            assert "closest 'reads' (rules[0]): method DELETE not in ['GET']" in body["detail"]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f'rules:\n  - {{name: writes, callers: ["{ORDERS}"], methods: [DELETE]}}\n')
        tmp.replace(path)
        assert policy.reload() is True
        for _ in range(2):
            refused(http.get(f"{url}/items/1"), 403, "policy_denied")
            assert http.delete(f"{url}/items/1").status_code == 200
    counted = "trustmesh_service_requests_total"
    assert registry.get_sample_value(counted, {"outcome": "allow", "reason": "allowed"}) == 5
    assert registry.get_sample_value(counted, {"outcome": "deny", "reason": "policy_denied"}) == 5
    denials = [
        r
        for r in caplog.records
        if getattr(r, "event", None) == "trustmesh.request" and r.levelno >= logging.INFO
    ]
    assert [(r.levelno, getattr(r, "outcome", None)) for r in denials] == [
        (logging.WARNING, "deny")
    ] * 5
    assert [getattr(r, "method", None) for r in denials] == ["DELETE"] * 3 + ["GET"] * 2
    allows = [d for d in decisions(caplog) if d["outcome"] == "allow"]
    assert len(allows) == 5  # at DEBUG


def test_allowed_requests_log_nothing_above_debug(
    ca: CertificateAuthority,
    server_id: Identity,
    orders: Identity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At INFO (trustmesh run's default) an allowed request writes no line and is counted;
    a denial is still logged."""
    caplog.set_level(logging.INFO, logger="trustmesh.middleware")
    registry = CollectorRegistry()

    def reads_only(request: Any) -> str | None:
        return "reads" if request.method == "GET" else None

    app = protect(echo_app(), policy=CallablePolicy(reads_only), metrics_registry=registry)
    with serve_asgi(app, ca, server_id) as url, client(ca, orders) as http:
        caplog.clear()
        assert http.get(f"{url}/items").status_code == 200
        refused(http.post(f"{url}/items"), 403, "policy_denied")
    assert [(d["outcome"], d["reason"]) for d in decisions(caplog)] == [("deny", "policy_denied")]
    counted = "trustmesh_service_requests_total"
    assert registry.get_sample_value(counted, {"outcome": "allow", "reason": "allowed"}) == 1


# -- tokens -----------------------------------------------------------------------------


def _token(idp: Idp, creds: dict[str, Any], **kw: Any) -> str:
    secret = creds["client_secret"]
    form = {"grant_type": "client_credentials", "client_id": creds["client_id"]}
    with idp.http(**kw) as http:
        if secret:
            r = http.post(idp.token_url, auth=(creds["client_id"], secret), data=form)
        else:  # tls_client_auth: the certificate authenticates
            r = http.post(idp.token_url, data=form)
    assert r.status_code == 200, r.text
    token: str = r.json()["access_token"]
    return token


def _verifier(idp: Idp) -> AsyncVerifier:
    return AsyncVerifier(
        IssuerConfig(issuer=idp.url, audiences=("inventory",), ca_bundle=idp.bundle)
    )


def test_tokens_missing_invalid_and_without_scope_are_told_apart(
    ca: CertificateAuthority,
    server_id: Identity,
    orders: Identity,
    idp: Idp,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """401 + Bearer challenge, 401 invalid_token with the reason, 403 insufficient_scope."""
    reader = idp.add_client("inv-reader", "--scope", "inventory:read", "--audience", "inventory")
    writer = idp.add_client("inv-writer", "--scope", "inventory:write", "--audience", "inventory")
    verifier = _verifier(idp)
    app = protect(
        echo_app(verifier),
        verifier=verifier,
        require_token=True,
        required_scopes=["inventory:read"],
    )
    good = _token(idp, reader)
    with serve_asgi(app, ca, server_id) as url, client(ca, orders) as http:
        missing = http.get(f"{url}/items")
        basic = http.get(f"{url}/items", auth=("user", "pass"))
        invalid = http.get(f"{url}/items", headers={"Authorization": "Bearer not.a.jwt"})
        tampered = http.get(f"{url}/items", headers={"Authorization": f"Bearer {good[:-4]}AAAA"})
        no_scope = http.get(
            f"{url}/items", headers={"Authorization": f"Bearer {_token(idp, writer)}"}
        )
        ok = http.get(f"{url}/items", headers={"Authorization": f"Bearer {good}"})
    refused(missing, 401, "token_missing")
    assert missing.headers["www-authenticate"] == 'Bearer realm="trustmesh"'
    refused(basic, 401, "token_missing")
    body = refused(invalid, 401, "invalid_token")
    assert body["token_reason"] == "malformed"
    assert 'error="invalid_token"' in invalid.headers["www-authenticate"]
    assert 'error_description="malformed"' in invalid.headers["www-authenticate"]
    assert refused(tampered, 401, "invalid_token")["token_reason"] == "bad_signature"
    refused(no_scope, 403, "insufficient_scope")
    assert 'error="insufficient_scope"' in no_scope.headers["www-authenticate"]
    assert ok.status_code == 200, ok.text
    assert ok.json()["user"] == reader["client_id"]
    assert ok.json()["token_in_context"] is True
    logged = [d["reason"] for d in decisions(caplog)]
    assert logged[-6:-1] == [
        "token_missing",
        "token_missing",
        "invalid_token",
        "invalid_token",
        "insufficient_scope",
    ]
    assert all(good not in r.getMessage() for r in caplog.records)


def test_certificate_bound_token_needs_the_callers_certificate(
    ca: CertificateAuthority, server_id: Identity, workdir: Path, idp: Idp
) -> None:
    """A token bound to one certificate works with it and is refused with another (RFC 8705)."""
    reports_id = "spiffe://example.org/svc/reports"
    creds = idp.add_client(
        "inv-reports",
        *("--scope", "inventory:read", "--audience", "inventory"),
        *("--auth-method", "tls_client_auth", "--tls-spiffe-id", reports_id),
    )
    holder = issue(ca, reports_id, workdir)
    thief = issue(ca, reports_id, workdir)  # same ID, another key
    token = _token(idp, creds, cert=holder.chain, key=holder.key)
    verifier = _verifier(idp)
    app = protect(echo_app(verifier), verifier=verifier)
    auth = {"Authorization": f"Bearer {token}"}
    with serve_asgi(app, ca, server_id) as url:
        with client(ca, holder) as http:
            ok = http.get(f"{url}/items", headers=auth)
        with client(ca, thief) as http:
            stolen = http.get(f"{url}/items", headers=auth)
    assert ok.status_code == 200, ok.text
    assert ok.json()["user"] == creds["client_id"]
    assert refused(stolen, 401, "invalid_token")["token_reason"] == "cnf_mismatch"


def test_fastapi_dependencies_and_wsgi_verifier_see_the_user(
    ca: CertificateAuthority, server_id: Identity, orders: Identity, idp: Idp
) -> None:
    """FastAPI's CallerDep/UserDep and Flask's current_user() return the verified token."""
    creds = idp.add_client("inv-fast", "--scope", "inventory:read", "--audience", "inventory")
    token = _token(idp, creds)
    verifier = _verifier(idp)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await verifier.aclose()

    api = FastAPI(lifespan=lifespan)

    @api.get("/me")
    def me(caller: CallerDep, user: UserDep) -> dict[str, Any]:
        return {"caller": str(caller), "scopes": sorted(user.scopes) if user else None}

    api.add_middleware(
        MTLSMiddleware,
        trust_domain="example.org",
        policy=allow_all(),
        revocation=RevokedSerials(),
        verifier=verifier,
    )
    auth = {"Authorization": f"Bearer {token}"}
    with serve_asgi(api, ca, server_id) as url, client(ca, orders) as http:
        r = http.get(f"{url}/me", headers=auth)
        anonymous = http.get(f"{url}/me")
    assert r.json() == {"caller": ORDERS, "scopes": ["inventory:read"]}
    assert anonymous.json() == {"caller": ORDERS, "scopes": None}

    flask_app = Flask("svc")

    @flask_app.get("/me")
    def flask_me() -> dict[str, Any]:
        user = current_user()
        return {"caller": str(current_caller()), "user": user.subject if user else None}

    with Verifier(
        IssuerConfig(issuer=idp.url, audiences=("inventory",), ca_bundle=idp.bundle)
    ) as sync_verifier:
        flask_app.wsgi_app = MTLSWSGIMiddleware(  # type: ignore[method-assign]
            flask_app.wsgi_app,
            trust_domain="example.org",
            policy=allow_all(),
            revocation=RevokedSerials(),
            verifier=sync_verifier,
            require_token=True,
        )
        with serve_wsgi(flask_app, ca, server_id) as url, client(ca, orders) as http:
            ok = http.get(f"{url}/me", headers=auth)
            bad = http.get(f"{url}/me", headers={"Authorization": "Bearer x.y.z"})
            none = http.get(f"{url}/me")
    assert ok.json() == {"caller": ORDERS, "user": creds["client_id"]}
    refused(bad, 401, "invalid_token")
    refused(none, 401, "token_missing")
    assert none.headers["www-authenticate"] == 'Bearer realm="trustmesh"'


# -- the real policy engine and the CA's revocation feed --------------------------------

POLICY_YAML = f"""\
mode: enforce
rules:
  - name: orders-reads-inventory
    callers: ["{ORDERS}"]
    methods: [GET]
    paths: ["/items", "/items/*"]
"""


@pytest.mark.slow
def test_policy_file_and_revocation_feed_cut_an_open_connection(
    home: Path,
    ca: CertificateAuthority,
    server_id: Identity,
    workdir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """trustmesh.policy decides; a revocation through `ca serve` reaches the RevocationSet
    over the feed and the caller's open keep-alive connection is refused within seconds."""
    from trustmesh.client import CAClient
    from trustmesh.policy import Policy
    from trustmesh.tls import RevocationSet, client_context

    from ._server import running_server
    from ._services import bundle_pem

    caller = issue(ca, ORDERS, workdir)
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY_YAML)
    own = client_context(cadata=bundle_pem(ca), chain=server_id.chain, key=server_id.key)
    with running_server(home, tmp_path) as ca_server:
        revocations = RevocationSet(ca_server.url, lambda: own, issuers=lambda: [ca.intermediate])
        with revocations:
            assert revocations.wait_connected(15)
            app = protect(echo_app(), policy=Policy.load(policy_path), revocation=revocations)
            with serve_asgi(app, ca, server_id) as url, client(ca, caller) as http:
                assert http.get(f"{url}/items/7").status_code == 200
                denied = http.post(f"{url}/items")
                assert http.get(f"{url}/items").status_code == 200
                with CAClient(
                    ca_server.url, bundle=ca_server.bundle, cert=caller.chain, key=caller.key
                ) as ca_api:
                    ca_api.revoke(serial=format(caller.serial, "x"))
                start = time.monotonic()
                while True:
                    r = http.get(f"{url}/items")
                    if r.status_code != 200 or time.monotonic() - start > 10:
                        break
                    time.sleep(0.05)
                took = time.monotonic() - start
    body = refused(denied, 403, "policy_denied")
    assert ORDERS in body["detail"]
    assert "POST" in body["detail"]
    refused(r, 403, "revoked")
    assert r.headers["connection"] == "close"
    assert took < 5, f"the revocation took {took:.2f}s to reach the service"
    assert decisions(caplog)[-1]["reason"] == "revoked"


def test_wsgi_believes_the_trusted_proxy_and_refuses_its_ambiguous_headers(
    ca: CertificateAuthority, server_id: Identity, orders: Identity, workdir: Path
) -> None:
    """Under werkzeug, the gateway's X-Trustmesh-Caller and Client-Cert name the caller; the
    same header twice (joined into one environ key) is a 400, not a guess."""
    gateway = issue(ca, GATEWAY, workdir)
    flask_app = Flask("svc")

    @flask_app.get("/items")
    def items() -> dict[str, Any]:
        caller = current_caller()
        return {"caller": str(caller), "via": str(caller.via), "serial": caller.serial_hex}

    flask_app.wsgi_app = MTLSWSGIMiddleware(  # type: ignore[method-assign]
        flask_app.wsgi_app,
        trust_domain="example.org",
        policy=allow_all(),
        revocation=RevokedSerials(),
        trusted_proxies=[GATEWAY],
        trust_bundle=[ca.intermediate, *ca.bundle],
    )
    with serve_wsgi(flask_app, ca, server_id) as url, client(ca, gateway) as http:
        named = http.get(f"{url}/items", headers={"X-Trustmesh-Caller": ORDERS})
        with_cert = http.get(
            f"{url}/items", headers={"Client-Cert": forwarded_certificate_header(orders.cert)}
        )
        twice = http.get(
            f"{url}/items",
            headers=[("X-Trustmesh-Caller", ORDERS), ("X-Trustmesh-Caller", GATEWAY)],
        )
    assert named.json() == {"caller": ORDERS, "via": GATEWAY, "serial": None}
    assert with_cert.json() == {
        "caller": ORDERS,
        "via": GATEWAY,
        "serial": format(orders.serial, "x"),
    }
    refused(twice, 400, "bad_forwarded_identity")


def test_exempt_paths_skip_checks_but_never_pass_identity_headers(
    ca: CertificateAuthority, server_id: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    """An exempt /healthz answers without a certificate (logged at startup); identity
    headers are still removed there, and every other path still needs a certificate."""

    async def health(request: Request) -> JSONResponse:
        return JSONResponse([k.decode("latin-1") for k, _ in request.scope["headers"]])

    app = protect(Starlette(routes=[Route("/healthz", health)]), exempt_paths=["/healthz"])
    with serve_asgi(app, ca, server_id, client_cert="optional") as url, client(ca, None) as http:
        ok = http.get(f"{url}/healthz", headers=SPOOFED)
        other = http.get(f"{url}/items")
    assert ok.status_code == 200
    assert sorted(ok.json()) == ["accept", "accept-encoding", "connection", "host", "user-agent"]
    refused(other, 403, "no_client_certificate")
    assert any("served without checks" in r.getMessage() for r in caplog.records)
