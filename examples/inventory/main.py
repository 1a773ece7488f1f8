"""inventory: a FastAPI service that knows who is calling.

Run it under ``trustmesh run main:app --app-dir examples/inventory ...``: the runner
serves it over mTLS and applies ``policy.yaml``; ``CallerDep`` is the verified SPIFFE
ID of the calling workload.
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException

from trustmesh.middleware.fastapi import CallerDep, UserDep
from trustmesh.tokens import AccessTokenClaims

ITEMS = {
    "1": {"id": "1", "name": "keyboard", "stock": 12},
    "2": {"id": "2", "name": "monitor", "stock": 3},
    "3": {"id": "3", "name": "cable", "stock": 140},
}

app = FastAPI(title="inventory")


def user_seen(user: AccessTokenClaims | None) -> dict[str, object]:
    """The end user whose verified token came with the request, if any (see orders)."""
    return {} if user is None else {"user": {"sub": user.subject, "token_id": user.jwt_id}}


@app.get("/items")
def list_items(caller: CallerDep) -> dict[str, object]:
    return {"items": list(ITEMS.values()), "caller": str(caller)}


@app.get("/items/{item_id}")
def get_item(item_id: str, caller: CallerDep, user: UserDep) -> dict[str, object]:
    item = ITEMS.get(item_id)
    if item is None:
        raise HTTPException(status_code=404, detail=f"no item {item_id}")
    return {"item": item, "caller": str(caller), **user_seen(user)}


@app.delete("/items/{item_id}")
def delete_item(item_id: str, caller: CallerDep) -> dict[str, object]:
    # The policy allows no caller to reach this: it is here to be denied.
    ITEMS.pop(item_id, None)
    return {"deleted": item_id, "caller": str(caller)}
