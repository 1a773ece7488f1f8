"""Refused TLS handshakes leave a log line with a meaningful reason on real `ca serve` and
`idp serve` processes (openssl s_client and stdlib ssl clients as peers)."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType, dump_private_key, pem_certificates
from trustmesh.tls import handshake_refusal_reason

from ._idp import running_idp
from ._server import running_server
from .conftest import PASSPHRASE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA (example.org) and a foreign CA's client identity, shared by the module."""
    root = tmp_path_factory.mktemp("handshakes")
    CertificateAuthority.init(
        root / "home", trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    with CertificateAuthority.init(
        root / "foreign", trust_domain="example.org", passphrase=b"another passphrase"
    ) as foreign:
        issued = foreign.issue("spiffe://example.org/web")
    assert issued.key is not None
    (root / "foreign-chain.pem").write_bytes(pem_certificates(issued.chain))
    (root / "foreign-key.pem").write_bytes(dump_private_key(issued.key))
    return root


@pytest.fixture(scope="module", params=["ca", "idp"])
def server(request: pytest.FixtureRequest, workdir: Path) -> Iterator[tuple[int, Path, Path]]:
    """A running `ca serve` or `idp serve`: (port, log file, trust bundle)."""
    directory = workdir / request.param
    directory.mkdir()
    if request.param == "ca":
        with running_server(workdir / "home", directory) as ca_server:
            port = int(ca_server.url.rsplit(":", 1)[1])
            yield port, directory / "serve.log", ca_server.bundle
    else:
        with running_idp(workdir / "home", directory, log_level="warning") as idp:
            port = int(idp.url.rsplit(":", 1)[1])
            yield port, idp.log, idp.bundle


def refusals(log: Path, count: int) -> list[dict[str, str]]:
    """The tls_handshake_refused lines of ``log`` (waits until ``count`` are there)."""
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
        found = [e for e in lines if e.get("event") == "tls_handshake_refused"]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_refused_handshakes_are_logged_with_reasons(
    server: tuple[int, Path, Path], workdir: Path
) -> None:
    """A foreign-CA certificate, TLS 1.1 and a hang-up mid-handshake each log their reason."""
    port, log, bundle = server
    before = len(refusals(log, 0))

    foreign = ssl.create_default_context(cafile=str(bundle))
    foreign.load_cert_chain(workdir / "foreign-chain.pem", workdir / "foreign-key.pem")

    def call_with_foreign_certificate() -> None:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            foreign.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            if not tls.recv(1):  # TLS 1.3 reports the refused certificate at the first read
                raise ConnectionError("closed")

    with pytest.raises((ssl.SSLError, ConnectionError)):
        call_with_foreign_certificate()

    old = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_1"],
        input="",
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert old.returncode != 0

    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then hang up

    found = refusals(log, before + 3)[before:]
    reasons = [e["reason"] for e in found]
    assert all(e["peer"].startswith("127.0.0.1:") for e in found), found
    assert "certificate_verify_failed: unable to get local issuer certificate" in reasons, reasons
    assert "unsupported_protocol" in reasons, reasons
    assert "connection_closed_during_handshake" in reasons, reasons
    assert "type" not in reasons, reasons


def test_client_without_certificate_completes_the_handshake(
    server: tuple[int, Path, Path],
) -> None:
    """Client certificates are optional on these servers: no certificate is no refusal."""
    port, log, bundle = server
    before = len(refusals(log, 0))
    ctx = ssl.create_default_context(cafile=str(bundle))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert tls.recv(64).startswith(b"HTTP/1.1 200")
    time.sleep(0.3)
    assert len(refusals(log, 0)) == before


def test_reason_of_the_class_asyncio_passes_on_eof() -> None:
    """asyncio hands over the ConnectionResetError class itself, which is not read as 'type'."""
    assert handshake_refusal_reason(ConnectionResetError) == "connection_closed_during_handshake"
    assert handshake_refusal_reason(ConnectionResetError()) == (
        "connection_closed_during_handshake"
    )
    assert handshake_refusal_reason(TimeoutError("slow")) == "TimeoutError: slow"
