"""nginx, HAProxy, a Node.js `https` server and a Java `HttpsServer` on identities that a real
`trustmesh agent` enrolls and renews (host names in the certificate) and with the chain CRL
file the agent keeps fresh: curl and a Java client verify their host names, our clients get
in, a foreign CA's do not, a revoked client is refused on its next connection without a
restart, and the agent's renewals under traffic lose no request. Also nginx asking the
CA's plain-HTTP OCSP responder (`ssl_ocsp leaf`) instead of reading a CRL file."""

from __future__ import annotations

import http.client
import json
import re
import shlex
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main

from . import _peers_servers
from ._peers_servers import (
    KINDS,
    SERVER_ID,
    Client,
    Mesh,
    PeerServer,
    agent_options,
    backend,
    close,
    peer_servers,
    require,
    start_nginx,
    wait_until,
)
from ._runtimes import PEERS, compile_java, needs_java, peer, run_tool, serial_of, write_identity
from .conftest import PASSPHRASE

CLIENT_ID = "spiffe://example.org/svc/billing"
PASSWORD = "store-password-123"
#: How soon the next new connection of a revoked client must be refused.
REFUSED_WITHIN = {"nginx": 5.0, "haproxy": 2.0, "node": 5.0, "java": 5.0}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with _peers_servers.mesh(tmp_path_factory.mktemp("peers-ca")) as running:
        yield running


@pytest.fixture(scope="module")
def servers(
    mesh: Mesh, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, PeerServer | str]]:
    with peer_servers(mesh, tmp_path_factory.mktemp("peers")) as started:
        yield started


