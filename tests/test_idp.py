"""`trustmesh idp serve`, machine side: real processes, real HTTPS, real databases."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.pki import KeyType

from ._idp import Idp, running_idp
from .conftest import PASSPHRASE

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Idp]:
    """One identity server for the tests that need no special settings."""
    work = tmp_path_factory.mktemp("idp")
    home = work / "home"
    CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    with running_idp(home, work) as server:
        yield server


def _token(idp: Idp, creds: dict[str, Any], **data: str) -> httpx.Response:
    with idp.http() as http:
        return http.post(
            idp.token_url,
            auth=(creds["client_id"], creds["client_secret"]),
            data={"grant_type": "client_credentials", **data},
        )


def _verify(idp: Idp, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check a token's signature against the published JWKS (not our own reader)."""
    with idp.http() as http:
        keys = KeySet.import_key_set(http.get(f"{idp.url}/jwks").json())
    decoded = jwt.decode(token, keys, algorithms=["ES256", "RS256"])
    return dict(decoded.header), dict(decoded.claims)


def _audit_actions(idp: Idp) -> list[tuple[str, str, dict[str, Any]]]:
    with idp.ca() as ca:
        return [(e.action, e.subject, dict(e.details)) for e in ca.audit_tail(500)]


def test_discovery_lists_the_machine_endpoints(idp: Idp) -> None:
    """Both metadata documents name our issuer, endpoints, grants and auth methods."""
    with idp.http() as http:
        oidc = http.get(f"{idp.url}/.well-known/openid-configuration").json()
        oauth = http.get(f"{idp.url}/.well-known/oauth-authorization-server").json()
    assert oidc == oauth
    assert oidc["issuer"] == idp.url
    assert oidc["token_endpoint"] == f"{idp.url}/token"
    assert oidc["jwks_uri"] == f"{idp.url}/jwks"
    assert oidc["introspection_endpoint"] == f"{idp.url}/introspect"
    assert oidc["revocation_endpoint"] == f"{idp.url}/revoke"
    assert oidc["revocation_list_endpoint"] == f"{idp.url}/revoked"
    assert "client_credentials" in oidc["grant_types_supported"]
    assert set(oidc["token_endpoint_auth_methods_supported"]) >= {
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
        "tls_client_auth",
    }
    assert oidc["tls_client_certificate_bound_access_tokens"] is True


def test_client_credentials_issues_an_rfc9068_token(idp: Idp) -> None:
    """A basic-auth client gets an ES256 at+jwt whose claims follow the contract."""
    creds = idp.add_client(
        "orders", "--scope", "read", "--scope", "write", "--audience", "api", "--role", "reader"
    )
    response = _token(idp, creds, scope="read")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 600
    assert body["scope"] == "read"
    assert response.headers["cache-control"] == "no-store"
    header, claims = _verify(idp, body["access_token"])
    assert header["alg"] == "ES256"
    assert header["typ"] == "at+jwt"
    assert header["kid"]
    assert claims["iss"] == idp.url
    assert claims["aud"] == "api"
    assert claims["sub"] == creds["client_id"]
    assert claims["client_id"] == creds["client_id"]
    assert claims["scope"] == "read"
    assert claims["roles"] == ["reader"]
    assert claims["exp"] - claims["iat"] == 600
    assert isinstance(claims["jti"], str)
    assert "cnf" not in claims


def test_no_scope_asked_means_all_of_the_clients(idp: Idp) -> None:
    """Asking for no scope grants every scope the client has."""
    creds = idp.add_client("all-scopes", "--scope", "a", "--scope", "b")
    claims = _verify(idp, _token(idp, creds).json()["access_token"])[1]
    assert claims["scope"] == "a b"
    assert claims["aud"] == creds["client_id"]  # no --audience: the client_id


