"""JSSE's own revocation checking against trustmesh identities: the default PKIX trust
manager of a Java `HttpsServer` and of a Java `HttpClient` (tests/peers/JsseServer.java and
JsseClient.java, shown whole in docs/runtimes/java.md) with
``-Dcom.sun.net.ssl.checkRevocation=true`` fetches the CRLs named by the certificates' CRL
Distribution Points (``-Dcom.sun.security.enableCRLDP=true``) or asks the AIA OCSP URL
(security property ``ocsp.enable=true``), served by `ca serve --ocsp-listen` of a CA made
with `ca init --crl-url --ocsp-url`. No trustmesh code runs in the JVMs.

Every identity comes from `trustmesh agent --once` (PKCS#12 stores for the JVMs). OpenJDK
keeps a downloaded CRL and asks its URL again only after 30 s (``URICertStore``), so the
CRLDP checks revoke before the JVM's first fetch; OCSP is asked on every full handshake."""

from __future__ import annotations

import http.client
import json
import re
import shlex
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509

from trustmesh.cli import main

from . import _peers_servers
from ._peers_servers import Mesh, wait_until
from ._runtimes import PEERS, LineProcess, compile_java, needs_java, serial_of

pytestmark = [pytest.mark.slow, needs_java]

SERVER_ID = "spiffe://example.org/edge/orders"
CLIENT_ID = "spiffe://example.org/svc/billing"
PASSWORD = "store-password-123"
#: The directories docs/runtimes/java.md uses for the server's and the client's stores.
DOC_SERVER_DIR = "/run/orders"
DOC_CLIENT_DIR = "/run/billing"
DOC_PASSWORD = "$STORE_PASSWORD"
#: How soon an OCSP-checking JVM must refuse a revoked certificate (the issue's bound).
OCSP_REFUSED_WITHIN = 5.0


def jvm_properties(directory: str, password: str = DOC_PASSWORD) -> list[str]:
    """The JVM options docs/runtimes/java.md shows (and these tests run): revocation
    checking with CRLDP on, and the agent's PKCS#12 stores in ``directory`` as the
    default SSLContext's keystore and truststore. OCSP mode adds the ``ocsp`` argument
    and keeps CRLDP on: the intermediate names no OCSP URL, only its root-signed CRL."""
    options = ["-Dcom.sun.net.ssl.checkRevocation=true", "-Dcom.sun.security.enableCRLDP=true"]
    for store, name in (("keyStore", "app.p12"), ("trustStore", "truststore.p12")):
        options += [
            f"-Djavax.net.ssl.{store}={directory}/{name}",
            f"-Djavax.net.ssl.{store}Type=PKCS12",
            f"-Djavax.net.ssl.{store}Password={password}",
        ]
    return options


def store_agent_options(spiffe_id: str, directory: str, *sans: str) -> list[str]:
    """`trustmesh agent --once` options (besides --ca, --bundle, --token) writing the PKCS#12
    keystore and truststore the JVM options name."""
    return [
        *("--id", spiffe_id, "--out", directory, *sans),
        *("--pkcs12", f"{directory}/app.p12", "--truststore", f"{directory}/truststore.p12"),
        *("--store-password-file", f"{directory}/store.pass", "--once"),
    ]


@dataclass
class World:
    """The CA, the compiled Java programs and the identities, revoked ones already revoked."""

    mesh: Mesh
    classes: Path
    server_stores: Path  # JsseServer's keystore and truststore (DNS localhost, IP 127.0.0.1)
    client_stores: Path  # JsseClient's
    good: Path  # a PEM client identity, never revoked
    revoked: Path  # a PEM client identity revoked before any JVM started
    good_server: Path  # PEM server identities (DNS localhost) for the Python TLS servers
    revoked_server: Path


