"""Gateway client addresses: trusted-proxy walk of X-Forwarded-For, CIDR allow/deny lists."""

from __future__ import annotations

import pytest

from trustmesh.gateway._addresses import CidrList, TrustedProxies, client_address, parse_ip

PROXIES = TrustedProxies(["10.0.0.0/8", "192.0.2.7", "fd00::/8"])


def xff(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-for", v.encode()) for v in values]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.9", "203.0.113.9"),
        (" 203.0.113.9 ", "203.0.113.9"),
        ("203.0.113.9:51234", "203.0.113.9"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:198.51.100.4", "198.51.100.4"),
        ("[::ffff:198.51.100.4]:80", "198.51.100.4"),
        ("unknown", None),
        ("", None),
        ("1.2.3", None),
        ("1.2.3.4.5", None),
        ("256.1.1.1", None),
        ("1.2.3.4:port", None),
        ("1.2.3.4:123456", None),
        ("[2001:db8::1", None),
        ("[2001:db8::1]x", None),
        ("fe80::1%eth0", None),
        ("_hidden", None),
        ("1" * 100, None),
    ],
)
def test_parse_ip(text: str, expected: str | None) -> None:
    parsed = parse_ip(text)
    assert (str(parsed) if parsed is not None else None) == expected


def test_untrusted_peer_is_the_client_whatever_it_sends() -> None:
    assert client_address("203.0.113.9", xff("1.1.1.1"), PROXIES) == "203.0.113.9"
    assert client_address("203.0.113.9", xff("1.1.1.1"), TrustedProxies([])) == "203.0.113.9"
    assert client_address("::ffff:203.0.113.9", [], TrustedProxies()) == "203.0.113.9"
    assert client_address("2001:DB8::1", [], TrustedProxies()) == "2001:db8::1"


def test_trusted_peer_walks_right_to_left_past_trusted_hops() -> None:
    # client 198.51.100.4 -> proxy 10.1.1.1 -> proxy 192.0.2.7 -> gateway (peer 10.2.2.2)
    headers = xff("6.6.6.6, 198.51.100.4, 10.1.1.1", "192.0.2.7")
    assert client_address("10.2.2.2", headers, PROXIES) == "198.51.100.4"
    # the leftmost entries are the client's own claims and never believed
    assert client_address("10.2.2.2", xff("6.6.6.6, 198.51.100.4"), PROXIES) == "198.51.100.4"


def test_header_name_spellings() -> None:
    upper = [(b"X-Forwarded-For", b"198.51.100.4")]
    assert client_address("10.2.2.2", upper, PROXIES) == "198.51.100.4"
    # X_Forwarded_For is not the header proxies write: a client sent it, it is ignored
    underscored = [(b"x_forwarded_for", b"198.51.100.4")]
    assert client_address("10.2.2.2", underscored, PROXIES) == "10.2.2.2"


def test_ipv6_and_mapped_addresses() -> None:
    assert client_address("fd00::5", xff("2001:db8::9"), PROXIES) == "2001:db8::9"
    assert client_address("::ffff:10.2.2.2", xff("[2001:db8::9]:4711"), PROXIES) == "2001:db8::9"
    assert client_address("10.2.2.2", xff("::ffff:198.51.100.4"), PROXIES) == "198.51.100.4"
    assert client_address("10.2.2.2", xff("::ffff:10.9.9.9, fd00::1"), PROXIES) == "10.9.9.9"
    mapped = TrustedProxies(["::ffff:10.0.0.0/104"])
    assert "10.3.3.3" in mapped
    assert client_address("10.2.2.2", xff("198.51.100.4"), mapped) == "198.51.100.4"


def test_malformed_entry_stops_the_walk_at_the_last_trusted_hop() -> None:
    assert client_address("10.2.2.2", xff("198.51.100.4, unknown"), PROXIES) == "10.2.2.2"
    headers = xff("198.51.100.4, garbage, 10.1.1.1")
    assert client_address("10.2.2.2", headers, PROXIES) == "10.1.1.1"
    assert client_address("10.2.2.2", xff("198.51.100.4,"), PROXIES) == "10.2.2.2"
    assert client_address("10.2.2.2", xff(""), PROXIES) == "10.2.2.2"


def test_all_hops_trusted_gives_the_farthest_known() -> None:
    assert client_address("10.2.2.2", xff("10.1.1.1, 192.0.2.7"), PROXIES) == "10.1.1.1"
    assert client_address("10.2.2.2", [], PROXIES) == "10.2.2.2"


def test_many_values_and_odd_peers() -> None:
    headers = xff(*(["10.1.1.1"] * 200)) + xff("198.51.100.4")
    assert client_address("10.2.2.2", headers, PROXIES) == "198.51.100.4"
    assert client_address("not-an-ip", xff("1.1.1.1"), PROXIES) == "not-an-ip"


def test_cidr_list_allow_and_deny() -> None:
    rules = CidrList(allow=["10.0.0.0/8", "2001:db8::/32"], deny=["10.6.0.0/16"])
    assert rules.check("10.1.2.3") is None
    assert rules.check("::ffff:10.1.2.3") is None
    assert rules.check("2001:db8:1::1") is None
    assert rules.check("10.6.1.1") == "ip_denied"
    assert rules.check("::ffff:10.6.1.1") == "ip_denied"
    assert rules.check("192.0.2.1") == "ip_not_allowed"
    assert rules.check("2001:db9::1") == "ip_not_allowed"
    assert rules.check("garbage") == "ip_not_allowed"
    only_deny = CidrList(deny=["192.0.2.0/24", "::1/128"])
    assert only_deny.check("192.0.2.200") == "ip_denied"
    assert only_deny.check("::1") == "ip_denied"
    assert only_deny.check("198.51.100.1") is None
    assert CidrList().check("anything") is None
    assert not CidrList()
    assert CidrList(allow=["127.0.0.1"]).check("127.0.0.1") is None
    assert CidrList(allow=["127.0.0.1"]).check("127.0.0.2") == "ip_not_allowed"
    assert CidrList(allow=["0.0.0.0/0"]).check("2001:db8::1") == "ip_not_allowed"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("10.0.0.1/8", "has host bits set; write the network, 10.0.0.0/8"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not a CIDR"),
        ("banana", "'banana' is not a CIDR"),
        ("", "is not a CIDR string"),
        (8, "8 is not a CIDR string"),
    ],
)
def test_bad_cidr_names_the_entry_and_the_form(entry: object, message: str) -> None:
    with pytest.raises(ValueError, match=r"write it like|write the network") as info:
        CidrList(allow=[entry])  # type: ignore[list-item]
    assert message in str(info.value)
    assert str(info.value).startswith("allow_ips entry")
    with pytest.raises(ValueError, match="trusted_proxies entry"):
        TrustedProxies([entry])  # type: ignore[list-item]


def test_a_string_instead_of_a_list_is_refused() -> None:
    with pytest.raises(ValueError, match=r"write \['10.0.0.0/8'\]"):
        CidrList(deny="10.0.0.0/8")
    with pytest.raises(ValueError, match="trusted_proxies must be a list"):
        TrustedProxies("10.0.0.0/8")
