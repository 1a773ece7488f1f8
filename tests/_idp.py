"""A real `trustmesh idp serve` process on 127.0.0.1, and CLI helpers, for identity-server tests.

Usage::

    with running_idp(home, tmp_path) as idp:          # home: a CA made by the `ca` fixture
        creds = idp.add_client("svc", "--scope", "read")
        r = idp.http().post(idp.token_url, auth=(creds["client_id"], creds["client_secret"]),
                            data={"grant_type": "client_credentials"})
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import pem_certificates

from ._server import free_port
from .conftest import PASSPHRASE


def idp_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an `idp` subprocess: the CA home and passphrase."""
    return {
        **os.environ,
        "TRUSTMESH_HOME": str(home),
        "TRUSTMESH_CA_PASSPHRASE": PASSPHRASE.decode(),
        **(extra or {}),
    }


def run_cli(
    home: Path, *args: str, env: Mapping[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run `python -m trustmesh ARGS` for the CA in ``home``."""
    result = subprocess.run(
        [sys.executable, "-m", "trustmesh", *args],
        env=idp_env(home, env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"trustmesh {' '.join(args)} failed: {result.stderr}")
    return result


@dataclass
class Idp:
    """A running `idp serve`: its issuer URL, CA home, trust bundle and log."""

    url: str
    home: Path
    bundle: Path
    log: Path
    process: subprocess.Popen[str]
    db: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    def ssl_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        """A client context trusting our CA (and presenting ``cert``/``key`` if given)."""
        ctx = ssl.create_default_context(cafile=str(self.bundle))
        if cert is not None and key is not None:
            ctx.load_cert_chain(cert, key)
        return ctx

    def http(self, cert: Path | None = None, key: Path | None = None, **kw: Any) -> httpx.Client:
        """An httpx client that verifies the server with our CA bundle."""
        return httpx.Client(verify=self.ssl_context(cert, key), timeout=10, **kw)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a `trustmesh` command against the same CA and database."""
        db = ("--db", self.db) if self.db and args and args[0] == "idp" else ()
        return run_cli(self.home, *args, *db, env=self.env, check=check)

    def add_client(self, name: str, *args: str) -> dict[str, Any]:
        """`idp client add NAME ARGS --json`; returns {"client_id", "client_secret"}."""
        result = self.cli("idp", "client", "add", name, *args, "--json")
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def ca(self) -> CertificateAuthority:
        return CertificateAuthority.open(self.home, passphrase=PASSPHRASE)


@contextmanager
def running_idp(
    home: Path,
    workdir: Path,
    *,
    port: int | None = None,
    extra_args: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    db: str | None = None,
    log_level: str = "info",
) -> Iterator[Idp]:
    """Start `python -m trustmesh idp serve` for the CA in ``home``; wait until it answers.

    Args:
        home: A CA home (e.g. made by the ``ca`` fixture).
        workdir: Where the bundle and the server log (``idp.log``) go.
        port: Port on 127.0.0.1 (default: a free one).
        extra_args: More `idp serve` arguments (e.g. ``("--access-ttl", "1m")``).
        env: More environment variables.
        db: ``--db`` URL (default: the CA's database).
        log_level: The server's --log-level (its JSON log lines go to ``idp.log``).
    """
    with CertificateAuthority.open(home) as ca:
        bundle = workdir / "idp-bundle.pem"
        bundle.write_bytes(pem_certificates(ca.bundle))
    port = port or free_port()
    log_path = workdir / "idp.log"
    db_args = ("--db", db) if db else ()
    extra_env = dict(env or {})
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trustmesh",
                "idp",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                *db_args,
                *extra_args,
                "--log-level",
                log_level,
            ],
            env=idp_env(home, extra_env),
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
                    raise RuntimeError(f"idp serve did not start: {log_path.read_text()}")
                time.sleep(0.1)
            yield Idp(url, home, bundle, log_path, process, db, extra_env)
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
