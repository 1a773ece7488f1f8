"""``make demo``: the CA end to end on embedded defaults.

In a fresh temporary ``TRUSTMESH_HOME`` it runs the real CLI to create a CA and
issue two identities, makes an HTTP call over mutual TLS between a tiny stdlib
server and client using them, revokes the client, and shows the next handshake
being refused because the server checks the CRL. Act two runs the CA as a
service (join tokens, the agent, renewal, the revocation feed, CRL, OCSP); act
three runs the identity server and checks its tokens with ``token verify``. Act four
runs the two example services of ``examples/`` under ``trustmesh run``: an allowed
call chain, a policy denial, a rotation during traffic, a revoked caller refused on
its open connection.
Every step is printed.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import secrets
import shlex
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from dataclasses import dataclass
from html.parser import HTMLParser
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from trustmesh.cli import main as cli_main
from trustmesh.errors import VerificationError
from trustmesh.pki import load_pem_certificates, verify_chain

TRUST_DOMAIN = "demo.example"


def say(text: str) -> None:
    print(text, flush=True)


def trustmesh(*argv: str, show: bool = True) -> str:
    """Run one CLI command in-process, print it like a shell would, return stdout."""
    say(f"\n$ trustmesh {shlex.join(argv)}")
    buffer = StringIO()
    with redirect_stdout(buffer):
        code = cli_main(list(argv))
    if show:
        say(buffer.getvalue().rstrip())
    if code != 0:
        raise SystemExit(f"demo: 'trustmesh {shlex.join(argv)}' failed with exit code {code}")
    return buffer.getvalue()


class TinyServer:
    """A one-connection-at-a-time HTTPS server that requires client certificates.

    It answers ``GET /whoami`` with the caller's verified SPIFFE ID, and keeps the
    server-side outcome of each handshake in :attr:`outcomes`.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        intermediates: list[x509.Certificate],
        roots: list[x509.Certificate],
    ) -> None:
        self.context = context
        self.intermediates = intermediates
        self.roots = roots
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.outcomes: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            raw.settimeout(5)
            try:
                with self.context.wrap_socket(raw, server_side=True) as conn:
                    self._handle(conn)
            except ssl.SSLCertVerificationError as exc:
                self.outcomes.append(f"refused: {exc.verify_message}")
            except ssl.SSLError as exc:
                self.outcomes.append(f"refused: {exc.reason or exc}")
            except OSError as exc:
                self.outcomes.append(f"error: {exc}")

    def _handle(self, conn: ssl.SSLSocket) -> None:
        der = conn.getpeercert(binary_form=True)
        if der is None:  # pragma: no cover - CERT_REQUIRED makes this impossible
            raise ssl.SSLError("no client certificate")
        leaf = x509.load_der_x509_certificate(der)
        try:
            caller = str(verify_chain(leaf, self.intermediates, self.roots, usage="client"))
            status, body = "200 OK", json.dumps({"caller": caller})
        except VerificationError as exc:
            status, body = "403 Forbidden", json.dumps({"error": exc.message})
        conn.recv(65536)
        conn.sendall(
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode()
        )
        self.outcomes.append(f"accepted: {status}")

    def close(self) -> None:
        self.sock.close()