def _stores(mesh: Mesh, spiffe_id: str, directory: Path, *sans: str) -> Path:
    directory.mkdir(mode=0o700)
    (directory / "store.pass").write_text(PASSWORD + "\n")
    options = store_agent_options(spiffe_id, str(directory), *sans)
    code = main([*mesh.agent_argv(*options), "--token", mesh.token(spiffe_id, *sans)])
    assert code == 0, f"trustmesh agent --once --pkcs12 for {spiffe_id} exited {code}"
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("jsse")
    classes = compile_java(PEERS / "JsseServer.java", work / "classes", PEERS / "JsseClient.java")
    sans = ("--dns", "localhost", "--ip", "127.0.0.1")
    (work / "ca").mkdir()
    with _peers_servers.mesh(work / "ca") as mesh:
        revoked = mesh.enroll("spiffe://example.org/svc/revoked", work / "revoked")
        revoked_server = mesh.enroll("spiffe://example.org/edge/revoked", work / "rs", *sans)
        # before any JVM has fetched a CRL: the JDK keeps the first one it downloads
        mesh.revoke(revoked)
        mesh.revoke(revoked_server)
        yield World(
            mesh,
            classes,
            _stores(mesh, SERVER_ID, work / "server", *sans),
            _stores(mesh, CLIENT_ID, work / "client"),
            mesh.enroll(CLIENT_ID, work / "good"),
            revoked,
            mesh.enroll(SERVER_ID, work / "gs", *sans),
            revoked_server,
        )


def _java(
    world: World, program: str, stores: Path, *args: str, log: Path | None = None
) -> LineProcess:
    """``program`` in a JVM started with :func:`jvm_properties` for ``stores``; with ``log``,
    the JDK's certificate path debugging (which names why a chain was refused) goes there."""
    debug = ["-Djava.security.debug=certpath"] if log is not None else []
    return LineProcess(
        [
            *("java", "-XX:TieredStopAtLevel=1", *debug),
            *jvm_properties(str(stores), PASSWORD),
            *("-cp", str(world.classes), program, *args),
        ],
        stdin=program == "JsseClient",
        stderr=log,
    )


@dataclass
class JavaServer:
    process: LineProcess
    port: int
    mode: str
    log: Path  # the JDK's certpath debugging


