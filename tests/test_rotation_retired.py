"""After `ca rotate intermediate|root retire`, a leaf of a retired issuer is refused
everywhere the revocation feed reaches, with real processes and real handshakes (issue
17): a `ca serve`, `proxy inbound` in TCP mode in front of a Node.js TCP app, `proxy
outbound`, and `mtls_client` against `openssl s_server`.

Such a leaf still chains to a root the peer trusts (the same root after an intermediate
retire; a root the peer's bundle.pem still holds after a root retire), so only the set of
intermediates the CA publishes can tell. The tests make one with the retired
intermediate's key, as its holder could. Prepare and activate run before `ca serve`
starts (the old intermediate has signed nothing the retire must wait for, and time is
injected instead of waiting out rotation_min_overlap); the retire runs while every process
is up, so its bundle event reaches them live."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.client import mtls_client
from trustmesh.pki import KeyType, PrivateKey, pem_certificates
from trustmesh.tls import RevocationSet, client_context

from ._server import Server, free_port, running_server, stop
from ._services import Identity, bundle_pem, forge, issue
from ._sidecar import SIDECAR_ID, Sidecar, node_app, sidecar, write_identity
from .conftest import PASSPHRASE
from .test_proxy_inbound import _closed, _line, _refused, _tls
from .test_rotation_catchup import _wait

CLIENT = "spiffe://example.org/svc/orders"
SERVER = "spiffe://example.org/svc/inventory"
RETIRED = "issuer_retired"

pytestmark = pytest.mark.slow


@dataclass
class Rotation:
    """A CA whose ``role`` was prepared and activated before its `ca serve` started;
    :meth:`retire` takes the last step while it runs."""

    role: str
    home: Path
    workdir: Path
    server: Server
    #: The replaced intermediate (under the replaced root, for a root rotation) and its key.
    old: tuple[x509.Certificate, PrivateKey]
    watchers: list[RevocationSet] = field(default_factory=list)

    def ca(self) -> CertificateAuthority:
        return CertificateAuthority.open(self.home, passphrase=PASSPHRASE)

    def watcher(self) -> RevocationSet:
        """A revocation set on the CA's feed, with an identity of the new issuer."""
        with self.ca() as ca:
            me = issue(ca, CLIENT, self.workdir)
            bundle = pem_certificates(ca.bundle).decode()
        watch = RevocationSet(
            self.server.url, lambda: client_context(cadata=bundle, chain=me.chain, key=me.key)
        )
        watch.start()
        self.watchers.append(watch)
        _wait(lambda: watch.published_intermediates, 15, "the feed's first bundle event")
        return watch

    def retire(self, watch: RevocationSet) -> None:
        """`trustmesh ca rotate ROLE retire`, then wait until ``watch`` heard of it."""
        passphrase = self.workdir / "passphrase"
        passphrase.write_bytes(PASSPHRASE)
        argv = ["ca", "rotate", self.role, "retire", "--home", str(self.home)]
        assert main([*argv, "--passphrase-file", str(passphrase)]) == 0
        _wait(lambda: self.old[0] not in watch.published_intermediates, 15, "the bundle event")


@contextmanager
def _rotated(role: str, workdir: Path) -> Iterator[Rotation]:
    """A new CA with ``role`` prepared and activated, served by `ca serve`."""
    home = workdir / "home"
    CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    config = (
        (home / "config.toml").read_text().replace("rotation_auto = true", "rotation_auto = false")
    )
    # Leaves of at most 1h: the cross certificate of a root prepare made two hours
    # "ago" has expired, so retire waits only for the leaves.
    config = re.sub(r'default_ttl = "[^"]*"', 'default_ttl = "1h"', config)
    config = re.sub(r'max_ttl = "[^"]*"', 'max_ttl = "1h"', config)
    (home / "config.toml").write_text(config)
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        old = (ca.intermediate, ca.signing_key)
        now = datetime.now(UTC).replace(microsecond=0)
        # Prepared two hours "ago": past rotation_min_overlap (1h) without waiting.
        ca.rotate(role, "prepare", now=now - timedelta(hours=2))
        ca.rotate(role, "activate", now=now)
    with running_server(home, workdir) as server:
        rotation = Rotation(role, home, workdir, server, old)
        try:
            yield rotation
        finally:
            for watch in rotation.watchers:
                watch.stop()


