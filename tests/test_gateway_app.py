"""The gateway app end to end in one process: a real gateway (uvicorn, TLS) in front of
real upstreams (uvicorn with our TLS shim, identities from a test CA), tokens from a
real HTTPS provider. Routing, headers, auth, limits, upstream failures, retries,
health, metrics, access log and hot reload."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
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
