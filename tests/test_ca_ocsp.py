"""The OCSP responder of a real `ca serve` never answers 5xx: several certificates in one
request, garbage bodies, bad GET paths and huge bodies (openssl ocsp and httpx as clients)."""

from __future__ import annotations

import base64
import socket
import sqlite3
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from trustmesh.authority import CertificateAuthority
from trustmesh.ca_server import MAX_BODY
from trustmesh.pki import KeyType

from ._server import Server, running_server
from .conftest import PASSPHRASE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """A `ca serve` and a directory holding two leaves (a.pem, b.pem) and issuer.pem."""
    root = tmp_path_factory.mktemp("ocsp")
    with CertificateAuthority.init(
        root / "home", trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ) as ca:
        for name in ("a", "b", "odd"):
            issued = ca.issue(f"spiffe://example.org/{name}")
            (root / f"{name}.pem").write_bytes(
                issued.certificate.public_bytes(serialization.Encoding.PEM)
            )
        (root / "issuer.pem").write_bytes(ca.intermediate.public_bytes(serialization.Encoding.PEM))
        odd = ca.store.find_certificates(spiffe_id="spiffe://example.org/odd")[0].serial
        ca.revoke(odd, reason="keyCompromise", actor="test")
    # A row no release writes (a hand-edited or damaged database): the answer cannot be built.
    with sqlite3.connect(root / "home" / "trustmesh.db") as db:
        db.execute("UPDATE certificates SET revocation_reason = 'bogus' WHERE serial = ?", (odd,))
    with running_server(root / "home", root) as server:
        yield server, root


def http(server: Server) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(server.bundle))
    return httpx.Client(base_url=server.url, verify=ctx, timeout=15)


