"""The identity server's user side: real `idp serve` processes, real HTTPS, real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType

from ._idp import Idp, idp_env, run_cli, running_idp
from ._login import authorize_params, form_fields, pkce_pair, query, sign_in
from .conftest import PASSPHRASE

REDIRECT = "https://app.example.test/callback"
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Idp]:
    """One identity server with a code-flow client and two users."""
    work = tmp_path_factory.mktemp("idp-users")
    home = work / "home"
    CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    with running_idp(home, work) as server:
        yield server


@pytest.fixture(scope="module")
def client(idp: Idp) -> dict[str, Any]:
    return idp.add_client(
        "web",
        "--redirect-uri",
        REDIRECT,
        *("--scope", "openid", "--scope", "profile", "--scope", "email"),
        *("--scope", "orders:read", "--scope", "orders:write"),
        *("--audience", "https://api.example.test"),
    )


def _add_user(idp: Idp, name: str, *args: str) -> dict[str, Any]:
    pw = idp.home.parent / f"{name}.pw"
    pw.write_text(PASSWORD + "\n")
    result = idp.cli("idp", "user", "add", name, "--password-file", str(pw), *args, "--json")
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@pytest.fixture(scope="module")
def alice(idp: Idp) -> dict[str, Any]:
    return _add_user(
        idp, "alice", "--role", "admin", "--role", "dev", "--scope", "orders:read",
        "--email", "alice@example.org",
    )  # fmt: skip


def _exchange(
    idp: Idp, client: dict[str, Any], code: str, verifier: str, **extra: str
) -> httpx.Response:
    with idp.http() as http:
        return http.post(
            idp.token_url,
            auth=(client["client_id"], client["client_secret"]),
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT,
                "code_verifier": verifier,
                **extra,
            },
        )


def _refresh(idp: Idp, client: dict[str, Any], token: str) -> httpx.Response:
    with idp.http() as http:
        return http.post(
            idp.token_url,
            auth=(client["client_id"], client["client_secret"]),
            data={"grant_type": "refresh_token", "refresh_token": token},
        )


def _code(
    idp: Idp, client: dict[str, Any], user: str = "alice", password: str = PASSWORD, **extra: str
) -> tuple[str, str, dict[str, str]]:
    """Sign in through the login page; return (code, verifier, authorization params)."""
    verifier, challenge = pkce_pair()
    params = authorize_params(client["client_id"], REDIRECT, challenge, **extra)
    with idp.http() as http:
        response = sign_in(http, idp.url, params, user, password)
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT + "?")
    got = query(location)
    assert got["state"] == params["state"]
    assert got["iss"] == idp.url
    return got["code"], verifier, params


def _decode(idp: Idp, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify a JWT against the published JWKS (joserfc, not our server code)."""
    with idp.http() as http:
        keys = KeySet.import_key_set(http.get(f"{idp.url}/jwks").json())
    decoded = jwt.decode(token, keys, algorithms=["ES256", "RS256"])
    return dict(decoded.header), dict(decoded.claims)


def _audit(idp: Idp) -> list[tuple[str, str, dict[str, Any]]]:
    with idp.ca() as ca:
        return [(e.action, e.subject, dict(e.details)) for e in ca.audit_tail(1000)]


# -- the CLI ---------------------------------------------------------------------------


