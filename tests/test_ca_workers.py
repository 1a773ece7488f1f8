"""`ca serve --workers 2`: real worker processes sharing one port and one store, on
SQLite and (with TRUSTMESH_TEST_POSTGRES_URL) PostgreSQL.

Which worker serves a connection is read from the kernel (/proc/net/tcp and the
workers' file descriptors), so each test knows it crossed from one worker to the other.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import create_engine, text

from trustmesh.authority import CertificateAuthority
from trustmesh.errors import CertificateExpiredError, CertificateRevokedError
from trustmesh.pki import KeyType, dump_private_key, pem_certificates
from trustmesh.store import normalize_url

from ._server import ADMIN, Server, running_server
from .conftest import PASSPHRASE

pytestmark = pytest.mark.slow


# -- which worker holds a connection --------------------------------------------------


def workers_of(pid: int) -> list[int]:
    """The child processes (workers) of the supervisor ``pid``."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def _inode(server_port: int, client_port: int) -> str | None:
    want_local = f"0100007F:{server_port:04X}"
    want_remote = f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want_local and fields[2] == want_remote:
            return fields[9]
    return None


def worker_serving(server: Server, client_port: int) -> int:
    """The worker pid whose socket is the server end of the connection from ``client_port``."""
    server_port = int(server.url.rsplit(":", 1)[1])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        inode = _inode(server_port, client_port)
        if inode is not None:
            target = f"socket:[{inode}]"
            for pid in workers_of(server.process.pid):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    try:
                        if os.readlink(fd) == target:
                            return pid
                    except OSError:
                        continue
        time.sleep(0.05)
    raise AssertionError(f"no worker holds the connection from port {client_port}")


# -- a keep-alive client whose connection we can place -------------------------------


_OPEN: list[Conn] = []


@pytest.fixture(autouse=True)
def _close_connections() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


class Conn:
    """One kept-alive HTTPS connection (http.client), optionally with a client identity;
    closed after the test at the latest."""

    def __init__(self, server: Server, identity: Path | None = None) -> None:
        _OPEN.append(self)
        ctx = ssl.create_default_context(cafile=str(server.bundle))
        if identity is not None:
            ctx.load_cert_chain(identity / "chain.pem", identity / "key.pem")
        port = int(server.url.rsplit(":", 1)[1])
        self.http = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
        self.http.connect()
        # TLS 1.3 sends the session tickets after the handshake: one request settles it.
        assert self.get("/healthz")[0] == 200
        self.worker = worker_serving(server, self.http.sock.getsockname()[1])

    def request(self, method: str, path: str, doc: Any = None) -> tuple[int, Any]:
        body = None if doc is None else json.dumps(doc).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        self.http.request(method, path, body=body, headers=headers)
        response = self.http.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def post(self, path: str, doc: Any) -> tuple[int, Any]:
        return self.request("POST", path, doc)

    def close(self) -> None:
        self.http.close()


def conn_on(server: Server, worker: int, identity: Path | None = None) -> Conn:
    """A connection that the kernel handed to ``worker`` (new connections until one is)."""
    for _ in range(60):
        conn = Conn(server, identity)
        if conn.worker == worker:
            return conn
        conn.close()
    raise AssertionError(f"no connection reached worker {worker} in 60 tries")


# -- identities -----------------------------------------------------------------------


def make_csr(spiffe_id: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def save(answer: dict[str, Any], key: ec.EllipticCurvePrivateKey, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "chain.pem").write_text(answer["chain"])
    (directory / "key.pem").write_bytes(dump_private_key(key))
    return directory


def issue(server: Server, spiffe_id: str, directory: Path) -> tuple[Path, str]:
    with server.ca() as ca:
        issued = ca.issue(spiffe_id, actor="test")
    assert issued.key is not None
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "chain.pem").write_bytes(pem_certificates(issued.chain))
    (directory / "key.pem").write_bytes(dump_private_key(issued.key))
    return directory, issued.record.serial


def renew(conn: Conn, spiffe_id: str) -> tuple[int, Any, ec.EllipticCurvePrivateKey]:
    key, csr = make_csr(spiffe_id)
    status, answer = conn.post("/v1/renew", {"csr": csr})
    return status, answer, key


# -- servers --------------------------------------------------------------------------


@dataclass
class Served:
    server: Server
    workers: list[int]
    tmp: Path


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


