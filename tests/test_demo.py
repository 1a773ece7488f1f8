"""`make demo` runs end to end: real CLI, real mTLS, real CRL refusal, then the CA
server with real agent processes, a renewal, the revocation feed, CRL and OCSP, then the
identity server issuing a token that `token verify` accepts, refuses for another audience
and refuses once revoked, then the example services under `trustmesh run`: an allowed call
chain, a policy denial, a rotation during traffic and a revoked caller refused on its open
connection, then the edge gateway in front of them: a user's token through the gateway to
orders and inventory, and four refusals with the reasons the gateway logged."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trustmesh.demo"],
        capture_output=True,
        text=True,
        check=False,
        timeout=480,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert 'billing -> orders: 200 {"caller": "spiffe://demo.example/billing"}' in out
    assert "refused: certificate revoked" in out
    assert "audit chain intact: 6 event(s) verified" in out
    # act two: the CA as a service
    assert "enrolled spiffe://demo.example/payments" in out
    assert "replaying a used token: exit 1" in out
    assert "inventory renewed: serial" in out
    assert "'spiffe_id': 'spiffe://demo.example/payments', 'reason': 'keyCompromise'" in out
    assert "POST /v1/ocsp: REVOKED" in out
    # act three: the identity server and token verification
    assert "grants client_credentials" in out
    assert "refused (bad_audience)" in out
    assert "refused (revoked)" in out
    # act four: the example services under `trustmesh run`
    assert "orders saw caller    spiffe://demo.example/frontend" in out
    assert "inventory saw caller spiffe://demo.example/orders" in out
    assert "as frontend: 403\n  reason: policy_denied" in out
    assert "closest 'orders-reads-inventory' (rules[0]): caller not in" in out
    assert re.search(r"\n(\d+) requests during the rotation: \1 ok, 0 failed", out)
    assert re.search(r"serials orders presented, in order: \w+… -> \w+…", out)
    assert "on the same connection (port " in out
    assert "same: True): 403 revoked, Connection: close" in out
    assert re.search(r"next request: a new connection \(port \d+\): 403 revoked", out)
    # act five: the edge gateway
    assert "with alice's token: 200" in out
    assert "orders saw caller    spiffe://demo.example/gateway, user {'sub': " in out
    assert "inventory saw caller spiffe://demo.example/orders, user {'sub': " in out
    assert "both services verified alice's own token (same jti)" in out
    assert "too little scope (openid only): 403 insufficient_scope" in out
    assert "an expired token: 401 expired" in out
    assert "a forged token: 401 bad_signature" in out
    assert "a client at 203.0.113.9, a blocked address: 403 ip_denied" in out
    assert '"client_ip": "203.0.113.9"' in out
    assert "(4 of 4 with the expected reason, in the gateway's log)" in out
    assert out.rstrip().endswith("demo succeeded")
