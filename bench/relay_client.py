"""The relay's upstream client: httpx vs ``trustmesh.http1.Pool``, in-process.

One command: an upstream (uvicorn + httptools, ``GET /item`` -> 200 with a 64-byte
body and Content-Length, keep-alive) runs in a child process twice, over plain HTTP
and over TLS (a fresh ec-p256 CA, the server's identity for 127.0.0.1). In this
process, ``trustmesh.relay.relay()`` forwards ``GET /item`` to it through an
``httpx.AsyncClient`` (as the gateway and the sidecar did) or through a
``trustmesh.http1.Pool`` (the fast path), from ``--concurrency`` tasks, the ASGI
``send`` a no-op; each task runs requests back to back for ``--duration`` seconds.

Per round and system, in rotated order: requests/s, and this process's CPU time per
request (``time.process_time``: the client side only, the upstream is another
process). Medians over ``--rounds``; the per-round values in brackets; the ratio
Pool/httpx from the same run.

Example:
  .venv/bin/python bench/relay_client.py
  .venv/bin/python bench/relay_client.py --rounds 5 --duration 3 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _common import PASSPHRASE, TRUST_DOMAIN, median, print_machine, spread

from trustmesh.authority import CertificateAuthority
from trustmesh.http1 import Pool
from trustmesh.pki import dump_private_key, pem_certificates
from trustmesh.relay import no_cookies, relay
from trustmesh.tls import client_context

BODY = b"x" * 64
SYSTEMS = ("httpx-plain", "pool-plain", "httpx-tls", "pool-tls")


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"64")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def serve_upstream(port: int, chain: str | None, key: str | None) -> None:
    import uvicorn

    uvicorn.run(
        upstream_app,
        host="127.0.0.1",
        port=port,
        http="httptools",
        ssl_certfile=chain,
        ssl_keyfile=key,
        log_level="warning",
        access_log=False,
        lifespan="off",
        backlog=1024,
    )


def start_upstream(port: int, chain: Path | None, key: Path | None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, __file__, "--serve", str(port)]
    if chain is not None and key is not None:
        cmd += ["--chain", str(chain), "--key", str(key)]
    proc = subprocess.Popen(cmd)
    scheme = "https" if chain else "http"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{scheme}://127.0.0.1:{port}/item", verify=False, timeout=1)  # noqa: S501 - readiness probe only
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the upstream on port {port} did not start")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def drive(client: httpx.AsyncClient | Pool, url: str, duration: float, tasks: int) -> int:
    """Run relay() back to back from ``tasks`` tasks for ``duration`` seconds."""
    scope = {"type": "http", "method": "GET", "headers": []}
    done = 0
    stop = time.perf_counter() + duration
    never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def send(_message: Any) -> None:
        return None

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            first = True

            async def receive() -> Any:
                nonlocal first
                if first:
                    first = False
                    return {"type": "http.request", "body": b"", "more_body": False}
                return await never

            status = await relay(
                scope, receive, send, client=client, url=url, headers=[], max_body=None
            )
            assert status == 200, status
            done += 1

    await asyncio.gather(*(worker() for _ in range(tasks)))
    return done


async def measure(
    system: str, ports: dict[str, int], ctx: Any, duration: float, tasks: int
) -> tuple[float, float]:
    kind, transport = system.split("-")
    tls = transport == "tls"
    port = ports[transport]
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/item"
    client: httpx.AsyncClient | Pool
    if kind == "httpx":
        client = httpx.AsyncClient(
            verify=ctx if tls else False,
            timeout=30,
            trust_env=False,
            cookies=no_cookies(),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
        )
    else:
        client = Pool("127.0.0.1", port, ssl_context=(lambda: ctx) if tls else None, timeout=30)
    try:
        await drive(client, url, 0.3, tasks)  # warm up: connections, caches
        cpu, wall = time.process_time(), time.perf_counter()
        done = await drive(client, url, duration, tasks)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await client.aclose()
    return done / wall, cpu / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chain", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_upstream(args.serve, args.chain, args.key)
        return
    print_machine({})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with CertificateAuthority.init(
            work / "ca", trust_domain=TRUST_DOMAIN, passphrase=PASSPHRASE
        ) as ca:
            issued = ca.issue(
                f"spiffe://{TRUST_DOMAIN}/svc/upstream", actor="bench", ips=["127.0.0.1"]
            )
            bundle = pem_certificates(ca.bundle).decode()
        assert issued.key is not None
        chain, key = work / "chain.pem", work / "key.pem"
        chain.write_bytes(pem_certificates(tuple(issued.chain)))
        key.write_bytes(dump_private_key(issued.key))
        ctx = client_context(cadata=bundle)
        ports = {"plain": free_port(), "tls": free_port()}
        procs = [
            start_upstream(ports["plain"], None, None),
            start_upstream(ports["tls"], chain, key),
        ]
        try:
            results: dict[str, list[tuple[float, float]]] = {s: [] for s in SYSTEMS}
            for round_no in range(args.rounds):
                order = SYSTEMS[round_no % len(SYSTEMS) :] + SYSTEMS[: round_no % len(SYSTEMS)]
                for system in order:
                    results[system].append(
                        asyncio.run(measure(system, ports, ctx, args.duration, args.concurrency))
                    )
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
    print(
        f"\nrelay() GET, {args.concurrency} concurrent tasks, {args.duration:g} s x "
        f"{args.rounds} rounds; medians [per round]"
    )
    print(f"{'system':<12} {'req/s':>8}  {'client CPU us/req':>17}")
    for system in SYSTEMS:
        rps = [r for r, _ in results[system]]
        cpu = [c for _, c in results[system]]
        print(
            f"{system:<12} {median(rps):>8.0f}  {median(cpu):>17.0f}   {spread(rps)} {spread(cpu)}"
        )
    for transport in ("plain", "tls"):
        pool, base = results[f"pool-{transport}"], results[f"httpx-{transport}"]
        rps = median([p[0] / h[0] for p, h in zip(pool, base, strict=True)])
        cpu = median([p[1] / h[1] for p, h in zip(pool, base, strict=True)])
        print(f"{transport}: Pool/httpx req/s x{rps:.2f}, CPU per request x{cpu:.2f}")


if __name__ == "__main__":
    main()
