"""HTTP mode of ``proxy inbound`` (lands with trustmesh.relay)."""

from __future__ import annotations

from collections.abc import Callable

from trustmesh.errors import ConfigError

from ._sidecar import Sidecar

__all__ = ["serve_inbound_http"]


def serve_inbound_http(sidecar: Sidecar, ready: Callable[[str], None] | None) -> None:
    """Serve HTTP mode until SIGTERM."""
    raise ConfigError("--http is not available in this build yet; use TCP mode.")
