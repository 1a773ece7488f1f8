"""Services under test: identities from a real CA, uvicorn (with our TLS shim) and werkzeug
serving over real TLS on 127.0.0.1 in a thread, and tiny real policy/revocation objects."""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import PrivateKey, dump_private_key, new_serial, pem_certificates
from trustmesh.pki import signature_hash_for as hash_for
from trustmesh.tls import TLSHttpToolsProtocol, client_context, server_context

from ._server import free_port

SERVER_ID = "spiffe://example.org/svc/inventory"


@dataclass(frozen=True)
class Identity:
    """A workload identity on disk: chain and key files, and the leaf."""

    spiffe_id: str
    chain: Path
    key: Path
    cert: x509.Certificate

    @property
    def serial(self) -> int:
        return self.cert.serial_number


def save_identity(
    workdir: Path, spiffe_id: str, chain: Sequence[x509.Certificate], key: PrivateKey
) -> Identity:
    name = uuid.uuid4().hex[:10]
    chain_path, key_path = workdir / f"{name}.chain.pem", workdir / f"{name}.key"
    chain_path.write_bytes(pem_certificates(tuple(chain)))
    key_path.write_bytes(dump_private_key(key))
    return Identity(spiffe_id, chain_path, key_path, chain[0])


def issue(ca: CertificateAuthority, spiffe_id: str, workdir: Path, **kw: Any) -> Identity:
    """Issue a real identity from the CA (``dns``, ``ips``, ``ttl``, ``now`` as for ``issue``)."""
    issued = ca.issue(spiffe_id, actor="test", **kw)
    assert issued.key is not None
    return save_identity(workdir, spiffe_id, issued.chain, issued.key)


def forge(
    ca: CertificateAuthority,
    workdir: Path,
    uris: Sequence[str],
    *,
    eku: Sequence[x509.ObjectIdentifier] = (
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.SERVER_AUTH,
    ),
    signed_by: tuple[x509.Certificate, PrivateKey] | None = None,
) -> Identity:
    """A leaf trustmesh would never issue, signed by the CA's real intermediate key (or by
    ``signed_by``, an intermediate and its key, e.g. one retired since)."""
    issuer, signing = signed_by or (ca.intermediate, ca.signing_key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "example.org")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    )
    cert = builder.sign(signing, hash_for(signing))
    return save_identity(workdir, uris[0] if uris else "", (cert, issuer), key)


def bundle_pem(ca: CertificateAuthority) -> str:
    return pem_certificates(ca.bundle).decode()


def client(ca: CertificateAuthority, identity: Identity | None, **kw: Any) -> httpx.Client:
    """An httpx client that trusts the CA and presents ``identity`` (if any)."""
    ctx = client_context(
        cadata=bundle_pem(ca),
        chain=identity.chain if identity else None,
        key=identity.key if identity else None,
    )
    kw.setdefault("timeout", 10)
    return httpx.Client(verify=ctx, **kw)


@contextmanager
def serve_asgi(
    app: Any,
    ca: CertificateAuthority,
    server: Identity,
    *,
    client_cert: str = "required",
    port: int | None = None,
) -> Iterator[str]:
    """Run ``app`` on uvicorn with our TLS shim in a thread; yield its https URL
    (on ``port`` when given, e.g. to bring a dead endpoint back)."""
    port = port or free_port()

    def factory(_config: Any, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return server_context(
            server.chain, server.key, cadata=bundle_pem(ca), client_cert=client_cert
        )

    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=TLSHttpToolsProtocol,
        ssl_certfile=str(server.chain),
        ssl_keyfile=str(server.key),
        ssl_context_factory=factory,
        lifespan="auto",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=30,
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=15)


@contextmanager
def serve_wsgi(
    app: Any, ca: CertificateAuthority, server: Identity, *, client_cert: str = "required"
) -> Iterator[str]:
    """Run a WSGI app on werkzeug's server over TLS (client certificates requested)."""
    from werkzeug.serving import make_server

    ctx = server_context(server.chain, server.key, cadata=bundle_pem(ca), client_cert=client_cert)
    port = free_port()
    srv = make_server("127.0.0.1", port, app, threaded=True, ssl_context=ctx)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=15)


@dataclass
class RevokedSerials:
    """A real revocation object: a set of revoked serials (the ``RevocationSet`` protocol).

    ``cursor`` counts revocations, as the feed's cursor moves with each event.
    """

    serials: set[int] = field(default_factory=set)
    asked: int = 0

    @property
    def cursor(self) -> int:
        return len(self.serials)

    def is_revoked(self, serial: int | str) -> bool:
        self.asked += 1
        value = int(serial, 16) if isinstance(serial, str) else serial
        return value in self.serials


@dataclass(frozen=True)
class Decision:
    allowed: bool
    mode: str
    rule: str | None
    reason: str

    @property
    def would_deny(self) -> bool:
        return self.mode == "audit" and self.rule is None


@dataclass
class CallablePolicy:
    """A real policy object: ``rule(request) -> rule name or None`` decides; default deny."""

    rule: Callable[[Any], str | None]
    mode: str = "enforce"
    seen: list[Any] = field(default_factory=list)

    def evaluate(self, request: Any) -> Decision:
        self.seen.append(request)
        name = self.rule(request)
        if name is not None:
            return Decision(True, self.mode, name, f"rule {name!r} allows it")
        reason = f"no rule allows {request.caller} to {request.method} {request.path}"
        return Decision(self.mode == "audit", self.mode, None, reason)


def allow_all() -> CallablePolicy:
    """A policy with one rule that allows every caller."""
    return CallablePolicy(lambda _request: "everyone")
