"""`trustmesh gateway serve` as a real process: listeners, the ready line, a provided
public certificate, the redirect listener, SIGTERM draining in-flight requests, and an
identity enrolled at a real `ca serve` whose revocation feed refuses a revoked upstream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.serving import issue_server_identity
from trustmesh.tls import client_context

from ._echo import Upstream
from ._gateway import gateway_identity, route, wait_for, write_config
from ._server import free_port
from ._services import bundle_pem, issue, serve_asgi

ORDERS = "spiffe://example.org/svc/orders"
READY = "trustmesh gateway: listening on "


@contextmanager
def gateway_process(
    config: Path, log: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start `python -m trustmesh gateway serve` and wait for its ready line."""
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "trustmesh", "gateway", "serve", "--config", str(config), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
    try:
        deadline = time.monotonic() + 60
        while READY not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        ready = next(e for e in _events(log) if e.get("event") == "ready")
        yield process, str(ready["url"])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _events(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.mark.slow
def test_serve_drains_on_sigterm_with_provided_certificate_and_redirect(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """The public listener presents the tls: certificate (verifiable by host name), the
    redirect listener answers 308, and SIGTERM lets an in-flight request finish before
    the process exits 0."""
    cert_dir = gateway_identity(ca, tmp_path)
    public_dir = tmp_path / "public"
    public_dir.mkdir()
    chain, key = issue_server_identity(ca, "127.0.0.1", public_dir, path="/public-web")
    upstream = Upstream("orders", delay=1.5)
    with serve_asgi(upstream, ca, issue(ca, ORDERS, tmp_path)) as url:
        port, redirect = free_port(), free_port()
        config = write_config(
            tmp_path / "gw.yaml",
            [route("/orders", [url], ORDERS)],
            listen=f"127.0.0.1:{port}",
            tls={"cert": str(chain), "key": str(key)},
            redirect_http=f"127.0.0.1:{redirect}",
            check_revocation=False,
        )
        log = tmp_path / "gateway.log"
        with gateway_process(config, log, "--cert-dir", str(cert_dir)) as (process, public):
            assert public == f"https://127.0.0.1:{port}"
            moved = httpx.get(f"http://127.0.0.1:{redirect}/orders?x=1", timeout=10)
            results: list[httpx.Response] = []
            ctx = client_context(cadata=bundle_pem(ca))  # checks the host name too

            def slow_call() -> None:
                with httpx.Client(verify=ctx, timeout=30) as http:
                    results.append(http.get(f"{public}/orders"))

            caller = threading.Thread(target=slow_call)
            caller.start()
            assert wait_for(lambda: bool(upstream.requests))
            process.send_signal(signal.SIGTERM)
            caller.join(30)
            assert process.wait(timeout=30) == 0, log.read_text()
    assert moved.status_code == 308
    assert moved.headers["location"] == f"https://127.0.0.1:{port}/orders?x=1"
    assert [r.status_code for r in results] == [201]
    events = {e.get("event") for e in _events(log)}
    assert {"gateway_started", "gateway_stopping", "gateway_stopped", "access"} <= events
    assert "upstream_revocation_off" in events


def test_serve_refuses_bad_input_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad file or no identity: one line on stderr and exit 2, before anything starts."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: 127.0.0.1:1\nroutes: []\ncheck_revocation: false\n")
    assert main(["gateway", "serve", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}:2: routes: needs at least one route"
    good = write_config(
        tmp_path / "gw.yaml", [route("/a", ["https://127.0.0.1:1"], ORDERS)], check_revocation=False
    )
    assert main(["gateway", "serve", "--config", str(good)]) == 2
    assert "The gateway has no identity" in capsys.readouterr().err
    no_id = write_config(
        tmp_path / "noid.yaml", [route("/a", ["https://127.0.0.1:1"], ORDERS)], id=None
    )
    assert main(["gateway", "serve", "--config", str(no_id), "--token", "t"]) == 2
    assert "--token needs 'id'" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_enrolls_with_a_token_and_follows_revocations(
    ca: CertificateAuthority, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--token enrolls the configured id at the real CA; the public listener then presents
    that identity (a warning says it names no host); the CA's revocation feed makes the
    gateway refuse an upstream once its certificate is revoked."""
    from trustmesh.client import CAClient

    from ._server import running_server

    orders_id = issue(ca, ORDERS, tmp_path)
    upstream = Upstream("orders")
    with running_server(home, tmp_path) as ca_server, serve_asgi(upstream, ca, orders_id) as url:
        capsys.readouterr()
        assert main(["token", "create", "spiffe://example.org/gateway", "--home", str(home)]) == 0
        token = capsys.readouterr().out.strip()
        port, metrics_port = free_port(), free_port()
        config = write_config(
            tmp_path / "gw.yaml",
            [route("/orders", [url], ORDERS)],
            listen=f"127.0.0.1:{port}",
            ca=ca_server.url,
            metrics={"listen": f"127.0.0.1:{metrics_port}"},
        )
        log = tmp_path / "gateway.log"
        cert_dir = tmp_path / "gw-id"
        args = ("--cert-dir", str(cert_dir), "--bundle", str(ca_server.bundle))
        with gateway_process(config, log, *args, env={"TRUSTMESH_JOIN_TOKEN": token}) as (
            process,
            public,
        ):
            ctx = client_context(cadata=bundle_pem(ca))
            ctx.check_hostname = False  # the workload certificate names no host
            with httpx.Client(verify=ctx, timeout=20) as http:
                before = http.get(f"{public}/orders")
                with CAClient(
                    ca_server.url, bundle=ca_server.bundle, cert=orders_id.chain, key=orders_id.key
                ) as api:
                    api.revoke(serial=format(orders_id.serial, "x"))
                assert wait_for(lambda: http.get(f"{public}/orders").status_code == 502)
                after = http.get(f"{public}/orders")
            metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, log.read_text()
    assert before.status_code == 201, before.text
    assert before.json()["caller"] == "spiffe://example.org/gateway"
    assert after.json()["reason"] == "upstream_unavailable"
    assert (cert_dir / "chain.pem").exists()
    assert "trustmesh_gateway_revocation_connected 1.0" in metrics
    assert "trustmesh_gateway_revocation_revoked 1.0" in metrics
    events = {e.get("event") for e in _events(log)}
    assert "public_certificate_no_hostname" in events
    assert "identity_enrolled" in events or any(
        "enroll" in str(e.get("event")) for e in _events(log)
    )