def test_wrong_secret_is_invalid_client_401(idp: Idp) -> None:
    """A wrong secret over HTTP Basic is invalid_client, 401 with WWW-Authenticate."""
    creds = idp.add_client("wrong-secret", "--scope", "read")
    response = _token(idp, {**creds, "client_secret": "tms_nope"})
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert "wrong client_secret" in response.json()["error_description"]
    assert response.headers["www-authenticate"].startswith("Basic ")
    unknown = _token(idp, {"client_id": "tmc_unknown", "client_secret": "x"})
    assert unknown.status_code == 401
    assert unknown.json()["error"] == "invalid_client"


def test_scope_outside_the_clients_is_invalid_scope(idp: Idp) -> None:
    """Asking for a scope the client was not given is invalid_scope, naming it."""
    creds = idp.add_client("narrow", "--scope", "read")
    response = _token(idp, creds, scope="read admin")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"
    assert "admin" in response.json()["error_description"]


def test_bad_requests_get_oauth_errors_not_500(idp: Idp) -> None:
    """Unknown grant, missing grant, JSON bodies, repeated params, GET: helpful 4xx JSON."""
    creds = idp.add_client("bad-requests", "--scope", "read")
    auth = (creds["client_id"], creds["client_secret"])
    with idp.http() as http:
        r = http.post(idp.token_url, auth=auth, data={"grant_type": "password"})
        assert r.status_code == 400
        assert r.json()["error"] == "unsupported_grant_type"
        assert "client_credentials" in r.json()["error_description"]
        r = http.post(idp.token_url, auth=auth, data={"scope": "read"})
        assert r.json()["error"] == "unsupported_grant_type"
        assert "missing" in r.json()["error_description"]
        r = http.post(idp.token_url, auth=auth, json={"grant_type": "client_credentials"})
        assert r.status_code == 400
        assert r.json()["error"] == "invalid_request"
        r = http.post(
            idp.token_url,
            auth=auth,
            content=b"grant_type=client_credentials&scope=a&scope=b",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 400
        assert "more than once" in r.json()["error_description"]
        r = http.get(idp.token_url)
        assert r.status_code == 405
        assert r.json()["error"] == "invalid_request"
        r = http.post(idp.token_url, data={"grant_type": "client_credentials"})
        assert r.status_code in {400, 401}
        assert r.json()["error"] == "invalid_client"


def test_oversized_body_is_refused_413(idp: Idp) -> None:
    """A body over the cap is refused with 413 before it is parsed."""
    with idp.http() as http:
        r = http.post(idp.token_url, data={"grant_type": "client_credentials", "x": "a" * 40000})
    assert r.status_code == 413
    assert r.json()["error"] == "invalid_request"


def test_introspection_and_revocation(idp: Idp) -> None:
    """Active, then inactive after /revoke and listed on /revoked; garbage and foreign inactive."""
    creds = idp.add_client("introspected", "--scope", "read", "--audience", "api")
    rs = idp.add_client("resource-server", "--scope", "introspect")
    token = _token(idp, creds).json()["access_token"]
    claims = _verify(idp, token)[1]
    rs_auth = (rs["client_id"], rs["client_secret"])
    with idp.http() as http:
        r = http.post(f"{idp.url}/introspect", auth=rs_auth, data={"token": token})
        assert r.status_code == 200
        info = r.json()
        assert info["active"] is True
        assert info["client_id"] == creds["client_id"]
        assert info["scope"] == "read"
        assert info["aud"] == "api"
        assert info["jti"] == claims["jti"]
        for junk in ("garbage", "a.b.c", "x" * 9000):
            r = http.post(f"{idp.url}/introspect", auth=rs_auth, data={"token": junk})
            assert r.json() == {"active": False}
        # A token signed by someone else, with our claims and kid: inactive.
        foreign_key = ECKey.generate_key("P-256")
        forged = jwt.encode(
            {"alg": "ES256", "typ": "at+jwt", "kid": _verify(idp, token)[0]["kid"]},
            claims,
            foreign_key,
        )
        r = http.post(f"{idp.url}/introspect", auth=rs_auth, data={"token": forged})
        assert r.json() == {"active": False}
        # Introspection needs client authentication.
        r = http.post(f"{idp.url}/introspect", data={"token": token})
        assert r.status_code in {400, 401}
        assert r.json()["error"] == "invalid_client"
        # Another client may not revoke it.
        r = http.post(f"{idp.url}/revoke", auth=rs_auth, data={"token": token})
        assert r.status_code == 400
        assert r.json()["error"] == "unauthorized_client"
        r = http.post(
            f"{idp.url}/revoke",
            auth=(creds["client_id"], creds["client_secret"]),
            data={"token": token, "token_type_hint": "access_token"},
        )
        assert r.status_code == 200
        r = http.post(f"{idp.url}/introspect", auth=rs_auth, data={"token": token})
        assert r.json() == {"active": False}
        listed = http.get(f"{idp.url}/revoked").json()
    assert listed["issuer"] == idp.url
    assert abs(listed["generated_at"] - time.time()) < 60
    assert {"jti": claims["jti"], "exp": claims["exp"]} in listed["revoked"]
    actions = _audit_actions(idp)
    assert ("idp.revoke", creds["client_id"]) in [(a, s) for a, s, _ in actions]


def test_issuance_and_refusals_are_audited_without_secrets(idp: Idp) -> None:
    """Tokens and refusals land in the audit chain; neither secrets nor tokens do."""
    creds = idp.add_client("audited", "--scope", "read")
    token = _token(idp, creds).json()["access_token"]
    assert _token(idp, {**creds, "client_secret": "tms_wrong"}).status_code == 401
    events = _audit_actions(idp)
    issued = [d for a, s, d in events if a == "idp.token" and s == creds["client_id"]]
    assert issued
    assert issued[-1]["grant_type"] == "client_credentials"
    assert issued[-1]["auth_method"] == "client_secret_basic"
    denied = [d for a, s, d in events if a == "idp.deny" and s == creds["client_id"]]
    assert denied
    assert denied[-1]["error"] == "invalid_client"
    assert ("idp.client.add", creds["client_id"]) in [(a, s) for a, s, _ in events]
    dump = json.dumps(events) + idp.log.read_text()
    assert creds["client_secret"] not in dump
    assert token not in dump
    assert token.split(".")[2] not in dump
    with idp.ca() as ca:
        assert ca.verify_audit().ok


def test_client_list_never_shows_secrets_and_rotate_disable(idp: Idp) -> None:
    """list shows clients without secrets; rotate-secret replaces it; disable refuses it."""
    creds = idp.add_client("rotated", "--scope", "read")
    listed = json.loads(idp.cli("idp", "client", "list", "--json").stdout)
    entry = next(c for c in listed if c["name"] == "rotated")
    assert entry["client_id"] == creds["client_id"]
    assert "client_secret" not in entry
    assert "secret_hash" not in entry
    assert creds["client_secret"] not in idp.cli("idp", "client", "list").stdout
    new = json.loads(idp.cli("idp", "client", "rotate-secret", "rotated", "--json").stdout)
    assert new["client_id"] == creds["client_id"]
    assert new["client_secret"] != creds["client_secret"]
    assert _token(idp, creds).status_code == 401
    assert _token(idp, new).status_code == 200
    idp.cli("idp", "client", "disable", "rotated")
    refused = _token(idp, new)
    assert refused.status_code == 401
    assert "disabled" in refused.json()["error_description"]


def test_client_add_bad_input_exits_2(
    home: Path, ca: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    """Inconsistent client options are refused with exit 2 and a one-line reason."""
    assert main(["idp", "client", "add", "x", "--auth-method", "private_key_jwt"]) == 2
    assert "--jwks-file" in capsys.readouterr().err
    assert main(["idp", "client", "add", "x", "--auth-method", "tls_client_auth"]) == 2
    assert "--tls-spiffe-id" in capsys.readouterr().err
    assert main(["idp", "client", "add", "x", "--scope", "a b"]) == 2
    assert "single word" in capsys.readouterr().err
    assert main(["idp", "client", "add", "ok", "--scope", "read"]) == 0
    capsys.readouterr()
    assert main(["idp", "client", "add", "ok", "--scope", "read"]) == 1  # duplicate name
    assert main(["idp", "client", "rotate-secret", "nobody"]) == 2
    assert "idp client list" in capsys.readouterr().err
