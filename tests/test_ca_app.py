"""The CA app in-process (no TLS needed for these checks): slow bodies time out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx

from trustmesh.authority import CertificateAuthority
from trustmesh.ca_server import ServerSettings, create_app


def test_slow_request_body_gets_408(ca: CertificateAuthority) -> None:
    app = create_app(ca, ServerSettings(body_timeout=0.2))

    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"token": '
        await asyncio.sleep(1)
        yield b'"x"}'

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ca") as client:
            return await client.post("/v1/enroll", content=trickle())

    response = asyncio.run(call())
    assert response.status_code == 408
    assert response.headers["content-type"] == "application/problem+json"
    assert "within 0.2 s" in response.json()["detail"]
