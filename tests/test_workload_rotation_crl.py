"""The node agent during a CA rotation: the chain CRLs then include the other
intermediate's, which the agent must accept (checked against the published issuers)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType, SpiffeID
from trustmesh.workload import WorkloadAgent

from ._server import running_server
from .conftest import PASSPHRASE

NODE = "spiffe://example.org/node/host1"


@pytest.mark.slow
def test_chain_crls_of_both_intermediates_are_held_during_rotation(tmp_path: Path) -> None:
    """With an intermediate prepared (as `ca serve` does by itself at half the active
    one's life), the first sync holds the CRLs of both intermediates and the root instead
    of failing with 'signed by none of the trust bundle's roots'."""
    home = tmp_path / "home"
    CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        ca.rotate("intermediate", "prepare", now=datetime.now(UTC) - timedelta(seconds=1))
    with running_server(home, tmp_path) as server:
        with server.ca() as ca:
            token = ca.create_join_token(NODE, actor="test")
            ca.create_entry(
                "spiffe://example.org/svc/app",
                node_id=NODE,
                selectors=[f"unix:uid:{os.getuid()}"],
                actor="test",
            )
        agent = WorkloadAgent(
            server.url, SpiffeID.parse(NODE), tmp_path / "data", bundle=server.bundle, token=token
        )
        try:
            agent.node.ensure()
            agent.sync()
            crls = [x509.load_der_x509_crl(der) for der in agent.cache.snapshot().crls]
        finally:
            agent.close()
    issuers = sorted(crl.issuer.rfc4514_string() for crl in crls)
    assert issuers == [
        "CN=trustmesh Intermediate CA 2,O=example.org",
        "CN=trustmesh Intermediate CA,O=example.org",
        "CN=trustmesh Root CA,O=example.org",
    ]
