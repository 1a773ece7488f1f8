"""Standard clients we did not write run the user flows against `trustmesh idp serve`.

Authlib's httpx ``OAuth2Client`` (Python) and openid-client v6 (Node.js, npm) run
authorization code + PKCE (S256) with a scripted sign-in on our login page, then
userinfo and refresh, with their own validation of what we return.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from authlib.integrations.httpx_client import OAuth2Client
from joserfc import jwt
from joserfc.jwk import KeySet

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType

from ._idp import Idp, running_idp
from ._login import form_fields
from .conftest import PASSPHRASE

PEERS = Path(__file__).parent / "peers"
REDIRECT = "https://app.example.test/callback"
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Idp]:
    work = tmp_path_factory.mktemp("idp-code-peers")
    home = work / "home"
    CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    with running_idp(home, work) as server:
        pw = work / "alice.pw"
        pw.write_text(PASSWORD + "\n")
        server.cli(
            "idp", "user", "add", "alice", "--role", "admin", "--email", "alice@example.org",
            "--password-file", str(pw),
        )  # fmt: skip
        yield server


@pytest.fixture(scope="module")
def user_id(idp: Idp) -> str:
    users = json.loads(idp.cli("idp", "user", "list", "--json").stdout)
    return str(users[0]["user_id"])


def _client(idp: Idp, name: str) -> dict[str, Any]:
    return idp.add_client(
        name,
        "--redirect-uri",
        REDIRECT,
        *("--scope", "openid", "--scope", "profile", "--scope", "email"),
        *("--audience", "https://api.example.test"),
    )


def _metadata(idp: Idp) -> dict[str, Any]:
    with idp.http() as http:
        meta: dict[str, Any] = http.get(f"{idp.url}/.well-known/openid-configuration").json()
        return meta


def test_authlib_oauth2_client_code_flow(idp: Idp, user_id: str) -> None:
    """Authlib: authorization URL with S256, scripted sign-in, code exchange, userinfo, refresh."""
    creds = _client(idp, "authlib-web")
    meta = _metadata(idp)
    verifier = secrets.token_urlsafe(48)
    nonce = secrets.token_urlsafe(12)
    with OAuth2Client(
        creds["client_id"],
        creds["client_secret"],
        scope="openid profile email",
        redirect_uri=REDIRECT,
        code_challenge_method="S256",
        token_endpoint_auth_method="client_secret_basic",
        verify=idp.ssl_context(),
    ) as client:
        url, state = client.create_authorization_url(
            meta["authorization_endpoint"], code_verifier=verifier, nonce=nonce
        )
        assert "code_challenge_method=S256" in url
        # The person signing in: a separate "browser" with its own cookie jar.
        with idp.http() as browser:
            page = browser.get(url)
            assert page.status_code == 200
            action, fields = form_fields(page.text)
            posted = browser.post(
                f"{idp.url}{action}", data={**fields, "username": "alice", "password": PASSWORD}
            )
        assert posted.status_code == 302
        callback = posted.headers["location"]
        token = client.fetch_token(
            meta["token_endpoint"],
            authorization_response=callback,
            code_verifier=verifier,
            state=state,
        )
        assert token["token_type"] == "Bearer"
        with idp.http() as http:
            keys = KeySet.import_key_set(http.get(meta["jwks_uri"]).json())
        id_token = jwt.decode(token["id_token"], keys, algorithms=["ES256"])
        assert id_token.claims["nonce"] == nonce
        assert id_token.claims["aud"] == creds["client_id"]
        assert id_token.claims["sub"] == user_id
        info = client.get(meta["userinfo_endpoint"])
        assert info.status_code == 200
        assert info.json()["sub"] == user_id
        assert info.json()["email"] == "alice@example.org"
        assert info.json()["roles"] == ["admin"]
        old_refresh = token["refresh_token"]
        new = client.refresh_token(meta["token_endpoint"], refresh_token=old_refresh)
        assert new["refresh_token"] != old_refresh
        assert jwt.decode(new["access_token"], keys, algorithms=["ES256"]).claims["sub"] == user_id


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (PEERS / "node_modules" / "openid-client").is_dir():
        pytest.fail("tests/peers/node_modules is missing: run `make peers`")
    return node


def test_openid_client_code_flow(idp: Idp, user_id: str, tmp_path: Path) -> None:
    """openid-client v6: discovery, PKCE, scripted sign-in, ID token checks, userinfo, refresh."""
    node = _node()
    creds = _client(idp, "node-web")
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    result = subprocess.run(
        [
            node,
            str(PEERS / "oidc_code_flow.mjs"),
            idp.url,
            creds["client_id"],
            creds["client_secret"],
            REDIRECT,
            "alice",
            str(pw),
        ],
        env={**os.environ, "NODE_EXTRA_CA_CERTS": str(idp.bundle)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=PEERS,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["issuer"] == idp.url
    assert out["id_token_claims"]["sub"] == user_id
    assert out["id_token_claims"]["aud"] == creds["client_id"]
    assert out["userinfo"]["preferred_username"] == "alice"
    assert out["userinfo"]["roles"] == ["admin"]
    assert out["refresh_rotated"] is True
    assert out["refreshed_sub"] == user_id
    assert out["reuse_error"] == "invalid_grant"
    with idp.http() as http:
        keys = KeySet.import_key_set(http.get(f"{idp.url}/jwks").json())
    access = jwt.decode(out["access_token"], keys, algorithms=["ES256"])
    assert access.header["typ"] == "at+jwt"
    assert access.claims["sub"] == user_id
