"""Expiry of the CA's own certificates: the warning in `ca show`, the `ca serve` log and
the `trustmesh_ca_certificate_expiry_seconds` metric of a real server."""

from __future__ import annotations

import json
import re
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from trustmesh.authority import CertificateAuthority, IssuerExpiry
from trustmesh.cli import main

from ._server import running_server
from .conftest import PASSPHRASE


def _old_ca(home: Path, age: timedelta) -> None:
    """A CA created ``age`` ago: its 1-year intermediate has 365 days - age left."""
    CertificateAuthority.init(
        home,
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        now=datetime.now(UTC) - age,
    ).close()


def test_expiry_rules(ca: CertificateAuthority) -> None:
    """Intermediate: under 1/3 of life or 30 days warns; root: under a year; expired says so."""
    now = datetime.now(UTC)
    fresh = {e.role: e for e in ca.issuer_expiry(now)}
    assert fresh["root"].warning is None
    assert fresh["intermediate"].warning is None
    at = ca.intermediate.not_valid_after_utc - timedelta(days=100)  # < 1/3 of 365 days
    assert "intermediate CA certificate expires in 100.0 days" in str(
        IssuerExpiry.of("intermediate", ca.intermediate, at).warning
    )
    at = ca.intermediate.not_valid_after_utc - timedelta(days=130)  # > 1/3, > 30 days
    assert IssuerExpiry.of("intermediate", ca.intermediate, at).warning is None
    at = ca.root.not_valid_after_utc - timedelta(days=200)
    assert "root CA certificate expires in 200 days" in str(
        IssuerExpiry.of("root", ca.root, at).warning
    )
    late = IssuerExpiry.of(
        "intermediate", ca.intermediate, ca.intermediate.not_valid_after_utc + timedelta(seconds=5)
    )
    assert late.seconds_left < 0
    assert "expired" in str(late.warning)


def test_ca_show_warns_about_a_soon_expiring_intermediate(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ca show` (table and --json) warns when the intermediate has 20 days left."""
    _old_ca(home, timedelta(days=345))
    capsys.readouterr()
    assert main(["ca", "show", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["warnings"]) == 1
    assert "intermediate CA certificate expires in 20" in info["warnings"][0]
    assert 19 * 86400 < info["expires_in_seconds"]["intermediate"] < 21 * 86400
    assert main(["ca", "show"]) == 0
    table = capsys.readouterr().out
    assert "WARNING" in table
    assert "intermediate CA certificate expires in" in table


def test_ca_show_has_no_warning_for_a_new_ca(
    ca: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh CA shows no warning."""
    capsys.readouterr()
    assert main(["ca", "show", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []


@pytest.mark.slow
def test_ca_serve_logs_and_exports_expiry(tmp_path: Path) -> None:
    """A real `ca serve` logs the warning at start and exports both gauges on /metrics."""
    home = tmp_path / "home"
    _old_ca(home, timedelta(days=345))
    with running_server(home, tmp_path) as server:
        with httpx.Client(
            verify=ssl.create_default_context(cafile=server.bundle), timeout=10
        ) as http:
            metrics = http.get(f"{server.url}/metrics").text
        values = dict(
            re.findall(
                r'^trustmesh_ca_certificate_expiry_seconds\{role="(\w+)"\} (\S+)$',
                metrics,
                re.MULTILINE,
            )
        )
        assert 19 * 86400 < float(values["intermediate"]) < 21 * 86400
        assert float(values["root"]) > 9 * 365 * 86400
    log = (tmp_path / "serve.log").read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    warnings = [entry for entry in lines if entry.get("event") == "ca_certificate_expiry"]
    assert len(warnings) == 1
    assert warnings[0]["role"] == "intermediate"
    assert warnings[0]["level"] == "warning"
    assert "expires in 20" in warnings[0]["msg"]
