"""An intermediate rotation (prepare -> activate -> retire) under load from other runtimes,
with real processes: a `ca serve`, a `trustmesh run` service (agent in-process, --id), and
a Python client (RotatingCredentials + mtls_client), a Node.js client (tests/peers/
mtls_client.js, one process and connection per request, PEM files kept by a `trustmesh
agent`) and the Java ReloadingClient (PKCS#12 keystore and truststore kept by `trustmesh
agent --pkcs12 --truststore`) calling it in a loop. Every request is counted; after the
retire a certificate signed by the retired intermediate is refused by the service."""

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
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType, dump_private_key, pem_certificates
from trustmesh.tls import RotatingCredentials

from ._runtimes import PEERS, LineProcess, compile_java, needs_java, needs_node
from ._server import free_port, running_server, stop
from .conftest import PASSPHRASE
from .test_rotation_e2e import CLIENT, SERVICE, Load, _cli, _pem_count, _status, _step, _wait

NODE_ID = "spiffe://example.org/node/orders"
JAVA_ID = "spiffe://example.org/java/billing"
PASSWORD = "changeit"
TTL = 12  # seconds: leaves renew at 2/3 of it, so the old intermediate's expire quickly

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


class Counted:
    """A client loop in a thread: ``call()`` returns None on success or the failure."""

    def __init__(self, name: str, call: object) -> None:
        self.name = name
        self.call = call
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            failure = self.call()  # type: ignore[operator]
            if failure is None:
                self.ok += 1
            else:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {failure}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


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


def _forged_leaf(
    issuer: x509.Certificate, issuer_key: object, spiffe_id: str
) -> tuple[bytes, bytes]:
    """A client leaf for ``spiffe_id`` signed with ``issuer_key`` (valid for an hour):
    what a holder of the retired intermediate's key could still make."""
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
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return pem_certificates([cert, issuer]), dump_private_key(key)


