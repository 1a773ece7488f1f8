"""The gateway when its neighbours fail, with real processes killed and restarted.

An upstream that is down (502) or slow (504), each with a problem+json body saying so; a
pool of two echo endpoints where one is killed (ejected after consecutive failures, the
other serves) and restarted on its port (taken back after the ejection time); the
identity server stopped after startup (cached keys keep verifying, a token with an
unknown ``kid`` fails closed); Redis unreachable (rate limits fall back to local buckets,
and the log says so) through a closed port and through a TCP forwarder that is cut and
restored. The identity-server tests stop the stack's idp, so they come last.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest

from ._gateway_stack import Gateway, Stack, TcpForwarder, refused, running_stack
from ._server import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The gateways here present the agent's certificate (no `tls:`): clients check our CA.
    with running_stack(
        tmp_path_factory.mktemp("gw-faults"), echoes=("echo", "echo-b"), edge=False
    ) as s:
        yield s


def marker() -> str:
    return uuid.uuid4().hex[:12]


def log_mentions(gateway: Gateway, event: str, timeout: float = 10) -> list[dict[str, object]]:
    """The JSON log lines of EVENT (waits up to TIMEOUT for the first)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in gateway.events() if e.get("event") == event]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_an_upstream_that_is_down_is_a_502_and_a_slow_one_a_504(stack: Stack) -> None:
    public = {"public": True}
    closed = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    down = stack.route("/down", "echo", auth=public)
    down["upstream"]["urls"] = [closed]
    slow = stack.route("/slow", "echo", auth=public, upstream_settings={"timeout": "1s"})
    gateway = stack.start_gateway(stack.config([down, slow]), label="gw-upstreams")
    with gateway.http() as http:
        unavailable = http.get(f"/down/{marker()}")
        started = time.monotonic()
        timed_out = http.get("/slow", params={"s": "8"})
        waited = time.monotonic() - started
    document = refused(unavailable, 502, "upstream_unavailable")
    assert "down" in document["detail"]  # names the route whose service is unreachable
    refused(timed_out, 504, "upstream_timeout")
    assert waited < 8  # answered by the gateway's timeout, not by the upstream
    assert gateway.reason("/down") == "upstream_unavailable"
    assert gateway.reason("/slow") == "upstream_timeout"
    gateway.stop()


def test_a_dead_endpoint_is_ejected_and_taken_back_when_it_returns(stack: Stack) -> None:
    pool = stack.route(
        "/pool",
        ["echo", "echo-b"],
        auth={"public": True},
        upstream_settings={"eject_after": 2, "eject_for": "2s", "retries": 1},
    )
    gateway = stack.start_gateway(stack.config([pool]), label="gw-pool")

    def served_by(http: httpx.Client, count: int) -> list[str]:
        names = []
        for _ in range(count):
            answer = http.get(f"/pool/{marker()}")
            names.append(answer.json()["name"] if answer.status_code == 200 else "error")
        return names

    b_port = int(urlsplit(stack.mesh.urls["echo-b"]).port or 0)
    with gateway.http() as http:
        assert set(served_by(http, 6)) == {"echo", "echo-b"}  # round robin over both
        stack.mesh.halt("echo-b", kill=True)
        during = served_by(http, 10)
        # retries for GET move a failed attempt to the live endpoint; once echo-b is
        # ejected, every request goes to echo
        assert during[-5:] == ["echo"] * 5, during
        # (ejected again each time a trial after eject_for fails while it is down)
        ejected = log_mentions(gateway, "upstream_ejected")
        assert ejected, gateway.log_text()
        assert all(e["endpoint"] == f"127.0.0.1:{b_port}" for e in ejected), ejected
        stack.run_echo("echo-b", port=b_port)
        deadline = time.monotonic() + 30
        back: list[str] = []
        while "echo-b" not in back and time.monotonic() < deadline:
            back = served_by(http, 4)
            time.sleep(0.5)
    assert "echo-b" in back, "the restarted endpoint was never used again"
    assert "error" not in back
    recovered = log_mentions(gateway, "upstream_recovered")
    assert [e["endpoint"] for e in recovered] == [f"127.0.0.1:{b_port}"], recovered
    gateway.stop()


def test_redis_down_at_start_falls_back_to_local_rate_limits(stack: Stack) -> None:
    """A `redis:` URL where nothing listens: requests are still limited (locally), and the
    log says the shared limiter is down, once."""
    route = stack.route(
        "/limited", "echo", auth={"public": True}, rate_limits={"per_ip": {"rate": 0.2, "burst": 3}}
    )
    config = stack.config([route], redis=f"redis://127.0.0.1:{free_port()}/15")
    gateway = stack.start_gateway(config, label="gw-redis-closed")
    with gateway.http() as http:
        statuses = [http.get(f"/limited/{marker()}").status_code for _ in range(6)]
        limited = http.get(f"/limited/{marker()}")
    assert statuses[:3] == [200, 200, 200], statuses
    assert 429 in statuses, statuses
    refused(limited, 429, "rate_limited")
    assert float(limited.headers["retry-after"]) > 0
    downs = log_mentions(gateway, "ratelimit_redis_down")
    assert len(downs) == 1, downs
    assert downs[0].get("level") in {"warning", "WARNING"}
    gateway.stop()


