"""Gateway alerts: sliding window per source, blocking, and the webhook sent by a
background task to a real local HTTPS server (and to receivers that are down or hang)."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.gateway._alerts import AlertRule, Alerts

from ._provider import ProviderServer, server_tls
from ._server import free_port

T = TypeVar("T")
T0 = 1_800_000_000.0


def run(make: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(make())  # type: ignore[arg-type]


async def until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for the background sender (no timing is asserted, only the outcome)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0, "window": 60}, "threshold must be a whole number >= 1"),
        ({"threshold": 2.5, "window": 60}, "threshold must be a whole number"),
        ({"threshold": 3, "window": 0}, "window must be a positive duration"),
        ({"threshold": 3, "window": 60, "block_for": -1}, "block_for must be 0 or a positive"),
        ({"threshold": 3, "window": 60, "webhook": "ftp://x/y"}, "not an http(s) URL"),
        ({"threshold": 3, "window": 60, "webhook": "hooks.example.org"}, "not an http(s) URL"),
    ],
)
def test_rule_is_validated(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AlertRule(**kwargs)  # type: ignore[arg-type]


def test_sliding_window_threshold_and_reasons(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "trustmesh.gateway")
    alerts = Alerts(AlertRule(threshold=3, window=60))
    src = "ip:203.0.113.9"
    assert not alerts.record_deny(src, "bad_signature", now=T0)
    assert not alerts.record_deny(src, "expired", now=T0 + 30)
    # the first deny leaves the window (60 s) before the third arrives
    assert not alerts.record_deny(src, "bad_signature", now=T0 + 61)
    assert not alerts.record_deny("ip:198.51.100.1", "ip_denied", now=T0 + 62)  # other source
    assert alerts.record_deny(src, "bad_signature", now=T0 + 70)
    record = next(r for r in caplog.records if getattr(r, "event", None) == "gateway_alert")
    assert record.source == src  # type: ignore[attr-defined]
    assert record.count == 3  # type: ignore[attr-defined]
    assert json.loads(record.reasons) == {"bad_signature": 2, "expired": 1}  # type: ignore[attr-defined]
    assert record.blocked_until is None  # type: ignore[attr-defined]
    # after an alert the count starts again; without block_for nothing is blocked
    assert alerts.blocked_for(src, now=T0 + 71) == 0.0
    assert not alerts.record_deny(src, "expired", now=T0 + 72)


def test_block_and_expiry() -> None:
    alerts = Alerts(AlertRule(threshold=2, window=10, block_for=300))
    src = "client:orders-ui"
    assert alerts.blocked_for(src, now=T0) == 0.0
    alerts.record_deny(src, "insufficient_scope", now=T0)
    assert alerts.record_deny(src, "insufficient_scope", now=T0 + 1)
    assert alerts.blocked_for(src, now=T0 + 1) == 300.0
    assert alerts.blocked_for(src, now=T0 + 201) == 100.0
    assert alerts.blocked_for("client:other", now=T0 + 201) == 0.0
    # denies while blocked are not counted (no alert storm, no extension)
    assert not alerts.record_deny(src, "blocked", now=T0 + 202)
    assert not alerts.record_deny(src, "blocked", now=T0 + 203)
    assert alerts.blocked_for(src, now=T0 + 301) == 0.0  # expired
    assert src not in alerts._blocked
    assert not alerts.record_deny(src, "expired", now=T0 + 302)
    assert alerts.record_deny(src, "expired", now=T0 + 303)
    assert alerts.blocked_for(src, now=T0 + 303) == 300.0


def test_tracked_sources_are_bounded() -> None:
    alerts = Alerts(AlertRule(threshold=5, window=10), max_sources=100)
    for i in range(1000):
        alerts.record_deny(f"ip:10.0.{i // 256}.{i % 256}", "ip_denied", now=T0 + i / 100)
    assert len(alerts._denies) <= 100


def test_webhook_is_posted_to_a_real_https_receiver(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    ctx, bundle = server_tls(ca, tmp_path / "hook")
    receiver = ProviderServer(ctx).start()
    receiver.routes["/hook"] = lambda method, headers, body: (204, {})
    try:
        rule = AlertRule(threshold=2, window=60, block_for=120, webhook=receiver.url + "/hook")

        async def scenario() -> Alerts:
            alerts = Alerts(
                rule,
                gateway_id="spiffe://example.org/gateway",
                ssl_context=ssl.create_default_context(cafile=str(bundle)),
            )
            await alerts.start()
            alerts.record_deny("ip:203.0.113.9", "rate_limited", now=T0)
            assert alerts.record_deny("ip:203.0.113.9", "token_missing", now=T0 + 5)
            await until(lambda: alerts.sent == 1)
            await alerts.aclose()
            return alerts

        alerts = run(scenario)
    finally:
        receiver.stop()
    assert alerts.failed == 0
    [request] = receiver.requests
    assert (request.method, request.path) == ("POST", "/hook")
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.body) == {
        "event": "gateway_alert",
        "gateway_id": "spiffe://example.org/gateway",
        "source": "ip:203.0.113.9",
        "count": 2,
        "window_seconds": 60,
        "reasons": {"rate_limited": 1, "token_missing": 1},
        "blocked_until": T0 + 5 + 120,
        "time": T0 + 5,
    }


def test_webhook_down_or_failing_is_logged_and_never_blocks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "trustmesh.gateway")
    failing = ProviderServer(None).start()
    failing.routes["/hook"] = lambda method, headers, body: (500, {"error": "boom"})
    try:

        async def scenario() -> tuple[int, int]:
            down = Alerts(AlertRule(1, 60, webhook=f"http://127.0.0.1:{free_port()}/hook"))
            erroring = Alerts(AlertRule(1, 60, webhook=failing.url + "/hook"))
            for alerts in (down, erroring):
                await alerts.start()
                assert alerts.record_deny("ip:192.0.2.1", "ip_denied")  # returns at once
                await until(lambda a=alerts: a.failed == 1)  # type: ignore[misc]
                assert alerts.sent == 0
                await alerts.aclose()
            return down.failed, erroring.failed

        assert run(scenario) == (1, 1)
    finally:
        failing.stop()
    failures = [r for r in caplog.records if getattr(r, "event", None) == "alert_webhook_failed"]
    assert len(failures) == 2
    assert "HTTP 500" in failures[1].getMessage()
    assert "plain HTTP" in caplog.text  # an http:// webhook is called out


def test_hanging_webhook_times_out_and_a_full_queue_drops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "trustmesh.gateway")

    async def scenario() -> Alerts:
        accepted: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # reads nothing, answers nothing

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        rule = AlertRule(1, 60, webhook=f"http://127.0.0.1:{port}/hook")
        alerts = Alerts(rule, timeout=0.3, queue_size=1)
        await alerts.start()
        fired = [alerts.record_deny(f"ip:192.0.2.{i}", "ip_denied") for i in range(3)]
        assert fired == [True, True, True]  # every alert fires and is logged
        assert alerts.dropped == 2  # only one fits in the queue
        await until(lambda: alerts.failed == 1)
        await alerts.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
        return alerts

    alerts = run(scenario)
    assert alerts.sent == 0
    logged = [r for r in caplog.records if getattr(r, "event", None) == "gateway_alert"]
    assert len(logged) == 3


def test_without_start_alerts_are_logged_and_counted_as_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "trustmesh.gateway")
    alerts = Alerts(AlertRule(1, 60, webhook="https://hooks.example.org/x"))
    assert alerts.record_deny("ip:192.0.2.1", "ip_denied", now=T0)
    assert alerts.dropped == 1
    assert "start() not called" in caplog.text
    run(alerts.aclose)  # closing a sender never started is fine


def test_blocked_sources_are_bounded() -> None:
    alerts = Alerts(AlertRule(threshold=1, window=10, block_for=5), max_sources=50)
    for i in range(500):
        assert alerts.record_deny(f"ip:10.1.{i // 256}.{i % 256}", "ip_denied", now=T0 + i)
    assert len(alerts._blocked) <= 50
    assert alerts.blocked_for("ip:10.1.1.243", now=T0 + 499) == 5.0  # the newest stays
