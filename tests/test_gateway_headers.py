"""Gateway header hygiene: every spelling of a spoofable header is stripped, hop-by-hop
headers never travel, the vouched headers carry only the gateway's view.

Function-level tests cover the spellings; a real uvicorn+httptools server over TLS,
fed exact bytes from a raw socket, shows what a client can really put on the wire
and that none of it survives :func:`strip_inbound`.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.gateway._headers import (
    ERROR_RESPONSE_HEADERS,
    SECURITY_HEADERS,
    add_security_headers,
    is_spoofable,
    normalize_name,
    strip_inbound,
    strip_response,
    vouched_headers,
)
from trustmesh.middleware import IDENTITY_HEADERS

from ._services import bundle_pem, issue, serve_asgi

# Every family the specification and the issue name, and the bypass class of
# request-overriding headers. Written as a client would: mixed case.
SPOOFED = [
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Forwarded-Server",
    "X-Forwarded-Client-Cert",
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "Forwarded",
    "X-Real-IP",
    "True-Client-IP",
    "CF-Connecting-IP",
    "X-Cluster-Client-IP",
    "X-User",
    "X-User-Id",
    "X-User-Roles",
    "X-Userinfo",
    "X-Client-Cert",
    "X-Client-IP",
    "X-Client-Verify",
    "X-Trustmesh-Caller",
    "X-Trustmesh-Anything",
    "Client-Cert",
    "Client-Cert-Chain",
    "X-Remote-User",
    "X-Auth-Request-User",
    "X-Auth-User",
    "X-Envoy-External-Address",
    "X-Envoy-Peer-Metadata",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Original-Method",
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
    "X-SSL-Client-Cert",
    "X-SPIFFE-ID",
    # identities other authenticating proxies set
    "Remote-Email",
    "Remote-Groups",
    "X-Amzn-Oidc-Identity",
    "X-Goog-Authenticated-User-Email",
    "X-Goog-IAP-JWT-Assertion",
    "X-MS-CLIENT-PRINCIPAL-NAME",
    "X-MS-TOKEN-AAD-ACCESS-TOKEN",
    "Cf-Access-Jwt-Assertion",
    "X-Pomerium-Claim-Email",
    "Tailscale-User-Login",
    "X-WEBAUTH-USER",
    "X-Azure-ClientIP",
    "X-Originating-IP",
    "X-ProxyUser-Ip",
    "WL-Proxy-Client-IP",
]
KEPT = [
    "Host",
    "Accept",
    "Content-Type",
    "Content-Length",
    "Authorization",
    "User-Agent",
    "Cookie",
    "X-Request-Id",
    "X-Custom",
    "Forwarded-Fruit",  # not a prefix match on "forwarded"
    "Xforwarded-For",  # not the header any server reads
    "X-Amz-Date",  # signed S3 requests: only x-amzn-oidc-* is an identity
    "X-Goog-Api-Key",
    "X-MS-Version",
    "X-Requested-With",
    "X-CSRF-Token",
    "Origin",
    "Referer",
]
HOP = ["Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding",
       "Upgrade", "Proxy-Authorization"]  # fmt: skip


def spellings(name: str) -> list[bytes]:
    """The spellings a client can send: case variants, ``_`` for ``-``, blanks around."""
    variants = {
        name,
        name.lower(),
        name.upper(),
        name.swapcase(),
        name.replace("-", "_"),
        name.lower().replace("-", "_"),
        name.upper().replace("-", "_"),
        " " + name,
        name + "\t",
    }
    return sorted(v.encode() for v in variants)


@pytest.mark.parametrize("name", SPOOFED)
def test_every_spelling_of_a_spoofable_header_is_stripped(name: str) -> None:
    for spelling in spellings(name):
        assert is_spoofable(spelling), spelling
        headers = [(b"host", b"api.example.org"), (spelling, b"203.0.113.9"), (b"accept", b"*/*")]
        kept, removed = strip_inbound(headers)
        assert kept == [(b"host", b"api.example.org"), (b"accept", b"*/*")]
        assert removed == [spelling.lower().decode()]


def test_trustmesh_identity_headers_are_all_covered() -> None:
    """The middleware's list is reused, not copied: every entry is stripped."""
    for name in IDENTITY_HEADERS:
        assert is_spoofable(name.encode()), name
        assert is_spoofable(name.upper().replace("-", "_").encode()), name