def test_user_cli_add_list_disable(ca: CertificateAuthority, tmp_path: Path) -> None:
    """`idp user add|list|disable` run as processes; bad passwords exit 2 with a reason."""
    home = ca.home
    pw = tmp_path / "pw"
    pw.write_text("a long enough password\n")
    added = run_cli(
        home, "idp", "user", "add", "Bob", "--role", "ops", "--scope", "orders:read",
        "--password-file", str(pw), "--json",
    )  # fmt: skip
    bob = json.loads(added.stdout)
    assert bob["username"] == "bob"
    assert bob["roles"] == ["ops"]
    stdin = subprocess.run(
        [sys.executable, "-m", "trustmesh", "idp", "user", "add", "carol", "--password-file", "-"],
        input="another long password\n",
        env=idp_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert stdin.returncode == 0, stdin.stderr
    short = tmp_path / "short"
    short.write_text("abc\n")
    refused = run_cli(
        home, "idp", "user", "add", "dave", "--password-file", str(short), check=False
    )
    assert refused.returncode == 2
    assert "at least 8 characters" in refused.stderr
    assert refused.stderr.count("\n") == 1
    empty = tmp_path / "empty"
    empty.write_text("")
    refused = run_cli(
        home, "idp", "user", "add", "dave", "--password-file", str(empty), check=False
    )
    assert refused.returncode == 2
    assert "empty" in refused.stderr
    listed = json.loads(run_cli(home, "idp", "user", "list", "--json").stdout)
    assert [u["username"] for u in listed] == ["bob", "carol"]
    table = run_cli(home, "idp", "user", "list").stdout
    assert "bob" in table
    assert "ops" in table
    assert "disabled" in table
    assert "locked" in table
    run_cli(home, "idp", "user", "disable", "bob")
    listed = json.loads(run_cli(home, "idp", "user", "list", "--json").stdout)
    assert listed[0]["disabled"] is True
    missing = run_cli(home, "idp", "user", "disable", "nobody", check=False)
    assert missing.returncode == 2
    assert "No user named 'nobody'" in missing.stderr
    assert "a long enough password" not in str(
        [(e.subject, dict(e.details)) for e in ca.audit_tail(20)]
    )
    actions = [e.action for e in ca.audit_tail(5)]
    assert actions[-1] == "idp.user.disable"
    assert "idp.user.add" in actions


# -- the code flow ---------------------------------------------------------------------


def test_discovery_lists_the_user_endpoints(idp: Idp) -> None:
    """Discovery names /authorize, /userinfo, the code and refresh grants and S256 only."""
    with idp.http() as http:
        doc = http.get(f"{idp.url}/.well-known/openid-configuration").json()
    assert doc["authorization_endpoint"] == f"{idp.url}/authorize"
    assert doc["userinfo_endpoint"] == f"{idp.url}/userinfo"
    assert doc["response_types_supported"] == ["code"]
    assert {"authorization_code", "refresh_token", "client_credentials"} <= set(
        doc["grant_types_supported"]
    )
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert "ES256" in doc["id_token_signing_alg_values_supported"]
    assert "openid" in doc["scopes_supported"]


def test_code_flow_with_pkce_issues_access_refresh_and_id_tokens(
    idp: Idp, client: dict[str, Any], alice: dict[str, Any]
) -> None:
    """Login page, code, PKCE exchange: RFC 9068 access token, ID token, userinfo."""
    code, verifier, params = _code(idp, client, scope="openid profile email orders:read")
    response = _exchange(idp, client, code, verifier)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert set(body["scope"].split()) == {"openid", "profile", "email", "orders:read"}
    header, claims = _decode(idp, body["access_token"])
    assert header["typ"] == "at+jwt"
    assert claims["sub"] == alice["user_id"]
    assert claims["client_id"] == client["client_id"]
    assert claims["aud"] == "https://api.example.test"
    assert claims["roles"] == ["admin", "dev"]
    assert claims["iss"] == idp.url
    id_header, id_claims = _decode(idp, body["id_token"])
    assert id_header["typ"] == "JWT"
    assert id_claims["aud"] == client["client_id"]
    assert id_claims["azp"] == client["client_id"]
    assert id_claims["sub"] == alice["user_id"]
    assert id_claims["nonce"] == params["nonce"]
    assert abs(id_claims["auth_time"] - time.time()) < 60
    assert id_claims["exp"] > id_claims["iat"]
    assert id_claims["preferred_username"] == "alice"
    assert "at_hash" in id_claims
    with idp.http() as http:
        info = http.get(
            f"{idp.url}/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"}
        )
        assert info.status_code == 200, info.text
        assert info.json() == {
            "sub": alice["user_id"],
            "preferred_username": "alice",
            "email": "alice@example.org",
            "roles": ["admin", "dev"],
        }
        bad = http.get(f"{idp.url}/userinfo", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
        assert bad.json()["error"] == "invalid_token"
        assert 'error="invalid_token"' in bad.headers["www-authenticate"]
        # An ID token is not an access token.
        as_access = http.get(
            f"{idp.url}/userinfo", headers={"Authorization": f"Bearer {body['id_token']}"}
        )
        assert as_access.status_code == 401
    refreshed = _refresh(idp, client, body["refresh_token"])
    assert refreshed.status_code == 200, refreshed.text
    new = refreshed.json()
    assert new["refresh_token"] != body["refresh_token"]
    assert _decode(idp, new["access_token"])[1]["sub"] == alice["user_id"]
    assert _decode(idp, new["id_token"])[1]["auth_time"] == id_claims["auth_time"]
    actions = [a for a, _, _ in _audit(idp)]
    assert "idp.login.success" in actions


def test_scopes_the_user_lacks_are_not_granted(
    idp: Idp, client: dict[str, Any], alice: dict[str, Any]
) -> None:
    """orders:write is allowed for the client but not for alice: it is left out."""
    code, verifier, _ = _code(idp, client, scope="openid orders:read orders:write")
    body = _exchange(idp, client, code, verifier).json()
    assert body["scope"].split() == ["openid", "orders:read"]


def test_login_page_is_escaped_framing_denied_and_not_cached(
    idp: Idp, client: dict[str, Any]
) -> None:
    """The state is escaped in the form; the page forbids framing and caching."""
    _, challenge = pkce_pair()
    params = authorize_params(
        client["client_id"], REDIRECT, challenge, state='"><script>alert(1)</script>'
    )
    with idp.http() as http:
        page = http.get(f"{idp.url}/authorize", params=params)
    assert page.status_code == 200
    assert "<script>" not in page.text
    assert "&quot;&gt;&lt;script&gt;" in page.text
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["set-cookie"].startswith("__Host-trustmesh-login=")
    assert "secure" in page.headers["set-cookie"].lower()


# -- attacks ---------------------------------------------------------------------------


def test_wrong_password_is_refused_and_audited(
    idp: Idp, client: dict[str, Any], alice: dict[str, Any]
) -> None:
    """A wrong password shows the form again (401) with no code, and is audited."""
    _, challenge = pkce_pair()
    params = authorize_params(client["client_id"], REDIRECT, challenge)
    with idp.http() as http:
        response = sign_in(http, idp.url, params, "alice", "not the password")
    assert response.status_code == 401
    assert "Wrong username or password" in response.text
    assert "location" not in response.headers
    failures = [d for a, s, d in _audit(idp) if a == "idp.login.failure" and s == "alice"]
    assert failures
    assert failures[-1]["reason"] == "bad_credentials"
    assert "not the password" not in idp.log.read_text()
    assert "not the password" not in json.dumps(_audit(idp))


def test_replayed_code_is_refused_and_revokes_its_tokens(
    idp: Idp, client: dict[str, Any], alice: dict[str, Any]
) -> None:
    """A code redeems once; the replay is invalid_grant and kills the refresh family."""
    code, verifier, _ = _code(idp, client)
    first = _exchange(idp, client, code, verifier)
    assert first.status_code == 200
    replay = _exchange(idp, client, code, verifier)
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"
    assert "already used" in replay.json()["error_description"]
    refused = _refresh(idp, client, first.json()["refresh_token"])
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_grant"
    assert "revoked" in refused.json()["error_description"]
    replays = [d for a, _, d in _audit(idp) if a == "idp.code.replay"]
    assert replays
    assert replays[-1]["refresh_tokens_revoked"] == 1
    assert replays[-1]["access_token_revoked"] is True
    # The access token the code produced is revoked too: inactive and on the list.
    access = first.json()["access_token"]
    jti = _decode(idp, access)[1]["jti"]
    with idp.http() as http:
        introspected = http.post(
            f"{idp.url}/introspect",
            auth=(client["client_id"], client["client_secret"]),
            data={"token": access},
        ).json()
        listed = http.get(f"{idp.url}/revoked").json()["revoked"]
        info = http.get(f"{idp.url}/userinfo", headers={"Authorization": f"Bearer {access}"})
    assert introspected == {"active": False}
    assert jti in {e["jti"] for e in listed}
    assert info.status_code == 401
    assert "revoked" in info.json()["error_description"]


def test_pkce_mismatch_is_refused(idp: Idp, client: dict[str, Any], alice: dict[str, Any]) -> None:
    """A code_verifier that does not hash to the challenge is invalid_grant."""
    code, _, _ = _code(idp, client)
    other, _ = pkce_pair()
    response = _exchange(idp, client, code, other)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert "code_verifier does not match" in response.json()["error_description"]
    missing = _exchange(idp, client, _code(idp, client)[0], "")
    assert missing.status_code == 400
    assert missing.json()["error"] == "invalid_request"
    assert any(
        a == "idp.token.refused" and d.get("reason") == "pkce_mismatch" for a, _, d in _audit(idp)
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"code_challenge_method": "plain"}, "accepts S256 only"),
        ({"code_challenge_method": ""}, "which means 'plain'"),
        ({"code_challenge": ""}, "PKCE is required"),
    ],
)
def test_plain_or_missing_pkce_is_refused(
    idp: Idp, client: dict[str, Any], extra: dict[str, str], expected: str
) -> None:
    """plain, a missing method and a missing challenge redirect back with invalid_request."""
    _, challenge = pkce_pair()
    params = authorize_params(client["client_id"], REDIRECT, challenge, **extra)
    params = {k: v for k, v in params.items() if v}
    with idp.http() as http:
        response = http.get(f"{idp.url}/authorize", params=params)
    assert response.status_code == 302
    got = query(response.headers["location"])
    assert got["error"] == "invalid_request"
    assert expected in got["error_description"]
    assert got["state"] == params["state"]
    assert "code" not in got


