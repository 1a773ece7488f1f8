"""Adversarial review of the gateway: known bypass classes of other edge proxies.

Each test sends one attack in raw bytes over TLS (no HTTP library fixes the request) to
a `trustmesh gateway serve` process in front of a header-echo upstream, and asserts the
refusal precisely: status, decision reason, and that the upstream received nothing.
The spoofed-header and classic path tricks live in ``test_gateway_spoofing.py``; these
are the classes that file does not cover (Tomcat-style ``..;`` segments, request
smuggling framings, unusual request targets, methods and token places that must not
replace a bearer token, Host spellings, the redirect listener and log injection).
"""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid
from collections.abc import Iterator

import pytest
import yaml

from trustmesh.demo import READY_LINE

from ._gateway_stack import (
    Gateway,
    RawResponse,
    Stack,
    problem,
    raw_request,
    read_to_close,
    running_stack,
)
from ._server import free_port

pytestmark = pytest.mark.slow

HOSTED = "admin.demo.example"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("gw-attacks")) as s:
        yield s


def _routes(stack: Stack) -> list[dict[str, object]]:
    public = {"public": True}
    scoped = {"scopes": ["orders:read"]}
    hosted = stack.route("/hosted", "echo", auth=scoped, host=HOSTED)
    hosted["name"] = "hosted-admin"
    return [
        stack.route("/public", "echo", auth=public),
        stack.route("/admin", "echo", auth=scoped),
        hosted,
        stack.route("/hosted", "echo", auth=public),
    ]


@pytest.fixture(scope="module")
def redirect_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def gateway(stack: Stack, redirect_port: int) -> Gateway:
    config = stack.config(_routes(stack), redirect_http=f"127.0.0.1:{redirect_port}")
    return stack.start_gateway(config)


def marker() -> str:
    return uuid.uuid4().hex[:12]


def send(
    gateway: Gateway,
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    *,
    host: str | None = None,
) -> RawResponse:
    host = host if host is not None else f"127.0.0.1:{gateway.port}"
    return gateway.raw(raw_request(method, target, headers or [], host=host))


def refused_raw(
    gateway: Gateway, answer: RawResponse, status: int, reason: str, mark: str
) -> dict[str, object]:
    """ANSWER is the gateway's problem+json refusal with STATUS and REASON, logged so."""
    assert answer.status == status, (answer.status, answer.body)
    document = problem(status, answer, answer.body, [reason])
    assert gateway.reason(mark) == reason
    return document


# -- path parameters on dot segments (Tomcat/Jetty ``..;``) ---------------------------

DOT_PARAMETER_TRICKS = [
    "/public/..;/admin/{m}",
    "/public/..;jsessionid=1/admin/{m}",
    "/public/%2e%2e;/admin/{m}",
    "/public/..%3b/admin/{m}",
    "/public/.;/admin/{m}",
]


@pytest.mark.parametrize("trick", DOT_PARAMETER_TRICKS)
def test_a_dot_segment_with_path_parameters_is_refused(
    stack: Stack, gateway: Gateway, trick: str
) -> None:
    """``/public/..;/admin`` matches the public route here (``..;`` is not ``..``), but a
    Java upstream strips ``;`` parameters and serves ``/admin`` - the protected route's
    path - without the token the gateway would have asked for. Refused as ambiguous."""
    mark = marker()
    answer = send(gateway, "GET", trick.format(m=mark))
    refused_raw(gateway, answer, 400, "path_refused", mark)
    assert stack.echo_seen(mark) == []


# -- request smuggling toward the upstream -------------------------------------------


def _framed(head: str, body: bytes) -> bytes:
    return (head.replace("\n", "\r\n") + "\r\n").encode("latin-1") + body


