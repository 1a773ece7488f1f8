"""`trustmesh run` as a real process: an ASGI app served over mTLS with the middleware, a
policy file, and the service certificate rotating from the agent's directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.client import mtls_client
from trustmesh.files import atomic_write
from trustmesh.pki import dump_private_key, pem_certificates
from trustmesh.tls import client_context

from ._server import free_port
from ._services import bundle_pem, issue

SERVICE = "spiffe://example.org/svc/inventory"
ORDERS = "spiffe://example.org/svc/orders"

APP = """\
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def items(request):
    who = request.scope["trustmesh"]
    return JSONResponse(
        {
            "caller": str(who.caller),
            "rule": who.decision.rule,
            "client": request.client.host,
            "scheme": request.url.scheme,
        }
    )


app = Starlette(routes=[Route("/items", items, methods=["GET", "POST"])])
"""

POLICY = f"""\
mode: enforce
rules:
  - name: orders-reads
    callers: ["{ORDERS}"]
    methods: [GET]
    paths: ["/items"]
"""


def _write_identity(ca: CertificateAuthority, directory: Path) -> int:
    issued = ca.issue(SERVICE, dns=["localhost"], ips=["127.0.0.1"], actor="test")
    assert issued.key is not None
    atomic_write(directory / "bundle.pem", pem_certificates(ca.bundle))
    atomic_write(directory / "key.pem", dump_private_key(issued.key), mode=0o600)
    atomic_write(directory / "chain.pem", pem_certificates(issued.chain))
    return issued.certificate.serial_number


def _server_serial(response: httpx.Response) -> int:
    from cryptography import x509

    ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
    return x509.load_der_x509_certificate(ssl_object.getpeercert(True)).serial_number


@pytest.mark.slow
def test_run_serves_an_asgi_app_with_policy_and_rotation(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """Allowed and denied by the policy file, a handshake without a certificate refused,
    a renewed service certificate used for new connections, SIGTERM exits 0. The app sees
    the socket's client address and scheme: X-Forwarded-For/-Proto from a local caller are
    not believed (uvicorn would by default, for 127.0.0.1)."""
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    first = _write_identity(ca, cert_dir)
    (tmp_path / "svcapp.py").write_text(APP)
    (tmp_path / "policy.yaml").write_text(POLICY)
    orders = issue(ca, ORDERS, tmp_path)
    port = free_port()
    log_path = tmp_path / "run.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trustmesh",
                "run",
                "svcapp:app",
                *("--cert-dir", str(cert_dir), "--listen", f"127.0.0.1:{port}"),
                *("--policy", str(tmp_path / "policy.yaml"), "--no-revocation"),
                *("--app-dir", str(tmp_path)),
            ],
            env={**os.environ},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    url = f"https://127.0.0.1:{port}"
    ctx = client_context(cadata=bundle_pem(ca), chain=orders.chain, key=orders.key)
    try:
        with mtls_client(ctx, expect_id=SERVICE, base_url=url, timeout=5) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    allowed = http.get(
                        "/items",
                        headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http"},
                    )
                    break
                except httpx.TransportError:
                    assert process.poll() is None, log_path.read_text()
                    assert time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.1)
            denied = http.post("/items")
            assert _server_serial(allowed) == first
        with httpx.Client(verify=client_context(cadata=bundle_pem(ca)), timeout=5) as anonymous:
            with pytest.raises(httpx.TransportError):
                anonymous.get(f"{url}/items")
        second = _write_identity(ca, cert_dir)
        deadline = time.monotonic() + 15
        while True:
            with mtls_client(ctx, expect_id=SERVICE, base_url=url, timeout=5) as http:
                fresh = http.get("/items")
                serving = _server_serial(fresh)
            if serving == second or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert allowed.status_code == 200, allowed.text
    assert allowed.json() == {
        "caller": ORDERS,
        "rule": "orders-reads",
        "client": "127.0.0.1",
        "scheme": "https",
    }
    assert denied.status_code == 403
    assert denied.json()["reason"] == "policy_denied"
    assert fresh.status_code == 200
    assert serving == second
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    deny = [entry for entry in lines if entry.get("outcome") == "deny"]
    assert deny[0]["reason"] == "policy_denied"
    assert deny[0]["caller"] == ORDERS
    assert any("no revocation set configured" in entry["msg"] for entry in lines)


def test_run_refuses_bad_input_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed APP, a missing policy choice or an app that is neither ASGI nor Flask-like
    WSGI exit 2 with the fix."""
    (tmp_path / "flaskapp.py").write_text("def app(environ, start_response):\n    return []\n")
    base = ["--cert-dir", str(tmp_path), "--app-dir", str(tmp_path)]
    assert main(["run", "nocolon", *base, "--no-policy", "--no-revocation"]) == 2
    assert "is not MODULE:ATTRIBUTE" in capsys.readouterr().err
    assert main(["run", "svc:app", *base, "--no-revocation"]) == 2
    assert "No --policy given" in capsys.readouterr().err
    assert main(["run", "svc:app", *base, "--no-policy"]) == 2
    assert "No --ca given" in capsys.readouterr().err
    assert main(["run", "flaskapp:app", *base, "--no-policy", "--no-revocation"]) == 2
    assert "not an ASGI app" in capsys.readouterr().err


