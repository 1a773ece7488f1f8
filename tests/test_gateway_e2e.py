"""The edge gateway end to end, every part a real process started from the CLI.

`trustmesh ca serve` enrolls the gateway, the example services and an echo upstream;
`trustmesh idp serve` signs a user in (login page, code + PKCE); inventory (FastAPI) and
orders (Flask) run under `trustmesh run` verifying user tokens themselves, with the
policies of ``examples/gateway/``; Node's oidc-provider is a second issuer (its JWTs
checked by its keys, its opaque tokens by introspection); `trustmesh gateway serve` sits
in front. The user's call goes gateway -> orders -> inventory with the
user's own token, and each refusal is 401 or 403 as the issue specifies, never mixed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from trustmesh.demo import jwt_parts

from ._gateway_stack import (
    GATEWAY_ID,
    ORDERS_ID,
    Gateway,
    Stack,
    refused,
    running_stack,
)
from ._provider import NODE_RESOURCE_SERVER

pytestmark = pytest.mark.slow

#: Some trustmesh.tokens reason codes, or the gateway's catch-all, for a bad token.
INVALID = ("token_invalid",)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("gw-e2e"), services=True, node=True) as s:
        yield s


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Gateway:
    """orders behind /orders (orders:read), the echo upstream behind /public (no token),
    /api (orders:read, any configured issuer) and /idp-only (our identity server only)."""
    scopes = {"scopes": ["orders:read"]}
    routes = [
        stack.route("/orders", "orders", auth=scopes),
        stack.route("/public", "echo", auth={"public": True}),
        stack.route("/api", "echo", auth=scopes),
        stack.route("/idp-only", "echo", auth={**scopes, "issuers": [stack.idp_url]}),
    ]
    issuers: list[dict[str, Any]] = [{"issuer": stack.idp_url, "audience": "api"}]
    if stack.node is not None:
        # oidc-provider: JWTs by its JWKS, opaque tokens at its introspection endpoint
        client_id, secret = NODE_RESOURCE_SERVER
        secret_file = stack.workdir / "rs-orders.secret"
        secret_file.write_text(secret)
        introspection = {"client_id": client_id, "client_secret_file": str(secret_file)}
        node = {"issuer": stack.node.issuer, "audience": "orders", "ca_bundle": str(stack.bundle)}
        issuers.append({**node, "introspection": introspection})
    return stack.start_gateway(stack.config(routes, issuers=issuers))


def marker() -> str:
    return uuid.uuid4().hex[:12]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_services_take_the_gateway_identity_with_the_user_token(stack: Stack) -> None:
    """Without the gateway: the example services, under the gateway policies, accept the
    gateway's identity with a user token, and orders passes that token on to inventory."""
    token = stack.user_token()
    with stack.mesh.client("gateway", "orders") as gateway:
        answer = gateway.get("/orders/1", headers={"Authorization": f"Bearer {token}"})
        missing = gateway.get("/orders/1")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["caller"] == GATEWAY_ID
    assert body["inventory"]["caller"] == ORDERS_ID
    assert body["user"]["sub"] == stack.users["alice"]["user_id"]
    assert body["inventory"]["user"] == body["user"]
    # the policies want the user's token: without one, orders refuses the gateway
    assert missing.status_code == 403
    assert missing.json()["reason"] == "policy_denied"
    with stack.mesh.client("gateway", "inventory") as gateway:
        direct = gateway.get("/items/1", headers={"Authorization": f"Bearer {token}"})
    assert direct.status_code == 403  # only orders may read inventory
    assert direct.json()["reason"] == "policy_denied"


def test_a_users_call_reaches_orders_then_inventory_with_the_users_own_token(
    stack: Stack, gateway: Gateway
) -> None:
    """Login page -> token -> gateway -> orders (Flask) -> inventory (FastAPI): each
    service verified the same token (its jti) and saw its own caller over mTLS."""
    token = stack.user_token()
    with gateway.http() as http:
        answer = http.get("/orders/1", headers=bearer(token))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    jti = jwt_parts(token)[1]["jti"]
    alice = {"sub": stack.users["alice"]["user_id"], "token_id": jti}
    assert body["caller"] == GATEWAY_ID  # the gateway's own identity, by mTLS
    assert body["user"] == alice
    assert body["inventory_status"] == 200
    assert body["inventory"]["caller"] == ORDERS_ID
    assert body["inventory"]["user"] == alice  # the same token, passed on by orders
    assert body["inventory"]["item"]["id"] == "2"
    # the gateway's security headers on a forwarded answer
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "max-age=" in answer.headers["strict-transport-security"]
    assert gateway.reason("/orders/1") == "allowed"


