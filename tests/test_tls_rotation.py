"""Rotating credentials under real TLS: a stdlib ``ssl`` server on 127.0.0.1 serving
``RotatingCredentials.server_context()`` while the agent's files are replaced file by
file, and the hardened defaults checked with real clients (Python and openssl)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from trustmesh.authority import CertificateAuthority
from trustmesh.errors import ConfigError
from trustmesh.files import stage_file
from trustmesh.pki import KeyType, dump_private_key, pem_certificates
from trustmesh.tls import RotatingCredentials, client_context, server_context

from .conftest import PASSPHRASE

SERVER_ID = "spiffe://example.org/svc/server"
CLIENT_ID = "spiffe://example.org/svc/client"


class RefusedError(Exception):
    """The server refused the connection (handshake failed or it closed at once)."""


class TLSServer:
    """Accepts TLS connections with ``ctx`` and answers each ``ping`` line with ``pong``."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.errors: list[str] = []
        self.served = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(60)  # idle keep-alive connections outlive a rotation run
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    buffer = b""
                    while not self._stop.is_set():
                        data = tls.recv(1024)
                        if not data:
                            return
                        buffer += data
                        while b"\n" in buffer:
                            _, buffer = buffer.split(b"\n", 1)
                            tls.sendall(b"pong\n")
                            self.served += 1
            except (ssl.SSLError, OSError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def saw_error(self, *needles: str, timeout: float = 5.0) -> bool:
        """Wait until the server recorded a failed connection mentioning one of ``needles``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(n in e for e in list(self.errors) for n in needles):
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._stop.set()
        self._accepter.join(5)
        self.sock.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def serve() -> Iterator[list[TLSServer]]:
    servers: list[TLSServer] = []
    yield servers
    for server in servers:
        server.close()


def start(servers: list[TLSServer], ctx: ssl.SSLContext) -> TLSServer:
    server = TLSServer(ctx)
    servers.append(server)
    return server


class Connection:
    """One client connection that can send several requests (keep-alive)."""

    def __init__(self, ctx: ssl.SSLContext, port: int, host: str = "127.0.0.1") -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            self.tls = ctx.wrap_socket(raw, server_hostname=host)
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            raise RefusedError(str(exc)) from exc
        der = self.tls.getpeercert(binary_form=True)
        assert der is not None
        self.server_serial = x509.load_der_x509_certificate(der).serial_number

    def request(self) -> None:
        try:
            self.tls.sendall(b"ping\n")
            reply = self.tls.recv(16)
        except (ssl.SSLError, OSError) as exc:
            raise RefusedError(str(exc)) from exc
        if reply != b"pong\n":
            raise RefusedError(f"server closed the connection ({reply!r})")

    def close(self) -> None:
        self.tls.close()


def call(ctx: ssl.SSLContext, port: int, host: str = "127.0.0.1") -> int:
    """Make one request on a new connection; return the serial the server presented."""
    conn = Connection(ctx, port, host)
    try:
        conn.request()
    finally:
        conn.close()
    return conn.server_serial


def refused(ctx: ssl.SSLContext, port: int) -> bool:
    try:
        call(ctx, port)
    except RefusedError:
        return True
    return False


def write_like_agent(
    directory: Path,
    *,
    key: bytes,
    chain: bytes,
    bundle: bytes,
    order: tuple[str, ...] = ("bundle.pem", "key.pem", "chain.pem"),
    gap: float = 0.0,
) -> None:
    """Stage every file, then rename them into place one by one (as the agent does)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = {"key.pem": (key, 0o600), "chain.pem": (chain, 0o644), "bundle.pem": (bundle, 0o644)}
    staged = [
        (stage_file(directory / n, data[n][0], mode=data[n][1]), directory / n) for n in order
    ]
    for tmp, final in staged:
        os.replace(tmp, final)
        time.sleep(gap)


def issue(
    ca: CertificateAuthority, spiffe_id: str = SERVER_ID, **kwargs: object
) -> tuple[bytes, bytes, int]:
    issued = ca.issue(spiffe_id, ips=["127.0.0.1"], dns=["localhost"], **kwargs)  # type: ignore[arg-type]
    assert issued.key is not None
    return (
        dump_private_key(issued.key),
        pem_certificates(issued.chain),
        issued.certificate.serial_number,
    )


def bundle_of(*cas: CertificateAuthority) -> bytes:
    return b"".join(pem_certificates(c.bundle) for c in cas)


def install(ca: CertificateAuthority, directory: Path, bundle: bytes | None = None) -> int:
    key, chain, serial = issue(ca)
    write_like_agent(directory, key=key, chain=chain, bundle=bundle or bundle_of(ca))
    return serial


def client_ctx(
    ca: CertificateAuthority, tmp_path: Path, trust: bytes, spiffe_id: str = CLIENT_ID
) -> ssl.SSLContext:
    key, chain, _ = issue(ca, spiffe_id)
    folder = tmp_path / f"client-{os.urandom(4).hex()}"
    folder.mkdir()
    (folder / "key.pem").write_bytes(key)
    (folder / "chain.pem").write_bytes(chain)
    return client_context(cadata=trust.decode(), chain=folder / "chain.pem", key=folder / "key.pem")


@pytest.fixture
def other_ca(tmp_path: Path) -> Iterator[CertificateAuthority]:
    authority = CertificateAuthority.init(
        tmp_path / "other-home",
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
    )
    yield authority
    authority.close()


def rotate_under_load(
    ca: CertificateAuthority,
    tmp_path: Path,
    serve: list[TLSServer],
    *,
    rotations: int,
    pause: float,
) -> dict[str, int]:
    """Rotate the server's files ``rotations`` times, ``pause`` seconds apart, under
    continuous new-connection and keep-alive requests; assert nothing failed."""
    creds_dir = tmp_path / "creds"
    first = install(ca, creds_dir)
    creds = RotatingCredentials(creds_dir, expect_id=SERVER_ID, poll_interval=0.02)
    assert creds.leaf.serial_number == first
    assert creds.generation == 1
    seen_generations: list[int] = []
    creds.add_listener(seen_generations.append)
    server = start(serve, creds.server_context())
    client = client_ctx(ca, tmp_path, bundle_of(ca))
    early = Connection(client, server.port)
    assert early.server_serial == first

    stop = threading.Event()
    failures: list[str] = []
    served_serials: set[int] = set()
    counts = {"new": 0, "kept": 0}

    def new_connections() -> None:
        while not stop.is_set():
            try:
                served_serials.add(call(client, server.port))
                counts["new"] += 1
            except RefusedError as exc:
                failures.append(f"new: {exc}")

    def keep_alive() -> None:
        conn = Connection(client, server.port)
        try:
            while not stop.is_set():
                conn.request()
                counts["kept"] += 1
        except RefusedError as exc:
            failures.append(f"keep-alive: {exc}")
        finally:
            conn.close()

    workers = [threading.Thread(target=new_connections) for _ in range(2)]
    workers.append(threading.Thread(target=keep_alive))
    creds.start()
    try:
        for worker in workers:
            worker.start()
        serials = [first]
        for i in range(rotations):
            key, chain, serial = issue(ca)
            # Every other rotation renames the chain first, leaving a window where
            # the new chain sits beside the old key (and the other way round).
            order = ("chain.pem", "key.pem") if i % 2 else ("key.pem", "chain.pem")
            write_like_agent(
                creds_dir, key=key, chain=chain, bundle=bundle_of(ca), order=order, gap=0.05
            )
            serials.append(serial)
            deadline = time.monotonic() + 5
            while creds.leaf.serial_number != serial and time.monotonic() < deadline:
                time.sleep(0.01)
            assert creds.leaf.serial_number == serial
            time.sleep(pause)
            assert call(client, server.port) == serial, "new connections get the new cert"
        early.request()
        assert early.server_serial == first
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)
        creds.stop()
        early.close()
    assert failures == []
    assert server.errors == []
    assert creds.generation == rotations + 1
    assert seen_generations == list(range(2, rotations + 2))
    assert creds.last_error is None
    assert serials[-1] in served_serials
    assert len(served_serials & set(serials)) >= 4
    return counts


