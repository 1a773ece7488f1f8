"""TLS: contexts with secure defaults, rotating credentials, the revocation set, and
the peer certificate for ASGI apps."""

from ._contexts import TLS12_CIPHERS, client_context, server_context
from ._handshakes import add_refusal_listener, handshake_refusal_reason, log_refused_handshakes
from ._revocation import (
    BundleUpdate,
    RevocationLike,
    RevocationSet,
    canonical_serial,
    issuer_withdrawn,
)
from ._rotation import RotatingCredentials

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._uvicorn import TLSH11Protocol, TLSHttpToolsProtocol, tls_extension

#: Loaded on first use: they import uvicorn, which the sidecars do not need.
_UVICORN = frozenset({"TLSH11Protocol", "TLSHttpToolsProtocol", "tls_extension"})

__all__ = [
    "TLS12_CIPHERS",
    "BundleUpdate",
    "RevocationLike",
    "RevocationSet",
    "RotatingCredentials",
    "TLSH11Protocol",
    "TLSHttpToolsProtocol",
    "add_refusal_listener",
    "canonical_serial",
    "client_context",
    "handshake_refusal_reason",
    "issuer_withdrawn",
    "log_refused_handshakes",
    "server_context",
    "tls_extension",
]


def __getattr__(name: str) -> object:
    if name in _UVICORN:
        from . import _uvicorn

        return getattr(_uvicorn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
