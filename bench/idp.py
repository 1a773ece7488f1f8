"""Identity server throughput: client_credentials tokens and introspections per second over HTTPS.

Setup (untimed): a fresh ec-p256 CA in a temporary home (SQLite, or PostgreSQL with
--db), one client_secret_basic client added with `trustmesh idp client add`, and a
real `python -m trustmesh idp serve` process on 127.0.0.1 with its rate limits
raised out of the way (--token-rate/--ip-rate 1e6). The tokens to introspect are
fetched before the clock starts.

Load: --concurrency keep-alive HTTPS connections (httpx.AsyncClient, our CA bundle
verifying the server), each sending its next request when the previous answer has
arrived (closed loop), for --duration seconds per target after --warmup seconds.
Targets, in rotating order each round:

  healthz     GET /healthz: TLS + HTTP + ASGI, the baseline for the same client
  token       POST /token grant_type=client_credentials with HTTP Basic: look up the
              client, check the salted SHA-256 secret, sign an ES256 at+jwt, append
              the issuance to the audit chain (one committed transaction)
  introspect  POST /introspect token=... with HTTP Basic: authenticate the client,
              verify the JWT signature and claims, look the jti up in the revocation
              table

Also measured in-process (single thread): the raw ES256 signing rate of joserfc
(jwt.encode of the same claims), and Authlib's token and introspection endpoints called
directly (the same database, no HTTP, TLS or worker threads), which splits the cost
between the OAuth work and the HTTP stack.

Every answer is checked (200, a token or active=true). It prints requests/s per
target (median over --rounds, per-round values in brackets), p50/p99 latency, the
ratios token/healthz and introspect/healthz, and the server's CPU seconds per
request. --append writes a dated section to bench/RESULTS.md.

Example:
  .venv/bin/python bench/idp.py
  .venv/bin/python bench/idp.py --rounds 5 --duration 10 --append
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType, pem_certificates

PASSPHRASE = b"bench passphrase, not a secret"
RESULTS = Path(__file__).parent / "RESULTS.md"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "TRUSTMESH_HOME": str(home),
        "TRUSTMESH_CA_PASSPHRASE": PASSPHRASE.decode(),
    }


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


async def _load(
    url: str,
    ctx: ssl.SSLContext,
    make: Any,
    check: Any,
    *,
    concurrency: int,
    warmup: float,
    duration: float,
) -> tuple[int, list[float]]:
    latencies: list[float] = []
    count = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(verify=ctx, limits=limits, timeout=30) as client:
        start = time.perf_counter()
        measure_from = start + warmup
        stop = measure_from + duration

        async def worker(i: int) -> None:
            nonlocal count
            n = 0
            while True:
                sent = time.perf_counter()
                if sent >= stop:
                    return
                response = await make(client, i, n)
                done = time.perf_counter()
                n += 1
                check(response)
                if sent >= measure_from and done <= stop:
                    count += 1
                    latencies.append(done - sent)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return count, latencies


def _raw_signing_rate(seconds: float = 2.0) -> float:
    key = ECKey.generate_key("P-256", parameters={"kid": "bench"})
    now = int(time.time())
    claims = {
        "iss": "https://127.0.0.1:9443",
        "aud": "api",
        "sub": "tmc_x",
        "client_id": "tmc_x",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "x" * 24,
        "scope": "read",
        "roles": [],
    }
    header = {"alg": "ES256", "typ": "at+jwt", "kid": "bench"}
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        jwt.encode(header, claims, key, algorithms=["ES256"])
        n += 1
    return n / (time.perf_counter() - start)


def _in_process(
    home: Path, issuer: str, creds: dict[str, str], token: str, count: int
) -> dict[str, float]:
    """Milliseconds per call of Authlib's endpoints in this process: no HTTP, TLS or threads."""
    from starlette.datastructures import Headers

    from trustmesh.idp import IdpOAuth2Request, IdpSettings, create_app, create_context

    basic = base64.b64encode(f"{creds['client_id']}:{creds['client_secret']}".encode()).decode()
    headers = Headers({"authorization": f"Basic {basic}"})
    out: dict[str, float] = {}
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        ctx = create_context(ca, PASSPHRASE, IdpSettings(issuer=issuer))
        create_app(ctx)
        server = ctx.authorization_server()
        introspected = {"token": token}

        def issue() -> None:
            request = IdpOAuth2Request(
                "POST", f"{issuer}/token", headers, form={"grant_type": "client_credentials"}
            )
            assert server.create_token_response(request).status_code == 200

        def introspect() -> None:
            request = IdpOAuth2Request("POST", f"{issuer}/introspect", headers, form=introspected)
            response = server.create_endpoint_response("introspection", request)
            assert b'"active":false' not in response.body

        for name, call in (("token", issue), ("introspect", introspect)):
            call()
            start = time.perf_counter()
            for _ in range(count):
                call()
            out[name] = (time.perf_counter() - start) / count * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--db", default=None, help="PostgreSQL URL (default: SQLite in the CA home)"
    )
    parser.add_argument(
        "--append", action="store_true", help="append the results to bench/RESULTS.md"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-idp-") as tmp:
        home = Path(tmp) / "home"
        CertificateAuthority.init(
            home,
            trust_domain="example.org",
            passphrase=PASSPHRASE,
            key_type=KeyType.EC_P256,
            db_url=args.db,
        ).close()
        with CertificateAuthority.open(home) as ca:
            bundle = Path(tmp) / "bundle.pem"
            bundle.write_bytes(pem_certificates(ca.bundle))
        added = subprocess.run(
            [
                sys.executable,
                "-m",
                "trustmesh",
                "idp",
                "client",
                "add",
                "bench",
                "--scope",
                "read",
                "--audience",
                "api",
                "--json",
            ],
            env=_env(home),
            capture_output=True,
            text=True,
            check=True,
        )
        creds = json.loads(added.stdout)
        auth = httpx.BasicAuth(creds["client_id"], creds["client_secret"])
        port = _free_port()
        url = f"https://127.0.0.1:{port}"
        log = (Path(tmp) / "idp.log").open("w")
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trustmesh",
                "idp",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--token-rate",
                "1000000",
                "--token-burst",
                "1000000",
                "--ip-rate",
                "1000000",
                "--ip-burst",
                "1000000",
                "--log-level",
                "warning",
            ],
            env=_env(home),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        ctx = ssl.create_default_context(cafile=str(bundle))
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{url}/healthz", verify=ctx, timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("idp serve did not start")
                time.sleep(0.1)
            with httpx.Client(verify=ctx) as http:
                tokens = [
                    http.post(
                        f"{url}/token", auth=auth, data={"grant_type": "client_credentials"}
                    ).json()["access_token"]
                    for _ in range(args.concurrency)
                ]

            async def healthz(client: httpx.AsyncClient, i: int, n: int) -> httpx.Response:
                return await client.get(f"{url}/healthz")

            async def token(client: httpx.AsyncClient, i: int, n: int) -> httpx.Response:
                return await client.post(
                    f"{url}/token", auth=auth, data={"grant_type": "client_credentials"}
                )

            async def introspect(client: httpx.AsyncClient, i: int, n: int) -> httpx.Response:
                return await client.post(f"{url}/introspect", auth=auth, data={"token": tokens[i]})

            def ok(response: httpx.Response) -> None:
                assert response.status_code == 200, response.text

            def ok_token(response: httpx.Response) -> None:
                ok(response)
                assert response.json()["access_token"].count(".") == 2

            def ok_active(response: httpx.Response) -> None:
                ok(response)
                assert response.json()["active"] is True

            targets = {
                "healthz": (healthz, ok),
                "token": (token, ok_token),
                "introspect": (introspect, ok_active),
            }
            rates: dict[str, list[float]] = {t: [] for t in targets}
            lats: dict[str, list[float]] = {t: [] for t in targets}
            cpu: dict[str, list[float]] = {t: [] for t in targets}
            order = list(targets)
            raw = []
            for r in range(args.rounds):
                raw.append(_raw_signing_rate())
                for name in order[r % 3 :] + order[: r % 3]:
                    make, check = targets[name]
                    before = _cpu_seconds(server.pid)
                    count, latencies = asyncio.run(
                        _load(
                            url,
                            ctx,
                            make,
                            check,
                            concurrency=args.concurrency,
                            warmup=args.warmup,
                            duration=args.duration,
                        )
                    )
                    used = _cpu_seconds(server.pid) - before
                    rates[name].append(count / args.duration)
                    lats[name].extend(latencies)
                    cpu[name].append(used / max(1, count))
                    print(f"round {r + 1} {name}: {count / args.duration:,.0f}/s", flush=True)
            in_process = _in_process(home, url, creds, tokens[0], 300)
        finally:
            server.terminate()
            server.wait(timeout=15)
            log.close()

    def med(values: list[float]) -> float:
        return statistics.median(values)

    def pct(values: list[float], p: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    rows = []
    for name in targets:
        rows.append(
            f"| {name} | **{med(rates[name]):,.0f}** "
            f"[{' '.join(f'{x:,.0f}' for x in rates[name])}] "
            f"| {pct(lats[name], 0.5):.1f} ms | {pct(lats[name], 0.99):.1f} ms "
            f"| {med(cpu[name]) * 1000:.2f} ms |"
        )
    raw_rate = med(raw)
    token_ratio = med(rates["token"]) / med(rates["healthz"])
    intro_ratio = med(rates["introspect"]) / med(rates["healthz"])
    db = "PostgreSQL" if args.db else "SQLite"
    report = "\n".join(
        [
            "## Identity server: client_credentials and introspection over HTTPS "
            f"({datetime.now(UTC):%Y-%m-%d})",
            "",
            f"`bench/idp.py --rounds {args.rounds} --duration {args.duration:g} --concurrency "
            f"{args.concurrency}` on {platform.machine()}, Python {platform.python_version()}, "
            f"{os.cpu_count()} cores shared with other work, {db}. A real `idp serve` on "
            "127.0.0.1; keep-alive HTTPS connections from httpx (closed loop); medians over "
            "rounds, per-round values in brackets.",
            "",
            "| target | requests/s | p50 | p99 | server CPU per request |",
            "|---|---|---|---|---|",
            *rows,
            f"| raw ES256 signing (joserfc, in-process, 1 thread) | **{raw_rate:,.0f}** "
            "| - | - | - |",
            f"| Authlib token endpoint in-process (no HTTP, 1 thread) | "
            f"{1000 / in_process['token']:,.0f} | - | - | {in_process['token']:.2f} ms (wall) |",
            f"| Authlib introspection in-process (no HTTP, 1 thread) | "
            f"{1000 / in_process['introspect']:,.0f} | - | - "
            f"| {in_process['introspect']:.2f} ms (wall) |",
            "",
            f"Ratios: token/healthz = **{token_ratio:.2f}**, "
            f"introspect/healthz = **{intro_ratio:.2f}**; "
            f"token issuance is {med(rates['token']) / raw_rate:.1%} of the raw signing rate.",
            "",
        ]
    )
    print()
    print(report)
    if args.append:
        with RESULTS.open("a") as out:
            out.write("\n" + report)


if __name__ == "__main__":
    main()
