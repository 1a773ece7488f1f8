"""A header-echo upstream for the gateway tests, served by `trustmesh run _echo_app:app`.

Every request is answered with what arrived: the method, the path (decoded and raw),
the query, every header exactly as received (name and value, in order, repeats kept),
the caller the middleware saw and this endpoint's name (``ECHO_NAME``). Each request is
also appended as one JSON line to ``ECHO_LOG``, so a test can prove that a request never
reached the upstream. ``/slow?s=N`` waits N seconds before answering (timeouts), and
``/status/NNN`` answers with that status (upstream errors).

It runs under `trustmesh run --trusted-proxy GATEWAY`: the middleware passes a trusted
proxy's headers to the app unchanged, so a header the gateway failed to strip shows here
(and an identity header would even change the caller, or be refused as 400).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

NAME = os.environ.get("ECHO_NAME", "echo")
LOG = os.environ.get("ECHO_LOG", "echo.jsonl")
_hits = 0


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":  # lifespan: nothing to set up
        message = await receive()
        while message["type"] != "lifespan.shutdown":
            await send({"type": message["type"] + ".complete"})
            message = await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    global _hits
    _hits += 1
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    identity = scope.get("trustmesh")
    seen = {
        "name": NAME,
        "hits": _hits,
        "method": scope["method"],
        "path": scope["path"],
        "raw_path": scope.get("raw_path", b"").decode("latin-1"),
        "query": scope.get("query_string", b"").decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        "caller": str(identity.caller) if identity is not None else None,
        "body_bytes": len(body),
    }
    with open(LOG, "a", encoding="utf-8") as log:
        log.write(json.dumps(seen) + "\n")
    status = 200
    if scope["path"] == "/slow":
        query = dict(p.partition("=")[::2] for p in seen["query"].split("&") if p)
        await asyncio.sleep(float(query.get("s", "5")))
    elif scope["path"].startswith("/status/"):
        status = int(scope["path"].rsplit("/", 1)[1])
    data = json.dumps(seen).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"x-echo-name", NAME.encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})
