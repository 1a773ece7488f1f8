"""Java and curl natively in the mesh: `trustmesh agent --pkcs12 --truststore` (against a real
`ca serve`) writes the stores, keytool and openssl read them, a plain Java HttpClient calls a
service under `trustmesh run` with them (and keeps working across a renewal, reloading the
stores), and curl calls the same service with the agent's PEM files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import pkcs12

from trustmesh.cli import main

from ._runtimes import (
    PEERS,
    Service,
    compile_java,
    needs_java,
    peer,
    run_tool,
    running_service,
    serial_of,
    write_identity,
)
from ._server import Server, new_ca_server

SERVICE = "spiffe://example.org/svc/inventory"
PASSWORD = "store-password-123"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with new_ca_server(tmp_path_factory.mktemp("java-ca")) as running:
        yield running


@pytest.fixture(scope="module")
def service(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The whoami app under `trustmesh run`, with a certificate that names its hosts
    (Java and curl check host names), revocation from the CA's feed."""
    workdir = tmp_path_factory.mktemp("java-service")
    with server.ca() as ca:
        issued = ca.issue(
            SERVICE, dns=["localhost", "inventory.internal"], ips=["127.0.0.1"], actor="test"
        )
    certs = write_identity(issued, workdir / "certs")
    with running_service(
        workdir, "--cert-dir", str(certs), "--no-policy", "--ca", server.url
    ) as running:
        yield running


@pytest.fixture(scope="module")
def java_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_java(PEERS / "ReloadingClient.java", tmp_path_factory.mktemp("java-classes"))


def agent_with_stores(
    server: Server, spiffe_id: str, workdir: Path, *extra: str
) -> tuple[Path, Path, Path, list[str]]:
    """Enroll ``spiffe_id`` with `trustmesh agent --once --pkcs12 --truststore`; return the
    identity directory, keystore, truststore and the command line (for renewals)."""
    out = workdir / "id"  # the stores go beside the PEM files, before the directory exists
    keystore, truststore = out / "app.p12", out / "truststore.p12"
    password = workdir / "store.pass"
    password.write_text(PASSWORD + "\n")
    argv = server.agent(
        spiffe_id,
        out,
        *("--bundle", str(server.bundle), "--once"),
        *("--pkcs12", str(keystore), "--truststore", str(truststore)),
        *("--store-password-file", str(password), *extra),
    )
    assert main([*argv, "--token", server.join_token(spiffe_id)]) == 0
    return out, keystore, truststore, argv


def keystore_serial(keystore: Path) -> str:
    held = pkcs12.load_pkcs12(keystore.read_bytes(), PASSWORD.encode()).cert
    assert held is not None
    return format(held.certificate.serial_number, "x")