@contextmanager
def _tcp_inbound(rotation: Rotation, workdir: Path) -> Iterator[tuple[Sidecar, Path]]:
    """`proxy inbound` (TCP mode, revocation feed on) in front of proxy_v2_app.js; yields
    it and the app's record file. Its identity directory is written once, with the bundle
    of the moment, and never again (no agent): after a root retire it still trusts the
    old root."""
    cert_dir = workdir / "inbound"
    with rotation.ca() as ca:
        write_identity(ca, cert_dir, SIDECAR_ID)
    with (
        node_app("proxy_v2_app.js", workdir) as app,
        sidecar(
            "inbound",
            workdir,
            *("--id", SIDECAR_ID, "--cert-dir", str(cert_dir)),
            *("--to", f"127.0.0.1:{app.port}", "--allow-id", "spiffe://example.org/svc/*"),
            *("--ca", rotation.server.url, "--log-level", "info"),
            name="inbound",
        ) as proxy,
    ):
        yield proxy, app.record


def _connections(record: Path) -> list[dict[str, object]]:
    """The PROXY v2 headers the app parsed: one per connection that reached it."""
    if not record.exists():
        return []
    lines = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    return [line for line in lines if "spiffe_id" in line]


def _accepted(ca: CertificateAuthority, caller: Identity, port: int) -> str:
    """Connect as ``caller``; return the SPIFFE ID the app read from the PROXY header."""
    with _tls(ca, caller, port) as sock:
        spiffe_id: str = json.loads(_line(sock))["spiffe_id"]
        return spiffe_id


@contextmanager
def _lingering(ca: CertificateAuthority, caller: Identity, port: int) -> Iterator[Any]:
    """A connection as ``caller`` that reached the app and stays open; yields the socket
    and the id the sidecar gave it (from the PROXY header)."""
    with _tls(ca, caller, port) as sock:
        header = json.loads(_line(sock))
        assert header["spiffe_id"] == caller.spiffe_id
        yield sock, header["unique_id"]


def _inbound_refusal(
    ca: CertificateAuthority, old: Identity, proxy: Sidecar, lingering: str
) -> dict[str, Any]:
    """Wait until the sidecar refuses a new connection as ``old`` (its feed may lag the
    test's by a moment); return the refusal's log line."""
    _wait(lambda: _refused(ca, old, proxy.port), 15, "the sidecar to refuse the old leaf")
    found = [
        e
        for e in proxy.events("proxy_refused")
        if e["reason"] == RETIRED and e["connection"] != lingering
    ]
    assert found, proxy.log_path.read_text()
    return found[0]


def _assert_lingering_cut(proxy: Sidecar, sock: Any, lingering: str) -> None:
    """The watchdog closed the connection opened before the retire (issuer_retired)."""
    closed = proxy.wait_for("proxy_connection_closed", connection=lingering)
    assert closed["reason"] == RETIRED
    assert _closed(sock)


def _assert_refused_before_the_app(
    refusal: dict[str, Any], record: Path, retired: x509.Certificate
) -> None:
    assert refusal["peer_id"] == CLIENT
    assert "no longer publishes" in refusal["detail"]
    assert retired.subject.rfc4514_string() in refusal["detail"]
    # The refused connection never reached the app (no PROXY header carries its id).
    assert refusal["connection"] not in {r.get("unique_id") for r in _connections(record)}


