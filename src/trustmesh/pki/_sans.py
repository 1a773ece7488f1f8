"""Host-name SANs: checking names and addresses, and what a join token lets a workload claim.

A workload certificate's identity is its SPIFFE ID; DNS and IP SANs are there only so
that peers checking host names (curl, Java, nginx, browsers) accept it as a server. A
join token names the SANs its enrollment may claim (:class:`SANAllowance`); the CA keeps
that allowance with every certificate descended from the enrollment, so each renewal is
checked against it as well as against the profile.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from trustmesh.errors import ConfigError, ScopeError

from ._spiffe import glob_match

__all__ = ["SANAllowance", "parse_dns_name", "parse_ip_address"]

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_PATTERN_LABEL = re.compile(r"\*\*|[a-z0-9*]([a-z0-9*-]{0,61}[a-z0-9*])?")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_dns_name(value: str, *, option: str = "--dns") -> str:
    """Return ``value`` as a lower-case host name fit for a DNS SAN.

    Raises:
        ConfigError: It is not a host name (labels of letters, digits and inner
            hyphens, at most 253 characters; no wildcard, scheme, port or path).

    .. versionadded:: 0.2
    """
    name = value.strip().lower().rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(
            f"{option} {value!r} is not a host name: give a name such as "
            f"'orders.internal' or 'localhost' (no wildcard, scheme, port or path).",
            field="dns",
        )
    return name


def parse_ip_address(value: str, *, option: str = "--ip") -> IPAddress:
    """Return ``value`` as an IP address fit for an IP SAN.

    Raises:
        ConfigError: It is not a single IPv4 or IPv6 address.

    .. versionadded:: 0.2
    """
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise ConfigError(
            f"{option} {value!r} is not an IP address: give one address such as 127.0.0.1 or ::1.",
            field="ip",
        ) from None


def _dns_pattern(value: str) -> str:
    pattern = value.strip().lower().rstrip(".")
    if not pattern or not all(_PATTERN_LABEL.fullmatch(label) for label in pattern.split(".")):
        raise ConfigError(
            f"--dns {value!r} is not a host name or pattern: give a name such as "
            f"'orders.internal', '*.orders.internal' (one label) or '**.internal' (any "
            f"depth).",
            field="dns",
        )
    return pattern


def _ip_range(value: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError:
        raise ConfigError(
            f"--ip {value!r} is not an IP address or CIDR range: give one such as "
            f"127.0.0.1, ::1 or 10.1.0.0/16 (no host bits set after the '/').",
            field="ip",
        ) from None


@dataclass(frozen=True)
class SANAllowance:
    """The DNS and IP SANs a workload may claim beyond its SPIFFE ID.

    Empty by default: a token created without ``--dns``/``--ip`` allows no host-name
    SAN at all.

    Args:
        dns: Host names or glob patterns (``*`` within a label, ``**`` across labels).
        ips: Addresses or CIDR ranges, in canonical text form.

    .. versionadded:: 0.2
    """

    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "_networks", tuple(ipaddress.ip_network(r, strict=False) for r in self.ips)
        )

    @classmethod
    def parse(cls, dns: Iterable[str] = (), ips: Iterable[str] = ()) -> SANAllowance:
        """Validate ``--dns`` patterns and ``--ip`` addresses/ranges (duplicates dropped).

        Raises:
            ConfigError: A pattern or range is malformed.
        """
        patterns = tuple(dict.fromkeys(_dns_pattern(p) for p in dns))
        ranges = tuple(dict.fromkeys(str(_ip_range(r)) for r in ips))
        return cls(patterns, ranges)

    @classmethod
    def exactly(cls, dns: Sequence[str], ips: Sequence[str]) -> SANAllowance:
        """The allowance of a certificate the operator issued by hand: its own SANs."""
        return cls(
            tuple(dict.fromkeys(n.lower() for n in dns)),
            tuple(dict.fromkeys(str(ipaddress.ip_network(i)) for i in ips)),
        )

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        """The ``ips`` as network objects."""
        return self._networks

    def allows_dns(self, name: str) -> bool:
        """Return whether the DNS name ``name`` is allowed."""
        lowered = name.lower().rstrip(".")
        return any(glob_match(lowered, p, sep=".") for p in self.dns)

    def allows_ip(self, address: IPAddress) -> bool:
        """Return whether the IP address ``address`` is allowed."""
        return any(address in net for net in self._networks)

    def check(
        self,
        dns: Sequence[str],
        ips: Sequence[IPAddress],
        *,
        spiffe_id: str,
        granted_by: str,
        fix: str,
    ) -> None:
        """Refuse the first DNS name or IP address this allowance does not cover.

        Args:
            dns: The DNS SANs asked for.
            ips: The IP SANs asked for.
            spiffe_id: The identity (for the message and the fix).
            granted_by: What granted the allowance, e.g. ``the join token``.
            fix: How to get a wider allowance, e.g. ``create the token with``.

        Raises:
            ScopeError: ``reason="san_not_allowed"``, naming the SAN and the option
                that would allow it.
        """
        for name in dns:
            if not self.allows_dns(name):
                allowed = list(self.dns) or "no DNS names"
                raise ScopeError(
                    f"Refusing DNS SAN {name!r} for {spiffe_id}: {granted_by} allows "
                    f"{allowed}. Drop --dns {name} or {fix} "
                    f"'trustmesh token create {spiffe_id} --dns {name}'.",
                    reason="san_not_allowed",
                    san=f"DNS:{name}",
                )
        for address in ips:
            if not self.allows_ip(address):
                allowed = list(self.ips) or "no IP addresses"
                raise ScopeError(
                    f"Refusing IP SAN {address} for {spiffe_id}: {granted_by} allows "
                    f"{allowed}. Drop --ip {address} or {fix} "
                    f"'trustmesh token create {spiffe_id} --ip {address}'.",
                    reason="san_not_allowed",
                    san=f"IP:{address}",
                )