def server_context(out: Path, home: Path, crl_file: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(out / "chain.pem", out / "key.pem")
    ctx.load_verify_locations(cafile=str(home / "root.pem"))
    # The intermediate must be known to check the CRL it signed.
    ctx.load_verify_locations(cafile=str(home / "intermediate.pem"))
    if crl_file is not None:
        ctx.load_verify_locations(cafile=str(crl_file))  # OpenSSL loads CRLs from it too
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_context(out: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(out / "chain.pem", out / "key.pem")
    ctx.load_verify_locations(cafile=str(out / "bundle.pem"))
    return ctx


def call(port: int, ctx: ssl.SSLContext) -> str:
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=5)
    try:
        conn.request("GET", "/whoami")
        response = conn.getresponse()
        return f"{response.status} {response.read().decode()}"
    except (ssl.SSLError, ConnectionError, http.client.HTTPException) as exc:
        return f"failed: {exc}"
    finally:
        conn.close()


def run(workdir: Path) -> int:
    home = workdir / "home"
    os.environ["TRUSTMESH_HOME"] = str(home)
    os.environ["TRUSTMESH_CA_PASSPHRASE"] = secrets.token_urlsafe(24)
    say(f"trustmesh demo in {workdir}")
    say("TRUSTMESH_HOME and a random TRUSTMESH_CA_PASSPHRASE are set for this run only.")

    say("\n== 1. Create the certificate authority")
    trustmesh("ca", "init", "--trust-domain", TRUST_DOMAIN)

    say("\n== 2. Issue two service identities (keys are generated here, never stored)")
    server_dir, client_dir = workdir / "orders", workdir / "billing"
    trustmesh(
        "issue",
        f"spiffe://{TRUST_DOMAIN}/orders",
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
        "--ttl",
        "1h",
        "--out",
        str(server_dir),
    )
    issued = json.loads(
        trustmesh(
            "issue",
            f"spiffe://{TRUST_DOMAIN}/billing",
            "--ttl",
            "1h",
            "--out",
            str(client_dir),
            "--json",
            show=False,
        )
    )
    say(f"issued {issued['spiffe_id']} serial {issued['serial']} into {client_dir}")

    roots = load_pem_certificates((home / "root.pem").read_bytes())
    intermediates = load_pem_certificates((home / "intermediate.pem").read_bytes())

    say("\n== 3. billing calls orders over mutual TLS")
    crl_file = workdir / "crl.pem"
    trustmesh("crl", "--pem", "--out", str(crl_file))
    server = TinyServer(server_context(server_dir, home, crl_file), intermediates, roots)
    first = call(server.port, client_context(client_dir))
    say(f"billing -> orders: {first}")

    say("\n== 4. Revoke billing's certificate and publish a new CRL")
    trustmesh("revoke", issued["serial"], "--reason", "keyCompromise")
    trustmesh("crl", "--pem", "--out", str(crl_file))
    server.context = server_context(server_dir, home, crl_file)

    say("\n== 5. billing calls again: the server refuses the handshake")
    second = call(server.port, client_context(client_dir))
    say(f"billing -> orders: {second}")
    server.close()
    server.thread.join(timeout=5)
    say(f"server saw: {server.outcomes}")

    say("\n== 6. The audit log recorded every step, hash-chained")
    trustmesh("audit", "tail", "-n", "10")
    trustmesh("audit", "verify")

    ok = first.startswith("200") and '"caller"' in first and second.startswith("failed")
    ok = ok and any("revoked" in o for o in server.outcomes)
    service = run_service_act(workdir, home)
    identity = run_identity_act(workdir)
    examples, edge = run_examples_act(workdir)
    say("\n== What happened")
    say(f"- a CA for {TRUST_DOMAIN} was created with encrypted keys in {home}")
    say("- two identities were issued; billing called orders over mTLS and was identified as")
    say(f"  {json.loads(first.split(' ', 1)[1])['caller'] if first.startswith('200') else '?'}")
    say("- billing was revoked; with the new CRL the server refused its next handshake")
    say("- the audit chain verifies")
    say("- the CA ran as a service: two agents enrolled with one-time join tokens, one renewed by")
    say(f"  itself ({service.get('renewal', '?')}), and the revocation of payments reached a feed")
    latency = service.get("latency", "?")
    say(f"  subscriber {latency} after the revoke call; CRL and OCSP say revoked")
    say("- the identity server issued a machine token; `token verify` accepted it for orders,")
    say("  refused it for billing (wrong audience) and refused it again once it was revoked")
    say("- the example services ran under `trustmesh run`: frontend -> orders (Flask) ->")
    say("  inventory (FastAPI) was allowed and each saw its caller; frontend -> inventory was")
    say(f"  denied by policy; {examples.get('requests', '?')} requests ran while both certificates")
    say("  rotated, with zero failures; after frontend was revoked, its open keep-alive")
    latency = examples.get("latency", "?")
    say(f"  connection was refused {latency} after the revoke command returned")
    say("- the edge gateway checked alice's token (from the login page) and called orders over")
    say("  mTLS with its own identity; orders and inventory both verified her same token; too")
    say("  little scope, an expired token, a forged token and a blocked address were refused at")
    refusals = edge.get("refusals", "?")
    say(f"  the door ({refusals} of 4 with the expected reason, in the gateway's log)")
    ok = ok and bool(service.get("ok")) and bool(identity.get("ok")) and bool(examples.get("ok"))
    ok = ok and bool(edge.get("ok"))
    say("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def command(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a trustmesh command as its own process, printing it like a shell would."""
    say(f"\n$ trustmesh {shlex.join(argv)}")
    result = subprocess.run(
        [sys.executable, "-m", "trustmesh", *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.stdout.strip():
        say(result.stdout.rstrip())
    if result.returncode != 0:
        raise SystemExit(f"demo: command failed ({result.returncode}): {result.stderr.strip()}")
    return result


def serial_of(directory: Path) -> str:
    cert = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
    return format(cert.serial_number, "x")


def run_service_act(workdir: Path, home: Path) -> dict[str, object]:
    """Act two: `ca serve`, agents, a renewal, the revocation feed, CRL and OCSP."""
    result: dict[str, object] = {}
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    bundle = workdir / "bundle.pem"
    trustmesh("export", "bundle", "--out", str(bundle))
    ops = workdir / "ops"
    trustmesh("issue", f"spiffe://{TRUST_DOMAIN}/ops", "--ttl", "1h", "--out", str(ops), show=False)
    say(f"(issued spiffe://{TRUST_DOMAIN}/ops into {ops}: the operator's admin identity)")

    say("\n== 7. Run the CA as a service")
    argv = [
        "ca",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--admin",
        f"spiffe://{TRUST_DOMAIN}/ops",
    ]
    say(f"\n$ trustmesh {shlex.join(argv)} &")
    log = (workdir / "ca-serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "trustmesh", *argv, "--log-level", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    agent: subprocess.Popen[bytes] | None = None
    try:
        ctx = ssl.create_default_context(cafile=str(bundle))
        ctx.load_cert_chain(ops / "chain.pem", ops / "key.pem")
        http = httpx.Client(base_url=url, verify=ctx, timeout=10)
        deadline = time.monotonic() + 30
        while True:
            try:
                if http.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("demo: ca serve did not start; see ca-serve.log")
        say(f"ready: {http.get('/readyz').json()}")

        say("\n== 8. Two services enroll with one-time join tokens, through the agent")
        dirs = {}
        for name in ("payments", "inventory"):
            spiffe_id = f"spiffe://{TRUST_DOMAIN}/{name}"
            token = command("token", "create", spiffe_id, "--ttl", "5m").stdout.strip()
            dirs[name] = workdir / name
            command(
                "agent",
                "--ca",
                url,
                "--id",
                spiffe_id,
                "--out",
                str(dirs[name]),
                "--bundle",
                str(bundle),
                "--token",
                token,
                "--once",
                "--ttl",
                "1h",
            )
        replay = subprocess.run(
            [
                sys.executable,
                "-m",
                "trustmesh",
                "agent",
                "--ca",
                url,
                "--id",
                f"spiffe://{TRUST_DOMAIN}/payments",
                "--out",
                str(workdir / "thief"),
                "--bundle",
                str(bundle),
                "--token",
                token,
                "--once",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        say(f"replaying a used token: exit {replay.returncode}: {replay.stderr.strip()}")

        say("\n== 9. inventory's agent keeps running and renews by itself (6 s certificates)")
        agent_argv = [
            "agent",
            "--ca",
            url,
            "--id",
            f"spiffe://{TRUST_DOMAIN}/inventory",
            "--out",
            str(dirs["inventory"]),
            "--ttl",
            "6s",
            "--renew-now",
        ]
        say(f"\n$ trustmesh {shlex.join(agent_argv)} &")
        before = serial_of(dirs["inventory"])
        agent = subprocess.Popen(
            [sys.executable, "-m", "trustmesh", *agent_argv, "--log-level", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        seen = [before]
        deadline = time.monotonic() + 20
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
            current = serial_of(dirs["inventory"])
            if current != seen[-1]:
                seen.append(current)
                say(f"inventory renewed: serial {seen[-2][:12]}… -> {current[:12]}…")
        result["renewal"] = (
            f"{len(seen) - 1} renewals in {20 - max(0, deadline - time.monotonic()):.0f} s"
        )

        say("\n== 10. Subscribe to the revocation feed, then revoke payments through the server")
        events: list[tuple[float, dict[str, object]]] = []
        opened = threading.Event()

        cursor = http.get("/v1/revocations").json()["cursor"]  # only what happens from now on

        def subscribe() -> None:
            with http.stream(
                "GET", "/v1/revocations/stream", params={"since": cursor}, timeout=None
            ) as response:
                opened.set()
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append((time.monotonic(), json.loads(line[6:])))
                        return

        threading.Thread(target=subscribe, daemon=True).start()
        opened.wait(10)
        payments_serial = serial_of(dirs["payments"])
        say(
            f"\n$ trustmesh revoke --ca {url} --cert {ops / 'chain.pem'} --key "
            f"{ops / 'key.pem'} --bundle {bundle} {payments_serial} --reason keyCompromise"
        )
        say("(sent here as the same POST /v1/revoke over mTLS, to time the feed precisely)")
        start = time.monotonic()
        revoked = http.post(
            "/v1/revoke", json={"serial": payments_serial, "reason": "keyCompromise"}
        )
        say(f"{revoked.status_code}: revoked {revoked.json()['revoked'][0]['spiffe_id']}")
        deadline = time.monotonic() + 5
        while not events and time.monotonic() < deadline:
            time.sleep(0.01)
        if events:
            arrived, event = events[0]
            result["latency"] = f"{(arrived - start) * 1000:.0f} ms"
            say(f"feed event: {event}  ({result['latency']} after the revoke request was sent)")

        say("\n== 11. The CRL and the OCSP responder say revoked")
        crl = x509.load_der_x509_crl(http.get("/v1/crl").content)
        listed = crl.get_revoked_certificate_by_serial_number(int(payments_serial, 16)) is not None
        say(f"GET /v1/crl: serial {payments_serial[:12]}… listed: {listed}")
        leaf = x509.load_pem_x509_certificate((dirs["payments"] / "cert.pem").read_bytes())
        issuer = x509.load_pem_x509_certificate((home / "intermediate.pem").read_bytes())
        request = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(leaf, issuer, hashes.SHA256())
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        answer = ocsp.load_der_ocsp_response(
            http.post(
                "/v1/ocsp", content=request, headers={"Content-Type": "application/ocsp-request"}
            ).content
        )
        status = answer.certificate_status.name
        say(f"POST /v1/ocsp: {status} (reason {answer.revocation_reason})")
        result["ok"] = (
            replay.returncode != 0
            and len(seen) >= 2
            and bool(events)
            and listed
            and status == "REVOKED"
        )
        http.close()
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(timeout=15)
        server.terminate()
        server.wait(timeout=20)
        log.close()
    return result


def attempt(
    *argv: str, stdin: str | None = None, shown: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run a trustmesh command that may be refused; print its output and exit code."""
    say(f"\n$ {shown}trustmesh {shlex.join(argv)}")
    result = subprocess.run(
        [sys.executable, "-m", "trustmesh", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    for stream in (result.stdout, result.stderr):
        if stream.strip():
            say(stream.rstrip())
    say(f"(exit {result.returncode})")
    return result


def run_identity_act(workdir: Path) -> dict[str, object]:
    """Act three: `idp serve`, a machine client's token, `token verify`, revocation."""
    result: dict[str, object] = {}
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    bundle = workdir / "bundle.pem"

    say("\n== 12. Run the identity server (OAuth 2.0 / OpenID Connect)")
    argv = ["idp", "serve", "--listen", f"127.0.0.1:{port}"]
    say(f"\n$ trustmesh {shlex.join(argv)} &")
    log = (workdir / "idp-serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "trustmesh", *argv, "--log-level", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        http = httpx.Client(verify=ssl.create_default_context(cafile=str(bundle)), timeout=10)
        deadline = time.monotonic() + 30
        while True:
            try:
                if http.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("demo: idp serve did not start; see idp-serve.log")
        discovery = http.get(f"{url}/.well-known/openid-configuration").json()
        say(f"issuer {discovery['issuer']}, grants {', '.join(discovery['grant_types_supported'])}")

        say("\n== 13. A machine client gets an access token (client_credentials)")
        client = json.loads(
            command(
                "idp",
                "client",
                "add",
                "reports",
                "--scope",
                "orders:read",
                "--audience",
                "orders",
                "--json",
            ).stdout
        )
        answer = http.post(
            f"{url}/token",
            auth=(client["client_id"], client["client_secret"]),
            data={"grant_type": "client_credentials", "scope": "orders:read"},
        )
        token = answer.json()["access_token"]
        say(f"POST /token: {answer.status_code}, a {answer.json()['expires_in']} s JWT: TOKEN=")
        say(f"  {token[:48]}…")

        say("\n== 14. orders verifies it; billing (another audience) refuses it")
        common = ("--issuer", url, "--ca-bundle", str(bundle))
        pipe = {"stdin": token, "shown": 'echo "$TOKEN" | '}
        accepted = attempt("token", "verify", "-", "--audience", "orders", *common, **pipe)
        wrong = attempt("token", "verify", "-", "--audience", "billing", *common, **pipe)

        say("\n== 15. Revoke the token: verifiers see it on the revocation list")
        revoked = http.post(
            f"{url}/revoke",
            auth=(client["client_id"], client["client_secret"]),
            data={"token": token, "token_type_hint": "access_token"},
        )
        listed = http.get(f"{url}/revoked").json()["revoked"]
        say(f"POST /revoke: {revoked.status_code}; GET /revoked: {listed}")
        after = attempt("token", "verify", "-", "--audience", "orders", *common, **pipe)
        result["ok"] = (
            accepted.returncode == 0
            and wrong.returncode == 1
            and "bad_audience" in wrong.stderr + wrong.stdout
            and after.returncode == 1
            and "revoked" in after.stderr + after.stdout
        )
        http.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()
    return result


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@dataclass
class Answer:
    """A response read in full, with what its connection showed while it was open."""

    status: int
    headers: httpx.Headers
    body: dict[str, Any]
    server_serial: str  # the serial (hex) of the certificate the server presented
    local_port: int  # the client side of the connection: same port, same connection


def fetch(client: httpx.Client, path: str) -> Answer:
    """GET PATH; note the server's certificate and the connection before it can close."""
    with client.stream("GET", path) as response:
        stream = response.extensions["network_stream"]
        der = stream.get_extra_info("ssl_object").getpeercert(True)
        port: int = stream.get_extra_info("client_addr")[1]
        response.read()
    serial = format(x509.load_der_x509_certificate(der).serial_number, "x")
    return Answer(response.status_code, response.headers, response.json(), serial, port)


class ExampleMesh:
    """The two example services of ``examples/`` under ``trustmesh run``, for real.

    Against an initialized CA home (``TRUSTMESH_HOME`` and the passphrase in ``env``) it
    starts ``trustmesh ca serve``, enrolls ``inventory``, ``orders`` and ``frontend``
    with join tokens through ``trustmesh agent --once``, and runs inventory (FastAPI)
    and orders (Flask) under ``trustmesh run`` with their policies and the CA's
    revocation feed. Every part is a separate process started from the CLI.
    """

    def __init__(self, workdir: Path, env: dict[str, str], *, echo: bool = True) -> None:
        self.workdir = workdir
        self.env = env
        self.echo = echo
        self.processes: list[subprocess.Popen[bytes]] = []
        self.named: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.bundle = workdir / "mesh-bundle.pem"
        self.ops = workdir / "mesh-ops"
        self.dirs: dict[str, Path] = {}
        self.urls: dict[str, str] = {}
        self.ca_url = ""

    def say(self, text: str) -> None:
        if self.echo:
            say(text)

    def cli(self, *argv: str, show: bool = True) -> str:
        """Run a trustmesh command as its own process; return its stdout."""
        if show:
            self.say(f"\n$ trustmesh {shlex.join(argv)}")
        result = subprocess.run(
            [sys.executable, "-m", "trustmesh", *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            env=self.env,
        )
        if show and result.stdout.strip():
            self.say(result.stdout.rstrip())
        if result.returncode != 0:
            raise RuntimeError(f"trustmesh {shlex.join(argv)} failed: {result.stderr.strip()}")
        return result.stdout

    def spawn(self, name: str, *argv: str, env: dict[str, str] | None = None) -> None:
        self.say(f"\n$ trustmesh {shlex.join(argv)} &")
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "trustmesh", *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
            )
        self.processes.append(process)
        self.named[name] = process

    def halt(self, name: str, *, kill: bool = False) -> None:
        """Stop the process NAME (SIGTERM, or SIGKILL with KILL) and wait for it."""
        process = self.named[name]
        if process.poll() is None:
            process.kill() if kill else process.terminate()
        process.wait(timeout=20)

    def log_text(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def start_ca(self) -> None:
        self.cli("export", "bundle", "--out", str(self.bundle), show=False)
        ops_id = f"spiffe://{TRUST_DOMAIN}/ops"
        self.cli("issue", ops_id, "--ttl", "1h", "--out", str(self.ops), show=False)
        port = free_port()
        self.ca_url = f"https://127.0.0.1:{port}"
        self.spawn(
            "ca",
            "ca",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin",
            ops_id,
            "--log-level",
            "warning",
        )
        ctx = ssl.create_default_context(cafile=str(self.bundle))
        with httpx.Client(verify=ctx, timeout=5) as http:
            self._wait("ca", lambda: http.get(f"{self.ca_url}/readyz").status_code == 200)

    def _wait(self, name: str, ready: Callable[[], bool], seconds: float = 30) -> None:
        process = self.named[name]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except (httpx.TransportError, OSError):
                pass
            if process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not start:\n{self.log_text(name)}")

    def enroll(self, *names: str) -> None:
        """Enroll each name with a one-time join token, the agents running in parallel."""
        agents = []
        ids = [f"spiffe://{TRUST_DOMAIN}/{name}" for name in names]
        with ThreadPoolExecutor() as pool:
            tokens = list(
                pool.map(lambda i: self.cli("token", "create", i, "--ttl", "5m", show=False), ids)
            )
        for name, spiffe_id, created in zip(names, ids, tokens, strict=True):
            token = created.strip()
            self.dirs[name] = self.workdir / f"mesh-{name}"
            argv = ["agent", "--ca", self.ca_url, "--id", spiffe_id]
            argv += ["--out", str(self.dirs[name]), "--bundle", str(self.bundle), "--once"]
            self.say(f"\n$ trustmesh {shlex.join(argv)} --token $(trustmesh token create …)")
            agents.append(
                subprocess.Popen(
                    [sys.executable, "-m", "trustmesh", *argv, "--token", token],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=self.env,
                )
            )
        for agent in agents:
            out, err = agent.communicate(timeout=60)
            if agent.returncode != 0:
                raise RuntimeError(f"agent failed: {err.strip()}")
            self.say(out.rstrip())

    def renew(self, name: str) -> subprocess.Popen[str]:
        """Start a forced renewal of NAME's certificate (the agent rewrites its files)."""
        argv = ["agent", "--ca", self.ca_url, "--id", f"spiffe://{TRUST_DOMAIN}/{name}"]
        argv += ["--out", str(self.dirs[name]), "--once", "--renew-now"]
        self.say(f"$ trustmesh {shlex.join(argv)}")
        return subprocess.Popen(
            [sys.executable, "-m", "trustmesh", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )

    def run_service(
        self,
        name: str,
        env: dict[str, str] | None = None,
        *,
        label: str | None = None,
        app: str = "main:app",
        app_dir: Path | None = None,
        options: Sequence[str] | None = None,
        port: int | None = None,
        wait: bool = True,
    ) -> None:
        """Run examples/NAME under `trustmesh run` with NAME's certificate; LABEL names
        the process (its log and URL) when one service runs twice. APP in APP_DIR
        replaces the example; OPTIONS replace ``--policy APP_DIR/policy.yaml`` (e.g.
        another policy, ``--issuer``/``--audience``); PORT (default: a free one) to
        restart a service where it was. Without WAIT, call :meth:`wait_service`."""
        label = label or name
        port = port or free_port()
        self.urls[label] = f"https://127.0.0.1:{port}"
        app_dir = app_dir or EXAMPLES / name
        if options is None:
            options = ("--policy", str(app_dir / "policy.yaml"))
        argv = ["run", app, "--app-dir", str(app_dir), "--cert-dir", str(self.dirs[name])]
        argv += ["--listen", f"127.0.0.1:{port}", *options]
        argv += ["--ca", self.ca_url, "--log-format", "text", "--log-level", "warning"]
        self.spawn(label, *argv, env=env)
        if wait:
            self.wait_service(label, app)

    def wait_service(self, label: str, app: str = "main:app") -> None:
        """Wait until the service LABEL (started with ``wait=False``) serves."""
        self._wait(label, lambda: f"trustmesh run: {app} on" in self.log_text(label))

    def start(self) -> None:
        if not (EXAMPLES / "inventory" / "main.py").is_file():
            raise RuntimeError(f"the example services are not in {EXAMPLES}")
        self.start_ca()
        self.enroll("inventory", "orders", "frontend")
        self.run_service("inventory")
        self.run_orders()

    def run_orders(
        self,
        inventory_id: str = f"spiffe://{TRUST_DOMAIN}/inventory",
        label: str = "orders",
        options: Sequence[str] | None = None,
        *,
        wait: bool = True,
        inventory: str = "inventory",
    ) -> None:
        """Run orders, calling INVENTORY (a label) and accepting only a server that is
        INVENTORY_ID."""
        env = {
            "TRUSTMESH_CERT_DIR": str(self.dirs["orders"]),
            "INVENTORY_URL": self.urls[inventory],
            "INVENTORY_ID": inventory_id,
        }
        self.run_service("orders", env, label=label, options=options, wait=wait)

    def client(
        self, name: str, service: str, *, expect: str | None = None, **kwargs: Any
    ) -> httpx.Client:
        """An mTLS client holding NAME's certificate, calling SERVICE (a label of
        :meth:`run_service`) and expecting the SPIFFE ID of EXPECT (default SERVICE)."""
        from trustmesh.client import mtls_client
        from trustmesh.tls import RotatingCredentials

        ctx = RotatingCredentials(self.dirs[name]).client_context(check_hostname=False)
        return mtls_client(
            ctx,
            expect_id=f"spiffe://{TRUST_DOMAIN}/{expect or service}",
            base_url=self.urls[service],
            timeout=5,
            **kwargs,
        )

    def revoke(self, name: str) -> str:
        return self.cli(
            "revoke",
            "--ca",
            self.ca_url,
            "--cert",
            str(self.ops / "chain.pem"),
            "--key",
            str(self.ops / "key.pem"),
            "--bundle",
            str(self.bundle),
            "--id",
            f"spiffe://{TRUST_DOMAIN}/{name}",
            "--reason",
            "keyCompromise",
        )

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> ExampleMesh:
        if not self.processes:
            try:
                self.start()
            except BaseException:
                self.stop()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


GATEWAY_EXAMPLE = EXAMPLES / "gateway"
#: Where the demo's sign-in page sends the browser back (never fetched: the code is read
#: from the redirect's Location).
REDIRECT_URI = "https://app.demo.example/callback"
READY_LINE = re.compile(r"trustmesh gateway: listening on (https://[^\s\"]+)")


def gateway_log_events(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of a gateway log (other lines, such as the ready line, skipped)."""
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
    return events


def pkce_pair() -> tuple[str, str]:
    """``(code_verifier, S256 code_challenge)`` per RFC 7636."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class LoginForm(HTMLParser):
    """The login page's form: its action and hidden fields."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.action = a.get("action")
        if tag == "input" and a.get("type") == "hidden":
            self.fields[a["name"]] = a.get("value", "")


def sign_in_user(
    http: httpx.Client,
    issuer: str,
    client: dict[str, Any],
    username: str,
    password: str,
    scope: str = "openid orders:read",
) -> dict[str, Any]:
    """A user signs in at the identity server's login page (authorization code + PKCE, as
    a browser would); returns the token response (``access_token``...)."""
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": client["client_id"],
        "redirect_uri": REDIRECT_URI,
        "scope": scope,
        "state": secrets.token_urlsafe(8),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    page = http.get(f"{issuer}/authorize", params=params)
    form = LoginForm()
    form.feed(page.text)
    if page.status_code != 200 or form.action is None:
        raise RuntimeError(f"no login page at {issuer}/authorize: {page.status_code}")
    login = {**form.fields, "username": username, "password": password}
    answer = http.post(f"{issuer}{form.action}", data=login)
    location = answer.headers.get("location", "")
    code = parse_qs(urlsplit(location).query).get("code")
    if answer.status_code != 302 or not code:
        raise RuntimeError(f"sign-in of {username} failed: {answer.status_code} {answer.text}")
    tokens = http.post(
        f"{issuer}/token",
        auth=(client["client_id"], client["client_secret"]),
        data={
            "grant_type": "authorization_code",
            "code": code[0],
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        },
    )
    if tokens.status_code != 200:
        raise RuntimeError(f"code exchange failed: {tokens.status_code} {tokens.text}")
    result: dict[str, Any] = tokens.json()
    return result


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of a JWT, unverified (to copy them into a test token)."""
    header, payload, _ = token.split(".")
    decode = base64.urlsafe_b64decode

    def part(text: str) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(decode(text + "=" * (-len(text) % 4)))
        return value

    return part(header), part(payload)


def resign(home: Path, passphrase: bytes, token: str, **claims: Any) -> str:
    """TOKEN with CLAIMS changed, signed again by the identity server's own current key
    (read from the CA database): a genuine token of that issuer, e.g. an expired one."""
    from joserfc import jwt

    from trustmesh.authority import CertificateAuthority
    from trustmesh.idp import KeyRing

    header, body = jwt_parts(token)
    body.update(claims)
    with CertificateAuthority.open(home) as ca:
        key = KeyRing(ca.store, passphrase, keep=3600).signing_key()
    header["kid"] = key.info.kid
    return jwt.encode(header, body, key.key, algorithms=[key.info.alg])


def forge(token: str, *, kid: str | None = None, **claims: Any) -> str:
    """TOKEN's header and claims (CLAIMS changed) signed by a key the issuer never had,
    keeping its ``kid`` (or KID): what an attacker can make."""
    from joserfc import jwt
    from joserfc.jwk import ECKey

    header, body = jwt_parts(token)
    body.update(claims)
    header["alg"] = "ES256"
    if kid is not None:
        header["kid"] = kid
    return jwt.encode(header, body, ECKey.generate_key("P-256"), algorithms=["ES256"])


class GatewayMesh(ExampleMesh):
    """:class:`ExampleMesh` plus the identity server and the edge gateway, as processes.

    ``start_idp()`` runs ``trustmesh idp serve`` on the same CA home;
    ``start_gateway(config)`` writes CONFIG (a dict) as YAML and runs ``trustmesh gateway
    serve --config`` with the enrolled ``gateway`` identity, waiting for its ready line.
    """

    def __init__(self, workdir: Path, env: dict[str, str], *, echo: bool = True) -> None:
        super().__init__(workdir, env, echo=echo)
        self.idp_url = ""
        self.gateways: dict[str, str] = {}

    def idp_http(self) -> httpx.Client:
        """A client of the identity server (and anything else our CA certified)."""
        return httpx.Client(verify=ssl.create_default_context(cafile=str(self.bundle)), timeout=10)

    def start_idp(self, label: str = "idp", *, wait: bool = True) -> None:
        """Run `trustmesh idp serve`; without WAIT, call :meth:`wait_idp` before using it."""
        port = free_port()
        self.idp_url = f"https://127.0.0.1:{port}"
        self.spawn(label, "idp", "serve", "--listen", f"127.0.0.1:{port}", "--log-level", "warning")
        if wait:
            self.wait_idp(label)

    def wait_idp(self, label: str = "idp") -> None:
        with self.idp_http() as http:
            self._wait(label, lambda: http.get(f"{self.idp_url}/healthz").status_code == 200)

    def add_client(self, name: str, *args: str) -> dict[str, Any]:
        """`idp client add NAME ARGS --json`: its client_id and client_secret."""
        created: dict[str, Any] = json.loads(
            self.cli("idp", "client", "add", name, *args, "--json", show=False)
        )
        return created

    def add_user(self, name: str, password: str, *args: str) -> dict[str, Any]:
        """`idp user add NAME --password-file F ARGS --json`."""
        secret = self.workdir / f"{name}.password"
        secret.write_text(password + "\n")
        secret.chmod(0o600)
        argv = ("idp", "user", "add", name, "--password-file", str(secret), *args, "--json")
        created: dict[str, Any] = json.loads(self.cli(*argv, show=False))
        return created

    def start_gateway(
        self, config: dict[str, Any], label: str = "gateway", identity: str = "gateway"
    ) -> str:
        """Run the gateway with CONFIG and IDENTITY's certificate directory; its URL."""
        path = self.workdir / f"{label}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = ["gateway", "serve", "--config", str(path), "--cert-dir", str(self.dirs[identity])]
        self.spawn(label, *argv, "--log-level", "info")
        self._wait(label, lambda: READY_LINE.search(self.log_text(label)) is not None)
        url: str = READY_LINE.findall(self.log_text(label))[-1]
        self.gateways[label] = url
        return url

    def gateway_events(self, label: str = "gateway") -> list[dict[str, Any]]:
        return gateway_log_events(self.log_text(label))


def run_examples_act(workdir: Path) -> tuple[dict[str, object], dict[str, object]]:
    """Act four: the example services (FastAPI inventory, Flask orders) under `trustmesh
    run`; then act five on the same CA service (:func:`run_gateway_act`). Returns both
    acts' results."""
    result: dict[str, object] = {}
    say("\n== 16. Run the example services under `trustmesh run` (examples/)")
    say("inventory (FastAPI) allows orders to GET /items*; orders (Flask) allows frontend to")
    say("GET /orders/*; both check every caller against the CA's revocation feed.")
    mesh = GatewayMesh(workdir, dict(os.environ))
    try:
        mesh.start()
    except RuntimeError as exc:
        mesh.stop()
        raise SystemExit(f"demo: {exc}") from None
    with mesh:
        say("\n== 17. An allowed call: frontend -> orders -> inventory")
        with mesh.client("frontend", "orders") as frontend:
            answer = frontend.get("/orders/1")
            body = answer.json()
            say(f"GET {mesh.urls['orders']}/orders/1 as frontend: {answer.status_code}")
            say(f"  orders saw caller    {body.get('caller')}")
            inner = body.get("inventory", {})
            say(f"  inventory saw caller {inner.get('caller')}  (item {inner.get('item')})")
            allowed = (
                answer.status_code == 200
                and body.get("caller") == f"spiffe://{TRUST_DOMAIN}/frontend"
                and inner.get("caller") == f"spiffe://{TRUST_DOMAIN}/orders"
            )

        say("\n== 18. A call the policy denies: frontend calls inventory directly")
        with mesh.client("frontend", "inventory") as frontend:
            denied = frontend.get("/items")
            problem = denied.json()
        say(f"GET {mesh.urls['inventory']}/items as frontend: {denied.status_code}")
        say(f"  reason: {problem.get('reason')}")
        say(f"  detail: {problem.get('detail')}")
        logged = [
            line for line in mesh.log_text("inventory").splitlines() if "policy_denied" in line
        ]
        if logged:
            say(f"  inventory's log: {logged[-1].split(' ', 2)[-1][:160]}…")
        denied_ok = denied.status_code == 403 and problem.get("reason") == "policy_denied"

        say("\n== 19. Rotation during traffic: orders and inventory renew while requests run")
        before = serial_of(mesh.dirs["orders"]), serial_of(mesh.dirs["inventory"])
        counts = {"ok": 0, "failed": 0}
        served_by: list[str] = []
        stop = threading.Event()

        def traffic() -> None:
            # A new connection per request, so each handshake shows the serving certificate.
            limits = httpx.Limits(max_keepalive_connections=0)
            with mesh.client("frontend", "orders", limits=limits) as frontend:
                while not stop.is_set():
                    try:
                        response = fetch(frontend, "/orders/2")
                    except (httpx.HTTPError, ValueError):  # refused, or a body that is no JSON
                        counts["failed"] += 1
                        continue
                    if response.status == 200 and response.body.get("inventory_status") == 200:
                        counts["ok"] += 1
                        serial = response.server_serial
                        if not served_by or served_by[-1] != serial:
                            served_by.append(serial)
                    else:
                        counts["failed"] += 1

        loop = threading.Thread(target=traffic, daemon=True)
        loop.start()
        time.sleep(0.5)
        renewals = [mesh.renew("orders"), mesh.renew("inventory")]
        for renewal in renewals:
            renewal.communicate(timeout=60)
        after = serial_of(mesh.dirs["orders"])
        deadline = time.monotonic() + 10
        while (not served_by or served_by[-1] != after) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        loop.join(timeout=10)
        say(f"orders' certificate: serial {before[0][:12]}… -> {after[:12]}…")
        inventory_after = serial_of(mesh.dirs["inventory"])
        say(f"inventory's certificate: serial {before[1][:12]}… -> {inventory_after[:12]}…")
        say(
            f"{counts['ok'] + counts['failed']} requests during the rotation: "
            f"{counts['ok']} ok, {counts['failed']} failed"
        )
        say("serials orders presented, in order: " + " -> ".join(s[:12] + "…" for s in served_by))
        rotated = (
            counts["failed"] == 0
            and counts["ok"] > 0
            and renewals[0].returncode == 0
            and renewals[1].returncode == 0
            and bool(served_by)
            and served_by[-1] == after != before[0]
            and inventory_after != before[1]
        )

        say("\n== 20. Revoke frontend while its keep-alive connection to orders is open")
        # Keep the idle connection in the pool while `trustmesh revoke` runs (a new process,
        # seconds on a loaded machine; httpx would drop it after 5 s by default).
        keep = httpx.Limits(keepalive_expiry=60)
        with mesh.client("frontend", "orders", limits=keep) as frontend:
            first = fetch(frontend, "/orders/1")
            port = first.local_port
            say(f"GET /orders/1: {first.status} on the connection from port {port}")
            start = time.monotonic()
            mesh.revoke("frontend")
            returned = time.monotonic()
            refused = None
            same = True
            passed = 0
            while time.monotonic() - returned < 5:
                response = fetch(frontend, "/orders/1")
                same = same and response.local_port == port
                if response.status != 200:
                    refused = response
                    break
                passed += 1
                time.sleep(0.01)
            if refused is not None:
                latency = (time.monotonic() - returned) * 1000
                result["latency"] = f"{latency:.0f} ms"
                say(
                    f"GET /orders/1 on the same connection (port {port}, same: {same}): "
                    f"{refused.status} {refused.body.get('reason')}, "
                    f"Connection: {refused.headers.get('connection')}"
                )
                say(
                    f"refused {latency:.0f} ms after `trustmesh revoke` returned, after {passed} "
                    f"more request(s) got through (the command, a new process, took "
                    f"{(returned - start) * 1000:.0f} ms)"
                )
            # The server closed that connection: the next request needs a new one, and the
            # handshake still succeeds (the chain is valid) but the request is refused again.
            again = fetch(frontend, "/orders/1")
            say(
                f"next request: a new connection (port {again.local_port}): {again.status} "
                f"{again.body.get('reason')}"
            )
            revoked_ok = (
                again.local_port != port
                and again.status == 403
                and again.body.get("reason") == "revoked"
                and refused is not None
                and same
                and refused.status == 403
                and refused.body.get("reason") == "revoked"
                and refused.headers.get("connection") == "close"
            )
        result["ok"] = allowed and denied_ok and rotated and revoked_ok
        result["requests"] = counts["ok"] + counts["failed"]
        edge = run_gateway_act(mesh)
    return result, edge


def gateway_config(mesh: GatewayMesh, edge: Path) -> dict[str, Any]:
    """examples/gateway/gateway.yaml with this run's ports, URLs and edge certificate."""
    config: dict[str, Any] = yaml.safe_load((GATEWAY_EXAMPLE / "gateway.yaml").read_text())
    config["listen"] = f"127.0.0.1:{free_port()}"
    config["ca"] = mesh.ca_url
    config["issuers"][0]["issuer"] = mesh.idp_url
    config["routes"][0]["upstream"]["urls"] = [mesh.urls["orders-gw"]]
    config["tls"] = {"cert": str(edge / "chain.pem"), "key": str(edge / "key.pem")}
    return config


def run_gateway_act(mesh: GatewayMesh) -> dict[str, object]:
    """Act five, on act four's CA service: the edge gateway in front of the example
    services, a user's token end to end, and four refusals at the door with the reasons
    the gateway logged."""
    result: dict[str, object] = {}
    say("\n== 21. The edge gateway in front of the example services (examples/gateway/)")
    say("The identity server signs users in; the gateway checks their tokens and calls")
    say("orders over mTLS as spiffe://demo.example/gateway, passing the user's token on;")
    say("orders and inventory check the same token again (examples/gateway/*-policy.yaml).")
    password = secrets.token_urlsafe(12)
    edge = mesh.workdir / "edge"
    try:
        mesh.start_idp(wait=False)
        with ThreadPoolExecutor() as pool:
            enrolled = pool.submit(mesh.enroll, "gateway")
            issued = pool.submit(
                mesh.cli,
                *("issue", "spiffe://demo.example/edge", "--dns", "localhost", "--ip"),
                *("127.0.0.1", "--ttl", "1h", "--out", str(edge)),
                show=False,
            )
            web = pool.submit(
                mesh.add_client,
                *("web", "--redirect-uri", REDIRECT_URI, "--audience", "api"),
                *("--scope", "openid", "--scope", "orders:read"),
            )
            alice = pool.submit(mesh.add_user, "alice", password, "--scope", "orders:read")
            enrolled.result()
            issued.result()
        user_id = alice.result()["user_id"]
        say(f"(idp client add web …; idp user add alice --scope orders:read: {user_id})")
        say(f"(issued the gateway's public certificate for 127.0.0.1 into {edge})")
        mesh.wait_idp()
        tokens = ("--issuer", mesh.idp_url, "--audience", "api")
        policy = GATEWAY_EXAMPLE / "inventory-policy.yaml"
        options = ("--policy", str(policy), *tokens)
        mesh.run_service("inventory", label="inventory-gw", options=options, wait=False)
        policy = GATEWAY_EXAMPLE / "orders-policy.yaml"
        options = ("--policy", str(policy), *tokens)
        mesh.run_orders(label="orders-gw", options=options, wait=False, inventory="inventory-gw")
        mesh.wait_service("inventory-gw")
        mesh.wait_service("orders-gw")
        config = gateway_config(mesh, edge)
        url = mesh.start_gateway(config)
    except RuntimeError as exc:
        raise SystemExit(f"demo: {exc}") from None
    with (
        mesh.idp_http() as idp,
        httpx.Client(
            base_url=url, verify=ssl.create_default_context(cafile=str(mesh.bundle)), timeout=15
        ) as http,
    ):
        say(f"gateway listening on {url}; its configuration:")
        say(yaml.safe_dump(config, sort_keys=False).rstrip())

        say("\n== 22. alice signs in at the identity server and calls the gateway")
        token = sign_in_user(idp, mesh.idp_url, web.result(), "alice", password)["access_token"]
        claims = jwt_parts(token)[1]
        say(f"login page, code + PKCE: an access token for {claims['aud']}, scope")
        say(f"  '{claims['scope']}', jti {claims['jti']}")
        answer = http.get("/orders/1", headers={"Authorization": f"Bearer {token}"})
        body = answer.json()
        inner = body.get("inventory", {})
        say(f"GET {url}/orders/1 with alice's token: {answer.status_code}")
        say(f"  orders saw caller    {body.get('caller')}, user {body.get('user')}")
        say(f"  inventory saw caller {inner.get('caller')}, user {inner.get('user')}")
        mine = {"sub": user_id, "token_id": claims["jti"]}
        reached = (
            answer.status_code == 200
            and body.get("caller") == f"spiffe://{TRUST_DOMAIN}/gateway"
            and inner.get("caller") == f"spiffe://{TRUST_DOMAIN}/orders"
            and body.get("user") == inner.get("user") == mine
        )
        if reached:
            say("  both services verified alice's own token (same jti); each saw its caller")

        say("\n== 23. Refused at the door, each with the reason the gateway logged")
        narrow = sign_in_user(idp, mesh.idp_url, web.result(), "alice", password, scope="openid")
        now = int(time.time())
        passphrase = os.environ["TRUSTMESH_CA_PASSPHRASE"].encode()
        home = Path(os.environ["TRUSTMESH_HOME"])
        say("(the expired token: alice's, re-signed by the identity server's own key with an")
        say(" exp in the past; the forged one: alice's claims signed by a key of our own)")
        say("(the blocked client: the config trusts 127.0.0.1 as a front proxy, so this")
        say(" request says X-Forwarded-For: 203.0.113.9, a documentation address, as such a")
        say(" proxy would; the route's deny_ips has 203.0.113.0/24)")
        expired = resign(home, passphrase, token, exp=now - 60, iat=now - 900)
        blocked = {"X-Forwarded-For": "203.0.113.9"}
        cases = [
            (
                "too little scope (openid only)",
                narrow["access_token"],
                {},
                403,
                "insufficient_scope",
            ),
            ("an expired token", expired, {}, 401, "expired"),
            ("a forged token", forge(token), {}, 401, "bad_signature"),
            ("a client at 203.0.113.9, a blocked address", token, blocked, 403, "ip_denied"),
        ]
        reasons = []
        for what, bad, extra, status, reason in cases:
            before = len(mesh.gateway_events())
            refused = http.get("/orders/1", headers={"Authorization": f"Bearer {bad}", **extra})
            logged = newest_decision(mesh, before)
            got = (
                refused.json().get("reason")
                if refused.headers.get("content-type", "").startswith("application/problem+json")
                else None
            )
            say(f"\n{what}: {refused.status_code} {got}")
            if "www-authenticate" in refused.headers:
                say(f"  WWW-Authenticate: {refused.headers['www-authenticate']}")
            shown = ("msg", "client_ip", "route", "reason", "detail")
            say(f"  gateway log: {json.dumps({k: logged[k] for k in shown if k in logged})}")
            reasons.append(
                refused.status_code == status and got == reason and logged.get("reason") == reason
            )
        result["ok"] = reached and all(reasons)
        result["refusals"] = sum(reasons)
    return result


def newest_decision(mesh: GatewayMesh, before: int, seconds: float = 5) -> dict[str, Any]:
    """The first access-log line (with its decision ``reason``) after the first BEFORE lines."""
    deadline = time.monotonic() + seconds
    while True:
        fresh = [e for e in mesh.gateway_events()[before:] if e.get("event") == "access"]
        if fresh or time.monotonic() > deadline:
            return fresh[0] if fresh else {}
        time.sleep(0.05)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="trustmesh-demo-") as tmp:
        return run(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
