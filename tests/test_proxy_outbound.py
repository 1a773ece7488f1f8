"""`trustmesh proxy outbound` as a real process: plain curl reaches an mTLS service that
sees the sidecar's SPIFFE ID; a server with the wrong identity is refused and closed."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.middleware import MTLSMiddleware

from ._services import allow_all, issue, serve_asgi
from ._sidecar import ORDERS, sidecar, write_identity

SERVICE = "spiffe://example.org/svc/inventory"


async def whoami(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """Answer with the caller the middleware established."""
    body = json.dumps({"caller": str(scope["trustmesh"].caller), "path": scope["path"]})
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not on PATH")
    return subprocess.run(
        [curl, "-sS", "--max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_curl_reaches_an_mtls_service_through_the_outbound_sidecar(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """curl speaks plain HTTP to the sidecar; the service (mTLS with the middleware) sees
    the sidecar's SPIFFE ID. With the wrong --expect-id curl gets a closed connection and
    the log says why."""
    cert_dir = tmp_path / "certs"
    write_identity(ca, cert_dir, ORDERS)
    server = issue(ca, SERVICE, tmp_path, ips=["127.0.0.1"])
    app = MTLSMiddleware(whoami, trust_domain="example.org", policy=allow_all(), revocation=None)
    base = ("--id", ORDERS, "--cert-dir", str(cert_dir), "--no-revocation")
    with serve_asgi(app, ca, server) as url:
        target = url.removeprefix("https://")
        with sidecar("outbound", tmp_path, *base, "--to", target, "--expect-id", SERVICE) as good:
            first = _curl(f"http://127.0.0.1:{good.port}/items")
            second = _curl(f"http://127.0.0.1:{good.port}/items/2")
            opened = good.wait_for("proxy_connection_open", peer_id=SERVICE)
            assert good.stop() == 0
        with sidecar(
            "outbound",
            tmp_path,
            *base,
            *("--to", target, "--expect-id", "spiffe://example.org/svc/payments"),
            name="wrong",
        ) as wrong:
            refused = _curl(f"http://127.0.0.1:{wrong.port}/items")
            mismatch = wrong.wait_for("proxy_refused", reason="server_id_mismatch")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"caller": ORDERS, "path": "/items"}
    assert json.loads(second.stdout)["path"] == "/items/2"
    assert opened["mode"] == "outbound"
    assert refused.returncode in (52, 56), refused  # empty reply / connection reset
    assert SERVICE in mismatch["detail"]
    assert "expected spiffe://example.org/svc/payments" in mismatch["detail"]


@pytest.mark.slow
def test_outbound_with_the_agent_in_process(
    ca: CertificateAuthority, home: Path, tmp_path: Path
) -> None:
    """--ca URL --token T (no --cert-dir): the sidecar enrolls in-process, follows the
    revocation feed, and curl reaches the service as the enrolled identity."""
    from ._server import running_server

    server = issue(ca, SERVICE, tmp_path, ips=["127.0.0.1"])
    app = MTLSMiddleware(whoami, trust_domain="example.org", policy=allow_all(), revocation=None)
    with running_server(home, tmp_path) as ca_server, serve_asgi(app, ca, server) as url:
        token = ca.create_join_token(ORDERS)
        with sidecar(
            "outbound",
            tmp_path,
            *("--id", ORDERS, "--ca", ca_server.url, "--token", token),
            *("--bundle", str(ca_server.bundle), "--ttl", "1h"),
            *("--to", url.removeprefix("https://"), "--expect-id", SERVICE),
        ) as proxy:
            answer = _curl(f"http://127.0.0.1:{proxy.port}/enrolled")
            assert proxy.stop() == 0
        logs = proxy.log_path.read_text()
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout) == {"caller": ORDERS, "path": "/enrolled"}
    assert '"event": "identity_enrolled"' in logs
    assert '"event": "revocation_bootstrap"' in logs


def test_outbound_refuses_a_remote_listen_and_bad_expect_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A non-loopback --listen without --allow-remote and an --expect-id that is not a
    SPIFFE ID exit 2 with the fix."""
    base = ["proxy", "outbound", "--id", ORDERS, "--cert-dir", str(tmp_path)]
    base += ["--to", "127.0.0.1:8443"]
    assert main([*base, "--listen", "0.0.0.0:9000", "--expect-id", ORDERS]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert main([*base, "--expect-id", "inventory"]) == 2
    assert "is not a SPIFFE ID or glob" in capsys.readouterr().err
    assert main([*base, "--expect-id", ORDERS, "--ttl", "1h"]) == 2
    assert "--ttl is for the agent in this process" in capsys.readouterr().err
