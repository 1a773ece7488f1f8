"""Other runtimes use our exports unchanged: a Java HttpClient with the PKCS#12 keystore and
truststore (tests/peers/ReloadingClient.java), and a Node.js https client with the PEM
files, against a real mTLS server that reports the caller's verified SPIFFE ID."""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.demo import TinyServer
from trustmesh.pki import pem_certificates

from ._runtimes import PEERS, needs_java, needs_node, write_identity

PASSWORD = "store-password-123"


@pytest.fixture
def server(ca: CertificateAuthority, tmp_path: Path) -> Iterator[TinyServer]:
    ident = write_identity(
        ca.issue("spiffe://example.org/server", dns=["localhost"], ips=["127.0.0.1"]),
        tmp_path / "server",
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(ident / "chain.pem", ident / "key.pem")
    ctx.load_verify_locations(cadata=pem_certificates([ca.root, ca.intermediate]).decode())
    tiny = TinyServer(ctx, [ca.intermediate], [ca.root])
    yield tiny
    tiny.close()


def use_crl(server: TinyServer, ca: CertificateAuthority, tmp_path: Path) -> None:
    crl_file = tmp_path / "crl.pem"
    crl_file.write_bytes(ca.crl().public_bytes(serialization.Encoding.PEM))
    server.context.load_verify_locations(cafile=str(crl_file))
    server.context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def export_java_stores(ident: Path, tmp_path: Path, *, legacy: bool) -> tuple[Path, Path]:
    password_file = tmp_path / "p12.pass"
    password_file.write_text(PASSWORD + "\n")
    keystore, truststore = ident / "client.p12", tmp_path / "truststore.p12"
    extra = ["--legacy"] if legacy else []
    assert (
        main(
            [
                "export",
                "p12",
                "--cert",
                str(ident / "chain.pem"),
                "--key",
                str(ident / "key.pem"),
                "--out",
                str(keystore),
                "--password-file",
                str(password_file),
                *extra,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "export",
                "truststore",
                "--out",
                str(truststore),
                "--password-file",
                str(password_file),
            ]
        )
        == 0
    )
    return keystore, truststore


def run_java(
    server: TinyServer, keystore: Path, truststore: Path
) -> subprocess.CompletedProcess[str]:
    """One call of the Java client (a single-file source launch), stores from export."""
    return subprocess.run(
        [
            *("java", "-XX:TieredStopAtLevel=1", str(PEERS / "ReloadingClient.java")),
            f"https://localhost:{server.port}/whoami",
            *(str(keystore), str(truststore), str(truststore.parent / "p12.pass")),
        ],
        input="call\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def wait_for_outcome(server: TinyServer, outcome: str) -> list[str]:
    """The server records a refusal right after sending its alert: allow it a moment."""
    deadline = time.monotonic() + 5
    while outcome not in server.outcomes and time.monotonic() < deadline:
        time.sleep(0.01)
    return server.outcomes


@needs_java
@pytest.mark.parametrize("legacy", [False, True], ids=["aes256", "legacy-3des"])
def test_java_client_with_exported_keystore_is_identified(
    ca: CertificateAuthority, server: TinyServer, tmp_path: Path, legacy: bool
) -> None:
    ident = write_identity(ca.issue("spiffe://example.org/java-client"), tmp_path / "java")
    keystore, truststore = export_java_stores(ident, tmp_path, legacy=legacy)
    result = run_java(server, keystore, truststore)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '200 {"caller": "spiffe://example.org/java-client"}'


@needs_java
def test_revoked_java_client_is_refused_by_crl(
    ca: CertificateAuthority, server: TinyServer, tmp_path: Path
) -> None:
    issued = ca.issue("spiffe://example.org/java-client")
    ident = write_identity(issued, tmp_path / "java")
    keystore, truststore = export_java_stores(ident, tmp_path, legacy=False)
    ca.revoke(issued.record.serial, reason="keyCompromise")
    use_crl(server, ca, tmp_path)
    result = run_java(server, keystore, truststore)
    assert result.returncode != 0
    assert "refused: certificate revoked" in wait_for_outcome(
        server, "refused: certificate revoked"
    )


@needs_node
def test_node_client_with_pem_files_is_identified(
    ca: CertificateAuthority, server: TinyServer, tmp_path: Path
) -> None:
    ident = write_identity(ca.issue("spiffe://example.org/node-client"), tmp_path / "node")
    result = subprocess.run(
        [
            "node",
            str(PEERS / "mtls_client.js"),
            f"https://localhost:{server.port}/whoami",
            str(ident / "chain.pem"),
            str(ident / "key.pem"),
            str(ident / "bundle.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '200 {"caller": "spiffe://example.org/node-client"}'


@needs_node
def test_node_client_from_foreign_ca_is_refused(
    ca: CertificateAuthority, server: TinyServer, tmp_path: Path
) -> None:
    foreign = CertificateAuthority.init(
        tmp_path / "foreign", trust_domain="example.org", passphrase=b"another passphrase"
    )
    ident = write_identity(foreign.issue("spiffe://example.org/node-client"), tmp_path / "node")
    foreign.close()
    (ident / "bundle.pem").write_bytes(pem_certificates([ca.root]))  # it trusts our server
    result = subprocess.run(
        [
            "node",
            str(PEERS / "mtls_client.js"),
            f"https://localhost:{server.port}/whoami",
            str(ident / "chain.pem"),
            str(ident / "key.pem"),
            str(ident / "bundle.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    refusal = "refused: unable to get local issuer certificate"
    assert refusal in wait_for_outcome(server, refusal)


@pytest.mark.parametrize(
    ("page", "programs"),
    [
        ("nodejs.md", ["spiffe_server.js", "mtls_client.js"]),
        ("java.md", ["ReloadingClient.java"]),
    ],
)
def test_runtime_pages_show_the_tested_programs(page: str, programs: list[str]) -> None:
    """docs/runtimes shows the programs from tests/peers whole, as the tests run them."""
    text = (PEERS.parent.parent / "docs" / "runtimes" / page).read_text()
    for program in programs:
        assert (PEERS / program).read_text() in text, f"{page} does not show {program} as tested"
