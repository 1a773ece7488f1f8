"""The example services of ``examples/`` under ``trustmesh run``, as real processes.

A real CA (`trustmesh ca serve`) enrolls inventory, orders and frontend through
`trustmesh agent` with join tokens; inventory (FastAPI) and orders (Flask) run under
`trustmesh run` with their policy files and the CA's revocation feed; the test calls
them over mTLS with the agents' certificates.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import httpx
import pytest

from trustmesh.demo import TRUST_DOMAIN, ExampleMesh, fetch, serial_of

pytestmark = pytest.mark.slow

FRONTEND = f"spiffe://{TRUST_DOMAIN}/frontend"
ORDERS = f"spiffe://{TRUST_DOMAIN}/orders"
INVENTORY = f"spiffe://{TRUST_DOMAIN}/inventory"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExampleMesh]:
    workdir = tmp_path_factory.mktemp("mesh")
    env = {
        **os.environ,
        "TRUSTMESH_HOME": str(workdir / "home"),
        "TRUSTMESH_CA_PASSPHRASE": secrets.token_urlsafe(24),
    }
    mesh = ExampleMesh(workdir, env, echo=False)
    mesh.cli("ca", "init", "--trust-domain", TRUST_DOMAIN, show=False)
    with mesh as running:
        yield running


def test_allowed_call_chain_shows_each_caller(mesh: ExampleMesh) -> None:
    with mesh.client("frontend", "orders") as frontend:
        answer = fetch(frontend, "/orders/1")
    assert answer.status == 200, answer.body
    assert answer.body["caller"] == FRONTEND
    assert answer.body["order"] == {"id": "1", "item": "2", "quantity": 1}
    assert answer.body["inventory_status"] == 200
    # inventory saw orders (orders' own certificate, through mtls_client), not frontend
    assert answer.body["inventory"] == {
        "item": {"id": "2", "name": "monitor", "stock": 3},
        "caller": ORDERS,
    }
    # the server frontend talked to is the orders identity the agent enrolled
    assert answer.server_serial == serial_of(mesh.dirs["orders"])


def test_inventory_policy_allows_orders_reads_only(mesh: ExampleMesh) -> None:
    with mesh.client("orders", "inventory") as orders:
        listing = orders.get("/items")
        deleted = orders.delete("/items/1")
    assert listing.status_code == 200
    assert listing.json()["caller"] == ORDERS
    assert [item["id"] for item in listing.json()["items"]] == ["1", "2", "3"]
    assert deleted.status_code == 403
    assert deleted.json()["reason"] == "policy_denied"


def test_policy_denies_frontend_calling_inventory_with_the_explanation(mesh: ExampleMesh) -> None:
    with mesh.client("frontend", "inventory") as frontend:
        denied = frontend.get("/items/2")
    assert denied.status_code == 403
    problem = denied.json()
    assert denied.headers["content-type"].startswith("application/problem+json")
    assert problem["reason"] == "policy_denied"
    assert FRONTEND in problem["detail"]
    assert "orders-reads-inventory" in problem["detail"]
    assert "caller not in" in problem["detail"]
    log = mesh.log_text("inventory")
    assert f"deny GET /items/2 from {FRONTEND}: policy_denied" in log


def test_orders_policy_denies_an_unknown_caller(mesh: ExampleMesh) -> None:
    # orders' policy names frontend only: inventory's identity may not read orders
    with mesh.client("inventory", "orders") as inventory:
        denied = inventory.get("/orders/1")
    assert denied.status_code == 403
    assert denied.json()["reason"] == "policy_denied"


def test_client_refuses_a_server_with_the_wrong_spiffe_id(mesh: ExampleMesh) -> None:
    # frontend expects inventory but connects to orders: refused before any request is sent
    with (
        mesh.client("frontend", "orders", expect="inventory") as frontend,
        pytest.raises(httpx.ConnectError) as refused,
    ):
        frontend.get("/orders/1")
    assert f"the server presented {ORDERS}" in str(refused.value)
    assert f"this client expects {INVENTORY}" in str(refused.value)


def test_orders_refuses_an_inventory_with_the_wrong_spiffe_id(mesh: ExampleMesh) -> None:
    # a second orders process that expects inventory to be spiffe://demo.example/billing
    mesh.run_orders(inventory_id=f"spiffe://{TRUST_DOMAIN}/billing", label="orders-strict")
    with mesh.client("frontend", "orders-strict", expect="orders") as frontend:
        answer = frontend.get("/orders/1")
    assert answer.status_code == 502
    body = answer.json()
    assert body["caller"] == FRONTEND
    assert f"the server presented {INVENTORY}" in body["error"]
    assert f"this client expects spiffe://{TRUST_DOMAIN}/billing" in body["error"]


def test_orders_ignores_a_spoofed_identity_header(mesh: ExampleMesh) -> None:
    # frontend is no trusted proxy: its identity headers are stripped in the WSGI environ
    with mesh.client("frontend", "orders") as frontend:
        answer = frontend.get(
            "/orders/2",
            headers={
                "X-Trustmesh-Caller": f"spiffe://{TRUST_DOMAIN}/admin",
                "X_Trustmesh_Caller": f"spiffe://{TRUST_DOMAIN}/admin",
            },
        )
    assert answer.status_code == 200
    assert answer.json()["caller"] == FRONTEND
