"""Header spoofing and path tricks against the gateway, in raw bytes over TLS.

The bypass class of Traefik CVE-2026-35051 and oauth2-proxy CVE-2026-40575: a client
sends the identity or forwarding headers a proxy would set, in any spelling, hoping the
upstream (or the proxy's own decision) believes them. Requests are written byte for byte
on an ``ssl`` socket (no HTTP library normalises names, drops repeats or fixes paths), and
a header-echo upstream under `trustmesh run` reports exactly what arrived. It trusts the
gateway as a proxy, so a header that slipped through would show there (and an identity
header would even change the caller it reports).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from ._gateway_stack import (
    GATEWAY_ID,
    Gateway,
    RawResponse,
    Stack,
    problem,
    raw_request,
    running_stack,
)

pytestmark = pytest.mark.slow

SPOOFED = [
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Forwarded-Prefix",
    "Forwarded",
    "X-Real-IP",
    "X-User",
    "X-User-Id",
    "X-Client-Cert",
    "X-Forwarded-Client-Cert",
    "X-Trustmesh-Caller",
    "Client-Cert",
    "Client-Cert-Chain",
    "X-Remote-User",
    "X-Auth-Request-User",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-HTTP-Method-Override",
    "X-Forwarded-User",
]
#: The headers the gateway sets itself, with only its own view of the connection.
VOUCHED = {"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "forwarded"}
#: The address a spoofer claims: a documentation range (RFC 5737), never ours.
CLAIMED = "203.0.113.66"


def spellings(name: str, value: str) -> dict[str, list[tuple[str, str]]]:
    """Every variant of one header: case, ``_`` for ``-``, repeated, empty."""
    mixed = "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(name))
    return {
        "as-is": [(name, value)],
        "lower": [(name.lower(), value)],
        "upper": [(name.upper(), value)],
        "mixed": [(mixed, value)],
        "underscore": [(name.replace("-", "_"), value)],
        "repeated": [(name, value), (name.lower(), value + "-again")],
        "empty": [(name, "")],
    }


def spoof_value(name: str, mark: str) -> str:
    """A value that looks right for NAME and carries MARK, so any leak is found."""
    lower = name.lower()
    if lower in {"x-forwarded-for", "x-real-ip"}:
        return f"{CLAIMED}, 10.0.0.{len(mark) % 250}"
    if lower == "forwarded":
        return f'for={CLAIMED};proto=http;by="spoof-{mark}"'
    if lower in {"x-original-url", "x-rewrite-url"}:
        return f"/admin/spoof-{mark}"
    if lower == "x-http-method-override":
        return "DELETE"
    if lower == "x-trustmesh-caller":
        return f"spiffe://demo.example/admin-spoof-{mark}"
    return f"spoof-{mark}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("gw-spoof")) as s:
        yield s


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Gateway:
    """No trusted proxies: no client may tell the gateway its address."""
    public = {"public": True}
    routes = [
        stack.route("/public", "echo", auth=public),
        stack.route("/admin", "echo", auth=public, allow_ips=["192.0.2.0/24"]),
        stack.route("/internal", "echo", auth=public, deny_ips=["127.0.0.0/8"]),
        stack.route("/readonly", "echo", auth=public, methods=["GET"]),
        stack.route("/api", "echo", auth={"scopes": ["orders:read"]}),
        stack.route(
            "/limited", "echo", auth=public, rate_limits={"per_ip": {"rate": 0.1, "burst": 3}}
        ),
    ]
    return stack.start_gateway(stack.config(routes))


def marker() -> str:
    return uuid.uuid4().hex[:12]


def arrived(stack: Stack, mark: str) -> dict[str, object]:
    (seen,) = stack.echo_seen(mark)
    return seen


def names(seen: dict[str, object]) -> list[str]:
    headers = seen["headers"]
    assert isinstance(headers, list)
    return [str(k).lower().replace("_", "-") for k, _ in headers]


def values(seen: dict[str, object], name: str) -> list[str]:
    headers = seen["headers"]
    assert isinstance(headers, list)
    return [str(v) for k, v in headers if str(k).lower().replace("_", "-") == name]


def assert_clean(seen: dict[str, object], gateway: Gateway, mark: str) -> None:
    """Nothing the client claimed arrived; the gateway's own forwarding headers did."""
    headers = seen["headers"]
    assert isinstance(headers, list)
    for name, value in headers:
        assert mark not in value, f"{name}: {value} reached the upstream"
        assert CLAIMED not in value, f"{name}: {value} reached the upstream"
    normalized = names(seen)
    for spoofed in SPOOFED:
        if spoofed.lower() not in VOUCHED:
            assert spoofed.lower() not in normalized, f"{spoofed} reached the upstream"
    assert values(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert values(seen, "x-forwarded-proto") == ["https"]
    assert values(seen, "x-forwarded-host") == [f"127.0.0.1:{gateway.port}"]
    (forwarded,) = values(seen, "forwarded")
    assert "for=127.0.0.1" in forwarded.replace('"', "")
    assert "proto=https" in forwarded
    assert seen["caller"] == GATEWAY_ID
    assert seen["method"] == "GET"


def send(gateway: Gateway, method: str, target: str, headers: list[tuple[str, str]]) -> RawResponse:
    return gateway.raw(raw_request(method, target, headers, host=f"127.0.0.1:{gateway.port}"))


@pytest.mark.parametrize("name", SPOOFED)
def test_no_spelling_of_a_spoofed_header_reaches_the_upstream(
    stack: Stack, gateway: Gateway, name: str
) -> None:
    for variant, headers in spellings(name, spoof_value(name, "SPOOF")).items():
        mark = marker()
        sent = [(k, v.replace("SPOOF", mark)) for k, v in headers]
        answer = send(gateway, "GET", f"/public/{mark}", sent)
        assert answer.status == 200, (variant, sent, answer.status, answer.body)
        assert_clean(arrived(stack, mark), gateway, mark)


def test_every_spoofed_header_in_every_spelling_at_once(stack: Stack, gateway: Gateway) -> None:
    mark = marker()
    headers = [
        header
        for name in SPOOFED
        for variant in spellings(name, spoof_value(name, mark)).values()
        for header in variant
    ]
    answer = send(gateway, "GET", f"/public/{mark}", headers)
    assert answer.status == 200, answer.body
    seen = arrived(stack, mark)
    assert_clean(seen, gateway, mark)
    assert seen["raw_path"] == f"/public/{mark}"  # X-Original-URL / X-Rewrite-URL ignored


ADDRESS_CLAIMS = [
    ("X-Forwarded-For", "198.51.100.7"),
    ("X-Forwarded-For", "192.0.2.10"),
    ("x_forwarded_for", "192.0.2.10"),
    ("Forwarded", "for=192.0.2.10"),
    ("X-Real-IP", "192.0.2.10"),
]


@pytest.mark.parametrize(("name", "claimed"), ADDRESS_CLAIMS)
def test_a_claimed_address_escapes_no_ip_rule(
    stack: Stack, gateway: Gateway, name: str, claimed: str
) -> None:
    """/internal denies 127.0.0.0/8 and /admin allows only 192.0.2.0/24: a client on
    127.0.0.1 claiming another address is still 127.0.0.1 (no trusted proxies)."""
    for target, status, reason in (
        ("/internal", 403, "ip_denied"),
        ("/admin", 403, "ip_not_allowed"),
    ):
        mark = marker()
        answer = send(gateway, "GET", f"{target}/{mark}", [(name, claimed)])
        problem(status, answer, answer.body, [reason])
        assert gateway.reason(f"{target}/{mark}") == reason
        assert stack.echo_seen(mark) == []


def test_a_new_claimed_address_per_request_escapes_no_rate_limit(
    stack: Stack, gateway: Gateway
) -> None:
    """/limited allows 3 requests per client address, then 1 per 10 s: naming another
    address in every request does not make a new client."""
    statuses = []
    for n in range(6):
        claimed = [("X-Forwarded-For", f"198.51.100.{n}"), ("X-Real-IP", f"198.51.100.{n}")]
        statuses.append(send(gateway, "GET", f"/limited/{marker()}", claimed).status)
    assert statuses[:3] == [200, 200, 200], statuses
    assert statuses[3:] == [429, 429, 429], statuses


def test_x_original_url_reaches_no_forbidden_route(stack: Stack, gateway: Gateway) -> None:
    mark, other = marker(), marker()
    rewrite = [("X-Original-URL", f"/admin/{other}"), ("X-Rewrite-URL", f"/admin/{other}")]
    answer = send(gateway, "GET", f"/public/{mark}", rewrite)
    assert answer.status == 200
    seen = arrived(stack, mark)
    assert seen["path"] == f"/public/{mark}"
    assert "x-original-url" not in names(seen)
    assert "x-rewrite-url" not in names(seen)
    # and the other way round: a forbidden path is not let through by naming a public one
    back = [("X-Original-URL", f"/public/{other}"), ("X-Rewrite-URL", f"/public/{other}")]
    answer = send(gateway, "GET", f"/admin/{mark}", back)
    problem(403, answer, answer.body, ["ip_not_allowed"])
    assert stack.echo_seen(other) == []


def test_a_method_override_header_changes_no_method(stack: Stack, gateway: Gateway) -> None:
    mark = marker()
    override = [("X-HTTP-Method-Override", "GET"), ("X-Method-Override", "GET")]
    answer = send(gateway, "POST", f"/readonly/{mark}", override)
    problem(405, answer, answer.body, ["method_not_allowed"])
    assert stack.echo_seen(mark) == []
    answer = send(gateway, "GET", f"/readonly/{mark}", [("X-HTTP-Method-Override", "DELETE")])
    assert answer.status == 200
    seen = arrived(stack, mark)
    assert seen["method"] == "GET"
    assert "x-http-method-override" not in names(seen)


def test_identity_headers_stand_in_for_no_token(stack: Stack, gateway: Gateway) -> None:
    """A protected route without a token stays 401 whatever identity the client claims."""
    mark = marker()
    claims = [
        ("X-User", "alice"),
        ("X-User-Id", "alice"),
        ("X-Remote-User", "alice"),
        ("X-Auth-Request-User", "alice"),
        ("X-Forwarded-User", "alice"),
        ("X-Trustmesh-Caller", "spiffe://demo.example/orders"),
        ("X-Forwarded-Client-Cert", "By=spiffe://demo.example/gateway;URI=spiffe://x"),
        ("Client-Cert", ":MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA:"),
    ]
    answer = send(gateway, "GET", f"/api/{mark}", claims)
    problem(401, answer, answer.body, ["token_missing"])
    assert answer.header("www-authenticate") == 'Bearer realm="trustmesh"'
    assert stack.echo_seen(mark) == []


PATH_TRICKS = [
    "//admin/{m}",
    "/./admin/{m}",
    "/%2e%2e/admin/{m}",
    "/%2E%2E/admin/{m}",
    "/public/../admin/{m}",
    "/public/..%2fadmin/{m}",
    "/public/..%2Fadmin/{m}",
    "/public/%2e%2e/admin/{m}",
    "/public/%2e%2e%2fadmin/{m}",
    "/public%2fadmin/{m}",
    "/%2Fadmin/{m}",
    "/public/..%5cadmin/{m}",
    "/public/.%2e/admin/{m}",
    "/ADMIN/{m}",
    "/Admin/{m}",
    "/admin;x=1/{m}",
]


@pytest.mark.parametrize("trick", PATH_TRICKS)
def test_a_path_trick_reaches_no_forbidden_route_and_no_upstream(
    stack: Stack, gateway: Gateway, trick: str
) -> None:
    """/admin is forbidden to this client; no spelling of it gets through, and a request
    the gateway refuses never reaches an upstream."""
    mark = marker()
    answer = send(gateway, "GET", trick.format(m=mark), [])
    assert 400 <= answer.status < 500, (trick, answer.status, answer.body)
    document = problem(answer.status, answer, answer.body, list(PATH_REFUSALS))
    assert gateway.reason(mark) == document["reason"]
    assert stack.echo_seen(mark) == []


#: What a path trick may be answered with: the route it resolves to refuses the client,
#: no route matches, or the path is refused as ambiguous.
PATH_REFUSALS = ("ip_not_allowed", "no_route", "path_refused")
