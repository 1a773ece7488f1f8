"""60 s of steady traffic through the gateway with valid and invalid tokens mixed.

An asyncio client offers RATE requests per second for DURATION seconds over keep-alive
connections to a protected route in front of the echo upstream. Each request starts on its
schedule whether or not earlier ones have finished, with at most IN_FLIGHT at once: if the
gateway falls that far behind, the schedule waits, so a loaded machine sends fewer
requests in the same time (the count is printed). The tokens rotate through valid ones
and every kind of refusal (missing, expired, forged, another audience, too little scope).
Each answer must be what its token deserves: 200 from the upstream, or the gateway's
401/403 with the expected reason; anything else (a 5xx, a 429, a transport error, a wrong
reason) is an error. The gateway's access log must count the same.

Memory: the gateway's VmRSS is read from /proc/PID/status every 5 s. After a 10 s warm-up
the median of the last quarter of the samples must stay within max(+25 %, +20 MB) of the
median of the first quarter: generous, so only a real leak (memory growing with requests)
fails it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ._gateway_stack import Stack, running_stack

pytestmark = pytest.mark.slow

RATE = 100  # requests per second
DURATION = 60.0  # seconds
SAMPLE_EVERY = 5.0  # seconds between RSS samples
WARM_UP = 10.0  # seconds of samples not counted
GROWTH = 0.25  # allowed growth of the median RSS, last quarter vs first quarter...
SLACK = 20 * 1024 * 1024  # ...or this many bytes, whichever is larger
PATH = "/api/load"
IN_FLIGHT = 32  # requests (and keep-alive connections) at once, at most


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("gw-load")) as s:
        yield s


def rss(pid: int) -> int:
    """Resident memory of PID in bytes (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def test_steady_mixed_traffic_has_only_the_expected_denies_and_flat_memory(
    stack: Stack,
) -> None:
    lots = {"rate": RATE * 10, "burst": RATE * 20}  # the limits are not under test here
    route = stack.route("/api", "echo", auth={"scopes": ["orders:read"]})
    config = stack.config([route], rate_limits={"per_ip": lots, "per_client": lots})
    config["access_log"] = True
    gateway = stack.start_gateway(config, label="gw-load")
    pid = stack.mesh.named["gw-load"].pid

    valid = [stack.machine_token(scope="orders:read") for _ in range(3)]
    valid.append(stack.user_token())
    kinds: dict[str, tuple[str | None, int, str]] = {
        "valid": (None, 200, "allowed"),
        "missing": (None, 401, "token_missing"),
        "expired": (stack.expired(valid[0]), 401, "expired"),
        "forged": (stack.forged(valid[1]), 401, "bad_signature"),
        "audience": (stack.machine_token(stack.elsewhere), 401, "bad_audience"),
        "scope": (stack.machine_token(scope="profile"), 403, "insufficient_scope"),
    }
    # 4 valid requests for each refused one of each kind
    plan = ["valid"] * 4 + ["missing", "expired", "forged", "audience", "scope"]
    outcomes: Counter[tuple[str, int, str]] = Counter()
    errors: list[str] = []
    samples: list[tuple[float, int]] = []
    sent: list[int] = []

    async def one(http: httpx.AsyncClient, i: int) -> None:
        kind = plan[i % len(plan)]
        token, status, reason = kinds[kind]
        if kind == "valid":
            token = valid[i % len(valid)]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            answer = await http.get(PATH, headers=headers)
        except httpx.HTTPError as exc:
            errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            return
        got = "allowed" if answer.status_code == 200 else answer.json().get("reason", "?")
        outcomes[(kind, answer.status_code, got)] += 1
        if (answer.status_code, got) != (status, reason):
            errors.append(f"{kind}: {answer.status_code} {got}: {answer.text[:200]}")

    async def sample(stop: asyncio.Event) -> None:
        start = time.monotonic()
        while not stop.is_set():
            samples.append((time.monotonic() - start, rss(pid)))
            try:
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)
            except TimeoutError:
                pass
        samples.append((time.monotonic() - start, rss(pid)))

    async def run() -> float:
        limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
        async with gateway.async_http(limits=limits, timeout=30) as http:
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample(stop))
            slots = asyncio.Semaphore(IN_FLIGHT)

            async def limited(i: int) -> None:
                try:
                    await one(http, i)
                finally:
                    slots.release()

            start = time.monotonic()
            tasks: list[asyncio.Task[None]] = []
            while time.monotonic() - start < DURATION:
                delay = start + len(tasks) / RATE - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await slots.acquire()  # a slow gateway delays the schedule, never queues
                tasks.append(asyncio.create_task(limited(len(tasks))))
            sent.append(len(tasks))
            await asyncio.gather(*tasks)
            elapsed = time.monotonic() - start
            stop.set()
            await sampler
            return elapsed

    elapsed = asyncio.run(run())
    (total,) = sent
    summary = f"{total} requests in {elapsed:.0f} s: {dict(outcomes)}; RSS samples {samples}"
    print(summary)  # the rate reached on this machine, shown with -s
    assert not errors, f"{len(errors)} unexpected answers, first: {errors[:5]}\n{summary}"
    assert sum(outcomes.values()) == total, summary
    for kind, (_, status, reason) in kinds.items():
        assert outcomes[(kind, status, reason)] > 0, summary

    # the access log has one decision per request, with the same reasons
    logged = Counter(str(e["reason"]) for e in gateway.decisions(PATH))
    answered: Counter[str] = Counter()
    for (_, _, reason), count in outcomes.items():
        answered[reason] += count
    assert logged == answered, f"log {dict(logged)} vs answers {dict(answered)}"

    counted = [value for at, value in samples if at >= WARM_UP]
    quarter = max(1, len(counted) // 4)
    first, last = statistics.median(counted[:quarter]), statistics.median(counted[-quarter:])
    bound = max(first * (1 + GROWTH), first + SLACK)
    assert last <= bound, f"RSS grew from {first / 2**20:.1f} MB to {last / 2**20:.1f} MB"
    gateway.stop()