SMUGGLING = {
    "content-length-and-chunked": (
        "POST /public/{m} HTTP/1.1\nHost: 127.0.0.1\nContent-Length: 4\n"
        "Transfer-Encoding: chunked\n",
        b"0\r\n\r\nGET /public/{s} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ),
    "duplicate-content-length": (
        "POST /public/{m} HTTP/1.1\nHost: 127.0.0.1\nContent-Length: 0\nContent-Length: 44\n",
        b"GET /public/{s} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ),
    "content-length-list": (
        "POST /public/{m} HTTP/1.1\nHost: 127.0.0.1\nContent-Length: 0, 44\n",
        b"GET /public/{s} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ),
    "obs-fold-continuation": (
        "GET /public/{m} HTTP/1.1\nHost: 127.0.0.1\nX-Note: a\n Transfer-Encoding: chunked\n",
        b"",
    ),
    "unknown-transfer-coding": (
        "POST /public/{m} HTTP/1.1\nHost: 127.0.0.1\nTransfer-Encoding: xchunked\n",
        b"GET /public/{s} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ),
    "space-before-colon": (
        "POST /public/{m} HTTP/1.1\nHost: 127.0.0.1\nTransfer-Encoding : chunked\n"
        "Content-Length: 44\n",
        b"GET /public/{s} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ),
}


@pytest.mark.parametrize("framing", sorted(SMUGGLING))
def test_ambiguous_request_framing_is_refused_before_any_upstream(
    stack: Stack, gateway: Gateway, framing: str
) -> None:
    """CL.TE, duplicate or listed Content-Length, obs-fold, an unknown coding and a space
    before the colon: the gateway's parser and a backend could disagree where the body
    ends. The connection is refused with 400 and neither the request nor the request
    hidden in its body reaches the upstream."""
    mark, smuggled = marker(), marker()
    head, body = SMUGGLING[framing]
    data = _framed(head.format(m=mark), body.replace(b"{s}", smuggled.encode()))
    answer = gateway.raw(data)
    assert answer.status == 400, (answer.status, answer.body)
    assert stack.echo_seen(mark) == []
    assert stack.echo_seen(smuggled) == []


# -- request targets ------------------------------------------------------------------


def test_asterisk_form_is_refused(stack: Stack, gateway: Gateway) -> None:
    """``OPTIONS *`` names no path: refused as a bad path, never matched to ``/``."""
    mark = marker()
    answer = send(gateway, "OPTIONS", "*", [("X-Mark", mark)])
    assert answer.status == 400, (answer.status, answer.body)
    document = problem(400, answer, answer.body, ["path_refused"])
    assert "start with '/'" in str(document["detail"])
    deadline = time.monotonic() + 10  # the access line is written after the answer
    while not (lines := [e for e in gateway.events() if e.get("event") == "access"][-5:]) or all(
        e["path"] != "*" for e in lines
    ):
        assert time.monotonic() < deadline, lines
        time.sleep(0.1)


def test_connect_reaches_no_upstream(stack: Stack, gateway: Gateway) -> None:
    """CONNECT would turn the gateway into a tunnel: refused, nothing relayed."""
    mark = marker()
    answer = send(gateway, "CONNECT", f"{mark}.example:443", host=f"{mark}.example:443")
    assert 400 <= answer.status < 500, (answer.status, answer.body)
    assert stack.echo_seen(mark) == []


def test_absolute_form_target_is_routed_and_checked_by_its_path(
    stack: Stack, gateway: Gateway
) -> None:
    """``GET https://other.example/admin/x`` with a Host the public route would take: the
    path is /admin, so the token is still required (401 token_missing) and the
    upstream sees nothing."""
    mark = marker()
    answer = send(gateway, "GET", f"https://other.example/admin/{mark}")
    document = refused_raw(gateway, answer, 401, "token_missing", mark)
    assert document["status"] == 401
    assert answer.header("www-authenticate") == 'Bearer realm="trustmesh"'
    assert stack.echo_seen(mark) == []


# -- methods and token places that must not replace a bearer token ---------------------


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS"])
def test_head_and_options_need_the_token_too(stack: Stack, gateway: Gateway, method: str) -> None:
    """HEAD and CORS preflight OPTIONS get no pass on a protected route."""
    mark = marker()
    answer = send(gateway, method, f"/admin/{mark}")
    assert answer.status == 401, (answer.status, answer.body)
    assert answer.header("www-authenticate") == 'Bearer realm="trustmesh"'
    if method != "HEAD":
        problem(401, answer, answer.body, ["token_missing"])
    assert gateway.reason(mark) == "token_missing"
    assert stack.echo_seen(mark) == []


def test_a_token_in_the_query_string_is_not_a_bearer_token(stack: Stack, gateway: Gateway) -> None:
    """RFC 6750's ``access_token`` query parameter (logged by every proxy on the way) is
    not accepted: a valid token there still answers 401 token_missing."""
    token = stack.user_token()
    mark = marker()
    answer = send(gateway, "GET", f"/admin/{mark}?access_token={token}")
    refused_raw(gateway, answer, 401, "token_missing", mark)
    assert stack.echo_seen(mark) == []


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_an_unsigned_alg_none_token_is_invalid(stack: Stack, gateway: Gateway) -> None:
    """The claims of a real token with ``alg: none`` and no signature: 401 invalid_token."""
    real = stack.user_token()
    claims = json.loads(base64.urlsafe_b64decode(real.split(".")[1] + "=="))
    unsigned = f"{_b64({'alg': 'none', 'typ': 'at+jwt'})}.{_b64(claims)}."
    mark = marker()
    answer = send(gateway, "GET", f"/admin/{mark}", [("Authorization", f"Bearer {unsigned}")])
    assert answer.status == 401, (answer.status, answer.body)
    assert 'error="invalid_token"' in (answer.header("www-authenticate") or "")
    reason = gateway.reason(mark)
    assert reason not in ("allowed", "public", "token_missing"), reason
    assert stack.echo_seen(mark) == []


# -- Host spellings --------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [HOSTED.upper(), HOSTED + ".", HOSTED + ":443", f"{HOSTED}:8443", f" {HOSTED} "],
)
def test_host_spellings_keep_the_host_route(stack: Stack, gateway: Gateway, host: str) -> None:
    """Case, a trailing dot, a port and spaces do not move a request off the protected
    ``admin.demo.example`` route onto the public route with the same path."""
    mark = marker()
    answer = send(gateway, "GET", f"/hosted/{mark}", host=host)
    refused_raw(gateway, answer, 401, "token_missing", mark)
    assert gateway.decisions(mark)[-1]["route"] == "hosted-admin"
    assert stack.echo_seen(mark) == []


def test_two_host_headers_are_refused(stack: Stack, gateway: Gateway) -> None:
    """RFC 9112 section 3.2: a request with two Host lines is answered 400. A proxy in
    front that reads the last one and the gateway reading the first would otherwise
    disagree about which route - the public or the host-protected one - applies."""
    mark = marker()
    answer = send(gateway, "GET", f"/hosted/{mark}", [("Host", HOSTED)], host="127.0.0.1")
    refused_raw(gateway, answer, 400, "host_refused", mark)
    assert stack.echo_seen(mark) == []


# -- the HTTP -> HTTPS redirect listener ----------------------------------------------


def _redirect(port: int, target: str, host: str) -> RawResponse:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [(k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in lines)]
    return RawResponse(int(status_line.split(" ")[1]), headers, body)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example/x",
        "evil.example\\@127.0.0.1",
        "user@evil.example",
        "evil.example%2f",
        "evil.example?x=",
        "evil.example#",
    ],
)
def test_redirect_never_puts_a_malformed_host_in_location(
    gateway: Gateway, redirect_port: int, host: str
) -> None:
    """A Host that is not a plain name (``/``, ``\\``, ``@``, ``?``, ``#``, escapes) would
    let a browser read another authority out of the Location: the HTTPS listener's own
    address is used instead."""
    answer = _redirect(redirect_port, "/public/x?y=1", host)
    assert answer.status == 308
    assert answer.header("location") == f"https://127.0.0.1:{gateway.port}/public/x?y=1"


def test_redirect_keeps_a_scheme_relative_path_on_the_gateway(
    gateway: Gateway, redirect_port: int
) -> None:
    """``GET //evil.example/x``: the path stays a path behind the gateway's authority."""
    answer = _redirect(redirect_port, "//evil.example/x", f"127.0.0.1:{redirect_port}")
    assert answer.status == 308
    assert answer.header("location") == f"https://127.0.0.1:{gateway.port}//evil.example/x"


# -- huge and slow request heads --------------------------------------------------------


def _unfinished_head(gateway: Gateway, data: bytes) -> bytes:
    """Send DATA (a head that never ends) over TLS; what the gateway answers before it
    closes (b"" when it closed without a word; a timeout when it waits forever)."""
    with (
        socket.create_connection(("127.0.0.1", gateway.port), timeout=60) as sock,
        gateway.context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        if data:
            tls.sendall(data)
        return read_to_close(tls)


def test_a_head_over_the_limit_is_cut_before_it_ends(stack: Stack, gateway: Gateway) -> None:
    """A 2 MB header that never ends: httptools would buffer it all (and more) before the
    app's 431 check ran. The gateway answers 431 headers_too_large while the head is
    still arriving, and the request never reaches the upstream."""
    mark = marker()
    data = f"GET /public/{mark} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ".encode()
    received = _unfinished_head(gateway, data + b"a" * 2_000_000)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), received[:200]
    assert json.loads(body)["reason"] == "headers_too_large"
    assert stack.echo_seen(mark) == []


@pytest.mark.parametrize("sent", [b"", b"GET /public/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: 1"])
def test_a_head_that_never_ends_is_answered_408(
    stack: Stack, gateway: Gateway, sent: bytes
) -> None:
    """Slowloris: a connection that sends nothing, or half a head and then waits, is
    answered 408 header_timeout and closed instead of held open for ever."""
    received = _unfinished_head(gateway, sent)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), received[:200]
    assert json.loads(body)["reason"] == "header_timeout"
    assert stack.echo_seen("slow") == []


# -- log injection ----------------------------------------------------------------------


def test_a_crlf_in_the_path_forges_no_text_log_line(stack: Stack) -> None:
    """``/public/%0d%0a...`` is refused (400 path_refused) and, with ``--log-format
    text``, its access line stays one line: the control characters are logged escaped."""
    mesh = stack.mesh
    label = "gateway-text"
    path = stack.workdir / f"{label}.yaml"
    path.write_text(yaml.safe_dump(stack.config(_routes(stack)), sort_keys=False))
    argv = ["gateway", "serve", "--config", str(path), "--cert-dir", str(mesh.dirs["gateway"])]
    mesh.spawn(label, *argv, "--log-level", "info", "--log-format", "text")
    try:
        mesh._wait(label, lambda: READY_LINE.search(mesh.log_text(label)) is not None)
        url = READY_LINE.findall(mesh.log_text(label))[-1]
        gateway = Gateway(label, url, mesh, stack.client_context())
        mark = marker()
        forged = f"FORGED-{mark} trustmesh.gateway.access INFO GET /admin 200 allowed"
        answer = send(gateway, "GET", f"/public/{mark}%0d%0a{forged.replace(' ', '%20')}")
        assert answer.status == 400, (answer.status, answer.body)
        problem(400, answer, answer.body, ["path_refused"])
        for _ in range(200):
            lines = [line for line in mesh.log_text(label).splitlines() if mark in line]
            if lines:
                break
            time.sleep(0.05)
        assert len(lines) == 1, lines
        assert not lines[0].startswith("FORGED"), lines
        assert "%0D%0AFORGED" in lines[0], lines
        assert stack.echo_seen(mark) == []
    finally:
        mesh.halt(label)