def _start(tmp: Path, db_url: str | None) -> Generator[Served, None, None]:
    home = tmp / "home"
    CertificateAuthority.init(
        home,
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
        db_url=db_url,
    ).close()
    with running_server(home, tmp, extra_args=("--workers", "2")) as server:
        deadline = time.monotonic() + 10
        while len(workers_of(server.process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield Served(server, workers_of(server.process.pid), tmp)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp(f"workers-{request.param}")
    url = request.getfixturevalue("pg_module_url") if request.param == "postgres" else None
    yield from _start(tmp, url)


# -- tests ----------------------------------------------------------------------------


def test_two_workers_serve(served: Served) -> None:
    """`--workers 2` runs two worker processes under the supervisor that was started."""
    assert len(served.workers) == 2
    assert served.server.process.pid not in served.workers


def test_enroll_renew_revoke_through_different_workers(served: Served) -> None:
    """An identity enrolled through one worker renews through the other, is revoked
    through the first, and the second then refuses to renew it."""
    server, (a, b) = served.server, served.workers
    sid = f"spiffe://example.org/svc/cross-{uuid.uuid4().hex[:6]}"
    token = server.join_token(sid)
    key, csr = make_csr(sid)
    anonymous = conn_on(server, a)
    status, enrolled = anonymous.post("/v1/enroll", {"token": token, "csr": csr})
    assert status == 201, enrolled
    first = save(enrolled, key, served.tmp / f"{sid[-6:]}-1")

    on_b = conn_on(server, b, first)
    status, renewed, key2 = renew(on_b, sid)
    assert status == 201, renewed
    assert renewed["spiffe_id"] == sid
    second = save(renewed, key2, served.tmp / f"{sid[-6:]}-2")

    on_a = conn_on(server, a, second)
    status, revoked = on_a.post("/v1/revoke", {"serial": enrolled["serial"]})
    assert status == 200, revoked
    assert [r["serial"] for r in revoked["revoked"]] == [enrolled["serial"]]

    status, refused, _ = renew(conn_on(server, b, first), sid)
    assert status == 403, refused
    assert refused["reason"] == "revoked"
    for conn in (anonymous, on_b, on_a):
        conn.close()


class StreamReader:
    """Reads a revocation SSE stream on its own connection in a thread."""

    def __init__(self, conn: Conn, since: int) -> None:
        self.conn = conn
        self.events: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        conn.http.request("GET", f"/v1/revocations/stream?since={since}")
        self.response = conn.http.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("content-type", "").startswith("text/event-stream")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        # Unblocks the reader thread's recv first (closing alone would wait for it).
        self.conn.http.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        self.thread.join(5)

    def _run(self) -> None:
        data = None
        try:
            while True:
                line = self.response.readline()
                if not line:
                    return
                text_line = line.decode().rstrip("\n")
                if text_line.startswith("data: "):
                    data = json.loads(text_line[6:])
                elif text_line == "" and data is not None:
                    self.events.put((time.monotonic(), data))
                    data = None
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            # the test closed the connection
            return


def test_revocation_through_one_worker_reaches_stream_on_other(served: Served) -> None:
    """A revocation made through one worker reaches an SSE subscriber of the other
    within a second (SQLite: each worker polls the store's cursor), and `?since=` on
    that worker lists it."""
    server, (a, b) = served.server, served.workers
    admin, _ = issue(server, ADMIN, served.tmp / "admin-feed")
    reader, _ = issue(server, "spiffe://example.org/feed/reader", served.tmp / "reader")
    targets = [
        issue(server, f"spiffe://example.org/feed/t{i}", served.tmp / f"feed-t{i}")[1]
        for i in range(3)
    ]
    on_b = conn_on(server, b, reader)
    status, page = on_b.get("/v1/revocations?since=0")
    assert status == 200
    cursor = page["cursor"]
    stream = StreamReader(conn_on(server, b, reader), cursor)
    on_a = conn_on(server, a, admin)
    latencies = []
    for serial in targets:
        start = time.monotonic()
        status, _ = on_a.post("/v1/revoke", {"serial": serial})
        assert status == 200
        arrived, event = stream.events.get(timeout=5)
        assert event["serial"] == serial
        latencies.append(arrived - start)
    assert max(latencies) < 1.0, latencies
    status, page = on_b.get(f"/v1/revocations?since={cursor}")
    assert [e["serial"] for e in page["events"]] == targets
    stream.close()
    on_a.close()
    on_b.close()


def test_audit_chain_verifies_after_concurrent_renewals(served: Served) -> None:
    """Renewals racing through both workers all land in one intact audit chain, and
    `trustmesh audit verify` passes."""
    server, workers = served.server, served.workers
    callers = [
        issue(server, f"spiffe://example.org/race/c{i}", served.tmp / f"race-c{i}")
        for i in range(6)
    ]
    conns = [
        (conn_on(server, workers[i % 2], path), f"spiffe://example.org/race/c{i}")
        for i, (path, _) in enumerate(callers)
    ]
    assert {c.worker for c, _ in conns} == set(workers)
    with server.ca() as ca:
        renewals_before = sum(1 for e in ca.store.audit_events() if e.action == "renew")
    rounds = 8

    def run(conn: Conn, sid: str) -> list[int]:
        return [renew(conn, sid)[0] for _ in range(rounds)]

    with ThreadPoolExecutor(len(conns)) as pool:
        statuses = [s for result in pool.map(lambda c: run(*c), conns) for s in result]
    assert statuses == [201] * (rounds * len(conns))
    for conn, _ in conns:
        conn.close()
    verify = subprocess.run(
        [sys.executable, "-m", "trustmesh", "audit", "verify"],
        env={**os.environ, "TRUSTMESH_HOME": str(server.home)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "audit chain intact" in verify.stdout
    with server.ca() as ca:
        events = ca.store.audit_events()
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        renewals = sum(1 for e in events if e.action == "renew")
    assert renewals - renewals_before == rounds * len(conns)


def test_kept_alive_connection_of_revoked_caller_is_refused(served: Served) -> None:
    """The verified chain is cached per certificate, its revocation status is not: once
    revoked (through the other worker), the next renewal on the same kept-alive
    connection is refused, and so is the feed."""
    server, (a, b) = served.server, served.workers
    sid = "spiffe://example.org/kept/alive"
    caller, serial = issue(server, sid, served.tmp / "kept")
    admin, _ = issue(server, ADMIN, served.tmp / "admin-kept")
    kept = conn_on(server, a, caller)
    for _ in range(2):  # the second one is served from the chain cache
        status, answer, _ = renew(kept, sid)
        assert status == 201, answer
    status, _ = conn_on(server, b, admin).post("/v1/revoke", {"serial": serial})
    assert status == 200
    status, refused, _ = renew(kept, sid)
    assert status == 403, refused
    assert refused["reason"] == "revoked"
    status, refused = kept.get("/v1/revocations?since=0")
    assert status == 403
    kept.close()


def test_supervisor_restarts_a_dead_worker_and_stops_cleanly(tmp_path: Path) -> None:
    """A worker killed with SIGKILL is replaced and the API keeps answering; SIGTERM
    stops the supervisor and every worker with exit status 0."""
    starting = _start(tmp_path, None)
    served = next(starting)
    server = served.server
    try:
        time.sleep(5.5)  # a worker dying sooner after its start is not restarted
        victim = served.workers[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            now = workers_of(server.process.pid)
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.1)
        replaced = workers_of(server.process.pid)
        assert len(replaced) == 2, replaced
        assert victim not in replaced
        conn = Conn(server)
        assert conn.get("/healthz") == (200, {"status": "ok"})
        conn.close()
        server.process.terminate()
        assert server.process.wait(timeout=20) == 0
        for pid in replaced:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
            )
    finally:
        starting.close()


def test_verify_caller_caches_the_chain_not_the_status(ca: CertificateAuthority) -> None:
    """A cached chain still fails once its certificate expires or is revoked, and a new
    issuer snapshot (a rotation step) misses the cache."""
    issued = ca.issue("spiffe://example.org/cache/me", ttl=timedelta(hours=1))
    cert = issued.certificate
    sid, record = ca.verify_caller(cert)
    assert str(sid) == "spiffe://example.org/cache/me"
    assert record.serial == issued.record.serial
    assert ca._chains.get(cert) is not None
    later = cert.not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(CertificateExpiredError, match="expired"):
        ca.verify_caller(cert, now=later)
    ca.revoke(issued.record.serial, actor="test")
    with pytest.raises(CertificateRevokedError, match="was revoked"):
        ca.verify_caller(cert)
    other = ca.issue("spiffe://example.org/cache/other").certificate
    ca.verify_caller(other)
    entry = ca._chains.get(other)
    assert entry is not None
    assert entry.issuers is ca.issuers
    ca._issuers = dataclasses.replace(ca.issuers)  # a new snapshot, as after a rotation step
    ca.verify_caller(other)
    renewed = ca._chains.get(other)
    assert renewed is not None
    assert renewed.issuers is ca.issuers
    assert renewed is not entry
