"""The client's address, and per-route CIDR allow/deny lists.

The address is the TCP peer unless the peer is a configured trusted proxy. Then the
``X-Forwarded-For`` values are read from right to left (each proxy appends the address
it saw), skipping trusted proxies; the first address that is not one is the client. An
entry that is not an address stops the walk and the last trusted hop is used, so a
client cannot choose what the gateway believes by sending garbage.

IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``, what a dual-stack socket reports)
are treated as the IPv4 address they carry, in lists and in results.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["CidrList", "TrustedProxies", "client_address", "parse_ip"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_V4_ALL = 0xFFFFFFFF
_V6_ALL = (1 << 128) - 1
_XFF = b"x-forwarded-for"


# Clients come back: parsed addresses are remembered (cleared when full, so garbage
# cannot grow it). ipaddress.ip_address costs microseconds; a dict hit, nanoseconds.
_PARSED_LIMIT = 65536
_parsed: dict[str, IPAddress | None] = {}


def parse_ip(text: str) -> IPAddress | None:
    """Parse an address (IPv4-mapped IPv6 becomes IPv4); None when it is not one.

    Also accepts what proxies write in ``X-Forwarded-For``: ``[v6]``, ``[v6]:port``
    and ``v4:port``. Zone ids (``fe80::1%eth0``) are refused.
    """
    try:
        return _parsed[text]
    except KeyError:
        pass
    address = _parse_ip(text)
    if len(_parsed) >= _PARSED_LIMIT:
        _parsed.clear()
    _parsed[text] = address
    return address


def _parse_ip(text: str) -> IPAddress | None:
    text = text.strip()
    if not text or len(text) > 64:
        return None
    if text[0] == "[":
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and not _is_port(text[end + 1 :])):
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text, _, port = text.partition(":")
        if not port.isdigit() or len(port) > 5:
            return None
    if "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port(text: str) -> bool:
    return text[0] == ":" and text[1:].isdigit() and len(text) <= 6


def _parse_network(entry: object, what: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    example = "write it like 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32"
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"{what} entry {entry!r} is not a CIDR string; {example}")
    text = entry.strip()
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{what} entry {entry!r} is not a CIDR ({exc}); {example}") from None
        raise ValueError(
            f"{what} entry {entry!r} has host bits set; write the network, {loose}"
        ) from None
    if network.version == 6 and network.subnet_of(_MAPPED):
        # ::ffff:10.0.0.0/104 is 10.0.0.0/8: addresses are compared as IPv4.
        return ipaddress.IPv4Network(
            (int(network.network_address) & _V4_ALL, network.prefixlen - 96)
        )
    return network


class _Networks:
    """CIDRs as (network, mask) integers per family: matching is a few AND operations."""

    __slots__ = ("v4", "v6")

    def __init__(self, entries: Iterable[object], what: str) -> None:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for entry in entries:
            network = _parse_network(entry, what)
            pair = (int(network.network_address), int(network.netmask))
            (v4 if network.version == 4 else v6).append(pair)
        self.v4 = tuple(v4)
        self.v6 = tuple(v6)

    def __bool__(self) -> bool:
        return bool(self.v4 or self.v6)

    def contains(self, address: IPAddress) -> bool:
        value = int(address)
        for network, mask in self.v4 if address.version == 4 else self.v6:
            if value & mask == network:
                return True
        return False


class TrustedProxies:
    """The proxies whose ``X-Forwarded-For`` is believed.

    Args:
        cidrs: Networks or single addresses (``10.0.0.0/8``, ``192.0.2.7``, ``fd00::/8``).

    Raises:
        ValueError: An entry is not a CIDR; the message names it and shows the form.
    """

    __slots__ = ("_networks",)

    def __init__(self, cidrs: Sequence[str] = ()) -> None:
        if isinstance(cidrs, str):
            raise ValueError(f"trusted_proxies must be a list of CIDRs; write [{cidrs!r}]")
        self._networks = _Networks(cidrs, "trusted_proxies")

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, address: object) -> bool:
        if isinstance(address, str):
            parsed = parse_ip(address)
            return parsed is not None and self._networks.contains(parsed)
        if isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return self._networks.contains(address)
        return False


def _forwarded_for(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    values: list[bytes] = []
    for name, value in headers:
        if len(name) == 15 and name.lower() == _XFF:
            values.append(value)
    return values


def client_address(
    peer_ip: str, headers: Iterable[tuple[bytes, bytes]], trusted: TrustedProxies
) -> str:
    """The client's address as the gateway believes it.

    Args:
        peer_ip: The TCP peer (ASGI ``scope["client"][0]``).
        headers: The request headers as received (only exactly ``X-Forwarded-For``,
            in any case, is read; ``X_Forwarded_For`` is not a forwarding header).
        trusted: The trusted proxies.

    Returns:
        The address in canonical form (IPv4-mapped IPv6 as IPv4, IPv6 compressed).
        A peer that is not an address is returned unchanged.
    """
    if not trusted:
        if ":" not in peer_ip:
            return peer_ip
        peer = parse_ip(peer_ip)
        return peer_ip if peer is None else str(peer)
    peer = parse_ip(peer_ip)
    if peer is None:
        return peer_ip
    hop = peer
    if trusted._networks.contains(peer):
        values = _forwarded_for(headers)
        for value in reversed(values):
            for entry in reversed(value.split(b",")):
                address = parse_ip(entry.decode("latin-1"))
                if address is None:
                    return str(hop)  # malformed: stop at the last trusted hop
                hop = address
                if not trusted._networks.contains(address):
                    return str(address)
    return str(hop)


class CidrList:
    """A route's ``allow_ips``/``deny_ips``: deny wins; with an allow list, only it passes.

    Args:
        allow: If given, only addresses in these networks pass.
        deny: Addresses in these networks never pass.

    Raises:
        ValueError: An entry is not a CIDR; the message names it and shows the form.
    """

    __slots__ = ("_allow", "_deny", "_empty")

    def __init__(self, allow: Sequence[str] = (), deny: Sequence[str] = ()) -> None:
        for what, value in (("allow_ips", allow), ("deny_ips", deny)):
            if isinstance(value, str):
                raise ValueError(f"{what} must be a list of CIDRs; write [{value!r}]")
        self._allow = _Networks(allow, "allow_ips")
        self._deny = _Networks(deny, "deny_ips")
        self._empty = not self._allow and not self._deny

    def __bool__(self) -> bool:
        return not self._empty

    def check(self, ip: str) -> str | None:
        """None when ``ip`` may pass, else the reason: ``ip_denied`` or ``ip_not_allowed``.

        An address that cannot be parsed never passes a configured list
        (``ip_not_allowed``).
        """
        if self._empty:
            return None
        address = parse_ip(ip)
        if address is None:
            return "ip_not_allowed"
        if self._deny and self._deny.contains(address):
            return "ip_denied"
        if self._allow and not self._allow.contains(address):
            return "ip_not_allowed"
        return None
