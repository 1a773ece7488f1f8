"""Real non-Python servers on trustmesh identities: nginx, HAProxy, a Node.js `https` server
and a Java `HttpsServer`, each requiring client certificates from our CA and checking the
chain CRL, started from the configs and programs in tests/peers (the same files
docs/runtimes shows), plus a trivial HTTP backend for the two proxies and a client that
opens a new connection per call.

Every server's identity (SPIFFE ID, DNS ``localhost``, IP ``127.0.0.1``) and its chain CRL
file come from a real `trustmesh agent` process against a real `ca serve`: enrolled once
with `agent --once` and a join token from `token create --dns --ip`, then renewed by the
long-running agent, which runs the server's reload (`--exec`) and keeps the CRL file fresh
(`--crl`, `--on-crl`, `--haproxy-socket`). Nothing is issued or signed by hand.

The configs in tests/peers are written for the paths and ports the docs use
(``/run/orders/``, ``127.0.0.1:8443`` in front of ``127.0.0.1:8080``, the OCSP listener on
``127.0.0.1:8081``); :func:`render` replaces exactly those, so what runs is what the docs
show. The agent command lines are kept the same way: :func:`agent_options` gives them as
the docs write them and :func:`render_argv` as they run here."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import shlex
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509

from trustmesh.cli import main

from ._runtimes import PEERS, LineProcess, compile_java, serial_of
from ._server import Server, free_port, running_server, stop
from .conftest import PASSPHRASE

TRUST_DOMAIN = "example.org"
SERVER_ID = "spiffe://example.org/edge/orders"
#: What the docs write; :func:`render` substitutes these.
DOC_DIR = "/run/orders/"
DOC_LISTEN = "127.0.0.1:8443"
DOC_BACKEND = "127.0.0.1:8080"
DOC_OCSP = "127.0.0.1:8081"
DOC_HAPROXY_HOOK = "/etc/haproxy/haproxy-reload.sh"
KINDS = ("nginx", "haproxy", "node", "java")
NEEDS = {
    "nginx": ("nginx",),
    "haproxy": ("haproxy",),
    "node": ("node",),
    "java": ("java", "javac"),
}
#: The servers' certificate lifetime under the long-running agent: renewed every 7-8 s
#: (at 7/12..2/3 of the lifetime), so 50 s of traffic see 5 renewals or more, and a stall
#: of 4 s on a loaded machine still finds the served certificate valid.
RENEWING_TTL = "12s"
#: The first enrollment's lifetime: long enough to start the server and the agent (the
#: agent renews it at 7/12..2/3 of it, then every 7-8 s).
FIRST_TTL = "20s"


def missing(kind: str) -> str | None:
    """Why ``kind`` cannot run here (a binary is missing), or None."""
    absent = [tool for tool in NEEDS[kind] if shutil.which(tool) is None]
    return f"{', '.join(absent)} not installed" if absent else None


def render(
    template: Path, directory: Path, port: int, backend: int, ocsp: int | None = None
) -> str:
    """``template`` with the docs' paths and ports replaced by this run's."""
    text = template.read_text()
    for token in (DOC_DIR, DOC_LISTEN):
        assert token in text, f"{template.name} no longer uses {token}"
    text = text.replace(DOC_DIR, f"{directory}/").replace(DOC_LISTEN, f"127.0.0.1:{port}")
    if ocsp is not None:
        assert DOC_OCSP in text, f"{template.name} no longer uses {DOC_OCSP}"
        text = text.replace(DOC_OCSP, f"127.0.0.1:{ocsp}")
    return text.replace(DOC_BACKEND, f"127.0.0.1:{backend}")


def agent_options(kind: str, *, once: bool) -> list[str]:
    """The `trustmesh agent` options of ``kind``'s server, as docs/runtimes writes them
    (besides --ca, --bundle, --token and --ttl): the first enrollment (``once``), which
    runs before the server starts, or the long-running agent with the server's hooks."""
    options = [
        *("--id", SERVER_ID, "--out", DOC_DIR.rstrip("/")),
        *("--dns", "localhost", "--ip", "127.0.0.1", "--crl", f"{DOC_DIR}chain-crl.pem"),
    ]
    if kind == "nginx" and not once:  # before nginx runs there is nothing to reload
        options += ["--exec", "nginx -s reload", "--on-crl", "nginx -s reload"]
    elif kind == "haproxy":  # the hook writes haproxy.pem, and reloads once HAProxy runs
        options += ["--exec", f"sh {DOC_HAPROXY_HOOK} {DOC_DIR.rstrip('/')}"]
        if not once:
            options += ["--haproxy-socket", f"{DOC_DIR}haproxy.sock"]
    return [*options, "--once"] if once else options


