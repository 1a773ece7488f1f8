"""``make demo``: the CA end to end on embedded defaults.

In a fresh temporary ``TRUSTMESH_HOME`` it runs the real CLI to create a CA and
issue two identities, makes an HTTP call over mutual TLS between a tiny stdlib
server and client using them, revokes the client, and shows the next handshake
being refused because the server checks the CRL. Act two runs the CA as a
service (join tokens, the agent, renewal, the revocation feed, CRL, OCSP); act
three runs the identity server and checks its tokens with ``token verify``.
Every step is printed.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shlex
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import httpx
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
    ok = ok and bool(service.get("ok")) and bool(identity.get("ok"))
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


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="trustmesh-demo-") as tmp:
        return run(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
