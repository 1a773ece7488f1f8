"""The extension point the user side builds on: grants, discovery fields and routes plug in.

Routing and JSON only (httpx's ASGITransport); the real-process tests are in test_idp.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from authlib.oauth2.rfc6749.grants import BaseGrant, TokenEndpointMixin
from joserfc import jwt
from joserfc.jwk import KeySet
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from trustmesh.authority import CertificateAuthority
from trustmesh.idp import (
    CLIENT_AUTH_METHODS,
    IdpContext,
    IdpSettings,
    add_client,
    create_app,
    create_context,
    oauth_request,
)

from .conftest import PASSPHRASE

ISSUER = "https://idp.test"


class _User:
    roles = ("admin",)

    def get_user_id(self) -> str:
        return "user-42"


class _ExampleGrant(BaseGrant, TokenEndpointMixin):  # type: ignore[misc]
    """A toy grant: the client gets a token for user-42 (stands in for authorization_code)."""

    GRANT_TYPE = "urn:example:grant"
    TOKEN_ENDPOINT_AUTH_METHODS = CLIENT_AUTH_METHODS

    def validate_token_request(self) -> None:
        self.request.client = self.authenticate_token_endpoint_client()

    def create_token_response(self) -> tuple[int, Any, Any]:
        token = self.generate_token(user=_User(), scope="profile", include_refresh_token=True)
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER


class _Extension:
    def __init__(self) -> None:
        self.saved: list[dict[str, Any]] = []

    def install(self, ctx: IdpContext) -> Sequence[BaseRoute]:
        server = ctx.authorization_server()
        server.register_grant(_ExampleGrant)
        server.token_listeners.append(lambda token, request: self.saved.append(dict(token)))
        ctx.metadata["authorization_endpoint"] = f"{ctx.issuer}/authorize"

        async def echo(request: Request) -> Response:
            oreq = await oauth_request(ctx, request)
            if isinstance(oreq, Response):
                return oreq
            return JSONResponse({"client_id": oreq.payload.client_id})

        return [Route("/authorize", echo, methods=["GET", "POST"])]


@pytest.fixture
def app_and_client(ca: CertificateAuthority) -> tuple[Any, _Extension, dict[str, str]]:
    ctx = create_context(ca, PASSPHRASE, IdpSettings(issuer=ISSUER))
    extension = _Extension()
    app = create_app(ctx, [extension])
    with ca.store.transaction() as conn:
        client, secret = add_client(
            conn, name="ext", scopes=["profile"], grant_types=["client_credentials"]
        )
    assert secret is not None
    return app, extension, {"client_id": client.client_id, "client_secret": secret}


def test_extension_grants_routes_and_metadata(
    app_and_client: tuple[Any, _Extension, dict[str, str]],
) -> None:
    """A registered grant issues user tokens (sub, roles); discovery lists it; routes mount."""
    asyncio.run(_scenario(*app_and_client))


async def _scenario(app: Any, extension: _Extension, creds: dict[str, str]) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as http:
        meta = (await http.get("/.well-known/openid-configuration")).json()
        assert meta["grant_types_supported"] == ["client_credentials", "urn:example:grant"]
        assert meta["authorization_endpoint"] == f"{ISSUER}/authorize"
        r = await http.post(
            "/token",
            auth=(creds["client_id"], creds["client_secret"]),
            data={"grant_type": "urn:example:grant"},
        )
        assert r.status_code == 200, r.text
        keys = KeySet.import_key_set((await http.get("/jwks")).json())
        claims = jwt.decode(r.json()["access_token"], keys, algorithms=["ES256"]).claims
        assert claims["sub"] == "user-42"
        assert claims["roles"] == ["admin"]
        assert claims["client_id"] == creds["client_id"]
        assert claims["scope"] == "profile"
        assert "refresh_token" not in r.json()  # the default generator never adds one
        assert extension.saved
        assert extension.saved[0]["access_token"] == r.json()["access_token"]
        r = await http.get("/authorize", params={"client_id": "abc"})
        assert r.json() == {"client_id": "abc"}
    events = [(e.action, e.details.get("grant_type")) for e in app.state.ctx.ca.audit_tail(20)]
    assert ("idp.token", "urn:example:grant") in events


def test_a_failing_database_is_503_not_500(
    app_and_client: tuple[Any, _Extension, dict[str, str]],
) -> None:
    """When the database fails, the token endpoint answers 503 temporarily_unavailable."""
    app, _, creds = app_and_client
    with app.state.ctx.store.transaction() as conn:
        conn.execute(text("DROP TABLE idp_clients"))

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as http:
            return await http.post(
                "/token",
                auth=(creds["client_id"], creds["client_secret"]),
                data={"grant_type": "client_credentials"},
            )

    response = asyncio.run(call())
    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"
    assert response.headers["retry-after"] == "5"