def test_redis_cut_and_restored_while_serving(stack: Stack, redis_url: str) -> None:
    """Redis through a forwarder: limits are shared in Redis; cut it and the gateway
    limits locally (logged once), restore it and the gateway uses Redis again (logged)."""
    import redis

    target = urlsplit(redis_url)
    forwarder = TcpForwarder((target.hostname or "127.0.0.1", target.port or 6379)).start()
    db = target.path.lstrip("/") or "0"
    route = stack.route(
        "/shared", "echo", auth={"public": True}, rate_limits={"per_ip": {"rate": 0.2, "burst": 3}}
    )
    config = stack.config([route], redis=f"redis://127.0.0.1:{forwarder.port}/{db}")
    gateway = stack.start_gateway(config, label="gw-redis-cut")
    client = redis.Redis.from_url(redis_url)
    try:
        with gateway.http() as http:
            statuses = [http.get(f"/shared/{marker()}").status_code for _ in range(5)]
            assert statuses[:3] == [200, 200, 200], statuses
            assert statuses[-1] == 429, statuses
            assert client.keys("trustmesh:gateway*"), "no rate-limit bucket in Redis"
            forwarder.stop()
            cut = [http.get(f"/shared/{marker()}").status_code for _ in range(5)]
            assert set(cut) <= {200, 429}, cut  # still answering, never a 5xx
            assert 429 in cut, cut  # and still limiting
            assert len(log_mentions(gateway, "ratelimit_redis_down")) == 1
            forwarder.start()
            deadline = time.monotonic() + 30
            recovered: list[dict[str, object]] = []
            while not recovered and time.monotonic() < deadline:
                http.get(f"/shared/{marker()}")
                recovered = log_mentions(gateway, "ratelimit_redis_up", timeout=0.5)
            assert len(recovered) == 1, gateway.log_text()
    finally:
        forwarder.stop()
        for key in client.keys("trustmesh:gateway*"):
            client.delete(key)
        client.close()
        gateway.stop()


@dataclass
class IdpDown:
    gateway: Gateway
    token: str


@pytest.fixture(scope="module")
def idp_down(stack: Stack) -> Iterator[IdpDown]:
    """A gateway that has verified a token (the issuer's keys are cached), then the
    identity server is stopped for good: only the last tests of the module use it."""
    route = stack.route("/api", "echo", auth={"scopes": ["orders:read"]})
    gateway = stack.start_gateway(stack.config([route]), label="gw-idp")
    token = stack.machine_token(scope="orders:read")
    with gateway.http() as http:
        warm = http.get("/api/warm", headers={"Authorization": f"Bearer {token}"})
    assert warm.status_code == 200, warm.text
    stack.mesh.halt("idp")
    yield IdpDown(gateway, token)
    gateway.stop()


def unknown_kid(stack: Stack, idp_down: IdpDown) -> tuple[str, httpx.Response]:
    """A request whose token names a key the gateway has not cached (as after a key
    rotation at the identity server): its marker and the answer."""
    mark = marker()
    token = stack.forged(idp_down.token, kid=f"rotated-{mark}")
    with idp_down.gateway.http() as http:
        return mark, http.get(f"/api/{mark}", headers={"Authorization": f"Bearer {token}"})


def test_identity_server_down_cached_keys_still_verify(stack: Stack, idp_down: IdpDown) -> None:
    now = int(time.time())
    renewed = stack.resigned(idp_down.token, jti=uuid.uuid4().hex, iat=now, nbf=now)
    with idp_down.gateway.http() as http:
        # the token seen before, and one never seen, signed by the same key
        for each in (idp_down.token, renewed):
            answer = http.get(f"/api/{marker()}", headers={"Authorization": f"Bearer {each}"})
            assert answer.status_code == 200, answer.text
        forged = http.get(
            f"/api/{marker()}", headers={"Authorization": f"Bearer {stack.forged(renewed)}"}
        )
    refused(forged, 401, "bad_signature")


def test_an_unknown_kid_fails_closed_while_the_identity_server_is_down(
    stack: Stack, idp_down: IdpDown
) -> None:
    mark, answer = unknown_kid(stack, idp_down)
    document = refused(answer, answer.status_code, "unknown_kid", "token_verifier_unavailable")
    assert answer.status_code in (401, 503), document
    assert idp_down.gateway.reason(f"/api/{mark}") == document["reason"]
    assert stack.echo_seen(mark) == []


def test_an_unknown_kid_while_the_identity_server_is_down_is_503_as_specified(
    stack: Stack, idp_down: IdpDown
) -> None:
    mark, answer = unknown_kid(stack, idp_down)
    refused(answer, 503, "token_verifier_unavailable")
    assert answer.headers["retry-after"]
    assert idp_down.gateway.reason(f"/api/{mark}") == "token_verifier_unavailable"
