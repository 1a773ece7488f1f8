"""SSL contexts with secure defaults.

TLS 1.2 minimum (1.3 preferred by OpenSSL), AEAD ciphers with forward secrecy only
for TLS 1.2, no compression, no renegotiation, client certificates required unless
the caller says otherwise (and that choice is logged).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

__all__ = ["TLS12_CIPHERS", "client_context", "server_context"]

log = logging.getLogger("trustmesh.tls")

#: TLS 1.2 suites: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def server_context(
    chain: Path,
    key: Path,
    *,
    cadata: str | None = None,
    cafile: Path | None = None,
    client_cert: str = "required",
) -> ssl.SSLContext:
    """Return a server context presenting ``chain``/``key``.

    Args:
        chain: PEM file, leaf first.
        key: PEM private key.
        cadata: Trust anchors (PEM) for client certificates.
        cafile: Or a file of them.
        client_cert: ``required`` (default), ``optional`` (requested; routes
            decide) or ``none``. Anything but ``required`` is logged.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(chain, key)
    if cadata or cafile:
        ctx.load_verify_locations(cafile=str(cafile) if cafile else None, cadata=cadata)
    modes = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
    if client_cert not in modes:
        raise ValueError(
            f"client_cert={client_cert!r}: expected 'required' (the default), 'optional' or 'none'"
        )
    ctx.verify_mode = modes[client_cert]
    if client_cert != "required":
        log.warning("TLS server: client certificates are %s, not required", client_cert)
    return ctx


def client_context(
    *,
    cadata: str | None = None,
    cafile: Path | None = None,
    chain: Path | None = None,
    key: Path | None = None,
) -> ssl.SSLContext:
    """Return a client context that verifies the server against our bundle and,
    when ``chain``/``key`` are given, presents them."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.load_verify_locations(cafile=str(cafile) if cafile else None, cadata=cadata)
    if chain is not None and key is not None:
        ctx.load_cert_chain(chain, key)
    return ctx
