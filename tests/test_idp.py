"""`trustmesh idp serve`, machine side: real processes, real HTTPS, real databases."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet
from sqlalchemy import insert, select

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.pki import KeyType, dump_private_key, pem_certificates
from trustmesh.store import idp_refresh_tokens, token_hash
from trustmesh.tokens import InvalidTokenError, IssuerConfig, Verifier

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
    with idp.http() as http:
        jwks = http.get(f"{idp.url}/jwks")
    assert jwks.headers["content-type"].startswith("application/jwk-set+json")
    keys = jwks.json()["keys"]
    assert len(keys) == 1
    assert keys[0]["alg"] == "ES256"
    assert keys[0]["use"] == "sig"
    assert not {"d", "p", "q"} & set(keys[0])  # public parts only


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
        for header in ("Basic !!!", "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode()):
            r = http.post(
                idp.token_url,
                headers={"Authorization": header},
                data={"grant_type": "client_credentials"},
            )
            assert r.status_code == 401
            assert "Malformed HTTP Basic" in r.json()["error_description"]
        r = http.post(
            f"{idp.url}/introspect", auth=auth, data={"token": "x", "token_type_hint": "id_token"}
        )
        assert r.status_code == 400
        assert r.json()["error"] == "unsupported_token_type"
        r = http.post(f"{idp.url}/introspect", auth=auth, data={"hint": "no token"})
        assert r.status_code == 400
        assert "token" in r.json()["error_description"]
        r = http.post(
            idp.token_url,
            content=b"grant_type=client_credentials&x=\xff\xfe",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 400
        assert "UTF-8" in r.json()["error_description"]
        for extra in ({"client_secret": creds["client_secret"]}, {"client_id": "tmc_other"}):
            r = http.post(
                idp.token_url, auth=auth, data={"grant_type": "client_credentials", **extra}
            )
            assert r.status_code == 401
            assert r.json()["error"] == "invalid_client"
        r = http.get(idp.token_url)
        assert r.status_code == 405
        assert r.json()["error"] == "invalid_request"
        r = http.post(idp.token_url, data={"grant_type": "client_credentials"})
        assert r.status_code in {400, 401}
        assert r.json()["error"] == "invalid_client"


def test_hostile_parameter_values_get_4xx(idp: Idp, tmp_path: Path) -> None:
    """Quotes, backslashes and non-ASCII in scope, resource or an assertion are 4xx, not 500."""
    creds = idp.add_client("hostile", "--scope", "read", "--audience", "api")
    for field, value, error in [
        ("scope", 'read "x\\y" caf\u00e9', "invalid_scope"),
        ("resource", 'a"b\\c\u00e9', "invalid_target"),
        ("grant_type", 'x"\\\u00e9', "unsupported_grant_type"),
    ]:
        data = {"grant_type": "client_credentials", field: value}
        with idp.http() as http:
            r = http.post(
                idp.token_url, auth=(creds["client_id"], creds["client_secret"]), data=data
            )
        assert r.status_code == 400, (field, r.text)
        assert r.json()["error"] == error
        assert '"' not in r.json()["error_description"]
    forged = jwt.encode(
        {"alg": "ES256"},
        {"iss": 'x"\u00e9', "sub": 'x"\u00e9', "aud": idp.token_url, "exp": 1, "jti": "j"},
        ECKey.generate_key("P-256"),
    )
    with idp.http() as http:
        r = http.post(
            idp.token_url,
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": JWT_BEARER,
                "client_assertion": forged,
            },
        )
    assert r.status_code == 400
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
    assert "exists already" in capsys.readouterr().err
    assert main(["idp", "client", "rotate-secret", "nobody"]) == 2
    assert "idp client list" in capsys.readouterr().err


def test_client_secret_post(idp: Idp) -> None:
    """A client_secret_post client authenticates in the body, and not with Basic."""
    creds = idp.add_client("poster", "--scope", "read", "--auth-method", "client_secret_post")
    with idp.http() as http:
        r = http.post(
            idp.token_url,
            data={
                "grant_type": "client_credentials",
                "client_id": creds["client_id"],
                "client_secret": creds["client_secret"],
            },
        )
        assert r.status_code == 200, r.text
        assert _verify(idp, r.json()["access_token"])[1]["sub"] == creds["client_id"]
        basic = http.post(
            idp.token_url,
            auth=(creds["client_id"], creds["client_secret"]),
            data={"grant_type": "client_credentials"},
        )
        assert basic.status_code == 401
        assert "client_secret_post" in basic.json()["error_description"]
        wrong = http.post(
            idp.token_url,
            data={
                "grant_type": "client_credentials",
                "client_id": creds["client_id"],
                "client_secret": "tms_wrong",
            },
        )
        assert wrong.status_code == 400
        assert wrong.json()["error"] == "invalid_client"


def _jwks_client(idp: Idp, tmp_path: Path, name: str) -> tuple[dict[str, Any], ECKey]:
    key = ECKey.generate_key("P-256", parameters={"kid": f"{name}-key"})
    jwks = tmp_path / f"{name}.jwks.json"
    jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    creds = idp.add_client(
        name, "--scope", "read", "--auth-method", "private_key_jwt", "--jwks-file", str(jwks)
    )
    return creds, key


def _assertion(client_id: str, key: ECKey, aud: str, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": aud,
        "iat": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
        **overrides,
    }
    return jwt.encode({"alg": "ES256", "kid": key.kid or ""}, claims, key)


def test_private_key_jwt_and_replay(idp: Idp, tmp_path: Path) -> None:
    """A signed assertion authenticates once; replaying it, a foreign key or a bad aud fail."""
    creds, key = _jwks_client(idp, tmp_path, "signer")
    assertion = _assertion(creds["client_id"], key, idp.token_url)
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion,
    }
    with idp.http() as http:
        r = http.post(idp.token_url, data=form)
        assert r.status_code == 200, r.text
        claims = _verify(idp, r.json()["access_token"])[1]
        assert claims["sub"] == creds["client_id"]
        replay = http.post(idp.token_url, data=form)
        assert replay.status_code == 400
        assert replay.json()["error"] == "invalid_client"
        assert "replayed" in replay.json()["error_description"]
        # The issuer is an accepted audience too.
        r = http.post(
            idp.token_url,
            data={**form, "client_assertion": _assertion(creds["client_id"], key, idp.url)},
        )
        assert r.status_code == 200, r.text
        cases = {
            "aud": _assertion(creds["client_id"], key, "https://elsewhere.example/token"),
            "lives": _assertion(
                creds["client_id"], key, idp.token_url, exp=int(time.time()) + 3600
            ),
            "expired": _assertion(
                creds["client_id"],
                key,
                idp.token_url,
                iat=int(time.time()) - 300,
                exp=int(time.time()) - 200,
            ),
            "jti": _assertion(creds["client_id"], key, idp.token_url, jti=""),
            "signature": _assertion(
                creds["client_id"],
                ECKey.generate_key("P-256", parameters={"kid": "signer-key"}),
                idp.token_url,
            ),
        }
        for case, bad in cases.items():
            r = http.post(idp.token_url, data={**form, "client_assertion": bad})
            assert r.status_code == 400, case
            assert r.json()["error"] == "invalid_client", case
            assert case in r.json()["error_description"], (case, r.json())
    denied = [d for a, _, d in _audit_actions(idp) if a == "idp.deny"]
    assert any(d.get("reason") == "assertion_replayed" for d in denied)


def _identity(ca: CertificateAuthority, spiffe_id: str, directory: Path) -> tuple[Path, Path]:
    issued = ca.issue(spiffe_id)
    assert issued.key is not None
    chain, key = directory / f"{uuid.uuid4().hex}.pem", directory / f"{uuid.uuid4().hex}.key"
    chain.write_bytes(pem_certificates(issued.chain))
    key.write_bytes(dump_private_key(issued.key))
    return chain, key


def test_tls_client_auth_binds_the_token_to_the_certificate(idp: Idp, tmp_path: Path) -> None:
    """mTLS with the registered SPIFFE ID gets a token whose cnf is the cert's thumbprint."""
    spiffe_id = "spiffe://example.org/ns/prod/svc/billing"
    creds = idp.add_client(
        "billing",
        "--scope",
        "read",
        "--auth-method",
        "tls_client_auth",
        "--tls-spiffe-id",
        spiffe_id,
    )
    assert creds["client_secret"] is None
    with idp.ca() as ca:
        chain, key = _identity(ca, spiffe_id, tmp_path)
        other_chain, other_key = _identity(ca, "spiffe://example.org/ns/prod/svc/other", tmp_path)
    form = {"grant_type": "client_credentials", "client_id": creds["client_id"]}
    with idp.http(chain, key) as http:
        r = http.post(idp.token_url, data=form)
    assert r.status_code == 200, r.text
    claims = _verify(idp, r.json()["access_token"])[1]
    leaf = x509.load_pem_x509_certificate(chain.read_bytes())
    der = leaf.public_bytes(serialization.Encoding.DER)
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert claims["cnf"] == {"x5t#S256": expected}
    # Another of our certificates, with the wrong SPIFFE ID.
    with idp.http(other_chain, other_key) as http:
        r = http.post(idp.token_url, data=form)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_client"
    assert "svc/other" in r.json()["error_description"]
    # No certificate at all.
    with idp.http() as http:
        r = http.post(idp.token_url, data=form)
    assert r.status_code == 400
    assert "mTLS" in r.json()["error_description"]
    # The right certificate, once revoked.
    with idp.ca() as ca:
        ca.revoke(format(leaf.serial_number, "x"), reason="keyCompromise")
    with idp.http(chain, key) as http:
        r = http.post(idp.token_url, data=form)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_client"
    assert "revoked" in r.json()["error_description"]
    # A certificate from a foreign CA with the right SPIFFE ID: the TLS layer refuses it.
    foreign = CertificateAuthority.init(
        tmp_path / "foreign", trust_domain="example.org", passphrase=PASSPHRASE
    )
    with foreign:
        f_chain, f_key = _identity(foreign, spiffe_id, tmp_path)
    with idp.http(f_chain, f_key) as http:
        try:
            r = http.post(idp.token_url, data=form)
        except httpx.TransportError:
            refused_by = "tls"
        else:  # should TLS 1.3 let the request through, the server must still refuse it
            assert r.json()["error"] == "invalid_client"
            refused_by = "http"
    assert refused_by == "tls"


