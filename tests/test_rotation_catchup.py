"""An agent that was offline during a rotation catches up (issue 17), with real processes:
a `ca serve` and a long-running `trustmesh agent` keeping bundle.pem and a Java/PKCS#12
truststore. The agent is stopped (SIGTERM) before `ca rotate root prepare`, the root is
prepared and activated while it is down, and once restarted it must hold the new bundle
within seconds (from the feed's bundle event, not a restart of anything else) and renew
onto the new issuer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType, pem_certificates

from ._server import running_server, stop
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
