"""orders: a Flask service that calls inventory over mTLS.

Run it under ``trustmesh run main:app --app-dir examples/orders ...``. It reads its
own certificate from the agent's directory (``TRUSTMESH_CERT_DIR``) to call
inventory (``INVENTORY_URL``), and accepts only an inventory that presents
``INVENTORY_ID`` (default ``spiffe://demo.example/inventory``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
from flask import Flask

from trustmesh.client import mtls_client
from trustmesh.middleware.flask import current_caller, current_user
from trustmesh.tls import RotatingCredentials

INVENTORY_URL = os.environ.get("INVENTORY_URL", "https://127.0.0.1:8444")
INVENTORY_ID = os.environ.get("INVENTORY_ID", "spiffe://demo.example/inventory")


credentials = RotatingCredentials(Path(os.environ.get("TRUSTMESH_CERT_DIR", "certs/orders")))
credentials.start()
# Agent-issued certificates name no host: with expect_id, mtls_client authenticates
# inventory by its SPIFFE ID (checked on every new connection), not by hostname.
inventory = mtls_client(credentials, expect_id=INVENTORY_ID, base_url=INVENTORY_URL, timeout=5)

ORDERS = {
    "1": {"id": "1", "item": "2", "quantity": 1},
    "2": {"id": "2", "item": "3", "quantity": 4},
}

app = Flask("orders")


def user_seen() -> dict[str, Any]:
    """The end user whose verified token came with the request (through the gateway), if
    any: its subject and token id, which inventory reports too for the same token."""
    user = current_user()
    return {} if user is None else {"user": {"sub": user.subject, "token_id": user.jwt_id}}


@app.get("/orders/<order_id>")
def get_order(order_id: str) -> tuple[dict[str, Any], int]:
    order = ORDERS.get(order_id)
    if order is None:
        return {"error": f"no order {order_id}"}, 404
    try:
        answer = inventory.get(f"/items/{order['item']}")
    except httpx.HTTPError as exc:
        return {"order": order, "caller": str(current_caller()), "error": str(exc)}, 502
    # mtls_client passed the user's token on (Authorization), so inventory decides with it too.
    return {
        "order": order,
        "caller": str(current_caller()),
        **user_seen(),
        "inventory_status": answer.status_code,
        "inventory": answer.json(),
    }, 200