def jdk_serial(ident: Path) -> str:
    """The serial of ``ident``'s certificate as the JDK's certpath debugging writes it."""
    number = int(serial_of(ident / "cert.pem"), 16)
    return ":".join(f"{b:02x}" for b in number.to_bytes((number.bit_length() + 7) // 8, "big"))


def _start_server(world: World, mode: str) -> Iterator[JavaServer]:
    log = world.classes.parent / f"server-{mode}.log"
    args = [mode] if mode == "ocsp" else []
    running = _java(world, "JsseServer", world.server_stores, *args, log=log)
    try:
        port = int(running.expect("listening ", timeout=60).split()[1])
        yield JavaServer(running, port, mode, log)
    finally:
        running.close()


@pytest.fixture(scope="module")
def crldp_server(world: World) -> Iterator[JavaServer]:
    yield from _start_server(world, "crldp")


@pytest.fixture(scope="module")
def ocsp_server(world: World) -> Iterator[JavaServer]:
    yield from _start_server(world, "ocsp")


def call(ident: Path, port: int, host: str = "localhost") -> tuple[int, dict[str, str]]:
    """One GET as ``ident`` on a new TLS connection (host name checked); raises OSError
    when the server refuses the client (HttpsServer closes the connection, no alert)."""
    context = ssl.create_default_context(cafile=str(ident / "bundle.pem"))
    context.load_cert_chain(ident / "chain.pem", ident / "key.pem")
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=10)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def refusal(ident: Path, port: int) -> str | None:
    """Why the server refused ``ident``'s next connection, or None when it served it."""
    try:
        call(ident, port)
    except (OSError, http.client.HTTPException) as exc:
        return repr(exc)
    return None


def test_crldp_server_accepts_a_good_client_and_refuses_a_revoked_one(
    world: World, crldp_server: JavaServer, tmp_path: Path
) -> None:
    """The default trust manager with checkRevocation and enableCRLDP downloads the CRLs
    from the client's leaf and intermediate CDPs: the good client is served, the client
    revoked before the JVM's first fetch is refused (its serial found in the CRL); a
    client revoked after that fetch is still served from the JDK's CRL cache."""
    status, body = call(world.good, crldp_server.port)
    fetched = time.monotonic()
    assert (status, body) == (
        200,
        {"caller": CLIENT_ID, "serial": serial_of(world.good / "cert.pem")},
    )
    assert refusal(world.revoked, crldp_server.port) is not None
    said = crldp_server.log.read_text()
    assert "Downloading new CRL" in said
    # the JDK found the client's serial in the downloaded CRL
    assert f"CRL entry: SerialNumber: {jdk_serial(world.revoked)}" in said, said[-3000:]

    late = world.mesh.enroll("spiffe://example.org/svc/late", tmp_path / "late")
    assert call(late, crldp_server.port)[0] == 200
    world.mesh.revoke(late)
    # OpenJDK 17 asks a CDP again only 30 s after its last download (URICertStore)
    if time.monotonic() - fetched < 25:
        assert call(late, crldp_server.port)[0] == 200, "the JDK fetched the CRL again"
        assert "Returning CRL from cache" in crldp_server.log.read_text()
    assert crldp_server.process.process.poll() is None


def test_ocsp_server_refuses_a_client_revoked_while_it_runs(
    world: World, ocsp_server: JavaServer, tmp_path: Path
) -> None:
    """With ocsp.enable=true the server asks the CA's OCSP responder about the client's
    leaf on every full handshake (the intermediate names no OCSP URL: its root-signed CRL
    from the CDP): a client served before `trustmesh revoke` is refused on its next
    connection (well within 5 s; measured 0.05 s), the good client still served."""
    assert call(world.good, ocsp_server.port)[0] == 200
    assert refusal(world.revoked, ocsp_server.port) is not None
    ident = world.mesh.enroll("spiffe://example.org/svc/ocsp-caller", tmp_path / "id")
    status, body = call(ident, ocsp_server.port)
    assert (status, body["serial"]) == (200, serial_of(ident / "cert.pem"))

    start = time.monotonic()
    world.mesh.revoke(ident)
    took = wait_until(lambda: refusal(ident, ocsp_server.port) is not None, OCSP_REFUSED_WITHIN)
    assert took is not None, f"still served {OCSP_REFUSED_WITHIN}s after the revocation"
    print(f"JSSE OCSP: revoked client refused {time.monotonic() - start:.2f}s after revoke")
    said = ocsp_server.log.read_text()
    assert f"(with serial number {jdk_serial(ident)}) is: REVOKED" in said, said[-3000:]
    # the leaves by OCSP only: the leaf CRL was never fetched (the intermediate's was)
    assert f"Trying to fetch CRL from DP {world.mesh.plain}/crl/root\n" in said
    assert f"Trying to fetch CRL from DP {world.mesh.plain}/crl\n" not in said
    assert call(world.good, ocsp_server.port)[0] == 200


# -- the Java client checking servers --------------------------------------------------


class _Caller(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        der = self.connection.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der)
        uris = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
        body = json.dumps({"caller": uris[0], "server": self.server.name}).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def python_servers(world: World) -> Iterator[dict[str, str]]:
    """Two mTLS servers (Python ssl) on the good and the revoked server identity: name -> URL."""
    urls, started = {}, []
    for name, ident in (("good", world.good_server), ("revoked", world.revoked_server)):
        context = ssl.create_default_context(
            ssl.Purpose.CLIENT_AUTH, cafile=str(ident / "bundle.pem")
        )
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(ident / "chain.pem", ident / "key.pem")
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Caller)
        httpd.daemon_threads = True
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        httpd.name = name  # type: ignore[attr-defined]
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        started.append(httpd)
        urls[name] = f"https://localhost:{httpd.server_address[1]}/"
    yield urls
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("mode", ["crldp", "ocsp"])
def test_java_client_refuses_a_revoked_server(
    world: World, python_servers: dict[str, str], mode: str
) -> None:
    """A Java HttpClient on the default SSLContext with checkRevocation (CRLDP, or OCSP)
    reaches the server with a good certificate as its SPIFFE ID, and refuses the server
    whose certificate was revoked: "Certificate has been revoked"."""
    client = _java(world, "JsseClient", world.client_stores, *([mode] if mode == "ocsp" else []))
    try:
        client.send(python_servers["good"])
        line = client.expect("", timeout=60)
        status, _, body = line.partition(" ")
        assert status == "200", line
        assert json.loads(body) == {"caller": CLIENT_ID, "server": "good"}
        client.send(python_servers["revoked"])
        line = client.expect("", timeout=60)
        assert line.startswith("ERROR "), line
        assert "Certificate has been revoked" in line, line
    finally:
        client.close()


