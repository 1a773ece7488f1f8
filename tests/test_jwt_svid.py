"""JWT-SVIDs: the CA signs them (ES256, keys in the bundle), trustmesh.tokens verifies them."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.errors import ConfigError, ScopeError
from trustmesh.tokens import ExpiredTokenError, InvalidTokenError, verify_jwt_svid

NODE = "spiffe://example.org/node/host1"
APP = "spiffe://example.org/svc/app"
AUD = "spiffe://example.org/db"


def _b64(data: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.fixture
def signed(ca: CertificateAuthority) -> tuple[CertificateAuthority, str, dict[str, object]]:
    node = ca.issue(NODE).certificate
    entry = ca.create_entry(APP, node_id=NODE, selectors=["unix:uid:1"])
    token, _ = ca.sign_jwt_svid(node, entry.entry_id, [AUD])
    return ca, token, {"keys": ca.jwt_keys()}


def test_ca_signs_and_tokens_verifies(
    signed: tuple[CertificateAuthority, str, dict[str, object]],
) -> None:
    """A JWT-SVID verifies for its audience with the bundle's jwt-svid key."""
    ca, token, jwks = signed
    verified = verify_jwt_svid(token, audience=AUD, jwks=jwks, trust_domain="example.org")
    assert verified.spiffe_id == APP
    assert verified.audience == (AUD,)
    assert jwks["keys"][0]["use"] == "jwt-svid"  # type: ignore[index]
    assert (ca.home / "jwt-svid.key").stat().st_mode & 0o777 == 0o600
    assert ca.audit_tail(1)[0].action == "jwt-svid"


def test_refusals(signed: tuple[CertificateAuthority, str, dict[str, object]]) -> None:
    """Wrong audience, expiry, alg none, a forged signature and foreign subjects are refused."""
    _, token, jwks = signed
    header, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))

    def check(tok: str, reason: str, **kw: Any) -> None:
        options: dict[str, Any] = {
            "audience": AUD,
            "jwks": jwks,
            "trust_domain": "example.org",
            **kw,
        }
        with pytest.raises(InvalidTokenError) as info:
            verify_jwt_svid(tok, **options)
        assert info.value.reason == reason

    check(token, "bad_audience", audience="spiffe://example.org/other")
    with pytest.raises(ExpiredTokenError):
        verify_jwt_svid(
            token, audience=AUD, jwks=jwks, trust_domain="example.org", now=time.time() + 3600
        )
    check(f"{_b64({'alg': 'none'})}.{payload}.", "alg_not_allowed")
    check(f"{_b64({'alg': 'HS256'})}.{payload}.{sig}", "alg_not_allowed")
    check(
        f"{header}.{_b64({**claims, 'sub': 'spiffe://example.org/admin'})}.{sig}", "bad_signature"
    )
    check(token, "bad_claim", trust_domain="other.org")
    check("a.b", "malformed")
    check(token, "unknown_kid", jwks={"keys": []})


def test_only_the_entry_node_gets_a_jwt(ca: CertificateAuthority) -> None:
    """The CA signs a JWT-SVID only for the node the entry names, and needs an audience."""
    other = ca.issue("spiffe://example.org/node/host2").certificate
    node = ca.issue(NODE).certificate
    entry = ca.create_entry(APP, node_id=NODE, selectors=["unix:uid:1"])
    with pytest.raises(ScopeError, match=r"not spiffe://example\.org/node/host2"):
        ca.sign_jwt_svid(other, entry.entry_id, [AUD])
    with pytest.raises(ConfigError, match="audiences"):
        ca.sign_jwt_svid(node, entry.entry_id, [])