def test_rotation_under_load_drops_nothing(
    ca: CertificateAuthority, tmp_path: Path, serve: list[TLSServer]
) -> None:
    """Eight rotations (with a key/chain mismatch window each) under continuous new and
    keep-alive requests: zero failures, new connections see each new serial, and a
    connection opened before the first rotation keeps working."""
    counts = rotate_under_load(ca, tmp_path, serve, rotations=8, pause=0.15)
    assert counts["new"] > 20
    assert counts["kept"] > 20


@pytest.mark.slow
def test_thirty_seconds_of_requests_across_ten_rotations(
    ca: CertificateAuthority, tmp_path: Path, serve: list[TLSServer]
) -> None:
    """The issue's proof: 30 s of continuous requests while the certificate rotates 10
    times, zero failed requests."""
    started = time.monotonic()
    counts = rotate_under_load(ca, tmp_path, serve, rotations=10, pause=2.9)
    assert time.monotonic() - started >= 30
    assert counts["new"] > 300
    assert counts["kept"] > 300


@pytest.mark.parametrize("problem", ["garbage_key", "mismatched_key", "empty_chain", "wrong_id"])
def test_a_broken_reload_keeps_the_old_credentials_and_logs(
    ca: CertificateAuthority,
    tmp_path: Path,
    serve: list[TLSServer],
    caplog: pytest.LogCaptureFixture,
    problem: str,
) -> None:
    """A bad file keeps serving the old certificate, logs an error naming the file and
    the problem, and the next good write is picked up."""
    creds_dir = tmp_path / "creds"
    first = install(ca, creds_dir)
    creds = RotatingCredentials(creds_dir, expect_id=SERVER_ID)
    server = start(serve, creds.server_context())
    client = client_ctx(ca, tmp_path, bundle_of(ca))
    key, chain, _ = issue(ca)
    other_key, _, _ = issue(ca)
    wrong_key, wrong_chain, _ = issue(ca, CLIENT_ID)
    bundle = bundle_of(ca)
    bad, expected = {
        "garbage_key": ({"key": b"not a key\n", "chain": chain}, ("key.pem", "not a PEM")),
        "mismatched_key": (
            {"key": other_key, "chain": chain},
            ("key.pem", "does not match the certificate"),
        ),
        "empty_chain": ({"key": key, "chain": b"\n"}, ("chain.pem", "empty")),
        "wrong_id": (
            {"key": wrong_key, "chain": wrong_chain},
            ("chain.pem", f"expected {SERVER_ID}"),
        ),
    }[problem]
    write_like_agent(creds_dir, key=bad["key"], chain=bad["chain"], bundle=bundle)
    past = time.time() - 10  # settled: not a rename still in progress
    for name in ("key.pem", "chain.pem", "bundle.pem"):
        os.utime(creds_dir / name, (past, past))
    with caplog.at_level(logging.ERROR, logger="trustmesh.tls"):
        assert creds.reload() is False
    assert creds.last_error is not None
    assert expected[0] in creds.last_error
    assert expected[1] in creds.last_error
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "keeping the current credentials" in errors[0]
    assert str(creds_dir / expected[0]) in errors[0]
    assert expected[1] in errors[0]
    assert creds.generation == 1
    assert creds.leaf.serial_number == first
    assert call(client, server.port) == first
    # Polled again unchanged: the error is not logged twice.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="trustmesh.tls"):
        assert creds._reload(force=True) is False
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    # The agent writes good files: they are used.
    write_like_agent(creds_dir, key=key, chain=chain, bundle=bundle)
    assert creds.reload() is True
    assert creds.last_error is None
    assert creds.generation == 2
    assert call(client, server.port) == x509.load_pem_x509_certificate(chain).serial_number


