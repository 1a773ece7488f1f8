"""Alerts on repeated denies: N refusals from one source within T seconds.

Every refusal the gateway answers is recorded against its sources (``ip:203.0.113.9``,
``client:orders-ui``). When a source reaches the rule's threshold inside the sliding
window, an alert fires: a ``gateway_alert`` warning is logged, a JSON webhook is queued,
and the source may be blocked for ``block_for`` seconds (the gateway then refuses it
before any other check). The webhook is sent by a background task through a bounded
queue with a timeout: a slow or dead receiver costs requests nothing, and its failures
are logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
from collections import Counter, deque
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["AlertRule", "Alerts"]

log = logging.getLogger("trustmesh.gateway")

#: Webhook POSTs waiting to be sent at most; more alerts than this are logged, not sent.
DEFAULT_QUEUE_SIZE = 1000
#: Per webhook POST, connect to answer.
DEFAULT_WEBHOOK_TIMEOUT = 5.0
#: Sources tracked at most (the oldest are forgotten first).
DEFAULT_MAX_SOURCES = 100_000


@dataclass(frozen=True, slots=True)
class AlertRule:
    """When to alert: ``threshold`` denies from one source within ``window`` seconds.

    Attributes:
        threshold: Denies that fire an alert (>= 1).
        window: The sliding window in seconds (> 0).
        block_for: Refuse the source for this many seconds after an alert (0: never).
        webhook: ``https://`` URL receiving a JSON POST per alert (``http://`` is logged).

    Raises:
        ValueError: A value is out of range; the message says which and what is allowed.
    """

    threshold: int
    window: float
    block_for: float = 0.0
    webhook: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int):
            raise ValueError(
                f"alerts.threshold must be a whole number >= 1, got {self.threshold!r}"
            )
        if self.threshold < 1:
            raise ValueError(
                f"alerts.threshold must be a whole number >= 1, got {self.threshold!r}"
            )
        if not _positive(self.window):
            raise ValueError(f"alerts.window must be a positive duration, got {self.window!r}")
        if not (_positive(self.block_for) or self.block_for == 0):
            raise ValueError(
                f"alerts.block_for must be 0 or a positive duration, got {self.block_for!r}"
            )
        if self.webhook is not None:
            parts = urlsplit(self.webhook)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ValueError(
                    f"alerts.webhook {self.webhook!r} is not an http(s) URL; write "
                    f"https://host/path"
                )


def _positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


class Alerts:
    """Count denies per source, fire alerts, block sources, send webhooks.

    Args:
        rule: The alert rule.
        gateway_id: Put in every webhook payload (``gateway_id``), e.g. the gateway's
            SPIFFE ID, so receivers know which instance alerted.
        ssl_context: Verifies the webhook's HTTPS certificate (default: system CAs).
        timeout: Seconds per webhook POST.
        queue_size: Webhooks waiting at most; beyond it alerts are logged only.
        max_sources: Sources tracked at most.
    """

    def __init__(
        self,
        rule: AlertRule,
        *,
        gateway_id: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = DEFAULT_WEBHOOK_TIMEOUT,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_sources: int = DEFAULT_MAX_SOURCES,
    ) -> None:
        self.rule = rule
        self.gateway_id = gateway_id
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._queue_size = queue_size
        self._max_sources = max_sources
        self._denies: dict[str, deque[tuple[float, str]]] = {}
        self._blocked: dict[str, float] = {}
        self._queue: asyncio.Queue[dict[str, object]] | None = None
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        if rule.webhook is not None and urlsplit(rule.webhook).scheme == "http":
            log.warning(
                "alerts: webhook %s is plain HTTP: alert payloads travel unencrypted",
                rule.webhook,
            )

    # -- the hot path ---------------------------------------------------------------------

    def blocked_for(self, source: str, *, now: float | None = None) -> float:
        """Seconds ``source`` stays blocked; 0.0 when it is not blocked."""
        if not self._blocked:
            return 0.0
        until = self._blocked.get(source)
        if until is None:
            return 0.0
        left = until - (time.time() if now is None else now)
        if left > 0:
            return left
        del self._blocked[source]
        return 0.0

    def record_deny(self, source: str, reason: str, *, now: float | None = None) -> bool:
        """Count a refusal against ``source``; True when it fired an alert.

        Denies of a source that is blocked are not counted (the block already answers
        them). After an alert the source's count starts again from zero.
        """
        at = time.time() if now is None else now
        if self.blocked_for(source, now=at):
            return False
        events = self._denies.get(source)
        if events is None:
            if len(self._denies) >= self._max_sources:
                self._forget(at)
            events = self._denies[source] = deque()
        horizon = at - self.rule.window
        while events and events[0][0] <= horizon:
            events.popleft()
        events.append((at, reason))
        if len(events) < self.rule.threshold:
            return False
        self._fire(source, events, at)
        del self._denies[source]
        return True

    def _forget(self, at: float) -> None:
        horizon = at - self.rule.window
        stale = [s for s, events in self._denies.items() if not events or events[-1][0] <= horizon]
        for source in stale:
            del self._denies[source]
        while len(self._denies) >= self._max_sources:
            del self._denies[next(iter(self._denies))]

    def _fire(self, source: str, events: deque[tuple[float, str]], at: float) -> None:
        reasons = dict(sorted(Counter(reason for _, reason in events).items()))
        blocked_until = at + self.rule.block_for if self.rule.block_for > 0 else None
        if blocked_until is not None:
            if len(self._blocked) >= self._max_sources:
                self._blocked = {s: u for s, u in self._blocked.items() if u > at}
            self._blocked[source] = blocked_until
        count = len(events)
        log.warning(
            "gateway alert: %d denies from %s within %g s (%s)%s",
            count,
            source,
            self.rule.window,
            ", ".join(f"{r} x{n}" for r, n in reasons.items()),
            f"; blocked for {self.rule.block_for:g} s" if blocked_until is not None else "",
            extra={
                "event": "gateway_alert",
                "source": source,
                "count": count,
                "window": self.rule.window,
                "reasons": json.dumps(reasons),
                "blocked_until": blocked_until,
            },
        )
        if self.rule.webhook is None:
            return
        payload: dict[str, object] = {
            "event": "gateway_alert",
            "gateway_id": self.gateway_id,
            "source": source,
            "count": count,
            "window_seconds": self.rule.window,
            "reasons": reasons,
            "blocked_until": blocked_until,
            "time": at,
        }
        if self._queue is None:
            self.dropped += 1
            log.warning(
                "alerts: webhook not sent for %s: the sender is not running (start() not called)",
                source,
                extra={"event": "alert_webhook_dropped", "source": source},
            )
            return
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning(
                "alerts: webhook queue full (%d waiting); alert for %s logged only",
                self._queue_size,
                source,
                extra={"event": "alert_webhook_dropped", "source": source},
            )

    # -- the webhook sender ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the webhook sender (a no-op without a webhook or when started)."""
        if self.rule.webhook is None or self._task is not None:
            return
        self._queue = asyncio.Queue(maxsize=self._queue_size)
        self._task = asyncio.create_task(self._send_all(), name="gateway-alert-webhook")

    async def _send_all(self) -> None:
        import httpx

        assert self._queue is not None  # noqa: S101 - set by start()
        url = self.rule.webhook
        assert url is not None  # noqa: S101 - start() needs a webhook
        verify: ssl.SSLContext | bool = self._ssl_context or ssl.create_default_context()
        async with httpx.AsyncClient(
            verify=verify,
            timeout=self._timeout,
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": "trustmesh-gateway"},
        ) as client:
            while True:
                payload = await self._queue.get()
                try:
                    response = await client.post(url, json=payload)
                    if response.status_code >= 300:
                        raise RuntimeError(f"HTTP {response.status_code}")
                    self.sent += 1
                except Exception as exc:  # a webhook failure is logged, never raised
                    self.failed += 1
                    log.warning(
                        "alerts: webhook %s failed for %s: %s",
                        url,
                        payload["source"],
                        str(exc) or type(exc).__name__,
                        extra={"event": "alert_webhook_failed", "source": payload["source"]},
                    )
                finally:
                    self._queue.task_done()

    async def aclose(self, *, flush_timeout: float = 2.0) -> None:
        """Stop the sender, giving queued webhooks up to ``flush_timeout`` seconds."""
        task, queue = self._task, self._queue
        if task is None or queue is None:
            return
        if not task.done():
            try:
                await asyncio.wait_for(queue.join(), flush_timeout)
            except TimeoutError:
                log.warning(
                    "alerts: %d webhook(s) not sent before shutdown",
                    queue.qsize(),
                    extra={"event": "alert_webhook_dropped"},
                )
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        self._task = None
        self._queue = None