def render_argv(options: list[str], directory: Path, nginx: list[str] | None = None) -> list[str]:
    """:func:`agent_options` for this run: its directory, hook script and nginx command."""
    out = []
    for option in options:
        option = option.replace(DOC_DIR.rstrip("/"), str(directory))
        option = option.replace(DOC_HAPROXY_HOOK, str(PEERS / "haproxy-reload.sh"))
        if nginx is not None and option == "nginx -s reload":
            option = shlex.join([*nginx, "-s", "reload"])
        out.append(option)
    return out


# -- the CA side -----------------------------------------------------------------------


@dataclass
class Mesh:
    """A running `ca serve --ocsp-listen` whose leaves name its CRL and OCSP URLs, plus the
    CLI operations the tests drive (join tokens, one-shot enrollments, revocations)."""

    server: Server
    workdir: Path
    ocsp_port: int
    passphrase_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.passphrase_file = self.workdir / "passphrase"
        self.passphrase_file.write_text(PASSPHRASE.decode() + "\n")

    @property
    def plain(self) -> str:
        """The plain-HTTP OCSP/CRL listener's URL."""
        return f"http://127.0.0.1:{self.ocsp_port}"

    def cli(self, *argv: str) -> str:
        """Run `trustmesh ARGV` in process on the CA home; return what it printed."""
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main([*argv, "--home", str(self.server.home)])
        assert code == 0, f"trustmesh {' '.join(argv)} exited {code}"
        return printed.getvalue()

    def token(self, spiffe_id: str, *sans: str) -> str:
        """`trustmesh token create SPIFFE_ID [--dns NAME] [--ip ADDR]`: a one-use token."""
        return self.cli("token", "create", spiffe_id, *sans).strip()

    def agent_argv(self, *options: str) -> list[str]:
        """`trustmesh agent` against this CA with ``options``."""
        return ["agent", "--ca", self.server.url, "--bundle", str(self.server.bundle), *options]

    def enroll(self, spiffe_id: str, out: Path, *sans: str) -> Path:
        """`trustmesh agent --once` with a new join token allowing ``sans`` (``--dns NAME``,
        ``--ip ADDR``) and asking for them: an identity in ``out``."""
        argv = self.agent_argv("--id", spiffe_id, "--out", str(out), "--once", *sans)
        code = main([*argv, "--token", self.token(spiffe_id, *sans)])
        assert code == 0, f"trustmesh agent --once for {spiffe_id} exited {code}"
        return out

    def revoke(self, ident: Path) -> str:
        """`trustmesh revoke` the certificate in ``ident``; return its serial."""
        serial = serial_of(ident / "cert.pem")
        self.cli("revoke", serial, "--reason", "keyCompromise")
        return serial


@contextmanager
def mesh(workdir: Path) -> Iterator[Mesh]:
    """`ca init --crl-url --ocsp-url` (the plain listener's URLs) and `ca serve
    --ocsp-listen`, on 127.0.0.1."""
    ocsp_port = free_port()
    plain = f"http://127.0.0.1:{ocsp_port}"
    home = workdir / "home"
    (workdir / "passphrase").write_text(PASSPHRASE.decode() + "\n")
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(
            [
                *("ca", "init", "--trust-domain", TRUST_DOMAIN, "--home", str(home)),
                *("--passphrase-file", str(workdir / "passphrase")),
                *("--crl-url", f"{plain}/crl", "--ocsp-url", f"{plain}/"),
            ]
        )
    assert code == 0, "trustmesh ca init failed"
    with running_server(
        home, workdir, extra_args=("--ocsp-listen", f"127.0.0.1:{ocsp_port}")
    ) as server:
        yield Mesh(server, workdir, ocsp_port)


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
    """One started server and the `trustmesh agent` that keeps its identity and CRL fresh.

    ``process`` is the server (nginx and HAProxy: the master process, which stays across
    reloads); ``agent`` the long-running agent, logging to ``agent_log``."""

    kind: str
    port: int
    directory: Path
    crl: Path
    process: subprocess.Popen[str]
    log: Path
    peer: LineProcess | None = None
    agent: subprocess.Popen[str] | None = None
    agent_log: Path | None = None

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


def nginx_command(prefix: Path) -> list[str]:
    """``nginx`` with this run's prefix and main config (what ``nginx`` alone is in the docs)."""
    return ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"]