@pytest.mark.parametrize("name", KEPT)
def test_ordinary_headers_are_kept(name: str) -> None:
    for spelling in (name.encode(), name.lower().encode()):
        assert not is_spoofable(spelling)
        kept, removed = strip_inbound([(spelling, b"v")])
        assert kept == [(spelling, b"v")]
        assert removed == []


def test_duplicates_empty_values_and_many_copies() -> None:
    headers = [(b"x-forwarded-for", b"1.2.3.4")] * 500
    headers += [(b"X-Real-IP", b""), (b"x_real_ip", b""), (b"Forwarded", b"for=1.2.3.4")]
    headers += [(b"x-trustmesh-caller", b"spiffe://example.org/admin")] * 3
    headers += [(b"accept", b"a"), (b"accept", b"b"), (b"x-empty", b"")]
    kept, removed = strip_inbound(headers)
    assert kept == [(b"accept", b"a"), (b"accept", b"b"), (b"x-empty", b"")]
    assert removed == [
        "forwarded",
        "x-forwarded-for",
        "x-real-ip",
        "x-trustmesh-caller",
        "x_real_ip",
    ]


def test_many_distinct_names_do_not_grow_the_name_table_without_bound() -> None:
    from trustmesh.gateway import _headers

    headers = [(f"X-Forwarded-{i}".encode(), b"x") for i in range(6000)]
    headers += [(f"X-Other-{i}".encode(), b"x") for i in range(6000)]
    kept, removed = strip_inbound(headers)
    assert len(removed) == 6000
    assert len(kept) == 6000
    assert len(_headers._classes) <= _headers._CACHE_LIMIT


@pytest.mark.parametrize("name", HOP)
def test_hop_by_hop_headers_are_dropped_both_ways(name: str) -> None:
    for spelling in spellings(name):
        kept, removed = strip_inbound([(spelling, b"x"), (b"accept", b"*/*")])
        assert kept == [(b"accept", b"*/*")]
        assert removed == [spelling.lower().decode()]
        assert strip_response([(spelling, b"x"), (b"content-type", b"text/plain")]) == [
            (b"content-type", b"text/plain")
        ]


def test_headers_named_in_connection_are_dropped() -> None:
    headers = [
        (b"connection", b"keep-alive, X-Secret-Hop ,x_other_hop"),
        (b"Connection", b"close"),
        (b"x-secret-hop", b"1"),
        (b"X-Other-Hop", b"2"),
        (b"x-kept", b"3"),
    ]
    kept, removed = strip_inbound(headers)
    assert kept == [(b"x-kept", b"3")]
    assert removed == ["connection", "x-other-hop", "x-secret-hop"]
    assert strip_response(headers) == [(b"x-kept", b"3")]


def test_connection_cannot_remove_framing_target_or_credentials() -> None:
    headers = [
        (b"connection", b"host, content-length, authorization, x-forwarded-for"),
        (b"host", b"api"),
        (b"content-length", b"5"),
        (b"authorization", b"Bearer t"),
    ]
    kept, removed = strip_inbound(headers)
    assert kept == headers[1:]
    assert removed == ["connection"]


def test_response_keeps_upstream_identity_like_headers() -> None:
    """strip_response only removes hop-by-hop headers; X-User in a response is the app's."""
    headers = [(b"x-user", b"alice"), (b"keep-alive", b"timeout=5"), (b"set-cookie", b"a=b")]
    assert strip_response(headers) == [(b"x-user", b"alice"), (b"set-cookie", b"a=b")]


def test_normalize_name() -> None:
    assert normalize_name(b" X_Forwarded_For\t") == b"x-forwarded-for"