def test_an_expired_certificate_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    """Expired files are not loaded: at start that is a one-line ConfigError naming the
    file, later the old credentials stay."""
    creds_dir = tmp_path / "creds"
    install(ca, creds_dir)
    creds = RotatingCredentials(creds_dir)
    key, chain, _ = issue(ca, now=datetime.now(UTC) - timedelta(hours=3), ttl=timedelta(hours=1))
    write_like_agent(creds_dir, key=key, chain=chain, bundle=bundle_of(ca))
    assert creds.reload() is False
    assert creds.last_error is not None
    assert "expired" in creds.last_error
    fresh = tmp_path / "fresh"
    write_like_agent(fresh, key=key, chain=chain, bundle=bundle_of(ca))
    with pytest.raises(ConfigError, match=r"chain\.pem: certificate .* expired"):
        RotatingCredentials(fresh)
    with pytest.raises(ConfigError, match=r"key\.pem: cannot read it"):
        RotatingCredentials(tmp_path / "nowhere")


def test_trust_bundle_changes_apply_to_new_handshakes(
    ca: CertificateAuthority,
    other_ca: CertificateAuthority,
    tmp_path: Path,
    serve: list[TLSServer],
) -> None:
    """A second CA added to bundle.pem is accepted on new connections; once the old CA
    is removed (after the server moved to a certificate of the new one), clients of the
    old CA are refused."""
    creds_dir = tmp_path / "creds"
    install(ca, creds_dir)
    creds = RotatingCredentials(creds_dir, poll_interval=0.02)
    server = start(serve, creds.server_context())
    both = bundle_of(ca, other_ca)
    client_a = client_ctx(ca, tmp_path, both)
    client_b = client_ctx(other_ca, tmp_path, both)
    assert not refused(client_a, server.port)
    assert refused(client_b, server.port)
    kept_a = Connection(client_a, server.port)

    def wait_generation(n: int) -> None:
        deadline = time.monotonic() + 5
        while creds.generation < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert creds.generation == n, creds.last_error

    with creds:
        key, chain, _ = issue(ca)
        write_like_agent(creds_dir, key=key, chain=chain, bundle=both)
        wait_generation(2)
        assert not refused(client_b, server.port)
        assert not refused(client_a, server.port)
        key, chain, serial_b = issue(other_ca)
        write_like_agent(creds_dir, key=key, chain=chain, bundle=both)
        wait_generation(3)
        assert call(client_a, server.port) == serial_b
        write_like_agent(creds_dir, key=key, chain=chain, bundle=bundle_of(other_ca))
        wait_generation(4)
        assert refused(client_a, server.port)
        assert not refused(client_b, server.port)
    kept_a.request()  # established before the change: keeps working
    kept_a.close()
    assert server.saw_error("CERTIFICATE_VERIFY_FAILED"), server.errors


