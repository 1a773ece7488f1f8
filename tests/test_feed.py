"""The revocation feed: cursors, the SSE stream, and propagation across two real
`ca serve` replicas sharing one PostgreSQL (LISTEN/NOTIFY)."""

from __future__ import annotations

import json
import queue
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType, dump_private_key, pem_certificates

from ._server import ADMIN, running_server
from .conftest import PASSPHRASE


def identity(ca: CertificateAuthority, spiffe_id: str, directory: Path) -> tuple[Path, str]:
    issued = ca.issue(spiffe_id)
    directory.mkdir(parents=True, exist_ok=True)
    assert issued.key is not None
    (directory / "chain.pem").write_bytes(pem_certificates(issued.chain))
    (directory / "key.pem").write_bytes(dump_private_key(issued.key))
    return directory, issued.record.serial


def http_client(url: str, bundle: Path, ident: Path | None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(bundle))
    if ident is not None:
        ctx.load_cert_chain(ident / "chain.pem", ident / "key.pem")
    return httpx.Client(base_url=url, verify=ctx, timeout=30)


class Subscriber:
    """Reads the SSE stream in a thread and timestamps each revocation event."""

    def __init__(self, url: str, bundle: Path, ident: Path, since: int = 0) -> None:
        self.events: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self.connected = threading.Event()
        self.client = http_client(url, bundle, ident)
        self.since = since
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.connected.wait(10), "stream did not open"

    def _run(self) -> None:
        try:
            with self.client.stream(
                "GET", "/v1/revocations/stream", params={"since": self.since}
            ) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                self.connected.set()
                data = None
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        data = json.loads(line[6:])
                    elif line == "" and data is not None:
                        self.events.put((time.monotonic(), data))
                        data = None
        except (httpx.HTTPError, RuntimeError):
            return

    def next(self, timeout: float = 5) -> tuple[float, dict[str, Any]]:
        return self.events.get(timeout=timeout)

    def close(self) -> None:
        self.client.close()


def _setup(tmp_path: Path, db_url: str | None) -> tuple[Path, Path]:
    home = tmp_path / "home"
    ca = CertificateAuthority.init(
        home,
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
        db_url=db_url,
    )
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pem_certificates(ca.bundle))
    ca.close()
    return home, bundle


def test_feed_lists_since_cursor_and_requires_mtls(tmp_path: Path) -> None:
    home, bundle = _setup(tmp_path, None)
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        reader, _ = identity(ca, "spiffe://example.org/reader", tmp_path / "reader")
        serials = [
            identity(ca, f"spiffe://example.org/s{i}", tmp_path / f"s{i}")[1] for i in range(3)
        ]
        for serial in serials:
            ca.revoke(serial, reason="superseded")
    with running_server(home, tmp_path) as server:
        url = server.url
        with http_client(url, bundle, None) as anonymous:
            response = anonymous.get("/v1/revocations")
            assert response.status_code == 401
            assert response.json()["reason"] == "no_client_certificate"
        with http_client(url, bundle, reader) as http:
            page = http.get("/v1/revocations", params={"since": 0}).json()
            assert [e["serial"] for e in page["events"]] == serials
            cursors = [e["cursor"] for e in page["events"]]
            assert cursors == sorted(cursors)
            assert page["cursor"] == cursors[-1]
            rest = http.get("/v1/revocations", params={"since": cursors[0]}).json()
            assert [e["serial"] for e in rest["events"]] == serials[1:]
            empty = http.get("/v1/revocations", params={"since": page["cursor"]}).json()
            assert empty == {"events": [], "cursor": page["cursor"]}
            bad = http.get("/v1/revocations", params={"since": "yesterday"})
            assert bad.status_code == 400
            assert bad.headers["content-type"] == "application/problem+json"


