"""``trustmesh ca serve``: run the CA API on uvicorn over HTTPS.

The server certificate is issued by the CA itself (recorded and audited like any
other), names ``localhost`` and the listen address, and is renewed on every start.
Client certificates are requested (not required): enrollment has none yet, while
renewal and revocation refuse to act without one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import pem_certificates
from trustmesh.serving import issue_server_identity, parse_listen, public_url, run_https

from ._app import ServerSettings, create_app

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
) -> None:
    """Run the CA API until interrupted (SIGINT/SIGTERM shut it down gracefully).

    ``enroll_rate``/``enroll_burst`` are the per-client-address enrollment limit.
    """
    host, port = parse_listen(listen)
    with tempfile.TemporaryDirectory(prefix="trustmesh-ca-serve-") as tmp:
        os.chmod(tmp, 0o700)
        chain, key = issue_server_identity(ca, host, Path(tmp), path=CA_SERVER_PATH)
        roots = pem_certificates(ca.bundle).decode()

        settings = ServerSettings(
            admins=admins, enroll_rate_per_ip=enroll_rate, enroll_burst_per_ip=enroll_burst
        )
        app = create_app(ca, settings)
        url = public_url(host, port)
        log.info("CA API on %s (trust domain %s)", url, ca.config.trust_domain)
        if ready is not None:
            ready(url)
        run_https(
            app,
            listen=listen,
            chain=chain,
            key=key,
            roots=roots,
            name="CA API",
            log_level=log_level,
        )