def test_sni_and_no_sni_clients_get_the_current_certificate(
    ca: CertificateAuthority, tmp_path: Path, serve: list[TLSServer]
) -> None:
    """Clients connecting by IP address (no SNI, server_name None) and by name (SNI)
    both get the current certificate after a rotation."""
    creds_dir = tmp_path / "creds"
    install(ca, creds_dir)
    creds = RotatingCredentials(creds_dir)
    server = start(serve, creds.server_context())
    client = client_ctx(ca, tmp_path, bundle_of(ca))
    serial = install(ca, creds_dir)
    assert creds.reload() is True
    assert call(client, server.port, "127.0.0.1") == serial
    assert call(client, server.port, "localhost") == serial
    assert creds.client_context() is not None
    assert creds.spiffe_id == SERVER_ID


def test_client_context_rotates_and_presents_the_current_leaf(
    ca: CertificateAuthority, tmp_path: Path, serve: list[TLSServer]
) -> None:
    """``client_context()`` is a new object per rotation and presents the new leaf; the
    hostname-free variant verifies the chain but not the name."""
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    install(ca, server_dir)
    server_creds = RotatingCredentials(server_dir)
    install(ca, client_dir)
    client_creds = RotatingCredentials(client_dir)
    server = start(serve, server_creds.server_context())
    before = client_creds.client_context()
    assert call(before, server.port) > 0
    install(ca, client_dir)
    assert client_creds.reload() is True
    after = client_creds.client_context()
    assert after is not before
    assert call(after, server.port, "localhost") > 0
    loose = client_creds.client_context(check_hostname=False)
    assert not loose.check_hostname
    assert loose.verify_mode == ssl.CERT_REQUIRED
    assert call(loose, server.port, "not-the-server.example") > 0
    with pytest.raises(RefusedError, match="match"):
        call(after, server.port, "not-the-server.example")


# -- the hardened defaults, refused with a reason on the server side -------------------


def test_refused_without_client_certificate_foreign_ca_or_non_aead(
    ca: CertificateAuthority,
    other_ca: CertificateAuthority,
    tmp_path: Path,
    serve: list[TLSServer],
) -> None:
    """No client certificate, a client certificate of a foreign CA and a CBC (non-AEAD)
    TLS 1.2 cipher are all refused by the rotating listener; a TLS 1.2 AEAD client with
    our certificate is accepted."""
    creds_dir = tmp_path / "creds"
    install(ca, creds_dir)
    creds = RotatingCredentials(creds_dir)
    server = start(serve, creds.server_context())
    trust = bundle_of(ca)

    anonymous = client_context(cadata=trust.decode())
    assert refused(anonymous, server.port)
    assert server.saw_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"), server.errors

    server.errors.clear()
    foreign = client_ctx(other_ca, tmp_path, trust)
    assert refused(foreign, server.port)
    assert server.saw_error("CERTIFICATE_VERIFY_FAILED"), server.errors

    ours12 = client_ctx(ca, tmp_path, trust)
    ours12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert not refused(ours12, server.port)

    server.errors.clear()
    cbc = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cbc.load_verify_locations(cadata=trust.decode())
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:AES128-SHA")
    assert refused(cbc, server.port)
    assert server.saw_error("NO_SHARED_CIPHER"), server.errors

    with pytest.raises(ValueError, match="client_cert='yes': expected 'required'"):
        server_context(creds_dir / "chain.pem", creds_dir / "key.pem", client_cert="yes")


