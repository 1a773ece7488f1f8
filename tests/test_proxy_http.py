"""`trustmesh proxy inbound --http` on the wire: one real sidecar process in front of the
plain Node.js app, driven over raw mTLS sockets for what an HTTP client library would
smooth over: pipelined requests, chunked bodies, Expect: 100-continue, oversized and slow
heads, request smuggling shapes, upgrades, the per-connection decision cache across a
policy reload, and no per-request INFO line."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType
from trustmesh.tls import client_context

from ._services import Identity, bundle_pem, issue
from ._sidecar import (
    INTRUDER,
    ORDERS,
    SIDECAR_ID,
    NodeApp,
    Sidecar,
    node_app,
    sidecar,
    write_identity,
)
from .conftest import PASSPHRASE

POLICY = f"""\
mode: enforce
rules:
  - name: orders-items
    callers: ["{ORDERS}"]
    methods: [GET, POST, HEAD]
    paths: ["/items/**"]
"""


@dataclass
class Stack:
    ca: CertificateAuthority
    app: NodeApp
    proxy: Sidecar
    orders: Identity
    intruder: Identity
    policy: Path

    def connect(self, identity: Identity | None = None) -> ssl.SSLSocket:
        who = identity or self.orders
        ctx = client_context(cadata=bundle_pem(self.ca), chain=who.chain, key=who.key)
        raw = socket.create_connection(("127.0.0.1", self.proxy.port), timeout=20)
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("proxy-http")
    with CertificateAuthority.init(
        work / "home", trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ) as ca:
        orders = issue(ca, ORDERS, work)
        intruder = issue(ca, INTRUDER, work)
        cert_dir = work / "certs"
        write_identity(ca, cert_dir, SIDECAR_ID)
        policy = work / "policy.yaml"
        policy.write_text(POLICY)
        with (
            node_app("plain_app.js", work) as app,
            sidecar(
                "inbound",
                work,
                *("--id", SIDECAR_ID, "--cert-dir", str(cert_dir)),
                *("--to", f"127.0.0.1:{app.port}", "--http", "--policy", str(policy)),
                "--no-revocation",
            ) as proxy,
        ):
            yield Stack(ca, app, proxy, orders, intruder, policy)


class Reader:
    """Reads HTTP/1.1 responses off a socket (Content-Length, chunked, or until close)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except (ssl.SSLError, OSError):
            chunk = b""
        self.buffer += chunk
        return bool(chunk)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise EOFError(self.buffer)
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise EOFError(self.buffer)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def response(self, *, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        status = int(self._line().split()[1])
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if head or status in (100, 204, 304):
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, self._exactly(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(self._line().split(b";")[0], 16):
                body += self._exactly(size)
                self._exactly(2)
            self._line()
            return status, headers, body
        while self._fill():
            pass
        body, self.buffer = self.buffer, b""
        return status, headers, body

    def closed(self) -> bool:
        return not self.buffer and not self._fill()


def _get(path: str, *extra: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: app", *extra, "", ""]).encode()


def _records_for(stack: Stack, marker: str) -> list[dict[str, object]]:
    return [r for r in stack.app.records() if marker in str(r["url"])]


def test_pipelined_requests_are_answered_in_order(stack: Stack) -> None:
    """Three requests in one write, the middle one refused by the policy: three answers in
    order on the same connection, and the app saw only the two allowed ones."""
    with stack.connect() as sock:
        sock.sendall(_get("/items/p1") + _get("/admin/p2") + _get("/items/p3"))
        reader = Reader(sock)
        first, second, third = (reader.response() for _ in range(3))
    assert first[0] == 200
    assert json.loads(first[2])["headers"]["x-trustmesh-caller"] == ORDERS
    assert second[0] == 403
    assert second[1]["content-type"] == "application/problem+json"
    assert json.loads(second[2])["reason"] == "policy_denied"
    assert third[0] == 200
    assert [r["url"] for r in stack.app.records() if "/p" in str(r["url"])] == [
        "/items/p1",
        "/items/p3",
    ]


def test_chunked_request_body_and_expect_100_continue(stack: Stack) -> None:
    """A chunked body reaches the app whole; with Expect: 100-continue the sidecar says
    100 Continue only once the checks passed, and a refused request gets its 403 without
    a 100 (and the connection closes, the body never sent)."""
    with stack.connect() as sock:
        reader = Reader(sock)
        sock.sendall(
            b"POST /items/chunked HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        chunked = reader.response()
        sock.sendall(
            b"POST /items/expect HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        interim = reader.response()
        sock.sendall(b"body")
        expected = reader.response()
    with stack.connect(stack.intruder) as sock:
        reader = Reader(sock)
        sock.sendall(
            b"POST /items/expect HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        refused = reader.response()
        assert reader.closed()
    assert chunked[0] == 200
    assert json.loads(chunked[2])["body"] == "hello world"
    assert interim[0] == 100
    assert expected[0] == 200
    assert json.loads(expected[2])["body"] == "body"
    assert refused[0] == 403
    assert refused[1]["connection"] == "close"
    assert [r["body"] for r in _records_for(stack, "/items/expect")] == ["body"]


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 5",
        "Content-Length: 5\r\nContent-Length: 6",
        "Transfer-Encoding: gzip, chunked",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
    ],
)
def test_request_smuggling_shapes_are_refused_400(stack: Stack, framing: str) -> None:
    """CL+TE (either order), two lengths, and codings other than chunked are refused with
    400 and the connection closed; nothing reaches the app."""
    marker = f"/items/smuggle-{abs(hash(framing))}"
    with stack.connect() as sock:
        sock.sendall(
            f"POST {marker} HTTP/1.1\r\nHost: app\r\n{framing}\r\n\r\n".encode()
            + b"0\r\n\r\nGET /items/smuggled HTTP/1.1\r\nHost: app\r\n\r\n"
        )
        reader = Reader(sock)
        status, headers, _body = reader.response()
        assert reader.closed()
    assert status == 400
    assert headers["connection"] == "close"
    assert not _records_for(stack, marker)
    assert not _records_for(stack, "/items/smuggled")


def test_oversized_head_is_431_and_body_over_the_limit_413(stack: Stack) -> None:
    """A head over 64 KiB is answered 431 and closed; a Content-Length over the body limit
    413 before any body byte is read; neither reaches the app."""
    with stack.connect() as sock:
        sock.sendall(_get("/items/big-head", "X-Big: " + "a" * 70_000))
        reader = Reader(sock)
        big = reader.response()
        assert reader.closed()
    with stack.connect() as sock:
        sock.sendall(
            b"POST /items/big-body HTTP/1.1\r\nHost: app\r\nContent-Length: 100000000\r\n\r\n"
        )
        reader = Reader(sock)
        large = reader.response()
        assert reader.closed()
    assert big[0] == 431
    assert json.loads(big[2])["reason"] == "head_too_large"
    assert large[0] == 413
    assert json.loads(large[2])["reason"] == "body_too_large"
    assert not _records_for(stack, "/items/big-")


@pytest.mark.slow
def test_a_slow_head_is_408(stack: Stack) -> None:
    """A head that trickles in for longer than 10 s is answered 408 and closed."""
    with stack.connect() as sock:
        sock.sendall(b"GET /items/slow-head HTTP/1.1\r\nHost: app\r\n")
        started = time.monotonic()
        reader = Reader(sock)
        for _ in range(12):
            try:
                sock.sendall(b"X-Drip: 1\r\n")
            except OSError:
                break
            time.sleep(1)
        status, _headers, body = reader.response()
        elapsed = time.monotonic() - started
    assert status == 408
    assert json.loads(body)["reason"] == "head_timeout"
    assert 9 < elapsed < 20
    assert not _records_for(stack, "/items/slow-head")


def test_upgrade_is_relayed_as_a_plain_request_then_closed(stack: Stack) -> None:
    """An Upgrade (WebSocket) is not switched: the app gets a plain GET without Upgrade and
    Connection, the caller its answer, and the connection closes after it."""
    with stack.connect() as sock:
        sock.sendall(
            _get(
                "/items/upgrade",
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            )
        )
        reader = Reader(sock)
        status, headers, _body = reader.response()
        assert reader.closed()
    assert status == 200
    assert headers["connection"] == "close"
    (seen,) = _records_for(stack, "/items/upgrade")
    seen_headers = seen["headers"]
    assert isinstance(seen_headers, dict)
    assert "upgrade" not in seen_headers
    assert seen_headers.get("connection", "").lower() != "upgrade"


def test_head_and_absolute_form_targets(stack: Stack) -> None:
    """HEAD gets the head only (the connection stays usable); an absolute-form target is
    decided and relayed by its path."""
    with stack.connect() as sock:
        reader = Reader(sock)
        sock.sendall(b"HEAD /items/head HTTP/1.1\r\nHost: app\r\n\r\n")
        head = reader.response(head=True)
        sock.sendall(_get("http://app/items/absolute?x=1"))
        absolute = reader.response()
        sock.sendall(_get("http://app/admin/absolute"))
        denied = reader.response()
    assert head[0] == 200
    assert head[2] == b""
    assert absolute[0] == 200
    assert denied[0] == 403
    assert [r["url"] for r in _records_for(stack, "absolute")] == ["/items/absolute?x=1"]


def test_decisions_follow_a_policy_reload_on_an_open_connection(stack: Stack) -> None:
    """The decision cached for (caller, GET, path) on a keep-alive connection is dropped
    when the policy file changes: the same connection is refused once the reload is in."""
    try:
        with stack.connect() as sock:
            reader = Reader(sock)
            sock.sendall(_get("/items/reload"))
            before = reader.response()
            stack.policy.write_text(POLICY.replace("/items/**", "/other/**"))
            deadline = time.monotonic() + 15
            while True:
                sock.sendall(_get("/items/reload"))
                after = reader.response()
                if after[0] != 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
    finally:
        stack.policy.write_text(POLICY)
    assert before[0] == 200
    assert after[0] == 403
    assert json.loads(after[2])["reason"] == "policy_denied"
    # And back: the restored policy allows again (a new decision, not a stale one).
    deadline = time.monotonic() + 15
    while True:
        with stack.connect() as sock:
            sock.sendall(_get("/items/reload-back"))
            status = Reader(sock).response()[0]
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200


def test_allowed_requests_are_not_logged_at_info_and_denials_are(stack: Stack) -> None:
    """No line per allowed request at the default level; each denial is logged with its
    reason (and the connection lines stay)."""
    with stack.connect() as sock:
        reader = Reader(sock)
        for _ in range(5):
            sock.sendall(_get("/items/quiet"))
            assert reader.response()[0] == 200
        sock.sendall(_get("/admin/loud"))
        assert reader.response()[0] == 403
    denial = stack.proxy.wait_for("trustmesh.request", outcome="deny", path="/admin/loud")
    assert denial["reason"] == "policy_denied"
    logs = stack.proxy.logs()
    assert not [e for e in logs if e.get("outcome") == "allow"]
    assert not [e for e in logs if "/items/quiet" in json.dumps(e)]
    assert stack.proxy.events("proxy_connection_open")