def test_refresh_tokens_introspect_and_revoke_by_family(idp: Idp) -> None:
    """Stored refresh tokens are active until rotated or revoked; revoking one ends its family."""
    creds = idp.add_client("refresher", "--scope", "read")
    auth = (creds["client_id"], creds["client_secret"])
    now = int(time.time())
    tokens = {name: f"rt_{uuid.uuid4().hex}" for name in ("old", "current", "sibling", "other")}
    with idp.ca() as ca, ca.store.transaction() as conn:
        for name, value in tokens.items():
            conn.execute(
                insert(idp_refresh_tokens).values(
                    token_hash=token_hash(value),
                    family_id="fam-other" if name == "other" else "fam-1",
                    client_id=creds["client_id"],
                    user_id="u1",
                    scope="read",
                    created_at=now,
                    expires_at=now + 3600,
                    rotated_at=now if name == "old" else None,
                    revoked_at=None,
                )
            )
    with idp.http() as http:

        def active(name: str) -> bool:
            r = http.post(
                f"{idp.url}/introspect",
                auth=auth,
                data={"token": tokens[name], "token_type_hint": "refresh_token"},
            )
            return bool(r.json()["active"])

        assert not active("old")
        assert active("current")
        info = http.post(f"{idp.url}/introspect", auth=auth, data={"token": tokens["current"]})
        assert info.json()["token_type"] == "refresh_token"
        assert info.json()["sub"] == "u1"
        r = http.post(
            f"{idp.url}/revoke",
            auth=auth,
            data={"token": tokens["current"], "token_type_hint": "refresh_token"},
        )
        assert r.status_code == 200
        assert not active("current")
        assert not active("sibling")
        assert active("other")
    with idp.ca() as ca, ca.store.transaction() as conn:
        rows = conn.execute(select(idp_refresh_tokens)).all()
    revoked = {r.token_hash for r in rows if r.revoked_at is not None}
    assert revoked == {token_hash(tokens[n]) for n in ("old", "current", "sibling")}


