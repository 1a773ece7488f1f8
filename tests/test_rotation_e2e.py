"""Staged rotation under load, with real processes: a `ca serve`, a `trustmesh run`
service (agent in-process, --id), a `trustmesh agent` keeping the client's identity and
Java truststore, and a client calling the service in a loop (a new TLS handshake per
request). The intermediate and then the root go through prepare -> activate -> retire
while every request is counted."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from trustmesh.authority import CertificateAuthority
from trustmesh.client import mtls_client
from trustmesh.pki import KeyType, pem_certificates
from trustmesh.tls import RotatingCredentials

from ._server import free_port, running_server, stop
from .conftest import PASSPHRASE

SERVICE = "spiffe://example.org/svc/inventory"
CLIENT = "spiffe://example.org/svc/orders"
TTL = 20  # seconds: leaves (and the CA server's own certificate) renew at 2/3 of it

APP = """\
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})
"""

pytestmark = pytest.mark.slow


def _env(home: Path, passphrase: bytes = PASSPHRASE) -> dict[str, str]:
    return {
        **os.environ,
        "TRUSTMESH_HOME": str(home),
        "TRUSTMESH_CA_PASSPHRASE": passphrase.decode(),
    }


def _cli(
    home: Path, *args: str, passphrase: bytes = PASSPHRASE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", *args],
        env=_env(home, passphrase),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _status(home: Path, role: str) -> dict[str, Any]:
    done = _cli(home, "ca", "rotate", role, "status", "--json")
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def _step(home: Path, role: str, step: str) -> None:
    done = _cli(home, "ca", "rotate", role, step)
    assert done.returncode == 0, done.stdout + done.stderr


def _refused(home: Path, role: str, step: str, pattern: str, **kw: Any) -> str:
    done = _cli(home, "ca", "rotate", role, step, **kw)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _set_overlap(home: Path, value: str) -> None:
    """Set rotation_min_overlap (each CLI step reads config.toml): 1h to see a refusal,
    1s to let the step go, so that the test does not depend on how fast commands start."""
    path = home / "config.toml"
    path.write_text(
        re.sub(
            r'rotation_min_overlap = "[^"]*"', f'rotation_min_overlap = "{value}"', path.read_text()
        )
    )
    time.sleep(1)


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _pem_count(path: Path) -> int:
    try:
        return len(x509.load_pem_x509_certificates(path.read_bytes()))
    except (OSError, ValueError):
        return -1


def _subjects(path: Path) -> set[str]:
    return {c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(path.read_bytes())}


def _keytool_entries(store: Path, password: str) -> int:
    done = subprocess.run(
        [
            "keytool",
            "-list",
            "-keystore",
            str(store),
            "-storetype",
            "PKCS12",
            "-storepass",
            password,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return sum(1 for line in done.stdout.splitlines() if "trustedCertEntry" in line)


def _openssl_verify(bundle: Path, chain: tuple[x509.Certificate, ...], workdir: Path) -> str:
    leaf, rest = workdir / "leaf.pem", workdir / "untrusted.pem"
    leaf.write_bytes(pem_certificates(chain[:1]))
    rest.write_bytes(pem_certificates(chain[1:]))
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(bundle), "-untrusted", str(rest), str(leaf)],
        capture_output=True,
        text=True,
        check=False,
    )
    return (done.stdout + done.stderr).strip()


class Load:
    """Calls the service in a loop, one new connection (handshake) per request."""

    def __init__(self, credentials: RotatingCredentials, url: str) -> None:
        self.credentials = credentials
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ctx = self.credentials.client_context(check_hostname=False)
            try:
                with mtls_client(ctx, expect_id=SERVICE, base_url=self.url, timeout=10) as http:
                    response = http.get("/")
                if response.status_code == 200:
                    self.ok += 1
                else:
                    self.failures.append(
                        f"{time.strftime('%H:%M:%S')} {response.status_code} {response.text[:200]}"
                    )
            except httpx.HTTPError as exc:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_intermediate_then_root_rotation_under_load(tmp_path: Path) -> None:
    """Both rotations, each prepare -> activate -> retire, with zero failed handshakes or
    requests; bundle.pem and the Java truststore follow without restarts; openssl verifies
    old- and new-issuer leaves against the published bundle at each stage; CRL and OCSP
    answer for a revoked old-issuer certificate during the overlap; steps out of order,
    twice or with a wrong passphrase are refused with one line and exit 2."""
    home = tmp_path / "home"
    CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    config = (home / "config.toml").read_text()
    config = config.replace("rotation_auto = true", "rotation_auto = false")
    config = re.sub(r'default_ttl = "[^"]*"', f'default_ttl = "{TTL}s"', config)
    config = re.sub(r'max_ttl = "[^"]*"', f'max_ttl = "{TTL}s"', config)
    (home / "config.toml").write_text(config)
    ocsp_port = free_port()
    plain = f"http://127.0.0.1:{ocsp_port}"
    procs: list[subprocess.Popen[str]] = []
    load: Load | None = None
    with running_server(
        home, tmp_path, extra_args=("--ocsp-listen", f"127.0.0.1:{ocsp_port}")
    ) as server:
        try:
            with server.ca() as ca:
                service_token = ca.create_join_token(SERVICE, actor="test")
                client_token = ca.create_join_token(CLIENT, actor="test")
            (tmp_path / "svcapp.py").write_text(APP)
            port = free_port()
            svc_dir, client_dir = tmp_path / "svc", tmp_path / "client"
            (tmp_path / "store-password").write_text("changeit\n")
            truststore = client_dir / "trust.p12"
            with (tmp_path / "run.log").open("w") as run_log:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "trustmesh",
                            "run",
                            "svcapp:app",
                            "--id",
                            SERVICE,
                            "--ca",
                            server.url,
                            "--token",
                            service_token,
                            "--bundle",
                            str(server.bundle),
                            "--cert-dir",
                            str(svc_dir),
                            "--listen",
                            f"127.0.0.1:{port}",
                            "--no-policy",
                            "--app-dir",
                            str(tmp_path),
                        ],
                        env={**os.environ},
                        stdout=run_log,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
            with (tmp_path / "agent.log").open("w") as agent_log:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "trustmesh",
                            *server.agent(CLIENT, client_dir),
                            "--token",
                            client_token,
                            "--bundle",
                            str(server.bundle),
                            "--truststore",
                            str(truststore),
                            "--store-password-file",
                            str(tmp_path / "store-password"),
                            "--crl",
                            str(tmp_path / "chain-crl.pem"),
                        ],
                        env={**os.environ},
                        stdout=agent_log,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
            _wait(lambda: _pem_count(client_dir / "chain.pem") > 0, 30, "the client agent")
            _wait(lambda: truststore.exists(), 30, "the truststore")
            credentials = RotatingCredentials(client_dir, expect_id=CLIENT, poll_interval=0.2)
            credentials.start()
            url = f"https://127.0.0.1:{port}"
            _wait(lambda: _pem_count(svc_dir / "chain.pem") > 0, 30, "the service")

            def ready() -> bool:  # the listener is up (not counted: nothing rotates yet)
                ctx = credentials.client_context(check_hostname=False)
                try:
                    with mtls_client(ctx, expect_id=SERVICE, base_url=url, timeout=5) as http:
                        return http.get("/").status_code == 200
                except httpx.HTTPError:
                    return False

            _wait(ready, 30, "the service to listen")
            load = Load(credentials, url)
            _wait(lambda: load is not None and load.ok > 5, 30, "the first requests")
            published = tmp_path / "published.pem"

            def fetch_bundle() -> Path:
                published.write_bytes(
                    httpx.get(
                        f"{server.url}/v1/bundle",
                        verify=ssl.create_default_context(cafile=str(client_dir / "bundle.pem")),
                    ).content
                )
                return published

            # -- intermediate: prepare ------------------------------------------------
            with server.ca() as ca:
                old_leaf = ca.issue("spiffe://example.org/old", actor="test")
            _step(home, "intermediate", "prepare")
            assert "OK" in _openssl_verify(fetch_bundle(), old_leaf.chain, tmp_path)
            _refused(
                home,
                "intermediate",
                "activate",
                r"^error: Refusing to activate .* allowed from \S+Z \(in ",
            )
            _refused(
                home,
                "intermediate",
                "prepare",
                r"^error: Refusing to prepare a new intermediate: .* is prepared",
            )
            _refused(home, "root", "prepare", r"^error: Refusing to prepare a new root")
            assert _status(home, "intermediate")["stage"] == "prepared"
            _set_overlap(home, "1s")
            # A wrong passphrase changes nothing.
            _refused(
                home, "intermediate", "activate", r"^error: Wrong passphrase", passphrase=b"wrong"
            )
            assert _status(home, "intermediate")["stage"] == "prepared"
            with server.ca() as ca:  # the old intermediate still signs
                old_leaf = ca.issue("spiffe://example.org/old", actor="test")
                victim = ca.issue("spiffe://example.org/victim", actor="test")
                old_inter = ca.intermediate
            _step(home, "intermediate", "activate")
            with server.ca() as ca:
                new_leaf = ca.issue("spiffe://example.org/new", actor="test")
                assert ca.intermediate != old_inter
                ca.revoke(format(victim.certificate.serial_number, "x"), actor="test")
            assert new_leaf.chain[1] != old_leaf.chain[1]
            bundle = fetch_bundle()
            assert "OK" in _openssl_verify(bundle, old_leaf.chain, tmp_path)
            assert "OK" in _openssl_verify(bundle, new_leaf.chain, tmp_path)
            # CRL (one per issuer in /crl/chain) and OCSP (by the old issuer) for the
            # revoked old-issuer certificate while both intermediates are published.
            chain_crls = tmp_path / "chain-crls.pem"
            _wait(
                lambda: (
                    chain_crls.write_bytes(httpx.get(f"{plain}/crl/chain").content) > 0
                    and chain_crls.read_text().count("BEGIN X509 CRL") == 3
                ),
                10,
                "three chain CRLs",
            )
            (tmp_path / "victim.pem").write_bytes(pem_certificates(victim.chain[:1]))
            (tmp_path / "old-inter.pem").write_bytes(pem_certificates([old_inter]))
            crl_check = subprocess.run(
                [
                    "openssl",
                    "verify",
                    "-crl_check_all",
                    "-CAfile",
                    str(bundle),
                    "-CRLfile",
                    str(chain_crls),
                    "-untrusted",
                    str(tmp_path / "old-inter.pem"),
                    str(tmp_path / "victim.pem"),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            assert "revoked" in (crl_check.stdout + crl_check.stderr), (
                crl_check.stdout + crl_check.stderr
            )
            assert "OK" in _openssl_verify_crl(bundle, chain_crls, new_leaf.chain, tmp_path)
            ocsp = subprocess.run(
                [
                    "openssl",
                    "ocsp",
                    "-issuer",
                    str(tmp_path / "old-inter.pem"),
                    "-cert",
                    str(tmp_path / "victim.pem"),
                    "-url",
                    plain + "/",
                    "-CAfile",
                    str(bundle),
                    "-VAfile",
                    str(tmp_path / "old-inter.pem"),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            assert ": revoked" in ocsp.stdout, ocsp.stdout + ocsp.stderr
            # The agent's chain CRL file (nginx ssl_crl) takes both intermediates' CRLs.
            _wait(
                lambda: (tmp_path / "chain-crl.pem").read_text().count("BEGIN X509 CRL") == 3,
                15,
                "three CRLs in the agent's --crl file",
            )
            # Retire too early: certificates of the old intermediate are still valid.
            _refused(
                home,
                "intermediate",
                "retire",
                r"^error: Refusing to retire intermediate 1 .*: \d+ certificates? it signed",
            )
            _wait(
                lambda: _status(home, "intermediate")["old_issuer_live_certificates"] == 0,
                TTL * 3,
                "the old intermediate's certificates to expire",
            )
            _step(home, "intermediate", "retire")
            assert _status(home, "intermediate")["stage"] == "idle"
            with server.ca() as ca:
                after = ca.issue("spiffe://example.org/after", actor="test")
            assert after.chain[1] == new_leaf.chain[1]
            assert "OK" in _openssl_verify(fetch_bundle(), after.chain, tmp_path)

            # -- root: prepare --------------------------------------------------------
            with server.ca() as ca:
                r1_leaf = ca.issue("spiffe://example.org/r1", actor="test")
                r1 = ca.root
            _set_overlap(home, "1h")
            _step(home, "root", "prepare")
            _refused(
                home, "root", "activate", r"^error: Refusing to activate root 2 .* allowed from"
            )
            for path in (client_dir / "bundle.pem", svc_dir / "bundle.pem"):
                _wait(lambda p=path: _pem_count(p) == 2, 15, f"two roots in {path}")
            _wait(
                lambda: _keytool_entries(truststore, "changeit") == 2,
                15,
                "two roots in the truststore",
            )
            bundle = fetch_bundle()
            assert _pem_count(bundle) == 2
            assert "OK" in _openssl_verify(bundle, r1_leaf.chain, tmp_path)
            _set_overlap(home, "1s")
            with server.ca() as ca:  # still under root 1
                r1_leaf = ca.issue("spiffe://example.org/r1", actor="test")
            _step(home, "root", "activate")
            with server.ca() as ca:
                r2_leaf = ca.issue("spiffe://example.org/r2", actor="test")
                r2 = ca.root
            assert r2 != r1
            assert len(r2_leaf.chain) == 3  # leaf, intermediate 3, root 2 by root 1
            bundle = fetch_bundle()
            assert "OK" in _openssl_verify(bundle, r1_leaf.chain, tmp_path)
            assert "OK" in _openssl_verify(bundle, r2_leaf.chain, tmp_path)
            # Old-anchored peers trust new-chain leaves, new-anchored ones old-chain leaves.
            (tmp_path / "r1.pem").write_bytes(pem_certificates([r1]))
            (tmp_path / "r2.pem").write_bytes(pem_certificates([r2]))
            assert "OK" in _openssl_verify(tmp_path / "r1.pem", r2_leaf.chain, tmp_path)
            assert "OK" in _openssl_verify(tmp_path / "r2.pem", r1_leaf.chain, tmp_path)
            _refused(home, "root", "retire", r"^error: Refusing to retire .*still valid")
            _wait(
                lambda: _status(home, "root")["message"].endswith("(now)"),
                TTL * 3,
                "the old root's certificates to expire",
            )
            _step(home, "root", "retire")
            for path in (client_dir / "bundle.pem", svc_dir / "bundle.pem"):
                _wait(
                    lambda p=path: _subjects(p) == {r2.subject.rfc4514_string()},
                    15,
                    f"root 2 alone in {path}",
                )
            _wait(
                lambda: _keytool_entries(truststore, "changeit") == 1,
                15,
                "one root in the truststore",
            )
            bundle = fetch_bundle()
            assert _pem_count(bundle) == 1
            with server.ca() as ca:
                final = ca.issue("spiffe://example.org/final", actor="test")
            assert len(final.chain) == 2  # no cross certificate once root 1 is gone
            assert "OK" in _openssl_verify(bundle, final.chain, tmp_path)
            before = load.ok
            _wait(
                lambda: load is not None and load.ok > before + 20, 30, "requests after the retire"
            )
            load.stop()
            credentials.stop()
            assert load.failures == [], load.failures[:5]
            assert load.ok > 100
            for process in procs:
                assert process.poll() is None, "a process restarted or died"
            # Nothing half-written by the refusals: the audit chain verifies.
            audit = _cli(home, "audit", "verify")
            assert audit.returncode == 0, audit.stdout + audit.stderr
        finally:
            if load is not None:
                load.stop()
            for process in procs:
                stop(process)


def _openssl_verify_crl(
    bundle: Path, crls: Path, chain: tuple[x509.Certificate, ...], workdir: Path
) -> str:
    leaf, rest = workdir / "crl-leaf.pem", workdir / "crl-untrusted.pem"
    leaf.write_bytes(pem_certificates(chain[:1]))
    rest.write_bytes(pem_certificates(chain[1:]))
    done = subprocess.run(
        [
            "openssl",
            "verify",
            "-crl_check_all",
            "-CAfile",
            str(bundle),
            "-CRLfile",
            str(crls),
            "-untrusted",
            str(rest),
            str(leaf),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return (done.stdout + done.stderr).strip()
