"""What every trustmesh HTTPS server shares: the listen address, its own identity, its URL."""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from pathlib import Path

from trustmesh.authority import CertificateAuthority
from trustmesh.errors import ConfigError
from trustmesh.files import atomic_write
from trustmesh.pki import dump_private_key, pem_certificates

__all__ = ["issue_server_identity", "parse_listen", "public_url"]


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


def issue_server_identity(
    ca: CertificateAuthority, host: str, directory: Path, *, path: str, actor: str = "ca-server"
) -> tuple[Path, Path]:
    """Issue a server's own certificate (SPIFFE ID path ``path``) into ``directory``.

    It names ``localhost``, ``127.0.0.1`` and the listen address; the key is mode 0600.
    Returns the chain and key paths.
    """
    ips: list[str] = []
    try:
        address = ipaddress.ip_address(host)
        if not address.is_unspecified:
            ips.append(host)
    except ValueError:
        pass
    dns = ["localhost"]
    if not ips and host not in {"localhost", "0.0.0.0", "::"}:  # noqa: S104 - names only
        dns.append(host)
    ips.append("127.0.0.1") if "127.0.0.1" not in ips else None
    issued = ca.issue(
        f"spiffe://{ca.config.trust_domain}{path}",
        dns=dns,
        ips=ips,
        ttl=min(timedelta(days=7), ca.config.profile(None).max_ttl),
        actor=actor,
    )
    assert issued.key is not None  # noqa: S101 - issue() always generates one
    chain, key = directory / "chain.pem", directory / "key.pem"
    atomic_write(key, dump_private_key(issued.key), mode=0o600)
    atomic_write(chain, pem_certificates(issued.chain))
    return chain, key


def public_url(host: str, port: int) -> str:
    """The ``https://`` URL clients use for a server listening on ``host:port``."""
    shown = "localhost" if host in {"0.0.0.0", "::"} else host  # noqa: S104 - names only
    if ":" in shown:
        shown = f"[{shown}]"
    return f"https://{shown}:{port}"
