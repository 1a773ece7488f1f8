"""`trustmesh run --id --token` (the agent in the process), `--workers`, and the gunicorn
worker class, as real processes against a real `ca serve`, over real mTLS."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.client import mtls_client
from trustmesh.pki import KeyType
from trustmesh.tls import client_context

from ._server import Server, free_port, running_server
from ._services import Identity, bundle_pem, issue
from .conftest import PASSPHRASE

SERVICE = "spiffe://example.org/svc/inventory"
ORDERS = "spiffe://example.org/svc/orders"

APP = """\
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def items(request):
    return JSONResponse({"caller": str(request.scope["trustmesh"].caller), "pid": os.getpid()})


app = Starlette(routes=[Route("/items", items)])
"""

# For gunicorn: the app wraps itself in the middleware (as docs/services.md shows).
GUNICORN_APP = """\
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from trustmesh.middleware import MTLSMiddleware


async def items(request):
    return JSONResponse({"caller": str(request.scope["trustmesh"].caller), "pid": os.getpid()})


app = MTLSMiddleware(
    Starlette(routes=[Route("/items", items)]),
    trust_domain="example.org",
    policy=None,
    revocation=None,
)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("runner-ca")
    CertificateAuthority.init(
        base / "home", trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    with running_server(base / "home", base) as running:
        yield running


def token_for(server: Server, spiffe_id: str, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["token", "create", spiffe_id, "--home", str(server.home)]) == 0
    return capsys.readouterr().out.strip()


def caller_identity(server: Server, workdir: Path) -> Identity:
    with server.ca() as ca:
        return issue(ca, ORDERS, workdir)


def spiffe_context(bundle: Path, who: Identity) -> ssl.SSLContext:
    """A client context that checks the server by SPIFFE ID only (``expect_id``): the
    agent asks for the URI SAN alone, so there is no hostname to match."""
    ctx = client_context(cafile=bundle, chain=who.chain, key=who.key)
    ctx.check_hostname = False
    return ctx


@contextmanager
def process(argv: list[str], log_path: Path, **env: str) -> Iterator[subprocess.Popen[str]]:
    """Run ``argv`` with its output in ``log_path``; kill it if the test leaves it running."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_argv(port: int, workdir: Path, *extra: str) -> list[str]:
    (workdir / "svcapp.py").write_text(APP)
    return [
        sys.executable,
        "-m",
        "trustmesh",
        "run",
        "svcapp:app",
        *("--listen", f"127.0.0.1:{port}", "--app-dir", str(workdir), "--log-level", "info"),
        *extra,
    ]


def first_response(
    proc: subprocess.Popen[str], http: httpx.Client, log_path: Path, path: str = "/items"
) -> httpx.Response:
    """GET ``path`` once the server answers (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return http.get(path)
        except httpx.TransportError:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)


def served_serial(response: httpx.Response) -> int:
    ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
    return x509.load_der_x509_certificate(ssl_object.getpeercert(True)).serial_number


def stop(proc: subprocess.Popen[str], log_path: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log_path.read_text()


def log_lines(log_path: Path) -> list[dict[str, object]]:
    lines = []
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


@pytest.mark.slow
def test_run_enrolls_with_a_join_token_and_renews_while_serving(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--id --ca --token: enrolled at start into a private temp dir, the caller seen by the
    app, a renewal (6 s certificates) presented to new connections, the dir removed at exit."""
    token = token_for(server, SERVICE, capsys)
    orders = caller_identity(server, tmp_path)
    port, log_path = free_port(), tmp_path / "run.log"
    argv = run_argv(
        port,
        tmp_path,
        *("--id", SERVICE, "--ca", server.url, "--bundle", str(server.bundle)),
        *("--ttl", "6s", "--no-policy"),
    )
    url = f"https://127.0.0.1:{port}"
    ctx = spiffe_context(server.bundle, orders)
    # The token comes from the environment, as `trustmesh agent` takes it.
    with process(argv, log_path, TRUSTMESH_JOIN_TOKEN=token) as proc:
        with mtls_client(ctx, expect_id=SERVICE, base_url=url, timeout=5) as http:
            first = first_response(proc, http, log_path)
            first_serial = served_serial(first)
        deadline = time.monotonic() + 25
        while True:
            with mtls_client(ctx, expect_id=SERVICE, base_url=url, timeout=5) as http:
                later = http.get("/items")
                later_serial = served_serial(later)
            if later_serial != first_serial or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        stop(proc, log_path)
    text = log_path.read_text()
    assert first.status_code == 200, first.text
    assert first.json()["caller"] == ORDERS
    assert later.status_code == 200
    assert later.json()["caller"] == ORDERS
    assert later_serial != first_serial, text
    messages = [str(entry["msg"]) for entry in log_lines(log_path)]
    enrolled = [m for m in messages if m.startswith(f"enrolled {SERVICE}")]
    assert enrolled, text
    assert any(m.startswith(f"renewed {SERVICE}") for m in messages), text
    found = re.search(r"files in ([^;\s]+)", enrolled[0])
    assert found is not None
    assert "trustmesh-run-" in found.group(1)
    assert not Path(found.group(1)).exists()  # the private temp dir is gone


@pytest.mark.slow
def test_run_reuses_a_valid_identity_in_cert_dir_and_refuses_a_used_token(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A spent token: exit 1 with the CA's reason on one line, nothing served. With a valid
    identity already in --cert-dir the same spent token is not needed: it is reused."""
    spiffe_id = "spiffe://example.org/svc/reuse"
    token = token_for(server, spiffe_id, capsys)
    cert_dir = tmp_path / "certs"
    assert (
        main(
            [
                *("agent", "--ca", server.url, "--id", spiffe_id, "--out", str(cert_dir)),
                *("--bundle", str(server.bundle), "--token", token, "--once"),
            ]
        )
        == 0
    )
    enrolled_serial = x509.load_pem_x509_certificate(
        (cert_dir / "cert.pem").read_bytes()
    ).serial_number
    spent = run_argv(
        free_port(),
        tmp_path,
        *("--id", spiffe_id, "--ca", server.url, "--bundle", str(server.bundle)),
        *("--token", token, "--no-policy"),
    )
    done = subprocess.run(spent, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    # JSON logs (the default): the closing error is a JSON line too.
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    errors = [entry for entry in lines if entry.get("event") == "exit_error"]
    assert len(errors) == 1, done.stderr
    assert "already used" in str(errors[0]["msg"])
    assert "on https://" not in done.stderr  # never served

    orders = caller_identity(server, tmp_path)
    port, log_path = free_port(), tmp_path / "reuse.log"
    argv = run_argv(
        port,
        tmp_path,
        *("--id", spiffe_id, "--ca", server.url, "--cert-dir", str(cert_dir)),
        *("--token", token, "--no-policy"),
    )
    ctx = spiffe_context(server.bundle, orders)
    with process(argv, log_path) as proc:
        with mtls_client(ctx, expect_id=spiffe_id, base_url=f"https://127.0.0.1:{port}") as http:
            response = first_response(proc, http, log_path)
            serial = served_serial(response)
        stop(proc, log_path)
    assert response.status_code == 200
    assert serial == enrolled_serial
    assert cert_dir.exists()  # a given --cert-dir is kept


@pytest.mark.slow
def test_a_failed_renewal_is_logged_and_retried_while_serving_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CA goes away mid-run: each failed renewal is logged with the retry, and the
    server keeps answering with its current certificate."""
    home = tmp_path / "ca-home"
    CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    port, log_path = free_port(), tmp_path / "down.log"
    url = f"https://127.0.0.1:{port}"
    with contextlib.ExitStack() as stack:  # the run process outlives the CA
        with running_server(home, tmp_path) as ca_server:
            token = token_for(ca_server, SERVICE, capsys)
            orders = caller_identity(ca_server, tmp_path)
            argv = run_argv(
                port,
                tmp_path,
                *("--id", SERVICE, "--ca", ca_server.url, "--bundle", str(ca_server.bundle)),
                *("--token", token, "--ttl", "20s", "--no-policy", "--no-revocation"),
            )
            ctx = spiffe_context(ca_server.bundle, orders)
            proc = stack.enter_context(process(argv, log_path))
            with mtls_client(ctx, expect_id=SERVICE, base_url=url, timeout=5) as http:
                first = first_response(proc, http, log_path)
        # The CA is stopped now.
        deadline = time.monotonic() + 30
        while f"Renewing {SERVICE} failed" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        with mtls_client(ctx, expect_id=SERVICE, base_url=url, timeout=5) as http:
            after = http.get("/items")
        stop(proc, log_path)
    assert first.status_code == 200
    assert after.status_code == 200
    assert after.json()["caller"] == ORDERS
    failures = [
        e for e in log_lines(log_path) if str(e["msg"]).startswith(f"Renewing {SERVICE} failed")
    ]
    assert failures, log_path.read_text()
    assert "retrying in" in str(failures[0]["msg"])
    assert failures[0]["level"] in ("warning", "error")


def test_run_refuses_inconsistent_identity_options_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["run", "svc:app", "--no-policy", "--no-revocation", "--app-dir", str(tmp_path)]
    cases = [
        ([*base, "--cert-dir", str(tmp_path), "--token", "t"], "--token needs --id"),
        ([*base, "--id", SERVICE, "--token", "t"], "--id needs --ca URL"),
        (base, "Give --cert-dir DIR"),
        (
            [
                *base,
                "--id",
                SERVICE,
                "--ca",
                "https://ca:8443",
                "--token",
                "t",
                "--token-file",
                "f",
            ],
            "not both",
        ),
        (  # checked before enrolling: no token is spent on a server that cannot start
            [*base[:2], "--id", SERVICE, "--ca", "https://127.0.0.1:9", "--token", "t"],
            "No --policy given",
        ),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err, err
        assert err.count("\n") == 1, err


@pytest.mark.slow
def test_run_with_two_workers_serves_from_both(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--workers 2 with the agent in the parent: two worker processes start, each with its
    own credentials and middleware, requests succeed, SIGTERM stops them all with status 0."""
    token = token_for(server, SERVICE, capsys)
    orders = caller_identity(server, tmp_path)
    port, log_path = free_port(), tmp_path / "workers.log"
    argv = run_argv(
        port,
        tmp_path,
        *("--id", SERVICE, "--ca", server.url, "--bundle", str(server.bundle)),
        *("--token", token, "--no-policy", "--workers", "2"),
    )
    ctx = spiffe_context(server.bundle, orders)
    url = f"https://127.0.0.1:{port}"
    with process(argv, log_path) as proc:
        with mtls_client(ctx, expect_id=SERVICE, base_url=url, timeout=5) as http:
            first = first_response(proc, http, log_path)
        deadline = time.monotonic() + 20
        while sum(1 for e in log_lines(log_path) if e.get("event") == "run_started") < 2:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        pids = set()
        for _ in range(20):
            with mtls_client(ctx, expect_id=SERVICE, base_url=url, timeout=5) as http:
                response = http.get("/items")
            assert response.status_code == 200
            assert response.json()["caller"] == ORDERS
            pids.add(response.json()["pid"])
        stop(proc, log_path)
    assert first.status_code == 200
    started = [e for e in log_lines(log_path) if e.get("event") == "workers_started"]
    assert len(started) == 1
    worker_pids = {int(p) for p in str(started[0]["msg"]).split(": ")[1].split()}
    assert len(worker_pids) == 2
    assert proc.pid not in worker_pids
    assert pids <= worker_pids
    assert pids  # at least one worker answered; the kernel picks which


@pytest.mark.slow
@pytest.mark.parametrize("source", ["certfile", "cert_dir"])
def test_gunicorn_worker_class_serves_mtls(
    ca: CertificateAuthority, tmp_path: Path, source: str
) -> None:
    """gunicorn -k trustmesh.runner.gunicorn.TrustmeshWorker: the caller's identity reaches
    the app through the middleware; a client without a certificate is refused."""
    service = issue(ca, SERVICE, tmp_path, dns=["localhost"], ips=["127.0.0.1"])
    orders = issue(ca, ORDERS, tmp_path)
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(bundle_pem(ca))
    (tmp_path / "gapp.py").write_text(GUNICORN_APP)
    port, log_path = free_port(), tmp_path / "gunicorn.log"
    argv = [
        *(sys.executable, "-m", "gunicorn", "-k", "trustmesh.runner.gunicorn.TrustmeshWorker"),
        *(
            "-b",
            f"127.0.0.1:{port}",
            "-w",
            "1",
            "--chdir",
            str(tmp_path),
            "--graceful-timeout",
            "5",
        ),
    ]
    env: dict[str, str] = {}
    if source == "certfile":
        argv += ["--certfile", str(service.chain), "--keyfile", str(service.key)]
        argv += ["--ca-certs", str(bundle)]
    else:
        cert_dir = tmp_path / "certs"
        cert_dir.mkdir()
        (cert_dir / "chain.pem").write_bytes(service.chain.read_bytes())
        (cert_dir / "key.pem").write_bytes(service.key.read_bytes())
        (cert_dir / "bundle.pem").write_bytes(bundle.read_bytes())
        env["TRUSTMESH_CERT_DIR"] = str(cert_dir)
    argv.append("gapp:app")
    ctx = client_context(cafile=bundle, chain=orders.chain, key=orders.key)
    url = f"https://127.0.0.1:{port}"
    with process(argv, log_path, **env) as proc:
        with mtls_client(ctx, expect_id=SERVICE, base_url=url, timeout=5) as http:
            response = first_response(proc, http, log_path)
            serial = served_serial(response)
        with httpx.Client(verify=client_context(cafile=bundle), timeout=5) as anonymous:
            with pytest.raises(httpx.TransportError):
                anonymous.get(f"{url}/items")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    assert response.status_code == 200, response.text
    assert response.json()["caller"] == ORDERS
    assert serial == service.serial
    assert response.json()["pid"] != proc.pid  # a gunicorn worker, not the arbiter


def test_gunicorn_worker_refuses_to_boot_without_tls(tmp_path: Path) -> None:
    (tmp_path / "gapp.py").write_text(GUNICORN_APP)
    argv = [
        *(sys.executable, "-m", "gunicorn", "-k", "trustmesh.runner.gunicorn.TrustmeshWorker"),
        *("-b", f"127.0.0.1:{free_port()}", "--chdir", str(tmp_path), "gapp:app"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRUSTMESH_CERT_DIR"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode != 0
    assert "TrustmeshWorker serves mTLS only" in done.stderr
