"""The CA as a service: a real `trustmesh ca serve` process, real TLS, real peers
(curl, openssl ocsp) and httpx clients with and without client certificates."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.authority import CertificateAuthority
from trustmesh.ca_server import MAX_BODY
from trustmesh.pki import dump_private_key, pem_certificates

from ._server import ADMIN, Server, running_server


@pytest.fixture
def server(ca: CertificateAuthority, home: Path, tmp_path: Path) -> Iterator[Server]:
    with running_server(home, tmp_path) as running:
        yield running


def make_csr(spiffe_id: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "example.org")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def client(server: Server, identity: Path | None = None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(server.bundle))
    if identity is not None:
        ctx.load_cert_chain(identity / "chain.pem", identity / "key.pem")
    return httpx.Client(base_url=server.url, verify=ctx, timeout=10)


def save_identity(body: dict[str, Any], key: ec.EllipticCurvePrivateKey, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "chain.pem").write_text(body["chain"])
    (directory / "key.pem").write_bytes(dump_private_key(key))
    return directory


def enroll(server: Server, spiffe_id: str, directory: Path) -> tuple[Path, dict[str, Any]]:
    with server.ca() as ca:
        token = ca.create_join_token(spiffe_id)
    key, csr = make_csr(spiffe_id)
    with client(server) as http:
        response = http.post("/v1/enroll", json={"token": token, "csr": csr})
    assert response.status_code == 201, response.text
    body = response.json()
    return save_identity(body, key, directory), body


def assert_problem(
    response: httpx.Response, status: int, reason: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["title"]
    assert problem["detail"]
    if reason is not None:
        assert problem["reason"] == reason
    return problem


def test_health_ready_and_bundle(server: Server) -> None:
    with client(server) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json()["status"] == "ready"
        pem = http.get("/v1/bundle")
        assert pem.headers["content-type"] == "application/x-pem-file"
        assert pem.text.encode() == server.bundle.read_bytes()
        spiffe = http.get("/v1/bundle", params={"format": "spiffe"}).json()
        assert spiffe["keys"][0]["use"] == "x509-svid"
        assert spiffe["keys"][0]["kty"] == "EC"
        assert_problem(http.get("/v1/bundle", params={"format": "jks"}), 400)


def test_server_certificate_names_localhost_and_address(server: Server) -> None:
    with client(server) as http:
        http.get("/healthz")
    # curl verifies the host name against the certificate, for both spellings
    for host in ("127.0.0.1", "localhost"):
        url = server.url.replace("127.0.0.1", host)
        result = subprocess.run(
            ["curl", "-sS", "--cacert", str(server.bundle), f"{url}/healthz"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"status": "ok"}


def test_enroll_with_token_then_replay_is_refused(server: Server, tmp_path: Path) -> None:
    _identity, body = enroll(server, "spiffe://example.org/web", tmp_path / "web")
    assert body["spiffe_id"] == "spiffe://example.org/web"
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    assert format(cert.serial_number, "x") == body["serial"]
    with server.ca() as ca:
        token = ca.create_join_token("spiffe://example.org/api")
        before = ca.store.count_certificates()
    _, csr = make_csr("spiffe://example.org/api")
    with client(server) as http:
        assert http.post("/v1/enroll", json={"token": token, "csr": csr}).status_code == 201
        assert_problem(
            http.post("/v1/enroll", json={"token": token, "csr": csr}), 401, "token_used"
        )
    with server.ca() as ca:
        assert ca.store.count_certificates() == before + 1  # the replay issued nothing
        denial = ca.audit_tail(1)[0]  # ...and was audited with its reason
        assert (denial.action, denial.subject) == ("deny", "token_used")
        assert denial.details == {"route": "/v1/enroll", "reason": "token_used"}
        assert ca.verify_audit().ok


def test_enroll_refusals_issue_nothing(server: Server) -> None:
    with server.ca() as ca:
        other = ca.create_join_token("spiffe://example.org/other")
        expired = ca.create_join_token(
            "spiffe://example.org/web",
            ttl=timedelta(minutes=1),
            now=datetime.now(UTC) - timedelta(minutes=5),
        )
        before = ca.store.count_certificates()
    _, csr = make_csr("spiffe://example.org/web")
    with client(server) as http:
        assert_problem(
            http.post("/v1/enroll", json={"token": other, "csr": csr}), 403, "token_wrong_identity"
        )
        assert_problem(
            http.post("/v1/enroll", json={"token": expired, "csr": csr}), 401, "token_expired"
        )
        assert_problem(
            http.post("/v1/enroll", json={"token": "tmj_nope", "csr": csr}), 401, "token_unknown"
        )
        assert_problem(http.post("/v1/enroll", json={"token": other, "csr": "garbage"}), 400)
        assert_problem(http.post("/v1/enroll", content=b"{not json"), 400)
        assert_problem(http.post("/v1/enroll", json={"token": other}), 400)
        assert_problem(http.post("/v1/enroll", content=b"x" * (MAX_BODY + 1)), 413)
    with server.ca() as ca:
        assert ca.store.count_certificates() == before
        # the token refused for a mismatched ID still has its use
        _key, good_csr = make_csr("spiffe://example.org/other")
    with client(server) as http:
        assert http.post("/v1/enroll", json={"token": other, "csr": good_csr}).status_code == 201


def test_renew_over_mtls(server: Server, tmp_path: Path) -> None:
    identity, first = enroll(server, "spiffe://example.org/web", tmp_path / "web")
    _key, csr = make_csr("spiffe://example.org/web")
    with client(server, identity) as http:
        response = http.post("/v1/renew", json={"csr": csr})
    assert response.status_code == 201, response.text
    renewed = response.json()
    assert renewed["spiffe_id"] == first["spiffe_id"]
    assert renewed["serial"] != first["serial"]
    with server.ca() as ca:
        event = ca.audit_tail(1)[0]
        assert event.action == "renew"
        assert event.details["renews"] == first["serial"]


def test_renew_refusals(server: Server, tmp_path: Path) -> None:
    identity, first = enroll(server, "spiffe://example.org/web", tmp_path / "web")
    _, csr = make_csr("spiffe://example.org/web")
    _, other_csr = make_csr("spiffe://example.org/admin")
    with client(server) as http:  # no client certificate
        assert_problem(http.post("/v1/renew", json={"csr": csr}), 401, "no_client_certificate")
    with client(server, identity) as http:
        assert_problem(http.post("/v1/renew", json={"csr": other_csr}), 403, "identity_change")
    same_key_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://example.org/web")]
            ),
            critical=False,
        )
        .sign(
            serialization.load_pem_private_key((identity / "key.pem").read_bytes(), None),  # type: ignore[arg-type]
            hashes.SHA256(),
        )
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    with client(server, identity) as http:
        assert_problem(http.post("/v1/renew", json={"csr": same_key_csr}), 400, "same_key")
    with server.ca() as ca:
        ca.revoke(first["serial"], reason="keyCompromise")
    with client(server, identity) as http:
        assert_problem(http.post("/v1/renew", json={"csr": csr}), 403, "revoked")


def test_foreign_ca_client_cannot_renew(server: Server, tmp_path: Path) -> None:
    foreign = CertificateAuthority.init(
        tmp_path / "foreign", trust_domain="example.org", passphrase=b"other passphrase"
    )
    issued = foreign.issue("spiffe://example.org/web")
    foreign.close()
    directory = tmp_path / "foreign-id"
    directory.mkdir()
    (directory / "chain.pem").write_bytes(pem_certificates(issued.chain))
    assert issued.key is not None
    (directory / "key.pem").write_bytes(dump_private_key(issued.key))
    _, csr = make_csr("spiffe://example.org/web")
    with client(server, directory) as http, pytest.raises(httpx.TransportError):
        http.post("/v1/renew", json={"csr": csr})  # the TLS layer refuses the chain


def test_revoke_by_holder_admin_and_not_by_others(server: Server, tmp_path: Path) -> None:
    web, web_body = enroll(server, "spiffe://example.org/web", tmp_path / "web")
    _api, api_body = enroll(server, "spiffe://example.org/api", tmp_path / "api")
    admin, _ = enroll(server, ADMIN, tmp_path / "admin")
    with client(server, web) as http:
        problem = assert_problem(
            http.post("/v1/revoke", json={"serial": api_body["serial"]}), 403, "not_owner"
        )
        assert ADMIN in problem["detail"]
    with client(server, admin) as http:
        response = http.post(
            "/v1/revoke", json={"serial": api_body["serial"], "reason": "superseded"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["revoked"][0]["revocation_reason"] == "superseded"
    with client(server, web) as http:
        response = http.post(
            "/v1/revoke", json={"serial": web_body["serial"], "reason": "keyCompromise"}
        )
        assert response.status_code == 200, response.text
    # revoked: the holder's next call is refused
    with client(server, web) as http:
        assert_problem(http.post("/v1/revoke", json={"serial": web_body["serial"]}), 403, "revoked")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_ocsp_and_crl_against_the_responder(server: Server, tmp_path: Path) -> None:
    identity, body = enroll(server, "spiffe://example.org/web", tmp_path / "web")
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(body["certificate"])
    issuer = tmp_path / "issuer.pem"
    issuer.write_bytes(
        x509.load_pem_x509_certificates(body["chain"].encode())[1].public_bytes(
            serialization.Encoding.PEM
        )
    )

    def ocsp_status() -> str:
        result = subprocess.run(
            [
                "openssl",
                "ocsp",
                "-issuer",
                str(issuer),
                "-cert",
                str(leaf),
                "-url",
                f"{server.url}/v1/ocsp",
                "-CAfile",
                str(server.bundle),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert "Response verify OK" in result.stderr + result.stdout, result.stderr
        return result.stdout

    assert f"{leaf}: good" in ocsp_status()
    with client(server, identity) as http:
        http.post("/v1/revoke", json={"serial": body["serial"], "reason": "keyCompromise"})
    status = ocsp_status()
    assert f"{leaf}: revoked" in status
    assert "keyCompromise" in status
    with client(server) as http:
        response = http.get("/v1/crl")
        assert response.headers["content-type"] == "application/pkix-crl"
        crl = x509.load_der_x509_crl(response.content)
        assert crl.get_revoked_certificate_by_serial_number(int(body["serial"], 16)) is not None
        etag = response.headers["etag"]
        assert http.get("/v1/crl", headers={"If-None-Match": etag}).status_code == 304


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_enrolls_and_renews(server: Server, tmp_path: Path) -> None:
    with server.ca() as ca:
        token = ca.create_join_token("spiffe://example.org/curl")
    key, csr = make_csr("spiffe://example.org/curl")
    request = tmp_path / "enroll.json"
    request.write_text(json.dumps({"token": token, "csr": csr}))
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail-with-body",
            "--cacert",
            str(server.bundle),
            "-H",
            "content-type: application/json",
            "--data",
            f"@{request}",
            f"{server.url}/v1/enroll",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    identity = save_identity(json.loads(result.stdout), key, tmp_path / "curl")
    _, new_csr = make_csr("spiffe://example.org/curl")
    request.write_text(json.dumps({"csr": new_csr}))
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail-with-body",
            "--cacert",
            str(server.bundle),
            "--cert",
            str(identity / "chain.pem"),
            "--key",
            str(identity / "key.pem"),
            "-H",
            "content-type: application/json",
            "--data",
            f"@{request}",
            f"{server.url}/v1/renew",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["spiffe_id"] == "spiffe://example.org/curl"


def test_port_in_use_exits_1_and_sigterm_exits_0(server: Server) -> None:
    """A second `ca serve` on a taken port says what to change and never says it is
    listening; SIGTERM is a clean stop."""
    port = server.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "trustmesh", "ca", "serve", "--listen", f"127.0.0.1:{port}"],
        env={**os.environ, "TRUSTMESH_HOME": str(server.home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "The CA API could not start" in result.stderr
    assert "port in use" in result.stderr
    # nothing announced it as listening (a script waiting for "ready" would go on)
    assert "listening on" not in result.stderr
    server.process.terminate()
    assert server.process.wait(timeout=20) == 0