def test_stream_delivers_backlog_then_live_events(tmp_path: Path) -> None:
    home, bundle = _setup(tmp_path, None)
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        reader, _ = identity(ca, "spiffe://example.org/reader", tmp_path / "reader")
        admin, _ = identity(ca, ADMIN, tmp_path / "admin")
        _, old = identity(ca, "spiffe://example.org/old", tmp_path / "old")
        _, live = identity(ca, "spiffe://example.org/live", tmp_path / "live")
        _, cli = identity(ca, "spiffe://example.org/cli", tmp_path / "cli")
        ca.revoke(old)
    with running_server(home, tmp_path) as server:
        url = server.url
        subscriber = Subscriber(url, bundle, reader)
        try:
            _, first = subscriber.next()
            assert first["serial"] == old  # the backlog since cursor 0
            with http_client(url, bundle, admin) as http:
                start = time.monotonic()
                assert (
                    http.post(
                        "/v1/revoke", json={"serial": live, "reason": "keyCompromise"}
                    ).status_code
                    == 200
                )
            arrived, event = subscriber.next()
            assert event["serial"] == live
            assert event["reason"] == "keyCompromise"
            assert event["cursor"] > first["cursor"]
            assert arrived - start < 1.0
            # a revocation made outside the server (CLI on the same database) arrives too
            with CertificateAuthority.open(home) as ca:
                start = time.monotonic()
                ca.revoke(cli)
            arrived, event = subscriber.next()
            assert event["serial"] == cli
            assert arrived - start < 1.0
        finally:
            subscriber.close()
        # resuming from a cursor misses nothing and repeats nothing
        resumed = Subscriber(url, bundle, reader, since=first["cursor"])
        try:
            assert [resumed.next()[1]["serial"] for _ in range(2)] == [live, cli]
        finally:
            resumed.close()


def test_stream_ends_when_the_subscriber_is_revoked(tmp_path: Path) -> None:
    home, bundle = _setup(tmp_path, None)
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        reader, reader_serial = identity(ca, "spiffe://example.org/reader", tmp_path / "reader")
    with running_server(home, tmp_path) as server:
        with (
            http_client(server.url, bundle, reader) as http,
            http.stream("GET", "/v1/revocations/stream") as response,
        ):
            lines = response.iter_lines()
            assert next(lines) == "retry: 1000"
            with CertificateAuthority.open(home) as ca:
                ca.revoke(reader_serial)
            rest = list(lines)  # ends: the server closes the stream
        assert f'"serial": "{reader_serial}"' in "\n".join(rest)
        assert "event: closed" in rest


def test_metrics_and_admin_listing(tmp_path: Path) -> None:
    home, bundle = _setup(tmp_path, None)
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        admin, _ = identity(ca, ADMIN, tmp_path / "admin")
        other, _ = identity(ca, "spiffe://example.org/ns/a/web", tmp_path / "other")
    with running_server(home, tmp_path) as server:
        url = server.url
        with http_client(url, bundle, other) as http:
            refused = http.get("/v1/certificates")
            assert refused.status_code == 403
            assert refused.json()["reason"] == "not_admin"
        with http_client(url, bundle, admin) as http:
            listing = http.get(
                "/v1/certificates", params={"id": "spiffe://example.org/ns/*/web"}
            ).json()
            assert [c["spiffe_id"] for c in listing["certificates"]] == [
                "spiffe://example.org/ns/a/web"
            ]
            page = http.get("/v1/certificates", params={"limit": 1}).json()
            assert len(page["certificates"]) == 1
            assert page["next_offset"] == 1
            text = http.get("/metrics").text
        assert 'trustmesh_ca_denials_total{reason="not_admin",route="/v1/certificates"} 1.0' in text
        timed = 'method="GET",route="/v1/certificates",status="200"} 2.0'
        assert f"trustmesh_ca_request_seconds_count{{{timed}" in text


def test_enroll_is_rate_limited_per_token(tmp_path: Path) -> None:
    home, bundle = _setup(tmp_path, None)
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        token = ca.create_join_token("spiffe://example.org/web")
    with (
        running_server(home, tmp_path) as server,
        http_client(server.url, bundle, None) as http,
    ):
        statuses = [
            http.post("/v1/enroll", json={"token": token, "csr": "not a csr"}).status_code
            for _ in range(8)
        ]
        assert statuses[:5] == [400] * 5  # burst of 5 per token
        assert 429 in statuses[5:]
        limited = http.post("/v1/enroll", json={"token": token, "csr": "x"})
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["reason"] == "rate_limited"


