"""The edge gateway end to end, every part a real process started from the CLI.

`trustmesh ca serve` enrolls the gateway, the example services and an echo upstream;
`trustmesh idp serve` signs a user in (login page, code + PKCE); inventory (FastAPI) and
orders (Flask) run under `trustmesh run` verifying user tokens themselves, with the
policies of ``examples/gateway/``; Node's oidc-provider is a second issuer; `trustmesh
gateway serve` sits in front. The user's call goes gateway -> orders -> inventory with the
user's own token, and each refusal is 401 or 403 as the issue specifies, never mixed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._gateway import GATEWAY_ID, ORDERS_ID, Stack, running_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("gw-e2e"), services=True, node=True) as s:
        yield s


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
