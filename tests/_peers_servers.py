"""Real non-Python servers on trustmesh identities: nginx, HAProxy, a Node.js `https` server
and a Java `HttpsServer`, each requiring client certificates from our CA and checking the
chain CRL, started from the configs and programs in tests/peers (the same files
docs/runtimes shows), plus a trivial HTTP backend for the two proxies and a client that
opens a new connection per call.

The configs in tests/peers are written for the paths and ports the docs use
(``/run/orders/``, ``127.0.0.1:8443`` in front of ``127.0.0.1:8080``); :func:`render`
replaces exactly those, so what runs is what the docs show."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from base64 import b64decode
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.cli import main
from trustmesh.pki import build_crl, load_private_key

from ._runtimes import PEERS, LineProcess, compile_java, serial_of
from ._server import Server, free_port, stop
from .conftest import PASSPHRASE

TRUST_DOMAIN = "example.org"
SERVER_ID = "spiffe://example.org/edge/orders"
#: What the docs write; :func:`render` substitutes these.
DOC_DIR = "/run/orders/"
DOC_LISTEN = "127.0.0.1:8443"
DOC_BACKEND = "127.0.0.1:8080"
KINDS = ("nginx", "haproxy", "node", "java")
NEEDS = {
    "nginx": ("nginx",),
    "haproxy": ("haproxy", "socat"),
    "node": ("node",),
    "java": ("java", "javac"),
}


def missing(kind: str) -> str | None:
    """Why ``kind`` cannot run here (a binary is missing), or None."""
    absent = [tool for tool in NEEDS[kind] if shutil.which(tool) is None]
    return f"{', '.join(absent)} not installed" if absent else None


def render(template: Path, directory: Path, port: int, backend: int) -> str:
    """``template`` with the docs' paths and ports replaced by this run's."""
    text = template.read_text()
    for token in (DOC_DIR, DOC_LISTEN):
        assert token in text, f"{template.name} no longer uses {token}"
    text = text.replace(DOC_DIR, f"{directory}/").replace(DOC_LISTEN, f"127.0.0.1:{port}")
    return text.replace(DOC_BACKEND, f"127.0.0.1:{backend}")


# -- the CA side -----------------------------------------------------------------------


@dataclass
class Mesh:
    """A running `ca serve` plus the CLI operations the tests drive (issue, revoke, CRL)."""

    server: Server
    workdir: Path
    passphrase_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.passphrase_file = self.workdir / "passphrase"
        self.passphrase_file.write_text(PASSPHRASE.decode() + "\n")

    def cli(self, *argv: str) -> None:
        code = main([*argv, "--home", str(self.server.home)])
        assert code == 0, f"trustmesh {' '.join(argv)} exited {code}"

    def issue(
        self, spiffe_id: str, out: Path, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()
    ) -> Path:
        """`trustmesh issue` into a staging directory, then renamed into ``out`` file by
        file, the way the agent replaces its files (chain and cert before the key)."""
        staging = out.parent / f".{out.name}.new"
        shutil.rmtree(staging, ignore_errors=True)
        names = [arg for name in dns for arg in ("--dns", name)]
        names += [arg for ip in ips for arg in ("--ip", ip)]
        self.cli(
            *("issue", spiffe_id, "--out", str(staging), *names),
            *("--passphrase-file", str(self.passphrase_file)),
        )
        out.mkdir(parents=True, exist_ok=True)
        for name in ("bundle.pem", "cert.pem", "chain.pem", "key.pem"):
            os.replace(staging / name, out / name)
        staging.rmdir()
        return out

    def revoke(self, ident: Path) -> str:
        """`trustmesh revoke` the certificate in ``ident``; return its serial."""
        serial = serial_of(ident / "cert.pem")
        self.cli("revoke", serial, "--reason", "keyCompromise")
        return serial

    def write_chain_crl(self, path: Path) -> None:
        """Write the chain CRL (PEM): `trustmesh crl --pem` (the intermediate's) followed by
        a root-signed CRL of the intermediate, atomically.

        Interim until `trustmesh crl --chain --pem` lands: nginx, HAProxy and Node check
        every certificate of the chain and refuse all clients without the root's CRL."""
        leaf = path.parent / f".{path.name}.leaf"
        self.cli(
            *("crl", "--pem", "--out", str(leaf)),
            *("--passphrase-file", str(self.passphrase_file)),
        )
        home = self.server.home
        root = x509.load_pem_x509_certificate((home / "root.pem").read_bytes())
        root_key = load_private_key((home / "root.key").read_bytes(), PASSPHRASE)
        now = datetime.now(UTC) - timedelta(minutes=1)
        root_crl = build_crl(root, root_key, [], number=int(time.time()), now=now)
        tmp = path.parent / f".{path.name}.tmp"
        tmp.write_bytes(leaf.read_bytes() + root_crl.public_bytes(serialization.Encoding.PEM))
        leaf.unlink()
        os.replace(tmp, path)


# -- a backend for the proxies ---------------------------------------------------------


def caller_of(header: str) -> tuple[str, str]:
    """The SPIFFE ID and serial (hex) of a forwarded client certificate: URL-encoded PEM
    (nginx ``$ssl_client_escaped_cert``) or base64 DER (HAProxy ``ssl_c_der,base64``)."""
    if header.startswith(("-----", "%2D")):
        cert = x509.load_pem_x509_certificate(urllib.parse.unquote(header).encode())
    else:
        cert = x509.load_der_x509_certificate(b64decode(header))
    uris = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0], format(cert.serial_number, "x")


