"""The gateway app end to end in one process: a real gateway (uvicorn, TLS) in front of
real upstreams (uvicorn with our TLS shim, identities from a test CA), tokens from a
real HTTPS provider. Routing, headers, auth, limits, upstream failures, retries,
health, metrics, access log and hot reload."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trustmesh.authority import CertificateAuthority

from ._echo import CHUNK, WAIT, Upstream
from ._gateway import GATEWAY_ID, gateway_identity, route, running_gateway, wait_for, write_config
from ._provider import Minter, ProviderServer, server_tls
from ._server import free_port
from ._services import Identity, RevokedSerials, issue, serve_asgi

ORDERS = "spiffe://example.org/svc/orders"
USERS = "spiffe://example.org/svc/users"


@pytest.fixture
def cert_dir(ca: CertificateAuthority, tmp_path: Path) -> Path:
    return gateway_identity(ca, tmp_path)


@pytest.fixture
def orders_id(ca: CertificateAuthority, tmp_path: Path) -> Identity:
    return issue(ca, ORDERS, tmp_path)


@pytest.fixture
def orders(ca: CertificateAuthority, orders_id: Identity) -> Iterator[tuple[Upstream, str]]:
    app = Upstream("orders")
    with serve_asgi(app, ca, orders_id) as url:
        yield app, url


@pytest.fixture
def provider(ca: CertificateAuthority, tmp_path: Path) -> Iterator[ProviderServer]:
    ctx, _bundle = server_tls(ca, tmp_path / "provider")
    server = ProviderServer(ctx).start()
    yield server
    server.stop()


@pytest.fixture
def minter(provider: ProviderServer) -> Minter:
    m = Minter(issuer=provider.url, audience="api")
    provider.routes["/.well-known/openid-configuration"] = {
        "issuer": provider.url,
        "jwks_uri": provider.url + "/jwks",
    }
    provider.routes["/jwks"] = m.jwks()
    return m


def _access(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in vars(r).items() if not k.startswith("_")}
        for r in caplog.records
        if r.name == "trustmesh.gateway.access"
    ]


def test_routes_match_on_segment_boundaries_host_and_rewrite(
    ca: CertificateAuthority, tmp_path: Path, cert_dir: Path, orders: tuple[Upstream, str]
) -> None:
    """Prefixes match whole segments on the normalised path; hosts pick routes; strip and
    rewrite change the path the upstream sees; the query passes unchanged."""
    app, url = orders
    config = write_config(
        tmp_path / "gw.yaml",
        [
            route("/orders", [url], ORDERS),
            route("/api/orders", [url], ORDERS, name="api", rewrite_prefix="/v1/orders"),
            route("/strip", [url], ORDERS, name="strip", strip_prefix=True),
            route("/", [url], ORDERS, name="admin-host", host="admin.example.org"),
            route("/", [url], ORDERS, name="wild-host", host="*.example.org"),
        ],
    )
    with running_gateway(ca, config, cert_dir) as gw, gw.client() as http:
        exact = http.get("/orders")
        below = http.get("/orders/1?x=1&y=%2F")
        tricks = http.get("/orders/./a/../b//c")
        not_prefix = http.get("/ordersx")
        rewritten = http.get("/api/orders/7")
        stripped = http.get("/strip/deep/path")
        stripped_root = http.get("/strip")
        by_host = http.get("/anything", headers={"Host": "admin.example.org:8443"})
        by_wildcard = http.get("/anything", headers={"Host": "shop.example.org"})
        encoded_slash = http.get("/orders%2F..%2Fadmin")
    assert exact.status_code == 201
    assert exact.json()["path"] == "/orders"
    assert below.json()["path"] == "/orders/1"
    assert below.json()["query"] == "x=1&y=%2F"
    assert tricks.json()["path"] == "/orders/b/c"
    assert not_prefix.status_code == 404
    assert not_prefix.json()["reason"] == "no_route"
    assert rewritten.json()["path"] == "/v1/orders/7"
    assert stripped.json()["path"] == "/deep/path"
    assert stripped_root.json()["path"] == "/"
    assert by_host.status_code == 201
    assert by_wildcard.status_code == 201
    assert encoded_slash.status_code == 400
    assert encoded_slash.json()["reason"] == "path_refused"
    assert {r["caller"] for r in app.requests} == {GATEWAY_ID}


SPOOFED = {
    "X-Forwarded-For": "10.9.9.9",
    "x_forwarded_for": "10.9.9.8",
    "X-Forwarded-Host": "evil.example",
    "Forwarded": "for=10.9.9.9",
    "X-Real-IP": "10.9.9.9",
    "X-User": "admin",
    "X-Client-Id": "admin",
    "X-Forwarded-Client-Cert": "By=spiffe://example.org/admin",
    "X-Trustmesh-Caller": "spiffe://example.org/admin",
    "Client-Cert": ":AAAA:",
    "X-Auth-Request-User": "admin",
    "X-Remote-User": "admin",
}


def test_headers_stripped_vouched_and_security_headers_everywhere(
    ca: CertificateAuthority,
    tmp_path: Path,
    cert_dir: Path,
    orders: tuple[Upstream, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Client identity/forwarding headers never reach the upstream; the gateway sets its
    own; the request id is generated (or kept when safe) and echoed; allowed and refused
    responses carry the security headers."""
    caplog.set_level(logging.INFO, logger="trustmesh.gateway.access")
    app, url = orders
    config = write_config(tmp_path / "gw.yaml", [route("/orders", [url], ORDERS)])
    with running_gateway(ca, config, cert_dir) as gw, gw.client() as http:
        spoofed = http.get("/orders", headers={**SPOOFED, "X-Request-Id": "abc-123"})
        unsafe_id = http.get("/orders", headers={"X-Request-Id": "bad id\twith tab"})
        refused = http.get("/nowhere")
    seen = {name: value for name, value in spoofed.json()["headers"]}
    for name in SPOOFED:
        low = name.lower().replace("_", "-")
        if low in ("x-forwarded-for", "x-forwarded-host", "forwarded"):
            continue
        assert low not in seen, name
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"].startswith("127.0.0.1:")
    assert seen["forwarded"].startswith("for=127.0.0.1;proto=https")
    assert seen["x-request-id"] == "abc-123"
    assert spoofed.headers["x-request-id"] == "abc-123"
    generated = unsafe_id.headers["x-request-id"]
    assert len(generated) == 32
    assert app.requests[-1]["caller"] == GATEWAY_ID
    assert [h for h in app.requests[-1]["headers"] if h[0] == "x-request-id"] == [
        ["x-request-id", generated]
    ]
    for response in (spoofed, refused):
        assert response.headers["strict-transport-security"].startswith("max-age=")
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
    assert refused.headers["cache-control"] == "no-store"
    assert refused.headers["content-type"] == "application/problem+json"
    assert "x-hop-private" not in spoofed.headers
    lines = _access(caplog)
    first = lines[0]
    assert first["event"] == "access"
    assert first["route"] == "orders"
    assert first["reason"] == "public"
    assert first["status"] == 201
    assert first["upstream"] == url.removeprefix("https://")
    assert first["upstream_status"] == 201
    assert first["request_id"] == "abc-123"
    assert first["client_ip"] == "127.0.0.1"
    assert "x-user" in first["stripped"].split(",")
    assert lines[-1]["reason"] == "no_route"
    assert lines[-1]["status"] == 404