@pytest.mark.parametrize(
    ("client_ip", "host", "forwarded_host", "forwarded"),
    [
        ("203.0.113.9", "api.example.org", b"api.example.org", b"host=api.example.org"),
        ("2001:db8::1", "api.example.org:8443", b"api.example.org:8443",
         b'host="api.example.org:8443"'),
        ("198.51.100.1", 'evil", for=1.2.3.4', None, None),  # not a host: left out
        ("127.0.0.1", "[::1]:8443", b"[::1]:8443", b'host="[::1]:8443"'),
        ("127.0.0.1", "", None, None),
    ],
)  # fmt: skip
def test_vouched_headers(
    client_ip: str, host: str, forwarded_host: bytes | None, forwarded: bytes | None
) -> None:
    out = vouched_headers(client_ip=client_ip, scheme="https", host=host)
    ip = client_ip.encode()
    for_value = b'"[' + ip + b']"' if b":" in ip else ip
    expected = [(b"x-forwarded-for", ip), (b"x-forwarded-proto", b"https")]
    if forwarded_host is not None:
        expected.append((b"x-forwarded-host", forwarded_host))
    tail = b";" + forwarded if forwarded is not None else b""
    expected.append((b"forwarded", b"for=" + for_value + b";proto=https" + tail))
    assert out == expected


def test_vouched_headers_survive_their_own_strip_only_when_added_after() -> None:
    """The gateway strips first and adds after: the vouched values are the only ones."""
    inbound = [(b"x-forwarded-for", b"6.6.6.6"), (b"forwarded", b"for=6.6.6.6"), (b"a", b"b")]
    kept, _ = strip_inbound(inbound)
    out = kept + vouched_headers(client_ip="192.0.2.1", scheme="https", host="h")
    assert [v for n, v in out if n == b"x-forwarded-for"] == [b"192.0.2.1"]
    assert [v for n, v in out if n == b"forwarded"] == [b"for=192.0.2.1;proto=https;host=h"]


def test_security_headers() -> None:
    names = dict(SECURITY_HEADERS)
    assert names[b"x-content-type-options"] == b"nosniff"
    assert names[b"x-frame-options"] == b"DENY"
    assert names[b"referrer-policy"] == b"no-referrer"
    assert names[b"strict-transport-security"].startswith(b"max-age=")
    assert b"cache-control" not in names
    assert dict(ERROR_RESPONSE_HEADERS)[b"cache-control"] == b"no-store"
    response = add_security_headers([(b"content-type", b"text/html")])
    assert response == [(b"content-type", b"text/html"), *SECURITY_HEADERS]
    # An upstream's own value wins; the others are still added, each once.
    own = add_security_headers([(b"x-frame-options", b"SAMEORIGIN")])
    assert [v for n, v in own if n == b"x-frame-options"] == [b"SAMEORIGIN"]
    assert len(own) == len(SECURITY_HEADERS)
    error = add_security_headers([], error=True)
    assert (b"cache-control", b"no-store") in error


# -- on the wire ---------------------------------------------------------------------------


