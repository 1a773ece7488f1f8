"""Debian's pebble (Let's Encrypt's ACME test server) and its pebble-challtestsrv DNS, started
as real processes on 127.0.0.1, for tests that run the same ACME clients against pebble and
against `ca serve` (tests/test_acme_pebble.py) and for bench/acme.py --pebble."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PEBBLE = shutil.which("pebble")
CHALLTESTSRV = shutil.which("pebble-challtestsrv")
#: Why tests needing pebble skip.
MISSING = "pebble is not installed (apt-get install pebble)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def listener_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """(CA bundle, cert, key): a throwaway CA and a 127.0.0.1/localhost leaf for pebble's
    HTTPS listener (Debian's package ships no test certificate)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble listener test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    bundle, cert, key_path = (
        directory / "listener-ca.pem",
        directory / "listener.pem",
        directory / "listener-key.pem",
    )
    bundle.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return bundle, cert, key_path


@dataclass
class Pebble:
    """A running pebble: its directory URL, the bundle for its HTTPS listener, its management
    URL (roots, certificate status) and the challtestsrv that is its DNS."""

    url: str
    management: str
    bundle: Path
    http_port: int
    tls_port: int
    dns_port: int
    challtestsrv: str
    eab_keys: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    used: set[str] = field(default_factory=set)

    @property
    def directory(self) -> str:
        return f"{self.url}/dir"

    def eab(self) -> tuple[str, str]:
        """A (kid, HMAC key) from pebble's config: pebble has no command to make more."""
        kid = next((k for k in self.eab_keys if k not in self.used), None)
        assert kid is not None, f"all {len(self.eab_keys)} EAB keys of this pebble are used"
        self.used.add(kid)
        return kid, self.eab_keys[kid]

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.bundle))

    def root_pem(self) -> bytes:
        return httpx.get(f"{self.management}/roots/0", verify=self.tls()).content

    def cert_status(self, serial: int) -> dict[str, Any]:
        answer = httpx.get(f"{self.management}/cert-status-by-serial/{serial:x}", verify=self.tls())
        answer.raise_for_status()
        return dict(answer.json())

    def set_txt(self, name: str, value: str) -> None:
        httpx.post(
            f"{self.challtestsrv}/set-txt", json={"host": name, "value": value}
        ).raise_for_status()

    def clear_txt(self, name: str) -> None:
        httpx.post(f"{self.challtestsrv}/clear-txt", json={"host": name}).raise_for_status()


@contextmanager
def running_challtestsrv(workdir: Path) -> Iterator[tuple[int, str]]:
    """pebble-challtestsrv as a DNS server only: A queries for any name answer 127.0.0.1
    (no AAAA), TXT records are set through its management API. Yields (dns port, mgmt URL)."""
    assert CHALLTESTSRV is not None, MISSING
    dns_port, mgmt_port = _free_port(), _free_port()
    log = (workdir / "challtestsrv.log").open("wb")
    process = subprocess.Popen(
        [
            CHALLTESTSRV,
            "-dns01",
            f"127.0.0.1:{dns_port}",
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            f"127.0.0.1:{mgmt_port}",
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    management = f"http://127.0.0.1:{mgmt_port}"
    try:
        _wait(lambda: httpx.post(f"{management}/clear-txt", json={"host": "x."}), process, log)
        yield dns_port, management
    finally:
        _stop(process)
        log.close()


def _wait(probe: Callable[[], object], process: subprocess.Popen[bytes], log: BinaryIO) -> None:
    deadline = time.monotonic() + 60  # pebble makes RSA root and intermediate keys first
    while True:
        try:
            probe()
            return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.args!r} did not start: see {log.name}")
        time.sleep(0.1)


@contextmanager
def running_pebble(
    workdir: Path,
    *,
    http_port: int,
    tls_port: int,
    dns_port: int,
    challtestsrv: str,
    eab_keys: int = 8,
    env: dict[str, str] | None = None,
) -> Iterator[Pebble]:
    """pebble with EAB required (``eab_keys`` kids in its config), validating http-01 on
    ``http_port`` and tls-alpn-01 on ``tls_port``, resolving every name (A and TXT) through
    the challtestsrv DNS on ``dns_port``. ``env`` adds PEBBLE_* settings; by default no
    validation sleep, no nonce rejection and no authorization reuse, so runs are repeatable."""
    assert PEBBLE is not None, MISSING
    workdir.mkdir(parents=True, exist_ok=True)
    bundle, cert, key = listener_certificate(workdir)
    port, mgmt = _free_port(), _free_port()
    keys = {
        f"kid-{i}": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        for i in range(eab_keys)
    }
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{port}",
            "managementListenAddress": f"127.0.0.1:{mgmt}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": bool(keys),
            "externalAccountMACKeys": keys,
        }
    }
    (workdir / "pebble.json").write_text(json.dumps(config))
    settings = {
        "PEBBLE_VA_NOSLEEP": "1",
        "PEBBLE_WFE_NONCEREJECT": "0",
        "PEBBLE_AUTHZREUSE": "0",
    } | (env or {})
    log_path = workdir / "pebble.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [
            PEBBLE,
            "-config",
            str(workdir / "pebble.json"),
            "-dnsserver",
            f"127.0.0.1:{dns_port}",
            "-strict=false",
        ],
        env={**os.environ, **settings},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"https://127.0.0.1:{port}"
    try:
        _wait(
            lambda: httpx.get(
                f"{url}/dir", verify=ssl.create_default_context(cafile=str(bundle))
            ).raise_for_status(),
            process,
            log,
        )
        yield Pebble(
            url,
            f"https://127.0.0.1:{mgmt}",
            bundle,
            http_port,
            tls_port,
            dns_port,
            challtestsrv,
            keys,
            log_path,
        )
    finally:
        _stop(process)
        log.close()
