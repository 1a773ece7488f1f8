"""`make demo` runs end to end: real CLI, real mTLS, real CRL refusal."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trustmesh.demo"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert 'billing -> orders: 200 {"caller": "spiffe://demo.example/billing"}' in out
    assert "refused: certificate revoked" in out
    assert "audit chain intact: 6 event(s) verified" in out
    assert out.rstrip().endswith("demo succeeded")
