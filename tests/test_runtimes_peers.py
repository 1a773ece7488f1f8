"""nginx, HAProxy, a Node.js `https` server and a Java `HttpsServer` on trustmesh identities
(host names in the certificate, the chain CRL): curl and a Java client verify their host
names, our clients get in, a foreign CA's do not, a revoked client is refused on its next
connection without a restart, and renewals under traffic lose no request."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main

from ._peers_servers import (
    KINDS,
    SERVER_ID,
    Client,
    Mesh,
    PeerServer,
    peer_servers,
    require,
    wait_until,
)
from ._runtimes import PEERS, compile_java, needs_java, peer, run_tool, serial_of, write_identity
from ._server import new_ca_server
from .conftest import PASSPHRASE

CLIENT_ID = "spiffe://example.org/svc/billing"
PASSWORD = "store-password-123"
#: How soon the next new connection of a revoked client must be refused.
REFUSED_WITHIN = {"nginx": 5.0, "haproxy": 2.0, "node": 5.0, "java": 5.0}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("peers-ca")
    with new_ca_server(workdir) as server:
        yield Mesh(server, workdir)


@pytest.fixture(scope="module")
def servers(
    mesh: Mesh, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, PeerServer | str]]:
    with peer_servers(mesh, tmp_path_factory.mktemp("peers")) as started:
        yield started


@pytest.fixture(scope="module")
def good(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trustmesh client identity that is never revoked."""
    return mesh.issue(CLIENT_ID, tmp_path_factory.mktemp("good") / "id")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory, good: Path) -> Path:
    """A client of another CA (same trust domain and ID) that trusts our servers."""
    workdir = tmp_path_factory.mktemp("foreign")
    other = CertificateAuthority.init(
        workdir / "home", trust_domain="example.org", passphrase=PASSPHRASE
    )
    ident = write_identity(other.issue(CLIENT_ID), workdir / "id")
    other.close()
    (ident / "bundle.pem").write_bytes((good / "bundle.pem").read_bytes())
    return ident


@pytest.fixture(scope="module")
def java_stores(good: Path, mesh: Mesh) -> tuple[Path, Path, Path]:
    """The good client's PKCS#12 keystore and our truststore, for the Java client."""
    password = good.parent / "store.pass"
    password.write_text(PASSWORD + "\n")
    keystore, truststore = good.parent / "client.p12", good.parent / "truststore.p12"
    home = ("--home", str(mesh.server.home))
    p12 = ("export", "p12", "--cert", str(good / "chain.pem"), "--key", str(good / "key.pem"))
    assert main([*p12, "--out", str(keystore), "--password-file", str(password), *home]) == 0
    store = ("export", "truststore", "--out", str(truststore), "--password-file", str(password))
    assert main([*store, *home]) == 0
    return keystore, truststore, password


def curl(server: PeerServer, ident: Path, host: str) -> tuple[int, str, str]:
    """curl with full verification (our bundle, host name) and ``ident`` as the client."""
    done = run_tool(
        *("curl", "--silent", "--show-error", "--max-time", "10"),
        *("--cacert", str(ident / "bundle.pem"), "--cert", str(ident / "chain.pem")),
        *("--key", str(ident / "key.pem"), server.url(host)),
    )
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_curl_verifies_the_host_name_and_our_client_gets_in(
    servers: dict[str, PeerServer | str], good: Path, kind: str, host: str
) -> None:
    """curl checks the server's certificate against bundle.pem and the host name (DNS and
    IP SAN) and reaches the service as the trustmesh client's SPIFFE ID."""
    server = require(servers, kind)
    code, out, err = curl(server, good, host)
    assert code == 0, err
    assert json.loads(out) == {"caller": CLIENT_ID, "serial": serial_of(good / "cert.pem")}


@pytest.mark.parametrize("kind", KINDS)
def test_curl_refuses_a_host_name_the_certificate_does_not_name(
    servers: dict[str, PeerServer | str], good: Path, kind: str
) -> None:
    """The same curl call under a name the server's certificate lacks fails with exit 60:
    the check is real."""
    server = require(servers, kind)
    done = run_tool(
        *("curl", "--silent", "--show-error", "--cacert", str(good / "bundle.pem")),
        *("--cert", str(good / "chain.pem"), "--key", str(good / "key.pem")),
        *("--resolve", f"orders.other:{server.port}:127.0.0.1"),
        f"https://orders.other:{server.port}/",
    )
    assert done.returncode == 60, done.stderr
    assert "orders.other" in done.stderr


@pytest.fixture(scope="module")
def java_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_java(PEERS / "ReloadingClient.java", tmp_path_factory.mktemp("java-client"))


@needs_java
@pytest.mark.parametrize("kind", KINDS)
def test_java_client_reaches_the_server_by_host_name(
    servers: dict[str, PeerServer | str],
    java_classes: Path,
    java_stores: tuple[Path, Path, Path],
    kind: str,
) -> None:
    """A plain Java HttpClient (host name checked) with the exported stores is served as
    the trustmesh client."""
    server = require(servers, kind)
    keystore, truststore, password = java_stores
    argv = [
        *("java", "-XX:TieredStopAtLevel=1", "-cp", str(java_classes), "ReloadingClient"),
        *(server.url("localhost"), str(keystore), str(truststore), str(password)),
    ]
    with peer(argv, stdin=True) as java:
        java.send("call")
        line = java.expect("", timeout=60)
    status, _, body = line.partition(" ")
    assert status == "200", line
    assert json.loads(body)["caller"] == CLIENT_ID


