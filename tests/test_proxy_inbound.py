"""`trustmesh proxy inbound` as a real process in front of plain Node.js apps: TCP mode with
PROXY protocol v2, HTTP mode with the policy per request and identity headers, revocation,
connection age and the SIGTERM drain."""

from __future__ import annotations

import base64
import json
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.proxy import TLSInfo, proxy_v2_header
from trustmesh.tls import client_context

from ._server import free_port
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


@contextmanager
def _sidecar_to(ca: CertificateAuthority, tmp_path: Path, to: str, *args: str) -> Iterator[Sidecar]:
    """`proxy inbound --id SIDECAR_ID --to TO ARGS...` with a fresh identity directory."""
    cert_dir = tmp_path / "certs"
    write_identity(ca, cert_dir, SIDECAR_ID)
    with sidecar(
        "inbound", tmp_path, "--id", SIDECAR_ID, "--cert-dir", str(cert_dir), "--to", to, *args
    ) as proxy:
        yield proxy


@contextmanager
def _inbound(
    ca: CertificateAuthority, tmp_path: Path, script: str, *args: str
) -> Iterator[tuple[NodeApp, Sidecar]]:
    """The Node.js app SCRIPT behind `proxy inbound --id SIDECAR_ID ... ARGS`."""
    with (
        node_app(script, tmp_path) as app,
        _sidecar_to(ca, tmp_path, f"127.0.0.1:{app.port}", *args) as proxy,
    ):
        yield app, proxy


