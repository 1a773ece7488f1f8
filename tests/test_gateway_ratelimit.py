"""Gateway rate limits: token buckets in memory and in the real Redis, and the fallback.

Redis outages are simulated with a small TCP forwarder between the limiter and the
real Redis, stopped and restarted by the test (the machine's Redis keeps running).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

import pytest
import redis

from trustmesh.errors import ConfigError
from trustmesh.gateway._ratelimit import Rate, RateLimits

from ._server import free_port

T = TypeVar("T")
# Tests about sharing give Redis time on a loaded machine; the fallback tests keep 0.1 s.
SLACK = 2.0


def run(make: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(make())  # type: ignore[arg-type]


def prefix() -> str:
    return f"trustmesh-test:{uuid.uuid4().hex}"


def events(caplog: pytest.LogCaptureFixture, name: str) -> int:
    return sum(1 for r in caplog.records if getattr(r, "event", None) == name)


class Forwarder:
    """A TCP forwarder on 127.0.0.1 to ``target``; stop() cuts every connection."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()
        self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()
                self.writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "burst", "message"),
    [
        (0, 1, "rate must be a positive"),
        (-1.0, 1, "rate must be a positive"),
        (float("nan"), 1, "rate must be a positive"),
        (1, 0, "burst must be a whole number"),
        (1, 2.5, "burst must be a whole number"),
        (1, True, "burst must be a whole number"),
    ],
)
def test_rate_is_validated(rate: float, burst: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Rate(rate, burst)


def test_bad_urls_and_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="is not a Redis URL"):
        RateLimits("http://127.0.0.1:6379")
    with pytest.raises(ConfigError) as info:
        RateLimits("redis://user:hunter2@127.0.0.1:6379:x/0")
    assert "hunter2" not in str(info.value)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)  # as if redis-py were absent
    with pytest.raises(ConfigError, match=r"pip install 'trustmesh\[redis\]'"):
        RateLimits("redis://127.0.0.1:6379/0")
    RateLimits(None)  # in memory needs no package


# -- in memory ---------------------------------------------------------------------------------


def test_local_burst_then_refusal() -> None:
    async def scenario() -> None:
        limits = RateLimits()
        rate = Rate(1, 3)
        assert [await limits.take("ip:1", rate) for _ in range(3)] == [0.0, 0.0, 0.0]
        wait = await limits.take("ip:1", rate)
        assert 0.0 < wait <= 1.0
        assert await limits.take("ip:2", rate) == 0.0  # another key, another bucket
        assert await limits.take("ip:1", Rate(5, 1)) == 0.0  # another rate, another bucket
        assert not limits.shared
        await limits.aclose()

    run(scenario)


# -- Redis ---------------------------------------------------------------------------------------


def test_two_instances_share_one_bucket(redis_url: str) -> None:
    key = "client:orders-ui"
    pre = prefix()

    async def scenario() -> list[float]:
        a, b = (
            RateLimits(redis_url, prefix=pre, timeout=SLACK),
            RateLimits(redis_url, prefix=pre, timeout=SLACK),
        )
        try:
            rate = Rate(2, 3)
            waits = [await a.take(key, rate), await b.take(key, rate), await a.take(key, rate)]
            waits += [await b.take(key, rate), await a.take(key, rate)]
            assert a.shared
            assert b.shared
            return waits
        finally:
            await a.aclose()
            await b.aclose()

    waits = run(scenario)
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert 0.0 < waits[3] <= 0.5  # 2 tokens/s: at most half a second to the next
    assert 0.0 < waits[4] <= 0.5
    with redis.Redis.from_url(redis_url) as r:
        bucket = f"{pre}:rl:{key}".encode()
        assert r.exists(bucket)
        ttl = r.pttl(bucket)
        assert 0 < ttl <= 3 / 2 * 1000 + 1000  # expires once it would be full again
        assert set(r.hgetall(bucket)) == {b"t", b"at"}
        r.delete(bucket)


def test_refusals_are_atomic_under_concurrency(redis_url: str) -> None:
    """Fifty concurrent takes from three instances on a burst of ten: exactly ten pass."""
    pre = prefix()

    async def scenario() -> list[float]:
        limiters = [RateLimits(redis_url, prefix=pre, timeout=SLACK) for _ in range(3)]
        try:
            rate = Rate(0.01, 10)
            takes = [limiters[i % 3].take("ip:203.0.113.9", rate) for i in range(50)]
            return list(await asyncio.gather(*takes))
        finally:
            for limiter in limiters:
                await limiter.aclose()

    waits = run(scenario)
    assert sum(1 for w in waits if w == 0.0) == 10
    assert all(0 < w <= 100 for w in waits if w)


