"""Our verifier against our identity server: what `idp serve` issues, `trustmesh.tokens` accepts,
and what it revokes, binds or scopes elsewhere, the verifier refuses with the right reason.

Real processes and real TLS throughout: `idp serve` runs as its own process with a certificate
from the test CA; the verifier fetches discovery, JWKS and the revocation list over HTTPS.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import dump_private_key, pem_certificates
from trustmesh.tokens import InvalidTokenError, IssuerConfig, Verifier

from ._idp import Idp, running_idp
from ._login import authorize_params, pkce_pair, query, sign_in
from .conftest import PASSPHRASE


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Idp]:
    home = tmp_path_factory.mktemp("home")
    CertificateAuthority.init(home, trust_domain="example.org", passphrase=PASSPHRASE).close()
    with running_idp(home, tmp_path_factory.mktemp("idp")) as server:
        yield server


def _verifier(idp: Idp, audience: str, **options: Any) -> Verifier:
    return Verifier(
        IssuerConfig(issuer=idp.url, audiences=(audience,), ca_bundle=idp.bundle, **options)
    )


def _client_token(idp: Idp, creds: dict[str, Any], **data: str) -> str:
    with idp.http() as http:
        r = http.post(
            idp.token_url,
            auth=(creds["client_id"], creds["client_secret"]),
            data={"grant_type": "client_credentials", **data},
        )
    assert r.status_code == 200, r.text
    token: str = r.json()["access_token"]
    return token


def _refused(verifier: Verifier, token: str, **kw: Any) -> str:
    with pytest.raises(InvalidTokenError) as refused:
        verifier.verify_access_token(token, **kw)
    return refused.value.reason


def test_machine_token_is_accepted_for_its_audience_only(idp: Idp) -> None:
    creds = idp.add_client(
        "orders-caller", "--scope", "orders:read", "--audience", "orders", "--role", "batch"
    )
    token = _client_token(idp, creds, scope="orders:read")
    with _verifier(idp, "orders") as verifier:
        claims = verifier.verify_access_token(token)
        assert claims.issuer == idp.url
        assert claims.subject == creds["client_id"]
        assert "orders:read" in claims.scopes
        assert claims.roles == ("batch",)
    with _verifier(idp, "billing") as other:
        assert _refused(other, token) == "bad_audience"


def test_revoked_token_is_refused_once_the_list_is_polled(idp: Idp) -> None:
    creds = idp.add_client("revoke-me", "--scope", "read", "--audience", "api")
    token = _client_token(idp, creds)
    poll = timedelta(seconds=1)
    with _verifier(idp, "api", revocation_poll_interval=poll) as verifier:
        verifier.verify_access_token(token)  # now cached as verified
        with idp.http() as http:
            r = http.post(
                f"{idp.url}/revoke",
                auth=(creds["client_id"], creds["client_secret"]),
                data={"token": token, "token_type_hint": "access_token"},
            )
        assert r.status_code == 200, r.text
        time.sleep(1.2)  # the next use after the poll interval fetches the list again
        assert _refused(verifier, token) == "revoked"
    with _verifier(idp, "api") as fresh:  # a verifier started after the revocation
        assert _refused(fresh, token) == "revoked"


def _identity(idp: Idp, spiffe_id: str, directory: Path) -> tuple[Path, Path, x509.Certificate]:
    with CertificateAuthority.open(idp.home, passphrase=PASSPHRASE) as ca:
        issued = ca.issue(spiffe_id)
    assert issued.key is not None
    chain = directory / f"{uuid.uuid4().hex}.pem"
    key = directory / f"{uuid.uuid4().hex}.key"
    chain.write_bytes(pem_certificates(issued.chain))
    key.write_bytes(dump_private_key(issued.key))
    return chain, key, issued.certificate


def test_certificate_bound_token_needs_the_same_certificate(idp: Idp, tmp_path: Path) -> None:
    spiffe_id = "spiffe://example.org/ns/prod/svc/reports"
    creds = idp.add_client(
        "reports",
        "--scope",
        "read",
        "--audience",
        "api",
        "--auth-method",
        "tls_client_auth",
        "--tls-spiffe-id",
        spiffe_id,
    )
    chain, key, cert = _identity(idp, spiffe_id, tmp_path)
    _, _, other = _identity(idp, spiffe_id, tmp_path)  # same ID, another key: a thief's cert
    with idp.http(chain, key) as http:
        r = http.post(
            idp.token_url,
            data={"grant_type": "client_credentials", "client_id": creds["client_id"]},
        )
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    with _verifier(idp, "api", require_bound_tokens=True) as verifier:
        assert verifier.verify_access_token(token, client_cert=cert).subject == creds["client_id"]
        assert _refused(verifier, token) == "cnf_missing_cert"
        assert _refused(verifier, token, client_cert=other) == "cnf_mismatch"
        unbound = _client_token(idp, idp.add_client("plain", "--audience", "api", "--scope", "x"))
        assert _refused(verifier, unbound) == "unbound"


def test_user_access_token_is_accepted_and_the_id_token_is_not(idp: Idp) -> None:
    redirect = "https://app.example.org/callback"
    creds = idp.add_client(
        "webapp",
        "--scope",
        "openid",
        "--scope",
        "profile",
        "--scope",
        "email",
        "--audience",
        "orders",
        "--redirect-uri",
        redirect,
        "--grant-type",
        "authorization_code",
        "--grant-type",
        "refresh_token",
    )
    password = idp.home / "alice.pw"
    password.write_text("correct horse battery staple\n")
    idp.cli("idp", "user", "add", "alice", "--role", "buyer", "--password-file", str(password))
    verifier_code, challenge = pkce_pair()
    params = authorize_params(creds["client_id"], redirect, challenge)
    with idp.http() as http:
        r = sign_in(http, idp.url, params, "alice", "correct horse battery staple")
        assert r.status_code in (302, 303), r.text
        code = query(r.headers["location"])["code"]
        r = http.post(
            idp.token_url,
            auth=(creds["client_id"], creds["client_secret"]),
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect,
                "code_verifier": verifier_code,
            },
        )
    assert r.status_code == 200, r.text
    body = r.json()
    with _verifier(idp, "orders") as verifier:
        claims = verifier.verify_access_token(body["access_token"])
        assert claims.roles == ("buyer",)
        assert claims.client_id == creds["client_id"]
        assert claims.subject != creds["client_id"]  # the user, not the client
        assert _refused(verifier, body["id_token"]) in {"not_access_token", "bad_audience"}
    with _verifier(idp, creds["client_id"]) as as_client:  # even where its aud matches
        assert _refused(as_client, body["id_token"]) == "not_access_token"
