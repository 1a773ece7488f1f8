"""``trustmesh ca serve``: run the CA API on uvicorn over HTTPS.

The server certificate is issued by the CA itself (recorded and audited like any
other), names ``localhost`` and the listen address, and is renewed on every start.
Client certificates are requested (not required): enrollment has none yet, while
renewal and revocation refuse to act without one.

With ``workers > 1`` this process binds the sockets, issues the server certificate
and forks that many worker processes, each with its own app, event loop and database
connections, and its own ``SO_REUSEPORT`` socket on the same port (the kernel spreads
new connections over them; one shared socket where the option is missing). It serves
nothing itself: it restarts a worker that dies and stops them all on SIGTERM/SIGINT.
What must be shared lives in the store: the audit chain (serialized by the
database), the revocation feed (each worker polls the newest revocation cursor, and
on PostgreSQL also LISTENs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn

from trustmesh.acme import ACMEConfig
from trustmesh.authority import CertificateAuthority
from trustmesh.errors import ConfigError, TrustmeshError
from trustmesh.hsm import is_pkcs11_ref
from trustmesh.pki import pem_certificates
from trustmesh.serving import (
    parse_listen,
    public_url,
    run_https,
    uvicorn_config,
)

from ._app import ServerSettings, create_app
from ._direct import direct_protocol
from ._keeper import ServerIdentity, run_schedule

__all__ = ["CA_SERVER_PATH", "parse_listen", "serve"]

log = logging.getLogger("trustmesh.ca_server")

#: The SPIFFE ID path the CA's own server certificate carries.
CA_SERVER_PATH = "/trustmesh/ca"
#: ``--workers`` accepts 1 to this many.
MAX_WORKERS = 64
#: Seconds the workers have to start accepting connections.
WORKER_START_TIMEOUT = 60.0
#: A worker that dies sooner than this after starting is not restarted: it would again.
WORKER_MIN_LIFETIME = 5.0


def serve(
    ca: CertificateAuthority,
    *,
    listen: str = "127.0.0.1:8443",
    admins: tuple[str, ...] = (),
    enroll_rate: float = 5.0,
    enroll_burst: int = 20,
    ready: Callable[[str], None] | None = None,
    log_level: str = "info",
    ocsp_listen: str | None = None,
    ocsp_ready: Callable[[str], None] | None = None,
    acme: ACMEConfig | None = None,
    workers: int = 1,
) -> None:
    """Run the CA API until interrupted (SIGINT/SIGTERM shut it down gracefully).

    ``enroll_rate``/``enroll_burst`` are the per-client-address enrollment limit
    (with several workers each enforces its share, so the total stays the same).
    ``ocsp_listen`` (HOST:PORT) adds the read-only plain-HTTP listener for OCSP and
    the CRLs; it stops with the API. ``acme`` adds the ACME provisioners under
    ``/acme``. ``workers`` processes serve all of it (see the module docstring); each
    keeps its own server certificate and runs the rotation schedule as a replica does.

    Raises:
        ConfigError: ``ocsp_listen`` or (with several workers) ``listen`` cannot be
            bound, ``workers`` is out of range, or several workers were asked for with
            the signing key in a PKCS#11 token.
        TrustmeshError: A worker failed to start.

    .. versionchanged:: 0.3
       ``workers``.
    """
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(
            f"--workers {workers}: give 1 to {MAX_WORKERS} (one per core the server has to "
            f"itself).",
            field="workers",
        )
    if workers > 1 and is_pkcs11_ref(ca.issuers.active("intermediate").key_ref):
        raise ConfigError(
            "--workers: the signing key is in a PKCS#11 token, whose session a forked "
            "worker cannot share; run one worker per process and several ca serve "
            "replicas on PostgreSQL instead.",
            field="workers",
        )
    host, port = parse_listen(listen)
    plain_socket = _bind(ocsp_listen, "--ocsp-listen") if ocsp_listen is not None else None
    api_sockets = _bind_api(listen, workers) if workers > 1 else None
    defaults = ServerSettings()
    # Each worker limits the addresses (and tokens) it sees to its share.
    settings = ServerSettings(
        admins=admins,
        enroll_rate_per_ip=enroll_rate / workers,
        enroll_burst_per_ip=max(1, math.ceil(enroll_burst / workers)),
        enroll_rate_per_token=defaults.enroll_rate_per_token / workers,
        enroll_burst_per_token=max(1, math.ceil(defaults.enroll_burst_per_token / workers)),
        acme=acme,
    )
    url = public_url(host, port)

    def run(
        directory: Path,
        sockets: list[socket.socket] | None,
        started: Callable[[], None] | None,
        index: int,
    ) -> None:
        """One serving process: its certificate, app, keeper and listeners."""
        single = sockets is None
        identity = ServerIdentity(ca, host, directory, path=CA_SERVER_PATH)
        roots = pem_certificates(ca.bundle).decode()
        app = create_app(ca, settings)
        # A rotation step (here, by the CLI or by another replica) re-issues our own
        # certificate by the active intermediate, for the new trust bundle.
        app.state.hub.add_bundle_listener(identity.on_bundle)
        stop = threading.Event()
        keeper = threading.Thread(
            target=run_schedule, args=(ca, identity, stop), name="ca-keeper", daemon=True
        )
        keeper.start()
        try:
            with (
                _expiry_warnings(ca) if index == 0 else contextlib.nullcontext(),
                _plain_listener(
                    app.state.plain_app, plain_socket, log_level, ocsp_ready if single else None
                ),
            ):

                def listening() -> None:
                    log.info("CA API on %s (trust domain %s)", url, ca.config.trust_domain)
                    if ready is not None:
                        ready(url)

                run_https(
                    app,
                    listen=listen,
                    chain=identity.chain,
                    key=identity.key,
                    roots=roots,
                    name="CA API",
                    log_level=log_level,
                    context=identity.listener,
                    sockets=sockets,
                    started=started,
                    on_exit=app.state.hub.close_streams,
                    ready=listening if single else None,
                    protocol=direct_protocol(app.state.direct),
                )
        finally:
            stop.set()
            keeper.join(timeout=10)

    with tempfile.TemporaryDirectory(prefix="trustmesh-ca-serve-") as tmp:
        os.chmod(tmp, 0o700)
        if api_sockets is None:
            run(Path(tmp), None, None, 0)
            return

        def worker(index: int, started: Callable[[], None]) -> None:
            # A forked child: its own connections (the parent's stay the parent's).
            ca.store.engine.dispose(close=False)
            directory = Path(tmp) / f"worker-{index}"
            directory.mkdir(mode=0o700, exist_ok=True)
            run(directory, [api_sockets[index % len(api_sockets)]], started, index)

        def all_ready() -> None:
            log.info(
                "CA API on %s (trust domain %s), %d workers",
                url,
                ca.config.trust_domain,
                workers,
            )
            if plain_socket is not None and ocsp_ready is not None:
                shown_host, shown_port = plain_socket.getsockname()[:2]
                shown = f"[{shown_host}]" if ":" in shown_host else shown_host
                ocsp_ready(f"http://{shown}:{shown_port}")
            if ready is not None:
                ready(url)

        try:
            _Supervisor(workers, worker).run(all_ready)
        finally:
            for sock in api_sockets:
                sock.close()
            if plain_socket is not None:
                plain_socket.close()


#: How often ``ca serve`` repeats a warning about its own certificates expiring.
EXPIRY_CHECK_INTERVAL = 86400.0


def log_expiry(ca: CertificateAuthority) -> int:
    """Log a warning for each CA certificate near its end; return how many were logged."""
    count = 0
    for item in ca.issuer_expiry():
        if item.warning:
            log.warning(
                "%s",
                item.warning,
                extra={
                    "event": "ca_certificate_expiry",
                    "role": item.role,
                    "seconds_left": int(item.seconds_left),
                },
            )
            count += 1
    return count


@contextlib.contextmanager
def _expiry_warnings(ca: CertificateAuthority) -> Iterator[None]:
    """Warn at start, then once a day while the block runs."""
    log_expiry(ca)
    stop = threading.Event()

    def daily() -> None:
        while not stop.wait(EXPIRY_CHECK_INTERVAL):
            log_expiry(ca)

    thread = threading.Thread(target=daily, name="ca-expiry-warnings", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


class _Supervisor:
    """Forks the workers, restarts one that dies, stops them all on SIGTERM/SIGINT."""

    def __init__(self, count: int, body: Callable[[int, Callable[[], None]], None]) -> None:
        self.count = count
        self.body = body
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (index, started at)
        self.stopping = False
        self.pid = os.getpid()

    def _spawn(self, index: int, ready_fd: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            code = 1
            try:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(signum, signal.SIG_DFL)

                def started() -> None:
                    os.write(ready_fd, b".")

                self.body(index, started)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("CA API worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = (index, time.monotonic())

    def _stop(self, *_: object) -> None:
        if os.getpid() != self.pid:
            return  # a worker between fork and resetting its signal handlers
        self.stopping = True
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _reap(self, *, block: bool) -> tuple[int, int, float, int] | None:
        """One exited worker as (pid, index, lifetime, status), or None."""
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return None
        if pid == 0 or pid not in self.children:
            return None
        index, began = self.children.pop(pid)
        return pid, index, time.monotonic() - began, os.waitstatus_to_exitcode(status)

    def run(self, ready: Callable[[], None]) -> None:
        read_fd, write_fd = os.pipe()
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.count):
                self._spawn(index, write_fd)
            self._wait_started(read_fd)
            ready()
            while self.children:
                exited = self._reap(block=True)
                if exited is None:
                    continue
                pid, index, lifetime, code = exited
                if self.stopping:
                    continue
                if lifetime < WORKER_MIN_LIFETIME:
                    self._stop()
                    self._drain()
                    raise TrustmeshError(
                        f"CA API worker {index} (pid {pid}) exited with status {code} "
                        f"{lifetime:.1f} s after it started; stopped all workers (see the "
                        f"log above)."
                    )
                log.error(
                    "CA API worker %d (pid %d) exited with status %d; starting a new one",
                    index,
                    pid,
                    code,
                    extra={"event": "worker_restart", "worker": index, "status": code},
                )
                self._spawn(index, write_fd)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(read_fd)
            os.close(write_fd)

    def _wait_started(self, read_fd: int) -> None:
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        seen = 0
        while seen < self.count:
            left = deadline - time.monotonic()
            if self.stopping:
                self._drain()
                raise SystemExit(0)
            exited = self._reap(block=False)
            if exited is not None or left <= 0:
                self._stop()
                self._drain()
                what = (
                    f"worker {exited[1]} exited with status {exited[3]}"
                    if exited is not None
                    else f"the workers did not start within {WORKER_START_TIMEOUT:g} s"
                )
                raise TrustmeshError(
                    f"The CA API could not start: {what} (see the log above). Is the "
                    f"port in use? Pick another --listen."
                )
            readable, _, _ = select.select([read_fd], [], [], min(left, 0.2))
            if readable:
                seen += len(os.read(read_fd, 64))

    def _drain(self) -> None:
        while self.children:
            if self._reap(block=True) is None and not self.children:
                break


def _bind_api(listen: str, workers: int) -> list[socket.socket]:
    """The API's listening sockets: one per worker with SO_REUSEPORT, else one shared."""
    if not hasattr(socket, "SO_REUSEPORT"):
        return [_bind(listen, "--listen")]
    return [_bind(listen, "--listen", reuse_port=True) for _ in range(workers)]


def _bind(listen: str, option: str, *, reuse_port: bool = False) -> socket.socket:
    """Bind a listener now, so a taken port is a clear error before anything runs."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"{option} {listen}: cannot listen there ({exc.strerror}); pick a free "
            f"port on an address of this host.",
            field=option.lstrip("-").replace("-", "_"),
        ) from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def _plain_listener(
    app: Any,
    sock: socket.socket | None,
    log_level: str,
    ready: Callable[[str], None] | None,
) -> Iterator[None]:
    """Serve ``app`` over plain HTTP on ``sock`` in a thread while the block runs."""
    if sock is None:
        yield
        return
    config = uvicorn_config(
        app,
        timeout_keep_alive=15,
        timeout_graceful_shutdown=5,
        limit_concurrency=1000,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="ca-plain-http", daemon=True
    )
    thread.start()
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    log.info("OCSP and CRLs over plain HTTP on %s", url)
    if ready is not None:
        ready(url)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
