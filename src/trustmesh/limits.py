"""Token-bucket rate limits (in memory, per process)."""

from __future__ import annotations

import threading
import time

__all__ = ["RateLimiter"]


class RateLimiter:
    """Per-key token buckets: ``rate`` tokens per second, up to ``burst``.

    Args:
        rate: Refill rate per second.
        burst: Bucket size.
        max_keys: Buckets kept at most (oldest dropped), bounding memory.
    """

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str, *, now: float | None = None) -> float:
        """Take one token for ``key``; return 0 if allowed, else seconds to wait."""
        current = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.burst), current))
            tokens = min(self.burst, tokens + (current - last) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, current)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, current)
                wait = (1 - tokens) / self.rate
            if len(self._buckets) > self.max_keys:
                self._buckets.pop(next(iter(self._buckets)))
            return wait
