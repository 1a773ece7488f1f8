"""Log every TLS handshake a trustmesh server refuses, with the reason.

asyncio reports a failed server-side handshake to nobody: the exception is an
``OSError``, which ``SSLProtocol._fatal_error`` only logs when the event loop runs in
debug mode. A refused client (no certificate, a foreign CA, an expired certificate,
TLS 1.0 offered) would then leave no trace. :func:`log_refused_handshakes` wraps
``asyncio.sslproto.SSLProtocol._on_handshake_complete`` (CPython 3.11+) so that
server-side failures are logged as one structured WARNING line naming the peer
address and OpenSSL's reason. Client-side handshakes are left alone.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

__all__ = ["add_refusal_listener", "handshake_refusal_reason", "log_refused_handshakes"]

log = logging.getLogger("trustmesh.tls")

_installed = False
_listeners: list[Callable[[str], None]] = []


def add_refusal_listener(callback: Callable[[str], None]) -> None:
    """Call ``callback(reason)`` for every refused server-side handshake (after
    :func:`log_refused_handshakes`), e.g. to count it in metrics."""
    _listeners.append(callback)


def handshake_refusal_reason(exc: BaseException | type[BaseException]) -> str:
    """A short, stable reason for a failed handshake (OpenSSL's reason code if any).

    Args:
        exc: The handshake's exception. asyncio passes the *class*
            ``ConnectionResetError`` when the peer closes the connection before the
            handshake is done (``SSLProtocol.eof_received``); that reads
            ``connection_closed_during_handshake``.

    Returns:
        ``certificate_verify_failed: <OpenSSL's verify message>``, OpenSSL's reason in
        lower case (``unsupported_protocol``, ``tlsv1_alert_unknown_ca``), or for other
        errors the exception's name and message.
    """
    if isinstance(exc, type):
        if issubclass(exc, ConnectionError):
            return "connection_closed_during_handshake"
        return exc.__name__
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate_verify_failed: {exc.verify_message}"
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason.lower()
    if isinstance(exc, ConnectionError) and not str(exc):
        return "connection_closed_during_handshake"
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def log_refused_handshakes() -> bool:
    """Install the logging hook once per process; False if asyncio has no such method."""
    global _installed
    if _installed:
        return True
    try:
        from asyncio import sslproto
    except ImportError:  # pragma: no cover - every CPython has it
        return False
    original = getattr(sslproto.SSLProtocol, "_on_handshake_complete", None)
    if original is None:
        log.warning("cannot log refused TLS handshakes: asyncio has no hook on this Python")
        return False

    def on_handshake_complete(self: Any, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None and getattr(self, "_server_side", False):
            transport = getattr(self, "_transport", None)
            peer = transport.get_extra_info("peername") if transport is not None else None
            address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
            log.warning(
                "TLS handshake refused from %s: %s",
                address,
                handshake_refusal_reason(handshake_exc),
                extra={
                    "event": "tls_handshake_refused",
                    "peer": address,
                    "reason": handshake_refusal_reason(handshake_exc),
                },
            )
            for listener in tuple(_listeners):
                listener(handshake_refusal_reason(handshake_exc))
        original(self, handshake_exc)

    sslproto.SSLProtocol._on_handshake_complete = on_handshake_complete  # type: ignore[method-assign]
    _installed = True
    return True