def test_unregistered_redirect_uri_is_an_error_page_never_a_redirect(
    idp: Idp, client: dict[str, Any]
) -> None:
    """An unknown redirect URI or client gets an HTML error page, not a redirect."""
    _, challenge = pkce_pair()
    with idp.http() as http:
        for params in (
            authorize_params(client["client_id"], "https://evil.example/cb", challenge),
            authorize_params(client["client_id"], REDIRECT + "/extra", challenge),
            authorize_params("no-such-client", REDIRECT, challenge),
        ):
            response = http.get(f"{idp.url}/authorize", params=params)
            assert response.status_code == 400
            assert "location" not in response.headers
            assert response.headers["content-type"].startswith("text/html")
            assert "Cannot sign in" in response.text


def test_malformed_authorization_requests_get_an_error_page(
    idp: Idp, client: dict[str, Any]
) -> None:
    """Repeated parameters, quotes in the redirect URI and oversized values: a 400 page."""
    _, challenge = pkce_pair()
    params = authorize_params(client["client_id"], REDIRECT, challenge)
    with idp.http() as http:
        repeated = http.get(
            f"{idp.url}/authorize",
            params=[*params.items(), ("redirect_uri", "https://evil.example/cb")],
        )
        quoted = http.get(
            f"{idp.url}/authorize", params={**params, "redirect_uri": 'https://e.example/"x'}
        )
        huge = http.get(f"{idp.url}/authorize", params={**params, "state": "x" * 5000})
    for response in (repeated, quoted, huge):
        assert response.status_code == 400, response.text
        assert "location" not in response.headers
        assert response.headers["content-type"].startswith("text/html")