@pytest.mark.slow
def test_run_with_revocation_feed_and_tokens(
    ca: CertificateAuthority, home: Path, tmp_path: Path
) -> None:
    """--ca wires the CA's revocation feed (a revocation cuts the caller's open connection);
    --issuer/--audience/--require-token verify the bearer token against `idp serve`."""
    from ._idp import running_idp
    from ._server import running_server

    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    _write_identity(ca, cert_dir)
    (tmp_path / "svcapp.py").write_text(APP.replace('"rule": who.decision.rule', '"rule": None'))
    orders = issue(ca, ORDERS, tmp_path)
    port = free_port()
    log_path = tmp_path / "run.log"
    with running_server(home, tmp_path) as ca_server, running_idp(home, tmp_path) as idp:
        creds = idp.add_client("run-user", "--scope", "inventory:read", "--audience", "inventory")
        with idp.http() as token_http:
            token = token_http.post(
                idp.token_url,
                auth=(creds["client_id"], creds["client_secret"]),
                data={"grant_type": "client_credentials"},
            ).json()["access_token"]
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trustmesh",
                    "run",
                    "svcapp:app",
                    *("--cert-dir", str(cert_dir), "--listen", f"127.0.0.1:{port}"),
                    *("--no-policy", "--ca", ca_server.url, "--app-dir", str(tmp_path)),
                    *("--issuer", idp.url, "--audience", "inventory", "--require-token"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        url = f"https://127.0.0.1:{port}"
        ctx = client_context(cadata=bundle_pem(ca), chain=orders.chain, key=orders.key)
        try:
            with mtls_client(ctx, expect_id=SERVICE, base_url=url, timeout=5) as http:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        missing = http.get("/items")
                        break
                    except httpx.TransportError:
                        assert process.poll() is None, log_path.read_text()
                        assert time.monotonic() < deadline, log_path.read_text()
                        time.sleep(0.1)
                auth = {"Authorization": f"Bearer {token}"}
                ok = http.get("/items", headers=auth)
                from trustmesh.client import CAClient

                with CAClient(
                    ca_server.url, bundle=ca_server.bundle, cert=orders.chain, key=orders.key
                ) as ca_api:
                    ca_api.revoke(serial=format(orders.serial, "x"))
                deadline = time.monotonic() + 10
                while True:
                    cut = http.get("/items", headers=auth)
                    if cut.status_code != 200 or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0, log_path.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert missing.status_code == 401, missing.text
    assert missing.json()["reason"] == "token_missing"
    assert ok.status_code == 200, ok.text
    assert ok.json()["caller"] == ORDERS
    assert cut.status_code == 403, cut.text
    assert cut.json()["reason"] == "revoked"


def test_run_logs_every_refused_handshake_with_its_reason(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """No certificate, a foreign CA, an expired certificate and TLS 1.1 offered: each
    refused at the handshake and logged with the peer and OpenSSL's reason."""
    from datetime import UTC, datetime, timedelta

    from .conftest import PASSPHRASE

    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    _write_identity(ca, cert_dir)
    (tmp_path / "svcapp.py").write_text(APP)
    (tmp_path / "policy.yaml").write_text(POLICY)
    foreign_ca = CertificateAuthority.init(
        tmp_path / "foreign", trust_domain="example.org", passphrase=PASSPHRASE
    )
    with foreign_ca:
        foreign = issue(foreign_ca, ORDERS, tmp_path)
    expired = issue(
        ca, ORDERS, tmp_path, ttl=timedelta(hours=1), now=datetime.now(UTC) - timedelta(hours=3)
    )
    port = free_port()
    log_path = tmp_path / "run.log"
    argv = [
        *("run", "svcapp:app", "--cert-dir", str(cert_dir), "--listen", f"127.0.0.1:{port}"),
        *("--policy", str(tmp_path / "policy.yaml"), "--no-revocation"),
        *("--app-dir", str(tmp_path)),
    ]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "trustmesh", *argv], stdout=log, stderr=subprocess.STDOUT
        )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while "listening" not in log_path.read_text() and "Uvicorn running" not in (
            log_path.read_text()
        ):
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        for identity in (None, foreign, expired):
            ctx = client_context(
                cadata=bundle_pem(ca),
                chain=identity.chain if identity else None,
                key=identity.key if identity else None,
            )
            with httpx.Client(verify=ctx, timeout=5) as http, pytest.raises(httpx.TransportError):
                # TLS 1.3 reports a refused client certificate at the first read.
                http.get(f"{url}/items")
        old = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_1"],
            input="",
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        assert old.returncode != 0
        time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    refused = [e for e in lines if e.get("event") == "tls_handshake_refused"]
    reasons = [e["reason"] for e in refused]
    assert all(e["peer"].startswith("127.0.0.1:") for e in refused)
    assert "peer_did_not_return_a_certificate" in reasons, reasons
    assert "certificate_verify_failed: unable to get local issuer certificate" in reasons, reasons
    assert "certificate_verify_failed: certificate has expired" in reasons, reasons
    assert "unsupported_protocol" in reasons, reasons  # TLS 1.1 offered