@pytest.mark.parametrize("flag", ["-tls1", "-tls1_1"])
def test_openssl_old_protocol_versions_are_refused(
    ca: CertificateAuthority, tmp_path: Path, serve: list[TLSServer], flag: str
) -> None:
    """``openssl s_client -tls1`` / ``-tls1_1`` (even at security level 0, with our
    client certificate) cannot connect: the server refuses the protocol version."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    helptext = subprocess.run(
        [openssl, "s_client", "-help"], capture_output=True, text=True, timeout=10
    ).stderr
    if f" {flag} " not in helptext:
        pytest.skip(f"this openssl has no s_client {flag}")
    creds_dir = tmp_path / "creds"
    install(ca, creds_dir)
    creds = RotatingCredentials(creds_dir)
    server = start(serve, creds.server_context())
    client_dir = tmp_path / "client"
    key, chain, _ = issue(ca, CLIENT_ID)
    client_dir.mkdir()
    (client_dir / "key.pem").write_bytes(key)
    (client_dir / "chain.pem").write_bytes(chain)
    (client_dir / "bundle.pem").write_bytes(bundle_of(ca))
    done = subprocess.run(
        [
            openssl,
            "s_client",
            "-connect",
            f"127.0.0.1:{server.port}",
            flag,
            "-cipher",
            "DEFAULT@SECLEVEL=0",
            "-cert",
            str(client_dir / "chain.pem"),
            "-key",
            str(client_dir / "key.pem"),
            "-CAfile",
            str(client_dir / "bundle.pem"),
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode != 0
    assert server.saw_error("UNSUPPORTED_PROTOCOL", "VERSION"), (
        server.errors,
        done.stdout[-500:],
        done.stderr[-500:],
    )
    # The same client at TLS 1.2 connects: the refusal was about the version.
    ok = subprocess.run(
        [
            openssl,
            "s_client",
            "-connect",
            f"127.0.0.1:{server.port}",
            "-tls1_2",
            "-cert",
            str(client_dir / "chain.pem"),
            "-key",
            str(client_dir / "key.pem"),
            "-CAfile",
            str(client_dir / "bundle.pem"),
            "-verify_return_error",
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert "Verify return code: 0 (ok)" in ok.stdout, ok.stdout[-500:]


def test_uvicorn_with_the_shim_rotates_under_keep_alive_and_new_connections(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """uvicorn (asyncio TLS, memory BIOs) serving ``server_context()`` with the ASGI TLS
    shim: across three rotations keep-alive and new-connection requests all succeed, new
    connections see the new certificate, and the app sees the caller's certificate."""
    import httpx
    import uvicorn

    from trustmesh.tls import TLSHttpToolsProtocol

    creds_dir = tmp_path / "creds"
    first = install(ca, creds_dir)
    creds = RotatingCredentials(creds_dir, poll_interval=0.02)

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] != "http":
            return
        tls = scope["extensions"]["tls"]  # type: ignore[index]
        pem = tls["client_cert_chain"][0]
        serial = format(x509.load_pem_x509_certificate(pem.encode()).serial_number, "x")
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": serial.encode()})  # type: ignore[operator]

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=TLSHttpToolsProtocol,
        ssl_context_factory=lambda _config, _default: creds.server_context(),
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client_dir = tmp_path / "client"
    key, chain, client_serial = issue(ca, CLIENT_ID)
    client_dir.mkdir()
    (client_dir / "key.pem").write_bytes(key)
    (client_dir / "chain.pem").write_bytes(chain)
    ctx = client_context(
        cadata=bundle_of(ca).decode(),
        chain=client_dir / "chain.pem",
        key=client_dir / "key.pem",
    )
    url = f"https://127.0.0.1:{port}/"

    def server_serial(response: httpx.Response) -> int:
        ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
        return x509.load_der_x509_certificate(ssl_object.getpeercert(True)).serial_number

    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        failures: list[str] = []
        with httpx.Client(verify=ctx, timeout=5) as kept, creds:
            response = kept.get(url)
            assert response.text == format(client_serial, "x")
            assert server_serial(response) == first
            for _ in range(3):
                serial = install(ca, creds_dir)
                deadline = time.monotonic() + 5
                while creds.leaf.serial_number != serial and time.monotonic() < deadline:
                    try:
                        assert kept.get(url).status_code == 200
                    except httpx.HTTPError as exc:
                        failures.append(str(exc))
                with httpx.Client(verify=ctx, timeout=5) as fresh:
                    response = fresh.get(url)
                    assert response.text == format(client_serial, "x")
                    assert server_serial(response) == serial
                response = kept.get(url)
                assert response.status_code == 200
                assert server_serial(response) == first  # the same keep-alive connection
        assert failures == []
    finally:
        server.should_exit = True
        thread.join(10)
