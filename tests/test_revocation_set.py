"""The revocation set client against real `ca serve` processes: bootstrap, live
revocations over the event stream, resuming from the cursor after a restart, the CRL
fallback (served by a small local HTTPS server), and failing closed (or, when asked,
open) after the grace period."""

from __future__ import annotations

import http.server
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.client import CAClient
from trustmesh.errors import ConfigError
from trustmesh.pki import KeyType, dump_private_key, pem_certificates
from trustmesh.tls import RevocationSet, RotatingCredentials, canonical_serial, server_context

from ._server import ADMIN, Server, free_port, running_server
from .conftest import PASSPHRASE

LOGGER = "trustmesh.tls.revocation"


def write_identity(ca: CertificateAuthority, spiffe_id: str, directory: Path) -> str:
    """Write key.pem, chain.pem and bundle.pem as the agent does; return the serial."""
    issued = ca.issue(spiffe_id, ips=["127.0.0.1"])
    assert issued.key is not None
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "key.pem").write_bytes(dump_private_key(issued.key))
    (directory / "chain.pem").write_bytes(pem_certificates(issued.chain))
    (directory / "bundle.pem").write_bytes(pem_certificates(ca.bundle))
    return issued.record.serial


def setup_ca(tmp_path: Path, db_url: str | None = None) -> Path:
    home = tmp_path / "home"
    CertificateAuthority.init(
        home,
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
        db_url=db_url,
    ).close()
    return home


def crash(server: Server) -> None:
    """Kill the CA server process (no graceful shutdown): its connections drop at once."""
    server.process.kill()
    server.process.wait(10)


def open_ca(home: Path) -> CertificateAuthority:
    return CertificateAuthority.open(home, passphrase=PASSPHRASE)


