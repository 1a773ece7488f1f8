"""Standard OAuth clients we did not write, against `trustmesh idp serve`.

Authlib's httpx OAuth2Client (Python) and openid-client v6 (Node.js, npm) run discovery,
client_credentials, introspection and revocation with their own code paths.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from authlib.integrations.httpx_client import OAuth2Client
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType

from ._idp import Idp, running_idp
from .conftest import PASSPHRASE

PEERS = Path(__file__).parent / "peers"


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Idp]:
    work = tmp_path_factory.mktemp("idp-peers")
    home = work / "home"
    CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    with running_idp(home, work) as server:
        yield server


def _claims(idp: Idp, token: str) -> dict[str, Any]:
    with idp.http() as http:
        keys = KeySet.import_key_set(http.get(f"{idp.url}/jwks").json())
    return dict(jwt.decode(token, keys, algorithms=["ES256"]).claims)


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_authlib_oauth2_client(idp: Idp, method: str) -> None:
    """Authlib's OAuth2Client: discovery-free client_credentials, introspect, revoke."""
    creds = idp.add_client(
        f"authlib-{method}",
        "--scope",
        "read",
        "--scope",
        "write",
        "--audience",
        "api",
        "--auth-method",
        method,
    )
    with idp.http() as http:
        meta = http.get(f"{idp.url}/.well-known/oauth-authorization-server").json()
    with OAuth2Client(
        creds["client_id"],
        creds["client_secret"],
        scope="read",
        token_endpoint_auth_method=method,
        revocation_endpoint_auth_method=method,
        verify=idp.ssl_context(),
    ) as client:
        token = client.fetch_token(meta["token_endpoint"], grant_type="client_credentials")
        assert token["token_type"] == "Bearer"
        assert token["scope"] == "read"
        claims = _claims(idp, token["access_token"])
        assert claims["aud"] == "api"
        assert claims["client_id"] == creds["client_id"]
        info = client.introspect_token(meta["introspection_endpoint"], token["access_token"])
        assert info.status_code == 200
        assert info.json()["active"] is True
        assert info.json()["scope"] == "read"
        revoked = client.revoke_token(meta["revocation_endpoint"], token["access_token"])
        assert revoked.status_code == 200
        info = client.introspect_token(meta["introspection_endpoint"], token["access_token"])
        assert info.json() == {"active": False}
    with idp.http() as http:
        listed = http.get(meta["revocation_list_endpoint"]).json()["revoked"]
    assert claims["jti"] in {e["jti"] for e in listed}


def _node() -> str:
    node = shutil.which("node")
    if node is None or not (PEERS / "node_modules" / "openid-client").is_dir():
        pytest.skip("node or tests/peers/node_modules missing: run `make peers`")
    return node


def _run_node(idp: Idp, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_node(), str(PEERS / "oidc_client.mjs"), idp.url, *args],
        env={**os.environ, "NODE_EXTRA_CA_CERTS": str(idp.bundle)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=PEERS,
    )


@pytest.mark.parametrize("auth", ["basic", "post"])
def test_openid_client_secret_methods(idp: Idp, auth: str) -> None:
    """openid-client v6: discovery, client_credentials, introspection, revocation."""
    method = {"basic": "client_secret_basic", "post": "client_secret_post"}[auth]
    creds = idp.add_client(
        f"node-{auth}", "--scope", "read", "--audience", "api", "--auth-method", method
    )
    result = _run_node(idp, creds["client_id"], auth, creds["client_secret"], "read")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["issuer"] == idp.url
    assert out["token_type"].lower() == "bearer"
    assert out["scope"] == "read"
    assert out["introspection_before"]["active"] is True
    assert out["introspection_before"]["client_id"] == creds["client_id"]
    assert out["introspection_after"] == {"active": False}
    assert _claims(idp, out["access_token"])["aud"] == "api"


def test_openid_client_private_key_jwt(idp: Idp, tmp_path: Path) -> None:
    """openid-client signs its own private_key_jwt assertions; ours accepts them."""
    key = ECKey.generate_key("P-256", parameters={"kid": "node-key"})
    public = tmp_path / "public.jwks"
    public.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    private = tmp_path / "private.jwk"
    private.write_text(json.dumps(key.as_dict(private=True)))
    creds = idp.add_client(
        "node-pkjwt",
        "--scope",
        "read",
        "--auth-method",
        "private_key_jwt",
        "--jwks-file",
        str(public),
    )
    result = _run_node(idp, creds["client_id"], "private_key_jwt", str(private))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["introspection_before"]["active"] is True
    assert out["introspection_after"] == {"active": False}


def test_openid_client_refuses_a_wrong_secret(idp: Idp) -> None:
    """A wrong secret makes openid-client fail with the server's invalid_client."""
    creds = idp.add_client("node-wrong", "--scope", "read")
    result = _run_node(idp, creds["client_id"], "basic", "tms_wrong")
    assert result.returncode == 1
    assert "invalid_client" in result.stderr
