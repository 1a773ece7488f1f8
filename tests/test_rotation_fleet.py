"""An intermediate rotation and then a root rotation, each prepare -> activate -> retire,
across the whole fleet at once, with real processes (issue 17): a `ca serve`; a `trustmesh
run` service (agent in-process); a `trustmesh gateway serve` (agent in-process, public
route) forwarding to that service; a `trustmesh proxy inbound --http` sidecar (agent
in-process) in front of a plain Node.js app; `trustmesh agent`s keeping the PEM files of
a Python and a Node.js client and the PKCS#12 keystore and truststore of a Java client.

Six client loops run the whole time, a new TLS handshake per request (every hop answers
with ``connection: close``): Python (RotatingCredentials + mtls_client), Node
(tests/peers/mtls_client.js, one process per request) and Java (ReloadingClient, one JVM
for the whole test) call the service directly; Python and Node call it through the
gateway; Python calls the Node app through the sidecar. Every request is counted and none
may fail; no process restarts. After each retire, a leaf of the retired issuer (made with
its key, with and without every cross certificate that chained the retired root to the new
one, expired by then) is refused by the service and the sidecar, and the clients refuse a
server presenting one."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.authority import CertificateAuthority
from trustmesh.client import mtls_client
from trustmesh.pki import KeyType, dump_private_key, pem_certificates
from trustmesh.tls import RotatingCredentials

from ._runtimes import PEERS, LineProcess, compile_java, needs_java, needs_node
from ._server import free_port, running_server, stop
from ._sidecar import SIDECAR_ID, node_app, sidecar
from .conftest import PASSPHRASE
from .test_rotation_e2e import SERVICE, _cli, _keytool_entries, _pem_count, _status, _step, _wait

CLIENT = "spiffe://example.org/svc/orders"
NODE_ID = "spiffe://example.org/node/orders"
JAVA_ID = "spiffe://example.org/java/billing"
GATEWAY_ID = "spiffe://example.org/gateway"
PASSWORD = "changeit"
#: Seconds. Leaves renew at 2/3 of it, so the old issuer's expire within a TTL of
#: activate; the last third (10 s) is the margin a client has between picking its
#: credentials for a request and the handshake, which on a loaded 2-core machine took
#: a JVM more than 4 s (with 15 s, Java once presented a leaf that had just expired).
TTL = 30
READY = re.compile(r"trustmesh gateway: listening on (https://[^\s\"]+)")

#: Closes each connection after the response, so that the Java HttpClient (which keeps
#: connections alive) makes a new handshake per request too.
APP = """\
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": b"ok"})
"""

pytestmark = [pytest.mark.slow, needs_node, needs_java]


class Loop:
    """A client loop in a thread: ``call()`` returns None on success or the failure."""

    def __init__(self, name: str, call: Callable[[], str | None]) -> None:
        self.name = name
        self.call = call
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                failure = self.call()
            except Exception as exc:  # counted as a failure, never swallowed
                failure = f"{type(exc).__name__}: {exc}"
            if failure is None:
                self.ok += 1
            else:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {failure}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def _python_call(
    credentials: RotatingCredentials, url: str, expect_id: str, check: Callable[[str], bool]
) -> Callable[[], str | None]:
    def call() -> str | None:
        ctx = credentials.client_context(check_hostname=False)
        try:
            with mtls_client(ctx, expect_id=expect_id, base_url=url, timeout=10) as http:
                response = http.get("/", headers={"connection": "close"})
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if response.status_code == 200 and check(response.text):
            return None
        return f"{response.status_code} {response.text[:200]}"

    return call


def _node_call(url: str, directory: Path, expect_id: str) -> Callable[[], str | None]:
    def call() -> str | None:
        done = subprocess.run(
            [
                *("node", str(PEERS / "mtls_client.js"), url + "/"),
                *(str(directory / "chain.pem"), str(directory / "key.pem")),
                *(str(directory / "bundle.pem"), expect_id),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        line = done.stdout.strip()
        return None if line == "200 ok" else f"{line} {done.stderr.strip()}"

    return call


def _agent(
    server_url: str, bundle: Path, spiffe_id: str, out: Path, token: str, log: Path, *extra: str
) -> subprocess.Popen[str]:
    with log.open("w") as handle:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "trustmesh", "agent", "--ca", server_url),
                *("--id", spiffe_id, "--out", str(out), "--token", token),
                *("--bundle", str(bundle), *extra),
            ],
            env={**os.environ},
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
        )


def _forge(issuer: x509.Certificate, issuer_key: Any, spiffe_id: str) -> tuple[bytes, bytes]:
    """A leaf for SPIFFE_ID (client and server auth, valid for an hour) signed with
    ISSUER_KEY: what a holder of a retired issuer's key could still make. Returns the PEM
    chain (leaf, issuer) and key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forged")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )
    return pem_certificates([cert, issuer]), dump_private_key(key)


