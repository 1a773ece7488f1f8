"""Enrollment storm: --agents agents enroll within --window seconds, all from 127.0.0.1.

Setup (untimed, per storm): a fresh ec-p256 CA (SQLite file in a temporary CA
home), one single-use join token per agent (create_join_token for that agent's
own SPIFFE ID), and one CSR per agent with a freshly generated ec-p256 key.

Each agent starts at a uniformly random offset in [0, --window) s, opens a new
HTTPS connection (no client certificate), POSTs /v1/enroll {token, csr} and
closes the connection; concurrency is whatever arrives. Its latency runs from
the start of its connection to the end of the 201 answer. An agent that gets
429 either gives up (no retries) or, with retries, waits Retry-After plus a
random 0-100 % of it and tries again on a new connection until --retry-deadline.

Storms:
  defaults    `python -m trustmesh ca serve` as shipped: enrollments are limited
              per client address to 5/s with a burst of 20 (ServerSettings); every
              agent shares 127.0.0.1, so most are refused. Run once without
              retries and (unless --retry-deadline 0) once with Retry-After retries.
  raised      the same app (create_app + uvicorn, same TLS setup and uvicorn
              options as `ca serve`) started in a separate process with
              ServerSettings(enroll_rate_per_ip=1000, enroll_burst_per_ip=1000),
              because `ca serve` has no flag for the limit; no retries needed.

Baseline, same invocation: --baseline enrollments one at a time on the idle
"raised" server (same path: new connection, POST, close), p50 latency.

It prints failures (target: zero), p50/p99 enrollment latency, and completion
time (last success after the storm's start), medians over --rounds storms.

Example:
  .venv/bin/python bench/enroll_storm.py
  .venv/bin/python bench/enroll_storm.py --retry-deadline 0     # skip the slow retry run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from _api import (
    HOST,
    CPUMeter,
    RawConnection,
    Server,
    ca_serve,
    client_ssl,
    csr_pem,
    init_home,
    inprocess_serve,
    loadavg,
    median_or_nan,
    ms,
    percentile,
)
from _common import PASSPHRASE, TRUST_DOMAIN, spread, verdict
from cryptography import x509

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import verify_chain

RAISED = {"enroll_rate_per_ip": 1000.0, "enroll_burst_per_ip": 1000}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--agents", type=int, default=1000, help="agents per storm (1000)")
    p.add_argument("--window", type=float, default=10.0, help="arrival window, s (10)")
    p.add_argument("--rounds", type=int, default=3, help="storms per setup; medians (3)")
    p.add_argument("--baseline", type=int, default=20, help="one-at-a-time enrollments (20)")
    p.add_argument(
        "--retry-deadline",
        type=float,
        default=300.0,
        help="seconds the retrying agents keep trying on the default server (300; 0: skip)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="per request timeout, s (60)")
    p.add_argument("--tmpdir", default=None, help="where the temporary CA homes go")
    args = p.parse_args(argv)
    if not 1 <= args.agents <= 5000 or not 0.1 <= args.window <= 120:
        p.error("--agents must be 1..5000 and --window 0.1..120 s")
    if not 1 <= args.rounds <= 10 or not 0 <= args.baseline <= 200:
        p.error("--rounds must be 1..10 and --baseline 0..200")
    if not 0 <= args.retry_deadline <= 900:
        p.error("--retry-deadline must be 0..900 s")
    return args


@dataclass(frozen=True)
class Agent:
    spiffe_id: str
    token: str
    body: bytes


@dataclass
class Storm:
    latencies: list[float] = field(default_factory=list)  # successes only
    finished: list[float] = field(default_factory=list)  # success times after the start
    failures: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    refused_429: int = 0
    samples: list[tuple[str, bytes]] = field(default_factory=list)
    server_cpu: float = 0.0
    machine_busy: float = 0.0
    wall: float = 0.0


def make_agents(home: Path, count: int, tag: str) -> list[Agent]:
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        agents = []
        for i in range(count):
            sid = f"spiffe://{TRUST_DOMAIN}/ns/storm/sa/{tag}-{i}"
            token = ca.create_join_token(sid, ttl=timedelta(hours=1), actor="bench")
            body = json.dumps({"token": token, "csr": csr_pem(sid)}).encode()
            agents.append(Agent(sid, token, body))
    return agents


async def enroll_once(
    port: int, ctx: Any, body: bytes, timeout: float
) -> tuple[int, bytes, dict[str, str]]:
    """One enrollment on a new connection: (status, body, headers)."""
    conn = RawConnection(HOST, port, ctx)
    try:
        await asyncio.wait_for(conn.connect(), timeout)
        status, answer = await asyncio.wait_for(conn.post("/v1/enroll", body), timeout)
        return status, answer, conn.headers
    finally:
        await conn.close()


async def storm(
    server: Server,
    bundle: Path,
    agents: list[Agent],
    window: float,
    *,
    retry_until: float = 0.0,
    timeout: float = 60.0,
) -> Storm:
    """Run one storm; ``retry_until`` > 0 makes agents retry 429s until that many s."""
    port = int(server.url.rsplit(":", 1)[1])
    ctx = client_ssl(bundle)
    out = Storm()
    rng = random.Random(7)
    offsets = [rng.uniform(0, window) for _ in agents]
    t0 = time.monotonic() + 0.5
    meter = CPUMeter({"server": server.pid})

    async def one(agent: Agent, offset: float) -> None:
        await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            out.attempts += 1
            try:
                status, answer, headers = await enroll_once(port, ctx, agent.body, timeout)
            except (OSError, ConnectionError, TimeoutError) as exc:
                out.failures[type(exc).__name__] += 1
                return
            now = time.monotonic()
            if status == 201:
                out.latencies.append(now - start)
                out.finished.append(now - t0)
                if len(out.samples) < 5:
                    out.samples.append((agent.spiffe_id, answer))
                return
            if status == 429:
                out.refused_429 += 1
                wait = float(headers.get("retry-after", "1"))
                if retry_until and now - t0 + wait < retry_until:
                    await asyncio.sleep(wait * (1 + rng.random()))
                    continue
            out.failures[f"HTTP {status}"] += 1
            return

    await asyncio.gather(*(one(a, o) for a, o in zip(agents, offsets, strict=True)))
    cpu = meter.stop()
    out.server_cpu = cpu["server"]
    out.machine_busy = cpu["machine"] / cpu["wall"]
    out.wall = cpu["wall"]
    return out


async def sequential(
    server: Server, bundle: Path, agents: list[Agent], timeout: float
) -> list[float]:
    port = int(server.url.rsplit(":", 1)[1])
    ctx = client_ssl(bundle)
    latencies = []
    for agent in agents:
        start = time.monotonic()
        status, answer, _ = await enroll_once(port, ctx, agent.body, timeout)
        if status != 201:
            raise AssertionError(f"baseline enrollment answered {status}: {answer[:200]!r}")
        latencies.append(time.monotonic() - start)
        await asyncio.sleep(0.05)
    return latencies


def check(home: Path, result: Storm, expected_recorded: int) -> None:
    with CertificateAuthority.open(home) as ca:
        recorded = ca.store.count_certificates() - 1  # the server's own certificate
        if recorded != expected_recorded:
            raise AssertionError(
                f"{expected_recorded} enrollments answered 201, {recorded} recorded"
            )
        for sid, answer in result.samples:
            doc = json.loads(answer)
            cert = x509.load_pem_x509_certificate(doc["certificate"].encode())
            got = verify_chain(cert, [ca.intermediate], list(ca.bundle), usage="client")
            if str(got) != sid:
                raise AssertionError(f"{sid} got a certificate for {got}")
        report = ca.verify_audit()
        if not report.ok:
            raise AssertionError(f"audit chain: {report}")


def describe(label: str, r: Storm, agents: int) -> None:
    fails = sum(r.failures.values())
    print(
        f"    {label}: {len(r.latencies)}/{agents} enrolled, {fails} failed "
        f"{dict(r.failures) or ''}; {r.attempts} attempts, {r.refused_429} answered 429; "
        f"p50 {ms(percentile(r.latencies, 50))} ms p99 {ms(percentile(r.latencies, 99))} ms; "
        f"last success at {max(r.finished, default=float('nan')):.1f} s; server CPU "
        f"{r.server_cpu:.1f} s, machine busy {r.machine_busy:.2f} of 2 cores; load {loadavg()}"
    )


def summarize(name: str, rounds: list[Storm], agents: int) -> dict[str, float]:
    ok = [len(r.latencies) for r in rounds]
    fails = [sum(r.failures.values()) for r in rounds]
    p50 = [percentile(r.latencies, 50) for r in rounds]
    p99 = [percentile(r.latencies, 99) for r in rounds]
    done = [max(r.finished, default=float("nan")) for r in rounds]
    cpu = [r.server_cpu / max(len(r.latencies), 1) for r in rounds]
    per_attempt = [r.server_cpu / max(r.attempts, 1) for r in rounds]
    row = {
        "ok": median_or_nan(ok),
        "fails": float(sum(fails)),
        "p50": median_or_nan(p50),
        "p99": median_or_nan(p99),
        "done": median_or_nan(done),
        "cpu": median_or_nan(cpu),
        "r429": median_or_nan([r.refused_429 for r in rounds]),
        "attempts": median_or_nan([r.attempts for r in rounds]),
    }
    print(f"  {name} (medians over {len(rounds)} storm(s))")
    print(f"    enrolled        {row['ok']:8.0f} of {agents}  {spread(ok)}")
    print(f"    failed          {row['fails']:8.0f} in total  {spread(fails)}")
    print(
        f"    p50 latency     {ms(row['p50']):>8} ms  {spread([x * 1000 for x in p50], '{:.1f}')}"
    )
    print(
        f"    p99 latency     {ms(row['p99']):>8} ms  {spread([x * 1000 for x in p99], '{:.1f}')}"
    )
    print(f"    completion      {row['done']:8.1f} s   {spread(done, '{:.1f}')}  (last success)")
    print(
        f"    attempts {row['attempts']:.0f}, answered 429 {row['r429']:.0f}; server CPU per "
        f"attempt {median_or_nan(per_attempt) * 1000:.1f} ms, per enrollment (refusals "
        f"included) {row['cpu'] * 1000:.1f} ms"
    )
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print(
        f"enroll_storm: {args.agents} agents, uniform arrivals over {args.window:g} s, one new "
        f"connection each, all from 127.0.0.1; {args.rounds} storm(s) per setup"
    )
    print(f"load average at start: {loadavg()}\n")
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="tm-bench-storm-", dir=args.tmpdir) as tmp_name:
        tmp = Path(tmp_name)

        # -- raised limits (in-process app), with the one-at-a-time baseline first
        raised: list[Storm] = []
        base: list[float] = []
        for r in range(args.rounds):
            home = tmp / f"raised-{r}"
            bundle = init_home(home, None)
            agents = make_agents(home, args.agents + (args.baseline if r == 0 else 0), f"r{r}")
            with inprocess_serve(home, bundle, RAISED) as server:
                if r == 0 and args.baseline:
                    base = asyncio.run(
                        sequential(server, bundle, agents[-args.baseline :], args.timeout)
                    )
                    agents = agents[: -args.baseline]
                    print(
                        f"  baseline: {args.baseline} enrollments one at a time, idle server: "
                        f"p50 {ms(percentile(base, 50))} ms, p99 {ms(percentile(base, 99))} ms"
                    )
                result = asyncio.run(
                    storm(server, bundle, agents, args.window, timeout=args.timeout)
                )
            describe(f"raised limits, storm {r + 1}", result, args.agents)
            check(home, result, len(result.latencies) + (args.baseline if r == 0 else 0))
            raised.append(result)

        # -- defaults (`ca serve`), no retries
        defaults: list[Storm] = []
        for r in range(args.rounds):
            home = tmp / f"defaults-{r}"
            bundle = init_home(home, None)
            agents = make_agents(home, args.agents, f"d{r}")
            with ca_serve(home, bundle, tmp / f"defaults-{r}.log", admins=()) as server:
                result = asyncio.run(
                    storm(server, bundle, agents, args.window, timeout=args.timeout)
                )
            describe(f"defaults, no retries, storm {r + 1}", result, args.agents)
            check(home, result, len(result.latencies))
            defaults.append(result)

        # -- defaults, agents retrying after Retry-After
        retried: list[Storm] = []
        if args.retry_deadline:
            home = tmp / "defaults-retry"
            bundle = init_home(home, None)
            agents = make_agents(home, args.agents, "dr")
            with ca_serve(home, bundle, tmp / "defaults-retry.log", admins=()) as server:
                result = asyncio.run(
                    storm(
                        server,
                        bundle,
                        agents,
                        args.window,
                        retry_until=args.retry_deadline,
                        timeout=args.timeout,
                    )
                )
            describe("defaults, Retry-After retries", result, args.agents)
            check(home, result, len(result.latencies))
            retried.append(result)

    print()
    if base:
        print(f"  baseline (one at a time, idle): p50 {ms(percentile(base, 50))} ms\n")
    rows["raised"] = summarize("raised per-IP limit (1000/s, burst 1000)", raised, args.agents)
    rows["defaults"] = summarize(
        "defaults (5/s, burst 20 per IP), no retries", defaults, args.agents
    )
    if retried:
        rows["retry"] = summarize(
            f"defaults, agents retry after Retry-After (until {args.retry_deadline:g} s)",
            retried,
            args.agents,
        )
    if base:
        b = percentile(base, 50)
        ra = rows["raised"]
        print(
            f"\n  ratios to the idle one-at-a-time p50 ({ms(b)} ms): raised storm p50 "
            f"{ra['p50'] / b:.1f}x, p99 {ra['p99'] / b:.1f}x"
        )
    for key, label in (
        ("raised", "raised limit"),
        ("defaults", "defaults"),
        ("retry", "defaults + retries"),
    ):
        if key in rows:
            row = rows[key]
            ok = row["fails"] == 0 and row["ok"] == args.agents
            print(
                f"  {label}: zero failures, all {args.agents} enrolled: {verdict(ok)}; completion "
                f"{row['done']:.1f} s; p99 {ms(row['p99'])} ms"
            )
    print(f"\nload average at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