def start_nginx(
    directory: Path,
    backend_port: int,
    *,
    config: str = "nginx-mtls.conf",
    ocsp: int | None = None,
) -> PeerServer:
    prefix = directory.parent / "nginx"
    prefix.mkdir(exist_ok=True)
    port = free_port()
    (prefix / "mtls.conf").write_text(render(PEERS / config, directory, port, backend_port, ocsp))
    (prefix / "nginx.conf").write_text(NGINX_MAIN.format(prefix=prefix))
    log = prefix / "error.log"
    with log.open("a") as out:
        process = subprocess.Popen(
            nginx_command(prefix), stdout=out, stderr=subprocess.STDOUT, text=True
        )
    _wait(port, process, "nginx", log)
    return PeerServer("nginx", port, directory, directory / "chain-crl.pem", process, log)


def start_haproxy(directory: Path, backend_port: int) -> PeerServer:
    port = free_port()
    config = directory.parent / "haproxy.cfg"
    config.write_text(render(PEERS / "haproxy-mtls.cfg", directory, port, backend_port))
    log = directory.parent / "haproxy.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            ["haproxy", "-W", "-db", "-p", str(directory / "haproxy.pid"), "-f", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    _wait(port, process, "haproxy", log)
    deadline = time.monotonic() + 30  # the agent checks the runtime API at its start
    while not (directory / "haproxy.sock").exists():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return PeerServer("haproxy", port, directory, directory / "chain-crl.pem", process, log)


def _start_line_peer(kind: str, argv: list[str], directory: Path) -> PeerServer:
    running = LineProcess(argv)
    line = running.expect("listening ", timeout=90)
    port = int(line.split()[1])
    log = directory.parent / f"{kind}.log"
    return PeerServer(
        kind, port, directory, directory / "chain-crl.pem", running.process, log, running
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


def start_agent(mesh: Mesh, argv: list[str], log: Path) -> subprocess.Popen[str]:
    """A long-running `python -m trustmesh agent` process; returns once it follows the
    revocation feed (so a revocation from now on reaches its --crl file)."""
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "trustmesh", *mesh.agent_argv(*argv), "--log-level", "info"],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    deadline = time.monotonic() + 60
    while "revocation set bootstrapped" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"trustmesh agent did not start: {log.read_text()}")
        time.sleep(0.1)
    return process


def close(server: PeerServer) -> None:
    if server.agent is not None:
        stop(server.agent)
    if server.peer is not None:
        server.peer.close()
    else:
        stop(server.process)


def start_server(
    mesh: Mesh,
    kind: str,
    workdir: Path,
    backend_port: int,
    *,
    ttl: str = RENEWING_TTL,
    first_ttl: str = FIRST_TTL,
) -> PeerServer:
    """Enroll ``kind``'s identity with `agent --once` (a token allowing DNS localhost and IP
    127.0.0.1), start the server on it, then the long-running agent with its hooks."""
    # not created here: the first agent creates --out, the --crl file's directory (as the
    # docs run it, with no `install -d`)
    directory = workdir / kind / "id"
    nginx = nginx_command(workdir / kind / "nginx") if kind == "nginx" else None
    if kind == "java":  # before the enrollment: the first certificate's clock runs
        classes = compile_java(PEERS / "RevocationServer.java", workdir / "java-classes")
    grant = mesh.token(SERVER_ID, "--dns", "localhost", "--ip", "127.0.0.1")
    once = render_argv(agent_options(kind, once=True), directory, nginx)
    code = main([*mesh.agent_argv(*once), "--token", grant, "--ttl", first_ttl])
    assert code == 0, f"trustmesh agent --once for {kind} exited {code}"
    assert (directory / "chain-crl.pem").exists()
    if kind == "nginx":
        running = start_nginx(directory, backend_port)
    elif kind == "haproxy":
        running = start_haproxy(directory, backend_port)
    elif kind == "node":
        running = start_node(directory, backend_port)
    else:
        running = start_java(directory, backend_port, classes)
    try:
        argv = render_argv(agent_options(kind, once=False), directory, nginx)
        running.agent_log = workdir / kind / "agent.log"
        running.agent = start_agent(mesh, [*argv, "--ttl", ttl], running.agent_log)
    except BaseException:
        close(running)
        raise
    return running


@contextmanager
def peer_servers(
    mesh: Mesh, workdir: Path, *, ttl: str = RENEWING_TTL
) -> Iterator[dict[str, PeerServer | str]]:
    """Start every server whose binaries are installed, each with its own agent-managed
    identity (``SERVER_ID`` with DNS ``localhost`` and IP ``127.0.0.1``) and chain CRL.
    Yields kind -> server, or kind -> why it was skipped."""
    started: dict[str, PeerServer | str] = {}
    with ExitStack() as stack:
        port = stack.enter_context(backend())
        for kind in KINDS:
            reason = missing(kind)
            if reason is not None:
                started[kind] = reason
                continue
            running = start_server(mesh, kind, workdir, port, ttl=ttl)
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
