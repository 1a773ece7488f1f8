"""Hand the verified client certificate to ASGI apps under uvicorn.

uvicorn does not expose the peer certificate to applications (encode/uvicorn#400).
These protocol classes fill the ASGI TLS extension
(``scope["extensions"]["tls"]``, https://asgi.readthedocs.io/en/latest/specs/tls.html)
for every request on a TLS connection: ``client_cert_chain`` holds the client's
leaf as PEM (empty when it sent none), ``tls_version`` and ``cipher_suite`` name
what was negotiated. Use them with ``uvicorn.Config(..., http=TLSHttpToolsProtocol)``.
"""

from __future__ import annotations

import ssl
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["TLSH11Protocol", "TLSHttpToolsProtocol", "tls_extension"]

_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
# DER -> PEM of the leaves seen lately: a caller reconnecting gets the same PEM string
# (no re-encoding; the middleware's parsed-leaf cache finds it by its cached hash).
_PEM_CACHE_SIZE = 1024
_pems: dict[bytes, str] = {}


def _pem(der: bytes) -> str:
    pem = _pems.get(der)
    if pem is None:
        pem = ssl.DER_cert_to_PEM_cert(der)
        if len(_pems) >= _PEM_CACHE_SIZE:
            _pems.clear()
        _pems[der] = pem
    return pem


def tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """Return the ASGI TLS extension dict for a completed handshake."""
    der = ssl_object.getpeercert(binary_form=True)
    chain = [_pem(der)] if der else []
    cipher = ssl_object.cipher()
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": _VERSIONS.get(ssl_object.version() or "", None),
        "cipher_suite": None,
        "cipher_name": cipher[0] if cipher else None,
    }


class _TLSApp:
    """Wraps the app for one connection and adds the TLS extension to each scope."""

    def __init__(self, app: Any, extension: dict[str, Any]) -> None:
        self.app = app
        self.extension = extension

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in {"http", "websocket"}:
            # uvicorn builds a new scope dict per request: add to it rather than copy it
            # (the inner extensions dict is uvicorn's, so it is copied, not changed).
            extensions = scope.get("extensions")
            scope["extensions"] = (
                {**extensions, "tls": self.extension} if extensions else {"tls": self.extension}
            )
        await self.app(scope, receive, send)


def _wrap(protocol: Any, transport: Any) -> None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is not None:
        protocol.app = _TLSApp(protocol.app, tls_extension(ssl_object))


class TLSH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus the ASGI TLS extension."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        _wrap(self, transport)


class TLSHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the ASGI TLS extension."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        _wrap(self, transport)