def _handshake(port: int, chain: Path, key: Path, bundle: Path) -> str:
    """One request with the given identity: "200" or what refused it."""
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
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def test_intermediate_rotation_under_node_java_and_python_load(tmp_path: Path) -> None:
    """Python, Node and Java clients call a `trustmesh run` service across an intermediate
    prepare -> activate -> retire with zero failed requests or handshakes, each keeping its
    identity and trust through a running agent (no restarts); after the retire a leaf
    signed by the retired intermediate's key is refused by the service."""
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
    procs: list[subprocess.Popen[str]] = []
    loads: list[Counted | Load] = []
    java: LineProcess | None = None
    credentials: RotatingCredentials | None = None
    with running_server(home, tmp_path) as server:
        try:
            with server.ca() as ca:
                tokens = {
                    SERVICE: ca.create_join_token(SERVICE, dns=["localhost"], actor="test"),
                    CLIENT: ca.create_join_token(CLIENT, actor="test"),
                    NODE_ID: ca.create_join_token(NODE_ID, actor="test"),
                    JAVA_ID: ca.create_join_token(JAVA_ID, actor="test"),
                }
            (tmp_path / "svcapp.py").write_text(APP)
            port = free_port()
            svc_dir = tmp_path / "svc"
            with (tmp_path / "run.log").open("w") as run_log:
                procs.append(
                    subprocess.Popen(
                        [
                            *(sys.executable, "-m", "trustmesh", "run", "svcapp:app"),
                            *("--id", SERVICE, "--ca", server.url, "--token", tokens[SERVICE]),
                            *("--dns", "localhost", "--bundle", str(server.bundle)),
                            *("--cert-dir", str(svc_dir), "--listen", f"127.0.0.1:{port}"),
                            *("--no-policy", "--app-dir", str(tmp_path)),
                        ],
                        env={**os.environ},
                        stdout=run_log,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
            py_dir, node_dir, java_dir = tmp_path / "py", tmp_path / "node", tmp_path / "java"
            (tmp_path / "store-password").write_text(PASSWORD + "\n")
            keystore, truststore = java_dir / "app.p12", java_dir / "trust.p12"
            procs.append(
                _agent(
                    server.url, server.bundle, CLIENT, py_dir, tokens[CLIENT], tmp_path / "py.log"
                )
            )
            procs.append(
                _agent(
                    *(server.url, server.bundle, NODE_ID, node_dir, tokens[NODE_ID]),
                    tmp_path / "node.log",
                )
            )
            procs.append(
                _agent(
                    *(server.url, server.bundle, JAVA_ID, java_dir, tokens[JAVA_ID]),
                    tmp_path / "java-agent.log",
                    *("--pkcs12", str(keystore), "--truststore", str(truststore)),
                    *("--store-password-file", str(tmp_path / "store-password")),
                )
            )
            for directory in (svc_dir, py_dir, node_dir):
                _wait(lambda d=directory: _pem_count(d / "chain.pem") > 0, 30, f"{directory}")
            _wait(lambda: keystore.exists() and truststore.exists(), 30, "the Java stores")
            url = f"https://127.0.0.1:{port}"

            def node_call() -> str | None:
                done = subprocess.run(
                    [
                        *("node", str(PEERS / "mtls_client.js"), url + "/"),
                        *(str(node_dir / "chain.pem"), str(node_dir / "key.pem")),
                        *(str(node_dir / "bundle.pem"), SERVICE),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                line = done.stdout.strip()
                return None if line == "200 ok" else f"{line} {done.stderr.strip()}"

            _wait(lambda: node_call() is None, 30, "the service to listen")
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
            loads.append(Load(credentials, url))
            loads.append(Counted("node", node_call))
            loads.append(Counted("java", java_call))

            def all_ok_over(counts: list[int], more: int) -> bool:
                return all(load.ok >= n + more for load, n in zip(loads, counts, strict=True))

            def counts() -> list[int]:
                return [load.ok for load in loads]

            start = counts()
            _wait(lambda: all_ok_over(start, 3), 30, "the first requests")

            # -- prepare: the new intermediate is published, the old one signs -------
            with server.ca() as ca:
                old_inter = ca.intermediate
                old_key = ca.signing_key
            _step(home, "intermediate", "prepare")
            assert _status(home, "intermediate")["stage"] == "prepared"
            mark = counts()
            _wait(lambda: all_ok_over(mark, 3), 30, "requests after prepare")
            time.sleep(1.5)  # rotation_min_overlap
            # -- activate: every renewal from now on is signed by the new one ----------
            _step(home, "intermediate", "activate")
            with server.ca() as ca:
                new_inter = ca.intermediate
            assert new_inter != old_inter

            def issued_by_new(path: Path) -> bool:
                try:
                    leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
                except (OSError, ValueError, IndexError):
                    return False
                try:
                    leaf.verify_directly_issued_by(new_inter)
                except (ValueError, TypeError, InvalidSignature):
                    return False
                return True

            for directory in (svc_dir, py_dir, node_dir, java_dir):
                _wait(
                    lambda d=directory: issued_by_new(d / "chain.pem"),
                    TTL * 2,
                    f"a leaf of the new intermediate in {directory}",
                )
            # -- retire: once the old intermediate's last certificate has expired ------
            _wait(
                lambda: _status(home, "intermediate")["old_issuer_live_certificates"] == 0,
                TTL * 3,
                "the old intermediate's certificates to expire",
            )
            _step(home, "intermediate", "retire")
            assert _status(home, "intermediate")["stage"] == "idle"
            mark = counts()
            _wait(lambda: all_ok_over(mark, 5), 30, "requests after the retire")
            for load in loads:
                load.stop()
            results = {
                name: (load.ok, load.failures)
                for name, load in zip(("python", "node", "java"), loads, strict=True)
            }
            for name, (ok, failures) in results.items():
                assert failures == [], (name, failures[:5])
                assert ok > 20, (name, ok)
            for process in procs:
                assert process.poll() is None, "a process restarted or died"
            assert java.process.poll() is None, "the Java client died"

            # After the retire: a leaf of the retired intermediate is refused, one of the
            # active intermediate still accepted (same root, same service).
            chain, key = _forged_leaf(old_inter, old_key, CLIENT)
            (tmp_path / "forged-chain.pem").write_bytes(chain)
            (tmp_path / "forged-key.pem").write_bytes(key)
            refused = _handshake(
                port, tmp_path / "forged-chain.pem", tmp_path / "forged-key.pem", server.bundle
            )
            accepted = _handshake(
                port, py_dir / "chain.pem", py_dir / "key.pem", py_dir / "bundle.pem"
            )
            assert accepted.startswith("HTTP/1.1 200"), accepted
            audit = _cli(home, "audit", "verify")
            assert audit.returncode == 0, audit.stdout + audit.stderr
            # The service refuses it: the intermediate is no longer published (issue 17).
            assert not refused.startswith("HTTP/1.1 200"), refused
            assert refused.startswith(("HTTP/1.1 4", "refused:")), refused
        finally:
            for load in loads:
                load.stop()
            if credentials is not None:
                credentials.stop()
            if java is not None:
                java.close()
            for process in procs:
                stop(process)