def test_tokens_401_403_and_the_token_travels_unchanged(
    ca: CertificateAuthority,
    tmp_path: Path,
    cert_dir: Path,
    orders: tuple[Upstream, str],
    provider: ProviderServer,
    minter: Minter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No token: 401 with a bare challenge; a bad token: 401 invalid_token; too little
    scope: 403 insufficient_scope; a good one reaches the upstream with the same
    Authorization header, and the access log names the user."""
    caplog.set_level(logging.INFO, logger="trustmesh.gateway.access")
    app, url = orders
    config = write_config(
        tmp_path / "gw.yaml",
        [
            route("/orders", [url], ORDERS, auth={"scopes": ["orders:read"]}),
            route("/admin", [url], ORDERS, auth={"scopes": ["orders:admin"]}),
            route("/maybe", [url], ORDERS, auth={"required": False}),
        ],
        issuers=[{"issuer": provider.url, "audience": "api"}],
    )
    token = minter.token(sub="alice", client_id="shop-ui")
    expired = minter.token(iat=int(time.time()) - 900, exp=int(time.time()) - 300)
    with running_gateway(ca, config, cert_dir) as gw, gw.client() as http:
        missing = http.get("/orders")
        bad = http.get("/orders", headers={"Authorization": f"Bearer {expired}"})
        forged = http.get("/orders", headers={"Authorization": f"Bearer {token[:-4]}AAAA"})
        scope = http.get("/admin", headers={"Authorization": f"Bearer {token}"})
        ok = http.get("/orders", headers={"Authorization": f"Bearer {token}"})
        optional_none = http.get("/maybe")
        optional_bad = http.get("/maybe", headers={"Authorization": f"Bearer {expired}"})
    assert optional_none.status_code == 201
    assert optional_bad.status_code == 401
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="trustmesh"'
    assert missing.json()["reason"] == "token_missing"
    assert bad.status_code == 401
    assert 'error="invalid_token"' in bad.headers["www-authenticate"]
    assert bad.json()["reason"] == "expired"
    assert forged.status_code == 401
    assert scope.status_code == 403
    assert scope.json()["reason"] == "insufficient_scope"
    assert 'error="insufficient_scope"' in scope.headers["www-authenticate"]
    assert ok.status_code == 201
    sent = [v for k, v in ok.json()["headers"] if k == "authorization"]
    assert sent == [f"Bearer {token}"]
    assert len(app.requests) == 2
    lines = _access(caplog)
    assert [line["reason"] for line in lines] == [
        "token_missing",
        "expired",
        lines[2]["reason"],
        "insufficient_scope",
        "allowed",
        "allowed",
        "expired",
    ]
    assert lines[2]["status"] == 401
    assert lines[4]["sub"] == "alice"
    assert lines[4]["client_id"] == "shop-ui"


def test_body_and_header_limits(
    ca: CertificateAuthority, tmp_path: Path, cert_dir: Path, orders: tuple[Upstream, str]
) -> None:
    """413 for a body over the limit (declared or counted while streaming), 431 for
    oversized headers; nothing reaches the upstream."""
    app, url = orders
    config = write_config(
        tmp_path / "gw.yaml",
        [
            route("/orders", [url], ORDERS, max_body_bytes=1000),
            route("/upload", [url], ORDERS, name="upload", max_body_bytes=CHUNK),
        ],
        limits={"max_header_bytes": 2048},
    )

    def chunks() -> Iterator[bytes]:
        yield b"x" * CHUNK
        yield b"y" * CHUNK

    with running_gateway(ca, config, cert_dir) as gw, gw.client() as http:
        declared = http.post("/orders", content=b"z" * 1001)
        put_declared = http.put("/orders", content=b"z" * 1001)
        streamed = http.post("/upload", content=chunks())
        headers = http.get("/orders", headers={"X-Big": "a" * 3000})
        fine = http.post("/orders", content=b"z" * 1000)
    assert declared.status_code == 413
    assert declared.json()["reason"] == "body_too_large"
    assert put_declared.status_code == 413
    assert streamed.status_code == 413
    assert headers.status_code == 431
    assert headers.json()["reason"] == "headers_too_large"
    assert fine.status_code == 201
    assert [r["body"] for r in app.requests] == ["z" * 1000]


def test_streaming_both_ways_through_the_gateway(
    ca: CertificateAuthority, tmp_path: Path, cert_dir: Path, orders: tuple[Upstream, str]
) -> None:
    """The upstream sees the first piece of an upload before the client sends the rest;
    the client reads the first piece of a download before the upstream sends the rest."""
    app, url = orders
    config = write_config(tmp_path / "gw.yaml", [route("/", [url], ORDERS, name="all")])
    reached: list[bool] = []

    def body() -> Iterator[bytes]:
        yield b"x" * CHUNK
        reached.append(app.first_chunk.wait(WAIT))
        yield b"y" * CHUNK

    with running_gateway(ca, config, cert_dir) as gw, gw.client(timeout=60) as http:
        upload = http.put("/upload", content=body())
        with http.stream("GET", "/download") as response:
            pieces = response.iter_raw()
            first = next(pieces)
            app.client_got_first.set()
            rest = b"".join(pieces)
    assert reached == [True]
    assert upload.text == str(2 * CHUNK)
    assert first.startswith(b"a")
    assert first + rest == b"a" * CHUNK + b"b" * CHUNK


def test_upstream_with_the_wrong_identity_gets_nothing(
    ca: CertificateAuthority, tmp_path: Path, cert_dir: Path
) -> None:
    """An endpoint presenting another SPIFFE ID than configured: 502, and no request
    byte (header, token, body) reaches it."""
    impostor = issue(ca, USERS, tmp_path)
    app = Upstream("impostor")
    with serve_asgi(app, ca, impostor) as url:
        config = write_config(tmp_path / "gw.yaml", [route("/orders", [url], ORDERS)])
        with running_gateway(ca, config, cert_dir) as gw, gw.client() as http:
            response = http.post("/orders", content=b"secret", headers={"Authorization": "x"})
    assert response.status_code == 502
    assert response.json()["reason"] == "upstream_unavailable"
    assert response.headers["x-frame-options"] == "DENY"
    assert app.requests == []


def test_revoked_upstream_is_refused(
    ca: CertificateAuthority,
    tmp_path: Path,
    cert_dir: Path,
    orders_id: Identity,
    orders: tuple[Upstream, str],
) -> None:
    """Once the upstream's certificate is in the revocation set, the gateway refuses it
    (502), also on connections opened before the revocation."""
    app, url = orders
    revoked = RevokedSerials()
    config = write_config(tmp_path / "gw.yaml", [route("/orders", [url], ORDERS)])
    with running_gateway(ca, config, cert_dir, revocations=revoked) as gw, gw.client() as http:
        before = http.get("/orders")
        revoked.serials.add(orders_id.serial)
        after = http.get("/orders")
    assert before.status_code == 201
    assert after.status_code == 502
    assert after.json()["reason"] == "upstream_unavailable"
    assert len(app.requests) == 1


def test_retries_only_where_safe(
    ca: CertificateAuthority, tmp_path: Path, cert_dir: Path, orders_id: Identity
) -> None:
    """A connect failure is retried on the next endpoint for any method (nothing was
    sent); a timeout after the request was sent is retried for GET (idempotent, body
    replayable) but not for POST."""
    dead = f"https://127.0.0.1:{free_port()}"
    slow = Upstream("slow", delay=3)
    fast = Upstream("fast")
    with serve_asgi(slow, ca, orders_id) as slow_url, serve_asgi(fast, ca, orders_id) as fast_url:
        config = write_config(
            tmp_path / "gw.yaml",
            [
                route("/a", [dead, fast_url], ORDERS, name="a", upstream={"eject_after": 100}),
                route(
                    "/b",
                    [slow_url, fast_url],
                    ORDERS,
                    name="b",
                    upstream={"timeout": "500ms", "eject_after": 100},
                ),
            ],
        )
        with running_gateway(ca, config, cert_dir) as gw, gw.client() as http:
            posts_a = [http.post("/a", content=b"order") for _ in range(2)]
            gets_b = [http.get("/b") for _ in range(2)]
            posts_b = [http.post("/b", content=b"pay") for _ in range(2)]
    assert [r.status_code for r in posts_a] == [201, 201]
    assert [r.status_code for r in gets_b] == [201, 201]
    assert sorted(r.status_code for r in posts_b) == [201, 504]
    timed_out = next(r for r in posts_b if r.status_code == 504)
    assert timed_out.json()["reason"] == "upstream_timeout"
    # The slow endpoint got the POST body: it was sent, so it was not resent elsewhere.
    assert [r["body"] for r in slow.requests if r["method"] == "POST"] == ["pay"]
    assert [r["body"] for r in fast.requests if r["method"] == "POST"] == [
        "order",
        "order",
        "pay",
    ]


def test_ejection_and_recovery_show_in_metrics(
    ca: CertificateAuthority, tmp_path: Path, cert_dir: Path, orders_id: Identity
) -> None:
    """Consecutive connect failures eject an endpoint (requests go to the others and
    metrics show it unhealthy); once it is back, a trial request returns it to rotation."""
    port = free_port()
    dead = f"https://127.0.0.1:{port}"
    live = Upstream("live")
    with serve_asgi(live, ca, orders_id) as live_url:
        config = write_config(
            tmp_path / "gw.yaml",
            [
                route(
                    "/",
                    [dead, live_url],
                    ORDERS,
                    name="pool",
                    upstream={"eject_after": 2, "eject_for": "1s"},
                )
            ],
            metrics={"listen": f"127.0.0.1:{free_port()}"},
        )
        endpoint = f"127.0.0.1:{port}"
        healthy = f'trustmesh_gateway_upstream_healthy{{endpoint="{endpoint}",route="pool"}}'
        with running_gateway(ca, config, cert_dir) as gw, gw.client() as http:
            first = [http.get("/x").status_code for _ in range(4)]
            ejected = gw.metrics()
            count = len(live.requests)
            during = [http.get("/x").status_code for _ in range(4)]
            assert len(live.requests) == count + 4  # the dead one is out of rotation
            back = Upstream("back")
            with serve_asgi(back, ca, orders_id, port=port):
                time.sleep(1.2)  # eject_for
                assert wait_for(lambda: http.get("/x") and bool(back.requests))
                recovered = gw.metrics()
    assert first == [201, 201, 201, 201]
    assert during == [201, 201, 201, 201]
    assert f"{healthy} 0.0" in ejected
    assert "trustmesh_gateway_upstream_ejections_total" in ejected
    assert f"{healthy} 1.0" in recovered
    assert 'trustmesh_gateway_upstream_requests_total{endpoint="' + endpoint in ejected
    assert 'outcome="upstream_unavailable"' in ejected


def test_metrics_listener_and_its_contents(
    ca: CertificateAuthority, tmp_path: Path, cert_dir: Path, orders: tuple[Upstream, str]
) -> None:
    """Metrics are on their own plain-HTTP listener (never on the public port) and count
    requests by route, status and reason, latency, and denies by reason."""
    _app, url = orders
    config = write_config(
        tmp_path / "gw.yaml",
        [route("/orders", [url], ORDERS)],
        metrics={"listen": f"127.0.0.1:{free_port()}"},
    )
    with running_gateway(ca, config, cert_dir) as gw, gw.client() as http:
        http.get("/orders")
        http.get("/nope")
        public_metrics = http.get("/metrics")
        text = gw.metrics()
    assert public_metrics.status_code == 404
    assert (
        'trustmesh_gateway_requests_total{reason="public",route="orders",status="201"} 1.0' in text
    )
    assert 'trustmesh_gateway_requests_total{reason="no_route",route="-",status="404"}' in text
    assert 'trustmesh_gateway_denies_total{reason="no_route"}' in text
    assert 'trustmesh_gateway_request_duration_seconds_bucket{le="0.001",route="orders"}' in text
    assert "trustmesh_gateway_config_generation 1.0" in text


def test_hot_reload_valid_and_invalid(
    ca: CertificateAuthority,
    tmp_path: Path,
    cert_dir: Path,
    orders: tuple[Upstream, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A valid change is in force within a second or so; an invalid one is logged with
    its line and key while the previous configuration keeps serving."""
    caplog.set_level(logging.INFO, logger="trustmesh.gateway")
    _app, url = orders
    path = tmp_path / "gw.yaml"
    write_config(path, [route("/orders", [url], ORDERS)])
    listen = path.read_text().splitlines()[0]
    with running_gateway(ca, path, cert_dir) as gw, gw.client() as http:
        assert http.get("/users").status_code == 404
        text = path.read_text().replace("path: /orders", "path: /users")
        path.write_text(text)
        assert wait_for(lambda: gw.generation == 2)
        moved = http.get("/users")
        gone = http.get("/orders")
        path.write_text(text.replace("id: spiffe://example.org/svc/orders", "id: orders"))
        assert wait_for(
            lambda: any(r.__dict__.get("event") == "config_reload_failed" for r in caplog.records)
        )
        still = http.get("/users")
    assert listen.startswith("listen: 127.0.0.1:")
    assert moved.status_code == 201
    assert gone.status_code == 404
    assert still.status_code == 201
    assert gw.generation == 2
    failed = next(r for r in caplog.records if r.__dict__.get("event") == "config_reload_failed")
    assert failed.__dict__["key"] == "routes[0].upstream.id"
    assert failed.__dict__["line"] > 1
    assert "is not a SPIFFE ID" in failed.getMessage()


def test_address_lists_rate_limits_and_alert_blocking(
    ca: CertificateAuthority,
    tmp_path: Path,
    cert_dir: Path,
    orders: tuple[Upstream, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CIDR lists refuse by the client address (believed from X-Forwarded-For only via a
    trusted proxy), per-IP limits answer 429 with Retry-After, and enough denies from one
    address fire an alert that blocks it."""
    caplog.set_level(logging.INFO, logger="trustmesh")
    _app, url = orders
    config = write_config(
        tmp_path / "gw.yaml",
        [
            route("/internal", [url], ORDERS, name="internal", allow_ips=["10.0.0.0/8"]),
            route("/partner", [url], ORDERS, name="partner", allow_ips=["203.0.113.0/24"]),
            route(
                "/limited",
                [url],
                ORDERS,
                name="limited",
                rate_limits={"per_ip": {"rate": 0.01, "burst": 2}},
            ),
        ],
        trusted_proxies=["127.0.0.1/32"],
        alerts={"threshold": 4, "window": "60s", "block_for": "60s"},
        metrics={"listen": f"127.0.0.1:{free_port()}"},
    )
    via_partner = {"X-Forwarded-For": "203.0.113.9"}
    with running_gateway(ca, config, cert_dir) as gw, gw.client() as http:
        partner = http.get("/partner", headers=via_partner)
        outsider = http.get("/partner")
        internal = http.get("/internal", headers=via_partner)
        limited = [http.get("/limited", headers=via_partner) for _ in range(3)]
        # 203.0.113.9 has 2 denies; two more fire the alert and block it.
        http.get("/internal", headers=via_partner)
        http.get("/nowhere", headers=via_partner)
        blocked = http.get("/partner", headers=via_partner)
        other = http.get("/limited")
        text = gw.metrics()
    assert partner.status_code == 201
    assert outsider.status_code == 403
    assert outsider.json()["reason"] == "ip_not_allowed"
    assert internal.json()["reason"] == "ip_not_allowed"
    assert [r.status_code for r in limited] == [201, 201, 429]
    assert limited[2].json()["reason"] == "rate_limited"
    assert int(limited[2].headers["retry-after"]) >= 1
    assert blocked.status_code == 403
    assert blocked.json()["reason"] == "blocked"
    assert int(blocked.headers["retry-after"]) >= 1
    assert other.status_code == 201  # 127.0.0.1 has its own bucket and no alert
    assert "trustmesh_gateway_alerts_total 1.0" in text
    assert 'trustmesh_gateway_denies_total{reason="rate_limited"} 1.0' in text
    assert any(r.__dict__.get("event") == "gateway_alert" for r in caplog.records)
    ips = {line["client_ip"] for line in _access(caplog)}
    assert ips == {"127.0.0.1", "203.0.113.9"}


def test_route_policy_file_and_methods(
    ca: CertificateAuthority,
    tmp_path: Path,
    cert_dir: Path,
    orders: tuple[Upstream, str],
    provider: ProviderServer,
    minter: Minter,
) -> None:
    """A route's policy file decides with the token's claims (403 policy_denied), and a
    method outside the route's list is 405 with Allow."""
    _app, url = orders
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "rules:\n  - name: acme-only\n    callers: [anonymous]\n    paths: ['/**']\n"
        "    user: {claims: {tenant: acme}}\n"
    )
    config = write_config(
        tmp_path / "gw.yaml",
        [
            route(
                "/orders",
                [url],
                ORDERS,
                auth={"scopes": ["orders:read"]},
                policy=str(policy),
                methods=["GET", "POST"],
            ),
        ],
        issuers=[{"issuer": provider.url, "audience": "api"}],
    )
    acme = minter.token(tenant="acme")
    other = minter.token(tenant="globex")
    with running_gateway(ca, config, cert_dir) as gw, gw.client() as http:
        allowed = http.get("/orders", headers={"Authorization": f"Bearer {acme}"})
        denied = http.get("/orders", headers={"Authorization": f"Bearer {other}"})
        wrong_method = http.delete("/orders", headers={"Authorization": f"Bearer {acme}"})
    assert allowed.status_code == 201
    assert denied.status_code == 403
    assert denied.json()["reason"] == "policy_denied"
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "GET, POST"
    assert wrong_method.json()["reason"] == "method_not_allowed"


def test_public_certificate_from_tls_files_reloads(
    ca: CertificateAuthority, tmp_path: Path, cert_dir: Path, orders: tuple[Upstream, str]
) -> None:
    """The tls: certificate is served without asking for a client certificate, and a
    replaced certificate applies to new connections without a restart."""
    from trustmesh.serving import issue_server_identity

    _app, url = orders
    first_dir, second_dir = tmp_path / "one", tmp_path / "two"
    first_dir.mkdir()
    second_dir.mkdir()
    chain, key = issue_server_identity(ca, "127.0.0.1", first_dir, path="/web")
    new_chain, new_key = issue_server_identity(ca, "127.0.0.1", second_dir, path="/web")
    config = write_config(
        tmp_path / "gw.yaml",
        [route("/orders", [url], ORDERS)],
        tls={"cert": str(chain), "key": str(key)},
    )

    def served_serial(gw: Any) -> int:
        from cryptography import x509

        with gw.client() as http:  # a new connection, no client certificate
            response = http.get("/orders")
            assert response.status_code == 201
            ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
            return x509.load_der_x509_certificate(ssl_object.getpeercert(True)).serial_number

    from cryptography import x509

    first = x509.load_pem_x509_certificates(chain.read_bytes())[0].serial_number
    second = x509.load_pem_x509_certificates(new_chain.read_bytes())[0].serial_number
    with running_gateway(ca, config, cert_dir) as gw:
        before = served_serial(gw)
        key.write_bytes(new_key.read_bytes())
        chain.write_bytes(new_chain.read_bytes())
        assert wait_for(lambda: served_serial(gw) == second)
    assert before == first
