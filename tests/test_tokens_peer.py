"""trustmesh.tokens against a provider we did not write: Node's oidc-provider (npm).

The test starts `node tests/peers/oidc_provider.mjs` over HTTPS (certificate from
our CA), gets client_credentials tokens from it with plain HTTP calls, and
verifies them with our verifier through its discovery document and JWKS; an
opaque token goes through its RFC 7662 introspection endpoint, and a token it
bound to our client's mTLS certificate (RFC 8705) is checked against that certificate.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType, dump_private_key, pem_certificates
from trustmesh.serving import issue_server_identity
from trustmesh.tokens import (
    IntrospectionConfig,
    InvalidTokenError,
    IssuerConfig,
    Verifier,
    certificate_thumbprint,
)

from ._provider import NODE_RESOURCE_SERVER, NodeProvider, running_oidc_provider
from .conftest import PASSPHRASE

BOUND_CLIENT = ("svc-bound", "bound-secret-0123456789abcdef")


@pytest.fixture(scope="module")
def node_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProvider]:
    base = tmp_path_factory.mktemp("oidc-provider")
    ca = CertificateAuthority.init(
        base / "home", trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    )
    chain, key = issue_server_identity(ca, "127.0.0.1", base, path="/oidc-provider")
    bundle = base / "bundle.pem"
    bundle.write_bytes(pem_certificates(ca.bundle))
    client_certs = []
    for name in ("billing", "attacker"):
        issued = ca.issue(f"spiffe://example.org/ns/prod/sa/{name}")
        assert issued.key is not None
        cert_path, key_path = base / f"{name}.pem", base / f"{name}.key"
        cert_path.write_bytes(pem_certificates(issued.chain))
        key_path.write_bytes(dump_private_key(issued.key))
        client_certs.append((issued.certificate, cert_path, key_path))
    ca.close()
    with running_oidc_provider(chain, key, bundle, base) as provider:
        provider.client_certs = client_certs
        yield provider


@pytest.mark.parametrize(("resource", "alg"), [("es256", "ES256"), ("rs256", "RS256")])
def test_oidc_provider_tokens_are_accepted(
    node_provider: NodeProvider, resource: str, alg: str
) -> None:
    """A JWT access token from oidc-provider verifies through its discovery and JWKS."""
    token = node_provider.token(
        f"https://orders.example/{resource}", scope="orders:read orders:write"
    )
    config = IssuerConfig(
        node_provider.issuer, audiences=["orders"], ca_bundle=node_provider.bundle
    )
    with Verifier(config) as verifier:
        claims = verifier.verify_access_token(token)
    assert claims.issuer == node_provider.issuer
    assert claims.client_id == "svc-billing"
    assert claims.subject == "svc-billing"
    assert claims.audience == ("orders",)
    assert claims.scopes == {"orders:read", "orders:write"}
    assert claims.jwt_id
    assert claims.issued_at is not None
    assert claims.expires_at - claims.issued_at == 600
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["alg"] == alg
    assert header["typ"] == "at+jwt"


def test_oidc_provider_tokens_with_the_wrong_audience_are_refused(
    node_provider: NodeProvider,
) -> None:
    """The same provider's tokens are refused by a service expecting another audience."""
    token = node_provider.token("https://orders.example/es256")
    config = IssuerConfig(
        node_provider.issuer, audiences=["billing"], ca_bundle=node_provider.bundle
    )
    with Verifier(config) as verifier:
        with pytest.raises(InvalidTokenError) as info:
            verifier.verify_access_token(token)
    assert info.value.reason == "bad_audience"
    other_issuer = IssuerConfig(
        node_provider.issuer + "/", audiences=["orders"], ca_bundle=node_provider.bundle
    )
    with Verifier(other_issuer) as verifier:
        with pytest.raises(InvalidTokenError) as info:
            verifier.verify_access_token(token)
    assert info.value.reason == "bad_issuer"


def test_oidc_provider_opaque_token_by_introspection(node_provider: NodeProvider) -> None:
    """An opaque oidc-provider token is checked at its introspection endpoint (RFC 7662)."""
    token = node_provider.token("https://orders.example/opaque")
    assert token.count(".") != 2
    introspection = IntrospectionConfig(*NODE_RESOURCE_SERVER)
    config = IssuerConfig(
        node_provider.issuer,
        audiences=["orders"],
        ca_bundle=node_provider.bundle,
        introspection=introspection,
    )
    with Verifier(config) as verifier:
        claims = verifier.verify_access_token(token)
        assert claims.source == "introspection"
        assert claims.client_id == "svc-billing"
        assert claims.scopes == {"orders:read"}
        with pytest.raises(InvalidTokenError) as info:
            verifier.verify_access_token("x" * 43)
        assert info.value.reason == "inactive"


def test_oidc_provider_certificate_bound_tokens(node_provider: NodeProvider) -> None:
    """oidc-provider binds a token to the mTLS certificate it saw (RFC 8705); we agree.

    The thumbprint is computed by oidc-provider from the TLS handshake, so this checks
    our x5t#S256 against an independent implementation: the same certificate passes,
    another one or none is refused.
    """
    (mine, cert_path, key_path), (other, _, _) = node_provider.client_certs
    token = node_provider.token(
        "https://orders.example/es256", client=BOUND_CLIENT, tls_identity=(cert_path, key_path)
    )
    config = IssuerConfig(
        node_provider.issuer, audiences=["orders"], ca_bundle=node_provider.bundle
    )
    with Verifier(config) as verifier:
        claims = verifier.verify_access_token(token, client_cert=mine)
        assert claims.client_id == "svc-bound"
        assert claims.certificate_thumbprint == certificate_thumbprint(mine)
        for cert, reason in ((other, "cnf_mismatch"), (None, "cnf_missing_cert")):
            with pytest.raises(InvalidTokenError) as info:
                verifier.verify_access_token(token, client_cert=cert)
            assert info.value.reason == reason


def test_token_verify_cli_on_an_oidc_provider_token(node_provider: NodeProvider) -> None:
    """`python -m trustmesh token verify` checks a token oidc-provider issued (and refuses)."""
    token = node_provider.token("https://orders.example/rs256")
    common = ["--issuer", node_provider.issuer, "--ca-bundle", str(node_provider.bundle), "--json"]
    argv = [sys.executable, "-m", "trustmesh", "token", "verify", "-"]
    ok = subprocess.run(
        [*argv, "--audience", "orders", *common],
        input=token,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["claims"]["client_id"] == "svc-billing"
    refused = subprocess.run(
        [*argv, "--audience", "billing", *common],
        input=token,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["reason"] == "bad_audience"
