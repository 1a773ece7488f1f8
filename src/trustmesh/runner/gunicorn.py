"""A gunicorn worker class: uvicorn with our TLS shim and a client-certificate-requiring
SSL context.

Usage::

    TRUSTMESH_CERT_DIR=/run/trustmesh gunicorn -k trustmesh.runner.gunicorn.TrustmeshWorker \\
        -b 0.0.0.0:8443 inventory.main:app

or, with fixed files, ``--certfile chain.pem --keyfile key.pem --ca-certs bundle.pem``
instead of ``TRUSTMESH_CERT_DIR``. With ``TRUSTMESH_CERT_DIR`` (the agent's directory)
each worker follows renewals through :class:`~trustmesh.tls.RotatingCredentials`; with
``--certfile`` the files are read once per worker. Either way the context is our
hardened one and requires a client certificate, and the ASGI ``tls`` extension carries
the caller's chain, so wrap the app in :class:`~trustmesh.middleware.MTLSMiddleware`
(docs/services.md) to check the caller and apply the policy.
"""

from __future__ import annotations

import os
import ssl
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustmesh.errors import ConfigError
from trustmesh.tls import (
    RotatingCredentials,
    TLSHttpToolsProtocol,
    log_refused_handshakes,
    server_context,
)

with warnings.catch_warnings():
    # uvicorn points gunicorn users at the uvicorn-worker package; the class is the same.
    warnings.simplefilter("ignore", DeprecationWarning)
    from uvicorn.workers import UvicornWorker

__all__ = ["CERT_DIR_ENV", "TrustmeshWorker"]

#: The environment variable naming the agent's directory.
CERT_DIR_ENV = "TRUSTMESH_CERT_DIR"

_WORKER_BOOT_ERROR = 3  # gunicorn.arbiter.Arbiter.WORKER_BOOT_ERROR: the arbiter halts


class TrustmeshWorker(UvicornWorker):
    """uvicorn's gunicorn worker, serving mTLS with our protocol shim.

    The SSL context comes from ``$TRUSTMESH_CERT_DIR`` (rotating) or from gunicorn's
    ``--certfile``/``--keyfile``/``--ca-certs`` (all three needed); without either the
    worker refuses to boot.
    """

    # proxy_headers off: uvicorn would believe X-Forwarded-For from 127.0.0.1 (any local
    # process) for the client address the app sees.
    CONFIG_KWARGS: dict[str, Any] = {  # noqa: RUF012 - as uvicorn declares it
        "loop": "auto",
        "http": TLSHttpToolsProtocol,
        "proxy_headers": False,
    }

    credentials: RotatingCredentials | None = None

    def init_process(self) -> None:
        """In the worker process: build the SSL context, then serve."""
        try:
            context = self._ssl_context()
        except ConfigError as exc:
            self.log.error("trustmesh worker: %s", exc.message)
            sys.exit(_WORKER_BOOT_ERROR)

        def factory(_config: Any, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
            return context

        self.config.ssl_context_factory = factory
        log_refused_handshakes()
        super().init_process()

    def _ssl_context(self) -> ssl.SSLContext:
        cert_dir = os.environ.get(CERT_DIR_ENV)
        if cert_dir:
            self.credentials = RotatingCredentials(Path(cert_dir))
            self.credentials.start()
            self.log.info(
                "trustmesh worker: serving as %s from %s",
                self.credentials.spiffe_id,
                cert_dir,
            )
            return self.credentials.server_context()
        options = self.cfg.ssl_options if self.cfg.is_ssl else {}
        certfile, keyfile = options.get("certfile"), options.get("keyfile")
        ca_certs = options.get("ca_certs")
        if not certfile or not keyfile or not ca_certs:
            raise ConfigError(
                f"TrustmeshWorker serves mTLS only: set {CERT_DIR_ENV} to the agent's "
                f"directory, or pass --certfile, --keyfile and --ca-certs (the trust bundle "
                f"client certificates are verified against)."
            )
        return server_context(Path(certfile), Path(keyfile), cafile=Path(ca_certs))