class _Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        header = self.headers.get("X-Client-Cert", "")
        if header:
            caller, serial = caller_of(header)
            body = json.dumps({"caller": caller, "serial": serial}).encode()
            status = 200
        else:
            body, status = b'{"error": "no client certificate forwarded"}', 403
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _BackendServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # a proxy closing its idle upstream connection is not an error of the test
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@contextmanager
def backend() -> Iterator[int]:
    """The plain HTTP service behind nginx and HAProxy, on 127.0.0.1; yields its port."""
    httpd = _BackendServer(("127.0.0.1", 0), _Backend)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- the servers -----------------------------------------------------------------------


@dataclass
class PeerServer:
    """One started server: its kind, port, identity directory and CRL file.

    ``reload`` is what runs after new files are in place (the agent's ``--exec`` /
    ``--on-crl``): nginx reloads, HAProxy takes them through its runtime API, Node and
    Java watch the files themselves (None)."""

    kind: str
    port: int
    directory: Path
    crl: Path
    process: subprocess.Popen[str]
    reload: list[str] | None
    log: Path
    peer: LineProcess | None = None

    def run_reload(self) -> None:
        if self.reload is None:
            return
        done = subprocess.run(self.reload, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, f"{self.kind} reload failed: {done.stdout}{done.stderr}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def url(self, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}/"


def _wait(port: int, server: subprocess.Popen[str], what: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                text = log.read_text() if log.exists() else ""
                raise RuntimeError(f"{what} did not start: {text}") from None
            time.sleep(0.05)


NGINX_MAIN = """\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/mtls.conf;
}}
"""


def start_nginx(directory: Path, backend_port: int) -> PeerServer:
    prefix = directory.parent / "nginx"
    prefix.mkdir()
    port = free_port()
    (prefix / "mtls.conf").write_text(
        render(PEERS / "nginx-mtls.conf", directory, port, backend_port)
    )
    (prefix / "nginx.conf").write_text(NGINX_MAIN.format(prefix=prefix))
    base = ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"]
    log = prefix / "error.log"
    with log.open("a") as out:
        process = subprocess.Popen(base, stdout=out, stderr=subprocess.STDOUT, text=True)
    _wait(port, process, "nginx", log)
    return PeerServer(
        "nginx", port, directory, directory / "chain-crl.pem", process, [*base, "-s", "reload"], log
    )


def start_haproxy(directory: Path, backend_port: int) -> PeerServer:
    port = free_port()
    config = directory.parent / "haproxy.cfg"
    config.write_text(render(PEERS / "haproxy-mtls.cfg", directory, port, backend_port))
    update = [
        "sh",
        str(PEERS / "haproxy-update.sh"),
        str(directory),
        str(directory / "haproxy.sock"),
    ]
    # the hook's first half (the combined file) before the start; then it talks to the socket
    combined = (directory / "chain.pem").read_bytes() + (directory / "key.pem").read_bytes()
    (directory / "haproxy.pem").write_bytes(combined)
    (directory / "haproxy.pem").chmod(0o600)
    for name in ("haproxy.pem", "chain-crl.pem"):  # what the hook would have handed over
        with (directory / name).open("rb") as src, (directory / f"{name}.pushed").open("wb") as dst:
            subprocess.run(["cksum"], stdin=src, stdout=dst, check=True)
    log = directory.parent / "haproxy.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            ["haproxy", "-W", "-db", "-p", str(directory / "haproxy.pid"), "-f", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    _wait(port, process, "haproxy", log)
    return PeerServer("haproxy", port, directory, directory / "chain-crl.pem", process, update, log)


def _start_line_peer(kind: str, argv: list[str], directory: Path) -> PeerServer:
    running = LineProcess(argv)
    line = running.expect("listening ", timeout=90)
    port = int(line.split()[1])
    log = directory.parent / f"{kind}.log"
    return PeerServer(
        kind, port, directory, directory / "chain-crl.pem", running.process, None, log, running
    )


def start_node(directory: Path, backend_port: int) -> PeerServer:
    argv = ["node", str(PEERS / "crl_server.js"), str(directory), str(directory / "chain-crl.pem")]
    return _start_line_peer("node", argv, directory)


def start_java(directory: Path, backend_port: int, classes: Path) -> PeerServer:
    argv = [
        *("java", "-XX:TieredStopAtLevel=1", "-cp", str(classes), "RevocationServer"),
        *(str(directory), str(directory / "chain-crl.pem"), TRUST_DOMAIN),
    ]
    return _start_line_peer("java", argv, directory)


def close(server: PeerServer) -> None:
    if server.peer is not None:
        server.peer.close()
    else:
        stop(server.process)


@contextmanager
def peer_servers(mesh: Mesh, workdir: Path) -> Iterator[dict[str, PeerServer | str]]:
    """Start every server whose binaries are installed, each with its own identity
    (``SERVER_ID`` with DNS ``localhost`` and IP ``127.0.0.1``) and chain CRL. Yields
    kind -> server, or kind -> why it was skipped."""
    started: dict[str, PeerServer | str] = {}
    with ExitStack() as stack:
        port = stack.enter_context(backend())
        for kind in KINDS:
            reason = missing(kind)
            if reason is not None:
                started[kind] = reason
                continue
            directory = mesh.issue(
                SERVER_ID, workdir / kind / "id", dns=("localhost",), ips=("127.0.0.1",)
            )
            mesh.write_chain_crl(directory / "chain-crl.pem")
            if kind == "nginx":
                running = start_nginx(directory, port)
            elif kind == "haproxy":
                running = start_haproxy(directory, port)
            elif kind == "node":
                running = start_node(directory, port)
            else:
                classes = compile_java(PEERS / "RevocationServer.java", workdir / "java-classes")
                running = start_java(directory, port, classes)
            stack.callback(close, running)
            started[kind] = running
        yield started


def require(servers: dict[str, PeerServer | str], kind: str) -> PeerServer:
    """The started server of ``kind``, or skip the test with the reason it is missing."""
    server = servers[kind]
    if isinstance(server, str):
        pytest.skip(f"{kind}: {server}")
    return server


# -- the client ------------------------------------------------------------------------


class Client:
    """Calls a server with one identity, a new TLS connection per call, host names checked."""

    def __init__(self, ident: Path, bundle: Path) -> None:
        self.context = ssl.create_default_context(cafile=str(bundle))
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(ident / "chain.pem", ident / "key.pem")

    def get(self, server: PeerServer, host: str = "127.0.0.1") -> tuple[int, dict[str, str]]:
        """One GET on a new connection: (status, JSON body); raises OSError when refused."""
        status, body, _ = self.call(server, host)
        return status, body

    def call(self, server: PeerServer, host: str = "127.0.0.1") -> tuple[int, dict[str, str], str]:
        """:meth:`get`, plus the serial (hex) of the certificate the server presented."""
        conn = http.client.HTTPSConnection(host, server.port, context=self.context, timeout=10)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            presented = conn.sock.getpeercert(binary_form=True)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        assert presented is not None
        serial = format(x509.load_der_x509_certificate(presented).serial_number, "x")
        try:
            return response.status, json.loads(body), serial
        except ValueError:
            return response.status, {"raw": body.decode(errors="replace")}, serial

    def refused(self, server: PeerServer) -> bool:
        """True when the server refuses this client: a TLS alert or reset, or (nginx,
        which completes the handshake and answers 400) an error status without the service."""
        try:
            status, _ = self.get(server)
        except (OSError, http.client.HTTPException):
            return True
        return status == 400


def wait_until(check: Callable[[], bool], timeout: float, step: float = 0.05) -> float | None:
    """Seconds until ``check()`` holds, or None after ``timeout``."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        time.sleep(step)
