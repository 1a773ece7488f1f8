"""With ``--log-format json`` every line a server prints is JSON: its own records,
uvicorn's ("Started server process", "Shutting down"...), a refused handshake, its ready
line and its closing line. Each server kind starts through the real CLI, answers a
request over real TLS and stops on SIGTERM; every non-empty line of its output parses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.client import mtls_client
from trustmesh.tls import client_context

from ._gateway import gateway_identity, route, write_config
from ._server import free_port
from ._services import bundle_pem, issue
from .conftest import PASSPHRASE

SERVICE = "spiffe://example.org/svc/inventory"
ORDERS = "spiffe://example.org/svc/orders"
GATEWAY = "spiffe://example.org/gateway"

APP = """\
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def items(request):
    return JSONResponse({"caller": str(request.scope["trustmesh"].caller)})


app = Starlette(routes=[Route("/items", items)])
"""


def _json_lines(text: str) -> list[dict[str, object]]:
    entries = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n--- the whole output:\n{text}")
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


def _serve(
    argv: list[str],
    workdir: Path,
    call: Callable[[str], httpx.Response | None],
    *,
    env: dict[str, str] | None = None,
) -> tuple[list[dict[str, object]], httpx.Response | None]:
    """Start ``trustmesh ARGV --log-format json``, wait for its ready line, ``call`` it
    with the ready URL, SIGTERM it; its stdout and stderr as JSON entries."""
    out, err = workdir / "stdout.log", workdir / "stderr.log"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "trustmesh", *argv, "--log-format", "json"],
            cwd=workdir,
            env={**os.environ, **(env or {})},
            stdout=stdout,
            stderr=stderr,
            text=True,
        )
    try:
        deadline = time.monotonic() + 60
        ready: dict[str, object] | None = None
        while ready is None:
            assert process.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
            for line in err.read_text().splitlines():
                if '"event": "ready"' in line:
                    ready = json.loads(line)
        response = call(str(ready.get("url", "")))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, err.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return _json_lines(out.read_text()) + _json_lines(err.read_text()), response


def _loggers(entries: list[dict[str, object]]) -> set[object]:
    return {entry.get("logger") for entry in entries}


def _identity_dir(ca: CertificateAuthority, workdir: Path, spiffe_id: str) -> Path:
    return gateway_identity(ca, workdir, spiffe_id)


def _refused_without_certificate(ca: CertificateAuthority, url: str) -> None:
    with httpx.Client(verify=client_context(cadata=bundle_pem(ca)), timeout=5) as anonymous:
        with pytest.raises(httpx.TransportError):
            anonymous.get(f"{url}/items")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ca", "ca-ocsp", "idp"])
def test_ca_and_idp_serve_print_only_json(
    ca: CertificateAuthority, home: Path, tmp_path: Path, kind: str
) -> None:
    """`ca serve` (also with its plain-HTTP OCSP listener) and `idp serve`: uvicorn's
    lines, the revocation-URL hint and every ready line come through our JSON handler."""
    env = {"TRUSTMESH_HOME": str(home), "TRUSTMESH_CA_PASSPHRASE": PASSPHRASE.decode()}
    port = free_port()
    argv = [kind.split("-")[0], "serve", "--listen", f"127.0.0.1:{port}", "--log-level", "info"]
    if kind == "ca-ocsp":
        argv += ["--ocsp-listen", f"127.0.0.1:{free_port()}"]

    def call(_url: str) -> httpx.Response:
        with httpx.Client(verify=client_context(cadata=bundle_pem(ca)), timeout=10) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    return http.get(f"https://127.0.0.1:{port}/healthz")
                except httpx.TransportError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)

    entries, response = _serve(argv, tmp_path, call, env=env)
    assert response is not None
    assert response.status_code == 200
    assert "uvicorn.error" in _loggers(entries)
    assert any(str(e.get("msg")).startswith("Started server process") for e in entries)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_run_prints_only_json(ca: CertificateAuthority, tmp_path: Path, workers: int) -> None:
    """`trustmesh run` (one process and --workers 2): startup, an allowed mTLS request, a
    refused handshake and the shutdown are all JSON lines."""
    (tmp_path / "jsonapp.py").write_text(APP)
    cert_dir = _identity_dir(ca, tmp_path / "service", SERVICE)
    orders = issue(ca, ORDERS, tmp_path)
    port = free_port()
    argv = [
        *("run", "jsonapp:app", "--cert-dir", str(cert_dir)),
        *("--listen", f"127.0.0.1:{port}", "--no-policy", "--no-revocation"),
        *("--workers", str(workers), "--log-level", "info"),
    ]
    url = f"https://127.0.0.1:{port}"

    def call(_ready: str) -> httpx.Response:
        ctx = client_context(cadata=bundle_pem(ca), chain=orders.chain, key=orders.key)
        with mtls_client(ctx, expect_id=SERVICE, base_url=url, timeout=5) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    response = http.get("/items")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
        _refused_without_certificate(ca, url)
        time.sleep(0.3)  # the refusal's log line
        return response

    entries, response = _serve(argv, tmp_path, call)
    assert response is not None
    assert response.status_code == 200
    assert response.json()["caller"] == ORDERS
    assert "uvicorn.error" in _loggers(entries)
    assert any(e.get("event") == "tls_handshake_refused" for e in entries)
    assert any(e.get("event") == "run_started" for e in entries)


@pytest.mark.slow
def test_gateway_serve_prints_only_json(ca: CertificateAuthority, tmp_path: Path) -> None:
    """`gateway serve` with a metrics listener: every line is JSON."""
    cert_dir = _identity_dir(ca, tmp_path, GATEWAY)
    config = write_config(
        tmp_path / "gw.yaml",
        [route("/orders", [f"https://127.0.0.1:{free_port()}"], ORDERS)],
        listen=f"127.0.0.1:{free_port()}",
        check_revocation=False,
        metrics={"listen": f"127.0.0.1:{free_port()}"},
    )
    argv = ["gateway", "serve", "--config", str(config), "--cert-dir", str(cert_dir)]

    def call(url: str) -> httpx.Response:
        with httpx.Client(verify=client_context(cadata=bundle_pem(ca)), timeout=10) as http:
            return http.get(f"{url}/orders")

    entries, response = _serve([*argv, "--log-level", "info"], tmp_path, call)
    assert response is not None
    assert response.status_code >= 500
    assert any(e.get("event") == "ready" for e in entries)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["http", "tcp"])
def test_proxy_inbound_prints_only_json(
    ca: CertificateAuthority, tmp_path: Path, mode: str
) -> None:
    """`proxy inbound` (HTTP and TCP mode): every line is JSON, a refused handshake too."""
    cert_dir = _identity_dir(ca, tmp_path, SERVICE)
    port = free_port()
    argv = [
        *("proxy", "inbound", "--id", SERVICE, "--cert-dir", str(cert_dir)),
        *("--listen", f"127.0.0.1:{port}", "--to", f"127.0.0.1:{free_port()}"),
        *("--no-revocation", "--allow-id", ORDERS, "--log-level", "info"),
        *(("--http",) if mode == "http" else ()),
    ]
    url = f"https://127.0.0.1:{port}"

    def call(_ready: str) -> None:
        _refused_without_certificate(ca, url)
        time.sleep(0.3)

    entries, _ = _serve(argv, tmp_path, call)
    assert any(e.get("event") == "ready" for e in entries)
    assert any(e.get("level") == "warning" and "refused" in str(e.get("msg")) for e in entries)