def _certs(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return []


def _issued_by(path: Path, issuer: x509.Certificate) -> bool:
    chain = _certs(path)
    if not chain:
        return False
    try:
        chain[0].verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _roots(path: Path) -> set[str]:
    return {c.subject.rfc4514_string() for c in _certs(path)}


def _present(port: int, chain: Path, key: Path, bundle: Path) -> str:
    """One request with the given client identity: the status line, or "refused: ..."
    (a failed handshake, or with TLS 1.3 the server closing once it saw the certificate)."""
    ctx = ssl.create_default_context(cafile=str(bundle))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(chain), str(key))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(4096):
                data += chunk
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {type(exc).__name__}: {exc}"
    if not data:
        return "refused: closed without an answer"
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def _handshakes_refused(log: Path) -> int:
    return log.read_text().count('"event": "tls_handshake_refused"')


@contextmanager
def _forged_server(
    chain: bytes, key: bytes, workdir: Path, name: str = "forged-server"
) -> Iterator[int]:
    """A TLS server on 127.0.0.1 presenting CHAIN (a leaf of a retired issuer); its port.
    It answers 200 to whoever completes a handshake, so a client that says anything but
    "refused" trusted it."""
    (workdir / f"{name}-chain.pem").write_bytes(chain)
    (workdir / f"{name}-key.pem").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(workdir / f"{name}-chain.pem", workdir / f"{name}-key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(raw, server_side=True) as tls:
                    tls.settimeout(5)
                    tls.recv(65536)
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nforged"
                    )
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        listener.close()


def _refused_everywhere(
    label: str,
    forged: tuple[bytes, bytes],
    ports: dict[str, int],
    bundle: Path,
    workdir: Path,
    *,
    expect_403: bool,
    logs: tuple[Path, ...] = (),
) -> dict[str, str]:
    """Present the forged client identity to every mTLS listener in PORTS; each must refuse
    it (a failed handshake, or with EXPECT_403 a 403 after it, logged as issuer_retired
    in each of LOGS). Returns the answers."""
    chain, key = workdir / f"{label}-chain.pem", workdir / f"{label}-key.pem"
    chain.write_bytes(forged[0])
    key.write_bytes(forged[1])
    answers = {name: _present(port, chain, key, bundle) for name, port in ports.items()}
    for name, answer in answers.items():
        assert not answer.startswith("HTTP/1.1 2"), (label, name, answer)
        if expect_403:
            assert answer.startswith("HTTP/1.1 403"), (label, name, answer)
        else:
            assert answer.startswith(("HTTP/1.1 4", "refused:")), (label, name, answer)
    if expect_403:
        serial = format(x509.load_pem_x509_certificates(forged[0])[0].serial_number, "x")
        for log in logs:
            _wait(
                lambda log=log: f"issuer_retired (Certificate {serial} " in log.read_text(),
                10,
                f"issuer_retired for {serial} in {log}",
            )
    return answers