def test_enroll_limit_per_address_is_set_from_the_command_line(tmp_path: Path) -> None:
    home, bundle = _setup(tmp_path, None)
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        tokens = [ca.create_join_token(f"spiffe://example.org/w{i}") for i in range(4)]
    with (
        running_server(
            home, tmp_path, extra_args=("--enroll-rate", "0.1", "--enroll-burst", "2")
        ) as server,
        http_client(server.url, bundle, None) as http,
    ):
        statuses = [
            http.post("/v1/enroll", json={"token": t, "csr": "not a csr"}).status_code
            for t in tokens
        ]
    assert statuses == [400, 400, 429, 429]  # each token is fresh: the address is limited


@pytest.mark.postgres
def test_revocation_reaches_other_replica_within_a_second(tmp_path: Path, pg_url: str) -> None:
    home, bundle = _setup(tmp_path, pg_url)
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        reader, _ = identity(ca, "spiffe://example.org/reader", tmp_path / "reader")
        admin, _ = identity(ca, ADMIN, tmp_path / "admin")
        targets = [
            identity(ca, f"spiffe://example.org/t{i}", tmp_path / f"t{i}")[1] for i in range(5)
        ]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        running_server(home, tmp_path / "a") as replica_a,
        running_server(home, tmp_path / "b") as replica_b,
    ):
        url_a, url_b = replica_a.url, replica_b.url
        subscriber = Subscriber(url_b, bundle, reader)
        try:
            latencies = []
            with http_client(url_a, bundle, admin) as http:
                for serial in targets:
                    start = time.monotonic()
                    assert http.post("/v1/revoke", json={"serial": serial}).status_code == 200
                    arrived, event = subscriber.next(timeout=5)
                    assert event["serial"] == serial
                    latencies.append(arrived - start)
            assert max(latencies) < 1.0, latencies
        finally:
            subscriber.close()
        # both replicas serve every route interchangeably: B answers A's revocation
        with http_client(url_b, bundle, reader) as http:
            page = http.get("/v1/revocations").json()
            assert [e["serial"] for e in page["events"]] == targets


def test_subscribers_woken_together_share_one_query(ca: CertificateAuthority) -> None:
    import asyncio

    from trustmesh.ca_server._feed import RevocationHub

    serial = ca.issue("spiffe://example.org/gone").record.serial
    ca.revoke(serial, reason="keyCompromise")
    queries: list[int] = []
    original = ca.revocations_since

    def counted(cursor: int, *, limit: int = 1000) -> list[Any]:
        queries.append(cursor)
        time.sleep(0.05)  # a slow database: every subscriber arrives while it runs
        return original(cursor, limit=limit)

    ca.revocations_since = counted  # type: ignore[method-assign]
    hub = RevocationHub(ca)

    async def fan_out() -> list[list[Any]]:
        return await asyncio.gather(*(hub.events_since(0) for _ in range(100)))

    results = asyncio.run(fan_out())
    assert queries == [0]
    assert all([e.serial for e in batch] == [serial] for batch in results)
    assert asyncio.run(hub.events_since(0))[0].serial == serial  # done: the next one asks again
    assert queries == [0, 0]


def test_sigterm_ends_open_streams_and_stops_promptly(tmp_path: Path) -> None:
    """SIGTERM with feed subscribers connected ends their streams and stops `ca serve` in
    well under the 10 s graceful-shutdown limit, exit 0, with no traceback in the log."""
    home, bundle = _setup(tmp_path, None)
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        reader, _ = identity(ca, "spiffe://example.org/reader", tmp_path / "reader")
    with running_server(home, tmp_path) as server:
        subscribers = [Subscriber(server.url, bundle, reader) for _ in range(2)]
        started = time.monotonic()
        server.process.terminate()
        for subscriber in subscribers:
            subscriber.thread.join(timeout=5)
            assert not subscriber.thread.is_alive(), "the stream did not end"
            subscriber.close()  # as the agent does before it reconnects
        code = server.process.wait(timeout=30)
        took = time.monotonic() - started
    log = (tmp_path / "serve.log").read_text()
    assert code == 0, log
    assert took < 5, f"ca serve took {took:.1f}s to stop with open streams"
    assert "Traceback" not in log
    assert "Exception in ASGI application" not in log
