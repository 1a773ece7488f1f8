"""SPIFFE ID parsing and glob matching (spec: SPIFFE-ID.md)."""

from __future__ import annotations

import pytest

from trustmesh.errors import SpiffeIDError
from trustmesh.pki import SpiffeID, glob_match, match_spiffe_pattern


@pytest.mark.parametrize(
    ("value", "trust_domain", "path"),
    [
        ("spiffe://example.org/api", "example.org", "/api"),
        ("spiffe://example.org/ns/prod/sa/api", "example.org", "/ns/prod/sa/api"),
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://my-td_1.example/a.b-c_d", "my-td_1.example", "/a.b-c_d"),
    ],
)
def test_parse_valid_ids(value: str, trust_domain: str, path: str) -> None:
    sid = SpiffeID.parse(value)
    assert (sid.trust_domain, sid.path) == (trust_domain, path)
    assert str(sid) == value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("https://example.org/api", "scheme"),
        ("spiffe://Example.org/api", "lower"),
        ("spiffe://example.org/api/", "trailing"),
        ("spiffe://example.org//api", "empty"),
        ("spiffe://example.org/./api", "."),
        ("spiffe://example.org/api?x=1", "query"),
        ("spiffe://example.org/api#f", "fragment"),
        ("spiffe://user@example.org/api", "user"),
        ("spiffe://example.org:8443/api", "port"),
        ("spiffe:///api", "trust domain"),
        ("spiffe://example.org/a%20b", "percent"),
    ],
)
def test_parse_rejects_invalid_ids_with_reason(value: str, fragment: str) -> None:
    with pytest.raises(SpiffeIDError) as info:
        SpiffeID.parse(value)
    assert value in info.value.message or fragment in info.value.message.lower()
    assert "\n" not in info.value.message


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("example.org/x", "a path is not part of a trust domain"),
        ("spiffe://example.org", "it starts with 'spiffe://'"),
        ("Example.org", "must be lower case"),
        ("example.org:8443", "a port is not allowed"),
        ("", "it is empty"),
    ],
)
def test_trust_domain_id_refuses_what_is_not_a_bare_trust_domain(value: str, fragment: str) -> None:
    """A trust domain is a bare lower-case name: a path, a scheme or a port is refused with
    a message about the trust domain (not about a SPIFFE ID the user never typed)."""
    with pytest.raises(SpiffeIDError, match=f"Invalid trust domain {value!r}") as info:
        SpiffeID.trust_domain_id(value)
    assert fragment in info.value.message
    assert "spiffe://spiffe://" not in info.value.message
    assert SpiffeID.trust_domain_id("my-td_1.example").uri == "spiffe://my-td_1.example"


@pytest.mark.parametrize(
    ("value", "pattern", "expected"),
    [
        ("spiffe://example.org/ns/prod/api", "spiffe://example.org/ns/*/api", True),
        ("spiffe://example.org/ns/prod/x/api", "spiffe://example.org/ns/*/api", False),
        ("spiffe://example.org/ns/prod/x/api", "spiffe://example.org/**", True),
        ("spiffe://other.org/api", "spiffe://example.org/**", False),
        ("spiffe://example.org/api", "spiffe://example.org/api", True),
    ],
)
def test_spiffe_patterns(value: str, pattern: str, expected: bool) -> None:
    assert match_spiffe_pattern(SpiffeID.parse(value), pattern) is expected


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("api.internal", "**.internal", True),
        ("a.b.internal", "**.internal", True),
        ("internal", "**.internal", False),
        ("api.localhost", "*.localhost", True),
        ("a.b.localhost", "*.localhost", False),
        ("evilinternal", "**.internal", False),
    ],
)
def test_dns_globs(name: str, pattern: str, expected: bool) -> None:
    assert glob_match(name, pattern, sep=".") is expected