def test_intermediate_then_root_rotation_through_gateway_sidecar_and_every_runtime(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    config = (home / "config.toml").read_text()
    config = config.replace("rotation_auto = true", "rotation_auto = false")
    config = re.sub(r'default_ttl = "[^"]*"', f'default_ttl = "{TTL}s"', config)
    config = re.sub(r'max_ttl = "[^"]*"', f'max_ttl = "{TTL}s"', config)
    config = re.sub(r'rotation_min_overlap = "[^"]*"', 'rotation_min_overlap = "1s"', config)
    (home / "config.toml").write_text(config)
    classes = compile_java(PEERS / "ReloadingClient.java", tmp_path / "classes")
    procs: dict[str, subprocess.Popen[str]] = {}
    loops: list[Loop] = []
    java: LineProcess | None = None
    credentials: RotatingCredentials | None = None
    with (
        running_server(home, tmp_path) as server,
        node_app("plain_app.js", tmp_path) as web,
    ):
        with server.ca() as ca:
            tokens = {
                name: ca.create_join_token(name, dns=["localhost"], actor="test")
                for name in (SERVICE, CLIENT, NODE_ID, JAVA_ID, GATEWAY_ID, SIDECAR_ID)
            }
        svc_dir, gw_dir, sc_dir = tmp_path / "svc", tmp_path / "gateway", tmp_path / "sidecar"
        py_dir, node_dir, java_dir = tmp_path / "py", tmp_path / "node", tmp_path / "java"
        with sidecar(
            "inbound",
            tmp_path,
            *("--id", SIDECAR_ID, "--cert-dir", str(sc_dir), "--http"),
            *("--ca", server.url, "--token", tokens[SIDECAR_ID]),
            *("--bundle", str(server.bundle), "--to", f"127.0.0.1:{web.port}"),
            *("--allow-id", CLIENT, "--log-level", "warning"),
        ) as proxy:
            try:
                (tmp_path / "svcapp.py").write_text(APP)
                port = free_port()

                def spawn(name: str, *argv: str) -> None:
                    with (tmp_path / f"{name}.log").open("w") as log:
                        procs[name] = subprocess.Popen(
                            [sys.executable, "-m", "trustmesh", *argv],
                            env={**os.environ},
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            text=True,
                        )

                spawn(
                    "run",
                    *("run", "svcapp:app", "--id", SERVICE, "--ca", server.url),
                    *("--token", tokens[SERVICE], "--dns", "localhost"),
                    *("--bundle", str(server.bundle), "--cert-dir", str(svc_dir)),
                    *("--listen", f"127.0.0.1:{port}", "--no-policy"),
                    *("--trusted-proxy", GATEWAY_ID, "--app-dir", str(tmp_path)),
                )
                url = f"https://127.0.0.1:{port}"
                gateway_yaml = tmp_path / "gateway.yaml"
                gateway_config: dict[str, Any] = {
                    "listen": f"127.0.0.1:{free_port()}",
                    "id": GATEWAY_ID,
                    "ca": server.url,
                    "dns": ["localhost"],
                    "routes": [
                        {
                            "name": "svc",
                            "path": "/svc",
                            "upstream": {"urls": [url], "id": SERVICE},
                            "auth": {"public": True},
                        }
                    ],
                }
                gateway_yaml.write_text(yaml.safe_dump(gateway_config, sort_keys=False))
                spawn(
                    "gateway",
                    *("gateway", "serve", "--config", str(gateway_yaml)),
                    *("--cert-dir", str(gw_dir), "--token", tokens[GATEWAY_ID]),
                    *("--bundle", str(server.bundle), "--log-level", "warning"),
                )
                (tmp_path / "store-password").write_text(PASSWORD + "\n")
                keystore, truststore = java_dir / "app.p12", java_dir / "trust.p12"
                for name, spiffe_id, directory, extra in (
                    ("py-agent", CLIENT, py_dir, ()),
                    ("node-agent", NODE_ID, node_dir, ()),
                    (
                        "java-agent",
                        JAVA_ID,
                        java_dir,
                        (
                            *("--pkcs12", str(keystore), "--truststore", str(truststore)),
                            *("--store-password-file", str(tmp_path / "store-password")),
                        ),
                    ),
                ):
                    procs[name] = _agent(
                        *(server.url, server.bundle, spiffe_id, directory, tokens[spiffe_id]),
                        tmp_path / f"{name}.log",
                        *extra,
                    )
                for directory in (svc_dir, gw_dir, sc_dir, py_dir, node_dir):
                    _wait(lambda d=directory: _pem_count(d / "chain.pem") > 0, 60, f"{directory}")
                _wait(lambda: keystore.exists() and truststore.exists(), 60, "the Java stores")

                def gateway_url() -> str | None:
                    found = READY.findall((tmp_path / "gateway.log").read_text())
                    assert procs["gateway"].poll() is None, (tmp_path / "gateway.log").read_text()
                    return found[-1].rstrip("/") if found else None

                _wait(gateway_url, 60, "the gateway to listen")
                gateway_base = gateway_url()
                assert gateway_base is not None
                gw_url = gateway_base + "/svc"
                node_direct = _node_call(url, node_dir, SERVICE)
                node_gateway = _node_call(gw_url, node_dir, GATEWAY_ID)
                _wait(lambda: node_direct() is None, 60, "the service to listen")
                _wait(lambda: node_gateway() is None, 30, "the gateway to forward")
                java = LineProcess(
                    [
                        *("java", "-XX:TieredStopAtLevel=1", "-cp", str(classes)),
                        *("ReloadingClient", f"https://localhost:{port}/"),
                        *(str(keystore), str(truststore), str(tmp_path / "store-password")),
                    ],
                    stdin=True,
                    stderr=tmp_path / "java.err",
                )
                java_lock = threading.Lock()

                def java_call() -> str | None:
                    assert java is not None
                    with java_lock:
                        java.send("call")
                        line = java.expect("", timeout=30)
                    return None if line == "200 ok" else line

                assert java_call() is None  # the JVM is up (not counted: nothing rotates yet)
                credentials = RotatingCredentials(py_dir, expect_id=CLIENT, poll_interval=0.2)
                credentials.start()

                def is_ok(text: str) -> bool:
                    return text == "ok"

                def from_client(text: str) -> bool:
                    return '"caller":"' + CLIENT + '"' in text

                sidecar_url = f"https://127.0.0.1:{proxy.port}"
                loops.extend(
                    [
                        Loop("python", _python_call(credentials, url, SERVICE, is_ok)),
                        Loop("node", node_direct),
                        Loop("java", java_call),
                        Loop(
                            "python-gateway",
                            _python_call(credentials, gw_url, GATEWAY_ID, is_ok),
                        ),
                        Loop("node-gateway", node_gateway),
                        Loop(
                            "python-sidecar",
                            _python_call(credentials, sidecar_url, SIDECAR_ID, from_client),
                        ),
                    ]
                )

                def counts() -> list[int]:
                    return [loop.ok for loop in loops]

                def more_requests(what: str, more: int = 3, timeout: float = 45) -> None:
                    mark = counts()
                    _wait(
                        lambda: all(
                            loop.ok >= n + more for loop, n in zip(loops, mark, strict=True)
                        ),
                        timeout,
                        f"{more} more requests on every loop {what}: "
                        + ", ".join(f"{loop.name}={loop.ok}" for loop in loops),
                    )

                def alive() -> None:
                    for name, process in procs.items():
                        assert process.poll() is None, f"{name} restarted or died"
                    assert proxy.process.poll() is None, "the sidecar died"
                    assert java is not None
                    assert java.process.poll() is None, "the JVM died"

                started = time.monotonic()

                def phase(what: str) -> None:  # shown with the captured output on failure
                    failed = {loop.name: loop.failures[:3] for loop in loops if loop.failures}
                    print(f"{time.monotonic() - started:6.1f}s {what}: {counts()} {failed}")

                more_requests("at the start")
                phase("load running")
                chain_dirs = (svc_dir, gw_dir, sc_dir, py_dir, node_dir, java_dir)
                bundle_files = [
                    d / "bundle.pem" for d in (svc_dir, gw_dir, sc_dir, py_dir, node_dir)
                ]
                listeners = {"service": port, "sidecar": proxy.port}

                def rotate(role: str) -> dict[str, Any]:
                    """prepare -> activate -> retire of ROLE under the loops; what the test
                    needs afterwards (the retired issuers, their key, the old-by-new cross
                    certificates the CA published)."""
                    with server.ca() as ca:
                        old_root, old_inter, old_key = ca.root, ca.intermediate, ca.signing_key
                    _step(home, role, "prepare")
                    phase(f"{role} prepare")
                    assert _status(home, role)["stage"] == "prepared"
                    crosses: dict[int, x509.Certificate] = {}

                    def published_crosses() -> None:
                        trust = ssl.create_default_context(cafile=str(py_dir / "bundle.pem"))
                        published = x509.load_pem_x509_certificates(
                            httpx.get(
                                f"{server.url}/v1/bundle?format=intermediates", verify=trust
                            ).content
                        )
                        for c in published:
                            if c.subject == old_root.subject and c.issuer != old_root.subject:
                                crosses[c.serial_number] = c

                    if role == "root":
                        for path in bundle_files:
                            _wait(lambda p=path: _pem_count(p) == 2, 20, f"two roots in {path}")
                        _wait(
                            lambda: _keytool_entries(truststore, PASSWORD) == 2,
                            20,
                            "two roots in the Java truststore",
                        )
                        published_crosses()
                        assert len(crosses) == 1
                    more_requests(f"after {role} prepare")
                    time.sleep(1.2)  # rotation_min_overlap = 1s
                    _step(home, role, "activate")
                    phase(f"{role} activate")
                    with server.ca() as ca:
                        new_root, new_inter = ca.root, ca.intermediate
                    assert new_inter != old_inter
                    assert (new_root != old_root) == (role == "root")
                    if role == "root":
                        published_crosses()  # activate re-issued it
                        assert len(crosses) == 2
                    for directory in chain_dirs:
                        path = directory / "chain.pem"
                        _wait(
                            lambda p=path: _issued_by(p, new_inter),
                            TTL * 2,
                            f"a leaf of the new intermediate in {path}",
                        )
                    more_requests(f"after {role} activate")
                    _wait(
                        lambda: _status(home, role)["message"].endswith("(now)"),
                        TTL * 3,
                        f"the old {role}'s certificates to expire",
                    )
                    _step(home, role, "retire")
                    phase(f"{role} retire")
                    assert _status(home, role)["stage"] == "idle"
                    if role == "root":
                        for path in bundle_files:
                            _wait(
                                lambda p=path: _roots(p) == {new_root.subject.rfc4514_string()},
                                20,
                                f"the new root alone in {path}",
                            )
                        _wait(
                            lambda: _keytool_entries(truststore, PASSWORD) == 1,
                            20,
                            "the new root alone in the Java truststore",
                        )
                    more_requests(f"after {role} retire", more=5)
                    alive()
                    return {
                        "root": old_root,
                        "inter": old_inter,
                        "key": old_key,
                        "crosses": list(crosses.values()),
                    }

                # -- the intermediate: prepare -> activate -> retire ---------------------
                old = rotate("intermediate")
                # A leaf its key still makes chains to the (unchanged) root: the handshake
                # passes, the service and the sidecar answer 403 issuer_retired.
                forged = _forge(old["inter"], old["key"], CLIENT)
                logs = (tmp_path / "run.log", proxy.log_path)
                _refused_everywhere(
                    *("inter", forged, listeners, py_dir / "bundle.pem", tmp_path),
                    expect_403=True,
                    logs=logs,
                )
                # -- the root: prepare -> activate -> retire -----------------------------
                old = rotate("root")
                chain_pem, key_pem = _forge(old["inter"], old["key"], CLIENT)
                before = [_handshakes_refused(log) for log in logs]
                # leaf -> intermediate of the retired root -> the retired root: no path to
                # the new root, the handshake fails.
                answers = _refused_everywhere(
                    "root",
                    (chain_pem, key_pem),
                    listeners,
                    py_dir / "bundle.pem",
                    tmp_path,
                    expect_403=False,
                )
                assert all(a.startswith("refused:") for a in answers.values()), answers
                _wait(
                    lambda: all(
                        _handshakes_refused(log) > n for log, n in zip(logs, before, strict=True)
                    ),
                    10,
                    "tls_handshake_refused logged by the service and the sidecar",
                )
                # With every cross certificate the CA published (the retired root certified
                # by the new one): they expired before retire was allowed, so there is no
                # path to the new root either and the handshake fails.
                crossed = chain_pem + pem_certificates(old["crosses"])
                answers = _refused_everywhere(
                    "root-cross",
                    (crossed, key_pem),
                    listeners,
                    py_dir / "bundle.pem",
                    tmp_path,
                    expect_403=False,
                )
                assert all(a.startswith("refused:") for a in answers.values()), answers
                # Still accepted: the current identity.
                accepted = _present(
                    port, py_dir / "chain.pem", py_dir / "key.pem", py_dir / "bundle.pem"
                )
                assert accepted.startswith("HTTP/1.1 200"), accepted
                # The clients refuse a server presenting a leaf of the retired root.
                server_chain, server_key = _forge(old["inter"], old["key"], SERVICE)
                with (
                    _forged_server(server_chain, server_key, tmp_path) as bad_port,
                    _forged_server(
                        server_chain + pem_certificates(old["crosses"]),
                        server_key,
                        tmp_path,
                        "forged-cross-server",
                    ) as cross_port,
                ):
                    bad = f"https://127.0.0.1:{bad_port}"
                    node_answer = _node_call(bad, node_dir, SERVICE)()
                    assert node_answer is not None
                    assert "error:" in node_answer, node_answer
                    python_answer = _python_call(credentials, bad, SERVICE, is_ok)()
                    assert python_answer is not None
                    assert "ConnectError" in python_answer, python_answer
                    # The gateway refuses it as an upstream (a route to it, added by a
                    # reload of gateway.yaml, written atomically).
                    # The one with the (expired) cross certificates fails the handshake too.
                    for name, forged_port in (("forged", bad_port), ("forged-cross", cross_port)):
                        gateway_config["routes"].append(
                            {
                                "name": name,
                                "path": f"/{name}",
                                "upstream": {
                                    "urls": [f"https://127.0.0.1:{forged_port}"],
                                    "id": SERVICE,
                                },
                                "auth": {"public": True},
                            },
                        )
                    staged = tmp_path / "gateway.yaml.tmp"
                    staged.write_text(yaml.safe_dump(gateway_config, sort_keys=False))
                    staged.replace(gateway_yaml)
                    trust = credentials.client_context(check_hostname=False)
                    answer: list[httpx.Response] = []

                    def through_gateway(path: str) -> bool:
                        with mtls_client(
                            trust, expect_id=GATEWAY_ID, base_url=gateway_base, timeout=30
                        ) as http:
                            answer[:] = [http.get(path)]
                        return answer[0].status_code != 404

                    for path in ("/forged/x", "/forged-cross/x"):
                        _wait(lambda p=path: through_gateway(p), 30, f"the gateway route {path}")
                        assert answer[0].status_code == 502, (path, answer[0].text)
                        reason = answer[0].json()["reason"]
                        assert reason == "upstream_unavailable", (path, answer[0].text)

                for loop in loops:
                    loop.stop()
                results = {loop.name: (loop.ok, loop.failures) for loop in loops}
                for name, (ok, failures) in results.items():
                    assert failures == [], (name, len(failures), failures[:5])
                    assert ok > 20, (name, ok)
                alive()
                audit = _cli(home, "audit", "verify")
                assert audit.returncode == 0, audit.stdout + audit.stderr
                print("requests per client:", {name: ok for name, (ok, _) in results.items()})
            finally:
                for loop in loops:
                    loop.stop()
                if credentials is not None:
                    credentials.stop()
                if java is not None:
                    java.close()
                for process in procs.values():
                    stop(process)