def wait_until(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return bool(predicate())  # type: ignore[operator]


@dataclass
class Setup:
    home: Path
    victims: list[str]


@pytest.fixture
def identities(tmp_path: Path) -> Setup:
    """A CA with a subscriber identity, an admin identity and three victims."""
    home = setup_ca(tmp_path)
    with open_ca(home) as ca:
        write_identity(ca, "spiffe://example.org/svc/subscriber", tmp_path / "subscriber")
        write_identity(ca, ADMIN, tmp_path / "admin")
        victims = [
            write_identity(ca, f"spiffe://example.org/svc/victim{i}", tmp_path / f"v{i}")
            for i in range(3)
        ]
    return Setup(home, victims)


def subscriber_set(tmp_path: Path, url: str, **kwargs: object) -> RevocationSet:
    creds = RotatingCredentials(tmp_path / "subscriber")
    return RevocationSet(
        url,
        creds.client_context,
        issuers=creds.intermediates,
        **kwargs,  # type: ignore[arg-type]
    )


def test_bootstrap_then_live_revocations_within_a_second(tmp_path: Path, identities: Setup) -> None:
    """Revocations made before start are loaded by paging; one made through the CA API
    and one through `trustmesh revoke --ca` are seen within a second each."""
    home, victims = identities.home, identities.victims
    with open_ca(home) as ca:
        ca.revoke(victims[0], reason="keyCompromise")
        extra = [
            write_identity(ca, f"spiffe://example.org/x{i}", tmp_path / f"x{i}") for i in range(3)
        ]
        for serial in extra:
            ca.revoke(serial)
    with running_server(home, tmp_path) as server:
        revset = subscriber_set(tmp_path, server.url)
        assert not revset.healthy
        with revset:
            assert revset.wait_connected(10)
            assert revset.healthy
            assert revset.is_revoked(victims[0])
            assert revset.is_revoked(int(victims[0], 16))
            assert revset.is_revoked("0x" + victims[0].upper())
            assert all(revset.is_revoked(s) for s in extra)
            assert not revset.is_revoked(victims[1])
            assert len(revset) == 4
            first_cursor = revset.cursor
            assert first_cursor > 0

            admin = tmp_path / "admin"
            with CAClient(
                server.url, bundle=server.bundle, cert=admin / "chain.pem", key=admin / "key.pem"
            ) as client:
                started = time.monotonic()
                client.revoke(victims[1], reason="superseded")
                assert wait_until(lambda: revset.is_revoked(victims[1]), 1.0)
                assert time.monotonic() - started < 1.0

            started = time.monotonic()
            code = main(
                [
                    "revoke",
                    victims[2],
                    "--ca",
                    server.url,
                    "--cert",
                    str(admin / "chain.pem"),
                    "--key",
                    str(admin / "key.pem"),
                    "--bundle",
                    str(server.bundle),
                ]
            )
            assert code == 0
            assert wait_until(lambda: revset.is_revoked(victims[2]), 1.0)
            assert time.monotonic() - started < 1.5  # includes the CLI's own TLS setup
            assert revset.cursor > first_cursor
            assert revset.wait_for(revset.cursor, 0.1)
            assert not revset.wait_for(revset.cursor + 1000, 0.1)
            metrics = revset.metrics()
            assert metrics["connected"] == 1.0
            assert metrics["revoked"] == 6
            assert metrics["events_total"] == 6
            assert metrics["connects_total"] == 1
            assert metrics["healthy"] == 1.0
        assert not revset.connected  # stopped: no longer following the feed
        assert not revset.healthy
        assert revset.is_revoked(victims[0])


def test_resumes_from_its_cursor_after_a_restart(
    tmp_path: Path, identities: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """When the CA goes away, revocations recorded meanwhile are delivered once it is
    back: the set reconnects from its cursor and misses nothing."""
    caplog.set_level(logging.INFO, logger="trustmesh.tls")
    home, victims = identities.home, identities.victims
    port = free_port()
    with running_server(home, tmp_path, port=port) as server:
        revset = subscriber_set(tmp_path, server.url, grace=timedelta(seconds=30))
        revset.start()
        assert revset.wait_connected(10)
        cursor = revset.cursor
        crash(server)
    try:
        # The server stopped when the block above ended.
        assert wait_until(lambda: not revset.connected, 10)
        with open_ca(home) as ca:
            ca.revoke(victims[0])
            ca.revoke(victims[1])
            last = ca.revocations_since(cursor)[-1].cursor
        assert not revset.is_revoked(victims[0])
        assert revset.healthy  # within grace: still answering from the last set
        with running_server(home, tmp_path, port=port):
            assert revset.wait_connected(15)
            assert revset.wait_for(last, 5)
            assert revset.is_revoked(victims[0])
            assert revset.is_revoked(victims[1])
            assert not revset.is_revoked(victims[2])
            assert revset.disconnects >= 1
            assert revset.connects >= 2
            revset.stop()
    finally:
        revset.stop()
    lost = [r for r in caplog.records if "lost the revocation feed" in r.getMessage()]
    assert lost
    assert f"reconnecting from cursor {cursor}" in lost[0].getMessage()


class CRLServer:
    """A small HTTPS server that serves whatever CRL it is given at /crl."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.der = b""
        self.hits = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                self.send_response(200)
                self.send_header("content-type", "application/pkix-crl")
                self.send_header("content-length", str(len(outer.der)))
                self.end_headers()
                self.wfile.write(outer.der)

            def log_message(self, *_: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/crl"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def test_falls_back_to_a_verified_crl_while_the_feed_is_down(
    tmp_path: Path, identities: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """With the CA down, a revocation published only in the CRL (fetched from a mirror
    over HTTPS and verified against the CA chain) reaches the set, and the fresh CRL
    keeps the set healthy past the grace period; a CRL of another CA is refused."""
    caplog.set_level(logging.INFO, logger="trustmesh.tls")
    home, victims = identities.home, identities.victims
    with open_ca(home) as ca:
        write_identity(ca, "spiffe://example.org/crl-mirror", tmp_path / "mirror")
    mirror_dir = tmp_path / "mirror"
    mirror = CRLServer(
        server_context(
            mirror_dir / "chain.pem",
            mirror_dir / "key.pem",
            client_cert="optional",
            cadata=(mirror_dir / "bundle.pem").read_text(),
        )
    )
    try:
        with running_server(home, tmp_path) as server:
            revset = subscriber_set(
                tmp_path,
                server.url,
                grace=timedelta(seconds=1.5),
                crl_url=mirror.url,
                crl_interval=0.2,
            )
            revset.start()
            assert revset.wait_connected(10)
            crash(server)
        with revset_stopped(revset):
            assert wait_until(lambda: not revset.connected, 10)
            with open_ca(home) as ca:
                ca.revoke(victims[0], reason="keyCompromise")
                mirror.der = ca.crl().public_bytes(serialization.Encoding.DER)
            assert wait_until(lambda: revset.is_revoked(victims[0]), 5)
            assert revset.crl_refreshes >= 1
            time.sleep(2.0)  # longer than grace: the CRL keeps the set in contact
            assert revset.healthy
            assert not revset.is_revoked(victims[1])

            foreign_home = setup_ca(tmp_path / "foreign")
            with open_ca(foreign_home) as foreign:
                mirror.der = foreign.crl().public_bytes(serialization.Encoding.DER)
            failures = revset.crl_failures
            assert wait_until(lambda: revset.crl_failures > failures, 5)
            assert revset.is_revoked(victims[0])  # never forgets a revocation

            # A CRL an hour old (replayed, or a stale mirror) adds its revocations but is
            # no proof of contact: the set still fails closed after grace.
            with open_ca(home) as ca:
                ca.revoke(victims[1])
                old = ca.crl(now=datetime.now(UTC) - timedelta(hours=1))
                mirror.der = old.public_bytes(serialization.Encoding.DER)
            assert revset.wait_revoked(victims[1], 5)
            assert wait_until(lambda: not revset.healthy, 5)
            assert revset.is_revoked(victims[2])
    finally:
        mirror.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("refreshed from CRL" in m for m in messages)
    assert any("not signed by a trust anchor" in m for m in messages)
    assert any("does not count as contact" in m for m in messages)


@pytest.mark.slow
def test_crl_fallback_accepts_the_active_intermediate_during_a_rotation(
    tmp_path: Path, identities: Setup
) -> None:
    """After an intermediate rotation, a set whose own chain holds the old intermediate
    accepts the CRL the new one signs (learnt from the feed's bundle event, verified to
    the root) while the feed is down: it learns a revocation of a new-issuer certificate
    and stays healthy past grace; a CRL of another CA is still refused."""
    home = identities.home
    config = home / "config.toml"
    config.write_text(
        config.read_text().replace('rotation_min_overlap = "1h"', 'rotation_min_overlap = "1s"')
    )
    mirror_dir = tmp_path / "subscriber"
    mirror = CRLServer(
        server_context(
            mirror_dir / "chain.pem",
            mirror_dir / "key.pem",
            client_cert="optional",
            cadata=(mirror_dir / "bundle.pem").read_text(),
        )
    )
    try:
        with running_server(home, tmp_path) as server:
            revset = subscriber_set(
                tmp_path,
                server.url,
                grace=timedelta(seconds=1.5),
                crl_url=mirror.url,
                crl_interval=0.2,
            )
            revset.start()
            assert revset.wait_connected(10)
            with open_ca(home) as ca:
                now = datetime.now(UTC).replace(microsecond=0)
                ca.rotate("intermediate", "prepare", now=now)
                activated = ca.rotate("intermediate", "activate", now=now + timedelta(seconds=2))
                sequence = ca.bundle_sequence
            assert activated is not None
            # The running CA picks the steps up and pushes a bundle event.
            assert revset.wait_bundle(sequence, 15)
            assert len(revset.published_intermediates) == 2
            crash(server)
        with revset_stopped(revset):
            assert wait_until(lambda: not revset.connected, 10)
            own = RotatingCredentials(tmp_path / "subscriber").intermediates()
            with open_ca(home) as ca:
                newcomer = ca.issue("spiffe://example.org/svc/newcomer")
                ca.revoke(newcomer.record.serial)
                crl = ca.crl()
            assert crl.issuer not in {c.subject for c in own}  # the other intermediate's
            mirror.der = crl.public_bytes(serialization.Encoding.DER)
            assert revset.wait_revoked(newcomer.record.serial, 5)
            time.sleep(2.0)  # longer than grace: the new intermediate's CRL is contact
            assert revset.healthy
            assert not revset.is_revoked(identities.victims[0])

            foreign_home = setup_ca(tmp_path / "foreign")
            with open_ca(foreign_home) as foreign:
                mirror.der = foreign.crl().public_bytes(serialization.Encoding.DER)
            failures = revset.crl_failures
            assert wait_until(lambda: revset.crl_failures > failures, 5)
            assert wait_until(lambda: not revset.healthy, 5)
    finally:
        mirror.close()


class revset_stopped:  # noqa: N801 - used as a context manager
    def __init__(self, revset: RevocationSet) -> None:
        self.revset = revset

    def __enter__(self) -> RevocationSet:
        return self.revset

    def __exit__(self, *_: object) -> None:
        self.revset.stop()


def test_fails_closed_after_grace_and_recovers(
    tmp_path: Path, identities: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """With neither feed nor CRL reachable for longer than grace, every serial counts as
    revoked (logged once, loudly); a set configured to fail open keeps answering from
    its last state (logged as a warning); both recover when the CA is back."""
    caplog.set_level(logging.INFO, logger="trustmesh.tls")
    home, victims = identities.home, identities.victims
    with open_ca(home) as ca:
        ca.revoke(victims[0])
    port = free_port()
    grace = timedelta(seconds=1)
    with running_server(home, tmp_path, port=port) as server:
        closed = subscriber_set(tmp_path, server.url, grace=grace)
        opened = subscriber_set(tmp_path, server.url, grace=grace, fail_closed=False)
        closed.start()
        opened.start()
        assert closed.wait_connected(10)
        assert opened.wait_connected(10)
        crash(server)
    try:
        assert wait_until(lambda: not closed.connected and not opened.connected, 10)
        assert not closed.is_revoked(victims[1])  # within grace
        assert wait_until(lambda: closed.is_revoked(victims[1]), 5)
        for _ in range(100):
            assert closed.is_revoked(victims[2])
        assert not closed.healthy
        assert closed.fail_closed_lookups >= 100
        assert wait_until(lambda: not opened.healthy, 5)  # its grace has passed too
        assert not opened.is_revoked(victims[1])
        assert opened.is_revoked(victims[0])
        with running_server(home, tmp_path, port=port):
            assert closed.wait_connected(15)
            assert opened.wait_connected(15)
            assert not closed.is_revoked(victims[1])
            assert closed.is_revoked(victims[0])
            assert closed.healthy
            closed.stop()
            opened.stop()
    finally:
        closed.stop()
        opened.stop()
    messages = [r.getMessage() for r in caplog.records]
    failing = [m for m in messages if "FAILING CLOSED" in m]
    assert len(failing) == 1
    assert "every certificate is treated as revoked" in failing[0]
    assert [r.levelname for r in caplog.records if "FAILING CLOSED" in r.getMessage()] == ["ERROR"]
    assert sum("fails OPEN" in m for m in messages) == 1
    # Recovery is logged at WARNING, by whichever answered first: the stream or the CRL.
    recovered = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and ("is back after" in r.getMessage() or "refreshed from CRL" in r.getMessage())
    ]
    assert recovered


def test_bad_arguments_and_serial_forms() -> None:
    """Serials compare in one canonical form; a non-https CA URL is refused with a fix."""
    assert canonical_serial(0x0ABC) == "abc"
    assert canonical_serial("00:0A:BC") == "abc"
    assert canonical_serial("0x0abc") == "abc"
    with pytest.raises(ValueError, match="not a certificate serial"):
        canonical_serial("xyz")
    with pytest.raises(ConfigError, match="must use https"):
        RevocationSet("http://ca:8443", ssl.create_default_context)


@pytest.mark.postgres
def test_revocation_on_one_replica_reaches_a_set_following_another(
    tmp_path: Path, pg_url: str
) -> None:
    """Two `ca serve` replicas share PostgreSQL: a set following replica B sees
    revocations made on replica A within a second each."""
    home = setup_ca(tmp_path, pg_url)
    with open_ca(home) as ca:
        write_identity(ca, "spiffe://example.org/svc/subscriber", tmp_path / "subscriber")
        write_identity(ca, ADMIN, tmp_path / "admin")
        targets = [
            write_identity(ca, f"spiffe://example.org/t{i}", tmp_path / f"t{i}") for i in range(3)
        ]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    admin = tmp_path / "admin"
    with (
        running_server(home, tmp_path / "a") as replica_a,
        running_server(home, tmp_path / "b") as replica_b,
    ):
        revset = subscriber_set(tmp_path, replica_b.url)
        with (
            revset,
            CAClient(
                replica_a.url,
                bundle=replica_a.bundle,
                cert=admin / "chain.pem",
                key=admin / "key.pem",
            ) as client,
        ):
            assert revset.wait_connected(10)
            for serial in targets:
                started = time.monotonic()
                client.revoke(serial)
                assert wait_until(lambda s=serial: revset.is_revoked(s), 1.0)
                assert time.monotonic() - started < 1.0


def test_an_unreachable_ca_at_start_is_logged_once_and_fails_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A set that never reached its CA says so once (feed and CRL), keeps retrying, and
    fails closed once grace has passed."""
    caplog.set_level(logging.DEBUG, logger="trustmesh.tls")
    url = f"https://127.0.0.1:{free_port()}"
    revset = RevocationSet(
        url, ssl.create_default_context, grace=timedelta(seconds=0.5), crl_interval=0.1
    )
    with revset:
        assert not revset.is_revoked(1)
        assert wait_until(lambda: revset.is_revoked(1), 5)
        assert wait_until(lambda: revset.crl_failures >= 3, 5)
        assert not revset.healthy
        assert revset.last_error is not None
        assert "ConnectError" in revset.last_error
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("cannot reach the revocation feed" in m for m in warnings) == 1
    assert sum("CRL fallback failed" in m for m in warnings) == 1
    assert sum("FAILING CLOSED" in r.getMessage() for r in caplog.records) == 1