def test_prompt_none_answers_login_required(idp: Idp, client: dict[str, Any]) -> None:
    """There is no sign-in session to reuse: prompt=none redirects with login_required."""
    _, challenge = pkce_pair()
    params = authorize_params(client["client_id"], REDIRECT, challenge, prompt="none")
    with idp.http() as http:
        response = http.get(f"{idp.url}/authorize", params=params)
    assert response.status_code == 302
    got = query(response.headers["location"])
    assert got["error"] == "login_required"
    assert got["state"] == params["state"]


def test_public_client_needs_its_code_verifier(idp: Idp, alice: dict[str, Any]) -> None:
    """A public client (no secret) is protected by PKCE: no verifier, no token."""
    public = idp.add_client(
        "spa", "--redirect-uri", REDIRECT, "--scope", "openid", "--auth-method", "none"
    )
    code, verifier, _ = _code(idp, public)
    with idp.http() as http:
        base = {"grant_type": "authorization_code", "client_id": public["client_id"]}
        bad = http.post(idp.token_url, data={**base, "code": code, "redirect_uri": REDIRECT})
        assert bad.status_code == 400
        code, verifier, _ = _code(idp, public)
        good = http.post(
            idp.token_url,
            data={**base, "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier},
        )
    assert good.status_code == 200, good.text
    assert _decode(idp, good.json()["access_token"])[1]["sub"] == alice["user_id"]


def test_unsupported_response_type_is_refused(idp: Idp, client: dict[str, Any]) -> None:
    """Only response_type=code: token (implicit) redirects back with an error."""
    _, challenge = pkce_pair()
    params = authorize_params(client["client_id"], REDIRECT, challenge, response_type="token")
    with idp.http() as http:
        response = http.get(f"{idp.url}/authorize", params=params)
    assert response.status_code == 302
    assert query(response.headers["location"])["error"] == "unsupported_response_type"


def test_login_form_needs_its_cookie_and_untampered_parameters(
    idp: Idp, client: dict[str, Any], alice: dict[str, Any]
) -> None:
    """A form posted without the cookie, or with altered parameters, is refused (CSRF)."""
    _, challenge = pkce_pair()
    params = authorize_params(client["client_id"], REDIRECT, challenge)
    with idp.http() as http:
        page = http.get(f"{idp.url}/authorize", params=params)
        _, fields = form_fields(page.text)
    creds = {"username": "alice", "password": PASSWORD}
    with idp.http() as other:  # a different browser: no cookie
        forged = other.post(f"{idp.url}/authorize", data={**fields, **creds})
    assert forged.status_code == 400
    assert "location" not in forged.headers
    with idp.http() as http:
        page = http.get(f"{idp.url}/authorize", params=params)
        _, fields = form_fields(page.text)
        altered = http.post(
            f"{idp.url}/authorize", data={**fields, **creds, "scope": "openid orders:read"}
        )
        assert altered.status_code == 400
        assert "location" not in altered.headers


def test_reused_refresh_token_revokes_the_family(
    idp: Idp, client: dict[str, Any], alice: dict[str, Any]
) -> None:
    """Rotation: the old token is spent; presenting it again revokes every token of the family."""
    code, verifier, _ = _code(idp, client)
    first = _exchange(idp, client, code, verifier).json()
    second = _refresh(idp, client, first["refresh_token"])
    assert second.status_code == 200
    newest = second.json()["refresh_token"]
    reuse = _refresh(idp, client, first["refresh_token"])
    assert reuse.status_code == 400
    assert reuse.json()["error"] == "invalid_grant"
    assert "already used" in reuse.json()["error_description"]
    after = _refresh(idp, client, newest)
    assert after.status_code == 400
    assert after.json()["error"] == "invalid_grant"
    with idp.http() as http:
        introspected = http.post(
            f"{idp.url}/introspect",
            auth=(client["client_id"], client["client_secret"]),
            data={"token": newest, "token_type_hint": "refresh_token"},
        ).json()
    assert introspected == {"active": False}
    reuses = [d for a, _, d in _audit(idp) if a == "idp.refresh.reuse"]
    assert reuses
    assert reuses[-1]["refresh_tokens_revoked"] == 2  # the rotated one and its successor


def test_brute_force_locks_the_account_even_for_the_right_password(
    idp: Idp, client: dict[str, Any]
) -> None:
    """Five wrong passwords lock the user: the right one then gets 429 and no code."""
    _add_user(idp, "victim", "--role", "dev")
    _, challenge = pkce_pair()
    params = authorize_params(client["client_id"], REDIRECT, challenge)
    with idp.http() as http:
        for i in range(5):
            assert sign_in(http, idp.url, params, "victim", f"guess-{i}-wrong").status_code == 401
        locked = sign_in(http, idp.url, params, "victim", PASSWORD)
    assert locked.status_code == 429
    assert "Too many failed sign-ins" in locked.text
    assert int(locked.headers["retry-after"]) > 800
    assert "location" not in locked.headers
    events = _audit(idp)
    assert any(a == "idp.login.lockout" and s == "victim" for a, s, _ in events)
    assert any(a == "idp.login.locked" and s == "victim" for a, s, _ in events)
    listed = json.loads(idp.cli("idp", "user", "list", "--json").stdout)
    assert next(u for u in listed if u["username"] == "victim")["locked_until"] is not None


def test_disabled_user_is_refused(idp: Idp, client: dict[str, Any]) -> None:
    """A disabled account cannot sign in, and its refresh tokens stop working."""
    _add_user(idp, "leaver")
    code, verifier, _ = _code(idp, client, user="leaver")
    tokens = _exchange(idp, client, code, verifier).json()
    idp.cli("idp", "user", "disable", "leaver")
    _, challenge = pkce_pair()
    params = authorize_params(client["client_id"], REDIRECT, challenge)
    with idp.http() as http:
        refused = sign_in(http, idp.url, params, "leaver", PASSWORD)
    assert refused.status_code == 403
    assert "disabled" in refused.text
    assert "location" not in refused.headers
    after = _refresh(idp, client, tokens["refresh_token"])
    assert after.status_code == 400
    assert after.json()["error"] == "invalid_grant"
