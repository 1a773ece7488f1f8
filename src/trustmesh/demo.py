"""``make demo``: the CA end to end on embedded defaults.

In a fresh temporary ``TRUSTMESH_HOME`` it runs the real CLI to create a CA and
issue two identities, makes an HTTP call over mutual TLS between a tiny stdlib
server and client using them, revokes the client, and shows the next handshake
being refused because the server checks the CRL. Every step is printed.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shlex
import socket
import ssl
import sys
import tempfile
import threading
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

from cryptography import x509

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
    say("\n== What happened")
    say(f"- a CA for {TRUST_DOMAIN} was created with encrypted keys in {home}")
    say("- two identities were issued; billing called orders over mTLS and was identified as")
    say(f"  {json.loads(first.split(' ', 1)[1])['caller'] if first.startswith('200') else '?'}")
    say("- billing was revoked; with the new CRL the server refused its next handshake")
    say("- the audit chain verifies")
    say("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="trustmesh-demo-") as tmp:
        return run(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
