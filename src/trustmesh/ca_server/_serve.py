"""``trustmesh ca serve``: run the CA API on uvicorn over HTTPS.

The server certificate is issued by the CA itself (recorded and audited like any
other), names ``localhost`` and the listen address, and is renewed on every start.
Client certificates are requested (not required): enrollment has none yet, while
renewal and revocation refuse to act without one.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import uvicorn

from trustmesh.authority import CertificateAuthority
from trustmesh.errors import ConfigError
from trustmesh.files import atomic_write
from trustmesh.pki import dump_private_key, pem_certificates
from trustmesh.tls import TLSHttpToolsProtocol, server_context

from ._app import ServerSettings, create_app

__all__ = ["CA_SERVER_PATH", "parse_listen", "serve"]

log = logging.getLogger("trustmesh.ca_server")

#: The SPIFFE ID path the CA's own server certificate carries.
CA_SERVER_PATH = "/trustmesh/ca"


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:8443`` for IPv6).

    Raises:
        ConfigError: Not HOST:PORT with a port in 1-65535.
    """
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--listen {value!r} is not HOST:PORT, e.g. 127.0.0.1:8443.", field="listen"
        )
    return host, int(port)


def issue_server_identity(
    ca: CertificateAuthority, host: str, directory: Path
) -> tuple[Path, Path]:
    """Issue the server's own certificate into ``directory`` (key mode 0600)."""
    ips: list[str] = []
    try:
        address = ipaddress.ip_address(host)
        if not address.is_unspecified:
            ips.append(host)
    except ValueError:
        pass
    dns = ["localhost"]
    if not ips and host not in {"localhost", "0.0.0.0", "::"}:  # noqa: S104 - names only
        dns.append(host)
    ips.append("127.0.0.1") if "127.0.0.1" not in ips else None
    issued = ca.issue(
        f"spiffe://{ca.config.trust_domain}{CA_SERVER_PATH}",
        dns=dns,
        ips=ips,
        ttl=min(timedelta(days=7), ca.config.profile(None).max_ttl),
        actor="ca-server",
    )
    assert issued.key is not None  # noqa: S101 - issue() always generates one
    chain, key = directory / "chain.pem", directory / "key.pem"
    atomic_write(key, dump_private_key(issued.key), mode=0o600)
    atomic_write(chain, pem_certificates(issued.chain))
    return chain, key


def serve(
    ca: CertificateAuthority,
    *,
    listen: str = "127.0.0.1:8443",
    admins: tuple[str, ...] = (),
    enroll_rate: float = 5.0,
    enroll_burst: int = 20,
    ready: Callable[[str], None] | None = None,
    log_level: str = "info",
) -> None:
    """Run the CA API until interrupted (SIGINT/SIGTERM shut it down gracefully).

    ``enroll_rate``/``enroll_burst`` are the per-client-address enrollment limit.
    """
    host, port = parse_listen(listen)
    with tempfile.TemporaryDirectory(prefix="trustmesh-ca-serve-") as tmp:
        os.chmod(tmp, 0o700)
        chain, key = issue_server_identity(ca, host, Path(tmp))
        roots = pem_certificates(ca.bundle).decode()

        def context_factory(_config: Any, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
            return server_context(chain, key, cadata=roots, client_cert="optional")

        settings = ServerSettings(
            admins=admins, enroll_rate_per_ip=enroll_rate, enroll_burst_per_ip=enroll_burst
        )
        app = create_app(ca, settings)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http=TLSHttpToolsProtocol,
            ssl_certfile=str(chain),
            ssl_keyfile=str(key),
            ssl_context_factory=context_factory,
            timeout_keep_alive=15,
            timeout_graceful_shutdown=10,
            limit_concurrency=1000,
            log_level=log_level,
            access_log=False,
            lifespan="on",
        )
        server = uvicorn.Server(config)
        url = f"https://{'localhost' if host in {'0.0.0.0', '::'} else host}:{port}"  # noqa: S104
        log.info("CA API on %s (trust domain %s)", url, ca.config.trust_domain)
        if ready is not None:
            ready(url)
        server.run()