@pytest.fixture(scope="module")
def good(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trustmesh client identity (`agent --once`) that is never revoked."""
    return mesh.enroll(CLIENT_ID, tmp_path_factory.mktemp("good") / "id")


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
    """After `trustmesh revoke`, with nothing done by hand (the agent rewrites the --crl
    file; nginx: its --on-crl reload; HAProxy: its --haproxy-socket push; Node and Java
    watch the file), the revoked client's next new connection is refused within the
    bound, the server process is the same, and others still get in."""
    server = require(servers, kind)
    ident = mesh.enroll(f"spiffe://example.org/svc/{kind}-caller", tmp_path / "id")
    client = Client(ident, ident / "bundle.pem")
    status, body = client.get(server)
    assert status == 200
    assert body["serial"] == serial_of(ident / "cert.pem")
    pid = server.process.pid

    start = time.monotonic()
    mesh.revoke(ident)
    took = wait_until(
        lambda: client.refused(server), REFUSED_WITHIN[kind] - (time.monotonic() - start)
    )
    elapsed = time.monotonic() - start

    assert took is not None, f"{kind} still served the revoked client after {elapsed:.1f}s"
    assert elapsed < REFUSED_WITHIN[kind]
    assert server.alive()
    assert server.process.pid == pid
    assert server.agent is not None
    assert server.agent.poll() is None
    assert server.agent_log is not None
    said = server.agent_log.read_text()
    if kind == "nginx":
        assert "CRL reloaded (ran nginx" in said
    elif kind == "haproxy":
        assert "CRL reloaded (HAProxy runtime API" in said
    status, body = Client(good, good / "bundle.pem").get(server)
    assert (status, body["caller"]) == (200, CLIENT_ID)


def test_agent_renewals_under_traffic_lose_no_request(
    servers: dict[str, PeerServer | str], good: Path
) -> None:
    """During 50 s of calls (a new connection each) at every server, its agent renews the
    identity 5 times or more (short --ttl) and runs the reload by itself: no call fails,
    every call sees the host names, and the calls see the renewed certificates."""
    running = [s for s in servers.values() if isinstance(s, PeerServer)]
    if not running:
        pytest.skip(f"no server could start: {servers}")
    client = Client(good, good / "bundle.pem")
    stop = threading.Event()
    calls = {s.kind: 0 for s in running}
    failures: dict[str, list[str]] = {s.kind: [] for s in running}
    seen: dict[str, list[str]] = {s.kind: [] for s in running}

    def traffic(server: PeerServer) -> None:
        hosts = ("localhost", "127.0.0.1")
        while not stop.is_set():
            try:
                status, _, presented = client.call(server, hosts[calls[server.kind] % 2])
            except (OSError, http.client.HTTPException) as exc:
                failures[server.kind].append(repr(exc))
            else:
                if presented not in seen[server.kind]:
                    seen[server.kind].append(presented)
                if status != 200:
                    failures[server.kind].append(f"status {status}")
            calls[server.kind] += 1
            time.sleep(0.02)

    threads = [threading.Thread(target=traffic, args=(s,), daemon=True) for s in running]
    for thread in threads:
        thread.start()
    try:
        time.sleep(50)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    for server in running:
        kind = server.kind
        assert failures[kind] == [], f"{kind}: {failures[kind][:5]}"
        assert calls[kind] > 50, calls
        # the first certificate seen, then one per renewal picked up by the server
        assert len(seen[kind]) >= 6, f"{kind} served {len(seen[kind])} certificates in 50 s"
        assert server.alive()
        assert server.agent is not None
        assert server.agent.poll() is None
        assert server.agent_log is not None
        if kind == "nginx":
            assert "ran nginx" in server.agent_log.read_text()


@pytest.mark.skipif(_peers_servers.missing("nginx") is not None, reason="nginx not installed")
def test_nginx_ssl_ocsp_leaf_refuses_a_revoked_client(
    mesh: Mesh, good: Path, tmp_path: Path
) -> None:
    """nginx with `ssl_ocsp leaf` and `ssl_ocsp_responder` at `ca serve --ocsp-listen` (no
    CRL file, an agent-enrolled identity): a good client is served; after `trustmesh
    revoke`, the revoked client's next connection is refused within 5 s, no reload."""
    directory = tmp_path / "id"
    directory.mkdir(mode=0o700)
    grant = mesh.token(SERVER_ID, "--dns", "localhost", "--ip", "127.0.0.1")
    once = [
        *("--id", SERVER_ID, "--out", str(directory), "--dns", "localhost"),
        *("--ip", "127.0.0.1", "--once", "--token", grant),
    ]
    assert main(mesh.agent_argv(*once)) == 0
    ident = mesh.enroll("spiffe://example.org/svc/ocsp-caller", tmp_path / "caller")
    with backend() as port:
        server = start_nginx(directory, port, config="nginx-ocsp.conf", ocsp=mesh.ocsp_port)
        try:
            pid = server.process.pid
            for who, spiffe_id in (
                (good, CLIENT_ID),
                (ident, "spiffe://example.org/svc/ocsp-caller"),
            ):
                status, body = Client(who, who / "bundle.pem").get(server, "localhost")
                assert (status, body["caller"]) == (200, spiffe_id)
            client = Client(ident, ident / "bundle.pem")
            start = time.monotonic()
            mesh.revoke(ident)
            took = wait_until(lambda: client.refused(server), 5.0)
            assert took is not None, server.log.read_text()
            assert server.process.pid == pid
            status, body = Client(good, good / "bundle.pem").get(server)
            assert (status, body["caller"]) == (200, CLIENT_ID)
            assert time.monotonic() - start < 10
        finally:
            close(server)


@pytest.mark.parametrize(
    ("page", "files"),
    [
        ("nginx.md", ["nginx-mtls.conf", "nginx-ocsp.conf"]),
        ("haproxy.md", ["haproxy-mtls.cfg", "haproxy-reload.sh"]),
        ("nodejs.md", ["crl_server.js"]),
        ("java.md", ["RevocationServer.java"]),
    ],
)
def test_runtime_pages_show_the_configs_the_tests_run(page: str, files: list[str]) -> None:
    """docs/runtimes shows the configs and programs these tests start, whole and unchanged."""
    text = (PEERS.parent.parent / "docs" / "runtimes" / page).read_text()
    for name in files:
        assert (PEERS / name).read_text() in text, f"{page} does not show {name} as tested"


def _agent_commands(text: str) -> list[list[str]]:
    """Every `trustmesh agent ...` command in the page's ```sh blocks, split like a shell."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:2] == ["trustmesh", "agent"]:
                commands.append(argv[2:])
    return commands


def _pairs(argv: list[str]) -> set[tuple[str, str]]:
    flags = {"--once", "--renew-now", "--json", "--rekey-stores", "--pkcs12-legacy"}
    pairs, i = set(), 0
    while i < len(argv):
        if argv[i] in flags or not argv[i].startswith("--") or i + 1 == len(argv):
            pairs.add((argv[i], ""))
            i += 1
        else:
            pairs.add((argv[i], argv[i + 1]))
            i += 2
    return pairs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("once", [True, False])
def test_runtime_pages_show_the_agent_commands_the_tests_run(kind: str, once: bool) -> None:
    """docs/runtimes shows the `trustmesh agent` commands the harness runs for each server:
    the same options and hooks (besides the CA URL, bundle, token and --ttl)."""
    page = {"nginx": "nginx.md", "haproxy": "haproxy.md", "node": "nodejs.md", "java": "java.md"}
    text = (PEERS.parent.parent / "docs" / "runtimes" / page[kind]).read_text()
    tested = _pairs(agent_options(kind, once=once))
    shown = [_pairs(argv) for argv in _agent_commands(text)]
    hooks = {"--exec", "--on-crl", "--haproxy-socket", "--signal", "--once"}
    matching = [
        s
        for s in shown
        if tested <= s and {p for p in s if p[0] in hooks} == {p for p in tested if p[0] in hooks}
    ]
    assert matching, f"{page[kind]} shows no agent command with {sorted(tested)}: {shown}"