# -- docs ------------------------------------------------------------------------------


def _page() -> str:
    return (PEERS.parent.parent / "docs" / "runtimes" / "java.md").read_text()


def test_java_page_shows_the_programs_the_tests_run() -> None:
    """docs/runtimes/java.md shows JsseServer.java and JsseClient.java whole and unchanged."""
    text = _page()
    for name in ("JsseServer.java", "JsseClient.java"):
        assert (PEERS / name).read_text() in text, f"java.md does not show {name} as tested"


def _sh_commands(text: str, first: str) -> list[list[str]]:
    """Every command starting with ``first`` in the page's ```sh blocks, split like a shell."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True, posix=True)
            if argv[:1] == [first]:
                commands.append(argv)
    return commands


@pytest.mark.parametrize(
    ("program", "directory", "args"),
    [
        ("JsseServer", DOC_SERVER_DIR, []),
        ("JsseServer", DOC_SERVER_DIR, ["ocsp"]),
        ("JsseClient", DOC_CLIENT_DIR, []),
        ("JsseClient", DOC_CLIENT_DIR, ["ocsp"]),
    ],
)
def test_java_page_shows_the_java_commands_the_tests_run(
    program: str, directory: str, args: list[str]
) -> None:
    """java.md shows `java OPTIONS PROGRAM.java [ocsp]` with exactly the JVM options the
    tests start the program with (the doc's paths and "$STORE_PASSWORD")."""
    expected = ["java", *jvm_properties(directory, DOC_PASSWORD), f"{program}.java", *args]
    shown = [
        argv[: argv.index("<")] if "<" in argv else argv for argv in _sh_commands(_page(), "java")
    ]
    assert expected in shown, f"java.md shows no {shlex.join(expected)}: {shown}"


@pytest.mark.parametrize(
    ("spiffe_id", "directory", "sans"),
    [
        (SERVER_ID, DOC_SERVER_DIR, ["--dns", "localhost", "--ip", "127.0.0.1"]),
        (CLIENT_ID, DOC_CLIENT_DIR, []),
    ],
)
def test_java_page_shows_the_store_agent_commands_the_tests_run(
    spiffe_id: str, directory: str, sans: list[str]
) -> None:
    """java.md shows the `trustmesh agent --once --pkcs12 --truststore` commands the tests
    enroll the JVMs' stores with (besides --ca, --bundle and --token)."""
    wanted = store_agent_options(spiffe_id, directory, *sans)
    shown = [argv[2:] for argv in _sh_commands(_page(), "trustmesh") if argv[1:2] == ["agent"]]
    pairs = _peers_servers_pairs(wanted)
    assert any(pairs <= _peers_servers_pairs(argv) for argv in shown), (
        f"java.md shows no agent command with {wanted}: {shown}"
    )


def _peers_servers_pairs(argv: list[str]) -> set[tuple[str, str]]:
    pairs, i = set(), 0
    while i < len(argv):
        if argv[i] == "--once" or i + 1 == len(argv):
            pairs.add((argv[i], ""))
            i += 1
        else:
            pairs.add((argv[i], argv[i + 1]))
            i += 2
    return pairs
