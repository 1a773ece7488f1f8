"""`POST /v1/renew` served from the HTTP protocol (ca_server/_direct.py) answers exactly
as the ASGI app does: one CA and one app behind two real uvicorn HTTPS listeners on
127.0.0.1, one with uvicorn's protocol (every request through ASGI), one with the
direct protocol, and raw TLS connections sending the same bytes to both."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httptools
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import create_engine, text
from starlette.responses import JSONResponse

from trustmesh.authority import CertificateAuthority
from trustmesh.ca_server import ServerSettings, create_app
from trustmesh.ca_server._direct import DirectProtocol, direct_protocol
from trustmesh.pki import KeyType, dump_private_key, pem_certificates, verify_chain
from trustmesh.serving import issue_server_identity, start_server, uvicorn_config
from trustmesh.store import normalize_url
from trustmesh.tls import TLSHttpToolsProtocol, server_context

from .conftest import PASSPHRASE

HOST = "127.0.0.1"
BODY_TIMEOUT = 0.5


@dataclass
class Pair:
    ca: CertificateAuthority
    asgi: int  # port of the listener with every request through ASGI
    direct: int  # port of the listener with the direct protocol
    protocol: type[DirectProtocol]
    roots: Path
    tmp: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def pg_module_url() -> Iterator[str]:
    base = os.environ.get("TRUSTMESH_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("TRUSTMESH_TEST_POSTGRES_URL is not set")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(normalize_url(base))
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp(f"direct-{request.param}")
    url = request.getfixturevalue("pg_module_url") if request.param == "postgres" else None
    ca = CertificateAuthority.init(
        tmp / "home",
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
        db_url=url,
    )
    chain, key = issue_server_identity(ca, HOST, tmp, path="/trustmesh/ca")
    roots = tmp / "roots.pem"
    roots.write_bytes(pem_certificates(ca.bundle))
    app = create_app(ca, ServerSettings(body_timeout=BODY_TIMEOUT))
    protocol = direct_protocol(app.state.direct)
    ports = _free_port(), _free_port()
    stop = threading.Event()
    started = threading.Event()
    failure: list[BaseException] = []

    def config(port: int, http: type, lifespan: str) -> uvicorn.Config:
        return uvicorn_config(
            app,
            host=HOST,
            port=port,
            http=http,
            loop="asyncio",
            ssl_certfile=str(chain),
            ssl_keyfile=str(key),
            ssl_context_factory=lambda _c, _d: server_context(
                chain, key, cadata=roots.read_text(), client_cert="optional"
            ),
            timeout_keep_alive=15,
            limit_concurrency=1000,
            log_level="warning",
            access_log=False,
            lifespan=lifespan,
            proxy_headers=False,
        )

    async def main() -> None:
        # One app, one loop: the lifespan (feed, thread pool) runs once, on the first.
        servers = [
            uvicorn.Server(config(ports[0], TLSHttpToolsProtocol, "on")),
            uvicorn.Server(config(ports[1], protocol, "off")),
        ]
        for server in servers:
            await start_server(server)
            assert server.started
        started.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        for server in reversed(servers):
            await server.shutdown()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # shown by the fixture
            failure.append(exc)
            started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30)
    assert not failure, failure
    try:
        yield Pair(ca, ports[0], ports[1], protocol, roots, tmp)
    finally:
        stop.set()
        thread.join(20)
        ca.close()


# -- a raw HTTP/1.1 client over TLS ---------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def comparable(self) -> tuple[int, list[tuple[str, str]], bytes]:
        """Everything but the date (which moves)."""
        return self.status, [(n, v) for n, v in self.headers if n != "date"], self.body

    def json(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.body)
        return data


class _Parser:
    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode().lower(), value.decode()))

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.answers.append(
            Answer(self.parser.get_status_code(), self.headers, b"".join(self.body))
        )
        self.headers, self.body = [], []
        self.parser = httptools.HttpResponseParser(self)


class Conn:
    """One TLS connection; ``identity`` (chain, key) is presented as client certificate."""

    def __init__(self, pair: Pair, port: int, identity: tuple[Path, Path] | None) -> None:
        ctx = ssl.create_default_context(cafile=str(pair.roots))
        if identity is not None:
            ctx.load_cert_chain(identity[0], identity[1])
        raw = socket.create_connection((HOST, port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname=HOST)
        self.parser = _Parser()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, count: int = 1) -> list[Answer]:
        while len(self.parser.answers) < count:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.parser.parser.feed_data(data)
        answers, self.parser.answers = self.parser.answers[:count], self.parser.answers[count:]
        return answers

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ssl.SSLError, OSError):
            return True

    def close(self) -> None:
        self.sock.close()


def request(body: bytes, *, path: str = "/v1/renew", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def both(pair: Pair, data: bytes, identity: tuple[Path, Path] | None) -> tuple[Answer, Answer]:
    """Send ``data`` on a new connection to each listener; their one answer each."""
    answers = []
    for port in (pair.asgi, pair.direct):
        conn = Conn(pair, port, identity)
        try:
            conn.send(data)
            answers.append(conn.read()[0])
        finally:
            conn.close()
    return answers[0], answers[1]


def identity(pair: Pair, name: str) -> tuple[tuple[Path, Path], str]:
    sid = f"spiffe://example.org/{name}-{uuid.uuid4().hex[:6]}"
    issued = pair.ca.issue(sid)
    assert issued.key is not None
    chain, key = pair.tmp / f"{sid[-6:]}-chain.pem", pair.tmp / f"{sid[-6:]}-key.pem"
    chain.write_bytes(pem_certificates(issued.chain))
    key.write_bytes(dump_private_key(issued.key))
    return (chain, key), sid


def presented_serial(ident: tuple[Path, Path]) -> str:
    leaf = x509.load_pem_x509_certificates(ident[0].read_bytes())[0]
    return format(leaf.serial_number, "x")


def csr(sid: str, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    pem = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid)]), critical=False
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    return json.dumps({"csr": pem}).encode()


def served_direct(pair: Pair) -> int:
    return pair.protocol.served


# -- tests ----------------------------------------------------------------------------


def test_success_answers_alike(pair: Pair) -> None:
    ident, sid = identity(pair, "ok")
    before = served_direct(pair)
    old, new = both(pair, request(csr(sid)), ident)
    assert served_direct(pair) == before + 1  # the second went the direct way
    assert old.status == new.status == 201
    # Same headers in the same order (the length follows the serial and signature).
    names = [n for n, _ in old.comparable()[1]]
    assert names == [n for n, _ in new.comparable()[1]]
    assert dict(new.headers)["content-type"] == "application/json"
    assert dict(new.headers)["content-length"] == str(len(new.body))
    for answer in (old, new):
        doc = answer.json()
        assert list(doc) == ["spiffe_id", "serial", "not_after", "certificate", "chain", "bundle"]
        assert answer.body == JSONResponse(doc).body  # the same rendering
        assert doc["spiffe_id"] == sid
        leaf = x509.load_pem_x509_certificate(str(doc["certificate"]).encode())
        chain = x509.load_pem_x509_certificates(str(doc["chain"]).encode())
        assert str(verify_chain(chain[0], chain[1:], pair.ca.bundle)) == sid
        assert leaf == chain[0]
    # Both recorded, each with its audit event.
    old_serial, new_serial = old.json()["serial"], new.json()["serial"]
    assert pair.ca.store.get_certificate(str(old_serial)).spiffe_id == sid
    assert pair.ca.store.get_certificate(str(new_serial)).spiffe_id == sid
    renewals = {e.subject for e in pair.ca.audit_tail(20) if e.action == "renew"}
    assert {old_serial, new_serial} <= renewals


def _same_refusal(old: Answer, new: Answer, status: int, reason: str | None) -> None:
    assert old.comparable() == new.comparable()
    assert new.status == status, new.body
    assert dict(new.headers)["content-type"] == "application/problem+json"
    if reason is not None:
        assert new.json().get("reason") == reason, new.body


def test_refusals_answer_alike(pair: Pair) -> None:
    ident, sid = identity(pair, "refused")
    other, other_sid = identity(pair, "victim")
    before = served_direct(pair)
    # No client certificate.
    _same_refusal(*both(pair, request(csr(sid)), None), 401, "no_client_certificate")
    # A CSR for another caller's identity.
    _same_refusal(*both(pair, request(csr(other_sid)), ident), 403, "identity_change")
    # Not a CSR; not JSON; no csr field.
    bad = json.dumps({"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"}).encode()
    old, new = both(pair, request(bad), ident)
    _same_refusal(old, new, 400, None)
    _same_refusal(*both(pair, request(b"{not json"), ident), 400, None)
    _same_refusal(*both(pair, request(b'{"ttl": "1h"}'), ident), 400, None)
    # A CSR signed with the caller's own key.
    own_key = serialization.load_pem_private_key(ident[1].read_bytes(), None)
    assert isinstance(own_key, ec.EllipticCurvePrivateKey)
    _same_refusal(*both(pair, request(csr(sid, own_key)), ident), 400, "same_key")
    # A bad ttl.
    body = json.dumps({"csr": json.loads(csr(sid))["csr"], "ttl": "forever"}).encode()
    _same_refusal(*both(pair, request(body), ident), 400, None)
    # Oversized: declared, and sent chunked without a length.
    huge = b'{"csr": "' + b"A" * (65 * 1024) + b'"}'
    _same_refusal(*both(pair, request(huge), ident), 413, None)
    chunked = (
        (
            f"POST /v1/renew HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n"
            f"{len(huge):x}\r\n"
        ).encode()
        + huge
        + b"\r\n0\r\n\r\n"
    )
    _same_refusal(*both(pair, chunked, ident), 413, None)
    # Revoked caller.
    pair.ca.revoke(presented_serial(other), reason="keyCompromise", actor="test")
    _same_refusal(*both(pair, request(csr(other_sid)), other), 403, "revoked")
    assert served_direct(pair) == before + 10


def test_slow_body_gets_408_alike(pair: Pair) -> None:
    ident, sid = identity(pair, "slow")
    body = csr(sid)
    answers = []
    for port in (pair.asgi, pair.direct):
        conn = Conn(pair, port, ident)
        try:
            conn.send(request(body)[: -len(body) + 5])  # the head and 5 bytes of body
            started = time.monotonic()
            answers.append(conn.read()[0])
            assert BODY_TIMEOUT * 0.8 <= time.monotonic() - started < BODY_TIMEOUT + 5
        finally:
            conn.close()
    _same_refusal(answers[0], answers[1], 408, None)
    assert f"within {BODY_TIMEOUT:g} s" in str(answers[1].json()["detail"])


def test_body_in_pieces_is_read_whole(pair: Pair) -> None:
    """A body that arrives after the head, in several writes, within the bound."""
    ident, sid = identity(pair, "pieces")
    data = request(csr(sid))
    conn = Conn(pair, pair.direct, ident)
    try:
        head_end = data.index(b"\r\n\r\n") + 4
        conn.send(data[:head_end])
        for i in range(head_end, len(data), 100):
            time.sleep(0.01)
            conn.send(data[i : i + 100])
        (answer,) = conn.read()
        assert answer.status == 201, answer.body
    finally:
        conn.close()


def test_keep_alive_then_revoked_on_the_same_connection(pair: Pair) -> None:
    ident, sid = identity(pair, "keep")
    conn = Conn(pair, pair.direct, ident)
    try:
        serials = []
        for _ in range(3):
            conn.send(request(csr(sid)))
            (answer,) = conn.read()
            assert answer.status == 201, answer.body
            assert "connection" not in dict(answer.headers)
            serials.append(answer.json()["serial"])
        assert len(set(serials)) == 3
        # Revoke the certificate this connection presents: the next renewal on the same
        # connection is refused (the chain cache never skips the revocation status).
        pair.ca.revoke(presented_serial(ident), reason="keyCompromise", actor="test")
        conn.send(request(csr(sid)))
        (answer,) = conn.read()
        assert answer.status == 403, answer.body
        assert answer.json()["reason"] == "revoked"
        # Other routes on the same connection still go through the ASGI app.
        conn.send(f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        (health,) = conn.read()
        assert health.status == 200
        assert health.json() == {"status": "ok"}
    finally:
        conn.close()


def test_pipelined_requests_answer_in_order(pair: Pair) -> None:
    ident, sid = identity(pair, "pipe")
    health = f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    conn = Conn(pair, pair.direct, ident)
    try:
        conn.send(request(csr(sid)) + health + request(b"{not json") + request(csr(sid)) + health)
        answers = conn.read(5)
        assert [a.status for a in answers] == [201, 200, 400, 201, 200], [a.body for a in answers]
        assert answers[0].json()["serial"] != answers[3].json()["serial"]
    finally:
        conn.close()


def test_connection_close_is_honoured(pair: Pair) -> None:
    ident, sid = identity(pair, "close")
    old, new = both(pair, request(csr(sid), extra="Connection: close\r\n"), ident)
    assert old.status == new.status == 201
    assert dict(new.headers)["connection"] == "close"
    conn = Conn(pair, pair.direct, ident)
    try:
        conn.send(request(b"{not json", extra="Connection: close\r\n"))
        (answer,) = conn.read()
        assert answer.status == 400
        assert conn.closed_by_server()
    finally:
        conn.close()


def test_metrics_count_direct_renewals(pair: Pair) -> None:
    ident, sid = identity(pair, "metrics")

    def scrape() -> str:
        conn = Conn(pair, pair.direct, ident)
        try:
            conn.send(f"GET /metrics HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            return conn.read()[0].body.decode()
        finally:
            conn.close()

    def value(text_: str, prefix: str) -> float:
        lines = [line for line in text_.splitlines() if line.startswith(prefix)]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    issued = 'trustmesh_ca_certificates_issued_total{kind="renew"}'
    timed = 'trustmesh_ca_request_seconds_count{method="POST",route="/v1/renew",status="201"}'
    before = scrape()
    conn = Conn(pair, pair.direct, ident)
    try:
        conn.send(request(csr(sid)))
        assert conn.read()[0].status == 201
    finally:
        conn.close()
    after = scrape()
    assert value(after, issued) == value(before, issued) + 1
    assert value(after, timed) == value(before, timed) + 1
