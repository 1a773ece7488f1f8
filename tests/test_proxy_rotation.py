"""The issue's rotation proof for the sidecars: 10 renewals during 30 s of traffic through
each sidecar (inbound HTTP, inbound TCP, outbound), zero failed requests."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from trustmesh.authority import CertificateAuthority
from trustmesh.tls import client_context

from ._services import bundle_pem, issue
from ._sidecar import ORDERS, SIDECAR_ID, node_app, sidecar, write_identity

TCP_ID = "spiffe://example.org/svc/legacy-tcp"
ROTATIONS = 10
PAUSE = 3.0


def _serial(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> int:
    der = ssl_object.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class Traffic:
    """Threads that call a sidecar in a loop and remember every failure."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.counts: dict[str, int] = {}
        self.threads: list[threading.Thread] = []

    def run(self, name: str, call: Callable[[], None]) -> None:
        self.counts[name] = 0

        def loop() -> None:
            while not self.stop.is_set():
                try:
                    call()
                    self.counts[name] += 1
                except Exception as exc:
                    self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
                time.sleep(0.02)

        thread = threading.Thread(target=loop, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


@pytest.mark.slow
def test_ten_renewals_during_thirty_seconds_of_traffic_through_each_sidecar(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """Inbound HTTP, inbound TCP and outbound sidecars renew their identity 10 times while
    new and keep-alive connections flow through each: nothing fails, new connections
    present the newest certificate, and connections opened before the first renewal last."""
    http_dir, tcp_dir, out_dir = tmp_path / "http", tmp_path / "tcp", tmp_path / "out"
    serials = {
        "http": [write_identity(ca, http_dir, SIDECAR_ID)],
        "tcp": [write_identity(ca, tcp_dir, TCP_ID)],
        "out": [write_identity(ca, out_dir, ORDERS)],
    }
    orders = issue(ca, ORDERS, tmp_path)
    ctx = client_context(cadata=bundle_pem(ca), chain=orders.chain, key=orders.key)
    common = ("--no-revocation", "--log-level", "warning")
    with (
        node_app("plain_app.js", tmp_path) as web,
        node_app("proxy_v2_app.js", tmp_path) as echo,
        sidecar(
            "inbound",
            tmp_path,
            *("--id", SIDECAR_ID, "--cert-dir", str(http_dir), "--http"),
            *("--to", f"127.0.0.1:{web.port}", "--allow-id", ORDERS, *common),
            name="http",
        ) as http_proxy,
        sidecar(
            "inbound",
            tmp_path,
            *("--id", TCP_ID, "--cert-dir", str(tcp_dir), "--to", f"127.0.0.1:{echo.port}"),
            *("--allow-id", ORDERS, *common),
            name="tcp",
        ) as tcp_proxy,
        sidecar(
            "outbound",
            tmp_path,
            *("--id", ORDERS, "--cert-dir", str(out_dir), "--expect-id", SIDECAR_ID),
            *("--to", f"127.0.0.1:{http_proxy.port}", *common),
            name="out",
        ) as out_proxy,
        httpx.Client(verify=ctx, timeout=30) as mtls,
        httpx.Client(timeout=30) as plain,
    ):
        https = f"https://127.0.0.1:{http_proxy.port}"
        local = f"http://127.0.0.1:{out_proxy.port}"
        close = {"Connection": "close"}

        def http_new() -> None:
            response = mtls.get(f"{https}/new", headers=close)
            assert response.json()["caller"] == ORDERS, response.text

        def http_kept() -> None:
            response = mtls.post(f"{https}/kept", content=b"x" * 1000)
            assert response.json()["body"] == "x" * 1000, response.text

        def outbound_new() -> None:
            response = plain.get(f"{local}/out", headers=close)
            assert response.json()["caller"] == ORDERS, response.text

        def outbound_kept() -> None:
            response = plain.get(f"{local}/out-kept")
            assert response.json()["caller"] == ORDERS, response.text

        def tcp_connect() -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", tcp_proxy.port), timeout=30)
            sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            header = sock.recv(65536)
            assert json.loads(header)["spiffe_id"] == ORDERS
            return sock

        def tcp_new() -> None:
            with tcp_connect() as sock:
                sock.sendall(b"ping")
                assert sock.recv(4) == b"ping"

        long_lived = tcp_connect()
        lock = threading.Lock()

        def tcp_kept() -> None:
            with lock:
                long_lived.sendall(b"pong")
                assert long_lived.recv(4) == b"pong"

        def served(port: int) -> int:
            raw = socket.create_connection(("127.0.0.1", port), timeout=30)
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                return _serial(sock)

        traffic = Traffic()
        started = time.monotonic()
        for name, call in (
            ("http-new", http_new),
            ("http-kept", http_kept),
            ("tcp-new", tcp_new),
            ("tcp-kept", tcp_kept),
            ("outbound-new", outbound_new),
            ("outbound-kept", outbound_kept),
        ):
            traffic.run(name, call)
        seen: dict[str, set[int]] = {"http": set(), "tcp": set()}
        try:
            for _ in range(ROTATIONS):
                time.sleep(PAUSE)
                serials["http"].append(write_identity(ca, http_dir, SIDECAR_ID))
                serials["tcp"].append(write_identity(ca, tcp_dir, TCP_ID))
                serials["out"].append(write_identity(ca, out_dir, ORDERS))
                time.sleep(1.5)  # the sidecars look at their files every second
                seen["http"].add(served(http_proxy.port))
                seen["tcp"].add(served(tcp_proxy.port))
            time.sleep(1.0)
        finally:
            traffic.finish()
            long_lived.close()
        elapsed = time.monotonic() - started
        out_serials = {
            x509.load_der_x509_certificate(
                base64.b64decode(r["headers"]["client-cert"].strip(":"))
            ).serial_number
            for r in web.records()
            if r["url"].startswith("/out")
        }
        plain.close()  # idle keep-alive connections would hold the TCP drain open
        mtls.close()
        codes = [p.stop() for p in (out_proxy, tcp_proxy, http_proxy)]
    assert traffic.failures == [], traffic.failures[:5]
    assert elapsed >= 30
    assert all(count > 10 for count in traffic.counts.values()), traffic.counts
    assert seen["http"] == set(serials["http"][1:]), "new connections get each new certificate"
    assert seen["tcp"] == set(serials["tcp"][1:])
    assert serials["out"][-1] in out_serials, "the outbound sidecar presents its newest leaf"
    assert len(out_serials & set(serials["out"])) >= 5
    assert codes == [0, 0, 0]