async def _echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Report what strip_inbound keeps and removes from the headers uvicorn delivered."""
    if scope["type"] != "http":
        return
    kept, removed = strip_inbound(scope["headers"])
    body = json.dumps(
        {
            "received": [n.decode("latin-1") for n, _ in scope["headers"]],
            "kept": [n.decode("latin-1") for n, _ in kept],
            "removed": removed,
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def server(ca: CertificateAuthority, tmp_path: Path) -> Iterator[tuple[int, ssl.SSLContext]]:
    identity = issue(ca, "spiffe://example.org/gateway", tmp_path)
    with serve_asgi(_echo_app, ca, identity, client_cert="none") as url:
        ctx = ssl.create_default_context(cadata=bundle_pem(ca))
        ctx.check_hostname = False
        yield int(url.rsplit(":", 1)[1]), ctx


def _raw(server: tuple[int, ssl.SSLContext], header_lines: list[bytes]) -> tuple[int, bytes]:
    """Send exactly these header lines over TLS; return the status and body."""
    port, ctx = server
    request = b"GET /echo HTTP/1.1\r\nHost: api.example.org\r\n"
    request += b"".join(line + b"\r\n" for line in header_lines)
    request += b"Connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(request)
            data = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def _kept_spoofable(kept: list[str]) -> list[str]:
    """An independent check: a kept name that normalises to a spoofable family."""
    families = {n.lower() for n in SPOOFED} | set(IDENTITY_HEADERS) | {h.lower() for h in HOP}
    prefixes = ("x-forwarded", "x-user", "x-client-", "x-trustmesh-", "x-envoy-", "x-original-")
    bad = []
    for name in kept:
        norm = name.strip(" \t").lower().replace("_", "-")
        if norm in families or norm.startswith(prefixes):
            bad.append(name)
    return bad


WIRE_CASES = [
    [b"X-Forwarded-For: 6.6.6.6", b"x-forwarded-for: 7.7.7.7"],
    [b"X_Forwarded_For: 6.6.6.6", b"X-FORWARDED-PROTO: http", b"x_forwarded_host: evil"],
    [b"Forwarded: for=6.6.6.6;proto=http", b"X-Real-IP: 6.6.6.6", b"X-Real-Ip:"],
    [b"True-Client-IP: 6.6.6.6", b"CF-Connecting-IP: 6.6.6.6", b"X-Cluster-Client-IP: 6.6.6.6"],
    [b"X-User: admin", b"X_USER_ID: 0", b"X-Client-Cert: abc", b"x-client-verify: SUCCESS"],
    [b"X-Trustmesh-Caller: spiffe://example.org/admin", b"x_trustmesh_caller: spiffe://x/y"],
    [b"Client-Cert: :AAAA:", b"Client-Cert-Chain: :AAAA:", b"X-Forwarded-Client-Cert: By=x"],
    [b"X-Remote-User: root", b"X-Auth-Request-User: root", b"X-Envoy-External-Address: 1.1.1.1"],
    [b"X-Original-URL: /admin", b"X-Rewrite-URL: /admin", b"X-Original-Method: DELETE"],
    [b"X-HTTP-Method-Override: DELETE", b"X-HTTP-Method: PUT", b"X-Method-Override: PATCH"],
    [b"X-Forwarded-For:", b"X-Forwarded-For: ", b"x-forwarded-for:\t"],
    [b"X-Forwarded-For: 1.1.1.1"] * 60,
    [b"X-Secret-Hop: 1", b"Connection: X-Secret-Hop"],
    [b"Keep-Alive: timeout=5", b"Proxy-Connection: keep-alive", b"TE: trailers"],
    [b"Upgrade: h2c", b"Proxy-Authorization: Basic Zm9vOmJhcg=="],
    # Spellings a server may refuse outright (400) or pass on; either way none survives.
    [b"X-Forwarded-For : 6.6.6.6"],
    [b" X-Forwarded-For: 6.6.6.6"],
    [b"X-Custom: a", b" X-Forwarded-For: 6.6.6.6"],  # obs-fold: a continuation line
    [b"X-Forwarded-For\t: 6.6.6.6"],
    [b"X-Forwarded-For:6.6.6.6"],
]


@pytest.mark.parametrize("lines", WIRE_CASES, ids=lambda lines: lines[0].decode()[:40])
def test_raw_bytes_on_the_wire_never_survive(
    server: tuple[int, ssl.SSLContext], lines: list[bytes]
) -> None:
    status, body = _raw(server, lines)
    if status == 400:
        return  # the HTTP parser refused the request: nothing reached the app
    assert status == 200, body
    seen = json.loads(body)
    assert _kept_spoofable(seen["kept"]) == []
    assert "host" in seen["kept"]
    for name in seen["kept"]:
        assert not is_spoofable(name.encode())


def test_raw_bytes_what_uvicorn_delivers(server: tuple[int, ssl.SSLContext]) -> None:
    """httptools lower-cases names but keeps ``_``: the strip has to map it, and does."""
    status, body = _raw(server, [b"X_Forwarded_For: 6.6.6.6", b"X-Trustmesh-Caller: x"])
    assert status == 200
    seen = json.loads(body)
    assert "x_forwarded_for" in seen["received"]
    assert seen["removed"] == ["connection", "x-trustmesh-caller", "x_forwarded_for"]
    assert seen["kept"] == ["host"]