def openssl_ocsp(server: Server, root: Path, *ask: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *("openssl", "ocsp", "-issuer", str(root / "issuer.pem"), *ask),
            *("-url", f"{server.url}/v1/ocsp", "-CAfile", str(server.bundle)),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def ocsp_status(response: httpx.Response) -> ocsp.OCSPResponseStatus:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/ocsp-response"
    return ocsp.load_der_ocsp_response(response.content).response_status


def test_openssl_asking_about_two_certificates_gets_malformed_request(
    served: tuple[Server, Path],
) -> None:
    """Two certificates (or two serials) in one request answer malformedRequest, not 500."""
    server, root = served
    both = openssl_ocsp(server, root, "-cert", str(root / "a.pem"), "-cert", str(root / "b.pem"))
    assert "malformedrequest" in (both.stdout + both.stderr).lower(), both
    serials = openssl_ocsp(server, root, "-serial", "0x1234", "-serial", "0x5678")
    assert "malformedrequest" in (serials.stdout + serials.stderr).lower(), serials
    md5 = openssl_ocsp(server, root, "-md5", "-serial", "0x1234")  # a hash we do not compute
    assert "malformedrequest" in (md5.stdout + md5.stderr).lower(), md5
    one = openssl_ocsp(server, root, "-cert", str(root / "a.pem"))
    assert "Response verify OK" in one.stdout + one.stderr, one
    assert f"{root / 'a.pem'}: good" in one.stdout
    assert "Traceback" not in (root / "serve.log").read_text()


def test_garbage_bodies_get_malformed_request(served: tuple[Server, Path]) -> None:
    """Bodies that are not an OCSP request answer an OCSP malformedRequest (RFC 6960 2.3)."""
    server, _ = served
    valid = (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(b"\x00" * 32, b"\x00" * 32, 7, hashes.SHA256())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    bodies = [
        b"",
        b"garbage",
        b"\x30\x03\x02\x01\x00",  # a DER SEQUENCE holding an INTEGER
        valid[:-3],  # truncated
        valid + b"\x00",  # trailing data
        bytes(range(256)) * 4,
    ]
    with http(server) as client:
        for body in bodies:
            response = client.post(
                "/v1/ocsp", content=body, headers={"content-type": "application/ocsp-request"}
            )
            assert ocsp_status(response) is ocsp.OCSPResponseStatus.MALFORMED_REQUEST, body
            assert response.headers["cache-control"] == "no-store"
        good = client.post("/v1/ocsp", content=valid)
        assert ocsp_status(good) is ocsp.OCSPResponseStatus.SUCCESSFUL


def test_get_with_bad_base64_is_never_a_server_error(served: tuple[Server, Path]) -> None:
    """A GET path that is not (or not quite) a base64 OCSP request answers 400 or malformed."""
    server, _ = served
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(b"\x00" * 32, b"\x00" * 32, 7, hashes.SHA256())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    encoded = base64.urlsafe_b64encode(request).decode().rstrip("=")
    paths = ["!!!!", "a", "abcde", "%E2%98%83", "%00%01", "AAAA", "-_-_" * 50, encoded[:-5]]
    with http(server) as client:
        for path in paths:
            response = client.get(f"/v1/ocsp/{path}")
            assert response.status_code in {200, 400}, (path, response.status_code)
            if response.status_code == 200:
                assert ocsp_status(response) is ocsp.OCSPResponseStatus.MALFORMED_REQUEST, path
            else:
                assert response.headers["content-type"] == "application/problem+json"
        assert ocsp_status(client.get(f"/v1/ocsp/{encoded}")) is (
            ocsp.OCSPResponseStatus.SUCCESSFUL
        )
        standard = base64.b64encode(request).decode()
        assert ocsp_status(client.get(f"/v1/ocsp/{standard}")) is (
            ocsp.OCSPResponseStatus.SUCCESSFUL
        )


def test_huge_bodies_and_paths_are_refused_without_a_server_error(
    served: tuple[Server, Path],
) -> None:
    """A body over the limit is a 413, declared or chunked; a huge GET path is no 5xx."""
    server, _ = served
    with http(server) as client:
        declared = client.post("/v1/ocsp", content=b"\x30" * (MAX_BODY + 1))
        assert declared.status_code == 413, declared.text

        def chunks() -> Iterator[bytes]:
            for _ in range(20):
                yield b"\x30" * 16384

        chunked = client.post("/v1/ocsp", content=chunks())
        assert chunked.status_code == 413, chunked.text
        too_long = client.get("/v1/ocsp/" + "A" * 9000)
        assert too_long.status_code == 414, too_long.text
        assert too_long.headers["content-type"] == "application/problem+json"
    # Longer than httpx sends: a raw TLS request line of 256 KiB.
    ctx = ssl.create_default_context(cafile=str(server.bundle))
    port = int(server.url.rsplit(":", 1)[1])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=15) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        path = "/v1/ocsp/" + "A" * (4 * MAX_BODY)
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        status_line = tls.recv(64)
    assert not status_line.startswith(b"HTTP/1.1 5"), status_line
    with http(server) as client:
        assert client.get("/healthz").status_code == 200


def test_unexpected_failure_answers_internal_error_and_logs(served: tuple[Server, Path]) -> None:
    """A failure nobody planned for is an OCSP internalError with an ERROR log line, not 500."""
    server, root = served
    answer = openssl_ocsp(server, root, "-cert", str(root / "odd.pem"))
    assert "internalerror" in (answer.stdout + answer.stderr).lower(), answer
    request = ocsp.load_der_ocsp_request(
        subprocess.run(
            [
                *("openssl", "ocsp", "-issuer", str(root / "issuer.pem")),
                *("-cert", str(root / "odd.pem"), "-no_nonce", "-reqout", "/dev/stdout"),
            ],
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
    )
    with http(server) as client:
        response = client.post("/v1/ocsp", content=request.public_bytes(serialization.Encoding.DER))
        assert ocsp_status(response) is ocsp.OCSPResponseStatus.INTERNAL_ERROR
        assert response.headers["cache-control"] == "no-store"
    log = (root / "serve.log").read_text()
    assert '"event": "ocsp_internal_error"' in log, log
    assert "KeyError" in log, log
