"""TLS: contexts with secure defaults and the peer certificate for ASGI apps."""

from ._contexts import TLS12_CIPHERS, client_context, server_context
from ._uvicorn import TLSH11Protocol, TLSHttpToolsProtocol, tls_extension

__all__ = [
    "TLS12_CIPHERS",
    "TLSH11Protocol",
    "TLSHttpToolsProtocol",
    "client_context",
    "server_context",
    "tls_extension",
]
