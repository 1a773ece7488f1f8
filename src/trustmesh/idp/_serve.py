"""``trustmesh idp serve``: run the identity server on uvicorn over HTTPS.

Its certificate comes from the local CA (SPIFFE path ``/trustmesh/idp``, naming
``localhost`` and the listen address) and is renewed on every start. Client
certificates are requested, not required: only tls_client_auth clients send one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import pem_certificates
from trustmesh.serving import issue_server_identity, parse_listen, public_url, run_https

from ._app import IdpExtension, create_app
from ._context import IdpContext, IdpSettings
from ._extensions import default_extensions
from ._keys import KeyRing, ensure_signing_key

__all__ = ["IDP_SERVER_PATH", "create_context", "serve"]

log = logging.getLogger("trustmesh.idp")

#: The SPIFFE ID path of the identity server's own certificate.
IDP_SERVER_PATH = "/trustmesh/idp"


def create_context(
    ca: CertificateAuthority, passphrase: bytes, settings: IdpSettings
) -> IdpContext:
    """Build the shared context for an open CA; create the first signing key if needed."""
    ensure_signing_key(ca.store, passphrase)
    keys = KeyRing(
        ca.store,
        passphrase,
        keep=settings.access_ttl + settings.leeway,
        reload_interval=settings.key_reload_interval,
    )
    return IdpContext(ca=ca, store=ca.store, keys=keys, settings=settings)


def serve(
    ca: CertificateAuthority,
    passphrase: bytes,
    *,
    listen: str = "127.0.0.1:9443",
    issuer: str | None = None,
    settings: IdpSettings | None = None,
    extensions: Sequence[IdpExtension] | None = None,
    ready: Callable[[str], None] | None = None,
    log_level: str = "info",
) -> None:
    """Run the identity server until SIGINT/SIGTERM (graceful shutdown).

    Args:
        ca: The open CA (its signing key unlocked: it issues our certificate).
        passphrase: The CA passphrase (encrypts the token-signing keys).
        listen: HOST:PORT.
        issuer: Issuer URL (default ``https://HOST:PORT``).
        settings: Runtime settings (``issuer`` is overridden by the one resolved here).
        extensions: Extensions to mount (default: :func:`default_extensions`).
        ready: Called with the URL once the server listens.
        log_level: uvicorn's log level.
    """
    host, port = parse_listen(listen)
    url = (issuer or public_url(host, port)).rstrip("/")
    opts = settings or IdpSettings(issuer=url)
    opts.issuer = url
    with tempfile.TemporaryDirectory(prefix="trustmesh-idp-serve-") as tmp:
        os.chmod(tmp, 0o700)
        chain, key = issue_server_identity(ca, host, Path(tmp), path=IDP_SERVER_PATH, actor="idp")
        roots = pem_certificates(ca.bundle).decode()

        ctx = create_context(ca, passphrase, opts)
        app = create_app(ctx, default_extensions() if extensions is None else extensions)
        log.info(
            "identity server on %s (issuer %s)",
            public_url(host, port),
            url,
            extra={"event": "start", "issuer": url},
        )
        try:
            run_https(
                app,
                listen=listen,
                chain=chain,
                key=key,
                roots=roots,
                name="identity server",
                log_level=log_level,
                ready=None if ready is None else lambda: ready(url),
            )
        finally:
            log.info("identity server stopped", extra={"event": "stop"})
