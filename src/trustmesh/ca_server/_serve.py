"""``trustmesh ca serve``: run the CA API on uvicorn over HTTPS.

The server certificate is issued by the CA itself (recorded and audited like any
other), names ``localhost`` and the listen address, and is renewed on every start.
Client certificates are requested (not required): enrollment has none yet, while
renewal and revocation refuse to act without one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn

from trustmesh.acme import ACMEConfig
from trustmesh.authority import CertificateAuthority
from trustmesh.errors import ConfigError
from trustmesh.pki import pem_certificates
from trustmesh.serving import (
    parse_listen,
    public_url,
    run_https,
    uvicorn_config,
)

from ._app import ServerSettings, create_app
from ._keeper import ServerIdentity, run_schedule

__all__ = ["CA_SERVER_PATH", "parse_listen", "serve"]

log = logging.getLogger("trustmesh.ca_server")

#: The SPIFFE ID path the CA's own server certificate carries.
CA_SERVER_PATH = "/trustmesh/ca"


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
) -> None:
    """Run the CA API until interrupted (SIGINT/SIGTERM shut it down gracefully).

    ``enroll_rate``/``enroll_burst`` are the per-client-address enrollment limit.
    ``ocsp_listen`` (HOST:PORT) adds the read-only plain-HTTP listener for OCSP and
    the CRLs; it stops with the API. ``acme`` adds the ACME provisioners under ``/acme``.

    Raises:
        ConfigError: ``ocsp_listen`` cannot be bound (in use, or not an address here).
    """
    host, port = parse_listen(listen)
    plain_socket = _bind(ocsp_listen) if ocsp_listen is not None else None
    with tempfile.TemporaryDirectory(prefix="trustmesh-ca-serve-") as tmp:
        os.chmod(tmp, 0o700)
        identity = ServerIdentity(ca, host, Path(tmp), path=CA_SERVER_PATH)
        roots = pem_certificates(ca.bundle).decode()

        settings = ServerSettings(
            admins=admins,
            enroll_rate_per_ip=enroll_rate,
            enroll_burst_per_ip=enroll_burst,
            acme=acme,
        )
        app = create_app(ca, settings)
        # A rotation step (here, by the CLI or by another replica) re-issues our own
        # certificate by the active intermediate, for the new trust bundle.
        app.state.hub.add_bundle_listener(identity.on_bundle)
        stop = threading.Event()
        keeper = threading.Thread(
            target=run_schedule, args=(ca, identity, stop), name="ca-keeper", daemon=True
        )
        keeper.start()
        url = public_url(host, port)
        try:
            with (
                _expiry_warnings(ca),
                _plain_listener(app.state.plain_app, plain_socket, log_level, ocsp_ready),
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
                    on_exit=app.state.hub.close_streams,
                    ready=listening,
                )
        finally:
            stop.set()
            keeper.join(timeout=10)


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


def _bind(listen: str) -> socket.socket:
    """Bind the plain listener now, so a taken port is a clear error before anything runs."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"--ocsp-listen {listen}: cannot listen there ({exc.strerror}); pick a free "
            f"port on an address of this host.",
            field="ocsp_listen",
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
