"""The CA app in-process (no TLS needed for these checks): slow bodies time out, and
the directly dispatched renewal route still fails safe."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from trustmesh.authority import CertificateAuthority
from trustmesh.ca_server import ServerSettings, create_app
from trustmesh.ca_server._offload import Offload


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


def _with_client_cert(app: Any, pem: str) -> Any:
    """The app as the TLS shim presents it: the client certificate in the scope."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "extensions": {"tls": {"client_cert_chain": [pem]}}}
        await app(scope, receive, send)

    return wrapped


def test_renewal_route_failing_unexpectedly_answers_generic_500(
    ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    """POST /v1/renew skips Starlette's middleware, yet an unexpected failure still
    answers a generic problem+json 500 with the cause only in the log; GET is 405."""
    issued = ca.issue("spiffe://example.org/svc/a")
    pem = issued.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("disk on fire")

    ca.renew = broken  # type: ignore[method-assign,assignment]
    app = _with_client_cert(create_app(ca), pem)

    async def call() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ca") as client:
            post = await client.post("/v1/renew", json={"csr": "x"})
            get = await client.get("/v1/renew")
            return post, get

    post, get = asyncio.run(call())
    assert post.status_code == 500
    assert post.headers["content-type"] == "application/problem+json"
    assert "disk on fire" not in post.text
    assert "disk on fire" in caplog.text
    assert get.status_code == 405


def test_offload_returns_results_and_errors_in_batches() -> None:
    """The API's worker threads: results and exceptions reach their awaiting tasks,
    finished jobs are delivered to the loop in batches (fewer wake-ups than jobs), and
    a cancelled waiter does not stop the others."""
    pool = Offload(4, "test-offload")
    gate = threading.Barrier(4)

    def job(i: int) -> int:
        if i == 3:
            raise ValueError("three")
        gate.wait(5)  # four finish together: one batch
        return i * 10

    async def run() -> list[object]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        original = loop.call_soon_threadsafe

        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign,assignment]
        slow = asyncio.ensure_future(pool(lambda: gate.wait(5)))
        tasks = [asyncio.ensure_future(pool(functools.partial(job, i))) for i in range(3)]
        results: list[object] = list(await asyncio.gather(*tasks, slow))
        try:
            await pool(lambda: job(3))
        except ValueError as exc:
            results.append(str(exc))

        def sleepy() -> int:
            time.sleep(0.2)
            return 1

        cancelled = asyncio.ensure_future(pool(sleepy))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        results.append(await pool(lambda: 7))
        results.append(wakeups)
        return results

    out = asyncio.run(run())
    pool.shutdown()
    assert out[:3] == [0, 10, 20]
    assert out[4] == "three"
    assert out[5] == 7
    assert isinstance(out[6], int)
    assert out[6] < 7  # fewer wake-ups than the 7 jobs
