"""`trustmesh run MODULE:APP` started in the directory that holds the module, with no
--app-dir, imports it (as uvicorn and gunicorn do): one process, --workers, and the
gunicorn worker class. Each starts the installed console scripts (``.venv/bin/trustmesh``,
``.venv/bin/gunicorn``), not ``python -m``, which would put the directory on sys.path
itself, and answers a real mTLS request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.client import mtls_client
from trustmesh.files import atomic_write
from trustmesh.pki import dump_private_key, pem_certificates
from trustmesh.tls import client_context

from ._server import free_port
from ._services import bundle_pem, issue

SERVICE = "spiffe://example.org/svc/inventory"
ORDERS = "spiffe://example.org/svc/orders"
BIN = Path(sys.executable).parent

APP = """\
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def items(request):
    return JSONResponse({"caller": str(request.scope["trustmesh"].caller), "pid": os.getpid()})


app = Starlette(routes=[Route("/items", items)])
"""

# gunicorn serves the app as given: it wraps itself in the middleware (docs/services.md).
GUNICORN_APP = """\
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from trustmesh.middleware import MTLSMiddleware


async def items(request):
    return JSONResponse({"caller": str(request.scope["trustmesh"].caller)})


app = MTLSMiddleware(
    Starlette(routes=[Route("/items", items)]),
    trust_domain="example.org",
    policy=None,
    revocation=None,
)
"""


def _identity_dir(ca: CertificateAuthority, directory: Path) -> Path:
    directory.mkdir()
    issued = ca.issue(SERVICE, dns=["localhost"], ips=["127.0.0.1"], actor="test")
    assert issued.key is not None
    atomic_write(directory / "bundle.pem", pem_certificates(ca.bundle))
    atomic_write(directory / "key.pem", dump_private_key(issued.key), mode=0o600)
    atomic_write(directory / "chain.pem", pem_certificates(issued.chain))
    return directory


@contextmanager
def _started(
    argv: list[str], cwd: Path, log_path: Path, **env: str
) -> Iterator[subprocess.Popen[str]]:
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
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


def _get_items(
    ca: CertificateAuthority, workdir: Path, port: int, proc: subprocess.Popen[str], log: Path
) -> httpx.Response:
    orders = issue(ca, ORDERS, workdir)
    ctx = client_context(cadata=bundle_pem(ca), chain=orders.chain, key=orders.key)
    deadline = time.monotonic() + 30
    with mtls_client(
        ctx, expect_id=SERVICE, base_url=f"https://127.0.0.1:{port}", timeout=5
    ) as http:
        while True:
            try:
                return http.get("/items")
            except httpx.TransportError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_run_imports_the_app_from_the_current_directory(
    ca: CertificateAuthority, tmp_path: Path, workers: int
) -> None:
    """`trustmesh run svcapp:app` in the app's directory (no --app-dir) serves it over
    mTLS, in one process and with --workers 2; SIGTERM exits 0."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "cwdapp.py").write_text(APP)
    cert_dir = _identity_dir(ca, tmp_path / "certs")
    port, log_path = free_port(), tmp_path / "run.log"
    argv = [
        str(BIN / "trustmesh"),
        *("run", "cwdapp:app", "--cert-dir", str(cert_dir)),
        *("--listen", f"127.0.0.1:{port}", "--no-policy", "--no-revocation"),
        *("--workers", str(workers)),
    ]
    with _started(argv, app_dir, log_path) as proc:
        response = _get_items(ca, tmp_path, port, proc, log_path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    assert response.status_code == 200, response.text
    assert response.json()["caller"] == ORDERS
    if workers > 1:
        assert response.json()["pid"] != proc.pid


@pytest.mark.slow
def test_gunicorn_worker_imports_the_app_from_the_current_directory(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """gunicorn -k trustmesh.runner.gunicorn.TrustmeshWorker in the app's directory, with
    no --chdir, serves it over mTLS."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "cwdgapp.py").write_text(GUNICORN_APP)
    cert_dir = _identity_dir(ca, tmp_path / "certs")
    port, log_path = free_port(), tmp_path / "gunicorn.log"
    argv = [
        str(BIN / "gunicorn"),
        *("-k", "trustmesh.runner.gunicorn.TrustmeshWorker", "-w", "1"),
        *("-b", f"127.0.0.1:{port}", "--graceful-timeout", "5", "cwdgapp:app"),
    ]
    with _started(argv, app_dir, log_path, TRUSTMESH_CERT_DIR=str(cert_dir)) as proc:
        response = _get_items(ca, tmp_path, port, proc, log_path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    assert response.status_code == 200, response.text
    assert response.json()["caller"] == ORDERS
