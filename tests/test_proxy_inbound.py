"""`trustmesh proxy inbound` as a real process in front of plain Node.js apps: TCP mode with
PROXY protocol v2, HTTP mode with the policy per request and identity headers, revocation,
connection age and the SIGTERM drain."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path

import httpx
import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.proxy import TLSInfo, proxy_v2_header
from trustmesh.tls import client_context

from ._server import free_port
from ._services import Identity, bundle_pem, issue
from ._sidecar import INTRUDER, ORDERS, SIDECAR_ID, node_app, sidecar, write_identity
from .conftest import PASSPHRASE


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
    cert_dir = tmp_path / "certs"
    write_identity(ca, cert_dir, SIDECAR_ID)
    orders = issue(ca, ORDERS, tmp_path)
    intruder = issue(ca, INTRUDER, tmp_path)
    foreign_ca = CertificateAuthority.init(
        tmp_path / "foreign", trust_domain="example.org", passphrase=PASSPHRASE
    )
    with foreign_ca:
        foreign = issue(foreign_ca, ORDERS, tmp_path)
    metrics_port = free_port()
    with (
        node_app("proxy_v2_app.js", tmp_path) as app,
        sidecar(
            "inbound",
            tmp_path,
            *("--id", SIDECAR_ID, "--cert-dir", str(cert_dir), "--to", f"127.0.0.1:{app.port}"),
            *("--allow-id", "spiffe://example.org/svc/ord*", "--no-revocation"),
            *("--metrics", f"127.0.0.1:{metrics_port}"),
        ) as proxy,
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

    cert_dir = tmp_path / "certs"
    write_identity(ca, cert_dir, SIDECAR_ID)
    orders = issue(ca, ORDERS, tmp_path)
    other = issue(ca, ORDERS, tmp_path)
    with (
        running_server(home, tmp_path) as ca_server,
        node_app("proxy_v2_app.js", tmp_path) as app,
        sidecar(
            "inbound",
            tmp_path,
            *("--id", SIDECAR_ID, "--cert-dir", str(cert_dir), "--to", f"127.0.0.1:{app.port}"),
            *("--allow-id", ORDERS, "--ca", ca_server.url, "--max-connection-age", "3s"),
        ) as proxy,
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


def test_inbound_ready_line_waits_for_a_free_port(ca: CertificateAuthority, tmp_path: Path) -> None:
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
