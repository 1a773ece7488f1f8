"""A real `trustmesh ca serve` process on 127.0.0.1 for tests that call the CA API."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType, pem_certificates

from .conftest import PASSPHRASE

ADMIN = "spiffe://example.org/admin"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop(process: subprocess.Popen[str], timeout: float = 15) -> None:
    """SIGTERM ``process`` and wait for it; SIGKILL it if it does not exit in ``timeout``."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Server:
    """A running `ca serve`: its URL, CA home and the trust bundle to verify it with."""

    url: str
    home: Path
    bundle: Path
    process: subprocess.Popen[str]

    def ca(self) -> CertificateAuthority:
        return CertificateAuthority.open(self.home, passphrase=PASSPHRASE)

    def join_token(self, spiffe_id: str) -> str:
        """A one-use join token for ``spiffe_id``, created on the CA directly."""
        with self.ca() as ca:
            return ca.create_join_token(spiffe_id, actor="test")

    def agent(self, spiffe_id: str, out: Path, *extra: str) -> list[str]:
        """The `trustmesh agent` command line for ``spiffe_id`` writing to ``out``."""
        return ["agent", "--ca", self.url, "--id", spiffe_id, "--out", str(out), *extra]


@contextmanager
def new_ca_server(workdir: Path) -> Iterator[Server]:
    """A new CA (EC P-256, trust domain example.org) in ``workdir``, served by `ca serve`."""
    CertificateAuthority.init(
        workdir / "home",
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
    ).close()
    with running_server(workdir / "home", workdir) as running:
        yield running


@contextmanager
def running_server(
    home: Path,
    workdir: Path,
    *,
    admins: tuple[str, ...] = (ADMIN,),
    port: int | None = None,
    extra_args: tuple[str, ...] = (),
) -> Iterator[Server]:
    """Start `python -m trustmesh ca serve` for the CA in ``home`` and wait until it answers."""
    with CertificateAuthority.open(home) as ca:
        bundle = workdir / "bundle.pem"
        bundle.write_bytes(pem_certificates(ca.bundle))
    port = port or free_port()
    log_path = workdir / "serve.log"
    admin_args = [arg for admin in admins for arg in ("--admin", admin)]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trustmesh",
                "ca",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                *admin_args,
                *extra_args,
                "--log-level",
                "warning",
            ],
            env={
                **os.environ,
                "TRUSTMESH_HOME": str(home),
                "TRUSTMESH_CA_PASSPHRASE": PASSPHRASE.decode(),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        url = f"https://127.0.0.1:{port}"
        ctx = ssl.create_default_context(cafile=str(bundle))
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    if httpx.get(f"{url}/healthz", verify=ctx, timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ca serve did not start: {log_path.read_text()}")
                time.sleep(0.1)
            yield Server(url, home, bundle, process)
        finally:
            stop(process)