@contextmanager
def _s_server(identity: Identity, bundle: Path, workdir: Path) -> Iterator[int]:
    """`openssl s_server -www` presenting ``identity`` (mTLS: it asks for a client
    certificate and verifies it against ``bundle``); yields its port."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not on PATH")
    port = free_port()
    log = workdir / f"s_server-{port}.log"
    issuers = workdir / f"s_server-{port}.chain.pem"
    issuers.write_bytes(
        pem_certificates(tuple(x509.load_pem_x509_certificates(identity.chain.read_bytes())[1:]))
    )
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                *(openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-www", "-quiet"),
                *("-cert", str(identity.chain), "-key", str(identity.key)),
                *("-cert_chain", str(issuers), "-verify", "1", "-CAfile", str(bundle)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        _wait(lambda: _listening(port) or process.poll() is not None, 15, "openssl s_server")
        assert process.poll() is None, log.read_text()
        yield port
    finally:
        stop(process)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _outbound_cut(port: int) -> bool:
    """Whether a request through the outbound sidecar on ``port`` is cut unanswered."""
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
    except httpx.TransportError:
        return True
    return False


def test_after_an_intermediate_retire_sidecars_and_mtls_client_refuse_its_leaves(
    tmp_path: Path,
) -> None:
    """Leaves the old intermediate signs pass during the overlap; after `ca rotate
    intermediate retire` `proxy inbound` (TCP mode) closes such a caller before the app sees
    a byte and cuts the one still open, `mtls_client` refuses such a server naming the
    intermediate, and `proxy outbound` cuts such a server (all issuer_retired), while
    leaves of the active intermediate still pass and a client without the revocation set
    would not notice."""
    with _rotated("intermediate", tmp_path) as rotation, rotation.ca() as ca:
        retired = rotation.old[0]
        old_caller = forge(ca, tmp_path, [CLIENT], signed_by=rotation.old)
        new_caller = issue(ca, CLIENT, tmp_path)
        old_server = forge(ca, tmp_path, [SERVER], signed_by=rotation.old)
        new_server = issue(ca, SERVER, tmp_path)
        write_identity(ca, tmp_path / "outbound", CLIENT)
        ctx = client_context(cadata=bundle_pem(ca), chain=new_caller.chain, key=new_caller.key)
        ctx.check_hostname = False  # the server is authenticated by its SPIFFE ID
        watch = rotation.watcher()
        bundle = rotation.server.bundle
        with (
            _tcp_inbound(rotation, tmp_path) as (inbound, record),
            _s_server(old_server, bundle, tmp_path) as old_port,
            _s_server(new_server, bundle, tmp_path) as new_port,
            sidecar(
                "outbound",
                tmp_path,
                *("--id", CLIENT, "--cert-dir", str(tmp_path / "outbound")),
                *("--ca", rotation.server.url, "--expect-id", SERVER),
                *("--to", f"127.0.0.1:{old_port}"),
                name="outbound",
            ) as outbound,
        ):
            old_url, new_url = f"https://127.0.0.1:{old_port}/", f"https://127.0.0.1:{new_port}/"
            # The overlap: the old intermediate is published, its leaves pass everywhere.
            with mtls_client(ctx, expect_id=SERVER, revocation=watch, timeout=10) as http:
                assert http.get(old_url).status_code == 200
            assert not _outbound_cut(outbound.port)
            with _lingering(ca, old_caller, inbound.port) as (sock, lingering):
                rotation.retire(watch)
                inbound_refusal = _inbound_refusal(ca, old_caller, inbound, lingering)
                _assert_lingering_cut(inbound, sock, lingering)
            assert _accepted(ca, new_caller, inbound.port) == CLIENT
            with mtls_client(ctx, expect_id=SERVER, revocation=watch, timeout=10) as http:
                with pytest.raises(httpx.ConnectError, match=RETIRED) as refused:
                    http.get(old_url)
                answer = http.get(new_url)
            with mtls_client(ctx, expect_id=SERVER, timeout=10) as unchecked:
                unchecked_answer = unchecked.get(old_url)
            _wait(lambda: _outbound_cut(outbound.port), 15, "proxy outbound to cut")
            outbound_refusal = outbound.wait_for("proxy_refused", reason=RETIRED)
            assert inbound.stop() == 0, inbound.log_path.read_text()
    _assert_refused_before_the_app(inbound_refusal, record, retired)
    message = str(refused.value)
    assert f"127.0.0.1:{old_port}" in message
    assert retired.subject.rfc4514_string() in message
    assert format(old_server.serial, "x") in message
    assert answer.status_code == 200
    assert unchecked_answer.status_code == 200  # the handshake alone cannot tell
    assert outbound_refusal["detail"].startswith("server certificate")
    assert retired.subject.rfc4514_string() in outbound_refusal["detail"]


def test_after_a_root_retire_the_tcp_sidecar_refuses_leaves_under_the_old_root(
    tmp_path: Path,
) -> None:
    """After `ca rotate root retire`, `proxy inbound` (TCP mode) whose bundle.pem still
    holds the old root, so that the handshake passes, refuses a caller whose chain ends at
    the old root as issuer_retired before the app sees a byte and cuts the one still open;
    a caller of the new root passes."""
    with _rotated("root", tmp_path) as rotation, rotation.ca() as ca:
        old_root, new_root = ca.bundle[1], ca.root
        assert ca.bundle == (new_root, old_root)  # both while the rotation lasts
        retired = rotation.old[0]
        assert retired.issuer == old_root.subject
        old_caller = forge(ca, tmp_path, [CLIENT], signed_by=rotation.old)
        new_caller = issue(ca, CLIENT, tmp_path)
        watch = rotation.watcher()
        with _tcp_inbound(rotation, tmp_path) as (inbound, record):
            with _lingering(ca, old_caller, inbound.port) as (sock, lingering):
                rotation.retire(watch)
                refusal = _inbound_refusal(ca, old_caller, inbound, lingering)
                _assert_lingering_cut(inbound, sock, lingering)
            assert _accepted(ca, new_caller, inbound.port) == CLIENT
            assert inbound.stop() == 0, inbound.log_path.read_text()
        with rotation.ca() as after:
            assert after.bundle == (new_root,)
    _assert_refused_before_the_app(refusal, record, retired)
