"""Listen addresses and URLs every trustmesh server shares (``HOST:PORT``, loopback, the
public URL) and the latency buckets of their metrics.

This module imports nothing heavy: the sidecars read it without loading the servers'
stack (uvicorn, Starlette, the CA's store); :mod:`trustmesh.serving` re-exports it.
"""

from __future__ import annotations

import ipaddress

from trustmesh.errors import ConfigError

__all__ = ["LATENCY_BUCKETS", "is_loopback", "parse_listen", "public_url"]

#: Request-latency histogram buckets (seconds) of every trustmesh server.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:8443`` for IPv6).

    Raises:
        ConfigError: Not HOST:PORT with a port in 1-65535.
    """
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--listen {value!r} is not HOST:PORT, e.g. 127.0.0.1:8443.", field="listen"
        )
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address) names only the local machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_url(host: str, port: int) -> str:
    """The ``https://`` URL clients use for a server listening on ``host:port``."""
    shown = "localhost" if host in {"0.0.0.0", "::"} else host  # noqa: S104 - names only
    if ":" in shown:
        shown = f"[{shown}]"
    return f"https://{shown}:{port}"