def test_script_is_loaded_once_and_called_by_sha(redis_url: str) -> None:
    pre = prefix()

    async def scenario() -> str:
        limits = RateLimits(redis_url, prefix=pre, timeout=SLACK)
        try:
            await limits.take("k", Rate(1, 1))
            await limits.take("k", Rate(1, 1))
            return str(limits._script.sha)
        finally:
            await limits.aclose()

    sha = run(scenario)
    with redis.Redis.from_url(redis_url) as r:
        assert r.script_exists(sha) == [True]
        r.delete(f"{pre}:rl:k")


def test_closed_port_falls_back_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "trustmesh.gateway")

    async def scenario() -> None:
        limits = RateLimits(f"redis://:secret@127.0.0.1:{free_port()}/15", prefix=prefix())
        try:
            rate = Rate(1, 2)
            assert await limits.take("ip:1", rate) == 0.0
            assert not limits.shared
            assert await limits.take("ip:1", rate) == 0.0
            assert await limits.take("ip:1", rate) > 0.0  # still limited, locally
        finally:
            await limits.aclose()

    run(scenario)
    assert events(caplog, "ratelimit_redis_down") == 1
    assert "secret" not in caplog.text


@pytest.mark.slow
def test_redis_outage_and_recovery(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "trustmesh.gateway")
    target = urlsplit(redis_url)
    pre = prefix()

    async def scenario() -> None:
        forwarder = Forwarder(target.hostname or "127.0.0.1", target.port or 6379)
        await forwarder.start()
        url = f"redis://127.0.0.1:{forwarder.port}{target.path or '/15'}"
        limits = RateLimits(url, prefix=pre, retry_interval=0.3, timeout=SLACK)
        direct = RateLimits(redis_url, prefix=pre, timeout=SLACK)
        rate = Rate(0.01, 3)
        try:
            assert await limits.take("ip:9", rate) == 0.0
            assert limits.shared
            await forwarder.stop()  # Redis "goes down" mid-test
            assert await limits.take("ip:9", rate) == 0.0  # local bucket: full
            assert not limits.shared
            for _ in range(20):  # many requests during the outage: one log line
                await limits.take("ip:other", rate)
            assert events(caplog, "ratelimit_redis_down") == 1
            await asyncio.sleep(0.4)
            assert await limits.take("ip:x", rate) == 0.0  # a probe, still down: no new log
            assert events(caplog, "ratelimit_redis_down") == 1
            await forwarder.start()  # back on the same port
            await asyncio.sleep(0.4)
            # The shared bucket saw one take before the outage: two tokens left.
            assert await limits.take("ip:9", rate) == 0.0
            assert limits.shared
            assert events(caplog, "ratelimit_redis_up") == 1
            assert await direct.take("ip:9", rate) == 0.0
            assert await limits.take("ip:9", rate) > 0.0  # the shared burst of 3 is spent
            assert events(caplog, "ratelimit_redis_up") == 1
        finally:
            await limits.aclose()
            await direct.aclose()
            if forwarder.server is not None:
                await forwarder.stop()

    run(scenario)
    with redis.Redis.from_url(redis_url) as r:
        for key in r.scan_iter(f"{pre}:*"):
            r.delete(key)


def test_redis_that_never_answers_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    """A Redis that accepts and then hangs costs one short timeout, then local buckets."""
    caplog.set_level(logging.WARNING, "trustmesh.gateway")

    async def scenario() -> None:
        held: list[asyncio.StreamWriter] = []

        async def black_hole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)
            await reader.read()  # swallow everything, answer nothing

        server = await asyncio.start_server(black_hole, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        # timeout 0.5 rather than 0.1: on a loaded machine the connect alone could take
        # two socket timeouts and our own bound (3x) would answer first, as "busy".
        url = f"redis://127.0.0.1:{port}/15"
        limits = RateLimits(url, prefix=prefix(), retry_interval=60, timeout=0.5)
        try:
            rate = Rate(1, 1)
            assert await limits.take("ip:1", rate) == 0.0
            assert not limits.shared
            assert await limits.take("ip:1", rate) > 0.0
        finally:
            await limits.aclose()
            for writer in held:
                writer.close()
            server.close()
            await server.wait_closed()

    run(scenario)
    assert events(caplog, "ratelimit_redis_down") == 1
    assert "TimeoutError" in caplog.text
