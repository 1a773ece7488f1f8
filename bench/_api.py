"""Helpers for the CA API benchmarks: CA homes, `ca serve` processes, identities,
a small keep-alive HTTPS client, percentiles and CPU accounting.

Not a benchmark itself; ``api_issuance.py``, ``propagation.py`` and
``enroll_storm.py`` import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httptools
import httpx
from _common import PASSPHRASE, TRUST_DOMAIN
from _common import CPUMeter as CPUMeter  # moved to _common (the wrk runner uses it)
from _common import loadavg as loadavg
from _common import stop_process as stop_process
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import (
    KeyType,
    SpiffeID,
    dump_private_key,
    generate_private_key,
    pem_certificates,
    signature_hash_for,
)

ADMIN = f"spiffe://{TRUST_DOMAIN}/admin"
HOST = "127.0.0.1"


# -- CA homes and identities ---------------------------------------------------------


def init_home(home: Path, db_url: str | None) -> Path:
    """Create a CA (ec-p256) in ``home``; return the path of its bundle (root PEM)."""
    ca = CertificateAuthority.init(
        home,
        trust_domain=TRUST_DOMAIN,
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
        db_url=db_url,
    )
    try:
        bundle = home / "bundle.pem"
        bundle.write_bytes(pem_certificates(ca.bundle))
    finally:
        ca.close()
    return bundle


@dataclass(frozen=True)
class Identity:
    """An issued identity on disk (chain = leaf + intermediate, key PEM)."""

    spiffe_id: str
    serial: str
    chain: Path
    key: Path


def write_identity(
    ca: CertificateAuthority, spiffe_id: str, directory: Path, *, dns: Sequence[str] = ()
) -> Identity:
    """Issue ``spiffe_id`` (ec-p256, DNS SANs ``dns``, which its renewals may keep) and
    write its chain and key under ``directory``."""
    issued = ca.issue(spiffe_id, dns=dns, actor="bench")
    directory.mkdir(parents=True, exist_ok=True)
    assert issued.key is not None
    chain, key = directory / "chain.pem", directory / "key.pem"
    chain.write_bytes(pem_certificates(issued.chain))
    key.write_bytes(dump_private_key(issued.key))
    key.chmod(0o600)
    return Identity(spiffe_id, issued.record.serial, chain, key)


def csr_pem(spiffe_id: str, *, dns: Sequence[str] = (), key_type: KeyType = KeyType.EC_P256) -> str:
    """A CSR for ``spiffe_id`` (URI SAN, optional DNS SANs) with a freshly generated key."""
    key = generate_private_key(key_type)
    sid = SpiffeID.parse(spiffe_id)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(sid.uri), *(x509.DNSName(d) for d in dns)]
            ),
            critical=False,
        )
        .sign(key, signature_hash_for(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def client_ssl(bundle: Path, ident: Identity | None = None) -> ssl.SSLContext:
    """A client context trusting ``bundle`` and presenting ``ident`` if given."""
    ctx = ssl.create_default_context(cafile=str(bundle))
    if ident is not None:
        ctx.load_cert_chain(ident.chain, ident.key)
    return ctx


# -- servers -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_healthy(url: str, bundle: Path, *, alive: Any, timeout: float = 60.0) -> None:
    """Poll ``url``/healthz until it answers 200; ``alive()`` False aborts."""
    ctx = client_ssl(bundle)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/healthz", verify=ctx, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server {url} did not start")
        time.sleep(0.1)


@dataclass
class Server:
    url: str
    pid: int


@contextlib.contextmanager
def ca_serve(
    home: Path,
    bundle: Path,
    log_file: Path,
    *,
    admins: Sequence[str] = (ADMIN,),
    workers: int = 1,
) -> Iterator[Server]:
    """Run ``python -m trustmesh ca serve`` on a free 127.0.0.1 port until the block ends.

    ``workers`` > 1 passes ``--workers``; the yielded pid is then the supervisor's, and
    :class:`CPUMeter` counts its children (the workers) too.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "trustmesh", "ca", "serve", "--listen", f"{HOST}:{port}"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    for admin in admins:
        cmd += ["--admin", admin]
    cmd += ["--log-level", "warning"]
    env = {
        **os.environ,
        "TRUSTMESH_HOME": str(home),
        "TRUSTMESH_CA_PASSPHRASE": PASSPHRASE.decode(),
    }
    with log_file.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"https://{HOST}:{port}"
        try:
            try:
                wait_healthy(url, bundle, alive=lambda: proc.poll() is None)
            except RuntimeError:
                raise RuntimeError(f"ca serve did not start:\n{log_file.read_text()}") from None
            yield Server(url, proc.pid)
        finally:
            stop_process(proc)