def test_the_token_reaches_the_upstream_byte_for_byte(stack: Stack, gateway: Gateway) -> None:
    token, mark = stack.machine_token(scope="orders:read"), marker()
    with gateway.http() as http:
        answer = http.get(f"/api/{mark}", headers=bearer(token))
    assert answer.status_code == 200, answer.text
    (seen,) = stack.echo_seen(mark)
    authorization = [v for k, v in seen["headers"] if k.lower() == "authorization"]
    assert authorization == [f"Bearer {token}"]
    assert seen["caller"] == GATEWAY_ID
    assert seen["raw_path"] == f"/api/{mark}"


@pytest.mark.parametrize("resource", ["es256", "rs256", "opaque"])
def test_a_token_from_node_oidc_provider_works_when_that_issuer_is_configured(
    stack: Stack, gateway: Gateway, resource: str
) -> None:
    if stack.node is None:
        pytest.skip("node or tests/peers/node_modules is missing (make peers)")
    token, mark = stack.node.token(f"https://orders.example/{resource}"), marker()
    with gateway.http() as http:
        answer = http.get(f"/api/{mark}", headers=bearer(token))
        other = http.get(f"/idp-only/{mark}", headers=bearer(token))
    assert answer.status_code == 200, answer.text
    (seen,) = stack.echo_seen(mark)
    assert [v for k, v in seen["headers"] if k.lower() == "authorization"] == [f"Bearer {token}"]
    assert gateway.reason(f"/api/{mark}") == "allowed"
    # a route that accepts only our identity server refuses it (an opaque one: no
    # introspection there): 401, not 403
    refused(other, 401, *INVALID, "bad_issuer", "issuer_not_allowed", "opaque_unsupported")
    assert other.headers["www-authenticate"].startswith("Bearer ")


def test_a_public_route_needs_no_token(stack: Stack, gateway: Gateway) -> None:
    mark = marker()
    with gateway.http() as http:
        answer = http.get(f"/public/{mark}")
    assert answer.status_code == 200, answer.text
    (seen,) = stack.echo_seen(mark)
    assert not [k for k, _ in seen["headers"] if k.lower() == "authorization"]
    assert gateway.reason(f"/public/{mark}") == "public"


Bad = Callable[[Stack], str | None]

BAD_TOKENS: dict[str, tuple[Bad, tuple[str, ...]]] = {
    "missing": (lambda s: None, ("token_missing",)),
    "expired": (lambda s: s.expired(s.machine_token()), ("expired",)),
    "forged": (lambda s: s.forged(s.machine_token()), ("bad_signature",)),
    "wrong audience": (lambda s: s.machine_token(s.elsewhere), ("bad_audience",)),
    "unknown issuer": (
        lambda s: s.forged(s.machine_token(), iss="https://issuer.invalid"),
        ("bad_issuer", "unknown_issuer"),
    ),
    "garbage": (lambda s: "not-a-token", ("malformed", "opaque_unsupported", "inactive")),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_a_missing_or_invalid_token_is_401_with_www_authenticate(
    stack: Stack, gateway: Gateway, case: str
) -> None:
    make, reasons = BAD_TOKENS[case]
    token, mark = make(stack), marker()
    with gateway.http() as http:
        answer = http.get(f"/api/{mark}", headers=bearer(token) if token else {})
    document = refused(answer, 401, *reasons, *INVALID)
    challenge = answer.headers["www-authenticate"]
    if token is None:
        assert challenge == 'Bearer realm="trustmesh"'
    else:
        assert challenge.startswith("Bearer ")
        assert 'error="invalid_token"' in challenge
    assert gateway.reason(f"/api/{mark}") == document["reason"]
    assert stack.echo_seen(mark) == []


@pytest.mark.parametrize("who", ["user", "machine"])
def test_too_little_scope_is_403_never_401(stack: Stack, gateway: Gateway, who: str) -> None:
    token = (
        stack.user_token(scope="openid profile")
        if who == "user"
        else stack.machine_token(scope="profile")
    )
    mark = marker()
    with gateway.http() as http:
        answer = http.get(f"/api/{mark}", headers=bearer(token))
        orders = http.get("/orders/2", headers=bearer(token))
    for refusal in (answer, orders):
        refused(refusal, 403, "insufficient_scope")
        challenge = refusal.headers["www-authenticate"]
        assert 'error="insufficient_scope"' in challenge
        assert "orders:read" in challenge
    assert gateway.reason(f"/api/{mark}") == "insufficient_scope"
    assert stack.echo_seen(mark) == []


def test_an_invalid_token_with_too_little_scope_is_401_not_403(
    stack: Stack, gateway: Gateway
) -> None:
    """Authentication comes first: an expired token lacking the scope is a 401."""
    token = stack.expired(stack.machine_token(scope="profile"))
    with gateway.http() as http:
        answer = http.get(f"/api/{marker()}", headers=bearer(token))
    refused(answer, 401, "expired", *INVALID)
