"""An agent that was offline during a rotation catches up (issue 17), with real processes:
a `ca serve` and a long-running `trustmesh agent` keeping bundle.pem and a Java/PKCS#12
truststore. The agent is stopped (SIGTERM) before `ca rotate root prepare`, the root is
prepared and activated while it is down, and once restarted it must hold the new bundle
within seconds (from the feed's bundle event, not a restart of anything else) and renew
onto the new issuer. A second test runs traffic through a sidecar hop across an
intermediate prepare -> activate."""

from __future__ import annotations

import os
import re
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

from ._server import running_server, stop
from ._sidecar import SIDECAR_ID, node_app, sidecar
from .conftest import PASSPHRASE

CLIENT = "spiffe://example.org/svc/orders"
TTL = 30  # seconds: longer than the offline window on a loaded machine; renewal at ~2/3

pytestmark = pytest.mark.slow


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", *args],
        env={
            **os.environ,
            "TRUSTMESH_HOME": str(home),
            "TRUSTMESH_CA_PASSPHRASE": PASSPHRASE.decode(),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _wait(predicate: Any, timeout: float, what: str) -> float:
    """Wait for ``predicate``; return how long it took."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - start


def _certs(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return []


def _keytool_entries(store: Path, password: str) -> int:
    done = subprocess.run(
        [
            *("keytool", "-list", "-keystore", str(store)),
            *("-storetype", "PKCS12", "-storepass", password),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return sum(1 for line in done.stdout.splitlines() if "trustedCertEntry" in line)


def test_agent_offline_during_root_prepare_and_activate_catches_up(tmp_path: Path) -> None:
    """Stopped before `root prepare`, restarted after `root activate`: within a few
    seconds bundle.pem and the truststore hold both roots, the agent renews onto the new
    root's intermediate, and its new chain verifies (openssl) against its bundle.pem."""
    home = tmp_path / "home"
    CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    config = (home / "config.toml").read_text()
    config = config.replace("rotation_auto = true", "rotation_auto = false")
    config = re.sub(r'default_ttl = "[^"]*"', f'default_ttl = "{TTL}s"', config)
    config = re.sub(r'max_ttl = "[^"]*"', f'max_ttl = "{TTL}s"', config)
    config = re.sub(r'rotation_min_overlap = "[^"]*"', 'rotation_min_overlap = "1s"', config)
    (home / "config.toml").write_text(config)
    out = tmp_path / "agent"
    truststore = out / "trust.p12"
    (tmp_path / "store-password").write_text("changeit\n")
    agent: subprocess.Popen[str] | None = None
    with running_server(home, tmp_path) as server:

        def start_agent(log_name: str, *extra: str) -> subprocess.Popen[str]:
            with (tmp_path / log_name).open("w") as log:
                return subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "trustmesh",
                        *server.agent(CLIENT, out),
                        *extra,
                        "--bundle",
                        str(server.bundle),
                        "--truststore",
                        str(truststore),
                        "--store-password-file",
                        str(tmp_path / "store-password"),
                    ],
                    env={**os.environ},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    text=True,
                )

        try:
            agent = start_agent("agent-1.log", "--token", server.join_token(CLIENT))
            _wait(lambda: len(_certs(out / "chain.pem")) > 0, 30, "the first enrollment")
            _wait(lambda: _keytool_entries(truststore, "changeit") == 1, 30, "the truststore")
            with server.ca() as ca:
                root1, inter1 = ca.root, ca.intermediate
            assert _certs(out / "chain.pem")[1] == inter1
            stop(agent)  # SIGTERM: the agent is offline for the whole rotation
            assert agent.returncode == 0, (tmp_path / "agent-1.log").read_text()
            agent = None

            for step in ("prepare", "activate"):
                if step == "activate":
                    time.sleep(1.1)  # rotation_min_overlap = 1s
                done = _cli(home, "ca", "rotate", "root", step)
                assert done.returncode == 0, done.stdout + done.stderr
            with server.ca() as ca:
                root2, inter2 = ca.root, ca.intermediate
            assert root2 != root1
            assert inter2 != inter1
            # Nothing wrote the offline agent's files meanwhile: it holds root 1 alone.
            assert _certs(out / "bundle.pem") == [root1]
            assert _keytool_entries(truststore, "changeit") == 1

            agent = start_agent("agent-2.log")  # its existing identity, no join token
            restarted = agent

            def caught_up() -> bool:
                assert restarted.poll() is None, (tmp_path / "agent-2.log").read_text()
                return {c.subject for c in _certs(out / "bundle.pem")} == {
                    root1.subject,
                    root2.subject,
                }

            took = _wait(
                caught_up,
                10,
                "both roots in bundle.pem after the restart",
            )
            assert took < 10
            _wait(
                lambda: _keytool_entries(truststore, "changeit") == 2,
                10,
                "both roots in the truststore",
            )
            _wait(
                lambda: (chain := _certs(out / "chain.pem")) and chain[1] == inter2,
                TTL + 5,
                "a renewal onto the new root's intermediate",
            )
            chain = _certs(out / "chain.pem")
            assert len(chain) == 3  # leaf, intermediate under root 2, root 2 by root 1
            (tmp_path / "untrusted.pem").write_bytes(pem_certificates(chain[1:]))
            verify = subprocess.run(
                [
                    *("openssl", "verify", "-CAfile", str(out / "bundle.pem")),
                    *("-untrusted", str(tmp_path / "untrusted.pem"), str(out / "cert.pem")),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            assert "OK" in verify.stdout, verify.stdout + verify.stderr
            log = (tmp_path / "agent-2.log").read_text()
            assert "bundle_updated" in log or "trust bundle" in log, log
            assert agent.poll() is None, log
        finally:
            if agent is not None:
                stop(agent)


def test_sidecar_hop_has_no_failure_across_intermediate_prepare_and_activate(
    tmp_path: Path,
) -> None:
    """Traffic (a new mTLS connection per request, client identity kept by a `trustmesh
    agent`) through `proxy inbound --http --id` (its agent in-process, revocation feed
    on) to a plain Node.js app, while the intermediate is prepared and activated and
    both the sidecar and the client renew onto the new intermediate: zero failures."""
    home = tmp_path / "home"
    CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    config = (home / "config.toml").read_text()
    config = config.replace("rotation_auto = true", "rotation_auto = false")
    config = re.sub(r'default_ttl = "[^"]*"', f'default_ttl = "{TTL}s"', config)
    config = re.sub(r'max_ttl = "[^"]*"', f'max_ttl = "{TTL}s"', config)
    config = re.sub(r'rotation_min_overlap = "[^"]*"', 'rotation_min_overlap = "1s"', config)
    (home / "config.toml").write_text(config)
    sidecar_dir, client_dir = tmp_path / "sidecar", tmp_path / "client"
    agent: subprocess.Popen[str] | None = None
    load: Load | None = None
    with running_server(home, tmp_path) as server, node_app("plain_app.js", tmp_path) as web:
        with server.ca() as ca:
            inter1 = ca.intermediate
        with sidecar(
            "inbound",
            tmp_path,
            *("--id", SIDECAR_ID, "--cert-dir", str(sidecar_dir), "--http"),
            *("--ca", server.url, "--token", server.join_token(SIDECAR_ID)),
            *("--bundle", str(server.bundle), "--to", f"127.0.0.1:{web.port}"),
            *("--allow-id", CLIENT, "--log-level", "warning"),
        ) as proxy:
            try:
                with (tmp_path / "agent.log").open("w") as log:
                    agent = subprocess.Popen(
                        [
                            *(sys.executable, "-m", "trustmesh", *server.agent(CLIENT, client_dir)),
                            *("--token", server.join_token(CLIENT), "--bundle", str(server.bundle)),
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                _wait(lambda: len(_certs(client_dir / "chain.pem")) > 0, 30, "the client agent")
                credentials = RotatingCredentials(client_dir, expect_id=CLIENT, poll_interval=0.2)
                credentials.start()
                load = Load(credentials, f"https://127.0.0.1:{proxy.port}")
                _wait(lambda: load is not None and load.ok > 5, 30, "the first requests")
                assert load.failures == [], load.failures[:5]

                for step in ("prepare", "activate"):
                    if step == "activate":
                        time.sleep(1.1)  # rotation_min_overlap = 1s
                    done = _cli(home, "ca", "rotate", "intermediate", step)
                    assert done.returncode == 0, done.stdout + done.stderr
                with server.ca() as ca:
                    inter2 = ca.intermediate
                assert inter2 != inter1
                for directory in (sidecar_dir, client_dir):
                    _wait(
                        lambda d=directory: (
                            (chain := _certs(d / "chain.pem")) and chain[1] == inter2
                        ),
                        TTL + 5,
                        f"a renewal onto the new intermediate in {directory}",
                    )
                before = load.ok
                _wait(lambda: load is not None and load.ok > before + 10, 15, "requests after")
                load.stop()
                credentials.stop()
                assert load.failures == [], load.failures[:5]
                assert load.ok > 50
                assert proxy.process.poll() is None
                assert agent.poll() is None
            finally:
                if load is not None:
                    load.stop()
                if agent is not None:
                    stop(agent)


class Load:
    """Calls the sidecar in a loop, a new connection (handshake) per request."""

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
                with mtls_client(ctx, expect_id=SIDECAR_ID, base_url=self.url, timeout=10) as http:
                    response = http.get("/", headers={"connection": "close"})
                if response.status_code == 200 and response.json()["caller"] == CLIENT:
                    self.ok += 1
                else:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
            except (httpx.HTTPError, ValueError) as exc:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