def keytool_list(store: Path, workdir: Path) -> str:
    listed = run_tool(
        *("keytool", "-list", "-storetype", "PKCS12", "-keystore", str(store)),
        "-storepass:file",
        str(workdir / "store.pass"),
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return listed.stdout


def openssl_info(store: Path, workdir: Path, *extra: str) -> str:
    shown = run_tool(
        *("openssl", "pkcs12", "-info", "-noout", "-in", str(store), *extra),
        *("-passin", f"file:{workdir / 'store.pass'}"),
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    return shown.stdout + shown.stderr


def java_client(
    java_classes: Path, service: Service, keystore: Path, truststore: Path, workdir: Path
) -> list[str]:
    return [
        *("java", "-XX:TieredStopAtLevel=1", "-cp", str(java_classes), "ReloadingClient"),
        service.url("localhost"),
        *(str(keystore), str(truststore), str(workdir / "store.pass")),
    ]


def whoami(line: str) -> tuple[int, dict[str, str]]:
    status, _, body = line.partition(" ")
    return int(status), json.loads(body)


@needs_java
def test_java_client_with_agent_stores_calls_a_service_across_a_renewal(
    server: Server, service: Service, java_classes: Path, tmp_path: Path
) -> None:
    """keytool lists both stores; the Java client's calls reach the service as its SPIFFE ID;
    after `agent --once --renew-now` the keystore holds the new certificate and the same
    running client presents it on its next call."""
    client_id = "spiffe://example.org/java/billing"
    out, keystore, truststore, argv = agent_with_stores(server, client_id, tmp_path)
    keys = keytool_list(keystore, tmp_path)
    assert "Keystore type: PKCS12" in keys
    assert "Your keystore contains 1 entry" in keys
    assert "trustmesh, " in keys
    assert "PrivateKeyEntry" in keys
    trust = keytool_list(truststore, tmp_path)
    assert "Keystore type: PKCS12" in trust
    assert "Your keystore contains 1 entry" in trust
    assert "trustmesh-ca-0, " in trust
    assert "trustedCertEntry" in trust
    info = openssl_info(keystore, tmp_path)
    assert "PBES2, PBKDF2, AES-256-CBC" in info
    assert "MAC: sha256" in info
    first = serial_of(out / "cert.pem")
    assert keystore_serial(keystore) == first

    with peer(
        java_client(java_classes, service, keystore, truststore, tmp_path), stdin=True
    ) as java:
        java.send("call")
        before = whoami(java.expect("", timeout=120))
        assert main([*argv, "--renew-now"]) == 0
        second = serial_of(out / "cert.pem")
        java.send("call")
        after = whoami(java.expect("", timeout=120))
    assert before == (200, {"caller": client_id, "serial": first})
    assert second != first
    assert keystore_serial(keystore) == second
    assert after == (200, {"caller": client_id, "serial": second})


@needs_java
def test_legacy_stores_load_in_keytool_openssl_and_java(
    server: Server, service: Service, java_classes: Path, tmp_path: Path
) -> None:
    """--pkcs12-legacy writes 3DES/SHA-1 stores: OpenSSL needs its legacy provider for them,
    keytool lists them, and the Java client is identified with them."""
    client_id = "spiffe://example.org/java/legacy"
    _, keystore, truststore, _ = agent_with_stores(server, client_id, tmp_path, "--pkcs12-legacy")
    info = openssl_info(keystore, tmp_path, "-legacy")
    assert "pbeWithSHA1And3-KeyTripleDES-CBC" in info
    assert "MAC: sha1" in info
    assert "trustedCertEntry" in keytool_list(truststore, tmp_path)
    assert "PrivateKeyEntry" in keytool_list(keystore, tmp_path)
    with peer(
        java_client(java_classes, service, keystore, truststore, tmp_path), stdin=True
    ) as java:
        java.send("call")
        status, body = whoami(java.expect("", timeout=120))
    assert status == 200
    assert body["caller"] == client_id


def test_curl_with_agent_pem_files_calls_the_service(
    server: Server, service: Service, tmp_path: Path
) -> None:
    """curl presents chain.pem and key.pem and trusts bundle.pem: by IP (the certificate names
    127.0.0.1) and by a DNS name the service certificate carries, via --resolve."""
    client_id = "spiffe://example.org/curl/ops"
    out = tmp_path / "id"
    argv = server.agent(client_id, out, "--bundle", str(server.bundle), "--once")
    assert main([*argv, "--token", server.join_token(client_id)]) == 0
    files = [
        *("--cert", str(out / "chain.pem"), "--key", str(out / "key.pem")),
        *("--cacert", str(out / "bundle.pem")),
    ]
    by_ip = run_tool("curl", "--silent", "--show-error", *files, service.url())
    named = f"inventory.internal:{service.port}:127.0.0.1"
    by_name = run_tool(
        "curl",
        *("--silent", "--show-error", *files, "--resolve", named),
        service.url("inventory.internal"),
    )
    anonymous = run_tool(
        "curl", "--silent", "--show-error", "--cacert", str(out / "bundle.pem"), service.url()
    )
    serial = serial_of(out / "cert.pem")
    assert by_ip.returncode == 0, by_ip.stderr
    assert json.loads(by_ip.stdout) == {"caller": client_id, "serial": serial}
    assert by_name.returncode == 0, by_name.stderr
    assert json.loads(by_name.stdout)["caller"] == client_id
    assert anonymous.returncode != 0  # no client certificate: the handshake is refused
