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


_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_SESS_CACHE_OFF = 0


def _disable_session_cache(ctx: ssl.SSLContext) -> bool:
    """Turn OpenSSL's server-side session cache off for ``ctx``; True if it is off.

    The stdlib has no API for ``SSL_CTX_set_session_cache_mode``. Without it a TLS 1.2
    client can resume a session by ID and skip the client-certificate check, so a
    trust-bundle change would not apply to it. The ``SSL_CTX`` pointer is the first
    field of CPython's ``PySSLContext``; it is only used after
    ``SSL_CTX_get_options`` through it returns exactly ``ctx.options``.
    """
    import ctypes
    import sys

    if sys.implementation.name != "cpython":
        return False
    try:
        lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
        get_options = lib.SSL_CTX_get_options
        get_options.restype = ctypes.c_uint64
        get_options.argtypes = [ctypes.c_void_p]
        ctrl = lib.SSL_CTX_ctrl
        ctrl.restype = ctypes.c_long
        ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not pointer or get_options(pointer) != int(ctx.options):
            return False
        ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
        return int(ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None)) == _SSL_SESS_CACHE_OFF
    except (AttributeError, OSError, TypeError, ValueError):
        return False