@pytest.mark.parametrize("kind", KINDS)
def test_a_foreign_ca_client_is_refused(
    servers: dict[str, PeerServer | str], good: Path, foreign: Path, kind: str
) -> None:
    """A client of another CA, with the same SPIFFE ID, never reaches the service; the
    trustmesh client still does."""
    server = require(servers, kind)
    assert Client(foreign, foreign / "bundle.pem").refused(server)
    code, out, _ = curl(server, foreign, "localhost")
    assert code != 0 or '"caller"' not in out
    status, body = Client(good, good / "bundle.pem").get(server)
    assert (status, body["caller"]) == (200, CLIENT_ID)


@pytest.mark.parametrize("kind", KINDS)
def test_a_revoked_client_is_refused_on_its_next_connection(
    servers: dict[str, PeerServer | str], mesh: Mesh, good: Path, tmp_path: Path, kind: str
) -> None:
    """After `trustmesh revoke` and the new chain CRL (nginx: reload; HAProxy: runtime API;
    Node and Java: they watch the file), the revoked client's next new connection is
    refused within the bound, the server process is the same, and others still get in."""
    server = require(servers, kind)
    ident = mesh.issue(f"spiffe://example.org/svc/{kind}-caller", tmp_path / "id")
    client = Client(ident, ident / "bundle.pem")
    status, body = client.get(server)
    assert status == 200
    assert body["serial"] == serial_of(ident / "cert.pem")
    pid = server.process.pid

    start = time.monotonic()
    mesh.revoke(ident)
    mesh.write_chain_crl(server.crl)
    server.run_reload()
    took = wait_until(
        lambda: client.refused(server), REFUSED_WITHIN[kind] - (time.monotonic() - start)
    )
    elapsed = time.monotonic() - start

    assert took is not None, f"{kind} still served the revoked client after {elapsed:.1f}s"
    assert elapsed < REFUSED_WITHIN[kind]
    assert server.alive()
    assert server.process.pid == pid
    status, body = Client(good, good / "bundle.pem").get(server)
    assert (status, body["caller"]) == (200, CLIENT_ID)


def test_renewals_under_traffic_lose_no_request(
    servers: dict[str, PeerServer | str], mesh: Mesh, good: Path
) -> None:
    """5 renewals of each server's identity during 30 s of calls (a new connection each) at
    every server: no call fails, and the calls see the renewed certificates."""
    running = [s for s in servers.values() if isinstance(s, PeerServer)]
    if not running:
        pytest.skip(f"no server could start: {servers}")
    client = Client(good, good / "bundle.pem")
    stop = threading.Event()
    calls = {s.kind: 0 for s in running}
    failures: dict[str, list[str]] = {s.kind: [] for s in running}
    seen: dict[str, set[str]] = {s.kind: set() for s in running}

    def traffic(server: PeerServer) -> None:
        while not stop.is_set():
            try:
                status, _, presented = client.call(server)
            except (OSError, http.client.HTTPException) as exc:
                failures[server.kind].append(repr(exc))
            else:
                seen[server.kind].add(presented)
                if status != 200:
                    failures[server.kind].append(f"status {status}")
            calls[server.kind] += 1
            time.sleep(0.02)

    threads = [threading.Thread(target=traffic, args=(s,), daemon=True) for s in running]
    for thread in threads:
        thread.start()
    first = {s.kind: serial_of(s.directory / "cert.pem") for s in running}
    try:
        for _ in range(5):
            time.sleep(5)
            for server in running:
                mesh.issue(SERVER_ID, server.directory, dns=("localhost",), ips=("127.0.0.1",))
                server.run_reload()
        time.sleep(5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    for server in running:
        last = serial_of(server.directory / "cert.pem")
        assert failures[server.kind] == [], f"{server.kind}: {failures[server.kind][:5]}"
        assert calls[server.kind] > 50, calls
        assert first[server.kind] in seen[server.kind]
        assert last in seen[server.kind], f"{server.kind} never served its last certificate"
        assert len(seen[server.kind]) >= 4, f"{server.kind} served {len(seen[server.kind])}"
        assert server.alive()


@pytest.mark.parametrize(
    ("page", "files"),
    [
        ("nginx.md", ["nginx-mtls.conf"]),
        ("haproxy.md", ["haproxy-mtls.cfg", "haproxy-update.sh"]),
        ("nodejs.md", ["crl_server.js"]),
        ("java.md", ["RevocationServer.java"]),
    ],
)
def test_runtime_pages_show_the_configs_the_tests_run(page: str, files: list[str]) -> None:
    """docs/runtimes shows the configs and programs these tests start, whole and unchanged."""
    text = (PEERS.parent.parent / "docs" / "runtimes" / page).read_text()
    for name in files:
        assert (PEERS / name).read_text() in text, f"{page} does not show {name} as tested"
