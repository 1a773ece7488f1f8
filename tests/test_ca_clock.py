"""Clocks: the back-dating of notBefore is configurable within 0-10 minutes (real CLI), and
a real `ca serve` warns in its log and on /readyz when a peer's Date header is skewed."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from trustmesh.authority import CertificateAuthority
from trustmesh.client import CAClient
from trustmesh.pki import dump_private_key, pem_certificates

from ._server import Server, running_server
from .conftest import PASSPHRASE
from .test_ca_server import make_csr

pytestmark = pytest.mark.slow


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", *args],
        env={
            **os.environ,
            "TRUSTMESH_HOME": str(home),
            "TRUSTMESH_CA_PASSPHRASE": PASSPHRASE.decode(),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("value", ["11m", "1h", "-5m", "soon"])
def test_init_refuses_backdating_out_of_range(tmp_path: Path, value: str) -> None:
    """`ca init --backdate` outside 0s-10m exits 2 with one line, writing no CA."""
    home = tmp_path / "home"
    result = cli(home, "ca", "init", "--trust-domain", "example.org", f"--backdate={value}")
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--backdate" in lines[0]
    assert "10m" in lines[0]
    assert not (home / "config.toml").exists()


def test_configured_backdating_is_used_and_a_bad_config_is_refused(tmp_path: Path) -> None:
    """`ca init --backdate 0s` writes config.toml and CA certificates without back-dating;
    a config.toml backdate over 10m stops every command with exit 2."""
    home = tmp_path / "home"
    before = datetime.now(UTC).replace(microsecond=0)
    created = cli(home, "ca", "init", "--trust-domain", "example.org", "--backdate", "0s")
    assert created.returncode == 0, created.stderr
    assert 'backdate = "0s"' in (home / "config.toml").read_text()
    root = x509.load_pem_x509_certificate((home / "root.pem").read_bytes())
    assert root.not_valid_before_utc >= before
    issued = cli(home, "issue", "spiffe://example.org/web", "--out", str(tmp_path / "web"))
    assert issued.returncode == 0, issued.stderr
    leaf = x509.load_pem_x509_certificate((tmp_path / "web" / "cert.pem").read_bytes())
    assert leaf.not_valid_before_utc >= before

    config = home / "config.toml"
    config.write_text(config.read_text().replace('backdate = "0s"', 'backdate = "1h"'))
    for argv in (("ca", "show"), ("ca", "serve", "--listen", "127.0.0.1:1")):
        refused = cli(home, *argv)
        assert refused.returncode == 2, refused
        assert refused.stderr.strip().count("\n") == 0, refused.stderr
        assert "backdate 1h is out of range" in refused.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`ca serve` for a CA made by `ca init --backdate 5m`."""
    root = tmp_path_factory.mktemp("clock")
    created = cli(root / "home", "ca", "init", "--trust-domain", "example.org", "--backdate", "5m")
    assert created.returncode == 0, created.stderr
    with running_server(root / "home", root) as running:
        yield running


def enroll_with_date(server: Server, name: str, date: datetime | None) -> httpx.Response:
    token = server.join_token(f"spiffe://example.org/{name}")
    _, csr = make_csr(f"spiffe://example.org/{name}")
    headers = {} if date is None else {"Date": format_datetime(date, usegmt=True)}
    ctx = ssl.create_default_context(cafile=str(server.bundle))
    with httpx.Client(base_url=server.url, verify=ctx, timeout=15) as http:
        return http.post("/v1/enroll", json={"token": token, "csr": csr}, headers=headers)


def skew_lines(server: Server) -> list[dict[str, object]]:
    log = server.home.parent / "serve.log"
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    return [e for e in lines if e.get("event") == "clock_skew"]


def test_certificates_are_backdated_as_configured(server: Server) -> None:
    """Leaves and the CA's own server certificate start 5 minutes before the CA's clock."""
    now = datetime.now(UTC)
    answer = enroll_with_date(server, "plain", None)
    assert answer.status_code == 201, answer.text
    leaf = x509.load_pem_x509_certificate(answer.json()["certificate"].encode())
    assert timedelta(minutes=4) < now - leaf.not_valid_before_utc < timedelta(minutes=6)
    ctx = ssl.create_default_context(cafile=str(server.bundle))
    port = int(server.url.rsplit(":", 1)[1])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    own = x509.load_der_x509_certificate(der)
    assert timedelta(minutes=4) < now - own.not_valid_before_utc < timedelta(minutes=6)


def test_skewed_peer_clocks_are_logged_and_shown_on_readyz(server: Server) -> None:
    """A Date header 10 min behind warns that certificates are not yet valid there; 3 min
    behind is covered by the back-dating; an accurate clock warns nothing."""
    before = len(skew_lines(server))
    assert enroll_with_date(server, "accurate", datetime.now(UTC)).status_code == 201
    time.sleep(0.3)
    assert len(skew_lines(server)) == before

    three = enroll_with_date(server, "three", datetime.now(UTC) - timedelta(minutes=3))
    assert three.status_code == 201, three.text
    ten = enroll_with_date(server, "ten", datetime.now(UTC) - timedelta(minutes=10))
    assert ten.status_code == 201, ten.text
    deadline = time.monotonic() + 10
    while len(skew_lines(server)) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    covered, late = skew_lines(server)[before:]
    assert covered["peer"] == "127.0.0.1"
    assert covered["route"] == "/v1/enroll"
    assert 175 <= int(str(covered["skew_seconds"])) <= 185
    assert "back-dating still covers it" in str(covered["msg"])
    assert 595 <= int(str(late["skew_seconds"])) <= 605
    assert "not yet valid there for up to" in str(late["msg"])
    assert "NTP" in str(late["msg"])

    ctx = ssl.create_default_context(cafile=str(server.bundle))
    ready = httpx.get(f"{server.url}/readyz", verify=ctx, timeout=10)
    assert ready.status_code == 200
    skew = ready.json()["clock_skew"]
    assert 595 <= skew["skew_seconds"] <= 605
    assert "NTP" in skew["warning"]


def test_the_ca_client_sends_its_clock(tmp_path: Path, ca: CertificateAuthority) -> None:
    """CAClient (the agent's client) sends a Date header the CA can compare with its clock."""
    issued = ca.issue("spiffe://example.org/fake-ca", dns=["localhost"])
    assert issued.key is not None
    (tmp_path / "chain.pem").write_bytes(pem_certificates(issued.chain))
    (tmp_path / "key.pem").write_bytes(dump_private_key(issued.key))
    (tmp_path / "bundle.pem").write_bytes(pem_certificates(ca.bundle))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[bytes] = []

    def serve_one() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            data = b""
            while b"\r\n\r\n" not in data:
                data += tls.recv(4096)
            seen.append(data)
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    with listener, CAClient(f"https://localhost:{port}", bundle=tmp_path / "bundle.pem") as client:
        assert client.bundle() == b"ok"
    thread.join(timeout=10)
    headers = dict(
        line.split(": ", 1) for line in seen[0].decode().split("\r\n")[1:] if ": " in line
    )
    date = {k.lower(): v for k, v in headers.items()}["date"]
    assert abs((datetime.now(UTC) - parsedate_to_datetime(date)).total_seconds()) < 5
