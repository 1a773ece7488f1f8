"""Real ACME clients against `ca serve`: certbot (http-01 standalone, EAB, a preferred
profile, renewal, revocation) and lego (http-01, tls-alpn-01, revocation); and the
`trustmesh acme eab create` command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.store import CertificateRecord

from ._acme import ACMEServerUnderTest, acme_ca_server
from .conftest import PASSPHRASE

pytestmark = pytest.mark.slow

CERTBOT = Path(sys.executable).parent / "certbot"
LEGO = shutil.which("lego")


@pytest.fixture(scope="module")
def acme_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ACMEServerUnderTest]:
    with acme_ca_server(tmp_path_factory.mktemp("acme-clients")) as running:
        yield running


def _record(under_test: ACMEServerUnderTest, cert: x509.Certificate) -> CertificateRecord:
    with CertificateAuthority.open(under_test.server.home, passphrase=PASSPHRASE) as ca:
        return ca.store.get_certificate(format(cert.serial_number, "x"))


def _leaf(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def _crl_serials(under_test: ACMEServerUnderTest, tmp: Path) -> str:
    (tmp / "crl.der").write_bytes(httpx.get(f"{under_test.ocsp_url}/crl").content)
    text = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", str(tmp / "crl.der"), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return text.upper()


def _ocsp(under_test: ACMEServerUnderTest, leaf: Path, tmp: Path) -> str:
    with CertificateAuthority.open(under_test.server.home) as ca:
        from cryptography.hazmat.primitives import serialization

        (tmp / "int.pem").write_bytes(ca.intermediate.public_bytes(serialization.Encoding.PEM))
    return subprocess.run(
        [
            "openssl",
            "ocsp",
            "-issuer",
            str(tmp / "int.pem"),
            "-cert",
            str(leaf),
            "-url",
            under_test.ocsp_url,
            "-CAfile",
            str(under_test.server.bundle),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _certbot(under_test: ACMEServerUnderTest, work: Path, *args: str) -> str:
    dirs = ["--config-dir", str(work / "config"), "--work-dir", str(work / "work")]
    dirs += ["--logs-dir", str(work / "logs")]
    done = subprocess.run(
        [str(CERTBOT), *args, "--non-interactive", *dirs],
        env={**os.environ, "REQUESTS_CA_BUNDLE": str(under_test.server.bundle)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.skipif(not CERTBOT.exists(), reason="certbot is not installed (pip install certbot)")
def test_certbot_issues_renews_and_revokes(
    acme_server: ACMEServerUnderTest, tmp_path: Path
) -> None:
    """certbot (standalone http-01, EAB, --preferred-profile short) gets a one-hour
    certificate, renews it with --force-renewal, and its revocation shows in the CRL
    (openssl crl) and OCSP (openssl ocsp)."""
    kid, hmac_key = acme_server.eab()
    directory = acme_server.directory("web")
    _certbot(
        acme_server,
        tmp_path,
        "certonly",
        "--server",
        directory,
        "--agree-tos",
        "--email",
        "ops@example.org",
        "--eab-kid",
        kid,
        "--eab-hmac-key",
        hmac_key,
        "--preferred-profile",
        "short",
        "--standalone",
        "--http-01-address",
        "127.0.0.1",
        "--http-01-port",
        str(acme_server.http_port),
        "-d",
        "certbot.localhost",
    )
    live = tmp_path / "config" / "live" / "certbot.localhost"
    first = _leaf(live / "cert.pem")
    record = _record(acme_server, first)
    assert record.profile == "short"
    assert record.dns == ("certbot.localhost",)
    assert first.not_valid_after_utc - first.not_valid_before_utc <= timedelta(hours=1, minutes=2)
    _certbot(acme_server, tmp_path, "renew", "--force-renewal", "--no-random-sleep-on-renew")
    second = _leaf(live / "cert.pem")
    assert second.serial_number != first.serial_number
    assert _record(acme_server, second).revoked_at is None
    _certbot(
        acme_server,
        tmp_path,
        "revoke",
        "--server",
        directory,
        "--cert-path",
        str(live / "cert.pem"),
        "--reason",
        "keycompromise",
        "--no-delete-after-revoke",
    )
    assert _record(acme_server, second).revocation_reason == "keyCompromise"
    assert format(second.serial_number, "X") in _crl_serials(acme_server, tmp_path)
    assert "revoked" in _ocsp(acme_server, live / "cert.pem", tmp_path).lower()


def _lego(under_test: ACMEServerUnderTest, work: Path, kid: str, key: str, *args: str) -> str:
    assert LEGO is not None
    done = subprocess.run(
        [
            LEGO,
            "--server",
            under_test.directory("web"),
            "--accept-tos",
            "--email",
            "ops@example.org",
            # lego asks for the binding on every command once the directory requires it.
            "--eab",
            "--kid",
            kid,
            "--hmac",
            key,
            "--path",
            str(work),
            *args,
        ],
        env={**os.environ, "LEGO_CA_CERTIFICATES": str(under_test.server.bundle)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.skipif(LEGO is None, reason="lego is not installed (apt-get install lego)")
@pytest.mark.parametrize("challenge", ["http", "tls"])
def test_lego_issues_over_http01_and_tls_alpn01_and_revokes(
    acme_server: ACMEServerUnderTest, tmp_path: Path, challenge: str
) -> None:
    """lego gets a certificate over http-01 (--http) and tls-alpn-01 (--tls); `lego
    revoke` puts it into the CRL."""
    kid, key = acme_server.eab()
    name = f"lego-{challenge}.localhost"
    port = acme_server.http_port if challenge == "http" else acme_server.tls_port
    output = _lego(
        acme_server,
        tmp_path,
        kid,
        key,
        "--domains",
        name,
        f"--{challenge}",
        f"--{challenge}.port",
        f"127.0.0.1:{port}",
        "run",
    )
    expected = "HTTP-01" if challenge == "http" else "TLS-ALPN-01"
    assert f"Trying to solve {expected}" in output
    cert_path = tmp_path / "certificates" / f"{name}.crt"
    leaf = _leaf(cert_path)
    assert _record(acme_server, leaf).dns == (name,)
    chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    assert len(chain) == 2  # leaf + intermediate, verified by openssl below
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(acme_server.server.bundle),
            "-untrusted",
            str(cert_path),
            str(cert_path),
        ],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    _lego(acme_server, tmp_path, kid, key, "--domains", name, "revoke")
    assert _record(acme_server, leaf).revoked_at is not None
    assert format(leaf.serial_number, "X") in _crl_serials(acme_server, tmp_path)


def test_eab_create_prints_the_key_once_and_refuses_unknown_provisioners(
    acme_server: ACMEServerUnderTest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`trustmesh acme eab create web --json` prints a kid and HMAC key that are stored
    sealed (not in clear) and audited; an unknown provisioner exits 2 naming the known ones."""
    monkeypatch.setenv("TRUSTMESH_HOME", str(acme_server.server.home))
    assert main(["acme", "eab", "create", "web", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kid"].startswith("eab_")
    with CertificateAuthority.open(acme_server.server.home) as ca:
        from sqlalchemy import select

        from trustmesh.store import acme_eab_keys

        with ca.store.reader() as conn:
            sealed = conn.execute(
                select(acme_eab_keys.c.key_sealed).where(acme_eab_keys.c.kid == printed["kid"])
            ).scalar_one()
        assert printed["hmac_key"] not in sealed
        assert any(e.action == "acme_eab_create" for e in ca.audit_tail(5))
    assert main(["acme", "eab", "create", "nope"]) == 2
    err = capsys.readouterr().err
    assert "Unknown" in err or "No ACME provisioner 'nope'" in err
    assert "brief" in err


#: lego's `--dns exec` hook: writes (present) or removes (cleanup) the TXT value in the
#: test DNS server's record directory, one file per name, one value a line.
LEGO_EXEC = """#!/bin/sh
set -eu
file="$TXT_DIR/$2"
case "$1" in
  present) printf '%s\\n' "$3" >> "$file" ;;
  cleanup)
    [ -f "$file" ] || exit 0
    grep -vxF "$3" "$file" > "$file.tmp" || true
    mv "$file.tmp" "$file" ;;
esac
"""


@pytest.mark.skipif(LEGO is None, reason="lego is not installed (apt-get install lego)")
def test_lego_issues_a_wildcard_over_dns01(
    acme_server: ACMEServerUnderTest, tmp_path: Path
) -> None:
    """lego (--dns exec, its hook writing into the test DNS server, --dns.resolvers at
    that server, --dns.disable-cp) gets a certificate for *.lego.example.internal and
    lego.example.internal from the dns provisioner."""
    assert LEGO is not None
    hook = tmp_path / "txt-hook.sh"
    hook.write_text(LEGO_EXEC)
    hook.chmod(0o755)
    resolver = f"127.0.0.1:{acme_server.dns.port}"
    done = subprocess.run(
        [
            LEGO,
            "--server",
            acme_server.directory("dns"),
            "--accept-tos",
            "--email",
            "ops@example.org",
            "--path",
            str(tmp_path / "lego"),
            "--domains",
            "*.lego.example.internal",
            "--domains",
            "lego.example.internal",
            "--dns",
            "exec",
            "--dns.resolvers",
            resolver,
            "--dns.disable-cp",
            "run",
        ],
        env={
            **os.environ,
            "LEGO_CA_CERTIFICATES": str(acme_server.server.bundle),
            "EXEC_PATH": str(hook),
            "EXEC_POLLING_INTERVAL": "1",
            "EXEC_PROPAGATION_TIMEOUT": "30",
            # Both names share one TXT record; lego solves them in turn (60 s apart by default).
            "EXEC_SEQUENCE_INTERVAL": "1",
            "TXT_DIR": str(acme_server.dns.directory),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Trying to solve DNS-01" in output
    cert_path = tmp_path / "lego" / "certificates" / "_.lego.example.internal.crt"
    leaf = _leaf(cert_path)
    assert sorted(_record(acme_server, leaf).dns) == [
        "*.lego.example.internal",
        "lego.example.internal",
    ]