def _tls(ca: CertificateAuthority, identity: Identity, port: int) -> ssl.SSLSocket:
    ctx = client_context(cadata=bundle_pem(ca), chain=identity.chain, key=identity.key)
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _line(sock: ssl.SSLSocket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _refused(ca: CertificateAuthority, identity: Identity, port: int) -> bool:
    """Whether a connection as ``identity`` fails its handshake or is closed unanswered."""
    try:
        with _tls(ca, identity, port) as sock:
            sock.sendall(b"hello\n")
            return sock.recv(1) == b""
    except (ssl.SSLError, OSError):
        return True


def _closed(sock: ssl.SSLSocket) -> bool:
    """Whether the other side has closed the connection (EOF or a TLS error at read)."""
    try:
        return sock.recv(1) == b""
    except (ssl.SSLError, OSError):
        return True


def test_proxy_v2_header_layout() -> None:
    """The header is the v2 signature, PROXY over TCP4 with both addresses and ports, then
    the unique-id, SSL (with version, CN and cipher sub-TLVs) and SPIFFE ID TLVs."""
    header = proxy_v2_header(
        ("10.0.0.7", 50123),
        ("10.0.0.1", 8443),
        TLSInfo(ORDERS, "TLSv1.3", "TLS_AES_128_GCM_SHA256"),
        unique_id="abc",
    )
    assert header[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
    assert header[12:14] == b"\x21\x11"
    assert int.from_bytes(header[14:16], "big") == len(header) - 16
    assert header[16:28] == bytes([10, 0, 0, 7, 10, 0, 0, 1]) + (50123).to_bytes(2) + (
        8443
    ).to_bytes(2)
    assert header[28:34] == b"\x05\x00\x03abc"
    assert header.endswith(b"\xe0" + len(ORDERS).to_bytes(2) + ORDERS.encode())
    six = proxy_v2_header(("::ffff:10.0.0.7", 1), ("::1", 2), TLSInfo(ORDERS, "TLSv1.3", "x"))
    assert six[13] == 0x21  # mixed families are sent as TCP over IPv6
    assert int.from_bytes(six[14:16], "big") == len(six) - 16


@pytest.mark.slow
def test_tcp_mode_passes_the_caller_with_proxy_protocol_v2(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """A Node.js TCP app learns the caller's address and SPIFFE ID from the PROXY v2 header;
    a caller not allowed and a foreign-CA client never reach it; metrics count both."""
    orders = issue(ca, ORDERS, tmp_path)
    intruder = issue(ca, INTRUDER, tmp_path)
    foreign_ca = CertificateAuthority.init(
        tmp_path / "foreign", trust_domain="example.org", passphrase=PASSPHRASE
    )
    with foreign_ca:
        foreign = issue(foreign_ca, ORDERS, tmp_path)
    metrics_port = free_port()
    with (
        _inbound(
            ca,
            tmp_path,
            "proxy_v2_app.js",
            *("--allow-id", "spiffe://example.org/svc/ord*", "--no-revocation"),
            *("--metrics", f"127.0.0.1:{metrics_port}"),
        ) as (app, proxy),
    ):
        with _tls(ca, orders, proxy.port) as sock:
            report = json.loads(_line(sock))
            local_port = sock.getsockname()[1]
            sock.sendall(b"ping\n")
            echoed = _line(sock)
        with _tls(ca, intruder, proxy.port) as sock:
            refused_closed = _closed(sock)
        foreign_refused = _refused(ca, foreign, proxy.port)
        proxy.wait_for("proxy_refused", reason="policy_denied")
        proxy.wait_for("proxy_refused", reason="handshake_failed")
        proxy.wait_for("proxy_connection_closed", peer_id=ORDERS)
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        records = app.records()
        assert proxy.stop() == 0, proxy.log_path.read_text()
    assert (report["version"], report["command"], report["family"]) == (2, 1, 0x11)
    assert report["source"] == {"address": "127.0.0.1", "port": local_port}
    assert report["destination"] == {"address": "127.0.0.1", "port": proxy.port}
    assert report["spiffe_id"] == ORDERS
    assert (report["ssl"]["client"], report["ssl"]["verify"]) == (0x03, 0)
    assert report["ssl"]["version"] == "TLSv1.3"
    assert report["ssl"]["cn"] == ORDERS
    assert report["unique_id"]
    assert echoed == b"ping\n"
    assert refused_closed
    assert foreign_refused
    # Only the allowed caller ever reached the app.
    assert [r for r in records if r.get("event") == "connection"] == [{"event": "connection"}]
    assert [r["spiffe_id"] for r in records if "spiffe_id" in r] == [ORDERS]
    denied = proxy.events("proxy_refused")
    assert any(e["peer_id"] == INTRUDER and e["reason"] == "policy_denied" for e in denied)
    closed = proxy.wait_for("proxy_connection_closed", peer_id=ORDERS)
    assert closed["bytes_in"] == 5
    assert closed["bytes_out"] > 5
    assert 'trustmesh_proxy_connections_total{mode="inbound-tcp"} 3.0' in metrics
    assert 'trustmesh_proxy_refusals_total{mode="inbound-tcp",reason="policy_denied"} 1.0' in (
        metrics
    )
    assert "trustmesh_proxy_handshake_seconds_count" in metrics


@pytest.mark.slow
def test_tcp_mode_cuts_a_revoked_caller_and_old_connections(
    ca: CertificateAuthority, home: Path, tmp_path: Path
) -> None:
    """With the CA's revocation feed, an open TCP connection of a caller is closed once its
    serial is revoked; --max-connection-age closes a connection that got too old."""
    from trustmesh.client import CAClient

    from ._server import running_server

    orders = issue(ca, ORDERS, tmp_path)
    other = issue(ca, ORDERS, tmp_path)
    with (
        running_server(home, tmp_path) as ca_server,
        _inbound(
            ca,
            tmp_path,
            "proxy_v2_app.js",
            *("--allow-id", ORDERS, "--ca", ca_server.url, "--max-connection-age", "3s"),
        ) as (_app, proxy),
    ):
        with _tls(ca, orders, proxy.port) as doomed, _tls(ca, other, proxy.port) as aging:
            json.loads(_line(doomed))
            json.loads(_line(aging))
            with CAClient(
                ca_server.url, bundle=ca_server.bundle, cert=orders.chain, key=orders.key
            ) as ca_api:
                ca_api.revoke(serial=format(orders.serial, "x"))
            revoked = proxy.wait_for("proxy_connection_closed", reason="revoked")
            doomed_closed = _closed(doomed)
            aging.sendall(b"still here\n")
            alive = _line(aging)
            aged = proxy.wait_for("proxy_connection_closed", reason="max_connection_age")
            aging_closed = _closed(aging)
        again_refused = _refused(ca, orders, proxy.port)
        proxy.wait_for("proxy_refused", reason="revoked")
        assert proxy.stop() == 0, proxy.log_path.read_text()
    assert again_refused
    assert revoked["peer_id"] == ORDERS
    assert doomed_closed
    assert alive == b"still here\n"
    assert aged["duration"] >= 3
    assert aging_closed


@pytest.mark.slow
def test_tcp_mode_drains_open_connections_on_sigterm(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """After SIGTERM the sidecar accepts no new connection, an open one keeps working until
    it ends, then the process exits 0."""
    orders = issue(ca, ORDERS, tmp_path)
    with (
        _inbound(
            ca,
            tmp_path,
            "proxy_v2_app.js",
            *("--allow-id", ORDERS, "--no-revocation", "--drain-timeout", "30s"),
        ) as (_app, proxy),
    ):
        with _tls(ca, orders, proxy.port) as open_conn:
            json.loads(_line(open_conn))
            proxy.process.send_signal(signal.SIGTERM)
            proxy.wait_for("proxy_draining")
            newcomer = _refused(ca, orders, proxy.port)
            open_conn.sendall(b"in flight\n")
            echoed = _line(open_conn)
            assert proxy.process.poll() is None
        code = proxy.process.wait(timeout=30)
    assert newcomer
    assert echoed == b"in flight\n"
    assert code == 0, proxy.log_path.read_text()
    assert proxy.wait_for("proxy_connection_closed")["reason"] == "done"


@pytest.mark.slow
def test_tcp_mode_without_proxy_protocol_sends_raw_bytes_and_says_so(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """--no-proxy-protocol: the app's first bytes are the caller's own, and the sidecar
    logs that the app cannot learn the caller."""
    orders = issue(ca, ORDERS, tmp_path)
    with _inbound(
        ca,
        tmp_path,
        "proxy_v2_app.js",
        *("--allow-id", ORDERS, "--no-revocation", "--no-proxy-protocol"),
    ) as (_app, proxy):
        with _tls(ca, orders, proxy.port) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            report = json.loads(_line(sock))
        warning = proxy.wait_for("proxy_protocol_disabled")
    assert report == {"error": "no PROXY v2 signature", "raw": "GET / HTTP/1.0\r\n\r\n"}
    assert warning["level"] == "warning"


POLICY = f"""\
mode: enforce
rules:
  - name: orders-items
    callers: ["{ORDERS}"]
    methods: [GET, POST]
    paths: ["/items/**"]
"""


def _https(ca: CertificateAuthority, identity: Identity) -> httpx.Client:
    ctx = client_context(cadata=bundle_pem(ca), chain=identity.chain, key=identity.key)
    return httpx.Client(verify=ctx, timeout=30)


@pytest.mark.slow
def test_http_mode_sets_trusted_identity_headers_and_applies_the_policy(
    ca: CertificateAuthority, home: Path, tmp_path: Path
) -> None:
    """A plain Node.js app sees the verified caller; spoofed identity headers are replaced;
    a request the policy denies and a caller it does not know never reach the app (403
    problem+json); a revoked caller is refused on its open keep-alive connection."""
    from cryptography import x509

    from trustmesh.client import CAClient

    from ._server import running_server

    (tmp_path / "policy.yaml").write_text(POLICY)
    orders = issue(ca, ORDERS, tmp_path)
    doomed = issue(ca, ORDERS, tmp_path)
    intruder = issue(ca, INTRUDER, tmp_path)
    metrics_port = free_port()
    spoofed = {
        "X-Trustmesh-Caller": "spiffe://example.org/admin",
        "X_Trustmesh_Caller": "spiffe://example.org/admin",
        "Client-Cert": ":AAAA:",
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Host": "evil.example",
        "Forwarded": "for=203.0.113.9",
        "X-Spiffe-Id": "spiffe://example.org/admin",
        "X-Request-Id": "kept-1",
    }
    with (
        running_server(home, tmp_path) as ca_server,
        _inbound(
            ca,
            tmp_path,
            "plain_app.js",
            "--http",
            *("--policy", str(tmp_path / "policy.yaml")),
            *("--ca", ca_server.url, "--metrics", f"127.0.0.1:{metrics_port}"),
        ) as (app, proxy),
    ):
        url = f"https://127.0.0.1:{proxy.port}"
        with _https(ca, orders) as http:
            allowed = http.get(f"{url}/items/1?q=2", headers=spoofed)
            posted = http.post(f"{url}/items/new", content=b"hello body")
            denied = http.delete(f"{url}/items/1")
        with _https(ca, intruder) as http:
            stranger = http.get(f"{url}/items/1")
        with _https(ca, doomed) as http:
            before = http.get(f"{url}/items/doomed")
            with CAClient(
                ca_server.url, bundle=ca_server.bundle, cert=doomed.chain, key=doomed.key
            ) as ca_api:
                ca_api.revoke(serial=format(doomed.serial, "x"))
            for _ in range(200):
                cut = http.get(f"{url}/items/doomed")
                if cut.status_code != 200:
                    break
                time.sleep(0.05)
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        records = app.records()
        assert proxy.stop() == 0, proxy.log_path.read_text()
    assert allowed.status_code == 200, allowed.text
    seen = allowed.json()["headers"]
    assert allowed.json()["caller"] == ORDERS
    assert seen["x-trustmesh-caller"] == ORDERS
    assert "x_trustmesh_caller" not in seen
    assert "x-spiffe-id" not in seen
    assert "x-forwarded-host" not in seen
    assert "forwarded" not in seen
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-request-id"] == "kept-1"
    leaf = x509.load_der_x509_certificate(base64.b64decode(seen["client-cert"].strip(":")))
    assert leaf.serial_number == orders.serial
    assert posted.json()["body"] == "hello body"
    for refused in (denied, stranger):
        assert refused.status_code == 403, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["reason"] == "policy_denied"
    assert before.status_code == 200
    assert cut.status_code == 403, cut.text
    assert cut.json()["reason"] == "revoked"
    # The app saw only allowed requests: not the DELETE, not the intruder's GET /items/1.
    assert [(r["method"], r["url"]) for r in records[:3]] == [
        ("GET", "/items/1?q=2"),
        ("POST", "/items/new"),
        ("GET", "/items/doomed"),
    ]
    assert {r["url"] for r in records[3:]} <= {"/items/doomed"}  # until the feed told it
    assert all(r["headers"]["x-trustmesh-caller"] == ORDERS for r in records)
    assert 'trustmesh_proxy_requests_total{status="403"} 3.0' in metrics
    assert 'trustmesh_proxy_connections_total{mode="inbound-http"}' in metrics
    assert 'trustmesh_service_requests_total{outcome="deny",reason="revoked"} 1.0' in metrics
    assert 'trustmesh_proxy_handshake_seconds_count{mode="inbound-http"}' in metrics
    opened = proxy.events("proxy_connection_open")
    assert {e["peer_id"] for e in opened} == {ORDERS, INTRUDER}


@pytest.mark.slow
def test_http_mode_drains_on_sigterm_and_caps_connection_age(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """An in-flight request completes after SIGTERM and the process exits 0; a keep-alive
    connection older than --max-connection-age gets Connection: close."""
    orders = issue(ca, ORDERS, tmp_path)
    with (
        _inbound(
            ca,
            tmp_path,
            "plain_app.js",
            "--http",
            *("--allow-id", ORDERS, "--no-revocation"),
            *("--max-connection-age", "2s", "--drain-timeout", "20s"),
        ) as (app, proxy),
    ):
        url = f"https://127.0.0.1:{proxy.port}"
        with _https(ca, orders) as http:
            young = http.get(f"{url}/a")
            time.sleep(2.5)
            old = http.get(f"{url}/b")
            after = http.get(f"{url}/c")  # a new connection
        results: list[httpx.Response | BaseException] = []

        def slow() -> None:
            try:
                with _https(ca, orders) as client:
                    results.append(client.get(f"{url}/slow?ms=3000"))
            except BaseException as exc:  # reported below
                results.append(exc)

        worker = threading.Thread(target=slow)
        worker.start()
        deadline = time.monotonic() + 20
        while not any(r["url"].startswith("/slow") for r in app.records()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        code = proxy.stop()
        worker.join(30)
    assert young.headers.get("connection") != "close"
    assert old.headers["connection"] == "close"
    assert after.status_code == 200
    assert code == 0, proxy.log_path.read_text()
    assert len(results) == 1
    finished = results[0]
    assert isinstance(finished, httpx.Response), finished
    assert finished.status_code == 200
    closed = proxy.events("proxy_connection_closed")
    assert any(e["reason"] == "max_connection_age" for e in closed), closed


@pytest.mark.slow
def test_http_mode_answers_502_problem_when_the_app_is_down(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """With nothing listening at --to, an allowed caller gets 502 problem+json naming the
    app's address, and the failure is logged."""
    orders = issue(ca, ORDERS, tmp_path)
    with (
        _sidecar_to(
            ca,
            tmp_path,
            f"127.0.0.1:{free_port()}",
            *("--http", "--allow-id", ORDERS, "--no-revocation"),
        ) as proxy,
        _https(ca, orders) as http,
    ):
        down = http.get(f"https://127.0.0.1:{proxy.port}/items")
        failed = proxy.wait_for("proxy_app_failed")
    assert down.status_code == 502, down.text
    assert down.headers["content-type"] == "application/problem+json"
    assert down.json()["reason"] == "upstream_unavailable"
    assert "Check that the app listens on http://127.0.0.1:" in down.json()["detail"]
    assert failed["reason"] == "upstream_unavailable"


def test_tcp_mode_caller_rules_from_a_policy_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TCP mode decides on the caller alone: deny rules win over allow rules, globs match
    per segment, a reload that narrows a rule is refused (the previous policy stays) and
    audit mode lets a refused caller in with a warning."""
    from trustmesh.proxy._callers import CallerRules

    path = tmp_path / "policy.yaml"
    path.write_text(
        "rules:\n"
        "  - name: no-intruder\n    effect: deny\n    callers: ['spiffe://example.org/svc/intruder']\n"
        "  - name: services\n    callers: ['spiffe://example.org/svc/*']\n"
    )
    rules = CallerRules(path, ())
    assert rules.decide(ORDERS)[0]
    assert rules.decide(INTRUDER) == (
        False,
        f"deny rule 'no-intruder' (rules[0]) matches {INTRUDER}",
    )
    assert not rules.decide("spiffe://example.org/svc/orders/v2")[0]
    path.write_text(
        "rules:\n  - name: reads\n    callers: ['spiffe://example.org/**']\n    paths: ['/items']\n"
    )
    assert rules._file is not None
    assert rules._file.reload()  # the file itself is a valid policy, for HTTP mode
    with caplog.at_level("ERROR", logger="trustmesh.proxy"):
        assert rules.decide(ORDERS)[0]
        assert not rules.decide(INTRUDER)[0]
    assert "keeping the previous policy" in caplog.text
    assert "narrows paths" in caplog.text
    audit = tmp_path / "audit.yaml"
    audit.write_text(f"mode: audit\nrules:\n  - name: only-orders\n    callers: ['{ORDERS}']\n")
    allowed, reason = CallerRules(audit, ()).decide(INTRUDER)
    assert allowed
    assert reason.startswith("audit mode, would deny")


def test_inbound_refuses_bad_settings_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No caller rule, both --policy and --allow-id, a TCP-mode policy that narrows paths,
    token options without --http, and a missing revocation choice exit 2 with the fix."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"rules:\n  - name: reads\n    callers: ['{ORDERS}']\n    methods: [GET]\n")
    base = ["proxy", "inbound", "--id", SIDECAR_ID, "--cert-dir", str(tmp_path)]
    base += ["--to", "127.0.0.1:3000"]
    assert main([*base, "--no-revocation"]) == 2
    assert "Give either --policy FILE or --allow-id" in capsys.readouterr().err
    assert main([*base, "--no-revocation", "--policy", str(policy), "--allow-id", ORDERS]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*base, "--no-revocation", "--policy", str(policy)]) == 2
    assert "narrows methods, which TCP mode cannot see" in capsys.readouterr().err
    assert main([*base, "--no-revocation", "--allow-id", ORDERS, "--require-token"]) == 2
    assert "add --http" in capsys.readouterr().err
    assert main([*base, "--allow-id", ORDERS]) == 2
    assert "No --ca given" in capsys.readouterr().err
    assert main([*base, "--no-revocation", "--allow-id", "orders"]) == 2
    assert "callers[0]" in capsys.readouterr().err
    assert main([*base, "--no-revocation", "--allow-id", ORDERS, "--max-connection-age", "x"]) == 2
    assert "--max-connection-age" in capsys.readouterr().err


def test_inbound_port_in_use_is_a_one_line_error(
    ca: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A port in use is a one-line error naming --listen, exit 1."""
    cert_dir = tmp_path / "certs"
    write_identity(ca, cert_dir, SIDECAR_ID)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(
            [
                *("proxy", "inbound", "--id", SIDECAR_ID, "--cert-dir", str(cert_dir)),
                *("--listen", f"127.0.0.1:{port}", "--to", "127.0.0.1:1"),
                *("--allow-id", ORDERS, "--no-revocation"),
            ]
        )
    assert code == 1
    assert "Pick another --listen" in capsys.readouterr().err


def test_inbound_refuses_missing_or_foreign_identity_files(
    ca: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty --cert-dir and files for another SPIFFE ID than --id exit 2 naming the file."""
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    write_identity(ca, other, ORDERS)
    base = ["proxy", "inbound", "--id", SIDECAR_ID, "--to", "127.0.0.1:1"]
    base += ["--listen", f"127.0.0.1:{free_port()}", "--allow-id", ORDERS, "--no-revocation"]
    assert main([*base, "--cert-dir", str(empty)]) == 2
    assert "Cannot load the workload identity" in capsys.readouterr().err
    assert main([*base, "--cert-dir", str(other)]) == 2
    assert f"is for {ORDERS}, expected {SIDECAR_ID}" in capsys.readouterr().err


#: Headers only a trusted hop may set (trustmesh.headers): request-line overrides that
#: would steer an app past the policy, and client addresses an app might believe.
STEERING = [
    ("X-Original-URL", "/admin"),
    ("X-Rewrite-URL", "/admin"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-Original-Method", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("True-Client-IP", "203.0.113.9"),
    ("X-Client-IP", "203.0.113.9"),
    ("X-Cluster-Client-IP", "203.0.113.9"),
    ("CF-Connecting-IP", "203.0.113.9"),
    ("Fastly-Client-IP", "203.0.113.9"),
    ("X-Real-IP", "203.0.113.9"),
    ("X-Forwarded-For", "203.0.113.9"),
    ("Forwarded", "for=203.0.113.9"),
    ("X-Trustmesh-Caller", "spiffe://example.org/admin"),
]


def spellings(name: str) -> list[str]:
    """NAME as written, lower case, upper case, with ``_`` for ``-``, and mixed."""
    under = name.replace("-", "_")
    return [name, name.lower(), name.upper(), under, under.lower(), under.swapcase()]


def steering_request(path: str) -> bytes:
    """A GET for PATH carrying every STEERING header in every spelling, twice each."""
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "X-Kept: yes"]
    for name, value in STEERING:
        for spelled in spellings(name):
            lines += [f"{spelled}: {value}", f"{spelled}: {value}-again"]
    lines += ["Connection: close", "", ""]
    return "\r\n".join(lines).encode("ascii")


def _response(sock: ssl.SSLSocket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.slow
def test_http_mode_strips_overrides_and_client_addresses_in_every_spelling(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """X-Original-URL, X-HTTP-Method-Override, True-Client-IP and the rest of the shared
    list (trustmesh.headers, which the gateway strips too) never reach the app, whatever
    the case, ``_`` for ``-`` or the number of copies; the sidecar's own headers do."""
    from trustmesh.headers import is_spoofable

    (tmp_path / "policy.yaml").write_text(POLICY)
    orders = issue(ca, ORDERS, tmp_path)
    with _inbound(
        ca,
        tmp_path,
        "plain_app.js",
        *("--http", "--policy", str(tmp_path / "policy.yaml"), "--no-revocation"),
    ) as (app, proxy):
        with _tls(ca, orders, proxy.port) as sock:
            sock.sendall(steering_request("/items/1"))
            answer = _response(sock)
        records = app.records()
        assert proxy.stop() == 0, proxy.log_path.read_text()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert len(records) == 1
    seen = records[0]
    raw_names = seen["raw"][0::2]
    assert "X-Kept" in raw_names or "x-kept" in raw_names
    sidecar_set = {"x-forwarded-for", "x-forwarded-proto", "x-trustmesh-caller", "client-cert"}
    for name in raw_names:
        normalized = name.lower().replace("_", "-")
        if is_spoofable(name):
            assert normalized in sidecar_set, f"{name} reached the app: {seen['raw']}"
    # What the sidecar sets comes once, from the verified connection.
    assert seen["headers"]["x-trustmesh-caller"] == ORDERS
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert seen["method"] == "GET"
    assert seen["url"] == "/items/1"
    names = [n.lower().replace("_", "-") for n in raw_names]
    for name, _value in STEERING:
        lowered = name.lower()
        if lowered in sidecar_set:
            assert names.count(lowered) == 1, seen["raw"]
        else:
            assert lowered not in names, seen["raw"]