def test_audience_parameter_within_the_allowed_ones(idp: Idp) -> None:
    """resource= picks one of the client's audiences; any other is invalid_target."""
    creds = idp.add_client(
        "multi-aud", "--scope", "read", "--audience", "api", "--audience", "billing"
    )
    assert _verify(idp, _token(idp, creds).json()["access_token"])[1]["aud"] == "api"
    r = _token(idp, creds, resource="billing")
    assert _verify(idp, r.json()["access_token"])[1]["aud"] == "billing"
    r = _token(idp, creds, resource="admin")
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_target"


def test_key_rotation_publishes_before_signing(tmp_path: Path, ca: CertificateAuthority) -> None:
    """A rotated key is in the JWKS at once, signs after the delay; the old one stays published."""
    with running_idp(ca.home, tmp_path) as server:
        creds = server.add_client("rotation", "--scope", "read")
        first_kid = _verify(server, _token(server, creds).json()["access_token"])[0]["kid"]
        rotated = json.loads(
            server.cli("idp", "keys", "rotate", "--publish-delay", "3s", "--json").stdout
        )
        new_kid = rotated["kid"]
        assert rotated["status"] == "pending"
        time.sleep(1.2)  # the server reloads keys every second
        with server.http() as http:
            kids = [k["kid"] for k in http.get(f"{server.url}/jwks").json()["keys"]]
        assert new_kid in kids
        assert first_kid in kids
        assert _verify(server, _token(server, creds).json()["access_token"])[0]["kid"] == first_kid
        time.sleep(3)
        header, _ = _verify(server, _token(server, creds).json()["access_token"])
        assert header["kid"] == new_kid
        with server.http() as http:
            kids = [k["kid"] for k in http.get(f"{server.url}/jwks").json()["keys"]]
        assert {first_kid, new_kid} <= set(kids)
        listed = json.loads(server.cli("idp", "keys", "list", "--json").stdout)
        status = {k["kid"]: k["status"] for k in listed}
        assert status == {first_kid: "retired", new_kid: "signing"}
        # RS256 keys too.
        rsa = json.loads(
            server.cli(
                "idp", "keys", "rotate", "--alg", "RS256", "--publish-delay", "0s", "--json"
            ).stdout
        )
        time.sleep(1.2)
        header, _ = _verify(server, _token(server, creds).json()["access_token"])
        assert header == {"alg": "RS256", "typ": "at+jwt", "kid": rsa["kid"]}
    events = [e.action for e in ca.audit_tail(200)]
    assert "idp.key.rotate" in events


