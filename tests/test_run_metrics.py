"""`trustmesh run --metrics-listen`: Prometheus counters and /healthz, /readyz on a
plain-HTTP loopback side listener that never reaches the app or the policy, through the
real CLI, over real mTLS, with and without a real revocation feed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.client import mtls_client
from trustmesh.tls import client_context

from ._gateway import gateway_identity
from ._server import free_port, running_server
from ._services import bundle_pem, issue

SERVICE = "spiffe://example.org/svc/inventory"
ORDERS = "spiffe://example.org/svc/orders"

APP = """\
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def items(request):
    return JSONResponse({"caller": str(request.scope["trustmesh"].caller)})


app = Starlette(routes=[Route("/items", items, methods=["GET", "POST"])])
"""

POLICY = f"""\
rules:
  - name: orders-reads
    callers: ["{ORDERS}"]
    methods: [GET]
    paths: ["/items"]
"""


@contextmanager
def _run(argv: list[str], workdir: Path) -> Iterator[subprocess.Popen[str]]:
    log_path = workdir / "run.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trustmesh", "run", "metricsapp:app", *argv],
            cwd=workdir,
            env={**os.environ},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _until(
    check: Callable[[], httpx.Response | None], proc: subprocess.Popen[str]
) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        try:
            response = check()
            if response is not None:
                return response
        except httpx.TransportError:
            pass
        assert proc.poll() is None, "trustmesh run exited"
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.slow
def test_run_metrics_count_requests_denials_and_handshake_failures(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """Allowed and denied requests by reason, refused handshakes, the certificate's
    remaining lifetime; /healthz and /readyz answer 200 without a certificate and without
    the policy (which would deny them); the side listener serves nothing of the app."""
    (tmp_path / "metricsapp.py").write_text(APP)
    (tmp_path / "policy.yaml").write_text(POLICY)
    cert_dir = gateway_identity(ca, tmp_path, SERVICE)
    orders = issue(ca, ORDERS, tmp_path)
    port, metrics_port = free_port(), free_port()
    side = f"http://127.0.0.1:{metrics_port}"
    argv = [
        *("--cert-dir", str(cert_dir), "--listen", f"127.0.0.1:{port}"),
        *("--policy", str(tmp_path / "policy.yaml"), "--no-revocation"),
        *("--metrics-listen", f"127.0.0.1:{metrics_port}"),
    ]
    url = f"https://127.0.0.1:{port}"
    ctx = client_context(cadata=bundle_pem(ca), chain=orders.chain, key=orders.key)
    with _run(argv, tmp_path) as proc:
        with mtls_client(ctx, expect_id=SERVICE, base_url=url, timeout=5) as http:
            allowed = _until(lambda: http.get("/items"), proc)
            denied = http.post("/items")
        with httpx.Client(verify=client_context(cadata=bundle_pem(ca)), timeout=5) as anonymous:
            for _ in range(2):
                with pytest.raises(httpx.TransportError):
                    anonymous.get(f"{url}/items")
        time.sleep(0.3)
        healthz = httpx.get(f"{side}/healthz", timeout=5)
        readyz = httpx.get(f"{side}/readyz", timeout=5)
        app_path = httpx.get(f"{side}/items", timeout=5)
        metrics = httpx.get(f"{side}/metrics", timeout=5)
    assert allowed.status_code == 200
    assert denied.status_code == 403
    assert healthz.status_code == 200
    assert readyz.status_code == 200, readyz.text
    assert readyz.json()["credentials"] == "loaded"
    assert readyz.json()["spiffe_id"] == SERVICE
    assert "revocation_feed" not in readyz.json()
    assert app_path.status_code == 404
    assert metrics.headers["content-type"].startswith("text/plain")
    samples = _samples(metrics.text)
    allow = (("outcome", "allow"), ("reason", "allowed"))
    deny = (("outcome", "deny"), ("reason", "policy_denied"))
    assert samples[("trustmesh_service_requests_total", allow)] == 1
    assert samples[("trustmesh_service_requests_total", deny)] == 1
    failures = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "trustmesh_run_handshake_failures_total"
    }
    assert sum(failures.values()) == 2, failures
    expiry = samples[("trustmesh_run_certificate_expiry_seconds", ())]
    assert 3600 < expiry <= 24 * 3600 + 60


@pytest.mark.slow
def test_run_readyz_follows_the_revocation_feed(
    ca: CertificateAuthority, home: Path, tmp_path: Path
) -> None:
    """With --ca, /readyz is 200 once the feed is connected (the gauge says so too) and
    503 after the CA goes away."""
    (tmp_path / "metricsapp.py").write_text(APP)
    cert_dir = gateway_identity(ca, tmp_path, SERVICE)
    port, metrics_port = free_port(), free_port()
    side = f"http://127.0.0.1:{metrics_port}"
    with running_server(home, tmp_path) as ca_server:
        argv = [
            *("--cert-dir", str(cert_dir), "--listen", f"127.0.0.1:{port}"),
            *("--no-policy", "--ca", ca_server.url),
            *("--metrics-listen", f"127.0.0.1:{metrics_port}"),
        ]
        with _run(argv, tmp_path) as proc:
            ready = _until(lambda: httpx.get(f"{side}/readyz", timeout=5), proc)
            metrics = httpx.get(f"{side}/metrics", timeout=5)
            ca_server.process.send_signal(signal.SIGTERM)
            ca_server.process.wait(timeout=30)

            def not_ready() -> httpx.Response | None:
                response = httpx.get(f"{side}/readyz", timeout=5)
                return response if response.status_code == 503 else None

            gone = _until(not_ready, proc)
    assert ready.status_code == 200, ready.text
    assert ready.json()["revocation_feed"] == "connected"
    assert _samples(metrics.text)[("trustmesh_run_revocation_connected", ())] == 1
    assert gone.json()["revocation_feed"] == "disconnected"
    assert gone.json()["status"] == "not ready"


def test_run_refuses_a_remote_metrics_listener_and_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A non-loopback --metrics-listen needs --allow-remote-metrics; --workers 2 with
    --metrics-listen is refused; a malformed address is named. Each: one line, exit 2."""
    (tmp_path / "metricsapp.py").write_text(APP)
    base = ["run", "metricsapp:app", "--cert-dir", str(tmp_path), "--app-dir", str(tmp_path)]
    base += ["--no-policy", "--no-revocation", "--log-format", "text"]
    cases = [
        (["--metrics-listen", "0.0.0.0:9464"], "is not a loopback address"),
        (["--metrics-listen", "127.0.0.1:9464", "--workers", "2"], "cannot be combined with"),
        (["--metrics-listen", "nowhere"], "is not HOST:PORT"),
    ]
    for extra, expected in cases:
        capsys.readouterr()
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert expected in err, err
        assert err.count("\n") == 1, err
