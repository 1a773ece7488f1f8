"""Token-bucket rate limits per key: in memory, or shared by several gateways in Redis.

With Redis every bucket is one hash updated by an atomic Lua script (loaded once, then
called by SHA) that uses the Redis server's clock, so gateways with skewed clocks share
buckets correctly; each key expires once its bucket would be full again. When Redis
errors or does not answer within its short socket timeouts, the gateway falls back to
its own in-memory buckets: it keeps limiting (each instance on its own) rather than
failing open or refusing everyone. The outage is logged once (``ratelimit_redis_down``),
Redis is tried again at most every ``retry_interval`` seconds, and the recovery is logged
once (``ratelimit_redis_up``).

redis-py is imported only when a Redis URL is configured (``pip install 'trustmesh[redis]'``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from trustmesh.errors import ConfigError
from trustmesh.limits import RateLimiter

if TYPE_CHECKING:  # pragma: no cover
    from redis.asyncio import Redis

__all__ = ["DEFAULT_PREFIX", "Rate", "RateLimits"]

log = logging.getLogger("trustmesh.gateway")

#: Redis keys are ``{prefix}:rl:{key}``.
DEFAULT_PREFIX = "trustmesh:gateway"
#: Redis socket and connect timeout (seconds): a slow Redis must not slow requests.
DEFAULT_REDIS_TIMEOUT = 0.1
#: Redis connections per gateway instance.
DEFAULT_REDIS_CONNECTIONS = 8
#: While Redis is down, try it again at most this often (seconds).
DEFAULT_RETRY_INTERVAL = 3.0

# KEYS[1]: the bucket. ARGV: rate (tokens/s), burst. Returns the wait in seconds as a
# string (Lua numbers become integers in replies). TIME is allowed in scripts since
# Redis 5 (effects replication); replicate_commands() is needed before 7 only.
_BUCKET_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 't', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
local elapsed = now - at
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 't', string.format('%.6f', tokens), 'at', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return string.format('%.6f', wait)
"""


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` at once.

    Raises:
        ValueError: ``rate`` is not positive or ``burst`` is below 1.
    """

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, int | float) and math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(
                f"rate must be a positive number of requests per second, got {self.rate!r}"
            )
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"burst must be a whole number of requests >= 1, got {self.burst!r}")


def _redacted(url: str) -> str:
    """The URL without its password (safe to log and to show in errors)."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _no_setinfo() -> dict[str, None]:
    # No CLIENT SETINFO round trips on each new connection (they slow every connect):
    # redis-py >= 7 spells it driver_info=None, 5 and 6 lib_name/lib_version=None.
    try:
        import redis.driver_info  # noqa: F401
    except ImportError:
        return {"lib_name": None, "lib_version": None}
    return {"driver_info": None}


def _redis_client(url: str, timeout: float, connections: int) -> Redis:
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"redis: {_redacted(url)!r} is not a Redis URL; write redis://HOST:6379/0 "
            f"(rediss:// for TLS, unix:///path/to/socket).",
            field="redis",
        )
    try:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError:
        raise ConfigError(
            "redis: is configured but the redis package is not installed. Install it with "
            "pip install 'trustmesh[redis]', or remove redis: to keep rate limits in memory.",
            field="redis",
        ) from None
    try:
        # A bounded pool: a burst of requests waits (briefly) for a connection instead of
        # opening hundreds at once; a take is one round trip, so a few connections suffice.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=connections,
            timeout=None,  # waiting for a free connection is bounded by take()
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # no retries: the local fallback answers at once
            health_check_interval=0,
            decode_responses=False,
            **_no_setinfo(),
        )
    except ValueError as exc:
        raise ConfigError(
            f"redis: {_redacted(url)!r} is not usable: {exc}", field="redis"
        ) from None
    return Redis.from_pool(pool)


class RateLimits:
    """Take tokens from per-key buckets (Redis when configured, else in memory).

    Create it inside the event loop that uses it; close it with :meth:`aclose`.

    Args:
        redis_url: ``redis://``/``rediss://``/``unix://`` URL; None keeps buckets in memory.
        prefix: Namespace of the Redis keys (one per gateway deployment).
        timeout: Redis socket and connect timeout in seconds.
        retry_interval: While Redis is down, how often it is tried again.
        connections: Redis connections at most (requests beyond wait for one, within
            ``timeout``).
        max_keys: In-memory buckets kept per rate (oldest dropped).

    Raises:
        ConfigError: The URL is not a Redis URL, or redis-py is not installed.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_REDIS_TIMEOUT,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        connections: int = DEFAULT_REDIS_CONNECTIONS,
        max_keys: int = 100_000,
    ) -> None:
        self._local: dict[Rate, RateLimiter] = {}
        self._max_keys = max_keys
        self._prefix = prefix + ":rl:"
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._url = _redacted(redis_url) if redis_url else None
        self._redis: Redis | None = None
        self._script: Any = None
        self._down_since: float | None = None
        self._retry_at = 0.0
        #: Takes answered locally because the process was too busy to wait for Redis.
        self.busy_fallbacks = 0
        if redis_url:
            self._redis = _redis_client(redis_url, timeout, connections)
            self._script = self._redis.register_script(_BUCKET_SCRIPT)

    @property
    def shared(self) -> bool:
        """Whether buckets are in Redis right now (False in memory or during an outage)."""
        return self._redis is not None and self._down_since is None

    async def take(self, key: str, rate: Rate) -> float:
        """Take one token from ``key``'s bucket.

        Args:
            key: What is limited, e.g. ``ip:203.0.113.9`` or ``client:orders-ui``.
            rate: The bucket's rate and burst.

        Returns:
            0.0 when allowed, else the seconds until a token is available (Retry-After).
        """
        if self._redis is not None:
            if self._down_since is None:
                return await self._take_shared(key, rate)
            now = time.monotonic()
            if now >= self._retry_at:
                self._retry_at = now + self._retry_interval  # one probe at a time
                return await self._take_shared(key, rate)
        return self._take_local(key, rate)

    def _take_local(self, key: str, rate: Rate) -> float:
        limiter = self._local.get(rate)
        if limiter is None:
            limiter = self._local[rate] = RateLimiter(
                rate.rate, rate.burst, max_keys=self._max_keys
            )
        return limiter.allow(key)

    async def _take_shared(self, key: str, rate: Rate) -> float:
        started = time.monotonic()
        try:
            # The socket timeouts bound each connect and read (a dead or hung Redis);
            # this bounds the whole call, including the wait for a pooled connection.
            async with asyncio.timeout(self._timeout * 3):
                reply = await self._script(keys=[self._prefix + key], args=[rate.rate, rate.burst])
            wait = float(reply)
        except TimeoutError:
            # Our own bound (redis-py's socket timeouts raise redis.TimeoutError, below):
            # this process is too busy to wait for a connection. Answer from the local
            # bucket without declaring Redis down.
            self.busy_fallbacks += 1
            return self._take_local(key, rate)
        except Exception as exc:  # any Redis failure means: use local buckets
            self._redis_failed(exc)
            return self._take_local(key, rate)
        if self._down_since is not None and started >= self._down_since:
            # Only a call made after the failure proves recovery; one already in flight
            # when another failed does not (no down/up flapping in the log).
            self._redis_recovered()
        return wait

    def _redis_failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._retry_at = now + self._retry_interval
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "rate limits: Redis %s failed (%s); using in-memory buckets on this instance "
                "until it answers again (retried every %g s)",
                self._url,
                type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}",
                self._retry_interval,
                extra={"event": "ratelimit_redis_down", "redis": self._url},
            )

    def _redis_recovered(self) -> None:
        assert self._down_since is not None  # noqa: S101 - only called while down
        outage = time.monotonic() - self._down_since
        self._down_since = None
        log.warning(
            "rate limits: Redis %s answers again after %.1f s; buckets are shared again",
            self._url,
            outage,
            extra={"event": "ratelimit_redis_up", "redis": self._url, "outage_seconds": outage},
        )

    async def aclose(self) -> None:
        """Close the Redis connections."""
        if self._redis is not None:
            await self._redis.aclose()