def test_rate_limit_per_client(tmp_path: Path, ca: CertificateAuthority) -> None:
    """Past its burst a client gets 429 slow_down with Retry-After; others still get tokens."""
    with running_idp(
        ca.home, tmp_path, extra_args=("--token-rate", "0.2", "--token-burst", "3")
    ) as server:
        creds = server.add_client("greedy", "--scope", "read")
        polite = server.add_client("polite", "--scope", "read")
        codes = [_token(server, creds).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200]
        assert codes[3:] == [429, 429]
        r = _token(server, creds)
        assert r.json()["error"] == "slow_down"
        assert int(r.headers["retry-after"]) >= 1
        assert _token(server, polite).status_code == 200
        with server.http() as http:
            metrics = http.get(f"{server.url}/metrics").text
        assert 'trustmesh_idp_denials_total{reason="rate_limited_client",route="/token"}' in metrics
        assert 'trustmesh_idp_tokens_issued_total{grant_type="client_credentials"} 4.0' in metrics
        assert "trustmesh_idp_request_seconds_bucket" in metrics
    assert server.process.returncode == 0  # SIGTERM: a clean shutdown


def test_serve_bad_input_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Bad --listen, --access-ttl or --issuer fail at once with exit 2."""
    assert main(["idp", "serve", "--listen", "nope"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main(["idp", "serve", "--access-ttl", "5h"]) == 2
    assert "1h" in capsys.readouterr().err
    assert main(["idp", "serve", "--issuer", "http://x"]) == 2
    assert "https://" in capsys.readouterr().err


@pytest.mark.postgres
def test_idp_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    """The same server works on PostgreSQL: token, private_key_jwt replay, revoke, audit."""
    home = tmp_path / "pg-home"
    CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, db_url=pg_url
    ).close()
    with running_idp(home, tmp_path) as server:
        creds = server.add_client("pg", "--scope", "read")
        token = _token(server, creds).json()["access_token"]
        signer, key = _jwks_client(server, tmp_path, "pg-signer")
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": JWT_BEARER,
            "client_assertion": _assertion(signer["client_id"], key, server.token_url),
        }
        with server.http() as http:
            assert http.post(server.token_url, data=form).status_code == 200
            assert http.post(server.token_url, data=form).status_code == 400
            auth = (creds["client_id"], creds["client_secret"])
            assert http.post(f"{server.url}/revoke", auth=auth, data={"token": token}).is_success
            r = http.post(f"{server.url}/introspect", auth=auth, data={"token": token})
            assert r.json() == {"active": False}
            assert http.get(f"{server.url}/revoked").json()["revoked"]
        with server.ca() as ca:
            assert ca.store.dialect == "postgresql"
            actions = {e.action for e in ca.audit_tail(100)}
            assert {"idp.token", "idp.revoke", "idp.deny", "idp.client.add"} <= actions


def test_keys_cli_before_any_server(
    ca: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no key yet, `keys rotate` makes one that signs at once; `keys list` shows it."""
    assert main(["idp", "keys", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["idp", "keys", "rotate", "--publish-delay", "10m", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["status"] == "signing"
    assert main(["idp", "keys", "rotate", "--publish-delay", "10m", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["status"] == "pending"
    assert main(["idp", "keys", "list"]) == 0
    table = capsys.readouterr().out
    assert first["kid"] in table
    assert "pending" in table
    assert main(["idp", "keys", "rotate", "--publish-delay", "soon"]) == 2
    assert "--publish-delay" in capsys.readouterr().err


def test_db_option_points_idp_commands_elsewhere(
    ca: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--db makes idp commands use another database than the CA's (migrated on first use)."""
    other = f"sqlite:///{tmp_path / 'idp.db'}"
    assert main(["idp", "client", "add", "elsewhere", "--scope", "a", "--db", other]) == 0
    capsys.readouterr()
    assert main(["idp", "client", "list", "--json", "--db", other]) == 0
    assert [c["name"] for c in json.loads(capsys.readouterr().out)] == ["elsewhere"]
    assert main(["idp", "client", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_port_in_use_exits_1(idp: Idp) -> None:
    """A second server on a taken port fails with exit 1, says what to change and never
    says it is listening."""
    port = idp.url.rsplit(":", 1)[1]
    result = idp.cli("idp", "serve", "--listen", f"127.0.0.1:{port}", check=False)
    assert result.returncode == 1
    assert "port in use" in result.stderr
    assert "listening on" not in result.stderr


def test_our_verifier_accepts_bound_tokens_and_honours_revocation(idp: Idp, tmp_path: Path) -> None:
    """trustmesh.tokens accepts idp serve's tokens, checks cnf binding and the /revoked list."""
    spiffe_id = "spiffe://example.org/ns/prod/svc/verified"
    creds = idp.add_client(
        "verified",
        "--scope",
        "read",
        "--audience",
        "orders",
        "--auth-method",
        "tls_client_auth",
        "--tls-spiffe-id",
        spiffe_id,
    )
    with idp.ca() as ca:
        chain, key = _identity(ca, spiffe_id, tmp_path)
        other_chain, _ = _identity(ca, "spiffe://example.org/ns/prod/svc/thief", tmp_path)
    with idp.http(chain, key) as http:
        r = http.post(
            idp.token_url,
            data={"grant_type": "client_credentials", "client_id": creds["client_id"]},
        )
    token = r.json()["access_token"]
    cert = x509.load_pem_x509_certificate(chain.read_bytes())
    thief = x509.load_pem_x509_certificate(other_chain.read_bytes())
    config = IssuerConfig(idp.url, audiences=["orders"], ca_bundle=idp.bundle)
    with Verifier(config) as verifier:
        claims = verifier.verify_access_token(token, client_cert=cert)
        assert claims.subject == creds["client_id"]
        assert set(claims.scopes) == {"read"}
        assert claims.certificate_thumbprint is not None
        for presented, reason in ((None, "cnf_missing_cert"), (thief, "cnf_mismatch")):
            with pytest.raises(InvalidTokenError) as refused:
                verifier.verify_access_token(token, client_cert=presented)
            assert refused.value.reason == reason
    wrong = IssuerConfig(idp.url, audiences=["billing"], ca_bundle=idp.bundle)
    with Verifier(wrong) as verifier, pytest.raises(InvalidTokenError) as refused:
        verifier.verify_access_token(token, client_cert=cert)
    assert refused.value.reason == "bad_audience"
    with idp.http(chain, key) as http:
        r = http.post(f"{idp.url}/revoke", data={"token": token, "client_id": creds["client_id"]})
        assert r.status_code == 200
    with Verifier(config) as verifier, pytest.raises(InvalidTokenError) as refused:
        verifier.verify_access_token(token, client_cert=cert)
    assert refused.value.reason == "revoked"