def _run_app_server(home: str, port: int, settings_kw: dict[str, Any], log_level: str) -> None:
    """Child process body of :func:`inprocess_serve` (mirrors ``ca_server.serve``)."""
    import logging
    import tempfile

    import uvicorn

    from trustmesh.ca_server import ServerSettings, create_app
    from trustmesh.ca_server._serve import CA_SERVER_PATH
    from trustmesh.serving import issue_server_identity
    from trustmesh.tls import TLSHttpToolsProtocol, server_context

    logging.basicConfig(level=log_level.upper())
    ca = CertificateAuthority.open(Path(home), passphrase=PASSPHRASE)
    _ = ca.signing_key
    with tempfile.TemporaryDirectory(prefix="tm-bench-serve-") as tmp:
        chain, key = issue_server_identity(ca, HOST, Path(tmp), path=CA_SERVER_PATH)
        roots = pem_certificates(ca.bundle).decode()

        def context_factory(_config: Any, _default: Any) -> ssl.SSLContext:
            return server_context(chain, key, cadata=roots, client_cert="optional")

        app = create_app(ca, ServerSettings(**settings_kw))
        config = uvicorn.Config(
            app,
            host=HOST,
            port=port,
            http=TLSHttpToolsProtocol,
            ssl_certfile=str(chain),
            ssl_keyfile=str(key),
            ssl_context_factory=context_factory,
            timeout_keep_alive=15,
            timeout_graceful_shutdown=10,
            limit_concurrency=1000,
            log_level=log_level,
            access_log=False,
            lifespan="on",
        )
        uvicorn.Server(config).run()
    ca.close()


@contextlib.contextmanager
def inprocess_serve(
    home: Path, bundle: Path, settings_kw: dict[str, Any], *, log_level: str = "warning"
) -> Iterator[Server]:
    """Run ``create_app(ca, ServerSettings(**settings_kw))`` under uvicorn with the same
    TLS setup and uvicorn options as ``ca serve``, in a separate (spawned) process."""
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(
        target=_run_app_server, args=(str(home), port, settings_kw, log_level), daemon=True
    )
    proc.start()
    url = f"https://{HOST}:{port}"
    try:
        wait_healthy(url, bundle, alive=proc.is_alive)
        assert proc.pid is not None
        yield Server(url, proc.pid)
    finally:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.join(20)
            if proc.is_alive():
                proc.kill()
                proc.join()


# -- a minimal keep-alive HTTP/1.1 client over TLS -------------------------------------


class _Response:
    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.headers: dict[str, str] = {}
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.done = True


class RawConnection:
    """One keep-alive HTTP/1.1 connection (asyncio streams + httptools' parser).

    Much cheaper per request than httpx, so the load generator costs little CPU
    next to the server it measures. Handles Content-Length and chunked bodies.
    """

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext | None) -> None:
        self.host, self.port, self.ctx = host, port, ctx
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.headers: dict[str, str] = {}  # of the last answer

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.ctx, server_hostname=self.host if self.ctx else None
        )

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        return await self.request("POST", path, body)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.reader is None or self.writer is None:
            raise ConnectionError("not connected")
        content = (
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            if method != "GET"
            else ""
        )
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{content}\r\n".encode()
        )
        self.writer.write(head + body)
        response = _Response()
        parser = httptools.HttpResponseParser(response)
        while not response.done:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            parser.feed_data(data)
        self.headers = response.headers
        return parser.get_status_code(), b"".join(response.body)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


# -- statistics and CPU accounting ---------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return float(values[0])
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def median_or_nan(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
